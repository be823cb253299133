//! Multi-tenant hosting: who is calling (resolved once per request by the
//! API's guard), tenant keys, and the quotas kept in memory (requests a
//! minute) or measured on disk (storage). The counters that must be exact
//! under concurrency (runs, sessions) are checked inside the store's
//! writes instead.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chacha20poly1305::aead::OsRng;
use chacha20poly1305::aead::rand_core::RngCore;
use sha2::{Digest, Sha256};

use crate::store::{DEFAULT_TENANT, Quotas, Store, StoreError};

/// Who a request acts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// The single user of a single-user server, or the admin token of a
    /// multi-tenant one: sees everything; what it makes belongs to the
    /// default tenant.
    Operator,
    /// A tenant key: sees and makes only the tenant's own.
    Tenant(String),
}

impl Caller {
    /// The tenant whose resources this caller creates.
    pub fn owner(&self) -> &str {
        match self {
            Caller::Operator => DEFAULT_TENANT,
            Caller::Tenant(id) => id,
        }
    }

    /// The tenant a list is narrowed to (`None`: everything).
    pub fn scope(&self) -> Option<String> {
        match self {
            Caller::Operator => None,
            Caller::Tenant(id) => Some(id.clone()),
        }
    }

    /// Whether a resource owned by `owner` exists for this caller.
    pub fn sees(&self, owner: &str) -> bool {
        match self {
            Caller::Operator => true,
            Caller::Tenant(id) => id == owner,
        }
    }
}

/// Handlers read the caller the guard resolved; a request the guard let
/// through without one (single-user mode) is the operator's.
impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Caller {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, _: &S) -> Result<Caller, Self::Rejection> {
        Ok(parts.extensions.get::<Caller>().cloned().unwrap_or(Caller::Operator))
    }
}

/// What tenant keys start with.
pub const KEY_PREFIX: &str = "hk_";

/// A new tenant key: `hk_` and 32 random bytes in hex; with the hash that
/// is stored and the prefix that is shown.
pub fn new_key() -> NewKey {
    let mut bytes = [0u8; 32];
    OsRng.fill_bytes(&mut bytes);
    let key = format!("{KEY_PREFIX}{}", hex::encode(bytes));
    NewKey { hash: hash_key(&key), prefix: key[..KEY_PREFIX.len() + 8].to_string(), key }
}

pub struct NewKey {
    pub key: String,
    pub hash: String,
    pub prefix: String,
}

/// SHA-256: a key is 256 random bits, so a fast hash is as safe to store
/// as a slow one and costs nothing per request.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// A key seen before.
#[derive(Clone)]
struct Known {
    tenant: String,
    key_id: String,
    /// When `last_used_at` was last written.
    touched: Instant,
}

/// How often a key's `last_used_at` is written.
const TOUCH_EVERY: Duration = Duration::from_secs(60);

/// A quota reached: the request is refused with 429.
#[derive(Debug, Clone, thiserror::Error)]
#[error("quota `{quota}` exceeded: {used} of {limit} used")]
pub struct QuotaExceeded {
    pub quota: &'static str,
    pub limit: u64,
    pub used: u64,
    /// Seconds until it may pass.
    pub retry_after: u64,
}

/// Seconds until the next UTC midnight (when `tokens_per_day` resets).
pub fn until_midnight() -> u64 {
    let now = chrono::Utc::now();
    let next = (now.date_naive() + chrono::Days::new(1)).and_hms_opt(0, 0, 0).expect("midnight exists").and_utc();
    (next - now).num_seconds().max(1) as u64
}

impl QuotaExceeded {
    /// A quota the store refused, with when to try again.
    pub fn from_store(quota: &'static str, limit: u64, used: u64) -> QuotaExceeded {
        let retry_after = match quota {
            "tokens_per_day" => until_midnight(),
            "max_sessions" => 60,
            _ => 5,
        };
        QuotaExceeded { quota, limit, used, retry_after }
    }
}

/// The multi-tenant side of the server (present only with `--admin-token`).
#[derive(Clone)]
pub struct Tenancy(Arc<Inner>);

struct Inner {
    admin_token: String,
    store: Store,
    root: PathBuf,
    defaults: Quotas,
    /// Key hash → whose it is. Revoking a key or deleting a tenant removes
    /// its entries before answering, so a revoked key is refused at once.
    keys: Mutex<HashMap<String, Known>>,
    /// Each tenant's quotas in force and uid, read once.
    quotas: Mutex<HashMap<String, (Quotas, u32)>>,
    /// `[process] uid_range`.
    uids: (u32, u32),
    /// Requests of each tenant in the current minute: (minute, count).
    minutes: Mutex<HashMap<String, (u64, u64)>>,
    /// Bytes under each tenant's directory, as last measured.
    storage: Mutex<HashMap<String, u64>>,
    /// Event streams each tenant has open.
    streams: Arc<Mutex<HashMap<String, u64>>>,
}

