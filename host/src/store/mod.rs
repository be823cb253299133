//! Persistence: one interface ([`Store`]) over two backends.
//!
//! - SQLite (rusqlite), the default: WAL mode, versioned migrations
//!   (rusqlite_migration). Reads run on a pool of read-only connections on
//!   blocking threads; writes go to one writer thread that commits every
//!   write waiting at the time in one transaction (group commit), each in
//!   a savepoint of its own so a failing write rolls back alone. The async
//!   server never waits on disk I/O.
//! - PostgreSQL (`pg`): a connection pool, a transaction per write.
//!
//! Each method holds both implementations side by side, so they read alike.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use chrono::{DateTime, SecondsFormat, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use rusqlite_migration::{M, Migrations};

mod audit;
mod context;
mod copy;
mod hosts;
mod mcp;
mod permissions;
mod pg;
mod plugins;
mod records;
mod runs;
pub mod scratch;
pub mod secrets;
mod tenants;
pub use audit::{AuditEntry, Recorded, auditing};
pub use context::{Compaction, SessionContext};
pub use copy::{CopyReport, TableCopy};
pub use hosts::{AGENTS_CHANGED, CONTROL_CHANNEL, CancelRequest, EVENTS_CHANNEL, HostLease};
pub use mcp::{McpServerRecord, McpTool, McpTransport};
pub use plugins::{PLUGINS_CHANGED, PluginHead, StoredPlugin};
pub use tenants::{DEFAULT_TENANT, Quotas, whole_u64, SERVER_KEYS, Tenant, TenantKey, Tokens, UsageCounts};
pub use permissions::{Answer, PermissionRequest, PermissionStatus, Reply};
pub use records::*;
pub use runs::{RunLimit, RunRequest, RunsFrom};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{kind} `{id}` does not exist")]
    NotFound { kind: &'static str, id: String },
    /// Another run took this idempotency key first (a concurrent submit).
    #[error("Idempotency-Key `{key}` is in use by another run")]
    KeyTaken { key: String },
    #[error("a {kind} named `{name}` already exists")]
    NameTaken { kind: &'static str, name: String },
    /// A tenant's quota would be passed.
    #[error("quota `{quota}` exceeded: {used} of {limit}")]
    Quota { quota: &'static str, limit: u64, used: u64 },
    #[error("permission request `{id}` is already answered ({status})")]
    Answered { id: String, status: &'static str },
    #[error("database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("database migration: {0}")]
    Migration(#[from] rusqlite_migration::Error),
    #[error("stored data is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("cannot open the database at {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("database task failed: {0}")]
    Task(String),
    #[error("database commit failed: {0}")]
    Commit(String),
    #[error("database: {}", pg::reason(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// No connection could be had from the PostgreSQL pool.
    #[error("database connection: {0}")]
    PgPool(String),
    /// The start could not connect to (or migrate) the database named.
    #[error("cannot open the PostgreSQL database {at}: {reason}")]
    PgOpen { at: String, reason: String },
    /// The database was migrated by a newer Hangar.
    #[error("the PostgreSQL schema is at version {found}, newer than this build knows ({known}); upgrade Hangar")]
    PgSchema { found: i64, known: usize },
    #[error("stored time `{0}` is not RFC 3339")]
    Time(String),
    /// Another run of the session is active (on any host): the database's
    /// unique index of active runs refused a second one.
    #[error("session `{session}` is already running a message")]
    SessionBusy { session: String },
    /// `hangar migrate` copies from a SQLite database into a PostgreSQL one.
    #[error("a copy goes from a SQLite database into a PostgreSQL one")]
    CopyDirection,
    /// The copy's target already holds data: a second `hangar migrate`, or the wrong database.
    #[error(
        "the PostgreSQL database already holds data (in {}); `hangar migrate` copies only into a new (or empty) database, and copied nothing",
        tables.join(", ")
    )]
    TargetNotEmpty { tables: Vec<String> },
    /// A table's rows could not be copied.
    #[error("copying table `{table}`: {reason}")]
    CopyTable { table: String, reason: String },
    /// A table counted other rows once copied than the source holds.
    #[error("table `{table}` has {postgres} rows in PostgreSQL after the copy, but should have {sqlite}; nothing was copied")]
    CountMismatch { table: String, sqlite: u64, postgres: u64 },
}

impl StoreError {
    /// The database could not be reached, rather than refusing this
    /// request: no connection from the pool, a connection that broke, or
    /// PostgreSQL's connection-exception and shutdown classes (SQLSTATE
    /// 08xxx, 57P0x, 53300 too many connections).
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::PgPool(_) | StoreError::PgOpen { .. } => true,
            StoreError::Postgres(err) => {
                err.is_closed()
                    || err.code().is_some_and(|code| {
                        let code = code.code();
                        code.starts_with("08") || code.starts_with("57P0") || code == "53300"
                    })
            }
            _ => false,
        }
    }
}

/// Where the data lives: `--db` (or `HANGAR_DATABASE_URL`) is a SQLite
/// file's path or a `postgres://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    Sqlite(PathBuf),
    Postgres(String),
}

impl Location {
    pub fn parse(text: &str) -> Location {
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            Location::Postgres(text.to_string())
        } else {
            Location::Sqlite(PathBuf::from(text))
        }
    }

    /// The SQLite file, if that is the backend.
    pub fn path(&self) -> Option<&Path> {
        match self {
            Location::Sqlite(path) => Some(path),
            Location::Postgres(_) => None,
        }
    }
}

/// Shown in logs: a URL's password is left out.
impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Sqlite(path) => write!(f, "{}", path.display()),
            Location::Postgres(url) => match url::Url::parse(url) {
                Ok(mut url) => {
                    if url.password().is_some() {
                        let _ = url.set_password(Some("***"));
                    }
                    write!(f, "{url}")
                }
                Err(_) => write!(f, "postgres://(unparsable URL)"),
            },
        }
    }
}

/// The SQLite schema's steps; `pg::migrations` gives the same steps in
/// PostgreSQL's dialect.
const MIGRATIONS: [&str; 12] = [
        "CREATE TABLE agents (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            instructions TEXT NOT NULL,
            tools TEXT NOT NULL,
            provider TEXT NOT NULL,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        );
        CREATE TABLE sessions (
            id TEXT PRIMARY KEY,
            work_dir TEXT,
            history TEXT NOT NULL,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        );
        CREATE TABLE provider_auth (
            provider TEXT PRIMARY KEY,
            auth_type TEXT,
            secret TEXT,
            base_url TEXT,
            updated_at TEXT NOT NULL
        );",
    // When credentials last changed, deletions included (a deleted record
    // can no longer carry the time itself).
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
    // Runs and the events of each session (issue: durable runs).
    runs::MIGRATION,
    // Permission rules of agents, requests and grants (issue: permissions).
    permissions::MIGRATION,
    // One run per idempotency key (concurrent submits with one key).
    runs::KEY_MIGRATION,
    // Tenants, their keys and usage; every agent, session and provider key
    // owned by one (issue: multi-tenant hosting).
    tenants::MIGRATION,
    // Compaction settings of agents, compacted views of sessions (issue: context compaction).
    context::MIGRATION,
    // Who changed what, when and from where (issue: hosting security).
    audit::MIGRATION,
    // MCP servers used as tools (issue: MCP both ways).
    mcp::MIGRATION,
    // Several hosts on one database (issue: scale-out): who runs each run
    // and until when, one active run per session, plugins kept in the database.
    runs::HOSTS_MIGRATION,
    // The audit trail with two b-trees instead of four (issue: performance).
    audit::SLIM_MIGRATION,
    // The tenant index without the rows that have no tenant (issue: performance).
    audit::TENANT_INDEX_MIGRATION,
];

fn migrations() -> Migrations<'static> {
    Migrations::new(MIGRATIONS.iter().map(|step| M::up(step)).collect())
}

/// The `meta` key of when `tenant`'s credentials last changed (the
/// default tenant's is the one from before tenants existed).
fn auth_changed_key(tenant: &str) -> String {
    match tenant {
        DEFAULT_TENANT => "auth_updated_at".into(),
        other => format!("auth_updated_at:{other}"),
    }
}

async fn pg_touch_auth(tx: &deadpool_postgres::Transaction<'_>, tenant: &str, at: &DateTime<Utc>) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT(key) DO UPDATE SET value = $2",
        &[&auth_changed_key(tenant), &ts(at)],
    )
    .await?;
    Ok(())
}

fn touch_auth(tx: &Connection, tenant: &str, at: &DateTime<Utc>) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = ?2",
        params![auth_changed_key(tenant), ts(at)],
    )?;
    Ok(())
}

/// Deletes a session's rows: its runs, events, permission requests and the
/// session itself (0 rows when there was none).
fn delete_session_rows(c: &Connection, id: &str) -> rusqlite::Result<usize> {
    c.execute("DELETE FROM events WHERE session_id = ?1", [id])?;
    c.execute("DELETE FROM runs WHERE session_id = ?1", [id])?;
    permissions::delete_for_session(c, id)?;
    c.execute("DELETE FROM sessions WHERE id = ?1", [id])
}

/// [`delete_session_rows`] on PostgreSQL (`session_contexts` goes by its
/// foreign key's cascade, as in SQLite).
async fn pg_delete_session_rows(tx: &deadpool_postgres::Transaction<'_>, id: &str) -> Result<usize, StoreError> {
    tx.execute("DELETE FROM events WHERE session_id = $1", &[&id]).await?;
    tx.execute("DELETE FROM runs WHERE session_id = $1", &[&id]).await?;
    permissions::pg_delete_for_session(tx, id).await?;
    Ok(tx.execute("DELETE FROM sessions WHERE id = $1", &[&id]).await? as usize)
}

/// Timestamps as RFC 3339 UTC with millisecond precision.
pub fn now() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_millis(now.timestamp_millis()).unwrap_or(now)
}

fn ts(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn parse_time(text: &str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(text).map(|t| t.with_timezone(&Utc)).map_err(|_| StoreError::Time(text.to_string()))
}

fn parse_ts(text: String) -> rusqlite::Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(&text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e)))
}

/// Read connections, and reads running at once: a burst of reads queues
/// for one of these instead of opening a connection (and taking a blocking
/// thread) per read, each with its own page cache.
const READERS: usize = 8;

/// Writes committed together at most.
const GROUP_MAX: usize = 128;

