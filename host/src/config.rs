//! Settings: command-line flags, then the config file, then defaults.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use serde::Deserialize;

use crate::permissions::{Action, Compiled, Origin, Rule, RuleError};
use crate::runtime::CompileSettings;
use crate::runtime::policy::{Limits, PluginPolicy, Policy};

/// Hangar runs AI agents behind a REST API. Their tools (bash, read, write,
/// edit, glob, grep, and any you add) and their model providers (Anthropic,
/// Ollama, OpenAI-compatible) are WebAssembly components in a sandbox: a tool
/// sees only its session's working directory, a provider only its granted
/// hosts, and neither ever sees an API key.
#[derive(Debug, Parser)]
#[command(
    name = "hangar",
    version,
    after_help = "Quick start:\n  hangar serve                      # http://127.0.0.1:2323\n  curl localhost:2323/health\n  curl localhost:2323/openapi.json  # the whole API\n\nSee `hangar serve --help` for settings."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP server (default: http://127.0.0.1:2323).
    ///
    /// Every setting can also come from the config file; flags win. Logs go
    /// to standard error, filtered by RUST_LOG (default `info`).
    Serve(ServeArgs),
    /// Write, build and install plugins: `hangar plugin new NAME --kind
    /// tool|provider --lang rust|python|js`, `hangar plugin build [DIR]`,
    /// `hangar plugin install FILE|DIR --server URL`.
    #[command(subcommand)]
    Plugin(crate::authoring::PluginCommand),
    /// Copy a SQLite database (and the plugins installed through its API)
    /// into a new PostgreSQL database, to serve it from several hosts.
    ///
    /// Stop the server first. Every table is copied in one transaction and
    /// its rows counted on both sides; a database that already holds data
    /// is refused, so running it twice copies nothing the second time.
    Migrate(crate::migrate::MigrateArgs),
    /// The server's own compile worker: a component on stdin, compiled on
    /// stdout (see runtime/compile.rs). Not for people.
    #[command(hide = true)]
    CompileWorker,
}

