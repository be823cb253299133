//! The one wasmtime `Engine`, its epoch clock, and the on-disk cache of
//! compiled components.

use std::ffi::CString;
use std::fs::File;
use std::hash::{Hash, Hasher};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::{Engine, InstanceAllocationStrategy, PoolingAllocationConfig};

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

// `code_config()`: shared with build.rs, which precompiles the built-in
// plugins with exactly these settings.
include!("code_config.rs");

/// The engine of the compile worker: the server's settings without the
/// instance pool, which does not change compiled code (wasmtime documents
/// that artifacts work with and without it) but would reserve terabytes of
/// address space in a process that only compiles.
pub fn compile_engine() -> wasmtime::Result<Engine> {
    Engine::new(&code_config())
}

pub fn build_engine(pool: PoolSize) -> wasmtime::Result<Engine> {
    let mut config = code_config();
    config.with_custom_code_memory(Some(Arc::new(InPlaceCode)));

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
        .max_unused_warm_slots(100)
        // A freed slot is reset by rewriting the pages the instance dirtied
        // (found with the PAGEMAP_SCAN ioctl, Linux 6.7+) instead of
        // `madvise` dropping them: the next instance in the slot then takes
        // no page faults, and no `madvise` shoots down other threads' TLBs.
        // A `read` call dirties under 16 pages; past 64 KiB the rest of a
        // slot is dropped as before, so a warm slot holds at most 64 KiB.
        // Without the scan, keeping pages resident means a `memset` of all
        // of them, which cost more than the faults it saved (BENCHMARKS.md).
        .pagemap_scan(wasmtime::Enabled::Auto)
        .linear_memory_keep_resident(if PoolingAllocationConfig::is_pagemap_scan_available() { 64 << 10 } else { 0 })
        // A tool's tables are a page each: zeroed in place, not `madvise`d.
        .table_keep_resident(8 << 10);
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pooling));
    Engine::new(&config)
}

/// A built-in plugin's precompiled code (`build.rs`) as a component of
/// `engine` (one from [`build_engine`]); `None` when wasmtime refuses it,
/// because this CPU lacks a feature the build machine's had or the
/// engine's settings differ. The caller then compiles the component; the
/// first refusal is logged.
///
/// The code runs where it lies in the binary ([`InPlaceCode`]) instead of
/// from a copy: only the pages a plugin executes become resident, and they
/// are clean pages of the executable file, which the kernel can drop and
/// read again, where a copy would keep the whole artifact (13 MB for the
/// built-ins) in anonymous memory for the server's life.
pub fn precompiled(engine: &Engine, plugin: &str, artifact: &'static [u8]) -> Option<Component> {
    static REFUSED: AtomicBool = AtomicBool::new(false);
    // build.rs aligns the artifacts; one that is not (a test's) is copied,
    // and so is one whose code runs in place already (see `InPlaceCode`).
    let in_place = (artifact.as_ptr() as usize).is_multiple_of(page_size()) && InPlaceCode::claim(artifact);
    // SAFETY: `deserialize` and `deserialize_raw` check the artifact's
    // header (wasmtime version, target, CPU features, engine settings)
    // against this engine before they make its machine code executable.
    // The bytes are part of this binary, as trusted as its own code:
    // build.rs compiled them from the embedded component with the server's
    // code settings (`code_config`). `deserialize_raw` further needs the
    // memory to outlive the component and never change: it is `'static`
    // read-only data of the executable.
    let loaded = unsafe {
        if in_place {
            Component::deserialize_raw(engine, std::ptr::NonNull::from(artifact))
        } else {
            Component::deserialize(engine, artifact)
        }
    };
    if in_place && loaded.is_err() {
        InPlaceCode::release(artifact.as_ptr());
    }
    match loaded {
        Ok(component) => {
            // The pages read while loading (headers, type information, the
            // data copied into the memory image) are not needed again; the
            // code faults back in from the file as it runs.
            release_pages(artifact);
            Some(component)
        }
        Err(err) => {
            if !REFUSED.swap(true, Ordering::Relaxed) {
                tracing::warn!(%plugin, "compiling the built-in plugins: their precompiled code does not suit this machine: {err:#}");
            }
            None
        }
    }
}

fn page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as usize
}

/// Gives back the resident pages of `bytes`, a part of this binary's
/// read-only data: they count in the server's RSS until the kernel needs
/// the memory, though nothing reads them again soon.
fn release_pages(bytes: &'static [u8]) {
    let page = page_size();
    let start = (bytes.as_ptr() as usize).div_ceil(page) * page;
    let end = (bytes.as_ptr() as usize + bytes.len()) / page * page;
    if end > start {
        // SAFETY: whole pages inside `bytes`, a private mapping of the
        // executable that is never written (code made executable in place
        // is read-only too): MADV_DONTNEED only drops this process's page
        // table entries, and a later access faults the same bytes back in
        // from the file. Nothing can be lost.
        unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
    }
}

