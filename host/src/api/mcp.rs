//! `/sessions/{id}/mcp`: the session's tools over the Model Context
//! Protocol (Streamable HTTP), for any MCP client. A call goes through what
//! an agent's call goes through: the tenant's plugins, the session's
//! working directory opened with the tenant's uid, the permission rules
//! (the server's, and the agent's with `?agent_id=`) and the session's
//! grants, the storage quota; and it is recorded as the session's events.
//!
//! The route's guard (token or tenant key, Host and Origin) and the
//! ownership check (another tenant's session is a 404) run before this
//! module sees the request, as on every route.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use axum::Router;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, ElicitRequestParams, ElicitationAction,
    ElicitationSchema, Implementation, ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, RoleServer, ServerHandler};
use serde::Deserialize;

use super::{ApiResult, AppState, QueryParams, new_id};
use crate::agent::RunEvent;
use crate::permissions::{Compiled, Decision};
use crate::runtime::{Kind, Plugin};
use crate::store::StoreError;

pub fn routes(state: &AppState) -> Router<AppState> {
    // The guard checks Host and Origin for every route, with the server's
    // own settings (`--host`, `--cors-origin`): rmcp's checks would only
    // repeat them with a narrower list.
    let cancel = tokio_util::sync::CancellationToken::new();
    let config = StreamableHttpServerConfig::default()
        .disable_allowed_hosts()
        .disable_allowed_origins()
        .with_max_request_body_bytes(super::BODY_LIMIT)
        .with_cancellation_token(cancel.clone());
    // Open streams end when the server starts to stop, so that its
    // graceful shutdown does not wait for MCP clients to hang up.
    let mut stopping = state.stopping.clone();
    tokio::spawn(async move {
        let _ = stopping.wait_for(|s| *s).await;
        cancel.cancel();
    });
    let handler_state = state.clone();
    let service = StreamableHttpService::new(
        move || Ok(Hangar { state: handler_state.clone() }),
        Arc::new(LocalSessionManager::default()),
        config,
    );
    Router::new().route(
        "/sessions/{id}/mcp",
        any(move |state: State<AppState>, path: Path<String>, query: QueryParams<McpQuery>, req: Request| {
            mcp(state, path, query, req, service.clone())
        }),
    )
}

/// `?tools=read,grep` narrows the tools; `?agent_id=` applies that agent's
/// tool list and permission rules too.
#[derive(Debug, Default, Deserialize)]
pub struct McpQuery {
    tools: Option<String>,
    agent_id: Option<String>,
}

/// What one request may use, settled before the MCP layer sees it; the
/// handler reads it from the request's parts, as rmcp passes them on.
#[derive(Clone)]
struct Scope {
    session: String,
    tenant: String,
    work_dir: Option<String>,
    /// The agent's tool names, with `?agent_id=`.
    agent_tools: Option<Vec<String>>,
    /// The agent's rules, compiled.
    rules: Arc<Vec<Compiled>>,
    /// `?tools=`.
    only: Option<Vec<String>>,
}

async fn mcp(
    State(state): State<AppState>,
    Path(id): Path<String>,
    QueryParams(query): QueryParams<McpQuery>,
    mut req: Request,
    service: StreamableHttpService<Hangar, LocalSessionManager>,
) -> ApiResult<Response> {
    let (work_dir, tenant) =
        state.store.session_work_dir(&id).await?.ok_or_else(|| StoreError::NotFound { kind: "session", id: id.clone() })?;
    let (agent_tools, rules) = match &query.agent_id {
        Some(agent_id) => {
            let agent = super::messages::owned_agent(&state, agent_id, &tenant).await?;
            let rules = crate::permissions::compile(&agent.permissions, crate::permissions::Origin::Agent)
                .map_err(|e| super::ApiError::Invalid(format!("agent `{}`: {e}", agent.id)))?;
            (Some(agent.tools), rules)
        }
        None => (None, Vec::new()),
    };
    let only = query.tools.map(|t| t.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect());
    req.extensions_mut().insert(Scope { session: id, tenant, work_dir, agent_tools, rules: Arc::new(rules), only });
    let response = service.handle(req).await;
    Ok(response.map(axum::body::Body::new).into_response())
}

