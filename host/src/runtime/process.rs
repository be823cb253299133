//! The `process` capability: `bash -c` in the session's working directory,
//! with a reduced environment, a timeout and an output cap, confined by the
//! kernel:
//!
//! * **Landlock** (applied in the child before `exec`, inherited by
//!   everything it starts): read and execute on the system directories,
//!   read-write on the working directory and a private temporary directory
//!   (`TMPDIR`), read-write on a few harmless devices (`/dev/null`, ...),
//!   nothing else. No device node, FIFO or socket can be created in the
//!   working directory (a FIFO there would block the file tools). From ABI
//!   6 it also scopes signals and abstract UNIX sockets to the sandbox.
//! * **The server's own ports are unreachable**: from Landlock ABI 4 a
//!   second ruleset, built once when the server knows its ports, allows TCP
//!   connections to every port but those; on older kernels the command gets
//!   a network namespace of its own (no network at all). So a command cannot
//!   drive the API that confines it.
//! * **Namespaces** (`unshare` from util-linux): a new PID namespace with
//!   `bash` as its PID 1, so that when it exits or is killed the kernel
//!   kills everything it started, even processes that called `setsid`; new
//!   UTS and IPC namespaces.
//! * **No capabilities** (`setpriv` from util-linux): the bounding,
//!   inheritable and ambient sets are emptied and `no_new_privs` is set
//!   before `bash` starts, so even as root it holds no capability and can
//!   never gain one.
//!
//! The host also owns the process group and kills it on timeout or when the
//! call is cancelled. What this machine offers is probed once
//! ([`confinement`]) and reported as it is; an operator who sets
//! `require_confinement` gets no `process` grant unless all of it is there,
//! and where nothing keeps commands off the server's ports, `process` is
//! withheld unless the operator opts in (see `policy.rs`).

use std::collections::VecDeque;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use landlock::{
    ABI, Access, AccessFs, AccessNet, BitFlags, NetPort, PathBeneath, RestrictionStatus, Ruleset, RulesetAttr,
    RulesetCreated, RulesetCreatedAttr, RulesetError, RulesetStatus, Scope, path_beneath_rules,
};

use super::bindings::wit_process::{Command, Host, Outcome};
use super::state::PluginState;
use super::workdir::WorkDir;

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
/// The ABI that brings every right this file relies on (filesystem with
/// truncate and device ioctls, TCP connect, signal and socket scoping).
const FULL_ABI: i32 = 6;
/// The ABI that brings TCP port rules.
const NET_ABI: i32 = 4;
/// Set to a number to use at most that Landlock ABI, as on an older kernel
/// (for testing what the server reports and does there).
pub const ABI_LIMIT_ENV: &str = "HANGAR_LANDLOCK_ABI";

/// Read and execute: programs and libraries.
const SYSTEM_DIRS: &[&str] = &["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"];
/// The parts of `/etc` programs need (the loader, users and groups by name,
/// name resolution, TLS roots, time zone, shell start-up, alternatives),
/// readable even by a command running as root; never `shadow`, `gshadow`,
/// `sudoers`, `ssh/` or anything else. A listed symlink grants its target.
const ETC_READABLE: &[&str] = &[
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
    "/etc/host.conf",
    "/etc/hosts",
    "/etc/resolv.conf",
    "/etc/gai.conf",
    "/etc/services",
    "/etc/protocols",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/ca-certificates.conf",
    "/etc/pki",
    "/etc/alternatives",
    "/etc/localtime",
    "/etc/timezone",
    "/etc/profile",
    "/etc/profile.d",
    "/etc/bash.bashrc",
    "/etc/inputrc",
    "/etc/environment",
    "/etc/mime.types",
    "/etc/magic",
    "/etc/terminfo",
    "/etc/os-release",
    "/etc/debian_version",
    "/etc/lsb-release",
    "/etc/gitconfig",
    "/etc/python3",
    "/etc/locale.alias",
];
/// Devices scripts expect to write to or read from; none reveals anything.
const DEVICES: &[&str] = &["/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"];
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// `setpriv` arguments: no capability in any set, and none to be gained.
const DROP_CAPABILITIES: &[&str] =
    &["--no-new-privs", "--bounding-set", "-all", "--inh-caps", "-all", "--ambient-caps", "-all", "--"];

