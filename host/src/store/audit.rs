//! The audit trail: who changed what, when, and from where. Entries hold
//! the route and the ids in its path, never a body, so never a secret.

use std::cell::RefCell;
use std::future::Future;

use chrono::{DateTime, Utc};
use rusqlite::{Connection, params};
use serde::Serialize;
use utoipa::ToSchema;

use super::{Db, Store, StoreError, parse_ts, pg, rfc3339, ts};

pub(super) const MIGRATION: &str = "
    CREATE TABLE audit (
        id TEXT PRIMARY KEY,
        at TEXT NOT NULL,
        tenant_id TEXT,
        actor TEXT NOT NULL,
        method TEXT NOT NULL,
        route TEXT NOT NULL,
        path TEXT NOT NULL,
        status INTEGER NOT NULL,
        address TEXT
    );
    CREATE INDEX audit_by_tenant ON audit (tenant_id, id);
    CREATE INDEX audit_by_time ON audit (at);
";

/// Every change inserts an entry, in the change's own transaction (see
/// [`auditing`]): four b-trees (the rows, the primary key, the two indexes)
/// made that insert cost the writer thread twice the session it recorded.
/// Keyed by the id alone (`WITHOUT ROWID`: the rows are the primary key's
/// b-tree), and pruned by id (a ULID, in time order) instead of through an
/// index on `at`, it keeps two.
pub(super) const SLIM_MIGRATION: &str = "
    CREATE TABLE audit_by_id (
        id TEXT PRIMARY KEY,
        at TEXT NOT NULL,
        tenant_id TEXT,
        actor TEXT NOT NULL,
        method TEXT NOT NULL,
        route TEXT NOT NULL,
        path TEXT NOT NULL,
        status INTEGER NOT NULL,
        address TEXT
    ) WITHOUT ROWID;
    INSERT INTO audit_by_id SELECT id, at, tenant_id, actor, method, route, path, status, address FROM audit;
    DROP TABLE audit;
    ALTER TABLE audit_by_id RENAME TO audit;
    CREATE INDEX audit_by_tenant ON audit (tenant_id, id);
";

/// A single-user server's entries have no tenant, and only a tenant's page
/// reads this index: without those rows it costs their inserts nothing.
pub(super) const TENANT_INDEX_MIGRATION: &str = "
    DROP INDEX audit_by_tenant;
    CREATE INDEX audit_by_tenant ON audit (tenant_id, id) WHERE tenant_id IS NOT NULL;
";

/// One change made through the API.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AuditEntry {
    /// ULID (time-ordered).
    pub id: String,
    #[serde(serialize_with = "rfc3339")]
    pub at: DateTime<Utc>,
    /// `operator` (a single-user server), `admin` (the admin token) or `tenant`.
    pub actor: String,
    /// The tenant whose key made the change (`null` for the operator and the admin).
    pub tenant_id: Option<String>,
    pub method: String,
    /// The route's template (`/agents/{id}`).
    pub route: String,
    /// The path, with its ids.
    pub path: String,
    /// The answer's status.
    pub status: u16,
    /// The client's address.
    pub address: Option<String>,
}

const INSERT: &str =
    "INSERT INTO audit (id, at, tenant_id, actor, method, route, path, status, address) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)";
/// A page of everyone's entries, and of one tenant's: a statement each,
/// with a plain `id > $1` (every id sorts above ""), since a test like
/// `($3 IS NULL OR tenant_id = $3)` makes SQLite scan the table, and a
/// tenant's must name `tenant_id = $3` to use the partial index.
const PAGE_EVERYONE: &str =
    "SELECT id, at, tenant_id, actor, method, route, path, status, address FROM audit WHERE id > $1 ORDER BY id LIMIT $2";
const PAGE_TENANT: &str = "SELECT id, at, tenant_id, actor, method, route, path, status, address FROM audit
    WHERE id > $1 AND tenant_id = $3 ORDER BY id LIMIT $2";

/// Also run inside the writer thread, in a write's own savepoint (see [`auditing`]).
pub(super) fn insert_row(c: &Connection, entry: &AuditEntry) -> Result<(), StoreError> {
    c.prepare_cached(&pg::sqlite(INSERT))?.execute(params![
        entry.id,
        ts(&entry.at),
        entry.tenant_id,
        entry.actor,
        entry.method,
        entry.route,
        entry.path,
        entry.status,
        entry.address
    ])?;
    Ok(())
}

