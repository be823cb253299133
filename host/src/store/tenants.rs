//! Tenants, their API keys (stored only as SHA-256 hashes) and their usage
//! counters (tokens and runs per UTC day).

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{Store, StoreError, parse_ts, rfc3339, rfc3339_opt, ts};

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
pub(super) fn active_runs(c: &Connection, tenant: &str) -> rusqlite::Result<u64> {
    c.prepare_cached(
        "SELECT COUNT(*) FROM runs JOIN sessions ON sessions.id = runs.session_id
         WHERE sessions.tenant_id = ?1 AND runs.status IN ('queued', 'running', 'waiting')",
    )?
    .query_row([tenant], |r| r.get(0))
}

pub(super) fn session_count(c: &Connection, tenant: &str) -> rusqlite::Result<u64> {
    c.prepare_cached("SELECT COUNT(*) FROM sessions WHERE tenant_id = ?1")?.query_row([tenant], |r| r.get(0))
}

pub(super) fn count_run(c: &Connection, tenant: &str, at: &DateTime<Utc>) -> rusqlite::Result<()> {
    c.prepare_cached(
        "INSERT INTO usage (tenant_id, day, runs) VALUES (?1, ?2, 1)
         ON CONFLICT(tenant_id, day) DO UPDATE SET runs = runs + 1",
    )?
    .execute(params![tenant, day(at)])?;
    Ok(())
}

