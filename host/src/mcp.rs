//! MCP servers as tools (issue: MCP both ways, part 2). A registered
//! server's tools are offered to agents as `SERVER__TOOL`; a call goes to
//! the server through rmcp's client:
//!
//! * `http` servers over Streamable HTTP, one connection per registration
//!   (every session of its owner shares it). Their origin must be one the
//!   operator allows; a tenant's connection resolves the name itself and
//!   is pinned to the addresses it checked, so DNS cannot turn an allowed
//!   name into an internal address.
//! * `stdio` servers as a program per session, started on first use
//!   under exactly the confinement of `bash` (Landlock to the session's
//!   work_dir, namespaces, the tenant's uid, `[process]` network and
//!   limits), stopped when the session has been idle for
//!   `[mcp] idle_timeout_s`, when the session or server is deleted, and
//!   with the server.
//!
//! Whatever goes wrong with a server (it cannot start, it times out, it
//! dies) is the call's error result: the run goes on.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rmcp::model::{CallToolRequestParams, CallToolResult, ContentBlock, ResourceContents};
use rmcp::service::{ClientInitializeError, RunningService};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::{StreamableHttpClientTransportConfig, StreamableHttpError};
use rmcp::{RoleClient, ServiceExt};
use rustls::pki_types::CertificateDer;

use crate::runtime::policy::{Origin, OriginPattern};
use crate::runtime::{Runtime, WorkDir};
use crate::store::{McpServerRecord, McpTool, McpTransport, SERVER_KEYS, Store, StoreError};

/// Between a server's name and its tool's, in the name an agent uses.
pub const SEPARATOR: &str = "__";

/// How much of a stdio server's stderr is kept for its errors.
const STDERR_TAIL: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum McpError {
    /// The registration is refused (its name, its origin, stdio not allowed).
    #[error("{0}")]
    Refused(String),
    /// The server could not be reached or started, or it failed to answer.
    #[error("MCP server `{server}`: {reason}")]
    Failed { server: String, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// `[mcp]`, resolved.
#[derive(Debug, Clone)]
pub struct McpSettings {
    /// Origins `http` servers may have (`[mcp] allowed_origins`; for
    /// tenants `[tenants] allowed_origins` too).
    pub origins: Vec<OriginPattern>,
    pub tenant_origins: Vec<OriginPattern>,
    /// `stdio` servers may be registered.
    pub stdio: bool,
    pub idle_timeout: Duration,
    pub call_timeout: Duration,
    /// Multi-tenant mode: tenants' `http` servers are checked for internal addresses.
    pub multi_tenant: bool,
    /// `[http] ca_file`'s certificates, trusted besides the web's roots.
    pub extra_roots: Vec<CertificateDer<'static>>,
}

/// A server's tool for an agent: the server's record and the tool.
pub struct Resolved {
    pub server: McpServerRecord,
    pub tool: McpTool,
}

type Client = RunningService<RoleClient, ()>;

/// A program serving MCP for one session, and what confines it.
struct StdioServer {
    client: Client,
    /// When its last call ended (or it started), and how many calls it is
    /// answering now: idle means none in flight for `idle_timeout` since the
    /// last one ended, so a long call is never counted as idle time.
    last_used: Mutex<Instant>,
    in_flight: std::sync::atomic::AtomicUsize,
    /// Dropped last: kills the program and all it started.
    _confined: crate::runtime::Confined,
}

impl StdioServer {
    fn is_idle(&self, idle: Duration) -> bool {
        self.in_flight.load(std::sync::atomic::Ordering::SeqCst) == 0
            && self.last_used.lock().unwrap_or_else(|p| p.into_inner()).elapsed() >= idle
    }

    /// Marks a call in flight until the guard drops, also when the call's
    /// future is cancelled.
    fn busy(&self) -> Busy<'_> {
        self.in_flight.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Busy(self)
    }
}

struct Busy<'a>(&'a StdioServer);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        *self.0.last_used.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
        self.0.in_flight.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[derive(Clone)]
