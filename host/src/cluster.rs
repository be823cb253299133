//! Several hosts on one PostgreSQL database (`--db postgres://…`).
//!
//! Each host runs the runs it started or claimed and holds a lease on
//! each, renewed every sixth of its length. Whatever another host must
//! learn is written to the database first; a notification then wakes it,
//! and a poll every second covers a notification that was lost:
//!
//! - events: the host storing a session's events notifies `hangar_events`
//!   (`HOST SESSION`); a host whose clients follow that session reads the
//!   new rows into its own feed (`Bus::ingest`);
//! - control (`hangar_control`): `cancel SESSION RUN` (the run's row asks
//!   for it too), `queued SESSION RUN` (a queued run was cancelled: the
//!   host running the session announces its end), `answer SESSION REQUEST`
//!   (a permission reply), `key KEY` and `tenant TENANT` (forget cached
//!   credentials and quotas), `plugins` (installed plugins changed);
//! - a run whose lease ran out (its host died) is interrupted by whichever
//!   host sees it first, its history repaired as a restart would, and the
//!   session's queued runs start on a live host.
//!
//! With SQLite there is one host and none of this runs.

use std::time::Duration;

use futures::StreamExt;
use tokio_postgres::{AsyncMessage, NoTls};

use crate::agent::{Busy, Claim};
use crate::api::AppState;
use crate::store::{CancelRequest, HostLease, StoreError};

/// What a run is told when its host stopped renewing its lease.
pub const LEASE_REASON: &str =
    "the host running this run stopped answering (its lease ran out); the call did not complete";

/// How often the database is looked at for what a notification may have missed.
const POLL: Duration = Duration::from_secs(1);
/// How often sessions whose queued runs nobody started are looked for.
const STRANDED_EVERY: u32 = 5;

/// The lease of this host: `[hosts] lease_s`, and an id stable across
/// its restarts (host name and port).
pub fn host_lease(port: u16, lease: Duration) -> HostLease {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|n| n.trim().to_string())
        .ok()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "host".into());
    HostLease { id: format!("{name}:{port}"), lease_ms: lease.as_millis() as i64 }
}

/// Starts the listener and the upkeep loop of this host.
pub fn start(state: AppState, url: String) {
    tokio::spawn(listen(state.clone(), url));
    tokio::spawn(upkeep(state));
}

/// One LISTEN connection (outside the pool: it stays open), made again
/// when it breaks; what it missed meanwhile the upkeep loop finds.
async fn listen(state: AppState, url: String) {
    loop {
        match listen_once(&state, &url).await {
            Ok(()) => tracing::warn!("the database closed the notification connection; connecting again"),
            Err(err) => tracing::warn!(err = %crate::error_chain(&err), "notification connection failed; connecting again in 1 s"),
        }
        if *state.stopping.borrow() {
            return;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn listen_once(state: &AppState, url: &str) -> Result<(), tokio_postgres::Error> {
    let (client, mut connection) = tokio_postgres::connect(url, NoTls).await?;
    let (tx, mut notes) = tokio::sync::mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(note)) => {
                    if tx.send(note).is_err() {
                        return Ok(());
                    }
                }
                Ok(_) => {}
                Err(err) => return Err(err),
            }
        }
        Ok(())
    });
    client
        .batch_execute(&format!("LISTEN {}; LISTEN {}", crate::store::EVENTS_CHANNEL, crate::store::CONTROL_CHANNEL))
        .await?;
    tracing::info!("listening for other hosts' events and controls");
    // What changed while no one listened is read again.
    state.store.forget_agents();
    while let Some(note) = notes.recv().await {
        let state = state.clone();
        // Each on its own task: a slow read does not hold up the others.
        tokio::spawn(async move {
            let result = if note.channel() == crate::store::EVENTS_CHANNEL {
                events_stored(&state, note.payload()).await
            } else {
                control(&state, note.payload()).await
            };
            if let Err(err) = result {
                tracing::warn!(%err, payload = note.payload(), "cannot act on a notification");
            }
        });
    }
    drop(client);
    match driver.await {
        Ok(result) => result,
        Err(_) => Ok(()),
    }
}

/// `HOST SESSION`: events of the session were stored by `HOST` (`-` for
/// events written outside a run: an interrupted run's end).
async fn events_stored(state: &AppState, payload: &str) -> Result<(), StoreError> {
    let Some((host, session)) = payload.split_once(' ') else { return Ok(()) };
    if state.store.host().is_some_and(|me| me.id == host) || state.runs.active(session).is_some() {
        return Ok(());
    }
    state.bus.ingest(session).await
}

async fn control(state: &AppState, payload: &str) -> Result<(), StoreError> {
    let mut words = payload.split(' ');
    match (words.next(), words.next(), words.next()) {
        (Some("cancel"), Some(session), Some(run)) => {
            state.runs.cancel(session, run);
        }
        (Some("queued"), Some(session), Some(run)) => {
            // Announced by the host running the session: it alone gives
            // out the session's seqs now.
            if state.runs.active(session).is_some() {
                crate::api::announce_cancelled(state, session, run).await?;
            }
        }
        (Some("answer"), Some(session), Some(request)) => {
            if state.approvals.is_waiting(request) {
                let answered = state.store.permission_request(session, request).await?;
                state.approvals.deliver(answered);
            }
        }
        (Some("key"), Some(key), None) => {
            if let Some(tenancy) = &state.tenancy {
                tenancy.forget_key(key);
            }
        }
        (Some("tenant"), Some(tenant), deleted) => {
            if let Some(tenancy) = &state.tenancy {
                tenancy.forget_tenant(tenant, deleted == Some("deleted"));
            }
            // A deleted tenant's agents went with it.
            state.store.forget_agents();
        }
        (Some(crate::store::PLUGINS_CHANGED), None, None) => crate::api::plugins_changed(state).await,
        (Some(crate::store::AGENTS_CHANGED), None, None) => state.store.forget_agents(),
        _ => tracing::debug!(payload, "unknown control notification"),
    }
    Ok(())
}

