//! Context compaction: each agent's settings (a column of `agents`) and,
//! per session, the compacted view the model is sent instead of the whole
//! history. The view is stored as an overlay on the history (a summary
//! standing for a prefix of it, and which tool results are shortened), not
//! as a copy: the history only grows at its end, so messages appended after
//! a compaction (and results a restart adds to repair it) reach the model
//! without the view being written again.

use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{Db, Store, StoreError, pg, ts};

pub(super) const MIGRATION: &str = "
    ALTER TABLE agents ADD COLUMN compaction TEXT NOT NULL DEFAULT '{}';
    CREATE TABLE session_contexts (
        session_id TEXT PRIMARY KEY REFERENCES sessions (id) ON DELETE CASCADE,
        context TEXT NOT NULL,
        updated_at TEXT NOT NULL
    ) WITHOUT ROWID;
";

pub const DEFAULT_THRESHOLD: f64 = 0.8;
pub const DEFAULT_KEEP_TURNS: u32 = 4;

/// When and how an agent's runs compact the conversation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Compaction {
    /// Compact when a request would pass this share of the model's context
    /// window (more than 0, at most 1).
    #[serde(default = "default_threshold")]
    pub threshold: f64,
    /// Model turns (an assistant message and the tool results answering it)
    /// kept verbatim at the end; older ones are shortened, then summarised.
    #[serde(default = "default_keep_turns")]
    pub keep_turns: u32,
    /// `false`: never compact automatically (a context-length error from
    /// the provider and `POST /sessions/{id}/compact` still do).
    #[serde(default = "default_enabled")]
    pub enabled: bool,
}

fn default_threshold() -> f64 {
    DEFAULT_THRESHOLD
}
fn default_keep_turns() -> u32 {
    DEFAULT_KEEP_TURNS
}
fn default_enabled() -> bool {
    true
}

impl Default for Compaction {
    fn default() -> Self {
        Compaction { threshold: DEFAULT_THRESHOLD, keep_turns: DEFAULT_KEEP_TURNS, enabled: true }
    }
}

/// What the model sees of a session's history, when it differs from the
/// history: the summary replaces the first `summarized` messages, and the
/// tool results named in `shortened` keep only their first and last lines.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SessionContext {
    pub summary: Option<String>,
    pub summarized: usize,
    pub shortened: Vec<String>,
    /// How many compactions made it.
    pub compactions: u32,
    /// Estimated tokens of the request before and after the last compaction.
    pub tokens_before: u64,
    pub tokens_after: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compacted_at: Option<DateTime<Utc>>,
}

/// The stored context of `session`, undecoded.
pub(super) fn sqlite_context(c: &rusqlite::Connection, session: &str) -> rusqlite::Result<Option<String>> {
    c.prepare_cached("SELECT context FROM session_contexts WHERE session_id = ?1")?.query_row([session], |r| r.get(0)).optional()
}

pub(super) fn decode_context(text: Option<String>) -> Result<Option<SessionContext>, StoreError> {
    Ok(text.map(|t| serde_json::from_str(&t)).transpose()?)
}

impl Store {
    /// The session's compacted view; `None` while it was never compacted.
    pub async fn session_context(&self, session: &str) -> Result<Option<SessionContext>, StoreError> {
        let session = session.to_string();
        let text: Option<String> = match &self.db {
            Db::Sqlite(db) => {
                db.read(move |c| Ok(sqlite_context(c, &session)?)).await?
            }
            Db::Postgres(pg) => pg.query_opt("SELECT context FROM session_contexts WHERE session_id = $1", &[&session])
                .await?
                .map(|r| r.get(0)),
        };
        decode_context(text)
    }

    pub async fn put_session_context(&self, session: &str, context: SessionContext) -> Result<(), StoreError> {
        const PUT: &str = "INSERT INTO session_contexts (session_id, context, updated_at) VALUES ($1, $2, $3)
             ON CONFLICT(session_id) DO UPDATE SET context = $2, updated_at = $3";
        let (session, context, at) = (session.to_string(), serde_json::to_string(&context)?, ts(&super::now()));
        match &self.db {
            Db::Sqlite(db) => {
                db.write(move |c| {
                    c.prepare_cached(&pg::sqlite(PUT))?.execute(params![session, context, at])?;
                    Ok(())
                })
                .await
            }
            Db::Postgres(pg) => {
                pg.execute(PUT, &[&session, &context, &at]).await?;
                Ok(())
            }
        }
    }
}

/// Reads the `compaction` column (`{}` for agents made before it existed).
pub(super) fn parse_compaction(text: &str) -> Result<Compaction, StoreError> {
    Ok(serde_json::from_str(text)?)
}
