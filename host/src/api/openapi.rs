//! `GET /openapi.json`: the OpenAPI 3.1 description, generated from the
//! handlers' annotations and the types they use (utoipa).

use axum::routing::get;
use axum::{Json, Router};
use utoipa::OpenApi;

use super::AppState;

#[derive(OpenApi)]
#[openapi(
    info(title = "Hangar", description = "An agent host whose tools and model providers are sandboxed WebAssembly components."),
    paths(
        super::health,
        super::providers::list_providers, super::providers::get_provider, super::providers::get_auth,
        super::providers::put_auth, super::providers::delete_auth, super::providers::list_models, super::providers::get_model,
        super::agents::list, super::agents::create, super::agents::show, super::agents::update, super::agents::remove,
        super::sessions::list, super::sessions::create, super::sessions::show, super::sessions::update, super::sessions::remove,
        super::messages::message, super::messages::stream,
        super::runs::list, super::runs::show, super::runs::cancel, super::runs::abort, super::runs::run_events, super::runs::session_events,
        super::permissions::list, super::permissions::show, super::permissions::reply,
        super::plugins::list, super::plugins::install, super::plugins::remove, super::plugins::reload, super::plugins::tools,
    ),
    components(schemas(super::ErrorBody, super::Status, crate::store::HistoryMessage, crate::store::Block,
        crate::store::RunRecord, crate::store::RunStatus, crate::store::RunFailure, crate::agent::RunEvent,
        crate::permissions::Rule, crate::permissions::Action)),
    tags(
        (name = "health"), (name = "providers", description = "Model providers and their write-only credentials"),
        (name = "agents"), (name = "sessions"), (name = "messages", description = "Messages: each starts a run of the agent loop"),
        (name = "runs", description = "Runs as stored resources, their cancel, and their events (resumable SSE)"),
        (name = "permissions", description = "Tool calls waiting for a person's answer (allow, ask or deny rules)"),
        (name = "plugins", description = "Tool and provider plugins (WebAssembly components)"),
    )
)]
struct ApiDoc;

pub fn routes() -> Router<AppState> {
    Router::new().route("/openapi.json", get(|| async { Json(ApiDoc::openapi()) }))
}
