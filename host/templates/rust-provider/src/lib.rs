//! `{{name}}`: a Hangar model provider. As written it needs no network: it
//! answers every message with `{{name}} heard: ...`, streamed word by word.
//! A real adapter, whose answer is one HTTP response from its vendor,
//! implements `hangar_sdk::HttpProvider` instead: it builds the request
//! (to the origin asked for in the manifest) and a `hangar_sdk::Decoder`
//! that turns the bytes of the answer into events, and the host sends the
//! request and holds the response (`hangar_sdk::sse::SseFeed` parses
//! server-sent events in a decoder).

use std::collections::VecDeque;

use hangar_sdk::provider::{Config, Event, ProviderError, ProviderInfo, Request};
use hangar_sdk::types::{ContentBlock, ModelInfo, Role, StopReason, Usage};
use hangar_sdk::{EventStream, Provider, export_provider};

// Public because `export_provider!` names it in the exported bindings.
pub struct Plugin;

impl Provider for Plugin {
    type Stream = Answer;

    fn info() -> ProviderInfo {
        // `id` must equal `name` in {{name}}.plugin.toml. No auth types: the
        // host needs no key to run it.
        ProviderInfo { id: "{{name}}".into(), name: "{{name}}".into(), auth_types: Vec::new(), lists_models: true }
    }

    fn models(_cfg: Config) -> Result<Vec<ModelInfo>, ProviderError> {
        Ok(vec![ModelInfo { id: "{{name}}-1".into(), name: "{{name}} 1".into(), context_window: Some(32_768) }])
    }

    fn complete(_cfg: Config, req: Request) -> Result<Answer, ProviderError> {
        let said: Vec<String> = req
            .messages
            .iter()
            .rev()
            .find(|m| m.role == Role::User)
            .map(|m| {
                m.content
                    .iter()
                    .filter_map(|block| match block {
                        ContentBlock::Text(text) => Some(text.clone()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let reply = format!("{{name}} heard: {}", said.join(" "));
        let mut events: VecDeque<Event> = reply.split_inclusive(' ').map(|w| Event::Text(w.to_string())).collect();
        let words = events.len() as u64;
        events.push_back(Event::Usage(Usage { input_tokens: 0, output_tokens: words }));
        events.push_back(Event::Stop(StopReason::EndTurn));
        Ok(Answer(events))
    }
}

/// The events of one answer, pulled by the host one at a time.
pub struct Answer(VecDeque<Event>);

impl EventStream for Answer {
    fn next(&mut self) -> Result<Option<Event>, ProviderError> {
        Ok(self.0.pop_front())
    }
}

export_provider!(Plugin);
