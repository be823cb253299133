//! The data of one `Store`: made fresh for every call, so nothing leaks
//! between calls, sessions or tenants.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

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
    /// What this call may still write (counted for `read-write` plugins).
    pub writes: Arc<super::writes::WriteQuota>,
    /// Whether its filesystem calls may block the thread they run on (as
    /// its WASI context was built).
    pub blocking_fs: bool,
}

impl WasiView for PluginState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

/// What the memory limiter refused, so the error can name the limit:
/// the plugin's own cap, or the server's budget shared by all calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryRefusal {
    /// The instance would pass the plugin's `memory_mb`.
    Plugin,
    /// The server's `plugin_memory_total_mb` is taken by calls running now.
    Server,
}

/// The memory all plugin instances of a server may hold at once
/// (`[limits] plugin_memory_total_mb`). Without it, N concurrent calls
/// could take N times a plugin's cap. Each store reserves what its
/// instance grows to and gives it back when dropped.
#[derive(Debug)]
pub struct MemoryBudget {
    total: usize,
    used: AtomicUsize,
}

impl MemoryBudget {
    pub fn new(total: usize) -> MemoryBudget {
        MemoryBudget { total, used: AtomicUsize::new(0) }
    }

    pub fn total(&self) -> usize {
        self.total
    }

    /// Bytes reserved by the stores alive now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn try_reserve(&self, bytes: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|&after| after <= self.total)
            })
            .is_ok()
    }

    fn release(&self, bytes: usize) {
        self.used.fetch_sub(bytes, Ordering::AcqRel);
    }
}

/// Caps the memory of one instance: the sum of all its linear memories
/// and tables, since a component holds several core instances, each with
/// its own memory (a cap per memory let eight of them take eight times
/// it). Every byte it allows is reserved from the server's budget too,
/// and given back when the store is dropped.
///
/// A growth the limiter allowed may still fail (the operating system
/// refused the pages), and an instantiation refused halfway leaves what
/// it had made: both stay counted until the store is dropped. Wasmtime
/// reports no success, so the limiter cannot tell such a failure from an
/// unrelated one, and it errs on the side of refusing; a failed call
/// drops its store anyway.
pub struct MemoryLimiter {
    /// The plugin's cap on the sum, in bytes.
    pub limit: usize,
    budget: Arc<MemoryBudget>,
    /// Bytes counted against `limit`, all of them reserved from `budget`.
    used: usize,
    /// Why the last refusal happened, for the call's error.
    pub hit: Option<MemoryRefusal>,
}

/// What a table element costs: wasmtime keeps a pointer per element.
const TABLE_ELEMENT_BYTES: usize = std::mem::size_of::<usize>();

impl MemoryLimiter {
    pub fn new(limit: usize, budget: Arc<MemoryBudget>) -> MemoryLimiter {
        MemoryLimiter { limit, budget, used: 0, hit: None }
    }

    /// Bytes of memories and tables the instance holds.
    #[cfg(test)]
    fn used(&self) -> usize {
        self.used
    }

    /// Counts `bytes` more, if both the plugin's cap and the server's
    /// budget allow them.
    fn grow(&mut self, bytes: usize) -> bool {
        if self.used.checked_add(bytes).is_none_or(|after| after > self.limit) {
            self.hit = Some(MemoryRefusal::Plugin);
            return false;
        }
        if !self.budget.try_reserve(bytes) {
            self.hit = Some(MemoryRefusal::Server);
            return false;
        }
        self.used += bytes;
        true
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        // Past the memory's own maximum the growth fails anyway; refusing it
        // here keeps it from being counted.
        if maximum.is_some_and(|max| desired > max) {
            return Ok(false);
        }
        // `current` is 0 when a memory is created: its initial size counts.
        Ok(self.grow(desired.saturating_sub(current)))
    }

    fn table_growing(&mut self, current: usize, desired: usize, maximum: Option<usize>) -> wasmtime::Result<bool> {
        if maximum.is_some_and(|max| desired > max) {
            return Ok(false);
        }
        Ok(self.grow(desired.saturating_sub(current).saturating_mul(TABLE_ELEMENT_BYTES)))
    }
}

