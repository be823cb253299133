//! Model providers: adapters from a vendor's wire protocol to Hangar's
//! normalized messages and stream events.

use std::cell::RefCell;

pub use crate::__bindings::exports::hangar::plugin::provider_api::{
    Config, ErrorKind, Event, ProviderError, ProviderInfo, Request, ToolUseDelta, ToolUseStart,
};

use crate::__bindings::exports::hangar::plugin::provider_api::GuestCompletion;
use crate::types::ModelInfo;

/// A model provider. Implement it on a unit struct and pass the struct to
/// [`export_provider!`](crate::export_provider).
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
        let status = response.status;
        let retry_after_ms = response
            .header("retry-after-ms")
            .and_then(|v| decimal_ms(v, 1));
        let retry_after = response.header("retry-after").map(str::to_owned);
        let body = response.bytes().unwrap_or_default();
        let message = vendor_message(&body).unwrap_or_else(|| format!("HTTP {status} with no error message"));
        let mut err = ProviderError::from_status(status, message).with_retry_after(retry_after.as_deref());
        if retry_after_ms.is_some() {
            err.retry_after_ms = retry_after_ms;
        }
        if context_length(status, &body) {
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
