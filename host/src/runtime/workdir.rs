//! A session's working directory: checked against the operator's rules when
//! a session names it, and opened again, without following any symlink, for
//! each run. Tools and commands then get that open directory (its file
//! descriptor), never a path that could be swapped underneath them.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// Why a `work_dir` is refused.
#[derive(Debug, thiserror::Error)]
pub enum WorkDirError {
    #[error("work_dir `{0}` must be an absolute path")]
    NotAbsolute(String),
    #[error("work_dir `{path}` is not usable: {source}")]
    Unusable { path: String, source: io::Error },
    #[error("work_dir `{0}` is not a directory")]
    NotADirectory(String),
    #[error("work_dir `{0}` is not valid UTF-8")]
    NotUtf8(String),
    #[error("work_dir `{path}` is outside the allowed work roots ({roots})")]
    OutsideRoots { path: String, roots: String },
    #[error("work_dir `{path}` contains {what} ({protected}); a session never gets the server's own files")]
    ContainsServerFiles { path: String, what: &'static str, protected: String },
    #[error("work_dir `{path}` lies inside {what} ({protected}); a session never gets the server's own files")]
    InsideServerFiles { path: String, what: &'static str, protected: String },
    #[error("work_dir `{path}` changed after it was checked (a symbolic link now stands in its path); tools are not run there")]
    Swapped { path: String },
}

/// A directory opened for one run. The path is for showing (and is the
/// guest's name for the directory); every access goes through the
/// descriptor, which names the directory that was checked.
#[derive(Debug)]
pub struct WorkDir {
    path: PathBuf,
    fd: OwnedFd,
    /// The uid and gid commands run as here (a tenant's, in multi-tenant
    /// mode); else the directory's owner or `[process] user`.
    user: Option<(u32, u32)>,
}

impl WorkDir {
    /// Opens an absolute path that has no symbolic link in any component
    /// (`openat2` with `RESOLVE_NO_SYMLINKS`): what is opened is exactly
    /// the directory the path names, not one a link leads to.
    pub fn open(path: &Path) -> io::Result<WorkDir> {
        if !path.is_absolute() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "not an absolute path"));
        }
        let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC;
        let fd = openat2(libc::AT_FDCWD, path.as_os_str().as_bytes(), flags, 0, libc::RESOLVE_NO_SYMLINKS)?;
        Ok(WorkDir { path: path.to_path_buf(), fd, user: None })
    }

    /// Commands in this directory run as `user` (a tenant's own ids).
    pub fn with_user(mut self, user: (u32, u32)) -> WorkDir {
        self.user = Some(user);
        self
    }

    /// Who commands run as here, when it is set for the directory.
    pub fn user(&self) -> Option<(u32, u32)> {
        self.user
    }

    /// The path the session stores (absolute, canonical).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where a relative path inside this directory really leads, symlinks
    /// followed, as a path relative to it (`None` when the path leads out
    /// of it, or cannot be read). The part of the path that does not exist
    /// yet (a file about to be written) is kept as given. Permission rules
    /// match this, so a link inside `src/` cannot carry a write elsewhere.
    pub fn resolve(&self, relative: &str) -> Option<String> {
        let parts: Vec<&str> = relative.split('/').filter(|p| !p.is_empty() && *p != ".").collect();
        if parts.contains(&"..") {
            return None;
        }
        let base = std::fs::read_link(self.fd_path()).ok()?;
        for existing in (0..=parts.len()).rev() {
            let prefix = if existing == 0 { ".".to_string() } else { parts[..existing].join("/") };
            match self.open_beneath(&prefix) {
                Ok(fd) => {
                    let real = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).ok()?;
                    let mut inside = real.strip_prefix(&base).ok()?.to_string_lossy().into_owned();
                    for rest in &parts[existing..] {
                        if !inside.is_empty() {
                            inside.push('/');
                        }
                        inside.push_str(rest);
                    }
                    return Some(if inside.is_empty() { ".".into() } else { inside });
                }
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) || e.raw_os_error() == Some(libc::ENOTDIR) => continue,
                Err(_) => return None,
            }
        }
        None
    }

    /// Opens a path below this directory without leaving it
    /// (`RESOLVE_BENEATH`), as `O_PATH`: nothing is read, a FIFO does not block.
    fn open_beneath(&self, relative: &str) -> io::Result<OwnedFd> {
        openat2(self.fd.as_raw_fd(), relative.as_bytes(), libc::O_PATH | libc::O_CLOEXEC, 0, libc::RESOLVE_BENEATH)
    }

    /// A path that opens this very directory whatever its name leads to
    /// now (`/proc/self/fd/N`), for APIs that take a path.
    pub fn fd_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }
}

