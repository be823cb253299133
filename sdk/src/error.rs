use std::fmt;

/// A failure to report to the model.
///
/// Anything that implements [`std::error::Error`] converts into it, so `?`
/// works on I/O and JSON errors; [`Error::msg`] makes one from text. A tool
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
impl<E: std::error::Error> From<E> for Error {
    fn from(err: E) -> Self {
        Error(err.to_string())
    }
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
