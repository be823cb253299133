//! Messages: each starts a run of the agent loop, a stored resource of the
//! server that outlives the request. The blocking endpoint waits for the
//! run (or, with `background`, answers at once); the streaming endpoint
//! sends its events as SSE, each with its `seq` as the `id`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use chrono::Duration as ChronoDuration;
use futures::Stream;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ApiError, ApiResult, AppState, JsonBody, new_id};
use crate::agent::{Busy, Claim, Emitter, Run, RunError, RunEvent, StopReason, ToolCallRecord, Usage};
use crate::store::{RunFailure, RunRecord, RunRequest, RunResult, RunStatus, StoreError, now};

/// Comment lines keep a quiet stream open through proxies.
pub(super) const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// How long an `Idempotency-Key` is remembered.
const IDEMPOTENCY_WINDOW: ChronoDuration = ChronoDuration::hours(24);

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/sessions/{id}/message", post(message))
        .route("/sessions/{id}/message/stream", post(stream))
}

/// What the client does if its connection drops.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnDisconnect {
    /// The run goes on; its result lands in the history and the run.
    #[default]
    Continue,
    /// The run is cancelled (the behaviour before runs were durable).
    Cancel,
}

#[derive(Debug, Clone, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MessageInput {
    /// The agent that answers.
    agent_id: String,
    /// The user's message; not blank.
    #[schema(min_length = 1, pattern = r"\S")]
    message: String,
    /// `POST /sessions/{id}/message` only: answer `202` with the run at
    /// once instead of waiting for it.
    #[serde(default)]
    background: bool,
    #[serde(default)]
    on_disconnect: OnDisconnect,
    /// When the session is running another message: `reject` (409),
    /// `enqueue`, or `interrupt` (cancel the active run, then start).
    #[serde(default)]
    multitask: Busy,
}

/// The body of `POST /sessions/{id}/message/stream`: a message without
/// `background` (the stream is the run).
#[derive(Deserialize, ToSchema)]
#[allow(dead_code)]
#[serde(deny_unknown_fields)]
pub struct StreamMessageInput {
    /// The agent that answers.
    agent_id: String,
    /// The user's message; not blank.
    #[schema(min_length = 1, pattern = r"\S")]
    message: String,
    #[serde(default)]
    on_disconnect: OnDisconnect,
    /// When the session is running another message: `reject` (409),
    /// `enqueue`, or `interrupt` (cancel the active run, then start).
    #[serde(default)]
    multitask: Busy,
}

/// The blocking endpoint's answer.
#[derive(Debug, Serialize, ToSchema)]
pub struct MessageResult {
    pub run_id: String,
    /// The text of the last assistant message.
    pub response: String,
    pub tool_calls: Vec<ToolCallRecord>,
    pub usage: Usage,
    /// Model calls made.
    pub steps: u32,
    pub stop_reason: StopReason,
}

/// `202` for a background run.
#[derive(Debug, Serialize, ToSchema)]
pub struct RunAccepted {
    pub run_id: String,
    pub status: RunStatus,
}

impl From<RunError> for ApiError {
    fn from(err: RunError) -> Self {
        match err {
            RunError::Provider { .. } | RunError::ContextLength { .. } | RunError::AnswerTooLarge { .. } => {
                ApiError::Provider(err.to_string())
            }
            RunError::Plugin(e) => ApiError::Plugin(e),
            RunError::Store(e) => ApiError::from(e),
            RunError::TokensExceeded { limit, used } => ApiError::Quota(crate::tenancy::QuotaExceeded {
                quota: "tokens_per_day",
                limit,
                used,
                retry_after: crate::tenancy::until_midnight(),
            }),
        }
    }
}

