//! Persistence on SQLite (rusqlite): WAL mode, versioned migrations
//! (rusqlite_migration). Reads run on a pool of read-only connections on
//! blocking threads; writes go to one writer thread that commits every
//! write waiting at the time in one transaction (group commit), each in
//! a savepoint of its own so a failing write rolls back alone. The async
//! server never waits on disk I/O.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use chrono::{DateTime, SecondsFormat, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use rusqlite_migration::{M, Migrations};

mod audit;
mod context;
mod mcp;
mod permissions;
mod records;
mod runs;
pub mod secrets;
mod tenants;
pub use audit::AuditEntry;
pub use context::{Compaction, SessionContext};
pub use mcp::{McpServerRecord, McpTool, McpTransport};
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
}

fn migrations() -> Migrations<'static> {
    Migrations::new(vec![M::up(
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
    ),
    // When credentials last changed, deletions included (a deleted record
    // can no longer carry the time itself).
    M::up("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"),
    // Runs and the events of each session (issue: durable runs).
    M::up(runs::MIGRATION),
    // Permission rules of agents, requests and grants (issue: permissions).
    M::up(permissions::MIGRATION),
    // One run per idempotency key (concurrent submits with one key).
    M::up(runs::KEY_MIGRATION),
    // Tenants, their keys and usage; every agent, session and provider key
    // owned by one (issue: multi-tenant hosting).
    M::up(tenants::MIGRATION),
    // Compaction settings of agents, compacted views of sessions (issue: context compaction).
    M::up(context::MIGRATION),
    // Who changed what, when and from where (issue: hosting security).
    M::up(audit::MIGRATION),
    // MCP servers used as tools (issue: MCP both ways).
    M::up(mcp::MIGRATION)])
}

/// The `meta` key of when `tenant`'s credentials last changed (the
/// default tenant's is the one from before tenants existed).
fn auth_changed_key(tenant: &str) -> String {
    match tenant {
        DEFAULT_TENANT => "auth_updated_at".into(),
        other => format!("auth_updated_at:{other}"),
    }
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

/// Timestamps as RFC 3339 UTC with millisecond precision.
pub fn now() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_millis(now.timestamp_millis()).unwrap_or(now)
}

fn ts(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

fn parse_ts(text: String) -> rusqlite::Result<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(&text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e)))
}

/// Read connections, and reads running at once: a burst of reads queues
/// for one of these instead of opening a connection (and taking a blocking
/// thread) per read. A thousand runs starting together used to open
/// hundreds, each with its own page cache and thread stack, and the peak
/// memory of the 1,000-stream benchmark held them all.
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
    agents: Arc<AgentCache>,
    /// Seals provider keys before they are written, opens them when read.
    secrets: Arc<secrets::SecretBox>,
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
}

