//! Outbound HTTP through the host, for plugins granted origins.
//!
//! A request never carries a credential: it says *where* one goes
//! ([`Credential::Header`] or [`Credential::Bearer`]) and the host inserts
//! the key it stores for this plugin on the way out. Requests to origins the
//! plugin is not granted fail with [`HttpError::Denied`].

use std::io;

pub use crate::__bindings::hangar::plugin::http::{Body, Credential, HttpError, Request, Response};

impl Request {
    /// A `GET` of `url` with no headers and no credential.
    pub fn get(url: impl Into<String>) -> Self {
        Request {
            method: "GET".into(),
            url: url.into(),
            headers: Vec::new(),
            body: Vec::new(),
            credential: Credential::None,
            timeout_ms: None,
        }
    }

    /// A `POST` of a JSON body to `url` (written by [`crate::json::to_string`]).
    pub fn post_json(url: impl Into<String>, body: &serde_json::Value) -> Self {
        Request {
            method: "POST".into(),
            url: url.into(),
            headers: vec![("content-type".into(), "application/json".into())],
            body: crate::json::to_string(body).into_bytes(),
            credential: Credential::None,
            timeout_ms: None,
        }
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Asks the host to insert the stored credential as described.
    pub fn credential(mut self, credential: Credential) -> Self {
        self.credential = credential;
        self
    }

    /// Limits the wait for the response headers.
    pub fn timeout_ms(mut self, ms: u32) -> Self {
        self.timeout_ms = Some(ms);
        self
    }

    /// Sends the request and waits for the response headers.
    pub fn send(&self) -> Result<Response, HttpError> {
        crate::__bindings::hangar::plugin::http::send(self)
    }
}

impl Response {
    /// The first value of a header (names are matched case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Reads the whole body.
    pub fn bytes(self) -> Result<Vec<u8>, HttpError> {
        let mut out = Vec::new();
        while let Some(chunk) = self.body.read(64 * 1024)? {
            out.extend_from_slice(&chunk);
        }
        Ok(out)
    }

    /// Reads the whole body as text (invalid UTF-8 is replaced).
    pub fn text(self) -> Result<String, HttpError> {
        Ok(String::from_utf8_lossy(&self.bytes()?).into_owned())
    }

    /// The body as a [`std::io::Read`], chunk by chunk as it arrives; wrap it
    /// in a [`std::io::BufReader`] to read lines.
    pub fn into_reader(self) -> BodyReader {
        BodyReader { body: self.body, pending: Vec::new(), pos: 0, done: false }
    }
}

/// A response body as a [`std::io::Read`]. A connection that breaks mid-body
/// reads as an [`io::ErrorKind::UnexpectedEof`] error.
pub struct BodyReader {
    body: Body,
    pending: Vec<u8>,
    pos: usize,
    done: bool,
}

impl io::Read for BodyReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.pending.len() {
            if self.done {
                return Ok(0);
            }
            match self.body.read(64 * 1024) {
                Ok(Some(chunk)) => {
                    self.pending = chunk;
                    self.pos = 0;
                }
                Ok(None) => self.done = true,
                Err(err) => {
                    return Err(io::Error::new(io::ErrorKind::UnexpectedEof, err.describe()));
                }
            }
        }
        let n = buf.len().min(self.pending.len() - self.pos);
        buf[..n].copy_from_slice(&self.pending[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl HttpError {
    /// A sentence for a person (the generated `Display` is terse).
    pub fn describe(&self) -> String {
        match self {
            HttpError::Denied(what) => format!("request denied by the host: {what}"),
            HttpError::InvalidRequest(what) => format!("invalid request: {what}"),
            HttpError::MissingCredential => "no credential is configured".into(),
            HttpError::Connection(what) => format!("connection failed: {what}"),
            HttpError::Timeout => "timed out waiting for the response".into(),
        }
    }
}
