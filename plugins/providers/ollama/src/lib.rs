//! `ollama`: a local Ollama server's `/api/chat`, streamed.
//!
//! The answer is NDJSON: one JSON object per line, each with a piece of
//! `message.content` and, when the model calls tools, whole `tool_calls`
//! (Ollama does not stream arguments); the last line has `done: true`, the
//! `done_reason` and the token counts. Ollama takes no key.

use std::time::{SystemTime, UNIX_EPOCH};

use hangar_sdk::http::{HttpError, Request};
use hangar_sdk::provider::{
    Config, ErrorKind, Event, Failure, ProviderError, ProviderInfo, Request as Completion, ToolUseDelta, ToolUseStart, chat,
};
use hangar_sdk::serde_json::{self, Value, json};
use hangar_sdk::types::{ContentBlock, ModelInfo, Role, StopReason, Usage};
use hangar_sdk::{Decoder, HttpProvider, export_http_provider};
use serde::{Deserialize, Serialize};

/// Where Ollama listens unless told otherwise.
const DEFAULT_BASE: &str = "http://127.0.0.1:11434";
/// Ollama's port, for an `OLLAMA_HOST` that names only a host.
const DEFAULT_PORT: u16 = 11434;
/// Listing models touches only the local server.
const MODELS_TIMEOUT_MS: u32 = 10_000;
/// Ollama loads a model before the first byte of the answer, which can take
/// minutes for a large one.
const COMPLETE_TIMEOUT_MS: u32 = 300_000;

/// The adapter; exported as the component's `provider-api` and
/// `provider-stream`.
pub struct Ollama;

impl HttpProvider for Ollama {
    type Decoder = ChatStream;


    fn info() -> ProviderInfo {
        ProviderInfo { id: "ollama".into(), name: "Ollama".into(), auth_types: Vec::new(), lists_models: true }
    }

    fn models(cfg: Config) -> Result<Vec<ModelInfo>, ProviderError> {
        let base = base_url(&cfg);
        let response = Request::get(format!("{base}/api/tags"))
            .timeout_ms(MODELS_TIMEOUT_MS)
            .send()
            .map_err(|e| unreachable(&base, e))?;
        if !(200..300).contains(&response.status) {
            return Err(ProviderError::from_response(response));
        }
        let body = response.bytes().map_err(|e| unreachable(&base, e))?;
        let json: Value = serde_json::from_slice(&body).map_err(|e| bad(&format!("/api/tags is not JSON: {e}")))?;
        let list = json["models"].as_array().ok_or_else(|| bad("/api/tags has no `models` array"))?;
        Ok(list
            .iter()
            .filter_map(|m| {
                let id = m["model"].as_str().or_else(|| m["name"].as_str())?;
                let name = m["name"].as_str().unwrap_or(id);
                Some(ModelInfo { id: id.into(), name: name.into(), context_window: context_length(&base, id) })
            })
            .collect())
    }

    fn start(cfg: Config, req: Completion) -> Result<(Request, ChatStream), ProviderError> {
        let base = base_url(&cfg);
        let request = Request::post_json(format!("{base}/api/chat"), &request_body(&req)).timeout_ms(COMPLETE_TIMEOUT_MS);
        Ok((request, ChatStream::new(base)))
    }
}

export_http_provider!(Ollama);

/// The base URL, from the operator's setting (often `OLLAMA_HOST`, which
/// Ollama itself accepts without a scheme or port, and as `0.0.0.0` to mean
/// "listen everywhere") or the default.
fn base_url(cfg: &Config) -> String {
    let Some(raw) = cfg.base_url.as_deref().map(str::trim).filter(|b| !b.is_empty()) else {
        return DEFAULT_BASE.into();
    };
    let raw = raw.trim_end_matches('/');
    let (scheme, rest) = raw.split_once("://").unwrap_or(("http", raw));
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let has_port = authority.rsplit_once(':').is_some_and(|(_, p)| p.bytes().all(|b| b.is_ascii_digit()))
        && !authority.ends_with(']');
    let authority = if has_port { authority.to_string() } else { format!("{authority}:{DEFAULT_PORT}") };
    // A listen-everywhere address is reached on loopback.
    let authority = authority.replacen("0.0.0.0:", "127.0.0.1:", 1);
    format!("{scheme}://{authority}{path}")
}

/// Ollama's ways of saying the prompt does not fit the context (`prompt
/// too long; exceeded max context length by N tokens`, `input length
/// exceeds the context length`), as an error body or a stream line.
fn too_long(text: &str) -> bool {
    let text = text.to_ascii_lowercase();
    text.contains("prompt too long") || (text.contains("context") && (text.contains("exceed") || text.contains("too long")))
}

