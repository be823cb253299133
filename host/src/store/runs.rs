//! Runs and the events of each session: a run is a row with a status; every
//! event a client was sent is a row with the session's next `seq`, kept so
//! that a client that reconnects is replayed exactly what it missed.

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};

use super::{
    Block, Db, HistoryMessage, HistoryRole, RunRecord, RunResult, RunStatus, Store, StoreError, StoredEvent, parse_ts, pg, ts,
};

pub(super) const MIGRATION: &str = "
    CREATE TABLE runs (
        id TEXT PRIMARY KEY,
        session_id TEXT NOT NULL,
        agent_id TEXT NOT NULL,
        status TEXT NOT NULL,
        request TEXT NOT NULL,
        idempotency_key TEXT,
        created_at TEXT NOT NULL,
        started_at TEXT,
        ended_at TEXT,
        result TEXT
    );
    CREATE INDEX runs_by_session ON runs (session_id, id);
    CREATE INDEX runs_by_status ON runs (status);
    CREATE INDEX runs_by_key ON runs (session_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
    CREATE TABLE events (
        session_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        run_id TEXT NOT NULL,
        name TEXT NOT NULL,
        data TEXT NOT NULL,
        PRIMARY KEY (session_id, seq)
    ) WITHOUT ROWID;
    CREATE INDEX events_by_run ON events (run_id, seq);
    -- The highest seq removed by retention, per session: an older cursor
    -- can no longer be served.
    ALTER TABLE sessions ADD COLUMN events_pruned INTEGER NOT NULL DEFAULT 0;
";

/// One run per idempotency key and session: a second insert with a key in
/// use fails instead of making a second run (two submits racing with one
/// key). Older duplicates keep their run but lose the key.
pub(super) const KEY_MIGRATION: &str = "
    UPDATE runs SET idempotency_key = NULL
     WHERE idempotency_key IS NOT NULL
       AND rowid NOT IN (SELECT MAX(rowid) FROM runs WHERE idempotency_key IS NOT NULL GROUP BY session_id, idempotency_key);
    DROP INDEX runs_by_key;
    CREATE UNIQUE INDEX runs_by_key ON runs (session_id, idempotency_key) WHERE idempotency_key IS NOT NULL;
";

/// Several hosts on one database. Each run records the host running it
/// (`host_id`) and until when that host's lease holds (`lease_until`, ms
/// since the epoch by the database's clock); a cancel sent to any host is
/// written to the row (`cancel_requested`); a run queued by `interrupt`
/// starts before those queued earlier (`queue_first`). At most one run of
/// a session is active, whichever host runs it: a unique index, not a
/// host's memory, says so. (A second active run of a session could only
/// be left by a crash mid-handover; it is interrupted here, as a restart
/// would have.) Plugins installed through the API are kept here too, so
/// every host loads them.
pub(super) const HOSTS_MIGRATION: &str = "
    ALTER TABLE runs ADD COLUMN host_id TEXT;
    ALTER TABLE runs ADD COLUMN lease_until INTEGER;
    ALTER TABLE runs ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE runs ADD COLUMN queue_first INTEGER NOT NULL DEFAULT 0;
    UPDATE runs SET status = 'interrupted'
     WHERE status IN ('running', 'waiting')
       AND id NOT IN (SELECT MAX(id) FROM runs WHERE status IN ('running', 'waiting') GROUP BY session_id);
    CREATE UNIQUE INDEX runs_one_active ON runs (session_id) WHERE status IN ('running', 'waiting');
    CREATE INDEX runs_by_host ON runs (host_id) WHERE status IN ('running', 'waiting');
    CREATE TABLE plugins (
        key TEXT PRIMARY KEY,
        tenant_id TEXT,
        manifest TEXT NOT NULL,
        wasm BLOB NOT NULL,
        sha256 TEXT NOT NULL,
        installed_at TEXT NOT NULL
    );
";

/// What a run was asked to do: the message body, as stored with the run
/// (a queued run starts from it; an idempotent repeat is compared with it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RunRequest {
    pub agent_id: String,
    pub message: String,
    /// The whole body as sent: an idempotent repeat must send the same.
    pub body: serde_json::Value,
}

const RUN_SELECT: &str =
    "SELECT id, session_id, agent_id, status, created_at, started_at, ended_at, result FROM runs";
/// [`RUN_SELECT`] and the run's request.
const RUN_AND_REQUEST_SELECT: &str =
    "SELECT id, session_id, agent_id, status, created_at, started_at, ended_at, result, request FROM runs";

