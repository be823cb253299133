//! Agents: instructions, tools and a model.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::value::RawValue;
use std::sync::Arc;
use utoipa::ToSchema;

use super::page::{self, Page, PageQuery};
use super::{ApiError, ApiResult, AppState, JsonBody, Object, QueryParams, Status, new_id, status};
use crate::runtime::Kind;
use crate::permissions::{Origin, Rule};
use crate::store::{Agent, AgentProvider, Compaction, now};
use crate::tenancy::Caller;

const DEFAULT_MAX_TOKENS: u32 = 4096;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/agents", get(list).post(create))
        .route("/agents/{id}", get(show).put(update).delete(remove))
}

/// The body of `POST /agents`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentCreate {
    /// Not blank.
    #[schema(min_length = 1, pattern = r"\S")]
    name: String,
    /// The system prompt.
    #[serde(default)]
    instructions: String,
    /// Tool names, each a loaded tool plugin, each once (`uniqueItems`).
    #[serde(default)]
    tools: Vec<String>,
    #[schema(value_type = ProviderCreate)]
    provider: Object<ProviderCreate>,
    /// Permission rules, evaluated after the config file's; the last rule
    /// that matches a call decides (`allow`, `ask` or `deny`).
    #[serde(default)]
    permissions: Vec<Rule>,
    /// When the conversation is compacted; absent fields take their defaults.
    #[schema(value_type = Option<CompactionInput>)]
    compaction: Option<Object<CompactionInput>>,
}

/// Compaction settings: only the fields given change (`null` is the same
/// as absent).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompactionInput {
    /// Compact when a request would pass this share of the model's context
    /// window: more than 0, at most 1 (default 0.8).
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    threshold: Option<f64>,
    /// Model turns kept verbatim at the end (default 4).
    #[serde(default, deserialize_with = "whole_u32")]
    #[schema(minimum = 1, maximum = 1000)]
    keep_turns: Option<u32>,
    /// `false`: no automatic compaction (default `true`).
    enabled: Option<bool>,
}

impl CompactionInput {
    fn apply(self, base: Compaction) -> Compaction {
        Compaction {
            threshold: self.threshold.unwrap_or(base.threshold),
            keep_turns: self.keep_turns.unwrap_or(base.keep_turns),
            enabled: self.enabled.unwrap_or(base.enabled),
        }
    }
}

/// The model of a new agent.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProviderCreate {
    /// A provider id from `GET /provider`.
    id: String,
    /// A model id of that provider (an alias or a dated id); not blank.
    #[schema(min_length = 1, pattern = r"\S")]
    model: String,
    /// Upper bound on output tokens per model call; default 4096.
    #[serde(default, deserialize_with = "whole_u32")]
    #[schema(minimum = 1)]
    max_tokens: Option<u32>,
    /// Sampling temperature; `null` or absent leaves the provider's default.
    #[schema(minimum = 0.0, maximum = 2.0)]
    temperature: Option<f64>,
    /// The model's context window in tokens, instead of the provider's
    /// figure; `null` or absent takes the provider's.
    #[serde(default, deserialize_with = "whole_u32")]
    #[schema(minimum = 1)]
    context_window: Option<u32>,
}

/// The body of `PUT /agents/{id}`: only the fields given change (`null`
/// is the same as absent).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentInput {
    /// Not blank.
    #[schema(min_length = 1, pattern = r"\S")]
    name: Option<String>,
    instructions: Option<String>,
    /// Tool names, each a loaded tool plugin, each once (`uniqueItems`).
    tools: Option<Vec<String>>,
    #[schema(value_type = Option<ProviderInput>)]
    provider: Option<Object<ProviderInput>>,
    /// Permission rules, evaluated after the config file's; the last rule
    /// that matches a call decides (`allow`, `ask` or `deny`).
    permissions: Option<Vec<Rule>>,
    /// Changes to when the conversation is compacted.
    #[schema(value_type = Option<CompactionInput>)]
    compaction: Option<Object<CompactionInput>>,
}

