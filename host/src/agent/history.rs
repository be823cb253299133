//! Session history (Anthropic-style blocks) to and from the WIT messages.

use crate::runtime::{ContentBlock, Message, Role, ToolResult, ToolUse};
use crate::store::{Block, HistoryMessage, HistoryRole};

/// Appends the user's text. After tool results or a failed step the last
/// message may already be the user's: the text joins it, so roles keep
/// alternating as providers require.
pub fn push_user_text(history: &mut Vec<HistoryMessage>, text: &str) {
    let block = Block::Text { text: text.to_string() };
    match history.last_mut() {
        Some(last) if last.role == HistoryRole::User => last.content.push(block),
        _ => history.push(HistoryMessage { role: HistoryRole::User, content: vec![block] }),
    }
}

pub fn to_wit(history: &[HistoryMessage]) -> Vec<Message> {
    history
        .iter()
        .map(|m| Message {
            role: match m.role {
                HistoryRole::User => Role::User,
                HistoryRole::Assistant => Role::Assistant,
            },
            content: m
                .content
                .iter()
                .map(|b| match b {
                    Block::Text { text } => ContentBlock::Text(text.clone()),
                    Block::ToolUse { id, name, input } => {
                        ContentBlock::ToolUse(ToolUse { id: id.clone(), name: name.clone(), input: input.to_string() })
                    }
                    Block::ToolResult { tool_use_id, content, is_error } => ContentBlock::ToolResult(ToolResult {
                        tool_use_id: tool_use_id.clone(),
                        content: content.clone(),
                        is_error: *is_error,
                    }),
                })
                .collect(),
        })
        .collect()
}
