//! Tenants (admin token only) and usage; and the one check that keeps a
//! tenant to its own sessions and agents on every route.

use std::time::Duration;

use axum::extract::{FromRequestParts, MatchedPath, Path, RawPathParams, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;

use super::page::{self, Page, PageQuery};
use super::{ApiError, ApiResult, AppState, JsonBody, Object, QueryParams, Status, new_id, status};
use crate::store::{DEFAULT_TENANT, Quotas, StoreError, Tenant, TenantKey, Tokens, now, rfc3339};
use crate::tenancy::{Caller, Tenancy, new_key};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/tenants", get(list).post(create))
        .route("/tenants/{id}", get(show).patch(update).delete(remove))
        .route("/tenants/{id}/keys", post(add_key))
        .route("/tenants/{id}/keys/{key_id}", delete(revoke_key))
        .route("/tenants/{id}/usage", get(tenant_usage))
        .route("/usage", get(usage))
}

/// Keeps a tenant key to its own: on every route under `/sessions/{id}`
/// and `/agents/{id}`, another tenant's id is answered exactly as a
/// missing one (same status, code and message). The request back when it
/// may go on, else the answer.
pub(super) async fn owned(state: &AppState, caller: &Caller, req: Request) -> Result<Request, Response> {
    let Caller::Tenant(tenant) = caller else { return Ok(req) };
    let (mut parts, body) = req.into_parts();
    let route = parts.extensions.get::<MatchedPath>().map(|m| m.as_str().to_owned()).unwrap_or_default();
    let params = RawPathParams::from_request_parts(&mut parts, state).await;
    let id = params.ok().and_then(|p| p.iter().find(|(name, _)| *name == "id").map(|(_, v)| v.to_owned()));
    if let Some(id) = id {
        let owner = if route.starts_with("/sessions/{id}") {
            Some(("session", state.store.session_owner(&id).await))
        } else if route.starts_with("/agents/{id}") {
            Some(("agent", state.store.agent(&id).await.map(|a| Some(a.tenant_id)).or_else(|e| match e {
                StoreError::NotFound { .. } => Ok(None),
                other => Err(other),
            })))
        } else {
            None
        };
        match owner {
            Some((_, Err(err))) => return Err(ApiError::from(err).into_response()),
            Some((kind, Ok(owner))) if owner.as_deref() != Some(tenant.as_str()) => {
                return Err(ApiError::from(StoreError::NotFound { kind, id }).into_response());
            }
            _ => {}
        }
    }
    Ok(Request::from_parts(parts, body))
}

/// The tenancy of a multi-tenant server, for the admin token only.
fn admin(state: &AppState, caller: &Caller) -> ApiResult<Tenancy> {
    let Some(tenancy) = &state.tenancy else {
        return Err(ApiError::NotFound("multi-tenant mode is off: start the server with --admin-token to host tenants".into()));
    };
    match caller {
        Caller::Operator => Ok(tenancy.clone()),
        Caller::Tenant(_) => Err(ApiError::Forbidden("this route needs the admin token; a tenant key cannot use it".into())),
    }
}

/// A tenant as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct TenantView {
    id: String,
    name: String,
    /// The quotas in force: the tenant's own, else the server's defaults
    /// (`[tenants.quotas]`); `null` is no limit.
    quotas: Quotas,
    #[serde(serialize_with = "rfc3339")]
    created_at: DateTime<Utc>,
    #[serde(serialize_with = "rfc3339")]
    updated_at: DateTime<Utc>,
    /// `GET /tenants/{id}` only: its keys (never a whole key).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    keys: Option<Vec<TenantKey>>,
}

impl TenantView {
    fn new(tenant: Tenant, defaults: Quotas, keys: Option<Vec<TenantKey>>) -> TenantView {
        TenantView {
            id: tenant.id,
            name: tenant.name,
            quotas: tenant.quotas.over(defaults),
            created_at: tenant.created_at,
            updated_at: tenant.updated_at,
            keys,
        }
    }
}

/// `201` of `POST /tenants`: the key is shown this once.
#[derive(Debug, Serialize, ToSchema)]
pub struct TenantCreated {
    id: String,
    name: String,
    quotas: Quotas,
    #[serde(serialize_with = "rfc3339")]
    created_at: DateTime<Utc>,
    /// The tenant's API key (`hk_…`): shown only here, stored only as a hash.
    key: String,
    /// The key's id, to revoke it.
    key_id: String,
}