/// Changes to an agent's model: only the fields given change.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProviderInput {
    /// A provider id from `GET /provider`.
    id: Option<String>,
    /// A model id of that provider; not blank.
    #[schema(min_length = 1, pattern = r"\S")]
    model: Option<String>,
    /// Upper bound on output tokens per model call.
    #[serde(default, deserialize_with = "whole_u32")]
    #[schema(minimum = 1)]
    max_tokens: Option<u32>,
    /// Sampling temperature; `null` keeps what is set.
    #[schema(minimum = 0.0, maximum = 2.0)]
    temperature: Option<f64>,
    /// The model's context window in tokens; `null` keeps what is set.
    #[serde(default, deserialize_with = "whole_u32")]
    #[schema(minimum = 1)]
    context_window: Option<u32>,
}

/// A JSON integer in `u32`'s range: `4096` or `4096.0` (JSON Schema counts
/// a number with no fraction as an integer, and so does this), or `null`.
fn whole_u32<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    use serde::de::Error;
    let Some(n) = Option::<serde_json::Number>::deserialize(d)? else { return Ok(None) };
    let whole = match (n.as_u64(), n.as_f64()) {
        (Some(u), _) => Some(u),
        (None, Some(f)) if f.fract() == 0.0 && (0.0..=u32::MAX as f64).contains(&f) => Some(f as u64),
        _ => None,
    };
    whole
        .and_then(|u| u32::try_from(u).ok())
        .map(Some)
        .ok_or_else(|| D::Error::custom(format!("invalid value: {n}, expected an integer from 0 to {}", u32::MAX)))
}

impl ProviderInput {
    fn apply(self, base: AgentProvider) -> AgentProvider {
        AgentProvider {
            id: self.id.unwrap_or(base.id),
            model: self.model.unwrap_or(base.model),
            max_tokens: self.max_tokens.unwrap_or(base.max_tokens),
            temperature: self.temperature.or(base.temperature),
            context_window: self.context_window.map(u64::from).or(base.context_window),
        }
    }
}

async fn validate(state: &AppState, agent: &Agent) -> ApiResult<()> {
    if agent.name.trim().is_empty() {
        return Err(ApiError::Invalid("`name` is required and must not be empty".into()));
    }
    for (i, tool) in agent.tools.iter().enumerate() {
        match state.runtime.resolve(&agent.tenant_id, tool) {
            Some(p) if p.manifest.kind == Kind::Tool => {}
            // A tool of one of the tenant's MCP servers (`SERVER__TOOL`).
            _ if state.mcp.resolve(&agent.tenant_id, tool).await.is_some() => {}
            _ => return Err(ApiError::Invalid(format!("unknown tool `{tool}` in `tools`"))),
        }
        if agent.tools[..i].contains(tool) {
            return Err(ApiError::Invalid(format!("tool `{tool}` is listed twice")));
        }
    }
    let compiled = crate::permissions::compile(&agent.permissions, Origin::Agent).map_err(|e| ApiError::Invalid(e.to_string()))?;
    for (i, rule) in compiled.iter().enumerate() {
        let rule_text = &rule.rule;
        if rule_text.tool == "*" {
            continue;
        }
        let Some(plugin) = state.runtime.resolve(&agent.tenant_id, &rule_text.tool).filter(|p| p.manifest.kind == Kind::Tool) else {
            // An MCP server's tool names no input field: `*` only.
            if state.mcp.resolve(&agent.tenant_id, &rule_text.tool).await.is_some() {
                if !rule.is_any() {
                    return Err(ApiError::Invalid(format!(
                        "`permissions[{i}]` {rule_text}: tool `{}` is an MCP server's, so its rules can only use the pattern `*`",
                        rule_text.tool
                    )));
                }
                continue;
            }
            return Err(ApiError::Invalid(format!("`permissions[{i}]` {rule_text}: unknown tool `{}`", rule_text.tool)));
        };
        if !rule.is_any() && plugin.manifest.tool.pattern_field.is_none() {
            return Err(ApiError::Invalid(format!(
                "`permissions[{i}]` {rule_text}: tool `{}` names no input field for patterns, so its rules can only use the pattern `*`",
                rule_text.tool
            )));
        }
    }
    let p = &agent.provider;
    match state.runtime.get(&p.id) {
        Some(plugin) if plugin.manifest.kind == Kind::Provider => {}
        _ => return Err(ApiError::Invalid(format!("unknown provider `{}` in `provider.id`", p.id))),
    }
    if p.model.trim().is_empty() {
        return Err(ApiError::Invalid("`provider.model` is required and must not be empty".into()));
    }
    if p.max_tokens == 0 {
        return Err(ApiError::Invalid("`provider.max_tokens` must be greater than 0".into()));
    }
    if let Some(t) = p.temperature
        && !(0.0..=2.0).contains(&t)
    {
        return Err(ApiError::Invalid(format!("`provider.temperature` must be between 0 and 2, not {t}")));
    }
    if p.context_window == Some(0) {
        return Err(ApiError::Invalid("`provider.context_window` must be greater than 0".into()));
    }
    let c = &agent.compaction;
    if !(c.threshold > 0.0 && c.threshold <= 1.0) {
        return Err(ApiError::Invalid(format!("`compaction.threshold` must be more than 0 and at most 1, not {}", c.threshold)));
    }
    if !(1..=1000).contains(&c.keep_turns) {
        return Err(ApiError::Invalid(format!("`compaction.keep_turns` must be from 1 to 1000, not {}", c.keep_turns)));
    }
    Ok(())
}

