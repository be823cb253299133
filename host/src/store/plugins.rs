//! Plugins installed through the API, as rows of `plugins` (migration 10):
//! with PostgreSQL every host loads them from here, so a plugin installed
//! through one host is a plugin of all of them. Each host still compiles
//! a row once and keeps the result in its own compile cache.
//!
//! A SQLite server keeps its uploads as files beside the database (as it
//! always did); its arm here serves `hangar migrate` and the tests.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, params};
use sha2::{Digest, Sha256};

use super::{Db, Store, StoreError, parse_ts, pg, ts};

use super::hosts::CONTROL_CHANNEL;
/// The payload on [`CONTROL_CHANNEL`] when the `plugins` table changed: a
/// host then calls `api::plugins::sync_plugins`.
pub const PLUGINS_CHANGED: &str = "plugins";

/// One plugin installed through the API.
#[derive(Debug, Clone)]
pub struct StoredPlugin {
    /// The runtime's registry key: its name, or `TENANT/NAME`.
    pub key: String,
    /// The tenant that installed it; `None`: the server's (the admin's).
    pub tenant_id: Option<String>,
    /// `NAME.plugin.toml` as it was uploaded.
    pub manifest: String,
    /// The component.
    pub wasm: Arc<[u8]>,
    /// Of `wasm`, in hex: what tells a host that its loaded copy is current.
    pub sha256: String,
    /// When it was installed (or last upgraded).
    pub installed_at: DateTime<Utc>,
}

impl StoredPlugin {
    /// A plugin installed now, its digest computed here.
    pub fn new(key: String, tenant_id: Option<String>, manifest: String, wasm: Arc<[u8]>) -> StoredPlugin {
        let sha256 = hex::encode(Sha256::digest(&wasm));
        StoredPlugin { key, tenant_id, manifest, wasm, sha256, installed_at: super::now() }
    }
}

/// A stored plugin without its component: enough to tell whether the one
/// a host has loaded is current (its component is read only when it is not).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginHead {
    /// As [`StoredPlugin::key`].
    pub key: String,
    /// As [`StoredPlugin::tenant_id`].
    pub tenant_id: Option<String>,
    /// As [`StoredPlugin::manifest`].
    pub manifest: String,
    /// As [`StoredPlugin::sha256`].
    pub sha256: String,
}

const UPSERT: &str = "INSERT INTO plugins (key, tenant_id, manifest, wasm, sha256, installed_at) VALUES ($1, $2, $3, $4, $5, $6)
     ON CONFLICT(key) DO UPDATE SET tenant_id = $2, manifest = $3, wasm = $4, sha256 = $5, installed_at = $6";

/// Tells the other hosts that `plugins` changed, when `tx` commits (a
/// notification is delivered on commit only, so no host reads the table
/// before the change is in it).
pub(super) async fn pg_notify_changed(tx: &deadpool_postgres::Transaction<'_>) -> Result<(), StoreError> {
    tx.execute("SELECT pg_notify($1, $2)", &[&CONTROL_CHANNEL, &PLUGINS_CHANGED]).await?;
    Ok(())
}

/// Writes (or replaces) `plugin` in `tx`; whether it is a new row.
pub(super) async fn pg_put(tx: &deadpool_postgres::Transaction<'_>, plugin: &StoredPlugin) -> Result<bool, StoreError> {
    // `xmax` is 0 for a row this statement inserted, and set for one it updated.
    let row = tx
        .query_one(
            &format!("{UPSERT} RETURNING (xmax = 0)"),
            &[&plugin.key, &plugin.tenant_id, &plugin.manifest, &&*plugin.wasm, &plugin.sha256, &ts(&plugin.installed_at)],
        )
        .await?;
    Ok(row.get(0))
}