/// A write, run inside the writer's transaction; it returns what delivers
/// its result once that transaction has committed (or failed to).
/// It gets the transaction, or why none could be begun.
type Job = Box<dyn FnOnce(Result<&mut rusqlite::Transaction<'_>, &str>) -> Finish + Send>;
type Finish = Box<dyn FnOnce(Option<&str>) + Send>;

#[derive(Clone)]
pub struct Store {
    db: Db,
    agents: Arc<AgentCache>,
    /// Seals provider keys before they are written, opens them when read.
    secrets: Arc<secrets::SecretBox>,
    /// This host and its lease, on a database several hosts share
    /// (PostgreSQL): the runs it starts are stored as its own.
    host: Option<Arc<HostLease>>,
}

/// The backend behind a [`Store`].
#[derive(Clone)]
enum Db {
    Sqlite(Sqlite),
    Postgres(pg::Pg),
}

/// A SQLite database: its writer thread and its readers.
#[derive(Clone)]
struct Sqlite {
    /// The queue of the one writer thread (SQLite takes one writer at a
    /// time; queuing there beats threads contending for a lock).
    writer: std::sync::mpsc::Sender<Job>,
    /// Idle read-only connections. In WAL mode readers run beside the
    /// writer and beside each other, so a `GET` never queues behind a write
    /// or behind another `GET` for the one connection.
    readers: Arc<Mutex<Vec<Connection>>>,
    /// One permit per read running (at most [`READERS`]).
    reading: Arc<tokio::sync::Semaphore>,
    path: Arc<Path>,
}

/// Every agent, in memory: a small table read by every `GET /agents` and
/// every message. Filled on the first read after a change; every agent
/// write empties it once its transaction has committed. The generation
/// keeps a read that raced a write from filling it with the old rows.
#[derive(Default)]
struct AgentCache {
    list: RwLock<Option<Arc<Vec<Agent>>>>,
    generation: AtomicU64,
}

impl AgentCache {
    fn get(&self) -> Option<Arc<Vec<Agent>>> {
        self.list.read().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }

    fn generation(&self) -> u64 {
        self.generation.load(Ordering::SeqCst)
    }

    fn fill(&self, generation: u64, list: Arc<Vec<Agent>>) {
        let mut slot = self.list.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        if self.generation() == generation {
            *slot = Some(list);
        }
    }

    fn invalidate(&self) {
        let mut slot = self.list.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        self.generation.fetch_add(1, Ordering::SeqCst);
        *slot = None;
    }

    /// Held across a write to the agents table: the list is emptied when
    /// the write has committed or failed (or its caller gave up on it), so
    /// the next read sees the table.
    fn changing(&self) -> AgentsChanging<'_> {
        AgentsChanging(self)
    }
}

struct AgentsChanging<'a>(&'a AgentCache);

impl Drop for AgentsChanging<'_> {
    fn drop(&mut self) {
        self.0.invalidate();
    }
}