#[utoipa::path(operation_id = "list_agents", get, path = "/agents", tag = "agents", params(PageQuery),
    responses((status = 200, body = Vec<Agent>, description = "oldest first; `Link: <…>; rel=\"next\"` when there is more",
        headers(("Link" = String, description = "the next page, when there is one"))),
        (status = 422, body = super::ErrorBody)))]
pub(super) async fn list(
    State(state): State<AppState>,
    caller: Caller,
    QueryParams(q): QueryParams<PageQuery>,
) -> ApiResult<Response> {
    let limit = page::limit(q.limit)?;
    let all = state.store.agents().await?;
    let json = state.rendered_agents.of(&all).map_err(|e| ApiError::Internal(format!("writing an agent as JSON: {e}")))?;
    // The list is sorted by id.
    let start = match &q.after {
        Some(after) => all.partition_point(|a| a.id.as_str() <= after.as_str()),
        None => 0,
    };
    let items: Vec<RenderedAgent> = all[start..]
        .iter()
        .zip(&json[start..])
        .filter(|(a, _)| caller.sees(&a.tenant_id))
        .take(limit + 1)
        .map(|(agent, json)| RenderedAgent { id: &agent.id, json })
        .collect();
    let page = Page::from_extra(items, limit, |last: &RenderedAgent| page::link("/agents", &[("limit", &limit.to_string()), ("after", last.id)]));
    Ok(page.into_response())
}

/// The store's agent list, each agent as the JSON `GET /agents` shows it,
/// written once per list rather than once per request: writing 20 agents
/// was about a fifth of the workers' time under `GET /agents` load. Keyed
/// by the list itself (the store hands out the same `Arc` until an agent
/// changes), so what is shown is always the list the store returned.
#[derive(Default)]
pub struct Rendered(std::sync::Mutex<Option<RenderedList>>);

type RenderedList = (Arc<Vec<Agent>>, Arc<Vec<Box<RawValue>>>);

