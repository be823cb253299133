//! Compiling untrusted components in a child process with a time and a
//! memory bound.
//!
//! A valid component can be crafted to be slow to compile: one huge
//! function took Cranelift 22 s and 3.8 GB at 1 MB, and minutes and 8 GB
//! at 3 MB. Compiled in the server, such an upload held a core and most of
//! the machine's memory, could not be stopped when its client left, and
//! kept the server from exiting on SIGTERM. So every component that is not
//! built into the binary is compiled by `hangar compile-worker`: the same
//! binary, fed the component on stdin, writing the compiled artifact on
//! stdout. The server bounds it (`RLIMIT_DATA`, a wall-clock timeout),
//! kills it when the compile is no longer wanted (the upload's future is
//! dropped, or the server stops), and it dies with the server
//! (`PR_SET_PDEATHSIG`). Cranelift's working memory also goes away with the
//! worker instead of staying in the server's malloc arenas.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `[limits] compile_*`: how components are compiled.
#[derive(Debug, Clone)]
pub struct CompileSettings {
    /// The `hangar` binary to run as `PROGRAM compile-worker`; it must be
    /// this very build (the server passes `/proc/self/exe`). `None`:
    /// compile in this process, without bounds, which suits only
    /// components the embedder trusts (the library's own tests and
    /// benchmarks); built-in plugins are always compiled in process.
    pub worker: Option<PathBuf>,
    /// Wall-clock time one compile may take.
    pub timeout: Duration,
    /// Memory (`RLIMIT_DATA`) of one compile.
    pub memory_bytes: u64,
    /// Compiles running at once, server-wide; more wait their turn.
    pub max_concurrent: usize,
    /// Size of the compile cache directory.
    pub cache_bytes: u64,
}

// Generous: a componentize-py tool (19 MB, an interpreter inside) takes
// 40 to 60 s to compile on two busy cores, and must not be refused.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);
pub const DEFAULT_MEMORY_BYTES: u64 = 4096 << 20;
pub const DEFAULT_MAX_CONCURRENT: usize = 2;

impl Default for CompileSettings {
    fn default() -> Self {
        CompileSettings {
            worker: None,
            timeout: DEFAULT_TIMEOUT,
            memory_bytes: DEFAULT_MEMORY_BYTES,
            max_concurrent: DEFAULT_MAX_CONCURRENT,
            cache_bytes: super::engine::DEFAULT_CACHE_BYTES,
        }
    }
}

/// Why a compile in the worker gave no artifact.
#[derive(Debug)]
pub enum Failure {
    Timeout(Duration),
    Memory(u64),
    /// The component is not valid (wasmtime's message).
    Invalid(String),
    /// The compiler crashed on the component (killed by a signal).
    Crashed(String),
    /// The worker could not be run: the server's problem, not the component's.
    Worker(String),
}

/// The worker's exit status when the compile ran out of memory and said
/// so (an allocation that fails in Rust aborts instead, see `classify`).
const EXIT_OUT_OF_MEMORY: u8 = 3;
/// How much of the worker's standard error is kept for the message.
const STDERR_CAP: usize = 16 << 10;

/// `hangar compile-worker`: the component on stdin, the serialized
/// compiled component on stdout; on failure, the reason on stderr.
pub fn worker_main() -> ExitCode {
    let mut wasm = Vec::new();
    if let Err(e) = std::io::stdin().lock().read_to_end(&mut wasm) {
        eprintln!("cannot read the component: {e}");
        return ExitCode::FAILURE;
    }
    match super::engine::compile_engine().and_then(|engine| engine.precompile_component(&wasm)) {
        Ok(artifact) => {
            let mut out = std::io::stdout().lock();
            if let Err(e) = out.write_all(&artifact).and_then(|()| out.flush()) {
                eprintln!("cannot write the compiled component: {e}");
                return ExitCode::FAILURE;
            }
            ExitCode::SUCCESS
        }
        Err(err) => {
            let text = format!("{err:#}");
            eprint!("{text}");
            let out_of_memory = err.chain().any(|cause| {
                cause.downcast_ref::<std::io::Error>().is_some_and(|e| e.raw_os_error() == Some(libc::ENOMEM))
            }) || mentions_out_of_memory(&text);
            if out_of_memory { ExitCode::from(EXIT_OUT_OF_MEMORY) } else { ExitCode::FAILURE }
        }
    }
}

