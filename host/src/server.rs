//! Starting and stopping the server.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::io::ErrorKind;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::api::{self, ApiError, AppState};
use crate::config::Settings;
use crate::runtime::{Runtime, RuntimeConfig, Source};
use crate::store::Store;

/// What a run interrupted by a stop or a crash is told, in its history and its events.
const RESTART_REASON: &str = "the server stopped during the run (it was restarted or crashed); the call did not complete";

/// Time running steps get to finish after SIGINT/SIGTERM before they are cancelled.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Time cancelled runs get to store their history before the process exits.
const CANCEL_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Store(#[from] crate::store::StoreError),
    #[error("{0}")]
    Runtime(#[from] crate::runtime::RuntimeError),
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: String, source: std::io::Error },
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    SecretKey(#[from] crate::store::secrets::SecretError),
}

use crate::store::secrets::SecretBox;

pub async fn serve(settings: Settings) -> Result<(), ServeError> {
    crate::telemetry::install();
    tokio::spawn(async {
        let mut every = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            every.tick().await;
            crate::telemetry::upkeep();
        }
    });
    let secrets = SecretBox::load(settings.secret_key.as_ref().map(|k| k.expose()), &settings.secret_key_file)?;
    let (mut store, sealed) = Store::open_location(&settings.db, settings.wal_limit_bytes).await?.with_secrets(secrets).await?;
    if sealed > 0 {
        tracing::info!(keys = sealed, "sealed provider keys stored in plain text by an older version");
    }
    let runtime = Runtime::new(RuntimeConfig {
        cache_dir: Some(settings.cache_dir.clone()),
        policy: settings.policy.clone(),
        tenant_hosts: settings.tenant_origins.iter().filter_map(|o| o.exact_host().map(str::to_string)).collect(),
        memory_total_bytes: settings.plugin_memory_total_bytes,
        tool_shards: settings.tool_shards,
        pool: settings.plugin_instances.map_or_else(Default::default, |instances| crate::runtime::PoolSize { instances, ..Default::default() }),
        compile: settings.compile.clone(),
        extra_roots: settings.extra_roots.clone(),
        ..Default::default()
    })?;
    // Registration is instant; compilation runs in the background, so
    // `/health` answers at once and requests that need a plugin wait for it.
    runtime.add_builtins()?;
    // With PostgreSQL, plugins installed through the API are rows every host loads.
    let installed_dir = (!store.is_shared()).then_some(&settings.installed_dir);
    for (dir, source) in [(Some(&settings.plugins_dir), Source::Directory), (installed_dir, Source::Api)] {
        if let Some(dir) = dir.filter(|dir| dir.is_dir()) {
            runtime.add_directory(dir, source)?;
        }
    }
    api::load_stored(&store, &runtime, &settings).await?;
    // Each tenant's own plugins, with the grants their cap allows.
    let cap = settings.tenants.plugin_cap();
    if let Some(Ok(tenants)) = installed_dir.map(|dir| std::fs::read_dir(crate::tenancy::plugins_root(dir))) {
        for entry in tenants.flatten() {
            let (Some(id), true) = (entry.file_name().to_str().map(str::to_owned), entry.path().is_dir()) else { continue };
            runtime.add_directory_as(crate::runtime::Installer::Tenant { id: &id, cap: &cap }, &entry.path(), Source::Api)?;
        }
    }
    let confinement = crate::runtime::policy::confinement();
    if confinement.is_complete() {
        tracing::info!("`process` commands run {}", confinement.describe());
    } else {
        tracing::warn!("`process` commands run {}", confinement.describe());
    }
    {
        let commands = &settings.policy.commands;
        let uid_range = settings.admin_token.is_some().then_some(settings.uid_range);
        let (_, user) = crate::runtime::policy::describe_user(commands, None, uid_range);
        let ports = if commands.network || commands.allowed_ports.is_empty() {
            String::new()
        } else {
            format!(" but TCP ports {:?}", commands.allowed_ports)
        };
        tracing::info!(
            "`process` commands run as {user}; network: {}{ports}; limits per call: memory {} MB, {} processes, file size {} MB ({})",
            if commands.network { "all" } else { "none" },
            commands.memory_bytes >> 20,
            commands.max_processes,
            commands.file_size_bytes >> 20,
            crate::runtime::cgroup::controllers().describe()
        );
    }

    let addr = std::net::SocketAddr::new(settings.host, settings.port);
    let listener = TcpListener::bind(addr).await.map_err(|source| ServeError::Bind { addr: addr.to_string(), source })?;
    let local = listener.local_addr()?;
    // No command may call this server's API: its port is closed to them.
    runtime.protect_ports(&[local.port()]);
    // Named by the port it listens on, so that two hosts on one machine differ.
    if store.is_shared() {
        let lease = crate::cluster::host_lease(local.port(), settings.lease);
        tracing::info!(host = %lease.id, lease_s = settings.lease.as_secs(), "on a shared database: this host's runs are leased to it");
        store = store.with_host(lease);
    }
    // Runs left running by a crash (or a stop that could not wait) are
    // interrupted and their histories repaired before anything is served.
    let interrupted = store.interrupt_unfinished_runs(RESTART_REASON, true, crate::agent::interrupted_event(RESTART_REASON)).await?;
    if !interrupted.is_empty() {
        tracing::warn!(runs = ?interrupted, "runs interrupted by the last stop are marked `interrupted`");
    }
    if settings.cors_origins.iter().any(|o| o == "*") {
        tracing::warn!(
            token = settings.token.is_some(),
            "--cors-origin '*': any web page the user visits may call this API{}",
            if settings.token.is_some() { " (it still needs the token)" } else { "; set --token to guard it" }
        );
    }
    let (cancel_tx, cancel_rx) = tokio::sync::watch::channel(false);
    let (stopping_tx, stopping_rx) = tokio::sync::watch::channel(false);
    let limits = ConnectionLimits {
        header_timeout: settings.header_timeout,
        per_client: settings.max_connections_per_client,
    };
    let state = AppState::new(store, runtime, settings.clone(), cancel_rx, stopping_rx);
    let runs = state.runs.clone();
    crate::api::start_queued_runs(&state).await?;
    if let crate::store::Location::Postgres(url) = &settings.db {
        crate::cluster::start(state.clone(), url.clone());
    }
    tokio::spawn(retention_loop(state.clone()));
    let state_for_flush = state.clone();
    let app = api::router(state);
    tracing::info!(
        db = %settings.db,
        plugins = %settings.plugins_dir.display(),
        token = settings.token.is_some(),
        header_timeout_ms = limits.header_timeout.as_millis() as u64,
        max_connections_per_client = limits.per_client,
        "hangar listening on http://{local}"
    );

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(accept_loop(listener, app, limits, stop_rx));
    let signal = shutdown_signal().await;
    tracing::info!(signal, running = runs.count(), "shutting down: no new connections; running steps get {} s", SHUTDOWN_GRACE.as_secs());
    let _ = stopping_tx.send(true);
    let _ = stop_tx.send(());
    let mut server = server;
    if !runs_end(&runs, SHUTDOWN_GRACE).await {
        tracing::info!(running = runs.count(), "cancelling the runs still going");
        let _ = cancel_tx.send(true);
        if !runs_end(&runs, CANCEL_GRACE).await {
            tracing::warn!(running = runs.count(), "runs still going after cancelling; they will be marked interrupted at the next start");
        }
    }
    if tokio::time::timeout(CANCEL_GRACE, &mut server).await.is_err() {
        tracing::warn!("connections still open; exiting anyway");
    }
    // Every event published is stored before the process ends.
    state_for_flush.bus.flush().await;
    tracing::info!("stopped");
    Ok(())
}

