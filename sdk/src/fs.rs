//! Files in the working directory: opened so that a call cannot hang, and
//! refused with errors that say why.
//!
//! Opening a FIFO blocks until another process opens its other end, and a
//! device may block on every read. Such a file can stand in the working
//! directory under any name, so the host opens nothing for a tool but
//! regular files and directories: its open never waits, and anything else
//! fails with `ENOTSUP` ("Not supported"), even a FIFO swapped in after a
//! check. These helpers look at what a path is before opening it, so the
//! refusal says what the path is ("not a regular file (a FIFO, ...)"), and
//! refuse directories too. Use them instead of `std::fs` for paths that
//! come from the model.
//!
//! # Errors that say what happened
//!
//! The sandbox (a WASI preopen of the working directory) is what keeps a
//! tool inside it: a path that leads out fails in the host, whatever the
//! tool's code does. WASI reports that failure as a plain "No such file or
//! directory" or "Operation not permitted", which reads like a missing file.
//! So when an open or a lookup *has already failed*, [`explain`] looks at
//! the path and says why:
//!
//! * `` path `../x` is outside the working directory `` (through `..` or an
//!   absolute path elsewhere);
//! * `` path `link` is a symlink pointing outside the working directory ``
//!   (or passes through one);
//! * `` this plugin has no filesystem access (add `filesystem = "read"` to
//!   its manifest and the operator's policy) `` when the host preopened
//!   nothing;
//! * otherwise the OS error, with its usual Linux name (`ENOENT`) rather
//!   than WASI's number.
//!
//! The helpers in this module return errors explained this way; a tool that
//! calls `std::fs` itself gets the same text by passing its error through
//! [`explain`] (an `io::Error` turned into [`Error`](crate::Error) with `?`
//! gets the Linux name and the no-access diagnosis, but not the path).

use std::fs::{self, File, Metadata};
use std::io;
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

/// The message a tool returns when the host gave it no filesystem at all.
pub const NO_FILESYSTEM_ACCESS: &str =
    "this plugin has no filesystem access (add `filesystem = \"read\"` to its manifest and the operator's policy)";

/// The working directory of the call in progress (each call runs in a fresh
/// instance, so there is at most one).
static WORK_DIR: Mutex<Option<PathBuf>> = Mutex::new(None);

pub(crate) fn set_work_dir(dir: Option<PathBuf>) {
    *WORK_DIR.lock().unwrap_or_else(|e| e.into_inner()) = dir;
}