/// Everything that can be refused before a run starts is refused here, as
/// a plain HTTP error; queued runs are checked again when they start.
async fn check(state: &AppState, session_id: &str, request: &RunRequest) -> ApiResult<String> {
    let (work_dir, owner) = state
        .store
        .session_work_dir(session_id)
        .await?
        .ok_or_else(|| StoreError::NotFound { kind: "session", id: session_id.to_string() })?;
    let agent = owned_agent(state, &request.agent_id, &owner).await?;
    if request.message.trim().is_empty() {
        return Err(ApiError::Invalid("`message` must not be empty".into()));
    }
    super::providers::provider(state, &agent.provider.id)
        .await
        .map_err(|_| ApiError::Invalid(format!("agent `{}` uses unknown provider `{}`", agent.id, agent.provider.id)))?;
    // Both are well formed; together they conflict: 409.
    if !agent.tools.is_empty() && work_dir.is_none() {
        return Err(ApiError::Conflict(format!(
            "agent `{}` has tools but session `{session_id}` has no work_dir; set one with PUT /sessions/{session_id}",
            agent.id
        )));
    }
    if let Some(tenancy) = &state.tenancy
        && let Some(limit) = tenancy.quotas(&owner).await?.tokens_per_day
    {
        let used = state.store.tokens_today(&owner).await?;
        if used >= limit {
            return Err(crate::tenancy::QuotaExceeded {
                quota: "tokens_per_day",
                limit,
                used,
                retry_after: crate::tenancy::until_midnight(),
            }
            .into());
        }
    }
    Ok(owner)
}

/// The agent, if it belongs to the session's tenant: another tenant's
/// agent is answered exactly as a missing one.
pub(super) async fn owned_agent(state: &AppState, id: &str, owner: &str) -> ApiResult<crate::store::Agent> {
    let agent = state.store.agent(id).await?;
    if agent.tenant_id != owner {
        return Err(StoreError::NotFound { kind: "agent", id: id.to_string() }.into());
    }
    Ok(agent)
}

/// The run, ready to go: the session read under its claim (the history is
/// the run's from here on), the provider's access, the working directory
/// opened and checked.
async fn prepare(state: &AppState, session_id: &str, request: &RunRequest, tenant: Option<&str>) -> ApiResult<(Run, u64)> {
    // The reads before the first token, side by side: the session, its
    // context and, when the tenant is known already, the provider's key.
    let early_access = async {
        let tenant = tenant?;
        let agent = owned_agent(state, &request.agent_id, tenant).await.ok()?;
        let (plugin, _) = super::providers::provider(state, &agent.provider.id).await.ok()?;
        Some((tenant, super::providers::access(state, &plugin, tenant).await))
    };
    let (read, early_access) = tokio::join!(state.store.run_start(session_id), early_access);
    let (session, context, last_seq) = read?;
    let agent = owned_agent(state, &request.agent_id, &session.tenant_id).await?;
    let rules = crate::permissions::compile(&agent.permissions, crate::permissions::Origin::Agent)
        .map_err(|e| ApiError::Invalid(format!("agent `{}`: {e}", agent.id)))?;
    let (plugin, _) = super::providers::provider(state, &agent.provider.id)
        .await
        .map_err(|_| ApiError::Invalid(format!("agent `{}` uses unknown provider `{}`", agent.id, agent.provider.id)))?;
    let access = match early_access {
        Some((tenant, access)) if tenant == session.tenant_id => access?,
        _ => super::providers::access(state, &plugin, &session.tenant_id).await?,
    };
    let budget = crate::agent::Budget::new(agent.provider.context_window, Some(super::providers::window_lookup(state, &agent)));
    // What `check` refused at submit may have changed while the run was queued.
    if !agent.tools.is_empty() && session.work_dir.is_none() {
        return Err(ApiError::Invalid(format!("agent `{}` has tools but session `{session_id}` has no work_dir", agent.id)));
    }
    // A run without tools never touches the directory: no descriptor held
    // open for as long as the model streams (one a stream adds up, against
    // the process's file limit, at thousands of streams).
    let work_dir = if agent.tools.is_empty() {
        None
    } else {
        open_work_dir(state, &session.id, &session.tenant_id, session.work_dir.as_deref()).await?
    };
    let quota = run_quota(state, &session.tenant_id).await?;
    let run = Run {
        quota,
        runtime: state.runtime.clone(),
        store: state.store.clone(),
        agent,
        session,
        work_dir,
        access,
        max_steps: state.settings.max_steps,
        message: request.message.clone(),
        shutdown: state.shutdown.clone(),
        permissions: state.settings.permissions.clone(),
        rules,
        approvals: state.approvals.clone(),
        context,
        budget,
        mcp: state.mcp.clone(),
        saving: None,
    };
    Ok((run, last_seq))
}

