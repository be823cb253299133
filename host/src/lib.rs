//! Hangar: an agent host whose tools and model providers are sandboxed
//! WebAssembly components.
//!
//! - [`api`]: the REST API (axum), one module per resource;
//! - [`agent`]: the agent loop;
//! - [`runtime`]: the wasmtime engine, plugin registry and capabilities;
//! - [`store`]: persistence on SQLite or PostgreSQL;
//! - [`authoring`]: `hangar plugin new|build|install` for plugin authors.
//! - [`migrate`]: `hangar migrate`, a SQLite database copied into PostgreSQL.
//! - [`telemetry`]: metrics (`GET /metrics`) and log lines.

pub mod agent;
pub mod api;
pub mod authoring;
pub mod cluster;
pub mod config;
pub mod mcp;
pub mod migrate;
pub mod permissions;
pub mod runtime;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tenancy;

/// An error and each of its causes, joined by ": ". Client libraries
/// (reqwest, tokio-postgres) say only "error sending request" or "db error"
/// at the top and keep the reason in the chain.
pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
