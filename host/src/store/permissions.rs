//! Permission requests (a tool call waiting for a person's answer) and the
//! standing grants an `always` answer leaves in a session.

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use deadpool_postgres::GenericClient;

use super::{Db, Store, StoreError, parse_ts, pg, rfc3339, rfc3339_opt, ts};
use crate::permissions::Grant;

pub(super) const MIGRATION: &str = "
    ALTER TABLE agents ADD COLUMN permissions TEXT NOT NULL DEFAULT '[]';
    CREATE TABLE permission_requests (
        id TEXT PRIMARY KEY,
        session_id TEXT NOT NULL,
        run_id TEXT NOT NULL,
        tool_use_id TEXT NOT NULL,
        tool TEXT NOT NULL,
        input TEXT NOT NULL,
        patterns TEXT NOT NULL,
        status TEXT NOT NULL,
        reply TEXT,
        message TEXT,
        created_at TEXT NOT NULL,
        answered_at TEXT
    );
    CREATE INDEX permission_requests_by_session ON permission_requests (session_id, id);
    CREATE INDEX permission_requests_pending ON permission_requests (run_id) WHERE status = 'pending';
    CREATE TABLE permission_grants (
        session_id TEXT NOT NULL,
        tool TEXT NOT NULL,
        pattern TEXT NOT NULL,
        created_at TEXT NOT NULL,
        PRIMARY KEY (session_id, tool, pattern)
    ) WITHOUT ROWID;
";

/// Where a permission request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PermissionStatus {
    /// Waiting for an answer.
    Pending,
    Approved,
    Rejected,
    /// Nobody answered within `[permissions] timeout_s`.
    TimedOut,
    /// The server stopped while it waited.
    Interrupted,
}

impl PermissionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            PermissionStatus::Pending => "pending",
            PermissionStatus::Approved => "approved",
            PermissionStatus::Rejected => "rejected",
            PermissionStatus::TimedOut => "timed_out",
            PermissionStatus::Interrupted => "interrupted",
        }
    }

    pub fn parse(text: &str) -> Option<PermissionStatus> {
        use PermissionStatus::*;
        [Pending, Approved, Rejected, TimedOut, Interrupted].into_iter().find(|s| s.as_str() == text)
    }
}

/// A person's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Reply {
    /// Run this call.
    Once,
    /// Run this call, and every later call of this session that matches
    /// the request's `patterns`.
    Always,
    /// Do not run it; the model gets the message.
    Reject,
}

impl Reply {
    pub fn as_str(self) -> &'static str {
        match self {
            Reply::Once => "once",
            Reply::Always => "always",
            Reply::Reject => "reject",
        }
    }

    fn parse(text: &str) -> Option<Reply> {
        [Reply::Once, Reply::Always, Reply::Reject].into_iter().find(|r| r.as_str() == text)
    }
}

/// A tool call waiting for (or given) a person's answer.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PermissionRequest {
    /// ULID.
    pub id: String,
    pub session_id: String,
    pub run_id: String,
    /// The model's id of the call.
    pub tool_use_id: String,
    pub tool: String,
    #[schema(value_type = Object)]
    pub input: serde_json::Value,
    /// What an `always` answer allows from then on in this session.
    pub patterns: Vec<String>,
    pub status: PermissionStatus,
    pub reply: Option<Reply>,
    pub message: Option<String>,
    #[serde(serialize_with = "rfc3339")]
    pub created_at: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339_opt")]
    #[schema(value_type = Option<String>)]
    pub answered_at: Option<DateTime<Utc>>,
}

/// How a request ended.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: PermissionStatus,
    pub reply: Option<Reply>,
    pub message: Option<String>,
}

const SELECT: &str = "SELECT id, session_id, run_id, tool_use_id, tool, input, patterns, status, reply, message, created_at, answered_at
     FROM permission_requests";

