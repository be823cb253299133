//! Hangar: an agent host whose tools and model providers are sandboxed
//! WebAssembly components.
//!
//! - [`api`]: the REST API (axum), one module per resource;
//! - [`agent`]: the agent loop;
//! - [`runtime`]: the wasmtime engine, plugin registry and capabilities;
//! - [`store`]: persistence on SQLite;
//! - [`authoring`]: `hangar plugin new|build|install` for plugin authors.
//! - [`telemetry`]: metrics (`GET /metrics`) and log lines.

pub mod agent;
pub mod api;
pub mod authoring;
pub mod config;
pub mod mcp;
pub mod permissions;
pub mod runtime;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tenancy;