fn run_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<(RunRecord, Option<String>)> {
    let status: String = row.get(3)?;
    let opt_ts = |i: usize| -> rusqlite::Result<Option<DateTime<Utc>>> { row.get::<_, Option<String>>(i)?.map(parse_ts).transpose() };
    Ok((
        RunRecord {
            id: row.get(0)?,
            session_id: row.get(1)?,
            agent_id: row.get(2)?,
            status: RunStatus::parse(&status).unwrap_or(RunStatus::Interrupted),
            created_at: parse_ts(row.get(4)?)?,
            started_at: opt_ts(5)?,
            ended_at: opt_ts(6)?,
            result: RunResult::default(),
        },
        row.get(7)?,
    ))
}

fn run_pg_row(row: &tokio_postgres::Row) -> Result<(RunRecord, Option<String>), StoreError> {
    let status: &str = row.get(3);
    Ok((
        RunRecord {
            id: row.get(0),
            session_id: row.get(1),
            agent_id: row.get(2),
            status: RunStatus::parse(status).unwrap_or(RunStatus::Interrupted),
            created_at: pg::ts_at(row, 4)?,
            started_at: pg::ts_opt(row, 5)?,
            ended_at: pg::ts_opt(row, 6)?,
            result: RunResult::default(),
        },
        row.get(7),
    ))
}

fn finish_run((mut record, result): (RunRecord, Option<String>)) -> Result<RunRecord, StoreError> {
    if let Some(result) = result {
        record.result = serde_json::from_str(&result)?;
    }
    Ok(record)
}

fn event_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredEvent> {
    Ok(StoredEvent { seq: row.get::<_, i64>(0)? as u64, run_id: row.get(1)?, name: row.get(2)?, data: row.get(3)? })
}

const EVENT_INSERT_SQLITE: &str = "INSERT INTO events (session_id, seq, run_id, name, data) VALUES (?1, ?2, ?3, ?4, ?5)";
const EVENT_INSERT_PG: &str = "INSERT INTO events (session_id, seq, run_id, name, data) VALUES ($1, $2, $3, $4, $5)";

/// [`max_seq`] on PostgreSQL.
async fn pg_max_seq(c: &impl deadpool_postgres::GenericClient, session: &str) -> Result<u64, StoreError> {
    let row = c
        .query_one(
            "SELECT GREATEST(COALESCE((SELECT MAX(seq) FROM events WHERE session_id = $1), 0),
                             COALESCE((SELECT events_pruned FROM sessions WHERE id = $1), 0))",
            &[&session],
        )
        .await?;
    Ok(pg::count(&row, 0))
}

fn max_seq(c: &Connection, session: &str) -> rusqlite::Result<u64> {
    let stored: Option<i64> = c.query_row("SELECT MAX(seq) FROM events WHERE session_id = ?1", [session], |r| r.get(0))?;
    let pruned: i64 =
        c.query_row("SELECT events_pruned FROM sessions WHERE id = ?1", [session], |r| r.get(0)).optional()?.unwrap_or(0);
    Ok(stored.unwrap_or(0).max(pruned) as u64)
}

/// Gives every `tool_use` of the history that has no result an error
/// result saying why, so the history is valid for the provider again.
pub fn answer_unanswered(history: &mut Vec<HistoryMessage>, reason: &str) -> usize {
    let mut added = 0;
    let mut i = 0;
    while i < history.len() {
        // A call is answered by a result in the message right after it
        // (ids are only unique per turn: some models reuse them).
        let answered: std::collections::HashSet<String> = match history.get(i + 1) {
            Some(next) if next.role == HistoryRole::User => next
                .content
                .iter()
                .filter_map(|b| match b {
                    Block::ToolResult { tool_use_id, .. } => Some(tool_use_id.clone()),
                    _ => None,
                })
                .collect(),
            _ => Default::default(),
        };
        let missing: Vec<Block> = history[i]
            .content
            .iter()
            .filter_map(|b| match b {
                Block::ToolUse { id, .. } if !answered.contains(id) => {
                    Some(Block::ToolResult { tool_use_id: id.clone(), content: reason.to_string(), is_error: true })
                }
                _ => None,
            })
            .collect();
        if history[i].role == HistoryRole::Assistant && !missing.is_empty() {
            added += missing.len();
            match history.get_mut(i + 1) {
                Some(next) if next.role == HistoryRole::User => {
                    let mut content = missing;
                    content.append(&mut next.content);
                    next.content = content;
                }
                _ => history.insert(i + 1, HistoryMessage { role: HistoryRole::User, content: missing }),
            }
        }
        i += 1;
    }
    added
}

