//! Model providers: adapters from a vendor's wire protocol to Hangar's
//! normalized messages and stream events.

use std::cell::RefCell;
use std::collections::VecDeque;

pub use crate::__bindings::exports::hangar::plugin::provider_api::{
    Config, ErrorKind, Event, ProviderError, ProviderInfo, Request, ToolUseDelta, ToolUseStart,
};

use crate::__bindings::exports::hangar::plugin::provider_api::GuestCompletion;
use crate::__bindings::exports::hangar::plugin::provider_stream::{Call, Decoded};
use crate::types::ModelInfo;

/// A model provider whose answer to a model call is one HTTP response,
/// which is what every vendor's API gives. Implement it on a unit struct
/// and pass the struct to [`export_http_provider!`](crate::export_http_provider).
///
/// The provider builds the request ([`HttpProvider::start`]) and turns the
/// bytes of the answer into events ([`Decoder`]); the host sends the
/// request, holds the response and reads it. Between two pieces of an
/// answer no instance of the plugin is alive, only the decoder, kept as
/// bytes: a host with thousands of answers waiting on their models holds a
/// few hundred bytes for each instead of an instance.
pub trait HttpProvider {
    /// What turns the body of a successful response into events.
    type Decoder: Decoder;

    /// Describes the provider: its id (equal to the manifest name), name,
    /// how it authenticates, and whether it can list models.
    fn info() -> ProviderInfo;

    /// Lists the models on offer (this may send requests through
    /// [`crate::http`] itself).
    fn models(cfg: Config) -> Result<Vec<ModelInfo>, ProviderError>;

    /// Builds the request of a model call, and the decoder of its answer.
    /// The host sends the request as [`crate::http::Request::send`] would:
    /// to granted origins only, with the stored credential where the
    /// request asks for it.
    fn start(cfg: Config, req: Request) -> Result<(crate::http::Request, Self::Decoder), ProviderError>;
}

/// Turns the body of a model's answer into events, a piece at a time.
///
/// Between two pieces it is kept as bytes (serde, in `postcard`'s form),
/// so it must hold everything it needs: the bytes of an unfinished line
/// ([`crate::sse::SseFeed`] keeps those for an event stream), the open
/// tool calls, the counts so far. Keep it small: it crosses into the
/// plugin and back with every piece.
pub trait Decoder: serde::Serialize + serde::de::DeserializeOwned + 'static {
    /// Takes the bytes that arrived since the last call and appends the
    /// events they complete to `out`. Events appended before an error
    /// still reach the host, in order, and then the error ends the answer.
    fn feed(&mut self, bytes: &[u8], out: &mut Vec<Event>) -> Result<(), ProviderError>;

    /// The body ended. An answer that was not complete is an error here
    /// (a truncated stream); a complete one may still have events to give.
    fn end(&mut self, out: &mut Vec<Event>) -> Result<(), ProviderError>;

    /// Whether the answer is complete: the host then reads no more of the
    /// body (a server may keep it open after its last event).
    fn done(&self) -> bool {
        false
    }

    /// Classifies a response whose status is not a success, as the
    /// decoder [`HttpProvider::start`] made. The default is
    /// [`ProviderError::from_failure`].
    fn failure(&self, failure: &Failure) -> ProviderError {
        ProviderError::from_failure(failure)
    }

    /// Classifies a request that could not be sent: refused by the host
    /// (an origin not granted, no credential) or no connection. The
    /// default is the error's own kind (`From<HttpError>`).
    fn unsent(&self, error: crate::http::HttpError) -> ProviderError {
        error.into()
    }
}

/// A response whose status is not a success, read whole.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The HTTP status.
    pub status: u16,
    /// The headers, as sent (names in lowercase).
    pub headers: Vec<(String, String)>,
    /// The body (the host cuts a long one).
    pub body: Vec<u8>,
}

impl Failure {
    /// The first value of a header (names are matched case-insensitively).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Reads `response` whole (a body that breaks off is taken as empty).
    pub fn read(response: crate::http::Response) -> Failure {
        let status = response.status;
        let headers = response.headers.clone();
        Failure { status, headers, body: response.bytes().unwrap_or_default() }
    }
}