pub struct McpHub(Arc<Inner>);

struct Inner {
    store: Store,
    runtime: Runtime,
    settings: McpSettings,
    commands: crate::runtime::cgroup::CommandLimits,
    /// Built once: every `http` server's connection is made with it.
    tls: rustls::ClientConfig,
    /// `owner/name` → its connection.
    http: tokio::sync::Mutex<HashMap<String, Arc<Client>>>,
    /// (session, `owner/name`) → its program.
    stdio: tokio::sync::Mutex<HashMap<(String, String), Arc<StdioServer>>>,
}

fn key(server: &McpServerRecord) -> String {
    format!("{}/{}", server.tenant_id, server.name)
}

impl McpHub {
    pub fn new(store: Store, runtime: Runtime, settings: McpSettings, commands: crate::runtime::cgroup::CommandLimits) -> McpHub {
        let tls = tls_config(&settings.extra_roots);
        let hub = McpHub(Arc::new(Inner {
            store,
            runtime,
            settings,
            commands,
            tls,
            http: Default::default(),
            stdio: Default::default(),
        }));
        // Stops the programs of sessions gone idle. Holds only a weak
        // reference: the hub's end ends it.
        let weak = Arc::downgrade(&hub.0);
        tokio::spawn(async move {
            loop {
                let tick = match weak.upgrade() {
                    Some(inner) => (inner.settings.idle_timeout / 4).clamp(Duration::from_millis(250), Duration::from_secs(30)),
                    None => return,
                };
                tokio::time::sleep(tick).await;
                let Some(inner) = weak.upgrade() else { return };
                let idle = inner.settings.idle_timeout;
                let stopped: Vec<Arc<StdioServer>> = {
                    let mut stdio = inner.stdio.lock().await;
                    let expired: Vec<(String, String)> = stdio
                        .iter()
                        .filter(|(_, s)| s.is_idle(idle))
                        .map(|(k, _)| k.clone())
                        .collect();
                    expired.iter().filter_map(|k| stdio.remove(k)).collect()
                };
                for server in stopped {
                    tracing::debug!("stopping an idle MCP server");
                    drop(server);
                }
            }
        });
        hub
    }

    /// The servers `tenant` may use.
    pub async fn servers(&self, tenant: &str) -> Result<Vec<McpServerRecord>, McpError> {
        Ok(self.0.store.mcp_servers(tenant).await?)
    }

    /// What `name` (`SERVER__TOOL`) means for `tenant`, if it names a
    /// tool of one of its servers.
    pub async fn resolve(&self, tenant: &str, name: &str) -> Option<Resolved> {
        let (server, tool) = name.split_once(SEPARATOR)?;
        let servers = self.0.store.mcp_servers(tenant).await.ok()?;
        let server = servers.into_iter().find(|s| s.name == server)?;
        let tool = server.tools.iter().find(|t| t.name == tool)?.clone();
        Some(Resolved { server, tool })
    }

