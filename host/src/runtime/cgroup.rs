//! Memory and process limits of one command: a cgroup of its own where the
//! host can make one (cgroup v1 `memory` and `pids` hierarchies, as on
//! these machines), `setrlimit` otherwise. The command is moved into its
//! group between fork and exec, so everything it starts is counted; the
//! group is emptied and removed when the call ends.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The limits of one command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandLimits {
    pub memory_bytes: u64,
    pub max_processes: u64,
    /// CPU time; `None`: as long as the call's timeout.
    pub cpu_seconds: Option<u64>,
    pub file_size_bytes: u64,
    /// `false`: no network (`[process] network = "none"`), but for
    /// `allowed_ports`.
    pub network: bool,
    /// TCP ports a command may still connect to without network.
    pub allowed_ports: Vec<u16>,
    /// `[process] user`: the uid and gid commands run as (when the server
    /// runs as root); `None`: the owner of the working directory.
    pub user: Option<(u32, u32)>,
}

impl Default for CommandLimits {
    fn default() -> Self {
        CommandLimits {
            memory_bytes: 1024 << 20,
            max_processes: 256,
            cpu_seconds: None,
            file_size_bytes: 1024 << 20,
            network: true,
            allowed_ports: Vec::new(),
            user: None,
        }
    }
}

const V1_ROOT: &str = "/sys/fs/cgroup";

/// Which cgroup controllers this host lets the server use (probed once).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Controllers {
    /// `<hierarchy>/hangar`, where each call's group is made.
    pub memory: Option<PathBuf>,
    pub pids: Option<PathBuf>,
}

impl Controllers {
    pub fn describe(&self) -> String {
        let part = |name: &str, dir: &Option<PathBuf>, fallback: &str| match dir {
            Some(_) => format!("{name}: cgroup"),
            None => format!("{name}: {fallback}"),
        };
        format!(
            "{}, {}, cpu and file size: rlimit",
            part("memory", &self.memory, "rlimit (RLIMIT_DATA)"),
            part("processes", &self.pids, "not limited (no pids cgroup)")
        )
    }
}

pub fn controllers() -> &'static Controllers {
    static PROBED: OnceLock<Controllers> = OnceLock::new();
    PROBED.get_or_init(|| {
        let usable = |controller: &str, file: &str| -> Option<PathBuf> {
            let parent = Path::new(V1_ROOT).join(controller).join("hangar");
            std::fs::create_dir_all(&parent).ok()?;
            // A group made and removed again: the hierarchy is writable.
            let probe = parent.join(format!("probe-{}", std::process::id()));
            std::fs::create_dir(&probe).ok()?;
            let ok = probe.join(file).exists();
            let _ = std::fs::remove_dir(&probe);
            ok.then_some(parent)
        };
        Controllers { memory: usable("memory", "memory.limit_in_bytes"), pids: usable("pids", "pids.max") }
    })
}

/// One call's groups; removed (after killing anything left in them) on drop.
pub struct CallGroup {
    memory: Option<PathBuf>,
    pids: Option<PathBuf>,
    /// `cgroup.procs` of each group, opened for the child to write `0`
    /// (itself) between fork and exec.
    procs: Vec<OwnedFd>,
    limits: CommandLimits,
}

impl CallGroup {
    pub fn create(name: &str, limits: CommandLimits) -> io::Result<CallGroup> {
        let available = controllers();
        let mut group = CallGroup { memory: None, pids: None, procs: Vec::new(), limits: limits.clone() };
        if let Some(parent) = &available.memory {
            let dir = parent.join(name);
            std::fs::create_dir(&dir)?;
            group.memory = Some(dir.clone());
            std::fs::write(dir.join("memory.limit_in_bytes"), limits.memory_bytes.to_string())?;
            // Swap counts too where the kernel accounts it.
            let _ = std::fs::write(dir.join("memory.memsw.limit_in_bytes"), limits.memory_bytes.to_string());
            group.procs.push(open_procs(&dir)?);
        }
        if let Some(parent) = &available.pids {
            let dir = parent.join(name);
            std::fs::create_dir(&dir)?;
            group.pids = Some(dir.clone());
            std::fs::write(dir.join("pids.max"), limits.max_processes.to_string())?;
            group.procs.push(open_procs(&dir)?);
        }
        Ok(group)
    }