/// A model provider in general: one whose answer is not one HTTP response
/// (a scripted or computed answer, several requests in turn). Implement it
/// on a unit struct and pass the struct to
/// [`export_provider!`](crate::export_provider). Its instance stays alive
/// for the whole answer; an [`HttpProvider`] does not need to.
pub trait Provider {
    /// The stream of events of one model call.
    type Stream: EventStream;

    /// Describes the provider: its id (equal to the manifest name), name,
    /// how it authenticates, and whether it can list models.
    fn info() -> ProviderInfo;

    /// Lists the models on offer.
    fn models(cfg: Config) -> Result<Vec<ModelInfo>, ProviderError>;

    /// Starts a model call. Send the request here (through [`crate::http`])
    /// and return a stream that turns the response into events.
    fn complete(cfg: Config, req: Request) -> Result<Self::Stream, ProviderError>;
}

/// The events of one model call, pulled one at a time by the host as the
/// client is ready for them.
pub trait EventStream: 'static {
    /// The next event; `Ok(None)` once the answer is complete. The last
    /// event before the end should be [`Event::Stop`].
    fn next(&mut self) -> Result<Option<Event>, ProviderError>;
}

impl ProviderError {
    /// A failure of the given kind; `retryable` follows from the kind.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        let retryable = matches!(
            kind,
            ErrorKind::RateLimited | ErrorKind::Overloaded | ErrorKind::Server | ErrorKind::Connection
        );
        ProviderError { kind, retryable, status: None, message: message.into(), retry_after_ms: None }
    }

    /// Classifies an HTTP error status: 429 rate limited, 529 overloaded,
    /// 5xx server, 401/403 auth, other 4xx invalid request.
    pub fn from_status(status: u16, message: impl Into<String>) -> Self {
        let kind = match status {
            429 => ErrorKind::RateLimited,
            529 => ErrorKind::Overloaded,
            500..=599 => ErrorKind::Server,
            401 | 403 => ErrorKind::Auth,
            _ => ErrorKind::InvalidRequest,
        };
        ProviderError { status: Some(status), ..ProviderError::new(kind, message) }
    }

    /// Adds the wait the vendor asked for, parsed from a `retry-after`
    /// header value in seconds (an HTTP date is ignored).
    pub fn with_retry_after(mut self, header: Option<&str>) -> Self {
        self.retry_after_ms = header
            .and_then(|v| decimal_ms(v, 1000));
        self
    }
}

/// A non-negative decimal count of units of `unit_ms` milliseconds
/// (`"7"`, `"1.5"`, `"250.0"`) as whole milliseconds; `None` when it is not
/// one. Parsed by hand rather than with `str::parse::<f64>`, whose tables
/// (about 12 KB) would sit in every live provider instance's memory for a
/// header read only on errors. Waits too long for a `u64` saturate.
fn decimal_ms(text: &str, unit_ms: u64) -> Option<u64> {
    let text = text.trim();
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && fraction.is_empty()) || !digits(whole) || !digits(fraction) {
        return None;
    }
    let mut ms: u64 = 0;
    for d in whole.bytes() {
        ms = ms.saturating_mul(10).saturating_add(u64::from(d - b'0'));
    }
    ms = ms.saturating_mul(unit_ms);
    // Four digits resolve a tenth of a millisecond when the unit is a
    // second; later ones cannot change the whole milliseconds.
    let (mut part, mut scale) = (0u64, 1u64);
    for d in fraction.bytes().take(4) {
        part = part * 10 + u64::from(d - b'0');
        scale *= 10;
    }
    Some(ms.saturating_add(part * unit_ms / scale))
}

impl ProviderError {
    /// Classifies an HTTP response that is not a success: the kind from the
    /// status (see [`ProviderError::from_status`]), the wait from
    /// `retry-after-ms` or `retry-after`, and as `message` the vendor's own
    /// text, taken from the error shapes vendors use (`{"error": {"message":
    /// ...}}`, `{"error": "..."}`, `{"message": ...}`) or else the body
    /// itself (cut to 1000 characters).
    pub fn from_response(response: crate::http::Response) -> Self {
        Self::from_response_with(response, |_, _| false)
    }

