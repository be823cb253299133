//! What one call of a `read-write` plugin may write: bytes (sparse holes
//! included) and files created. A tenant's `storage_mb` is measured after
//! the call; this bounds the call itself, so one call cannot write 2 GiB,
//! a 1 TiB sparse file or 20,000 files before anyone looks.
//!
//! The host's `wasi:filesystem/types` is wasmtime-wasi's own, shadowed in
//! the linker by [`CountedFs`], which checks the call's [`WriteQuota`] and
//! then delegates (all but `open-at`, which is [`super::open`]'s, the one
//! that cannot block). Streams a plugin writes files through are wrapped in
//! [`CountedStream`], which charges each write. Past the bytes limit the
//! guest gets `error-code::insufficient-space` (`ENOSPC`), past the files
//! limit `error-code::quota` (`EDQUOT`); a guest that writes through a
//! stream sees a stream error whose code it may or may not read (Rust's
//! standard library reports `EIO`). The call goes on either way, and its
//! result says which limit it reached.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use bytes::Bytes;
use wasmtime::component::{HasData, Resource};
use wasmtime_wasi::filesystem::{Descriptor, WasiFilesystemCtxView};
use wasmtime_wasi::p2::bindings::filesystem::types::{
    self, ErrorCode, HostDescriptor, HostDirectoryEntryStream,
};
use wasmtime_wasi::p2::{DynInputStream, DynOutputStream, FsError, FsResult, OutputStream, Pollable, StreamError, StreamResult};

use super::state::PluginState;

/// The write limit a call reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteLimit {
    Bytes(u64),
    Files(u64),
}

impl fmt::Display for WriteLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WriteLimit::Bytes(bytes) if bytes % (1 << 20) == 0 => write!(f, "{} MB written in one call", bytes >> 20),
            WriteLimit::Bytes(bytes) => write!(f, "{bytes} bytes written in one call"),
            WriteLimit::Files(files) => write!(f, "{files} files created in one call"),
        }
    }
}

const HIT_NONE: u8 = 0;
const HIT_BYTES: u8 = 1;
const HIT_FILES: u8 = 2;

/// The writes one call has left. Shared with the streams it opened, which
/// live in the resource table, not in the state.
#[derive(Debug)]
pub struct WriteQuota {
    bytes_limit: u64,
    files_limit: u64,
    bytes: AtomicU64,
    files: AtomicU64,
    hit: AtomicU8,
}

impl WriteQuota {
    pub fn new(bytes_limit: u64, files_limit: u64) -> Arc<WriteQuota> {
        Arc::new(WriteQuota { bytes_limit, files_limit, bytes: AtomicU64::new(0), files: AtomicU64::new(0), hit: AtomicU8::new(HIT_NONE) })
    }

    /// The first limit the call reached, if it reached one.
    pub fn hit(&self) -> Option<WriteLimit> {
        match self.hit.load(Ordering::Relaxed) {
            HIT_BYTES => Some(WriteLimit::Bytes(self.bytes_limit)),
            HIT_FILES => Some(WriteLimit::Files(self.files_limit)),
            _ => None,
        }
    }

    fn take(counter: &AtomicU64, limit: u64, n: u64) -> bool {
        counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| used.checked_add(n).filter(|&after| after <= limit)).is_ok()
    }

    fn refused(&self, which: u8) {
        // The first limit reached is the one the call reports.
        let _ = self.hit.compare_exchange(HIT_NONE, which, Ordering::AcqRel, Ordering::Acquire);
    }

    /// Counts `n` bytes, or refuses all of them: a write is never cut short
    /// silently.
    fn charge_bytes(&self, n: u64) -> Result<(), ErrorCode> {
        if n == 0 || Self::take(&self.bytes, self.bytes_limit, n) {
            return Ok(());
        }
        self.refused(HIT_BYTES);
        Err(ErrorCode::InsufficientSpace)
    }

    fn take_file(&self) -> Result<(), ErrorCode> {
        if Self::take(&self.files, self.files_limit, 1) {
            return Ok(());
        }
        self.refused(HIT_FILES);
        Err(ErrorCode::Quota)
    }

    /// For a creation that failed after all.
    fn give_back_file(&self) {
        self.files.fetch_sub(1, Ordering::AcqRel);
    }
}

