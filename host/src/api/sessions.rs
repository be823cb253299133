//! Sessions: a history of messages on a working directory.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Deserializer};
use utoipa::{IntoParams, ToSchema};

use super::page::{self, Page};
use super::{ApiError, ApiResult, AppState, JsonBody, QueryParams, Status, new_id, status};
use crate::store::{Session, SessionListed, now};

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
    #[schema(value_type = Option<String>, pattern = "^/")]
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

/// `GET /sessions`: a page, with or without histories.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SessionsQuery {
    /// At most this many sessions (default 100, at most 1000).
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
    /// Only sessions after this id (the last id of the previous page).
    after: Option<String>,
    /// `false` leaves each session's history out (default `true`).
    history: Option<bool>,
}

#[utoipa::path(operation_id = "list_sessions", get, path = "/sessions", tag = "sessions", params(SessionsQuery),
    responses((status = 200, body = Vec<SessionListed>, description = "oldest first; `Link: <…>; rel=\"next\"` when there is more",
        headers(("Link" = String, description = "the next page, when there is one"))),
        (status = 422, body = super::ErrorBody)))]
pub(super) async fn list(State(state): State<AppState>, QueryParams(q): QueryParams<SessionsQuery>) -> ApiResult<Page<SessionListed>> {
    let limit = page::limit(q.limit)?;
    let history = q.history.unwrap_or(true);
    let rows = state.store.sessions_page(q.after, limit + 1, history).await?;
    let items = rows.into_iter().map(|s| SessionListed::new(s, history)).collect();
    Ok(Page::from_extra(items, limit, |last: &SessionListed| {
        let limit = limit.to_string();
        let mut params = vec![("limit", limit.as_str()), ("after", last.id.as_str())];
        if !history {
            params.push(("history", "false"));
        }
        page::link("/sessions", &params)
    }))
}

#[utoipa::path(operation_id = "create_session", post, path = "/sessions", tag = "sessions", request_body = SessionInput,
    responses((status = 201, body = Session), (status = 400, body = super::ErrorBody),
        (status = 413, body = super::ErrorBody),
        (status = 415, body = super::ErrorBody), (status = 422, body = super::ErrorBody)))]
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
    responses((status = 200, body = Session), (status = 400, body = super::ErrorBody),
        (status = 404, body = super::ErrorBody),
        (status = 409, body = super::ErrorBody), (status = 413, body = super::ErrorBody), (status = 415, body = super::ErrorBody),
        (status = 422, body = super::ErrorBody)))]
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
