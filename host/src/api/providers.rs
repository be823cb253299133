//! Providers, their credentials (write-only), and their models.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::routing::{delete, get};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;

use super::{ApiError, ApiResult, AppState, JsonBody, Object, Status, status};
use crate::runtime::{Kind, ModelInfo, Plugin, ProviderAccess, ProviderInfo, Secret, Source};
use crate::store::{AuthRecord, DEFAULT_TENANT, SERVER_KEYS, now};
use crate::tenancy::Caller;

/// How long a model list is reused.
const MODELS_TTL: Duration = Duration::from_secs(60);

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/provider", get(list_providers))
        .route("/provider/auth", get(get_auth).put(put_auth))
        .route("/provider/auth/{provider}", delete(delete_auth))
        .route("/provider/{name}", get(get_provider))
        .route("/provider/{name}/models", get(list_models))
        .route("/provider/{name}/models/{*model}", get(get_model))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProviderSummary {
    id: String,
    name: String,
    /// How it authenticates: `["api_key"]`, or `[]` when it needs nothing.
    auth_types: Vec<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProviderDetail {
    id: String,
    name: String,
    /// Always `chat`.
    #[serde(rename = "type")]
    kind: &'static str,
    /// Whether `GET /provider/{name}/models` can list models.
    models: bool,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Model {
    id: String,
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    context_window: Option<u64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuthStatus {
    providers: BTreeMap<String, ProviderAuthStatus>,
    /// When stored credentials last changed; `null` if never.
    updated_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ProviderAuthStatus {
    /// `api_key`, or `none` for a provider that needs no credential.
    #[serde(rename = "type")]
    auth_type: String,
    /// Whether a call can authenticate (a stored key, or the vendor's
    /// environment variable on the server).
    configured: bool,
    /// Where the key comes from: `stored`, `environment`, `server` (a
    /// tenant using the server's key of a shared provider), or `null`.
    source: Option<&'static str>,
    /// The base URL in force, if not the vendor's default.
    base_url: Option<String>,
    /// Why the stored key cannot be used (it was sealed under another server key).
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// `PUT /provider/auth`: merged into what is stored.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AuthUpdate {
    #[schema(value_type = BTreeMap<String, AuthInput>)]
    providers: BTreeMap<String, Object<AuthInput>>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AuthInput {
    /// `api_key`; may be omitted.
    #[serde(rename = "type")]
    auth_type: Option<String>,
    /// The key. Write-only: no response ever contains it.
    key: Option<String>,
    /// Where to send requests instead of the vendor's public endpoint;
    /// `null` goes back to the default. Changing it requires sending the key
    /// again, so a stored key never follows a new origin.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    base_url: Option<Option<String>>,
}

/// Tells "absent" (outer `None`) from "null" (`Some(None)`).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

/// Loaded provider plugins with their descriptions. They load side by
/// side, each within its own deadline, and one that failed to load is left
/// out (`GET /plugins` shows it `failed`, with why): a broken plugin must
/// not take the list of the others down with it. A third-party one still
/// loading after [`LIST_WAIT`] is left out too (it shows `compiling`), so
/// a long deadline does not hold the list for every client.
pub(crate) async fn providers(state: &AppState) -> ApiResult<Vec<(Arc<Plugin>, ProviderInfo)>> {
    let plugins: Vec<Arc<Plugin>> = state.runtime.plugins().into_iter().filter(|p| p.manifest.kind == Kind::Provider).collect();
    let infos = futures::future::join_all(plugins.iter().map(|p| async {
        let info = state.runtime.provider_info(p.id());
        if p.source == Source::Builtin {
            return info.await.map_err(|e| e.to_string());
        }
        match tokio::time::timeout(LIST_WAIT, info).await {
            Ok(info) => info.map_err(|e| e.to_string()),
            Err(_) => Err(format!("provider `{}` is still loading", p.id())),
        }
    }))
    .await;
    let mut out = Vec::new();
    for (plugin, info) in plugins.into_iter().zip(infos) {
        match info {
            Ok(info) => out.push((plugin, info)),
            Err(err) => tracing::debug!(%err, "provider left out of the list"),
        }
    }
    Ok(out)
}

/// How long a list of providers waits for a third-party one to load.
const LIST_WAIT: Duration = Duration::from_secs(10);

pub(crate) async fn provider(state: &AppState, id: &str) -> ApiResult<(Arc<Plugin>, ProviderInfo)> {
    match state.runtime.get(id) {
        Some(plugin) if plugin.manifest.kind == Kind::Provider => {
            let info = state.runtime.provider_info(id).await?;
            Ok((plugin, info))
        }
        _ => Err(ApiError::NotFound(format!("provider `{id}` does not exist"))),
    }
}

/// An environment variable the plugin's manifest names, read only when the
/// plugin is granted it (built-ins: their vendor's; others: what the
/// operator lists), so an uploaded manifest cannot read any other.
fn env_value(plugin: &Plugin, name: Option<&String>) -> Option<String> {
    name.filter(|n| plugin.grants.env.contains(n)).and_then(|n| std::env::var(n).ok()).filter(|v| !v.is_empty())
}

/// `OLLAMA_HOST=127.0.0.1:11434` is the usual form: without a scheme no
/// origin can be granted, so plain HTTP is assumed, as Ollama itself does.
fn with_scheme(url: String) -> String {
    if url.contains("://") { url } else { format!("http://{url}") }
}

/// Where a provider's calls go and with which key.
///
/// A stored key is bound to the base URL stored with it. With no stored key
/// the vendor's environment variables apply, and an environment key goes
/// only where the environment says: the vendor's public origin, or the base
/// URL from the vendor's own variable. A base URL set through the API gets
/// no environment key (else one request could send it to any host).
///
/// In multi-tenant mode a tenant's runs use its own key; without one, the
/// server's (stored with the admin token, or from the environment) only
/// for providers listed in `[tenants] shared_providers`.
pub(crate) async fn access(state: &AppState, plugin: &Plugin, tenant: &str) -> ApiResult<ProviderAccess> {
    let own = state.store.auth_record(tenant, plugin.id()).await?;
    if own.is_some() || !server_keys_allowed(state, tenant, plugin.id()) {
        let mut access = access_with(plugin, own, state.tenancy.is_none())?;
        // A tenant's own base URL reaches no internal address.
        access.tenant = state.tenancy.is_some() && tenant != SERVER_KEYS;
        return Ok(access);
    }
    let server = match state.tenancy {
        Some(_) => state.store.auth_record(SERVER_KEYS, plugin.id()).await?,
        None => None,
    };
    access_with(plugin, server, true)
}

/// Whether `tenant` may fall back to the server's keys of `provider`.
fn server_keys_allowed(state: &AppState, tenant: &str, provider: &str) -> bool {
    state.tenancy.is_none() || tenant == SERVER_KEYS || state.settings.tenants.shared_providers.iter().any(|p| p == provider)
}

/// Whose keys `/provider/auth` shows and changes for this caller: a
/// tenant's own; the admin token's are the server's; a single-user
/// server's are the default tenant's.
fn keys_owner<'a>(state: &AppState, caller: &'a Caller) -> &'a str {
    match (caller, &state.tenancy) {
        (Caller::Tenant(id), _) => id,
        (Caller::Operator, Some(_)) => SERVER_KEYS,
        (Caller::Operator, None) => DEFAULT_TENANT,
    }
}

/// Access from a stored record, else (when `environment` may be used) the
/// vendor's environment variables.
fn access_with(plugin: &Plugin, record: Option<AuthRecord>, environment: bool) -> ApiResult<ProviderAccess> {
    let section = &plugin.manifest.provider;
    if let Some(why) = record.as_ref().and_then(|r| r.unreadable.clone()) {
        return Err(ApiError::KeyUnreadable(why));
    }
    Ok(match record {
        Some(AuthRecord { secret: Some(secret), base_url, .. }) => {
            ProviderAccess { base_url, credential: Some(Secret::new(secret)), tenant: false }
        }
        Some(AuthRecord { base_url: Some(base_url), .. }) => ProviderAccess { base_url: Some(base_url), credential: None, tenant: false },
        _ if !environment => ProviderAccess::default(),
        _ => ProviderAccess {
            base_url: env_value(plugin, section.base_url_env.as_ref()).map(with_scheme),
            credential: env_value(plugin, section.key_env.as_ref()).map(Secret::new),
            tenant: false,
        },
    })
}

#[utoipa::path(get, path = "/provider", tag = "providers",
    responses((status = 200, body = Vec<ProviderSummary>)))]
pub(super) async fn list_providers(State(state): State<AppState>) -> ApiResult<Json<Vec<ProviderSummary>>> {
    let list = providers(&state)
        .await?
        .into_iter()
        .map(|(_, info)| ProviderSummary { id: info.id, name: info.name, auth_types: info.auth_types })
        .collect();
    Ok(Json(list))
}

#[utoipa::path(get, path = "/provider/{name}", tag = "providers",
    params(("name" = String, Path, description = "Provider id")),
    responses((status = 200, body = ProviderDetail), (status = 404, body = super::ErrorBody)))]