impl Store {
    /// Opens (creating it with mode 0600 if needed) and migrates the
    /// database, with the default bound on its write-ahead log.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Self::open_with(path, DEFAULT_WAL_LIMIT)
    }

    /// Opens the database; its write-ahead log is checkpointed and cut back
    /// whenever it passes `wal_limit` bytes (see [`Checkpoints`]).
    pub fn open_with(path: &Path, wal_limit: u64) -> Result<Store, StoreError> {
        Ok(Self::with_db(Db::Sqlite(Sqlite::open(path, wal_limit)?)))
    }

    /// Connects to a PostgreSQL database (`postgres://USER@HOST:PORT/DB`)
    /// and migrates it.
    pub async fn open_postgres(url: &str) -> Result<Store, StoreError> {
        match pg::Pg::open(url).await {
            Ok(pg) => Ok(Self::with_db(Db::Postgres(pg))),
            Err(err @ StoreError::PgSchema { .. }) => Err(err),
            // Which database (its URL without a password), and why.
            Err(err) => Err(StoreError::PgOpen { at: Location::Postgres(url.into()).to_string(), reason: err.to_string() }),
        }
    }

    /// Opens whichever backend `location` names (`wal_limit`: SQLite's).
    pub async fn open_location(location: &Location, wal_limit: u64) -> Result<Store, StoreError> {
        match location {
            Location::Sqlite(path) => Self::open_with(path, wal_limit),
            Location::Postgres(url) => Self::open_postgres(url).await,
        }
    }

    fn with_db(db: Db) -> Store {
        Store { db, agents: Default::default(), secrets: Arc::new(secrets::SecretBox::ephemeral()), host: None }
    }

    /// Seals provider keys with `secrets` (the server key) from now on, and
    /// seals any key still stored in plain text (from before keys were
    /// sealed). Returns how many were sealed now.
    pub async fn with_secrets(mut self, secrets: secrets::SecretBox) -> Result<(Store, usize), StoreError> {
        self.secrets = Arc::new(secrets);
        let sealer = self.secrets.clone();
        let is_plain = |s: &String| !secrets::SecretBox::is_sealed(s);
        let sealed = match &self.db {
            Db::Sqlite(db) => {
                let sealed = db
                    .write(move |c| {
                        let plain: Vec<(String, String, String)> = c
                            .prepare("SELECT tenant_id, provider, secret FROM provider_auth WHERE secret IS NOT NULL")?
                            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                            .filter(|row| row.as_ref().map_or(true, |(_, _, s)| is_plain(s)))
                            .collect::<Result<_, _>>()?;
                        for (tenant, provider, secret) in &plain {
                            c.execute(
                                "UPDATE provider_auth SET secret = ?3 WHERE tenant_id = ?1 AND provider = ?2",
                                params![tenant, provider, sealer.seal(secret)],
                            )?;
                        }
                        Ok(plain.len())
                    })
                    .await?;
                if sealed > 0 {
                    // Copy the sealed pages over the plain ones in the database file
                    // now, and empty the WAL that held the plain text.
                    let path = db.path.clone();
                    tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
                        let conn = Sqlite::open_connection(&path)?;
                        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
                        Ok(())
                    })
                    .await
                    .map_err(|e| StoreError::Task(e.to_string()))??;
                }
                sealed
            }
            Db::Postgres(pg) => {
                let mut c = pg.client().await?;
                let tx = c.transaction().await?;
                let rows = tx
                    .query("SELECT tenant_id, provider, secret FROM provider_auth WHERE secret IS NOT NULL FOR UPDATE", &[])
                    .await?;
                let mut sealed = 0;
                for row in rows {
                    let (tenant, provider, secret): (String, String, String) = (row.get(0), row.get(1), row.get(2));
                    if is_plain(&secret) {
                        tx.execute(
                            "UPDATE provider_auth SET secret = $3 WHERE tenant_id = $1 AND provider = $2",
                            &[&tenant, &provider, &sealer.seal(&secret)],
                        )
                        .await?;
                        sealed += 1;
                    }
                }
                tx.commit().await?;
                sealed
            }
        };
        Ok((self, sealed))
    }

    // ----- agents -----

    pub async fn insert_agent(&self, agent: Agent) -> Result<Agent, StoreError> {
        let agent = self.insert_agent_row(agent).await?;
        self.agents_changed().await;
        Ok(agent)
    }

    pub async fn update_agent(&self, agent: Agent) -> Result<Agent, StoreError> {
        let agent = self.update_agent_row(agent).await?;
        self.agents_changed().await;
        Ok(agent)
    }

    pub async fn delete_agent(&self, id: &str) -> Result<(), StoreError> {
        let _changed = self.agents.changing();
        self.delete_row("agents", "agent", id).await?;
        self.agents_changed().await;
        Ok(())
    }

    /// Other hosts drop their copy of the agents (this one already has).
    async fn agents_changed(&self) {
        if let Err(err) = self.notify(hosts::AGENTS_CHANGED).await {
            tracing::warn!(%err, "cannot tell the other hosts that the agents changed");
        }
    }

    /// Drops this host's copy of the agents: another host changed them.
    pub fn forget_agents(&self) {
        self.agents.invalidate();
    }

    async fn insert_agent_row(&self, agent: Agent) -> Result<Agent, StoreError> {
        let _changed = self.agents.changing();
        let json = AgentJson::of(&agent)?;
        match &self.db {
            Db::Sqlite(db) => {
                db.write(move |c| {
                    c.execute(
                        "INSERT INTO agents (id, name, instructions, tools, provider, created_at, updated_at, permissions, compaction, tenant_id)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                        params![
                            agent.id,
                            agent.name,
                            agent.instructions,
                            json.tools,
                            json.provider,
                            ts(&agent.created_at),
                            ts(&agent.updated_at),
                            json.permissions,
                            json.compaction,
                            agent.tenant_id
                        ],
                    )?;
                    Ok(agent)
                })
                .await
            }
            Db::Postgres(pg) => {
                pg.execute(
                    "INSERT INTO agents (id, name, instructions, tools, provider, created_at, updated_at, permissions, compaction, tenant_id)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                    &[
                        &agent.id,
                        &agent.name,
                        &agent.instructions,
                        &json.tools,
                        &json.provider,
                        &ts(&agent.created_at),
                        &ts(&agent.updated_at),
                        &json.permissions,
                        &json.compaction,
                        &agent.tenant_id,
                    ],
                )
                .await?;
                Ok(agent)
            }
        }
    }

    async fn update_agent_row(&self, agent: Agent) -> Result<Agent, StoreError> {
        let _changed = self.agents.changing();
        let json = AgentJson::of(&agent)?;
        let updated = match &self.db {
            Db::Sqlite(db) => {
                let (id, name, instructions, at) = (agent.id.clone(), agent.name.clone(), agent.instructions.clone(), ts(&agent.updated_at));
                db.write(move |c| {
                    Ok(c.execute(
                        "UPDATE agents SET name = ?2, instructions = ?3, tools = ?4, provider = ?5, updated_at = ?6, permissions = ?7, compaction = ?8
                         WHERE id = ?1",
                        params![id, name, instructions, json.tools, json.provider, at, json.permissions, json.compaction],
                    )?)
                })
                .await?
            }
            Db::Postgres(pg) => {
                pg.execute(
                    "UPDATE agents SET name = $2, instructions = $3, tools = $4, provider = $5, updated_at = $6, permissions = $7, compaction = $8
                     WHERE id = $1",
                    &[
                        &agent.id,
                        &agent.name,
                        &agent.instructions,
                        &json.tools,
                        &json.provider,
                        &ts(&agent.updated_at),
                        &json.permissions,
                        &json.compaction,
                    ],
                )
                .await?
            }
        };
        if updated == 0 {
            return Err(StoreError::NotFound { kind: "agent", id: agent.id });
        }
        Ok(agent)
    }

    pub async fn agent(&self, id: &str) -> Result<Agent, StoreError> {
        let find = |list: &[Agent]| list.iter().find(|a| a.id == id).cloned();
        if let Some(agent) = find(&self.agents().await?) {
            return Ok(agent);
        }
        // Made on another host a moment ago, before its notice came here.
        if self.is_shared() {
            self.agents.invalidate();
            if let Some(agent) = find(&self.agents().await?) {
                return Ok(agent);
            }
        }
        Err(StoreError::NotFound { kind: "agent", id: id.to_string() })
    }

    /// Every agent, by id. On a shared database another host's change
    /// empties this host's copy when its notice comes (in milliseconds).
    pub async fn agents(&self) -> Result<Arc<Vec<Agent>>, StoreError> {
        if let Some(list) = self.agents.get() {
            return Ok(list);
        }
        let generation = self.agents.generation();
        let rows = match &self.db {
            Db::Sqlite(db) => {
                db.read(|c| {
                    let mut stmt = c.prepare_cached(&format!("{AGENT_SELECT} ORDER BY id"))?;
                    Ok(stmt.query_map([], agent_row)?.collect::<Result<Vec<_>, _>>()?)
                })
                .await?
            }
            Db::Postgres(pg) => {
                let rows = pg.query(&format!("{AGENT_SELECT} ORDER BY id"), &[]).await?;
                rows.iter().map(agent_pg_row).collect::<Result<Vec<_>, _>>()?
            }
        };
        let list = Arc::new(rows.into_iter().map(RawAgent::finish).collect::<Result<Vec<_>, _>>()?);
        self.agents.fill(generation, list.clone());
        Ok(list)
    }

    /// Deletes row `id` of `table`, or says it does not exist.
    async fn delete_row(&self, table: &'static str, kind: &'static str, id: &str) -> Result<(), StoreError> {
        let id = id.to_string();
        let deleted = match &self.db {
            Db::Sqlite(db) => {
                let id = id.clone();
                db.write(move |c| Ok(c.execute(&format!("DELETE FROM {table} WHERE id = ?1"), [&id])?)).await?
            }
            Db::Postgres(pg) => pg.execute(&format!("DELETE FROM {table} WHERE id = $1"), &[&id]).await?,
        };
        if deleted == 0 {
            return Err(StoreError::NotFound { kind, id });
        }
        Ok(())
    }

    // ----- sessions -----

    pub async fn insert_session(&self, session: Session) -> Result<Session, StoreError> {
        self.insert_session_within(session, None).await
    }

    /// Stores a session unless its tenant already has `max_sessions`: the
    /// count and the insert are one write, so concurrent creates cannot
    /// both slip under the limit.
    pub async fn insert_session_within(&self, session: Session, max_sessions: Option<u64>) -> Result<Session, StoreError> {
        let history = serde_json::to_string(&session.history)?;
        match &self.db {
            Db::Sqlite(db) => {
                db.write(move |c| {
                    if let Some(limit) = max_sessions {
                        let used = tenants::session_count(c, &session.tenant_id)?;
                        if used >= limit {
                            return Err(StoreError::Quota { quota: "max_sessions", limit, used });
                        }
                    }
                    c.prepare_cached(
                        "INSERT INTO sessions (id, work_dir, history, created_at, updated_at, tenant_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                    )?
                    .execute(params![
                        session.id,
                        session.work_dir,
                        history,
                        ts(&session.created_at),
                        ts(&session.updated_at),
                        session.tenant_id
                    ])?;
                    Ok(session)
                })
                .await
            }
            Db::Postgres(pg) => {
                const INSERT: &str =
                    "INSERT INTO sessions (id, work_dir, history, created_at, updated_at, tenant_id) VALUES ($1, $2, $3, $4, $5, $6)";
                let row = [&session.id as &(dyn tokio_postgres::types::ToSql + Sync), &session.work_dir, &history, &ts(&session.created_at), &ts(&session.updated_at), &session.tenant_id];
                // Without a quota to count first, the insert alone: one round trip.
                let Some(limit) = max_sessions else {
                    pg.execute(INSERT, &row).await?;
                    return Ok(session);
                };
                let mut c = pg.client().await?;
                let tx = c.transaction().await?;
                // Concurrent creates of one tenant (on any host) count one after another.
                pg::lock(&tx, &format!("sessions:{}", session.tenant_id)).await?;
                let used = tenants::pg_session_count(&tx, &session.tenant_id).await?;
                if used >= limit {
                    return Err(StoreError::Quota { quota: "max_sessions", limit, used });
                }
                tx.execute(INSERT, &row).await?;
                tx.commit().await?;
                Ok(session)
            }
        }
    }

    /// Writes a session's fields (and its whole history) in one transaction.
    pub async fn update_session(&self, session: Session) -> Result<Session, StoreError> {
        let (id, work_dir, history, at) =
            (session.id.clone(), session.work_dir.clone(), serde_json::to_string(&session.history)?, ts(&session.updated_at));
        let updated = match &self.db {
            Db::Sqlite(db) => {
                db.write(move |c| {
                    Ok(c.prepare_cached("UPDATE sessions SET work_dir = ?2, history = ?3, updated_at = ?4 WHERE id = ?1")?
                        .execute(params![id, work_dir, history, at])?)
                })
                .await?
            }
            Db::Postgres(pg) => {
                pg.execute("UPDATE sessions SET work_dir = $2, history = $3, updated_at = $4 WHERE id = $1", &[&id, &work_dir, &history, &at])
                    .await?
            }
        };
        if updated == 0 {
            return Err(StoreError::NotFound { kind: "session", id: session.id });
        }
        Ok(session)
    }

    pub async fn session(&self, id: &str) -> Result<Session, StoreError> {
        let id = id.to_string();
        let found = match &self.db {
            Db::Sqlite(db) => {
                let id = id.clone();
                db.read(move |c| Ok(sqlite_session(c, &id)?)).await?
            }
            Db::Postgres(pg) => {
                let row = pg.query_opt(&format!("{SESSION_SELECT} WHERE id = $1"), &[&id]).await?;
                row.as_ref().map(session_pg_row).transpose()?
            }
        };
        found.ok_or(StoreError::NotFound { kind: "session", id })?.finish()
    }

    /// A session's `work_dir` and owner (`None` if there is no such
    /// session), without reading its history.
    pub async fn session_work_dir(&self, id: &str) -> Result<Option<(Option<String>, String)>, StoreError> {
        let id = id.to_string();
        match &self.db {
            Db::Sqlite(db) => {
                db.read(move |c| {
                    Ok(c.prepare_cached("SELECT work_dir, tenant_id FROM sessions WHERE id = ?1")?
                        .query_row([&id], |r| Ok((r.get(0)?, r.get(1)?)))
                        .optional()?)
                })
                .await
            }
            Db::Postgres(pg) => {
                let row = pg.query_opt("SELECT work_dir, tenant_id FROM sessions WHERE id = $1", &[&id]).await?;
                Ok(row.map(|r| (r.get(0), r.get(1))))
            }
        }
    }

    /// Whether a session exists, without reading (and decoding) its history.
    pub async fn session_exists(&self, id: &str) -> Result<bool, StoreError> {
        Ok(self.session_owner(id).await?.is_some())
    }

    /// At most `limit` sessions with ids above `after`, by id, of `tenant`
    /// (`None`: of every tenant); with `history` false their histories are
    /// not read (and left empty).
    pub async fn sessions_page(
        &self,
        tenant: Option<String>,
        after: Option<String>,
        limit: usize,
        history: bool,
    ) -> Result<Vec<Session>, StoreError> {
        let columns = if history { "history" } else { "'[]'" };
        let rows = match &self.db {
            Db::Sqlite(db) => {
                db.read(move |c| {
                    let mut stmt = c.prepare_cached(&format!(
                        "SELECT id, work_dir, {columns}, created_at, updated_at, tenant_id FROM sessions
                         WHERE (?1 IS NULL OR id > ?1) AND (?3 IS NULL OR tenant_id = ?3) ORDER BY id LIMIT ?2"
                    ))?;
                    Ok(stmt.query_map(params![after, limit as i64, tenant], session_row)?.collect::<Result<Vec<_>, _>>()?)
                })
                .await?
            }
            Db::Postgres(pg) => {
                let rows = pg
                    .query(
                        &format!(
                            "SELECT id, work_dir, {columns}::TEXT, created_at, updated_at, tenant_id FROM sessions
                             WHERE ($1::TEXT IS NULL OR id > $1) AND ($3::TEXT IS NULL OR tenant_id = $3) ORDER BY id LIMIT $2"
                        ),
                        &[&after, &(limit as i64), &tenant],
                    )
                    .await?;
                rows.iter().map(session_pg_row).collect::<Result<Vec<_>, _>>()?
            }
        };
        rows.into_iter().map(RawSession::finish).collect()
    }

    pub async fn sessions(&self) -> Result<Vec<Session>, StoreError> {
        let rows = match &self.db {
            Db::Sqlite(db) => {
                db.read(|c| {
                    let mut stmt = c.prepare_cached(&format!("{SESSION_SELECT} ORDER BY id"))?;
                    Ok(stmt.query_map([], session_row)?.collect::<Result<Vec<_>, _>>()?)
                })
                .await?
            }
            Db::Postgres(pg) => {
                let rows = pg.query(&format!("{SESSION_SELECT} ORDER BY id"), &[]).await?;
                rows.iter().map(session_pg_row).collect::<Result<Vec<_>, _>>()?
            }
        };
        rows.into_iter().map(RawSession::finish).collect()
    }

    /// Deletes a session with its runs and events.
    pub async fn delete_session(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_string();
        let deleted = match &self.db {
            Db::Sqlite(db) => {
                let id = id.clone();
                db.write(move |c| Ok(delete_session_rows(c, &id)?)).await?
            }
            Db::Postgres(pg) => {
                let mut c = pg.client().await?;
                let tx = c.transaction().await?;
                let deleted = pg_delete_session_rows(&tx, &id).await?;
                tx.commit().await?;
                deleted
            }
        };
        if deleted == 0 {
            return Err(StoreError::NotFound { kind: "session", id });
        }
        Ok(())
    }

    // ----- provider credentials -----

    /// The provider keys of `tenant` ([`SERVER_KEYS`]: the server's own).
    pub async fn auth_records(&self, tenant: &str) -> Result<Vec<AuthRecord>, StoreError> {
        let tenant = tenant.to_string();
        let rows = match &self.db {
            Db::Sqlite(db) => {
                db.read(move |c| {
                    let mut stmt = c.prepare_cached(&format!("{AUTH_SELECT} WHERE tenant_id = ?1 ORDER BY provider"))?;
                    Ok(stmt.query_map([&tenant], auth_row)?.collect::<Result<Vec<_>, _>>()?)
                })
                .await?
            }
            Db::Postgres(pg) => {
                let rows = pg.query(&format!("{AUTH_SELECT} WHERE tenant_id = $1 ORDER BY provider"), &[&tenant]).await?;
                rows.iter().map(auth_pg_row).collect::<Result<Vec<_>, _>>()?
            }
        };
        Ok(rows.into_iter().map(|r| self.unseal(r)).collect())
    }

    /// Opens a record's sealed key; one sealed under another server key
    /// is kept out, with the reason.
    fn unseal(&self, mut record: AuthRecord) -> AuthRecord {
        if let Some(stored) = record.secret.take() {
            if !secrets::SecretBox::is_sealed(&stored) {
                record.secret = Some(stored);
            } else if let Some(plain) = self.secrets.open(&stored) {
                record.secret = Some(plain);
            } else {
                record.unreadable = Some(format!(
                    "the stored key of provider `{}` cannot be opened with the server key from {}: it was sealed under another key (was the key file replaced or lost?); store the key again with PUT /provider/auth",
                    record.provider, self.secrets.source
                ));
            }
        }
        record
    }

    pub async fn auth_record(&self, tenant: &str, provider: &str) -> Result<Option<AuthRecord>, StoreError> {
        let (tenant, provider) = (tenant.to_string(), provider.to_string());
        let found = match &self.db {
            Db::Sqlite(db) => {
                db.read(move |c| {
                    Ok(c.query_row(&format!("{AUTH_SELECT} WHERE tenant_id = ?1 AND provider = ?2"), [&tenant, &provider], auth_row)
                        .optional()?)
                })
                .await?
            }
            Db::Postgres(pg) => {
                let row = pg.query_opt(&format!("{AUTH_SELECT} WHERE tenant_id = $1 AND provider = $2"), &[&tenant, &provider])
                    .await?;
                row.as_ref().map(auth_pg_row).transpose()?
            }
        };
        Ok(found.map(|r| self.unseal(r)))
    }

    /// Writes several records at once: a PUT either applies whole or not at all.
    pub async fn put_auth_records(&self, tenant: &str, records: Vec<AuthRecord>) -> Result<(), StoreError> {
        let tenant = tenant.to_string();
        // Sealed here, before either backend sees them.
        let rows: Vec<(AuthRecord, Option<String>)> = records
            .into_iter()
            .map(|r| {
                let sealed = r.secret.as_deref().map(|s| self.secrets.seal(s));
                (r, sealed)
            })
            .collect();
        match &self.db {
            Db::Sqlite(db) => {
                db.write(move |c| {
                    for (r, secret) in &rows {
                        c.execute(
                            "INSERT INTO provider_auth (tenant_id, provider, auth_type, secret, base_url, updated_at) VALUES (?6, ?1, ?2, ?3, ?4, ?5)
                             ON CONFLICT(tenant_id, provider) DO UPDATE SET auth_type = ?2, secret = ?3, base_url = ?4, updated_at = ?5",
                            params![r.provider, r.auth_type, secret, r.base_url, ts(&r.updated_at), tenant],
                        )?;
                        touch_auth(c, &tenant, &r.updated_at)?;
                    }
                    Ok(())
                })
                .await
            }
            Db::Postgres(pg) => {
                let mut c = pg.client().await?;
                let tx = c.transaction().await?;
                for (r, secret) in &rows {
                    tx.execute(
                        "INSERT INTO provider_auth (tenant_id, provider, auth_type, secret, base_url, updated_at) VALUES ($6, $1, $2, $3, $4, $5)
                         ON CONFLICT(tenant_id, provider) DO UPDATE SET auth_type = $2, secret = $3, base_url = $4, updated_at = $5",
                        &[&r.provider, &r.auth_type, secret, &r.base_url, &ts(&r.updated_at), &tenant],
                    )
                    .await?;
                    pg_touch_auth(&tx, &tenant, &r.updated_at).await?;
                }
                tx.commit().await?;
                Ok(())
            }
        }
    }

    /// Removes a provider's record; false when there was none.
    pub async fn delete_auth_record(&self, tenant: &str, provider: &str) -> Result<bool, StoreError> {
        let (tenant, provider) = (tenant.to_string(), provider.to_string());
        match &self.db {
            Db::Sqlite(db) => {
                db.write(move |c| {
                    let removed = c.execute("DELETE FROM provider_auth WHERE tenant_id = ?1 AND provider = ?2", [&tenant, &provider])? > 0;
                    if removed {
                        touch_auth(c, &tenant, &now())?;
                    }
                    Ok(removed)
                })
                .await
            }
            Db::Postgres(pg) => {
                let mut c = pg.client().await?;
                let tx = c.transaction().await?;
                let removed =
                    tx.execute("DELETE FROM provider_auth WHERE tenant_id = $1 AND provider = $2", &[&tenant, &provider]).await? > 0;
                if removed {
                    pg_touch_auth(&tx, &tenant, &now()).await?;
                }
                tx.commit().await?;
                Ok(removed)
            }
        }
    }

    /// When stored credentials last changed, if ever.
    pub async fn auth_updated_at(&self, tenant: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        let key = auth_changed_key(tenant);
        let text: Option<String> = match &self.db {
            Db::Sqlite(db) => {
                db.read(move |c| Ok(c.query_row("SELECT value FROM meta WHERE key = ?1", [&key], |r| r.get(0)).optional()?)).await?
            }
            Db::Postgres(pg) => {
                pg.query_opt("SELECT value FROM meta WHERE key = $1", &[&key]).await?.map(|r| r.get(0))
            }
        };
        text.as_deref().map(parse_time).transpose()
    }
}

