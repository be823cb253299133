//! The stored resources, in the shapes the API shows them.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize, Serializer};
use utoipa::ToSchema;

/// An agent: instructions, tools and a model.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Agent {
    /// ULID.
    pub id: String,
    pub name: String,
    /// The system prompt.
    pub instructions: String,
    /// Names of the tools the agent may call.
    pub tools: Vec<String>,
    pub provider: AgentProvider,
    /// Rules deciding which tool calls run, wait for an answer, or are
    /// refused; the last that matches wins (after the config file's).
    pub permissions: Vec<crate::permissions::Rule>,
    /// When the conversation is compacted to fit the model's context window.
    pub compaction: super::Compaction,
    #[serde(serialize_with = "rfc3339")]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339")]
    pub updated_at: DateTime<Utc>,
    /// The tenant that owns it (never shown: a caller sees only its own).
    #[serde(skip)]
    pub tenant_id: String,
}

/// Which model answers for an agent, and how.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct AgentProvider {
    /// A provider id from `GET /provider`.
    pub id: String,
    /// A model id of that provider.
    pub model: String,
    /// Upper bound on output tokens per model call.
    pub max_tokens: u32,
    /// Sampling temperature (0 to 2); `null` leaves the provider's default.
    pub temperature: Option<f64>,
    /// The model's context window in tokens, overriding what the provider's
    /// model list says; `null` takes the provider's figure.
    #[serde(default)]
    pub context_window: Option<u64>,
}

/// A conversation on a working directory.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Session {
    /// ULID.
    pub id: String,
    /// Absolute path of the directory the tools work in, or `null`.
    pub work_dir: Option<String>,
    /// Every message so far, oldest first.
    pub history: Vec<HistoryMessage>,
    #[serde(serialize_with = "rfc3339")]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339")]
    pub updated_at: DateTime<Utc>,
    /// The tenant that owns it (never shown: a caller sees only its own).
    #[serde(skip)]
    pub tenant_id: String,
}

/// A session as `GET /sessions` lists it: with `?history=false`, without
/// its history.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SessionListed {
    /// ULID.
    pub id: String,
    /// Absolute path of the directory the tools work in, or `null`.
    pub work_dir: Option<String>,
    /// Every message so far, oldest first; left out with `?history=false`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub history: Option<Vec<HistoryMessage>>,
    #[serde(serialize_with = "rfc3339")]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339")]
    pub updated_at: DateTime<Utc>,
}

impl SessionListed {
    pub fn new(session: Session, history: bool) -> SessionListed {
        SessionListed {
            id: session.id,
            work_dir: session.work_dir,
            history: history.then_some(session.history),
            created_at: session.created_at,
            updated_at: session.updated_at,
        }
    }
}

/// One message of a session's history, with Anthropic-style content blocks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HistoryMessage {
    pub role: HistoryRole,
    pub content: Vec<Block>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum HistoryRole {
    User,
    Assistant,
}

/// A content block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Block {
    Text {
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
        #[schema(value_type = Object)]
        input: serde_json::Value,
    },
    ToolResult {
        tool_use_id: String,
        content: String,
        is_error: bool,
    },
}

/// Token counts, summed over a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Usage {
    pub input_tokens: u64,
    pub output_tokens: u64,
}

/// Why a run stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    EndTurn,
    MaxSteps,
    Cancelled,
}

impl StopReason {
    pub fn as_str(self) -> &'static str {
        match self {
            StopReason::EndTurn => "end_turn",
            StopReason::MaxSteps => "max_steps",
            StopReason::Cancelled => "cancelled",
        }
    }
}

/// One tool call of a run, with its result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ToolCallRecord {
    pub id: String,
    pub name: String,
    #[schema(value_type = Object)]
    pub input: serde_json::Value,
    pub output: String,
    pub is_error: bool,
}

/// Where a run is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Waiting for the session's active run to end.
    Queued,
    Running,
    /// Waiting for a permission reply.
    Waiting,
    Completed,
    Failed,
    Cancelled,
    /// The server stopped (or crashed) while it ran.
    Interrupted,
}

