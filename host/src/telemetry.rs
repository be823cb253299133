//! Metrics for operators, in the Prometheus text format (`GET /metrics`),
//! and the format of the server's log lines.
//!
//! Recorded through the `metrics` facade and rendered by
//! `metrics-exporter-prometheus`; every name and label is set here, so the
//! whole list is in this file:
//!
//! | metric | type | labels |
//! |---|---|---|
//! | `hangar_http_requests_total` | counter | `method`, `route` (the template), `status` |
//! | `hangar_http_request_duration_seconds` | histogram | `method`, `route` |
//! | `hangar_runs_total` | counter | `status` (`completed`, `failed`, `cancelled`) |
//! | `hangar_run_duration_seconds` | histogram | `status` |
//! | `hangar_step_duration_seconds` | histogram | `provider` |
//! | `hangar_time_to_first_token_seconds` | histogram | `provider` |
//! | `hangar_tool_call_duration_seconds` | histogram | `tool` |
//! | `hangar_tokens_total` | counter | `provider`, `kind` (`input`, `output`) |
//! | `hangar_active_runs` | gauge | |
//! | `hangar_active_streams` | gauge | |
//! | `hangar_compile_cache_total` | counter | `result` (`hit`, `miss`, `built_in`) |
//! | `hangar_wal_bytes` | gauge | |

use std::sync::OnceLock;
use std::time::Duration;

use ::metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Bucket bounds (seconds) of every duration histogram: from a fast tool
/// call to a long run.
const SECONDS_BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0];

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process's recorder (once; later calls return the same
/// handle). `None` when another recorder was installed first, in which
/// case nothing is recorded here.
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new().set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS);
            match builder.and_then(|b| b.install_recorder()) {
                Ok(handle) => {
                    describe();
                    Some(handle)
                }
                Err(err) => {
                    tracing::warn!(%err, "metrics are not recorded");
                    None
                }
            }
        })
        .clone()
}

fn describe() {
    use ::metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!("hangar_http_requests_total", "HTTP requests answered, by method, route template and status");
    describe_histogram!("hangar_http_request_duration_seconds", Unit::Seconds, "Time to answer an HTTP request (to its headers)");
    describe_counter!("hangar_runs_total", "Runs ended, by final status");
    describe_histogram!("hangar_run_duration_seconds", Unit::Seconds, "Time from a run's start to its end");
    describe_histogram!("hangar_step_duration_seconds", Unit::Seconds, "Time of one model call, by provider");
    describe_histogram!("hangar_time_to_first_token_seconds", Unit::Seconds, "Time from a model call to its first text or tool use");
    describe_histogram!("hangar_tool_call_duration_seconds", Unit::Seconds, "Time of one tool call, by tool");
    describe_counter!("hangar_tokens_total", "Tokens reported by providers, by provider and kind (input, output)");
    describe_gauge!("hangar_active_runs", "Runs executing now");
    describe_gauge!("hangar_active_streams", "SSE responses open now");
    describe_counter!("hangar_compile_cache_total", "Plugin code served by the compile cache (hit), compiled (miss) or precompiled into the binary (built_in)");
    describe_gauge!("hangar_wal_bytes", "Size of the SQLite write-ahead log after its last checkpoint");
}

/// The text exposition of every metric.
pub fn render() -> String {
    match install() {
        Some(handle) => {
            handle.run_upkeep();
            handle.render()
        }
        None => String::new(),
    }
}

/// Drains histogram samples into their buckets; a server runs it every
/// few seconds so that memory stays flat between scrapes.
pub fn upkeep() {
    if let Some(Some(handle)) = HANDLE.get() {
        handle.run_upkeep();
    }
}

pub fn http_request(method: &str, route: &str, status: u16, elapsed: Duration) {
    let (method, route) = (method.to_string(), route.to_string());
    counter!("hangar_http_requests_total", "method" => method.clone(), "route" => route.clone(), "status" => status.to_string())
        .increment(1);
    histogram!("hangar_http_request_duration_seconds", "method" => method, "route" => route).record(elapsed.as_secs_f64());
}

pub fn run_ended(status: &'static str, elapsed: Duration) {
    counter!("hangar_runs_total", "status" => status).increment(1);
    histogram!("hangar_run_duration_seconds", "status" => status).record(elapsed.as_secs_f64());
}

pub fn step(provider: &str, elapsed: Duration) {
    histogram!("hangar_step_duration_seconds", "provider" => provider.to_string()).record(elapsed.as_secs_f64());
}

pub fn first_token(provider: &str, elapsed: Duration) {
    histogram!("hangar_time_to_first_token_seconds", "provider" => provider.to_string()).record(elapsed.as_secs_f64());
}

pub fn tool_call(tool: &str, elapsed: Duration) {
    histogram!("hangar_tool_call_duration_seconds", "tool" => tool.to_string()).record(elapsed.as_secs_f64());
}

pub fn tokens(provider: &str, input: u64, output: u64) {
    counter!("hangar_tokens_total", "provider" => provider.to_string(), "kind" => "input").increment(input);
    counter!("hangar_tokens_total", "provider" => provider.to_string(), "kind" => "output").increment(output);
}

pub fn compile_cache(hit: bool) {
    counter!("hangar_compile_cache_total", "result" => if hit { "hit" } else { "miss" }).increment(1);
}

/// A built-in plugin's code taken from the binary (no cache, no compile).
pub fn precompiled_code() {
    counter!("hangar_compile_cache_total", "result" => "built_in").increment(1);
}

pub fn wal_size(bytes: u64) {
    gauge!("hangar_wal_bytes").set(bytes as f64);
}

/// Counts one in a gauge while it lives.
pub struct Active(&'static str);

impl Active {
    pub fn runs() -> Active {
        Active::new("hangar_active_runs")
    }

    pub fn streams() -> Active {
        Active::new("hangar_active_streams")
    }

    fn new(name: &'static str) -> Active {
        gauge!(name).increment(1.0);
        Active(name)
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        gauge!(self.0).decrement(1.0);
    }
}

/// Log lines on standard error, filtered by `RUST_LOG` (default `info`):
/// text for a person, or one JSON object a line (`--log-format json`).
///
/// The server's lines (`background`) are written by a thread of their own:
/// a request's line was a `write` on the worker that answered it, about 7%
/// of `POST /sessions` (issue 21). That thread writes whatever has queued
/// in one `write` and flushes as soon as the queue is empty, so a line is
/// out as promptly as before; the queue never drops a line (a full one
/// holds the logging thread back instead). Keep the returned guard until
/// the end: dropping it writes what is still queued. The author's and
/// operator's commands log in line with their own output, as before.
pub fn init_logs(format: crate::config::LogFormat, background: bool) -> Option<tracing_appender::non_blocking::WorkerGuard> {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (writer, guard) = if background {
        let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
            .lossy(false)
            .thread_name("hangar-log")
            .finish(std::io::BufWriter::new(std::io::stderr()));
        (tracing_subscriber::fmt::writer::BoxMakeWriter::new(writer), Some(guard))
    } else {
        (tracing_subscriber::fmt::writer::BoxMakeWriter::new(std::io::stderr), None)
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(writer);
    match format {
        crate::config::LogFormat::Text => builder.with_ansi(ansi).init(),
        crate::config::LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).init(),
    }
    guard
}
