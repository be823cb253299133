//! The REST API: one module per resource, each with its `routes()`.

mod agents;
mod audit;
mod compaction;
mod console;
pub mod error;
mod mcp;
mod mcp_servers;
mod messages;
mod openapi;
mod permissions;
pub mod page;
mod plugins;
mod providers;
mod runs;
mod security;
mod sessions;
mod tenants;

use std::sync::Arc;

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::Method;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use utoipa::ToSchema;

pub use error::{ApiError, ApiResult, ErrorBody};
pub use plugins::{load_stored, sync_plugins};
pub(crate) use runs::announce_cancelled;

use crate::config::Settings;
use crate::runtime::{Runtime, WorkDirRules};
use crate::store::Store;

/// Largest request body accepted.
pub const BODY_LIMIT: usize = 10 * 1024 * 1024;

/// Shared by every handler. Every middleware and extractor of every request
/// clones it, so it is one `Arc`: a clone is one atomic increment instead
/// of one per `Arc` in the fields (a few percent of a `POST /sessions`).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What [`AppState`] holds.
pub struct Shared {
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
    /// Multi-tenant mode (`--admin-token`): tenant keys and quotas.
    pub tenancy: Option<crate::tenancy::Tenancy>,
    /// MCP servers used as tools.
    pub mcp: crate::mcp::McpHub,
    /// The store's agent list as JSON, for `GET /agents`.
    pub rendered_agents: agents::Rendered,
}

impl AppState {
    pub fn new(
        store: Store,
        runtime: Runtime,
        settings: Settings,
        shutdown: tokio::sync::watch::Receiver<bool>,
        stopping: tokio::sync::watch::Receiver<bool>,
    ) -> AppState {
        // A SQLite file is the server's own; a PostgreSQL database is not a file here.
        let mut files = vec![("the config file", settings.config_path.as_path()), ("the secret key file", &settings.secret_key_file)];
        if let Some(db) = settings.db.path() {
            files.insert(0, ("the database", db));
        }
        let work_dirs = WorkDirRules::new(
            settings.work_roots.clone(),
            &files,
            &[
                ("the compile cache", &settings.cache_dir),
                ("the plugins directory", &settings.plugins_dir),
                ("the installed plugins", &settings.installed_dir),
            ],
        );
        let tenancy = match (&settings.admin_token, &settings.tenant_root) {
            (Some(token), Some(root)) => {
                Some(crate::tenancy::Tenancy::new(token.clone(), store.clone(), root.clone(), settings.tenants.quotas, settings.uid_range))
            }
            _ => None,
        };
        let mcp = crate::mcp::McpHub::new(store.clone(), runtime.clone(), settings.mcp.clone(), settings.policy.commands.clone());
        AppState(Arc::new(Shared {
            tenancy,
            mcp,
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
            rendered_agents: Default::default(),
        }))
    }
}

/// A JSON request body, read in three checks so that each fault gets its
/// own status: a `Content-Type` that is not JSON is 415, a body over the
/// limit 413, bad syntax (`[1,2`) 400 whatever `T` is; then a body that is
/// not a JSON object (every body of this API is one), a wrong type or a
/// missing field is 422.
pub struct JsonBody<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        if !json_content_type(req.headers()) {
            return Err(ApiError::UnsupportedMediaType);
        }
        let bytes = axum::body::Bytes::from_request(req, state).await?;
        // Syntax first: `IgnoredAny` accepts any well-formed JSON, so
        // whatever fails here is a syntax error, never a type error.
        let _syntax_ok = Json::<serde::de::IgnoredAny>::from_bytes(&bytes)?;
        let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
        if first != Some(&b'{') {
            return Err(ApiError::Invalid("the body must be a JSON object".into()));
        }
        let Json(value) = Json::<T>::from_bytes(&bytes)?;
        Ok(JsonBody(value))
    }
}

/// `application/json`, or `application/SOMETHING+json`, with any parameters.
fn json_content_type(headers: &axum::http::HeaderMap) -> bool {
    let Some(value) = headers.get(axum::http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return false;
    };
    let essence = value.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
}

/// A JSON object inside a body, read as `T`. Serde reads a struct from an
/// array too (`[null, null]` as the struct's fields in order), which the
/// document does not allow: this reads an object or nothing.
#[derive(Debug)]
pub struct Object<T>(pub T);