/// A failure to reach Ollama, naming the address tried: the usual cause is
/// a server that is not running, or runs elsewhere.
fn unreachable(base: &str, err: HttpError) -> ProviderError {
    let mut out = ProviderError::from(err);
    if matches!(out.kind, ErrorKind::Connection) {
        out.message = format!("cannot reach Ollama at {base} (is `ollama serve` running? set OLLAMA_HOST otherwise): {}", out.message);
    }
    out
}

/// The context length `/api/show` reports (`model_info` holds it as
/// `<architecture>.context_length`); `None` when it does not answer.
fn context_length(base: &str, model: &str) -> Option<u64> {
    let response = Request::post_json(format!("{base}/api/show"), &json!({"model": model}))
        .timeout_ms(MODELS_TIMEOUT_MS)
        .send()
        .ok()
        .filter(|r| (200..300).contains(&r.status))?;
    let json: Value = serde_json::from_slice(&response.bytes().ok()?).ok()?;
    json["model_info"].as_object()?.iter().find(|(k, _)| k.ends_with(".context_length")).and_then(|(_, v)| v.as_u64())
}

/// The `/api/chat` request body for a Hangar request.
///
/// Hangar's history holds Anthropic-style blocks; Ollama wants an assistant
/// message with `tool_calls` (arguments as an object), then `role: tool`
/// messages naming the tool they answer.
fn request_body(req: &Completion) -> Value {
    let mut messages = Vec::new();
    if let Some(system) = req.system.as_deref().filter(|s| !s.is_empty()) {
        messages.push(json!({"role": "system", "content": system}));
    }
    for (position, message) in req.messages.iter().enumerate() {
        let text = chat::text(message);
        match message.role {
            Role::User => {
                for block in &message.content {
                    if let ContentBlock::ToolResult(result) = block {
                        let content = chat::tool_result_content(result);
                        let mut out = json!({"role": "tool", "content": content, "tool_call_id": result.tool_use_id});
                        if let Some(name) = tool_name(&req.messages[..position], &result.tool_use_id) {
                            out["tool_name"] = json!(name);
                        }
                        messages.push(out);
                    }
                }
                if !text.is_empty() {
                    messages.push(json!({"role": "user", "content": text}));
                }
            }
            Role::Assistant => {
                let calls: Vec<Value> = message
                    .content
                    .iter()
                    .filter_map(|b| match b {
                        ContentBlock::ToolUse(call) => Some(json!({
                            "id": call.id,
                            "function": {
                                "name": call.name,
                                "arguments": serde_json::from_str::<Value>(&call.input).unwrap_or_else(|_| json!({})),
                            },
                        })),
                        _ => None,
                    })
                    .collect();
                let mut out = json!({"role": "assistant", "content": text});
                if !calls.is_empty() {
                    out["tool_calls"] = json!(calls);
                }
                messages.push(out);
            }
        }
    }
    let mut options = json!({"num_predict": req.max_tokens});
    if let Some(t) = req.temperature {
        options["temperature"] = chat::temperature(t);
    }
    let mut body = json!({"model": req.model, "messages": messages, "stream": true, "options": options});
    if !req.tools.is_empty() {
        body["tools"] = json!(chat::function_tools(&req.tools));
    }
    body
}

/// The name of the tool a result answers: the latest earlier call with its id.
fn tool_name<'a>(earlier: &'a [hangar_sdk::types::Message], id: &str) -> Option<&'a str> {
    earlier.iter().rev().flat_map(|m| m.content.iter()).find_map(|b| match b {
        ContentBlock::ToolUse(call) if call.id == id => Some(call.name.as_str()),
        _ => None,
    })
}

/// The decoder of one streamed answer: kept between the pieces of the body.
#[derive(Serialize, Deserialize)]
pub struct ChatStream {
    /// The server's base URL, named when it cannot be reached.
    base: String,
    /// The bytes of a line that has not ended yet.
    line: Vec<u8>,
    /// The events of the step being decoded (handed out at its end).
    #[serde(skip)]
    queue: std::collections::VecDeque<Event>,
    /// Makes the ids of this answer's tool calls unique across the
    /// conversation (Ollama gives calls no ids of its own).
    id_prefix: String,
    calls: usize,
    finished: bool,
}

impl ChatStream {
    fn new(base: String) -> Self {
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        ChatStream {
            base,
            line: Vec::new(),
            queue: Default::default(),
            id_prefix: format!("call_{:x}", nanos & 0xffff_ffff_ffff),
            calls: 0,
            finished: false,
        }
    }

