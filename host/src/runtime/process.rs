//! The `process` capability: `bash -c` in the session's working directory,
//! with a reduced environment, a timeout and an output cap, confined by the
//! kernel:
//!
//! * **Landlock** (applied in the child before `exec`, inherited by
//!   everything it starts): read and execute on the system directories,
//!   read-write on the working directory and a private temporary directory
//!   (`TMPDIR`), read-write on a few harmless devices (`/dev/null`, ...),
//!   nothing else. It also scopes signals and abstract UNIX sockets to the
//!   sandbox, so a command cannot signal or talk to the host's processes.
//! * **A new PID namespace** (`unshare --pid --fork --kill-child` from
//!   util-linux): `bash` is its PID 1, and when PID 1 exits or is killed the
//!   kernel kills every process in the namespace, including ones that
//!   called `setsid` or double-forked. So nothing outlives the call.
//!
//! The host also owns the process group and kills it on timeout or when the
//! call is cancelled. Where the kernel lacks either mechanism the command
//! runs without it and a warning is logged once; an operator who sets
//! `Policy::require_confinement` gets no `process` grant at all instead
//! (see `policy.rs`).

use std::collections::VecDeque;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use landlock::{
    ABI, Access, AccessFs, CompatLevel, Compatible, RestrictionStatus, Ruleset, RulesetAttr, RulesetCreated,
    RulesetCreatedAttr, RulesetError, RulesetStatus, Scope, path_beneath_rules,
};

use super::bindings::wit_process::{Command, Host, Outcome};
use super::state::PluginState;

const MAX_TIMEOUT: Duration = Duration::from_secs(600);
const MAX_OUTPUT: usize = 1 << 20;
/// How long to wait for output after the command ended, in case a process
/// that left the group still holds the pipe open (only possible without a
/// PID namespace).
const DRAIN_GRACE: Duration = Duration::from_secs(2);
/// How long to wait for a killed command's processes to be gone before the
/// call returns anyway.
const REAP_GRACE: Duration = Duration::from_secs(5);

/// The Landlock ABI whose rights this file was written and tested against;
/// newer kernels get these rights, older ones as many as they know.
const LANDLOCK_ABI: ABI = ABI::V6;

/// Read and execute: programs, libraries, configuration.
const SYSTEM_DIRS: &[&str] = &["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc"];
/// Devices scripts expect to write to or read from; none reveals anything.
const DEVICES: &[&str] = &["/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"];
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What a call granted `process` may run in.
pub struct ProcessAccess {
    pub work_dir: Option<PathBuf>,
}

/// How this machine confines commands. Probed once per process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confinement {
    /// Landlock can restrict filesystem access (the kernel has it enabled).
    pub landlock: bool,
    /// `unshare` can put a command in its own PID namespace.
    pub pid_namespace: bool,
    unshare: Option<PathBuf>,
}

impl Confinement {
    /// Both mechanisms are in place.
    pub fn is_complete(&self) -> bool {
        self.landlock && self.pid_namespace
    }

    /// One line for operators: what commands run under.
    pub fn describe(&self) -> String {
        match (self.landlock, self.pid_namespace) {
            (true, true) => "confined (Landlock and a PID namespace)".into(),
            (true, false) => "partly confined: Landlock, but no PID namespace (background processes may outlive a call)".into(),
            (false, true) => "partly confined: a PID namespace, but no Landlock (commands can read and write outside the working directory)".into(),
            (false, false) => "unconfined: no Landlock and no PID namespace".into(),
        }
    }
}

/// The confinement commands get on this machine. The first call probes the
/// kernel and logs a warning when confinement is incomplete.
pub fn confinement() -> &'static Confinement {
    static PROBE: OnceLock<Confinement> = OnceLock::new();
    PROBE.get_or_init(|| {
        let found = Confinement { landlock: landlock_works(), pid_namespace: false, unshare: find_unshare() };
        let pid_namespace = found.unshare.as_deref().is_some_and(pid_namespace_works);
        let found = Confinement { pid_namespace, ..found };
        if found.is_complete() {
            tracing::info!("bash commands are {}", found.describe());
        } else {
            tracing::warn!("bash commands are {}", found.describe());
        }
        found
    })
}

