//! The PostgreSQL backend (`--db postgres://…`): a deadpool pool of
//! tokio-postgres connections. PostgreSQL takes concurrent writers, so
//! there is no writer thread: each write is one transaction of its own,
//! and checks that the SQLite backend gets from its single writer (a quota
//! counted before an insert, a free name, the next uid) take a
//! transaction-scoped advisory lock on what they count instead.
//!
//! The schema is the SQLite one in PostgreSQL's dialect, with the same
//! column names (mostly SQLite's very text: see [`OWN_STEPS`]); times stay
//! RFC 3339 text (so they order and read exactly as in SQLite) and JSON
//! stays text. Integers are BIGINT throughout. No TLS yet: connections are
//! for loopback or a private network.

use std::borrow::Cow;
use std::str::FromStr;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row};

use super::StoreError;

/// The schema: SQLite's steps (`super::MIGRATIONS`), at the same
/// versions. Where the two dialects differ only in SQLite's `INTEGER` (64
/// bits; PostgreSQL's is 32, its BIGINT is 64), `WITHOUT ROWID` (a SQLite
/// storage choice), `BLOB` (`BYTEA`) and how the current time is written, a step is SQLite's
/// own text, translated by [`from_sqlite`]; where they differ more, this
/// list has the step written for PostgreSQL. Both lists are `[_; 12]`: they
/// cannot fall out of step.
const OWN_STEPS: [Option<&str>; 12] = [
    None,
    None,
    None,
    None,
    // SQLite's keeps the newest run of a key by rowid; run ids are ULIDs,
    // so the newest run of a key has the highest id.
    Some(
        "UPDATE runs SET idempotency_key = NULL
         WHERE idempotency_key IS NOT NULL
           AND id NOT IN (SELECT MAX(id) FROM runs WHERE idempotency_key IS NOT NULL GROUP BY session_id, idempotency_key);
        DROP INDEX runs_by_key;
        CREATE UNIQUE INDEX runs_by_key ON runs (session_id, idempotency_key) WHERE idempotency_key IS NOT NULL;",
    ),
    None,
    None,
    None,
    None,
    None,
    None,
    None,
];

/// The steps in PostgreSQL's dialect, in order.
pub(super) fn migrations() -> Vec<Cow<'static, str>> {
    super::MIGRATIONS
        .iter()
        .zip(OWN_STEPS)
        .map(|(sqlite, own)| match own {
            Some(own) => Cow::Borrowed(own),
            None => Cow::Owned(from_sqlite(sqlite)),
        })
        .collect()
}

/// A SQLite step in PostgreSQL's dialect (see [`OWN_STEPS`] for which).
fn from_sqlite(step: &str) -> String {
    step.replace(" WITHOUT ROWID", "").replace("INTEGER", "BIGINT").replace(" BLOB", " BYTEA").replace(SQLITE_NOW, PG_NOW)
}

/// The current time as the store writes times (RFC 3339, UTC, milliseconds).
const SQLITE_NOW: &str = "strftime('%Y-%m-%dT%H:%M:%fZ', 'now')";
const PG_NOW: &str = r#"to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"')"#;

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
        self.pool.get().await.map_err(|e| match e {
            deadpool_postgres::PoolError::Backend(e) => StoreError::PgPool(reason(&e)),
            other => StoreError::PgPool(other.to_string()),
        })
    }

    // One statement on a pooled connection, in a transaction of its own.
    // Each connection keeps its statements prepared: a statement is one
    // round trip, not a prepare and then an execute.

    pub(super) async fn query(&self, statement: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, StoreError> {
        let c = self.client().await?;
        let statement = c.prepare_cached(statement).await?;
        Ok(c.query(&statement, params).await?)
    }

    pub(super) async fn query_opt(&self, statement: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Option<Row>, StoreError> {
        let c = self.client().await?;
        let statement = c.prepare_cached(statement).await?;
        Ok(c.query_opt(&statement, params).await?)
    }

    pub(super) async fn query_one(&self, statement: &str, params: &[&(dyn ToSql + Sync)]) -> Result<Row, StoreError> {
        let c = self.client().await?;
        let statement = c.prepare_cached(statement).await?;
        Ok(c.query_one(&statement, params).await?)
    }

    /// The rows changed.
    pub(super) async fn execute(&self, statement: &str, params: &[&(dyn ToSql + Sync)]) -> Result<usize, StoreError> {
        let c = self.client().await?;
        let statement = c.prepare_cached(statement).await?;
        Ok(c.execute(&statement, params).await? as usize)
    }

    /// Applies the steps of [`migrations`] past the stored version, each in
    /// a transaction with its version, under an advisory lock so that two
    /// hosts starting together do not both apply one.
    async fn migrate(&self) -> Result<(), StoreError> {
        let mut c = self.client().await?;
        let tx = c.transaction().await?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK]).await?;
        tx.batch_execute("CREATE TABLE IF NOT EXISTS schema_migrations (version BIGINT PRIMARY KEY, applied_at TEXT NOT NULL)")
            .await?;
        let version: i64 = tx.query_one("SELECT COALESCE(MAX(version), 0) FROM schema_migrations", &[]).await?.get(0);
        let steps = migrations();
        if version as usize > steps.len() {
            return Err(StoreError::PgSchema { found: version, known: steps.len() });
        }
        for (i, step) in steps.iter().enumerate().skip(version as usize) {
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

/// Why a statement or a connection failed, for a person: tokio-postgres
/// says only "db error" or "error connecting to server" and keeps the
/// reason in its source. A server's message is given with its SQLSTATE, not
/// its detail (which can quote a row's values).
pub(super) fn reason(err: &tokio_postgres::Error) -> String {
    if let Some(db) = err.as_db_error() {
        return format!("{} ({})", db.message(), db.code().code());
    }
    crate::error_chain(err)
}

/// Whether `err` is a unique constraint's violation (SQLSTATE 23505).
pub(super) fn unique_violation(err: &tokio_postgres::Error) -> bool {
    err.code() == Some(&SqlState::UNIQUE_VIOLATION)
}

/// A unique violation of the index or constraint `name` (its name, as
/// PostgreSQL reports it, not the message's text).
pub(super) fn violates(err: &tokio_postgres::Error, name: &str) -> bool {
    unique_violation(err) && err.as_db_error().and_then(|e| e.constraint()) == Some(name)
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

#[cfg(test)]
mod tests {
    /// No SQLite-only word is left in a step (applying them is tested
    /// against a real server by the store's tests).
    #[test]
    fn every_step_is_in_postgresql_dialect() {
        for (i, step) in super::migrations().iter().enumerate() {
            for sqlite_only in ["WITHOUT ROWID", "INTEGER", "strftime", "rowid"] {
                assert!(!step.contains(sqlite_only), "step {}: {sqlite_only}", i + 1);
            }
        }
    }
}