/// What a call granted `process` may run in.
pub struct ProcessAccess {
    pub work_dir: Option<Arc<WorkDir>>,
    /// What keeps commands off the server's own ports.
    pub ports: Option<Arc<PortGate>>,
    pub limits: super::cgroup::CommandLimits,
}

/// How this machine confines commands. Probed once per process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confinement {
    /// The Landlock ABI in use (0: none): the kernel's, at most
    /// [`ABI_LIMIT_ENV`] when that is set.
    pub landlock_abi: i32,
    /// The kernel's own Landlock ABI.
    pub kernel_abi: i32,
    /// `unshare` can make PID, UTS and IPC namespaces.
    pub namespaces: bool,
    /// `unshare` can make a network namespace.
    pub net_namespace: bool,
    /// `setpriv` can drop every capability.
    pub drops_capabilities: bool,
    unshare: Option<PathBuf>,
    setpriv: Option<PathBuf>,
}

/// What keeps a command off the server's own listening ports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortGuard {
    /// Landlock TCP rules: every port but the server's (other loopback
    /// services stay reachable).
    Landlock,
    /// A network namespace of its own: no network at all.
    Namespace,
    /// Nothing: the command could call the API.
    None,
}

impl Confinement {
    /// Everything the server relies on is in place.
    pub fn is_complete(&self) -> bool {
        self.landlock_abi >= FULL_ABI && self.namespaces && self.drops_capabilities
    }

    /// How commands are kept off the server's ports.
    pub fn port_guard(&self) -> PortGuard {
        if self.landlock_abi >= NET_ABI {
            PortGuard::Landlock
        } else if self.net_namespace {
            PortGuard::Namespace
        } else {
            PortGuard::None
        }
    }

    /// A machine with this Landlock ABI, and with or without namespaces
    /// and `setpriv` (for tests of the decisions made on it).
    #[cfg(test)]
    pub(crate) fn probed_as(landlock_abi: i32, namespaces: bool) -> Confinement {
        Confinement {
            landlock_abi,
            kernel_abi: landlock_abi,
            namespaces,
            net_namespace: namespaces,
            drops_capabilities: namespaces,
            unshare: None,
            setpriv: None,
        }
    }

    /// One line for operators: what commands run under, and what is missing.
    pub fn describe(&self) -> String {
        let mut have = Vec::new();
        let mut missing = Vec::new();
        if self.landlock_abi > 0 {
            have.push(format!("Landlock ABI {} (kernel {})", self.landlock_abi, self.kernel_abi));
        }
        if self.landlock_abi < 1 {
            missing.push("Landlock: commands can read and write outside the working directory");
        } else {
            if self.landlock_abi < 3 {
                missing.push("Landlock truncate control (ABI 3)");
            }
            if self.landlock_abi < 5 {
                missing.push("Landlock device ioctl control (ABI 5)");
            }
            if self.landlock_abi < FULL_ABI {
                missing.push("Landlock signal and abstract socket scoping (ABI 6)");
            }
        }
        match self.port_guard() {
            PortGuard::Landlock => have.push("TCP rules keeping the server's ports out of reach".into()),
            PortGuard::Namespace => have.push("a network namespace (no network)".into()),
            PortGuard::None => missing.push("any guard on the network: commands can reach the server's own API"),
        }
        if self.namespaces {
            have.push("PID, UTS and IPC namespaces".into());
        } else {
            missing.push("namespaces: background processes may outlive a call");
        }
        if self.drops_capabilities {
            have.push("no capabilities".into());
        } else {
            missing.push("dropping capabilities (setpriv)");
        }
        have.push("/etc limited to what programs need".into());
        have.push(format!("limits on {}", super::cgroup::controllers().describe()));
        let have = if have.is_empty() { "nothing".to_string() } else { have.join(", ") };
        match (self.is_complete(), missing.is_empty()) {
            (true, _) | (_, true) => format!("confined: {have}"),
            (false, false) => format!("partly confined: {have}; missing {}", missing.join(", ")),
        }
    }
}

