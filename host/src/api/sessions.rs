//! Sessions: a history of messages on a working directory.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Deserializer};
use utoipa::ToSchema;

use super::{ApiError, ApiResult, AppState, JsonBody, Status, new_id, status};
use crate::store::{Session, now};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/sessions", get(list).post(create))
        .route("/sessions/{id}", get(show).put(update).delete(remove))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionInput {
    /// Absolute path of an existing directory (inside a `--work-root` when
    /// any are set), or `null` for none.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    work_dir: Option<Option<String>>,
}

fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

/// Checks a `work_dir` and returns it canonical (symlinks resolved), which
/// is what runs will open.
fn check_work_dir(state: &AppState, dir: &str) -> ApiResult<String> {
    Ok(state.work_dirs.check(dir)?)
}

#[utoipa::path(operation_id = "list_sessions", get, path = "/sessions", tag = "sessions", responses((status = 200, body = Vec<Session>)))]
pub(super) async fn list(State(state): State<AppState>) -> ApiResult<Json<Vec<Session>>> {
    Ok(Json(state.store.sessions().await?))
}

#[utoipa::path(operation_id = "create_session", post, path = "/sessions", tag = "sessions", request_body = SessionInput,
    responses((status = 201, body = Session), (status = 400, body = super::ErrorBody), (status = 422, body = super::ErrorBody)))]
pub(super) async fn create(State(state): State<AppState>, JsonBody(input): JsonBody<SessionInput>) -> ApiResult<(StatusCode, Json<Session>)> {
    let work_dir = match input.work_dir.flatten() {
        Some(dir) => Some(check_work_dir(&state, &dir)?),
        None => None,
    };
    let now = now();
    let session = Session { id: new_id(), work_dir, history: Vec::new(), created_at: now, updated_at: now };
    Ok((StatusCode::CREATED, Json(state.store.insert_session(session).await?)))
}

#[utoipa::path(operation_id = "get_session", get, path = "/sessions/{id}", tag = "sessions", params(("id" = String, Path)),
    responses((status = 200, body = Session), (status = 404, body = super::ErrorBody)))]
pub(super) async fn show(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Session>> {
    Ok(Json(state.store.session(&id).await?))
}

#[utoipa::path(operation_id = "update_session", put, path = "/sessions/{id}", tag = "sessions", params(("id" = String, Path)), request_body = SessionInput,
    responses((status = 200, body = Session), (status = 404, body = super::ErrorBody), (status = 409, body = super::ErrorBody), (status = 422, body = super::ErrorBody)))]
pub(super) async fn update(
    State(state): State<AppState>,
    Path(id): Path<String>,
    JsonBody(input): JsonBody<SessionInput>,
) -> ApiResult<Json<Session>> {
    let mut session = state.store.session(&id).await?;
    if state.runs.is_busy(&id) {
        return Err(ApiError::Conflict(format!("session `{id}` is running a message; try again when it ends")));
    }
    if let Some(work_dir) = input.work_dir {
        session.work_dir = match work_dir {
            Some(dir) => Some(check_work_dir(&state, &dir)?),
            None => None,
        };
    }
    session.updated_at = now().max(session.updated_at);
    Ok(Json(state.store.update_session(session).await?))
}

#[utoipa::path(operation_id = "delete_session", delete, path = "/sessions/{id}", tag = "sessions", params(("id" = String, Path)),
    responses((status = 200, body = Status), (status = 404, body = super::ErrorBody), (status = 409, body = super::ErrorBody)))]
pub(super) async fn remove(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Status>> {
    if state.runs.is_busy(&id) {
        return Err(ApiError::Conflict(format!("session `{id}` is running a message; try again when it ends")));
    }
    state.store.delete_session(&id).await?;
    Ok(status("deleted"))
}
