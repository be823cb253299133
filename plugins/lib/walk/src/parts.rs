//! A walk that several parts of one call share out between them, on the
//! `wasi:filesystem` API itself.
//!
//! It sees the files ripgrep's walker (the `ignore` crate's `Walk`) sees
//! with the settings in the crate's doc, in the same order (every directory
//! sorted by name, depth first; `tests/tools.rs` holds the two side by
//! side), but costs far fewer host calls than that walker does through
//! std, which is what a walk in the sandbox spends its time on:
//!
//! - a directory's listing already says which entries are regular files,
//!   directories or something else, so nothing is stat'ed to learn it (the
//!   C library asks the host for an inode number per entry);
//! - ignore files are read only where the listing shows them (the `ignore`
//!   crate tries to open four names in every directory);
//! - a file is opened relative to its directory's handle: one path
//!   component to resolve, not the whole path from the working directory.
//!
//! Parts deal out work that every part sees the same way: the files of a
//! directory every part lists go to the parts in turn; a directory below
//! the root with many subdirectories deals those out whole, so the part
//! that gets one lists and searches all of it, and the others never open
//! it. Shallow, narrow directories (`src/`, `src/main/java/…`) are listed
//! by every part until the tree fans out.

use std::ops::ControlFlow;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use hangar_sdk::Shard;
use ignore::Match;
use ignore::gitignore::{Gitignore, GitignoreBuilder};
use wasip2::filesystem::preopens::get_directories;
use wasip2::filesystem::types::{Descriptor, DescriptorFlags, DescriptorType, ErrorCode, OpenFlags, PathFlags};

/// A shared directory deals out its subdirectories when it has at least
/// this many per part; fewer would likely leave one part most of the tree.
const FANOUT_PER_PART: usize = 4;
/// The most a single host read is asked for (wasmtime caps one read's
/// buffer; larger asks only cost a larger zeroed allocation).
const READ_CHUNK: u64 = 1 << 20;

/// A regular file the walk dealt to this part.
pub struct File<'a> {
    dir: &'a Descriptor,
    name: &'a str,
    path: &'a Path,
    key: &'a str,
}

impl File<'_> {
    /// The file's path: the walk's root joined with [`key`](Self::key).
    pub fn path(&self) -> &Path {
        self.path
    }

    /// The path under the walk's root, `/`-separated (empty when the root
    /// is this file). Comparing keys [component by component](compare_keys)
    /// puts files in walk order, whichever part found them.
    pub fn key(&self) -> &str {
        self.key
    }

    /// When the entry was last modified (a symlink's own time, not its
    /// target's), if the filesystem says.
    pub fn modified(&self) -> Option<SystemTime> {
        let time = self.dir.stat_at(PathFlags::empty(), self.name).ok()?.data_modification_timestamp?;
        Some(SystemTime::UNIX_EPOCH + Duration::new(time.seconds, time.nanoseconds))
    }

    /// Reads the whole file into `buf` (its previous contents dropped),
    /// unless it is larger than `max` bytes: then `Ok(false)` and `buf`
    /// is left empty. A file that grows meanwhile is read as far as it
    /// went when it was opened.
    pub fn read(&self, max: u64, buf: &mut Vec<u8>) -> Result<bool, ErrorCode> {
        buf.clear();
        let file = self.dir.open_at(PathFlags::empty(), self.name, OpenFlags::empty(), DescriptorFlags::READ)?;
        let size = file.stat()?.size;
        if size > max {
            return Ok(false);
        }
        while (buf.len() as u64) < size {
            let (bytes, eof) = file.read((size - buf.len() as u64).min(READ_CHUNK), buf.len() as u64)?;
            if bytes.is_empty() {
                break;
            }
            if buf.is_empty() && bytes.len() as u64 == size {
                // The usual case: one read, and its buffer is the file.
                *buf = bytes;
                break;
            }
            buf.extend_from_slice(&bytes);
            if eof {
                break;
            }
        }
        Ok(true)
    }
}

/// Orders two [keys](File::key) as the walk meets their files.
pub fn compare_keys(a: &str, b: &str) -> std::cmp::Ordering {
    a.split('/').cmp(b.split('/'))
}

/// Walks the tree at `root` (a directory or a single file), calling
/// `visit` with each regular file dealt to `shard`, in walk order, until it
/// breaks. Fails only when `root` cannot be reached.
pub fn walk(root: &Path, shard: Shard, visit: impl FnMut(&File) -> ControlFlow<()>) -> Result<(), ErrorCode> {
    walk_of(root, shard, false, visit)
}

