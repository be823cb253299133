//! `/mcp/servers`: MCP servers whose tools agents use as `SERVER__TOOL`.
//! A tenant registers its own; the admin (or a single-user server's
//! operator) registers server-wide ones that every tenant sees. Header
//! and environment values are write-only: answers show their names.

use std::collections::BTreeMap;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{ApiResult, AppState, JsonBody, Status, status};
use crate::mcp::{SEPARATOR, owner_of};
use crate::store::{McpServerRecord, McpTool, McpTransport, SERVER_KEYS, now};
use crate::tenancy::Caller;

pub fn routes() -> Router<AppState> {
    Router::new().route("/mcp/servers", get(list).post(register)).route("/mcp/servers/{name}", delete(unregister))
}

/// A server to register: `{"name", "transport": "http", "url", "headers"?}`
/// or `{"name", "transport": "stdio", "command", "args"?, "env"?}`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct McpServerCreate {
    /// Letters, digits, `-` and `_` (no `__`); the agent sees its tools as `NAME__TOOL`.
    #[schema(pattern = "^[A-Za-z0-9-]+(_[A-Za-z0-9-]+)*$", min_length = 1, max_length = 40)]
    name: String,
    transport: TransportKind,
    /// `http`: the server's Streamable HTTP endpoint.
    url: Option<String>,
    /// `http`: headers sent with every request (stored encrypted, never shown).
    #[serde(default)]
    headers: BTreeMap<String, String>,
    /// `stdio`: the program to start (looked up in the command `PATH`).
    command: Option<String>,
    #[serde(default)]
    args: Vec<String>,
    /// `stdio`: its environment besides `PATH`, `HOME` and `TMPDIR` (stored encrypted, never shown).
    #[serde(default)]
    env: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    Http,
    Stdio,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct McpServerView {
    name: String,
    /// `server` (every tenant sees it) or `tenant` (the caller's own).
    scope: &'static str,
    #[serde(flatten)]
    transport: McpTransport,
    /// The names of its headers (`http`) or environment variables (`stdio`); never their values.
    secret_names: Vec<String>,
    /// `ready` (its tools were listed).
    state: &'static str,
    /// As agents name them: `NAME__TOOL`.
    tools: Vec<McpToolView>,
    created_at: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct McpToolView {
    pub(super) name: String,
    pub(super) description: String,
    #[schema(value_type = Object)]
    pub(super) input_schema: serde_json::Value,
}

fn view(server: &McpServerRecord) -> McpServerView {
    McpServerView {
        name: server.name.clone(),
        scope: if server.tenant_id == SERVER_KEYS { "server" } else { "tenant" },
        transport: server.transport.clone(),
        secret_names: server.secrets.iter().map(|(k, _)| k.clone()).collect(),
        state: "ready",
        tools: server.tools.iter().map(|t| tool_view(&server.name, t)).collect(),
        created_at: server.created_at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    }
}

fn tool_view(server: &str, tool: &McpTool) -> McpToolView {
    McpToolView { name: format!("{server}{SEPARATOR}{}", tool.name), description: tool.description.clone(), input_schema: tool.input_schema.clone() }
}

/// The tools of every MCP server `caller` may use, for `GET /tools`.
pub(super) async fn tools_of(state: &AppState, caller: &Caller) -> ApiResult<Vec<McpToolView>> {
    let servers = state.mcp.servers(&owner_of(caller)).await?;
    Ok(servers.iter().flat_map(|s| s.tools.iter().map(|t| tool_view(&s.name, t))).collect())
}

#[utoipa::path(operation_id = "list_mcp_servers", get, path = "/mcp/servers", tag = "mcp", responses((status = 200, body = Vec<McpServerView>)))]
pub(super) async fn list(State(state): State<AppState>, caller: Caller) -> ApiResult<Json<Vec<McpServerView>>> {
    let servers = state.mcp.servers(&owner_of(&caller)).await?;
    Ok(Json(servers.iter().map(view).collect()))
}

#[utoipa::path(operation_id = "register_mcp_server", post, path = "/mcp/servers", tag = "mcp", request_body = McpServerCreate,
    responses((status = 201, body = McpServerView, description = "registered; its tools were listed"),
        (status = 400, body = super::ErrorBody, description = "malformed JSON"),
        (status = 413, body = super::ErrorBody), (status = 415, body = super::ErrorBody),
        (status = 409, body = super::ErrorBody, description = "the name is taken"),
        (status = 422, body = super::ErrorBody, description = "refused (its name, its origin, stdio servers not allowed), or the server could not be reached, started or listed")))]
pub(super) async fn register(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(input): JsonBody<McpServerCreate>,
) -> ApiResult<(StatusCode, Json<McpServerView>)> {
    let invalid = |m: &str| super::ApiError::Invalid(m.to_string());
    let (transport, secrets) = match input.transport {
        TransportKind::Http => {
            if input.command.is_some() || !input.args.is_empty() || !input.env.is_empty() {
                return Err(invalid("`command`, `args` and `env` are for `stdio` servers"));
            }
            let url = input.url.ok_or_else(|| invalid("an `http` server needs `url`"))?;
            (McpTransport::Http { url }, input.headers)
        }
        TransportKind::Stdio => {
            if input.url.is_some() || !input.headers.is_empty() {
                return Err(invalid("`url` and `headers` are for `http` servers"));
            }
            let command = input.command.ok_or_else(|| invalid("a `stdio` server needs `command`"))?;
            (McpTransport::Stdio { command, args: input.args }, input.env)
        }
    };
    let record = McpServerRecord {
        tenant_id: owner_of(&caller),
        name: input.name,
        transport,
        secrets: secrets.into_iter().collect(),
        tools: Vec::new(),
        created_at: now(),
    };
    let registered = state.mcp.register(record, matches!(caller, Caller::Tenant(_))).await?;
    Ok((StatusCode::CREATED, Json(view(&registered))))
}

#[utoipa::path(operation_id = "delete_mcp_server", delete, path = "/mcp/servers/{name}", tag = "mcp", params(("name" = String, Path)),
    responses((status = 200, body = Status), (status = 404, body = super::ErrorBody)))]
pub(super) async fn unregister(State(state): State<AppState>, caller: Caller, Path(name): Path<String>) -> ApiResult<Json<Status>> {
    state.mcp.unregister(&owner_of(&caller), &name).await?;
    Ok(status("deleted"))
}