/// A ruleset that must be enforced fully can only be created where the
/// kernel has Landlock enabled.
fn landlock_works() -> bool {
    Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(AccessFs::from_all(ABI::V1))
        .and_then(|r| r.create())
        .is_ok()
}

fn find_unshare() -> Option<PathBuf> {
    ["/usr/bin/unshare", "/bin/unshare", "/usr/sbin/unshare"].iter().map(PathBuf::from).find(|p| p.exists())
}

/// Creating a PID namespace needs privileges (root, or user namespaces)
/// that a container may withhold: try it once.
fn pid_namespace_works(unshare: &Path) -> bool {
    std::process::Command::new(unshare)
        .args(["--pid", "--fork", "--kill-child", "--", "true"])
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The Landlock ruleset of one command.
fn ruleset(work_dir: &Path, tmp: &Path) -> Result<RulesetCreated, RulesetError> {
    let all = AccessFs::from_all(LANDLOCK_ABI);
    Ruleset::default()
        .handle_access(all)?
        .scope(Scope::from_all(LANDLOCK_ABI))?
        .create()?
        // `path_beneath_rules` skips paths that do not exist (`/lib32`, ...).
        .add_rules(path_beneath_rules(SYSTEM_DIRS, AccessFs::from_read(LANDLOCK_ABI)))?
        .add_rules(path_beneath_rules(DEVICES, all))?
        .add_rules(path_beneath_rules([work_dir, tmp], all))
}

impl Host for PluginState {
    async fn run(&mut self, cmd: Command) -> wasmtime::Result<Result<Outcome, String>> {
        let Some(access) = &self.process else {
            return Ok(Err(format!("plugin `{}` is not granted process", self.plugin)));
        };
        let Some(work_dir) = access.work_dir.clone() else {
            return Ok(Err("this session has no working directory".into()));
        };
        Ok(run(work_dir, cmd).await.map_err(|err| format!("cannot run the command: {err}")))
    }
}

/// Kills the whole process group when dropped: on completion, on timeout,
/// and when the calling future is cancelled. With a PID namespace the
/// group holds its PID 1, whose death takes the whole namespace down.
struct KillGroup(i32);

impl Drop for KillGroup {
    fn drop(&mut self) {
        if self.0 > 0 {
            // SAFETY: plain syscall; the group id is the pid of our own child.
            unsafe {
                libc::killpg(self.0, libc::SIGKILL);
            }
        }
    }
}

async fn run(work_dir: PathBuf, cmd: Command) -> std::io::Result<Outcome> {
    let timeout = Duration::from_millis(cmd.timeout_ms.max(1).into()).min(MAX_TIMEOUT);
    let cap = (cmd.max_output_bytes as usize).clamp(256, MAX_OUTPUT);
    let confinement = confinement();
    // The command's own temporary directory: the only writable place
    // besides the working directory. Removed when the call returns.
    let tmp = tempfile::Builder::new().prefix("hangar-bash-").tempdir()?;
    let ruleset = if confinement.landlock {
        Some(ruleset(&work_dir, tmp.path()).map_err(std::io::Error::other)?)
    } else {
        None
    };
    let (reader, writer) = std::io::pipe()?;

    let mut command = match (&confinement.unshare, confinement.pid_namespace) {
        (Some(unshare), true) => {
            let mut c = tokio::process::Command::new(unshare);
            c.args(["--pid", "--fork", "--kill-child", "--", "bash", "-c"]);
            c
        }
        _ => {
            let mut c = tokio::process::Command::new("bash");
            c.arg("-c");
            c
        }
    };
    command
        .arg(&cmd.script)
        .current_dir(&work_dir)
        // Nothing of the server's environment (keys above all) reaches the command.
        .env_clear()
        .env("PATH", PATH)
        .env("HOME", &work_dir)
        .env("LANG", "C.UTF-8")
        .env("TERM", "dumb")
        .env("TMPDIR", tmp.path())
        .stdin(Stdio::null())
        .stdout(writer.try_clone()?)
        .stderr(writer)
        .process_group(0)
        .kill_on_drop(true);
    if let Some(ruleset) = ruleset {
        // The ruleset is built here, in the parent; the child only makes
        // the two system calls that enforce it (no allocation after fork).
        let slot = Mutex::new(Some(ruleset));
        // SAFETY: the closure runs between fork and exec; it takes an
        // uncontended lock (nothing in this copy of the process holds it)
        // and calls prctl and landlock_restrict_self.
        unsafe {
            command.pre_exec(move || {
                let ruleset = slot.lock().ok().and_then(|mut s| s.take());
                match ruleset.map(RulesetCreated::restrict_self) {
                    Some(Ok(RestrictionStatus { ruleset: RulesetStatus::FullyEnforced | RulesetStatus::PartiallyEnforced, .. })) => Ok(()),
                    // Fail closed: a command that should be confined and is not never runs.
                    _ => Err(std::io::Error::other("Landlock could not be enforced")),
                }
            });
        }
    }
    let mut child = command.spawn()?;
    // The command keeps copies of the pipe's write end: drop them, or the
    // reader never sees the end of the output.
    drop(command);
    let pgid = child.id().map(|id| id as i32).unwrap_or(-1);
    let group = KillGroup(pgid);
    let mut reading = tokio::task::spawn_blocking(move || read_capped(reader, cap));

    let (exit_code, timed_out) = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => (status?.code(), false),
        Err(_) => (None, true),
    };
    drop(group);
    if timed_out {
        let _ = child.wait().await;
        wait_group_gone(pgid).await;
    }
    let (output, truncated) = match tokio::time::timeout(DRAIN_GRACE, &mut reading).await {
        Ok(Ok(result)) => result,
        _ => {
            reading.abort();
            ("(output unavailable: a process that left the command's group still holds it)".into(), false)
        }
    };
    Ok(Outcome { output, exit_code, timed_out, truncated })
}