/// Makes compiled code executable with `mprotect`, as wasmtime does by
/// itself, but also for code it did not copy: the built-ins' artifacts,
/// loaded with `deserialize_raw` from the binary's read-only data.
///
/// wasmtime registers code process-wide by its address, so one artifact's
/// code can be loaded in place once at a time (a server loads each
/// built-in once; tests run several engines): a load claims the artifact,
/// and its code's unpublishing, after wasmtime unregistered it, frees it.
struct InPlaceCode;

/// The artifacts (by address) whose code runs in place now.
static IN_PLACE: std::sync::Mutex<Vec<usize>> = std::sync::Mutex::new(Vec::new());

impl InPlaceCode {
    fn claim(artifact: &'static [u8]) -> bool {
        let mut claimed = IN_PLACE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let start = artifact.as_ptr() as usize;
        if claimed.contains(&start) {
            return false;
        }
        claimed.push(start);
        true
    }

    /// Frees the claim on the embedded artifact that holds `ptr`; `false`
    /// when `ptr` is in none of them (code wasmtime compiled or copied).
    fn release(ptr: *const u8) -> bool {
        let Some(artifact) = crate::runtime::BUILTINS
            .iter()
            .filter_map(|builtin| builtin.precompiled)
            .find(|artifact| artifact.as_ptr_range().contains(&ptr))
        else {
            return false;
        };
        let start = artifact.as_ptr() as usize;
        IN_PLACE.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).retain(|claimed| *claimed != start);
        true
    }

    fn protect(ptr: *const u8, len: usize, prot: libc::c_int) -> wasmtime::Result<()> {
        // SAFETY: wasmtime passes the page-aligned text section of a code
        // image it owns or was given for the component's life; changing
        // its protection touches no other mapping.
        if unsafe { libc::mprotect(ptr as *mut libc::c_void, len, prot) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(())
    }
}

impl wasmtime::CustomCodeMemory for InPlaceCode {
    fn required_alignment(&self) -> usize {
        page_size()
    }

    fn publish_executable(&self, ptr: *const u8, len: usize) -> wasmtime::Result<()> {
        Self::protect(ptr, len, libc::PROT_READ | libc::PROT_EXEC)
    }

    fn unpublish_executable(&self, ptr: *const u8, len: usize) -> wasmtime::Result<()> {
        // The binary's artifacts stay executable (their pages are never
        // writable), and the next load may run them in place again. Code
        // wasmtime copied into a mapping of its own goes back to writable,
        // as wasmtime expects before it unmaps it.
        if Self::release(ptr) {
            return Ok(());
        }
        Self::protect(ptr, len, libc::PROT_READ | libc::PROT_WRITE)
    }
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
///
/// An entry is native code that the server maps and runs, so the cache is
/// used only where no one but the server's own user can have written it:
///
/// * the directory is created `0700`, and refused (with one warning; the
///   server then compiles every component) when it is a symbolic link, is
///   owned by another uid than the server's effective uid, or is writable
///   by its group or by others. It is opened once, checked on that open
///   handle, and every entry is opened relative to the handle, so renaming
///   or replacing the path afterwards does not redirect the cache;
/// * each entry `NAME.cwasm` has a digest file `NAME.cwasm.sha256`, both
///   written through private temporary files and renamed into place (the
///   digest first: an entry never appears before its digest). Both are
///   opened with `O_NOFOLLOW` and must be regular files owned by the
///   server's uid and not writable by group or others;
/// * the digest is SHA-256 over the entry's name (which holds the
///   component's hash and the engine's settings), the component's full
///   hash and the entry's bytes. The bytes are read once, checked, and
///   deserialized from that same buffer.
///
/// An entry that fails any check is reported, deleted if it is ours, and
/// the component is compiled again and written back.
///
/// An entry is written only for a component that compiled *and* loaded
/// (linked and described itself), so a refused upload leaves nothing
/// behind. The directory is kept under a size cap: after each write the
/// least recently used entries (by modification time, which a hit renews)
/// are deleted until the rest fit.
pub struct CompileCache {
    dir: Option<CacheDir>,
    max_bytes: u64,
}

impl CompileCache {
    pub fn new(dir: Option<PathBuf>, max_bytes: u64) -> CompileCache {
        let dir = dir.and_then(|path| match CacheDir::open(&path) {
            Ok(dir) => Some(dir),
            Err(reason) => {
                tracing::warn!(
                    dir = %path.display(),
                    "not using this compile cache directory: {reason}; compiling every component instead"
                );
                None
            }
        });
        CompileCache { dir, max_bytes }
    }

    /// Whether compiled components are kept at all.
    pub fn enabled(&self) -> bool {
        self.dir.is_some()
    }