/// Whose run it is, and how many of its runs may be active at once.
#[derive(Debug, Clone)]
pub struct RunLimit {
    pub tenant: String,
    pub max_concurrent_runs: Option<u64>,
}

impl Store {
    /// Stores a new run. A key used by a run since `key_since` is
    /// [`StoreError::KeyTaken`]; an older run's use of it is forgotten.
    pub async fn insert_run(
        &self,
        run: RunRecord,
        request: RunRequest,
        key: Option<String>,
        key_since: DateTime<Utc>,
        limit: RunLimit,
    ) -> Result<RunRecord, StoreError> {
        let request = serde_json::to_string(&request)?;
        match &self.db {
            Db::Sqlite(db) => {
                db.write(move |c| {
                    // Counted and inserted in one write: concurrent submits cannot
                    // both slip under the limit.
                    if let Some(max) = limit.max_concurrent_runs {
                        let used = super::tenants::active_runs(c, &limit.tenant)?;
                        if used >= max {
                            return Err(StoreError::Quota { quota: "max_concurrent_runs", limit: max, used });
                        }
                    }
                    if let Some(key) = &key {
                        c.prepare_cached(
                            "UPDATE runs SET idempotency_key = NULL WHERE session_id = ?1 AND idempotency_key = ?2 AND created_at < ?3",
                        )?
                        .execute(params![run.session_id, key, ts(&key_since)])?;
                    }
                    let inserted = c
                        .prepare_cached(
                            "INSERT INTO runs (id, session_id, agent_id, status, request, idempotency_key, created_at, started_at)
                             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                        )?
                        .execute(params![
                            run.id,
                            run.session_id,
                            run.agent_id,
                            run.status.as_str(),
                            request,
                            key,
                            ts(&run.created_at),
                            run.started_at.as_ref().map(ts)
                        ]);
                    match inserted {
                        Err(rusqlite::Error::SqliteFailure(e, _))
                            if e.code == rusqlite::ErrorCode::ConstraintViolation && key.is_some() =>
                        {
                            Err(StoreError::KeyTaken { key: key.unwrap_or_default() })
                        }
                        other => {
                            other?;
                            super::tenants::count_run(c, &limit.tenant, &run.created_at)?;
                            Ok(run)
                        }
                    }
                })
                .await
            }
            Db::Postgres(pg) => {
                let mut c = pg.client().await?;
                let tx = c.transaction().await?;
                if let Some(max) = limit.max_concurrent_runs {
                    // Submits of one tenant, on any host, count one after
                    // another: the count and the insert are one transaction
                    // under the tenant's lock.
                    pg::lock(&tx, &format!("runs:{}", limit.tenant)).await?;
                    let used = super::tenants::pg_active_runs(&tx, &limit.tenant).await?;
                    if used >= max {
                        return Err(StoreError::Quota { quota: "max_concurrent_runs", limit: max, used });
                    }
                }
                if let Some(key) = &key {
                    tx.execute(
                        "UPDATE runs SET idempotency_key = NULL WHERE session_id = $1 AND idempotency_key = $2 AND created_at < $3",
                        &[&run.session_id, key, &ts(&key_since)],
                    )
                    .await?;
                }
                // A run stored as running is this host's, leased to it.
                let (host, lease) = self.lease();
                let host = host.filter(|_| run.status.is_active());
                let inserted = tx
                    .execute(
                        &format!(
                            "INSERT INTO runs (id, session_id, agent_id, status, request, idempotency_key, created_at, started_at, host_id, lease_until)
                             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, CASE WHEN $9::TEXT IS NULL THEN NULL ELSE {} + $10 END)",
                            super::hosts::PG_NOW_MS
                        ),
                        &[
                            &run.id,
                            &run.session_id,
                            &run.agent_id,
                            &run.status.as_str(),
                            &request,
                            &key,
                            &ts(&run.created_at),
                            &run.started_at.as_ref().map(ts),
                            &host,
                            &lease,
                        ],
                    )
                    .await;
                match inserted {
                    // The unique index of active runs: the session is busy,
                    // on this host or another.
                    Err(e) if pg::violates(&e, "runs_one_active") => Err(StoreError::SessionBusy { session: run.session_id.clone() }),
                    // The unique index on (session_id, idempotency_key): a
                    // concurrent submit took the key first.
                    Err(e) if pg::unique_violation(&e) && key.is_some() => Err(StoreError::KeyTaken { key: key.unwrap_or_default() }),
                    other => {
                        other?;
                        super::tenants::pg_count_run(&tx, &limit.tenant, &run.created_at).await?;
                        tx.commit().await?;
                        Ok(run)
                    }
                }
            }
        }
    }

    pub async fn run(&self, session: &str, id: &str) -> Result<RunRecord, StoreError> {
        let (session, id) = (session.to_string(), id.to_string());
        let found = match &self.db {
            Db::Sqlite(db) => {
                let id = id.clone();
                db.read(move |c| {
                    Ok(c.prepare_cached(&format!("{RUN_SELECT} WHERE id = ?1 AND session_id = ?2"))?
                        .query_row([&id, &session], run_row)
                        .optional()?)
                })
                .await?
            }
            Db::Postgres(pg) => {
                let row = pg.query_opt(&format!("{RUN_SELECT} WHERE id = $1 AND session_id = $2"), &[&id, &session]).await?;
                row.as_ref().map(run_pg_row).transpose()?
            }
        };
        finish_run(found.ok_or(StoreError::NotFound { kind: "run", id })?)
    }

    /// The request a run was started with.
    pub async fn run_request(&self, id: &str) -> Result<RunRequest, StoreError> {
        let id = id.to_string();
        let text: Option<String> = match &self.db {
            Db::Sqlite(db) => {
                let id = id.clone();
                db.read(move |c| Ok(c.query_row("SELECT request FROM runs WHERE id = ?1", [&id], |r| r.get(0)).optional()?)).await?
            }
            Db::Postgres(pg) => pg.query_opt("SELECT request FROM runs WHERE id = $1", &[&id]).await?.map(|r| r.get(0)),
        };
        Ok(serde_json::from_str(&text.ok_or(StoreError::NotFound { kind: "run", id })?)?)
    }

    /// Removes a run that never started (a submit that lost a race).
    pub async fn delete_run(&self, id: &str) -> Result<(), StoreError> {
        self.delete_row("runs", "run", id).await
    }

    /// A session's runs, newest first: at most `limit`, older than `before`.
    pub async fn runs(&self, session: &str, limit: usize, before: Option<String>) -> Result<Vec<RunRecord>, StoreError> {
        self.runs_page(session, limit, RunsFrom::Before(before)).await
    }

    /// A session's runs from a cursor: newest first older than `Before`,
    /// or oldest first newer than `After`; at most `limit`.
    pub async fn runs_page(&self, session: &str, limit: usize, from: RunsFrom) -> Result<Vec<RunRecord>, StoreError> {
        let session = session.to_string();
        let rows = match &self.db {
            Db::Sqlite(db) => {
                db.read(move |c| {
                    let (condition, after, before) = match from {
                        RunsFrom::Before(before) => ("(?3 IS NULL OR id < ?3) ORDER BY id DESC", None, before),
                        RunsFrom::After { after, before } => {
                            ("id > ?2 AND (?3 IS NULL OR id < ?3) ORDER BY id", Some(after), before)
                        }
                    };
                    let mut stmt = c.prepare_cached(&format!("{RUN_SELECT} WHERE session_id = ?1 AND {condition} LIMIT ?4"))?;
                    Ok(stmt.query_map(params![session, after, before, limit as i64], run_row)?.collect::<Result<Vec<_>, _>>()?)
                })
                .await?
            }
            Db::Postgres(pg) => {
                let c = pg.client().await?;
                let limit = limit as i64;
                let rows = match from {
                    RunsFrom::Before(before) => {
                        c.query(
                            &format!("{RUN_SELECT} WHERE session_id = $1 AND ($2::TEXT IS NULL OR id < $2) ORDER BY id DESC LIMIT $3"),
                            &[&session, &before, &limit],
                        )
                        .await?
                    }
                    RunsFrom::After { after, before } => {
                        c.query(
                            &format!(
                                "{RUN_SELECT} WHERE session_id = $1 AND id > $2 AND ($3::TEXT IS NULL OR id < $3) ORDER BY id LIMIT $4"
                            ),
                            &[&session, &after, &before, &limit],
                        )
                        .await?
                    }
                };
                rows.iter().map(run_pg_row).collect::<Result<Vec<_>, _>>()?
            }
        };
        rows.into_iter().map(finish_run).collect()
    }

    /// The run submitted with this idempotency key since `since`, with its request.
    pub async fn run_by_key(
        &self,
        session: &str,
        key: &str,
        since: DateTime<Utc>,
    ) -> Result<Option<(RunRecord, RunRequest)>, StoreError> {
        let (session, key) = (session.to_string(), key.to_string());
        let found = match &self.db {
            Db::Sqlite(db) => {
                db.read(move |c| {
                    Ok(c.prepare_cached(&format!(
                        "{RUN_AND_REQUEST_SELECT} WHERE session_id = ?1 AND idempotency_key = ?2 AND created_at >= ?3 ORDER BY id DESC LIMIT 1"
                    ))?
                    .query_row(params![session, key, ts(&since)], |r| Ok((run_row(r)?, r.get::<_, String>(8)?)))
                    .optional()?)
                })
                .await?
            }
            Db::Postgres(pg) => {
                let row = pg
                    .query_opt(
                        &format!(
                            "{RUN_AND_REQUEST_SELECT} WHERE session_id = $1 AND idempotency_key = $2 AND created_at >= $3 ORDER BY id DESC LIMIT 1"
                        ),
                        &[&session, &key, &ts(&since)],
                    )
                    .await?;
                row.map(|r| Ok::<_, StoreError>((run_pg_row(&r)?, r.get::<_, String>(8)))).transpose()?
            }
        };
        let Some((row, request)) = found else { return Ok(None) };
        Ok(Some((finish_run(row)?, serde_json::from_str(&request)?)))
    }

    /// Marks a run started.
    pub async fn start_run(&self, id: &str, at: DateTime<Utc>) -> Result<(), StoreError> {
        let (id, at) = (id.to_string(), ts(&at));
        match &self.db {
            Db::Sqlite(db) => {
                db.write(move |c| {
                    c.prepare_cached("UPDATE runs SET status = 'running', started_at = ?2 WHERE id = ?1")?.execute(params![id, at])?;
                    Ok(())
                })
                .await
            }
            Db::Postgres(pg) => {
                let (host, lease) = self.lease();
                pg.execute(
                    &format!(
                        "UPDATE runs SET status = 'running', started_at = $2, host_id = $3,
                                lease_until = CASE WHEN $3::TEXT IS NULL THEN NULL ELSE {} + $4 END
                         WHERE id = $1",
                        super::hosts::PG_NOW_MS
                    ),
                    &[&id, &at, &host, &lease],
                )
                .await?;
                Ok(())
            }
        }
    }

    /// Records how a run ended; a run already marked `interrupted` (its
    /// host's lease ran out and another host took it over) stays so.
    pub async fn end_run(&self, id: &str, status: RunStatus, at: DateTime<Utc>, result: RunResult) -> Result<(), StoreError> {
        let (id, at, result) = (id.to_string(), ts(&at), serde_json::to_string(&result)?);
        match &self.db {
            Db::Sqlite(db) => {
                db.write(move |c| {
                    c.prepare_cached("UPDATE runs SET status = ?2, ended_at = ?3, result = ?4 WHERE id = ?1 AND status <> 'interrupted'")?
                        .execute(params![id, status.as_str(), at, result])?;
                    Ok(())
                })
                .await
            }
            Db::Postgres(pg) => {
                pg.execute("UPDATE runs SET status = $2, ended_at = $3, result = $4 WHERE id = $1 AND status <> 'interrupted'", &[&id, &status.as_str(), &at, &result])
                    .await?;
                Ok(())
            }
        }
    }

    /// Runs waiting to start, oldest first.
    pub async fn queued_runs(&self) -> Result<Vec<RunRecord>, StoreError> {
        let query = format!("{RUN_SELECT} WHERE status = 'queued' ORDER BY id");
        let rows = match &self.db {
            Db::Sqlite(db) => {
                db.read(move |c| {
                    let mut stmt = c.prepare_cached(&query)?;
                    Ok(stmt.query_map([], run_row)?.collect::<Result<Vec<_>, _>>()?)
                })
                .await?
            }
            Db::Postgres(pg) => pg.query(&query, &[]).await?.iter().map(run_pg_row).collect::<Result<Vec<_>, _>>()?,
        };
        rows.into_iter().map(finish_run).collect()
    }

    /// Appends events, in order, in one transaction.
    pub async fn insert_events(&self, events: Vec<(String, StoredEvent)>) -> Result<(), StoreError> {
        match &self.db {
            Db::Sqlite(db) => {
                db.write(move |c| {
                    let mut stmt = c.prepare_cached(EVENT_INSERT_SQLITE)?;
                    for (session, e) in &events {
                        stmt.execute(params![session, e.seq as i64, e.run_id, e.name, e.data])?;
                    }
                    Ok(())
                })
                .await
            }
            Db::Postgres(pg) => {
                let mut c = pg.client().await?;
                let tx = c.transaction().await?;
                let stmt = tx.prepare_cached(EVENT_INSERT_PG).await?;
                for (session, e) in &events {
                    tx.execute(&stmt, &[session, &(e.seq as i64), &e.run_id, &e.name, &e.data]).await?;
                }
                // Hosts whose clients follow these sessions read them now
                // (delivered at commit, so they find the rows): `HOST SESSION`.
                let host = self.lease().0.unwrap_or_else(|| "-".into());
                let mut notes: Vec<String> = events.iter().map(|(session, _)| format!("{host} {session}")).collect();
                notes.dedup();
                tx.execute("SELECT pg_notify($1, note) FROM unnest($2::TEXT[]) AS note", &[&super::hosts::EVENTS_CHANNEL, &notes])
                    .await?;
                tx.commit().await?;
                Ok(())
            }
        }
    }

    /// What a run reads before it asks the model: the session, its
    /// context and its last event's seq, in one read (on SQLite one trip
    /// to a reader; on PostgreSQL three queries side by side).
    pub async fn run_start(&self, session: &str) -> Result<(super::Session, Option<super::SessionContext>, u64), StoreError> {
        match &self.db {
            Db::Sqlite(db) => {
                let id = session.to_string();
                let (found, context, last) = db
                    .read(move |c| Ok((super::sqlite_session(c, &id)?, super::context::sqlite_context(c, &id)?, max_seq(c, &id)?)))
                    .await?;
                let session = found.ok_or(StoreError::NotFound { kind: "session", id: session.to_string() })?.finish()?;
                Ok((session, super::context::decode_context(context)?, last))
            }
            Db::Postgres(_) => {
                let (found, context, last) = tokio::join!(self.session(session), self.session_context(session), self.last_seq(session));
                Ok((found?, context?, last?))
            }
        }
    }

    /// The last seq the session has used (stored or pruned); 0 for none.
    pub async fn last_seq(&self, session: &str) -> Result<u64, StoreError> {
        let session = session.to_string();
        match &self.db {
            Db::Sqlite(db) => db.read(move |c| Ok(max_seq(c, &session)?)).await,
            Db::Postgres(pg) => pg_max_seq(&pg.client().await?, &session).await,
        }
    }

    /// The highest seq retention has removed from the session.
    pub async fn events_pruned(&self, session: &str) -> Result<u64, StoreError> {
        let session = session.to_string();
        match &self.db {
            Db::Sqlite(db) => {
                db.read(move |c| {
                    let pruned: Option<i64> =
                        c.query_row("SELECT events_pruned FROM sessions WHERE id = ?1", [&session], |r| r.get(0)).optional()?;
                    Ok(pruned.unwrap_or(0) as u64)
                })
                .await
            }
            Db::Postgres(pg) => {
                let row = pg.query_opt("SELECT events_pruned FROM sessions WHERE id = $1", &[&session]).await?;
                Ok(row.map_or(0, |r| pg::count(&r, 0)))
            }
        }
    }

    /// Stored events with `after < seq < before`, of one run or all, in order.
    pub async fn events(
        &self,
        session: &str,
        after: u64,
        before: Option<u64>,
        run: Option<String>,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let session = session.to_string();
        let (after, before) = (after as i64, before.map_or(i64::MAX, |b| b as i64));
        // One run's events, or the session's.
        let (column, owner) = match run {
            Some(run) => ("run_id", run),
            None => ("session_id", session),
        };
        match &self.db {
            Db::Sqlite(db) => {
                db.read(move |c| {
                    Ok(c.prepare_cached(&format!(
                        "SELECT seq, run_id, name, data FROM events WHERE {column} = ?1 AND seq > ?2 AND seq < ?3 ORDER BY seq"
                    ))?
                    .query_map(params![owner, after, before], event_row)?
                    .collect::<Result<Vec<_>, _>>()?)
                })
                .await
            }
            Db::Postgres(pg) => {
                let rows = pg.query(
                    &format!("SELECT seq, run_id, name, data FROM events WHERE {column} = $1 AND seq > $2 AND seq < $3 ORDER BY seq"),
                    &[&owner, &after, &before],
                )
                .await?;
                Ok(rows
                    .iter()
                    .map(|r| StoredEvent { seq: pg::count(r, 0), run_id: r.get(1), name: r.get(2), data: r.get(3) })
                    .collect())
            }
        }
    }

    /// After a crash or a stop: every run left `running` or `waiting`
    /// becomes `interrupted`, its session's history gets an error result
    /// for each unanswered tool use, and its events end with the `error`
    /// event `event(run_id)` gives. Returns the runs interrupted.
    ///
    /// On a database several hosts share, only the runs whose host is
    /// gone: their lease ran out, or (`at_start`) they are this host's own
    /// from before it restarted. Returns (run, session) pairs.
    pub async fn interrupt_unfinished_runs(
        &self,
        reason: &'static str,
        at_start: bool,
        event: impl Fn(&str) -> (String, String) + Send + 'static,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let result = RunResult {
            error: Some(super::RunFailure { error: reason.to_string(), code: "interrupted".into() }),
            ..Default::default()
        };
        let result = serde_json::to_string(&result)?;
        let repair = |history: &str| -> Result<Option<String>, StoreError> {
            let mut history: Vec<HistoryMessage> = serde_json::from_str(history)?;
            Ok(if answer_unanswered(&mut history, reason) > 0 { Some(serde_json::to_string(&history)?) } else { None })
        };
        match &self.db {
            Db::Sqlite(db) => {
                db.write(move |c| {
                    let runs: Vec<(String, String)> = c
                        .prepare("SELECT id, session_id FROM runs WHERE status IN ('running', 'waiting') ORDER BY id")?
                        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
                        .collect::<Result<_, _>>()?;
                    let at = ts(&super::now());
                    super::permissions::interrupt_pending(c, &at)?;
                    for (run, session) in &runs {
                        c.execute(
                            "UPDATE runs SET status = 'interrupted', ended_at = ?2, result = ?3 WHERE id = ?1",
                            params![run, at, result],
                        )?;
                        let history: Option<String> =
                            c.query_row("SELECT history FROM sessions WHERE id = ?1", [session], |r| r.get(0)).optional()?;
                        if let Some(history) = history.as_deref().map(repair).transpose()?.flatten() {
                            c.execute("UPDATE sessions SET history = ?2, updated_at = ?3 WHERE id = ?1", params![session, history, at])?;
                        }
                        let (name, data) = event(run);
                        let seq = max_seq(c, session)? + 1;
                        c.execute(EVENT_INSERT_SQLITE, params![session, seq as i64, run, name, data])?;
                    }
                    Ok(runs)
                })
                .await
            }
            Db::Postgres(pg) => {
                let mut c = pg.client().await?;
                let tx = c.transaction().await?;
                // FOR UPDATE: a second host starting at the same moment
                // waits, then finds these runs interrupted already.
                // SKIP LOCKED: two hosts reaping at once split the runs
                // instead of waiting on each other.
                let host = self.lease().0.filter(|_| at_start);
                let runs: Vec<(String, String)> = tx
                    .query(
                        &format!(
                            "SELECT id, session_id FROM runs WHERE status IN ('running', 'waiting')
                               AND (lease_until IS NULL OR lease_until < {} OR host_id = $1)
                             ORDER BY id FOR UPDATE SKIP LOCKED",
                            super::hosts::PG_NOW_MS
                        ),
                        &[&host],
                    )
                    .await?
                    .iter()
                    .map(|r| (r.get(0), r.get(1)))
                    .collect();
                if runs.is_empty() {
                    return Ok(runs);
                }
                let at = ts(&super::now());
                let ids: Vec<&String> = runs.iter().map(|(run, _)| run).collect();
                super::permissions::pg_interrupt_pending(&tx, &at, &ids).await?;
                for (run, session) in &runs {
                    tx.execute("UPDATE runs SET status = 'interrupted', ended_at = $2, result = $3 WHERE id = $1", &[run, &at, &result])
                        .await?;
                    let history = tx.query_opt("SELECT history FROM sessions WHERE id = $1 FOR UPDATE", &[session]).await?;
                    if let Some(history) = history.map(|r| r.get::<_, String>(0)).as_deref().map(repair).transpose()?.flatten() {
                        tx.execute("UPDATE sessions SET history = $2, updated_at = $3 WHERE id = $1", &[session, &history, &at]).await?;
                    }
                    let (name, data) = event(run);
                    let seq = pg_max_seq(&tx, session).await? + 1;
                    tx.execute(EVENT_INSERT_PG, &[session, &(seq as i64), run, &name, &data]).await?;
                    // From no host: every host's followers read it.
                    tx.execute("SELECT pg_notify($1, $2)", &[&super::hosts::EVENTS_CHANNEL, &format!("- {session}")]).await?;
                }
                tx.commit().await?;
                Ok(runs)
            }
        }
    }

    /// Removes the events of runs that ended before `before`; remembers,
    /// per session, the highest seq removed. Returns how many were removed.
    pub async fn prune_events(&self, before: DateTime<Utc>) -> Result<usize, StoreError> {
        let before = ts(&before);
        match &self.db {
            Db::Sqlite(db) => {
                db.write(move |c| {
                    let ended = "SELECT id FROM runs WHERE ended_at IS NOT NULL AND ended_at < ?1";
                    let pruned: Vec<(String, i64)> = c
                        .prepare(&format!("SELECT session_id, MAX(seq) FROM events WHERE run_id IN ({ended}) GROUP BY session_id"))?
                        .query_map([&before], |r| Ok((r.get(0)?, r.get(1)?)))?
                        .collect::<Result<_, _>>()?;
                    for (session, seq) in &pruned {
                        c.execute("UPDATE sessions SET events_pruned = MAX(events_pruned, ?2) WHERE id = ?1", params![session, seq])?;
                    }
                    Ok(c.execute(&format!("DELETE FROM events WHERE run_id IN ({ended})"), [&before])?)
                })
                .await
            }
            Db::Postgres(pg) => {
                let mut c = pg.client().await?;
                let tx = c.transaction().await?;
                let ended = "SELECT id FROM runs WHERE ended_at IS NOT NULL AND ended_at < $1";
                tx.execute(
                    &format!(
                        "UPDATE sessions SET events_pruned = GREATEST(events_pruned, pruned.seq)
                         FROM (SELECT session_id, MAX(seq) AS seq FROM events WHERE run_id IN ({ended}) GROUP BY session_id) AS pruned
                         WHERE sessions.id = pruned.session_id"
                    ),
                    &[&before],
                )
                .await?;
                let removed = tx.execute(&format!("DELETE FROM events WHERE run_id IN ({ended})"), &[&before]).await?;
                tx.commit().await?;
                Ok(removed as usize)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn msg(role: HistoryRole, content: Vec<Block>) -> HistoryMessage {
        HistoryMessage { role, content }
    }

    #[test]
    fn unanswered_tool_uses_get_an_error_result() {
        let use_ = |id: &str| Block::ToolUse { id: id.into(), name: "bash".into(), input: json!({}) };
        let result = |id: &str| Block::ToolResult { tool_use_id: id.into(), content: "ok".into(), is_error: false };
        let mut history = vec![
            msg(HistoryRole::User, vec![Block::Text { text: "go".into() }]),
            msg(HistoryRole::Assistant, vec![use_("a"), use_("b")]),
            msg(HistoryRole::User, vec![result("a")]),
            msg(HistoryRole::Assistant, vec![use_("c")]),
        ];
        assert_eq!(answer_unanswered(&mut history, "restarted"), 2);
        assert_eq!(history.len(), 5);
        assert!(matches!(&history[2].content[0], Block::ToolResult { tool_use_id, is_error: true, .. } if tool_use_id == "b"));
        assert!(matches!(&history[4].content[0], Block::ToolResult { tool_use_id, content, .. } if tool_use_id == "c" && content == "restarted"));
        assert_eq!(answer_unanswered(&mut history, "again"), 0, "a valid history is left as it is");
        // An id used again in a later turn is answered there, not by the
        // earlier turn's result.
        history.push(msg(HistoryRole::Assistant, vec![use_("a")]));
        assert_eq!(answer_unanswered(&mut history, "restarted"), 1);
        assert!(matches!(&history[6].content[0], Block::ToolResult { tool_use_id, .. } if tool_use_id == "a"));
    }
}

/// Where a page of runs starts.
#[derive(Debug, Clone)]
pub enum RunsFrom {
    /// Newest first, older than this run (from the newest without one).
    Before(Option<String>),
    /// Oldest first, newer than `after` (and older than `before`).
    After { after: String, before: Option<String> },
}