impl Drop for MemoryLimiter {
    fn drop(&mut self) {
        // The store, and with it every memory and table counted, is gone.
        self.budget.release(self.used);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime::{Engine, Instance, Module, Store};

    const MIB: usize = 1 << 20;
    const PAGE: usize = 64 << 10;

    fn leb(mut n: u32, out: &mut Vec<u8>) {
        loop {
            let byte = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }

    /// A core module that exports a memory of `mib` MiB and, with
    /// `table`, a funcref table of that many elements.
    fn module(engine: &Engine, mib: usize, table: Option<u32>) -> Module {
        let mut wasm = b"\0asm\x01\0\0\0".to_vec();
        let section = |id: u8, body: Vec<u8>, wasm: &mut Vec<u8>| {
            wasm.push(id);
            leb(body.len() as u32, wasm);
            wasm.extend(body);
        };
        if let Some(elements) = table {
            let mut body = vec![1, 0x70, 0];
            leb(elements, &mut body);
            section(4, body, &mut wasm);
        }
        let mut body = vec![1, 0];
        leb((mib * MIB / PAGE) as u32, &mut body);
        section(5, body, &mut wasm);
        section(7, vec![1, 1, b'm', 2, 0], &mut wasm);
        Module::new(engine, &wasm).unwrap()
    }

    fn store(engine: &Engine, limit_mib: usize, budget: &Arc<MemoryBudget>) -> Store<MemoryLimiter> {
        let mut store = Store::new(engine, MemoryLimiter::new(limit_mib * MIB, budget.clone()));
        store.limiter(|l| l);
        store
    }

    #[test]
    fn the_cap_holds_for_the_sum_of_an_instances_memories() {
        // A component is several core instances in one store, each with a
        // memory of its own: four of 30 MiB under a 64 MiB cap.
        let engine = Engine::default();
        let budget = Arc::new(MemoryBudget::new(1 << 30));
        let m = module(&engine, 30, None);
        let mut store = store(&engine, 64, &budget);
        Instance::new(&mut store, &m, &[]).unwrap();
        Instance::new(&mut store, &m, &[]).unwrap();
        let err = Instance::new(&mut store, &m, &[]).unwrap_err();
        assert!(format!("{err:#}").contains("exceeds memory limits"), "{err:#}");
        assert_eq!(store.data().hit, Some(MemoryRefusal::Plugin));
        assert_eq!(store.data().used(), 60 * MIB, "the refused memory is not counted");
        assert_eq!(budget.used(), 60 * MIB);
        drop(store);
        assert_eq!(budget.used(), 0, "the budget is given back with the store");
    }

    #[test]
    fn growth_counts_what_it_adds() {
        let engine = Engine::default();
        let budget = Arc::new(MemoryBudget::new(1 << 30));
        let mut store = store(&engine, 64, &budget);
        let a = Instance::new(&mut store, &module(&engine, 16, None), &[]).unwrap();
        let b = Instance::new(&mut store, &module(&engine, 16, None), &[]).unwrap();
        let memory_a = a.get_memory(&mut store, "m").unwrap();
        let memory_b = b.get_memory(&mut store, "m").unwrap();
        memory_a.grow(&mut store, (16 * MIB / PAGE) as u64).unwrap();
        assert_eq!(store.data().used(), 48 * MIB);
        assert!(memory_b.grow(&mut store, (17 * MIB / PAGE) as u64).is_err(), "48 + 17 MiB is past 64");
        assert_eq!(store.data().hit, Some(MemoryRefusal::Plugin));
        memory_b.grow(&mut store, (16 * MIB / PAGE) as u64).unwrap();
        assert_eq!(store.data().used(), 64 * MIB);
        assert_eq!(budget.used(), 64 * MIB);
    }

    #[test]
    fn tables_count_against_the_cap() {
        let engine = Engine::default();
        let budget = Arc::new(MemoryBudget::new(1 << 30));
        let mut store = store(&engine, 4, &budget);
        // One page of memory and a million elements, 8 MiB on a 64-bit host.
        let err = Instance::new(&mut store, &module(&engine, 1, Some(1_000_000)), &[]).unwrap_err();
        assert!(format!("{err:#}").contains("table minimum size"), "{err:#}");
        assert_eq!(store.data().hit, Some(MemoryRefusal::Plugin));
        Instance::new(&mut store, &module(&engine, 1, Some(100_000)), &[]).unwrap();
        // The refused instance's memory was made before its table and stays
        // counted: a failed instantiation fails the call, store and all.
        assert_eq!(store.data().used(), 2 * MIB + 100_000 * TABLE_ELEMENT_BYTES);
    }

    #[test]
    fn concurrent_stores_share_the_servers_budget() {
        let engine = Engine::default();
        let budget = Arc::new(MemoryBudget::new(100 * MIB));
        let m = module(&engine, 30, None);
        let mut first = store(&engine, 64, &budget);
        Instance::new(&mut first, &m, &[]).unwrap();
        Instance::new(&mut first, &m, &[]).unwrap();
        let mut second = store(&engine, 64, &budget);
        Instance::new(&mut second, &m, &[]).unwrap();
        // Within its own 64 MiB, but 60 + 30 + 30 is past the 100 MiB budget.
        assert!(Instance::new(&mut second, &m, &[]).is_err());
        assert_eq!(second.data().hit, Some(MemoryRefusal::Server));
        assert_eq!(second.data().used(), 30 * MIB);
        assert_eq!(budget.used(), 90 * MIB);
        drop(first);
        assert_eq!(budget.used(), 30 * MIB, "the first store's memory is released when it is dropped");
        Instance::new(&mut second, &m, &[]).unwrap();
        assert_eq!(budget.used(), 60 * MIB);
        drop(second);
        assert_eq!(budget.used(), 0);
    }
}
