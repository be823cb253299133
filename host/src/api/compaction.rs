//! A session's compacted context: what the model is sent instead of the
//! whole history (`GET /sessions/{id}/context`), and compaction on demand
//! (`POST /sessions/{id}/compact`).

use axum::extract::{FromRequest, Path, Request, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ApiError, ApiResult, AppState, JsonBody, new_id};
use crate::agent::{Compacted, Compactor, Target, compaction};
use crate::store::{HistoryMessage, Session, SessionContext, StoreError, Usage};

pub fn routes() -> Router<AppState> {
    Router::new().route("/sessions/{id}/context", get(show)).route("/sessions/{id}/compact", post(compact))
}

/// What the model is sent of a session (before the next message): the
/// history, with a summary standing for its oldest messages and old tool
/// results shortened once it has been compacted.
#[derive(Debug, Serialize, ToSchema)]
pub struct SessionContextView {
    pub session_id: String,
    /// The messages the model sees, oldest first.
    pub messages: Vec<HistoryMessage>,
    /// Estimated tokens of `messages` (the instructions and tool
    /// definitions of the agent come on top).
    pub estimated_tokens: u64,
    /// The summary that stands for the first `summarized_messages` messages
    /// of the history; `null` while there is none.
    pub summary: Option<String>,
    pub summarized_messages: u64,
    /// Tool results (by `tool_use_id`) the model sees shortened.
    pub shortened_tool_results: Vec<String>,
    /// Compactions so far.
    pub compactions: u32,
    /// Estimated tokens of the request before and after the last
    /// compaction; `null` before the first.
    pub tokens_before: Option<u64>,
    pub tokens_after: Option<u64>,
    /// When the last compaction happened (RFC 3339); `null` before the first.
    pub compacted_at: Option<String>,
}

impl SessionContextView {
    fn new(session: &Session, context: Option<SessionContext>) -> SessionContextView {
        let messages = compaction::view(&session.history, context.as_ref());
        let context = context.unwrap_or_default();
        let compacted = context.compactions > 0;
        SessionContextView {
            session_id: session.id.clone(),
            estimated_tokens: compaction::estimate_messages(&messages),
            messages,
            summary: context.summary,
            summarized_messages: context.summarized as u64,
            shortened_tool_results: context.shortened,
            compactions: context.compactions,
            tokens_before: compacted.then_some(context.tokens_before),
            tokens_after: compacted.then_some(context.tokens_after),
            compacted_at: context.compacted_at.map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)),
        }
    }
}

/// The optional body of `POST /sessions/{id}/compact`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompactInput {
    /// The agent whose model writes the summary and whose settings
    /// (`compaction.keep_turns`) apply; by default the agent of the
    /// session's latest run.
    agent_id: Option<String>,
}

#[utoipa::path(operation_id = "get_session_context", get, path = "/sessions/{id}/context", tag = "sessions", params(("id" = String, Path)),
    responses((status = 200, body = SessionContextView), (status = 404, body = super::ErrorBody)))]
pub(super) async fn show(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<SessionContextView>> {
    let session = state.store.session(&id).await?;
    let context = state.store.session_context(&id).await?;
    Ok(Json(SessionContextView::new(&session, context)))
}

#[utoipa::path(operation_id = "compact_session", post, path = "/sessions/{id}/compact", tag = "sessions", params(("id" = String, Path)),
    request_body(content = CompactInput, description = "Optional"),
    responses((status = 200, body = SessionContextView, description = "the context after the compaction (unchanged when there was nothing to compact)"),
        (status = 400, body = super::ErrorBody), (status = 404, body = super::ErrorBody),
        (status = 409, body = super::ErrorBody, description = "a run is active, or no agent was given and the session has had no run"),
        (status = 413, body = super::ErrorBody), (status = 415, body = super::ErrorBody), (status = 422, body = super::ErrorBody),
        (status = 502, body = super::ErrorBody), (status = 503, body = super::ErrorBody)))]