fn work_dir() -> Option<PathBuf> {
    WORK_DIR.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Why a path was refused, in words the model can act on.
fn not_regular(meta: &Metadata) -> io::Error {
    let ft = meta.file_type();
    let what = if ft.is_dir() {
        "a directory"
    } else if ft.is_symlink() {
        "a symbolic link"
    } else {
        "not a regular file (a FIFO, socket or device, which could block)"
    };
    io::Error::new(io::ErrorKind::InvalidInput, format!("it is {what}; only regular files can be opened"))
}

/// `Ok` for a regular file's metadata; an error that says what the path is
/// otherwise. For a tool that has already looked at a path's metadata.
pub fn ensure_regular(meta: &Metadata) -> io::Result<()> {
    if meta.is_file() { Ok(()) } else { Err(not_regular(meta)) }
}

/// The metadata of `path` (symlinks followed), or an error if it is anything
/// but a regular file. Errors are [explained](explain).
pub fn regular_file(path: &Path) -> io::Result<Metadata> {
    let meta = fs::metadata(path).map_err(|e| explain(path, e))?;
    ensure_regular(&meta)?;
    Ok(meta)
}

/// Opens a regular file for reading; refuses FIFOs, sockets and devices.
/// Errors are [explained](explain).
pub fn open(path: &Path) -> io::Result<File> {
    regular_file(path)?;
    File::open(path).map_err(|e| explain(path, e))
}

/// Reads a whole regular file; refuses FIFOs, sockets and devices. Errors
/// are [explained](explain).
pub fn read(path: &Path) -> io::Result<Vec<u8>> {
    let meta = regular_file(path)?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    io::Read::read_to_end(&mut File::open(path).map_err(|e| explain(path, e))?, &mut bytes)?;
    Ok(bytes)
}

/// Creates or replaces a regular file with `contents`. A path that exists
/// and is not a regular file (a FIFO, a device, a directory) is refused
/// rather than opened. Errors are [explained](explain).
pub fn write(path: &Path, contents: &[u8]) -> io::Result<()> {
    match fs::metadata(path) {
        Ok(meta) if !meta.is_file() => return Err(not_regular(&meta)),
        Ok(_) => {}
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(explain(path, err)),
    }
    fs::write(path, contents).map_err(|e| explain(path, e))
}

/// Explains a filesystem operation on `path` that failed with `err`: the
/// returned error's text says whether the path leads outside the working
/// directory (through `..`, an absolute path or a symlink), whether the
/// plugin has no filesystem access at all, or else what the OS said, with
/// the error's Linux name.
///
/// Call it only after the operation failed: it diagnoses, the sandbox
/// decides. Paths are shown relative to the working directory.
pub fn explain(path: &Path, err: io::Error) -> io::Error {
    let Some(work_dir) = work_dir() else { return named(err) };
    if err.raw_os_error().is_none() {
        return err;
    }
    if !has_preopen(&work_dir) {
        return io::Error::new(err.kind(), NO_FILESYSTEM_ACCESS);
    }
    let shown = shown(&work_dir, path);
    let full = if path.is_absolute() { path.to_path_buf() } else { work_dir.join(path) };
    let Some(rel) = lexically_inside(&work_dir, &full) else {
        return io::Error::new(err.kind(), format!("path `{shown}` is outside the working directory"));
    };
    if let Some(link) = outward_symlink(&work_dir, &rel) {
        let text = if link == rel {
            format!("path `{shown}` is a symlink pointing outside the working directory")
        } else {
            format!("path `{shown}` goes through `{}`, a symlink pointing outside the working directory", link.display())
        };
        return io::Error::new(err.kind(), text);
    }
    // The host refused to open a FIFO, socket or device.
    if err.raw_os_error().and_then(errno_name) == Some("ENOTSUP") {
        if let Ok(meta) = fs::metadata(path) {
            if !meta.is_file() && !meta.is_dir() {
                return not_regular(&meta);
            }
        }
    }
    named(err)
}

/// Whether the host preopened the working directory (it does exactly when
/// the plugin is granted `filesystem`).
fn has_preopen(work_dir: &Path) -> bool {
    fs::metadata(work_dir).is_ok()
}

fn shown(work_dir: &Path, path: &Path) -> String {
    match path.strip_prefix(work_dir) {
        Ok(rel) if rel.as_os_str().is_empty() => ".".into(),
        Ok(rel) => rel.display().to_string(),
        Err(_) => path.display().to_string(),
    }
}

/// `full` resolved lexically (`.` and `..` folded, no symlink followed) and
/// made relative to `work_dir`, or `None` when it lies outside it.
fn lexically_inside(work_dir: &Path, full: &Path) -> Option<PathBuf> {
    let mut parts: Vec<&std::ffi::OsStr> = Vec::new();
    for component in full.components() {
        match component {
            Component::RootDir | Component::Prefix(_) => parts.clear(),
            Component::CurDir => {}
            Component::ParentDir => {
                parts.pop();
            }
            Component::Normal(name) => parts.push(name),
        }
    }
    let normal: PathBuf = std::iter::once(std::ffi::OsStr::new("/")).chain(parts).collect();
    normal.strip_prefix(work_dir).ok().map(Path::to_path_buf)
}

/// The first symlink along `rel` (relative to `work_dir`) whose target,
/// followed to the end, leads outside the working directory.
fn outward_symlink(work_dir: &Path, rel: &Path) -> Option<PathBuf> {
    let mut prefix = PathBuf::new();
    for component in rel.components() {
        prefix.push(component);
        if leads_outside(work_dir, &prefix, 0) {
            return Some(prefix);
        }
    }
    None
}

/// Whether `rel` is a symlink that, followed (through at most 16 links),
/// leaves `work_dir`.
fn leads_outside(work_dir: &Path, rel: &Path, depth: u32) -> bool {
    let full = work_dir.join(rel);
    let is_link = fs::symlink_metadata(&full).is_ok_and(|m| m.file_type().is_symlink());
    if !is_link || depth > 16 {
        return false;
    }
    // The sandbox does not reveal an absolute target (cap-std refuses to
    // read it, as it refuses to follow it): such a link leads out.
    let Ok(target) = fs::read_link(&full) else { return true };
    if target.is_absolute() && !target.starts_with(work_dir) {
        return true;
    }
    let parent = full.parent().unwrap_or(work_dir);
    match lexically_inside(work_dir, &parent.join(target)) {
        None => true,
        Some(next) => {
            // The target is inside: it may be another link, or pass through one.
            let mut prefix = PathBuf::new();
            next.components().any(|c| {
                prefix.push(c);
                leads_outside(work_dir, &prefix, depth + 1)
            })
        }
    }
}

/// The Linux name of a WASI errno (what `raw_os_error` holds in a
/// `wasm32-wasip2` guest), from WASI preview 1's `errno` list.
pub fn errno_name(code: i32) -> Option<&'static str> {
    const NAMES: [&str; 77] = [
        "ESUCCESS", "E2BIG", "EACCES", "EADDRINUSE", "EADDRNOTAVAIL", "EAFNOSUPPORT", "EAGAIN", "EALREADY",
        "EBADF", "EBADMSG", "EBUSY", "ECANCELED", "ECHILD", "ECONNABORTED", "ECONNREFUSED", "ECONNRESET",
        "EDEADLK", "EDESTADDRREQ", "EDOM", "EDQUOT", "EEXIST", "EFAULT", "EFBIG", "EHOSTUNREACH", "EIDRM",
        "EILSEQ", "EINPROGRESS", "EINTR", "EINVAL", "EIO", "EISCONN", "EISDIR", "ELOOP", "EMFILE", "EMLINK",
        "EMSGSIZE", "EMULTIHOP", "ENAMETOOLONG", "ENETDOWN", "ENETRESET", "ENETUNREACH", "ENFILE", "ENOBUFS",
        "ENODEV", "ENOENT", "ENOEXEC", "ENOLCK", "ENOLINK", "ENOMEM", "ENOMSG", "ENOPROTOOPT", "ENOSPC",
        "ENOSYS", "ENOTCONN", "ENOTDIR", "ENOTEMPTY", "ENOTRECOVERABLE", "ENOTSOCK", "ENOTSUP", "ENOTTY",
        "ENXIO", "EOVERFLOW", "EOWNERDEAD", "EPERM", "EPIPE", "EPROTO", "EPROTONOSUPPORT", "EPROTOTYPE",
        "ERANGE", "EROFS", "ESPIPE", "ESRCH", "ESTALE", "ETIMEDOUT", "ETXTBSY", "EXDEV", "ENOTCAPABLE",
    ];
    usize::try_from(code).ok().and_then(|i| NAMES.get(i)).copied().filter(|_| code != 0)
}