/// `wasi:filesystem/types` of one store, counted, with opens that never
/// block. Every plugin's linker has it, whatever its filesystem grant.
pub struct CountedFs<'a> {
    fs: WasiFilesystemCtxView<'a>,
    quota: &'a Arc<WriteQuota>,
    /// Whether descriptors it opens may block the current thread (as the
    /// store's WASI context says; wasmtime-wasi does not let it be read).
    blocking: bool,
}

/// The linker's name for [`CountedFs`] as the data of host calls.
pub struct CountedFsData;

impl HasData for CountedFsData {
    type Data<'a> = CountedFs<'a>;
}

pub fn counted_fs(state: &mut PluginState) -> CountedFs<'_> {
    let blocking = state.blocking_fs;
    CountedFs { fs: WasiFilesystemCtxView { ctx: state.wasi.filesystem(), table: &mut state.table }, quota: &state.writes, blocking }
}

/// Another handle on the same descriptor, for a call that consumes one.
fn again(fd: &Resource<types::Descriptor>) -> Resource<types::Descriptor> {
    Resource::new_borrow(fd.rep())
}

fn quota_error(code: ErrorCode) -> FsError {
    code.into()
}

impl CountedFs<'_> {
    /// The size of the file `fd`, or `None` for a directory (the call it
    /// precedes then fails on its own).
    fn file_size(&mut self, fd: &Resource<types::Descriptor>) -> FsResult<Option<u64>> {
        match self.fs.table.get(fd)? {
            Descriptor::File(f) => Ok(Some(f.file.metadata().map_err(ErrorCode::from)?.len())),
            Descriptor::Dir(_) => Ok(None),
        }
    }

    /// What writing at `offset` adds as a hole past the file's end: it
    /// takes no disk until written, but it is what a 1 TiB sparse file is
    /// made of, and every reader of the file sees it.
    fn hole(&mut self, fd: &Resource<types::Descriptor>, offset: u64) -> FsResult<u64> {
        Ok(self.file_size(fd)?.map_or(0, |size| offset.saturating_sub(size)))
    }

    /// Counts a file (directory, link) about to be created.
    fn creating(&self) -> FsResult<()> {
        self.quota.take_file().map_err(quota_error)
    }

    /// Gives the count back if the creation failed after all.
    fn created<T>(&self, result: FsResult<T>) -> FsResult<T> {
        if result.is_err() {
            self.quota.give_back_file();
        }
        result
    }

    /// Replaces the stream at `stream` with one that charges its writes.
    fn counted(&mut self, stream: Resource<DynOutputStream>) -> FsResult<Resource<DynOutputStream>> {
        let inner = self.fs.table.delete(stream)?;
        let counted: DynOutputStream = Box::new(CountedStream { inner, quota: self.quota.clone() });
        Ok(self.fs.table.push(counted)?)
    }
}

impl types::Host for CountedFs<'_> {
    fn convert_error_code(&mut self, err: FsError) -> wasmtime::Result<ErrorCode> {
        self.fs.convert_error_code(err)
    }

    fn filesystem_error_code(&mut self, err: Resource<wasmtime::Error>) -> wasmtime::Result<Option<ErrorCode>> {
        self.fs.filesystem_error_code(err)
    }
}