    /// Checks a registration, connects to (or starts) the server once to
    /// list its tools, and stores it. `owner` is `''` for a server-wide one.
    pub async fn register(&self, mut record: McpServerRecord, owner_is_tenant: bool) -> Result<McpServerRecord, McpError> {
        if !valid_name(&record.name) {
            return Err(McpError::Refused(format!(
                "`name` must be 1 to 40 letters, digits, `-` or `_`, without `{SEPARATOR}`; `{}` is not",
                record.name
            )));
        }
        match &record.transport {
            McpTransport::Http { url } => {
                self.check_url(url, owner_is_tenant)?;
            }
            McpTransport::Stdio { command, .. } => {
                if !self.0.settings.stdio {
                    return Err(McpError::Refused("`stdio` MCP servers are not allowed on this server ([mcp] stdio = false)".into()));
                }
                if command.trim().is_empty() {
                    return Err(McpError::Refused("`command` must not be empty".into()));
                }
            }
        }
        for (name, _) in &record.secrets {
            let bad = match record.transport {
                McpTransport::Http { .. } => reqwest013::header::HeaderName::from_bytes(name.as_bytes()).is_err(),
                McpTransport::Stdio { .. } => name.is_empty() || name.contains('=') || name.contains('\0'),
            };
            if bad {
                return Err(McpError::Refused(format!("`{name}` is not a valid header or variable name")));
            }
        }
        // A clash is answered before the server is started for nothing
        // (the store checks again, atomically).
        if self.0.store.mcp_servers(&record.tenant_id).await?.iter().any(|s| s.name == record.name) {
            return Err(StoreError::NameTaken { kind: "MCP server", name: record.name }.into());
        }
        // The tools it offers now; listing them proves it works.
        record.tools = match &record.transport {
            McpTransport::Http { .. } => {
                let client = self.connect_http(&record, owner_is_tenant).await?;
                let tools = list_tools(&record.name, &client, self.0.settings.call_timeout).await;
                let _ = Arc::try_unwrap(client).map(|c| tokio::spawn(c.cancel()));
                tools?
            }
            McpTransport::Stdio { .. } => {
                // In a directory of its own that nothing else uses.
                let scratch = tempfile::Builder::new().prefix("hangar-mcp-probe-").tempdir().map_err(|e| failed(&record.name, e))?;
                let dir = WorkDir::open(scratch.path()).map_err(|e| failed(&record.name, e))?;
                let server = self.start_stdio(&record, &dir).await?;
                list_tools(&record.name, &server.client, self.0.settings.call_timeout).await?
            }
        };
        Ok(self.0.store.insert_mcp_server(record).await?)
    }

    /// Removes the owner's server and stops what runs of it.
    pub async fn unregister(&self, owner: &str, name: &str) -> Result<(), McpError> {
        self.0.store.delete_mcp_server(owner, name).await?;
        let gone = format!("{owner}/{name}");
        if let Some(client) = self.0.http.lock().await.remove(&gone) {
            let _ = Arc::try_unwrap(client).map(|c| tokio::spawn(c.cancel()));
        }
        self.0.stdio.lock().await.retain(|(_, k), _| *k != gone);
        Ok(())
    }

    /// Stops the programs started for `session` (it was deleted).
    pub async fn end_session(&self, session: &str) {
        self.0.stdio.lock().await.retain(|(s, _), _| s != session);
    }

    /// Calls `resolved`'s tool for a session: the text for the model and
    /// whether it is an error. Never fails otherwise: every failure is an
    /// error result the model can read.
    pub async fn call(
        &self,
        resolved: &Resolved,
        session: &str,
        work_dir: Option<&Arc<WorkDir>>,
        input: &serde_json::Value,
    ) -> (String, bool) {
        let server = &resolved.server;
        let label = format!("{}{SEPARATOR}{}", server.name, resolved.tool.name);
        let arguments = match input {
            serde_json::Value::Object(map) => map.clone(),
            serde_json::Value::Null => Default::default(),
            other => return (format!("`{label}` takes a JSON object, not {other}"), true),
        };
        let params = CallToolRequestParams::new(resolved.tool.name.clone()).with_arguments(arguments);
        let timeout = self.0.settings.call_timeout;
        let outcome = match &server.transport {
            McpTransport::Http { .. } => match self.http_client(server, server.tenant_id != SERVER_KEYS).await {
                Ok(client) => {
                    let outcome = call_with(&server.name, &client, params, timeout).await;
                    if outcome.is_err() {
                        // A broken connection is made anew on the next call.
                        self.0.http.lock().await.remove(&key(server));
                    }
                    outcome
                }
                Err(err) => Err(err),
            },
            McpTransport::Stdio { .. } => match work_dir {
                None => Err(McpError::Failed { server: server.name.clone(), reason: "this session has no working directory".into() }),
                Some(dir) => match self.stdio_server(server, session, dir).await {
                    Ok(running) => {
                        let outcome = {
                            let _busy = running.busy();
                            call_with(&server.name, &running.client, params, timeout).await
                        };
                        if outcome.is_err() {
                            // It died or hung: the next call starts it anew.
                            self.0.stdio.lock().await.remove(&(session.to_string(), key(server)));
                        }
                        outcome
                    }
                    Err(err) => Err(err),
                },
            },
        };
        match outcome {
            Ok(result) => render(&result),
            Err(err) => (format!("`{label}` failed: {err}"), true),
        }
    }