fn tokens_on(c: &Connection, tenant: &str, day_pattern: &str) -> rusqlite::Result<Tokens> {
    c.prepare_cached("SELECT COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0) FROM usage WHERE tenant_id = ?1 AND day LIKE ?2")?
        .query_row(params![tenant, day_pattern], |r| Ok(Tokens { input: r.get(0)?, output: r.get(1)? }))
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

fn finish((mut tenant, quotas): (Tenant, String)) -> Result<Tenant, StoreError> {
    tenant.quotas = serde_json::from_str(&quotas)?;
    Ok(tenant)
}

const TENANT_SELECT: &str = "SELECT id, name, quotas, created_at, updated_at, uid FROM tenants";

/// The next free uid of `range` (inclusive), in the write that uses it.
fn next_uid(c: &Connection, (first, last): (u32, u32)) -> Result<u32, StoreError> {
    let max: Option<u32> =
        c.prepare_cached("SELECT MAX(uid) FROM tenants WHERE uid BETWEEN ?1 AND ?2")?.query_row([first, last], |r| r.get(0))?;
    match max {
        None => Ok(first),
        Some(max) if max < last => Ok(max + 1),
        Some(_) => Err(StoreError::Quota { quota: "uid_range", limit: (last - first + 1) as u64, used: (last - first + 1) as u64 }),
    }
}

/// A unique constraint on `tenants.name` failed.
fn name_taken(err: &rusqlite::Error) -> bool {
    matches!(err, rusqlite::Error::SqliteFailure(e, _) if e.code == rusqlite::ErrorCode::ConstraintViolation)
}

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
        self.write(move |c| {
            tenant.uid = Some(next_uid(c, uids)?);
            let inserted = c.execute(
                "INSERT INTO tenants (id, name, quotas, created_at, updated_at, uid) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    tenant.id,
                    tenant.name,
                    serde_json::to_string(&tenant.quotas)?,
                    ts(&tenant.created_at),
                    ts(&tenant.updated_at),
                    tenant.uid
                ],
            );
            match inserted {
                Err(e) if name_taken(&e) => return Err(StoreError::NameTaken { kind: "tenant", name: tenant.name }),
                other => other?,
            };
            c.execute(
                "INSERT INTO tenant_keys (id, tenant_id, hash, prefix, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![key_id, tenant.id, hash, prefix, ts(&tenant.created_at)],
            )?;
            Ok(tenant)
        })
        .await
    }

    /// Gives `tenant` a uid from `uids` if it has none (the default tenant,
    /// made by a migration); returns its uid.
    pub async fn ensure_tenant_uid(&self, tenant: &str, uids: (u32, u32)) -> Result<u32, StoreError> {
        let tenant = tenant.to_string();
        self.write(move |c| {
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

    pub async fn update_tenant(&self, tenant: Tenant) -> Result<Tenant, StoreError> {
        self.write(move |c| {
            let updated = c.execute(
                "UPDATE tenants SET name = ?2, quotas = ?3, updated_at = ?4 WHERE id = ?1",
                params![tenant.id, tenant.name, serde_json::to_string(&tenant.quotas)?, ts(&tenant.updated_at)],
            );
            match updated {
                Err(e) if name_taken(&e) => Err(StoreError::NameTaken { kind: "tenant", name: tenant.name }),
                Ok(0) => Err(StoreError::NotFound { kind: "tenant", id: tenant.id }),
                other => {
                    other?;
                    Ok(tenant)
                }
            }
        })
        .await
    }

    pub async fn tenant(&self, id: &str) -> Result<Tenant, StoreError> {
        let id = id.to_string();
        self.read(move |c| {
            let row = c
                .prepare_cached(&format!("{TENANT_SELECT} WHERE id = ?1"))?
                .query_row([&id], tenant_row)
                .optional()?
                .ok_or(StoreError::NotFound { kind: "tenant", id })?;
            finish(row)
        })
        .await
    }

    /// At most `limit` tenants with ids above `after`, by id.
    pub async fn tenants_page(&self, after: Option<String>, limit: usize) -> Result<Vec<Tenant>, StoreError> {
        self.read(move |c| {
            let mut stmt = c.prepare_cached(&format!("{TENANT_SELECT} WHERE (?1 IS NULL OR id > ?1) ORDER BY id LIMIT ?2"))?;
            let rows = stmt.query_map(params![after, limit as i64], tenant_row)?.collect::<Result<Vec<_>, _>>()?;
            rows.into_iter().map(finish).collect()
        })
        .await
    }

    /// Deletes a tenant and everything it owns, in one transaction: its
    /// keys, agents, sessions with their runs, events and permission
    /// requests, provider keys and usage. Returns the ids of its sessions.
    pub async fn delete_tenant(&self, id: &str) -> Result<Vec<String>, StoreError> {
        let id = id.to_string();
        let result = self
            .write(move |c| {
                let sessions: Vec<String> = c
                    .prepare("SELECT id FROM sessions WHERE tenant_id = ?1")?
                    .query_map([&id], |r| r.get(0))?
                    .collect::<Result<_, _>>()?;
                for session in &sessions {
                    super::delete_session_rows(c, session)?;
                }
                for table in ["tenant_keys", "agents", "provider_auth", "usage", "mcp_servers"] {
                    c.execute(&format!("DELETE FROM {table} WHERE tenant_id = ?1"), [&id])?;
                }
                c.execute("DELETE FROM meta WHERE key = ?1", [super::auth_changed_key(&id)])?;
                if c.execute("DELETE FROM tenants WHERE id = ?1", [&id])? == 0 {
                    return Err(StoreError::NotFound { kind: "tenant", id });
                }
                Ok(sessions)
            })
            .await;
        self.agents.invalidate();
        result
    }

    pub async fn insert_tenant_key(&self, tenant: &str, key_id: String, hash: String, prefix: String) -> Result<TenantKey, StoreError> {
        let tenant = tenant.to_string();
        self.write(move |c| {
            if !c.prepare_cached("SELECT 1 FROM tenants WHERE id = ?1")?.exists([&tenant])? {
                return Err(StoreError::NotFound { kind: "tenant", id: tenant });
            }
            let created_at = super::now();
            c.execute(
                "INSERT INTO tenant_keys (id, tenant_id, hash, prefix, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![key_id, tenant, hash, prefix, ts(&created_at)],
            )?;
            Ok(TenantKey { id: key_id, prefix, created_at, last_used_at: None })
        })
        .await
    }

    pub async fn delete_tenant_key(&self, tenant: &str, key_id: &str) -> Result<(), StoreError> {
        let (tenant, key_id) = (tenant.to_string(), key_id.to_string());
        self.write(move |c| {
            if c.execute("DELETE FROM tenant_keys WHERE id = ?1 AND tenant_id = ?2", [&key_id, &tenant])? == 0 {
                return Err(StoreError::NotFound { kind: "key", id: key_id });
            }
            Ok(())
        })
        .await
    }

    pub async fn tenant_keys(&self, tenant: &str) -> Result<Vec<TenantKey>, StoreError> {
        let tenant = tenant.to_string();
        self.read(move |c| {
            let mut stmt = c.prepare_cached("SELECT id, prefix, created_at, last_used_at FROM tenant_keys WHERE tenant_id = ?1 ORDER BY id")?;
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

    /// The tenant and key id a key hash belongs to.
    pub async fn key_owner(&self, hash: &str) -> Result<Option<(String, String)>, StoreError> {
        let hash = hash.to_string();
        self.read(move |c| {
            Ok(c.prepare_cached("SELECT tenant_id, id FROM tenant_keys WHERE hash = ?1")?
                .query_row([&hash], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?)
        })
        .await
    }

    pub async fn touch_tenant_key(&self, key_id: &str, at: DateTime<Utc>) -> Result<(), StoreError> {
        let key_id = key_id.to_string();
        self.write(move |c| {
            c.execute("UPDATE tenant_keys SET last_used_at = ?2 WHERE id = ?1", params![key_id, ts(&at)])?;
            Ok(())
        })
        .await
    }

    /// Adds a model call's tokens to today's count of `tenant`; returns
    /// today's total (input + output) after it.
    pub async fn add_tokens(&self, tenant: &str, input: u64, output: u64) -> Result<u64, StoreError> {
        let tenant = tenant.to_string();
        self.write(move |c| {
            let today = day(&super::now());
            Ok(c.prepare_cached(
                "INSERT INTO usage (tenant_id, day, input_tokens, output_tokens) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(tenant_id, day) DO UPDATE SET input_tokens = input_tokens + ?3, output_tokens = output_tokens + ?4
                 RETURNING input_tokens + output_tokens",
            )?
            .query_row(params![tenant, today, input as i64, output as i64], |r| r.get(0))?)
        })
        .await
    }

    /// Input + output tokens of `tenant` today (UTC).
    pub async fn tokens_today(&self, tenant: &str) -> Result<u64, StoreError> {
        let tenant = tenant.to_string();
        self.read(move |c| {
            let t = tokens_on(c, &tenant, &day(&super::now()))?;
            Ok(t.input + t.output)
        })
        .await
    }

    pub async fn usage(&self, tenant: &str) -> Result<UsageCounts, StoreError> {
        let tenant = tenant.to_string();
        self.read(move |c| {
            let now = super::now();
            let today = day(&now);
            let month = format!("{}-%", now.format("%Y-%m"));
            let runs_today: u64 = c
                .prepare_cached("SELECT runs FROM usage WHERE tenant_id = ?1 AND day = ?2")?
                .query_row([&tenant, &today], |r| r.get(0))
                .optional()?
                .unwrap_or(0);
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

    /// The tenant that owns a session (`None`: no such session).
    pub async fn session_owner(&self, id: &str) -> Result<Option<String>, StoreError> {
        let id = id.to_string();
        self.read(move |c| Ok(c.prepare_cached("SELECT tenant_id FROM sessions WHERE id = ?1")?.query_row([&id], |r| r.get(0)).optional()?))
            .await
    }

    /// Ids of a tenant's sessions.
    pub async fn tenant_sessions(&self, tenant: &str) -> Result<Vec<String>, StoreError> {
        let tenant = tenant.to_string();
        self.read(move |c| {
            Ok(c.prepare_cached("SELECT id FROM sessions WHERE tenant_id = ?1 ORDER BY id")?
                .query_map([&tenant], |r| r.get(0))?
                .collect::<Result<Vec<_>, _>>()?)
        })
        .await
    }
}
