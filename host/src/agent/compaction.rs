//! Context compaction: what the model is sent of a long session, so that
//! a request stays inside the model's context window while the history
//! people read stays whole.
//!
//! The model's view is the history with an overlay (`SessionContext`): old
//! tool results shortened to their first and last lines, and a summary,
//! written by the agent's own model, standing for the oldest messages. A
//! cut is only ever made before an assistant message or before a message
//! the person wrote, so a `tool_use` always travels with its `tool_result`.

use std::collections::HashSet;

use tokio::sync::watch;

use super::RunError;
use crate::runtime::{CompletionRequest, Event as ProviderEvent, ProviderAccess, Runtime, ToolSpec};
use crate::store::{Agent, Block, HistoryMessage, HistoryRole, SessionContext, Usage, now};

/// Lines kept at each end of a shortened tool result.
const KEEP_LINES: usize = 5;
/// Bytes kept at each end at most (for output of a few huge lines).
const KEEP_BYTES: usize = 800;
/// What a request costs beyond its text (role markers, block framing).
const MESSAGE_OVERHEAD: u64 = 4;
const BLOCK_OVERHEAD: u64 = 8;
/// Below this size a run does not ask the provider for the model's window
/// (that may be a network call): no model in use has a smaller one.
pub const LOOKUP_FLOOR: u64 = 4096;
/// Room left in a summary request for the instruction and framing.
const SUMMARY_FRAME: u64 = 400;
/// Size of one summary request's conversation part when the window is unknown.
const UNKNOWN_WINDOW_CHUNK: u64 = 50_000;

const SUMMARY_INSTRUCTION: &str = "You are compacting the conversation of an AI agent that works with tools, because it has grown \
too long for the model's context window. Write a summary that lets the agent carry on without the original messages: the user's \
requests and constraints, decisions taken, files read or changed (with their paths), commands run and the results that matter, \
errors met and how they were handled, and what remains to be done. Be concise and concrete. Write notes for the agent: do not \
address the user and do not call tools.";

const SUMMARY_HEADER: &str = "[Summary of the earlier conversation, written when it was compacted to fit the context window; \
the full history is kept for people]";

/// Tokens in `bytes` of text. A rough rule (3.5 bytes a token) that errs
/// on the high side for prose; the provider's own count of the previous
/// request corrects it as soon as there is one.
pub fn tokens_of(bytes: usize) -> u64 {
    (bytes as u64 * 2).div_ceil(7)
}

fn block_bytes(block: &Block) -> usize {
    match block {
        Block::Text { text } => text.len(),
        Block::ToolUse { id, name, input } => id.len() + name.len() + input.to_string().len(),
        Block::ToolResult { tool_use_id, content, .. } => tool_use_id.len() + content.len(),
    }
}

/// Estimated tokens of `messages`.
pub fn estimate_messages(messages: &[HistoryMessage]) -> u64 {
    messages
        .iter()
        .map(|m| MESSAGE_OVERHEAD + m.content.iter().map(|b| BLOCK_OVERHEAD + tokens_of(block_bytes(b))).sum::<u64>())
        .sum()
}

/// Estimated tokens of what every request carries besides the messages.
pub fn estimate_fixed(system: &str, specs: &[ToolSpec]) -> u64 {
    tokens_of(system.len()) + specs.iter().map(|s| BLOCK_OVERHEAD + tokens_of(s.name.len() + s.description.len() + s.input_schema.len())).sum::<u64>()
}

/// The most a request may hold before it is compacted: the threshold's
/// share of the window, and never so much that the answer (`max_tokens`)
/// no longer fits.
pub fn limit(window: u64, threshold: f64, max_tokens: u32) -> u64 {
    ((window as f64 * threshold) as u64).min(window.saturating_sub(max_tokens as u64)).max(1)
}

/// A tool result cut to its first and last lines, with a note of what was
/// cut; `None` when that would not make it shorter.
pub fn shorten(content: &str) -> Option<String> {
    let lines: Vec<&str> = content.split('\n').collect();
    let (head, tail) = if lines.len() > 2 * KEEP_LINES {
        (lines[..KEEP_LINES].join("\n"), lines[lines.len() - KEEP_LINES..].join("\n"))
    } else {
        (content.to_string(), String::new())
    };
    let head = prefix(&head, KEEP_BYTES).to_string();
    let tail = suffix(&tail, KEEP_BYTES).to_string();
    let cut_bytes = content.len().saturating_sub(head.len() + tail.len());
    let cut_lines = lines.len().saturating_sub(head.split('\n').count() + if tail.is_empty() { 0 } else { tail.split('\n').count() });
    let out = format!(
        "{head}\n[... {cut_lines} lines ({cut_bytes} bytes) of this output were cut when the conversation was compacted ...]\n{tail}"
    );
    (out.len() + 64 < content.len()).then_some(out)
}

