//! Permission requests: tool calls waiting for a person's answer, listed
//! and answered here. An answer is stored first, then handed to the run
//! that waits for it.

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use utoipa::{IntoParams, ToSchema};

use super::{ApiResult, AppState, JsonBody, QueryParams};
use crate::store::{Answer, PermissionRequest, PermissionStatus, Reply};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/sessions/{id}/permissions", get(list))
        .route("/sessions/{id}/permissions/{request_id}", get(show).post(reply))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PermissionsQuery {
    /// Only requests with this status.
    #[param(inline)]
    status: Option<PermissionStatus>,
}

/// The body of a reply.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplyInput {
    reply: Reply,
    /// Told to the model with a `reject`; kept with the request either way.
    #[serde(default)]
    message: Option<String>,
}

#[utoipa::path(operation_id = "list_permissions", get, path = "/sessions/{id}/permissions", tag = "permissions",
    params(("id" = String, Path), PermissionsQuery),
    responses((status = 200, body = Vec<PermissionRequest>, description = "oldest first"), (status = 404, body = super::ErrorBody),
        (status = 422, body = super::ErrorBody)))]
pub(super) async fn list(
    State(state): State<AppState>,
    Path(id): Path<String>,
    QueryParams(q): QueryParams<PermissionsQuery>,
) -> ApiResult<Json<Vec<PermissionRequest>>> {
    super::runs::session_exists(&state, &id).await?;
    Ok(Json(state.store.permission_requests(&id, q.status).await?))
}

#[utoipa::path(operation_id = "get_permission", get, path = "/sessions/{id}/permissions/{request_id}", tag = "permissions",
    params(("id" = String, Path), ("request_id" = String, Path)),
    responses((status = 200, body = PermissionRequest), (status = 404, body = super::ErrorBody)))]
pub(super) async fn show(
    State(state): State<AppState>,
    Path((id, request_id)): Path<(String, String)>,
) -> ApiResult<Json<PermissionRequest>> {
    Ok(Json(state.store.permission_request(&id, &request_id).await?))
}

#[utoipa::path(operation_id = "reply_permission", post, path = "/sessions/{id}/permissions/{request_id}", tag = "permissions",
    params(("id" = String, Path), ("request_id" = String, Path)), request_body = ReplyInput,
    responses((status = 200, body = PermissionRequest, description = "the request, answered"), (status = 400, body = super::ErrorBody),
        (status = 404, body = super::ErrorBody), (status = 409, body = super::ErrorBody, description = "already answered"),
        (status = 413, body = super::ErrorBody), (status = 415, body = super::ErrorBody), (status = 422, body = super::ErrorBody)))]
pub(super) async fn reply(
    State(state): State<AppState>,
    Path((id, request_id)): Path<(String, String)>,
    JsonBody(input): JsonBody<ReplyInput>,
) -> ApiResult<Json<PermissionRequest>> {
    let status = match input.reply {
        Reply::Once | Reply::Always => PermissionStatus::Approved,
        Reply::Reject => PermissionStatus::Rejected,
    };
    let message = input.message.filter(|m| !m.trim().is_empty());
    let answered = state.store.answer_permission(&id, &request_id, Answer { status, reply: Some(input.reply), message }).await?;
    tracing::info!(session = %id, request = %request_id, reply = input.reply.as_str(), "permission request answered");
    state.approvals.deliver(answered.clone());
    // The run may wait on another host.
    crate::cluster::tell(&state, format!("answer {id} {request_id}")).await;
    Ok(Json(answered))
}