fn row(row: &rusqlite::Row<'_>) -> rusqlite::Result<(PermissionRequest, String, String)> {
    let status: String = row.get(7)?;
    let reply: Option<String> = row.get(8)?;
    Ok((
        PermissionRequest {
            id: row.get(0)?,
            session_id: row.get(1)?,
            run_id: row.get(2)?,
            tool_use_id: row.get(3)?,
            tool: row.get(4)?,
            input: serde_json::Value::Null,
            patterns: Vec::new(),
            status: PermissionStatus::parse(&status).unwrap_or(PermissionStatus::Interrupted),
            reply: reply.as_deref().and_then(Reply::parse),
            message: row.get(9)?,
            created_at: parse_ts(row.get(10)?)?,
            answered_at: row.get::<_, Option<String>>(11)?.map(parse_ts).transpose()?,
        },
        row.get(5)?,
        row.get(6)?,
    ))
}

fn finish((mut request, input, patterns): (PermissionRequest, String, String)) -> Result<PermissionRequest, StoreError> {
    request.input = serde_json::from_str(&input)?;
    request.patterns = serde_json::from_str(&patterns)?;
    Ok(request)
}

fn get(c: &Connection, session: &str, id: &str) -> Result<PermissionRequest, StoreError> {
    let found = c
        .prepare_cached(&format!("{SELECT} WHERE id = ?1 AND session_id = ?2"))?
        .query_row([id, session], row)
        .optional()?
        .ok_or_else(|| StoreError::NotFound { kind: "permission request", id: id.to_string() })?;
    finish(found)
}

fn pg_row(row: &tokio_postgres::Row) -> Result<(PermissionRequest, String, String), StoreError> {
    let status: &str = row.get(7);
    let reply: Option<&str> = row.get(8);
    Ok((
        PermissionRequest {
            id: row.get(0),
            session_id: row.get(1),
            run_id: row.get(2),
            tool_use_id: row.get(3),
            tool: row.get(4),
            input: serde_json::Value::Null,
            patterns: Vec::new(),
            status: PermissionStatus::parse(status).unwrap_or(PermissionStatus::Interrupted),
            reply: reply.and_then(Reply::parse),
            message: row.get(9),
            created_at: pg::ts_at(row, 10)?,
            answered_at: pg::ts_opt(row, 11)?,
        },
        row.get(5),
        row.get(6),
    ))
}

/// [`get`] on PostgreSQL; `lock`: the row stays locked for the rest of the
/// transaction (an answer from another host waits for this one).
async fn pg_get(c: &impl GenericClient, session: &str, id: &str, lock: bool) -> Result<PermissionRequest, StoreError> {
    let suffix = if lock { " FOR UPDATE" } else { "" };
    let found = c
        .query_opt(&format!("{SELECT} WHERE id = $1 AND session_id = $2{suffix}"), &[&id, &session])
        .await?
        .ok_or_else(|| StoreError::NotFound { kind: "permission request", id: id.to_string() })?;
    finish(pg_row(&found)?)
}

impl Store {
    /// Stores a step's questions and marks their run `waiting`, in one write.
    pub async fn insert_permission_requests(&self, requests: Vec<PermissionRequest>) -> Result<(), StoreError> {
        let rows = requests
            .into_iter()
            .map(|r| Ok((serde_json::to_string(&r.input)?, serde_json::to_string(&r.patterns)?, ts(&r.created_at), r)))
            .collect::<Result<Vec<_>, StoreError>>()?;
        match &self.db {
            Db::Sqlite(db) => {
                db.write(move |c| {
                    for (input, patterns, at, r) in &rows {
                        c.prepare_cached(
                            "INSERT INTO permission_requests (id, session_id, run_id, tool_use_id, tool, input, patterns, status, created_at)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'pending', ?8)",
                        )?
                        .execute(params![r.id, r.session_id, r.run_id, r.tool_use_id, r.tool, input, patterns, at])?;
                        c.prepare_cached("UPDATE runs SET status = 'waiting' WHERE id = ?1 AND status = 'running'")?.execute([&r.run_id])?;
                    }
                    Ok(())
                })
                .await
            }
            Db::Postgres(pg) => {
                let mut c = pg.client().await?;
                let tx = c.transaction().await?;
                for (input, patterns, at, r) in &rows {
                    tx.execute(
                        "INSERT INTO permission_requests (id, session_id, run_id, tool_use_id, tool, input, patterns, status, created_at)
                         VALUES ($1, $2, $3, $4, $5, $6, $7, 'pending', $8)",
                        &[&r.id, &r.session_id, &r.run_id, &r.tool_use_id, &r.tool, input, patterns, at],
                    )
                    .await?;
                    tx.execute("UPDATE runs SET status = 'waiting' WHERE id = $1 AND status = 'running'", &[&r.run_id]).await?;
                }
                tx.commit().await?;
                Ok(())
            }
        }
    }