tokio::task_local! {
    /// The audit entry of the request this task answers, until a write takes it.
    static PENDING: RefCell<Pending>;
}

#[derive(Default)]
struct Pending {
    entry: Option<AuditEntry>,
    written: bool,
}

/// What became of a request's audit entry (see [`auditing`]).
pub enum Recorded {
    /// Committed with the request's first write, in its transaction, with
    /// the status the entry was given beforehand.
    Written { id: String, status: u16 },
    /// No write of the request's took it (the request wrote nothing, its
    /// writes failed, or the database is PostgreSQL): the caller records it.
    Pending(AuditEntry),
}

/// Runs `handler` (the answering of one request) so that its first
/// successful write to SQLite also inserts `entry`, in the same
/// transaction: a change is never committed without its entry, and the
/// request pays for one trip to the writer thread instead of two. The
/// answer's status is not known yet when that write commits, so `entry`
/// carries the expected one, for the caller to correct when they differ.
pub async fn auditing<F: Future>(entry: AuditEntry, handler: F) -> (F::Output, Option<Recorded>) {
    let (id, status) = (entry.id.clone(), entry.status);
    let pending = RefCell::new(Pending { entry: Some(entry), written: false });
    PENDING
        .scope(pending, async move {
            let output = handler.await;
            let pending = PENDING.with(|p| std::mem::take(&mut *p.borrow_mut()));
            let recorded = match pending {
                Pending { written: true, .. } => Some(Recorded::Written { id, status }),
                Pending { entry, .. } => entry.map(Recorded::Pending),
            };
            (output, recorded)
        })
        .await
}

/// The current request's entry, for the write about to go to the writer
/// thread (`None` outside [`auditing`], or once a write has it).
pub(super) fn take_pending() -> Option<AuditEntry> {
    PENDING.try_with(|p| p.borrow_mut().entry.take()).ok().flatten()
}

/// After that write: committed, or the entry goes back for a later write
/// (or the caller) to record.
pub(super) fn settle_pending(entry: AuditEntry, committed: bool) {
    let _ = PENDING.try_with(|p| {
        let mut p = p.borrow_mut();
        if committed {
            p.written = true;
        } else {
            p.entry = Some(entry);
        }
    });
}

impl Store {
    pub async fn insert_audit(&self, entry: AuditEntry) -> Result<(), StoreError> {
        match &self.db {
            Db::Sqlite(db) => db.write(move |c| insert_row(c, &entry)).await,
            Db::Postgres(pg) => {
                pg.execute(
                    INSERT,
                    &[
                        &entry.id,
                        &ts(&entry.at),
                        &entry.tenant_id,
                        &entry.actor,
                        &entry.method,
                        &entry.route,
                        &entry.path,
                        &(entry.status as i64),
                        &entry.address,
                    ],
                )
                .await?;
                Ok(())
            }
        }
    }

    /// Corrects an entry that [`auditing`] wrote before the answer was
    /// known: its status, or (`None`: the request was refused after all) the
    /// entry itself, since the trail lists changes.
    pub async fn amend_audit(&self, id: String, status: Option<u16>) -> Result<(), StoreError> {
        const UPDATE: &str = "UPDATE audit SET status = $1 WHERE id = $2";
        const DELETE: &str = "DELETE FROM audit WHERE id = $1";
        match (&self.db, status) {
            (Db::Sqlite(db), status) => {
                db.write(move |c| {
                    match status {
                        Some(status) => c.prepare_cached(&pg::sqlite(UPDATE))?.execute(params![status, id])?,
                        None => c.prepare_cached(&pg::sqlite(DELETE))?.execute(params![id])?,
                    };
                    Ok(())
                })
                .await
            }
            (Db::Postgres(pg), Some(status)) => pg.execute(UPDATE, &[&(status as i64), &id]).await.map(drop),
            (Db::Postgres(pg), None) => pg.execute(DELETE, &[&id]).await.map(drop),
        }
    }