#[derive(Debug, Default, Args)]
pub struct ServeArgs {
    /// Address to listen on. A non-loopback address requires --token.
    #[arg(long)]
    pub host: Option<IpAddr>,
    /// Port to listen on (0 picks a free one and logs it).
    #[arg(long)]
    pub port: Option<u16>,
    /// SQLite database file, or a PostgreSQL database as
    /// postgres://USER@HOST:PORT/DB [default: $XDG_DATA_HOME/hangar/hangar.db]
    #[arg(long, value_name = "PATH|URL", env = "HANGAR_DATABASE_URL", hide_env_values = true)]
    pub db: Option<String>,
    /// Directory of extra plugins (NAME.wasm + NAME.plugin.toml)
    /// [default: $XDG_DATA_HOME/hangar/plugins]
    #[arg(long = "plugins", value_name = "DIR")]
    pub plugins_dir: Option<PathBuf>,
    /// Cache of compiled plugins [default: $XDG_CACHE_HOME/hangar/compiled]
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// Config file [default: $XDG_CONFIG_HOME/hangar/hangar.toml]
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// A browser origin allowed to call the API (repeatable). Others are refused.
    #[arg(long = "cors-origin", value_name = "ORIGIN")]
    pub cors_origins: Vec<String>,
    /// API token clients must send as `Authorization: Bearer TOKEN`.
    #[arg(long, env = "HANGAR_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Turns on multi-tenant mode: this token administers tenants
    /// (`/tenants`), and every other request needs it or a tenant key.
    /// Requires --work-root.
    #[arg(long, env = "HANGAR_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Directory that session work_dirs must be inside (repeatable).
    #[arg(long = "work-root", value_name = "DIR")]
    pub work_roots: Vec<PathBuf>,
    /// Most model calls in one run of the agent loop [default: 50]
    #[arg(long)]
    pub max_steps: Option<u32>,
    /// Time a client gets to send a request's headers, also the most a
    /// kept-alive connection may sit idle [default: 10000]
    #[arg(long, value_name = "MS")]
    pub header_timeout_ms: Option<u64>,
    /// Most connections open at once from one client address; more get 429
    /// [default: 1024]
    #[arg(long, value_name = "N")]
    pub max_connections_per_client: Option<usize>,
    /// File holding the server key that seals provider keys in the
    /// database, created (mode 0600) on first start; `HANGAR_SECRET_KEY`
    /// (64 hex digits) wins over it [default: $XDG_DATA_HOME/hangar/secret.key]
    #[arg(long, value_name = "FILE")]
    pub secret_key_file: Option<PathBuf>,
    /// How long a run's events are kept after it ends, for clients that
    /// resume (`30m`, `24h`, `7d`, or seconds) [default: 24h]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub event_retention: Option<Duration>,
    /// How long the audit trail keeps each change (`90d`, or seconds)
    /// [default: 90d]
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub audit_retention: Option<Duration>,
    /// Size of the SQLite write-ahead log (`DB-wal`) past which it is
    /// copied back and truncated, also the size it is cut to after a
    /// checkpoint [default: 64]
    #[arg(long, value_name = "MB")]
    pub wal_limit_mb: Option<u64>,
    /// Log lines as text for a person, or one JSON object a line for a log
    /// shipper.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

/// `--log-format`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The uid and gid of a user name (from the system's user database).
fn user_ids(name: &str) -> Option<(u32, u32)> {
    let c_name = std::ffi::CString::new(name).ok()?;
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    let mut result: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: valid C string, struct and buffer of the size passed.
    let rc = unsafe { libc::getpwnam_r(c_name.as_ptr(), &mut pwd, buf.as_mut_ptr(), buf.len(), &mut result) };
    (rc == 0 && !result.is_null()).then_some((pwd.pw_uid, pwd.pw_gid))
}

/// `90`, `90s`, `30m`, `24h` or `7d`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let n: u64 = number.parse().map_err(|_| format!("`{text}` is not a duration such as 90s, 30m, 24h or 7d"))?;
    let seconds = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("unknown unit `{unit}` in `{text}`: use s, m, h or d")),
    };
    Ok(Duration::from_secs(seconds))
}

/// The config file. Every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub host: Option<IpAddr>,
    pub port: Option<u16>,
    /// A SQLite file's path or a `postgres://` URL.
    pub db: Option<String>,
    pub plugins_dir: Option<PathBuf>,
    pub cache_dir: Option<PathBuf>,
    #[serde(default)]
    pub cors_origins: Vec<String>,
    pub token: Option<String>,
    pub admin_token: Option<String>,
    #[serde(default)]
    pub work_roots: Vec<PathBuf>,
    pub max_steps: Option<u32>,
    /// How long a run's events are kept after it ends (`24h`).
    pub event_retention: Option<String>,
    /// How long the audit trail keeps each change (`90d`).
    pub audit_retention: Option<String>,
    /// The server key's file (see `--secret-key-file`).
    pub secret_key_file: Option<PathBuf>,
    pub header_timeout_ms: Option<u64>,
    pub max_connections_per_client: Option<usize>,
    /// Size of the write-ahead log past which it is truncated, in MB.
    pub wal_limit_mb: Option<u64>,
    /// Refuse `bash` where the kernel cannot confine it fully.
    #[serde(default)]
    pub require_confinement: bool,
    /// Run `bash` even where nothing keeps its commands off the server's
    /// own API (no Landlock TCP rules, no network namespace).
    #[serde(default)]
    pub allow_unconfined_commands: bool,
    /// Default per-call limits of every plugin.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// Limits of each command a plugin granted `process` runs.
    #[serde(default)]
    pub process: ProcessConfig,
    /// Capabilities granted to third-party plugins, by plugin name.
    #[serde(default)]
    pub plugins: HashMap<String, PluginPolicy>,
    /// Permission rules for every agent, the default action and how long a
    /// question waits for its answer.
    #[serde(default)]
    pub permissions: PermissionsConfig,
    /// Multi-tenant mode: default quotas and the providers whose server
    /// keys tenants may use.
    #[serde(default)]
    pub tenants: TenantsConfig,
    /// MCP servers used as tools.
    #[serde(default)]
    pub mcp: McpConfig,
    /// Several hosts on one PostgreSQL database.
    #[serde(default)]
    pub hosts: HostsConfig,
    /// Plugins' outbound HTTP.
    #[serde(default)]
    pub http: HttpConfig,
}