/// One open event stream of a tenant, counted until it is dropped (with
/// the response body that holds it).
pub struct StreamSlot {
    streams: Arc<Mutex<HashMap<String, u64>>>,
    tenant: String,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut streams = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = streams.get_mut(&self.tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                streams.remove(&self.tenant);
            }
        }
    }
}

/// Compares without an early exit, so timing does not reveal the token.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why a request carries no usable credential.
#[derive(Debug)]
pub enum Refused {
    Unauthorized,
    Store(StoreError),
}

impl Tenancy {
    pub fn new(admin_token: String, store: Store, root: PathBuf, defaults: Quotas, uids: (u32, u32)) -> Tenancy {
        Tenancy(Arc::new(Inner {
            uids,
            admin_token,
            store,
            root,
            defaults,
            keys: Default::default(),
            quotas: Default::default(),
            minutes: Default::default(),
            storage: Default::default(),
            streams: Default::default(),
        }))
    }

    /// Opens one more event stream for `tenant`, unless `max_streams` are open.
    pub fn open_stream(&self, tenant: &str, limit: Option<u64>) -> Result<StreamSlot, QuotaExceeded> {
        let mut streams = self.0.streams.lock().unwrap_or_else(|p| p.into_inner());
        let open = streams.entry(tenant.to_string()).or_insert(0);
        if let Some(limit) = limit
            && *open >= limit
        {
            return Err(QuotaExceeded { quota: "max_streams", limit, used: *open, retry_after: 5 });
        }
        *open += 1;
        Ok(StreamSlot { streams: self.0.streams.clone(), tenant: tenant.to_string() })
    }

    /// Event streams `tenant` has open now.
    pub fn streams(&self, tenant: &str) -> u64 {
        self.0.streams.lock().unwrap_or_else(|p| p.into_inner()).get(tenant).copied().unwrap_or(0)
    }

    /// The caller a bearer credential names: the admin token, or a key of
    /// an existing tenant.
    pub async fn resolve(&self, sent: &str) -> Result<Caller, Refused> {
        if constant_time_eq(sent.as_bytes(), self.0.admin_token.as_bytes()) {
            return Ok(Caller::Operator);
        }
        if !sent.starts_with(KEY_PREFIX) {
            return Err(Refused::Unauthorized);
        }
        let hash = hash_key(sent);
        let known = self.0.keys.lock().unwrap_or_else(|p| p.into_inner()).get(&hash).cloned();
        let known = match known {
            Some(known) => known,
            None => {
                let (tenant, key_id) = self.0.store.key_owner(&hash).await.map_err(Refused::Store)?.ok_or(Refused::Unauthorized)?;
                // Seen now, so the first request writes `last_used_at`.
                let known = Known { tenant, key_id, touched: Instant::now() - TOUCH_EVERY - Duration::from_secs(1) };
                self.0.keys.lock().unwrap_or_else(|p| p.into_inner()).insert(hash.clone(), known.clone());
                known
            }
        };
        if known.touched.elapsed() >= TOUCH_EVERY {
            if let Some(entry) = self.0.keys.lock().unwrap_or_else(|p| p.into_inner()).get_mut(&hash) {
                entry.touched = Instant::now();
            }
            let (store, key_id) = (self.0.store.clone(), known.key_id.clone());
            tokio::spawn(async move {
                if let Err(err) = store.touch_tenant_key(&key_id, crate::store::now()).await {
                    tracing::warn!(key = %key_id, %err, "cannot record when a tenant key was used");
                }
            });
        }
        Ok(Caller::Tenant(known.tenant))
    }

    /// Forgets a revoked key at once.
    pub fn forget_key(&self, key_id: &str) {
        self.0.keys.lock().unwrap_or_else(|p| p.into_inner()).retain(|_, k| k.key_id != key_id);
    }

    /// Forgets everything held about a tenant (deleted, or quotas changed).
    pub fn forget_tenant(&self, tenant: &str, deleted: bool) {
        if deleted {
            self.0.keys.lock().unwrap_or_else(|p| p.into_inner()).retain(|_, k| k.tenant != tenant);
            self.0.minutes.lock().unwrap_or_else(|p| p.into_inner()).remove(tenant);
            self.0.storage.lock().unwrap_or_else(|p| p.into_inner()).remove(tenant);
        }
        self.0.quotas.lock().unwrap_or_else(|p| p.into_inner()).remove(tenant);
    }

    pub fn defaults(&self) -> Quotas {
        self.0.defaults
    }