/// The confinement commands get on this machine. The first call probes the
/// kernel and the tools.
pub fn confinement() -> &'static Confinement {
    static PROBE: OnceLock<Confinement> = OnceLock::new();
    PROBE.get_or_init(|| {
        let kernel_abi = kernel_landlock_abi();
        let limit = std::env::var(ABI_LIMIT_ENV).ok().and_then(|v| v.trim().parse::<i32>().ok());
        let landlock_abi = limit.map_or(kernel_abi, |l| l.clamp(0, kernel_abi));
        let unshare = find_tool("unshare");
        let setpriv = find_tool("setpriv");
        let namespaces = unshare.as_deref().is_some_and(|u| probe(u, &["--pid", "--fork", "--kill-child", "--uts", "--ipc", "--", "true"]));
        let net_namespace = unshare.as_deref().is_some_and(|u| probe(u, &["--net", "--", "true"]));
        let drops_capabilities =
            setpriv.as_deref().is_some_and(|s| probe(s, &[DROP_CAPABILITIES, &["true"]].concat()));
        Confinement { landlock_abi, kernel_abi, namespaces, net_namespace, drops_capabilities, unshare, setpriv }
    })
}

/// The kernel's Landlock ABI version, 0 without Landlock.
fn kernel_landlock_abi() -> i32 {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: the documented version query: no ruleset, size 0.
    let v = unsafe {
        libc::syscall(libc::SYS_landlock_create_ruleset, std::ptr::null::<libc::c_void>(), 0usize, LANDLOCK_CREATE_RULESET_VERSION)
    };
    v.max(0) as i32
}

fn find_tool(name: &str) -> Option<PathBuf> {
    ["/usr/bin", "/bin", "/usr/sbin", "/sbin"].iter().map(|d| Path::new(d).join(name)).find(|p| p.exists())
}