impl AsFd for WorkDir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// `openat2(2)` of `path` relative to `dir` with the given open flags, mode
/// (of a file it creates) and resolve restrictions.
pub(super) fn openat2(dir: i32, path: &[u8], flags: i32, mode: u32, resolve: u64) -> io::Result<OwnedFd> {
    let c_path = CString::new(path).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    // SAFETY: zeroed `open_how` is valid (all fields are integers).
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = flags as u64;
    how.mode = mode.into();
    how.resolve = resolve;
    // SAFETY: a valid C string and an `open_how` of the size passed.
    let fd = unsafe {
        libc::syscall(libc::SYS_openat2, dir, c_path.as_ptr(), &how as *const libc::open_how, std::mem::size_of::<libc::open_how>())
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a descriptor the kernel just gave us, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// One of the server's own files or directories.
#[derive(Debug, Clone)]
struct Protected {
    path: PathBuf,
    what: &'static str,
    /// A directory: a work dir may neither contain it nor lie inside it.
    is_dir: bool,
}

/// Which directories sessions may use: inside the work roots (when any are
/// set), and never one that holds, or lies inside, the server's own files.
#[derive(Debug, Clone, Default)]
pub struct WorkDirRules {
    roots: Vec<PathBuf>,
    protected: Vec<Protected>,
}

impl WorkDirRules {
    /// `roots` are canonical already; `files` and `dirs` are the server's
    /// own (database, config file, ...; plugin and cache directories),
    /// which may not exist yet.
    pub fn new(roots: Vec<PathBuf>, files: &[(&'static str, &Path)], dirs: &[(&'static str, &Path)]) -> WorkDirRules {
        let mut protected = Vec::new();
        for (list, is_dir) in [(files, false), (dirs, true)] {
            for (what, path) in list {
                protected.push(Protected { path: resolved(path), what, is_dir });
            }
        }
        WorkDirRules { roots, protected }
    }

    /// The same rules with `root` as the one work root (a tenant's directory).
    pub fn within(&self, root: PathBuf) -> WorkDirRules {
        WorkDirRules { roots: vec![root], protected: self.protected.clone() }
    }

    /// Checks a `work_dir` a client sent and returns it canonical (symlinks
    /// resolved), which is what runs will open.
    pub fn check(&self, dir: &str) -> Result<String, WorkDirError> {
        let path = Path::new(dir);
        if !path.is_absolute() {
            return Err(WorkDirError::NotAbsolute(dir.into()));
        }
        let canonical = match canonical_dir(path) {
            Some(canonical) => canonical,
            // Not canonical as given, or not an openable directory: the slow
            // way, which also tells those apart for the error.
            None => {
                let canonical = path.canonicalize().map_err(|source| WorkDirError::Unusable { path: dir.into(), source })?;
                if !canonical.is_dir() {
                    return Err(WorkDirError::NotADirectory(dir.into()));
                }
                canonical
            }
        };
        self.allowed(&canonical, dir)?;
        canonical.into_os_string().into_string().map_err(|_| WorkDirError::NotUtf8(dir.into()))
    }

    /// Opens a stored (canonical) `work_dir` for a run: no symlink may have
    /// appeared in its path since it was checked, and the rules are checked
    /// again (they may have changed since, with a restart).
    pub fn open(&self, stored: &str) -> Result<WorkDir, WorkDirError> {
        let path = Path::new(stored);
        let dir = WorkDir::open(path).map_err(|source| match source.raw_os_error() {
            Some(libc::ELOOP) | Some(libc::ENOTDIR) => WorkDirError::Swapped { path: stored.into() },
            _ => WorkDirError::Unusable { path: stored.into(), source },
        })?;
        self.allowed(path, stored)?;
        Ok(dir)
    }

    fn allowed(&self, canonical: &Path, shown: &str) -> Result<(), WorkDirError> {
        if !self.roots.is_empty() && !self.roots.iter().any(|root| canonical.starts_with(root)) {
            return Err(WorkDirError::OutsideRoots {
                path: shown.into(),
                roots: self.roots.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(", "),
            });
        }
        for p in &self.protected {
            let protected = || p.path.display().to_string();
            if p.path.starts_with(canonical) {
                return Err(WorkDirError::ContainsServerFiles { path: shown.into(), what: p.what, protected: protected() });
            }
            if p.is_dir && canonical.starts_with(&p.path) {
                return Err(WorkDirError::InsideServerFiles { path: shown.into(), what: p.what, protected: protected() });
            }
        }
        Ok(())
    }
}

/// The canonical path of the directory `path` names, when the path is one
/// already: absolute, with no `.`, `..`, repeated or trailing `/`, and no
/// symbolic link in any component ([`WorkDir::open`] proves the last, in
/// one system call; `O_DIRECTORY` refuses a FIFO before opening it, so
/// nothing blocks). That is the path a client almost always sends, and
/// `canonicalize`, which reads every component's link, was the largest
/// cost of creating a session. `None`: take the slow way.
fn canonical_dir(path: &Path) -> Option<PathBuf> {
    let bytes = path.as_os_str().as_bytes();
    let clean = bytes.len() > 1
        && bytes[0] == b'/'
        && bytes[1..].split(|b| *b == b'/').all(|part| !part.is_empty() && part != b"." && part != b"..");
    (clean && WorkDir::open(path).is_ok()).then(|| path.to_path_buf())
}

/// The canonical form of a path that may not exist yet: its deepest
/// existing ancestor canonicalized, the rest appended.
fn resolved(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut existing = absolute.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(canonical) = existing.canonicalize() {
            return rest.iter().rev().fold(canonical, |acc, part| acc.join(part));
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                existing = parent;
            }
            _ => return absolute,
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    #[test]
    fn resolve_follows_links_inside_and_refuses_links_out() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("src/deep")).unwrap();
        std::fs::create_dir(root.join("other")).unwrap();
        std::os::unix::fs::symlink("../other", root.join("src/link")).unwrap();
        std::os::unix::fs::symlink("/etc", root.join("src/out")).unwrap();
        let w = WorkDir::open(&root).unwrap();
        assert_eq!(w.resolve("src/deep/new.rs").as_deref(), Some("src/deep/new.rs"));
        assert_eq!(w.resolve("src/link/x.txt").as_deref(), Some("other/x.txt"));
        assert_eq!(w.resolve("src/link").as_deref(), Some("other"));
        assert_eq!(w.resolve(".").as_deref(), Some("."));
        assert_eq!(w.resolve("src/out/passwd"), None);
        assert_eq!(w.resolve("../x"), None);
    }

    #[test]
    fn a_work_dir_may_not_hold_or_lie_inside_the_servers_files() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let data = root.join("data");
        std::fs::create_dir_all(data.join("plugins/sub")).unwrap();
        std::fs::create_dir_all(root.join("project")).unwrap();
        let db = data.join("hangar.db");
        std::fs::write(&db, "").unwrap();
        let rules = WorkDirRules::new(
            Vec::new(),
            &[("the database", &db), ("the config file", &root.join("conf/not-yet/hangar.toml"))],
            &[("the plugins directory", &data.join("plugins"))],
        );
        let s = |p: &Path| p.to_str().unwrap().to_string();
        assert!(matches!(rules.check(&s(&data)), Err(WorkDirError::ContainsServerFiles { what: "the database", .. })));
        assert!(matches!(rules.check(&s(&root)), Err(WorkDirError::ContainsServerFiles { .. })));
        assert!(matches!(rules.check(&s(&data.join("plugins/sub"))), Err(WorkDirError::InsideServerFiles { .. })));
        assert_eq!(rules.check(&s(&root.join("project"))).unwrap(), s(&root.join("project")));
        // A config file that does not exist yet is protected all the same.
        std::fs::create_dir_all(root.join("conf")).unwrap();
        assert!(matches!(rules.check(&s(&root.join("conf"))), Err(WorkDirError::ContainsServerFiles { what: "the config file", .. })));
    }

    #[test]
    fn a_checked_work_dir_is_what_canonicalize_gives_and_refusals_say_why() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::os::unix::fs::symlink(root.join("a"), root.join("link")).unwrap();
        std::os::unix::fs::symlink("a/b/", root.join("rel")).unwrap();
        std::fs::write(root.join("file"), "").unwrap();
        mkfifo(&root.join("fifo"));
        let rules = WorkDirRules::default();
        let s = |p: PathBuf| p.to_str().unwrap().to_string();
        for given in ["a", "a/b/", "a/./b/..", "link/b", "rel", "link/../a/b/../../link", "./"] {
            let path = root.join(given);
            assert_eq!(rules.check(&s(path.clone())).unwrap(), s(path.canonicalize().unwrap()), "{given}");
        }
        assert!(matches!(rules.check(&s(root.join("file"))), Err(WorkDirError::NotADirectory(_))));
        // Checked without reading it, so the check answers at once.
        assert!(matches!(rules.check(&s(root.join("fifo"))), Err(WorkDirError::NotADirectory(_))));
        assert!(matches!(rules.check(&s(root.join("missing"))), Err(WorkDirError::Unusable { .. })));
        assert!(matches!(rules.check(&s(root.join("file/below"))), Err(WorkDirError::Unusable { .. })));
        assert!(matches!(rules.check("a"), Err(WorkDirError::NotAbsolute(_))));
    }

    /// Makes a FIFO at `path` (for the tests of the modules that open paths).
    pub(in crate::runtime) fn mkfifo(path: &Path) {
        let c = CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: a valid C string.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    #[test]
    fn a_work_dir_swapped_for_a_symlink_is_not_opened() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().canonicalize().unwrap();
        let work = root.join("work");
        std::fs::create_dir(&work).unwrap();
        let rules = WorkDirRules::default();
        let stored = rules.check(work.to_str().unwrap()).unwrap();
        assert_eq!(rules.open(&stored).unwrap().path(), work);
        std::fs::remove_dir(&work).unwrap();
        std::os::unix::fs::symlink("/", &work).unwrap();
        assert!(matches!(rules.open(&stored), Err(WorkDirError::Swapped { .. })));
        // A symlink higher up the path is refused too.
        std::fs::remove_file(&work).unwrap();
        std::fs::create_dir_all(root.join("real/work")).unwrap();
        let moved = root.join("moved");
        std::os::unix::fs::symlink(root.join("real"), &moved).unwrap();
        assert!(matches!(rules.open(moved.join("work").to_str().unwrap()), Err(WorkDirError::Swapped { .. })));
    }
}