impl Store {
    /// Opens (creating it with mode 0600 if needed) and migrates the
    /// database, with the default bound on its write-ahead log.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Self::open_with(path, DEFAULT_WAL_LIMIT)
    }

    /// Opens the database; its write-ahead log is checkpointed and cut back
    /// whenever it passes `wal_limit` bytes (see [`checkpoint_loop`]).
    pub fn open_with(path: &Path, wal_limit: u64) -> Result<Store, StoreError> {
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
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        // What a write replaces is overwritten where that costs no extra
        // I/O: an old (or plain-text) provider key does not linger in a page.
        conn.pragma_update(None, "secure_delete", "FAST")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        migrations().to_latest(&mut conn)?;
        // Checkpoints (copying the WAL back into the database, with an
        // fsync) run on a thread of their own, so writes never wait for one.
        conn.pragma_update(None, "wal_autocheckpoint", 0)?;
        // A WAL that a checkpoint has reset is cut back to this size by the
        // next write, instead of keeping the largest size it ever reached.
        conn.pragma_update(None, "journal_size_limit", wal_limit as i64)?;
        let checkpointer = Self::open_connection(path)?;
        checkpointer.pragma_update(None, "journal_size_limit", wal_limit as i64)?;
        let wal = Wal { path: wal_path(path), limit: wal_limit };
        let (writer, jobs) = std::sync::mpsc::channel();
        let (wake, wakes) = std::sync::mpsc::sync_channel(1);
        let written = Arc::new(AtomicU64::new(0));
        let written_too = written.clone();
        let spawn = |name: &str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map_err(|source| StoreError::Open { path: path.into(), source })
        };
        spawn("hangar-db-writer", Box::new(move || write_loop(conn, jobs, wake, written)))?;
        spawn("hangar-db-checkpoint", Box::new(move || checkpoint_loop(checkpointer, wal, wakes, written_too)))?;
        Ok(Store {
            writer,
            readers: Default::default(),
            reading: Arc::new(tokio::sync::Semaphore::new(READERS)),
            path: path.into(),
            agents: Default::default(),
            secrets: Arc::new(secrets::SecretBox::ephemeral()),
        })
    }

    /// Seals provider keys with `secrets` (the server key) from now on, and
    /// seals any key still stored in plain text (from before keys were
    /// sealed). Returns how many were sealed now.
    pub async fn with_secrets(mut self, secrets: secrets::SecretBox) -> Result<(Store, usize), StoreError> {
        self.secrets = Arc::new(secrets);
        let sealer = self.secrets.clone();
        let sealed = self
            .write(move |c| {
                let plain: Vec<(String, String, String)> = c
                    .prepare("SELECT tenant_id, provider, secret FROM provider_auth WHERE secret IS NOT NULL")?
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .filter(|row| row.as_ref().map_or(true, |(_, _, s): &(String, String, String)| !secrets::SecretBox::is_sealed(s)))
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
            let path = self.path.clone();
            tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
                let conn = Self::open_connection(&path)?;
                conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
                Ok(())
            })
            .await
            .map_err(|e| StoreError::Task(e.to_string()))??;
        }
        Ok((self, sealed))
    }

    /// A further connection to the database `open` migrated.
    fn open_connection(path: &Path) -> Result<Connection, StoreError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
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
        let job: Job = Box::new(move |tx| {
            let result = match tx {
                Ok(tx) => tx.savepoint().map_err(StoreError::from).and_then(|savepoint| {
                    // Dropping the savepoint on error rolls back this write alone.
                    let value = f(&savepoint)?;
                    savepoint.commit()?;
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
        self.writer.send(job).map_err(|_| StoreError::Task("the database writer has stopped".into()))?;
        result.await.map_err(|_| StoreError::Task("the write panicked in the database writer".into()))?
    }

    /// A write to the agents table: the in-memory list is emptied once it
    /// has committed (or failed), so the next read sees the table.
    async fn write_agents<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let result = self.write(f).await;
        self.agents.invalidate();
        result
    }

    // ----- agents -----

    pub async fn insert_agent(&self, agent: Agent) -> Result<Agent, StoreError> {
        self.write_agents(move |c| {
            c.execute(
                "INSERT INTO agents (id, name, instructions, tools, provider, created_at, updated_at, permissions, compaction, tenant_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
                params![
                    agent.id,
                    agent.name,
                    agent.instructions,
                    serde_json::to_string(&agent.tools)?,
                    serde_json::to_string(&agent.provider)?,
                    ts(&agent.created_at),
                    ts(&agent.updated_at),
                    serde_json::to_string(&agent.permissions)?,
                    serde_json::to_string(&agent.compaction)?,
                    agent.tenant_id
                ],
            )?;
            Ok(agent)
        })
        .await
    }

    pub async fn update_agent(&self, agent: Agent) -> Result<Agent, StoreError> {
        self.write_agents(move |c| {
            let n = c.execute(
                "UPDATE agents SET name = ?2, instructions = ?3, tools = ?4, provider = ?5, updated_at = ?6, permissions = ?7, compaction = ?8
                 WHERE id = ?1",
                params![
                    agent.id,
                    agent.name,
                    agent.instructions,
                    serde_json::to_string(&agent.tools)?,
                    serde_json::to_string(&agent.provider)?,
                    ts(&agent.updated_at),
                    serde_json::to_string(&agent.permissions)?,
                    serde_json::to_string(&agent.compaction)?
                ],
            )?;
            if n == 0 {
                return Err(StoreError::NotFound { kind: "agent", id: agent.id });
            }
            Ok(agent)
        })
        .await
    }

    pub async fn agent(&self, id: &str) -> Result<Agent, StoreError> {
        self.agents()
            .await?
            .iter()
            .find(|a| a.id == id)
            .cloned()
            .ok_or_else(|| StoreError::NotFound { kind: "agent", id: id.to_string() })
    }

    /// Every agent, by id.
    pub async fn agents(&self) -> Result<Arc<Vec<Agent>>, StoreError> {
        if let Some(list) = self.agents.get() {
            return Ok(list);
        }
        let generation = self.agents.generation();
        let list = Arc::new(
            self.read(|c| {
                let mut stmt = c.prepare_cached(&format!("{AGENT_SELECT} ORDER BY id"))?;
                let rows = stmt.query_map([], agent_row)?.collect::<Result<Vec<_>, _>>()?;
                rows.into_iter().map(RawAgent::finish).collect::<Result<Vec<_>, _>>()
            })
            .await?,
        );
        self.agents.fill(generation, list.clone());
        Ok(list)
    }

    pub async fn delete_agent(&self, id: &str) -> Result<(), StoreError> {
        self.write_agents(delete_row("agents", "agent", id)).await
    }

    // ----- sessions -----

    pub async fn insert_session(&self, session: Session) -> Result<Session, StoreError> {
        self.insert_session_within(session, None).await
    }

    /// Stores a session unless its tenant already has `max_sessions`: the
    /// count and the insert are one write, so concurrent creates cannot
    /// both slip under the limit.
    pub async fn insert_session_within(&self, session: Session, max_sessions: Option<u64>) -> Result<Session, StoreError> {
        self.write(move |c| {
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
                serde_json::to_string(&session.history)?,
                ts(&session.created_at),
                ts(&session.updated_at),
                session.tenant_id
            ])?;
            Ok(session)
        })
        .await
    }

    /// Writes a session's fields (and its whole history) in one transaction.
    pub async fn update_session(&self, session: Session) -> Result<Session, StoreError> {
        self.write(move |c| {
            let n = c.prepare_cached("UPDATE sessions SET work_dir = ?2, history = ?3, updated_at = ?4 WHERE id = ?1")?.execute(
                params![session.id, session.work_dir, serde_json::to_string(&session.history)?, ts(&session.updated_at)],
            )?;
            if n == 0 {
                return Err(StoreError::NotFound { kind: "session", id: session.id });
            }
            Ok(session)
        })
        .await
    }

    pub async fn session(&self, id: &str) -> Result<Session, StoreError> {
        let id = id.to_string();
        self.read(move |c| {
            c.prepare_cached(&format!("{SESSION_SELECT} WHERE id = ?1"))?
                .query_row([&id], session_row)
                .optional()?
                .ok_or(StoreError::NotFound { kind: "session", id })?
                .finish()
        })
        .await
    }

    /// A session's `work_dir` and owner (`None` if there is no such
    /// session), without reading its history.
    pub async fn session_work_dir(&self, id: &str) -> Result<Option<(Option<String>, String)>, StoreError> {
        let id = id.to_string();
        self.read(move |c| {
            Ok(c.prepare_cached("SELECT work_dir, tenant_id FROM sessions WHERE id = ?1")?
                .query_row([&id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?)
        })
        .await
    }

    /// Whether a session exists, without reading (and decoding) its history.
    pub async fn session_exists(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_string();
        self.read(move |c| Ok(c.prepare_cached("SELECT 1 FROM sessions WHERE id = ?1")?.exists([&id])?)).await
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
        self.read(move |c| {
            let columns = if history { "history" } else { "'[]'" };
            let mut stmt = c.prepare_cached(&format!(
                "SELECT id, work_dir, {columns}, created_at, updated_at, tenant_id FROM sessions
                 WHERE (?1 IS NULL OR id > ?1) AND (?3 IS NULL OR tenant_id = ?3) ORDER BY id LIMIT ?2"
            ))?;
            let rows = stmt.query_map(params![after, limit as i64, tenant], session_row)?.collect::<Result<Vec<_>, _>>()?;
            rows.into_iter().map(RawSession::finish).collect()
        })
        .await
    }

    pub async fn sessions(&self) -> Result<Vec<Session>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(&format!("{SESSION_SELECT} ORDER BY id"))?;
            let rows = stmt.query_map([], session_row)?.collect::<Result<Vec<_>, _>>()?;
            rows.into_iter().map(RawSession::finish).collect()
        })
        .await
    }

    /// Deletes a session with its runs and events.
    pub async fn delete_session(&self, id: &str) -> Result<(), StoreError> {
        let id = id.to_string();
        self.write(move |c| {
            if delete_session_rows(c, &id)? == 0 {
                return Err(StoreError::NotFound { kind: "session", id });
            }
            Ok(())
        })
        .await
    }

    // ----- provider credentials -----

    /// The provider keys of `tenant` ([`SERVER_KEYS`]: the server's own).
    pub async fn auth_records(&self, tenant: &str) -> Result<Vec<AuthRecord>, StoreError> {
        let tenant = tenant.to_string();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT provider, auth_type, secret, base_url, updated_at FROM provider_auth WHERE tenant_id = ?1 ORDER BY provider",
            )?;
            let rows = stmt.query_map([&tenant], auth_row)?.collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await
        .map(|rows| rows.into_iter().map(|r| self.unseal(r)).collect())
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
        self.read(move |c| {
            Ok(c.query_row(
                "SELECT provider, auth_type, secret, base_url, updated_at FROM provider_auth WHERE tenant_id = ?1 AND provider = ?2",
                [&tenant, &provider],
                auth_row,
            )
            .optional()?)
        })
        .await
        .map(|r| r.map(|r| self.unseal(r)))
    }

    /// Writes several records at once: a PUT either applies whole or not at all.
    pub async fn put_auth_records(&self, tenant: &str, records: Vec<AuthRecord>) -> Result<(), StoreError> {
        let sealer = self.secrets.clone();
        let tenant = tenant.to_string();
        self.write(move |c| {
            for r in &records {
                let secret = r.secret.as_deref().map(|s| sealer.seal(s));
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

    /// Removes a provider's record; false when there was none.
    pub async fn delete_auth_record(&self, tenant: &str, provider: &str) -> Result<bool, StoreError> {
        let (tenant, provider) = (tenant.to_string(), provider.to_string());
        self.write(move |c| {
            let removed = c.execute("DELETE FROM provider_auth WHERE tenant_id = ?1 AND provider = ?2", [&tenant, &provider])? > 0;
            if removed {
                touch_auth(c, &tenant, &now())?;
            }
            Ok(removed)
        })
        .await
    }

    /// When stored credentials last changed, if ever.
    pub async fn auth_updated_at(&self, tenant: &str) -> Result<Option<DateTime<Utc>>, StoreError> {
        let key = auth_changed_key(tenant);
        self.read(move |c| {
            let text: Option<String> = c.query_row("SELECT value FROM meta WHERE key = ?1", [&key], |r| r.get(0)).optional()?;
            Ok(text.map(parse_ts).transpose()?)
        })
        .await
    }
}

/// The write that deletes row `id` of `table`, or says it does not exist.
fn delete_row(
    table: &'static str,
    kind: &'static str,
    id: &str,
) -> impl FnOnce(&Connection) -> Result<(), StoreError> + Send + 'static {
    let id = id.to_string();
    move |c| {
        let n = c.execute(&format!("DELETE FROM {table} WHERE id = ?1"), [&id])?;
        if n == 0 {
            return Err(StoreError::NotFound { kind, id });
        }
        Ok(())
    }
}

const AGENT_SELECT: &str =
    "SELECT id, name, instructions, tools, provider, created_at, updated_at, permissions, compaction, tenant_id FROM agents";
const SESSION_SELECT: &str = "SELECT id, work_dir, history, created_at, updated_at, tenant_id FROM sessions";

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

struct RawSession(Session, String);

impl RawSession {
    fn finish(self) -> Result<Session, StoreError> {
        let RawSession(mut session, history) = self;
        session.history = serde_json::from_str(&history)?;
        Ok(session)
    }
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

/// Writes after which the checkpoint thread copies the WAL back into the
/// database (about SQLite's own automatic checkpoint of 1,000 pages).
const CHECKPOINT_WRITES: u64 = 1000;

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

/// Keeps the WAL bounded, on a thread of its own:
///
/// - every `CHECKPOINT_WRITES` writes, a PASSIVE checkpoint, which never
///   blocks the writer or a reader (what it cannot copy now, it copies next
///   time);
/// - when the WAL has grown past its limit anyway (PASSIVE checkpoints
///   never catch up with a writer that never pauses, and the file only
///   grows), a TRUNCATE checkpoint: it waits for the writer's current
///   transaction and for readers of older snapshots, copies everything and
///   cuts the file to nothing, so writes pause for the length of one
///   checkpoint;
/// - after a second without writes, a TRUNCATE checkpoint too: an idle
///   server keeps no WAL at all.
///
/// Ends with the writer thread.
fn checkpoint_loop(conn: Connection, wal: Wal, wakes: std::sync::mpsc::Receiver<()>, written: Arc<AtomicU64>) {
    use std::sync::mpsc::RecvTimeoutError;
    let checkpoint = |mode: &str| conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| r.get::<_, i64>(0));
    let mut done = 0;
    loop {
        let idle = match wakes.recv_timeout(std::time::Duration::from_secs(1)) {
            Ok(()) => false,
            Err(RecvTimeoutError::Timeout) => true,
            Err(RecvTimeoutError::Disconnected) => {
                let _ = checkpoint("TRUNCATE");
                return;
            }
        };
        let now = written.load(Ordering::Relaxed);
        let size = wal.size();
        let mode = if size > wal.limit || (idle && size > 0) {
            "TRUNCATE"
        } else if now - done >= CHECKPOINT_WRITES {
            "PASSIVE"
        } else {
            continue;
        };
        match checkpoint(mode) {
            // 1: a reader or writer kept it from finishing; next time.
            Ok(busy) => {
                if busy == 0 || mode == "PASSIVE" {
                    done = now;
                }
                if busy != 0 && mode == "TRUNCATE" {
                    tracing::debug!(wal_bytes = size, "WAL checkpoint (TRUNCATE) was blocked; trying again");
                }
            }
            Err(err) => tracing::warn!(%err, mode, "WAL checkpoint failed; trying again later"),
        }
        crate::telemetry::wal_size(wal.size());
    }
}

/// The writer thread: takes the first waiting write, then every write that
/// queued behind it (up to `GROUP_MAX`), and commits them together, so a
/// burst of writes pays for one commit instead of one each.
fn write_loop(
    mut conn: Connection,
    jobs: std::sync::mpsc::Receiver<Job>,
    wake: std::sync::mpsc::SyncSender<()>,
    written: Arc<AtomicU64>,
) {
    while let Ok(first) = jobs.recv() {
        let mut group = vec![first];
        while group.len() < GROUP_MAX {
            match jobs.try_recv() {
                Ok(job) => group.push(job),
                Err(_) => break,
            }
        }
        // IMMEDIATE: the write lock is taken (waiting in the busy handler)
        // at BEGIN. A deferred transaction that reads before it writes
        // would fail at once with SQLITE_BUSY when a TRUNCATE checkpoint
        // reset the WAL under its read snapshot.
        let mut tx = match conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate) {
            Ok(tx) => tx,
            Err(err) => {
                let err = err.to_string();
                tracing::error!(%err, "cannot begin a write transaction");
                for job in group {
                    job(Err(&err))(None);
                }
                continue;
            }
        };
        // A write that panics loses only its own answer (its caller sees the
        // writer's error); the thread and the other writes carry on.
        let writes = group.len() as u64;
        let finishes: Vec<Finish> = group
            .into_iter()
            .filter_map(|job| std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job(Ok(&mut tx)))).ok())
            .collect();
        let commit = tx.commit().err().map(|e| e.to_string());
        if let Some(err) = &commit {
            tracing::error!(%err, writes = finishes.len(), "a group commit failed");
        }
        for finish in finishes {
            finish(commit.as_deref());
        }
        written.fetch_add(writes, Ordering::Relaxed);
        // Wakes the checkpoint thread; a wake-up already pending will do.
        let _ = wake.try_send(());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(id: &str) -> Session {
        let t = now();
        Session { id: id.into(), work_dir: None, history: Vec::new(), created_at: t, updated_at: t, tenant_id: DEFAULT_TENANT.into() }
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
}