    /// The compiled component from a valid entry; `None` on a miss (an
    /// entry that fails a check is discarded, and that is a miss too).
    pub fn lookup(&self, engine: &Engine, wasm: &[u8]) -> Option<Component> {
        let dir = self.dir.as_ref()?;
        let entry = Entry::new(engine, wasm);
        match dir.read_verified(&entry) {
            Ok(Some(bytes)) => {
                // SAFETY: `Component::deserialize` checks that the bytes come
                // from a compatible engine, but then maps the machine code in
                // them as executable: crafted bytes would run as native code
                // in this server. These bytes are trusted because
                // (1) the directory was checked on an open handle to be ours
                //     and writable by no one else, so only this uid (or root)
                //     can create or replace a file in it;
                // (2) the entry and its digest were opened relative to that
                //     handle with O_NOFOLLOW and are regular files owned by
                //     this uid, writable by no one else;
                // (3) the digest, bound to this entry's name and component
                //     hash, matches these exact bytes, which are already in
                //     memory: nothing can change them between check and load;
                // (4) only `store` writes entries, with bytes this server
                //     compiled itself or read from its own compile worker
                //     (see `compile_in_worker`), which is as trustworthy as
                //     compiling here.
                // What this does not stop: a process running as this uid or as
                // root can write an entry and a matching digest (the digest is
                // not keyed by a secret). Such a process can as well replace
                // the hangar binary or attach to the server, so the cache is
                // not its easiest way in. The digest does catch torn or
                // truncated writes, an entry copied or linked from another
                // name, and any file put there without its matching digest.
                match unsafe { Component::deserialize(engine, &bytes) } {
                    Ok(component) => {
                        crate::telemetry::compile_cache(true);
                        // Recently used: the last to be evicted.
                        dir.touch(&entry.name);
                        return Some(component);
                    }
                    Err(err) => {
                        tracing::warn!(entry = %entry.name, dir = %dir.path.display(), "discarding a compile cache entry wasmtime refuses: {err:#}");
                        dir.discard(&entry);
                    }
                }
            }
            Ok(None) => {}
            Err(reason) => {
                tracing::warn!(entry = %entry.name, dir = %dir.path.display(), "discarding a compile cache entry: {reason}");
                dir.discard(&entry);
            }
        }
        crate::telemetry::compile_cache(false);
        None
    }

    /// Keeps `artifact`, the compiled form of `wasm` (which has loaded),
    /// then evicts the least recently used entries past the size cap.
    pub fn store(&self, engine: &Engine, wasm: &[u8], artifact: &[u8]) {
        let Some(dir) = &self.dir else { return };
        let entry = Entry::new(engine, wasm);
        // A digest file left from an entry deleted by hand, or a writer's
        // that is about to add the entry, is replaced; a file of another
        // uid is left alone and this component not cached.
        if !(dir.ours_or_absent(&entry.name) && dir.ours_or_absent(&entry.digest_name)) {
            return;
        }
        dir.store(&entry, artifact);
        dir.evict(self.max_bytes, &entry.name);
    }

    /// The compiled component: from the cache, or compiled here and stored
    /// at once (the tests' shortcut; the runtime stores only what loaded).
    #[cfg(test)]
    fn load(&self, engine: &Engine, wasm: &[u8]) -> wasmtime::Result<Component> {
        if let Some(component) = self.lookup(engine, wasm) {
            return Ok(component);
        }
        let component = Component::new(engine, wasm)?;
        self.store(engine, wasm, &component.serialize()?);
        Ok(component)
    }
}

/// Default of `[limits] compile_cache_mb`, in bytes.
pub const DEFAULT_CACHE_BYTES: u64 = 1024 << 20;

/// The names of one component's entry, and what its digest is bound to.
struct Entry {
    name: String,
    digest_name: String,
    wasm_digest: [u8; 32],
}

impl Entry {
    fn new(engine: &Engine, wasm: &[u8]) -> Entry {
        let mut engine_hash = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut engine_hash);
        let wasm_digest: [u8; 32] = Sha256::digest(wasm).into();
        let name = format!("{}-{}-{:016x}.cwasm", hex::encode(&wasm_digest[..16]), WASMTIME_VERSION, engine_hash.finish());
        Entry { digest_name: format!("{name}.sha256"), name, wasm_digest }
    }

    /// What the digest file of this entry holds for `artifact`: hex SHA-256
    /// over the entry's name, the component's hash and the artifact, so an
    /// entry and digest copied from another name do not pass.
    fn digest(&self, artifact: &[u8]) -> String {
        let mut hasher = Sha256::new();
        hasher.update(b"hangar compile cache v1\0");
        hasher.update(self.name.as_bytes());
        hasher.update(b"\0");
        hasher.update(self.wasm_digest);
        hasher.update(artifact);
        hex::encode(hasher.finalize())
    }
}

/// The longest digest file read (64 hex digits and a newline, with room).
const MAX_DIGEST_FILE: u64 = 256;

/// The cache directory, opened once and checked on its handle; every file
/// in it is reached relative to that handle.
struct CacheDir {
    path: PathBuf,
    handle: File,
    uid: u32,
}