pub(super) async fn get_provider(State(state): State<AppState>, Path(name): Path<String>) -> ApiResult<Json<ProviderDetail>> {
    let (_, info) = provider(&state, &name).await?;
    Ok(Json(ProviderDetail { id: info.id, name: info.name, kind: "chat", models: info.lists_models }))
}

#[utoipa::path(get, path = "/provider/auth", tag = "providers",
    responses((status = 200, body = AuthStatus)))]
pub(super) async fn get_auth(State(state): State<AppState>, caller: Caller) -> ApiResult<Json<AuthStatus>> {
    let owner = keys_owner(&state, &caller);
    let records: HashMap<String, AuthRecord> =
        state.store.auth_records(owner).await?.into_iter().map(|r| (r.provider.clone(), r)).collect();
    let mut providers_out = BTreeMap::new();
    for (plugin, info) in providers(&state).await? {
        let record = records.get(plugin.id());
        // A tenant learns only that a shared provider works for it, never
        // whether (or which) key the server holds.
        if matches!(caller, Caller::Tenant(_)) && record.is_none() && server_keys_allowed(&state, owner, plugin.id()) {
            providers_out.insert(
                info.id.clone(),
                ProviderAuthStatus {
                    auth_type: info.auth_types.first().cloned().unwrap_or_else(|| "none".into()),
                    configured: true,
                    source: Some("server"),
                    base_url: None,
                    error: None,
                },
            );
            continue;
        }
        // A key the server key cannot open is still a stored key; the
        // error shows here rather than failing the whole list.
        let unreadable = record.and_then(|r| r.unreadable.clone());
        let access = match access(&state, &plugin, owner).await {
            Err(ApiError::KeyUnreadable(_)) => {
                ProviderAccess { base_url: record.and_then(|r| r.base_url.clone()), credential: None, tenant: false }
            }
            other => other?,
        };
        let needs_key = !info.auth_types.is_empty();
        let source = match (record.and_then(|r| r.secret.as_ref().or(r.unreadable.as_ref())), &access.credential) {
            (Some(_), _) => Some("stored"),
            (None, Some(_)) => Some("environment"),
            (None, None) => None,
        };
        providers_out.insert(
            info.id.clone(),
            ProviderAuthStatus {
                auth_type: info.auth_types.first().cloned().unwrap_or_else(|| "none".into()),
                configured: !needs_key || (source.is_some() && unreadable.is_none()),
                source,
                base_url: access.base_url,
                error: unreadable,
            },
        );
    }
    let updated_at = state.store.auth_updated_at(owner).await?;
    Ok(Json(AuthStatus { providers: providers_out, updated_at }))
}

