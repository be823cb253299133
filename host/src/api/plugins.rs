//! Plugin management: list, install (multipart upload), remove, rescan the
//! plugins directory, and the specs of every tool. With PostgreSQL, plugins
//! installed through the API are rows that every host loads ([`sync_plugins`]).

use std::io::Read;
use std::path::Path as FsPath;
use std::sync::Arc;

use axum::extract::multipart::{Field, MultipartRejection};
use axum::extract::{DefaultBodyLimit, Multipart, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::Serialize;
use tempfile::NamedTempFile;
use tokio::io::AsyncWriteExt;
use utoipa::ToSchema;

use super::page::{self, Page, PageQuery};
use super::{ApiError, ApiResult, AppState, QueryParams, Status, status};
use crate::config::Settings;
use crate::runtime::{Capabilities, FsAccess, Installer, Kind, LoadState, Manifest, Plugin, Runtime, RuntimeError, Source, policy};
use crate::store::{Store, StoreError, StoredPlugin};
use crate::tenancy::Caller;

/// Largest plugin upload: a Python component alone is tens of MB.
pub const PLUGIN_BODY_LIMIT: usize = 256 * 1024 * 1024;
/// Most plugin uploads received at once; more get 429.
pub const MAX_CONCURRENT_UPLOADS: usize = 2;
/// Largest `manifest` field of an upload.
const MANIFEST_LIMIT: usize = 1024 * 1024;
/// Upload chunks are gathered into writes of this size.
const UPLOAD_WRITE_BUFFER: usize = 1024 * 1024;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/plugins", get(list).post(install).layer(DefaultBodyLimit::max(PLUGIN_BODY_LIMIT)))
        .route("/plugins/{id}", delete(remove))
        .route("/plugins/reload", post(reload))
        .route("/tools", get(tools))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PluginView {
    id: String,
    kind: Kind,
    version: String,
    description: String,
    source: Source,
    /// `server` (every tenant sees it) or `tenant` (the caller's own).
    scope: &'static str,
    /// `ready`, `compiling`, or `failed` (see `error`).
    state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    capabilities: CapabilitiesView,
    /// For plugins that ask for `process`: how commands are confined here
    /// (the Landlock ABI, what is enforced and what is missing).
    #[serde(skip_serializing_if = "Option::is_none")]
    confinement: Option<String>,
    /// For plugins granted `process`: who its commands run as, their
    /// network and their limits, for this caller.
    #[serde(skip_serializing_if = "Option::is_none")]
    commands: Option<CommandsView>,
    /// In the answer to an install only: what the plugin will likely trip
    /// over, although it was installed (a tool that declares no filesystem
    /// access, for one).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    warnings: Vec<String>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CapabilitiesView {
    /// What the manifest asks for.
    requested: Capabilities,
    /// What the host grants (the request within the operator's policy).
    granted: GrantedView,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct GrantedView {
    filesystem: FsAccess,
    http: Vec<String>,
    process: bool,
    /// Environment variables the host reads for this provider (its key and
    /// base URL): a built-in's vendor variables, or what the operator lists.
    env: Vec<String>,
    /// With `read-write`: bytes one call may write, in MB (1 MB = 2^20 bytes).
    #[serde(skip_serializing_if = "Option::is_none")]
    write_mb: Option<u64>,
    /// With `read-write`: files, directories and links one call may create.
    #[serde(skip_serializing_if = "Option::is_none")]
    max_files: Option<u64>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct CommandsView {
    /// The uid commands run as, when it is one for every session.
    #[serde(skip_serializing_if = "Option::is_none")]
    uid: Option<u32>,
    /// Who commands run as, in words.
    user: String,
    /// `none` or `all` (`[process] network`, or the plugin's override).
    network: &'static str,
    /// With `network = "none"`: the TCP ports commands may still connect to.
    allowed_ports: Vec<u16>,
    memory_mb: u64,
    max_processes: u64,
    /// Absent: as long as the call's timeout.
    #[serde(skip_serializing_if = "Option::is_none")]
    cpu_seconds: Option<u64>,
    file_size_mb: u64,
    /// How the limits are enforced here (cgroup or rlimit).
    enforced_by: String,
}

/// Who a caller's commands run as: a tenant's own uid, or the server's
/// rule for everyone.
#[derive(Debug, Clone, Copy)]
struct CallerUser {
    tenant_uid: Option<u32>,
    uid_range: Option<(u32, u32)>,
}

async fn caller_user(state: &AppState, caller: &Caller) -> ApiResult<CallerUser> {
    Ok(match (&state.tenancy, caller) {
        (Some(tenancy), Caller::Tenant(id)) => CallerUser { tenant_uid: Some(tenancy.uid(id).await?), uid_range: Some(tenancy.uid_range()) },
        (Some(tenancy), Caller::Operator) => CallerUser { tenant_uid: None, uid_range: Some(tenancy.uid_range()) },
        (None, _) => CallerUser { tenant_uid: None, uid_range: None },
    })
}

fn commands_view(plugin: &Plugin, user: CallerUser) -> Option<CommandsView> {
    if !plugin.grants.process {
        return None;
    }
    let limits = &plugin.grants.commands;
    let (uid, user) = policy::describe_user(limits, user.tenant_uid, user.uid_range);
    Some(CommandsView {
        uid,
        user,
        network: if limits.network { "all" } else { "none" },
        allowed_ports: limits.allowed_ports.clone(),
        memory_mb: limits.memory_bytes >> 20,
        max_processes: limits.max_processes,
        cpu_seconds: limits.cpu_seconds,
        file_size_mb: limits.file_size_bytes >> 20,
        enforced_by: crate::runtime::cgroup::controllers().describe(),
    })
}

fn view(runtime: &Runtime, plugin: &Plugin, user: CallerUser) -> PluginView {
    let (state, error) = match runtime.load_state(plugin) {
        LoadState::Compiling => ("compiling", None),
        LoadState::Ready => ("ready", None),
        LoadState::Failed(e) => ("failed", Some(e)),
    };
    let m = &plugin.manifest;
    PluginView {
        id: m.name.clone(),
        kind: m.kind,
        version: m.version.clone(),
        description: m.description.clone(),
        source: plugin.source,
        scope: if plugin.owner.is_some() { "tenant" } else { "server" },
        state,
        error,
        capabilities: CapabilitiesView {
            requested: m.capabilities.clone(),
            granted: GrantedView {
                filesystem: plugin.grants.filesystem,
                http: plugin.grants.http.iter().map(ToString::to_string).collect(),
                process: plugin.grants.process,
                env: plugin.grants.env.clone(),
                write_mb: (plugin.grants.filesystem == FsAccess::ReadWrite).then_some(plugin.grants.limits.write_bytes >> 20),
                max_files: (plugin.grants.filesystem == FsAccess::ReadWrite).then_some(plugin.grants.limits.max_files),
            },
        },
        confinement: m.capabilities.process.then(|| policy::confinement().describe()),
        commands: commands_view(plugin, user),
        warnings: Vec::new(),
    }
}

/// The plugins a caller sees, by name: the server-wide ones, and a
/// tenant's own.
fn visible(state: &AppState, caller: &Caller) -> Vec<Arc<Plugin>> {
    match caller {
        Caller::Operator => state.runtime.plugins(),
        Caller::Tenant(id) => state.runtime.plugins_for(id),
    }
}

/// Where a caller's uploads are stored: beside the database, a tenant's
/// under `tenants/<id>/`.
fn store_dir(state: &AppState, caller: &Caller) -> std::path::PathBuf {
    match caller {
        Caller::Operator => state.settings.installed_dir.clone(),
        Caller::Tenant(id) => crate::tenancy::plugins_root(&state.settings.installed_dir).join(id),
    }
}

/// A tenant's `plugins` and `plugin_mb` quotas, with the upload of `name`
/// (`length` bytes) in place of the plugin of that name it may replace.
async fn check_plugin_quotas(state: &AppState, tenancy: &crate::tenancy::Tenancy, tenant: &str, name: &str, length: u64) -> ApiResult<()> {
    let quotas = tenancy.quotas(tenant).await?;
    let others: Vec<Arc<Plugin>> =
        state.runtime.plugins_for(tenant).into_iter().filter(|p| p.owner.as_deref() == Some(tenant) && p.id() != name).collect();
    if let Some(limit) = quotas.plugins
        && others.len() as u64 >= limit
    {
        return Err(crate::tenancy::QuotaExceeded::from_store("plugins", limit, others.len() as u64).into());
    }
    if let Some(mb) = quotas.plugin_mb {
        let used = others.iter().map(|p| p.size() as u64).sum::<u64>();
        if used + length > mb << 20 {
            let used_mb = (used + length).div_ceil(1 << 20);
            return Err(crate::tenancy::QuotaExceeded::from_store("plugin_mb", mb, used_mb).into());
        }
    }
    Ok(())
}

/// What an installed plugin will likely trip over. A tool with no
/// `filesystem` grant is warned: Rust's wasip2 standard library imports the
/// WASI filesystem whether the tool opens files or not, so nothing refuses
/// it at load, and each open would fail at call time.
fn install_warnings(plugin: &Plugin) -> Vec<String> {
    let m = &plugin.manifest;
    let mut warnings = Vec::new();
    if m.kind == Kind::Tool && m.capabilities.filesystem == FsAccess::None {
        warnings.push(format!(
            "tool `{}` declares no filesystem access, so it cannot open any file of the session's working directory; \
             if it reads files, add `filesystem = \"read\"` to its manifest and the operator's policy",
            m.name
        ));
    }
    warnings
}

#[utoipa::path(get, path = "/plugins", tag = "plugins", params(PageQuery),
    responses((status = 200, body = Vec<PluginView>, description = "by id; `Link: <…>; rel=\"next\"` when there is more",
        headers(("Link" = String, description = "the next page, when there is one"))),
        (status = 422, body = super::ErrorBody)))]
pub(super) async fn list(State(state): State<AppState>, caller: Caller, QueryParams(q): QueryParams<PageQuery>) -> ApiResult<Page<PluginView>> {
    let limit = page::limit(q.limit)?;
    let plugins = visible(&state, &caller);
    let user = caller_user(&state, &caller).await?;
    let items = plugins
        .iter()
        .filter(|p| q.after.as_deref().is_none_or(|after| p.id() > after))
        .take(limit + 1)
        .map(|p| view(&state.runtime, p, user))
        .collect();
    Ok(Page::from_extra(items, limit, |last: &PluginView| page::link("/plugins", &[("limit", &limit.to_string()), ("after", &last.id)])))
}

/// The multipart form of `POST /plugins`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct PluginUpload {
    /// The text of `NAME.plugin.toml`.
    manifest: String,
    /// The component, built for wasm32-wasip2.
    #[schema(format = Binary, value_type = String)]
    wasm: Vec<u8>,
}

