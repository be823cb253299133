//! `openai`: Chat Completions with `stream: true`, which OpenAI and the
//! OpenAI-compatible servers (llama.cpp, vLLM, LM Studio, OpenRouter) speak.
//!
//! The answer is an SSE stream of `data:` chunks ending with `data: [DONE]`;
//! tool calls arrive as `tool_calls` deltas keyed by `index`, the first of
//! each carrying the call's id and name and later ones pieces of its
//! arguments. Usage comes in a last chunk with no choices
//! (`stream_options.include_usage`). The key never enters this component:
//! requests ask the host for `Authorization: Bearer`.

use std::collections::{BTreeMap, VecDeque};

use hangar_sdk::http::{Credential, Request};
use hangar_sdk::provider::{
    Config, ErrorKind, Event, Failure, ProviderError, ProviderInfo, Request as Completion, ToolUseDelta, ToolUseStart, chat,
};
use hangar_sdk::serde_json::{self, Value, json};
use hangar_sdk::sse::SseFeed;
use hangar_sdk::types::{ContentBlock, ModelInfo, Role, StopReason, Usage};
use hangar_sdk::{Decoder, HttpProvider, export_http_provider};
use serde::{Deserialize, Serialize};

/// The vendor's public endpoint (with `/v1`, as the OpenAI SDKs expect a
/// base URL), used when the operator configured none.
const PUBLIC_BASE: &str = "https://api.openai.com/v1";
/// Listing models should answer quickly or not at all.
const MODELS_TIMEOUT_MS: u32 = 10_000;
/// Time allowed until the response headers of a model call arrive (a local
/// server may load the model first).
const COMPLETE_TIMEOUT_MS: u32 = 300_000;

/// The adapter; exported as the component's `provider-api` and
/// `provider-stream`.
pub struct OpenAi;

impl HttpProvider for OpenAi {
    type Decoder = ChatStream;

    fn info() -> ProviderInfo {
        ProviderInfo { id: "openai".into(), name: "OpenAI".into(), auth_types: vec!["api_key".into()], lists_models: true }
    }

    fn models(cfg: Config) -> Result<Vec<ModelInfo>, ProviderError> {
        let response = Request::get(format!("{}/models", base_url(&cfg)))
            .credential(credential(&cfg)?)
            .timeout_ms(MODELS_TIMEOUT_MS)
            .send()?;
        if !(200..300).contains(&response.status) {
            return Err(ProviderError::from_response(response));
        }
        let body = response.bytes()?;
        let json: Value = serde_json::from_slice(&body).map_err(|e| bad(&format!("model list is not JSON: {e}")))?;
        let data = json["data"].as_array().ok_or_else(|| bad("model list has no `data` array"))?;
        Ok(data
            .iter()
            .filter_map(|m| {
                let id = m["id"].as_str()?;
                let name = m["name"].as_str().unwrap_or(id);
                // OpenAI does not say; compatible servers often do, each its own way.
                let window = m["context_length"]
                    .as_u64()
                    .or_else(|| m["max_model_len"].as_u64()) // vLLM
                    .or_else(|| m["meta"]["n_ctx_train"].as_u64()) // llama.cpp
                    .or_else(|| m["max_context_length"].as_u64()); // LM Studio
                Some(ModelInfo { id: id.into(), name: name.into(), context_window: window })
            })
            .collect())
    }

    fn start(cfg: Config, req: Completion) -> Result<(Request, ChatStream), ProviderError> {
        let credential = credential(&cfg)?;
        let base = base_url(&cfg);
        let body = request_body(&req, base == PUBLIC_BASE);
        let request = Request::post_json(format!("{base}/chat/completions"), &body)
            .header("accept", "text/event-stream")
            .credential(credential)
            .timeout_ms(COMPLETE_TIMEOUT_MS);
        Ok((request, ChatStream::default()))
    }
}

export_http_provider!(OpenAi);

/// The configured base URL without a trailing `/`. A bare origin
/// (`http://localhost:8080`) gets `/v1`, where every compatible server
/// serves the API; a base with a path (`https://openrouter.ai/api/v1`) is
/// used as given.
fn base_url(cfg: &Config) -> String {
    let base = cfg.base_url.as_deref().map(str::trim).filter(|b| !b.is_empty()).unwrap_or(PUBLIC_BASE);
    let base = base.trim_end_matches('/');
    let path_start = base.find("://").map(|i| i + 3).unwrap_or(0);
    if base[path_start..].contains('/') { base.to_string() } else { format!("{base}/v1") }
}

