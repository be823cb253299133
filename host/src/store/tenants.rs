//! Tenants, their API keys (stored only as SHA-256 hashes) and their usage
//! counters (tokens and runs per UTC day).

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use deadpool_postgres::GenericClient;

use super::{Db, Store, StoreError, parse_ts, pg, rfc3339, rfc3339_opt, ts};

/// The tenant that owns whatever existed before multi-tenant mode, and
/// whatever the operator makes with the admin token.
pub const DEFAULT_TENANT: &str = "default";

/// Whose provider keys are the server's own (set with the admin token).
pub const SERVER_KEYS: &str = "";

pub(super) const MIGRATION: &str = "
    CREATE TABLE tenants (
        id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        quotas TEXT NOT NULL DEFAULT '{}',
        created_at TEXT NOT NULL,
        updated_at TEXT NOT NULL,
        uid INTEGER UNIQUE
    );
    INSERT INTO tenants (id, name, quotas, created_at, updated_at)
        VALUES ('default', 'default', '{}', strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), strftime('%Y-%m-%dT%H:%M:%fZ', 'now'));
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
    -- A provider's key per tenant ('' holds the server's own keys): the
    -- primary key changes, so the table is rebuilt.
    CREATE TABLE provider_auth_by_tenant (
        tenant_id TEXT NOT NULL,
        provider TEXT NOT NULL,
        auth_type TEXT,
        secret TEXT,
        base_url TEXT,
        updated_at TEXT NOT NULL,
        PRIMARY KEY (tenant_id, provider)
    );
    INSERT INTO provider_auth_by_tenant (tenant_id, provider, auth_type, secret, base_url, updated_at)
        SELECT 'default', provider, auth_type, secret, base_url, updated_at FROM provider_auth;
    DROP TABLE provider_auth;
    ALTER TABLE provider_auth_by_tenant RENAME TO provider_auth;
    CREATE TABLE usage (
        tenant_id TEXT NOT NULL,
        day TEXT NOT NULL,
        input_tokens INTEGER NOT NULL DEFAULT 0,
        output_tokens INTEGER NOT NULL DEFAULT 0,
        runs INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (tenant_id, day)
    ) WITHOUT ROWID;
";

/// Limits of one tenant; `null` is no limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Quotas {
    /// Runs queued or running at once.
    #[serde(default, deserialize_with = "whole_u64")]
    #[schema(minimum = 0)]
    pub max_concurrent_runs: Option<u64>,
    /// Requests a minute (any route).
    #[serde(default, deserialize_with = "whole_u64")]
    #[schema(minimum = 0)]
    pub requests_per_minute: Option<u64>,
    /// Input + output tokens per UTC day.
    #[serde(default, deserialize_with = "whole_u64")]
    #[schema(minimum = 0)]
    pub tokens_per_day: Option<u64>,
    /// Sessions at once.
    #[serde(default, deserialize_with = "whole_u64")]
    #[schema(minimum = 0)]
    pub max_sessions: Option<u64>,
    /// Megabytes under the tenant's work directory.
    #[serde(default, deserialize_with = "whole_u64")]
    #[schema(minimum = 0)]
    pub storage_mb: Option<u64>,
    /// Event streams (SSE) open at once, resumed ones included.
    #[serde(default, deserialize_with = "whole_u64")]
    #[schema(minimum = 0)]
    pub max_streams: Option<u64>,
    /// Plugins of the tenant's own.
    #[serde(default, deserialize_with = "whole_u64")]
    #[schema(minimum = 0)]
    pub plugins: Option<u64>,
    /// Megabytes of the tenant's own plugins (their components together).
    #[serde(default, deserialize_with = "whole_u64")]
    #[schema(minimum = 0)]
    pub plugin_mb: Option<u64>,
}

