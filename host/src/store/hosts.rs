//! Several hosts on one PostgreSQL database: which host runs each run and
//! until when its lease holds, cancels written to the run's row for the
//! host that runs it, the next queued run claimed by whichever host frees
//! the session, and notifications that wake the other hosts.
//!
//! The database is the truth; a notification only saves a poll. Lease
//! times are the database's clock (milliseconds since the epoch), so the
//! hosts' clocks need not agree.
//!
//! With SQLite there is one host: these are never called (the reads answer
//! as if nothing were shared).

use std::sync::Arc;

use super::{Db, RunStatus, Store, StoreError, pg, ts};

/// The database's clock, in milliseconds since the epoch.
pub(super) const PG_NOW_MS: &str = "(extract(epoch from clock_timestamp()) * 1000)::BIGINT";

/// The channel every host listens on; see `crate::cluster` for the payloads.
pub const CONTROL_CHANNEL: &str = "hangar_control";
/// The control payload that says an agent was made, changed or deleted.
pub const AGENTS_CHANGED: &str = "agents";
/// The channel that names a session whose events were stored.
pub const EVENTS_CHANNEL: &str = "hangar_events";

/// This host, on a database several hosts share.
#[derive(Debug, Clone)]
pub struct HostLease {
    /// Stable across restarts of the same host (its name and port), so a
    /// host that restarts interrupts its own runs at once instead of
    /// waiting out their leases.
    pub id: String,
    /// How long a run stays this host's without a renewal.
    pub lease_ms: i64,
}

/// What a cancel sent to this host found in the database.
#[derive(Debug, PartialEq, Eq)]
pub enum CancelRequest {
    /// The run is active on host `host`; its row now asks it to stop.
    Active { host: Option<String> },
    /// The run was queued: it is cancelled now, without having started.
    Queued,
    /// The run has ended (or does not exist).
    Ended,
}

impl Store {
    /// The store of host `lease.id`: runs it starts are leased to it.
    pub fn with_host(mut self, lease: HostLease) -> Store {
        self.host = Some(Arc::new(lease));
        self
    }

    /// This host, when the database is shared.
    pub fn host(&self) -> Option<&HostLease> {
        self.host.as_deref()
    }

    /// Whether several hosts may share this database (PostgreSQL). Then
    /// plugins installed through the API live in it too, not in files.
    pub fn is_shared(&self) -> bool {
        matches!(self.db, Db::Postgres(_))
    }

    /// The host id and lease a run started here gets (none with SQLite).
    pub(super) fn lease(&self) -> (Option<String>, i64) {
        match &self.host {
            Some(host) => (Some(host.id.clone()), host.lease_ms),
            None => (None, 0),
        }
    }

    /// The session's active run and the host running it, on any host.
    pub async fn active_run(&self, session: &str) -> Result<Option<(String, Option<String>)>, StoreError> {
        match &self.db {
            Db::Sqlite(_) => Ok(None),
            Db::Postgres(pg) => Ok(pg
                .query_opt("SELECT id, host_id FROM runs WHERE session_id = $1 AND status IN ('running', 'waiting')", &[&session])
                .await?
                .map(|r| (r.get(0), r.get(1)))),
        }
    }

    /// Extends the lease of every run this host is running; how many.
    pub async fn renew_leases(&self) -> Result<u64, StoreError> {
        let (Db::Postgres(pg), (Some(host), lease)) = (&self.db, self.lease()) else { return Ok(0) };
        Ok(pg
            .execute(
                &format!(
                    "UPDATE runs SET lease_until = {PG_NOW_MS} + $2 WHERE host_id = $1 AND status IN ('running', 'waiting')"
                ),
                &[&host, &lease],
            )
            .await? as u64)
    }