    fn check_url(&self, url: &str, tenant: bool) -> Result<(), McpError> {
        let parsed = url::Url::parse(url).map_err(|e| McpError::Refused(format!("`url` `{url}` is not a URL: {e}")))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(McpError::Refused(format!("`url` must be http or https, not `{}`", parsed.scheme())));
        }
        let origin = Origin::of(&parsed).map_err(McpError::Refused)?;
        let settings = &self.0.settings;
        let listed = settings.origins.iter().any(|p| p.matches(&origin))
            || (tenant && settings.tenant_origins.iter().any(|p| p.matches(&origin)));
        if !listed {
            let setting = if tenant { "[mcp] allowed_origins or [tenants] allowed_origins" } else { "[mcp] allowed_origins" };
            return Err(McpError::Refused(format!("MCP server origin {origin} is not allowed: the operator must list it in {setting}")));
        }
        Ok(())
    }

    async fn http_client(&self, server: &McpServerRecord, tenant: bool) -> Result<Arc<Client>, McpError> {
        let k = key(server);
        let mut clients = self.0.http.lock().await;
        if let Some(client) = clients.get(&k) {
            if !client.is_transport_closed() {
                return Ok(client.clone());
            }
        }
        let client = self.connect_http(server, tenant).await?;
        clients.insert(k, client.clone());
        Ok(client)
    }

    async fn connect_http(&self, server: &McpServerRecord, tenant: bool) -> Result<Arc<Client>, McpError> {
        let McpTransport::Http { url } = &server.transport else { unreachable!("an http server") };
        // Checked again at connect time: the settings may have changed.
        self.check_url(url, tenant)?;
        let parsed = url::Url::parse(url).map_err(|e| failed(&server.name, e))?;
        let mut builder = reqwest013::Client::builder()
            .redirect(reqwest013::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(10))
            .tls_backend_preconfigured(self.0.tls.clone());
        let internal_ok = !(tenant && self.0.settings.multi_tenant);
        if !internal_ok && let Some(host) = parsed.host_str() {
            // Resolved here and pinned: the connection uses exactly the
            // addresses checked.
            let explicit = self
                .0
                .settings
                .origins
                .iter()
                .chain(&self.0.settings.tenant_origins)
                .any(|p| p.exact_host().is_some_and(|h| h.eq_ignore_ascii_case(host)));
            let port = parsed.port_or_known_default().unwrap_or(443);
            let addrs = crate::runtime::public_addrs(host.trim_start_matches('[').trim_end_matches(']'), port, explicit)
                .await
                .map_err(|reason| McpError::Failed { server: server.name.clone(), reason })?;
            builder = builder.resolve_to_addrs(host, &addrs);
        }
        let client = builder.build().map_err(|e| failed(&server.name, e))?;
        let mut headers = HashMap::new();
        for (name, value) in &server.secrets {
            let name = reqwest013::header::HeaderName::from_bytes(name.as_bytes()).map_err(|e| failed(&server.name, e))?;
            let value = reqwest013::header::HeaderValue::from_str(value).map_err(|e| failed(&server.name, e))?;
            headers.insert(name, value);
        }
        let config = StreamableHttpClientTransportConfig::with_uri(url.as_str()).custom_headers(headers);
        let transport = StreamableHttpClientTransport::with_client(client, config);
        let service = tokio::time::timeout(self.0.settings.call_timeout, ().serve(transport))
            .await
            .map_err(|_| timed_out(&server.name, self.0.settings.call_timeout))?
            .map_err(|e| McpError::Failed { server: server.name.clone(), reason: start_failure(&e) })?;
        Ok(Arc::new(service))
    }

    async fn stdio_server(&self, server: &McpServerRecord, session: &str, dir: &Arc<WorkDir>) -> Result<Arc<StdioServer>, McpError> {
        let k = (session.to_string(), key(server));
        let mut running = self.0.stdio.lock().await;
        if let Some(s) = running.get(&k) {
            if !s.client.is_transport_closed() {
                return Ok(s.clone());
            }
        }
        let started = Arc::new(self.start_stdio(server, dir).await?);
        running.insert(k, started.clone());
        Ok(started)
    }

    async fn start_stdio(&self, server: &McpServerRecord, dir: &WorkDir) -> Result<StdioServer, McpError> {
        let McpTransport::Stdio { command, args } = &server.transport else { unreachable!("a stdio server") };
        let mut argv = vec![command.clone()];
        argv.extend(args.iter().cloned());
        let program = crate::runtime::Program {
            // `$0` is the command, `$@` its arguments: never parsed by a shell.
            script: "exec \"$0\" \"$@\"",
            args: &argv,
            env: &server.secrets,
            stdin: std::process::Stdio::piped(),
            stdout: std::process::Stdio::piped(),
            stderr: std::process::Stdio::piped(),
            // A long-lived program: CPU time as the limits say, else an hour.
            cpu_seconds: 3600,
        };
        let mut confined = crate::runtime::spawn_confined(dir, self.0.runtime.port_gate().as_ref(), &self.0.commands, program)
            .await
            .map_err(|e| McpError::Failed { server: server.name.clone(), reason: format!("cannot start it: {e}") })?;
        let (Some(stdout), Some(stdin)) = (confined.child.stdout.take(), confined.child.stdin.take()) else {
            return Err(McpError::Failed { server: server.name.clone(), reason: "cannot start it: no pipes".into() });
        };
        // The end of what it writes to stderr, to say why it did not start.
        let said = Arc::new(Mutex::new(Vec::<u8>::new()));
        if let Some(mut stderr) = confined.child.stderr.take() {
            let said = said.clone();
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = stderr.read(&mut buf).await {
                    let mut kept = said.lock().unwrap_or_else(|p| p.into_inner());
                    kept.extend_from_slice(&buf[..n]);
                    let excess = kept.len().saturating_sub(STDERR_TAIL);
                    kept.drain(..excess);
                }
            });
        }
        let timeout = self.0.settings.call_timeout;
        let client = match tokio::time::timeout(timeout, ().serve((stdout, stdin))).await {
            Ok(Ok(client)) => client,
            Ok(Err(e)) => {
                // It usually exited: how, and (its pipe then closes) its last words.
                let status = tokio::time::timeout(Duration::from_millis(500), confined.child.wait()).await.ok().and_then(Result::ok);
                let verdict = status.and_then(|s| confined.verdict(s.code()));
                let how = match (status, verdict) {
                    (_, Some(v)) => format!(" ({v})"),
                    (Some(s), None) => format!(" (it exited: {s})"),
                    (None, None) => String::new(),
                };
                tokio::time::sleep(Duration::from_millis(50)).await;
                let tail = String::from_utf8_lossy(&said.lock().unwrap_or_else(|p| p.into_inner())).trim().to_string();
                let tail = if tail.is_empty() { String::new() } else { format!("; it said: {tail}") };
                return Err(McpError::Failed { server: server.name.clone(), reason: format!("it did not start: {e}{how}{tail}") });
            }
            Err(_) => return Err(timed_out(&server.name, timeout)),
        };
        Ok(StdioServer { client, last_used: Mutex::new(Instant::now()), in_flight: Default::default(), _confined: confined })
    }
}