/// Tells the other hosts something (see the module's list); a failure is
/// logged, since the upkeep loop finds what matters in the database.
pub async fn tell(state: &AppState, payload: String) {
    if !state.store.is_shared() {
        return;
    }
    if let Err(err) = state.store.notify(&payload).await {
        tracing::warn!(%err, %payload, "cannot notify the other hosts");
    }
}

/// Every second: cancels asked of this host's runs, runs of dead hosts,
/// followed sessions another host wrote to; every sixth of the lease,
/// this host's leases; every few seconds, sessions whose queue stalled.
async fn upkeep(state: AppState) {
    let Some(lease) = state.store.host().map(|h| Duration::from_millis(h.lease_ms as u64)) else { return };
    let renew_every = (lease / 6).max(POLL);
    let mut renewed = tokio::time::Instant::now();
    // The last renewal that reached the database.
    let mut held = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ticks: u32 = 0;
    loop {
        tick.tick().await;
        if *state.stopping.borrow() {
            return;
        }
        if renewed.elapsed() >= renew_every {
            renewed = tokio::time::Instant::now();
            match state.store.renew_leases().await {
                Ok(_) => held = tokio::time::Instant::now(),
                Err(err) => tracing::error!(%err, "cannot renew this host's leases; its runs may be taken as dead"),
            }
            // Another host may have taken the runs over by now: this host
            // stops them rather than write over what that host recorded.
            if held.elapsed() >= lease {
                for (session, run) in state.runs.active_runs() {
                    tracing::error!(%run, "this host's lease on the run ran out; stopping it");
                    state.runs.cancel(&session, &run);
                }
            }
        }
        // The first look (at start) takes in queues a stop left behind.
        if let Err(err) = poll(&state, ticks.is_multiple_of(STRANDED_EVERY)).await {
            tracing::warn!(%err, "cannot look at the shared database");
        }
        ticks = ticks.wrapping_add(1);
    }
}

async fn poll(state: &AppState, stranded: bool) -> Result<(), StoreError> {
    for (session, run) in state.store.cancels_requested().await? {
        state.runs.cancel(&session, &run);
    }
    let reaped = state
        .store
        .interrupt_unfinished_runs(LEASE_REASON, false, crate::agent::interrupted_event(LEASE_REASON))
        .await?;
    if !reaped.is_empty() {
        tracing::warn!(runs = ?reaped, "runs of a host that stopped answering are marked `interrupted`");
    }
    let mut sessions: Vec<String> = reaped.into_iter().map(|(_, session)| session).collect();
    if stranded {
        sessions.extend(state.store.stranded_sessions().await?);
    }
    sessions.sort();
    sessions.dedup();
    for session in sessions {
        state.bus.ingest(&session).await?;
        if let Some(claim) = claim_next(state, &session).await {
            crate::api::launch_claimed(state, &session, claim);
        }
    }
    // Followed sessions another host wrote to, whose notification did not come.
    let followed: Vec<(String, u64)> =
        state.bus.followed().await.into_iter().filter(|(session, _)| state.runs.active(session).is_none()).collect();
    if !followed.is_empty() {
        let expected: std::collections::HashMap<String, u64> = followed.iter().cloned().collect();
        for (session, last) in state.store.last_seqs(followed.into_iter().map(|(s, _)| s).collect()).await? {
            if expected.get(&session).is_some_and(|next| last >= *next) {
                state.bus.ingest(&session).await?;
            }
        }
    }
    Ok(())
}

/// The session's next queued run, claimed in the database for this host
/// and made active here; `None` when there is none (or another host was
/// quicker).
pub async fn claim_next(state: &AppState, session: &str) -> Option<Claim> {
    let run = match state.store.claim_next(session).await {
        Ok(run) => run?,
        Err(err) => {
            tracing::error!(%err, session, "cannot start the session's next queued run; another host (or this one) will retry");
            return None;
        }
    };
    // Behind a compaction of this host, it waits here for it.
    state.runs.claim_or(session, &run, Busy::Enqueue).ok().flatten()
}

/// Cancels a run that is not running on this host: the database asks its
/// host, or ends it when it is queued.
pub async fn cancel_elsewhere(state: &AppState, session: &str, run: &str) -> Result<CancelRequest, StoreError> {
    let found = state.store.request_cancel(session, run).await?;
    match &found {
        CancelRequest::Active { .. } => tell(state, format!("cancel {session} {run}")).await,
        CancelRequest::Queued => {
            if state.runs.active(session).is_some() {
                crate::api::announce_cancelled(state, session, run).await?;
            } else {
                tell(state, format!("queued {session} {run}")).await;
            }
        }
        CancelRequest::Ended => {}
    }
    Ok(found)
}
