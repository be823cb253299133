//! The PostgreSQL backend (`--db postgres://…`): a deadpool pool of
//! tokio-postgres connections. PostgreSQL takes concurrent writers, so
//! there is no writer thread: each write is one transaction of its own,
//! and checks that the SQLite backend gets from its single writer (a quota
//! counted before an insert, a free name, the next uid) take a
//! transaction-scoped advisory lock on what they count instead.
//!
//! The schema is the SQLite one in PostgreSQL's dialect, with the same
//! column names; times stay RFC 3339 text (so they order and read exactly
//! as in SQLite) and JSON stays text. Integers are BIGINT throughout.

use std::str::FromStr;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::error::SqlState;
use tokio_postgres::{NoTls, Row};

use super::StoreError;

/// The schema, one step per SQLite migration (the same position, the same
/// issue), so the two stay at the same version. `schema_migrations` holds
/// the version reached.
pub(super) const MIGRATIONS: [&str; 9] = [
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
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
    "CREATE TABLE runs (
        id TEXT PRIMARY KEY,
        session_id TEXT NOT NULL,
        agent_id TEXT NOT NULL,
        status TEXT NOT NULL,
        request TEXT NOT NULL,
        idempotency_key TEXT,
        created_at TEXT NOT NULL,
        started_at TEXT,
        ended_at TEXT,
        result TEXT
    );
    CREATE INDEX runs_by_session ON runs (session_id, id);
    CREATE INDEX runs_by_status ON runs (status);
    CREATE INDEX runs_by_key ON runs (session_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
    CREATE TABLE events (
        session_id TEXT NOT NULL,
        seq BIGINT NOT NULL,
        run_id TEXT NOT NULL,
        name TEXT NOT NULL,
        data TEXT NOT NULL,
        PRIMARY KEY (session_id, seq)
    );
    CREATE INDEX events_by_run ON events (run_id, seq);
    ALTER TABLE sessions ADD COLUMN events_pruned BIGINT NOT NULL DEFAULT 0;",
    "ALTER TABLE agents ADD COLUMN permissions TEXT NOT NULL DEFAULT '[]';
    CREATE TABLE permission_requests (
        id TEXT PRIMARY KEY,
        session_id TEXT NOT NULL,
        run_id TEXT NOT NULL,
        tool_use_id TEXT NOT NULL,
        tool TEXT NOT NULL,
        input TEXT NOT NULL,
        patterns TEXT NOT NULL,
        status TEXT NOT NULL,
        reply TEXT,
        message TEXT,
        created_at TEXT NOT NULL,
        answered_at TEXT
    );
    CREATE INDEX permission_requests_by_session ON permission_requests (session_id, id);
    CREATE INDEX permission_requests_pending ON permission_requests (run_id) WHERE status = 'pending';
    CREATE TABLE permission_grants (
        session_id TEXT NOT NULL,
        tool TEXT NOT NULL,
        pattern TEXT NOT NULL,
        created_at TEXT NOT NULL,
        PRIMARY KEY (session_id, tool, pattern)
    );",
    // Run ids are ULIDs, so the newest run of a key has the highest id.
    "UPDATE runs SET idempotency_key = NULL
     WHERE idempotency_key IS NOT NULL
       AND id NOT IN (SELECT MAX(id) FROM runs WHERE idempotency_key IS NOT NULL GROUP BY session_id, idempotency_key);
    DROP INDEX runs_by_key;
    CREATE UNIQUE INDEX runs_by_key ON runs (session_id, idempotency_key) WHERE idempotency_key IS NOT NULL;",
    "CREATE TABLE tenants (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        quotas TEXT NOT NULL DEFAULT '{}',
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        uid BIGINT UNIQUE
    );
    INSERT INTO tenants (id, name, quotas, created_at, updated_at)
        VALUES ('default', 'default', '{}',
                to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'),
                to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'));
    CREATE TABLE tenant_keys (
        id TEXT PRIMARY KEY,
        tenant_id TEXT NOT NULL,
        hash TEXT NOT NULL UNIQUE,
        prefix TEXT NOT NULL,
        created_at TEXT NOT NULL,
        last_used_at TEXT
    );
    CREATE INDEX tenant_keys_by_tenant ON tenant_keys (tenant_id);
    ALTER TABLE agents ADD COLUMN tenant_id TEXT NOT NULL DEFAULT 'default';
    ALTER TABLE sessions ADD COLUMN tenant_id TEXT NOT NULL DEFAULT 'default';
    CREATE INDEX sessions_by_tenant ON sessions (tenant_id, id);
    -- A provider's key per tenant ('' holds the server's own keys).
    ALTER TABLE provider_auth ADD COLUMN tenant_id TEXT NOT NULL DEFAULT 'default';
    ALTER TABLE provider_auth ALTER COLUMN tenant_id DROP DEFAULT;
    ALTER TABLE provider_auth DROP CONSTRAINT provider_auth_pkey;
    ALTER TABLE provider_auth ADD PRIMARY KEY (tenant_id, provider);
    CREATE TABLE usage (
        tenant_id TEXT NOT NULL,
        day TEXT NOT NULL,
        input_tokens BIGINT NOT NULL DEFAULT 0,
        output_tokens BIGINT NOT NULL DEFAULT 0,
        runs BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (tenant_id, day)
    );",
    "ALTER TABLE agents ADD COLUMN compaction TEXT NOT NULL DEFAULT '{}';
    CREATE TABLE session_contexts (
        session_id TEXT PRIMARY KEY REFERENCES sessions (id) ON DELETE CASCADE,
        context TEXT NOT NULL,
        updated_at TEXT NOT NULL
    );",
    "CREATE TABLE audit (
        id TEXT PRIMARY KEY,
        at TEXT NOT NULL,
        tenant_id TEXT,
        actor TEXT NOT NULL,
        method TEXT NOT NULL,
        route TEXT NOT NULL,
        path TEXT NOT NULL,
        status BIGINT NOT NULL,
        address TEXT
    );
    CREATE INDEX audit_by_tenant ON audit (tenant_id, id);
    CREATE INDEX audit_by_time ON audit (at);",
    "CREATE TABLE mcp_servers (
        tenant_id TEXT NOT NULL,
        name TEXT NOT NULL,
        transport TEXT NOT NULL,
        spec TEXT NOT NULL,
        secrets TEXT NOT NULL,
        tools TEXT NOT NULL,
        created_at TEXT NOT NULL,
        PRIMARY KEY (tenant_id, name)
    );",
];