fn failed(server: &str, err: impl std::fmt::Display) -> McpError {
    McpError::Failed { server: server.to_string(), reason: err.to_string() }
}

/// Why an `http` server's session could not start. rmcp keeps the HTTP
/// client's error inside its own as text, not as a `source`, which drops
/// the causes that say what the operator can fix (a certificate nobody
/// trusts, a refused connection), and names its own generic types instead:
/// the client's error, with its causes, says it plainly.
fn start_failure(err: &ClientInitializeError) -> String {
    if let ClientInitializeError::TransportError { error, .. } = err
        && let Some(StreamableHttpError::Client(client)) = error.error.downcast_ref::<StreamableHttpError<reqwest013::Error>>()
    {
        return crate::error_chain(client);
    }
    err.to_string()
}

fn timed_out(server: &str, after: Duration) -> McpError {
    McpError::Failed { server: server.to_string(), reason: format!("no answer within {} s ([mcp] call_timeout_s)", after.as_secs()) }
}

fn valid_name(name: &str) -> bool {
    (1..=40).contains(&name.len())
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && !name.contains(SEPARATOR)
        && !name.starts_with('_')
        && !name.ends_with('_')
}

async fn list_tools(server: &str, client: &Client, timeout: Duration) -> Result<Vec<McpTool>, McpError> {
    let tools = tokio::time::timeout(timeout, client.peer().list_all_tools())
        .await
        .map_err(|_| timed_out(server, timeout))?
        .map_err(|e| McpError::Failed { server: server.to_string(), reason: format!("cannot list its tools: {e}") })?;
    Ok(tools
        .into_iter()
        .filter(|t| !t.name.is_empty())
        .map(|t| McpTool {
            name: t.name.to_string(),
            description: t.description.as_deref().unwrap_or_default().to_string(),
            input_schema: serde_json::Value::Object((*t.input_schema).clone()),
        })
        .collect())
}