/// `201` of `POST /tenants/{id}/keys`.
#[derive(Debug, Serialize, ToSchema)]
pub struct KeyCreated {
    id: String,
    /// Shown only here.
    key: String,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantCreate {
    /// Unique; letters, digits, `-`, `_` and `.`, at most 64.
    #[schema(min_length = 1, max_length = 64, pattern = r"^[A-Za-z0-9._-]+$")]
    name: String,
    /// The tenant's own quotas (omitted ones are the server's defaults).
    #[serde(default)]
    #[schema(value_type = Option<Quotas>)]
    quotas: Option<Object<Quotas>>,
}

/// `PATCH /tenants/{id}`: a quota set to a number overrides the default;
/// set to `null`, the default applies again.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantPatch {
    #[schema(min_length = 1, max_length = 64, pattern = r"^[A-Za-z0-9._-]+$")]
    name: Option<String>,
    #[schema(value_type = Option<QuotasPatch>)]
    quotas: Option<Object<QuotasPatch>>,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct QuotasPatch {
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<u64>, minimum = 0)]
    max_concurrent_runs: Option<Option<u64>>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<u64>, minimum = 0)]
    requests_per_minute: Option<Option<u64>>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<u64>, minimum = 0)]
    tokens_per_day: Option<Option<u64>>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<u64>, minimum = 0)]
    max_sessions: Option<Option<u64>>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<u64>, minimum = 0)]
    storage_mb: Option<Option<u64>>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<u64>, minimum = 0)]
    max_streams: Option<Option<u64>>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<u64>, minimum = 0)]
    plugins: Option<Option<u64>>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<u64>, minimum = 0)]
    plugin_mb: Option<Option<u64>>,
}

/// Tells "absent" (outer `None`) from "null" (`Some(None)`).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<u64>>, D::Error> {
    crate::store::whole_u64(d).map(Some)
}

impl QuotasPatch {
    fn apply(self, mut q: Quotas) -> Quotas {
        let set = |field: &mut Option<u64>, new: Option<Option<u64>>| {
            if let Some(new) = new {
                *field = new;
            }
        };
        set(&mut q.max_concurrent_runs, self.max_concurrent_runs);
        set(&mut q.requests_per_minute, self.requests_per_minute);
        set(&mut q.tokens_per_day, self.tokens_per_day);
        set(&mut q.max_sessions, self.max_sessions);
        set(&mut q.storage_mb, self.storage_mb);
        set(&mut q.max_streams, self.max_streams);
        set(&mut q.plugins, self.plugins);
        set(&mut q.plugin_mb, self.plugin_mb);
        q
    }
}

fn check_name(name: &str) -> ApiResult<()> {
    let ok = (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if !ok {
        return Err(ApiError::Invalid(format!(
            "`name` must be 1 to 64 letters, digits, `.`, `_` or `-`, not {:?}",
            name.chars().take(80).collect::<String>()
        )));
    }
    Ok(())
}

#[utoipa::path(operation_id = "create_tenant", post, path = "/tenants", tag = "tenants", request_body = TenantCreate,
    responses((status = 201, body = TenantCreated), (status = 400, body = super::ErrorBody), (status = 403, body = super::ErrorBody),
        (status = 404, body = super::ErrorBody, description = "multi-tenant mode is off"),
        (status = 409, body = super::ErrorBody, description = "the name is taken"),
        (status = 413, body = super::ErrorBody), (status = 415, body = super::ErrorBody), (status = 422, body = super::ErrorBody)))]
pub(super) async fn create(
    State(state): State<AppState>,
    caller: Caller,
    JsonBody(input): JsonBody<TenantCreate>,
) -> ApiResult<(StatusCode, Json<TenantCreated>)> {
    let tenancy = admin(&state, &caller)?;
    check_name(&input.name)?;
    let now = now();
    let tenant = Tenant {
        id: new_id(),
        name: input.name,
        quotas: input.quotas.map(|Object(q)| q).unwrap_or_default(),
        created_at: now,
        updated_at: now,
        uid: None,
    };
    let key = new_key();
    let key_id = new_id();
    let tenant = state.store.insert_tenant(tenant, key_id.clone(), key.hash, key.prefix, tenancy.uid_range()).await?;
    let dir = tenancy.dir(&tenant.id);
    if let Err(err) = tenancy.make_dir(&tenant.id, &dir).await {
        let _ = state.store.delete_tenant(&tenant.id).await;
        return Err(ApiError::Internal(format!("cannot make the tenant's directory {}: {err}", dir.display())));
    }
    tracing::info!(tenant = %tenant.id, name = %tenant.name, "tenant created");
    Ok((
        StatusCode::CREATED,
        Json(TenantCreated {
            quotas: tenant.quotas.over(tenancy.defaults()),
            id: tenant.id,
            name: tenant.name,
            created_at: tenant.created_at,
            key: key.key,
            key_id,
        }),
    ))
}