    /// [`ProviderError::from_response`], with the vendor's own test for an
    /// error that says the request is longer than the model's context
    /// window (given the status and the raw body): such an error becomes
    /// [`ErrorKind::ContextLengthExceeded`], which the host answers by
    /// compacting the conversation and trying once more.
    pub fn from_response_with(response: crate::http::Response, context_length: impl FnOnce(u16, &[u8]) -> bool) -> Self {
        Self::from_failure_with(&Failure::read(response), context_length)
    }

    /// [`ProviderError::from_response`] for a response already read whole.
    pub fn from_failure(failure: &Failure) -> Self {
        Self::from_failure_with(failure, |_, _| false)
    }

    /// [`ProviderError::from_response_with`] for a response already read whole.
    pub fn from_failure_with(failure: &Failure, context_length: impl FnOnce(u16, &[u8]) -> bool) -> Self {
        let Failure { status, body, .. } = failure;
        let status = *status;
        let retry_after_ms = failure.header("retry-after-ms").and_then(|v| decimal_ms(v, 1));
        let message = vendor_message(body).unwrap_or_else(|| format!("HTTP {status} with no error message"));
        let mut err = ProviderError::from_status(status, message).with_retry_after(failure.header("retry-after"));
        if retry_after_ms.is_some() {
            err.retry_after_ms = retry_after_ms;
        }
        if context_length(status, body) {
            err.kind = ErrorKind::ContextLengthExceeded;
            err.retryable = false;
        }
        err
    }
}

/// The human-readable message in an error body, if it has any text.
fn vendor_message(body: &[u8]) -> Option<String> {
    if let Ok(json) = serde_json::from_slice::<serde_json::Value>(body) {
        let error = json.get("error");
        let text = error
            .and_then(|e| e.get("message"))
            .or_else(|| error.filter(|e| e.is_string()))
            .or_else(|| json.get("message"))
            .or_else(|| json.get("detail"))
            .and_then(|m| m.as_str());
        if let Some(text) = text {
            // Anthropic and OpenAI also name the error's type; it helps a person.
            let kind = error.and_then(|e| e.get("type")).and_then(|t| t.as_str());
            return Some(match kind {
                Some(kind) if !kind.is_empty() => format!("{kind}: {text}"),
                _ => text.to_string(),
            });
        }
    }
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    (!text.is_empty()).then(|| text.chars().take(1000).collect())
}

impl From<crate::http::HttpError> for ProviderError {
    fn from(err: crate::http::HttpError) -> Self {
        use crate::http::HttpError;
        let kind = match &err {
            HttpError::Denied(_) => ErrorKind::Denied,
            HttpError::InvalidRequest(_) => ErrorKind::InvalidRequest,
            HttpError::MissingCredential => ErrorKind::Auth,
            HttpError::Connection(_) | HttpError::Timeout => ErrorKind::Connection,
        };
        ProviderError::new(kind, err.describe())
    }
}

#[doc(hidden)]
pub struct StreamCell<S>(RefCell<S>);

impl<S> StreamCell<S> {
    #[doc(hidden)]
    pub fn new(stream: S) -> Self {
        StreamCell(RefCell::new(stream))
    }
}

impl<S: EventStream> GuestCompletion for StreamCell<S> {
    fn next(&self) -> Result<Option<Event>, ProviderError> {
        self.0.borrow_mut().next()
    }
}

/// Bytes asked of the host per read when the plugin reads the body itself
/// (`complete`, on a host that does not hold answers).
const CHUNK: u32 = 64 * 1024;

/// An [`HttpProvider`]'s answer read by the plugin itself, for hosts that
/// call `complete` rather than `provider-stream`.
#[doc(hidden)]
pub struct Decoding<D> {
    body: Option<crate::http::Body>,
    decoder: D,
    queue: VecDeque<Event>,
    failed: Option<ProviderError>,
}