#[utoipa::path(put, path = "/provider/auth", tag = "providers", request_body = AuthUpdate,
    responses((status = 200, body = Status), (status = 400, body = super::ErrorBody),
        (status = 409, body = super::ErrorBody, description = "`base_url` changed without sending the stored key again"),
        (status = 413, body = super::ErrorBody), (status = 415, body = super::ErrorBody), (status = 422, body = super::ErrorBody)))]
pub(super) async fn put_auth(State(state): State<AppState>, caller: Caller, JsonBody(update): JsonBody<AuthUpdate>) -> ApiResult<Json<Status>> {
    let owner = keys_owner(&state, &caller);
    let known = providers(&state).await?;
    let mut records = Vec::new();
    for (id, Object(input)) in update.providers {
        let Some((_, info)) = known.iter().find(|(p, _)| p.id() == id) else {
            let names: Vec<&str> = known.iter().map(|(p, _)| p.id()).collect();
            return Err(ApiError::Invalid(format!("unknown provider `{id}`; known providers: {}", names.join(", "))));
        };
        if let Some(t) = &input.auth_type
            && !info.auth_types.contains(t)
        {
            return Err(ApiError::Invalid(match info.auth_types.is_empty() {
                true => format!("provider `{id}` takes no credentials, so `type` must be omitted"),
                false => format!("provider `{id}` supports auth types {:?}, not `{t}`", info.auth_types),
            }));
        }
        if let Some(key) = &input.key {
            if info.auth_types.is_empty() {
                return Err(ApiError::Invalid(format!("provider `{id}` takes no key")));
            }
            if key.trim().is_empty() {
                return Err(ApiError::Invalid(format!("the key for `{id}` is empty")));
            }
        }
        if let Some(Some(url)) = &input.base_url {
            let origin = crate::runtime::policy::Origin::parse(url)
                .map_err(|e| ApiError::Invalid(format!("base_url `{url}` for `{id}` is not an http(s) URL: {e}")))?;
            // A tenant's base URL goes only where the operator allows: the
            // vendor's own origin, or `[tenants] allowed_origins`.
            if let Caller::Tenant(_) = &caller {
                let plugin = state.runtime.get(&id);
                let vendor = plugin.iter().flat_map(|p| p.grants.http.iter()).any(|p| p.matches(&origin));
                let listed = state.settings.tenant_origins.iter().any(|p| p.matches(&origin));
                if !vendor && !listed {
                    return Err(ApiError::Invalid(format!(
                        "base_url origin {origin} for `{id}` is not allowed for tenants: it must be the vendor's, or listed by the operator in [tenants] allowed_origins"
                    )));
                }
            }
        }
        let existing = state.store.auth_record(owner, &id).await?;
        let old_base = existing.as_ref().and_then(|r| r.base_url.clone());
        let new_base = match &input.base_url {
            Some(b) => b.clone().map(|u| u.trim_end_matches('/').to_string()),
            None => old_base.clone(),
        };
        let has_stored_key = existing.as_ref().is_some_and(|r| r.secret.is_some());
        // The body is well formed; what it asks conflicts with the stored
        // state (the key stored for another origin): 409.
        if new_base != old_base && has_stored_key && input.key.is_none() {
            return Err(ApiError::Conflict(format!(
                "changing base_url of `{id}` requires sending its key again: a stored key never follows a new origin"
            )));
        }
        records.push(AuthRecord {
            provider: id.clone(),
            auth_type: input.auth_type.or_else(|| info.auth_types.first().cloned()).filter(|_| !info.auth_types.is_empty()),
            secret: input.key.or_else(|| existing.and_then(|r| r.secret)),
            base_url: new_base,
            updated_at: now(),
            unreadable: None,
        });
    }
    let changed: Vec<String> = records.iter().map(|r| r.provider.clone()).collect();
    state.store.put_auth_records(owner, records).await?;
    state.models.forget(&changed);
    tracing::info!(providers = ?changed, tenant = owner, "provider credentials updated");
    Ok(status("ok"))
}