#[utoipa::path(operation_id = "list_tenants", get, path = "/tenants", tag = "tenants", params(PageQuery),
    responses((status = 200, body = Vec<TenantView>, description = "oldest first; `Link: <…>; rel=\"next\"` when there is more",
        headers(("Link" = String, description = "the next page, when there is one"))),
        (status = 403, body = super::ErrorBody), (status = 404, body = super::ErrorBody), (status = 422, body = super::ErrorBody)))]
pub(super) async fn list(State(state): State<AppState>, caller: Caller, QueryParams(q): QueryParams<PageQuery>) -> ApiResult<Page<TenantView>> {
    let tenancy = admin(&state, &caller)?;
    let limit = page::limit(q.limit)?;
    let rows = state.store.tenants_page(q.after, limit + 1).await?;
    let items = rows.into_iter().map(|t| TenantView::new(t, tenancy.defaults(), None)).collect();
    Ok(Page::from_extra(items, limit, |last: &TenantView| page::link("/tenants", &[("limit", &limit.to_string()), ("after", &last.id)])))
}

#[utoipa::path(operation_id = "get_tenant", get, path = "/tenants/{id}", tag = "tenants", params(("id" = String, Path)),
    responses((status = 200, body = TenantView), (status = 403, body = super::ErrorBody), (status = 404, body = super::ErrorBody)))]
pub(super) async fn show(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Json<TenantView>> {
    let tenancy = admin(&state, &caller)?;
    let tenant = state.store.tenant(&id).await?;
    let keys = state.store.tenant_keys(&id).await?;
    Ok(Json(TenantView::new(tenant, tenancy.defaults(), Some(keys))))
}

#[utoipa::path(operation_id = "update_tenant", patch, path = "/tenants/{id}", tag = "tenants", params(("id" = String, Path)),
    request_body = TenantPatch,
    responses((status = 200, body = TenantView), (status = 400, body = super::ErrorBody), (status = 403, body = super::ErrorBody),
        (status = 404, body = super::ErrorBody), (status = 409, body = super::ErrorBody), (status = 413, body = super::ErrorBody),
        (status = 415, body = super::ErrorBody), (status = 422, body = super::ErrorBody)))]
pub(super) async fn update(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    JsonBody(input): JsonBody<TenantPatch>,
) -> ApiResult<Json<TenantView>> {
    let tenancy = admin(&state, &caller)?;
    let mut tenant = state.store.tenant(&id).await?;
    if let Some(name) = input.name {
        check_name(&name)?;
        tenant.name = name;
    }
    if let Some(Object(patch)) = input.quotas {
        tenant.quotas = patch.apply(tenant.quotas);
    }
    tenant.updated_at = now().max(tenant.updated_at);
    let tenant = state.store.update_tenant(tenant).await?;
    tenancy.forget_tenant(&id, false);
    crate::cluster::tell(&state, format!("tenant {id}")).await;
    Ok(Json(TenantView::new(tenant, tenancy.defaults(), None)))
}

/// How long a delete waits for the tenant's runs to stop.
const STOP_WAIT: Duration = Duration::from_secs(30);

#[utoipa::path(operation_id = "delete_tenant", delete, path = "/tenants/{id}", tag = "tenants", params(("id" = String, Path)),
    responses((status = 200, body = Status), (status = 403, body = super::ErrorBody), (status = 404, body = super::ErrorBody),
        (status = 409, body = super::ErrorBody, description = "the default tenant, or runs that would not stop")))]