/// `[http]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// A PEM file of root certificates plugins' HTTPS requests trust
    /// besides the built-in (Mozilla) roots: a gateway or a model server
    /// with a certificate from a private CA.
    pub ca_file: Option<PathBuf>,
}

/// `[hosts]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostsConfig {
    /// How long a run stays its host's without the host renewing its
    /// lease (renewed every sixth of it); after that another host
    /// interrupts it. Default 30.
    pub lease_s: Option<u64>,
}

/// `[mcp]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct McpConfig {
    /// Origins `http` MCP servers may have (`https://mcp.example.com`,
    /// `http://127.0.0.1:8931`); none by default. A tenant's may also be
    /// one of `[tenants] allowed_origins`.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// Whether `stdio` MCP servers may be registered [default: true on a
    /// single-user server, false in multi-tenant mode].
    pub stdio: Option<bool>,
    /// A session's `stdio` server is stopped after this long unused [default: 300].
    pub idle_timeout_s: Option<u64>,
    /// How long a call (or a server's start) may take [default: 60].
    pub call_timeout_s: Option<u64>,
}

/// `[tenants]`.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantsConfig {
    /// Providers whose server keys (set with the admin token, or from the
    /// environment) a tenant without a key of its own uses, counted
    /// against its quotas.
    #[serde(default)]
    pub shared_providers: Vec<String>,
    /// Quotas of every tenant that has no override of its own
    /// (`[tenants.quotas]`).
    #[serde(default)]
    pub quotas: crate::store::Quotas,
    /// Origins a tenant's provider `base_url` may name besides the
    /// vendor's (`http://10.0.0.5:11434`, `https://*.example.com`); an
    /// internal address is reachable only through a host listed exactly.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// The most a tenant's own plugin is granted (`[tenants.plugin_policy]`,
    /// the keys of `[plugins.NAME]`) [default: filesystem read-write, no
    /// `process`, no `http`].
    pub plugin_policy: Option<PluginPolicy>,
}

impl TenantsConfig {
    /// `[tenants.plugin_policy]` in force.
    pub fn plugin_cap(&self) -> PluginPolicy {
        self.plugin_policy.clone().unwrap_or_else(|| PluginPolicy { filesystem: crate::runtime::FsAccess::ReadWrite, ..Default::default() })
    }
}

/// `[permissions]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PermissionsConfig {
    /// What a call no rule matches gets: `allow` (the default), `ask` or `deny`.
    pub default: Option<Action>,
    /// Seconds a permission request waits before it is `timed_out` [default: 600].
    pub timeout_s: Option<u64>,
    /// Rules applied before each agent's own (`[[permissions.rules]]`):
    /// defaults an agent's rules may override.
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Rules applied after each agent's own (`[[permissions.enforce]]`):
    /// limits no agent can lift, such as a `deny` of `sudo *`.
    #[serde(default)]
    pub enforce: Vec<Rule>,
}

/// The permission settings in force.
#[derive(Debug, Clone)]
pub struct PermissionSettings {
    pub default: Action,
    pub timeout: Duration,
    pub rules: Vec<Compiled>,
    pub enforce: Vec<Compiled>,
}

/// Default of `[permissions] timeout_s`.
pub const DEFAULT_PERMISSION_TIMEOUT: Duration = Duration::from_secs(600);