    /// The quotas in force for `tenant`: its overrides over the defaults.
    pub async fn quotas(&self, tenant: &str) -> Result<Quotas, StoreError> {
        Ok(self.info(tenant).await?.0)
    }

    /// The uid (and gid) `tenant`'s commands run as.
    pub async fn uid(&self, tenant: &str) -> Result<u32, StoreError> {
        Ok(self.info(tenant).await?.1)
    }

    pub fn uid_range(&self) -> (u32, u32) {
        self.0.uids
    }

    async fn info(&self, tenant: &str) -> Result<(Quotas, u32), StoreError> {
        if let Some(info) = self.0.quotas.lock().unwrap_or_else(|p| p.into_inner()).get(tenant) {
            return Ok(*info);
        }
        let record = self.0.store.tenant(tenant).await?;
        let uid = match record.uid {
            Some(uid) => uid,
            // The default tenant was made by a migration, without one.
            None => self.0.store.ensure_tenant_uid(tenant, self.0.uids).await?,
        };
        let info = (record.quotas.over(self.0.defaults), uid);
        self.0.quotas.lock().unwrap_or_else(|p| p.into_inner()).insert(tenant.to_string(), info);
        Ok(info)
    }

    /// Makes `dir` (and its missing parents) with mode 0700, owned by
    /// `tenant`'s uid when the server can give it away (it runs as root),
    /// so that the tenant's commands may write there and no other
    /// tenant's can look in.
    pub async fn make_dir(&self, tenant: &str, dir: &Path) -> Result<(), std::io::Error> {
        use std::os::unix::fs::DirBuilderExt;
        let uid = self.uid(tenant).await.map_err(std::io::Error::other)?;
        let top = self.dir(tenant);
        let dir = dir.to_path_buf();
        tokio::task::spawn_blocking(move || {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
            // SAFETY: plain syscall.
            if unsafe { libc::geteuid() } == 0 {
                // Only what this call made or owns: the tenant's directory
                // and the new one (never following a link).
                for path in [&top, &dir] {
                    std::os::unix::fs::lchown(path, Some(uid), Some(uid))?;
                }
            }
            Ok(())
        })
        .await
        .map_err(std::io::Error::other)?
    }

    /// Counts one request of `tenant` against `requests_per_minute`.
    pub fn count_request(&self, tenant: &str, limit: Option<u64>) -> Result<(), QuotaExceeded> {
        let Some(limit) = limit else { return Ok(()) };
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs();
        let minute = now / 60;
        let mut minutes = self.0.minutes.lock().unwrap_or_else(|p| p.into_inner());
        let window = minutes.entry(tenant.to_string()).or_insert((minute, 0));
        if window.0 != minute {
            *window = (minute, 0);
        }
        if window.1 >= limit {
            return Err(QuotaExceeded { quota: "requests_per_minute", limit, used: window.1, retry_after: 60 - now % 60 });
        }
        window.1 += 1;
        Ok(())
    }

    /// `<work-root>/<tenant>/`.
    pub fn dir(&self, tenant: &str) -> PathBuf {
        self.0.root.join(tenant)
    }

    /// Bytes under the tenant's directory, measured now.
    pub async fn measure_storage(&self, tenant: &str) -> u64 {
        let dir = self.dir(tenant);
        let bytes = tokio::task::spawn_blocking(move || dir_size(&dir)).await.unwrap_or(0);
        self.0.storage.lock().unwrap_or_else(|p| p.into_inner()).insert(tenant.to_string(), bytes);
        bytes
    }

    /// Bytes under the tenant's directory as last measured (measured now if never).
    pub async fn storage(&self, tenant: &str) -> u64 {
        let known = self.0.storage.lock().unwrap_or_else(|p| p.into_inner()).get(tenant).copied();
        match known {
            Some(bytes) => bytes,
            None => self.measure_storage(tenant).await,
        }
    }
}

/// Where tenants' own plugins are stored: `<installed>/tenants/`.
pub fn plugins_root(installed_dir: &Path) -> PathBuf {
    installed_dir.join("tenants")
}

/// The apparent size of every file under `dir`, not following symlinks
/// (a link to elsewhere is not the tenant's storage).
pub fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                pending.push(entry.path());
            } else if meta.is_file() {
                total += meta.len();
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_random_and_hashed() {
        let a = new_key();
        let b = new_key();
        assert_ne!(a.key, b.key);
        assert!(a.key.starts_with("hk_") && a.key.len() == 3 + 64, "{}", a.key);
        assert_eq!(a.hash, hash_key(&a.key));
        assert!(!a.hash.contains(&a.key[3..]));
        assert!(a.key.starts_with(&a.prefix) && a.prefix.len() == 11);
    }
}
