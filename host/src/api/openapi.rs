//! `GET /openapi.json`: the OpenAPI 3.1 description, generated from the
//! handlers' annotations and the types they use (utoipa).

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Map, Value, json};
use utoipa::OpenApi;

use super::{ApiError, ApiResult, AppState};
use crate::runtime::Kind;

#[derive(OpenApi)]
#[openapi(
    info(title = "Hangar", description = "An agent host whose tools and model providers are sandboxed WebAssembly components."),
    paths(
        super::health, super::metrics,
        super::providers::list_providers, super::providers::get_provider, super::providers::get_auth,
        super::providers::put_auth, super::providers::delete_auth, super::providers::list_models, super::providers::get_model,
        super::agents::list, super::agents::create, super::agents::show, super::agents::update, super::agents::remove,
        super::sessions::list, super::sessions::create, super::sessions::show, super::sessions::update, super::sessions::remove,
        super::compaction::show, super::compaction::compact,
        super::messages::message, super::messages::stream,
        super::runs::list, super::runs::show, super::runs::cancel, super::runs::abort, super::runs::run_events, super::runs::session_events,
        super::permissions::list, super::permissions::show, super::permissions::reply,
        super::plugins::list, super::plugins::install, super::plugins::remove, super::plugins::reload, super::plugins::tools,
        super::tenants::create, super::tenants::list, super::tenants::show, super::tenants::update, super::tenants::remove,
        super::tenants::add_key, super::tenants::revoke_key, super::tenants::tenant_usage, super::tenants::usage,
        super::audit::list,
        super::mcp_servers::list, super::mcp_servers::register, super::mcp_servers::unregister,
    ),
    components(schemas(super::ErrorBody, super::Status, crate::store::HistoryMessage, crate::store::Block,
        crate::store::RunRecord, crate::store::RunStatus, crate::store::RunFailure, crate::agent::RunEvent,
        crate::permissions::Rule, crate::permissions::Action)),
    tags(
        (name = "health", description = "Liveness and metrics"), (name = "providers", description = "Model providers and their write-only credentials"),
        (name = "agents"), (name = "sessions"), (name = "messages", description = "Messages: each starts a run of the agent loop"),
        (name = "runs", description = "Runs as stored resources, their cancel, and their events (resumable SSE)"),
        (name = "permissions", description = "Tool calls waiting for a person's answer (allow, ask or deny rules)"),
        (name = "plugins", description = "Tool and provider plugins (WebAssembly components)"),
        (name = "mcp", description = "MCP servers whose tools agents use as SERVER__TOOL"),
        (name = "audit", description = "Every change made through the API: who, what, when, from where"),
        (name = "tenants", description = "Multi-tenant mode (--admin-token): tenants, their keys and quotas (admin token only), and usage"),
    )
)]
struct ApiDoc;

pub fn routes() -> Router<AppState> {
    Router::new().route("/openapi.json", get(document))
}

/// The document of this server: the static description, with what only
/// the running server knows filled in, so that every request the document
/// calls valid is one the server can take: the loaded tool and provider
/// names (as enums), each provider's credential fields, the `work_dir`s its
/// work roots allow, and the token that guards every route.
async fn document(State(state): State<AppState>) -> ApiResult<Json<Value>> {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).map_err(|e| ApiError::Internal(e.to_string()))?;
    let mut tools: Vec<String> = Vec::new();
    for plugin in state.runtime.plugins() {
        if plugin.manifest.kind == Kind::Tool {
            tools.push(plugin.id().to_string());
        }
    }
    tools.sort();
    let providers = super::providers::providers(&state).await?;
    let provider_ids: Vec<&str> = providers.iter().map(|(p, _)| p.id()).collect();

    let schemas = &mut doc["components"]["schemas"];
    schemas["AgentCreate"]["properties"]["tools"]["items"]["enum"] = json!(tools);
    schemas["AgentInput"]["properties"]["tools"]["items"]["enum"] = json!(tools);
    schemas["AgentCreate"]["properties"]["tools"]["uniqueItems"] = json!(true);
    // A permission rule names a loaded tool, or `*` for every tool.
    let mut rule_tools = vec!["*".to_string()];
    rule_tools.extend(tools.iter().cloned());
    schemas["Rule"]["properties"]["tool"]["enum"] = json!(rule_tools);
    schemas["AgentInput"]["properties"]["tools"]["uniqueItems"] = json!(true);
    schemas["ProviderCreate"]["properties"]["id"]["enum"] = json!(provider_ids);
    let mut nullable_ids = json!(provider_ids);
    nullable_ids.as_array_mut().into_iter().for_each(|ids| ids.push(Value::Null));
    schemas["ProviderInput"]["properties"]["id"]["enum"] = nullable_ids;

    // `PUT /provider/auth`: one entry per provider, with the fields it takes.
    let mut by_provider = Map::new();
    for (plugin, info) in &providers {
        let base_url = json!({"type": ["string", "null"], "pattern": BASE_URL_PATTERN, "maxLength": 2000,
            "description": "Where to send requests instead of the vendor's public endpoint (http or https); `null` goes back to the default"});
        let entry = if info.auth_types.is_empty() {
            json!({"type": "object", "additionalProperties": false, "description": "takes no credentials",
                "properties": {"base_url": base_url, "type": {"type": "null"}, "key": {"type": "null"}}})
        } else {
            let mut types = json!(info.auth_types);
            types.as_array_mut().into_iter().for_each(|t| t.push(Value::Null));
            json!({"type": "object", "additionalProperties": false,
                "properties": {
                    "type": {"type": ["string", "null"], "enum": types},
                    "key": {"type": ["string", "null"], "minLength": 1, "pattern": "\\S", "description": "Write-only"},
                    "base_url": base_url}})
        };
        by_provider.insert(plugin.id().to_string(), entry);
    }
    schemas["AuthUpdate"]["properties"]["providers"] =
        json!({"type": "object", "properties": by_provider, "additionalProperties": false});

    // `u32` has no JSON Schema format of its own (utoipa says int32).
    for (schema, nullable) in [("ProviderCreate", true), ("ProviderInput", true)] {
        let types = if nullable { json!(["integer", "null"]) } else { json!("integer") };
        schemas[schema]["properties"]["max_tokens"] = json!({"type": types, "minimum": 1, "maximum": u32::MAX});
        schemas[schema]["properties"]["context_window"] = json!({"type": types, "minimum": 1, "maximum": u32::MAX,
            "description": schemas[schema]["properties"]["context_window"]["description"].clone()});
    }
    // A multipart upload has exactly its two fields.
    schemas["PluginUpload"]["additionalProperties"] = json!(false);
    // An SSE event as the wire has it: its `data` is a RunEvent in JSON.
    schemas["SseEvent"] = json!({
        "type": "object", "required": ["event", "data"],
        "description": "One Server-Sent Event; `data` is a RunEvent as JSON, `id` its seq (none on resync_required)",
        "properties": {
            "event": {"type": "string", "enum": ["text", "tool_use", "tool_result", "permission_request", "permission_replied", "compaction", "done", "error", "resync_required"]},
            "data": {"type": "string", "contentMediaType": "application/json", "contentSchema": {"$ref": "#/components/schemas/RunEvent"}},
            "id": {"type": "string", "pattern": "^[0-9]+$"},
            "retry": {"type": "integer"}}});

    // Multi-tenant mode also takes paths relative to the tenant's directory.
    if state.tenancy.is_none() {
        schemas["SessionInput"]["properties"]["work_dir"]["pattern"] = json!(work_dir_pattern(&state.settings.work_roots));
    }
    schemas["SessionInput"]["properties"]["work_dir"]["maxLength"] = json!(2048);

    // The body of a compaction on demand may be left out.
    doc["paths"]["/sessions/{id}/compact"]["post"]["requestBody"]["required"] = json!(false);

    finish_operations(&mut doc, state.settings.token.is_some() || state.settings.admin_token.is_some());
    Ok(Json(doc))
}

