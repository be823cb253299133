//! Files in the working directory, opened so that a call cannot hang.
//!
//! Opening a FIFO blocks until another process opens its other end, and a
//! device may block on every read. A command run by `bash` (or a file that
//! was there already) can put either in the working directory under any
//! name, so a tool that opens whatever path the model gives could wait
//! forever. These helpers look at what a path is before opening it and
//! refuse anything but a regular file. Use them instead of `std::fs` for
//! paths that come from the model.
//!
//! The host still bounds every call with a deadline, so a file swapped for a
//! FIFO between the check and the open fails the call at its deadline
//! instead of hanging it.

use std::fs::{self, File, Metadata};
use std::io;
use std::path::Path;

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
/// but a regular file.
pub fn regular_file(path: &Path) -> io::Result<Metadata> {
    let meta = fs::metadata(path)?;
    ensure_regular(&meta)?;
    Ok(meta)
}

/// Opens a regular file for reading; refuses FIFOs, sockets and devices.
pub fn open(path: &Path) -> io::Result<File> {
    regular_file(path)?;
    File::open(path)
}

/// Reads a whole regular file; refuses FIFOs, sockets and devices.
pub fn read(path: &Path) -> io::Result<Vec<u8>> {
    let meta = regular_file(path)?;
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    io::Read::read_to_end(&mut File::open(path)?, &mut bytes)?;
    Ok(bytes)
}

/// Creates or replaces a regular file with `contents`. A path that exists
/// and is not a regular file (a FIFO, a device, a directory) is refused
/// rather than opened.
pub fn write(path: &Path, contents: &[u8]) -> io::Result<()> {
    match fs::metadata(path) {
        Ok(meta) if !meta.is_file() => return Err(not_regular(&meta)),
        Ok(_) => {}
        Err(err) if err.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(err),
    }
    fs::write(path, contents)
}
