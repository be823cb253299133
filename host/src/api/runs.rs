//! Runs and events: list and read runs, cancel them, and follow a
//! session's (or one run's) events from any point, stored ones first, then
//! live.

use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use utoipa::IntoParams;

use super::messages::{CancelOnDrop, SseStream, sse, sse_response};
use super::page::{self, Page};
use super::{ApiError, ApiResult, AppState, QueryParams};
use crate::agent::{Cancelled, RunEvent, SubscribeError};
use crate::store::{RunRecord, RunResult, RunStatus, RunsFrom, StopReason, StoreError, now};

/// How long a cancel waits for the run to stop before answering it as it stands.
const CANCEL_WAIT: Duration = Duration::from_secs(10);

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/sessions/{id}/runs", get(list))
        .route("/sessions/{id}/runs/{run_id}", get(show))
        .route("/sessions/{id}/runs/{run_id}/cancel", post(cancel))
        .route("/sessions/{id}/runs/{run_id}/events", get(run_events))
        .route("/sessions/{id}/abort", post(abort))
        .route("/sessions/{id}/events", get(session_events))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RunsQuery {
    /// At most this many runs (default 100, at most 1000).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
    /// Newest first, only runs older than this run id.
    before: Option<String>,
    /// Oldest first, only runs newer than this run id (and, with `before`,
    /// older than that one).
    after: Option<String>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Replay events with a seq above this one (the `Last-Event-ID` header
    /// says the same and wins).
    #[param(minimum = 0)]
    after: Option<i64>,
}

pub(super) async fn session_exists(state: &AppState, id: &str) -> ApiResult<()> {
    if state.store.session_exists(id).await? {
        Ok(())
    } else {
        Err(StoreError::NotFound { kind: "session", id: id.to_string() }.into())
    }
}

#[utoipa::path(operation_id = "list_runs", get, path = "/sessions/{id}/runs", tag = "runs", params(("id" = String, Path), RunsQuery),
    responses((status = 200, body = Vec<RunRecord>,
            description = "newest first (oldest first with `after`); `Link: <…>; rel=\"next\"` when there is more",
            headers(("Link" = String, description = "the next page, when there is one"))),
        (status = 404, body = super::ErrorBody), (status = 422, body = super::ErrorBody)))]
pub(super) async fn list(
    State(state): State<AppState>,
    Path(id): Path<String>,
    QueryParams(q): QueryParams<RunsQuery>,
) -> ApiResult<Page<RunRecord>> {
    let limit = page::limit(q.limit)?;
    let (before, after) = (q.before, q.after);
    let from = match after.clone() {
        None => RunsFrom::Before(before.clone()),
        Some(after) => RunsFrom::After { after, before: before.clone() },
    };
    session_exists(&state, &id).await?;
    let rows = state.store.runs_page(&id, limit + 1, from).await?;
    let path = format!("/sessions/{id}/runs");
    let limit_text = limit.to_string();
    Ok(Page::from_extra(rows, limit, |last: &RunRecord| match &after {
        // Oldest first: on after the last one, still below `before`.
        Some(_) => {
            let mut params = vec![("limit", limit_text.as_str()), ("after", last.id.as_str())];
            if let Some(before) = &before {
                params.push(("before", before.as_str()));
            }
            page::link(&path, &params)
        }
        None => page::link(&path, &[("limit", &limit_text), ("before", &last.id)]),
    }))
}

#[utoipa::path(operation_id = "get_run", get, path = "/sessions/{id}/runs/{run_id}", tag = "runs", params(("id" = String, Path), ("run_id" = String, Path)),
    responses((status = 200, body = RunRecord), (status = 404, body = super::ErrorBody)))]
pub(super) async fn show(State(state): State<AppState>, Path((id, run_id)): Path<(String, String)>) -> ApiResult<Json<RunRecord>> {
    Ok(Json(state.store.run(&id, &run_id).await?))
}