/// Waits until no process of the group is left (its PID 1 is reaped only
/// after the kernel has killed the rest of its namespace), so that a call
/// that returns leaves nothing running.
async fn wait_group_gone(pgid: i32) {
    if pgid <= 0 {
        return;
    }
    let started = std::time::Instant::now();
    // SAFETY: signal 0 only checks whether the group has members.
    while unsafe { libc::kill(-pgid, 0) } == 0 && started.elapsed() < REAP_GRACE {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Reads everything, keeping the first and the last `cap / 2` bytes.
fn read_capped(mut reader: impl Read, cap: usize) -> (String, bool) {
    let half = cap / 2;
    let mut head = Vec::with_capacity(half.min(64 * 1024));
    let mut tail: VecDeque<u8> = VecDeque::new();
    let mut total = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        total += n;
        let mut chunk = &buf[..n];
        if head.len() < half {
            let take = (half - head.len()).min(chunk.len());
            head.extend_from_slice(&chunk[..take]);
            chunk = &chunk[take..];
        }
        tail.extend(chunk);
        if tail.len() > half {
            tail.drain(..tail.len() - half);
        }
    }
    let kept = head.len() + tail.len();
    let mut out = String::from_utf8_lossy(&head).into_owned();
    if total > kept {
        out.push_str(&format!("\n… [{} bytes of output omitted] …\n", total - kept));
    }
    out.push_str(&String::from_utf8_lossy(tail.make_contiguous()));
    (out, total > kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_keeps_head_and_tail() {
        let data: Vec<u8> = (0..10_000u32).flat_map(|i| format!("{i}\n").into_bytes()).collect();
        let (out, truncated) = read_capped(&data[..], 1000);
        assert!(truncated);
        assert!(out.starts_with("0\n1\n2\n"));
        assert!(out.trim_end().ends_with("9999"));
        assert!(out.contains("bytes of output omitted"));
        let (out, truncated) = read_capped(&b"short"[..], 1000);
        assert_eq!((out.as_str(), truncated), ("short", false));
    }
}