fn prefix(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn suffix(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut start = s.len() - max;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    &s[start..]
}

/// What the model is sent of `history`.
pub fn view(history: &[HistoryMessage], context: Option<&SessionContext>) -> Vec<HistoryMessage> {
    let Some(context) = context else { return history.to_vec() };
    let start = context.summarized.min(history.len());
    let shortened: HashSet<&str> = context.shortened.iter().map(String::as_str).collect();
    let mut out: Vec<HistoryMessage> = history[start..]
        .iter()
        .map(|m| HistoryMessage {
            role: m.role,
            content: m
                .content
                .iter()
                .map(|b| match b {
                    Block::ToolResult { tool_use_id, content, is_error } if shortened.contains(tool_use_id.as_str()) => {
                        Block::ToolResult {
                            tool_use_id: tool_use_id.clone(),
                            content: shorten(content).unwrap_or_else(|| content.clone()),
                            is_error: *is_error,
                        }
                    }
                    other => other.clone(),
                })
                .collect(),
        })
        .collect();
    if let Some(summary) = context.summary.as_ref().filter(|_| start > 0) {
        let block = Block::Text { text: format!("{SUMMARY_HEADER}\n\n{summary}") };
        match out.first_mut() {
            Some(first) if first.role == HistoryRole::User => first.content.insert(0, block),
            _ => out.insert(0, HistoryMessage { role: HistoryRole::User, content: vec![block] }),
        }
    }
    out
}

fn has_results(m: &HistoryMessage) -> bool {
    m.content.iter().any(|b| matches!(b, Block::ToolResult { .. }))
}

/// Where the last `keep` turns begin: at the `keep`-th assistant message
/// from the end, or at the person's message just before it. Everything
/// before may be compacted; 0 when there is nothing before.
pub fn protected_from(history: &[HistoryMessage], keep: u32) -> usize {
    let mut seen = 0;
    for (i, m) in history.iter().enumerate().rev() {
        if m.role == HistoryRole::Assistant {
            seen += 1;
            if seen >= keep.max(1) {
                return if i > 0 && history[i - 1].role == HistoryRole::User && !has_results(&history[i - 1]) { i - 1 } else { i };
            }
        }
    }
    0
}

/// Why a compaction ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Trigger {
    /// The next request would have passed the agent's threshold.
    Threshold,
    /// The provider said the request was longer than the context window.
    ContextLengthError,
}

/// How far a compaction goes.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// Until the request is at most this many tokens, shortening first and
    /// summarising only when that is not enough.
    Fit(u64),
    /// Shortening and summarising both, until the request is at most this
    /// (the provider refused it: the estimate was wrong).
    Below(u64),
    /// Shortening and summarising both, at the agent's `keep_turns`.
    Whole,
}

/// What a compaction did.
#[derive(Debug, Clone, Copy)]
pub enum Compacted {
    Done { before: u64, after: u64 },
    /// There was nothing left to shorten or summarise.
    Unchanged,
    /// The run was cancelled while the summary was being written.
    Cancelled,
}

/// Compacts one session's view with one agent's model.
pub struct Compactor<'a> {
    pub runtime: &'a Runtime,
    pub access: &'a ProviderAccess,
    pub agent: &'a Agent,
    /// The model's context window, when known.
    pub window: Option<u64>,
    pub cancel: watch::Receiver<bool>,
    pub shutdown: watch::Receiver<bool>,
}