impl HostDescriptor for CountedFs<'_> {
    async fn advise(&mut self, fd: Resource<types::Descriptor>, offset: types::Filesize, len: types::Filesize, advice: types::Advice) -> FsResult<()> {
        self.fs.advise(fd, offset, len, advice).await
    }

    async fn sync_data(&mut self, fd: Resource<types::Descriptor>) -> FsResult<()> {
        self.fs.sync_data(fd).await
    }

    async fn get_flags(&mut self, fd: Resource<types::Descriptor>) -> FsResult<types::DescriptorFlags> {
        self.fs.get_flags(fd).await
    }

    async fn get_type(&mut self, fd: Resource<types::Descriptor>) -> FsResult<types::DescriptorType> {
        self.fs.get_type(fd).await
    }

    async fn set_size(&mut self, fd: Resource<types::Descriptor>, size: types::Filesize) -> FsResult<()> {
        // Growing a file counts as writing what it grows by, zeroes or hole.
        let grows = self.file_size(&fd)?.map_or(0, |current| size.saturating_sub(current));
        self.quota.charge_bytes(grows).map_err(quota_error)?;
        self.fs.set_size(fd, size).await
    }

    async fn set_times(&mut self, fd: Resource<types::Descriptor>, atim: types::NewTimestamp, mtim: types::NewTimestamp) -> FsResult<()> {
        self.fs.set_times(fd, atim, mtim).await
    }

    async fn read(&mut self, fd: Resource<types::Descriptor>, len: types::Filesize, offset: types::Filesize) -> FsResult<(Vec<u8>, bool)> {
        self.fs.read(fd, len, offset).await
    }

    async fn write(&mut self, fd: Resource<types::Descriptor>, buf: Vec<u8>, offset: types::Filesize) -> FsResult<types::Filesize> {
        let hole = self.hole(&fd, offset)?;
        self.quota.charge_bytes((buf.len() as u64).saturating_add(hole)).map_err(quota_error)?;
        self.fs.write(fd, buf, offset).await
    }

    async fn read_directory(&mut self, fd: Resource<types::Descriptor>) -> FsResult<Resource<types::DirectoryEntryStream>> {
        self.fs.read_directory(fd).await
    }

    async fn sync(&mut self, fd: Resource<types::Descriptor>) -> FsResult<()> {
        self.fs.sync(fd).await
    }

    async fn create_directory_at(&mut self, fd: Resource<types::Descriptor>, path: String) -> FsResult<()> {
        self.creating()?;
        let result = self.fs.create_directory_at(fd, path).await;
        self.created(result)
    }

    async fn stat(&mut self, fd: Resource<types::Descriptor>) -> FsResult<types::DescriptorStat> {
        self.fs.stat(fd).await
    }

    async fn stat_at(&mut self, fd: Resource<types::Descriptor>, path_flags: types::PathFlags, path: String) -> FsResult<types::DescriptorStat> {
        self.fs.stat_at(fd, path_flags, path).await
    }

    async fn set_times_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path_flags: types::PathFlags,
        path: String,
        atim: types::NewTimestamp,
        mtim: types::NewTimestamp,
    ) -> FsResult<()> {
        self.fs.set_times_at(fd, path_flags, path, atim, mtim).await
    }

    async fn link_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        old_path_flags: types::PathFlags,
        old_path: String,
        new_descriptor: Resource<types::Descriptor>,
        new_path: String,
    ) -> FsResult<()> {
        self.creating()?;
        let result = self.fs.link_at(fd, old_path_flags, old_path, new_descriptor, new_path).await;
        self.created(result)
    }

    async fn open_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path_flags: types::PathFlags,
        path: String,
        oflags: types::OpenFlags,
        flags: types::DescriptorFlags,
    ) -> FsResult<Resource<types::Descriptor>> {
        // Opening a file that exists with `create` creates nothing: only a
        // new name counts. (Whatever else makes the check fail makes the
        // open fail too.)
        let creates = oflags.contains(types::OpenFlags::CREATE)
            && matches!(self.fs.stat_at(again(&fd), types::PathFlags::empty(), path.clone()).await,
                Err(err) if err.downcast_ref() == Some(&ErrorCode::NoEntry));
        if creates {
            self.creating()?;
        }
        // wasmtime-wasi's `open-at` can block; this one cannot.
        let opened = match self.fs.table.get(&fd) {
            Ok(Descriptor::Dir(dir)) => super::open::open_at(dir, path_flags, &path, oflags, flags, self.blocking).map_err(FsError::from),
            Ok(Descriptor::File(_)) => Err(ErrorCode::NotDirectory.into()),
            Err(err) => Err(err.into()),
        };
        let result = opened.and_then(|descriptor| Ok(self.fs.table.push(descriptor)?));
        if creates { self.created(result) } else { result }
    }

    fn drop(&mut self, fd: Resource<types::Descriptor>) -> wasmtime::Result<()> {
        HostDescriptor::drop(&mut self.fs, fd)
    }

    async fn readlink_at(&mut self, fd: Resource<types::Descriptor>, path: String) -> FsResult<String> {
        self.fs.readlink_at(fd, path).await
    }

    async fn remove_directory_at(&mut self, fd: Resource<types::Descriptor>, path: String) -> FsResult<()> {
        self.fs.remove_directory_at(fd, path).await
    }

    async fn rename_at(&mut self, fd: Resource<types::Descriptor>, old_path: String, new_fd: Resource<types::Descriptor>, new_path: String) -> FsResult<()> {
        self.fs.rename_at(fd, old_path, new_fd, new_path).await
    }

    async fn symlink_at(&mut self, fd: Resource<types::Descriptor>, src_path: String, dest_path: String) -> FsResult<()> {
        self.creating()?;
        let result = self.fs.symlink_at(fd, src_path, dest_path).await;
        self.created(result)
    }

    async fn unlink_file_at(&mut self, fd: Resource<types::Descriptor>, path: String) -> FsResult<()> {
        self.fs.unlink_file_at(fd, path).await
    }

    fn read_via_stream(&mut self, fd: Resource<types::Descriptor>, offset: types::Filesize) -> FsResult<Resource<DynInputStream>> {
        self.fs.read_via_stream(fd, offset)
    }

    fn write_via_stream(&mut self, fd: Resource<types::Descriptor>, offset: types::Filesize) -> FsResult<Resource<DynOutputStream>> {
        let hole = self.hole(&fd, offset)?;
        let stream = self.fs.write_via_stream(fd, offset)?;
        if let Err(code) = self.quota.charge_bytes(hole) {
            self.fs.table.delete(stream)?;
            return Err(code.into());
        }
        self.counted(stream)
    }

    fn append_via_stream(&mut self, fd: Resource<types::Descriptor>) -> FsResult<Resource<DynOutputStream>> {
        let stream = self.fs.append_via_stream(fd)?;
        self.counted(stream)
    }

    async fn is_same_object(&mut self, a: Resource<types::Descriptor>, b: Resource<types::Descriptor>) -> wasmtime::Result<bool> {
        self.fs.is_same_object(a, b).await
    }

    async fn metadata_hash(&mut self, fd: Resource<types::Descriptor>) -> FsResult<types::MetadataHashValue> {
        self.fs.metadata_hash(fd).await
    }

    async fn metadata_hash_at(&mut self, fd: Resource<types::Descriptor>, path_flags: types::PathFlags, path: String) -> FsResult<types::MetadataHashValue> {
        self.fs.metadata_hash_at(fd, path_flags, path).await
    }
}