/// Tells a run to stop, without waiting: the active run stops at its next
/// await point (its tools are killed); a queued run is ended at once.
pub(super) fn cancel_now(state: &AppState, session: &str, run: &str) -> Cancelled {
    let found = state.runs.cancel(session, run);
    // Not running here: on a shared database another host may run it.
    if found == Cancelled::NotRunning && state.store.is_shared() {
        let (state, session, run) = (state.clone(), session.to_string(), run.to_string());
        tokio::spawn(async move {
            if let Err(err) = crate::cluster::cancel_elsewhere(&state, &session, &run).await {
                tracing::error!(%run, %err, "cannot pass a cancel on to the host running the run");
            }
        });
        return found;
    }
    if found == Cancelled::Queued {
        let (state, session, run) = (state.clone(), session.to_string(), run.to_string());
        tokio::spawn(async move {
            if let Err(err) = end_queued(&state, &session, &run).await {
                tracing::error!(%run, %err, "cannot record the cancel of a queued run");
            }
        });
    }
    found
}

/// A queued run cancelled before it started: stored as cancelled, and its
/// events end with `done`, so followers of the run see it end.
async fn end_queued(state: &AppState, session: &str, run: &str) -> Result<(), StoreError> {
    let result = RunResult { stop_reason: Some(StopReason::Cancelled), steps: Some(0), ..Default::default() };
    state.store.end_run(run, RunStatus::Cancelled, now(), result).await?;
    announce_cancelled(state, session, run).await
}

/// The `done` of a queued run cancelled before it started, for its followers.
pub(crate) async fn announce_cancelled(state: &AppState, session: &str, run: &str) -> Result<(), StoreError> {
    let feed = state.bus.fresh_feed(session).await?;
    let (name, data) =
        RunEvent::Done { run_id: run.to_string(), usage: Default::default(), steps: 0, stop_reason: StopReason::Cancelled }.wire();
    state.bus.publish(&feed, run, name, data);
    Ok(())
}

/// Waits until the run has ended (its `done` or `error` event), and
/// returns it as stored.
pub(super) async fn wait_for_end(state: &AppState, session: &str, run: &str) -> ApiResult<RunRecord> {
    let record = state.store.run(session, run).await?;
    if record.status.is_final() {
        return Ok(record);
    }
    let mut events = state.bus.subscribe(session, 0, Some(run)).await.map_err(subscribe_error)?;
    loop {
        let event = events.next().await.map_err(subscribe_error)?;
        if event.name == "done" || event.name == "error" {
            return Ok(state.store.run(session, run).await?);
        }
    }
}

fn subscribe_error(err: SubscribeError) -> ApiError {
    match err {
        SubscribeError::Store(e) => e.into(),
        resync @ SubscribeError::ResyncRequired { .. } => ApiError::Gone(resync.to_string()),
    }
}

/// Cancels a run and answers it as it stands once it has stopped (or
/// after a short wait); an ended run is answered unchanged.
async fn cancel_and_answer(state: &AppState, session: &str, run: &str) -> ApiResult<RunRecord> {
    let record = state.store.run(session, run).await?;
    if record.status.is_final() {
        return Ok(record);
    }
    cancel_now(state, session, run);
    match tokio::time::timeout(CANCEL_WAIT, wait_for_end(state, session, run)).await {
        Ok(ended) => ended,
        Err(_) => Ok(state.store.run(session, run).await?),
    }
}

#[utoipa::path(operation_id = "cancel_run", post, path = "/sessions/{id}/runs/{run_id}/cancel", tag = "runs", params(("id" = String, Path), ("run_id" = String, Path)),
    responses((status = 200, body = RunRecord, description = "the run as it stands; an ended run unchanged"), (status = 404, body = super::ErrorBody)))]
pub(super) async fn cancel(State(state): State<AppState>, Path((id, run_id)): Path<(String, String)>) -> ApiResult<Json<RunRecord>> {
    Ok(Json(cancel_and_answer(&state, &id, &run_id).await?))
}