/// The session's working directory, opened for a run or a call (and
/// checked again); why tools cannot run there, if they cannot.
pub(super) async fn open_work_dir(
    state: &AppState,
    session: &str,
    tenant: &str,
    dir: Option<&str>,
) -> ApiResult<Option<Result<Arc<crate::runtime::WorkDir>, Arc<crate::runtime::WorkDirError>>>> {
    // Opened now, without following symlinks, and checked again: a
    // directory swapped for a link since the session was saved gets no
    // tool call (each is answered with the reason).
    let rules_here = match &state.tenancy {
        Some(tenancy) => state.work_dirs.within(tenancy.dir(tenant)),
        None => (*state.work_dirs).clone(),
    };
    // A tenant's commands run as the tenant's own uid, never as root.
    let user = match &state.tenancy {
        Some(tenancy) => Some(tenancy.uid(tenant).await?),
        None => None,
    };
    let work_dir = dir.map(|dir| {
        rules_here.open(dir).map(|d| Arc::new(match user { Some(uid) => d.with_user((uid, uid)), None => d })).map_err(|err| {
            tracing::warn!(session = %session, %err, "tools refused in this session");
            Arc::new(err)
        })
    });
    Ok(work_dir)
}

/// The tenant of a run or a call, and the quotas it meets on the way.
pub(super) async fn run_quota(state: &AppState, tenant: &str) -> ApiResult<crate::agent::RunQuota> {
    Ok(match &state.tenancy {
        Some(tenancy) => {
            let quotas = tenancy.quotas(tenant).await?;
            crate::agent::RunQuota {
                tenant: tenant.to_string(),
                tenancy: Some(tenancy.clone()),
                tokens_per_day: quotas.tokens_per_day,
                storage_mb: quotas.storage_mb,
            }
        }
        None => crate::agent::RunQuota { tenant: tenant.to_string(), tenancy: None, tokens_per_day: None, storage_mb: None },
    })
}

/// Stores a new run and starts it, queues it, or refuses it (409), as the
/// session's state and `multitask` say. With an idempotency key already
/// used for the same body, the earlier run instead.
async fn submit(
    state: &AppState,
    session_id: &str,
    input: &MessageInput,
    body: serde_json::Value,
    key: Option<String>,
) -> ApiResult<RunRecord> {
    let request = RunRequest { agent_id: input.agent_id.clone(), message: input.message.clone(), body };
    let key_since = now() - IDEMPOTENCY_WINDOW;
    if let Some(key) = &key
        && let Some(run) = earlier_run(state, session_id, key, &request).await?
    {
        return Ok(run);
    }
    let owner = check(state, session_id, &request).await?;
    let limit = crate::store::RunLimit {
        max_concurrent_runs: match &state.tenancy {
            Some(tenancy) => tenancy.quotas(&owner).await?.max_concurrent_runs,
            None => None,
        },
        tenant: owner,
    };
    let busy = |active: String| {
        ApiError::Conflict(format!(
            "session `{session_id}` is already running a message (run `{active}`); wait for it, or send \"multitask\": \"enqueue\" or \"interrupt\""
        ))
    };
    if input.multitask == Busy::Reject
        && let Some(active) = state.runs.active(session_id)
    {
        return Err(busy(active));
    }
    let mut record = RunRecord::queued(new_id(), session_id.to_string(), input.agent_id.clone(), now());
    if state.store.is_shared() {
        return submit_shared(state, record, request, key, key_since, limit, input.multitask, busy).await;
    }
    // An idle session: the run is claimed and started while it is stored
    // as running. Its reads overlap the write; it asks the model only
    // once the write is done, and ends without a trace if the write fails
    // (the session then goes to the next queued run, as after any run).
    if let Ok(claim) = state.runs.try_claim(session_id, &record.id) {
        record.status = RunStatus::Running;
        record.started_at = Some(record.created_at);
        let (stored, written) = tokio::sync::oneshot::channel();
        let tenant = Some(limit.tenant.clone());
        launch(state.clone(), session_id.to_string(), Start { claim, request: Some(request.clone()), written: Some(written), tenant });
        // On a task of its own: a client gone during the write leaves
        // the run to the server, stored and told so, as after the write.
        let (store, req, k) = (state.store.clone(), request.clone(), key.clone());
        let run = tokio::spawn(async move {
            let run = store.insert_run(record, req, k, key_since, limit).await;
            let _ = stored.send(run.is_ok());
            run
        })
        .await
        .map_err(|e| StoreError::Task(format!("the write of the run was lost: {e}")))?;
        return match run {
            Ok(run) => Ok(run),
            Err(err) => lost_key_race(state, session_id, key, &request, err).await,
        };
    }
    let run = match state.store.insert_run(record, request.clone(), key.clone(), key_since, limit).await {
        Ok(run) => run,
        Err(err) => return lost_key_race(state, session_id, key, &request, err).await,
    };
    match state.runs.claim_or(session_id, &run.id, input.multitask) {
        Ok(Some(claim)) => launch(state.clone(), session_id.to_string(), Start::queued(claim)),
        Ok(None) => tracing::info!(session = %session_id, run = %run.id, mode = ?input.multitask, "run queued"),
        Err(active) => {
            // Lost a race with another submit: this run never existed.
            state.store.delete_run(&run.id).await?;
            return Err(busy(active));
        }
    }
    Ok(run)
}