    /// At most `limit` entries after `after`, oldest first, of `tenant`
    /// (`None`: everyone's).
    pub async fn audit_page(&self, tenant: Option<String>, after: Option<String>, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let (after, limit) = (after.unwrap_or_default(), limit as i64);
        let sql = if tenant.is_some() { PAGE_TENANT } else { PAGE_EVERYONE };
        match &self.db {
            Db::Sqlite(db) => {
                db.read(move |c| {
                    let mut stmt = c.prepare_cached(&pg::sqlite(sql))?;
                    let row = |r: &rusqlite::Row| {
                        Ok(AuditEntry {
                            id: r.get(0)?,
                            at: parse_ts(r.get(1)?)?,
                            tenant_id: r.get(2)?,
                            actor: r.get(3)?,
                            method: r.get(4)?,
                            route: r.get(5)?,
                            path: r.get(6)?,
                            status: r.get(7)?,
                            address: r.get(8)?,
                        })
                    };
                    let rows = match &tenant {
                        Some(tenant) => stmt.query_map(params![after, limit, tenant], row)?,
                        None => stmt.query_map(params![after, limit], row)?,
                    };
                    Ok(rows.collect::<Result<Vec<_>, _>>()?)
                })
                .await
            }
            Db::Postgres(pg) => {
                let rows = match &tenant {
                    Some(tenant) => pg.query(sql, &[&after, &limit, tenant]).await?,
                    None => pg.query(sql, &[&after, &limit]).await?,
                };
                rows.iter()
                    .map(|r| {
                        Ok(AuditEntry {
                            id: r.get(0),
                            at: pg::ts_at(r, 1)?,
                            tenant_id: r.get(2),
                            actor: r.get(3),
                            method: r.get(4),
                            route: r.get(5),
                            path: r.get(6),
                            status: r.get::<_, i64>(7) as u16,
                            address: r.get(8),
                        })
                    })
                    .collect()
            }
        }
    }

    /// Removes entries older than `before`; how many.
    pub async fn prune_audit(&self, before: DateTime<Utc>) -> Result<usize, StoreError> {
        // Ids are ULIDs made when the entry was: every id made before
        // `before` sorts below this one, so the primary key finds them.
        let below = ulid::Ulid::from_parts(before.timestamp_millis().max(0) as u64, 0).to_string();
        let before = ts(&before);
        const DELETE: &str = "DELETE FROM audit WHERE id < $1 AND at < $2";
        match &self.db {
            Db::Sqlite(db) => db.write(move |c| Ok(c.prepare_cached(&pg::sqlite(DELETE))?.execute([below, before])?)).await,
            Db::Postgres(pg) => Ok(pg.execute(DELETE, &[&below, &before]).await?),
        }
    }
}

#[cfg(test)]
mod tests {
    use rusqlite::Connection;

    use super::*;

    /// Only a tenant's entries are in the tenant index, and each page
    /// statement searches a b-tree instead of scanning the table.
    #[test]
    fn pages_search_and_the_tenant_index_holds_only_tenants_rows() {
        let mut c = Connection::open_in_memory().unwrap();
        super::super::migrations().to_latest(&mut c).unwrap();
        let plan = |sql: &str| -> String {
            let mut stmt = c.prepare(&format!("EXPLAIN QUERY PLAN {}", pg::sqlite(sql))).unwrap();
            let unbound = rusqlite::params_from_iter(std::iter::repeat_n("", stmt.parameter_count()));
            let rows = stmt.query_map(unbound, |r| r.get::<_, String>(3)).unwrap();
            rows.collect::<Result<Vec<_>, _>>().unwrap().join("; ")
        };
        assert!(plan(PAGE_EVERYONE).contains("USING PRIMARY KEY (id>?)"), "{}", plan(PAGE_EVERYONE));
        assert!(plan(PAGE_TENANT).contains("USING INDEX audit_by_tenant (tenant_id=? AND id>?)"), "{}", plan(PAGE_TENANT));
        let index: String = c.query_row("SELECT sql FROM sqlite_master WHERE name = 'audit_by_tenant'", [], |r| r.get(0)).unwrap();
        assert!(index.ends_with("WHERE tenant_id IS NOT NULL"), "{index}");
    }
}