pub(super) async fn remove(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Json<Status>> {
    let tenancy = admin(&state, &caller)?;
    state.store.tenant(&id).await?;
    if id == DEFAULT_TENANT {
        return Err(ApiError::Conflict("the default tenant holds the server's own data and cannot be deleted".into()));
    }
    // Its runs are cancelled and given time to stop before their data goes.
    let sessions = state.store.tenant_sessions(&id).await?;
    let busy: Vec<&String> = sessions.iter().filter(|s| state.runs.cancel_all(s)).collect();
    let deadline = tokio::time::Instant::now() + STOP_WAIT;
    while busy.iter().any(|s| state.runs.is_busy(s)) {
        if tokio::time::Instant::now() >= deadline {
            return Err(ApiError::Conflict(format!("tenant `{id}` still has runs stopping; try again")));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    state.store.delete_tenant(&id).await?;
    tenancy.forget_tenant(&id, true);
    crate::cluster::tell(&state, format!("tenant {id} deleted")).await;
    state.runtime.remove_tenant(&id);
    for dir in [tenancy.dir(&id), crate::tenancy::plugins_root(&state.settings.installed_dir).join(&id)] {
        let shown = dir.display().to_string();
        if let Err(err) = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await.unwrap_or_else(|e| Err(std::io::Error::other(e)))
            && err.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(tenant = %id, %err, "cannot remove {shown}");
        }
    }
    tracing::info!(tenant = %id, sessions = sessions.len(), "tenant deleted");
    Ok(status("deleted"))
}

#[utoipa::path(operation_id = "create_tenant_key", post, path = "/tenants/{id}/keys", tag = "tenants", params(("id" = String, Path)),
    responses((status = 201, body = KeyCreated), (status = 403, body = super::ErrorBody), (status = 404, body = super::ErrorBody)))]
pub(super) async fn add_key(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<(StatusCode, Json<KeyCreated>)> {
    admin(&state, &caller)?;
    let key = new_key();
    let stored = state.store.insert_tenant_key(&id, new_id(), key.hash, key.prefix).await?;
    tracing::info!(tenant = %id, key = %stored.id, "tenant key added");
    Ok((StatusCode::CREATED, Json(KeyCreated { id: stored.id, key: key.key })))
}

#[utoipa::path(operation_id = "revoke_tenant_key", delete, path = "/tenants/{id}/keys/{key_id}", tag = "tenants",
    params(("id" = String, Path), ("key_id" = String, Path)),
    responses((status = 200, body = Status), (status = 403, body = super::ErrorBody), (status = 404, body = super::ErrorBody)))]
pub(super) async fn revoke_key(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, key_id)): Path<(String, String)>,
) -> ApiResult<Json<Status>> {
    let tenancy = admin(&state, &caller)?;
    state.store.delete_tenant_key(&id, &key_id).await?;
    tenancy.forget_key(&key_id);
    crate::cluster::tell(&state, format!("key {key_id}")).await;
    tracing::info!(tenant = %id, key = %key_id, "tenant key revoked");
    Ok(status("deleted"))
}

/// A tenant's use of the server, with the quotas in force.
#[derive(Debug, Serialize, ToSchema)]
pub struct Usage {
    tenant_id: String,
    /// Tokens today (UTC).
    tokens_today: Tokens,
    /// Tokens this month (UTC).
    tokens_month: Tokens,
    runs_today: u64,
    /// Runs queued or running now.
    active_runs: u64,
    sessions: u64,
    /// Bytes of files under the tenant's directory (multi-tenant mode).
    storage_bytes: u64,
    /// Event streams open now (multi-tenant mode).
    streams: u64,
    /// `null` is no limit (always, in single-user mode).
    quotas: Quotas,
}

async fn usage_of(state: &AppState, tenant: &str) -> ApiResult<Usage> {
    let counts = state.store.usage(tenant).await?;
    let (storage_bytes, quotas) = match &state.tenancy {
        Some(tenancy) => (tenancy.measure_storage(tenant).await, tenancy.quotas(tenant).await?),
        None => (0, Quotas::default()),
    };
    Ok(Usage {
        tenant_id: tenant.to_string(),
        tokens_today: counts.today,
        tokens_month: counts.month,
        runs_today: counts.runs_today,
        active_runs: counts.active_runs,
        sessions: counts.sessions,
        storage_bytes,
        streams: state.tenancy.as_ref().map_or(0, |t| t.streams(tenant)),
        quotas,
    })
}

#[utoipa::path(operation_id = "get_usage", get, path = "/usage", tag = "tenants",
    responses((status = 200, body = Usage, description = "the caller's tenant (the admin token and a single-user server: the default tenant)")))]
pub(super) async fn usage(State(state): State<AppState>, caller: Caller) -> ApiResult<Json<Usage>> {
    Ok(Json(usage_of(&state, caller.owner()).await?))
}

#[utoipa::path(operation_id = "get_tenant_usage", get, path = "/tenants/{id}/usage", tag = "tenants", params(("id" = String, Path)),
    responses((status = 200, body = Usage), (status = 403, body = super::ErrorBody), (status = 404, body = super::ErrorBody)))]
pub(super) async fn tenant_usage(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Json<Usage>> {
    admin(&state, &caller)?;
    state.store.tenant(&id).await?;
    Ok(Json(usage_of(&state, &id).await?))
}
