//! `open-at` for plugins: wasmtime-wasi's, except that it can never block.
//!
//! wasmtime-wasi opens with a plain `open(2)` below the directory, so
//! opening a FIFO waits for a writer (or a reader) for as long as none
//! comes, and a device may do anything its driver does on open. A tool
//! that checks what a path is before opening it cannot close the gap: the
//! path can be swapped between the check and the open. Here the open itself
//! is non-blocking (`O_NONBLOCK`, which an open of a FIFO or device honours
//! and a regular file or directory ignores) and whatever it opened is
//! checked on the descriptor (`fstat`): anything but a regular file or a
//! directory is closed again and refused as `unsupported`. A FIFO whose
//! other end is absent fails the non-blocking open with `ENXIO`, refused
//! the same way.
//!
//! That makes every filesystem call a tool can make bounded, which is what
//! lets a tool call run on the caller's thread (see `Runtime::with_tool`).
//!
//! Resolution is the same as wasmtime-wasi's on Linux: `openat2` with
//! `RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS` (a path that leads out of the
//! directory is `not-permitted`), and the same flag and permission checks,
//! in the same order.

use std::os::fd::AsRawFd;

use wasmtime_wasi::filesystem::{Descriptor, Dir, File};
use wasmtime_wasi::p2::bindings::filesystem::types::{DescriptorFlags, ErrorCode, OpenFlags, PathFlags};
use wasmtime_wasi::{FsPerms, OpenMode};

use super::workdir::openat2;

/// The mode of a created file before the umask, as wasmtime-wasi's.
const CREATE_MODE: u32 = 0o666;

/// Opens `path` below `dir` as `open-at` asks, without blocking; refuses
/// anything that is neither a regular file nor a directory.
pub fn open_at(
    dir: &Dir,
    path_flags: PathFlags,
    path: &str,
    oflags: OpenFlags,
    flags: DescriptorFlags,
    allow_blocking_current_thread: bool,
) -> Result<Descriptor, ErrorCode> {
    let mut create = false;
    let mut mode = OpenMode::empty();
    let mut os_flags = libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK;
    if oflags.contains(OpenFlags::CREATE) {
        os_flags |= libc::O_CREAT;
        if oflags.contains(OpenFlags::EXCLUSIVE) {
            os_flags |= libc::O_EXCL;
        }
        create = true;
        mode |= OpenMode::WRITE;
    }
    if oflags.contains(OpenFlags::TRUNCATE) {
        os_flags |= libc::O_TRUNC;
        mode |= OpenMode::WRITE;
    }
    if flags.contains(DescriptorFlags::READ) {
        mode |= OpenMode::READ;
    }
    if flags.contains(DescriptorFlags::WRITE) {
        mode |= OpenMode::WRITE;
    } else {
        // As wasmtime-wasi: a descriptor asked for neither is opened for
        // reading, and its permissions refuse what it may not do later.
        mode |= OpenMode::READ;
    }
    if !path_flags.contains(PathFlags::SYMLINK_FOLLOW) {
        os_flags |= libc::O_NOFOLLOW;
    }
    if flags.intersects(DescriptorFlags::FILE_INTEGRITY_SYNC | DescriptorFlags::DATA_INTEGRITY_SYNC | DescriptorFlags::REQUESTED_WRITE_SYNC) {
        return Err(ErrorCode::Unsupported);
    }
    if oflags.contains(OpenFlags::DIRECTORY) {
        if oflags.intersects(OpenFlags::CREATE | OpenFlags::EXCLUSIVE | OpenFlags::TRUNCATE) {
            return Err(ErrorCode::Invalid);
        }
        // wasmtime-wasi opens first and checks after; `O_DIRECTORY` refuses
        // a non-directory before opening it.
        os_flags |= libc::O_DIRECTORY;
    }
    if dir.perms == FsPerms::ReadOnly && (create || mode.contains(OpenMode::WRITE)) {
        return Err(ErrorCode::NotPermitted);
    }
    os_flags |= match (mode.contains(OpenMode::READ), mode.contains(OpenMode::WRITE)) {
        (true, true) => libc::O_RDWR,
        (false, true) => libc::O_WRONLY,
        _ => libc::O_RDONLY,
    };

    let created_mode = if create { CREATE_MODE } else { 0 };
    let resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
    // `openat2` fails with `EAGAIN` when a rename anywhere races the lookup;
    // a few tries, as wasmtime-wasi makes.
    let mut tries = 0;
    let fd = loop {
        match openat2(dir.dir.as_raw_fd(), path.as_bytes(), os_flags, created_mode, resolve) {
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && tries < 3 => tries += 1,
            Err(e) => return Err(error_code(e)),
            Ok(fd) => break fd,
        }
    };
    let file = std::fs::File::from(fd);
    let kind = file.metadata().map_err(ErrorCode::from)?.file_type();
    if kind.is_dir() {
        Ok(Descriptor::Dir(Dir::new(file, dir.perms, mode, allow_blocking_current_thread)))
    } else if kind.is_file() {
        Ok(Descriptor::File(File::new(file, dir.perms, mode, allow_blocking_current_thread)))
    } else {
        // A FIFO, device or socket: dropping `file` closes it unread.
        Err(ErrorCode::Unsupported)
    }
}