/// [`submit`] on a database several hosts share: the database, not this
/// host's memory, says whether the session is busy (its unique index of
/// active runs), and queued runs wait in the database, for whichever host
/// frees the session to start them.
#[allow(clippy::too_many_arguments)]
async fn submit_shared(
    state: &AppState,
    mut record: RunRecord,
    request: RunRequest,
    key: Option<String>,
    key_since: chrono::DateTime<chrono::Utc>,
    limit: crate::store::RunLimit,
    multitask: Busy,
    busy: impl Fn(String) -> ApiError,
) -> ApiResult<RunRecord> {
    let session_id = record.session_id.clone();
    if let Ok(claim) = state.runs.try_claim(&session_id, &record.id) {
        record.status = RunStatus::Running;
        record.started_at = Some(record.created_at);
        match state.store.insert_run(record.clone(), request.clone(), key.clone(), key_since, limit.clone()).await {
            Ok(run) => {
                launch(state.clone(), session_id, Start { claim, request: Some(request), written: None, tenant: None });
                return Ok(run);
            }
            Err(err) => {
                // Hand the session on, as a run that ended would.
                if let Some(next) = state.runs.finish(&session_id, &claim.run_id) {
                    launch(state.clone(), session_id.clone(), Start::queued(next));
                }
                if !matches!(err, StoreError::SessionBusy { .. }) {
                    return lost_key_race(state, &session_id, key, &request, err).await;
                }
            }
        }
    }
    // Busy, here or on another host.
    let active = state.store.active_run(&session_id).await?.map(|(run, _)| run).or_else(|| state.runs.active(&session_id));
    if multitask == Busy::Reject {
        // The active run may have ended since: refuse all the same, naming it.
        return Err(busy(active.unwrap_or_default()));
    }
    record.status = RunStatus::Queued;
    record.started_at = None;
    let run = match state.store.insert_run(record, request.clone(), key.clone(), key_since, limit).await {
        Ok(run) => run,
        Err(err) => return lost_key_race(state, &session_id, key, &request, err).await,
    };
    if multitask == Busy::Interrupt {
        state.store.queue_first(&run.id).await?;
        if let Some(active) = &active {
            super::runs::cancel_now(state, &session_id, active);
        }
    }
    tracing::info!(session = %session_id, run = %run.id, mode = ?multitask, "run queued");
    // The active run may have ended before this one was stored.
    if let Some(claim) = crate::cluster::claim_next(state, &session_id).await {
        launch(state.clone(), session_id, Start::queued(claim));
    }
    Ok(run)
}

/// The run an idempotency key already started with the same body; the same
/// key with another body conflicts with the stored one: 409.
async fn earlier_run(state: &AppState, session_id: &str, key: &str, request: &RunRequest) -> ApiResult<Option<RunRecord>> {
    let Some((run, earlier)) = state.store.run_by_key(session_id, key, now() - IDEMPOTENCY_WINDOW).await? else {
        return Ok(None);
    };
    if earlier.body != request.body {
        return Err(ApiError::Conflict(format!(
            "Idempotency-Key `{key}` was used for run `{}` with a different body; use a new key for a new message",
            run.id
        )));
    }
    Ok(Some(run))
}

/// A run that could not be stored: when a concurrent submit with the same
/// key stored its run first, that run is the answer.
async fn lost_key_race(
    state: &AppState,
    session_id: &str,
    key: Option<String>,
    request: &RunRequest,
    err: StoreError,
) -> ApiResult<RunRecord> {
    if let (StoreError::KeyTaken { .. }, Some(key)) = (&err, &key)
        && let Some(run) = earlier_run(state, session_id, key, request).await?
    {
        return Ok(run);
    }
    Err(err.into())
}

