//! A tool component driven straight through wasmtime, outside Hangar's
//! runtime, with the same engine shape (pooling allocator, copy-on-write
//! images, a fresh store per call, the work dir preopened read-only). It
//! exists to measure, before changing the runtime, what the design's
//! "Where the time goes" suggests: run filesystem tools with
//! `allow_blocking_current_thread` on a blocking thread instead of paying
//! one `spawn_blocking` hop per WASI filesystem call.
#![allow(dead_code)]

use std::path::Path;

use wasmtime::component::{Component, ComponentExportIndex, InstancePre, Linker, ResourceTable, Val};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};
use wasmtime_wasi::{FsPerms, WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

pub struct State {
    wasi: WasiCtx,
    table: ResourceTable,
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

/// How the store runs the guest's filesystem calls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Async store, each WASI filesystem call hops through `spawn_blocking`
    /// (what the runtime does today).
    AsyncHop,
    /// Async store with `allow_blocking_current_thread`, the whole call run
    /// by `Handle::block_on` on one `spawn_blocking` thread.
    AsyncOnBlockingThread,
    /// Synchronous store (`add_to_linker_sync`) with
    /// `allow_blocking_current_thread`, on one `spawn_blocking` thread.
    SyncOnBlockingThread,
}

pub struct DirectTool {
    engine: Engine,
    pre_async: InstancePre<State>,
    pre_sync: InstancePre<State>,
    invoke: ComponentExportIndex,
}

pub fn builtin_wasm(name: &str) -> &'static [u8] {
    hangar::runtime::BUILTINS.iter().find(|b| b.name == name).unwrap_or_else(|| panic!("no built-in {name}")).wasm
}

impl DirectTool {
    pub fn new(wasm: &[u8]) -> DirectTool {
        let mut config = Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        config.memory_init_cow(true);
        let mut pooling = PoolingAllocationConfig::default();
        pooling
            .total_component_instances(64)
            .max_core_instances_per_component(50)
            .max_memories_per_component(8)
            .max_tables_per_component(16)
            .total_core_instances(256)
            .total_memories(128)
            .total_tables(256)
            .total_stacks(64)
            .max_memory_size(1 << 30)
            .table_elements(100_000)
            .max_component_instance_size(4 << 20)
            .max_core_instance_size(4 << 20);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling));
        let engine = Engine::new(&config).unwrap();
        let component = Component::new(&engine, wasm).unwrap();
        let link = |sync: bool| {
            let mut linker: Linker<State> = Linker::new(&engine);
            if sync {
                wasmtime_wasi::p2::add_to_linker_sync(&mut linker).unwrap();
            } else {
                wasmtime_wasi::p2::add_to_linker_async(&mut linker).unwrap();
            }
            linker
                .instance("hangar:plugin/log@0.1.0")
                .unwrap()
                .func_new("log", |_, _, _, _| Ok(()))
                .unwrap();
            linker.define_unknown_imports_as_traps(&component).unwrap();
            linker.instantiate_pre(&component).unwrap()
        };
        let pre_async = link(false);
        let pre_sync = link(true);
        let api = component.get_export_index(None, "hangar:plugin/tool-api@0.1.0").expect("tool-api export");
        let invoke = component.get_export_index(Some(&api), "invoke").expect("invoke export");
        DirectTool { engine, pre_async, pre_sync, invoke }
    }

    fn store(&self, work_dir: &Path, blocking: bool) -> Store<State> {
        let mut wasi = WasiCtxBuilder::new();
        wasi.preopened_dir(work_dir, work_dir.to_str().unwrap(), FsPerms::ReadOnly).unwrap();
        wasi.allow_blocking_current_thread(blocking);
        let mut store = Store::new(&self.engine, State { wasi: wasi.build(), table: ResourceTable::new() });
        store.set_epoch_deadline(u64::MAX / 2);
        store
    }

    fn args(input: &str, work_dir: &Path) -> Val {
        Val::Record(vec![
            ("id".into(), Val::String("call-1".into())),
            ("input".into(), Val::String(input.into())),
            ("work-dir".into(), Val::String(work_dir.to_str().unwrap().into())),
        ])
    }

    fn text(result: &Val) -> String {
        match result {
            Val::Record(fields) => match &fields[0].1 {
                Val::String(s) => s.clone(),
                other => panic!("unexpected {other:?}"),
            },
            other => panic!("unexpected {other:?}"),
        }
    }

    /// One call in a fresh store; returns the output text.
    pub async fn call_async(&self, input: &str, work_dir: &Path, blocking: bool) -> String {
        let mut store = self.store(work_dir, blocking);
        let instance = self.pre_async.instantiate_async(&mut store).await.unwrap();
        let func = instance.get_func(&mut store, self.invoke).unwrap();
        let mut out = [Val::Bool(false)];
        func.call_async(&mut store, &[Self::args(input, work_dir)], &mut out).await.unwrap();
        Self::text(&out[0])
    }

    pub fn call_sync(&self, input: &str, work_dir: &Path) -> String {
        let mut store = self.store(work_dir, true);
        let instance = self.pre_sync.instantiate(&mut store).unwrap();
        let func = instance.get_func(&mut store, self.invoke).unwrap();
        let mut out = [Val::Bool(false)];
        func.call(&mut store, &[Self::args(input, work_dir)], &mut out).unwrap();
        Self::text(&out[0])
    }

    /// One call in `mode`, from async code (as the agent loop calls tools).
    pub async fn call(self: &std::sync::Arc<Self>, mode: Mode, input: &str, work_dir: &Path) -> String {
        match mode {
            Mode::AsyncHop => self.call_async(input, work_dir, false).await,
            Mode::AsyncOnBlockingThread => {
                let (this, input, dir) = (self.clone(), input.to_string(), work_dir.to_path_buf());
                let handle = tokio::runtime::Handle::current();
                tokio::task::spawn_blocking(move || handle.block_on(this.call_async(&input, &dir, true))).await.unwrap()
            }
            Mode::SyncOnBlockingThread => {
                let (this, input, dir) = (self.clone(), input.to_string(), work_dir.to_path_buf());
                tokio::task::spawn_blocking(move || this.call_sync(&input, &dir)).await.unwrap()
            }
        }
    }
}