/// The MCP server of every session (one instance per MCP session; what it
/// serves comes with each request's [`Scope`]).
#[derive(Clone)]
struct Hangar {
    state: AppState,
}

/// Why a request reached the handler without its scope (never, when the
/// route is the only way in).
fn scope(context: &RequestContext<RoleServer>) -> Result<Scope, ErrorData> {
    context
        .extensions
        .get::<axum::http::request::Parts>()
        .and_then(|parts| parts.extensions.get::<Scope>())
        .cloned()
        .ok_or_else(|| ErrorData::internal_error("the request has no session", None))
}

impl Hangar {
    /// The tools the scope may use, each as the session's tenant resolves
    /// its name (a server-wide plugin before the tenant's own).
    fn tools(&self, scope: &Scope) -> Vec<Arc<Plugin>> {
        let runtime = &self.state.runtime;
        let mut names: Vec<String> = runtime
            .plugins_for(&scope.tenant)
            .into_iter()
            .filter(|p| p.manifest.kind == Kind::Tool)
            .map(|p| p.manifest.name.clone())
            .collect();
        names.sort();
        names.dedup();
        names
            .into_iter()
            .filter(|name| scope.agent_tools.as_ref().is_none_or(|tools| tools.contains(name)))
            .filter(|name| scope.only.as_ref().is_none_or(|only| only.contains(name)))
            .filter_map(|name| runtime.resolve(&scope.tenant, &name))
            .filter(|p| p.manifest.kind == Kind::Tool)
            .collect()
    }

    /// Whether the permission rules let the call run: `Err` with what the
    /// client is told. An `ask` is put to the client's user when the client
    /// can be asked (elicitation), else refused as needing approval.
    async fn permitted(
        &self,
        scope: &Scope,
        plugin: &Plugin,
        input: &serde_json::Value,
        opened: Option<&crate::runtime::WorkDir>,
        context: &RequestContext<RoleServer>,
    ) -> Result<(), String> {
        let settings = &self.state.settings.permissions;
        if crate::agent::everything_allowed(settings, &scope.rules) {
            return Ok(());
        }
        let grants = crate::agent::session_grants(&self.state.store, &scope.session).await;
        let policy = crate::agent::policy(settings, &scope.rules, &grants);
        let subject = crate::agent::subject(Some(plugin), input, scope.work_dir.as_deref(), opened);
        let tool = &plugin.manifest.name;
        match policy.decide(tool, &subject) {
            Decision::Allow => Ok(()),
            Decision::Deny(why) => Err(why),
            Decision::Ask { .. } => {
                let can_ask = context.client_capabilities().is_some_and(|c| c.elicitation.is_some());
                if !can_ask {
                    return Err(format!(
                        "`{tool}` was not run: a permission rule says `ask`, so this call needs approval, and this MCP client cannot be asked (it does not support elicitation)"
                    ));
                }
                let shown = subject.value.as_deref().map(|v| format!(" `{v}`")).unwrap_or_default();
                let question = ElicitRequestParams::FormElicitationParams {
                    meta: None,
                    message: format!("Allow `{tool}`{shown} in session {}?", scope.session),
                    requested_schema: ElicitationSchema::new(Default::default()),
                };
                match context.peer.create_elicitation(question).await {
                    Ok(answer) if answer.action == ElicitationAction::Accept => Ok(()),
                    Ok(_) => Err(format!("`{tool}` was not run: the user rejected this call")),
                    Err(err) => Err(format!("`{tool}` was not run: its permission could not be asked: {err}")),
                }
            }
        }
    }

