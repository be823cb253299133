//! The REST API: one module per resource, each with its `routes()`.

mod agents;
pub mod error;
mod messages;
mod openapi;
mod permissions;
mod plugins;
mod providers;
mod runs;
mod security;
mod sessions;

use std::sync::Arc;

use axum::extract::{FromRequest, Request};
use axum::http::Method;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use utoipa::ToSchema;

pub use error::{ApiError, ApiResult, ErrorBody};

use crate::config::Settings;
use crate::runtime::{Runtime, WorkDirRules};
use crate::store::Store;

/// Largest request body accepted.
pub const BODY_LIMIT: usize = 10 * 1024 * 1024;

/// Shared by every handler; a clone of `Arc`s.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub runtime: Runtime,
    pub settings: Arc<Settings>,
    pub runs: crate::agent::Runs,
    pub models: providers::ModelsCache,
    /// Every session's events: live, and stored for replay.
    pub bus: crate::agent::Bus,
    /// Tool calls waiting for a person's answer.
    pub approvals: crate::agent::Approvals,
    /// Which directories sessions may use.
    pub work_dirs: Arc<WorkDirRules>,
    /// Becomes `true` when running steps must stop (shutdown grace is over).
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// Becomes `true` when the server starts to stop: event followers end.
    pub stopping: tokio::sync::watch::Receiver<bool>,
    /// Plugin uploads being received (`POST /plugins`), at most
    /// [`plugins::MAX_CONCURRENT_UPLOADS`] at once.
    pub uploads: Arc<tokio::sync::Semaphore>,
}

impl AppState {
    pub fn new(
        store: Store,
        runtime: Runtime,
        settings: Settings,
        shutdown: tokio::sync::watch::Receiver<bool>,
        stopping: tokio::sync::watch::Receiver<bool>,
    ) -> AppState {
        let work_dirs = WorkDirRules::new(
            settings.work_roots.clone(),
            &[("the database", &settings.db), ("the config file", &settings.config_path), ("the secret key file", &settings.secret_key_file)],
            &[
                ("the compile cache", &settings.cache_dir),
                ("the plugins directory", &settings.plugins_dir),
                ("the installed plugins", &settings.installed_dir),
            ],
        );
        AppState {
            bus: crate::agent::Bus::new(store.clone()),
            work_dirs: Arc::new(work_dirs),
            store,
            runtime,
            settings: Arc::new(settings),
            runs: Default::default(),
            approvals: Default::default(),
            models: Default::default(),
            shutdown,
            stopping,
            uploads: Arc::new(tokio::sync::Semaphore::new(plugins::MAX_CONCURRENT_UPLOADS)),
        }
    }
}

/// A JSON request body whose rejections become [`ApiError`]s (400 for bad
/// syntax, 415 for a wrong content type, 413 when too large, 422 for wrong
/// types or missing fields).
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct JsonBody<T>(pub T);

/// A value of a JSON body read as `T`: wrong types and missing fields are
/// a 422 naming the field, as with [`JsonBody`].
pub fn from_json<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> ApiResult<T> {
    serde_json::from_value(value).map_err(|e| ApiError::Invalid(format!("invalid body: {e}")))
}

/// `{"status": "..."}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Status {
    pub status: &'static str,
}

pub fn status(status: &'static str) -> Json<Status> {
    Json(Status { status })
}

pub fn router(state: AppState) -> Router {
    let security = security::Security::from_settings(&state.settings);
    Router::new()
        .route("/health", get(health))
        .merge(openapi::routes())
        .merge(providers::routes())
        .merge(agents::routes())
        .merge(sessions::routes())
        .merge(messages::routes())
        .merge(runs::routes())
        .merge(permissions::routes())
        .merge(plugins::routes())
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .layer(security.cors_layer())
        .layer(axum::middleware::from_fn_with_state(Arc::new(security), security::guard))
}

/// Starts the runs a stop left queued, in the order they were submitted.
pub async fn start_queued_runs(state: &AppState) -> Result<(), crate::store::StoreError> {
    for run in state.store.queued_runs().await? {
        if let Ok(Some(claim)) = state.runs.claim_or(&run.session_id, &run.id, crate::agent::Busy::Enqueue) {
            messages::launch(state.clone(), run.session_id.clone(), messages::Start { claim, request: None });
        }
    }
    Ok(())
}

/// Liveness: answers at once, even while plugins are still compiling.
#[utoipa::path(get, path = "/health", tag = "health", responses((status = 200, body = Status)))]
pub(super) async fn health() -> Json<Status> {
    status("ok")
}

async fn no_route(method: Method, req: Request) -> ApiError {
    ApiError::NoRoute { method: method.to_string(), path: req.uri().path().to_string() }
}

async fn method_not_allowed(method: Method, req: Request) -> ApiError {
    ApiError::MethodNotAllowed { method: method.to_string(), path: req.uri().path().to_string() }
}

/// A new ULID.
pub fn new_id() -> String {
    ulid::Ulid::new().to_string()
}