impl RunStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Queued => "queued",
            RunStatus::Running => "running",
            RunStatus::Waiting => "waiting",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
            RunStatus::Interrupted => "interrupted",
        }
    }

    pub fn parse(text: &str) -> Option<RunStatus> {
        [
            RunStatus::Queued,
            RunStatus::Running,
            RunStatus::Waiting,
            RunStatus::Completed,
            RunStatus::Failed,
            RunStatus::Cancelled,
            RunStatus::Interrupted,
        ]
        .into_iter()
        .find(|s| s.as_str() == text)
    }

    /// Running or waiting for a permission reply: the session's one active run.
    pub fn is_active(self) -> bool {
        matches!(self, RunStatus::Running | RunStatus::Waiting)
    }

    /// Whether the run has ended for good.
    pub fn is_final(self) -> bool {
        matches!(self, RunStatus::Completed | RunStatus::Failed | RunStatus::Cancelled | RunStatus::Interrupted)
    }
}

/// Why a run failed, as its `error` event said.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RunFailure {
    pub error: String,
    pub code: String,
}

/// A run of the agent loop: one message and everything it led to.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct RunRecord {
    /// ULID.
    pub id: String,
    pub session_id: String,
    pub agent_id: String,
    pub status: RunStatus,
    #[serde(serialize_with = "rfc3339")]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339_opt")]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(serialize_with = "rfc3339_opt")]
    pub ended_at: Option<DateTime<Utc>>,
    /// How it ended; every field `null` until then.
    #[serde(flatten)]
    pub result: RunResult,
}

impl RunRecord {
    /// A run just submitted: queued until it starts.
    pub fn queued(id: String, session_id: String, agent_id: String, created_at: DateTime<Utc>) -> RunRecord {
        RunRecord {
            id,
            session_id,
            agent_id,
            status: RunStatus::Queued,
            created_at,
            started_at: None,
            ended_at: None,
            result: RunResult::default(),
        }
    }
}

/// How a run ended, as stored with it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RunResult {
    /// The text of the last assistant message.
    pub response: Option<String>,
    pub tool_calls: Option<Vec<ToolCallRecord>>,
    pub usage: Option<Usage>,
    /// Model calls made.
    pub steps: Option<u32>,
    pub stop_reason: Option<StopReason>,
    /// Set when the run failed or was interrupted.
    pub error: Option<RunFailure>,
}

/// One event of a session's stream, stored exactly as it was sent.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    /// Strictly increasing within the session; the SSE `id:`.
    pub seq: u64,
    pub run_id: String,
    /// The SSE event name (`text`, `tool_use`, ... `done`, `error`).
    pub name: String,
    /// The SSE data: the event's JSON text.
    pub data: String,
}

pub fn rfc3339_opt<S: Serializer>(t: &Option<DateTime<Utc>>, s: S) -> Result<S::Ok, S::Error> {
    match t {
        Some(t) => rfc3339(t, s),
        None => s.serialize_none(),
    }
}

/// The same text as chrono's own `Serialize`, written in one piece: chrono
/// writes through `Display`, which reaches serde_json's escaper one char at
/// a time, and that was the largest single cost of `GET /agents`.
pub fn rfc3339<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
}

/// Stored credentials and settings of one provider. Never serialized: the
/// key is write-only.
#[derive(Clone)]
pub struct AuthRecord {
    pub provider: String,
    pub auth_type: Option<String>,
    pub secret: Option<String>,
    pub base_url: Option<String>,
    pub updated_at: DateTime<Utc>,
    /// Why a stored key could not be opened (sealed under another server key).
    pub unreadable: Option<String>,
}

impl std::fmt::Debug for AuthRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthRecord")
            .field("provider", &self.provider)
            .field("auth_type", &self.auth_type)
            .field("secret", &self.secret.as_ref().map(|_| "[redacted]"))
            .field("base_url", &self.base_url)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fast serializer writes what chrono's own `Serialize` writes, for
    /// the millisecond times the store keeps and for whole seconds.
    #[test]
    fn timestamps_serialize_as_chrono_does() {
        for millis in [1_764_356_412_123_i64, 1_764_356_412_000, 1_764_356_412_100] {
            let t = DateTime::from_timestamp_millis(millis).unwrap();
            let ours = rfc3339(&t, serde_json::value::Serializer).unwrap();
            assert_eq!(ours, serde_json::to_value(t).unwrap(), "{t:?}");
        }
    }
}