    /// Turns one NDJSON line into zero or more Hangar events.
    fn handle(&mut self, line: &[u8]) -> Result<(), ProviderError> {
        let json: Value = serde_json::from_slice(line).map_err(|e| {
            let excerpt: String = String::from_utf8_lossy(line).chars().take(200).collect();
            bad(&format!("malformed line ({e}): {excerpt}"))
        })?;
        if let Some(error) = json["error"].as_str() {
            // A failure after the 200 went out (the model runner died, ...).
            let mut err = ProviderError { status: None, ..ProviderError::from_status(500, error) };
            if too_long(error) {
                err.kind = ErrorKind::ContextLengthExceeded;
                err.retryable = false;
            }
            return Err(err);
        }
        let message = &json["message"];
        if let Some(text) = message["content"].as_str().filter(|t| !t.is_empty()) {
            self.queue.push_back(Event::Text(text.into()));
        }
        for call in message["tool_calls"].as_array().into_iter().flatten() {
            let name = call["function"]["name"].as_str().filter(|n| !n.is_empty()).ok_or_else(|| bad("a tool call without a name"))?;
            let id = match call["id"].as_str().filter(|s| !s.is_empty()) {
                Some(id) => id.to_string(),
                None => format!("{}_{}", self.id_prefix, self.calls),
            };
            self.calls += 1;
            let arguments = match &call["function"]["arguments"] {
                Value::Null => "{}".to_string(),
                // Some models' arguments arrive as JSON text.
                Value::String(text) if serde_json::from_str::<Value>(text).is_ok_and(|v| v.is_object()) => text.clone(),
                other => hangar_sdk::json::to_string(other),
            };
            self.queue.push_back(Event::ToolUseStart(ToolUseStart { id: id.clone(), name: name.into() }));
            self.queue.push_back(Event::ToolUseDelta(ToolUseDelta { id: id.clone(), partial_json: arguments }));
            self.queue.push_back(Event::ToolUseEnd(id));
        }
        if json["done"].as_bool() == Some(true) {
            self.queue.push_back(Event::Usage(Usage {
                input_tokens: json["prompt_eval_count"].as_u64().unwrap_or(0),
                output_tokens: json["eval_count"].as_u64().unwrap_or(0),
            }));
            let reason = match json["done_reason"].as_str() {
                // Ollama says `stop` after tool calls too.
                _ if self.calls > 0 => StopReason::ToolUse,
                Some("length") => StopReason::MaxTokens,
                _ => StopReason::EndTurn,
            };
            self.queue.push_back(Event::Stop(reason));
            self.finished = true;
        }
        Ok(())
    }
}

impl ChatStream {
    /// Handles each line `bytes` completes; what is left of a line waits.
    fn step(&mut self, bytes: &[u8]) -> Result<(), ProviderError> {
        self.line.extend_from_slice(bytes);
        let mut start = 0;
        while let Some(newline) = self.line[start..].iter().position(|&b| b == b'\n') {
            // What follows the `done` line is not part of the answer.
            if self.finished {
                break;
            }
            let end = start + newline;
            let line = std::mem::take(&mut self.line);
            let handled = self.line_at(&line[start..end]);
            self.line = line;
            handled?;
            start = end + 1;
        }
        self.line.drain(..start);
        Ok(())
    }

    fn line_at(&mut self, line: &[u8]) -> Result<(), ProviderError> {
        let trimmed = line.trim_ascii();
        if trimmed.is_empty() { Ok(()) } else { self.handle(trimmed) }
    }
}

impl Decoder for ChatStream {
    fn feed(&mut self, bytes: &[u8], out: &mut Vec<Event>) -> Result<(), ProviderError> {
        let step = self.step(bytes);
        out.extend(self.queue.drain(..));
        step
    }

    fn end(&mut self, out: &mut Vec<Event>) -> Result<(), ProviderError> {
        // A last line without its newline still counts.
        let last = std::mem::take(&mut self.line);
        let step = if self.finished { Ok(()) } else { self.line_at(&last) };
        out.extend(self.queue.drain(..));
        step?;
        if self.finished { Ok(()) } else { Err(bad("the stream ended before a `done` line (truncated)")) }
    }

    fn done(&self) -> bool {
        self.finished
    }

    fn failure(&self, failure: &Failure) -> ProviderError {
        ProviderError::from_failure_with(failure, |_, body| too_long(&String::from_utf8_lossy(body)))
    }

    fn unsent(&self, error: HttpError) -> ProviderError {
        unreachable(&self.base, error)
    }
}

fn bad(message: &str) -> ProviderError {
    ProviderError::new(ErrorKind::BadResponse, message)
}