    /// Descriptors the child writes `0` to, to join the groups.
    pub fn join_fds(&self) -> Vec<RawFd> {
        self.procs.iter().map(|fd| fd.as_raw_fd()).collect()
    }

    /// The rlimits the child sets on itself: always CPU time and file
    /// size; memory where no cgroup holds it.
    pub fn rlimits(&self, timeout_secs: u64) -> Vec<(libc::__rlimit_resource_t, u64)> {
        let mut out = vec![
            (libc::RLIMIT_CPU, self.limits.cpu_seconds.unwrap_or(timeout_secs).max(1)),
            (libc::RLIMIT_FSIZE, self.limits.file_size_bytes),
            (libc::RLIMIT_CORE, 0),
        ];
        if self.memory.is_none() {
            out.push((libc::RLIMIT_DATA, self.limits.memory_bytes));
        }
        // No RLIMIT_NPROC fallback: it counts every process and thread of
        // the user, the server's own included, and root is exempt from it.
        out
    }

    /// Which limit the command ran into, for its result (`None`: none).
    pub fn verdict(&self, exit_code: Option<i32>) -> Option<String> {
        let mb = |bytes: u64| bytes >> 20;

        // The kernel's count of OOM kills in the group; where it is not
        // reported, a hit limit and a SIGKILL-like end.
        if let Some(dir) = &self.memory
            && (oom_kills(dir) > 0
                || (read_u64(&dir.join("memory.failcnt")).unwrap_or(0) > 0 && matches!(exit_code, None | Some(137))))
        {
            return Some(format!("killed: memory limit {} MB", mb(self.limits.memory_bytes)));
        }
        if let Some(dir) = &self.pids
            && let Some(hits) = std::fs::read_to_string(dir.join("pids.events"))
                .ok()
                .and_then(|t| t.split_whitespace().nth(1).and_then(|n| n.parse::<u64>().ok()))
            && hits > 0
        {
            return Some(format!("process limit {} reached: {hits} forks refused", self.limits.max_processes));
        }
        match exit_code {
            // 128 + SIGXFSZ, 128 + SIGXCPU: what bash reports for them.
            Some(153) => Some(format!("stopped: file size limit {} MB", mb(self.limits.file_size_bytes))),
            Some(152) => Some("stopped: CPU time limit reached".to_string()),
            _ => None,
        }
    }
}

fn oom_kills(dir: &Path) -> u64 {
    std::fs::read_to_string(dir.join("memory.oom_control"))
        .ok()
        .and_then(|t| t.lines().find_map(|l| l.strip_prefix("oom_kill ").and_then(|n| n.trim().parse().ok())))
        .unwrap_or(0)
}

fn read_u64(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn open_procs(dir: &Path) -> io::Result<OwnedFd> {
    let path = CString::new(dir.join("cgroup.procs").into_os_string().into_encoded_bytes()).map_err(io::Error::other)?;
    // SAFETY: a valid C string; the descriptor is owned below.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just gave us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

impl Drop for CallGroup {
    fn drop(&mut self) {
        for dir in [&self.memory, &self.pids].into_iter().flatten() {
            // Anything still inside (the call's own group kill ran first)
            // is killed; the group is removed once the kernel has reaped it.
            for _ in 0..50 {
                let pids = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
                for pid in pids.lines().filter_map(|p| p.trim().parse::<i32>().ok()) {
                    // SAFETY: plain syscall on a process in the call's own group.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
                if std::fs::remove_dir(dir).is_ok() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }
}

/// Between fork and exec: joins the groups and sets the rlimits. Only
/// system calls, no allocation.
pub fn enter(join: &[RawFd], rlimits: &[(libc::__rlimit_resource_t, u64)]) -> io::Result<()> {
    for &fd in join {
        // SAFETY: writes two bytes from a static buffer to an open descriptor.
        if unsafe { libc::write(fd, b"0\n".as_ptr().cast(), 2) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    for &(resource, value) in rlimits {
        let limit = libc::rlimit { rlim_cur: value, rlim_max: value };
        // SAFETY: a valid rlimit struct.
        if unsafe { libc::setrlimit(resource, &limit) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