pub(super) async fn compact(State(state): State<AppState>, Path(id): Path<String>, request: Request) -> ApiResult<Json<SessionContextView>> {
    let empty = request.headers().get(axum::http::header::CONTENT_LENGTH).is_some_and(|v| v.as_bytes() == b"0")
        || (request.headers().get(axum::http::header::CONTENT_TYPE).is_none()
            && request.headers().get(axum::http::header::TRANSFER_ENCODING).is_none()
            && request.headers().get(axum::http::header::CONTENT_LENGTH).is_none());
    let input = if empty { CompactInput::default() } else { JsonBody::<CompactInput>::from_request(request, &state).await?.0 };
    if !state.store.session_exists(&id).await? {
        return Err(StoreError::NotFound { kind: "session", id }.into());
    }
    // The session is held as a run would hold it, so no run starts while
    // its history is summarised.
    let claim_id = format!("compact-{}", new_id());
    let busy = || ApiError::Conflict(format!("session `{id}` is running a message; compact it when the run ends"));
    let Ok(claim) = state.runs.try_claim(&id, &claim_id) else {
        return Err(busy());
    };
    // Another host may be running it. (A run that starts there during the
    // compaction is not held off: compaction is not run for a busy session.)
    if state.store.active_run(&id).await.ok().flatten().is_some() {
        state.runs.finish(&id, &claim_id);
        return Err(busy());
    }
    let result = compact_claimed(&state, &id, input, claim.cancel).await;
    if let Some(next) = state.runs.finish(&id, &claim_id) {
        super::messages::launch(state.clone(), id.clone(), super::messages::Start::queued(next));
    }
    Ok(Json(result?))
}

async fn compact_claimed(
    state: &AppState,
    id: &str,
    input: CompactInput,
    cancel: tokio::sync::watch::Receiver<bool>,
) -> ApiResult<SessionContextView> {
    let agent_id = match input.agent_id {
        Some(agent_id) => agent_id,
        None => match state.store.runs(id, 1, None).await?.into_iter().next() {
            Some(run) => run.agent_id,
            None => {
                return Err(ApiError::Conflict(format!(
                    "session `{id}` has had no run, so no agent to compact it with; send {{\"agent_id\": ...}}"
                )));
            }
        },
    };
    let session = state.store.session(id).await?;
    // Another tenant's agent is answered as a missing one.
    let agent = super::messages::owned_agent(state, &agent_id, &session.tenant_id).await?;
    let (plugin, _) = super::providers::provider(state, &agent.provider.id)
        .await
        .map_err(|_| ApiError::Invalid(format!("agent `{}` uses unknown provider `{}`", agent.id, agent.provider.id)))?;
    let access = super::providers::access(state, &plugin, &session.tenant_id).await?;
    let mut context = state.store.session_context(id).await?.unwrap_or_default();
    let window = match agent.provider.context_window {
        Some(window) => Some(window),
        None => super::providers::window_lookup(state, &agent)().await,
    };
    let mut specs = Vec::new();
    for tool in &agent.tools {
        let key = state.runtime.resolve(&session.tenant_id, tool).map_or_else(|| tool.clone(), |p| p.key());
        if let Ok(spec) = state.runtime.tool_spec(&key).await {
            specs.push(spec);
        }
    }
    let fixed = compaction::estimate_fixed(&agent.instructions, &specs);
    let before = fixed + compaction::estimate_messages(&compaction::view(&session.history, Some(&context)));
    let compactor =
        Compactor { runtime: &state.runtime, access: &access, agent: &agent, window, cancel, shutdown: state.shutdown.clone() };
    let mut usage = Usage::default();
    let compacted = compactor.compact(&session.history, &mut context, fixed, before, Target::Whole, &mut usage).await;
    // The summary's tokens count against the tenant like a run's.
    if usage.input_tokens > 0 || usage.output_tokens > 0 {
        state.store.add_tokens(&session.tenant_id, usage.input_tokens as u64, usage.output_tokens as u64).await?;
    }
    let compacted = compacted?;
    match compacted {
        Compacted::Done { before, after } => {
            tracing::info!(session = %id, agent = %agent.id, before, after, input_tokens = usage.input_tokens,
                output_tokens = usage.output_tokens, "conversation compacted on demand");
            state.store.put_session_context(id, context.clone()).await?;
            Ok(SessionContextView::new(&session, Some(context)))
        }
        Compacted::Unchanged => Ok(SessionContextView::new(&session, state.store.session_context(id).await?)),
        Compacted::Cancelled => Err(ApiError::Conflict(format!("the compaction of session `{id}` was cancelled"))),
    }
}