/// Statements each connection keeps prepared. rusqlite keeps 16 by
/// default, fewer than the store's distinct statements (about 60), so a busy
/// writer evicted and re-parsed them in turn.
const STATEMENT_CACHE: usize = 128;

impl Sqlite {
    fn open(path: &Path, wal_limit: u64) -> Result<Sqlite, StoreError> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Open { path: path.into(), source })?;
        }
        // Create the file ourselves so it is never world-readable, not even
        // for the moment before a chmod: it holds provider keys.
        {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(path)
                .map_err(|source| StoreError::Open { path: path.into(), source })?;
        }
        let mut conn = Self::open_connection(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // What a write replaces is overwritten where that costs no extra
        // I/O: an old (or plain-text) provider key does not linger in a page.
        conn.pragma_update(None, "secure_delete", "FAST")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        migrations().to_latest(&mut conn)?;
        // The writer checkpoints the WAL itself, between its transactions
        // (see `write_loop`), instead of SQLite doing it inside a commit.
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        // A WAL that a checkpoint has reset is cut back to this size by the
        // next write, instead of keeping the largest size it ever reached.
        conn.pragma_update(None, "journal_size_limit", wal_limit as i64)?;
        let wal = Wal { path: wal_path(path), limit: wal_limit };
        let (writer, jobs) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("hangar-db-writer".into())
            .spawn(move || write_loop(conn, jobs, wal))
            .map_err(|source| StoreError::Open { path: path.into(), source })?;
        Ok(Sqlite { writer, readers: Default::default(), reading: Arc::new(tokio::sync::Semaphore::new(READERS)), path: path.into() })
    }

    /// A further connection to the database `open` migrated.
    fn open_connection(path: &Path) -> Result<Connection, StoreError> {
        let conn = Connection::open(path)?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // Statement journals (each write's savepoint), sorts and temporary
        // tables stay in memory. On disk they were files SQLite created in
        // /var/tmp, outside the server's own directories, holding what the
        // write held (event text), one a large batch of events; and a
        // write that needs a new descriptor fails when the process has
        // none left (thousands of streams), losing that batch.
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        Ok(conn)
    }

    fn open_reader(path: &Path) -> Result<Connection, StoreError> {
        let conn = Self::open_connection(path)?;
        conn.pragma_update(None, "query_only", true)?;
        Ok(conn)
    }

    /// Runs the read `f` on an idle read connection, on a blocking thread.
    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (readers, path) = (self.readers.clone(), self.path.clone());
        // Never closed, so acquiring cannot fail.
        let permit = self.reading.clone().acquire_owned().await.map_err(|e| StoreError::Task(e.to_string()))?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let idle = readers.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).pop();
            let conn = match idle {
                Some(conn) => conn,
                None => Self::open_reader(&path)?,
            };
            let result = f(&conn);
            let mut idle = readers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if idle.len() < READERS {
                idle.push(conn);
            }
            result
        })
        .await
        .map_err(|e| StoreError::Task(e.to_string()))?
    }

    /// Runs the write `f` in the writer's next transaction, in a savepoint
    /// of its own; returns once that transaction has committed.
    async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (done, result) = tokio::sync::oneshot::channel();
        // The request's audit entry, if it is still to be written, goes in
        // with this write (see `audit::auditing`).
        let audit = audit::take_pending();
        let entry = audit.clone();
        let job: Job = Box::new(move |tx| {
            let result = match tx {
                Ok(tx) => Savepoint::begin(tx).and_then(|savepoint| {
                    // Dropping the savepoint on error rolls back this write alone.
                    let value = f(savepoint.conn)?;
                    if let Some(entry) = &entry {
                        audit::insert_row(savepoint.conn, entry)?;
                    }
                    savepoint.release()?;
                    Ok(value)
                }),
                Err(begin) => Err(StoreError::Commit(begin.to_string())),
            };
            Box::new(move |commit_error| {
                let result = match (result, commit_error) {
                    (Ok(_), Some(err)) => Err(StoreError::Commit(err.to_string())),
                    (result, _) => result,
                };
                let _ = done.send(result);
            })
        });
        let result = match self.writer.send(job) {
            Ok(()) => result.await.map_err(|_| StoreError::Task("the write panicked in the database writer".into())).and_then(|r| r),
            Err(_) => Err(StoreError::Task("the database writer has stopped".into())),
        };
        if let Some(audit) = audit {
            audit::settle_pending(audit, result.is_ok());
        }
        result
    }
}

const AGENT_SELECT: &str =
    "SELECT id, name, instructions, tools, provider, created_at, updated_at, permissions, compaction, tenant_id FROM agents";
const SESSION_SELECT: &str = "SELECT id, work_dir, history, created_at, updated_at, tenant_id FROM sessions";
const AUTH_SELECT: &str = "SELECT provider, auth_type, secret, base_url, updated_at FROM provider_auth";

/// An agent's JSON columns, encoded once for either backend.
struct AgentJson {
    tools: String,
    provider: String,
    permissions: String,
    compaction: String,
}

impl AgentJson {
    fn of(agent: &Agent) -> Result<AgentJson, StoreError> {
        Ok(AgentJson {
            tools: serde_json::to_string(&agent.tools)?,
            provider: serde_json::to_string(&agent.provider)?,
            permissions: serde_json::to_string(&agent.permissions)?,
            compaction: serde_json::to_string(&agent.compaction)?,
        })
    }
}

/// A row before its JSON columns are decoded (rusqlite's row closure cannot
/// return our error type).
struct RawAgent(Agent, String, String, String, String);

impl RawAgent {
    fn finish(self) -> Result<Agent, StoreError> {
        let RawAgent(mut agent, tools, provider, permissions, compaction) = self;
        agent.tools = serde_json::from_str(&tools)?;
        agent.provider = serde_json::from_str(&provider)?;
        agent.permissions = serde_json::from_str(&permissions)?;
        agent.compaction = context::parse_compaction(&compaction)?;
        Ok(agent)
    }
}

fn agent_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<RawAgent> {
    Ok(RawAgent(
        Agent {
            id: row.get(0)?,
            name: row.get(1)?,
            instructions: row.get(2)?,
            tools: Vec::new(),
            provider: AgentProvider::default(),
            permissions: Vec::new(),
            compaction: Compaction::default(),
            created_at: parse_ts(row.get(5)?)?,
            updated_at: parse_ts(row.get(6)?)?,
            tenant_id: row.get(9)?,
        },
        row.get(3)?,
        row.get(4)?,
        row.get(7)?,
        row.get(8)?,
    ))
}

fn agent_pg_row(row: &tokio_postgres::Row) -> Result<RawAgent, StoreError> {
    Ok(RawAgent(
        Agent {
            id: row.get(0),
            name: row.get(1),
            instructions: row.get(2),
            tools: Vec::new(),
            provider: AgentProvider::default(),
            permissions: Vec::new(),
            compaction: Compaction::default(),
            created_at: pg::ts_at(row, 5)?,
            updated_at: pg::ts_at(row, 6)?,
            tenant_id: row.get(9),
        },
        row.get(3),
        row.get(4),
        row.get(7),
        row.get(8),
    ))
}

struct RawSession(Session, String);

impl RawSession {
    fn finish(self) -> Result<Session, StoreError> {
        let RawSession(mut session, history) = self;
        session.history = serde_json::from_str(&history)?;
        Ok(session)
    }
}

/// The session row `id`, undecoded.
fn sqlite_session(c: &Connection, id: &str) -> rusqlite::Result<Option<RawSession>> {
    c.prepare_cached(&format!("{SESSION_SELECT} WHERE id = ?1"))?.query_row([id], session_row).optional()
}

fn session_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<RawSession> {
    Ok(RawSession(
        Session {
            id: row.get(0)?,
            work_dir: row.get(1)?,
            history: Vec::new(),
            created_at: parse_ts(row.get(3)?)?,
            updated_at: parse_ts(row.get(4)?)?,
            tenant_id: row.get(5)?,
        },
        row.get(2)?,
    ))
}

fn session_pg_row(row: &tokio_postgres::Row) -> Result<RawSession, StoreError> {
    Ok(RawSession(
        Session {
            id: row.get(0),
            work_dir: row.get(1),
            history: Vec::new(),
            created_at: pg::ts_at(row, 3)?,
            updated_at: pg::ts_at(row, 4)?,
            tenant_id: row.get(5),
        },
        row.get(2),
    ))
}

fn auth_pg_row(row: &tokio_postgres::Row) -> Result<AuthRecord, StoreError> {
    Ok(AuthRecord {
        provider: row.get(0),
        auth_type: row.get(1),
        secret: row.get(2),
        base_url: row.get(3),
        updated_at: pg::ts_at(row, 4)?,
        unreadable: None,
    })
}

fn auth_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<AuthRecord> {
    Ok(AuthRecord {
        provider: row.get(0)?,
        auth_type: row.get(1)?,
        secret: row.get(2)?,
        base_url: row.get(3)?,
        updated_at: parse_ts(row.get(4)?)?,
        unreadable: None,
    })
}

