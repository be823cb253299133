//! What `glob` and `grep` share: one notion of which files a search sees
//! ([`parts`]: ripgrep's, with `.gitignore`, `.ignore` and
//! `.git/info/exclude` honoured, dotfiles shown, `.git` never entered,
//! symlinks never followed, sorted by name), and one glob syntax.

pub mod parts;

use globset::{GlobBuilder, GlobMatcher};
use hangar_sdk::Error;

/// Compiles a glob where `*` stays within one directory and `**` crosses
/// directories. `what` names the argument in the error (`pattern`, `include`).
pub fn glob(pattern: &str, what: &str) -> Result<GlobMatcher, Error> {
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .map(|g| g.compile_matcher())
        .map_err(|e| Error::msg(format!("invalid {what} pattern `{pattern}`: {e}")))
}