/// Connections kept at most; PostgreSQL's own default limit is 100, which
/// several hosts share.
const POOL_SIZE: usize = 16;

/// The advisory lock key (any constant) that serialises migrations of
/// hosts starting at once on one database.
const MIGRATION_LOCK: i64 = 0x68616e676172; // "hangar"

/// A pool of connections to one PostgreSQL database.
#[derive(Clone)]
pub(super) struct Pg {
    pool: Pool,
}

pub(super) type Client = deadpool_postgres::Object;

impl Pg {
    /// Connects to `url` and migrates the database to the latest version.
    pub(super) async fn open(url: &str) -> Result<Pg, StoreError> {
        let mut config = tokio_postgres::Config::from_str(url)?;
        // Fail a start against a wrong address in seconds, not minutes.
        config.connect_timeout(std::time::Duration::from_secs(10));
        let manager = Manager::from_config(config, NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager).max_size(POOL_SIZE).build().map_err(|e| StoreError::PgPool(e.to_string()))?;
        let pg = Pg { pool };
        pg.migrate().await?;
        Ok(pg)
    }

    pub(super) async fn client(&self) -> Result<Client, StoreError> {
        self.pool.get().await.map_err(|e| StoreError::PgPool(e.to_string()))
    }

    /// Applies the steps of [`MIGRATIONS`] past the stored version, each in
    /// a transaction with its version, under an advisory lock so that two
    /// hosts starting together do not both apply one.
    async fn migrate(&self) -> Result<(), StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at TEXT NOT NULL)")
            .await?;
        let version: i64 = tx.query_one("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", &[]).await?.get(0);
        if version as usize > MIGRATIONS.len() {
            return Err(StoreError::PgSchema { found: version, known: MIGRATIONS.len() });
        }
        for (i, step) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            tx.batch_execute(step).await?;
            tx.execute(
                "INSERT INTO schema_migrations (version, applied_at) VALUES ($1, $2)",
                &[&(i as i64 + 1), &super::ts(&super::now())],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// Whether `err` is a unique constraint's violation (SQLSTATE 23505).
pub(super) fn unique_violation(err: &tokio_postgres::Error) -> bool {
    err.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

/// Takes a lock for the rest of the transaction on `what` (a quota's
/// subject, a name): the check and the write after it cannot interleave
/// with another transaction's.
pub(super) async fn lock(tx: &deadpool_postgres::Transaction<'_>, what: &str) -> Result<(), StoreError> {
    tx.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", &[&what]).await?;
    Ok(())
}

/// A text column holding an RFC 3339 time.
pub(super) fn ts_at(row: &Row, i: usize) -> Result<chrono::DateTime<chrono::Utc>, StoreError> {
    super::parse_time(row.get::<_, &str>(i))
}

/// A nullable text column holding an RFC 3339 time.
pub(super) fn ts_opt(row: &Row, i: usize) -> Result<Option<chrono::DateTime<chrono::Utc>>, StoreError> {
    row.get::<_, Option<&str>>(i).map(super::parse_time).transpose()
}

/// A BIGINT column that holds a count or a seq (never negative).
pub(super) fn count(row: &Row, i: usize) -> u64 {
    row.get::<_, i64>(i).max(0) as u64
}

/// A statement written for PostgreSQL (`$1`…) as SQLite takes it (`?1`…),
/// for the few statements both backends share word for word.
pub(super) fn sqlite(statement: &str) -> String {
    statement.replace('$', "?")
}
