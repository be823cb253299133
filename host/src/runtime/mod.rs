//! The sandboxed plugin runtime: one wasmtime `Engine`, compiled components
//! cached on disk, a registry of plugins with their capability grants, and
//! a fresh `Store` per call with a deadline, a memory cap and an output cap.

mod bindings;
pub mod compile;
mod engine;
mod error;
pub mod http;
mod log;
pub mod manifest;
mod open;
pub mod policy;
pub mod cgroup;
mod process;
mod state;
mod workdir;
mod writes;

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Duration;

use bytes::Bytes;
use wasmtime::component::{HasSelf, Linker, ResourceAny, types::ComponentItem};
use wasmtime::{Engine, Store};
use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

pub use bindings::provider_api::{
    Config as ProviderConfig, ErrorKind, Event, ProviderError, ProviderInfo, Request as CompletionRequest,
    ToolUseDelta, ToolUseStart,
};
pub use bindings::types::{ContentBlock, Message, ModelInfo, Role, StopReason, ToolOutput, ToolResult, ToolSpec, ToolUse, Usage};
pub use compile::CompileSettings;
pub use engine::PoolSize;
pub use error::RuntimeError;
pub use http::Secret;
pub use manifest::{Capabilities, FsAccess, Kind, Manifest};
pub use policy::{Grants, Limits, Policy};
pub use workdir::{WorkDir, WorkDirError, WorkDirRules};
pub use http::public_addrs;
pub(crate) use process::{Confined, Program, spawn_confined};
pub use writes::WriteLimit;

use bindings::{provider_api, provider_stream};
use bindings::sharded_tool::{ShardedTool, ShardedToolPre};
use bindings::tool::{Tool, ToolPre};
use bindings::types::ToolCall;
use engine::{CompileCache, EpochTicker};
use bindings::wit_http::HttpError;
use http::{HttpAccess, HttpBody};
use process::{PortGate, ProcessAccess};
use state::{MemoryBudget, MemoryLimiter, MemoryRefusal, PluginState};

/// Where a plugin came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    Builtin,
    Directory,
    Api,
}

impl Source {
    fn describe(self) -> &'static str {
        match self {
            Source::Builtin => "the binary",
            Source::Directory => "the plugins directory",
            Source::Api => "the API",
        }
    }
}

/// Where a plugin is in its loading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoadState {
    Compiling,
    Ready,
    Failed(String),
}

/// A built-in plugin, embedded in the binary by `build.rs`.
pub struct Builtin {
    pub name: &'static str,
    pub kind: &'static str,
    pub manifest: &'static str,
    pub wasm: &'static [u8],
    /// Its compiled code for the server's engine on the build machine's CPU
    /// (`build.rs`); `None` in a cross-compiled binary.
    pub precompiled: Option<&'static [u8]>,
}

/// Aligns an embedded artifact so that its code (page-aligned inside the
/// artifact) lies on page boundaries of the binary, where it can be made
/// executable in place (`engine::precompiled`). 64 KiB covers every page
/// size Linux uses.
#[repr(C, align(65536))]
pub struct PageAligned<T: ?Sized>(pub T);

/// The plugins compiled into this binary.
pub static BUILTINS: &[Builtin] = include!(concat!(env!("OUT_DIR"), "/builtin_plugins.rs"));

/// What a plugin is once compiled, linked and described.
enum Loaded {
    Tool { pre: ToolPre<PluginState>, spec: ToolSpec, shards: Option<Shards> },
    Provider {
        pre: wasmtime::component::InstancePre<PluginState>,
        api: provider_api::GuestIndices,
        /// Present when the provider exports `provider-stream`.
        stream: Option<provider_stream::GuestIndices>,
        info: ProviderInfo,
    },
}

/// How a tool that exports `shard-api` runs a call as parts.
struct Shards {
    pre: ShardedToolPre<PluginState>,
    /// What its `max-shards` said (2 or more).
    max: u32,
}

/// What a tool instance is made for: a whole call (`tool-api`), or a part
/// of a split one (`shard-api`). One `with_tool` runs both.
trait ToolWorld: Clone + Send + Sync + 'static {
    type Instance: Send + Sync;
    fn instantiate<'a>(
        &'a self,
        store: &'a mut Store<PluginState>,
    ) -> impl Future<Output = wasmtime::Result<Self::Instance>> + Send + 'a;
}

impl ToolWorld for ToolPre<PluginState> {
    type Instance = Tool;
    fn instantiate<'a>(&'a self, store: &'a mut Store<PluginState>) -> impl Future<Output = wasmtime::Result<Tool>> + Send + 'a {
        self.instantiate_async(store)
    }
}

impl ToolWorld for ShardedToolPre<PluginState> {
    type Instance = ShardedTool;
    fn instantiate<'a>(
        &'a self,
        store: &'a mut Store<PluginState>,
    ) -> impl Future<Output = wasmtime::Result<ShardedTool>> + Send + 'a {
        self.instantiate_async(store)
    }
}

/// A registered plugin. Compilation runs in the background; anything that
/// needs the compiled plugin waits for it through [`Plugin::loaded`].
pub struct Plugin {
    pub manifest: Manifest,
    pub source: Source,
    /// The tenant that installed it (only that tenant sees it); `None`:
    /// server-wide (built in, the plugins directory, the admin).
    pub owner: Option<String>,
    pub grants: Grants,
    /// Its component. A built-in's is the binary's own bytes, not a copy:
    /// with its precompiled code it is read only if that code is refused.
    wasm: Bytes,
    /// Its compiled code, built into the binary with it (a built-in's,
    /// registered by [`Runtime::add_builtins`]).
    precompiled: Option<&'static [u8]>,
    /// SHA-256 of `wasm` in hex, computed when first asked for.
    sha256: OnceLock<String>,
    loaded: tokio::sync::OnceCell<Result<Arc<Loaded>, RuntimeError>>,
    /// Its log rate, over all its calls at once.
    log_gate: Arc<log::LogGate>,
}

impl Plugin {
    pub fn id(&self) -> &str {
        &self.manifest.name
    }

    /// The size of its component, in bytes.
    pub fn size(&self) -> usize {
        self.wasm.len()
    }

    /// Its key in the registry: its name, or `TENANT/NAME` for a tenant's
    /// own (a plugin name has no `/`, so the two never meet).
    pub fn key(&self) -> String {
        registry_key(self.owner.as_deref(), &self.manifest.name)
    }

    /// The SHA-256 of its component, in hex (as the store keeps it).
    pub fn sha256(&self) -> &str {
        self.sha256.get_or_init(|| hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&*self.wasm)))
    }
}

/// The registry key of plugin `name` installed by `owner` (see [`Plugin::key`]).
pub fn registry_key(owner: Option<&str>, name: &str) -> String {
    match owner {
        None => name.to_string(),
        Some(tenant) => format!("{tenant}/{name}"),
    }
}

/// Who is installing a plugin: the server (with the operator's policy), or
/// a tenant (its grants capped by `[tenants.plugin_policy]`).
#[derive(Clone, Copy)]
pub enum Installer<'a> {
    Server,
    Tenant { id: &'a str, cap: &'a policy::PluginPolicy },
}

/// The runtime. Cheap to clone.
#[derive(Clone)]
pub struct Runtime {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Engine,
    cache: CompileCache,
    compile: CompileSettings,
    /// One permit per compile running: `compile.max_concurrent`.
    compiles: tokio::sync::Semaphore,
    policy: Policy,
    http_clients: Arc<http::Clients>,
    /// For tenants' requests: no internal address but `tenant_hosts`'.
    public_clients: Arc<http::Clients>,
    tenant_hosts: Arc<Vec<String>>,
    plugins: RwLock<BTreeMap<String, Arc<Plugin>>>,
    /// The server's own ports, which commands may not connect to; set once
    /// the server has bound them.
    ports: OnceLock<Arc<PortGate>>,
    tool_pool: ToolPool,
    /// The memory all instances may hold at once.
    memory_budget: Arc<MemoryBudget>,
    /// Most parts a split tool call runs as.
    tool_shards: u32,
    /// The instance pool's size.
    pool: PoolSize,
    _ticker: EpochTicker,
}

/// Threads of their own for the tool calls that outlast their first
/// poll: guest code that runs past an epoch tick, or waits for a child
/// process. Such calls may fill this pool, never the threads the store and
/// the server need. A call waiting for a thread counts against its
/// deadline.
struct ToolPool(Option<tokio::runtime::Runtime>);

impl ToolPool {
    fn new(threads: usize) -> std::io::Result<ToolPool> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .max_blocking_threads(threads)
            .thread_name("hangar-tool")
            .enable_all()
            .build()?;
        Ok(ToolPool(Some(runtime)))
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.0.as_ref().expect("the tool pool lives as long as the runtime").handle()
    }
}

