//! Agents: instructions, tools and a model.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use utoipa::ToSchema;

use super::{ApiError, ApiResult, AppState, JsonBody, Status, new_id, status};
use crate::runtime::Kind;
use crate::permissions::{Origin, Rule};
use crate::store::{Agent, AgentProvider, now};

const DEFAULT_MAX_TOKENS: u32 = 4096;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/agents", get(list).post(create))
        .route("/agents/{id}", get(show).put(update).delete(remove))
}

/// The body of `POST /agents` (all of `name` and `provider` required) and
/// `PUT /agents/{id}` (only the fields given change).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentInput {
    name: Option<String>,
    instructions: Option<String>,
    /// Tool names, each a loaded tool plugin.
    tools: Option<Vec<String>>,
    provider: Option<ProviderInput>,
    /// Permission rules, evaluated after the config file's; the last rule
    /// that matches a call decides (`allow`, `ask` or `deny`).
    permissions: Option<Vec<Rule>>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProviderInput {
    id: Option<String>,
    model: Option<String>,
    /// Greater than 0; default 4096.
    max_tokens: Option<u32>,
    /// 0 to 2.
    temperature: Option<f64>,
}

impl ProviderInput {
    fn apply(self, base: AgentProvider) -> AgentProvider {
        AgentProvider {
            id: self.id.unwrap_or(base.id),
            model: self.model.unwrap_or(base.model),
            max_tokens: self.max_tokens.unwrap_or(base.max_tokens),
            temperature: self.temperature.or(base.temperature),
        }
    }
}

async fn validate(state: &AppState, agent: &Agent) -> ApiResult<()> {
    if agent.name.trim().is_empty() {
        return Err(ApiError::Invalid("`name` is required and must not be empty".into()));
    }
    for (i, tool) in agent.tools.iter().enumerate() {
        match state.runtime.get(tool) {
            Some(p) if p.manifest.kind == Kind::Tool => {}
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
        let Some(plugin) = state.runtime.get(&rule_text.tool).filter(|p| p.manifest.kind == Kind::Tool) else {
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
    Ok(())
}

#[utoipa::path(operation_id = "list_agents", get, path = "/agents", tag = "agents", responses((status = 200, body = Vec<Agent>)))]
pub(super) async fn list(State(state): State<AppState>) -> ApiResult<Json<Arc<Vec<Agent>>>> {
    Ok(Json(state.store.agents().await?))
}

#[utoipa::path(operation_id = "create_agent", post, path = "/agents", tag = "agents", request_body = AgentInput,
    responses((status = 201, body = Agent), (status = 400, body = super::ErrorBody), (status = 415, body = super::ErrorBody), (status = 422, body = super::ErrorBody)))]
pub(super) async fn create(State(state): State<AppState>, JsonBody(input): JsonBody<AgentInput>) -> ApiResult<(StatusCode, Json<Agent>)> {
    let provider = input.provider.ok_or_else(|| ApiError::Invalid("`provider` is required".into()))?;
    if provider.id.is_none() {
        return Err(ApiError::Invalid("`provider.id` is required".into()));
    }
    let now = now();
    let agent = Agent {
        id: new_id(),
        name: input.name.ok_or_else(|| ApiError::Invalid("`name` is required".into()))?,
        instructions: input.instructions.unwrap_or_default(),
        tools: input.tools.unwrap_or_default(),
        provider: provider.apply(AgentProvider { max_tokens: DEFAULT_MAX_TOKENS, ..Default::default() }),
        permissions: input.permissions.unwrap_or_default(),
        created_at: now,
        updated_at: now,
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
    responses((status = 200, body = Agent), (status = 404, body = super::ErrorBody), (status = 422, body = super::ErrorBody)))]
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
        agent.provider = provider.apply(agent.provider);
    }
    if let Some(permissions) = input.permissions {
        agent.permissions = permissions;
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