/// A whole number, `10` or `10.0` (JSON Schema counts a number without a
/// fraction as an integer, and so does this), or `null`.
pub fn whole_u64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    use serde::de::Error;
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else { return Ok(None) };
    match (n.as_u64(), n.as_f64()) {
        (Some(u), _) => Ok(Some(u)),
        (None, Some(f)) if f.fract() == 0.0 && (0.0..=u64::MAX as f64).contains(&f) => Ok(Some(f as u64)),
        _ => Err(D::Error::custom(format!("invalid value: {n}, expected a whole number from 0"))),
    }
}

impl Quotas {
    /// These overrides over `defaults`.
    pub fn over(self, defaults: Quotas) -> Quotas {
        Quotas {
            max_concurrent_runs: self.max_concurrent_runs.or(defaults.max_concurrent_runs),
            requests_per_minute: self.requests_per_minute.or(defaults.requests_per_minute),
            tokens_per_day: self.tokens_per_day.or(defaults.tokens_per_day),
            max_sessions: self.max_sessions.or(defaults.max_sessions),
            storage_mb: self.storage_mb.or(defaults.storage_mb),
            max_streams: self.max_streams.or(defaults.max_streams),
            plugins: self.plugins.or(defaults.plugins),
            plugin_mb: self.plugin_mb.or(defaults.plugin_mb),
        }
    }
}

/// A tenant as stored: its own quota overrides (the server's defaults
/// apply where it has none).
#[derive(Debug, Clone)]
pub struct Tenant {
    pub id: String,
    pub name: String,
    pub quotas: Quotas,
    /// The uid (and gid) its commands run as, from `[process] uid_range`.
    pub uid: Option<u32>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// One of a tenant's API keys, as it may be shown: never the key itself.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TenantKey {
    pub id: String,
    /// The key's first characters, to tell keys apart.
    pub prefix: String,
    #[serde(serialize_with = "rfc3339")]
    pub created_at: DateTime<Utc>,
    /// Roughly when it was last used (updated at most once a minute).
    #[serde(serialize_with = "rfc3339_opt")]
    #[schema(value_type = Option<String>)]
    pub last_used_at: Option<DateTime<Utc>>,
}

/// Token and run counts of one tenant.
#[derive(Debug, Clone, Copy, Default, Serialize, ToSchema)]
pub struct Tokens {
    pub input: u64,
    pub output: u64,
}

#[derive(Debug, Clone, Default)]
pub struct UsageCounts {
    pub today: Tokens,
    pub month: Tokens,
    pub runs_today: u64,
    pub active_runs: u64,
    pub sessions: u64,
}

/// The UTC day counters are kept by: `2026-12-01`.
pub fn day(at: &DateTime<Utc>) -> String {
    at.format("%Y-%m-%d").to_string()
}

/// Runs of a tenant that are queued, running or waiting for a person (what
/// `max_concurrent_runs` limits).
const ACTIVE_RUNS: &str = "SELECT COUNT(*) FROM runs JOIN sessions ON sessions.id = runs.session_id
     WHERE sessions.tenant_id = $1 AND runs.status IN ('queued', 'running', 'waiting')";

pub(super) fn active_runs(c: &Connection, tenant: &str) -> rusqlite::Result<u64> {
    c.prepare_cached(&pg::sqlite(ACTIVE_RUNS))?.query_row([tenant], |r| r.get(0))
}

pub(super) async fn pg_active_runs(c: &impl GenericClient, tenant: &str) -> Result<u64, StoreError> {
    Ok(pg::count(&c.query_one(ACTIVE_RUNS, &[&tenant]).await?, 0))
}

const SESSION_COUNT: &str = "SELECT COUNT(*) FROM sessions WHERE tenant_id = $1";

pub(super) fn session_count(c: &Connection, tenant: &str) -> rusqlite::Result<u64> {
    c.prepare_cached(&pg::sqlite(SESSION_COUNT))?.query_row([tenant], |r| r.get(0))
}

pub(super) async fn pg_session_count(c: &impl GenericClient, tenant: &str) -> Result<u64, StoreError> {
    Ok(pg::count(&c.query_one(SESSION_COUNT, &[&tenant]).await?, 0))
}

