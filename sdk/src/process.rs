//! Shell commands, for tools granted the `process` capability.
//!
//! The host runs the command with `bash -c` in the session's working
//! directory, with a minimal environment, confined to that directory where
//! the kernel allows, and kills every process it started when the command
//! ends or times out. A tool whose manifest does not ask for `process`, or
//! whose request the operator refuses, fails to load if it uses this.

pub use crate::__bindings::hangar::plugin::process::{Command, Outcome};

use crate::Error;

/// Runs `cmd` and waits for it to end (or to time out).
pub fn run(cmd: &Command) -> Result<Outcome, Error> {
    crate::__bindings::hangar::plugin::process::run(cmd).map_err(Error::msg)
}
