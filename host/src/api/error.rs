//! The API's one error type. HTTP statuses are chosen here and nowhere else.

use axum::Json;
use axum::extract::multipart::{MultipartError, MultipartRejection};
use axum::extract::rejection::{BytesRejection, JsonRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::runtime::{RuntimeError, WorkDirError};
use crate::store::StoreError;

/// `Retry-After` of a refused plugin upload.
const RETRY_UPLOAD_SECS: u64 = 5;

/// The body of every error response.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// What went wrong, for a person.
    pub error: String,
    /// A stable machine-readable code.
    pub code: &'static str,
    /// `quota_exceeded`: which quota, its limit and what is used.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub quota: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub limit: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub used: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    #[error("the body must be JSON, sent with `Content-Type: application/json`")]
    UnsupportedMediaType,
    #[error("malformed multipart body: {0}")]
    MalformedForm(String),
    #[error("the body is larger than the limit of {limit} bytes")]
    TooLarge { limit: usize },
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("no route for {method} {path}")]
    NoRoute { method: String, path: String },
    #[error("method {method} is not allowed on {path}")]
    MethodNotAllowed { method: String, path: String },
    #[error("{0}")]
    Conflict(String),
    /// A cursor older than the events kept.
    #[error("{0}")]
    Gone(String),
    #[error("missing or wrong API token or tenant key: send `Authorization: Bearer <token>`")]
    Unauthorized,
    #[error("{0}")]
    Quota(#[from] crate::tenancy::QuotaExceeded),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Provider(String),
    /// A run that ended in failure, for the endpoint that waited for it;
    /// `code` is its `error` event's.
    #[error("{message}")]
    RunFailed { run_id: String, code: String, message: String },
    #[error("too many connections open from {client}: at most {limit} at once")]
    TooManyConnections { client: String, limit: usize },
    #[error("{limit} plugin uploads are already being received; try again in {RETRY_UPLOAD_SECS} s")]
    TooManyUploads { limit: usize },
    #[error("{0}")]
    Plugin(#[from] RuntimeError),
    #[error("{0}")]
    WorkDir(#[from] WorkDirError),
    /// An MCP server refused at registration, or failing its first listing.
    #[error("{0}")]
    Mcp(crate::mcp::McpError),
    /// A stored provider key that the server key cannot open.
    #[error("{0}")]
    KeyUnreadable(String),
    #[error("{0}")]
    Store(StoreError),
    /// The database cannot be reached now (PostgreSQL down, restarting, or
    /// out of connections): the request may succeed when tried again.
    #[error("{0}")]
    DatabaseUnavailable(StoreError),
    #[error("{0}")]
    Internal(String),
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::NotFound { .. } => ApiError::NotFound(err.to_string()),
            StoreError::Answered { .. } | StoreError::KeyTaken { .. } | StoreError::NameTaken { .. } | StoreError::SessionBusy { .. } => {
                ApiError::Conflict(err.to_string())
            }
            StoreError::Quota { quota, limit, used } => ApiError::Quota(crate::tenancy::QuotaExceeded::from_store(quota, limit, used)),
            other if other.is_unavailable() => ApiError::DatabaseUnavailable(other),
            other => ApiError::Store(other),
        }
    }
}

impl From<crate::mcp::McpError> for ApiError {
    fn from(err: crate::mcp::McpError) -> Self {
        match err {
            crate::mcp::McpError::Store(err) => err.into(),
            other => ApiError::Mcp(other),
        }
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        match rejection {
            JsonRejection::JsonDataError(e) => ApiError::Invalid(e.body_text()),
            JsonRejection::JsonSyntaxError(e) => ApiError::MalformedJson(e.body_text()),
            JsonRejection::MissingJsonContentType(_) => ApiError::UnsupportedMediaType,
            JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                ApiError::TooLarge { limit: super::BODY_LIMIT }
            }
            other => ApiError::MalformedJson(other.body_text()),
        }
    }
}

impl From<BytesRejection> for ApiError {
    fn from(rejection: BytesRejection) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge { limit: super::BODY_LIMIT }
        } else {
            ApiError::MalformedJson(rejection.body_text())
        }
    }
}

/// A query string that does not fit the route's parameters: a value of the
/// wrong type is an invalid value (422), as in a body.
impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        ApiError::Invalid(rejection.body_text())
    }
}

impl From<MultipartRejection> for ApiError {
    fn from(rejection: MultipartRejection) -> Self {
        match rejection {
            MultipartRejection::InvalidBoundary(_) => ApiError::MalformedForm(
                "send `multipart/form-data` with a boundary (fields `manifest` and `wasm`)".into(),
            ),
            other => ApiError::MalformedForm(other.body_text()),
        }
    }
}

impl From<MultipartError> for ApiError {
    fn from(err: MultipartError) -> Self {
        if err.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::TooLarge { limit: super::plugins::PLUGIN_BODY_LIMIT }
        } else {
            ApiError::MalformedForm(err.body_text())
        }
    }
}

