//! `anthropic`: Anthropic's Messages API with `stream: true`.
//!
//! The request is Hangar's history almost as is (Hangar's messages are
//! Anthropic-style content blocks). The answer is an SSE stream of
//! `message_start`, `content_block_start` / `_delta` / `_stop`,
//! `message_delta`, `message_stop`, `ping` and `error` events, turned into
//! Hangar events as each SSE event arrives. The key never enters this
//! component: requests ask the host to put it in `x-api-key`.

use std::collections::HashMap;

use hangar_sdk::http::{Credential, Request};
use hangar_sdk::provider::{
    Config, ErrorKind, Event, Failure, ProviderError, ProviderInfo, Request as Completion, ToolUseDelta, ToolUseStart,
};
use hangar_sdk::serde_json::{self, Value, json};
use hangar_sdk::sse::SseFeed;
use hangar_sdk::types::{ContentBlock, ModelInfo, Role, StopReason, Usage};
use hangar_sdk::{Decoder, HttpProvider, export_http_provider};
use serde::{Deserialize, Serialize};

/// The vendor's public endpoint, used when the operator configured none.
const PUBLIC_BASE: &str = "https://api.anthropic.com";
/// The API version this adapter speaks.
const API_VERSION: &str = "2023-06-01";
/// Listing models is a nicety: give up fast and fall back to the catalog.
const MODELS_TIMEOUT_MS: u32 = 5_000;
/// Time allowed until the response headers of a model call arrive.
const COMPLETE_TIMEOUT_MS: u32 = 120_000;

/// Models known to this build, with their context windows, so that `models`
/// answers without a network (and without a key). Live listings are merged
/// in when a key is set. Each is listed under its dated id and under its
/// alias (the dated id without its date, as the vendor's docs and the
/// Messages API accept it); a model published without a dated id has its
/// alias only.
///
/// Checked on 2026-12-01 against the vendor's model pages (models overview
/// and each model's page): `claude-opus-5` (1M tokens, released 2026-07-24,
/// legacy); Sonnet 4.5 `claude-sonnet-4-5-20250929` (200K; deprecated, the
/// vendor retires it on 2026-11-30, kept so existing agents still resolve);
/// the 4.x dated ids below with 200K windows. Newer models whose API ids the
/// pages checked did not state (Opus 5.5, Sonnet 5.5, Haiku 5.5, Fable 5.1)
/// are not listed here; with a key, the live listing names them.
const CATALOG: &[(&str, &str, u64)] = &[
    ("claude-opus-5", "Claude Opus 5", 1_000_000),
    ("claude-opus-4-5-20251101", "Claude Opus 4.5", 200_000),
    ("claude-sonnet-4-5-20250929", "Claude Sonnet 4.5", 200_000),
    ("claude-haiku-4-5-20251001", "Claude Haiku 4.5", 200_000),
    ("claude-opus-4-1-20250805", "Claude Opus 4.1", 200_000),
    ("claude-opus-4-20250514", "Claude Opus 4", 200_000),
    ("claude-sonnet-4-20250514", "Claude Sonnet 4", 200_000),
    ("claude-3-7-sonnet-20250219", "Claude Sonnet 3.7", 200_000),
    ("claude-3-5-haiku-20241022", "Claude Haiku 3.5", 200_000),
];

/// The adapter; exported as the component's `provider-api` and
/// `provider-stream`.
pub struct Anthropic;

impl HttpProvider for Anthropic {
    type Decoder = MessageStream;

    fn info() -> ProviderInfo {
        ProviderInfo { id: "anthropic".into(), name: "Anthropic".into(), auth_types: vec!["api_key".into()], lists_models: true }
    }

    fn models(cfg: Config) -> Result<Vec<ModelInfo>, ProviderError> {
        let mut models: Vec<ModelInfo> = Vec::new();
        if cfg.has_credential {
            match live_models(&cfg) {
                Ok(live) => models = live,
                Err(err) => hangar_sdk::log::warn(format!("listing models failed, using the built-in catalog: {}", err.message)),
            }
        }
        // Union: the live list first (what this key can use), then catalog
        // entries it did not name; then the alias of every dated id, so
        // that `claude-sonnet-4-5` and `claude-sonnet-4-5-20250929` are both
        // listed (and both resolve).
        for &(id, name, window) in CATALOG {
            if !models.iter().any(|m| m.id == id) {
                models.push(ModelInfo { id: id.into(), name: name.into(), context_window: Some(window) });
            }
        }
        let aliases: Vec<ModelInfo> = models
            .iter()
            .filter(|m| undated(&m.id) != m.id)
            .map(|m| ModelInfo { id: undated(&m.id).into(), name: m.name.clone(), context_window: m.context_window })
            .collect();
        for alias in aliases {
            if !models.iter().any(|m| m.id == alias.id) {
                models.push(alias);
            }
        }
        Ok(models)
    }