impl<'de, T: serde::de::DeserializeOwned> serde::Deserialize<'de> for Object<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = serde_json::Map::<String, serde_json::Value>::deserialize(d)?;
        // The inner field's name stays in the message (`provider: max_tokens: ...`).
        serde_path_to_error::deserialize(serde_json::Value::Object(map))
            .map(Object)
            .map_err(|e| serde::de::Error::custom(format!("{}: {}", e.path(), e.inner())))
    }
}

/// A query string read as `T`; a value of the wrong type is a 422.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct QueryParams<T>(pub T);

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
    let security = security::Security::new(&state.settings, state.tenancy.clone());
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .merge(openapi::routes())
        .merge(providers::routes())
        .merge(agents::routes())
        .merge(sessions::routes())
        .merge(compaction::routes())
        .merge(messages::routes())
        .merge(runs::routes())
        .merge(permissions::routes())
        .merge(plugins::routes())
        .merge(tenants::routes())
        .merge(mcp::routes(&state))
        .merge(mcp_servers::routes())
        // After routing: the route's template and `{id}` are known.
        .merge(console::routes())
        // After routing: the route's template and `{id}` are known.
        .merge(audit::routes())
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), routed))
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .layer(security.cors_layer())
        .layer(axum::middleware::from_fn_with_state(Arc::new(security), observe))
}

// The checks around a request are one middleware before CORS and one after
// routing, not one each: every layer boxes and moves the request's future,
// which showed in profiles of `POST /sessions`.

/// After routing, where the route's template and `{id}` are known: a tenant
/// reaches only its own ids, then a change is audited.
async fn routed(axum::extract::State(state): axum::extract::State<AppState>, caller: crate::tenancy::Caller, req: Request, next: axum::middleware::Next) -> axum::response::Response {
    match tenants::owned(&state, &caller, req).await {
        Ok(req) => audit::record(&state, &caller, req, next).await,
        Err(refused) => refused,
    }
}

/// Counts and logs every request, once it is answered: one line with its
/// method, route template (never the ids in the path), status and duration.
/// The security guard runs inside it, so refused requests are logged too.
async fn observe(axum::extract::State(security): axum::extract::State<Arc<security::Security>>, req: Request, next: axum::middleware::Next) -> axum::response::Response {
    let method = req.method().clone();
    let route = req.extensions().get::<axum::extract::MatchedPath>().map(|m| m.as_str().to_owned());
    let route = route.as_deref().unwrap_or("(no route)").to_owned();
    let started = std::time::Instant::now();
    let response = security::guard(&security, req, next).await;
    let elapsed = started.elapsed();
    let status = response.status().as_u16();
    crate::telemetry::http_request(method.as_str(), &route, status, elapsed);
    // The tenant the guard resolved (multi-tenant mode), never its key.
    let tenant = match response.extensions().get::<crate::tenancy::Caller>() {
        Some(crate::tenancy::Caller::Tenant(id)) => Some(id.as_str()),
        Some(crate::tenancy::Caller::Operator) => Some("(admin)"),
        None => None,
    };
    tracing::info!(target: "hangar::http", method = %method, route = %route, status, tenant, duration_ms = elapsed.as_secs_f64() * 1000.0, "request");
    response
}

/// Metrics in the Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "health",
    responses((status = 200, content_type = "text/plain; version=0.0.4", body = String,
        description = "Prometheus text exposition: runs, steps, tools, tokens, streams, compile cache, HTTP requests")))]
pub(super) async fn metrics() -> impl axum::response::IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], crate::telemetry::render())
}

/// Runs a run claimed for this host (by `crate::cluster`).
pub fn launch_claimed(state: &AppState, session: &str, claim: crate::agent::Claim) {
    messages::launch(state.clone(), session.to_string(), messages::Start::queued(claim));
}

/// Installed plugins changed on another host.
pub async fn plugins_changed(state: &AppState) {
    match plugins::sync_plugins(state).await {
        Ok(changed) => tracing::info!(changed, "plugins installed through another host are loaded"),
        Err(err) => tracing::error!(%err, "cannot load the plugins another host installed"),
    }
}

/// Starts the runs a stop left queued, in the order they were submitted.
/// On a shared database the hosts' upkeep starts them instead, each once.
pub async fn start_queued_runs(state: &AppState) -> Result<(), crate::store::StoreError> {
    if state.store.is_shared() {
        return Ok(());
    }
    for run in state.store.queued_runs().await? {
        if let Ok(Some(claim)) = state.runs.claim_or(&run.session_id, &run.id, crate::agent::Busy::Enqueue) {
            messages::launch(state.clone(), run.session_id.clone(), messages::Start::queued(claim));
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