    /// Runs of this host that a cancel sent to another host asks to stop:
    /// (session, run).
    pub async fn cancels_requested(&self) -> Result<Vec<(String, String)>, StoreError> {
        let (Db::Postgres(pg), (Some(host), _)) = (&self.db, self.lease()) else { return Ok(Vec::new()) };
        Ok(pg
            .query(
                "SELECT session_id, id FROM runs WHERE host_id = $1 AND cancel_requested <> 0 AND status IN ('running', 'waiting')",
                &[&host],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect())
    }

    /// Asks whichever host runs `run` to stop it (written to its row), or
    /// cancels it outright while it is queued.
    pub async fn request_cancel(&self, session: &str, run: &str) -> Result<CancelRequest, StoreError> {
        let Db::Postgres(pg) = &self.db else { return Ok(CancelRequest::Ended) };
        let active = pg
            .query_opt(
                "UPDATE runs SET cancel_requested = 1 WHERE id = $1 AND session_id = $2 AND status IN ('running', 'waiting') RETURNING host_id",
                &[&run, &session],
            )
            .await?;
        if let Some(row) = active {
            return Ok(CancelRequest::Active { host: row.get(0) });
        }
        let result = serde_json::to_string(&super::RunResult {
            stop_reason: Some(crate::agent::StopReason::Cancelled),
            steps: Some(0),
            ..Default::default()
        })?;
        let cancelled = pg
            .execute(
                "UPDATE runs SET status = $3, ended_at = $4, result = $5 WHERE id = $1 AND session_id = $2 AND status = 'queued'",
                &[&run, &session, &RunStatus::Cancelled.as_str(), &ts(&super::now()), &result],
            )
            .await?;
        Ok(if cancelled > 0 { CancelRequest::Queued } else { CancelRequest::Ended })
    }

    /// Starts the session's next queued run on this host, if the session
    /// has no active run: `interrupt`'s runs first, then in the order they
    /// were submitted. Two hosts trying at once: the unique index of active
    /// runs lets one win; the other gets `None`.
    pub async fn claim_next(&self, session: &str) -> Result<Option<String>, StoreError> {
        let Db::Postgres(pg) = &self.db else { return Ok(None) };
        let (host, lease) = self.lease();
        let claimed = pg
            .query_opt(
                &format!(
                    "UPDATE runs SET status = 'running', started_at = $2, host_id = $3, lease_until = {PG_NOW_MS} + $4
                     WHERE id = (SELECT id FROM runs WHERE session_id = $1 AND status = 'queued' ORDER BY queue_first DESC, id LIMIT 1)
                       AND status = 'queued'
                       AND NOT EXISTS (SELECT 1 FROM runs WHERE session_id = $1 AND status IN ('running', 'waiting'))
                     RETURNING id"
                ),
                &[&session, &ts(&super::now()), &host, &lease],
            )
            .await;
        match claimed {
            Ok(row) => Ok(row.map(|r| r.get(0))),
            Err(StoreError::Postgres(err)) if pg::unique_violation(&err) => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// Puts a queued run before those queued earlier (`interrupt`).
    pub async fn queue_first(&self, run: &str) -> Result<(), StoreError> {
        let Db::Postgres(pg) = &self.db else { return Ok(()) };
        pg.execute("UPDATE runs SET queue_first = 1 WHERE id = $1", &[&run]).await?;
        Ok(())
    }

    /// Sessions with queued runs and no active run: a host that freed one
    /// died before it started the next.
    pub async fn stranded_sessions(&self) -> Result<Vec<String>, StoreError> {
        let Db::Postgres(pg) = &self.db else { return Ok(Vec::new()) };
        Ok(pg
            .query(
                "SELECT DISTINCT q.session_id FROM runs q WHERE q.status = 'queued'
                   AND NOT EXISTS (SELECT 1 FROM runs a WHERE a.session_id = q.session_id AND a.status IN ('running', 'waiting'))",
                &[],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    /// The last stored seq of each of `sessions` (those with events).
    pub async fn last_seqs(&self, sessions: Vec<String>) -> Result<Vec<(String, u64)>, StoreError> {
        let Db::Postgres(pg) = &self.db else { return Ok(Vec::new()) };
        Ok(pg
            .query("SELECT session_id, MAX(seq) FROM events WHERE session_id = ANY($1) GROUP BY session_id", &[&sessions])
            .await?
            .iter()
            .map(|r| (r.get(0), pg::count(r, 1)))
            .collect())
    }

    /// Tells every host (this one too) `payload` on the control channel.
    pub async fn notify(&self, payload: &str) -> Result<(), StoreError> {
        let Db::Postgres(pg) = &self.db else { return Ok(()) };
        pg.execute("SELECT pg_notify($1, $2)", &[&CONTROL_CHANNEL, &payload]).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{DEFAULT_TENANT, RunLimit, RunRecord, RunRequest, Session, now, scratch};

    fn request() -> RunRequest {
        RunRequest { agent_id: "a".into(), message: "hi".into(), body: serde_json::json!({"message": "hi"}) }
    }

    async fn insert(store: &Store, id: &str, status: RunStatus) -> Result<RunRecord, StoreError> {
        let mut run = RunRecord::queued(id.into(), "s".into(), "a".into(), now());
        run.status = status;
        let limit = RunLimit { tenant: DEFAULT_TENANT.into(), max_concurrent_runs: None };
        store.insert_run(run, request(), None, now(), limit).await
    }

    /// Two hosts on one database: the unique index lets one run be active
    /// per session; a queued run starts on the host that claims it, an
    /// `interrupt` one first; a cancel is written for the host running the
    /// run; a run whose lease ran out is interrupted by the other host,
    /// which then starts the session's next queued run.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn leases_claims_and_cancels_between_two_hosts() {
        let Some(db) = scratch::ScratchDb::create().await else { return };
        let a = Store::open_postgres(&db.url).await.unwrap().with_host(HostLease { id: "a:1".into(), lease_ms: 300 });
        let b = Store::open_postgres(&db.url).await.unwrap().with_host(HostLease { id: "b:1".into(), lease_ms: 60_000 });
        let t = now();
        a.insert_session(Session { id: "s".into(), work_dir: None, history: Vec::new(), created_at: t, updated_at: t, tenant_id: DEFAULT_TENANT.into() })
            .await
            .unwrap();

        insert(&a, "r1", RunStatus::Running).await.unwrap();
        assert!(matches!(insert(&b, "r2", RunStatus::Running).await, Err(StoreError::SessionBusy { .. })));
        assert_eq!(b.active_run("s").await.unwrap(), Some(("r1".into(), Some("a:1".into()))));
        insert(&b, "r2", RunStatus::Queued).await.unwrap();
        insert(&b, "r3", RunStatus::Queued).await.unwrap();
        b.queue_first("r3").await.unwrap();
        assert_eq!(b.claim_next("s").await.unwrap(), None, "r1 is active");
        assert!(b.stranded_sessions().await.unwrap().is_empty());

        // A cancel sent to B is read by A; a queued run is cancelled outright.
        assert_eq!(b.request_cancel("s", "r1").await.unwrap(), CancelRequest::Active { host: Some("a:1".into()) });
        assert_eq!(a.cancels_requested().await.unwrap(), [("s".to_string(), "r1".to_string())]);
        assert!(b.cancels_requested().await.unwrap().is_empty());
        insert(&b, "r4", RunStatus::Queued).await.unwrap();
        assert_eq!(b.request_cancel("s", "r4").await.unwrap(), CancelRequest::Queued);
        assert_eq!(b.run("s", "r4").await.unwrap().status, RunStatus::Cancelled);

        // A renews its lease, then stops renewing: B takes the run over.
        assert_eq!(a.renew_leases().await.unwrap(), 1);
        assert!(b.interrupt_unfinished_runs("gone", false, |_| ("error".into(), "{}".into())).await.unwrap().is_empty());
        tokio::time::sleep(std::time::Duration::from_millis(400)).await;
        let reaped = b.interrupt_unfinished_runs("gone", false, |_| ("error".into(), "{}".into())).await.unwrap();
        assert_eq!(reaped, [("r1".to_string(), "s".to_string())]);
        assert_eq!(b.run("s", "r1").await.unwrap().status, RunStatus::Interrupted);
        assert_eq!(b.stranded_sessions().await.unwrap(), ["s"]);
        // Both hosts try at once: one starts the `interrupt` run, r3.
        let (x, y) = tokio::join!(a.claim_next("s"), b.claim_next("s"));
        let claimed: Vec<String> = [x.unwrap(), y.unwrap()].into_iter().flatten().collect();
        assert_eq!(claimed, ["r3"]);
        assert_eq!(b.run("s", "r3").await.unwrap().status, RunStatus::Running);
        assert_eq!(b.run("s", "r2").await.unwrap().status, RunStatus::Queued);
    }
}
