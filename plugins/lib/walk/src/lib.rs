//! What `glob` and `grep` share: one notion of which files a search sees,
//! and one glob syntax. [`walker`] is the `ignore` crate's walk;
//! [`parts::walk`] sees the same files in the same order, on far fewer host
//! calls, and deals them out to the parts of a call.

pub mod parts;

use std::path::Path;

use globset::{GlobBuilder, GlobMatcher};
use hangar_sdk::Error;
use ignore::WalkBuilder;

/// Compiles a glob where `*` stays within one directory and `**` crosses
/// directories. `what` names the argument in the error (`pattern`, `include`).
pub fn glob(pattern: &str, what: &str) -> Result<GlobMatcher, Error> {
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .map(|g| g.compile_matcher())
        .map_err(|e| Error::msg(format!("invalid {what} pattern `{pattern}`: {e}")))
}

/// A single-threaded walk (threads are not available in the sandbox) that
/// honours `.gitignore` (even outside a git repository), `.ignore` and
/// `.git/info/exclude`, shows dotfiles, never enters `.git` and never
/// follows a symlink. Sorted by name, so results are stable.
pub fn walker(root: &Path) -> ignore::Walk {
    let mut builder = WalkBuilder::new(root);
    builder
        .hidden(false)
        .git_ignore(true)
        .git_exclude(true)
        .git_global(false)
        .require_git(false)
        .follow_links(false)
        .sort_by_file_name(|a, b| a.cmp(b))
        .filter_entry(|e| e.file_name() != ".git");
    builder.build()
}