const COUNT_RUN: &str = "INSERT INTO usage (tenant_id, day, runs) VALUES ($1, $2, 1)
     ON CONFLICT(tenant_id, day) DO UPDATE SET runs = usage.runs + 1";

pub(super) fn count_run(c: &Connection, tenant: &str, at: &DateTime<Utc>) -> rusqlite::Result<()> {
    c.prepare_cached(&pg::sqlite(COUNT_RUN))?.execute(params![tenant, day(at)])?;
    Ok(())
}

pub(super) async fn pg_count_run(c: &impl GenericClient, tenant: &str, at: &DateTime<Utc>) -> Result<(), StoreError> {
    c.execute(COUNT_RUN, &[&tenant, &day(at)]).await?;
    Ok(())
}

/// Tokens of the days matching a `LIKE` pattern (SUM of BIGINT is NUMERIC in
/// PostgreSQL, hence the casts).
const TOKENS_ON: &str =
    "SELECT CAST(COALESCE(SUM(input_tokens), 0) AS BIGINT), CAST(COALESCE(SUM(output_tokens), 0) AS BIGINT)
     FROM usage WHERE tenant_id = $1 AND day LIKE $2";

fn tokens_on(c: &Connection, tenant: &str, day_pattern: &str) -> rusqlite::Result<Tokens> {
    c.prepare_cached(&pg::sqlite(TOKENS_ON))?
        .query_row(params![tenant, day_pattern], |r| Ok(Tokens { input: r.get(0)?, output: r.get(1)? }))
}

async fn pg_tokens_on(c: &impl GenericClient, tenant: &str, day_pattern: &str) -> Result<Tokens, StoreError> {
    let row = c.query_one(TOKENS_ON, &[&tenant, &day_pattern]).await?;
    Ok(Tokens { input: pg::count(&row, 0), output: pg::count(&row, 1) })
}

fn tenant_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<(Tenant, String)> {
    Ok((
        Tenant {
            id: row.get(0)?,
            name: row.get(1)?,
            quotas: Quotas::default(),
            created_at: parse_ts(row.get(3)?)?,
            updated_at: parse_ts(row.get(4)?)?,
            uid: row.get(5)?,
        },
        row.get(2)?,
    ))
}

fn tenant_pg_row(row: &tokio_postgres::Row) -> Result<(Tenant, String), StoreError> {
    Ok((
        Tenant {
            id: row.get(0),
            name: row.get(1),
            quotas: Quotas::default(),
            created_at: pg::ts_at(row, 3)?,
            updated_at: pg::ts_at(row, 4)?,
            uid: row.get::<_, Option<i64>>(5).map(|uid| uid as u32),
        },
        row.get(2),
    ))
}

fn finish((mut tenant, quotas): (Tenant, String)) -> Result<Tenant, StoreError> {
    tenant.quotas = serde_json::from_str(&quotas)?;
    Ok(tenant)
}

const TENANT_SELECT: &str = "SELECT id, name, quotas, created_at, updated_at, uid FROM tenants";

/// The uid after `max` (the highest in use in `range`, inclusive).
fn uid_after(max: Option<u32>, (first, last): (u32, u32)) -> Result<u32, StoreError> {
    match max {
        None => Ok(first),
        Some(max) if max < last => Ok(max + 1),
        Some(_) => Err(StoreError::Quota { quota: "uid_range", limit: (last - first + 1) as u64, used: (last - first + 1) as u64 }),
    }
}

const MAX_UID: &str = "SELECT MAX(uid) FROM tenants WHERE uid BETWEEN $1 AND $2";

/// The next free uid of `range` (inclusive), in the write that uses it.
fn next_uid(c: &Connection, range: (u32, u32)) -> Result<u32, StoreError> {
    let max: Option<u32> = c.prepare_cached(&pg::sqlite(MAX_UID))?.query_row([range.0, range.1], |r| r.get(0))?;
    uid_after(max, range)
}