/// Runs `claim`'s run, then each run queued behind it, on a task of their
/// own: a run belongs to the server, not to the request that started it.
/// A claimed run about to start: with its request when it was stored as
/// `running` already (started at once), without when it waited in the queue.
pub(crate) struct Start {
    pub claim: Claim,
    pub request: Option<RunRequest>,
    /// Whether the run's row was written, when it is being written while
    /// the run starts: the run reads what it needs meanwhile, and asks the
    /// model (or writes anything) only after a `true`.
    pub written: Option<tokio::sync::oneshot::Receiver<bool>>,
    /// The session's tenant, when the submit has read it already: the
    /// provider's key is then read beside the session.
    pub tenant: Option<String>,
}

impl Start {
    /// A run that waited in the queue: its request is read from the store.
    pub(crate) fn queued(claim: Claim) -> Start {
        Start { claim, request: None, written: None, tenant: None }
    }
}

pub(crate) fn launch(state: AppState, session_id: String, start: Start) {
    tokio::spawn(async move {
        let mut next = Some(start);
        while let Some(start) = next.take() {
            let run_id = start.claim.run_id.clone();
            let handed = match run_one(&state, &session_id, start).await {
                Ok(handed) => handed,
                Err(err) => {
                    tracing::error!(run = %run_id, %err, "cannot record the run");
                    state.runs.finish(&session_id, &run_id)
                }
            };
            next = handed.map(Start::queued);
        }
    });
}

/// One run, start to end: `running` is stored before anything is sent, the
/// end is stored before `done` or `error` announces it, and the session is
/// free (or handed to the next queued run, returned) before that too: a
/// client that sends its next message on `done` never finds it busy.
async fn run_one(state: &AppState, session_id: &str, Start { claim, request, written, tenant }: Start) -> Result<Option<Claim>, StoreError> {
    let run_id = claim.run_id;
    let request = match request {
        Some(request) => request,
        None => {
            let request = Box::pin(state.store.run_request(&run_id)).await?;
            Box::pin(state.store.start_run(&run_id, now())).await?;
            request
        }
    };
    let active = crate::telemetry::Active::runs();
    let started = std::time::Instant::now();
    // Every line a run logs names its tenant, known once `prepare` has
    // read the session (no read of its own before the first token).
    let span = tracing::info_span!("run", tenant = tracing::field::Empty, run = %run_id);
    // Boxed: held inline, it would widen every state of this future, the
    // long one that follows the stream included.
    let prepared = Box::pin(tracing::Instrument::instrument(prepare(state, session_id, &request, tenant.as_deref()), span.clone())).await;
    // The feed's last seq comes with prepare's read; without it, read alone.
    let (feed, prepared) = match prepared {
        Ok((run, last)) => (Ok(state.bus.fresh_feed_from(session_id, last).await), Ok(run)),
        Err(err) => (Box::pin(state.bus.fresh_feed(session_id)).await, Err(err)),
    };
    if let Some(written) = written
        && !written.await.unwrap_or(false)
    {
        // Never stored: nothing of it was sent or written.
        return Ok(state.runs.finish(session_id, &run_id));
    }
    let emitter = Emitter { bus: state.bus.clone(), feed: feed?, run_id: run_id.clone(), cancel: claim.cancel };
    // This task is alive, at its size, for as long as the run streams, by
    // every open stream at once: the run itself, the longest part, is
    // boxed, and so are the short store calls around it, each of which
    // would otherwise widen every state of it.
    let (outcome, tenant) = Box::pin(tracing::Instrument::instrument(
        async {
            match prepared {
                Ok(run) => {
                    let tenant = run.session.tenant_id.clone();
                    tracing::Span::current().record("tenant", tenant.as_str());
                    let outcome = run.execute(&emitter).await.map_err(|err| RunFailure { error: err.to_string(), code: err.code().into() });
                    (outcome, tenant)
                }
                Err(err) => {
                    let body = err.body();
                    let tenant = Box::pin(state.store.session_owner(session_id)).await.ok().flatten().unwrap_or_default();
                    (Err(RunFailure { error: body.error, code: body.code.into() }), tenant)
                }
            }
        },
        span,
    ))
    .await;
    let (status, result, event) = match outcome {
        Ok(o) => {
            let status = if o.stop_reason == StopReason::Cancelled { RunStatus::Cancelled } else { RunStatus::Completed };
            let event = RunEvent::Done { run_id: run_id.clone(), usage: o.usage, steps: o.steps, stop_reason: o.stop_reason };
            let result = RunResult {
                response: Some(o.response),
                tool_calls: Some(o.tool_calls),
                usage: Some(o.usage),
                steps: Some(o.steps),
                stop_reason: Some(o.stop_reason),
                error: None,
            };
            (status, result, event)
        }
        Err(failure) => {
            let event = RunEvent::Error { run_id: run_id.clone(), error: failure.error.clone(), code: failure.code.clone() };
            (RunStatus::Failed, RunResult { error: Some(failure), ..Default::default() }, event)
        }
    };
    let elapsed = started.elapsed();
    crate::telemetry::run_ended(status.as_str(), elapsed);
    let usage = result.usage.unwrap_or_default();
    tracing::info!(
        target: "hangar::run",
        run = %run_id,
        session = %session_id,
        tenant = %tenant,
        agent = %request.agent_id,
        status = status.as_str(),
        steps = result.steps.unwrap_or(0),
        input_tokens = usage.input_tokens,
        output_tokens = usage.output_tokens,
        stop_reason = result.stop_reason.map(|r| r.as_str()).unwrap_or("error"),
        error_code = result.error.as_ref().map(|e| e.code.as_str()),
        duration_ms = elapsed.as_millis() as u64,
        "run ended"
    );
    Box::pin(state.store.end_run(&run_id, status, now(), result)).await?;
    let mut next = state.runs.finish(session_id, &run_id);
    // A host that is stopping leaves the queue to the others.
    if next.is_none() && state.store.is_shared() && !*state.stopping.borrow() {
        next = Box::pin(crate::cluster::claim_next(state, session_id)).await;
    }
    // No longer active once `done` or `error` says so: a client that reads
    // the metrics on that event sees the run gone from `hangar_active_runs`.
    drop(active);
    emitter.send(&event);
    Ok(next)
}