    /// Answers a pending request; with `always`, also stores its patterns
    /// as grants of the session. When it was the run's last pending
    /// request the run is `running` again. An answered request is
    /// [`StoreError::Answered`].
    pub async fn answer_permission(&self, session: &str, id: &str, answer: Answer) -> Result<PermissionRequest, StoreError> {
        let (session, id) = (session.to_string(), id.to_string());
        let (status, reply, message) = (answer.status.as_str(), answer.reply.map(Reply::as_str), answer.message);
        match &self.db {
            Db::Sqlite(db) => {
                db.write(move |c| {
                    let request = get(c, &session, &id)?;
                    if request.status != PermissionStatus::Pending {
                        return Err(StoreError::Answered { id, status: request.status.as_str() });
                    }
                    let at = ts(&super::now());
                    c.prepare_cached("UPDATE permission_requests SET status = ?2, reply = ?3, message = ?4, answered_at = ?5 WHERE id = ?1")?
                        .execute(params![id, status, reply, message, at])?;
                    if answer.reply == Some(Reply::Always) {
                        for pattern in &request.patterns {
                            c.prepare_cached(
                                "INSERT OR IGNORE INTO permission_grants (session_id, tool, pattern, created_at) VALUES (?1, ?2, ?3, ?4)",
                            )?
                            .execute(params![session, request.tool, pattern, at])?;
                        }
                    }
                    let pending: i64 = c
                        .prepare_cached("SELECT COUNT(*) FROM permission_requests WHERE run_id = ?1 AND status = 'pending'")?
                        .query_row([&request.run_id], |r| r.get(0))?;
                    if pending == 0 {
                        c.prepare_cached("UPDATE runs SET status = 'running' WHERE id = ?1 AND status = 'waiting'")?
                            .execute([&request.run_id])?;
                    }
                    get(c, &session, &id)
                })
                .await
            }
            Db::Postgres(pg) => {
                let mut c = pg.client().await?;
                let tx = c.transaction().await?;
                // Locked: of two answers at once (from two hosts), the second
                // waits for the first and then finds it answered.
                let request = pg_get(&tx, &session, &id, true).await?;
                if request.status != PermissionStatus::Pending {
                    return Err(StoreError::Answered { id, status: request.status.as_str() });
                }
                let at = ts(&super::now());
                tx.execute(
                    "UPDATE permission_requests SET status = $2, reply = $3, message = $4, answered_at = $5 WHERE id = $1",
                    &[&id, &status, &reply, &message, &at],
                )
                .await?;
                if answer.reply == Some(Reply::Always) {
                    for pattern in &request.patterns {
                        tx.execute(
                            "INSERT INTO permission_grants (session_id, tool, pattern, created_at) VALUES ($1, $2, $3, $4)
                             ON CONFLICT DO NOTHING",
                            &[&session, &request.tool, pattern, &at],
                        )
                        .await?;
                    }
                }
                // The run's other requests are locked too, so that two
                // answers to its last two requests cannot both see one pending.
                let pending: i64 = tx
                    .query_one(
                        "SELECT COUNT(*) FROM (SELECT 1 FROM permission_requests WHERE run_id = $1 AND status = 'pending' FOR UPDATE) AS p",
                        &[&request.run_id],
                    )
                    .await?
                    .get(0);
                if pending == 0 {
                    tx.execute("UPDATE runs SET status = 'running' WHERE id = $1 AND status = 'waiting'", &[&request.run_id]).await?;
                }
                let answered = pg_get(&tx, &session, &id, false).await?;
                tx.commit().await?;
                Ok(answered)
            }
        }
    }