/// [`next_uid`] on PostgreSQL: under a lock until the transaction ends,
/// so two hosts making tenants at once do not pick one uid.
async fn pg_next_uid(tx: &deadpool_postgres::Transaction<'_>, range: (u32, u32)) -> Result<u32, StoreError> {
    pg::lock(tx, "tenant-uids").await?;
    let max: Option<i64> = tx.query_one(MAX_UID, &[&(range.0 as i64), &(range.1 as i64)]).await?.get(0);
    uid_after(max.map(|m| m as u32), range)
}

/// A unique constraint on `tenants.name` failed.
fn name_taken(err: &rusqlite::Error) -> bool {
    matches!(err, rusqlite::Error::SqliteFailure(e, _) if e.code == rusqlite::ErrorCode::ConstraintViolation)
}

const KEY_INSERT: &str = "INSERT INTO tenant_keys (id, tenant_id, hash, prefix, created_at) VALUES ($1, $2, $3, $4, $5)";

impl Store {
    /// Stores a tenant with its first key (given as its hash and prefix)
    /// and the next free uid of `uids`.
    pub async fn insert_tenant(
        &self,
        mut tenant: Tenant,
        key_id: String,
        hash: String,
        prefix: String,
        uids: (u32, u32),
    ) -> Result<Tenant, StoreError> {
        let quotas = serde_json::to_string(&tenant.quotas)?;
        let (created, updated) = (ts(&tenant.created_at), ts(&tenant.updated_at));
        match &self.db {
            Db::Sqlite(db) => {
                db.write(move |c| {
                    tenant.uid = Some(next_uid(c, uids)?);
                    let inserted = c.execute(
                        "INSERT INTO tenants (id, name, quotas, created_at, updated_at, uid) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                        params![tenant.id, tenant.name, quotas, created, updated, tenant.uid],
                    );
                    match inserted {
                        Err(e) if name_taken(&e) => return Err(StoreError::NameTaken { kind: "tenant", name: tenant.name }),
                        other => other?,
                    };
                    c.execute(&pg::sqlite(KEY_INSERT), params![key_id, tenant.id, hash, prefix, created])?;
                    Ok(tenant)
                })
                .await
            }
            Db::Postgres(pg) => {
                let mut c = pg.client().await?;
                let tx = c.transaction().await?;
                let uid = pg_next_uid(&tx, uids).await?;
                tenant.uid = Some(uid);
                let inserted = tx
                    .execute(
                        "INSERT INTO tenants (id, name, quotas, created_at, updated_at, uid) VALUES ($1, $2, $3, $4, $5, $6)",
                        &[&tenant.id, &tenant.name, &quotas, &created, &updated, &(uid as i64)],
                    )
                    .await;
                match inserted {
                    Err(e) if pg::unique_violation(&e) => return Err(StoreError::NameTaken { kind: "tenant", name: tenant.name }),
                    other => other?,
                };
                tx.execute(KEY_INSERT, &[&key_id, &tenant.id, &hash, &prefix, &created]).await?;
                tx.commit().await?;
                Ok(tenant)
            }
        }
    }

    /// Gives `tenant` a uid from `uids` if it has none (the default tenant,
    /// made by a migration); returns its uid.
    pub async fn ensure_tenant_uid(&self, tenant: &str, uids: (u32, u32)) -> Result<u32, StoreError> {
        let tenant = tenant.to_string();
        match &self.db {
            Db::Sqlite(db) => {
                db.write(move |c| {
                    let uid: Option<Option<u32>> =
                        c.prepare_cached("SELECT uid FROM tenants WHERE id = ?1")?.query_row([&tenant], |r| r.get(0)).optional()?;
                    match uid {
                        None => Err(StoreError::NotFound { kind: "tenant", id: tenant }),
                        Some(Some(uid)) => Ok(uid),
                        Some(None) => {
                            let uid = next_uid(c, uids)?;
                            c.execute("UPDATE tenants SET uid = ?2 WHERE id = ?1", params![tenant, uid])?;
                            Ok(uid)
                        }
                    }
                })
                .await
            }
            Db::Postgres(pg) => {
                let mut c = pg.client().await?;
                let tx = c.transaction().await?;
                let uid: Option<Option<i64>> =
                    tx.query_opt("SELECT uid FROM tenants WHERE id = $1 FOR UPDATE", &[&tenant]).await?.map(|r| r.get(0));
                let uid = match uid {
                    None => return Err(StoreError::NotFound { kind: "tenant", id: tenant }),
                    Some(Some(uid)) => uid as u32,
                    Some(None) => {
                        let uid = pg_next_uid(&tx, uids).await?;
                        tx.execute("UPDATE tenants SET uid = $2 WHERE id = $1", &[&tenant, &(uid as i64)]).await?;
                        uid
                    }
                };
                tx.commit().await?;
                Ok(uid)
            }
        }
    }

