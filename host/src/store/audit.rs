//! The audit trail: who changed what, when, and from where. Entries hold
//! the route and the ids in its path, never a body, so never a secret.

use chrono::{DateTime, Utc};
use rusqlite::params;
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
const PAGE: &str = "SELECT id, at, tenant_id, actor, method, route, path, status, address FROM audit";

impl Store {
    pub async fn insert_audit(&self, entry: AuditEntry) -> Result<(), StoreError> {
        let at = ts(&entry.at);
        match &self.db {
            Db::Sqlite(db) => {
                db.write(move |c| {
                    c.prepare_cached(&pg::sqlite(INSERT))?.execute(params![
                        entry.id,
                        at,
                        entry.tenant_id,
                        entry.actor,
                        entry.method,
                        entry.route,
                        entry.path,
                        entry.status,
                        entry.address
                    ])?;
                    Ok(())
                })
                .await
            }
            Db::Postgres(pg) => {
                pg.execute(
                    INSERT,
                    &[
                        &entry.id,
                        &at,
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

    /// At most `limit` entries after `after`, oldest first, of `tenant`
    /// (`None`: everyone's).
    pub async fn audit_page(&self, tenant: Option<String>, after: Option<String>, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let limit = limit as i64;
        match &self.db {
            Db::Sqlite(db) => {
                db.read(move |c| {
                    let mut stmt = c.prepare_cached(&format!(
                        "{PAGE} WHERE (?1 IS NULL OR tenant_id = ?1) AND (?2 IS NULL OR id > ?2) ORDER BY id LIMIT ?3"
                    ))?;
                    let rows = stmt.query_map(params![tenant, after, limit], |r| {
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
                    })?;
                    Ok(rows.collect::<Result<Vec<_>, _>>()?)
                })
                .await
            }
            Db::Postgres(pg) => pg
                .query(
                    &format!("{PAGE} WHERE ($1::TEXT IS NULL OR tenant_id = $1) AND ($2::TEXT IS NULL OR id > $2) ORDER BY id LIMIT $3"),
                    &[&tenant, &after, &limit],
                )
                .await?
                .iter()
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
                .collect(),
        }
    }

    /// Removes entries older than `before`; how many.
    pub async fn prune_audit(&self, before: DateTime<Utc>) -> Result<usize, StoreError> {
        let before = ts(&before);
        match &self.db {
            Db::Sqlite(db) => db.write(move |c| Ok(c.prepare_cached("DELETE FROM audit WHERE at < ?1")?.execute([before])?)).await,
            Db::Postgres(pg) => Ok(pg.execute("DELETE FROM audit WHERE at < $1", &[&before]).await?),
        }
    }
}