/// Like [`walk`] in one part, but visits every entry that is not a
/// directory: regular files, symlinks (not followed), FIFOs, sockets and
/// devices. For listing names: never [read](File::read) what it visits.
pub fn walk_names(root: &Path, visit: impl FnMut(&File) -> ControlFlow<()>) -> Result<(), ErrorCode> {
    walk_of(root, Shard::WHOLE, true, visit)
}

fn walk_of(root: &Path, shard: Shard, names: bool, mut visit: impl FnMut(&File) -> ControlFlow<()>) -> Result<(), ErrorCode> {
    let (preopen, base, rel) = preopen_of(root).ok_or(ErrorCode::NotPermitted)?;
    let rel_str = if rel.as_os_str().is_empty() { "." } else { rel.to_str().ok_or(ErrorCode::IllegalByteSequence)? };
    // Its type first: opening a FIFO to learn it is not a directory would
    // wait for a writer.
    let kind = preopen.stat_at(PathFlags::SYMLINK_FOLLOW, rel_str)?.type_;
    if kind != DescriptorType::Directory {
        if (kind == DescriptorType::RegularFile || names) && shard.owns(0) {
            let parent = match rel.parent() {
                Some(p) if !p.as_os_str().is_empty() => preopen.open_at(
                    PathFlags::SYMLINK_FOLLOW,
                    p.to_str().ok_or(ErrorCode::IllegalByteSequence)?,
                    OpenFlags::DIRECTORY,
                    DescriptorFlags::READ,
                )?,
                _ => preopen,
            };
            let name = rel.file_name().and_then(|n| n.to_str()).ok_or(ErrorCode::Invalid)?;
            let _ = visit(&File { dir: &parent, name, path: root, key: "" });
        }
        return Ok(());
    }
    let handle = preopen.open_at(PathFlags::SYMLINK_FOLLOW, rel_str, OpenFlags::DIRECTORY, DescriptorFlags::READ)?;
    // Ignore files between the working directory and the root apply too,
    // as they do in a walk started from the working directory.
    let mut levels = Vec::new();
    let mut dir_path = base;
    let mut ancestors: Vec<Descriptor> = Vec::new();
    for part in normalized(&rel).components() {
        let here = ancestors.last().unwrap_or(&preopen);
        levels.push(Level::probe(here, &dir_path));
        dir_path.push(part);
        let name = part.as_os_str().to_str().ok_or(ErrorCode::IllegalByteSequence)?;
        let next = here.open_at(PathFlags::SYMLINK_FOLLOW, name, OpenFlags::DIRECTORY, DescriptorFlags::READ)?;
        ancestors.push(next);
    }
    let mut walk = Walk { shard, names, files: 0, dirs: 0, levels };
    let _ = walk.dir(&handle, root, "", shard.count <= 1, &mut visit);
    Ok(())
}

/// The preopen holding `path`: its handle, its own path, and the rest.
fn preopen_of(path: &Path) -> Option<(Descriptor, PathBuf, PathBuf)> {
    get_directories().into_iter().find_map(|(handle, name)| {
        let rest = path.strip_prefix(&name).ok()?.to_path_buf();
        Some((handle, PathBuf::from(name), rest))
    })
}

/// `path` without `.` and with each `..` taking off the name before it.
fn normalized(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(name) => out.push(name),
            _ => {}
        }
    }
    out
}

/// The ignore rules one directory adds.
#[derive(Default)]
struct Level {
    /// `.ignore`: wins over every git rule, at any depth.
    ignore: Option<Gitignore>,
    gitignore: Option<Gitignore>,
    /// `.git/info/exclude` of a repository rooted here.
    exclude: Option<Gitignore>,
}

impl Level {
    /// A directory whose listing says which ignore files it holds.
    fn listed(dir: &Descriptor, path: &Path, entries: &[(String, DescriptorType)]) -> Level {
        let has = |name: &str| entries.iter().any(|(n, t)| n == name && *t == DescriptorType::RegularFile);
        let has_git = entries.iter().any(|(n, _)| n == ".git");
        Level {
            ignore: has(".ignore").then(|| rules(dir, path, ".ignore")).flatten(),
            gitignore: has(".gitignore").then(|| rules(dir, path, ".gitignore")).flatten(),
            exclude: has_git.then(|| rules(dir, path, ".git/info/exclude")).flatten(),
        }
    }

    /// A directory above the root, not listed: its ignore files are tried.
    fn probe(dir: &Descriptor, path: &Path) -> Level {
        Level {
            ignore: rules(dir, path, ".ignore"),
            gitignore: rules(dir, path, ".gitignore"),
            exclude: rules(dir, path, ".git/info/exclude"),
        }
    }
}