/// Writes after which the writer copies the WAL back into the database.
/// Writes wait while it does, so the number sets the longest wait: under
/// `POST /sessions` load, 4,000 gave a p99 of 39-59 ms, 1,000 14-21 ms,
/// 250 10.5-12 ms, at the same req/s (fewer did no better).
const CHECKPOINT_WRITES: u64 = 250;

/// Quiet time after which the writer cuts the WAL to nothing.
const IDLE_CHECKPOINT: std::time::Duration = std::time::Duration::from_secs(1);

/// Default bound on the write-ahead log (`--wal-limit-mb`).
pub const DEFAULT_WAL_LIMIT: u64 = 64 << 20;

/// The write-ahead log beside the database, and its bound.
struct Wal {
    path: PathBuf,
    limit: u64,
}

impl Wal {
    /// Its size on disk (0 when there is none).
    fn size(&self) -> u64 {
        std::fs::metadata(&self.path).map_or(0, |m| m.len())
    }
}

/// `DB-wal`, SQLite's name for the write-ahead log of `DB`.
pub fn wal_path(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}

/// Checkpoints run on the writer thread, between two of its transactions:
///
/// - every `CHECKPOINT_WRITES` writes, a PASSIVE one. No write runs while
///   it copies, so it copies the whole WAL (unless a reader still needs an
///   older snapshot) and the next transaction starts the WAL over from its
///   beginning: under a steady load the file stays a few hundred pages long.
///   A checkpoint on a thread of its own never caught up with a writer that
///   never paused, the WAL only grew, and the TRUNCATE that then had to cut
///   it stopped every write for tens of milliseconds;
/// - when the WAL has passed its limit anyway (readers kept the PASSIVE
///   ones from finishing, or one write was that large), a TRUNCATE one,
///   which waits for those readers;
/// - after `IDLE_CHECKPOINT` without writes, a TRUNCATE one: an idle
///   server keeps no WAL at all.
struct Checkpoints {
    wal: Wal,
    /// Writes committed since the last checkpoint that finished.
    since: u64,
}

impl Checkpoints {
    /// After a commit of `writes` writes.
    fn committed(&mut self, conn: &Connection, writes: u64) {
        self.since += writes;
        let over = self.wal.size() > self.wal.limit;
        if over {
            self.run(conn, "TRUNCATE");
        } else if self.since >= CHECKPOINT_WRITES {
            self.run(conn, "PASSIVE");
        }
    }

    /// No write for `IDLE_CHECKPOINT`, or the writer is stopping.
    fn idle(&mut self, conn: &Connection) {
        if self.wal.size() > 0 {
            self.run(conn, "TRUNCATE");
        }
    }

    fn run(&mut self, conn: &Connection, mode: &str) {
        // `busy` is 1 when a reader kept it from copying everything.
        match conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| r.get::<_, i64>(0)) {
            Ok(busy) => {
                if busy == 0 || mode == "PASSIVE" {
                    self.since = 0;
                }
                if busy != 0 && mode == "TRUNCATE" {
                    tracing::debug!(wal_bytes = self.wal.size(), "WAL checkpoint (TRUNCATE) was blocked; trying again");
                }
            }
            Err(err) => tracing::warn!(%err, mode, "WAL checkpoint failed; trying again later"),
        }
        crate::telemetry::wal_size(self.wal.size());
    }
}

/// One write's savepoint inside the writer's transaction: released when
/// the write succeeds, rolled back when it fails or panics. rusqlite's own
/// savepoints parse their SQL each time; these statements are prepared once
/// per connection, which the single writer runs for every write.
struct Savepoint<'c> {
    conn: &'c Connection,
    released: bool,
}

impl<'c> Savepoint<'c> {
    fn begin(conn: &'c Connection) -> Result<Savepoint<'c>, StoreError> {
        conn.prepare_cached("SAVEPOINT hangar_write")?.execute([])?;
        Ok(Savepoint { conn, released: false })
    }

    fn release(mut self) -> Result<(), StoreError> {
        self.conn.prepare_cached("RELEASE hangar_write")?.execute([])?;
        self.released = true;
        Ok(())
    }
}

impl Drop for Savepoint<'_> {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        // ROLLBACK TO keeps the savepoint open; RELEASE then ends it, so
        // the next write starts from the transaction itself.
        for sql in ["ROLLBACK TO hangar_write", "RELEASE hangar_write"] {
            if let Err(err) = self.conn.prepare_cached(sql).and_then(|mut statement| statement.execute([])) {
                tracing::error!(%err, "cannot roll back a failed write");
            }
        }
    }
}

/// The writer thread: runs the first waiting write, then every write that
/// is waiting when the one before it ends (up to `GROUP_MAX`), and commits
/// them together, so a burst of writes pays for one commit instead of one
/// each; checkpoints the WAL between groups (see [`Checkpoints`]).
fn write_loop(mut conn: Connection, jobs: std::sync::mpsc::Receiver<Job>, wal: Wal) {
    use std::sync::mpsc::RecvTimeoutError;
    let mut checkpoints = Checkpoints { wal, since: 0 };
    loop {
        let first = match jobs.recv_timeout(IDLE_CHECKPOINT) {
            Ok(job) => job,
            Err(RecvTimeoutError::Timeout) => {
                checkpoints.idle(&conn);
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => {
                checkpoints.idle(&conn);
                return;
            }
        };
        // IMMEDIATE: the write lock is taken (waiting in the busy handler)
        // at BEGIN. A deferred transaction that reads before it writes
        // would fail at once with SQLITE_BUSY when a TRUNCATE checkpoint
        // reset the WAL under its read snapshot.
        let mut tx = match conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate) {
            Ok(tx) => tx,
            Err(err) => {
                let err = err.to_string();
                tracing::error!(%err, "cannot begin a write transaction");
                job_failed(first, &err);
                for job in jobs.try_iter().take(GROUP_MAX - 1) {
                    job_failed(job, &err);
                }
                continue;
            }
        };
        // The group is every write that arrives before the queue is found
        // empty, including those that arrived while the group's earlier
        // writes ran: under load a commit (its WAL frames, each page once
        // for the whole group) is shared by more writes, and no write waits
        // for anything but the ones ahead of it.
        let mut finishes: Vec<Finish> = Vec::new();
        let mut writes = 0;
        let mut next = Some(first);
        while let Some(job) = next.take() {
            writes += 1;
            // A write that panics loses only its own answer (its caller sees
            // the writer's error); the thread and the other writes carry on.
            if let Ok(finish) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(Ok(&mut tx)))) {
                finishes.push(finish);
            }
            if writes < GROUP_MAX {
                next = jobs.try_recv().ok();
            }
        }
        let commit = tx.commit().err().map(|e| e.to_string());
        if let Some(err) = &commit {
            tracing::error!(%err, writes = finishes.len(), "a group commit failed");
        }
        for finish in finishes {
            finish(commit.as_deref());
        }
        checkpoints.committed(&conn, writes as u64);
    }
}

