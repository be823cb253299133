//! The data of one `Store`: made fresh for every call, so nothing leaks
//! between calls, sessions or tenants.

use std::sync::Arc;

use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::http::HttpAccess;
use super::process::ProcessAccess;

pub struct PluginState {
    /// The plugin's id, for log lines and errors.
    pub plugin: Arc<str>,
    pub wasi: WasiCtx,
    pub table: ResourceTable,
    pub limiter: MemoryLimiter,
    /// Present only when `http` is granted.
    pub http: Option<HttpAccess>,
    /// Present only when `process` is granted.
    pub process: Option<ProcessAccess>,
    /// The plugin's log budget, shared by all its calls.
    pub log_gate: Arc<super::log::LogGate>,
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

/// Caps linear memory, and remembers that it did so the error can say
/// "memory limit" rather than the guest's own out-of-memory abort.
pub struct MemoryLimiter {
    pub limit: usize,
    pub hit: bool,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, _current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.limit {
            self.hit = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}