impl<D: Decoder> EventStream for Decoding<D> {
    fn next(&mut self) -> Result<Option<Event>, ProviderError> {
        loop {
            if let Some(event) = self.queue.pop_front() {
                return Ok(Some(event));
            }
            if let Some(err) = self.failed.take() {
                return Err(err);
            }
            let Some(body) = &self.body else { return Ok(None) };
            let mut out = Vec::new();
            let step = match body.read(CHUNK) {
                Ok(Some(bytes)) => self.decoder.feed(&bytes, &mut out),
                Ok(None) => {
                    self.body = None;
                    self.decoder.end(&mut out)
                }
                Err(err) => {
                    self.body = None;
                    Err(broken(&err.describe()))
                }
            };
            self.queue.extend(out);
            if let Err(err) = step {
                self.failed = Some(err);
                self.body = None;
            }
            if self.decoder.done() {
                self.body = None;
            }
        }
    }
}

/// The error of a body that broke off mid-answer: what was read cannot be
/// told from a truncated answer, so it is a bad response, not retried.
fn broken(why: &str) -> ProviderError {
    ProviderError::new(ErrorKind::BadResponse, format!("the event stream broke off: {why}"))
}

#[doc(hidden)]
pub fn __complete<P: HttpProvider>(cfg: Config, req: Request) -> Result<Decoding<P::Decoder>, ProviderError> {
    let (request, decoder) = P::start(cfg, req)?;
    let response = request.send().map_err(|e| decoder.unsent(e))?;
    if !(200..300).contains(&response.status) {
        return Err(decoder.failure(&Failure::read(response)));
    }
    Ok(Decoding { body: Some(response.body), decoder, queue: VecDeque::new(), failed: None })
}

#[doc(hidden)]
pub fn __start<P: HttpProvider>(cfg: Config, req: Request) -> Result<Option<Call>, ProviderError> {
    let (request, decoder) = P::start(cfg, req)?;
    Ok(Some(Call { request, state: save(&decoder) }))
}

#[doc(hidden)]
pub fn __decode<D: Decoder>(state: Vec<u8>, chunk: Option<Vec<u8>>) -> Decoded {
    let mut decoder: D = load(&state);
    let mut events = Vec::new();
    let step = match chunk {
        Some(bytes) => decoder.feed(&bytes, &mut events),
        None => decoder.end(&mut events),
    };
    let error = step.err();
    Decoded { events, done: error.is_some() || decoder.done(), error, state: save(&decoder) }
}

#[doc(hidden)]
pub fn __failure<D: Decoder>(state: Vec<u8>, status: u16, headers: Vec<(String, String)>, body: Vec<u8>) -> ProviderError {
    load::<D>(&state).failure(&Failure { status, headers, body })
}

#[doc(hidden)]
pub fn __unsent<D: Decoder>(state: Vec<u8>, error: crate::http::HttpError) -> ProviderError {
    load::<D>(&state).unsent(error)
}

/// `none` from `start` sends the host to `complete`; `decode`, `failure`
/// and `unsent` are then never called.
#[doc(hidden)]
pub fn __unused() -> ProviderError {
    ProviderError::new(ErrorKind::InvalidRequest, "this provider answers through `complete`")
}

/// A state that does not read back is this plugin's own bug: a trap, which
/// the host reports as the plugin's failure, not the vendor's.
fn load<D: Decoder>(state: &[u8]) -> D {
    postcard::from_bytes(state).unwrap_or_else(|e| panic!("the decoder's state does not read back: {e}"))
}

fn save<D: Decoder>(decoder: &D) -> Vec<u8> {
    postcard::to_allocvec(decoder).unwrap_or_else(|e| panic!("the decoder's state cannot be written: {e}"))
}