impl Drop for ToolPool {
    fn drop(&mut self) {
        // Dropping a runtime waits for its threads, which async code may
        // not do; threads stuck in a system call would never let it end.
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// Where a tool call starts (see `Runtime::with_tool`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// On the caller's thread, until the guest first yields.
    Here,
    /// On a thread of the tool pool.
    OnPool,
}

/// Tool calls running on the pool at once, at most; more wait for a
/// thread.
const TOOL_THREADS: usize = 128;
/// How long past its deadline a call may take to report back before its
/// caller stops waiting (the call's thread is then stuck in a system call).
const DEADLINE_GRACE: Duration = Duration::from_secs(1);

/// How often a plugin's load tries again for an instance while the pool
/// is full.
const INSTANCE_RETRY: Duration = Duration::from_millis(20);

/// Settings of the runtime.
#[derive(Debug, Clone, Default)]
pub struct RuntimeConfig {
    /// Where compiled components are cached; `None` compiles every start.
    pub cache_dir: Option<PathBuf>,
    pub policy: Policy,
    pub pool: PoolSize,
    /// Hosts a tenant's requests may reach even at internal addresses
    /// (those `[tenants] allowed_origins` names exactly).
    pub tenant_hosts: Vec<String>,
    /// The memory (linear memories and tables) all plugin instances may
    /// hold at once; `None`: [`default_memory_total`].
    pub memory_total_bytes: Option<usize>,
    /// How components are compiled, and the compile cache's size.
    pub compile: CompileSettings,
    /// Most parts one call of a tool that exports `shard-api` runs as at
    /// once; `None`: the machine's cores.
    pub tool_shards: Option<usize>,
    /// Root certificates plugins' HTTPS trusts besides the built-in ones.
    pub extra_roots: Vec<reqwest::Certificate>,
}

/// The default server-wide memory budget of plugins: half the machine's
/// memory, leaving the rest to the server, its database and the commands
/// `bash` runs; 4 GiB where the machine's size is unknown.
pub fn default_memory_total() -> usize {
    // SAFETY: sysconf reads a system setting and has no preconditions.
    let (pages, page_size) = unsafe { (libc::sysconf(libc::_SC_PHYS_PAGES), libc::sysconf(libc::_SC_PAGESIZE)) };
    if pages <= 0 || page_size <= 0 {
        return 4 << 30;
    }
    ((pages as u128 * page_size as u128) / 2).min(usize::MAX as u128) as usize
}

/// One tool invocation.
#[derive(Debug, Clone)]
pub struct ToolInvocation {
    pub id: String,
    /// The arguments as JSON text.
    pub input: String,
    /// The session's working directory, opened for the run, if it has one.
    pub work_dir: Option<Arc<WorkDir>>,
}

/// Where a provider call goes and with what credential.
#[derive(Debug, Clone, Default)]
pub struct ProviderAccess {
    pub base_url: Option<String>,
    pub credential: Option<Secret>,
    /// A tenant's own settings: its requests reach no internal address
    /// the operator did not name (see [`http::is_internal`]).
    pub tenant: bool,
}

/// A plugin found in a directory: `NAME.plugin.toml` (parsed, and its text
/// as written, for whoever stores it again) and `NAME.wasm`.
pub struct Found {
    pub manifest: Manifest,
    pub text: String,
    pub wasm: Arc<[u8]>,
}

impl Runtime {
    pub fn new(config: RuntimeConfig) -> Result<Runtime, RuntimeError> {
        let engine = engine::build_engine(config.pool)
            .map_err(|e| RuntimeError::Unavailable { plugin: "*".into(), reason: format!("wasmtime engine: {e:#}") })?;
        let ticker = EpochTicker::start(engine.clone());
        let tenant_hosts = Arc::new(config.tenant_hosts.clone());
        let tool_pool = ToolPool::new(TOOL_THREADS)
            .map_err(|e| RuntimeError::Unavailable { plugin: "*".into(), reason: format!("tool threads: {e}") })?;
        Ok(Runtime {
            inner: Arc::new(Inner {
                engine,
                cache: CompileCache::new(config.cache_dir, config.compile.cache_bytes),
                compiles: tokio::sync::Semaphore::new(config.compile.max_concurrent.max(1)),
                compile: config.compile,
                policy: config.policy,
                http_clients: Arc::new(http::clients(config.extra_roots.clone())),
                public_clients: Arc::new(http::public_clients(tenant_hosts.clone(), config.extra_roots.clone())),
                tenant_hosts,
                plugins: RwLock::new(BTreeMap::new()),
                ports: OnceLock::new(),
                tool_pool,
                memory_budget: Arc::new(MemoryBudget::new(config.memory_total_bytes.unwrap_or_else(default_memory_total))),
                tool_shards: config
                    .tool_shards
                    .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
                    .clamp(1, u32::MAX as usize) as u32,
                pool: config.pool,
                _ticker: ticker,
            }),
        })
    }

    /// The server-wide memory budget of plugin instances: its size, and
    /// what the stores alive now hold of it.
    pub fn memory_budget(&self) -> (usize, usize) {
        (self.inner.memory_budget.total(), self.inner.memory_budget.used())
    }

    /// Keeps every command (`process`) off these ports, the server's own,
    /// so that no command can drive the API that confines it. The Landlock
    /// ruleset is built once, in the background; where the kernel has no
    /// TCP rules, commands get a network namespace of their own instead.
    /// What keeps commands off the server's ports, once they are known.
    pub(crate) fn port_gate(&self) -> Option<Arc<process::PortGate>> {
        self.inner.ports.get().cloned()
    }