/// Namespaces and capability changes need privileges (root, or user
/// namespaces) that a container may withhold: try once.
fn probe(program: &Path, args: &[&str]) -> bool {
    std::process::Command::new(program)
        .args(args)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The Landlock ruleset that allows TCP connections to every port but the
/// server's own. Built once (65,535 rules) and applied to every command on
/// top of its filesystem ruleset.
pub struct PortRules {
    ruleset: RulesetCreated,
}

impl PortRules {
    /// `None` where the kernel has no TCP rules (a network namespace keeps
    /// commands off the ports there).
    pub fn build(denied: &[u16]) -> Result<Option<PortRules>, RulesetError> {
        if confinement().landlock_abi < NET_ABI {
            return Ok(None);
        }
        let mut ruleset = Ruleset::default().handle_access(AccessNet::ConnectTcp)?.create()?;
        for port in 1..=u16::MAX {
            if !denied.contains(&port) {
                ruleset = ruleset.add_rule(NetPort::new(port, AccessNet::ConnectTcp))?;
            }
        }
        Ok(Some(PortRules { ruleset }))
    }

    /// No TCP connection or bind but to `allowed` ports.
    pub fn only(allowed: &[u16]) -> Result<PortRules, RulesetError> {
        let mut ruleset = Ruleset::default().handle_access(AccessNet::ConnectTcp | AccessNet::BindTcp)?.create()?;
        for &port in allowed {
            ruleset = ruleset.add_rule(NetPort::new(port, AccessNet::ConnectTcp))?;
        }
        Ok(PortRules { ruleset })
    }
}

/// The server's ports, closed to commands. The ruleset is built once, in
/// the background, as soon as the server has bound its ports (65,535 rules
/// take a moment, which start-up should not wait for); a command that
/// starts before it is ready waits for it, and none runs without it.
pub struct PortGate {
    ports: Vec<u16>,
    rules: tokio::sync::OnceCell<Result<Option<PortRules>, String>>,
}

impl PortGate {
    pub fn new(ports: &[u16]) -> PortGate {
        PortGate { ports: ports.to_vec(), rules: tokio::sync::OnceCell::new() }
    }

    /// The ruleset (`None` where a network namespace does the job),
    /// building it on first use.
    pub async fn rules(&self) -> Result<Option<&PortRules>, String> {
        let ports = self.ports.clone();
        let built = self
            .rules
            .get_or_init(|| async move {
                tokio::task::spawn_blocking(move || PortRules::build(&ports).map_err(|e| e.to_string()))
                    .await
                    .unwrap_or_else(|e| Err(e.to_string()))
            })
            .await;
        built.as_ref().map(Option::as_ref).map_err(|e| format!("the server's ports cannot be closed to commands: {e}"))
    }
}

/// The filesystem ruleset of one command.
fn fs_ruleset(abi: ABI, work_dir: &WorkDir, tmp: &Path) -> Result<RulesetCreated, RulesetError> {
    let all = AccessFs::from_all(abi);
    // Nothing that could block a file tool or reach a device: no FIFOs,
    // sockets or device nodes in the working directory. The private
    // temporary directory may hold FIFOs and sockets (scripts use them).
    let devices = AccessFs::MakeChar | AccessFs::MakeBlock;
    let work_rights: BitFlags<AccessFs> = all & !(devices | AccessFs::MakeFifo | AccessFs::MakeSock);
    let tmp_rights: BitFlags<AccessFs> = all & !devices;
    let mut ruleset = Ruleset::default().handle_access(all)?;
    if abi >= ABI::V6 {
        ruleset = ruleset.scope(Scope::from_all(abi))?;
    }
    ruleset
        .create()?
        // `path_beneath_rules` skips paths that do not exist (`/lib32`, ...).
        .add_rules(path_beneath_rules(SYSTEM_DIRS, AccessFs::from_read(abi)))?
        .add_rules(path_beneath_rules(ETC_READABLE, AccessFs::from_read(abi)))?
        .add_rules(path_beneath_rules(DEVICES, all))?
        // The directory that was checked, by its descriptor: not a path
        // that could have been swapped for a symlink since.
        .add_rule(PathBeneath::new(work_dir, work_rights))?
        .add_rules(path_beneath_rules([tmp], tmp_rights))
}

impl Host for PluginState {
    async fn run(&mut self, cmd: Command) -> wasmtime::Result<Result<Outcome, String>> {
        let Some(access) = &self.process else {
            return Ok(Err(format!("plugin `{}` is not granted process", self.plugin)));
        };
        let Some(work_dir) = access.work_dir.clone() else {
            return Ok(Err("this session has no working directory".into()));
        };
        let ports = access.ports.clone();
        Ok(run(work_dir, ports, access.limits.clone(), cmd).await.map_err(|err| format!("cannot run the command: {err}")))
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

/// The program line: namespaces, then another user and no capabilities,
/// then `bash -c`.
fn command_line(confinement: &Confinement, own_network: bool, user: Option<(u32, u32)>) -> tokio::process::Command {
    let mut line: Vec<std::ffi::OsString> = Vec::new();
    let mut push = |args: &[&str]| line.extend(args.iter().map(std::ffi::OsString::from));
    let no_network = own_network || confinement.port_guard() == PortGuard::Namespace;
    if let (Some(unshare), true) = (&confinement.unshare, confinement.namespaces) {
        push(&[unshare.to_str().unwrap_or("unshare"), "--pid", "--fork", "--kill-child", "--uts", "--ipc"]);
        if no_network {
            push(&["--net"]);
        }
        push(&["--"]);
    } else if let (Some(unshare), true) = (&confinement.unshare, no_network) {
        push(&[unshare.to_str().unwrap_or("unshare"), "--net", "--"]);
    }
    if let (Some(setpriv), true) = (&confinement.setpriv, confinement.drops_capabilities) {
        push(&[setpriv.to_str().unwrap_or("setpriv")]);
        if let Some((uid, gid)) = user {
            let (uid, gid) = (format!("--reuid={uid}"), format!("--regid={gid}"));
            push(&[&uid, &gid, "--clear-groups"]);
        }
        push(DROP_CAPABILITIES);
    }
    push(&["bash", "-c"]);
    let mut command = tokio::process::Command::new(&line[0]);
    command.args(&line[1..]);
    command
}

/// What to start under the confinement `bash` commands get: `bash -c
/// SCRIPT` with `args` as `$0`, `$1`, …, and `env` besides the few
/// variables every command gets.
pub(crate) struct Program<'a> {
    pub script: &'a str,
    pub args: &'a [String],
    pub env: &'a [(String, String)],
    pub stdin: Stdio,
    pub stdout: Stdio,
    pub stderr: Stdio,
    /// `RLIMIT_CPU` when the limits name none.
    pub cpu_seconds: u64,
}

/// A confined program and what it holds. Dropping it kills the program
/// and everything it started (fields drop in order: the process group,
/// then its cgroup, then its temporary directory).
pub(crate) struct Confined {
    pub child: tokio::process::Child,
    group: KillGroup,
    cgroup: super::cgroup::CallGroup,
    tmp: tempfile::TempDir,
}

impl Confined {
    /// The limit the program ran into, if it ran into one.
    pub fn verdict(&self, exit_code: Option<i32>) -> Option<String> {
        self.cgroup.verdict(exit_code)
    }
}

/// Starts `program` in `work_dir` with Landlock, namespaces, another
/// user, no capabilities, its own cgroup and rlimits and the network
/// `limits` allow: what a tool's command gets, for anything the server
/// starts on a session's behalf (MCP servers too).
pub(crate) async fn spawn_confined(
    work_dir: &WorkDir,
    ports: Option<&Arc<PortGate>>,
    limits: &super::cgroup::CommandLimits,
    program: Program<'_>,
) -> std::io::Result<Confined> {
    let confinement = confinement();
    // The command's own temporary directory: the only writable place
    // besides the working directory. Removed when the call returns.
    let tmp = tempfile::Builder::new().prefix("hangar-bash-").tempdir()?;
    let fs_rules = if confinement.landlock_abi > 0 {
        let abi = ABI::from(confinement.landlock_abi).min(LANDLOCK_ABI);
        Some(fs_ruleset(abi, work_dir, tmp.path()).map_err(std::io::Error::other)?)
    } else {
        None
    };
    // Network: every port but the server's, or (`network = "none"`) none
    // at all: a network namespace of its own where the host can make one
    // and no port is allowed (UDP too is then cut off), else Landlock TCP
    // rules allowing only `allowed_ports`.
    let own_network = !limits.network && limits.allowed_ports.is_empty() && confinement.net_namespace;
    let port_rules = if limits.network {
        match ports {
            Some(gate) => gate.rules().await.map_err(std::io::Error::other)?.map(|r| r.ruleset.try_clone()).transpose()?,
            None => None,
        }
    } else if own_network {
        None
    } else if confinement.landlock_abi >= NET_ABI {
        Some(PortRules::only(&limits.allowed_ports).map_err(std::io::Error::other)?.ruleset)
    } else {
        return Err(std::io::Error::other("`network = \"none\"` cannot be enforced here: no network namespace and no Landlock TCP rules"));
    };
    // Its own cgroup (memory, processes) and rlimits (CPU, file size).
    let cgroup = super::cgroup::CallGroup::create(&ulid::Ulid::new().to_string(), limits.clone())?;
    let join = cgroup.join_fds();
    let rlimits = cgroup.rlimits(program.cpu_seconds);

    // Not as root when it can be helped: as the owner of the working
    // directory (or `[process] user`), switched to after the namespaces are
    // made. The private temporary directory becomes that user's.
    let user = command_user(work_dir, limits)?;
    if let Some((uid, gid)) = user {
        std::os::unix::fs::chown(tmp.path(), Some(uid), Some(gid))?;
    }
    let mut command = command_line(confinement, own_network, user);
    command
        .arg(program.script)
        .args(program.args)
        // Nothing of the server's environment (keys above all) reaches the command.
        .env_clear()
        .env("PATH", PATH)
        .env("HOME", work_dir.path())
        .env("LANG", "C.UTF-8")
        .env("TERM", "dumb")
        .env("TMPDIR", tmp.path())
        .envs(program.env.iter().map(|(k, v)| (k, v)))
        .stdin(program.stdin)
        .stdout(program.stdout)
        .stderr(program.stderr)
        .process_group(0)
        .kill_on_drop(true);
    // Everything the child needs is built here, in the parent; between fork
    // and exec the child only makes system calls (no allocation).
    // Open until `spawn` returns: `work_dir` is held by this function.
    let dir = work_dir.as_fd().as_raw_fd();
    let slot = Mutex::new((fs_rules, port_rules));
    // SAFETY: the closure runs between fork and exec; it takes an
    // uncontended lock (nothing in this copy of the process holds it) and
    // calls fchdir, prctl and landlock_restrict_self.
    unsafe {
        command.pre_exec(move || {
            // If the server dies (kill -9), so does the command: the tool
            // thread that spawned it lives as long as the call.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The working directory by its descriptor: the one that was checked.
            if libc::fchdir(dir) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            super::cgroup::enter(&join, &rlimits)?;
            let (fs_rules, port_rules) = match slot.lock() {
                Ok(mut s) => (s.0.take(), s.1.take()),
                Err(_) => return Err(std::io::Error::other("confinement state poisoned")),
            };
            // Fail closed: a command that should be confined and is not never runs.
            for ruleset in [fs_rules, port_rules].into_iter().flatten() {
                match ruleset.restrict_self() {
                    Ok(RestrictionStatus { ruleset: RulesetStatus::FullyEnforced, .. }) => {}
                    _ => return Err(std::io::Error::other("Landlock could not be enforced")),
                }
            }
            Ok(())
        });
    }
    let child = command.spawn()?;
    // The command keeps copies of the pipe's write end: drop them, or the
    // reader never sees the end of the output.
    drop(command);
    let group = KillGroup(child.id().map(|id| id as i32).unwrap_or(-1));
    Ok(Confined { child, group, cgroup, tmp })
}

async fn run(
    work_dir: Arc<WorkDir>,
    ports: Option<Arc<PortGate>>,
    limits: super::cgroup::CommandLimits,
    cmd: Command,
) -> std::io::Result<Outcome> {
    let timeout = Duration::from_millis(cmd.timeout_ms.max(1).into()).min(MAX_TIMEOUT);
    let cap = (cmd.max_output_bytes as usize).clamp(256, MAX_OUTPUT);
    let (reader, writer) = std::io::pipe()?;
    let program = Program {
        script: &cmd.script,
        args: &[],
        env: &[],
        stdin: Stdio::null(),
        stdout: writer.try_clone()?.into(),
        stderr: writer.into(),
        cpu_seconds: timeout.as_secs(),
    };
    let Confined { mut child, group, cgroup, tmp } = spawn_confined(&work_dir, ports.as_ref(), &limits, program).await?;
    let pgid = group.0;
    let _tmp = tmp;
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
    let (mut output, truncated) = match tokio::time::timeout(DRAIN_GRACE, &mut reading).await {
        Ok(Ok(result)) => result,
        _ => {
            reading.abort();
            ("(output unavailable: a process that left the command's group still holds it)".into(), false)
        }
    };
    // A limit the command ran into is named in its result.
    if let Some(verdict) = cgroup.verdict(exit_code) {
        if !output.is_empty() && !output.ends_with('\n') {
            output.push('\n');
        }
        output.push_str(&format!("({verdict})\n"));
    }
    drop(cgroup);
    Ok(Outcome { output, exit_code, timed_out, truncated })
}

/// Whether commands can run as another user than the server's: only a
/// server running as root can switch, and only with `setpriv`.
pub fn switches_user() -> bool {
    // SAFETY: plain syscall.
    let euid = unsafe { libc::geteuid() };
    euid == 0 && confinement().drops_capabilities
}

/// Who commands run as, in words, for operators (the start log and
/// `GET /plugins`): `tenant` is the uid of the caller's tenant in
/// multi-tenant mode, `uid_range` the range tenants' uids come from.
pub fn describe_user(limits: &super::cgroup::CommandLimits, tenant: Option<u32>, uid_range: Option<(u32, u32)>) -> (Option<u32>, String) {
    if !switches_user() {
        // SAFETY: plain syscall.
        let euid = unsafe { libc::geteuid() };
        return (Some(euid), format!("uid {euid}, the server's own (only a server running as root can switch users)"));
    }
    match (tenant, uid_range, limits.user) {
        (Some(uid), _, _) => (Some(uid), format!("uid {uid}, this tenant's own (gid {uid})")),
        (None, Some((first, last)), _) => (None, format!("each tenant's own uid, from [process] uid_range {first}-{last}")),
        (None, None, Some((uid, gid))) => (Some(uid), format!("uid {uid}, gid {gid} ([process] user)")),
        (None, None, None) => (None, "the owner of each session's work_dir".to_string()),
    }
}

/// The user a command runs as, when it is not the server's own: only a
/// server running as root can switch, and only with `setpriv`.
fn command_user(work_dir: &WorkDir, limits: &super::cgroup::CommandLimits) -> std::io::Result<Option<(u32, u32)>> {
    if !switches_user() {
        return Ok(None);
    }
    let (uid, gid) = match work_dir.user().or(limits.user) {
        Some(ids) => ids,
        None => {
            use std::os::unix::fs::MetadataExt;
            let meta = std::fs::metadata(work_dir.fd_path())?;
            (meta.uid(), meta.gid())
        }
    };
    Ok((uid != 0).then_some((uid, gid)))
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