/// The rules of the ignore file `name` in `dir` (at `path`), if it can be
/// read and has any.
fn rules(dir: &Descriptor, path: &Path, name: &str) -> Option<Gitignore> {
    let file = dir.open_at(PathFlags::empty(), name, OpenFlags::empty(), DescriptorFlags::READ).ok()?;
    let mut text = Vec::new();
    loop {
        let (bytes, eof) = file.read(READ_CHUNK, text.len() as u64).ok()?;
        text.extend_from_slice(&bytes);
        if eof || bytes.is_empty() {
            break;
        }
    }
    let mut builder = GitignoreBuilder::new(path);
    for line in String::from_utf8_lossy(&text).lines() {
        // A line that is not a valid glob is skipped, as git skips it.
        let _ = builder.add_line(Some(path.join(name)), line);
    }
    builder.build().ok().filter(|g| !g.is_empty())
}

struct Walk {
    shard: Shard,
    /// Whether entries other than regular files and directories are visited.
    names: bool,
    /// Files met so far in directories every part lists.
    files: usize,
    /// Subdirectories dealt out so far.
    dirs: usize,
    /// The ignore rules of the directories from the working directory down
    /// to the one being listed.
    levels: Vec<Level>,
}

impl Walk {
    /// Whether the ignore rules in force skip `path`. Precedence follows
    /// the `ignore` crate: the nearest `.ignore` that has a say wins, then
    /// the nearest `.gitignore`, then `.git/info/exclude`. Without
    /// `require_git` (a tree need not be a repository) the crate draws no
    /// line at a nested repository's root either: rules above reach in.
    fn ignored(&self, path: &Path, is_dir: bool) -> bool {
        let (mut ignore, mut gitignore, mut exclude) = (Match::None, Match::None, Match::None);
        for level in self.levels.iter().rev() {
            for (found, rules) in [(&mut ignore, &level.ignore), (&mut gitignore, &level.gitignore), (&mut exclude, &level.exclude)] {
                if let (true, Some(rules)) = (found.is_none(), rules) {
                    *found = rules.matched(path, is_dir);
                }
            }
        }
        [ignore, gitignore, exclude].into_iter().find(|m| !m.is_none()).is_some_and(|m| m.is_ignore())
    }

    /// Walks the directory `dir` (at `path`, `key` under the root); `whole`
    /// when this part alone walks it. Breaks when `visit` does.
    fn dir(
        &mut self,
        dir: &Descriptor,
        path: &Path,
        key: &str,
        whole: bool,
        visit: &mut impl FnMut(&File) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        let Ok(entries) = list(dir) else { return ControlFlow::Continue(()) };
        self.levels.push(Level::listed(dir, path, &entries));
        let result = self.entries(dir, path, key, whole, &entries, visit);
        self.levels.pop();
        result
    }

    fn entries(
        &mut self,
        dir: &Descriptor,
        path: &Path,
        key: &str,
        whole: bool,
        entries: &[(String, DescriptorType)],
        visit: &mut impl FnMut(&File) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        let join = |name: &str| if key.is_empty() { name.to_string() } else { format!("{key}/{name}") };
        let subdirs = entries.iter().filter(|(_, t)| *t == DescriptorType::Directory).count();
        // The root never deals: its few top-level directories (`src`,
        // `tests`, `docs`) are rarely of a size.
        let deal = !whole && !key.is_empty() && subdirs >= FANOUT_PER_PART * self.shard.count as usize;
        for (name, kind) in entries {
            if name == ".git" {
                continue;
            }
            let child = path.join(name);
            if *kind == DescriptorType::Directory {
                if self.ignored(&child, true) {
                    continue;
                }
                let mut whole = whole;
                if deal {
                    let mine = self.shard.owns(self.dirs);
                    self.dirs += 1;
                    if !mine {
                        continue;
                    }
                    whole = true;
                }
                let Ok(sub) = dir.open_at(PathFlags::empty(), name, OpenFlags::DIRECTORY, DescriptorFlags::READ) else {
                    continue;
                };
                self.dir(&sub, &child, &join(name), whole, visit)?;
                continue;
            }
            // Symlinks are not followed; FIFOs, sockets and devices are
            // listed at most, never searched (opening a FIFO would block).
            if *kind != DescriptorType::RegularFile && !self.names {
                continue;
            }
            if self.ignored(&child, false) {
                continue;
            }
            let mine = whole || self.shard.owns(self.files);
            if !whole {
                self.files += 1;
            }
            if mine {
                visit(&File { dir, name, path: &child, key: &join(name) })?;
            }
        }
        ControlFlow::Continue(())
    }
}

/// A directory's entries, sorted by name.
fn list(dir: &Descriptor) -> Result<Vec<(String, DescriptorType)>, ErrorCode> {
    let stream = dir.read_directory()?;
    let mut entries = Vec::new();
    while let Some(entry) = stream.read_directory_entry()? {
        entries.push((entry.name, entry.type_));
    }
    entries.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    Ok(entries)
}