    pub fn protect_ports(&self, ports: &[u16]) {
        let gate = Arc::new(PortGate::new(ports));
        if self.inner.ports.set(gate.clone()).is_err() {
            return;
        }
        let ports = ports.to_vec();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            match gate.rules().await {
                Ok(Some(_)) => tracing::info!(?ports, ms = started.elapsed().as_millis() as u64,
                    "commands cannot connect to the server's ports (Landlock TCP rules)"),
                Ok(None) => tracing::info!(?ports, "commands run without network, which keeps them off the server's ports"),
                Err(err) => tracing::error!(%err, "commands will refuse to run"),
            }
        });
    }

    /// Registers every built-in plugin.
    pub fn add_builtins(&self) -> Result<(), RuntimeError> {
        for builtin in BUILTINS {
            let manifest = Manifest::parse(builtin.manifest, Some(builtin.name))?;
            self.add_builtin(manifest, builtin.wasm, builtin.precompiled)?;
        }
        Ok(())
    }

    /// Registers a built-in plugin with its precompiled code, which is
    /// used instead of compiling when this machine and engine accept it.
    fn add_builtin(&self, manifest: Manifest, wasm: &'static [u8], precompiled: Option<&'static [u8]>) -> Result<Arc<Plugin>, RuntimeError> {
        let plugin = self.prepare(Installer::Server, manifest, Bytes::from_static(wasm), Source::Builtin, precompiled)?;
        Ok(self.start(plugin))
    }

    /// Reads every `NAME.plugin.toml` with its `NAME.wasm` in `dir`.
    pub fn scan_directory(dir: &Path) -> std::io::Result<Vec<Result<Found, RuntimeError>>> {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)?.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        entries.sort();
        let mut found = Vec::new();
        for path in entries {
            let Some(name) = path.file_name().and_then(|n| n.to_str()).and_then(|n| n.strip_suffix(".plugin.toml"))
            else {
                continue;
            };
            found.push((|| {
                let text = std::fs::read_to_string(&path)
                    .map_err(|e| RuntimeError::Manifest { plugin: name.into(), reason: e.to_string() })?;
                let manifest = Manifest::parse(&text, Some(name))?;
                if manifest.name != name {
                    return Err(RuntimeError::Manifest {
                        plugin: name.into(),
                        reason: format!("the file is named `{name}.plugin.toml` but the manifest names `{}`", manifest.name),
                    });
                }
                let wasm_path = path.with_file_name(format!("{name}.wasm"));
                let wasm = std::fs::read(&wasm_path).map_err(|e| RuntimeError::Load {
                    plugin: name.into(),
                    reason: format!("{}: {e}", wasm_path.display()),
                })?;
                Ok(Found { manifest, text, wasm: Arc::from(wasm) })
            })());
        }
        Ok(found)
    }

    /// Registers every plugin found in `dir` (compiling in the background).
    /// A plugin that cannot be registered is logged and skipped.
    pub fn add_directory(&self, dir: &Path, source: Source) -> std::io::Result<Vec<Result<String, RuntimeError>>> {
        self.add_directory_as(Installer::Server, dir, source)
    }

    /// [`Runtime::add_directory`] for `installer`.
    pub fn add_directory_as(&self, installer: Installer<'_>, dir: &Path, source: Source) -> std::io::Result<Vec<Result<String, RuntimeError>>> {
        let mut results = Vec::new();
        for found in Self::scan_directory(dir)? {
            let result = found.and_then(|found| self.add_as(installer, found.manifest, found.wasm, source).map(|p| p.id().to_string()));
            if let Err(err) = &result {
                tracing::error!(%err, "skipping a plugin in {}", dir.display());
            }
            results.push(result);
        }
        Ok(results)
    }

    /// Registers a plugin and starts compiling it in the background. The
    /// grants are decided here: a manifest that asks for more than the
    /// policy allows is refused.
    pub fn add(&self, manifest: Manifest, wasm: Arc<[u8]>, source: Source) -> Result<Arc<Plugin>, RuntimeError> {
        self.add_as(Installer::Server, manifest, wasm, source)
    }

    /// [`Runtime::add`] for `installer`.
    pub fn add_as(&self, installer: Installer<'_>, manifest: Manifest, wasm: Arc<[u8]>, source: Source) -> Result<Arc<Plugin>, RuntimeError> {
        let plugin = self.prepare(installer, manifest, Bytes::from_owner(wasm), source, None)?;
        Ok(self.start(plugin))
    }

    /// Registers `plugin` and starts loading it in the background.
    fn start(&self, plugin: Arc<Plugin>) -> Arc<Plugin> {
        self.inner.plugins.write().unwrap().insert(plugin.key(), plugin.clone());
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let runtime = self.clone();
            let background = plugin.clone();
            handle.spawn(async move {
                if let Err(err) = runtime.loaded(&background).await {
                    tracing::error!(%err, "plugin failed to load");
                }
            });
        }
        plugin
    }

    /// Compiles, links and describes a plugin, and registers it only if
    /// all of that works: an upgrade replaces the old version only with a
    /// working one, and agents can use the plugin as soon as this returns.
    pub async fn install(&self, manifest: Manifest, wasm: Arc<[u8]>, source: Source) -> Result<Arc<Plugin>, RuntimeError> {
        self.install_as(Installer::Server, manifest, wasm, source).await
    }

    /// [`Runtime::install`] for `installer`.
    pub async fn install_as(
        &self,
        installer: Installer<'_>,
        manifest: Manifest,
        wasm: Arc<[u8]>,
        source: Source,
    ) -> Result<Arc<Plugin>, RuntimeError> {
        let plugin = self.prepare(installer, manifest, Bytes::from_owner(wasm), source, None)?;
        self.loaded(&plugin).await?;
        self.check_clash(installer, &plugin.manifest, source)?;
        self.inner.plugins.write().unwrap().insert(plugin.key(), plugin.clone());
        Ok(plugin)
    }

    /// A plugin not yet registered: its name checked for clashes and its
    /// grants decided (a manifest asking for more than the policy allows is
    /// refused here).
    fn prepare(
        &self,
        installer: Installer<'_>,
        manifest: Manifest,
        wasm: Bytes,
        source: Source,
        precompiled: Option<&'static [u8]>,
    ) -> Result<Arc<Plugin>, RuntimeError> {
        self.check_clash(installer, &manifest, source)?;
        let (grants, owner) = match installer {
            Installer::Server => (self.inner.policy.grant(&manifest, source == Source::Builtin)?, None),
            Installer::Tenant { id, cap } => {
                if manifest.kind != Kind::Tool {
                    return Err(RuntimeError::CapabilityDenied {
                        plugin: manifest.name.clone(),
                        capability: "provider".into(),
                        reason: "a tenant may install tool plugins; providers are server-wide".into(),
                    });
                }
                (self.inner.policy.grant_capped(&manifest, cap)?, Some(id.to_string()))
            }
        };
        Ok(Arc::new(Plugin {
            manifest,
            source,
            owner,
            grants,
            wasm,
            precompiled,
            sha256: OnceLock::new(),
            loaded: tokio::sync::OnceCell::new(),
            log_gate: Default::default(),
        }))
    }

    /// Refuses a plugin whose name is taken by a *different* plugin: a
    /// built-in, one of another kind, or one from another source; and a
    /// tenant's plugin named as a server-wide one (those resolve first).
    /// The same plugin again (same name, kind and source) is an upgrade.
    ///
    /// An upgrade comes from the same installer, so no one takes over
    /// grants given to someone else's plugin: server-wide names (whose
    /// `[plugins.NAME]` grants the operator wrote) are installed by the
    /// admin alone, and an upload there under a directory plugin's name is
    /// refused here; a tenant's plugins are keyed `TENANT/NAME`, so another
    /// tenant's upload of the name is a plugin of its own, granted by the
    /// tenants' policy. Grants are decided again from each manifest
    /// ([`Runtime::prepare`]); nothing carries over from the version replaced.
    fn check_clash(&self, installer: Installer<'_>, manifest: &Manifest, source: Source) -> Result<(), RuntimeError> {
        if let Installer::Tenant { id, .. } = installer {
            if self.get(&manifest.name).is_some() {
                return Err(RuntimeError::Clash {
                    plugin: manifest.name.clone(),
                    reason: "a server-wide plugin has this name".into(),
                });
            }
            return match self.get(&registry_key(Some(id), &manifest.name)) {
                Some(existing) if existing.manifest.kind != manifest.kind => Err(RuntimeError::Clash {
                    plugin: manifest.name.clone(),
                    reason: format!("a {} has this name", existing.manifest.kind.as_str()),
                }),
                _ => Ok(()),
            };
        }
        let Some(existing) = self.get(&manifest.name) else { return Ok(()) };
        let reason = if existing.source == Source::Builtin && source != Source::Builtin {
            "a built-in plugin has this name".to_string()
        } else if existing.manifest.kind != manifest.kind {
            format!("a {} has this name", existing.manifest.kind.as_str())
        } else if existing.source != source {
            format!("a plugin installed from {} has this name", existing.source.describe())
        } else {
            return Ok(());
        };
        Err(RuntimeError::Clash { plugin: manifest.name.clone(), reason })
    }

    /// Unregisters a plugin; calls already running finish on their instance.
    pub fn remove(&self, id: &str) -> Option<Arc<Plugin>> {
        self.inner.plugins.write().unwrap().remove(id)
    }

    /// Whether the plugin's compiled form is ready (or failed), as opposed
    /// to still compiling.
    pub fn load_state(&self, plugin: &Plugin) -> LoadState {
        match plugin.loaded.get() {
            None => LoadState::Compiling,
            Some(Ok(_)) => LoadState::Ready,
            Some(Err(err)) => LoadState::Failed(err.to_string()),
        }
    }

    /// Waits until every plugin registered now has loaded or failed to.
    /// Loading describes each plugin in an instance of its own, so until
    /// then the memory budget counts instances no call made.
    pub async fn loads_settled(&self) {
        for plugin in self.all_plugins() {
            let _ = self.loaded(&plugin).await;
        }
    }

    /// The same bytes as `wasm`?
    pub fn same_component(plugin: &Plugin, wasm: &[u8]) -> bool {
        *plugin.wasm == *wasm
    }

    /// The plugin with this registry key ([`Plugin::key`]).
    pub fn get(&self, id: &str) -> Option<Arc<Plugin>> {
        self.inner.plugins.read().unwrap().get(id).cloned()
    }

    /// The plugin `name` as `tenant` sees it: a server-wide one first (built
    /// in, the plugins directory, the admin's), then the tenant's own.
    pub fn resolve(&self, tenant: &str, name: &str) -> Option<Arc<Plugin>> {
        let plugins = self.inner.plugins.read().unwrap();
        plugins.get(name).or_else(|| plugins.get(&registry_key(Some(tenant), name))).cloned()
    }

    /// The server-wide plugins, ordered by id.
    pub fn plugins(&self) -> Vec<Arc<Plugin>> {
        self.inner.plugins.read().unwrap().values().filter(|p| p.owner.is_none()).cloned().collect()
    }

    /// Every plugin, server-wide and tenants' own, by registry key.
    pub fn all_plugins(&self) -> Vec<Arc<Plugin>> {
        self.inner.plugins.read().unwrap().values().cloned().collect()
    }

    /// What `tenant` sees: the server-wide plugins and its own, by name.
    pub fn plugins_for(&self, tenant: &str) -> Vec<Arc<Plugin>> {
        let mut list: Vec<Arc<Plugin>> = self
            .inner
            .plugins
            .read()
            .unwrap()
            .values()
            .filter(|p| p.owner.as_deref().is_none_or(|o| o == tenant))
            .cloned()
            .collect();
        list.sort_by(|a, b| a.id().cmp(b.id()));
        list
    }

    /// Unregisters every plugin of `tenant` (it is being deleted).
    pub fn remove_tenant(&self, tenant: &str) {
        self.inner.plugins.write().unwrap().retain(|_, p| p.owner.as_deref() != Some(tenant));
    }

    /// The compiled, linked, described plugin; compiles it on first use.
    async fn loaded(&self, plugin: &Arc<Plugin>) -> Result<Arc<Loaded>, RuntimeError> {
        plugin.loaded.get_or_init(|| self.load(plugin.clone())).await.clone()
    }

    async fn load(&self, plugin: Arc<Plugin>) -> Result<Arc<Loaded>, RuntimeError> {
        let id = plugin.id().to_string();
        let started = std::time::Instant::now();
        let (component, artifact) = self.compiled(&plugin).await?;

        let types_only = self.check_imports(&plugin, &component)?;
        let mut linker = self.linker(&plugin.grants)
            .map_err(|e| RuntimeError::Load { plugin: id.clone(), reason: format!("{e:#}") })?;
        for name in &types_only {
            linker.instance(name).map_err(|e| RuntimeError::Load { plugin: id.clone(), reason: format!("{e:#}") })?;
        }
        let pre = linker
            .instantiate_pre(&component)
            .map_err(|e| RuntimeError::Load { plugin: id.clone(), reason: format!("{e:#}") })?;
        // Describing the plugin takes an instance like any call; while
        // calls hold every slot of the pool it waits for one, since a
        // failed load would leave the plugin failed until the next start.
        let waited = std::time::Instant::now();
        let loaded = loop {
            match self.describe(&plugin, pre.clone()).await {
                Err(RuntimeError::Instances { .. }) if waited.elapsed() < plugin.grants.limits.deadline => {
                    tokio::time::sleep(INSTANCE_RETRY).await;
                }
                other => break other?,
            }
        };
        // Cached only now: a component that compiles but does not load
        // (a refused upload) leaves nothing on disk.
        if let Some(artifact) = artifact {
            let runtime = self.clone();
            let wasm = plugin.wasm.clone();
            let _ = tokio::task::spawn_blocking(move || runtime.inner.cache.store(&runtime.inner.engine, &wasm, &artifact)).await;
        }
        tracing::info!(plugin = %id, ms = started.elapsed().as_millis() as u64, "plugin loaded");
        Ok(Arc::new(loaded))
    }

    /// Instantiates the plugin once to learn what it is: a tool's spec
    /// (and whether it splits calls), a provider's info.
    async fn describe(&self, plugin: &Arc<Plugin>, pre: wasmtime::component::InstancePre<PluginState>) -> Result<Loaded, RuntimeError> {
        let id = plugin.id().to_string();
        let wrong_world = |e: wasmtime::Error| RuntimeError::Load {
            plugin: id.clone(),
            reason: format!("does not implement the `{}` world: {e:#}", plugin.manifest.kind.as_str()),
        };
        Ok(match plugin.manifest.kind {
            Kind::Tool => {
                // `shard-api` is optional: a component without it is a plain
                // tool (every Python tool, every plugin built before it).
                let sharded = ShardedToolPre::new(pre.clone()).ok();
                let pre = ToolPre::new(pre).map_err(wrong_world)?;
                let (spec, shards) = match sharded {
                    None => {
                        let spec = self
                            .with_tool(Start::Here, plugin.clone(), pre.clone(), None, None, |tool, store| {
                                Box::pin(async move { tool.hangar_plugin_tool_api().call_spec(store).await })
                            })
                            .await?;
                        (spec, None)
                    }
                    Some(sharded) => {
                        let (spec, max) = self
                            .with_tool(Start::Here, plugin.clone(), sharded.clone(), None, None, |tool, store| {
                                Box::pin(async move {
                                    let spec = tool.hangar_plugin_tool_api().call_spec(&mut *store).await?;
                                    Ok((spec, tool.hangar_plugin_shard_api().call_max_shards(&mut *store).await?))
                                })
                            })
                            .await?;
                        (spec, (max >= 2).then_some(Shards { pre: sharded, max }))
                    }
                };
                if spec.name != id {
                    return Err(RuntimeError::Load {
                        plugin: id.clone(),
                        reason: format!("spec() names the tool `{}`, the manifest `{id}`", spec.name),
                    });
                }
                // Served as is by GET /tools and sent to models: a JSON object.
                if let Err(reason) = serde_json::from_str::<serde_json::Value>(&spec.input_schema)
                    .map_err(|e| format!("is not JSON: {e}"))
                    .and_then(|v| if v.is_object() { Ok(()) } else { Err("is not a JSON object".to_string()) })
                {
                    return Err(RuntimeError::Load { plugin: id.clone(), reason: format!("spec()'s input_schema {reason}") });
                }
                Loaded::Tool { pre, spec, shards }
            }
            Kind::Provider => {
                let api = provider_api::GuestIndices::new(&pre).map_err(wrong_world)?;
                // `provider-stream` is optional: a component without it
                // answers through `complete` (every Python and JavaScript
                // provider, every plugin built before it).
                let stream = provider_stream::GuestIndices::new(&pre).ok();
                let mut store = self.store(&plugin, None, None, false)?;
                // Start functions and `info()` are guest code like any call:
                // one that never returns must not leave the plugin loading
                // (and everything that waits for it waiting) for good.
                let deadline = plugin.grants.limits.deadline;
                let described = tokio::time::timeout(deadline, async {
                    // Loading checks the exports' types, so a mismatch is
                    // found now rather than at a model call.
                    let instance = pre.instantiate_async(&mut store).await.map_err(Ok)?;
                    let api = api.load(&mut store, &instance).map_err(|e| Err(wrong_world(e)))?;
                    if let Some(stream) = &stream {
                        stream.load(&mut store, &instance).map_err(|e| Err(wrong_world(e)))?;
                    }
                    api.call_info(&mut store).await.map_err(Ok)
                })
                .await;
                let info = match described {
                    Err(_) => return Err(RuntimeError::Deadline { plugin: id.clone(), limit: deadline }),
                    Ok(Err(Err(wrong))) => return Err(wrong),
                    Ok(Err(Ok(err))) => return Err(self.call_error(&plugin, &store, err)),
                    Ok(Ok(info)) => info,
                };
                if info.id != id {
                    return Err(RuntimeError::Load {
                        plugin: id.clone(),
                        reason: format!("info() names the provider `{}`, the manifest `{id}`", info.id),
                    });
                }
                Loaded::Provider { pre, api, stream, info }
            }
        })
    }

    /// The plugin's compiled component, from the cache or compiled now,
    /// with its serialized form when the cache should keep it once the
    /// plugin has loaded.
    async fn compiled(&self, plugin: &Plugin) -> Result<(wasmtime::component::Component, Option<Vec<u8>>), RuntimeError> {
        let id = plugin.id().to_string();
        let joined = |e: tokio::task::JoinError| RuntimeError::Load { plugin: id.clone(), reason: e.to_string() };
        let invalid = |e: wasmtime::Error| RuntimeError::Load { plugin: id.clone(), reason: format!("not a valid component: {e:#}") };
        if let Some(artifact) = plugin.precompiled {
            let runtime = self.clone();
            let id = id.clone();
            let precompiled = tokio::task::spawn_blocking(move || engine::precompiled(&runtime.inner.engine, &id, artifact))
                .await
                .map_err(joined)?;
            // Not written to the compile cache: the binary holds it.
            if let Some(component) = precompiled {
                crate::telemetry::precompiled_code();
                return Ok((component, None));
            }
        }
        let (runtime, wasm) = (self.clone(), plugin.wasm.clone());
        let hit = tokio::task::spawn_blocking(move || runtime.inner.cache.lookup(&runtime.inner.engine, &wasm)).await.map_err(joined)?;
        if let Some(component) = hit {
            return Ok((component, None));
        }
        // Waiting for a turn is not compiling: the time limit starts below.
        let _permit = self.inner.compiles.acquire().await.map_err(|e| RuntimeError::Unavailable { plugin: id.clone(), reason: e.to_string() })?;
        let keep = self.inner.cache.enabled();
        let (runtime, wasm) = (self.clone(), plugin.wasm.clone());
        match (&self.inner.compile.worker, plugin.source) {
            // Built-in plugins are part of the binary, as trusted as the
            // server's own code: compiled here, without the worker's cost.
            (None, _) | (Some(_), Source::Builtin) => tokio::task::spawn_blocking(move || {
                let component = wasmtime::component::Component::new(&runtime.inner.engine, &wasm)?;
                let artifact = if keep { Some(component.serialize()?) } else { None };
                Ok((component, artifact))
            })
            .await
            .map_err(joined)?
            .map_err(invalid),
            (Some(program), _) => {
                let settings = &self.inner.compile;
                let artifact = compile::in_worker(program, settings, &plugin.wasm).await.map_err(|failure| match failure {
                    compile::Failure::Timeout(limit) => RuntimeError::CompileLimit {
                        plugin: id.clone(),
                        reason: format!("took longer than {} s (limits.compile_timeout_s)", limit.as_secs()),
                    },
                    compile::Failure::Memory(bytes) => RuntimeError::CompileLimit {
                        plugin: id.clone(),
                        reason: format!("needed more than {} MB of memory (limits.compile_memory_mb)", bytes >> 20),
                    },
                    compile::Failure::Invalid(reason) => RuntimeError::Load { plugin: id.clone(), reason: format!("not a valid component: {reason}") },
                    compile::Failure::Crashed(reason) => {
                        RuntimeError::Load { plugin: id.clone(), reason: format!("the compiler crashed on it ({reason})") }
                    }
                    compile::Failure::Worker(reason) => RuntimeError::Unavailable { plugin: id.clone(), reason },
                })?;
                tokio::task::spawn_blocking(move || {
                    // SAFETY: `deserialize` checks the artifact's header
                    // against this engine, then maps its machine code as
                    // executable. The bytes are what `Component::new` would
                    // have produced here: the worker is this same build of
                    // hangar (`CompileSettings::worker`, `/proc/self/exe` in
                    // the server) compiling `wasm` with the same code
                    // settings (`engine::code_config`), and they come over a
                    // pipe only the worker holds. Compiling elsewhere moves
                    // where Cranelift runs, not whom its output is trusted by:
                    // in both cases it is Cranelift's code for the component.
                    let component = unsafe { wasmtime::component::Component::deserialize(&runtime.inner.engine, &artifact) }?;
                    Ok((component, keep.then_some(artifact)))
                })
                .await
                .map_err(joined)?
                .map_err(|e: wasmtime::Error| RuntimeError::Load {
                    plugin: id.clone(),
                    reason: format!("the compile worker's output does not load: {e:#}"),
                })
            }
        }
    }

    /// Refuses, by name, a host interface the component imports but was
    /// not granted, before linking would fail with a less helpful message.
    ///
    /// An interface imported for its types alone is no capability: every
    /// SDK provider exports `provider-stream`, whose request and error are
    /// `http`'s types, whether or not it sends anything itself. Those are
    /// returned, to be linked as empty instances: no function of them.
    fn check_imports(&self, plugin: &Plugin, component: &wasmtime::component::Component) -> Result<Vec<String>, RuntimeError> {
        let engine = &self.inner.engine;
        let ty = component.component_type();
        let mut types_only = Vec::new();
        for (name, item) in ty.imports(engine) {
            let ComponentItem::ComponentInstance(instance) = &item.ty else { continue };
            let Some(interface) = name.strip_prefix("hangar:plugin/") else { continue };
            let interface = interface.split('@').next().unwrap_or(interface);
            let (granted, asked) = match interface {
                "http" => (!plugin.grants.http.is_empty(), !plugin.manifest.capabilities.http.is_empty()),
                "process" => (plugin.grants.process, plugin.manifest.capabilities.process),
                "log" | "types" => (true, true),
                _ => (false, false),
            };
            if !granted && instance.exports(engine).all(|(_, export)| matches!(export.ty, ComponentItem::Type(_))) {
                types_only.push(name.to_string());
                continue;
            }
            if !granted {
                let withheld = (interface == "process").then(|| self.inner.policy.process_withheld(policy::confinement()));
                let reason = if let (true, Some(Some(reason))) = (asked, withheld) {
                    reason
                } else if asked {
                    "the operator policy does not grant it".to_string()
                } else {
                    format!("the component imports `{name}` but its manifest does not ask for it")
                };
                return Err(RuntimeError::CapabilityDenied { plugin: plugin.id().into(), capability: interface.into(), reason });
            }
        }
        Ok(types_only)
    }

    /// A linker with WASI, `log`, and exactly the granted capabilities.
    fn linker(&self, grants: &Grants) -> wasmtime::Result<Linker<PluginState>> {
        let mut linker = Linker::new(&self.inner.engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        // wasmtime-wasi's `wasi:filesystem/types`, replaced by the same
        // functions behind the call's write quota and with an `open-at` that
        // cannot block; for every plugin, so no grant ever brings back the
        // open that can.
        linker.allow_shadowing(true);
        wasmtime_wasi::p2::bindings::filesystem::types::add_to_linker::<_, writes::CountedFsData>(&mut linker, writes::counted_fs)?;
        linker.allow_shadowing(false);
        bindings::wit_log::add_to_linker::<_, HasSelf<PluginState>>(&mut linker, |s| s)?;
        bindings::types::add_to_linker::<_, HasSelf<PluginState>>(&mut linker, |s| s)?;
        if !grants.http.is_empty() {
            bindings::wit_http::add_to_linker::<_, HasSelf<PluginState>>(&mut linker, |s| s)?;
        }
        if grants.process {
            bindings::wit_process::add_to_linker::<_, HasSelf<PluginState>>(&mut linker, |s| s)?;
        }
        Ok(linker)
    }

    /// A fresh store for one call: WASI with at most the working directory
    /// preopened, the memory cap, the deadline, and the granted capabilities.
    fn store(
        &self,
        plugin: &Plugin,
        work_dir: Option<&Arc<WorkDir>>,
        provider: Option<&ProviderAccess>,
        blocking_fs: bool,
    ) -> Result<Store<PluginState>, RuntimeError> {
        let grants = &plugin.grants;
        let mut wasi = WasiCtxBuilder::new();
        // A tool's filesystem calls run as plain system calls on whatever
        // thread runs the call: none can block without bound (opens never
        // wait, see `open`), so a `spawn_blocking` hop each is not needed.
        wasi.allow_blocking_current_thread(blocking_fs);
        if let Some(dir) = work_dir {
            let perms = match grants.filesystem {
                FsAccess::None => None,
                FsAccess::Read => Some(FsPerms::ReadOnly),
                FsAccess::ReadWrite => Some(FsPerms::ReadWrite),
            };
            if let Some(perms) = perms {
                let shown = dir.path().display();
                let guest = dir.path().to_str().ok_or_else(|| RuntimeError::Unavailable {
                    plugin: plugin.id().into(),
                    reason: format!("working directory {shown} is not UTF-8"),
                })?;
                // Opened through the run's descriptor (`/proc/self/fd/N`):
                // the directory that was checked, whatever its path leads
                // to now.
                wasi.preopened_dir(dir.fd_path(), guest, perms).map_err(|e| RuntimeError::Unavailable {
                    plugin: plugin.id().into(),
                    reason: format!("cannot open working directory {shown}: {e}"),
                })?;
            }
        }
        let http = (!grants.http.is_empty()).then(|| {
            let mut allowed = grants.http.clone();
            let base = provider.and_then(|p| p.base_url.as_deref());
            let base_origin = base.and_then(|b| policy::Origin::parse(b).ok());
            if let Some(origin) = &base_origin {
                allowed.push(policy::OriginPattern::exact(origin.clone()));
            }
            let section = &plugin.manifest.provider;
            // The key's one origin: the stored (or environment) base URL's,
            // else the vendor's as the manifest names it.
            let vendor = section.key_origin.as_deref().and_then(|o| policy::Origin::parse(o).ok()).or_else(|| {
                match plugin.manifest.capabilities.http.as_slice() {
                    [only] => policy::Origin::parse(only).ok(),
                    _ => None,
                }
            });
            let tenant = provider.is_some_and(|p| p.tenant);
            HttpAccess {
                clients: if tenant { self.inner.public_clients.clone() } else { self.inner.http_clients.clone() },
                internal_hosts: tenant.then(|| self.inner.tenant_hosts.clone()),
                allowed,
                credential: provider.and_then(|p| p.credential.clone()),
                credential_origin: base_origin.or(vendor),
                credential_header: section.key_header.as_deref().unwrap_or("authorization").to_ascii_lowercase(),
            }
        });
        let process = grants
            .process
            .then(|| ProcessAccess {
                work_dir: work_dir.cloned(),
                ports: self.inner.ports.get().cloned(),
                limits: grants.commands.clone(),
            });
        let state = PluginState {
            plugin: Arc::from(plugin.id()),
            wasi: wasi.build(),
            table: Default::default(),
            limiter: MemoryLimiter::new(grants.limits.memory_bytes, self.inner.memory_budget.clone()),
            http,
            process,
            log_gate: plugin.log_gate.clone(),
            writes: writes::WriteQuota::new(grants.limits.write_bytes, grants.limits.max_files),
            blocking_fs,
        };
        let mut store = Store::new(&self.inner.engine, state);
        store.limiter(|s| &mut s.limiter);
        // Guest code yields to the executor at every epoch tick, so a plugin
        // that spins never holds a server thread; its deadline is the
        // timeout around each call, which drops (and so stops) it.
        store.epoch_deadline_async_yield_and_update(1);
        store.set_epoch_deadline(1);
        Ok(store)
    }

    /// Turns a wasmtime error into one that names the plugin and the limit
    /// it hit, if any.
    fn call_error(&self, plugin: &Plugin, store: &Store<PluginState>, err: wasmtime::Error) -> RuntimeError {
        let id = plugin.id().to_string();
        match store.data().limiter.hit {
            Some(MemoryRefusal::Plugin) => {
                return RuntimeError::Memory { plugin: id, limit_bytes: plugin.grants.limits.memory_bytes };
            }
            Some(MemoryRefusal::Server) => {
                return RuntimeError::ServerMemory { plugin: id, budget_bytes: self.inner.memory_budget.total() };
            }
            None => {}
        }
        if err.is::<wasmtime::PoolConcurrencyLimitError>() {
            return RuntimeError::Instances { plugin: id, limit: self.inner.pool.instances };
        }
        // A guest that fails on a refused write fails because of the limit.
        if let Some(limit) = store.data().writes.hit() {
            return RuntimeError::Writes { plugin: id, limit };
        }
        RuntimeError::Trap { plugin: id, reason: format!("{err:#}") }
    }

    /// Instantiates a tool in a fresh store and runs `f` under the deadline.
    ///
    /// The call starts on the caller's thread, and most calls (a `read`, an
    /// `edit`) end there, before the guest first yields: handing every call
    /// to another thread cost two thread wake-ups, most of a small call's
    /// time. That is safe because no filesystem call a tool makes can block
    /// without bound (its opens cannot: see [`open`]). A call that yields,
    /// at an epoch tick or waiting for a child process, moves as it stands
    /// to a thread of the tool pool for the rest, so no plugin holds a
    /// server thread for more than about one tick.
    ///
    /// The parts of a split call start on the pool (`Start::OnPool`): each
    /// is a search over a share of the tree, and starting them here one
    /// after another would hold back the later ones by up to a tick each.
    ///
    /// On either thread the store allows blocking (wasmtime-wasi's
    /// `allow_blocking_current_thread`), so filesystem calls are plain
    /// system calls, not a `spawn_blocking` hand-off each (grep makes tens
    /// of thousands). Guest code yields at every epoch tick, which is where
    /// a caller that went away (its receiver dropped) stops the call.
    async fn with_tool<W: ToolWorld, T: Send + 'static>(
        &self,
        start: Start,
        plugin: Arc<Plugin>,
        pre: W,
        work_dir: Option<Arc<WorkDir>>,
        writes: Option<Arc<writes::WriteQuota>>,
        f: impl for<'a> FnOnce(
            &'a W::Instance,
            &'a mut Store<PluginState>,
        ) -> std::pin::Pin<Box<dyn Future<Output = wasmtime::Result<T>> + Send + 'a>>
        + Send
        + 'static,
    ) -> Result<T, RuntimeError> {
        use futures::FutureExt as _;
        let started = tokio::time::Instant::now();
        let id = plugin.id().to_string();
        let deadline = plugin.grants.limits.deadline;
        let runtime = self.clone();
        let call = async move { runtime.run_tool(&plugin, &pre, work_dir.as_ref(), writes, f).await };
        let mut call = Box::pin(std::panic::AssertUnwindSafe(call).catch_unwind());
        let panicked = |id: String| RuntimeError::Trap { plugin: id, reason: "the call panicked".into() };
        if start == Start::Here {
            if let std::task::Poll::Ready(result) = futures::poll!(call.as_mut()) {
                return result.unwrap_or_else(|_| Err(panicked(id)));
            }
        }
        let handle = tokio::runtime::Handle::current();
        let (mut tx, rx) = tokio::sync::oneshot::channel();
        self.inner.tool_pool.handle().spawn_blocking(move || {
            handle.block_on(async {
                tokio::select! {
                    result = call => {
                        let _ = tx.send(result);
                    }
                    () = tx.closed() => {}
                }
            })
        });
        // The deadline inside the call needs its thread to come back from
        // the guest or a host call; this one holds even when that thread
        // is stuck, or never got a thread at all.
        match tokio::time::timeout_at(started + deadline + DEADLINE_GRACE, rx).await {
            Ok(Ok(Ok(result))) => result,
            Ok(Ok(Err(_))) | Ok(Err(_)) => Err(panicked(id)),
            Err(_) => {
                tracing::warn!(plugin = %id, "a tool call is stuck past its deadline; its thread is left to the tool pool");
                Err(RuntimeError::Deadline { plugin: id, limit: deadline })
            }
        }
    }

    async fn run_tool<W: ToolWorld, T>(
        &self,
        plugin: &Plugin,
        pre: &W,
        work_dir: Option<&Arc<WorkDir>>,
        writes: Option<Arc<writes::WriteQuota>>,
        f: impl for<'a> FnOnce(
            &'a W::Instance,
            &'a mut Store<PluginState>,
        ) -> std::pin::Pin<Box<dyn Future<Output = wasmtime::Result<T>> + Send + 'a>>,
    ) -> Result<T, RuntimeError> {
        let mut store = self.store(plugin, work_dir, None, true)?;
        if let Some(writes) = writes {
            store.data_mut().writes = writes;
        }
        let deadline = plugin.grants.limits.deadline;
        let run = async {
            let tool = pre.instantiate(&mut store).await?;
            f(&tool, &mut store).await
        };
        // Covers guest code (which yields at every epoch tick) and time spent
        // waiting in host calls alike.
        let result = tokio::time::timeout(deadline, run).await;
        match result {
            Err(_) => Err(RuntimeError::Deadline { plugin: plugin.id().into(), limit: deadline }),
            Ok(Err(err)) => Err(self.call_error(plugin, &store, err)),
            Ok(Ok(value)) => Ok(value),
        }
    }

    async fn plugin_of_kind(&self, id: &str, kind: Kind) -> Result<(Arc<Plugin>, Arc<Loaded>), RuntimeError> {
        let plugin = self.get(id).ok_or_else(|| RuntimeError::NotFound(id.to_string()))?;
        if plugin.manifest.kind != kind {
            return Err(RuntimeError::WrongKind { plugin: id.into(), expected: kind.as_str(), actual: plugin.manifest.kind.as_str() });
        }
        let loaded = self.loaded(&plugin).await?;
        Ok((plugin, loaded))
    }

    /// How many parts a call of this tool runs as: 1 unless it exports
    /// `shard-api` and this runtime allows more than one (waits for it to
    /// load).
    pub async fn tool_parts(&self, id: &str) -> Result<u32, RuntimeError> {
        match &*self.plugin_of_kind(id, Kind::Tool).await?.1 {
            Loaded::Tool { shards, .. } => Ok(self.parts(shards.as_ref())),
            Loaded::Provider { .. } => unreachable!("kind checked"),
        }
    }

    fn parts(&self, shards: Option<&Shards>) -> u32 {
        shards.map_or(1, |s| s.max.min(self.inner.tool_shards))
    }

    /// The spec of a tool (waits for it to load).
    pub async fn tool_spec(&self, id: &str) -> Result<ToolSpec, RuntimeError> {
        match &*self.plugin_of_kind(id, Kind::Tool).await?.1 {
            Loaded::Tool { spec, .. } => Ok(spec.clone()),
            Loaded::Provider { .. } => unreachable!("kind checked"),
        }
    }

    /// The description of a provider (waits for it to load).
    pub async fn provider_info(&self, id: &str) -> Result<ProviderInfo, RuntimeError> {
        match &*self.plugin_of_kind(id, Kind::Provider).await?.1 {
            Loaded::Provider { info, .. } => Ok(info.clone()),
            Loaded::Tool { .. } => unreachable!("kind checked"),
        }
    }

    /// Runs one tool call in a fresh instance.
    pub async fn call_tool(&self, id: &str, call: ToolInvocation) -> Result<ToolOutput, RuntimeError> {
        let (plugin, loaded) = self.plugin_of_kind(id, Kind::Tool).await?;
        let Loaded::Tool { pre, shards, .. } = &*loaded else { unreachable!("kind checked") };
        let wit_call = ToolCall {
            id: call.id,
            input: call.input,
            work_dir: call.work_dir.as_deref().and_then(|w| w.path().to_str()).unwrap_or_default().to_string(),
        };
        let (mut output, write_limit) = match shards.as_ref().map(|s| (s, self.parts(Some(s)))) {
            Some((shards, count)) if count >= 2 => self.call_sharded(&plugin, &shards.pre, wit_call, call.work_dir, count).await?,
            _ => {
                self.with_tool(Start::Here, plugin.clone(), pre.clone(), call.work_dir.clone(), None, move |tool, store| {
                    Box::pin(async move {
                        let output = tool.hangar_plugin_tool_api().call_invoke(&mut *store, &wit_call).await?;
                        Ok((output, store.data().writes.hit()))
                    })
                })
                .await?
            }
        };
        // The guest saw `quota` errors and may have carried on; the result
        // says which limit refused its writes, whatever the guest made of them.
        if let Some(limit) = write_limit {
            output.text = format!("{}\n\n[error: {}]", output.text, RuntimeError::Writes { plugin: plugin.id().into(), limit });
            output.is_error = true;
        }
        let limit = plugin.grants.limits.output_bytes;
        if output.text.len() > limit {
            return Err(RuntimeError::Output { plugin: plugin.id().into(), actual: output.text.len(), limit });
        }
        Ok(output)
    }

    /// Runs a call as `count` parts at once, each in an instance of its own
    /// with the call's working directory, then merges their texts in one
    /// more instance that has no filesystem. The first part to fail (by
    /// index) answers the call.
    async fn call_sharded(
        &self,
        plugin: &Arc<Plugin>,
        pre: &ShardedToolPre<PluginState>,
        call: ToolCall,
        work_dir: Option<Arc<WorkDir>>,
        count: u32,
    ) -> Result<(ToolOutput, Option<WriteLimit>), RuntimeError> {
        // The parts of a call share its write quota, as they share its
        // working directory.
        let limits = &plugin.grants.limits;
        let writes = writes::WriteQuota::new(limits.write_bytes, limits.max_files);
        let parts = futures::future::join_all((0..count).map(|index| {
            let call = call.clone();
            self.with_tool(Start::OnPool, plugin.clone(), pre.clone(), work_dir.clone(), Some(writes.clone()), move |tool, store| {
                Box::pin(async move {
                    tool.hangar_plugin_shard_api().call_invoke_shard(&mut *store, &call, index, count).await
                })
            })
        }))
        .await;
        let limit = plugin.grants.limits.output_bytes;
        let mut texts = Vec::with_capacity(parts.len());
        for part in parts {
            match part? {
                Err(output) => return Ok((output, writes.hit())),
                // What a part hands the merge is held here: it gets the
                // bound of a tool's answer.
                Ok(text) if text.len() > limit => {
                    return Err(RuntimeError::Output { plugin: plugin.id().into(), actual: text.len(), limit });
                }
                Ok(text) => texts.push(text),
            }
        }
        let output = self
            .with_tool(Start::Here, plugin.clone(), pre.clone(), None, None, move |tool, store| {
                Box::pin(async move { tool.hangar_plugin_shard_api().call_merge(&mut *store, &call, &texts).await })
            })
            .await?;
        Ok((output, writes.hit()))
    }

    /// A fresh instance of a loaded provider; `access` is the model call's
    /// (its credential and base URL), `None` for a decoding step, which
    /// gets no network at all.
    async fn provider_instance(
        &self,
        plugin: &Arc<Plugin>,
        loaded: &Loaded,
        access: Option<&ProviderAccess>,
    ) -> Result<ProviderInstance, RuntimeError> {
        let Loaded::Provider { pre, api, stream, .. } = loaded else { unreachable!("kind checked") };
        let mut store = self.store(plugin, None, access, false)?;
        // A decoding step has no network and runs no command, whatever
        // the plugin is granted.
        if access.is_none() {
            store.data_mut().http = None;
            store.data_mut().process = None;
        }
        let deadline = plugin.grants.limits.deadline;
        let instantiated = tokio::time::timeout(deadline, async {
            let instance = pre.instantiate_async(&mut store).await?;
            let api = api.load(&mut store, &instance)?;
            let stream = stream.as_ref().map(|s| s.load(&mut store, &instance)).transpose()?;
            Ok::<_, wasmtime::Error>((api, stream))
        })
        .await;
        match instantiated {
            Err(_) => Err(RuntimeError::Deadline { plugin: plugin.id().into(), limit: deadline }),
            Ok(Err(err)) => Err(self.call_error(plugin, &store, err)),
            Ok(Ok((api, stream))) => Ok(ProviderInstance { store, api, stream }),
        }
    }

    /// What a provider call run under the plugin's deadline came to
    /// (`outcome`); `store` is the instance's, for the error.
    fn provider_call<T>(
        &self,
        plugin: &Plugin,
        store: &Store<PluginState>,
        outcome: Result<wasmtime::Result<T>, tokio::time::error::Elapsed>,
    ) -> Result<T, RuntimeError> {
        match outcome {
            Err(_) => Err(RuntimeError::Deadline { plugin: plugin.id().into(), limit: plugin.grants.limits.deadline }),
            Ok(Err(err)) => Err(self.call_error(plugin, store, err)),
            Ok(Ok(value)) => Ok(value),
        }
    }

    /// Lists a provider's models.
    pub async fn provider_models(
        &self,
        id: &str,
        access: &ProviderAccess,
    ) -> Result<Result<Vec<ModelInfo>, ProviderError>, RuntimeError> {
        let (plugin, loaded) = self.plugin_of_kind(id, Kind::Provider).await?;
        let ProviderInstance { mut store, api, .. } = self.provider_instance(&plugin, &loaded, Some(access)).await?;
        let cfg = provider_config(access);
        let outcome = tokio::time::timeout(plugin.grants.limits.deadline, api.call_models(&mut store, &cfg)).await;
        self.provider_call(&plugin, &store, outcome)
    }

    /// Starts a model call; pull its events from the returned stream.
    ///
    /// A provider that exports `provider-stream` builds the request, and
    /// its instance is gone before the request is sent: the host sends it
    /// and holds the response, and each piece of the body is decoded in a
    /// fresh instance. Any other provider's instance sends it and reads
    /// the body itself (`complete`), alive until the answer ends.
    pub async fn provider_complete(
        &self,
        id: &str,
        access: &ProviderAccess,
        request: CompletionRequest,
    ) -> Result<Result<Completion, ProviderError>, RuntimeError> {
        // The awaits before and after the wait for the vendor's answer are
        // boxed: a stream's task holds this future, at its largest state's
        // size, until the answer's headers arrive.
        let (plugin, loaded) = Box::pin(self.plugin_of_kind(id, Kind::Provider)).await?;
        let ProviderInstance { mut store, api, stream } = Box::pin(self.provider_instance(&plugin, &loaded, Some(access))).await?;
        let cfg = provider_config(access);
        let deadline = plugin.grants.limits.deadline;
        if let Some(stream) = stream {
            let started = Box::pin(tokio::time::timeout(deadline, stream.call_start(&mut store, &cfg, &request))).await;
            let call = match self.provider_call(&plugin, &store, started)? {
                Err(provider_error) => return Ok(Err(provider_error)),
                Ok(call) => call,
            };
            if let Some(call) = call {
                // The instance goes before the wait for the vendor; its
                // network grant (with the credential) sends the request.
                let http = store.into_data().http;
                let answer = self.send_held(&plugin, loaded, http, call).await?;
                return Ok(answer.map(|held| Completion { runtime: self.clone(), plugin, answer: Answer::Held(held) }));
            }
        }
        let started = Box::pin(tokio::time::timeout(deadline, api.call_complete(&mut store, &cfg, &request))).await;
        let handle = match self.provider_call(&plugin, &store, started)? {
            Err(provider_error) => return Ok(Err(provider_error)),
            Ok(handle) => handle,
        };
        Ok(Ok(Completion { runtime: self.clone(), plugin, answer: Answer::Instance { store, api, handle } }))
    }

    /// Sends a `provider-stream` call's request with the grant of the
    /// instance that built it, and keeps the response if it is a success.
    async fn send_held(
        &self,
        plugin: &Arc<Plugin>,
        loaded: Arc<Loaded>,
        http: Option<HttpAccess>,
        call: provider_stream::Call,
    ) -> Result<Result<Held, ProviderError>, RuntimeError> {
        // The wait for the answer's headers is under the plugin's deadline,
        // as it was inside `complete`, whatever the request's own timeout.
        let deadline = plugin.grants.limits.deadline;
        let sent = match http {
            Some(http) => tokio::time::timeout(deadline, http.send(plugin.id(), call.request))
                .await
                .map_err(|_| RuntimeError::Deadline { plugin: plugin.id().into(), limit: deadline })?,
            None => Err(HttpError::Denied(format!("plugin `{}` is not granted http", plugin.id()))),
        };
        let sent = match sent {
            Ok(sent) => sent,
            // The plugin says what the failure means, as it would have of
            // its own `http.send`.
            Err(err) => return Box::pin(self.unsent(plugin, &loaded, &call.state, err)).await.map(Err),
        };
        let held = Held { loaded, body: Some(sent.body), state: call.state, queue: VecDeque::new(), failed: None, done: false };
        if (200..300).contains(&sent.status) {
            return Ok(Ok(held));
        }
        Box::pin(self.failure(plugin, held, sent.status, &sent.headers)).await.map(Err)
    }

    /// A fresh instance for one step of a held answer (`decode`, `failure`,
    /// `unsent`): no network, no commands.
    async fn step_instance(&self, plugin: &Arc<Plugin>, loaded: &Loaded) -> Result<(Store<PluginState>, provider_stream::Guest), RuntimeError> {
        let ProviderInstance { store, stream, .. } = self.provider_instance(plugin, loaded, None).await?;
        Ok((store, stream.expect("a provider that started a held call exports provider-stream")))
    }

    /// A request the host could not send, classified by the plugin as it
    /// would its own `http.send`'s error.
    async fn unsent(&self, plugin: &Arc<Plugin>, loaded: &Loaded, state: &[u8], err: HttpError) -> Result<ProviderError, RuntimeError> {
        let (mut store, stream) = self.step_instance(plugin, loaded).await?;
        let outcome = tokio::time::timeout(plugin.grants.limits.deadline, stream.call_unsent(&mut store, state, &err)).await;
        self.provider_call(plugin, &store, outcome)
    }

    /// A response that is not a success, classified by the plugin from its
    /// status, headers and body (read whole, up to a bound): the vendor's
    /// error message, its retry wait.
    async fn failure(&self, plugin: &Arc<Plugin>, mut held: Held, status: u16, headers: &[(String, String)]) -> Result<ProviderError, RuntimeError> {
        let deadline = plugin.grants.limits.deadline;
        let mut body = Vec::new();
        let read = tokio::time::timeout(deadline, async {
            while body.len() < FAILURE_BODY_MAX {
                match held.body.as_mut().map(|b| b.read(FAILURE_BODY_MAX - body.len())) {
                    Some(read) => match read.await {
                        Ok(Some(bytes)) => body.extend_from_slice(&bytes),
                        Ok(None) | Err(_) => break,
                    },
                    None => break,
                }
            }
        })
        .await;
        if read.is_err() {
            return Err(RuntimeError::Deadline { plugin: plugin.id().into(), limit: deadline });
        }
        drop(held.body.take());
        let (mut store, stream) = self.step_instance(plugin, &held.loaded).await?;
        let outcome = tokio::time::timeout(deadline, stream.call_failure(&mut store, &held.state, status, headers, &body)).await;
        self.provider_call(plugin, &store, outcome)
    }

    /// One step of a held answer: `chunk` (`None`: the body ended) decoded
    /// in a fresh instance that has no network.
    async fn decode(&self, plugin: &Arc<Plugin>, loaded: &Loaded, state: Vec<u8>, chunk: Option<Vec<u8>>) -> Result<provider_stream::Decoded, RuntimeError> {
        let (mut store, stream) = self.step_instance(plugin, loaded).await?;
        let outcome = tokio::time::timeout(plugin.grants.limits.deadline, stream.call_decode(&mut store, &state, chunk.as_deref())).await;
        self.provider_call(plugin, &store, outcome)
    }
}