    pub async fn update_tenant(&self, tenant: Tenant) -> Result<Tenant, StoreError> {
        let (id, name, quotas, at) = (tenant.id.clone(), tenant.name.clone(), serde_json::to_string(&tenant.quotas)?, ts(&tenant.updated_at));
        let updated = match &self.db {
            Db::Sqlite(db) => {
                db.write(move |c| {
                    match c.execute("UPDATE tenants SET name = ?2, quotas = ?3, updated_at = ?4 WHERE id = ?1", params![id, name, quotas, at]) {
                        Err(e) if name_taken(&e) => Ok(None),
                        other => Ok(Some(other?)),
                    }
                })
                .await?
            }
            Db::Postgres(pg) => {
                let c = pg.client().await?;
                match c.execute("UPDATE tenants SET name = $2, quotas = $3, updated_at = $4 WHERE id = $1", &[&id, &name, &quotas, &at]).await {
                    Err(e) if pg::unique_violation(&e) => None,
                    other => Some(other? as usize),
                }
            }
        };
        match updated {
            None => Err(StoreError::NameTaken { kind: "tenant", name: tenant.name }),
            Some(0) => Err(StoreError::NotFound { kind: "tenant", id: tenant.id }),
            Some(_) => Ok(tenant),
        }
    }

    pub async fn tenant(&self, id: &str) -> Result<Tenant, StoreError> {
        let id = id.to_string();
        let found = match &self.db {
            Db::Sqlite(db) => {
                let id = id.clone();
                db.read(move |c| Ok(c.prepare_cached(&format!("{TENANT_SELECT} WHERE id = ?1"))?.query_row([&id], tenant_row).optional()?))
                    .await?
            }
            Db::Postgres(pg) => {
                let row = pg.query_opt(&format!("{TENANT_SELECT} WHERE id = $1"), &[&id]).await?;
                row.as_ref().map(tenant_pg_row).transpose()?
            }
        };
        finish(found.ok_or(StoreError::NotFound { kind: "tenant", id })?)
    }

    /// At most `limit` tenants with ids above `after`, by id.
    pub async fn tenants_page(&self, after: Option<String>, limit: usize) -> Result<Vec<Tenant>, StoreError> {
        let rows = match &self.db {
            Db::Sqlite(db) => {
                db.read(move |c| {
                    let mut stmt = c.prepare_cached(&format!("{TENANT_SELECT} WHERE (?1 IS NULL OR id > ?1) ORDER BY id LIMIT ?2"))?;
                    Ok(stmt.query_map(params![after, limit as i64], tenant_row)?.collect::<Result<Vec<_>, _>>()?)
                })
                .await?
            }
            Db::Postgres(pg) => pg.query(&format!("{TENANT_SELECT} WHERE ($1::TEXT IS NULL OR id > $1) ORDER BY id LIMIT $2"), &[&after, &(limit as i64)])
                .await?
                .iter()
                .map(tenant_pg_row)
                .collect::<Result<Vec<_>, _>>()?,
        };
        rows.into_iter().map(finish).collect()
    }