    fn start(cfg: Config, req: Completion) -> Result<(Request, MessageStream), ProviderError> {
        let credential = credential(&cfg)?;
        let body = request_body(&req);
        let request = Request::post_json(format!("{}/v1/messages", base_url(&cfg)), &body)
            .header("anthropic-version", API_VERSION)
            .header("accept", "text/event-stream")
            .credential(credential)
            .timeout_ms(COMPLETE_TIMEOUT_MS);
        Ok((request, MessageStream::default()))
    }
}

export_http_provider!(Anthropic);

/// The configured base URL without a trailing `/` or `/v1` (the Anthropic
/// SDKs' convention is a base without `/v1`; tolerate either).
fn base_url(cfg: &Config) -> String {
    let base = cfg.base_url.as_deref().map(str::trim).filter(|b| !b.is_empty()).unwrap_or(PUBLIC_BASE);
    let base = base.trim_end_matches('/');
    base.strip_suffix("/v1").unwrap_or(base).to_string()
}

/// Where the key goes. Without a stored key, a request to the public
/// endpoint cannot succeed, so say why at once; a custom base URL (a local
/// Anthropic-compatible server) may not need one.
fn credential(cfg: &Config) -> Result<Credential, ProviderError> {
    if cfg.has_credential {
        return Ok(Credential::Header("x-api-key".into()));
    }
    if base_url(cfg) == PUBLIC_BASE {
        return Err(ProviderError::new(
            ErrorKind::Auth,
            "no Anthropic API key is configured: store one or set ANTHROPIC_API_KEY",
        ));
    }
    Ok(Credential::None)
}

/// `GET /v1/models`, with names from the API and context windows from the catalog.
fn live_models(cfg: &Config) -> Result<Vec<ModelInfo>, ProviderError> {
    let response = Request::get(format!("{}/v1/models?limit=1000", base_url(cfg)))
        .header("anthropic-version", API_VERSION)
        .credential(Credential::Header("x-api-key".into()))
        .timeout_ms(MODELS_TIMEOUT_MS)
        .send()?;
    if !(200..300).contains(&response.status) {
        return Err(ProviderError::from_response(response));
    }
    let body = response.bytes()?;
    let json: Value = serde_json::from_slice(&body)
        .map_err(|e| ProviderError::new(ErrorKind::BadResponse, format!("model list is not JSON: {e}")))?;
    let data = json["data"]
        .as_array()
        .ok_or_else(|| ProviderError::new(ErrorKind::BadResponse, "model list has no `data` array"))?;
    Ok(data
        .iter()
        .filter_map(|m| {
            let id = m["id"].as_str()?;
            let name = m["display_name"].as_str().unwrap_or(id);
            Some(ModelInfo { id: id.into(), name: name.into(), context_window: catalog_window(id) })
        })
        .collect())
}

/// The context window of a model id, matching dated ids and their aliases
/// (`claude-sonnet-4-5` and `claude-sonnet-4-5-20250929`) to each other.
fn catalog_window(id: &str) -> Option<u64> {
    CATALOG.iter().find(|(known, _, _)| *known == id || undated(known) == undated(id)).map(|&(_, _, w)| w)
}

/// A model id without its date (`claude-sonnet-4-5-20250929` →
/// `claude-sonnet-4-5`) or `-latest` suffix; other ids unchanged.
fn undated(id: &str) -> &str {
    match id.rsplit_once('-') {
        Some((head, date)) if date.len() == 8 && date.bytes().all(|b| b.is_ascii_digit()) => head,
        _ => id.strip_suffix("-latest").unwrap_or(id),
    }
}

/// The Messages API request body for a Hangar request.
fn request_body(req: &Completion) -> Value {
    let messages: Vec<Value> = req
        .messages
        .iter()
        .filter_map(|message| {
            let content: Vec<Value> = message
                .content
                .iter()
                .filter_map(|block| match block {
                    // The API refuses empty text blocks.
                    ContentBlock::Text(text) if text.is_empty() => None,
                    ContentBlock::Text(text) => Some(json!({"type": "text", "text": text})),
                    ContentBlock::ToolUse(call) => {
                        Some(json!({"type": "tool_use", "id": call.id, "name": call.name, "input": json_object(&call.input)}))
                    }
                    ContentBlock::ToolResult(result) => Some(json!({
                        "type": "tool_result",
                        "tool_use_id": result.tool_use_id,
                        "content": result.content,
                        "is_error": result.is_error,
                    })),
                })
                .collect();
            let role = match message.role {
                Role::User => "user",
                Role::Assistant => "assistant",
            };
            (!content.is_empty()).then(|| json!({"role": role, "content": content}))
        })
        .collect();
    let mut body = json!({
        "model": req.model,
        "max_tokens": req.max_tokens,
        "messages": messages,
        "stream": true,
    });
    if let Some(system) = req.system.as_deref().filter(|s| !s.is_empty()) {
        body["system"] = json!(system);
    }
    if !req.tools.is_empty() {
        let tools: Vec<Value> = req
            .tools
            .iter()
            .map(|t| json!({"name": t.name, "description": t.description, "input_schema": json_object(&t.input_schema)}))
            .collect();
        body["tools"] = json!(tools);
    }
    if let Some(t) = req.temperature {
        // f32 -> f64 would send 0.699999988 for 0.7.
        body["temperature"] = json!((f64::from(t) * 1e6).round() / 1e6);
    }
    body
}

