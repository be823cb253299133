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
use crate::tenancy::Caller;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/sessions", get(list).post(create))
        .route("/sessions/{id}", get(show).put(update).delete(remove))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionInput {
    /// Absolute path of an existing directory (inside a `--work-root` when
    /// any are set), or `null` for none. In multi-tenant mode the path may
    /// also be relative to the tenant's directory, must lie inside it, and
    /// when absent a new directory `<work-root>/<tenant>/<session id>/` is
    /// made (and removed with the session).
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    work_dir: Option<Option<String>>,
}

fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

/// Checks a `work_dir` and returns it canonical (symlinks resolved), which
/// is what runs will open. In multi-tenant mode it must lie inside the
/// owner's directory; a relative one is taken from there.
fn check_work_dir(state: &AppState, owner: &str, dir: &str) -> ApiResult<String> {
    match &state.tenancy {
        None => Ok(state.work_dirs.check(dir)?),
        Some(tenancy) => {
            let root = tenancy.dir(owner);
            let dir = root.join(dir);
            let dir = dir.to_str().ok_or_else(|| ApiError::Invalid("`work_dir` is not UTF-8".into()))?;
            Ok(state.work_dirs.within(root.clone()).check(dir)?)
        }
    }
}

/// The directory made for a session created without `work_dir` in
/// multi-tenant mode: `<work-root>/<tenant>/<session>/`.
fn own_dir(state: &AppState, session: &Session) -> Option<std::path::PathBuf> {
    state.tenancy.as_ref().map(|t| t.dir(&session.tenant_id).join(&session.id))
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
pub(super) async fn list(
    State(state): State<AppState>,
    caller: Caller,
    QueryParams(q): QueryParams<SessionsQuery>,
) -> ApiResult<Page<SessionListed>> {
    let limit = page::limit(q.limit)?;
    let history = q.history.unwrap_or(true);
    let rows = state.store.sessions_page(caller.scope(), q.after, limit + 1, history).await?;
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
        (status = 415, body = super::ErrorBody), (status = 422, body = super::ErrorBody),
        (status = 429, body = super::ErrorBody, description = "`max_sessions` reached", headers(("Retry-After" = u64)))))]
pub(super) async fn create(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(input): JsonBody<SessionInput>,
) -> ApiResult<(StatusCode, Json<Session>)> {
    let owner = caller.owner().to_string();
    let work_dir = match input.work_dir.flatten() {
        Some(dir) => Some(check_work_dir(&state, &owner, &dir)?),
        None => None,
    };
    let now = now();
    let mut session = Session { id: new_id(), work_dir, history: Vec::new(), created_at: now, updated_at: now, tenant_id: owner };
    let Some(tenancy) = &state.tenancy else {
        return Ok((StatusCode::CREATED, Json(state.store.insert_session(session).await?)));
    };
    let max_sessions = tenancy.quotas(&session.tenant_id).await?.max_sessions;
    let made = match (&session.work_dir, own_dir(&state, &session)) {
        (None, Some(dir)) => {
            tenancy
                .make_dir(&session.tenant_id, &dir)
                .await
                .map_err(|e| ApiError::Internal(format!("cannot make the session's directory: {e}")))?;
            session.work_dir = Some(check_work_dir(&state, &session.tenant_id, &session.id)?);
            Some(dir)
        }
        _ => None,
    };
    match state.store.insert_session_within(session, max_sessions).await {
        Ok(session) => Ok((StatusCode::CREATED, Json(session))),
        Err(err) => {
            if let Some(dir) = made {
                let _ = std::fs::remove_dir_all(dir);
            }
            Err(err.into())
        }
    }
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
            Some(dir) => Some(check_work_dir(&state, &session.tenant_id, &dir)?),
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
    let session = state.store.session(&id).await?;
    state.store.delete_session(&id).await?;
    // Its MCP servers' programs stop before its directory goes.
    state.mcp.end_session(&id).await;
    // The directory made for it goes with it; one the client named stays.
    if let Some(dir) = own_dir(&state, &session)
        && session.work_dir.as_deref() == dir.to_str()
        && let Err(err) = std::fs::remove_dir_all(&dir)
    {
        tracing::warn!(session = %id, dir = %dir.display(), %err, "cannot remove the session's directory");
    }
    Ok(status("deleted"))
}