impl CacheDir {
    /// Creates the directory `0700` (with its missing parents) and opens it,
    /// or says why it must not be used.
    fn open(path: &Path) -> Result<CacheDir, String> {
        // Rebuilt from its components: a trailing slash would make the
        // kernel follow a symbolic link even with O_NOFOLLOW.
        let path: PathBuf = path.components().collect();
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err("it is a symbolic link".into());
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&path)
            .map_err(|e| format!("cannot create it: {e}"))?;
        let handle = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ELOOP) | Some(libc::ENOTDIR) => "it is a symbolic link or not a directory".to_string(),
                _ => format!("cannot open it: {e}"),
            })?;
        let meta = handle.metadata().map_err(|e| format!("cannot inspect it: {e}"))?;
        let uid = euid();
        if !meta.is_dir() {
            return Err("it is not a directory".into());
        }
        if meta.uid() != uid {
            return Err(format!("it is owned by uid {}, and this server runs as uid {uid}", meta.uid()));
        }
        if meta.mode() & 0o022 != 0 {
            return Err(format!(
                "it is writable by {} (mode {:03o}); make it private with `chmod 700`",
                if meta.mode() & 0o020 != 0 { "its group" } else { "others" },
                meta.mode() & 0o777
            ));
        }
        Ok(CacheDir { path, handle, uid })
    }

    /// The entry's bytes once they pass every check; `None` when there is
    /// no entry; why not otherwise.
    fn read_verified(&self, entry: &Entry) -> Result<Option<Vec<u8>>, String> {
        let Some(bytes) = self.read_private(&entry.name, u64::MAX)? else {
            return Ok(None);
        };
        let recorded = self.read_private(&entry.digest_name, MAX_DIGEST_FILE)?.ok_or("it has no digest file")?;
        if recorded.trim_ascii() != entry.digest(&bytes).as_bytes() {
            return Err("its digest file does not match its contents".into());
        }
        Ok(Some(bytes))
    }

    /// The contents of a regular file of ours, not writable by group or
    /// others, not reached through a symbolic link; `None` if it does not
    /// exist.
    fn read_private(&self, name: &str, max: u64) -> Result<Option<Vec<u8>>, String> {
        // O_NONBLOCK: a FIFO planted under the name must not hang the open.
        let file = match self.open_at(name, libc::O_RDONLY | libc::O_NONBLOCK, 0) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Err(format!("`{name}` is a symbolic link")),
            Err(e) => return Err(format!("cannot open `{name}`: {e}")),
        };
        let meta = file.metadata().map_err(|e| format!("cannot inspect `{name}`: {e}"))?;
        if !meta.is_file() {
            return Err(format!("`{name}` is not a regular file"));
        }
        if meta.uid() != self.uid {
            return Err(format!("`{name}` is owned by uid {}, not by this server's uid {}", meta.uid(), self.uid));
        }
        if meta.mode() & 0o022 != 0 {
            return Err(format!("`{name}` is writable by group or others (mode {:03o})", meta.mode() & 0o777));
        }
        if meta.len() > max {
            return Err(format!("`{name}` is too large ({} bytes)", meta.len()));
        }
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        (&file)
            .take(max.saturating_add(1))
            .read_to_end(&mut bytes)
            .map_err(|e| format!("cannot read `{name}`: {e}"))?;
        if bytes.len() as u64 > max {
            return Err(format!("`{name}` is too large"));
        }
        Ok(Some(bytes))
    }

    /// Whether `name` is free, or a file of ours that writing may replace.
    fn ours_or_absent(&self, name: &str) -> bool {
        match self.owner(name) {
            Ok(None) => true,
            Ok(Some(uid)) if uid == self.uid => true,
            Ok(Some(uid)) => {
                tracing::warn!(dir = %self.path.display(), "`{name}` belongs to uid {uid}: leaving it, and not caching this component");
                false
            }
            Err(e) => {
                tracing::warn!(dir = %self.path.display(), "cannot inspect `{name}`: {e}; not caching this component");
                false
            }
        }
    }

    /// Deletes the entry and its digest file where they are ours; whether
    /// both names are now free to write.
    fn discard(&self, entry: &Entry) -> bool {
        [&entry.name, &entry.digest_name].into_iter().fold(true, |free, name| {
            let gone = self.ours_or_absent(name)
                && match self.unlink_at(name) {
                    Ok(()) => true,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => true,
                    Err(e) => {
                        tracing::warn!(dir = %self.path.display(), "cannot delete `{name}`: {e}");
                        false
                    }
                };
            free && gone
        })
    }

    /// Writes the entry and its digest through private temporary files and
    /// renames, the digest first, so that processes sharing the cache never
    /// see half an entry, nor an entry without its digest (short of a
    /// concurrent rewrite, which the digest check then catches).
    fn store(&self, entry: &Entry, artifact: &[u8]) {
        let digest = format!("{}\n", entry.digest(artifact));
        let mut temporaries = Vec::new();
        let mut result = self.write_temporary(digest.as_bytes()).and_then(|tmp| {
            temporaries.push(tmp.clone());
            self.rename_at(&tmp, &entry.digest_name)
        });
        if result.is_ok() {
            result = self.write_temporary(artifact).and_then(|tmp| {
                temporaries.push(tmp.clone());
                self.rename_at(&tmp, &entry.name)
            });
        }
        if let Err(err) = result {
            for tmp in &temporaries {
                let _ = self.unlink_at(tmp);
            }
            tracing::warn!(entry = %entry.name, dir = %self.path.display(), %err, "cannot write the compile cache");
        }
    }

    /// Renews the entry's modification time: what eviction orders by.
    fn touch(&self, name: &str) {
        let Ok(c_name) = CString::new(name) else { return };
        // SAFETY: a system call on a descriptor `self.handle` keeps open,
        // with a NUL-terminated name that outlives it; a null `times` is
        // "now".
        if unsafe { libc::utimensat(self.handle.as_raw_fd(), c_name.as_ptr(), std::ptr::null(), libc::AT_SYMLINK_NOFOLLOW) } < 0 {
            tracing::debug!(dir = %self.path.display(), "cannot renew `{name}`: {}", std::io::Error::last_os_error());
        }
    }

    /// Deletes the least recently used entries (and their digests) of ours
    /// until the entries take at most `max_bytes`; `keep`, just written,
    /// stays even when it alone is over.
    fn evict(&self, max_bytes: u64, keep: &str) {
        // The directory read through its handle, not its path.
        let listing = match std::fs::read_dir(format!("/proc/self/fd/{}", self.handle.as_raw_fd())) {
            Ok(listing) => listing,
            Err(e) => {
                tracing::warn!(dir = %self.path.display(), "cannot list the compile cache to bound its size: {e}");
                return;
            }
        };
        let size_of = |name: &str| -> Option<std::fs::Metadata> {
            let meta = self.open_at(name, libc::O_PATH, 0).ok()?.metadata().ok()?;
            (meta.is_file() && meta.uid() == self.uid).then_some(meta)
        };
        let mut entries: Vec<(i64, i64, u64, String)> = listing
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|name| name.ends_with(".cwasm") && !name.starts_with('.'))
            .filter_map(|name| {
                let meta = size_of(&name)?;
                let digest = size_of(&format!("{name}.sha256")).map_or(0, |m| m.len());
                Some((meta.mtime(), meta.mtime_nsec(), meta.len() + digest, name))
            })
            .collect();
        let mut total: u64 = entries.iter().map(|e| e.2).sum();
        if total <= max_bytes {
            return;
        }
        entries.sort();
        for (_, _, size, name) in entries {
            if total <= max_bytes {
                break;
            }
            if name == keep {
                continue;
            }
            // The entry first: an entry never stands without its digest.
            match self.unlink_at(&name) {
                Ok(()) => {
                    let _ = self.unlink_at(&format!("{name}.sha256"));
                    total -= size;
                    tracing::info!(entry = %name, dir = %self.path.display(), "evicted from the compile cache (least recently used)");
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => total -= size,
                Err(e) => tracing::warn!(dir = %self.path.display(), "cannot evict `{name}`: {e}"),
            }
        }
    }

    /// A new file `0600` under a name no one else uses, holding `bytes`.
    fn write_temporary(&self, bytes: &[u8]) -> std::io::Result<String> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
        let name = format!(".tmp-{}-{}-{nanos}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let mut file = self.open_at(&name, libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL, 0o600)?;
        if let Err(e) = file.write_all(bytes) {
            let _ = self.unlink_at(&name);
            return Err(e);
        }
        Ok(name)
    }

    /// The owner of `name` itself (not of what a symbolic link points to),
    /// or `None` if it does not exist.
    fn owner(&self, name: &str) -> std::io::Result<Option<u32>> {
        match self.open_at(name, libc::O_PATH, 0) {
            Ok(file) => Ok(Some(file.metadata()?.uid())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// `openat` on the directory's handle, never following a symbolic link
    /// at `name`.
    fn open_at(&self, name: &str, flags: libc::c_int, mode: libc::mode_t) -> std::io::Result<File> {
        let name = CString::new(name)?;
        // SAFETY: a system call on a descriptor that `self.handle` keeps
        // open, with a NUL-terminated name that outlives the call.
        let fd = unsafe {
            libc::openat(
                self.handle.as_raw_fd(),
                name.as_ptr(),
                flags | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                libc::c_uint::from(mode),
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just opened, and nothing else owns it.
        Ok(unsafe { File::from_raw_fd(fd) })
    }

    fn rename_at(&self, from: &str, to: &str) -> std::io::Result<()> {
        let (from, to) = (CString::new(from)?, CString::new(to)?);
        let dir = self.handle.as_raw_fd();
        // SAFETY: as in `open_at`.
        if unsafe { libc::renameat(dir, from.as_ptr(), dir, to.as_ptr()) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    fn unlink_at(&self, name: &str) -> std::io::Result<()> {
        let name = CString::new(name)?;
        // SAFETY: as in `open_at`.
        if unsafe { libc::unlinkat(self.handle.as_raw_fd(), name.as_ptr(), 0) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// The server's effective uid.
fn euid() -> u32 {
    // SAFETY: `geteuid` has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{PermissionsExt, symlink};

    use super::*;

    fn engine() -> Engine {
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        Engine::new(&config).unwrap()
    }

    fn builtin(name: &str) -> &'static [u8] {
        crate::runtime::BUILTINS.iter().find(|b| b.name == name).unwrap().wasm
    }

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().mode() & 0o777
    }

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    /// Files in `dir`, sorted.
    fn listing(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        names
    }

    fn running_as_root() -> bool {
        euid() == 0
    }

    #[test]
    fn a_fresh_directory_is_created_private_with_its_parents() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b/compiled");
        let cache = CompileCache::new(Some(dir.clone()), DEFAULT_CACHE_BYTES);
        assert!(cache.dir.is_some());
        for path in [tmp.path().join("a"), tmp.path().join("a/b"), dir] {
            assert_eq!(mode(&path), 0o700, "{}", path.display());
        }
    }

    #[test]
    fn a_directory_writable_by_group_or_others_is_refused_and_left_alone() {
        let engine = engine();
        for bad in [0o777, 0o770, 0o702, 0o720] {
            let tmp = tempfile::tempdir().unwrap();
            chmod(tmp.path(), bad);
            let cache = CompileCache::new(Some(tmp.path().into()), DEFAULT_CACHE_BYTES);
            assert!(cache.dir.is_none(), "mode {bad:03o} must be refused");
            cache.load(&engine, builtin("read")).expect("compiles without the cache");
            assert!(listing(tmp.path()).is_empty(), "nothing written in a refused directory");
        }
        // Readable by others is not a way in.
        let tmp = tempfile::tempdir().unwrap();
        chmod(tmp.path(), 0o755);
        assert!(CompileCache::new(Some(tmp.path().into()), DEFAULT_CACHE_BYTES).dir.is_some());
    }

    #[test]
    fn a_symlinked_directory_is_refused() {
        let engine = engine();
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        std::fs::DirBuilder::new().mode(0o700).create(&real).unwrap();
        let link = tmp.path().join("link");
        symlink(&real, &link).unwrap();
        for path in [link.clone(), tmp.path().join("link/"), tmp.path().join("link/.")] {
            let cache = CompileCache::new(Some(path.clone()), DEFAULT_CACHE_BYTES);
            assert!(cache.dir.is_none(), "{} must be refused", path.display());
            cache.load(&engine, builtin("read")).unwrap();
        }
        assert!(listing(&real).is_empty());
        // A dangling link is refused too, not created through.
        let dangling = tmp.path().join("dangling");
        symlink(tmp.path().join("nowhere"), &dangling).unwrap();
        assert!(CompileCache::new(Some(dangling), DEFAULT_CACHE_BYTES).dir.is_none());
        assert!(!tmp.path().join("nowhere").exists());
    }

    #[test]
    fn a_directory_of_another_user_is_refused() {
        if !running_as_root() {
            eprintln!("skipped: needs root to give a directory to another uid");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("theirs");
        std::fs::DirBuilder::new().mode(0o700).create(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(65534), None).unwrap();
        assert!(CompileCache::new(Some(dir), DEFAULT_CACHE_BYTES).dir.is_none());
    }

    /// A cache in a fresh directory with entries for `read` and `grep`.
    struct Populated {
        _tmp: tempfile::TempDir,
        path: PathBuf,
        cache: CompileCache,
        engine: Engine,
        read: Entry,
        grep: Entry,
    }

    impl Populated {
        fn new() -> Populated {
            let tmp = tempfile::tempdir().unwrap();
            let path = tmp.path().join("cache");
            let engine = engine();
            let cache = CompileCache::new(Some(path.clone()), DEFAULT_CACHE_BYTES);
            cache.load(&engine, builtin("read")).unwrap();
            cache.load(&engine, builtin("grep")).unwrap();
            let (read, grep) = (Entry::new(&engine, builtin("read")), Entry::new(&engine, builtin("grep")));
            Populated { _tmp: tmp, path, cache, engine, read, grep }
        }

        fn dir(&self) -> &CacheDir {
            self.cache.dir.as_ref().unwrap()
        }

        fn file(&self, name: &str) -> PathBuf {
            self.path.join(name)
        }

        /// Plants something under `read`'s names with `plant`, checks the
        /// cache refuses it, then that loading `read` replaces it with a
        /// valid entry of `read`.
        fn refuses(&self, what: &str, plant: impl FnOnce(&Populated)) {
            self.refuses_at(what, Check::Files, plant)
        }

        fn refuses_at(&self, what: &str, check: Check, plant: impl FnOnce(&Populated)) {
            let good = std::fs::read(self.file(&self.read.name)).unwrap();
            plant(self);
            // (Read only a regular file: opening a planted FIFO would hang.)
            let path = self.file(&self.read.name);
            let planted = std::fs::metadata(&path).is_ok_and(|m| m.is_file()).then(|| std::fs::read(&path).unwrap());
            match (check, self.dir().read_verified(&self.read)) {
                (Check::Files, Err(err)) => eprintln!("{what}: {err}"),
                // Bytes under a well-bound digest get to wasmtime, whose own
                // header check must refuse them.
                (Check::Wasmtime, Ok(Some(bytes))) => {
                    // SAFETY: a test's own short garbage, which fails
                    // wasmtime's header check before anything is mapped.
                    assert!(unsafe { Component::deserialize(&self.engine, &bytes) }.is_err(), "{what}")
                }
                (_, other) => panic!("{what}: {:?}", other.map(|b| b.map(|b| b.len()))),
            }
            self.cache.load(&self.engine, builtin("read")).unwrap_or_else(|e| panic!("{what}: {e}"));
            let meta = std::fs::symlink_metadata(self.file(&self.read.name)).unwrap();
            assert!(meta.is_file(), "{what}: a regular file again");
            assert_eq!(meta.uid(), euid(), "{what}");
            assert_eq!(meta.mode() & 0o777, 0o600, "{what}");
            let now = self.dir().read_verified(&self.read).unwrap_or_else(|e| panic!("{what}: {e}")).expect(what);
            assert!(now == good, "{what}: rewritten with `read`'s compiled code");
            if let Some(planted) = &planted {
                assert!(*planted == good || now != *planted, "{what}");
            }
        }
    }

    #[derive(Clone, Copy)]
    enum Check {
        /// The file checks or the digest refuse it.
        Files,
        /// It passes those, and wasmtime refuses it.
        Wasmtime,
    }

    #[test]
    fn entries_round_trip_and_a_hit_is_not_rewritten() {
        let p = Populated::new();
        let names = listing(&p.path);
        for entry in [&p.read, &p.grep] {
            assert!(names.contains(&entry.name) && names.contains(&entry.digest_name), "{names:?}");
            assert_eq!(mode(&p.file(&entry.name)), 0o600);
            assert_eq!(mode(&p.file(&entry.digest_name)), 0o600);
        }
        assert_eq!(names.len(), 4, "no temporary file left: {names:?}");
        let inode = std::fs::metadata(p.file(&p.read.name)).unwrap().ino();
        let again = CompileCache::new(Some(p.path.clone()), DEFAULT_CACHE_BYTES);
        again.load(&p.engine, builtin("read")).unwrap();
        assert_eq!(std::fs::metadata(p.file(&p.read.name)).unwrap().ino(), inode, "a valid entry is used as is");
    }

    #[test]
    fn entries_that_fail_a_check_are_discarded_and_rewritten() {
        let p = Populated::new();
        let copy = |from: &str, to: &str| std::fs::copy(p.file(from), p.file(to)).map(|_| ()).unwrap();
        p.refuses("another component's entry and digest copied under this name", |p| {
            copy(&p.grep.name, &p.read.name);
            copy(&p.grep.digest_name, &p.read.digest_name);
        });
        p.refuses("another component's entry with a plain SHA-256 of it", |p| {
            copy(&p.grep.name, &p.read.name);
            let bytes = std::fs::read(p.file(&p.read.name)).unwrap();
            std::fs::write(p.file(&p.read.digest_name), hex::encode(Sha256::digest(&bytes))).unwrap();
        });
        p.refuses("another component's entry under this entry's digest", |p| copy(&p.grep.name, &p.read.name));
        p.refuses("garbage with a plain SHA-256 of it", |p| {
            std::fs::write(p.file(&p.read.name), b"not a compiled component").unwrap();
            std::fs::write(p.file(&p.read.digest_name), hex::encode(Sha256::digest(b"not a compiled component"))).unwrap();
        });
        p.refuses_at("garbage under a correctly bound digest", Check::Wasmtime, |p| {
            std::fs::write(p.file(&p.read.name), b"garbage").unwrap();
            std::fs::write(p.file(&p.read.digest_name), p.read.digest(b"garbage")).unwrap();
        });
        p.refuses("a digest file that does not match", |p| {
            std::fs::write(p.file(&p.read.digest_name), "0".repeat(64)).unwrap();
        });
        p.refuses("no digest file", |p| std::fs::remove_file(p.file(&p.read.digest_name)).unwrap());
        p.refuses("a truncated entry", |p| {
            let bytes = std::fs::read(p.file(&p.read.name)).unwrap();
            std::fs::write(p.file(&p.read.name), &bytes[..bytes.len() / 2]).unwrap();
        });
        p.refuses("an entry writable by others", |p| chmod(&p.file(&p.read.name), 0o666));
        p.refuses("a digest file writable by its group", |p| chmod(&p.file(&p.read.digest_name), 0o620));
        p.refuses("an entry that is a symbolic link to another entry", |p| {
            std::fs::remove_file(p.file(&p.read.name)).unwrap();
            symlink(p.file(&p.grep.name), p.file(&p.read.name)).unwrap();
            copy(&p.grep.digest_name, &p.read.digest_name);
        });
        p.refuses("a digest file that is a symbolic link", |p| {
            let digest = std::fs::read(p.file(&p.read.digest_name)).unwrap();
            std::fs::write(p.file("elsewhere"), digest).unwrap();
            std::fs::remove_file(p.file(&p.read.digest_name)).unwrap();
            symlink(p.file("elsewhere"), p.file(&p.read.digest_name)).unwrap();
        });
        p.refuses("a FIFO under the entry's name (must not hang)", |p| {
            std::fs::remove_file(p.file(&p.read.name)).unwrap();
            let name = CString::new(p.file(&p.read.name).into_os_string().into_encoded_bytes()).unwrap();
            // SAFETY: a NUL-terminated path that outlives the call.
            assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
        });
    }

    #[test]
    fn the_compile_workers_artifacts_load_in_the_servers_pooling_engine() {
        // What `hangar compile-worker` produces (no pool) must be accepted
        // by the server's engine (with the pool): the worker relies on it.
        let artifact = compile_engine().unwrap().precompile_component(builtin("read")).unwrap();
        let server = build_engine(PoolSize { instances: 4, ..Default::default() }).unwrap();
        // SAFETY: bytes just compiled by this process from a built-in.
        unsafe { Component::deserialize(&server, &artifact) }.expect("the pooling engine loads the worker's artifact");
    }

    #[test]
    fn the_cache_stays_under_its_cap_evicting_the_least_recently_used() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("cache");
        let engine = engine();
        let names = ["read", "grep", "glob"];
        let artifacts: Vec<Vec<u8>> =
            names.iter().map(|n| Component::new(&engine, builtin(n)).unwrap().serialize().unwrap()).collect();
        let entry_size = |i: usize| artifacts[i].len() as u64 + 65;
        // Room for the two largest entries with their digests, not three.
        let mut sizes: Vec<u64> = (0..3).map(entry_size).collect();
        sizes.sort();
        let cap = sizes[1] + sizes[2] + 100;
        assert!(cap < sizes.iter().sum::<u64>());
        let cache = CompileCache::new(Some(path.clone()), cap);
        let entry = |i: usize| Entry::new(&engine, builtin(names[i]));
        let set_mtime = |name: &str, secs: i64| {
            let c = CString::new(path.join(name).into_os_string().into_encoded_bytes()).unwrap();
            let times = [libc::timespec { tv_sec: secs, tv_nsec: 0 }, libc::timespec { tv_sec: secs, tv_nsec: 0 }];
            // SAFETY: a NUL-terminated path and two timespecs that outlive the call.
            assert_eq!(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), 0) }, 0);
        };
        cache.store(&engine, builtin("read"), &artifacts[0]);
        cache.store(&engine, builtin("grep"), &artifacts[1]);
        // `read` is the older entry, but a hit makes it the most recent:
        // `grep` is then the least recently used.
        set_mtime(&entry(0).name, 900_000_000);
        set_mtime(&entry(1).name, 1_000_000_000);
        assert!(cache.lookup(&engine, builtin("read")).is_some(), "a hit");
        cache.store(&engine, builtin("glob"), &artifacts[2]);

        let names_now = listing(&path);
        let total: u64 = names_now.iter().map(|n| std::fs::metadata(path.join(n)).unwrap().len()).sum();
        assert!(total <= cap, "{total} bytes over the cap of {cap}: {names_now:?}");
        for (i, kept) in [(0, true), (1, false), (2, true)] {
            let e = entry(i);
            assert_eq!(names_now.contains(&e.name), kept, "{}: {names_now:?}", names[i]);
            assert_eq!(names_now.contains(&e.digest_name), kept, "{}'s digest: {names_now:?}", names[i]);
        }
        assert!(cache.lookup(&engine, builtin("glob")).is_some());
        assert!(cache.lookup(&engine, builtin("grep")).is_none(), "evicted");

        // An entry alone over the cap is still kept: it was just written.
        let tiny = CompileCache::new(Some(tmp.path().join("tiny")), 1);
        tiny.store(&engine, builtin("read"), &artifacts[0]);
        assert!(tiny.lookup(&engine, builtin("read")).is_some());
    }

    #[test]
    fn an_entry_of_another_user_is_neither_used_nor_deleted_nor_replaced() {
        if !running_as_root() {
            eprintln!("skipped: needs root to give a file to another uid");
            return;
        }
        let p = Populated::new();
        std::fs::copy(p.file(&p.grep.name), p.file(&p.read.name)).unwrap();
        std::fs::copy(p.file(&p.grep.digest_name), p.file(&p.read.digest_name)).unwrap();
        std::os::unix::fs::chown(p.file(&p.read.name), Some(65534), None).unwrap();
        let planted = std::fs::read(p.file(&p.read.name)).unwrap();
        assert!(p.dir().read_verified(&p.read).is_err());
        p.cache.load(&p.engine, builtin("read")).unwrap();
        assert_eq!(std::fs::read(p.file(&p.read.name)).unwrap(), planted, "left as it was");
        assert_eq!(std::fs::metadata(p.file(&p.read.name)).unwrap().uid(), 65534);
    }
}