/// The bytes of a failed model call's body the plugin gets to classify it
/// (vendors' error bodies are a few hundred bytes; this keeps a long one
/// whole enough to parse).
const FAILURE_BODY_MAX: usize = 1024 * 1024;
/// The most bytes one decoding step takes: what has arrived, up to this.
const STEP_MAX: usize = 64 * 1024;

struct ProviderInstance {
    store: Store<PluginState>,
    api: provider_api::Guest,
    stream: Option<provider_stream::Guest>,
}

fn provider_config(access: &ProviderAccess) -> ProviderConfig {
    ProviderConfig { base_url: access.base_url.clone(), has_credential: access.credential.is_some() }
}

/// A model answer being streamed out of a provider. Each pull has its own
/// deadline; dropping the stream drops the instance or the held response,
/// and with it the HTTP request.
pub struct Completion {
    runtime: Runtime,
    plugin: Arc<Plugin>,
    answer: Answer,
}

enum Answer {
    /// The instance reads the body itself (`complete`/`next`).
    Instance { store: Store<PluginState>, api: provider_api::Guest, handle: ResourceAny },
    /// The host holds the body (`provider-stream`).
    Held(Held),
}

/// A held answer between two steps: the response, the decoder's state,
/// and what the last step made that has not been pulled yet.
struct Held {
    loaded: Arc<Loaded>,
    /// `None` once the body ended, broke off, or the answer is complete.
    body: Option<HttpBody>,
    state: Vec<u8>,
    queue: VecDeque<Event>,
    failed: Option<ProviderError>,
    done: bool,
}

