//! Log lines into the host's tracing output, tagged with the plugin's id.
//!
//! Plugins have no standard output or error: these functions are the way to
//! leave a trace for the operator.

use crate::__bindings::hangar::plugin::log::{Level, log};

/// Logs at debug level.
pub fn debug(message: impl AsRef<str>) {
    log(Level::Debug, message.as_ref());
}

/// Logs at info level.
pub fn info(message: impl AsRef<str>) {
    log(Level::Info, message.as_ref());
}

/// Logs at warn level.
pub fn warn(message: impl AsRef<str>) {
    log(Level::Warn, message.as_ref());
}

/// Logs at error level.
pub fn error(message: impl AsRef<str>) {
    log(Level::Error, message.as_ref());
}