/// An http(s) URL with a host name (letters first in each label, so that
/// no label reads as a number or a punycode label), an optional port and
/// a plain path.
const BASE_URL_PATTERN: &str = r"^https?://[a-z][a-z0-9]{0,30}(\.[a-z][a-z0-9]{0,30}){0,4}(:[1-9][0-9]{0,3})?(/[A-Za-z0-9._~-]{0,30}){0,4}$";

/// An absolute path inside one of the work roots (any absolute path when
/// there are none), without `.` or `..` components or NUL bytes, with
/// components of at most 63 characters (252 bytes: under any file system's
/// name limit).
fn work_dir_pattern(roots: &[std::path::PathBuf]) -> String {
    let component = r"(/([^/.\x00][^/\x00]{0,62}|\.[^/.\x00][^/\x00]{0,61}|\.\.[^/\x00]{1,61}))";
    let roots: Vec<String> = roots.iter().map(|r| regex_escape(&r.to_string_lossy())).collect();
    match roots.len() {
        0 => format!("^{component}*/?$"),
        _ => format!("^({}){component}*/?$", roots.join("|")),
    }
}

fn regex_escape(text: &str) -> String {
    text.chars()
        .map(|c| if r"\.+*?()|[]{}^$".contains(c) { format!("\\{c}") } else { c.to_string() })
        .collect()
}

/// What holds for every operation:
///
/// - it may be refused before its handler runs: 403 (a browser origin that
///   is not allowed, or a `Host` that is not this server's), 429 (too many
///   connections from one client), and 401 without the token, when the
///   server has one (`/health` excepted);
/// - a query or header parameter is absent or has a value: `null` is not a
///   value of one (utoipa marks an `Option` nullable);
/// - an SSE response's schema describes each event (`SseEvent`).
fn finish_operations(doc: &mut Value, token: bool) {
    let error = json!({"content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}});
    if token {
        doc["components"]["securitySchemes"] = json!({"token": {"type": "http", "scheme": "bearer"}});
    }
    let Some(paths) = doc["paths"].as_object_mut() else { return };
    for (path, item) in paths.iter_mut() {
        let Some(item) = item.as_object_mut() else { continue };
        for operation in item.values_mut() {
            if let Some(parameters) = operation.get_mut("parameters").and_then(Value::as_array_mut) {
                for parameter in parameters {
                    if let Some(types) = parameter["schema"]["type"].as_array_mut() {
                        types.retain(|t| t != "null");
                        if types.len() == 1 {
                            parameter["schema"]["type"] = types[0].clone();
                        }
                    }
                }
            }
            let Some(responses) = operation.get_mut("responses").and_then(Value::as_object_mut) else { continue };
            for response in responses.values_mut() {
                if let Some(sse) = response.pointer_mut("/content/text~1event-stream") {
                    sse["schema"] = json!({"$ref": "#/components/schemas/SseEvent"});
                }
            }
            for (status, description) in [("403", "refused: browser origin or Host not allowed"), ("429", "too many connections from this client")] {
                let mut response = error.clone();
                response["description"] = json!(description);
                responses.entry(status).or_insert(response);
            }
            if token && path != "/health" {
                let mut response = error.clone();
                response["description"] = json!("missing or wrong API token");
                responses.entry("401").or_insert(response);
                operation["security"] = json!([{"token": []}]);
            }
        }
    }
}