/// Answers a write that could not run: no transaction could be begun.
fn job_failed(job: Job, err: &str) {
    job(Err(err))(None);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn session(id: &str) -> Session {
        let t = now();
        Session { id: id.into(), work_dir: None, history: Vec::new(), created_at: t, updated_at: t, tenant_id: DEFAULT_TENANT.into() }
    }

    /// No connection of the store creates temporary files: SQLite made one
    /// in /var/tmp for a large batch's statement journal (139 in a run of
    /// 300 streams, seen with strace), outside the server's directories and
    /// failing once the process had no descriptor left.
    #[tokio::test]
    async fn the_stores_connections_keep_temporary_data_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("hangar.db")).unwrap();
        let Db::Sqlite(db) = &store.db else { panic!("a SQLite store") };
        let pragma = |c: &Connection| c.query_row("PRAGMA temp_store", [], |r| r.get::<_, i64>(0)).map_err(StoreError::from);
        // 2 is MEMORY (0, the default, leaves it to the build: files).
        assert_eq!(db.write(pragma).await.unwrap(), 2, "the writer");
        assert_eq!(db.read(pragma).await.unwrap(), 2, "a reader");
    }

    /// Writes that queue together commit together, but each stands alone:
    /// a failing write in the group rolls back only itself.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_write_in_a_group_commit_rolls_back_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hangar.db");
        let store = Store::open(&path).unwrap();
        let writes = (0..200).map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                if i % 4 == 0 {
                    // No such session: NotFound, inside the same group as the inserts.
                    store.update_session(session(&format!("missing-{i}"))).await.map(|_| false)
                } else {
                    store.insert_session(session(&format!("s-{i:03}"))).await.map(|_| true)
                }
            })
        });
        let results = futures::future::join_all(writes).await;
        for (i, result) in results.into_iter().enumerate() {
            match result.unwrap() {
                Ok(inserted) => assert!(inserted && i % 4 != 0, "write {i}"),
                Err(StoreError::NotFound { id, .. }) => assert_eq!(id, format!("missing-{i}")),
                Err(other) => panic!("write {i}: {other}"),
            }
        }
        assert_eq!(store.sessions().await.unwrap().len(), 150);
        drop(store);

        // Committed means on disk: a fresh open sees every insert.
        let reopened = Store::open(&path).unwrap();
        let ids: Vec<String> = reopened.sessions().await.unwrap().into_iter().map(|s| s.id).collect();
        assert_eq!(ids.len(), 150);
        assert!(ids.iter().all(|id| id.starts_with("s-")));
    }

    /// A write that fails or panics after it has written rolls back what
    /// it wrote, and only that: the writes queued with it commit, and the
    /// writer goes on with the next group.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_write_that_fails_or_panics_after_writing_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("hangar.db")).unwrap();
        let Db::Sqlite(db) = &store.db else { unreachable!() };
        let insert = |conn: &Connection, id: &str| {
            let t = ts(&now());
            conn.execute(
                "INSERT INTO sessions (id, work_dir, history, created_at, updated_at, tenant_id) VALUES (?1, NULL, '[]', ?2, ?2, ?3)",
                rusqlite::params![id, t, DEFAULT_TENANT],
            )
        };
        let writes = (0..60).map(|i| {
            let db = db.clone();
            tokio::spawn(async move {
                db.write(move |conn| {
                    insert(conn, &format!("s-{i:02}"))?;
                    match i % 3 {
                        0 => Ok(()),
                        1 => Err(StoreError::Task("refused after writing".into())),
                        _ => panic!("a write that panics after writing"),
                    }
                })
                .await
            })
        });
        let results = futures::future::join_all(writes).await;
        for (i, result) in results.into_iter().enumerate() {
            assert_eq!(result.unwrap().is_ok(), i % 3 == 0, "write {i}");
        }
        let ids: Vec<String> = store.sessions().await.unwrap().into_iter().map(|s| s.id).collect();
        let expected: Vec<String> = (0..60).filter(|i| i % 3 == 0).map(|i| format!("s-{i:02}")).collect();
        assert_eq!(ids.iter().collect::<HashSet<_>>(), expected.iter().collect::<HashSet<_>>());
        // The writer carries on.
        store.insert_session(session("after")).await.unwrap();
    }

    /// Writes that arrive while a group runs join it: they run before its
    /// commit, and commit with it, instead of waiting for a commit of their
    /// own. A connection of the test's own sees only what is committed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writes_that_arrive_while_a_group_runs_join_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hangar.db");
        let store = Store::open(&path).unwrap();
        let Db::Sqlite(db) = &store.db else { unreachable!() };
        let observer = Arc::new(std::sync::Mutex::new(Connection::open(&path).unwrap()));
        let committed = move |key: &str| -> i64 {
            observer.lock().unwrap().query_row("SELECT count(*) FROM meta WHERE key = ?1", [key], |r| r.get(0)).unwrap()
        };
        let (running, is_running) = std::sync::mpsc::channel();
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let mut first = Box::pin(db.write(move |conn| {
            conn.execute("INSERT INTO meta (key, value) VALUES ('first', '1')", [])?;
            running.send(()).unwrap();
            wait.recv().unwrap();
            Ok(())
        }));
        // Polled once: the write is sent, and then runs on the writer.
        assert!(futures::poll!(&mut first).is_pending());
        tokio::task::spawn_blocking(move || is_running.recv().unwrap()).await.unwrap();
        let mut later: Vec<_> = (0..10)
            .map(|i| {
                let committed = committed.clone();
                Box::pin(db.write(move |conn| {
                    conn.execute("INSERT INTO meta (key, value) VALUES (?1, '1')", [format!("later-{i}")])?;
                    Ok(committed("first"))
                }))
            })
            .collect();
        for write in &mut later {
            assert!(futures::poll!(write).is_pending());
        }
        go.send(()).unwrap();
        first.await.unwrap();
        for (i, write) in later.into_iter().enumerate() {
            assert_eq!(write.await.unwrap(), 0, "write {i} ran after the first one committed: it did not join its group");
        }
        assert_eq!(committed("first"), 1);
        assert_eq!((0..10).map(|i| committed(&format!("later-{i}"))).sum::<i64>(), 10);
    }

    // ----- the same checks on both backends -----

    /// Runs a check on a fresh SQLite store and on a fresh PostgreSQL
    /// database (when the tests have a server: see [`scratch::ScratchDb`]).
    macro_rules! on_both {
        ($check:ident) => {
            mod $check {
                use super::*;

                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn sqlite() {
                    let dir = tempfile::tempdir().unwrap();
                    super::$check(Store::open(&dir.path().join("hangar.db")).unwrap()).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn postgres() {
                    let Some(db) = scratch::ScratchDb::create().await else { return };
                    super::$check(Store::open_postgres(&db.url).await.unwrap()).await;
                }
            }
        };
    }

    on_both!(agents_sessions_and_provider_keys);
    on_both!(quotas_hold_under_concurrent_writes);
    on_both!(an_idempotency_key_makes_one_run);
    on_both!(runs_events_retention_and_restart);
    on_both!(permission_requests_and_grants);
    on_both!(tenants_and_their_keys);
    on_both!(contexts_audit_and_mcp_servers);
    on_both!(plugins_installed_through_the_api);

    /// A change to `plugins` is announced to every host on
    /// [`CONTROL_CHANNEL`] once it has committed, a tenant's removal included.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn postgres_announces_plugin_changes() {
        let Some(db) = scratch::ScratchDb::create().await else { return };
        let store = Store::open_postgres(&db.url).await.unwrap();
        let (client, mut connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.unwrap();
        let (notices, mut heard) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Some(message) = futures::future::poll_fn(|cx| connection.poll_message(cx)).await {
                if let Ok(tokio_postgres::AsyncMessage::Notification(n)) = message {
                    let _ = notices.send((n.channel().to_string(), n.payload().to_string()));
                }
            }
        });
        client.batch_execute(&format!("LISTEN {CONTROL_CHANNEL}")).await.unwrap();
        let wait = async |heard: &mut tokio::sync::mpsc::UnboundedReceiver<(String, String)>| {
            tokio::time::timeout(std::time::Duration::from_secs(5), heard.recv()).await.expect("a notice").unwrap()
        };
        let changed = (CONTROL_CHANNEL.to_string(), PLUGINS_CHANGED.to_string());

        store.put_plugin(StoredPlugin::new("p".into(), None, "m".into(), Arc::from(&b"wasm"[..]))).await.unwrap();
        assert_eq!(wait(&mut heard).await, changed);
        assert!(store.delete_plugin("p").await.unwrap());
        assert_eq!(wait(&mut heard).await, changed);
        assert!(!store.delete_plugin("p").await.unwrap(), "nothing to delete");
        store.insert_tenant(tenant("t1", "one"), "k".into(), "hash".into(), "hk_".into(), (70_000, 70_010)).await.unwrap();
        store.put_plugin(StoredPlugin::new("t1/p".into(), Some("t1".into()), "m".into(), Arc::from(&b"wasm"[..]))).await.unwrap();
        assert_eq!(wait(&mut heard).await, changed);
        store.delete_tenant("t1").await.unwrap();
        assert_eq!(wait(&mut heard).await, changed);
        assert!(store.plugin_heads().await.unwrap().is_empty());
        // A round trip on the listening connection: any notice sent would be in by now.
        client.batch_execute("SELECT 1").await.unwrap();
        assert!(heard.try_recv().is_err(), "a delete of nothing is not announced");
    }

    /// A database of the version before keeps its audit entries, in the
    /// slimmer table.
    #[test]
    fn the_audit_trail_moves_to_its_slim_table_with_its_entries() {
        let mut conn = Connection::open_in_memory().unwrap();
        let before_slim = MIGRATIONS.iter().position(|step| *step == audit::SLIM_MIGRATION).unwrap();
        migrations().to_version(&mut conn, before_slim).unwrap();
        conn.execute(
            "INSERT INTO audit (id, at, tenant_id, actor, method, route, path, status, address)
             VALUES ('01JA', '2026-12-01T00:00:00.000Z', 't', 'tenant', 'POST', '/agents', '/agents', 201, '127.0.0.1')",
            [],
        )
        .unwrap();
        migrations().to_latest(&mut conn).unwrap();
        let kept: (String, String, u16) =
            conn.query_row("SELECT id, tenant_id, status FROM audit", [], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?))).unwrap();
        assert_eq!(kept, ("01JA".into(), "t".into(), 201));
        let schema: Vec<String> = conn
            .prepare("SELECT sql FROM sqlite_master WHERE tbl_name = 'audit' AND sql IS NOT NULL ORDER BY name")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(schema.len(), 2, "the table and the tenant index: {schema:?}");
        assert!(schema.iter().any(|sql| sql.contains("WITHOUT ROWID")), "{schema:?}");
        let tenants: u32 = conn.query_row("SELECT count(*) FROM audit INDEXED BY audit_by_tenant WHERE tenant_id = 't'", [], |r| r.get(0)).unwrap();
        assert_eq!(tenants, 1, "the tenant's entry is in the partial index");
    }

    /// Hosts starting together on one new database migrate it once; a
    /// database a newer Hangar migrated is refused, not written to.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn postgres_migrations_apply_once_and_refuse_a_newer_schema() {
        let Some(db) = scratch::ScratchDb::create().await else { return };
        for opened in futures::future::join_all((0..3).map(|_| Store::open_postgres(&db.url))).await {
            opened.unwrap();
        }
        let (client, connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        let versions: Vec<i64> =
            client.query("SELECT version FROM schema_migrations ORDER BY version", &[]).await.unwrap().iter().map(|r| r.get(0)).collect();
        assert_eq!(versions, (1..=MIGRATIONS.len() as i64).collect::<Vec<_>>());
        client.execute("INSERT INTO schema_migrations (version, applied_at) VALUES (99, 'later')", &[]).await.unwrap();
        assert!(matches!(Store::open_postgres(&db.url).await, Err(StoreError::PgSchema { found: 99, .. })));
    }

    #[test]
    fn a_location_is_a_path_or_a_postgres_url_shown_without_its_password() {
        assert_eq!(Location::parse("/var/lib/hangar.db"), Location::Sqlite("/var/lib/hangar.db".into()));
        assert_eq!(Location::parse("postgres.db"), Location::Sqlite("postgres.db".into()), "a file named so");
        let url = Location::parse("postgresql://hangar:s3cret@db.internal:5432/hangar");
        assert!(matches!(&url, Location::Postgres(u) if u.ends_with("/hangar")));
        assert_eq!(url.path(), None);
        assert_eq!(url.to_string(), "postgresql://hangar:***@db.internal:5432/hangar");
        assert_eq!(Location::parse("postgres://hangar@127.0.0.1:5432/h").to_string(), "postgres://hangar@127.0.0.1:5432/h");
    }

    fn agent(id: &str) -> Agent {
        let t = now();
        Agent {
            id: id.into(),
            name: format!("agent {id}"),
            instructions: "be brief".into(),
            tools: vec!["bash".into()],
            provider: AgentProvider { id: "anthropic".into(), model: "m".into(), ..Default::default() },
            permissions: Vec::new(),
            compaction: Compaction::default(),
            created_at: t,
            updated_at: t,
            tenant_id: DEFAULT_TENANT.into(),
        }
    }

    fn tenant(id: &str, name: &str) -> Tenant {
        let t = now();
        Tenant { id: id.into(), name: name.into(), quotas: Quotas::default(), uid: None, created_at: t, updated_at: t }
    }

    fn request() -> RunRequest {
        RunRequest { agent_id: "a".into(), message: "hi".into(), body: serde_json::json!({"message": "hi"}) }
    }

    fn no_limit() -> RunLimit {
        RunLimit { tenant: DEFAULT_TENANT.into(), max_concurrent_runs: None }
    }

    async fn run_in(store: &Store, session: &str, id: &str) -> RunRecord {
        let run = RunRecord::queued(id.into(), session.into(), "a".into(), now());
        store.insert_run(run, request(), None, now(), no_limit()).await.unwrap()
    }

    async fn agents_sessions_and_provider_keys(store: Store) {
        store.insert_agent(agent("a1")).await.unwrap();
        store.insert_agent(agent("a2")).await.unwrap();
        assert_eq!(store.agents().await.unwrap().len(), 2);
        let mut renamed = agent("a1");
        renamed.name = "renamed".into();
        store.update_agent(renamed).await.unwrap();
        assert_eq!(store.agent("a1").await.unwrap().name, "renamed", "the cache was emptied by the write");
        assert_eq!(store.agent("a1").await.unwrap().provider.model, "m");
        store.delete_agent("a2").await.unwrap();
        assert!(matches!(store.agent("a2").await, Err(StoreError::NotFound { .. })));
        assert!(matches!(store.delete_agent("a2").await, Err(StoreError::NotFound { .. })));
        assert!(matches!(store.update_agent(agent("nope")).await, Err(StoreError::NotFound { .. })));

        let mut s = session("s1");
        s.work_dir = Some("/w".into());
        s.history = vec![HistoryMessage { role: HistoryRole::User, content: vec![Block::Text { text: "hi".into() }] }];
        store.insert_session(s.clone()).await.unwrap();
        store.insert_session(session("s2")).await.unwrap();
        assert_eq!(store.session("s1").await.unwrap().history, s.history);
        assert_eq!(store.session_work_dir("s1").await.unwrap(), Some((Some("/w".into()), DEFAULT_TENANT.into())));
        assert!(store.session_exists("s2").await.unwrap());
        let page = store.sessions_page(Some(DEFAULT_TENANT.into()), Some("s1".into()), 10, false).await.unwrap();
        assert_eq!(page.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), ["s2"]);
        let page = store.sessions_page(None, None, 1, false).await.unwrap();
        assert!(page.len() == 1 && page[0].history.is_empty(), "no history asked for");
        s.history.clear();
        store.update_session(s).await.unwrap();
        assert!(store.session("s1").await.unwrap().history.is_empty());
        store.delete_session("s1").await.unwrap();
        assert!(matches!(store.session("s1").await, Err(StoreError::NotFound { .. })));
        assert!(matches!(store.delete_session("s1").await, Err(StoreError::NotFound { .. })));
        assert_eq!(store.sessions().await.unwrap().len(), 1);

        assert_eq!(store.auth_updated_at(DEFAULT_TENANT).await.unwrap(), None);
        let key = AuthRecord {
            provider: "anthropic".into(),
            auth_type: Some("api_key".into()),
            secret: Some("sk-secret".into()),
            base_url: None,
            updated_at: now(),
            unreadable: None,
        };
        store.put_auth_records(DEFAULT_TENANT, vec![key.clone()]).await.unwrap();
        let read = store.auth_record(DEFAULT_TENANT, "anthropic").await.unwrap().unwrap();
        assert_eq!(read.secret.as_deref(), Some("sk-secret"), "sealed when written, opened when read");
        assert_eq!(store.auth_records(DEFAULT_TENANT).await.unwrap().len(), 1);
        assert!(store.auth_records(SERVER_KEYS).await.unwrap().is_empty(), "another owner's keys");
        assert_eq!(store.auth_updated_at(DEFAULT_TENANT).await.unwrap(), Some(key.updated_at));
        assert!(store.delete_auth_record(DEFAULT_TENANT, "anthropic").await.unwrap());
        assert!(!store.delete_auth_record(DEFAULT_TENANT, "anthropic").await.unwrap());
    }

    /// `max_sessions` and `max_concurrent_runs` are exact when many writes
    /// race (on PostgreSQL each is its own transaction on its own connection).
    async fn quotas_hold_under_concurrent_writes(store: Store) {
        let creates = (0..20).map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.insert_session_within(session(&format!("s{i:02}")), Some(5)).await })
        });
        let results = futures::future::join_all(creates).await;
        let made = results.iter().filter(|r| r.as_ref().unwrap().is_ok()).count();
        assert_eq!(made, 5);
        assert!(results.iter().all(|r| matches!(r.as_ref().unwrap(), Ok(_) | Err(StoreError::Quota { quota: "max_sessions", .. }))));

        let sessions: Vec<String> = store.sessions().await.unwrap().into_iter().map(|s| s.id).collect();
        let submits = (0..12).map(|i| {
            let (store, session) = (store.clone(), sessions[i % sessions.len()].clone());
            tokio::spawn(async move {
                let run = RunRecord::queued(format!("r{i:02}"), session, "a".into(), now());
                let limit = RunLimit { tenant: DEFAULT_TENANT.into(), max_concurrent_runs: Some(3) };
                store.insert_run(run, request(), None, now(), limit).await
            })
        });
        let results = futures::future::join_all(submits).await;
        assert_eq!(results.iter().filter(|r| r.as_ref().unwrap().is_ok()).count(), 3);

        let adds = (0..10).map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.add_tokens(DEFAULT_TENANT, 1, 2).await })
        });
        for added in futures::future::join_all(adds).await {
            added.unwrap().unwrap();
        }
        assert_eq!(store.tokens_today(DEFAULT_TENANT).await.unwrap(), 30);
        let usage = store.usage(DEFAULT_TENANT).await.unwrap();
        assert_eq!((usage.sessions, usage.active_runs, usage.runs_today), (5, 3, 3));
        assert_eq!((usage.today.input, usage.today.output, usage.month.input), (10, 20, 10));
    }

    async fn an_idempotency_key_makes_one_run(store: Store) {
        store.insert_session(session("s")).await.unwrap();
        let since = now() - chrono::Duration::hours(1);
        let submits = (0..8).map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let run = RunRecord::queued(format!("r{i}"), "s".into(), "a".into(), now());
                store.insert_run(run, request(), Some("key".into()), since, no_limit()).await
            })
        });
        let results = futures::future::join_all(submits).await;
        let made: Vec<String> = results.iter().filter_map(|r| r.as_ref().unwrap().as_ref().ok().map(|r| r.id.clone())).collect();
        assert_eq!(made.len(), 1, "{results:?}");
        assert!(results.iter().all(|r| matches!(r.as_ref().unwrap(), Ok(_) | Err(StoreError::KeyTaken { .. }))));
        let (run, asked) = store.run_by_key("s", "key", since).await.unwrap().unwrap();
        assert_eq!((run.id, asked), (made[0].clone(), request()));
        assert!(store.run_by_key("s", "other", since).await.unwrap().is_none());
        // Once the key's window has passed, the key is free for a new run.
        let later = RunRecord::queued("r9".into(), "s".into(), "a".into(), now() + chrono::Duration::seconds(1));
        store.insert_run(later, request(), Some("key".into()), now() + chrono::Duration::milliseconds(500), no_limit()).await.unwrap();
        assert_eq!(store.run_by_key("s", "key", since).await.unwrap().unwrap().0.id, "r9");
    }

    async fn runs_events_retention_and_restart(store: Store) {
        let use_ = Block::ToolUse { id: "t1".into(), name: "bash".into(), input: serde_json::json!({}) };
        let mut s = session("s");
        s.history = vec![HistoryMessage { role: HistoryRole::Assistant, content: vec![use_] }];
        store.insert_session(s).await.unwrap();
        for id in ["r1", "r2", "r3"] {
            run_in(&store, "s", id).await;
        }
        let ids = |runs: Vec<RunRecord>| runs.into_iter().map(|r| r.id).collect::<Vec<_>>();
        assert_eq!(ids(store.runs("s", 2, None).await.unwrap()), ["r3", "r2"]);
        assert_eq!(ids(store.runs("s", 10, Some("r3".into())).await.unwrap()), ["r2", "r1"]);
        let after = RunsFrom::After { after: "r1".into(), before: None };
        assert_eq!(ids(store.runs_page("s", 10, after).await.unwrap()), ["r2", "r3"]);
        assert_eq!(store.run_request("r1").await.unwrap(), request());
        store.start_run("r1", now()).await.unwrap();
        let result = RunResult { response: Some("done".into()), ..Default::default() };
        store.end_run("r1", RunStatus::Completed, now() - chrono::Duration::hours(2), result.clone()).await.unwrap();
        let r1 = store.run("s", "r1").await.unwrap();
        assert_eq!((r1.status, r1.result), (RunStatus::Completed, result));
        assert!(matches!(store.run("other", "r1").await, Err(StoreError::NotFound { .. })), "another session's run");
        store.start_run("r2", now()).await.unwrap();
        assert_eq!(ids(store.queued_runs().await.unwrap()), ["r3"]);
        store.delete_run("r3").await.unwrap();
        assert!(matches!(store.delete_run("r3").await, Err(StoreError::NotFound { .. })));

        let event = |seq: u64, run: &str| {
            ("s".to_string(), StoredEvent { seq, run_id: run.into(), name: "text".into(), data: format!("{{\"n\":{seq}}}") })
        };
        store.insert_events(vec![event(1, "r1"), event(2, "r1"), event(3, "r2"), event(4, "r2")]).await.unwrap();
        assert!(store.insert_events(vec![event(5, "r2"), event(4, "r2")]).await.is_err(), "a seq used twice");
        assert_eq!(store.last_seq("s").await.unwrap(), 4, "the failed write left nothing");
        let seqs = |events: Vec<StoredEvent>| events.into_iter().map(|e| e.seq).collect::<Vec<_>>();
        assert_eq!(seqs(store.events("s", 1, None, None).await.unwrap()), [2, 3, 4]);
        assert_eq!(seqs(store.events("s", 0, Some(4), Some("r2".into())).await.unwrap()), [3]);
        // r1 ended two hours ago: its events go, and the session remembers up to where.
        assert_eq!(store.prune_events(now() - chrono::Duration::hours(1)).await.unwrap(), 2);
        assert_eq!(store.events_pruned("s").await.unwrap(), 2);
        assert_eq!(seqs(store.events("s", 0, None, None).await.unwrap()), [3, 4]);

        // A restart: r2 was running with a tool call unanswered and a question open.
        let question = PermissionRequest {
            id: "p1".into(),
            session_id: "s".into(),
            run_id: "r2".into(),
            tool_use_id: "t1".into(),
            tool: "bash".into(),
            input: serde_json::json!({"command": "ls"}),
            patterns: vec!["ls *".into()],
            status: PermissionStatus::Pending,
            reply: None,
            message: None,
            created_at: now(),
            answered_at: None,
        };
        store.insert_permission_requests(vec![question]).await.unwrap();
        let interrupted =
            store.interrupt_unfinished_runs("restarted", true, |run| ("error".into(), format!("{{\"run\":\"{run}\"}}"))).await.unwrap();
        assert_eq!(interrupted, [("r2".to_string(), "s".to_string())]);
        assert_eq!(store.run("s", "r2").await.unwrap().status, RunStatus::Interrupted);
        assert_eq!(store.permission_request("s", "p1").await.unwrap().status, PermissionStatus::Interrupted);
        let history = store.session("s").await.unwrap().history;
        assert!(matches!(&history[1].content[0], Block::ToolResult { tool_use_id, is_error: true, .. } if tool_use_id == "t1"));
        let last = store.events("s", 4, None, None).await.unwrap();
        assert_eq!((last.len(), last[0].seq, last[0].name.as_str()), (1, 5, "error"));
        assert_eq!(store.last_seq("s").await.unwrap(), 5);
        assert!(store.interrupt_unfinished_runs("again", true, |_| (String::new(), String::new())).await.unwrap().is_empty());
    }

    async fn permission_requests_and_grants(store: Store) {
        store.insert_session(session("s")).await.unwrap();
        run_in(&store, "s", "r").await;
        store.start_run("r", now()).await.unwrap();
        let ask = |id: &str, pattern: &str| PermissionRequest {
            id: id.into(),
            session_id: "s".into(),
            run_id: "r".into(),
            tool_use_id: format!("t-{id}"),
            tool: "bash".into(),
            input: serde_json::json!({"command": pattern}),
            patterns: vec![pattern.into()],
            status: PermissionStatus::Pending,
            reply: None,
            message: None,
            created_at: now(),
            answered_at: None,
        };
        store.insert_permission_requests(vec![ask("p1", "git *"), ask("p2", "ls *")]).await.unwrap();
        assert_eq!(store.run("s", "r").await.unwrap().status, RunStatus::Waiting);
        assert_eq!(store.permission_requests("s", Some(PermissionStatus::Pending)).await.unwrap().len(), 2);
        let always = Answer { status: PermissionStatus::Approved, reply: Some(Reply::Always), message: None };
        let answered = store.answer_permission("s", "p1", always.clone()).await.unwrap();
        assert_eq!((answered.status, answered.reply), (PermissionStatus::Approved, Some(Reply::Always)));
        assert!(answered.answered_at.is_some());
        assert_eq!(store.run("s", "r").await.unwrap().status, RunStatus::Waiting, "p2 is still open");
        assert!(matches!(store.answer_permission("s", "p1", always).await, Err(StoreError::Answered { .. })));
        assert!(matches!(store.permission_request("other", "p2").await, Err(StoreError::NotFound { .. })));
        // Two answers to the last question at once: one wins, the other is told.
        let answers = (0..2).map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                let reject = Answer { status: PermissionStatus::Rejected, reply: Some(Reply::Reject), message: Some("no".into()) };
                store.answer_permission("s", "p2", reject).await
            })
        });
        let results = futures::future::join_all(answers).await;
        assert_eq!(results.iter().filter(|r| r.as_ref().unwrap().is_ok()).count(), 1);
        assert_eq!(store.run("s", "r").await.unwrap().status, RunStatus::Running);
        assert!(store.permission_requests("s", Some(PermissionStatus::Pending)).await.unwrap().is_empty());
        assert_eq!(store.permission_requests("s", None).await.unwrap().len(), 2);
        let grants = store.permission_grants("s").await.unwrap();
        assert_eq!(grants.iter().map(|g| (g.tool.as_str(), g.pattern.as_str())).collect::<Vec<_>>(), [("bash", "git *")]);
        store.delete_session("s").await.unwrap();
        assert!(store.permission_grants("s").await.unwrap().is_empty(), "they go with the session");
    }

    async fn tenants_and_their_keys(store: Store) {
        let tenant = |id: &str, name: &str| {
            let t = now();
            Tenant { id: id.into(), name: name.into(), quotas: Quotas::default(), uid: None, created_at: t, updated_at: t }
        };
        let uids = (60000, 60001);
        let acme = store.insert_tenant(tenant("t1", "acme"), "k1".into(), "hash1".into(), "hk_1".into(), uids).await.unwrap();
        assert_eq!(acme.uid, Some(60000));
        let taken = store.insert_tenant(tenant("t2", "acme"), "k2".into(), "hash2".into(), "hk_2".into(), uids).await;
        assert!(matches!(taken, Err(StoreError::NameTaken { .. })), "{taken:?}");
        let other = store.insert_tenant(tenant("t3", "other"), "k3".into(), "hash3".into(), "hk_3".into(), uids).await.unwrap();
        assert_eq!(other.uid, Some(60001));
        assert!(matches!(
            store.ensure_tenant_uid(DEFAULT_TENANT, uids).await,
            Err(StoreError::Quota { quota: "uid_range", .. })
        ));
        assert_eq!(store.ensure_tenant_uid("t1", uids).await.unwrap(), 60000);
        let mut renamed = store.tenant("t3").await.unwrap();
        renamed.name = "acme".into();
        assert!(matches!(store.update_tenant(renamed.clone()).await, Err(StoreError::NameTaken { .. })));
        renamed.name = "other2".into();
        renamed.quotas.max_sessions = Some(2);
        store.update_tenant(renamed).await.unwrap();
        assert_eq!(store.tenant("t3").await.unwrap().quotas.max_sessions, Some(2));
        let page = store.tenants_page(None, 10).await.unwrap();
        assert_eq!(page.iter().map(|t| t.id.as_str()).collect::<Vec<_>>(), ["default", "t1", "t3"]);
        assert_eq!(store.tenants_page(Some("default".into()), 1).await.unwrap()[0].id, "t1");

        let key = store.insert_tenant_key("t1", "k4".into(), "hash4".into(), "hk_4".into()).await.unwrap();
        assert_eq!((key.id.as_str(), key.prefix.as_str()), ("k4", "hk_4"));
        assert!(matches!(
            store.insert_tenant_key("nobody", "k5".into(), "hash5".into(), "hk_5".into()).await,
            Err(StoreError::NotFound { .. })
        ));
        assert_eq!(store.key_owner("hash4").await.unwrap(), Some(("t1".into(), "k4".into())));
        store.touch_tenant_key("k4", now()).await.unwrap();
        let keys = store.tenant_keys("t1").await.unwrap();
        assert_eq!(keys.len(), 2);
        assert!(keys.iter().find(|k| k.id == "k4").unwrap().last_used_at.is_some());
        store.delete_tenant_key("t1", "k4").await.unwrap();
        assert!(matches!(store.delete_tenant_key("t3", "k1").await, Err(StoreError::NotFound { .. })), "another tenant's key");

        let mut owned = session("ts");
        owned.tenant_id = "t1".into();
        store.insert_session(owned).await.unwrap();
        let mut a = agent("ta");
        a.tenant_id = "t1".into();
        store.insert_agent(a).await.unwrap();
        store.put_auth_records("t1", vec![AuthRecord {
            provider: "openai".into(),
            auth_type: None,
            secret: Some("k".into()),
            base_url: None,
            updated_at: now(),
            unreadable: None,
        }])
        .await
        .unwrap();
        assert_eq!(store.session_owner("ts").await.unwrap().as_deref(), Some("t1"));
        assert_eq!(store.tenant_sessions("t1").await.unwrap(), ["ts"]);
        assert_eq!(store.delete_tenant("t1").await.unwrap(), ["ts"]);
        assert!(matches!(store.tenant("t1").await, Err(StoreError::NotFound { .. })));
        assert!(store.session_owner("ts").await.unwrap().is_none());
        assert!(store.agents().await.unwrap().is_empty());
        assert!(store.auth_records("t1").await.unwrap().is_empty());
        assert_eq!(store.key_owner("hash1").await.unwrap(), None);
        assert!(matches!(store.delete_tenant("t1").await, Err(StoreError::NotFound { .. })));
    }

    async fn contexts_audit_and_mcp_servers(store: Store) {
        store.insert_session(session("s")).await.unwrap();
        assert_eq!(store.session_context("s").await.unwrap(), None);
        let context = SessionContext { summary: Some("so far".into()), summarized: 3, compactions: 1, ..Default::default() };
        store.put_session_context("s", context.clone()).await.unwrap();
        store.put_session_context("s", context.clone()).await.unwrap();
        assert_eq!(store.session_context("s").await.unwrap(), Some(context));
        store.delete_session("s").await.unwrap();
        assert_eq!(store.session_context("s").await.unwrap(), None, "it goes with its session");

        let entry = |id: &str, tenant: Option<&str>, at: DateTime<Utc>| AuditEntry {
            id: id.into(),
            at,
            actor: "tenant".into(),
            tenant_id: tenant.map(Into::into),
            method: "POST".into(),
            route: "/agents".into(),
            path: "/agents".into(),
            status: 201,
            address: Some("127.0.0.1".into()),
        };
        // Pruning finds old entries by their ids (ULIDs, which sort by time).
        let two_days_ago = now() - chrono::Duration::days(2);
        let e1 = ulid::Ulid::from_parts(two_days_ago.timestamp_millis() as u64, 7).to_string();
        store.insert_audit(entry(&e1, None, two_days_ago)).await.unwrap();
        store.insert_audit(entry("e2", Some("t"), now())).await.unwrap();
        store.insert_audit(entry("e3", Some("t"), now())).await.unwrap();
        let ids = |page: Vec<AuditEntry>| page.into_iter().map(|e| e.id).collect::<Vec<_>>();
        assert_eq!(ids(store.audit_page(Some("t".into()), None, 10).await.unwrap()), ["e2", "e3"]);
        assert_eq!(ids(store.audit_page(None, Some(e1.clone()), 1).await.unwrap()), ["e2"]);
        assert_eq!(store.audit_page(None, None, 1).await.unwrap()[0].status, 201);
        assert_eq!(store.prune_audit(now() - chrono::Duration::days(3)).await.unwrap(), 0);
        assert_eq!(store.prune_audit(now() - chrono::Duration::days(1)).await.unwrap(), 1);
        assert_eq!(ids(store.audit_page(None, None, 1).await.unwrap()), ["e2"]);

        // SQLite: a change and its entry commit in one transaction, with the
        // request's first write that succeeds. PostgreSQL: the entry comes
        // back to the caller, to insert.
        let sqlite = matches!(store.db, Db::Sqlite(_));
        let settle = |recorded: Option<Recorded>, id: &'static str| {
            let store = store.clone();
            async move {
                match recorded {
                    Some(Recorded::Written { id: written, status }) => {
                        assert!(sqlite);
                        assert_eq!((written.as_str(), status), (id, 201));
                    }
                    Some(Recorded::Pending(entry)) => {
                        assert!(!sqlite);
                        store.insert_audit(entry).await.unwrap();
                    }
                    None => panic!("the entry of {id} is lost"),
                }
            }
        };
        let (made, recorded) = auditing(entry("e4", Some("t"), now()), store.insert_session(session("s4"))).await;
        made.unwrap();
        settle(recorded, "e4").await;
        let (made, recorded) = auditing(entry("e5", Some("t"), now()), async {
            assert!(store.insert_session(session("s4")).await.is_err(), "taken: rolled back with its entry");
            store.insert_session(session("s5")).await
        })
        .await;
        made.unwrap();
        settle(recorded, "e5").await;
        let (_, recorded) = auditing(entry("e6", Some("t"), now()), async {}).await;
        assert!(matches!(recorded, Some(Recorded::Pending(e)) if e.id == "e6"), "nothing written, nothing recorded");
        store.amend_audit("e4".into(), Some(200)).await.unwrap();
        store.amend_audit("e5".into(), None).await.unwrap();
        let page = store.audit_page(Some("t".into()), Some("e3".into()), 10).await.unwrap();
        assert_eq!(page.iter().map(|e| (e.id.as_str(), e.status)).collect::<Vec<_>>(), [("e4", 200)]);

        let server = |tenant: &str, name: &str| McpServerRecord {
            tenant_id: tenant.into(),
            name: name.into(),
            transport: McpTransport::Http { url: "http://127.0.0.1:1/mcp".into() },
            secrets: vec![("Authorization".into(), "Bearer x".into())],
            tools: Vec::new(),
            created_at: now(),
        };
        store.insert_mcp_server(server("", "wide")).await.unwrap();
        store.insert_mcp_server(server("t", "own")).await.unwrap();
        assert!(matches!(store.insert_mcp_server(server("t", "wide")).await, Err(StoreError::NameTaken { .. })));
        let listed = store.mcp_servers("t").await.unwrap();
        assert_eq!(listed.iter().map(|s| s.name.as_str()).collect::<HashSet<_>>(), HashSet::from(["own", "wide"]));
        assert_eq!(listed[0].secrets, [("Authorization".to_string(), "Bearer x".to_string())], "opened when read");
        assert_eq!(store.mcp_servers("").await.unwrap().len(), 1);
        store.delete_mcp_server("t", "own").await.unwrap();
        assert!(matches!(store.delete_mcp_server("t", "own").await, Err(StoreError::NotFound { .. })));
    }

    async fn plugins_installed_through_the_api(store: Store) {
        assert!(store.plugin_heads().await.unwrap().is_empty());
        let wasm: Arc<[u8]> = Arc::from(&b"\0asm component bytes"[..]);
        let plugin = StoredPlugin::new("echo".into(), None, "name = \"echo\"".into(), wasm.clone());
        assert_eq!(plugin.sha256.len(), 64);
        store.put_plugin(plugin.clone()).await.unwrap();
        store.put_plugin(StoredPlugin::new("t1/echo".into(), Some("t1".into()), "tenant's".into(), wasm.clone())).await.unwrap();
        let read = store.plugin("echo").await.unwrap().expect("stored");
        assert_eq!((&read.key, &read.tenant_id, &read.manifest, &*read.wasm), (&plugin.key, &None, &plugin.manifest, &*wasm));
        assert_eq!((read.sha256.as_str(), read.installed_at), (plugin.sha256.as_str(), plugin.installed_at));

        // An upgrade replaces the row.
        let upgraded = StoredPlugin::new("echo".into(), None, "version 2".into(), Arc::from(&b"other bytes"[..]));
        store.put_plugin(upgraded.clone()).await.unwrap();
        let heads = store.plugin_heads().await.unwrap();
        assert_eq!(
            heads,
            [
                PluginHead { key: "echo".into(), tenant_id: None, manifest: "version 2".into(), sha256: upgraded.sha256.clone() },
                PluginHead { key: "t1/echo".into(), tenant_id: Some("t1".into()), manifest: "tenant's".into(), sha256: plugin.sha256.clone() },
            ]
        );
        assert!(store.delete_plugin("echo").await.unwrap());
        assert!(!store.delete_plugin("echo").await.unwrap());
        assert!(store.plugin("echo").await.unwrap().is_none());

        // A tenant's go with it.
        store.insert_tenant(tenant("t1", "one"), "k".into(), "hash".into(), "hk_".into(), (70_000, 70_010)).await.unwrap();
        store.delete_tenant("t1").await.unwrap();
        assert!(store.plugin_heads().await.unwrap().is_empty());
    }
}