/// Cancels the run when dropped, for requests sent with
/// `"on_disconnect": "cancel"` whose client goes away.
pub(super) struct CancelOnDrop {
    state: Option<AppState>,
    session: String,
    run: String,
}

impl CancelOnDrop {
    fn new(state: &AppState, input: &MessageInput, run: &RunRecord) -> CancelOnDrop {
        let state = (input.on_disconnect == OnDisconnect::Cancel).then(|| state.clone());
        CancelOnDrop { state, session: run.session_id.clone(), run: run.id.clone() }
    }

    /// The request got its answer: nothing to cancel.
    pub(super) fn disarm(&mut self) {
        self.state = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(state) = self.state.take() {
            tracing::info!(run = %self.run, "the client went away; cancelling its run as it asked");
            super::runs::cancel_now(&state, &self.session, &self.run);
        }
    }
}

fn idempotency_key(headers: &HeaderMap) -> ApiResult<Option<String>> {
    match headers.get("idempotency-key") {
        None => Ok(None),
        Some(v) => match v.to_str() {
            Ok(k) if !k.trim().is_empty() && k.len() <= 255 => Ok(Some(k.to_string())),
            _ => Err(ApiError::Invalid("Idempotency-Key must be 1-255 visible ASCII characters".into())),
        },
    }
}

fn run_location(run: &RunRecord) -> HeaderValue {
    HeaderValue::from_str(&format!("/sessions/{}/runs/{}", run.session_id, run.id)).expect("ids are ASCII")
}

/// The run's result as the blocking endpoint answers it (errors mapped to
/// their HTTP status in `api::error`).
pub(super) fn result_of(run: RunRecord) -> ApiResult<MessageResult> {
    let result = run.result;
    match run.status {
        RunStatus::Completed | RunStatus::Cancelled => Ok(MessageResult {
            run_id: run.id,
            response: result.response.unwrap_or_default(),
            tool_calls: result.tool_calls.unwrap_or_default(),
            usage: result.usage.unwrap_or_default(),
            steps: result.steps.unwrap_or_default(),
            stop_reason: result.stop_reason.unwrap_or(StopReason::Cancelled),
        }),
        _ => {
            let failure = result.error.unwrap_or(RunFailure { error: format!("run `{}` did not complete", run.id), code: "internal".into() });
            Err(ApiError::RunFailed { run_id: run.id, code: failure.code, message: failure.error })
        }
    }
}