impl ApiError {
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::MalformedJson(_) => (StatusCode::BAD_REQUEST, "malformed_json"),
            ApiError::UnsupportedMediaType => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type"),
            ApiError::MalformedForm(_) => (StatusCode::BAD_REQUEST, "malformed_body"),
            ApiError::TooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large"),
            ApiError::Invalid(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
            ApiError::WorkDir(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
            ApiError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            ApiError::NoRoute { .. } => (StatusCode::NOT_FOUND, "no_route"),
            ApiError::MethodNotAllowed { .. } => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
            ApiError::Gone(_) => (StatusCode::GONE, "resync_required"),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Quota(_) => (StatusCode::TOO_MANY_REQUESTS, "quota_exceeded"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::Provider(_) => (StatusCode::BAD_GATEWAY, "provider_error"),
            ApiError::RunFailed { code, .. } => match code.as_str() {
                "provider_error" => (StatusCode::BAD_GATEWAY, "provider_error"),
                "plugin_refused" => (StatusCode::UNPROCESSABLE_ENTITY, "plugin_refused"),
                "unknown_plugin" => (StatusCode::UNPROCESSABLE_ENTITY, "unknown_plugin"),
                "not_found" => (StatusCode::NOT_FOUND, "not_found"),
                "invalid_request" => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
                "interrupted" => (StatusCode::SERVICE_UNAVAILABLE, "interrupted"),
                "plugin_failed" => (StatusCode::BAD_GATEWAY, "plugin_failed"),
                "key_unreadable" => (StatusCode::SERVICE_UNAVAILABLE, "key_unreadable"),
                "quota_exceeded" => (StatusCode::TOO_MANY_REQUESTS, "quota_exceeded"),
                "answer_too_large" => (StatusCode::BAD_GATEWAY, "answer_too_large"),
                _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            },
            ApiError::TooManyConnections { .. } => (StatusCode::TOO_MANY_REQUESTS, "too_many_connections"),
            ApiError::TooManyUploads { .. } => (StatusCode::TOO_MANY_REQUESTS, "too_many_uploads"),
            ApiError::Plugin(err) => match err {
                RuntimeError::NotFound(_) | RuntimeError::WrongKind { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "unknown_plugin"),
                RuntimeError::Manifest { .. } | RuntimeError::UploadedManifest { .. } | RuntimeError::CapabilityDenied { .. } | RuntimeError::Clash { .. } | RuntimeError::Load { .. }
                | RuntimeError::CompileLimit { .. } => {
                    (StatusCode::UNPROCESSABLE_ENTITY, "plugin_refused")
                }
                // The server is busy, not the plugin at fault: try again.
                RuntimeError::ServerMemory { .. } | RuntimeError::Instances { .. } => (StatusCode::SERVICE_UNAVAILABLE, "server_busy"),
                _ => (StatusCode::BAD_GATEWAY, "plugin_failed"),
            },
            ApiError::Mcp(err) => match err {
                crate::mcp::McpError::Failed { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "mcp_server_failed"),
                _ => (StatusCode::UNPROCESSABLE_ENTITY, "invalid_request"),
            },
            ApiError::KeyUnreadable(_) => (StatusCode::SERVICE_UNAVAILABLE, "key_unreadable"),
            ApiError::DatabaseUnavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "database_unavailable"),
            ApiError::Store(_) | ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        }
    }

    pub fn body(&self) -> ErrorBody {
        let quota = match self {
            ApiError::Quota(q) => Some(q),
            _ => None,
        };
        ErrorBody {
            error: self.to_string(),
            code: self.status_and_code().1,
            quota: quota.map(|q| q.quota),
            limit: quota.map(|q| q.limit),
            used: quota.map(|q| q.used),
        }
    }

    /// Seconds after which the client may try again (`Retry-After`).
    pub fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::TooManyUploads { .. } => Some(RETRY_UPLOAD_SECS),
            ApiError::DatabaseUnavailable(_) => Some(1),
            ApiError::Quota(q) => Some(q.retry_after),
            ApiError::RunFailed { code, .. } if code == "quota_exceeded" => Some(crate::tenancy::until_midnight()),
            _ => None,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, _) = self.status_and_code();
        if status.is_server_error() {
            tracing::error!(error = %self, "request failed");
        }
        let mut response = (status, Json(self.body())).into_response();
        if let Some(secs) = self.retry_after() {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        response
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_that_cannot_be_reached_is_503_and_may_be_tried_again() {
        let err = ApiError::from(StoreError::PgPool("error connecting to server: Connection refused".into()));
        assert_eq!(err.status_and_code(), (StatusCode::SERVICE_UNAVAILABLE, "database_unavailable"));
        assert_eq!(err.retry_after(), Some(1));
        let broken = ApiError::from(StoreError::Time("yesterday".into()));
        assert_eq!(broken.status_and_code(), (StatusCode::INTERNAL_SERVER_ERROR, "internal"), "bad stored data is a bug");
    }
}