#[utoipa::path(post, path = "/plugins", tag = "plugins",
    request_body(content = PluginUpload, content_type = "multipart/form-data"),
    responses((status = 201, body = PluginView, description = "installed"), (status = 200, body = PluginView, description = "upgraded"),
        (status = 400, body = super::ErrorBody, description = "not a multipart/form-data body, or a malformed one"),
        (status = 413, body = super::ErrorBody), (status = 422, body = super::ErrorBody, description = "the manifest or the component is refused, among others because compiling it ran past `[limits] compile_timeout_s` or `compile_memory_mb`"),
        (status = 429, body = super::ErrorBody, description = "two uploads are already being received (`Retry-After: 5`), or a tenant's `plugins` or `plugin_mb` quota is reached")))]
pub(super) async fn install(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    form: Result<Multipart, MultipartRejection>,
) -> ApiResult<(StatusCode, Json<PluginView>)> {
    let result = receive_and_install(state, caller, headers, form).await;
    if let Err(err) = &result {
        tracing::warn!(%err, "plugin upload refused");
    }
    result
}

async fn receive_and_install(
    state: AppState,
    caller: Caller,
    headers: HeaderMap,
    form: Result<Multipart, MultipartRejection>,
) -> ApiResult<(StatusCode, Json<PluginView>)> {
    // A declared length over the limit is refused before a byte is read.
    if let Some(length) = headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok())
        && length > PLUGIN_BODY_LIMIT as u64
    {
        return Err(ApiError::TooLarge { limit: PLUGIN_BODY_LIMIT });
    }
    let mut form = form?;
    // Held until the plugin is installed: the body, then the component read
    // back from its file, are at most this many at once.
    let _permit = state
        .uploads
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::TooManyUploads { limit: MAX_CONCURRENT_UPLOADS })?;
    tracing::debug!(receiving = MAX_CONCURRENT_UPLOADS - state.uploads.available_permits(), "receiving a plugin upload");
    let mut manifest_text = None;
    let mut wasm = None;
    while let Some(field) = form.next_field().await? {
        match field.name() {
            Some("manifest") if manifest_text.is_none() => manifest_text = Some(receive_manifest(field).await?),
            Some("wasm") if wasm.is_none() => wasm = Some(receive_wasm(&state.settings.installed_dir, field).await?),
            Some(name @ ("manifest" | "wasm")) => return Err(ApiError::Invalid(format!("the form has more than one `{name}` field"))),
            Some(other) => return Err(ApiError::Invalid(format!("unexpected form field `{other}`; send `manifest` and `wasm`"))),
            None => return Err(ApiError::Invalid("a form field has no name; send `manifest` and `wasm`".into())),
        }
    }
    let manifest_text = manifest_text.ok_or_else(|| ApiError::Invalid("the form has no `manifest` field".into()))?;
    let (file, length) = wasm.filter(|(_, length)| *length > 0).ok_or_else(|| ApiError::Invalid("the form has no `wasm` field".into()))?;
    let manifest = Manifest::parse(&manifest_text, None)?;
    if let (Caller::Tenant(tenant), Some(tenancy)) = (&caller, &state.tenancy) {
        check_plugin_quotas(&state, tenancy, tenant, &manifest.name, length).await?;
    }
    // The runtime keeps a plugin's bytes in memory (to compile it, and to
    // compare it on reload): read them back once, whole.
    let wasm = tokio::task::spawn_blocking(move || read_upload(&file, length))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .map_err(|e| ApiError::Internal(format!("cannot read back the uploaded component: {e}")))?;
    let id = manifest.name.clone();
    let cap = state.settings.tenants.plugin_cap();
    let installer = match &caller {
        Caller::Operator => Installer::Server,
        Caller::Tenant(tenant) => Installer::Tenant { id: tenant, cap: &cap },
    };
    let existed = match &caller {
        Caller::Operator => state.runtime.get(&id).is_some(),
        Caller::Tenant(tenant) => state.runtime.resolve(tenant, &id).is_some(),
    };
    // Until the plugin is stored: a sync now would find it in the runtime
    // and not in the database, and take it for one removed through another host.
    let _installing = SYNCING.read().await;
    let plugin = state.runtime.install_as(installer, manifest, wasm.clone(), Source::Api).await?;
    if state.store.is_shared() {
        // In the database, where every host loads it from.
        let stored = StoredPlugin::new(plugin.key(), plugin.owner.clone(), manifest_text, wasm);
        if let Err(err) = state.store.put_plugin(stored).await {
            state.runtime.remove(&plugin.key());
            return Err(err.into());
        }
    } else {
        // Stored beside the database, so it is back after a restart (and, the
        // compiled form being cached, without compiling again).
        let dir = store_dir(&state, &caller);
        let saved = tokio::task::spawn_blocking(move || save(&dir, &id, &manifest_text, &wasm))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        if let Err(err) = saved {
            state.runtime.remove(&plugin.key());
            return Err(ApiError::Internal(format!("cannot store plugin `{}`: {err}", plugin.id())));
        }
    }
    tracing::info!(plugin = %plugin.id(), tenant = plugin.owner.as_deref(), upgrade = existed, "plugin installed through the API");
    let warnings = install_warnings(&plugin);
    for warning in &warnings {
        tracing::warn!(plugin = %plugin.id(), "{warning}");
    }
    let code = if existed { StatusCode::OK } else { StatusCode::CREATED };
    Ok((code, Json(PluginView { warnings, ..view(&state.runtime, &plugin, caller_user(&state, &caller).await?) })))
}