/// Exports an [`HttpProvider`] as the component's `provider-api` and
/// `provider-stream`.
///
/// Call it once, at the crate root of a `cdylib` crate built for
/// `wasm32-wasip2`. The provider type and its [`HttpProvider::Decoder`]
/// must be `pub`: the generated exports name them.
#[macro_export]
macro_rules! export_http_provider {
    ($provider:ty) => {
        #[doc(hidden)]
        pub struct __HangarProviderExport;

        impl $crate::__bindings::exports::hangar::plugin::provider_api::Guest for __HangarProviderExport {
            type Completion = $crate::provider::StreamCell<
                $crate::provider::Decoding<<$provider as $crate::provider::HttpProvider>::Decoder>,
            >;

            fn info() -> $crate::provider::ProviderInfo {
                <$provider as $crate::provider::HttpProvider>::info()
            }
            fn models(
                cfg: $crate::provider::Config,
            ) -> Result<Vec<$crate::types::ModelInfo>, $crate::provider::ProviderError> {
                <$provider as $crate::provider::HttpProvider>::models(cfg)
            }
            fn complete(
                cfg: $crate::provider::Config,
                req: $crate::provider::Request,
            ) -> Result<
                $crate::__bindings::exports::hangar::plugin::provider_api::Completion,
                $crate::provider::ProviderError,
            > {
                let stream = $crate::provider::__complete::<$provider>(cfg, req)?;
                Ok($crate::__bindings::exports::hangar::plugin::provider_api::Completion::new(
                    $crate::provider::StreamCell::new(stream),
                ))
            }
        }

        impl $crate::__bindings::exports::hangar::plugin::provider_stream::Guest for __HangarProviderExport {
            fn start(
                cfg: $crate::provider::Config,
                req: $crate::provider::Request,
            ) -> Result<
                Option<$crate::__bindings::exports::hangar::plugin::provider_stream::Call>,
                $crate::provider::ProviderError,
            > {
                $crate::provider::__start::<$provider>(cfg, req)
            }
            fn decode(
                state: Vec<u8>,
                chunk: Option<Vec<u8>>,
            ) -> $crate::__bindings::exports::hangar::plugin::provider_stream::Decoded {
                $crate::provider::__decode::<<$provider as $crate::provider::HttpProvider>::Decoder>(state, chunk)
            }
            fn failure(
                state: Vec<u8>,
                status: u16,
                headers: Vec<(String, String)>,
                body: Vec<u8>,
            ) -> $crate::provider::ProviderError {
                $crate::provider::__failure::<<$provider as $crate::provider::HttpProvider>::Decoder>(state, status, headers, body)
            }
            fn unsent(state: Vec<u8>, error: $crate::http::HttpError) -> $crate::provider::ProviderError {
                $crate::provider::__unsent::<<$provider as $crate::provider::HttpProvider>::Decoder>(state, error)
            }
        }

        $crate::__bindings::__export_provider_world!(__HangarProviderExport with_types_in $crate::__bindings);
    };
}

/// Exports a [`Provider`] as the component's `provider-api`.
///
/// Call it once, at the crate root of a `cdylib` crate built for
/// `wasm32-wasip2`. The provider type and its [`Provider::Stream`] must be
/// `pub`: the generated exports name them.
#[macro_export]
macro_rules! export_provider {
    ($provider:ty) => {
        #[doc(hidden)]
        pub struct __HangarProviderExport;

        impl $crate::__bindings::exports::hangar::plugin::provider_stream::Guest for __HangarProviderExport {
            fn start(
                _cfg: $crate::provider::Config,
                _req: $crate::provider::Request,
            ) -> Result<
                Option<$crate::__bindings::exports::hangar::plugin::provider_stream::Call>,
                $crate::provider::ProviderError,
            > {
                Ok(None)
            }
            fn decode(
                state: Vec<u8>,
                _chunk: Option<Vec<u8>>,
            ) -> $crate::__bindings::exports::hangar::plugin::provider_stream::Decoded {
                $crate::__bindings::exports::hangar::plugin::provider_stream::Decoded {
                    events: Vec::new(),
                    state,
                    done: true,
                    error: Some($crate::provider::__unused()),
                }
            }
            fn failure(
                _state: Vec<u8>,
                _status: u16,
                _headers: Vec<(String, String)>,
                _body: Vec<u8>,
            ) -> $crate::provider::ProviderError {
                $crate::provider::__unused()
            }
            fn unsent(_state: Vec<u8>, _error: $crate::http::HttpError) -> $crate::provider::ProviderError {
                $crate::provider::__unused()
            }
        }

        impl $crate::__bindings::exports::hangar::plugin::provider_api::Guest for __HangarProviderExport {
            type Completion =
                $crate::provider::StreamCell<<$provider as $crate::Provider>::Stream>;

            fn info() -> $crate::provider::ProviderInfo {
                <$provider as $crate::Provider>::info()
            }
            fn models(
                cfg: $crate::provider::Config,
            ) -> Result<Vec<$crate::types::ModelInfo>, $crate::provider::ProviderError> {
                <$provider as $crate::Provider>::models(cfg)
            }
            fn complete(
                cfg: $crate::provider::Config,
                req: $crate::provider::Request,
            ) -> Result<
                $crate::__bindings::exports::hangar::plugin::provider_api::Completion,
                $crate::provider::ProviderError,
            > {
                let stream = <$provider as $crate::Provider>::complete(cfg, req)?;
                Ok($crate::__bindings::exports::hangar::plugin::provider_api::Completion::new(
                    $crate::provider::StreamCell::new(stream),
                ))
            }
        }

        $crate::__bindings::__export_provider_world!(__HangarProviderExport with_types_in $crate::__bindings);
    };
}

