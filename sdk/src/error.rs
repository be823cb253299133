use std::fmt;

/// A failure to report to the model.
///
/// Anything that implements [`std::error::Error`] converts into it, so `?`
/// works on I/O and JSON errors; [`Error::msg`] makes one from text
/// (`Error::msg(format!("{path}: {err}"))` adds context). An
/// [`std::io::Error`] from the OS reads with its Linux name (`No such file
/// or directory (ENOENT)`), and in a tool that the host gave no filesystem,
/// as the message saying so. A tool
/// that returns an `Error` answers the model with its text and `is_error`
/// set: the model reads it and can try something else.
pub struct Error(String);

impl Error {
    /// An error with the given text.
    pub fn msg(text: impl fmt::Display) -> Self {
        Error(text.to_string())
    }

    /// The text the model will read.
    pub fn message(&self) -> &str {
        &self.0
    }
}

// Deliberately not `std::error::Error`: that keeps this blanket conversion
// coherent (the same trick as `anyhow::Error`).
impl<E: std::error::Error + 'static> From<E> for Error {
    fn from(err: E) -> Self {
        Error(io_text(&err).unwrap_or_else(|| err.to_string()))
    }
}

/// The text of an OS error, named as on Linux (and in a tool, the
/// no-filesystem diagnosis); `None` for any other error.
fn io_text(err: &dyn std::any::Any) -> Option<String> {
    let code = err.downcast_ref::<std::io::Error>()?.raw_os_error()?;
    #[cfg(feature = "tool")]
    return Some(crate::fs::named(std::io::Error::from_raw_os_error(code)).to_string());
    #[cfg(not(feature = "tool"))]
    return Some(std::io::Error::from_raw_os_error(code).to_string());
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.0, f)
    }
}