impl Rendered {
    fn of(&self, list: &Arc<Vec<Agent>>) -> Result<Arc<Vec<Box<RawValue>>>, serde_json::Error> {
        let mut slot = self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((rendered_from, json)) = &*slot
            && Arc::ptr_eq(rendered_from, list)
        {
            return Ok(json.clone());
        }
        let json = Arc::new(list.iter().map(serde_json::value::to_raw_value).collect::<Result<Vec<_>, _>>()?);
        *slot = Some((list.clone(), json.clone()));
        Ok(json)
    }
}

/// One agent of a page: its id for the next link, its JSON as written.
struct RenderedAgent<'a> {
    id: &'a str,
    json: &'a RawValue,
}

impl serde::Serialize for RenderedAgent<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.json.serialize(s)
    }
}

#[utoipa::path(operation_id = "create_agent", post, path = "/agents", tag = "agents", request_body = AgentCreate,
    responses((status = 201, body = Agent), (status = 400, body = super::ErrorBody), (status = 413, body = super::ErrorBody),
        (status = 415, body = super::ErrorBody), (status = 422, body = super::ErrorBody)))]
pub(super) async fn create(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(input): JsonBody<AgentCreate>,
) -> ApiResult<(StatusCode, Json<Agent>)> {
    let now = now();
    let Object(p) = input.provider;
    let agent = Agent {
        id: new_id(),
        name: input.name,
        instructions: input.instructions,
        tools: input.tools,
        provider: AgentProvider {
            id: p.id,
            model: p.model,
            max_tokens: p.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
            temperature: p.temperature,
            context_window: p.context_window.map(u64::from),
        },
        permissions: input.permissions,
        compaction: input.compaction.map(|Object(c)| c.apply(Compaction::default())).unwrap_or_default(),
        created_at: now,
        updated_at: now,
        tenant_id: caller.owner().to_string(),
    };
    validate(&state, &agent).await?;
    Ok((StatusCode::CREATED, Json(state.store.insert_agent(agent).await?)))
}

#[utoipa::path(operation_id = "get_agent", get, path = "/agents/{id}", tag = "agents", params(("id" = String, Path)),
    responses((status = 200, body = Agent), (status = 404, body = super::ErrorBody)))]
pub(super) async fn show(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Agent>> {
    Ok(Json(state.store.agent(&id).await?))
}

#[utoipa::path(operation_id = "update_agent", put, path = "/agents/{id}", tag = "agents", params(("id" = String, Path)), request_body = AgentInput,
    responses((status = 200, body = Agent), (status = 400, body = super::ErrorBody), (status = 404, body = super::ErrorBody),
        (status = 413, body = super::ErrorBody), (status = 415, body = super::ErrorBody), (status = 422, body = super::ErrorBody)))]
pub(super) async fn update(
    State(state): State<AppState>,
    Path(id): Path<String>,
    JsonBody(input): JsonBody<AgentInput>,
) -> ApiResult<Json<Agent>> {
    let mut agent = state.store.agent(&id).await?;
    if let Some(name) = input.name {
        agent.name = name;
    }
    if let Some(instructions) = input.instructions {
        agent.instructions = instructions;
    }
    if let Some(tools) = input.tools {
        agent.tools = tools;
    }
    if let Some(provider) = input.provider {
        agent.provider = provider.0.apply(agent.provider);
    }
    if let Some(permissions) = input.permissions {
        agent.permissions = permissions;
    }
    if let Some(Object(compaction)) = input.compaction {
        agent.compaction = compaction.apply(agent.compaction);
    }
    agent.updated_at = now().max(agent.updated_at);
    validate(&state, &agent).await?;
    Ok(Json(state.store.update_agent(agent).await?))
}

#[utoipa::path(operation_id = "delete_agent", delete, path = "/agents/{id}", tag = "agents", params(("id" = String, Path)),
    responses((status = 200, body = Status), (status = 404, body = super::ErrorBody)))]
pub(super) async fn remove(State(state): State<AppState>, Path(id): Path<String>) -> ApiResult<Json<Status>> {
    state.store.delete_agent(&id).await?;
    Ok(status("deleted"))
}