/// Pieces of the chat formats of the OpenAI family (OpenAI Chat
/// Completions, Ollama, and the servers compatible with them), which all
/// take history as role-tagged messages with `tool_calls` and `role: tool`
/// answers rather than content blocks.
pub mod chat {
    use serde_json::{Value, json};

    use crate::types::{ContentBlock, Message, ToolResult, ToolSpec};

    /// The text blocks of a message, joined by newlines.
    pub fn text(message: &Message) -> String {
        let parts: Vec<&str> = message
            .content
            .iter()
            .filter_map(|b| match b {
                ContentBlock::Text(t) if !t.is_empty() => Some(t.as_str()),
                _ => None,
            })
            .collect();
        parts.join("\n")
    }

    /// The content of a `role: tool` message. These formats have no error
    /// flag, so a failed call says so in its text.
    pub fn tool_result_content(result: &ToolResult) -> String {
        if result.is_error { format!("Error: {}", result.content) } else { result.content.clone() }
    }

    /// The `tools` array: each tool as a `function` with its JSON Schema.
    pub fn function_tools(tools: &[ToolSpec]) -> Vec<Value> {
        tools
            .iter()
            .map(|t| {
                let schema: Value = serde_json::from_str(&t.input_schema).unwrap_or_else(|_| json!({"type": "object"}));
                json!({"type": "function", "function": {"name": t.name, "description": t.description, "parameters": schema}})
            })
            .collect()
    }

    /// A temperature as JSON, rounded so that `0.7f32` is sent as `0.7`
    /// rather than `0.699999988079071`.
    pub fn temperature(t: f32) -> Value {
        json!((f64::from(t) * 1e6).round() / 1e6)
    }
}

#[cfg(test)]
mod tests {
    use super::decimal_ms;

    #[test]
    fn retry_waits_parse_as_whole_milliseconds() {
        let cases = [
            ("7", 1000, Some(7000)),
            (" 2 ", 1000, Some(2000)),
            ("1.5", 1000, Some(1500)),
            ("0.25", 1000, Some(250)),
            (".5", 1000, Some(500)),
            ("3.", 1000, Some(3000)),
            ("1.99999", 1000, Some(1999)),
            ("250", 1, Some(250)),
            ("250.9", 1, Some(250)),
            ("99999999999999999999999", 1000, Some(u64::MAX)),
            ("", 1000, None),
            (".", 1000, None),
            ("-1", 1000, None),
            ("1e3", 1000, None),
            ("inf", 1000, None),
            ("Wed, 21 Oct 2026 07:28:00 GMT", 1000, None),
            ("1.2.3", 1000, None),
        ];
        for (text, unit, want) in cases {
            assert_eq!(decimal_ms(text, unit), want, "{text:?} in units of {unit} ms");
        }
    }
}