#[utoipa::path(delete, path = "/provider/auth/{provider}", tag = "providers",
    params(("provider" = String, Path, description = "Provider id")),
    responses((status = 200, body = Status), (status = 404, body = super::ErrorBody)))]
pub(super) async fn delete_auth(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Json<Status>> {
    provider(&state, &id).await?;
    state.store.delete_auth_record(keys_owner(&state, &caller), &id).await?;
    state.models.forget(std::slice::from_ref(&id));
    Ok(status("deleted"))
}

/// Model lists, reused for a minute (the live lists come over the network).
#[derive(Clone, Default)]
pub struct ModelsCache(Arc<Mutex<HashMap<String, (Instant, Vec<Model>)>>>);

impl ModelsCache {
    fn get(&self, key: &str) -> Option<Vec<Model>> {
        let map = self.0.lock().unwrap();
        map.get(key).filter(|(at, _)| at.elapsed() < MODELS_TTL).map(|(_, m)| m.clone())
    }
    fn put(&self, key: String, models: Vec<Model>) {
        self.0.lock().unwrap().insert(key, (Instant::now(), models));
    }
    fn forget(&self, providers: &[String]) {
        self.0.lock().unwrap().retain(|k, _| !providers.iter().any(|p| k.split('\n').next() == Some(p)));
    }
}

async fn models_of(state: &AppState, caller: &Caller, name: &str) -> ApiResult<Vec<Model>> {
    let (plugin, _) = provider(state, name).await?;
    let owner = keys_owner(state, caller);
    let access = access(state, &plugin, owner).await?;
    let key = format!("{name}\n{}\n{}\n{owner}", access.base_url.as_deref().unwrap_or(""), access.credential.is_some());
    if let Some(models) = state.models.get(&key) {
        return Ok(models);
    }
    let models: Vec<Model> = state
        .runtime
        .provider_models(name, &access)
        .await?
        .map_err(|e| ApiError::Provider(format!("provider `{name}` could not list models: {}", e.message)))?
        .into_iter()
        .map(|ModelInfo { id, name, context_window }| Model { id, name, context_window })
        .collect();
    state.models.put(key, models.clone());
    Ok(models)
}

#[utoipa::path(get, path = "/provider/{name}/models", tag = "providers",
    params(("name" = String, Path, description = "Provider id")),
    responses((status = 200, body = Vec<Model>), (status = 404, body = super::ErrorBody), (status = 502, body = super::ErrorBody)))]
