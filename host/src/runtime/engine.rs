//! The one wasmtime `Engine`, its epoch clock, and the on-disk cache of
//! compiled components.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

/// Part of every cache key (the engine hash covers it too; this keeps
/// entries of different wasmtime releases apart at a glance).
const WASMTIME_VERSION: &str = "wasmtime48";

/// How often the epoch advances: how often running guest code yields.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Sizes of the instance pool.
#[derive(Debug, Clone, Copy)]
pub struct PoolSize {
    /// Instances alive at once (a tool call or a provider stream holds one).
    pub instances: u32,
    /// The largest linear memory any plugin may be granted.
    pub max_memory_bytes: usize,
}

impl Default for PoolSize {
    fn default() -> Self {
        // Instances are reserved address space, not resident memory: 2,000
        // covers a thousand concurrent streams plus tool calls.
        PoolSize { instances: 2000, max_memory_bytes: 1 << 30 }
    }
}

pub fn build_engine(pool: PoolSize) -> wasmtime::Result<Engine> {
    let mut config = Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    config.memory_init_cow(true);

    let mut pooling = PoolingAllocationConfig::default();
    pooling
        .total_component_instances(pool.instances)
        // Components written in Python or JavaScript bring an interpreter
        // and several core modules; size per-component limits for them.
        .max_core_instances_per_component(50)
        .max_memories_per_component(8)
        .max_tables_per_component(16)
        .total_core_instances(pool.instances * 4)
        .total_memories(pool.instances * 2)
        .total_tables(pool.instances * 4)
        .total_stacks(pool.instances)
        .max_memory_size(pool.max_memory_bytes)
        .table_elements(100_000)
        .max_component_instance_size(4 << 20)
        .max_core_instance_size(4 << 20)
        .max_unused_warm_slots(100);
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling));
    Engine::new(&config)
}

/// Advances the engine's epoch every [`EPOCH_TICK`] until dropped.
pub struct EpochTicker {
    stop: Arc<AtomicBool>,
}

impl EpochTicker {
    pub fn start(engine: Engine) -> EpochTicker {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        std::thread::Builder::new()
            .name("hangar-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    engine.increment_epoch();
                }
            })
            .expect("spawn the epoch thread");
        EpochTicker { stop }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Compiled components on disk, keyed by the component's SHA-256 and
/// everything about the engine that makes compiled code incompatible
/// (wasmtime version, target, settings).
pub struct CompileCache {
    dir: Option<PathBuf>,
}

impl CompileCache {
    pub fn new(dir: Option<PathBuf>) -> CompileCache {
        if let Some(dir) = &dir
            && let Err(err) = std::fs::create_dir_all(dir)
        {
            tracing::warn!(dir = %dir.display(), %err, "cannot create the compile cache; compiling without it");
            return CompileCache { dir: None };
        }
        CompileCache { dir }
    }

    fn path(&self, engine: &Engine, wasm: &[u8]) -> Option<PathBuf> {
        let dir = self.dir.as_ref()?;
        let mut engine_hash = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut engine_hash);
        let digest = Sha256::digest(wasm);
        Some(dir.join(format!(
            "{}-{}-{:016x}.cwasm",
            hex::encode(&digest[..16]),
            WASMTIME_VERSION,
            engine_hash.finish()
        )))
    }

    /// The compiled component, from the cache when it holds it.
    pub fn load(&self, engine: &Engine, wasm: &[u8]) -> wasmtime::Result<Component> {
        let path = self.path(engine, wasm);
        if let Some(path) = &path
            && path.exists()
        {
            // SAFETY: the file was written by `Component::serialize` of this
            // cache; the key ties it to the exact bytes and engine settings,
            // and deserialization re-checks engine compatibility.
            match unsafe { Component::deserialize_file(engine, path) } {
                Ok(component) => return Ok(component),
                Err(err) => tracing::warn!(path = %path.display(), %err, "ignoring a bad cache entry"),
            }
        }
        let component = Component::new(engine, wasm)?;
        if let Some(path) = &path {
            store_atomically(path, &component.serialize()?);
        }
        Ok(component)
    }
}

/// Writes through a temporary file and a rename, so that concurrent
/// processes sharing the cache never see half an entry.
fn store_atomically(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let result = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, path));
    if let Err(err) = result {
        let _ = std::fs::remove_file(&tmp);
        tracing::warn!(path = %path.display(), %err, "cannot write the compile cache");
    }
}
