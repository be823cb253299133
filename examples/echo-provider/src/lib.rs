//! `echo`: a model provider that needs no model. It answers by rule, so a
//! plugin author can try tools and agents offline, and tests get a
//! predictable model:
//!
//! * `call NAME {json}` calls the tool `NAME` with that input (`{}` when
//!   omitted), if the agent lists it;
//! * after tool results it reports each result back as text;
//! * anything else is echoed: `You said: ...`.
//!
//! Answers are streamed word by word, as a real model's would be.

use std::collections::VecDeque;

use hangar_sdk::provider::{Config, Event, ProviderError, ProviderInfo, Request, ToolUseDelta, ToolUseStart};
use hangar_sdk::serde_json::{self, Value};
use hangar_sdk::types::{ContentBlock, Message, ModelInfo, Role, StopReason, Usage};
use hangar_sdk::{EventStream, Provider, export_provider};

/// The one model on offer.
const MODEL: &str = "echo-1";

// Public because `export_provider!` names it in the exported bindings.
pub struct Echo;

impl Provider for Echo {
    type Stream = Script;

    fn info() -> ProviderInfo {
        // No auth types: the host then needs no key to run it.
        ProviderInfo { id: "echo".into(), name: "Echo (rule-based, offline)".into(), auth_types: Vec::new(), lists_models: true }
    }

    fn models(_cfg: Config) -> Result<Vec<ModelInfo>, ProviderError> {
        Ok(vec![ModelInfo { id: MODEL.into(), name: "Echo 1".into(), context_window: Some(32_768) }])
    }

    fn complete(_cfg: Config, req: Request) -> Result<Script, ProviderError> {
        let mut events = match req.messages.last() {
            Some(last) if last.role == Role::User => answer(&req, last),
            _ => text("There is nothing to answer."),
        };
        let stop = match events.iter().any(|e| matches!(e, Event::ToolUseStart(_))) {
            true => StopReason::ToolUse,
            false => StopReason::EndTurn,
        };
        let output_tokens = events.iter().map(tokens_of).sum();
        events.push(Event::Usage(Usage { input_tokens: input_tokens(&req), output_tokens }));
        events.push(Event::Stop(stop));
        Ok(Script(events.into()))
    }
}

/// The events of one answer, replayed one pull at a time.
pub struct Script(VecDeque<Event>);

impl EventStream for Script {
    fn next(&mut self) -> Result<Option<Event>, ProviderError> {
        Ok(self.0.pop_front())
    }
}

fn answer(req: &Request, last: &Message) -> Vec<Event> {
    let results: Vec<String> = last
        .content
        .iter()
        .filter_map(|block| match block {
            ContentBlock::ToolResult(r) => {
                let name = tool_name(&req.messages, &r.tool_use_id).unwrap_or("a tool");
                let verb = if r.is_error { "failed" } else { "returned" };
                Some(format!("`{name}` {verb}:\n{}", r.content))
            }
            _ => None,
        })
        .collect();
    if !results.is_empty() {
        return text(&results.join("\n\n"));
    }
    let said: Vec<&str> = last
        .content
        .iter()
        .filter_map(|block| match block {
            ContentBlock::Text(t) => Some(t.as_str()),
            _ => None,
        })
        .collect();
    let said = said.join("\n");
    match said.trim().strip_prefix("call ") {
        Some(rest) => call(req, rest.trim()),
        None => text(&format!("You said: {said}")),
    }
}

/// `NAME {json}`: a tool call, or text saying why it cannot be made.
fn call(req: &Request, rest: &str) -> Vec<Event> {
    let (name, input) = rest.split_once(char::is_whitespace).unwrap_or((rest, "{}"));
    if !req.tools.iter().any(|t| t.name == name) {
        let known: Vec<&str> = req.tools.iter().map(|t| t.name.as_str()).collect();
        return text(&format!("I have no tool named `{name}`. I can call: {}.", known.join(", ")));
    }
    let input = input.trim();
    match serde_json::from_str::<Value>(input) {
        Ok(Value::Object(_)) => {}
        _ => return text(&format!("The input for `{name}` must be a JSON object, not `{input}`.")),
    }
    // Unique within a session: one more message each turn.
    let id = format!("echo_call_{}", req.messages.len());
    vec![
        Event::ToolUseStart(ToolUseStart { id: id.clone(), name: name.into() }),
        Event::ToolUseDelta(ToolUseDelta { id: id.clone(), partial_json: input.into() }),
        Event::ToolUseEnd(id),
    ]
}

/// The name of the tool a `tool_use_id` belongs to, from the history.
fn tool_name<'a>(messages: &'a [Message], id: &str) -> Option<&'a str> {
    messages.iter().flat_map(|m| &m.content).find_map(|block| match block {
        ContentBlock::ToolUse(call) if call.id == id => Some(call.name.as_str()),
        _ => None,
    })
}

/// Text as a stream of deltas, a word (with its trailing space) at a time.
fn text(answer: &str) -> Vec<Event> {
    answer.split_inclusive(' ').map(|word| Event::Text(word.into())).collect()
}

/// Words stand in for tokens: close enough to see usage add up.
fn words(text: &str) -> u64 {
    text.split_whitespace().count() as u64
}

fn tokens_of(event: &Event) -> u64 {
    match event {
        Event::Text(t) => words(t),
        Event::ToolUseDelta(d) => words(&d.partial_json).max(1),
        _ => 0,
    }
}

fn input_tokens(req: &Request) -> u64 {
    let blocks = req.messages.iter().flat_map(|m| &m.content).map(|block| match block {
        ContentBlock::Text(t) => words(t),
        ContentBlock::ToolUse(call) => words(&call.input),
        ContentBlock::ToolResult(r) => words(&r.content),
    });
    blocks.sum::<u64>() + req.system.as_deref().map_or(0, words)
}

export_provider!(Echo);