/// What the C library and Rust's allocator say when memory runs out.
fn mentions_out_of_memory(text: &str) -> bool {
    text.contains("memory allocation of") || text.contains("Cannot allocate memory") || text.contains("os error 12")
}

/// Compiles `wasm` in a worker started from `program`, within `settings`'
/// bounds. Dropping the returned future kills the worker.
pub async fn in_worker(program: &Path, settings: &CompileSettings, wasm: &[u8]) -> Result<Vec<u8>, Failure> {
    let mut command = tokio::process::Command::new(program);
    command
        .arg("compile-worker")
        // Nothing of the server's environment (keys, tokens) is needed.
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let memory = settings.memory_bytes;
    // SAFETY: `getpid` has no preconditions and cannot fail.
    let server = unsafe { libc::getpid() };
    // SAFETY: the closure runs between fork and exec and only makes system
    // calls (prctl, getppid, setrlimit), with no allocation.
    unsafe {
        command.pre_exec(move || {
            // If the server dies (even by SIGKILL), so does the worker.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // It may have died before the line above took effect.
            if libc::getppid() != server {
                return Err(std::io::Error::other("the server is gone"));
            }
            for (resource, value) in [(libc::RLIMIT_DATA, memory), (libc::RLIMIT_CORE, 0)] {
                let limit = libc::rlimit { rlim_cur: value, rlim_max: value };
                if libc::setrlimit(resource, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = command.spawn().map_err(|e| Failure::Worker(format!("cannot start the compile worker {}: {e}", program.display())))?;
    let (Some(mut stdin), Some(mut stdout), Some(mut stderr)) = (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return Err(Failure::Worker("the compile worker has no pipes".into()));
    };
    let exchange = async {
        let feed = async move {
            // A worker that stops reading has failed; its exit says why.
            let _ = stdin.write_all(wasm).await;
            drop(stdin);
        };
        let mut artifact = Vec::new();
        let read = stdout.read_to_end(&mut artifact);
        let errors = read_capped(&mut stderr, STDERR_CAP);
        let ((), read, errors) = tokio::join!(feed, read, errors);
        (read.map(|_| artifact), errors)
    };
    let (artifact, errors) = match tokio::time::timeout(settings.timeout, exchange).await {
        Ok(done) => done,
        Err(_) => {
            let _ = child.start_kill();
            // Reaped before the caller hears of it: no process is left.
            let _ = child.wait().await;
            return Err(Failure::Timeout(settings.timeout));
        }
    };
    // Its output is closed: it is exiting, or about to.
    let status = match tokio::time::timeout(Duration::from_secs(5), child.wait()).await {
        Ok(Ok(status)) => status,
        Ok(Err(e)) => return Err(Failure::Worker(format!("cannot wait for the compile worker: {e}"))),
        Err(_) => {
            let _ = child.start_kill();
            let _ = child.wait().await;
            return Err(Failure::Worker("the compile worker closed its output but did not exit".into()));
        }
    };
    classify(status, artifact, &errors, settings.memory_bytes)
}

/// The artifact, or why there is none, from how the worker ended.
fn classify(
    status: std::process::ExitStatus,
    artifact: std::io::Result<Vec<u8>>,
    errors: &str,
    memory_bytes: u64,
) -> Result<Vec<u8>, Failure> {
    use std::os::unix::process::ExitStatusExt;
    if status.success() {
        return artifact.map_err(|e| Failure::Worker(format!("cannot read the compiled component: {e}")));
    }
    if status.code() == Some(i32::from(EXIT_OUT_OF_MEMORY)) || mentions_out_of_memory(errors) {
        return Err(Failure::Memory(memory_bytes));
    }
    match status.signal() {
        Some(signal) => Err(Failure::Crashed(format!("signal {signal}: {}", errors.trim()))),
        None => Err(Failure::Invalid(errors.trim().to_string())),
    }
}

/// Reads `reader` to its end, keeping the first `cap` bytes (the rest is
/// drained so the writer never blocks), as lossy UTF-8.
async fn read_capped(reader: &mut (impl AsyncReadExt + Unpin), cap: usize) -> String {
    let mut kept = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = reader.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let room = cap.saturating_sub(kept.len());
        kept.extend_from_slice(&buf[..n.min(room)]);
    }
    String::from_utf8_lossy(&kept).into_owned()
}