/// JSON text as a value; an object is expected, so anything unparsable
/// becomes `{}` rather than failing the whole request.
fn json_object(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|_| json!({}))
}

/// What is known about an open content block, by its index.
#[derive(Serialize, Deserialize)]
enum Block {
    Text,
    Tool { id: String, sent_input: bool },
    /// Thinking and server-side blocks: not part of Hangar's model.
    Other,
}

/// The decoder of one streamed answer: kept between the pieces of the body.
#[derive(Default, Serialize, Deserialize)]
pub struct MessageStream {
    sse: SseFeed,
    blocks: HashMap<u64, Block>,
    input_tokens: u64,
    output_tokens: u64,
    /// The vendor's `stop_reason`, as sent.
    stop: Option<String>,
    finished: bool,
}

impl MessageStream {
    /// Turns one SSE event into zero or more Hangar events.
    fn handle(&mut self, event: &str, data: &str, out: &mut Vec<Event>) -> Result<(), ProviderError> {
        const KNOWN: [&str; 8] = [
            "message_start",
            "content_block_start",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop",
            "ping",
            "error",
        ];
        let parse = || {
            serde_json::from_str::<Value>(data).map_err(|e| {
                let excerpt: String = data.chars().take(200).collect();
                ProviderError::new(ErrorKind::BadResponse, format!("malformed `{event}` event ({e}): {excerpt}"))
            })
        };
        // The event name is optional in SSE; the data's `type` says the same.
        let (kind, json) = if KNOWN.contains(&event) {
            (event.to_string(), parse()?)
        } else if event == "message" {
            let json = parse()?;
            (json["type"].as_str().unwrap_or_default().to_string(), json)
        } else {
            return Ok(()); // New event types are ignored, as the API asks.
        };
        match kind.as_str() {
            "message_start" => self.add_usage(&json["message"]["usage"]),
            "content_block_start" => {
                let index = index_of(&json)?;
                let block = &json["content_block"];
                let state = match block["type"].as_str() {
                    Some("text") => {
                        if let Some(text) = block["text"].as_str().filter(|t| !t.is_empty()) {
                            out.push(Event::Text(text.into()));
                        }
                        Block::Text
                    }
                    Some("tool_use") => {
                        let id = block["id"].as_str().unwrap_or_default().to_string();
                        let name = block["name"].as_str().unwrap_or_default().to_string();
                        if id.is_empty() || name.is_empty() {
                            return Err(bad("a tool_use block without an id or a name"));
                        }
                        out.push(Event::ToolUseStart(ToolUseStart { id: id.clone(), name }));
                        // The API starts with `input: {}` and streams the
                        // input; some compatible servers send it whole here.
                        let whole = block["input"].as_object().filter(|o| !o.is_empty());
                        if let Some(input) = whole {
                            let partial_json = hangar_sdk::json::to_string(input);
                            out.push(Event::ToolUseDelta(ToolUseDelta { id: id.clone(), partial_json }));
                        }
                        Block::Tool { id, sent_input: whole.is_some() }
                    }
                    _ => Block::Other,
                };
                self.blocks.insert(index, state);
            }
            "content_block_delta" => {
                let index = index_of(&json)?;
                let delta = &json["delta"];
                match (self.blocks.get_mut(&index), delta["type"].as_str()) {
                    (Some(Block::Text), Some("text_delta")) => {
                        let text = delta["text"].as_str().unwrap_or_default();
                        if !text.is_empty() {
                            out.push(Event::Text(text.into()));
                        }
                    }
                    (Some(Block::Tool { id, sent_input }), Some("input_json_delta")) => {
                        let piece = delta["partial_json"].as_str().unwrap_or_default();
                        if !piece.is_empty() {
                            *sent_input = true;
                            out.push(Event::ToolUseDelta(ToolUseDelta { id: id.clone(), partial_json: piece.into() }));
                        }
                    }
                    (None, _) => return Err(bad(&format!("a delta for content block {index}, which was never started"))),
                    _ => {} // thinking, signatures, citations: not forwarded
                }
            }
            "content_block_stop" => {
                if let Some(Block::Tool { id, sent_input }) = self.blocks.remove(&index_of(&json)?) {
                    // A tool without parameters streams no input at all; the
                    // pieces must still form an object.
                    if !sent_input {
                        out.push(Event::ToolUseDelta(ToolUseDelta { id: id.clone(), partial_json: "{}".into() }));
                    }
                    out.push(Event::ToolUseEnd(id));
                }
            }
            "message_delta" => {
                if let Some(reason) = json["delta"]["stop_reason"].as_str() {
                    self.stop = Some(reason.to_string());
                }
                self.add_usage(&json["usage"]);
            }
            "message_stop" => {
                out.push(Event::Usage(Usage { input_tokens: self.input_tokens, output_tokens: self.output_tokens }));
                out.push(Event::Stop(self.stop.as_deref().map_or(StopReason::EndTurn, stop_reason)));
                self.finished = true;
            }
            "error" => return Err(stream_error(&json["error"])),
            _ => {} // ping
        }
        Ok(())
    }

