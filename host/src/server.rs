//! Starting and stopping the server.

use std::time::Duration;

use axum::serve::ListenerExt;
use tokio::net::TcpListener;

use crate::agent::RunEvent;
use crate::api::{self, AppState};
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
}

pub async fn serve(settings: Settings) -> Result<(), ServeError> {
    let store = Store::open(&settings.db)?;
    let runtime = Runtime::new(RuntimeConfig {
        cache_dir: Some(settings.cache_dir.clone()),
        policy: settings.policy.clone(),
        ..Default::default()
    })?;
    // Registration is instant; compilation runs in the background, so
    // `/health` answers at once and requests that need a plugin wait for it.
    runtime.add_builtins()?;
    for (dir, source) in [(&settings.plugins_dir, Source::Directory), (&settings.installed_dir, Source::Api)] {
        if dir.is_dir() {
            runtime.add_directory(dir, source)?;
        }
    }
    let confinement = crate::runtime::policy::confinement();
    if confinement.is_complete() {
        tracing::info!("`process` commands run {}", confinement.describe());
    } else {
        tracing::warn!("`process` commands run {}", confinement.describe());
    }

    let addr = std::net::SocketAddr::new(settings.host, settings.port);
    let listener = TcpListener::bind(addr).await.map_err(|source| ServeError::Bind { addr: addr.to_string(), source })?;
    let local = listener.local_addr()?;
    // No command may call this server's API: its port is closed to them.
    runtime.protect_ports(&[local.port()]);
    // Streams send many small writes (one per SSE event): without
    // TCP_NODELAY, Nagle's algorithm holds each behind the client's delayed
    // ACK, adding ~40 ms to the first token.
    let listener = listener.tap_io(|tcp| {
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(%err, "cannot set TCP_NODELAY");
        }
    });
    // Runs left running by a crash (or a stop that could not wait) are
    // interrupted and their histories repaired before anything is served.
    let interrupted = store
        .interrupt_unfinished_runs(RESTART_REASON, |run| {
            let (name, data) =
                RunEvent::Error { run_id: run.to_string(), error: RESTART_REASON.into(), code: "interrupted".into() }.wire();
            (name.to_string(), data)
        })
        .await?;
    if !interrupted.is_empty() {
        tracing::warn!(runs = ?interrupted, "runs interrupted by the last stop are marked `interrupted`");
    }
    let (cancel_tx, cancel_rx) = tokio::sync::watch::channel(false);
    let (stopping_tx, stopping_rx) = tokio::sync::watch::channel(false);
    let state = AppState::new(store, runtime, settings.clone(), cancel_rx, stopping_rx);
    let runs = state.runs.clone();
    crate::api::start_queued_runs(&state).await?;
    tokio::spawn(retention_loop(state.clone()));
    let state_for_flush = state.clone();
    let app = api::router(state);
    tracing::info!(
        db = %settings.db.display(),
        plugins = %settings.plugins_dir.display(),
        token = settings.token.is_some(),
        "hangar listening on http://{local}"
    );

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        // `into_make_service` hands each connection a clone of the router (an
        // `Arc`). Serving the `Router` itself rebuilds its route table for
        // every connection (`with_state(())`): 24 KB of heap per open stream.
        axum::serve(listener, app.into_make_service())
            .with_graceful_shutdown(async {
                let _ = stop_rx.await;
            })
            .await
    });
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
    }
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