impl Completion {
    /// The provider's limits (what one answer may hold, among them).
    pub fn limits(&self) -> Limits {
        self.plugin.grants.limits
    }

    /// The next event, `Ok(Ok(None))` at the end.
    pub async fn next(&mut self) -> Result<Result<Option<Event>, ProviderError>, RuntimeError> {
        let held = match &mut self.answer {
            Answer::Instance { store, api, handle } => {
                let completion = api.completion();
                let outcome = tokio::time::timeout(self.plugin.grants.limits.deadline, completion.call_next(&mut *store, *handle)).await;
                return self.runtime.provider_call(&self.plugin, store, outcome);
            }
            Answer::Held(held) => held,
        };
        // One deadline for the whole pull, as a guest's `next()` has: a
        // vendor that sends only pings or comments, or a line a byte at a
        // time, makes no event and must not hold the pull for good.
        let deadline = self.plugin.grants.limits.deadline;
        let until = tokio::time::Instant::now() + deadline;
        let timed_out = || RuntimeError::Deadline { plugin: self.plugin.id().into(), limit: deadline };
        loop {
            if let Some(event) = held.queue.pop_front() {
                return Ok(Ok(Some(event)));
            }
            if let Some(err) = held.failed.take() {
                held.done = true;
                return Ok(Err(err));
            }
            if held.done {
                return Ok(Ok(None));
            }
            let mut broken = None;
            let chunk = match held.body.as_mut() {
                None => None,
                Some(body) => match tokio::time::timeout_at(until, body.read(STEP_MAX)).await {
                    Err(_) => return Err(timed_out()),
                    Ok(Err(err)) => {
                        held.done = true;
                        held.body = None;
                        return Ok(Err(broke_off(err)));
                    }
                    Ok(Ok(None)) => None,
                    Ok(Ok(Some(mut bytes))) => {
                        // Everything that has arrived goes in one step: a
                        // fast stream pays for a step per read, not per
                        // network packet.
                        while bytes.len() < STEP_MAX {
                            match body.read_ready(STEP_MAX - bytes.len()) {
                                Ok(Some(more)) if !more.is_empty() => bytes.extend_from_slice(&more),
                                Ok(_) => break,
                                Err(err) => {
                                    broken = Some(err);
                                    break;
                                }
                            }
                        }
                        Some(bytes)
                    }
                },
            };
            let ended = chunk.is_none();
            if ended {
                // The connection's place is free before the last step runs.
                held.body = None;
            }
            let state = std::mem::take(&mut held.state);
            // Boxed: an instantiation and a call, far larger than the wait
            // for bytes that this future holds the rest of the time.
            let decoded = tokio::time::timeout_at(until, Box::pin(self.runtime.decode(&self.plugin, &held.loaded, state, chunk)))
                .await
                .map_err(|_| timed_out())??;
            held.state = decoded.state;
            held.queue.extend(decoded.events);
            held.failed = decoded.error;
            if decoded.done || ended || held.failed.is_some() {
                held.done = true;
                held.body = None;
            } else if let Some(err) = broken {
                held.failed = Some(broke_off(err));
                held.body = None;
            }
        }
    }
}