/// The error's text with its Linux name (`No such file or directory
/// (ENOENT)`) instead of WASI's number (`(os error 44)`).
/// Outside a WASI guest (the SDK's own unit tests) the text is left as is.
pub fn describe(err: &io::Error) -> String {
    let text = err.to_string();
    let Some(code) = err.raw_os_error().filter(|_| cfg!(target_os = "wasi")) else { return text };
    let base = text.strip_suffix(&format!(" (os error {code})")).unwrap_or(&text);
    match errno_name(code) {
        Some(name) => format!("{base} ({name})"),
        None => text,
    }
}

/// `err` with its text [described](describe), or the no-access message
/// when the host preopened no working directory.
pub(crate) fn named(err: io::Error) -> io::Error {
    if err.raw_os_error().is_none() {
        return err;
    }
    if work_dir().is_some_and(|w| !has_preopen(&w)) {
        return io::Error::new(err.kind(), NO_FILESYSTEM_ACCESS);
    }
    io::Error::new(err.kind(), describe(&err))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lexical_resolution_keeps_inside_paths_and_spots_escapes() {
        let w = Path::new("/w/d");
        assert_eq!(lexically_inside(w, Path::new("/w/d/a/../b")), Some(PathBuf::from("b")));
        assert_eq!(lexically_inside(w, Path::new("/w/d/a/../../d/c")), Some(PathBuf::from("c")));
        assert_eq!(lexically_inside(w, Path::new("/w/d/../x")), None);
        assert_eq!(lexically_inside(w, Path::new("/etc/hostname")), None);
        assert_eq!(lexically_inside(w, Path::new("/w/d")), Some(PathBuf::new()));
    }

    #[test]
    fn errno_names_follow_wasi_numbering() {
        assert_eq!(errno_name(44), Some("ENOENT"));
        assert_eq!(errno_name(63), Some("EPERM"));
        assert_eq!(errno_name(76), Some("ENOTCAPABLE"));
        assert_eq!(errno_name(0), None);
        assert_eq!(errno_name(77), None);
    }
}