impl Compactor<'_> {
    /// Shortens old tool results, then summarises the older part of the
    /// conversation, keeping the last turns verbatim, as `target` says
    /// (the request is `fixed` tokens plus the messages). When keeping the
    /// agent's `keep_turns` is not enough, fewer turns are kept, down to
    /// one, and at last the kept results are shortened too. The summary
    /// call's tokens are added to `usage`.
    pub async fn compact(
        &self,
        history: &[HistoryMessage],
        context: &mut SessionContext,
        fixed: u64,
        before: u64,
        target: Target,
        usage: &mut Usage,
    ) -> Result<Compacted, RunError> {
        let original = context.clone();
        let size = |c: &SessionContext| fixed + estimate_messages(&view(history, Some(c)));
        let fits = |c: &SessionContext| match target {
            Target::Fit(t) | Target::Below(t) => size(c) <= t,
            Target::Whole => false,
        };
        let keep_turns = self.agent.compaction.keep_turns.max(1);
        for keep in (1..=keep_turns).rev() {
            let from = protected_from(history, keep);
            self.shorten(history, context, context.summarized.min(from)..from);
            if matches!(target, Target::Fit(_)) && fits(context) {
                break;
            }
            if from > context.summarized {
                match self.summarise(history, context, from, usage).await? {
                    Some(summary) => {
                        context.summary = Some(summary);
                        context.summarized = from;
                    }
                    None => return Ok(Compacted::Cancelled),
                }
            }
            if matches!(target, Target::Whole) || fits(context) {
                break;
            }
        }
        if !matches!(target, Target::Whole) && !fits(context) {
            // Last resort: what is left of the history, shortened whole.
            self.shorten(history, context, context.summarized..history.len());
        }
        if *context == original {
            return Ok(Compacted::Unchanged);
        }
        let after = size(context);
        context.compactions += 1;
        context.tokens_before = before;
        context.tokens_after = after;
        context.compacted_at = Some(now());
        Ok(Compacted::Done { before, after })
    }

    fn shorten(&self, history: &[HistoryMessage], context: &mut SessionContext, range: std::ops::Range<usize>) {
        let range = range.start.min(history.len())..range.end.min(history.len());
        for m in &history[range] {
            for b in &m.content {
                if let Block::ToolResult { tool_use_id, content, .. } = b
                    && !context.shortened.contains(tool_use_id)
                    && shorten(content).is_some()
                {
                    context.shortened.push(tool_use_id.clone());
                }
            }
        }
    }

    /// A summary of the view's messages up to history message `until`
    /// (the earlier summary included), written by the agent's model in one
    /// or more calls that each fit the window; `None` when cancelled.
    async fn summarise(
        &self,
        history: &[HistoryMessage],
        context: &SessionContext,
        until: usize,
        usage: &mut Usage,
    ) -> Result<Option<String>, RunError> {
        let older = view(&history[..until], Some(context));
        let max_tokens = self.agent.provider.max_tokens;
        let chunk_tokens = match self.window {
            Some(window) => limit(window, self.agent.compaction.threshold, max_tokens)
                .saturating_sub(SUMMARY_FRAME + max_tokens as u64)
                .max(500),
            None => UNKNOWN_WINDOW_CHUNK,
        };
        let chunk_bytes = (chunk_tokens * 7 / 2) as usize;
        let mut chunks: Vec<String> = Vec::new();
        let mut current = String::new();
        for m in &older {
            let mut text = render(m);
            if text.len() > chunk_bytes {
                let half = chunk_bytes / 2;
                text = format!("{}\n[... cut ...]\n{}", prefix(&text, half), suffix(&text, half));
            }
            if !current.is_empty() && current.len() + text.len() > chunk_bytes {
                chunks.push(std::mem::take(&mut current));
            }
            current.push_str(&text);
        }
        if !current.is_empty() {
            chunks.push(current);
        }
        // The summary in the view already stands for what came before it.
        let mut summary: Option<String> = None;
        for chunk in chunks {
            let mut prompt = String::new();
            if let Some(s) = &summary {
                prompt.push_str(&format!("The summary so far:\n\n{s}\n\nThe conversation that follows it:\n\n"));
            } else {
                prompt.push_str("The conversation:\n\n");
            }
            prompt.push_str(&chunk);
            prompt.push_str("\n\nWrite the summary now.");
            match self.ask(prompt, usage).await? {
                Some(text) => summary = Some(text),
                None => return Ok(None),
            }
        }
        Ok(summary)
    }

    /// One summary call: not streamed to anyone, its text collected.
    async fn ask(&self, prompt: String, usage: &mut Usage) -> Result<Option<String>, RunError> {
        let provider = &self.agent.provider.id;
        let request = CompletionRequest {
            model: self.agent.provider.model.clone(),
            system: Some(SUMMARY_INSTRUCTION.to_string()),
            messages: super::history::to_wit(&[HistoryMessage { role: HistoryRole::User, content: vec![Block::Text { text: prompt }] }]),
            tools: Vec::new(),
            max_tokens: self.agent.provider.max_tokens,
            temperature: None,
        };
        let failed = |e: crate::runtime::ProviderError| RunError::Provider {
            provider: provider.clone(),
            status: e.status,
            message: format!("the summary for compaction failed: {}", e.message),
        };
        let work = async {
            let mut completion = self.runtime.provider_complete(provider, self.access, request).await?.map_err(failed)?;
            let mut text = String::new();
            while let Some(event) = completion.next().await?.map_err(failed)? {
                match event {
                    ProviderEvent::Text(delta) => text.push_str(&delta),
                    ProviderEvent::Usage(u) => {
                        usage.input_tokens += u.input_tokens;
                        usage.output_tokens += u.output_tokens;
                    }
                    _ => {}
                }
            }
            Ok::<_, RunError>(text)
        };
        let (mut cancel, mut shutdown) = (self.cancel.clone(), self.shutdown.clone());
        tokio::select! {
            text = work => {
                let text = text?;
                if text.trim().is_empty() {
                    return Err(RunError::Provider { provider: provider.clone(), status: None,
                        message: "the summary for compaction came back empty".into() });
                }
                Ok(Some(text.trim().to_string()))
            }
            _ = wait_true(&mut cancel) => Ok(None),
            _ = wait_true(&mut shutdown) => Ok(None),
        }
    }
}