    /// Deletes a tenant and everything it owns, in one transaction: its
    /// keys, agents, sessions with their runs, events and permission
    /// requests, provider keys, usage and the plugins it installed (other
    /// PostgreSQL hosts are told of those). Returns the ids of its sessions.
    pub async fn delete_tenant(&self, id: &str) -> Result<Vec<String>, StoreError> {
        let _changed = self.agents.changing();
        let id = id.to_string();
        let owned = ["tenant_keys", "agents", "provider_auth", "usage", "mcp_servers"];
        let auth_key = super::auth_changed_key(&id);
        match &self.db {
            Db::Sqlite(db) => {
                db.write(move |c| {
                    let sessions: Vec<String> = c
                        .prepare("SELECT id FROM sessions WHERE tenant_id = ?1")?
                        .query_map([&id], |r| r.get(0))?
                        .collect::<Result<_, _>>()?;
                    for session in &sessions {
                        super::delete_session_rows(c, session)?;
                    }
                    for table in owned.iter().chain(&["plugins"]) {
                        c.execute(&format!("DELETE FROM {table} WHERE tenant_id = ?1"), [&id])?;
                    }
                    c.execute("DELETE FROM meta WHERE key = ?1", [auth_key])?;
                    if c.execute("DELETE FROM tenants WHERE id = ?1", [&id])? == 0 {
                        return Err(StoreError::NotFound { kind: "tenant", id });
                    }
                    Ok(sessions)
                })
                .await
            }
            Db::Postgres(pg) => {
                let mut c = pg.client().await?;
                let tx = c.transaction().await?;
                let sessions: Vec<String> =
                    tx.query("SELECT id FROM sessions WHERE tenant_id = $1", &[&id]).await?.iter().map(|r| r.get(0)).collect();
                for session in &sessions {
                    super::pg_delete_session_rows(&tx, session).await?;
                }
                for table in owned {
                    tx.execute(&format!("DELETE FROM {table} WHERE tenant_id = $1"), &[&id]).await?;
                }
                if tx.execute("DELETE FROM plugins WHERE tenant_id = $1", &[&id]).await? > 0 {
                    super::plugins::pg_notify_changed(&tx).await?;
                }
                tx.execute("DELETE FROM meta WHERE key = $1", &[&auth_key]).await?;
                if tx.execute("DELETE FROM tenants WHERE id = $1", &[&id]).await? == 0 {
                    return Err(StoreError::NotFound { kind: "tenant", id });
                }
                tx.commit().await?;
                Ok(sessions)
            }
        }
    }

    pub async fn insert_tenant_key(&self, tenant: &str, key_id: String, hash: String, prefix: String) -> Result<TenantKey, StoreError> {
        let tenant = tenant.to_string();
        let created_at = super::now();
        let created = ts(&created_at);
        let key = TenantKey { id: key_id.clone(), prefix: prefix.clone(), created_at, last_used_at: None };
        let inserted = match &self.db {
            Db::Sqlite(db) => {
                let tenant = tenant.clone();
                db.write(move |c| {
                    if !c.prepare_cached("SELECT 1 FROM tenants WHERE id = ?1")?.exists([&tenant])? {
                        return Ok(false);
                    }
                    c.execute(&pg::sqlite(KEY_INSERT), params![key_id, tenant, hash, prefix, created])?;
                    Ok(true)
                })
                .await?
            }
            // One statement: the key is stored only while its tenant exists.
            Db::Postgres(pg) => {
                pg.execute(
                    "INSERT INTO tenant_keys (id, tenant_id, hash, prefix, created_at)
                     SELECT $1, id, $3, $4, $5 FROM tenants WHERE id = $2 FOR SHARE",
                    &[&key_id, &tenant, &hash, &prefix, &created],
                )
                .await?
                    > 0
            }
        };
        if !inserted {
            return Err(StoreError::NotFound { kind: "tenant", id: tenant });
        }
        Ok(key)
    }

    pub async fn delete_tenant_key(&self, tenant: &str, key_id: &str) -> Result<(), StoreError> {
        let (tenant, key_id) = (tenant.to_string(), key_id.to_string());
        let deleted = match &self.db {
            Db::Sqlite(db) => {
                let key_id = key_id.clone();
                db.write(move |c| Ok(c.execute("DELETE FROM tenant_keys WHERE id = ?1 AND tenant_id = ?2", [&key_id, &tenant])?)).await?
            }
            Db::Postgres(pg) => {
                pg.execute("DELETE FROM tenant_keys WHERE id = $1 AND tenant_id = $2", &[&key_id, &tenant]).await?
            }
        };
        if deleted == 0 {
            return Err(StoreError::NotFound { kind: "key", id: key_id });
        }
        Ok(())
    }