/// `[process]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessConfig {
    /// Memory of one command and everything it starts [default: 1024].
    pub memory_mb: Option<u64>,
    /// Processes (and threads) at once [default: 256].
    pub max_processes: Option<u64>,
    /// CPU time [default: the call's timeout].
    pub cpu_seconds: Option<u64>,
    /// Largest file a command may write [default: 1024].
    pub file_size_mb: Option<u64>,
    /// `all` (the default) or `none`: no network for commands.
    pub network: Option<NetworkAccess>,
    /// With `network = "none"`: TCP ports commands may still connect to.
    #[serde(default)]
    pub allowed_ports: Vec<u16>,
    /// The user commands run as when the server runs as root [default:
    /// the owner of the session's work_dir].
    pub user: Option<String>,
    /// Multi-tenant mode: the uids (each also a gid) tenants' commands run
    /// as, one per tenant [default: [200000, 265535]].
    pub uid_range: Option<[u32; 2]>,
}

/// Default of `[process] uid_range`.
pub const DEFAULT_UID_RANGE: (u32, u32) = (200_000, 265_535);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NetworkAccess {
    All,
    None,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    pub timeout_ms: Option<u64>,
    pub memory_mb: Option<u64>,
    pub output_kb: Option<u64>,
    /// What one model answer (text and tool input of a step) may hold.
    pub step_output_kb: Option<u64>,
    /// Memory all plugin calls running at once may hold together, over
    /// each plugin's own `memory_mb` [default: half the machine's memory].
    pub plugin_memory_total_mb: Option<u64>,
    /// Most parts one call of a tool that can split its calls (`grep`) runs
    /// as at once [default: the machine's cores]; 1 never splits a call.
    pub tool_shards: Option<usize>,
    /// Plugin instances alive at once (a tool call, a part of one, or a
    /// model stream holds one) [default: 2,000].
    pub plugin_instances: Option<u32>,
    /// Bytes one call of a `read-write` plugin may write [default: 256].
    pub write_mb: Option<u64>,
    /// Files one call of a `read-write` plugin may create [default: 10,000].
    pub max_files: Option<u64>,
    /// Wall-clock seconds one plugin compile may take [default: 300].
    pub compile_timeout_s: Option<u64>,
    /// Memory of one plugin compile, in MB [default: 4096].
    pub compile_memory_mb: Option<u64>,
    /// Plugin compiles running at once, server-wide [default: 2].
    pub max_concurrent_compiles: Option<usize>,
    /// Size of the compile cache directory, in MB [default: 1024].
    pub compile_cache_mb: Option<u64>,
}

/// Default of `--header-timeout-ms`.
pub const DEFAULT_HEADER_TIMEOUT_MS: u64 = 10_000;
/// Default of `--max-connections-per-client`: above the 1,000 concurrent
/// streams a single local client (a benchmark, a UI) may hold.
pub const DEFAULT_MAX_CONNECTIONS_PER_CLIENT: usize = 1024;

/// Default of `--wal-limit-mb`.
pub const DEFAULT_WAL_LIMIT_MB: u64 = 64;