async fn call_with(server: &str, client: &Client, params: CallToolRequestParams, timeout: Duration) -> Result<CallToolResult, McpError> {
    tokio::time::timeout(timeout, client.peer().call_tool(params))
        .await
        .map_err(|_| timed_out(server, timeout))?
        .map_err(|e| failed(server, e))
}

/// A result as the model reads it: text as text, every other kind of
/// content summarised (never dropped without a word), structured content
/// when there is no text.
fn render(result: &CallToolResult) -> (String, bool) {
    let kb = |base64: &str| base64.len() * 3 / 4 / 1024;
    let mut parts: Vec<String> = Vec::new();
    for block in &result.content {
        parts.push(match block {
            ContentBlock::Text(t) => t.text.clone(),
            ContentBlock::Image(i) => format!("[image: {}, {} KB]", i.mime_type, kb(&i.data)),
            ContentBlock::Audio(a) => format!("[audio: {}, {} KB]", a.mime_type, kb(&a.data)),
            ContentBlock::Resource(r) => match &r.resource {
                ResourceContents::TextResourceContents { uri, text, .. } => format!("[resource {uri}]\n{text}"),
                ResourceContents::BlobResourceContents { uri, mime_type, blob, .. } => {
                    format!("[resource {uri}: {}, {} KB]", mime_type.as_deref().unwrap_or("binary"), kb(blob))
                }
                _ => "[resource of a kind this server does not know]".to_string(),
            },
            ContentBlock::ResourceLink(link) => format!("[resource link: {} ({})]", link.uri, link.name),
            _ => "[content of a kind this server does not know]".to_string(),
        });
    }
    if parts.is_empty()
        && let Some(structured) = &result.structured_content
    {
        parts.push(structured.to_string());
    }
    (parts.join("\n"), result.is_error.unwrap_or(false))
}

/// TLS for MCP connections: ring, the web's root certificates and
/// `[http] ca_file`'s (`extra`), as the providers' clients have.
fn tls_config(extra: &[CertificateDer<'static>]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    // Each one was parsed when the config was read (see `config::read_roots`).
    roots.add_parsable_certificates(extra.iter().cloned());
    rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

/// The owner a caller registers under: its tenant, or server-wide.
pub fn owner_of(caller: &crate::tenancy::Caller) -> String {
    match caller {
        crate::tenancy::Caller::Tenant(id) => id.clone(),
        crate::tenancy::Caller::Operator => SERVER_KEYS.to_string(),
    }
}