/// Resolves once the flag is set; never when its sender goes away unset.
async fn wait_true(flag: &mut watch::Receiver<bool>) {
    if flag.wait_for(|v| *v).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// One message as plain text for the summariser: a transcript needs no
/// tool definitions, and its tool blocks cannot be refused as unmatched.
fn render(m: &HistoryMessage) -> String {
    let mut out = String::from(match m.role {
        HistoryRole::User => "### User\n",
        HistoryRole::Assistant => "### Assistant\n",
    });
    for b in &m.content {
        match b {
            Block::Text { text } => out.push_str(text),
            Block::ToolUse { id, name, input } => out.push_str(&format!("[calls tool `{name}` ({id}) with {input}]")),
            Block::ToolResult { tool_use_id, content, is_error } => {
                let failed = if *is_error { " (failed)" } else { "" };
                out.push_str(&format!("[result of {tool_use_id}{failed}]\n{content}"));
            }
        }
        out.push('\n');
    }
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(text: &str) -> HistoryMessage {
        HistoryMessage { role: HistoryRole::User, content: vec![Block::Text { text: text.into() }] }
    }
    fn call(id: &str) -> HistoryMessage {
        HistoryMessage {
            role: HistoryRole::Assistant,
            content: vec![Block::ToolUse { id: id.into(), name: "read".into(), input: serde_json::json!({"path": id}) }],
        }
    }
    fn result(id: &str, content: &str) -> HistoryMessage {
        HistoryMessage {
            role: HistoryRole::User,
            content: vec![Block::ToolResult { tool_use_id: id.into(), content: content.into(), is_error: false }],
        }
    }

    fn long_output() -> String {
        (0..100).map(|i| format!("line {i:03} {}", "x".repeat(50))).collect::<Vec<_>>().join("\n")
    }

    #[test]
    fn shortening_keeps_the_first_and_last_lines_and_says_what_was_cut() {
        let out = shorten(&long_output()).unwrap();
        assert!(out.starts_with("line 000 "), "{out}");
        assert!(out.contains("line 004 ") && !out.contains("line 005 "), "{out}");
        assert!(out.contains("line 095 ") && out.ends_with(&format!("line 099 {}", "x".repeat(50))), "{out}");
        assert!(out.contains("[... 90 lines ("), "{out}");
        assert!(shorten("short\noutput").is_none());
        // One huge line is cut by bytes, on character boundaries.
        let wide = "é".repeat(5000);
        let out = shorten(&wide).unwrap();
        assert!(out.len() < 2000 && out.contains("cut when the conversation was compacted"));
    }

    #[test]
    fn cuts_never_separate_a_tool_use_from_its_result() {
        let history = vec![user("go"), call("a"), result("a", "1"), call("b"), result("b", "2"), call("c"), result("c", "3")];
        assert_eq!(protected_from(&history, 1), 5);
        assert_eq!(protected_from(&history, 2), 3);
        assert_eq!(protected_from(&history, 3), 0, "the person's message goes with the answer to it");
        // The person's message goes with the answer to it.
        let history = vec![user("go"), call("a"), result("a", "1"), user("more"), call("b"), result("b", "2")];
        assert_eq!(protected_from(&history, 1), 3);
        assert_eq!(protected_from(&history, 5), 0);
    }

    #[test]
    fn the_view_puts_the_summary_first_and_keeps_roles_alternating() {
        let long = long_output();
        let history = vec![user("go"), call("a"), result("a", &long), call("b"), result("b", &long), call("c"), result("c", &long)];
        let context = SessionContext { summary: Some("S".into()), summarized: 3, shortened: vec!["b".into()], ..Default::default() };
        let v = view(&history, Some(&context));
        assert_eq!(v.len(), 5);
        assert_eq!(v[0].role, HistoryRole::User);
        assert!(matches!(&v[0].content[0], Block::Text { text } if text.ends_with("\n\nS")));
        assert_eq!(v[1], history[3]);
        assert!(matches!(&v[2].content[0], Block::ToolResult { content, .. } if content.len() < long.len()));
        assert_eq!(v[4], history[6]);
        assert!(estimate_messages(&v) < estimate_messages(&history) / 2);
        // A cut before the person's message: the summary joins it.
        let history = vec![user("go"), call("a"), result("a", "1"), user("more"), call("b")];
        let context = SessionContext { summary: Some("S".into()), summarized: 3, ..Default::default() };
        let v = view(&history, Some(&context));
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].content.len(), 2);
    }

    #[test]
    fn the_limit_leaves_room_for_the_answer() {
        assert_eq!(limit(10_000, 0.8, 256), 8000);
        assert_eq!(limit(10_000, 1.0, 4096), 5904);
    }
}