    pub async fn tenant_keys(&self, tenant: &str) -> Result<Vec<TenantKey>, StoreError> {
        let tenant = tenant.to_string();
        match &self.db {
            Db::Sqlite(db) => {
                db.read(move |c| {
                    let mut stmt =
                        c.prepare_cached("SELECT id, prefix, created_at, last_used_at FROM tenant_keys WHERE tenant_id = ?1 ORDER BY id")?;
                    let rows = stmt.query_map([&tenant], |r| {
                        Ok(TenantKey {
                            id: r.get(0)?,
                            prefix: r.get(1)?,
                            created_at: parse_ts(r.get(2)?)?,
                            last_used_at: r.get::<_, Option<String>>(3)?.map(parse_ts).transpose()?,
                        })
                    })?;
                    Ok(rows.collect::<Result<Vec<_>, _>>()?)
                })
                .await
            }
            Db::Postgres(pg) => pg.query("SELECT id, prefix, created_at, last_used_at FROM tenant_keys WHERE tenant_id = $1 ORDER BY id", &[&tenant])
                .await?
                .iter()
                .map(|r| Ok(TenantKey { id: r.get(0), prefix: r.get(1), created_at: pg::ts_at(r, 2)?, last_used_at: pg::ts_opt(r, 3)? }))
                .collect(),
        }
    }

    /// The tenant and key id a key hash belongs to.
    pub async fn key_owner(&self, hash: &str) -> Result<Option<(String, String)>, StoreError> {
        let hash = hash.to_string();
        match &self.db {
            Db::Sqlite(db) => {
                db.read(move |c| {
                    Ok(c.prepare_cached("SELECT tenant_id, id FROM tenant_keys WHERE hash = ?1")?
                        .query_row([&hash], |r| Ok((r.get(0)?, r.get(1)?)))
                        .optional()?)
                })
                .await
            }
            Db::Postgres(pg) => Ok(pg.query_opt("SELECT tenant_id, id FROM tenant_keys WHERE hash = $1", &[&hash])
                .await?
                .map(|r| (r.get(0), r.get(1)))),
        }
    }

    pub async fn touch_tenant_key(&self, key_id: &str, at: DateTime<Utc>) -> Result<(), StoreError> {
        let (key_id, at) = (key_id.to_string(), ts(&at));
        match &self.db {
            Db::Sqlite(db) => {
                db.write(move |c| {
                    c.execute("UPDATE tenant_keys SET last_used_at = ?2 WHERE id = ?1", params![key_id, at])?;
                    Ok(())
                })
                .await
            }
            Db::Postgres(pg) => {
                pg.execute("UPDATE tenant_keys SET last_used_at = $2 WHERE id = $1", &[&key_id, &at]).await?;
                Ok(())
            }
        }
    }

    /// Adds a model call's tokens to today's count of `tenant`; returns
    /// today's total (input + output) after it.
    pub async fn add_tokens(&self, tenant: &str, input: u64, output: u64) -> Result<u64, StoreError> {
        // One statement on either backend: concurrent calls add up exactly.
        const ADD: &str = "INSERT INTO usage (tenant_id, day, input_tokens, output_tokens) VALUES ($1, $2, $3, $4)
             ON CONFLICT(tenant_id, day) DO UPDATE SET input_tokens = usage.input_tokens + $3, output_tokens = usage.output_tokens + $4
             RETURNING input_tokens + output_tokens";
        let (tenant, today, input, output) = (tenant.to_string(), day(&super::now()), input as i64, output as i64);
        match &self.db {
            Db::Sqlite(db) => {
                db.write(move |c| Ok(c.prepare_cached(&pg::sqlite(ADD))?.query_row(params![tenant, today, input, output], |r| r.get(0))?))
                    .await
            }
            Db::Postgres(pg) => Ok(pg::count(&pg.query_one(ADD, &[&tenant, &today, &input, &output]).await?, 0)),
        }
    }

