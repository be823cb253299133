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