/// A held body that broke off mid-answer: as the SDK's decoders report
/// it, a bad response (what arrived cannot be told from a cut answer).
fn broke_off(err: HttpError) -> ProviderError {
    let why = match err {
        HttpError::Connection(what) => format!("connection failed: {what}"),
        other => format!("{other:?}"),
    };
    ProviderError {
        kind: ErrorKind::BadResponse,
        retryable: false,
        status: None,
        message: format!("the event stream broke off: {why}"),
        retry_after_ms: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn builtin(name: &str) -> &'static Builtin {
        BUILTINS.iter().find(|b| b.name == name).unwrap()
    }

    fn runtime_on(cache: &Path) -> Runtime {
        let pool = PoolSize { instances: 16, ..Default::default() };
        Runtime::new(RuntimeConfig { cache_dir: Some(cache.into()), pool, ..Default::default() }).unwrap()
    }

    #[test]
    fn every_embedded_artifact_deserializes_in_the_servers_engine() {
        let engine = engine::build_engine(PoolSize { instances: 4, ..Default::default() }).unwrap();
        assert!(!BUILTINS.is_empty());
        for builtin in BUILTINS {
            let artifact = builtin.precompiled.unwrap_or_else(|| panic!("{}: no precompiled code", builtin.name));
            // Aligned by build.rs, so its code runs in place, not from a copy.
            assert_eq!(artifact.as_ptr() as usize % std::mem::align_of::<PageAligned<[u8; 0]>>(), 0, "{}", builtin.name);
            assert!(engine::precompiled(&engine, builtin.name, artifact).is_some(), "{}", builtin.name);
        }
    }

    #[tokio::test]
    async fn the_built_ins_load_from_their_precompiled_code_and_leave_the_cache_empty() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path().join("cache");
        let runtime = runtime_on(&cache);
        runtime.add_builtins().unwrap();
        let plugins: Vec<Arc<Plugin>> = runtime.inner.plugins.read().unwrap().values().cloned().collect();
        assert_eq!(plugins.len(), BUILTINS.len());
        for plugin in &plugins {
            // Loading checks that the code is the plugin's: its spec() or
            // info() must name it.
            runtime.loaded(plugin).await.unwrap_or_else(|e| panic!("{}: {e}", plugin.id()));
        }
        // Nothing was compiled, so nothing was written.
        let written: Vec<_> = std::fs::read_dir(&cache).unwrap().collect();
        assert!(written.is_empty(), "{written:?}");
    }

    /// wasmtime registers code process-wide by address: a second engine
    /// loading a built-in whose code already runs in place gets a copy, and
    /// the code is free to run in place again once its first user is gone.
    #[tokio::test]
    async fn engines_of_one_process_load_the_same_built_in_side_by_side() {
        let tmp = tempfile::tempdir().unwrap();
        let runtimes: Vec<Runtime> = (0..3).map(|i| runtime_on(&tmp.path().join(format!("cache{i}")))).collect();
        for runtime in &runtimes[..2] {
            runtime.add_builtins().unwrap();
            assert_eq!(runtime.tool_spec("read").await.unwrap().name, "read");
        }
        let mut runtimes = runtimes.into_iter();
        drop(runtimes.next());
        for runtime in runtimes {
            runtime.add_builtins().unwrap();
            assert_eq!(runtime.tool_spec("read").await.unwrap().name, "read");
        }
    }

    #[tokio::test]
    async fn precompiled_code_the_engine_refuses_is_compiled_instead() {
        let read = builtin("read");
        let good = read.precompiled.unwrap();
        // Code from an engine with other settings (no epoch interruption:
        // a plugin could then never be stopped).
        let mut config = engine::code_config();
        config.epoch_interruption(false);
        let other_engine = wasmtime::Engine::new(&config).unwrap().precompile_component(read.wasm).unwrap();
        // The right code under a damaged header.
        let mut damaged = good.to_vec();
        damaged[..16].fill(0);
        for (what, artifact) in [("another engine's code", other_engine), ("a damaged header", damaged)] {
            let artifact: &'static [u8] = artifact.leak();
            let tmp = tempfile::tempdir().unwrap();
            let cache = tmp.path().join("cache");
            let runtime = runtime_on(&cache);
            let manifest = Manifest::parse(read.manifest, Some(read.name)).unwrap();
            runtime.add_builtin(manifest, read.wasm, Some(artifact)).unwrap();
            let spec = runtime.tool_spec("read").await.unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(spec.name, "read", "{what}");
            // Compiled here: the compile cache now holds it (an entry and
            // its digest).
            assert_eq!(std::fs::read_dir(&cache).unwrap().count(), 2, "{what}");
        }
    }
}
