//! `hangar migrate --from PATH --to postgres://…`: moves a SQLite server's
//! data into a PostgreSQL database, so that several hosts can serve it.
//! The copy itself is the store's ([`Store::copy_into`]); this reads the
//! plugins the SQLite server keeps as files, and tells the operator what
//! was copied and what the PostgreSQL hosts need (the same server key).

use std::io::Write;
use std::path::{Path, PathBuf};

use clap::Args;

use crate::runtime::{Runtime, registry_key};
use crate::store::{Location, Store, StoreError, StoredPlugin};

/// Said in the output and in `hangar migrate --help`.
pub const SECRET_KEY_NOTE: &str = "Provider keys and MCP server secrets are copied sealed, as they are stored: start every \
PostgreSQL host with the server key the SQLite server used (its --secret-key-file, by default \
$XDG_DATA_HOME/hangar/secret.key, or the same HANGAR_SECRET_KEY), or they cannot be opened.";

/// `hangar migrate`.
#[derive(Debug, Args)]
#[command(after_help = SECRET_KEY_NOTE)]
pub struct MigrateArgs {
    /// The SQLite database file (first migrated to this version's schema).
    /// Stop the server that uses it first.
    #[arg(long, value_name = "PATH")]
    pub from: PathBuf,
    /// The PostgreSQL database, as postgres://USER@HOST:PORT/DB: new, or
    /// holding no data (a database that holds some is refused).
    #[arg(long, value_name = "URL")]
    pub to: String,
    /// The plugins the SQLite server installed through its API, copied into
    /// the database so that every host loads them [default: beside --from,
    /// as the server keeps them: hangar.db → hangar.plugins]
    #[arg(long, value_name = "DIR")]
    pub installed_dir: Option<PathBuf>,
}

/// Why `hangar migrate` copied nothing.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("there is no SQLite database at {0}")]
    NoSource(PathBuf),
    #[error("--to must name a PostgreSQL database (postgres://USER@HOST:PORT/DB), not `{0}`")]
    NotPostgres(String),
    #[error("cannot read the installed plugins in {path}: {source}")]
    Plugins { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("cannot start: {0}")]
    Io(#[from] std::io::Error),
}

/// Runs the command; the summary goes to standard output.
pub fn run(args: MigrateArgs) -> Result<(), MigrateError> {
    let url = match Location::parse(&args.to) {
        Location::Postgres(url) => url,
        Location::Sqlite(_) => return Err(MigrateError::NotPostgres(args.to)),
    };
    // `Store::open` would make an empty database of a mistyped path.
    if !args.from.is_file() {
        return Err(MigrateError::NoSource(args.from));
    }
    let installed_dir = args.installed_dir.unwrap_or_else(|| crate::config::installed_dir_of(&args.from));
    let plugins = installed_plugins(&installed_dir)?;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let report = runtime.block_on(async {
        let from = Store::open(&args.from)?;
        let to = Store::open_postgres(&url).await?;
        from.copy_into(&to, plugins).await
    })?;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "copied {} into {}:", args.from.display(), Location::Postgres(url));
    let width = report.tables.iter().map(|t| t.name.len()).max().unwrap_or(0);
    for table in &report.tables {
        let from_files = match table.added {
            0 => String::new(),
            n => format!(" ({n} from {})", installed_dir.display()),
        };
        let rows = if table.postgres == 1 { "row" } else { "rows" };
        let _ = writeln!(out, "  {:<width$}  {:>8} {rows}{from_files}", table.name, table.postgres);
    }
    let _ = writeln!(out, "each table counts the rows it has in SQLite (plugins: and those read from files).\n{SECRET_KEY_NOTE}");
    Ok(())
}

/// The plugins under `dir` (the server's, then each tenant's under
/// `tenants/ID/`), as the SQLite server loads them. One it would skip (a
/// manifest that does not parse, a missing component) is skipped here too,
/// with the reason on standard error.
fn installed_plugins(dir: &Path) -> Result<Vec<StoredPlugin>, MigrateError> {
    let mut found = plugins_in(dir, None)?;
    let tenants = crate::tenancy::plugins_root(dir);
    for tenant in sorted_entries(&tenants)? {
        if let (true, Some(id)) = (tenant.is_dir(), tenant.file_name().and_then(|n| n.to_str())) {
            found.extend(plugins_in(&tenant, Some(id))?);
        }
    }
    Ok(found)
}

fn sorted_entries(dir: &Path) -> Result<Vec<PathBuf>, MigrateError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(MigrateError::Plugins { path: dir.into(), source }),
    };
    let mut paths = entries
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| MigrateError::Plugins { path: dir.into(), source })?;
    paths.sort();
    Ok(paths)
}

fn plugins_in(dir: &Path, tenant: Option<&str>) -> Result<Vec<StoredPlugin>, MigrateError> {
    let found = match Runtime::scan_directory(dir) {
        Ok(found) => found,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => return Err(MigrateError::Plugins { path: dir.into(), source }),
    };
    let mut plugins = Vec::new();
    for found in found {
        match found {
            Ok(found) => plugins.push(StoredPlugin::new(
                registry_key(tenant, &found.manifest.name),
                tenant.map(str::to_string),
                found.text,
                found.wasm,
            )),
            Err(err) => eprintln!("hangar: skipping a plugin in {} (the server skips it too): {err}", dir.display()),
        }
    }
    Ok(plugins)
}