impl HostDirectoryEntryStream for CountedFs<'_> {
    async fn read_directory_entry(&mut self, stream: Resource<types::DirectoryEntryStream>) -> FsResult<Option<types::DirectoryEntry>> {
        self.fs.read_directory_entry(stream).await
    }

    fn drop(&mut self, stream: Resource<types::DirectoryEntryStream>) -> wasmtime::Result<()> {
        HostDirectoryEntryStream::drop(&mut self.fs, stream)
    }
}

/// A file's output stream whose writes count against the call's quota.
struct CountedStream {
    inner: DynOutputStream,
    quota: Arc<WriteQuota>,
}

impl CountedStream {
    fn charge(&self, n: usize) -> StreamResult<()> {
        self.quota.charge_bytes(n as u64).map_err(|_| {
            // `filesystem-error-code` reads an `io::Error` back as its code
            // (`insufficient-space`; it knows no `EDQUOT`).
            StreamError::LastOperationFailed(std::io::Error::from_raw_os_error(libc::ENOSPC).into())
        })
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for CountedStream {
    async fn ready(&mut self) {
        self.inner.ready().await
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for CountedStream {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.charge(bytes.len())?;
        self.inner.write(bytes)
    }

    fn flush(&mut self) -> StreamResult<()> {
        self.inner.flush()
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        self.inner.check_write()
    }

    async fn blocking_write_and_flush(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.charge(bytes.len())?;
        self.inner.blocking_write_and_flush(bytes).await
    }

    fn write_zeroes(&mut self, nelem: usize) -> StreamResult<()> {
        self.charge(nelem)?;
        self.inner.write_zeroes(nelem)
    }

    async fn cancel(&mut self) {
        self.inner.cancel().await
    }
}