    pub async fn permission_request(&self, session: &str, id: &str) -> Result<PermissionRequest, StoreError> {
        let (session, id) = (session.to_string(), id.to_string());
        match &self.db {
            Db::Sqlite(db) => db.read(move |c| get(c, &session, &id)).await,
            Db::Postgres(pg) => pg_get(&pg.client().await?, &session, &id, false).await,
        }
    }

    /// A session's requests, oldest first, optionally of one status.
    pub async fn permission_requests(
        &self,
        session: &str,
        status: Option<PermissionStatus>,
    ) -> Result<Vec<PermissionRequest>, StoreError> {
        let session = session.to_string();
        let status = status.map(PermissionStatus::as_str);
        let rows = match &self.db {
            Db::Sqlite(db) => {
                db.read(move |c| {
                    Ok(c.prepare_cached(&format!("{SELECT} WHERE session_id = ?1 AND (?2 IS NULL OR status = ?2) ORDER BY id"))?
                        .query_map(params![session, status], row)?
                        .collect::<Result<Vec<_>, _>>()?)
                })
                .await?
            }
            Db::Postgres(pg) => pg.query(&format!("{SELECT} WHERE session_id = $1 AND ($2::TEXT IS NULL OR status = $2) ORDER BY id"), &[&session, &status])
                .await?
                .iter()
                .map(pg_row)
                .collect::<Result<Vec<_>, _>>()?,
        };
        rows.into_iter().map(finish).collect()
    }

    /// The grants `always` answers left in a session.
    pub async fn permission_grants(&self, session: &str) -> Result<Vec<Grant>, StoreError> {
        let session = session.to_string();
        match &self.db {
            Db::Sqlite(db) => {
                db.read(move |c| {
                    Ok(c.prepare_cached("SELECT tool, pattern FROM permission_grants WHERE session_id = ?1 ORDER BY created_at")?
                        .query_map([session], |r| Ok(Grant { tool: r.get(0)?, pattern: r.get(1)? }))?
                        .collect::<Result<Vec<_>, _>>()?)
                })
                .await
            }
            Db::Postgres(pg) => Ok(pg.query("SELECT tool, pattern FROM permission_grants WHERE session_id = $1 ORDER BY created_at", &[&session])
                .await?
                .iter()
                .map(|r| Grant { tool: r.get(0), pattern: r.get(1) })
                .collect()),
        }
    }
}

/// Every request still pending becomes `interrupted` (at start-up: no run
/// is waiting for them any more).
pub(super) fn interrupt_pending(c: &Connection, at: &str) -> rusqlite::Result<usize> {
    c.execute("UPDATE permission_requests SET status = 'interrupted', answered_at = ?1 WHERE status = 'pending'", [at])
}

/// On PostgreSQL, of the runs `runs` only: other hosts' runs still wait for theirs.
pub(super) async fn pg_interrupt_pending(tx: &deadpool_postgres::Transaction<'_>, at: &str, runs: &[&String]) -> Result<u64, StoreError> {
    Ok(tx
        .execute(
            "UPDATE permission_requests SET status = 'interrupted', answered_at = $1 WHERE status = 'pending' AND run_id = ANY($2)",
            &[&at, &runs],
        )
        .await?)
}

/// Removes a session's requests and grants (with the session).
pub(super) fn delete_for_session(c: &Connection, session: &str) -> rusqlite::Result<()> {
    c.execute("DELETE FROM permission_requests WHERE session_id = ?1", [session])?;
    c.execute("DELETE FROM permission_grants WHERE session_id = ?1", [session])?;
    Ok(())
}

pub(super) async fn pg_delete_for_session(tx: &deadpool_postgres::Transaction<'_>, session: &str) -> Result<(), StoreError> {
    tx.execute("DELETE FROM permission_requests WHERE session_id = $1", &[&session]).await?;
    tx.execute("DELETE FROM permission_grants WHERE session_id = $1", &[&session]).await?;
    Ok(())
}