#[utoipa::path(operation_id = "abort_session", post, path = "/sessions/{id}/abort", tag = "runs", params(("id" = String, Path)),
    responses((status = 200, body = RunRecord, description = "the session's active run, cancelled; with none active, its latest run unchanged"),
        (status = 404, body = super::ErrorBody), (status = 409, body = super::ErrorBody, description = "the session has no run")))]
pub(super) async fn abort(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<RunRecord>> {
    session_exists(&state, &id).await?;
    // On a shared database the active run may be another host's.
    let active = match state.runs.active(&id) {
        Some(run) => Some(run),
        None => state.store.active_run(&id).await?.map(|(run, _)| run),
    };
    let run = match active {
        Some(run) => run,
        None => state
            .store
            .runs(&id, 1, None)
            .await?
            .pop()
            .map(|r| r.id)
            // The session exists; there is nothing in it to abort.
            .ok_or_else(|| ApiError::Conflict(format!("session `{id}` has no run to abort")))?,
    };
    Ok(Json(cancel_and_answer(&state, &id, &run).await?))
}

/// The cursor of an events request: `Last-Event-ID`, else `?after=`.
fn cursor(headers: &HeaderMap, query: &EventsQuery) -> ApiResult<Option<u64>> {
    // Seqs are SQLite integers: 0 to 2^63 - 1.
    let seq = |n: i64| u64::try_from(n).ok();
    // `after` is checked even when the header wins over it.
    let after = match query.after {
        Some(after) => Some(seq(after).ok_or_else(|| ApiError::Invalid("`after` must be 0 or more".into()))?),
        None => None,
    };
    match headers.get("last-event-id") {
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse().ok())
            .and_then(seq)
            .map(Some)
            .ok_or_else(|| ApiError::Invalid("Last-Event-ID must be the integer id of an event".into())),
        None => Ok(after),
    }
}

/// A run's events after `after` as SSE, ending with its `done` or `error`.
pub(super) async fn run_stream(
    state: AppState,
    session: String,
    run: String,
    after: u64,
    mut guard: Option<CancelOnDrop>,
) -> ApiResult<SseStream> {
    let subscription = state.bus.subscribe(&session, after, Some(&run)).await;
    // A run still its session's active one after subscribing has not sent
    // `done`/`error` yet (its end is announced after it is let go): the
    // live feed carries the rest, with no read of the record before the
    // first token.
    let live = subscription.is_ok() && state.runs.active(&session).as_deref() == Some(run.as_str());
    // A run that has ended sends nothing more: what is stored after the
    // cursor is all there is (read after subscribing, so a run that ends
    // in between is seen either way).
    let record = if live { None } else { Some(state.store.run(&session, &run).await?) };
    if let Some(record) = record
        && subscription.is_ok()
        && record.status.is_final()
    {
        let kept_since = chrono::Duration::from_std(state.settings.event_retention).map(|keep| now() - keep);
        if let (Some(ended), Ok(kept_since)) = (record.ended_at, kept_since)
            && ended < kept_since
        {
            let gone = SubscribeError::ResyncRequired { pruned: 0 };
            return Ok(Box::pin(async_stream(Err(gone), None, |_| true)));
        }
        state.bus.flush().await;
        let stored = state.store.events(&session, after, None, Some(run.clone())).await?;
        // On a shared database the host that ran it may not have stored
        // its last events yet: then the subscription brings them.
        let complete = !state.store.is_shared() || stored.last().is_some_and(|e| e.name == "done" || e.name == "error");
        if complete {
            let events: Vec<_> = stored.iter().map(|e| Ok(sse(e))).collect();
            return Ok(Box::pin(futures::stream::iter(events)));
        }
    }
    Ok(Box::pin(async_stream(subscription, None, move |event| {
        let last = event.name == "done" || event.name == "error";
        if last && let Some(guard) = guard.as_mut() {
            guard.disarm();
        }
        last
    })))
}