/// Where the key goes. Local compatible servers usually need none; the
/// public endpoint always does, so say so at once.
fn credential(cfg: &Config) -> Result<Credential, ProviderError> {
    if cfg.has_credential {
        return Ok(Credential::Bearer);
    }
    if base_url(cfg) == PUBLIC_BASE {
        return Err(ProviderError::new(ErrorKind::Auth, "no OpenAI API key is configured: store one or set OPENAI_API_KEY"));
    }
    Ok(Credential::None)
}

/// The Chat Completions request body for a Hangar request.
///
/// Hangar's history holds Anthropic-style blocks; Chat Completions wants an
/// assistant message with `tool_calls`, then one `role: tool` message per
/// result, right after it and before any user text.
fn request_body(req: &Completion, public: bool) -> Value {
    let mut messages = Vec::new();
    if let Some(system) = req.system.as_deref().filter(|s| !s.is_empty()) {
        messages.push(json!({"role": "system", "content": system}));
    }
    for message in &req.messages {
        let text = chat::text(message);
        match message.role {
            Role::User => {
                for block in &message.content {
                    if let ContentBlock::ToolResult(result) = block {
                        let content = chat::tool_result_content(result);
                        messages.push(json!({"role": "tool", "tool_call_id": result.tool_use_id, "content": content}));
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
                            "type": "function",
                            "function": {"name": call.name, "arguments": if call.input.trim().is_empty() { "{}" } else { &call.input }},
                        })),
                        _ => None,
                    })
                    .collect();
                let mut out = json!({"role": "assistant", "content": if text.is_empty() { Value::Null } else { json!(text) }});
                if !calls.is_empty() {
                    out["tool_calls"] = json!(calls);
                } else if text.is_empty() {
                    continue; // nothing to say; an empty assistant message is refused
                }
                messages.push(out);
            }
        }
    }
    let mut body = json!({
        "model": req.model,
        "messages": messages,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    // OpenAI's reasoning models refuse `max_tokens`; many compatible servers
    // know only `max_tokens`.
    let limit_key = if public { "max_completion_tokens" } else { "max_tokens" };
    body[limit_key] = json!(req.max_tokens);
    if !req.tools.is_empty() {
        body["tools"] = json!(chat::function_tools(&req.tools));
    }
    if let Some(t) = req.temperature {
        body["temperature"] = chat::temperature(t);
    }
    body
}

/// A tool call being assembled from deltas, by its `index`.
#[derive(Serialize, Deserialize)]
struct Call {
    id: String,
    /// Set once the start event went out (it needs the name, which a few
    /// servers send after the first delta).
    started: bool,
    name: String,
    /// Argument pieces that arrived before the start event could be sent.
    held: String,
    sent_arguments: bool,
}

/// The decoder of one streamed answer: kept between the pieces of the body.
#[derive(Default, Serialize, Deserialize)]
pub struct ChatStream {
    sse: SseFeed,
    /// The events of the step being decoded (handed out at its end).
    #[serde(skip)]
    queue: VecDeque<Event>,
    calls: BTreeMap<u64, Call>,
    any_call: bool,
    /// The last usage seen (input, output tokens).
    usage: Option<(u64, u64)>,
    finish: Option<String>,
    finished: bool,
}

impl ChatStream {

    /// Turns one `data:` chunk into zero or more Hangar events.
    fn handle(&mut self, data: &str) -> Result<(), ProviderError> {
        let json: Value = serde_json::from_str(data).map_err(|e| {
            let excerpt: String = data.chars().take(200).collect();
            bad(&format!("malformed chunk ({e}): {excerpt}"))
        })?;
        if !json["error"].is_null() {
            return Err(stream_error(&json["error"]));
        }
        if let Some(usage) = json.get("usage").filter(|u| u.is_object()) {
            // Some servers repeat cumulative usage in every chunk: keep the last.
            self.usage = Some((usage["prompt_tokens"].as_u64().unwrap_or(0), usage["completion_tokens"].as_u64().unwrap_or(0)));
        }
        let Some(choice) = json["choices"].as_array().and_then(|c| c.first()) else { return Ok(()) };
        let delta = &choice["delta"];
        if let Some(text) = delta["content"].as_str().filter(|t| !t.is_empty()) {
            self.queue.push_back(Event::Text(text.into()));
        }
        if let Some(calls) = delta["tool_calls"].as_array() {
            for (position, call) in calls.iter().enumerate() {
                self.tool_delta(position as u64, call);
            }
        }
        if let Some(reason) = choice["finish_reason"].as_str() {
            self.finish = Some(reason.to_string());
            self.close_calls();
        }
        Ok(())
    }

    fn tool_delta(&mut self, position: u64, delta: &Value) {
        let index = delta["index"].as_u64().unwrap_or(position);
        self.any_call = true;
        let call = self.calls.entry(index).or_insert_with(|| Call {
            // A few servers send no id: make one that is unique in this answer.
            id: delta["id"].as_str().filter(|s| !s.is_empty()).map(str::to_owned).unwrap_or_else(|| format!("call_{index}")),
            started: false,
            name: String::new(),
            held: String::new(),
            sent_arguments: false,
        });
        if let Some(name) = delta["function"]["name"].as_str() {
            call.name.push_str(name);
        }
        let piece = delta["function"]["arguments"].as_str().unwrap_or_default();
        if !call.started && !call.name.is_empty() {
            call.started = true;
            self.queue.push_back(Event::ToolUseStart(ToolUseStart { id: call.id.clone(), name: call.name.clone() }));
            call.held.push_str(piece);
            let held = std::mem::take(&mut call.held);
            if !held.is_empty() {
                call.sent_arguments = true;
                self.queue.push_back(Event::ToolUseDelta(ToolUseDelta { id: call.id.clone(), partial_json: held }));
            }
        } else if !call.started {
            call.held.push_str(piece);
        } else if !piece.is_empty() {
            call.sent_arguments = true;
            self.queue.push_back(Event::ToolUseDelta(ToolUseDelta { id: call.id.clone(), partial_json: piece.into() }));
        }
    }

    /// Ends every open tool call, in index order.
    fn close_calls(&mut self) {
        for (_, call) in std::mem::take(&mut self.calls) {
            if !call.started {
                continue; // never named: nothing a tool could be run for
            }
            if !call.sent_arguments {
                self.queue.push_back(Event::ToolUseDelta(ToolUseDelta { id: call.id.clone(), partial_json: "{}".into() }));
            }
            self.queue.push_back(Event::ToolUseEnd(call.id));
        }
    }

    /// The usage and stop events that end the answer.
    fn finish(&mut self) {
        self.close_calls();
        if let Some((input_tokens, output_tokens)) = self.usage.take() {
            self.queue.push_back(Event::Usage(Usage { input_tokens, output_tokens }));
        }
        let reason = match self.finish.as_deref() {
            Some("tool_calls" | "function_call") => StopReason::ToolUse,
            // Several compatible servers say `stop` after tool calls.
            _ if self.any_call => StopReason::ToolUse,
            Some("length") => StopReason::MaxTokens,
            Some("content_filter") => StopReason::Refusal,
            _ => StopReason::EndTurn,
        };
        self.queue.push_back(Event::Stop(reason));
        self.finished = true;
    }
}

impl ChatStream {
    fn step(&mut self, bytes: &[u8]) -> Result<(), ProviderError> {
        for event in self.sse.push(bytes).map_err(|err| bad(&err.to_string()))? {
            // What follows `[DONE]` is not part of the answer.
            if self.finished {
                break;
            }
            match event.data.as_str() {
                data if data.trim() == "[DONE]" => self.finish(),
                "" => {}
                data => self.handle(data)?,
            }
        }
        Ok(())
    }
}

impl Decoder for ChatStream {
    fn feed(&mut self, bytes: &[u8], out: &mut Vec<Event>) -> Result<(), ProviderError> {
        let step = self.step(bytes);
        out.extend(self.queue.drain(..));
        step
    }

    fn end(&mut self, out: &mut Vec<Event>) -> Result<(), ProviderError> {
        if self.finished {
            return Ok(());
        }
        // Some compatible servers end without `[DONE]`; a finish reason
        // shows the answer is complete all the same.
        if self.finish.is_none() {
            return Err(bad("the stream ended before a finish reason or `[DONE]` (truncated)"));
        }
        self.finish();
        out.extend(self.queue.drain(..));
        Ok(())
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

/// An error object sent in place of a chunk (OpenRouter, vLLM and others do
/// this when a failure happens after the 200 status went out).
/// OpenAI's answer to a prompt over the context window: a 400 whose error
/// has `code: "context_length_exceeded"` (compatible servers copy it).
fn too_long(status: u16, body: &[u8]) -> bool {
    let Ok(json) = serde_json::from_slice::<Value>(body) else { return false };
    status == 400 && json["error"]["code"] == "context_length_exceeded"
}

fn stream_error(error: &Value) -> ProviderError {
    let message = error["message"].as_str().or(error.as_str()).unwrap_or("no message");
    let kind = error["type"].as_str().unwrap_or_default();
    let status = error["code"].as_u64().filter(|c| (400..600).contains(c)).map(|c| c as u16).unwrap_or(
        if kind.contains("rate_limit") {
            429
        } else if kind.contains("invalid_request") {
            400
        } else if kind.contains("authentication") {
            401
        } else {
            500
        },
    );
    let message = if kind.is_empty() { message.to_string() } else { format!("{kind}: {message}") };
    ProviderError { status: None, ..ProviderError::from_status(status, message) }
}