/// The `manifest` field, which is short text.
async fn receive_manifest(mut field: Field<'_>) -> ApiResult<String> {
    let mut text = Vec::new();
    while let Some(chunk) = field.chunk().await? {
        if text.len() + chunk.len() > MANIFEST_LIMIT {
            return Err(ApiError::Invalid(format!("the `manifest` field is over {} KiB; a manifest is a short TOML file", MANIFEST_LIMIT >> 10)));
        }
        text.extend_from_slice(&chunk);
    }
    String::from_utf8(text).map_err(|_| ApiError::Invalid("the `manifest` field is not UTF-8 text".into()))
}

/// Streams the `wasm` field to a temporary file (removed when dropped), so
/// an upload is never whole in memory while it arrives; returns the file
/// and its length.
async fn receive_wasm(installed_dir: &FsPath, mut field: Field<'_>) -> ApiResult<(NamedTempFile, u64)> {
    let near = installed_dir.parent().filter(|p| !p.as_os_str().is_empty()).map(FsPath::to_path_buf);
    let file = tokio::task::spawn_blocking(move || {
        let builder = || {
            let mut builder = tempfile::Builder::new();
            builder.prefix(".hangar-upload-").suffix(".wasm");
            builder
        };
        // Beside the database first (the plugin is stored there next);
        // the system's temporary directory if that cannot be written.
        near.and_then(|dir| builder().tempfile_in(dir).ok()).map_or_else(|| builder().tempfile(), Ok)
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
    .map_err(|e| ApiError::Internal(format!("cannot create a temporary file for the upload: {e}")))?;
    let io = |e: std::io::Error| ApiError::Internal(format!("cannot write the upload to {}: {e}", file.path().display()));
    let handle = file.as_file().try_clone().map_err(io)?;
    let mut out = tokio::io::BufWriter::with_capacity(UPLOAD_WRITE_BUFFER, tokio::fs::File::from_std(handle));
    let mut length: u64 = 0;
    while let Some(chunk) = field.chunk().await? {
        length += chunk.len() as u64;
        if length > PLUGIN_BODY_LIMIT as u64 {
            return Err(ApiError::TooLarge { limit: PLUGIN_BODY_LIMIT });
        }
        out.write_all(&chunk).await.map_err(io)?;
    }
    out.flush().await.map_err(io)?;
    out.into_inner().flush().await.map_err(io)?;
    Ok((file, length))
}

/// The uploaded component, read into one allocation.
fn read_upload(file: &NamedTempFile, length: u64) -> std::io::Result<Arc<[u8]>> {
    let length = usize::try_from(length).map_err(std::io::Error::other)?;
    let mut bytes: Arc<[u8]> = std::iter::repeat_n(0u8, length).collect();
    let buf = Arc::get_mut(&mut bytes).expect("not shared yet");
    file.reopen()?.read_exact(buf)?;
    Ok(bytes)
}

fn save(dir: &FsPath, id: &str, manifest: &str, wasm: &[u8]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let write = |name: String, bytes: &[u8]| {
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, bytes)?;
        std::fs::rename(&tmp, dir.join(name))
    };
    // The wasm first: a manifest is what makes the directory scan see a plugin.
    write(format!("{id}.wasm"), wasm)?;
    write(format!("{id}.plugin.toml"), manifest.as_bytes())
}

/// Agents (as `name (id)`) that use the plugin as a tool or a provider.
async fn users(state: &AppState, plugin: &Plugin) -> ApiResult<Vec<String>> {
    let id = plugin.id();
    Ok(state
        .store
        .agents()
        .await?
        .iter()
        .filter(|a| plugin.owner.as_deref().is_none_or(|owner| owner == a.tenant_id))
        .filter(|a| match plugin.manifest.kind {
            Kind::Tool => a.tools.iter().any(|t| t == id),
            Kind::Provider => a.provider.id == id,
        })
        .map(|a| format!("{} ({})", a.name, a.id))
        .collect())
}

#[utoipa::path(delete, path = "/plugins/{id}", tag = "plugins", params(("id" = String, Path)),
    responses((status = 200, body = Status), (status = 403, body = super::ErrorBody, description = "a tenant key and a server-wide plugin"),
        (status = 404, body = super::ErrorBody), (status = 409, body = super::ErrorBody),
        (status = 422, body = super::ErrorBody)))]