pub(super) async fn list_models(State(state): State<AppState>, caller: Caller, Path(name): Path<String>) -> ApiResult<Json<Vec<Model>>> {
    Ok(Json(models_of(&state, &caller, &name).await?))
}

/// The model named `id`: by its exact id, else by the same id with or
/// without a date suffix (`claude-sonnet-4-5` and
/// `claude-sonnet-4-5-20250929` name the same model), newest date first.
fn resolve_model<'a>(models: &'a [Model], id: &str) -> Option<&'a Model> {
    fn undated(id: &str) -> &str {
        match id.rsplit_once('-') {
            Some((head, date)) if date.len() == 8 && date.bytes().all(|b| b.is_ascii_digit()) => head,
            _ => id.strip_suffix("-latest").unwrap_or(id),
        }
    }
    models.iter().find(|m| m.id == id).or_else(|| {
        let wanted = undated(id);
        models.iter().filter(|m| undated(&m.id) == wanted).max_by(|a, b| a.id.cmp(&b.id))
    })
}

#[utoipa::path(get, path = "/provider/{name}/models/{model}", tag = "providers",
    params(("name" = String, Path, description = "Provider id"), ("model" = String, Path, description = "Model id")),
    responses((status = 200, body = Model), (status = 404, body = super::ErrorBody), (status = 502, body = super::ErrorBody)))]
pub(super) async fn get_model(
    State(state): State<AppState>,
    caller: Caller,
    Path((name, model)): Path<(String, String)>,
) -> ApiResult<Json<Model>> {
    let models = models_of(&state, &caller, &name).await?;
    resolve_model(&models, &model)
        .cloned()
        .map(Json)
        .ok_or_else(|| ApiError::NotFound(format!("provider `{name}` has no model `{model}`")))
}

/// Finds an agent's context window in its provider's model list (the
/// cached one, else asked for), for a run that needs it; `None` when the
/// list cannot be had or does not say.
pub(crate) fn window_lookup(state: &AppState, agent: &crate::store::Agent) -> crate::agent::WindowLookup {
    let (state, provider, model) = (state.clone(), agent.provider.id.clone(), agent.provider.model.clone());
    // With the keys the agent's runs use.
    let caller = match state.tenancy {
        Some(_) => Caller::Tenant(agent.tenant_id.clone()),
        None => Caller::Operator,
    };
    Box::new(move || {
        Box::pin(async move {
            match models_of(&state, &caller, &provider).await {
                Ok(models) => resolve_model(&models, &model).and_then(|m| m.context_window),
                Err(err) => {
                    tracing::warn!(%provider, %model, err = %err.body().error, "cannot list the models to find the context window");
                    None
                }
            }
        })
    })
}
