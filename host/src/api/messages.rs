//! Messages: one run of the agent loop, answered whole or streamed as SSE.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::routing::post;
use axum::{Json, Router};
use futures::Stream;
use serde::Deserialize;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use utoipa::ToSchema;

use super::{ApiError, ApiResult, AppState, JsonBody};
use crate::agent::{Run, RunError, RunOutcome, channel};
use crate::store::StoreError;

/// Comment lines keep a quiet stream open through proxies.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/sessions/{id}/message", post(message))
        .route("/sessions/{id}/message/stream", post(stream))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MessageInput {
    /// The agent that answers.
    agent_id: String,
    /// The user's message.
    message: String,
}

impl From<RunError> for ApiError {
    fn from(err: RunError) -> Self {
        match err {
            RunError::Provider { .. } => ApiError::Provider(err.to_string()),
            RunError::Plugin(e) => ApiError::Plugin(e),
            RunError::Store(e) => ApiError::from(e),
        }
    }
}

/// Everything that can be refused before a run starts is refused here, as
/// a plain HTTP error.
async fn prepare(state: &AppState, session_id: &str, input: MessageInput) -> ApiResult<Run> {
    if !state.store.session_exists(session_id).await? {
        return Err(StoreError::NotFound { kind: "session", id: session_id.to_string() }.into());
    }
    let agent = state.store.agent(&input.agent_id).await?;
    if input.message.trim().is_empty() {
        return Err(ApiError::Invalid("`message` must not be empty".into()));
    }
    let (plugin, _) = super::providers::provider(state, &agent.provider.id)
        .await
        .map_err(|_| ApiError::Invalid(format!("agent `{}` uses unknown provider `{}`", agent.id, agent.provider.id)))?;
    let access = super::providers::access(state, &plugin).await?;
    let guard = state.runs.try_start(session_id).ok_or_else(|| {
        ApiError::Conflict(format!("session `{session_id}` is already running a message; wait for it to finish"))
    })?;
    // Read again under the guard: the history is ours from here on.
    let session = state.store.session(session_id).await?;
    if !agent.tools.is_empty() && session.work_dir.is_none() {
        return Err(ApiError::Invalid(format!(
            "agent `{}` has tools but session `{session_id}` has no work_dir; set one with PUT /sessions/{session_id}",
            agent.id
        )));
    }
    // Opened now, without following symlinks, and checked again: a
    // directory swapped for a link since the session was saved gets no
    // tool call (each is answered with the reason).
    let work_dir = session.work_dir.as_deref().map(|dir| {
        state.work_dirs.open(dir).map(Arc::new).map_err(|err| {
            tracing::warn!(session = %session.id, %err, "tools refused for this run");
            Arc::new(err)
        })
    });
    Ok(Run {
        runtime: state.runtime.clone(),
        store: state.store.clone(),
        agent,
        session,
        work_dir,
        access,
        max_steps: state.settings.max_steps,
        message: input.message,
        guard,
        shutdown: state.shutdown.clone(),
    })
}

#[utoipa::path(post, path = "/sessions/{id}/message", tag = "messages", params(("id" = String, Path)),
    request_body = MessageInput,
    responses((status = 200, body = RunOutcome), (status = 404, body = super::ErrorBody), (status = 409, body = super::ErrorBody),
        (status = 422, body = super::ErrorBody), (status = 502, body = super::ErrorBody)))]
pub(super) async fn message(
    State(state): State<AppState>,
    Path(id): Path<String>,
    JsonBody(input): JsonBody<MessageInput>,
) -> ApiResult<Json<RunOutcome>> {
    let run = prepare(&state, &id, input).await?;
    let (tx, mut rx) = channel();
    // The run lives in its own task: if this request is dropped, the channel
    // closes and the run cancels itself, leaving history valid.
    let task = tokio::spawn(run.execute(tx));
    while rx.recv().await.is_some() {}
    let outcome = task.await.map_err(|e| ApiError::Internal(format!("the run panicked: {e}")))??;
    Ok(Json(outcome))
}

#[utoipa::path(post, path = "/sessions/{id}/message/stream", tag = "messages", params(("id" = String, Path)),
    request_body = MessageInput,
    responses((status = 200, content_type = "text/event-stream",
        description = "SSE events `text`, `tool_use`, `tool_result`, then `done` or `error`"),
        (status = 404, body = super::ErrorBody), (status = 409, body = super::ErrorBody), (status = 422, body = super::ErrorBody)))]
pub(super) async fn stream(
    State(state): State<AppState>,
    Path(id): Path<String>,
    JsonBody(input): JsonBody<MessageInput>,
) -> ApiResult<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>> {
    let run = prepare(&state, &id, input).await?;
    let (tx, rx) = channel();
    tokio::spawn(run.execute(tx));
    let events = ReceiverStream::new(rx).map(|event| {
        let value = serde_json::to_value(&event).unwrap_or_default();
        let name = value.get("type").and_then(|t| t.as_str()).unwrap_or("message").to_string();
        Ok(SseEvent::default().event(name).data(value.to_string()))
    });
    Ok(Sse::new(events).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}