    /// Input + output tokens of `tenant` today (UTC).
    pub async fn tokens_today(&self, tenant: &str) -> Result<u64, StoreError> {
        let (tenant, today) = (tenant.to_string(), day(&super::now()));
        let tokens = match &self.db {
            Db::Sqlite(db) => db.read(move |c| Ok(tokens_on(c, &tenant, &today)?)).await?,
            Db::Postgres(pg) => pg_tokens_on(&pg.client().await?, &tenant, &today).await?,
        };
        Ok(tokens.input + tokens.output)
    }

    pub async fn usage(&self, tenant: &str) -> Result<UsageCounts, StoreError> {
        const RUNS_TODAY: &str = "SELECT runs FROM usage WHERE tenant_id = $1 AND day = $2";
        let tenant = tenant.to_string();
        let now = super::now();
        let today = day(&now);
        let month = format!("{}-%", now.format("%Y-%m"));
        match &self.db {
            Db::Sqlite(db) => {
                db.read(move |c| {
                    let runs_today: u64 =
                        c.prepare_cached(&pg::sqlite(RUNS_TODAY))?.query_row([&tenant, &today], |r| r.get(0)).optional()?.unwrap_or(0);
                    Ok(UsageCounts {
                        today: tokens_on(c, &tenant, &today)?,
                        month: tokens_on(c, &tenant, &month)?,
                        runs_today,
                        active_runs: active_runs(c, &tenant)?,
                        sessions: session_count(c, &tenant)?,
                    })
                })
                .await
            }
            Db::Postgres(pg) => {
                let mut c = pg.client().await?;
                // One snapshot for every count, as SQLite's read has.
                let tx = c.build_transaction().read_only(true).isolation_level(tokio_postgres::IsolationLevel::RepeatableRead).start().await?;
                let runs_today = tx.query_opt(RUNS_TODAY, &[&tenant, &today]).await?.map_or(0, |r| pg::count(&r, 0));
                let usage = UsageCounts {
                    today: pg_tokens_on(&tx, &tenant, &today).await?,
                    month: pg_tokens_on(&tx, &tenant, &month).await?,
                    runs_today,
                    active_runs: pg_active_runs(&tx, &tenant).await?,
                    sessions: pg_session_count(&tx, &tenant).await?,
                };
                tx.commit().await?;
                Ok(usage)
            }
        }
    }

    /// The tenant that owns a session (`None`: no such session).
    pub async fn session_owner(&self, id: &str) -> Result<Option<String>, StoreError> {
        let id = id.to_string();
        match &self.db {
            Db::Sqlite(db) => {
                db.read(move |c| {
                    Ok(c.prepare_cached("SELECT tenant_id FROM sessions WHERE id = ?1")?.query_row([&id], |r| r.get(0)).optional()?)
                })
                .await
            }
            Db::Postgres(pg) => {
                Ok(pg.query_opt("SELECT tenant_id FROM sessions WHERE id = $1", &[&id]).await?.map(|r| r.get(0)))
            }
        }
    }

    /// Ids of a tenant's sessions.
    pub async fn tenant_sessions(&self, tenant: &str) -> Result<Vec<String>, StoreError> {
        let tenant = tenant.to_string();
        match &self.db {
            Db::Sqlite(db) => {
                db.read(move |c| {
                    Ok(c.prepare_cached("SELECT id FROM sessions WHERE tenant_id = ?1 ORDER BY id")?
                        .query_map([&tenant], |r| r.get(0))?
                        .collect::<Result<Vec<_>, _>>()?)
                })
                .await
            }
            Db::Postgres(pg) => Ok(pg.query("SELECT id FROM sessions WHERE tenant_id = $1 ORDER BY id", &[&tenant])
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect()),
        }
    }
}