fn error_code(err: std::io::Error) -> ErrorCode {
    match err.raw_os_error() {
        // The lookup tried to leave the directory (an absolute path, `..`,
        // a symlink out): what wasmtime-wasi answers to an escape.
        Some(libc::EXDEV) => ErrorCode::NotPermitted,
        // A FIFO with nobody at its other end, or a socket.
        Some(libc::ENXIO) => ErrorCode::Unsupported,
        // A NUL inside the path.
        None if err.kind() == std::io::ErrorKind::InvalidInput => ErrorCode::Invalid,
        _ => ErrorCode::from(err),
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::OpenOptionsExt;
    use std::path::Path;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::runtime::workdir::tests::mkfifo;

    fn dir(path: &Path, perms: FsPerms) -> Dir {
        let file = std::fs::File::open(path).unwrap();
        Dir::new(file, perms, OpenMode::READ | OpenMode::WRITE, true)
    }

    fn open(dir: &Dir, path: &str, oflags: OpenFlags, flags: DescriptorFlags) -> Result<Descriptor, ErrorCode> {
        open_at(dir, PathFlags::SYMLINK_FOLLOW, path, oflags, flags, true)
    }

    const READ: DescriptorFlags = DescriptorFlags::READ;
    const WRITE: DescriptorFlags = DescriptorFlags::WRITE;

    #[test]
    fn a_fifo_is_refused_at_once_for_reading_and_for_writing() {
        let root = tempfile::tempdir().unwrap();
        mkfifo(&root.path().join("fifo"));
        let d = dir(root.path(), FsPerms::ReadWrite);
        let started = Instant::now();
        // With no process at the other end: a blocking open would wait
        // for one for good (this test would hang).
        assert!(matches!(open(&d, "fifo", OpenFlags::empty(), READ), Err(ErrorCode::Unsupported)));
        assert!(matches!(open(&d, "fifo", OpenFlags::empty(), WRITE), Err(ErrorCode::Unsupported)));
        assert!(matches!(open(&d, "fifo", OpenFlags::CREATE, WRITE), Err(ErrorCode::Unsupported)));
        assert!(matches!(open(&d, "fifo", OpenFlags::DIRECTORY, READ), Err(ErrorCode::NotDirectory)));
        // With a reader at the other end, the open itself succeeds; the
        // descriptor is refused for what it is.
        let reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(root.path().join("fifo"))
            .unwrap();
        assert!(matches!(open(&d, "fifo", OpenFlags::empty(), WRITE), Err(ErrorCode::Unsupported)));
        drop(reader);
        // Behind a symlink inside the directory, the same.
        std::os::unix::fs::symlink("fifo", root.path().join("link")).unwrap();
        assert!(matches!(open(&d, "link", OpenFlags::empty(), READ), Err(ErrorCode::Unsupported)));
        assert!(started.elapsed() < Duration::from_secs(5), "nothing waited");
    }

    #[test]
    fn files_and_directories_open_as_wasmtime_wasi_opens_them() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("a.txt"), "a").unwrap();
        std::fs::create_dir(root.path().join("sub")).unwrap();
        std::os::unix::fs::symlink("a.txt", root.path().join("to-a")).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.path().join("out")).unwrap();
        std::os::unix::fs::symlink("../", root.path().join("up")).unwrap();
        let d = dir(root.path(), FsPerms::ReadWrite);

        let Ok(Descriptor::File(f)) = open(&d, "a.txt", OpenFlags::empty(), READ) else { panic!("a file") };
        assert_eq!(f.open_mode, OpenMode::READ);
        assert_eq!(std::io::read_to_string(&*f.file).unwrap(), "a");
        assert!(matches!(open(&d, "sub", OpenFlags::empty(), READ), Ok(Descriptor::Dir(_))));
        assert!(matches!(open(&d, "sub/", OpenFlags::DIRECTORY, READ), Ok(Descriptor::Dir(_))));
        assert!(matches!(open(&d, "a.txt", OpenFlags::DIRECTORY, READ), Err(ErrorCode::NotDirectory)));
        assert!(matches!(open(&d, "missing", OpenFlags::empty(), READ), Err(ErrorCode::NoEntry)));
        assert!(matches!(open(&d, "sub", OpenFlags::empty(), WRITE), Err(ErrorCode::IsDirectory)));
        // Symlinks: followed inside, never out of the directory.
        assert!(matches!(open(&d, "to-a", OpenFlags::empty(), READ), Ok(Descriptor::File(_))));
        assert!(matches!(open_at(&d, PathFlags::empty(), "to-a", OpenFlags::empty(), READ, true), Err(ErrorCode::Loop)));
        assert!(matches!(open(&d, "out", OpenFlags::empty(), READ), Err(ErrorCode::NotPermitted)));
        assert!(matches!(open(&d, "up/a.txt", OpenFlags::empty(), READ), Err(ErrorCode::NotPermitted)));
        assert!(matches!(open(&d, "../a.txt", OpenFlags::empty(), READ), Err(ErrorCode::NotPermitted)));
        assert!(matches!(open(&d, "/etc/passwd", OpenFlags::empty(), READ), Err(ErrorCode::NotPermitted)));
        assert!(matches!(open(&d, "a\0b", OpenFlags::empty(), READ), Err(ErrorCode::Invalid)));
        // Creation and its flags.
        let Ok(Descriptor::File(new)) = open(&d, "new.txt", OpenFlags::CREATE, WRITE) else { panic!("created") };
        assert_eq!(new.open_mode, OpenMode::WRITE);
        use std::io::Write;
        (&*new.file).write_all(b"written").unwrap();
        assert_eq!(std::fs::read_to_string(root.path().join("new.txt")).unwrap(), "written");
        assert!(matches!(open(&d, "new.txt", OpenFlags::CREATE | OpenFlags::EXCLUSIVE, WRITE), Err(ErrorCode::Exist)));
        assert!(matches!(open(&d, "new.txt", OpenFlags::TRUNCATE, WRITE), Ok(Descriptor::File(_))));
        assert_eq!(std::fs::read_to_string(root.path().join("new.txt")).unwrap(), "");
        assert!(matches!(open(&d, "x", OpenFlags::DIRECTORY | OpenFlags::CREATE, READ), Err(ErrorCode::Invalid)));
        assert!(matches!(open(&d, "a.txt", OpenFlags::empty(), READ | DescriptorFlags::DATA_INTEGRITY_SYNC), Err(ErrorCode::Unsupported)));
    }

    #[test]
    fn a_read_only_directory_opens_nothing_for_writing_and_creates_nothing() {
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("a.txt"), "a").unwrap();
        let d = dir(root.path(), FsPerms::ReadOnly);
        assert!(matches!(open(&d, "a.txt", OpenFlags::empty(), WRITE), Err(ErrorCode::NotPermitted)));
        assert!(matches!(open(&d, "a.txt", OpenFlags::TRUNCATE, READ), Err(ErrorCode::NotPermitted)));
        assert!(matches!(open(&d, "b.txt", OpenFlags::CREATE, READ), Err(ErrorCode::NotPermitted)));
        assert!(!root.path().join("b.txt").exists());
        // What a read-only directory opens carries its permissions on.
        let Ok(Descriptor::File(f)) = open(&d, "a.txt", OpenFlags::empty(), READ) else { panic!("a file") };
        assert_eq!(f.perms, FsPerms::ReadOnly);
    }
}