    /// Runs one call: `(text, is_error)` as an agent's tool result.
    async fn call(
        &self,
        scope: &Scope,
        name: &str,
        input: &serde_json::Value,
        context: &RequestContext<RoleServer>,
    ) -> Result<(String, bool), ErrorData> {
        let tools = self.tools(scope);
        let Some(plugin) = tools.iter().find(|p| p.manifest.name == name) else {
            let names: Vec<&str> = tools.iter().map(|p| p.manifest.name.as_str()).collect();
            return Ok((format!("unknown tool `{name}`; the tools available are: {}", names.join(", ")), true));
        };
        if scope.work_dir.is_none() {
            return Ok((
                format!("`{name}` was not run: session `{}` has no work_dir; set one with PUT /sessions/{}", scope.session, scope.session),
                true,
            ));
        }
        let work_dir = super::messages::open_work_dir(&self.state, &scope.session, &scope.tenant, scope.work_dir.as_deref())
            .await
            .map_err(|e| ErrorData::internal_error(e.to_string(), None))?;
        let opened = match &work_dir {
            Some(Ok(dir)) => Some(&**dir),
            _ => None,
        };
        if let Err(why) = self.permitted(scope, plugin, input, opened, context).await {
            return Ok((why, true));
        }
        let quota = super::messages::run_quota(&self.state, &scope.tenant)
            .await
            .map_err(|e| ErrorData::internal_error(e.to_string(), None))?;
        let id = format!("mcp_{}", new_id());
        Ok(crate::agent::invoke_tool(&self.state.runtime, &quota, Some(plugin), name, &id, input, work_dir.as_ref()).await)
    }

    /// Records the call as the session's events: `tool_use`, then
    /// `tool_result`, under a run id of their own (`mcp_…`, no stored run),
    /// so that they replay with the session's other events.
    async fn record(&self, scope: &Scope, run_id: &str, event: RunEvent) {
        match self.state.bus.fresh_feed(&scope.session).await {
            Ok(feed) => {
                let (name, data) = event.wire();
                self.state.bus.publish(&feed, run_id, name, data);
            }
            Err(err) => tracing::warn!(session = %scope.session, %err, "cannot record an MCP call"),
        }
    }
}

impl ServerHandler for Hangar {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("hangar", env!("CARGO_PKG_VERSION")))
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let scope = scope(&context)?;
        let mut tools = Vec::new();
        for plugin in self.tools(&scope) {
            // A plugin that fails to load is left out, as a model never sees it either.
            let spec = match self.state.runtime.tool_spec(&plugin.key()).await {
                Ok(spec) => spec,
                Err(err) => {
                    tracing::warn!(plugin = %plugin.key(), %err, "tool left out of the MCP tool list");
                    continue;
                }
            };
            let schema = match serde_json::from_str::<serde_json::Value>(&spec.input_schema) {
                Ok(serde_json::Value::Object(schema)) => schema,
                _ => serde_json::Map::from_iter([("type".to_string(), serde_json::json!("object"))]),
            };
            tools.push(Tool::new(spec.name, spec.description, schema));
        }
        Ok(ListToolsResult::with_all_items(tools))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let scope = scope(&context)?;
        let input = serde_json::Value::Object(request.arguments.clone().unwrap_or_default());
        let name = request.name.to_string();
        let run_id = format!("mcp_{}", new_id());
        let use_id = new_id();
        self.record(&scope, &run_id, RunEvent::ToolUse { id: use_id.clone(), name: name.clone(), input: input.clone() }).await;
        let (text, is_error) = match self.call(&scope, &name, &input, &context).await {
            Ok(result) => result,
            Err(err) => (format!("the call failed: {}", err.message), true),
        };
        self.record(&scope, &run_id, RunEvent::ToolResult { tool_use_id: use_id, content: text.clone(), is_error }).await;
        let content = vec![ContentBlock::text(text)];
        Ok(if is_error { CallToolResult::error(content) } else { CallToolResult::success(content) }.into())
    }
}