pub(super) async fn remove(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<Json<Status>> {
    let plugin = match &caller {
        Caller::Operator => state.runtime.get(&id),
        Caller::Tenant(tenant) => state.runtime.resolve(tenant, &id),
    };
    let plugin = plugin.ok_or_else(|| ApiError::NotFound(format!("plugin `{id}` does not exist")))?;
    if let Caller::Tenant(_) = &caller
        && plugin.owner.is_none()
    {
        return Err(ApiError::Forbidden(format!("`{id}` is a server-wide plugin; only the admin token can delete it")));
    }
    match plugin.source {
        Source::Builtin => return Err(ApiError::Conflict(format!("`{id}` is built in and cannot be deleted"))),
        Source::Directory => {
            return Err(ApiError::Conflict(format!(
                "`{id}` comes from the plugins directory {}: remove its files there and POST /plugins/reload",
                state.settings.plugins_dir.display()
            )));
        }
        Source::Api => {}
    }
    let users = users(&state, &plugin).await?;
    if !users.is_empty() {
        return Err(ApiError::Conflict(format!("`{id}` is still used by agents: {}", users.join(", "))));
    }
    let _removing = SYNCING.read().await;
    if state.store.is_shared() {
        // Its row first: had that failed, the plugin would still be everywhere.
        state.store.delete_plugin(&plugin.key()).await?;
        state.runtime.remove(&plugin.key());
        return Ok(status("deleted"));
    }
    state.runtime.remove(&plugin.key());
    let dir = store_dir(&state, &caller);
    tokio::task::spawn_blocking(move || {
        for name in [format!("{id}.plugin.toml"), format!("{id}.wasm")] {
            if let Err(err) = std::fs::remove_file(dir.join(&name))
                && err.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(%err, "cannot remove {name}");
            }
        }
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(status("deleted"))
}

/// Held shared by an install or a removal through the API, and alone by
/// [`sync_plugins`]: a sync never sees a plugin between the runtime and the
/// database. (Process-wide: one server runs in a process.)
static SYNCING: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// Makes this host's plugins installed through the API those of the
/// database, when it keeps them (PostgreSQL): loads a row that is not
/// loaded or whose component or manifest differ, and unloads a plugin whose
/// row is gone. Called on start, and when another host announces a change
/// ([`crate::store::PLUGINS_CHANGED`]). Returns how many plugins it loaded
/// or unloaded; a row that cannot be loaded is logged and skipped (as a
/// broken file in the plugins directory is).
pub async fn sync_plugins(state: &AppState) -> Result<usize, StoreError> {
    load_stored(&state.store, &state.runtime, &state.settings).await
}

/// [`sync_plugins`] before there is an [`AppState`] (the server's start).
pub async fn load_stored(store: &Store, runtime: &Runtime, settings: &Settings) -> Result<usize, StoreError> {
    if !store.is_shared() {
        return Ok(0);
    }
    let _alone = SYNCING.write().await;
    let heads = store.plugin_heads().await?;
    let cap = settings.tenants.plugin_cap();
    let mut changed = 0;
    for head in &heads {
        let loaded = runtime.get(&head.key);
        if let Some(plugin) = &loaded
            && plugin.source == Source::Api
            && plugin.sha256() == head.sha256
            && Manifest::parse(&head.manifest, None).is_ok_and(|m| m == plugin.manifest)
        {
            continue;
        }
        // Gone since the heads were read: the removal's own notice follows.
        let Some(stored) = store.plugin(&head.key).await? else { continue };
        match load_one(runtime, &cap, stored, loaded.is_some()).await {
            Ok(plugin) => {
                tracing::info!(plugin = %plugin.id(), tenant = plugin.owner.as_deref(), "plugin loaded from the database");
                changed += 1;
            }
            Err(err) => tracing::error!(plugin = %head.key, %err, "cannot load a plugin stored in the database"),
        }
    }
    for plugin in runtime.all_plugins() {
        if plugin.source == Source::Api && !heads.iter().any(|h| h.key == plugin.key()) {
            runtime.remove(&plugin.key());
            tracing::info!(plugin = %plugin.id(), tenant = plugin.owner.as_deref(), "plugin removed: it is no longer in the database");
            changed += 1;
        }
    }
    Ok(changed)
}

/// Registers a stored plugin, as its installer did. A new one compiles in
/// the background (a start does not wait for it); one that replaces a
/// loaded version is compiled first, so a broken upgrade leaves the old.
async fn load_one(
    runtime: &Runtime,
    cap: &policy::PluginPolicy,
    stored: StoredPlugin,
    replacing: bool,
) -> Result<Arc<Plugin>, RuntimeError> {
    let manifest = Manifest::parse(&stored.manifest, None)?;
    if crate::runtime::registry_key(stored.tenant_id.as_deref(), &manifest.name) != stored.key {
        return Err(RuntimeError::Manifest {
            plugin: stored.key,
            reason: format!("the row's key does not match its manifest's name `{}` and tenant", manifest.name),
        });
    }
    let installer = match &stored.tenant_id {
        None => Installer::Server,
        Some(id) => Installer::Tenant { id, cap },
    };
    if replacing {
        runtime.install_as(installer, manifest, stored.wasm, Source::Api).await
    } else {
        runtime.add_as(installer, manifest, stored.wasm, Source::Api)
    }
}

#[derive(Debug, Default, Serialize, ToSchema)]
pub struct ReloadReport {
    /// Plugins newly loaded or upgraded from the directory.
    loaded: Vec<String>,
    /// Plugins whose files did not change.
    unchanged: Vec<String>,
    /// Plugins whose files are gone.
    removed: Vec<String>,
    errors: Vec<ReloadError>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ReloadError {
    plugin: String,
    error: String,
}

#[utoipa::path(post, path = "/plugins/reload", tag = "plugins", responses((status = 200, body = ReloadReport)))]
pub(super) async fn reload(State(state): State<AppState>) -> ApiResult<Json<ReloadReport>> {
    let dir = state.settings.plugins_dir.clone();
    let found = match tokio::task::spawn_blocking(move || Runtime::scan_directory(&dir)).await {
        Ok(Ok(found)) => found,
        Ok(Err(err)) if err.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Ok(Err(err)) => return Err(ApiError::Invalid(format!("cannot read {}: {err}", state.settings.plugins_dir.display()))),
        Err(e) => return Err(ApiError::Internal(e.to_string())),
    };
    let mut report = ReloadReport::default();
    let mut seen = Vec::new();
    for entry in found {
        let crate::runtime::Found { manifest, wasm, .. } = match entry {
            Ok(entry) => entry,
            Err(err) => {
                report.errors.push(ReloadError { plugin: plugin_of(&err), error: err.to_string() });
                continue;
            }
        };
        let id = manifest.name.clone();
        seen.push(id.clone());
        if let Some(existing) = state.runtime.get(&id)
            && existing.source == Source::Directory
            && Runtime::same_component(&existing, &wasm)
            && existing.manifest.capabilities == manifest.capabilities
        {
            report.unchanged.push(id);
            continue;
        }
        match state.runtime.install(manifest, wasm, Source::Directory).await {
            Ok(_) => report.loaded.push(id),
            Err(err) => report.errors.push(ReloadError { plugin: id, error: err.to_string() }),
        }
    }
    for plugin in state.runtime.plugins() {
        if plugin.source == Source::Directory && !seen.iter().any(|s| s == plugin.id()) {
            state.runtime.remove(plugin.id());
            report.removed.push(plugin.id().to_string());
        }
    }
    Ok(Json(report))
}

fn plugin_of(err: &crate::runtime::RuntimeError) -> String {
    use crate::runtime::RuntimeError as E;
    match err {
        E::UploadedManifest { .. } => "upload".into(),
        E::Manifest { plugin, .. } | E::Load { plugin, .. } | E::CompileLimit { plugin, .. } | E::CapabilityDenied { plugin, .. } | E::Clash { plugin, .. } => plugin.clone(),
        other => other.to_string(),
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ToolView {
    name: String,
    description: String,
    #[schema(value_type = Object)]
    input_schema: serde_json::Value,
}

#[utoipa::path(get, path = "/tools", tag = "plugins", responses((status = 200, body = Vec<ToolView>)))]
pub(super) async fn tools(State(state): State<AppState>, caller: Caller) -> ApiResult<Json<Vec<ToolView>>> {
    let mut out = Vec::new();
    // Side by side: a tool still loading (or running into its deadline
    // doing so) holds up the list only by its own time.
    let tools: Vec<Arc<Plugin>> = visible(&state, &caller).into_iter().filter(|p| p.manifest.kind == Kind::Tool).collect();
    let specs = futures::future::join_all(tools.iter().map(|p| async { state.runtime.tool_spec(&p.key()).await })).await;
    for spec in specs {
        match spec {
            // A schema that is not a JSON object fails to load, so this parses.
            Ok(spec) => match serde_json::from_str(&spec.input_schema) {
                Ok(input_schema) => out.push(ToolView { name: spec.name, description: spec.description, input_schema }),
                Err(err) => tracing::warn!(tool = %spec.name, %err, "tool left out of /tools: its input schema is not JSON"),
            },
            // A plugin that failed to load shows its error in GET /plugins.
            Err(err) => tracing::debug!(%err, "tool left out of /tools"),
        }
    }
    for tool in super::mcp_servers::tools_of(&state, &caller).await? {
        out.push(ToolView { name: tool.name, description: tool.description, input_schema: tool.input_schema });
    }
    Ok(Json(out))
}
