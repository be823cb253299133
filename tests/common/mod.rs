//! Shared by the test binaries: a runtime with every built-in plugin, and a
//! compile cache shared by all tests so each component compiles once per run.
#![allow(dead_code)]

use std::path::PathBuf;

use hangar::runtime::{Runtime, RuntimeConfig};

/// One cache for every test binary of this build.
pub fn cache_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("hangar-compile-cache")
}

pub fn runtime() -> Runtime {
    let runtime = Runtime::new(RuntimeConfig { cache_dir: Some(cache_dir()), ..Default::default() }).unwrap();
    runtime.add_builtins().unwrap();
    runtime
}

pub mod server;
pub mod fake;

/// Calls a tool through the runtime with `input` in `work_dir`; panics only
/// when the call itself fails (a tool error is an `is_error` output).
pub async fn call(
    runtime: &Runtime,
    tool: &str,
    input: serde_json::Value,
    work_dir: &std::path::Path,
) -> hangar::runtime::ToolOutput {
    let invocation = hangar::runtime::ToolInvocation {
        id: "call-1".into(),
        input: input.to_string(),
        work_dir: Some(work_dir.to_path_buf()),
    };
    runtime.call_tool(tool, invocation).await.unwrap_or_else(|e| panic!("{tool} {input}: {e}"))
}