/// The settings in force.
#[derive(Debug, Clone)]
pub struct Settings {
    pub host: IpAddr,
    pub port: u16,
    pub db: crate::store::Location,
    pub plugins_dir: PathBuf,
    /// Plugins installed through the API: beside a SQLite database
    /// (`hangar.db` → `hangar.plugins/`), as they are part of its state;
    /// with PostgreSQL they are rows of the database, and this directory
    /// (`$XDG_DATA_HOME/hangar/hangar.plugins`) is not read.
    pub installed_dir: PathBuf,
    pub cache_dir: PathBuf,
    /// How plugins are compiled (`[limits] compile_*`) and the compile
    /// cache's size.
    pub compile: CompileSettings,
    /// The config file read (or that would have been): one of the server's
    /// own files, which no session may be given.
    pub config_path: PathBuf,
    pub cors_origins: Vec<String>,
    pub token: Option<String>,
    /// Set: multi-tenant mode.
    pub admin_token: Option<String>,
    /// Where tenants' directories are (`<root>/<tenant_id>/`), in
    /// multi-tenant mode: the first work root.
    pub tenant_root: Option<PathBuf>,
    pub tenants: std::sync::Arc<TenantsConfig>,
    /// The uids tenants' commands run as (`[process] uid_range`).
    pub uid_range: (u32, u32),
    /// `[tenants] allowed_origins`, parsed.
    pub tenant_origins: Vec<crate::runtime::policy::OriginPattern>,
    /// `[mcp]`, resolved.
    pub mcp: crate::mcp::McpSettings,
    /// `[hosts] lease_s`: a run's lease on a shared database.
    pub lease: Duration,
    pub work_roots: Vec<PathBuf>,
    pub max_steps: u32,
    pub event_retention: Duration,
    pub audit_retention: Duration,
    pub policy: Policy,
    /// Time a client gets to send a request's headers (HTTP/1).
    pub header_timeout: Duration,
    /// Most connections open at once from one IP address.
    pub max_connections_per_client: usize,
    pub permissions: std::sync::Arc<PermissionSettings>,
    /// The server key's file: one of the server's own files, like the database.
    pub secret_key_file: PathBuf,
    /// `HANGAR_SECRET_KEY`, when set (it wins over the file).
    pub secret_key: Option<crate::runtime::Secret>,
    /// Write-ahead log size past which it is checkpointed and truncated.
    pub wal_limit_bytes: u64,
    /// `[limits] plugin_memory_total_mb`; `None`: the runtime's default.
    pub plugin_memory_total_bytes: Option<usize>,
    /// `[limits] tool_shards`; `None`: the runtime's default.
    pub tool_shards: Option<usize>,
    /// `[limits] plugin_instances`; `None`: the runtime's default.
    pub plugin_instances: Option<u32>,
    /// `[http] ca_file`'s certificates.
    pub extra_roots: Vec<reqwest::Certificate>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read the config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid config file {path}: {source}")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("neither $HOME nor $XDG_{0}_HOME is set; pass the path explicitly")]
    NoHome(&'static str),
    #[error("refusing to listen on {0} without an API token: set --token or HANGAR_TOKEN (or --admin-token for multi-tenant mode)")]
    TokenRequired(IpAddr),
    #[error("multi-tenant mode (--admin-token) requires --work-root: the directory under which each tenant gets its own")]
    TenantRootRequired,
    #[error("--token (HANGAR_TOKEN) has no use with --admin-token: in multi-tenant mode requests carry the admin token or a tenant key")]
    TokenWithAdmin,
    #[error("invalid event_retention in the config file: {0}")]
    Retention(String),
    #[error("work root {path} is not a directory: {reason}")]
    WorkRoot { path: PathBuf, reason: String },
    #[error("{setting} must be at least 1")]
    Zero { setting: &'static str },
    #[error("invalid permission rule: {0}")]
    Permission(#[from] RuleError),
    #[error("[process] user `{0}` is not a user of this machine")]
    UnknownUser(String),
    #[error("[process] uid_range must be [first, last] with 0 < first <= last")]
    UidRange,
    #[error("[tenants] allowed_origins: `{origin}`: {reason}")]
    TenantOrigin { origin: String, reason: String },
    #[error("[mcp] allowed_origins: `{origin}`: {reason}")]
    McpOrigin { origin: String, reason: String },
    #[error("[http] ca_file {path}: {reason}")]
    CaFile { path: PathBuf, reason: String },
}

/// Where a SQLite server keeps the plugins installed through its API:
/// beside its database (`hangar.db` → `hangar.plugins/`).
pub fn installed_dir_of(db: &Path) -> PathBuf {
    db.with_extension("plugins")
}

fn xdg(var: &'static str, fallback: &str) -> Result<PathBuf, ConfigError> {
    let key = format!("XDG_{var}_HOME");
    match std::env::var_os(&key).filter(|v| !v.is_empty()) {
        Some(dir) => Ok(PathBuf::from(dir)),
        None => std::env::var_os("HOME")
            .filter(|v| !v.is_empty())
            .map(|home| Path::new(&home).join(fallback))
            .ok_or(ConfigError::NoHome(var)),
    }
}

impl Settings {
    pub fn resolve(args: ServeArgs) -> Result<Settings, ConfigError> {
        let (config_path, explicit) = match args.config.clone() {
            Some(path) => (path, true),
            None => (xdg("CONFIG", ".config")?.join("hangar/hangar.toml"), false),
        };
        let file = match std::fs::read_to_string(&config_path) {
            Ok(text) => toml::from_str::<FileConfig>(&text)
                .map_err(|source| ConfigError::Parse { path: config_path.clone(), source })?,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound && !explicit => FileConfig::default(),
            Err(source) => return Err(ConfigError::Read { path: config_path, source }),
        };
        let data = || xdg("DATA", ".local/share").map(|d| d.join("hangar"));
        let host = args.host.or(file.host).unwrap_or(IpAddr::from([127, 0, 0, 1]));
        let token = args.token.or(file.token).filter(|t| !t.is_empty());
        let admin_token = args.admin_token.or(file.admin_token).filter(|t| !t.is_empty());
        if !host.is_loopback() && token.is_none() && admin_token.is_none() {
            return Err(ConfigError::TokenRequired(host));
        }
        if admin_token.is_some() && token.is_some() {
            return Err(ConfigError::TokenWithAdmin);
        }
        let mut work_roots = if args.work_roots.is_empty() { file.work_roots } else { args.work_roots };
        for root in &mut work_roots {
            *root = root.canonicalize().map_err(|e| ConfigError::WorkRoot { path: root.clone(), reason: e.to_string() })?;
        }
        let multi_tenant = admin_token.is_some();
        let tenant_root = match (&admin_token, work_roots.first()) {
            (None, _) => None,
            (Some(_), Some(root)) => Some(root.clone()),
            (Some(_), None) => return Err(ConfigError::TenantRootRequired),
        };
        let defaults = Limits::default();
        let limits = Limits {
            deadline: file.limits.timeout_ms.map(Duration::from_millis).unwrap_or(defaults.deadline),
            memory_bytes: file.limits.memory_mb.map(|mb| (mb as usize) << 20).unwrap_or(defaults.memory_bytes),
            output_bytes: file.limits.output_kb.map(|kb| (kb as usize) << 10).unwrap_or(defaults.output_bytes),
            step_output_bytes: file.limits.step_output_kb.map(|kb| (kb as usize) << 10).unwrap_or(defaults.step_output_bytes),
            write_bytes: file.limits.write_mb.map(|mb| mb.saturating_mul(1 << 20)).unwrap_or(defaults.write_bytes),
            max_files: file.limits.max_files.unwrap_or(defaults.max_files),
        };
        if file.limits.plugin_memory_total_mb == Some(0) {
            return Err(ConfigError::Zero { setting: "[limits] plugin_memory_total_mb" });
        }
        if file.limits.tool_shards == Some(0) {
            return Err(ConfigError::Zero { setting: "[limits] tool_shards" });
        }
        let tool_shards = file.limits.tool_shards;
        if file.limits.plugin_instances == Some(0) {
            return Err(ConfigError::Zero { setting: "[limits] plugin_instances" });
        }
        let plugin_instances = file.limits.plugin_instances;
        let tenant_origins = origins(&file.tenants.allowed_origins, |origin, reason| ConfigError::TenantOrigin { origin, reason })?;
        let plugin_memory_total_bytes = file.limits.plugin_memory_total_mb.map(|mb| (mb as usize).saturating_mul(1 << 20));
        let compile = {
            let l = &file.limits;
            let nonzero = |value: Option<u64>, setting: &'static str| match value {
                Some(0) => Err(ConfigError::Zero { setting }),
                other => Ok(other),
            };
            let defaults = CompileSettings::default();
            CompileSettings {
                // This very binary, even if its file is replaced while it runs.
                worker: Some(PathBuf::from("/proc/self/exe")),
                timeout: nonzero(l.compile_timeout_s, "[limits] compile_timeout_s")?.map(Duration::from_secs).unwrap_or(defaults.timeout),
                memory_bytes: nonzero(l.compile_memory_mb, "[limits] compile_memory_mb")?.map(|mb| mb << 20).unwrap_or(defaults.memory_bytes),
                max_concurrent: nonzero(l.max_concurrent_compiles.map(|n| n as u64), "[limits] max_concurrent_compiles")?
                    .map(|n| n as usize)
                    .unwrap_or(defaults.max_concurrent),
                cache_bytes: nonzero(l.compile_cache_mb, "[limits] compile_cache_mb")?.map(|mb| mb << 20).unwrap_or(defaults.cache_bytes),
            }
        };
        let event_retention = match (args.event_retention, file.event_retention) {
            (Some(d), _) => d,
            (None, Some(text)) => parse_duration(&text).map_err(ConfigError::Retention)?,
            (None, None) => Duration::from_secs(24 * 3600),
        };
        let audit_retention = match (args.audit_retention, file.audit_retention) {
            (Some(d), _) => d,
            (None, Some(text)) => parse_duration(&text).map_err(ConfigError::Retention)?,
            (None, None) => Duration::from_secs(90 * 86_400),
        };
        let header_timeout_ms = args.header_timeout_ms.or(file.header_timeout_ms).unwrap_or(DEFAULT_HEADER_TIMEOUT_MS);
        if header_timeout_ms == 0 {
            return Err(ConfigError::Zero { setting: "--header-timeout-ms (header_timeout_ms)" });
        }
        let max_connections_per_client =
            args.max_connections_per_client.or(file.max_connections_per_client).unwrap_or(DEFAULT_MAX_CONNECTIONS_PER_CLIENT);
        if max_connections_per_client == 0 {
            return Err(ConfigError::Zero { setting: "--max-connections-per-client (max_connections_per_client)" });
        }
        let wal_limit_mb = args.wal_limit_mb.or(file.wal_limit_mb).unwrap_or(DEFAULT_WAL_LIMIT_MB);
        if wal_limit_mb == 0 {
            return Err(ConfigError::Zero { setting: "--wal-limit-mb (wal_limit_mb)" });
        }
        let wal_limit_bytes = wal_limit_mb << 20;
        let db = match args.db.or(file.db) {
            Some(db) => crate::store::Location::parse(&db),
            None => crate::store::Location::Sqlite(data()?.join("hangar.db")),
        };
        let installed_dir = match &db {
            crate::store::Location::Sqlite(path) => installed_dir_of(path),
            crate::store::Location::Postgres(_) => data()?.join("hangar.plugins"),
        };
        let timeout_s = file.permissions.timeout_s.unwrap_or(DEFAULT_PERMISSION_TIMEOUT.as_secs());
        if timeout_s == 0 {
            return Err(ConfigError::Zero { setting: "[permissions] timeout_s" });
        }
        let permissions = std::sync::Arc::new(PermissionSettings {
            default: file.permissions.default.unwrap_or_default(),
            timeout: Duration::from_secs(timeout_s),
            rules: crate::permissions::compile(&file.permissions.rules, Origin::Config)?,
            enforce: crate::permissions::compile(&file.permissions.enforce, Origin::Enforced)?,
        });
        let secret_key_file = match args.secret_key_file.or(file.secret_key_file) {
            Some(path) => path,
            None => data()?.join("secret.key"),
        };
        let (extra_roots, extra_roots_der) = match &file.http.ca_file {
            None => (Vec::new(), Vec::new()),
            Some(path) => read_roots(path).map_err(|reason| ConfigError::CaFile { path: path.clone(), reason })?,
        };
        let secret_key = std::env::var("HANGAR_SECRET_KEY").ok().filter(|k| !k.is_empty()).map(crate::runtime::Secret::new);
        Ok(Settings {
            extra_roots,
            secret_key_file,
            secret_key,
            permissions,
            host,
            installed_dir,
            port: args.port.or(file.port).unwrap_or(2323),
            db,
            plugins_dir: match args.plugins_dir.or(file.plugins_dir) {
                Some(dir) => dir,
                None => data()?.join("plugins"),
            },
            cache_dir: match args.cache_dir.or(file.cache_dir) {
                Some(dir) => dir,
                None => xdg("CACHE", ".cache")?.join("hangar/compiled"),
            },
            config_path,
            cors_origins: if args.cors_origins.is_empty() { file.cors_origins } else { args.cors_origins },
            token,
            admin_token,
            tenant_root,
            tenant_origins: tenant_origins.clone(),
            lease: Duration::from_secs(file.hosts.lease_s.unwrap_or(30).max(3)),
            mcp: crate::mcp::McpSettings {
                origins: origins(&file.mcp.allowed_origins, |origin, reason| ConfigError::McpOrigin { origin, reason })?,
                tenant_origins,
                stdio: file.mcp.stdio.unwrap_or(!multi_tenant),
                idle_timeout: Duration::from_secs(file.mcp.idle_timeout_s.unwrap_or(300).max(1)),
                call_timeout: Duration::from_secs(file.mcp.call_timeout_s.unwrap_or(60).max(1)),
                multi_tenant,
                extra_roots: extra_roots_der,
            },
            tenants: std::sync::Arc::new(file.tenants),
            uid_range: match file.process.uid_range {
                None => DEFAULT_UID_RANGE,
                Some([first, last]) if first > 0 && first <= last => (first, last),
                Some(_) => return Err(ConfigError::UidRange),
            },
            work_roots,
            max_steps: args.max_steps.or(file.max_steps).unwrap_or(50).max(1),
            event_retention,
            audit_retention,
            policy: Policy {
                plugins: file.plugins,
                defaults: limits,
                require_confinement: file.require_confinement,
                allow_unconfined_commands: file.allow_unconfined_commands,
                commands: {
                    let p = &file.process;
                    // The same mapping as a plugin's `[plugins.NAME.commands]`, over the defaults.
                    let overrides = crate::runtime::policy::CommandOverrides {
                        memory_mb: p.memory_mb,
                        max_processes: p.max_processes,
                        cpu_seconds: p.cpu_seconds,
                        file_size_mb: p.file_size_mb,
                        // Tenants' commands get no network unless the operator says so.
                        network: p.network.map(|n| n == NetworkAccess::All).or(multi_tenant.then_some(false)),
                        allowed_ports: Some(p.allowed_ports.clone()),
                    };
                    let mut limits = overrides.apply(&Default::default());
                    limits.user = match &p.user {
                        Some(name) => Some(user_ids(name).ok_or_else(|| ConfigError::UnknownUser(name.clone()))?),
                        None => None,
                    };
                    limits
                },
            },
            compile,
            header_timeout: Duration::from_millis(header_timeout_ms),
            max_connections_per_client,
            wal_limit_bytes,
            plugin_memory_total_bytes,
            tool_shards,
            plugin_instances,
        })
    }
}

/// The certificates of a PEM file; none is an error, since a file that
/// adds nothing is a mistake the operator would find only at the first
/// refused request.
fn read_roots(path: &Path) -> Result<(Vec<reqwest::Certificate>, Vec<CertificateDer<'static>>), String> {
    let pem = std::fs::read(path).map_err(|e| e.to_string())?;
    // DER for the MCP client's own rustls roots, and as reqwest's
    // certificates for the plugins' clients: one reading of the file.
    let der = CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>().map_err(|e| e.to_string())?;
    if der.is_empty() {
        return Err("holds no PEM certificate".into());
    }
    let roots = der.iter().map(|d| reqwest::Certificate::from_der(d)).collect::<Result<Vec<_>, _>>().map_err(|e| crate::error_chain(&e))?;
    // Splitting the PEM does not parse the certificates; building a client
    // does. Checked here, so that a damaged one stops the start rather than
    // every plugin's first request.
    crate::runtime::http::builder(&roots).build().map_err(|e| crate::error_chain(&e))?;
    Ok((roots, der))
}

/// A list of origin patterns from the config file; the first bad one is
/// `error(origin, reason)`.
fn origins(
    list: &[String],
    error: impl Fn(String, String) -> ConfigError,
) -> Result<Vec<crate::runtime::policy::OriginPattern>, ConfigError> {
    list.iter().map(|o| crate::runtime::policy::OriginPattern::parse(o).map_err(|reason| error(o.clone(), reason))).collect()
}