#[utoipa::path(post, path = "/sessions/{id}/message", tag = "messages", params(("id" = String, Path),
        ("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 255, pattern = r"^[!-~]([ -~]*[!-~])?$",
            description = "A repeat with the same key and body returns the same run (kept 24 h); 1-255 visible ASCII characters")),
    request_body = MessageInput,
    responses((status = 200, body = MessageResult, description = "the run's result"),
        (status = 202, body = RunAccepted, description = "`background`: the run, started or queued", headers(("Location" = String))),
        (status = 400, body = super::ErrorBody), (status = 404, body = super::ErrorBody), (status = 409, body = super::ErrorBody),
        (status = 413, body = super::ErrorBody), (status = 415, body = super::ErrorBody),
        (status = 422, body = super::ErrorBody), (status = 502, body = super::ErrorBody), (status = 503, body = super::ErrorBody)))]
pub(super) async fn message(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<serde_json::Value>,
) -> ApiResult<Response> {
    let input: MessageInput = super::from_json(body.clone())?;
    let key = idempotency_key(&headers)?;
    let run = submit(&state, &id, &input, body, key).await?;
    if input.background {
        let location = run_location(&run);
        let accepted = RunAccepted { run_id: run.id, status: run.status };
        return Ok((StatusCode::ACCEPTED, [(header::LOCATION, location)], Json(accepted)).into_response());
    }
    let mut guard = CancelOnDrop::new(&state, &input, &run);
    let ended = super::runs::wait_for_end(&state, &id, &run.id).await?;
    guard.disarm();
    Ok(Json(result_of(ended)?).into_response())
}

/// One stored event as SSE: its seq as the `id`, its name, its JSON.
pub(super) fn sse(event: &crate::store::StoredEvent) -> SseEvent {
    SseEvent::default().id(event.seq.to_string()).event(&event.name).data(&event.data)
}

#[utoipa::path(post, path = "/sessions/{id}/message/stream", tag = "messages", params(("id" = String, Path),
        ("Idempotency-Key" = Option<String>, Header, min_length = 1, max_length = 255, pattern = r"^[!-~]([ -~]*[!-~])?$",
            description = "A repeat with the same key and body replays the same run; 1-255 visible ASCII characters")),
    request_body = StreamMessageInput,
    responses((status = 200, content_type = "text/event-stream", body = RunEvent,
        description = "SSE events `text`, `tool_use`, `tool_result`, then `done` or `error`; each with `id:` its seq",
        headers(("Content-Location" = String, description = "The run: /sessions/{id}/runs/{run_id}"))),
        (status = 400, body = super::ErrorBody), (status = 404, body = super::ErrorBody), (status = 409, body = super::ErrorBody),
        (status = 413, body = super::ErrorBody), (status = 415, body = super::ErrorBody), (status = 422, body = super::ErrorBody)))]
pub(super) async fn stream(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    JsonBody(body): JsonBody<serde_json::Value>,
) -> ApiResult<Response> {
    let input: MessageInput = super::from_json(body.clone())?;
    if input.background {
        return Err(ApiError::Invalid("`background` is for POST /sessions/{id}/message; the stream is the run".into()));
    }
    let key = idempotency_key(&headers)?;
    let run = submit(&state, &id, &input, body, key).await?;
    let guard = CancelOnDrop::new(&state, &input, &run);
    let location = run_location(&run);
    let events = super::runs::run_stream(state, id, run.id.clone(), 0, Some(guard)).await?;
    Ok(([(header::CONTENT_LOCATION, location)], sse_response(events)).into_response())
}

/// A stream of SSE events that never fails (errors become events).
pub(super) type SseStream = std::pin::Pin<Box<dyn Stream<Item = Result<SseEvent, Infallible>> + Send>>;

/// An SSE response of `events`, counted in `hangar_active_streams` while
/// it is open.
pub(super) fn sse_response(events: SseStream) -> impl IntoResponse + use<> {
    let active = crate::telemetry::Active::streams();
    let counted: SseStream = Box::pin(futures::StreamExt::map(events, move |event| {
        let _open = &active;
        event
    }));
    Sse::new(counted).keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
}