    /// Usage counts are cumulative: `message_start` has the input,
    /// `message_delta` the output so far (and sometimes the input again).
    fn add_usage(&mut self, usage: &Value) {
        let count = |key: &str| usage[key].as_u64();
        if let Some(input) = count("input_tokens") {
            // Cached tokens were read by the model too.
            let cached = count("cache_creation_input_tokens").unwrap_or(0) + count("cache_read_input_tokens").unwrap_or(0);
            self.input_tokens = input + cached;
        }
        if let Some(output) = count("output_tokens") {
            self.output_tokens = output;
        }
    }
}

impl Decoder for MessageStream {
    fn feed(&mut self, bytes: &[u8], out: &mut Vec<Event>) -> Result<(), ProviderError> {
        let events = self.sse.push(bytes).map_err(|err| bad(&err.to_string()))?;
        for event in events {
            // What follows `message_stop` is not part of the answer.
            if self.finished {
                break;
            }
            self.handle(&event.event, &event.data, out)?;
        }
        Ok(())
    }

    fn end(&mut self, _out: &mut Vec<Event>) -> Result<(), ProviderError> {
        if self.finished { Ok(()) } else { Err(bad("the stream ended before `message_stop` (truncated)")) }
    }

    fn done(&self) -> bool {
        self.finished
    }

    fn failure(&self, failure: &Failure) -> ProviderError {
        ProviderError::from_failure_with(failure, too_long)
    }
}

fn bad(message: &str) -> ProviderError {
    ProviderError::new(ErrorKind::BadResponse, message)
}

fn index_of(json: &Value) -> Result<u64, ProviderError> {
    json["index"].as_u64().ok_or_else(|| bad("a content block event without an `index`"))
}

fn stop_reason(reason: &str) -> StopReason {
    match reason {
        "tool_use" => StopReason::ToolUse,
        "max_tokens" | "model_context_window_exceeded" => StopReason::MaxTokens,
        "stop_sequence" => StopReason::StopSequence,
        "refusal" => StopReason::Refusal,
        // `end_turn`, `pause_turn` and anything new: the turn is over.
        _ => StopReason::EndTurn,
    }
}

/// Anthropic's answer to a prompt over the context window: a 400
/// `invalid_request_error` saying "prompt is too long: N tokens > M
/// maximum" (or, when `max_tokens` tips it over, that the input length
/// and `max_tokens` exceed the context limit).
fn too_long(status: u16, body: &[u8]) -> bool {
    let Ok(json) = serde_json::from_slice::<Value>(body) else { return false };
    let error = &json["error"];
    let message = error["message"].as_str().unwrap_or_default().to_ascii_lowercase();
    status == 400
        && error["type"] == "invalid_request_error"
        && (message.contains("prompt is too long") || message.contains("exceed context limit"))
}

/// An `error` event in the middle of a stream (the HTTP status was 200):
/// classified by the error's type, as the API documents the types.
fn stream_error(error: &Value) -> ProviderError {
    let kind = error["type"].as_str().unwrap_or("api_error");
    let message = error["message"].as_str().unwrap_or("no message");
    let status = match kind {
        "overloaded_error" => 529,
        "rate_limit_error" => 429,
        "authentication_error" => 401,
        "permission_error" => 403,
        "not_found_error" => 404,
        "request_too_large" => 413,
        "invalid_request_error" => 400,
        "timeout_error" => 504,
        _ => 500,
    };
    ProviderError { status: None, ..ProviderError::from_status(status, format!("{kind}: {message}")) }
}