/// SSE from a subscription: a `resync_required` event (then the end) when
/// the cursor is too old; otherwise every event, until `is_last` says so.
fn async_stream<F>(
    subscription: Result<crate::agent::Subscription, SubscribeError>,
    stopping: Option<tokio::sync::watch::Receiver<bool>>,
    is_last: F,
) -> impl futures::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>> + Send
where
    F: FnMut(&crate::agent::Event) -> bool + Send + 'static,
{
    let resync = |err: SubscribeError| {
        let (name, data) = RunEvent::ResyncRequired { error: err.to_string() }.wire();
        Ok(axum::response::sse::Event::default().event(name).data(data))
    };
    let start = match subscription {
        Ok(s) => Following::Live(s, is_last),
        Err(err) => Following::Fail(err),
    };
    // A follower's stream ends when the server starts to stop, so that it
    // does not hold the shutdown up; the client resumes from its last id.
    // A run's stream ends with its run, which shutdown ends.
    let stop = async move {
        match stopping {
            Some(mut stopping) => {
                let _ = stopping.wait_for(|s| *s).await;
            }
            None => std::future::pending().await,
        }
    };
    let events = futures::stream::unfold(start, move |following| async move {
        match following {
            Following::Done => None,
            Following::Fail(err) => Some((resync(err), Following::Done)),
            Following::Live(mut subscription, mut is_last) => match subscription.next().await {
                Ok(event) => {
                    let next = if is_last(&event) { Following::Done } else { Following::Live(subscription, is_last) };
                    Some((Ok(sse(&event)), next))
                }
                Err(err) => Some((resync(err), Following::Done)),
            },
        }
    });
    futures::StreamExt::take_until(events, Box::pin(stop))
}

enum Following<F> {
    Live(crate::agent::Subscription, F),
    Fail(SubscribeError),
    Done,
}

#[utoipa::path(get, path = "/sessions/{id}/runs/{run_id}/events", tag = "runs",
    params(("id" = String, Path), ("run_id" = String, Path), EventsQuery,
        ("Last-Event-ID" = Option<i64>, Header, minimum = 0, description = "Replay events after this id")),
    responses((status = 200, content_type = "text/event-stream", body = RunEvent,
        description = "The run's events after the cursor, stored then live; ends after `done` or `error`"),
        (status = 404, body = super::ErrorBody), (status = 422, body = super::ErrorBody)))]
pub(super) async fn run_events(
    State(state): State<AppState>,
    Path((id, run_id)): Path<(String, String)>,
    QueryParams(q): QueryParams<EventsQuery>,
    headers: HeaderMap,
) -> ApiResult<impl IntoResponse> {
    let after = cursor(&headers, &q)?.unwrap_or(0);
    state.store.run(&id, &run_id).await?;
    let stream = run_stream(state, id, run_id, after, None).await?;
    Ok(sse_response(stream))
}

#[utoipa::path(get, path = "/sessions/{id}/events", tag = "runs",
    params(("id" = String, Path), EventsQuery, ("Last-Event-ID" = Option<i64>, Header, minimum = 0, description = "Replay events after this id")),
    responses((status = 200, content_type = "text/event-stream", body = RunEvent,
        description = "The session's events after the cursor (without one: every event kept), then live events of every run, \
                       with a comment every 15 s; `resync_required` when the cursor is older than what is kept"),
        (status = 404, body = super::ErrorBody), (status = 422, body = super::ErrorBody)))]
pub(super) async fn session_events(
    State(state): State<AppState>,
    Path(id): Path<String>,
    QueryParams(q): QueryParams<EventsQuery>,
    headers: HeaderMap,
) -> ApiResult<impl IntoResponse> {
    session_exists(&state, &id).await?;
    let after = match cursor(&headers, &q)? {
        Some(after) => after,
        // No cursor: everything that is kept.
        None => state.store.events_pruned(&id).await?,
    };
    let subscription = state.bus.subscribe(&id, after, None).await;
    let stream: SseStream = Box::pin(async_stream(subscription, Some(state.stopping.clone()), |_| false));
    Ok(sse_response(stream))
}