/// Waits up to `grace` for every active run to end.
async fn runs_end(runs: &crate::agent::Runs, grace: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + grace;
    while runs.count() > 0 {
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    true
}

/// Removes the events of runs that ended longer ago than the retention,
/// and feeds nobody follows: every minute (more often for a short retention).
async fn retention_loop(state: AppState) {
    let every = (state.settings.event_retention / 2).clamp(Duration::from_millis(100), Duration::from_secs(60));
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let Ok(keep) = chrono::Duration::from_std(state.settings.event_retention) else { continue };
        match state.store.prune_events(crate::store::now() - keep).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(events = n, "removed events past their retention"),
            Err(err) => tracing::warn!(%err, "cannot remove old events"),
        }
        state.bus.sweep().await;
        if let Ok(keep) = chrono::Duration::from_std(state.settings.audit_retention) {
            match state.store.prune_audit(crate::store::now() - keep).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(entries = n, "removed audit entries past their retention"),
                Err(err) => tracing::warn!(%err, "cannot remove old audit entries"),
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct ConnectionLimits {
    /// Time a client gets to send a request's headers; it also bounds how
    /// long a kept-alive connection may sit idle between requests.
    header_timeout: Duration,
    /// Connections open at once from one IP address.
    per_client: usize,
}

/// Most refusals (429 to a connection over the cap) being written at once;
/// beyond that, during a flood, a refused connection is closed at once.
const MAX_PENDING_REFUSALS: usize = 256;
/// Time a refused connection gets to read its 429 before it is closed.
const REFUSAL_LINGER: Duration = Duration::from_secs(1);

/// Accepts connections until `stop`, then stops accepting, lets each
/// connection finish its running request (idle ones close at once), and
/// returns when all are closed.
///
/// HTTP/1 only, as `axum::serve` served here before. Not hyper-util's
/// `auto::Builder`: before HTTP/1 starts (and with it the header-read
/// timer) it waits, without a limit, for the bytes that tell HTTP/1 from
/// HTTP/2, so a connection that sends nothing would stay open forever.
async fn accept_loop(listener: TcpListener, app: Router, limits: ConnectionLimits, mut stop: tokio::sync::oneshot::Receiver<()>) {
    let mut http = hyper::server::conn::http1::Builder::new();
    // The timer runs from the moment a connection (or a kept-alive one,
    // between requests) waits for a request head.
    http.timer(TokioTimer::new()).header_read_timeout(limits.header_timeout);
    let graceful = GracefulShutdown::new();
    let open = Arc::new(OpenConnections { limit: limits.per_client, by_client: Mutex::new(HashMap::new()) });
    let refusals = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_REFUSALS));
    loop {
        let (tcp, peer) = tokio::select! {
            biased;
            _ = &mut stop => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) if matches!(err.kind(), ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::ConnectionRefused) => continue,
                Err(err) => {
                    // Out of file descriptors, most likely: wait rather than spin.
                    tracing::warn!(%err, "cannot accept a connection; retrying in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
        };
        let client = peer.ip().to_canonical();
        let Some(slot) = open.take(client) else {
            // Debug only: a flood must not flood the log.
            tracing::debug!(%client, limit = limits.per_client, "connection refused: too many open from this client");
            refuse(tcp, client, limits.per_client, &refusals);
            continue;
        };
        // Streams send many small writes (one per SSE event): without
        // TCP_NODELAY, Nagle's algorithm holds each behind the client's
        // delayed ACK, adding ~40 ms to the first token.
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(%err, "cannot set TCP_NODELAY");
        }
        // A clone of the router is an `Arc`. (Serving it through its
        // `Service<IncomingStream>` impl would rebuild the route table for
        // every connection: 24 KB of heap per open stream.)
        // Each request knows its client's address (the audit trail records it).
        let with_peer = tower::ServiceExt::map_request(app.clone(), move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(axum::extract::ConnectInfo(peer));
            req
        });
        let conn = http.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(with_peer));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(err) = conn.await {
                tracing::debug!(%client, %err, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tracing::debug!(open = graceful.count(), "waiting for open connections to finish");
    graceful.shutdown().await;
}

/// Open connections by client address, within a cap.
struct OpenConnections {
    limit: usize,
    by_client: Mutex<HashMap<IpAddr, usize>>,
}

impl OpenConnections {
    /// A slot for one more connection from `client`, unless it has the most.
    fn take(self: &Arc<Self>, client: IpAddr) -> Option<Slot> {
        let mut by_client = self.by_client.lock().unwrap_or_else(PoisonError::into_inner);
        let open = by_client.entry(client).or_insert(0);
        if *open >= self.limit {
            return None;
        }
        *open += 1;
        Some(Slot { open: self.clone(), client })
    }
}

/// One open connection; counted until dropped.
struct Slot {
    open: Arc<OpenConnections>,
    client: IpAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut by_client = self.open.by_client.lock().unwrap_or_else(PoisonError::into_inner);
        if let Entry::Occupied(mut entry) = by_client.entry(self.client) {
            *entry.get_mut() -= 1;
            if *entry.get() == 0 {
                entry.remove();
            }
        }
    }
}

/// Answers a connection over the cap with a short 429 and closes it.
fn refuse(tcp: TcpStream, client: IpAddr, limit: usize, refusals: &Arc<tokio::sync::Semaphore>) {
    let error = ApiError::TooManyConnections { client: client.to_string(), limit };
    let (status, _) = error.status_and_code();
    let body = serde_json::to_string(&error.body()).unwrap_or_default();
    let response = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    );
    let Ok(permit) = refusals.clone().try_acquire_owned() else {
        // A fresh socket's send buffer takes these few bytes at once.
        let _ = tcp.try_write(response.as_bytes());
        return;
    };
    tokio::spawn(async move {
        let _permit = permit;
        let mut tcp = tcp;
        let _ = tokio::time::timeout(REFUSAL_LINGER, async {
            tcp.write_all(response.as_bytes()).await?;
            tcp.shutdown().await?;
            // Read what the client sent before closing: closing with unread
            // input resets the connection, which can discard the 429 on
            // the client's side before it is read.
            let mut sink = [0u8; 4096];
            while tcp.read(&mut sink).await? > 0 {}
            Ok::<_, std::io::Error>(())
        })
        .await;
    });
}

async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("install the SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install the SIGINT handler");
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}