impl Store {
    /// Stores `plugin`, replacing a row of its key (an upgrade); other
    /// hosts are notified on commit.
    pub async fn put_plugin(&self, plugin: StoredPlugin) -> Result<(), StoreError> {
        match &self.db {
            Db::Sqlite(db) => {
                db.write(move |c| {
                    c.prepare_cached(&pg::sqlite(UPSERT))?.execute(params![
                        plugin.key,
                        plugin.tenant_id,
                        plugin.manifest,
                        &*plugin.wasm,
                        plugin.sha256,
                        ts(&plugin.installed_at)
                    ])?;
                    Ok(())
                })
                .await
            }
            Db::Postgres(pg) => {
                let mut c = pg.client().await?;
                let tx = c.transaction().await?;
                pg_put(&tx, &plugin).await?;
                pg_notify_changed(&tx).await?;
                tx.commit().await?;
                Ok(())
            }
        }
    }

    /// Removes the plugin stored under `key`; whether there was one. Other
    /// hosts are notified on commit.
    pub async fn delete_plugin(&self, key: &str) -> Result<bool, StoreError> {
        let key = key.to_string();
        match &self.db {
            Db::Sqlite(db) => db.write(move |c| Ok(c.execute("DELETE FROM plugins WHERE key = ?1", [&key])? > 0)).await,
            Db::Postgres(pg) => {
                let mut c = pg.client().await?;
                let tx = c.transaction().await?;
                let deleted = tx.execute("DELETE FROM plugins WHERE key = $1", &[&key]).await? > 0;
                if deleted {
                    pg_notify_changed(&tx).await?;
                }
                tx.commit().await?;
                Ok(deleted)
            }
        }
    }

    /// Every stored plugin without its component, by key.
    pub async fn plugin_heads(&self) -> Result<Vec<PluginHead>, StoreError> {
        const SELECT: &str = "SELECT key, tenant_id, manifest, sha256 FROM plugins ORDER BY key";
        match &self.db {
            Db::Sqlite(db) => {
                db.read(|c| {
                    let mut stmt = c.prepare_cached(SELECT)?;
                    let rows =
                        stmt.query_map([], |r| Ok(PluginHead { key: r.get(0)?, tenant_id: r.get(1)?, manifest: r.get(2)?, sha256: r.get(3)? }))?;
                    Ok(rows.collect::<Result<Vec<_>, _>>()?)
                })
                .await
            }
            Db::Postgres(pg) => Ok(pg
                .query(SELECT, &[])
                .await?
                .iter()
                .map(|r| PluginHead { key: r.get(0), tenant_id: r.get(1), manifest: r.get(2), sha256: r.get(3) })
                .collect()),
        }
    }

    /// The plugin stored under `key`, component and all.
    pub async fn plugin(&self, key: &str) -> Result<Option<StoredPlugin>, StoreError> {
        const SELECT: &str = "SELECT key, tenant_id, manifest, wasm, sha256, installed_at FROM plugins WHERE key = $1";
        let key = key.to_string();
        match &self.db {
            Db::Sqlite(db) => {
                db.read(move |c| {
                    Ok(c.prepare_cached(&pg::sqlite(SELECT))?
                        .query_row([&key], |r| {
                            Ok(StoredPlugin {
                                key: r.get(0)?,
                                tenant_id: r.get(1)?,
                                manifest: r.get(2)?,
                                wasm: Arc::from(r.get_ref(3)?.as_blob()?),
                                sha256: r.get(4)?,
                                installed_at: parse_ts(r.get(5)?)?,
                            })
                        })
                        .optional()?)
                })
                .await
            }
            Db::Postgres(pg) => pg
                .query_opt(SELECT, &[&key])
                .await?
                .map(|r| {
                    Ok(StoredPlugin {
                        key: r.get(0),
                        tenant_id: r.get(1),
                        manifest: r.get(2),
                        wasm: Arc::from(r.get::<_, &[u8]>(3)),
                        sha256: r.get(4),
                        installed_at: pg::ts_at(&r, 5)?,
                    })
                })
                .transpose(),
        }
    }
}
