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

pub mod listen;
pub mod server;
pub mod fake;
pub mod sse;
pub mod tls;

/// Whether `command` is on `PATH`. A test that needs a tool the machine
/// lacks is skipped with a printed reason when run by hand (`cargo test`);
/// under CI (`CI` set), and so through `./test.sh`, it fails instead.
pub fn have_command(command: &str, install: &str) -> bool {
    let found = std::process::Command::new("sh")
        .args(["-c", &format!("command -v {command}")])
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return true;
    }
    let reason = format!("`{command}` is not on PATH; `./test.sh` installs it ({install})");
    assert!(std::env::var_os("CI").is_none(), "{reason}");
    eprintln!("SKIPPED: {reason}");
    false
}

/// Whether `python3` can import `module`; skipped or failed as
/// [`have_command`] says.
pub fn have_python_module(module: &str, install: &str) -> bool {
    let found = std::process::Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if found {
        return true;
    }
    let reason = format!("python3 cannot import `{module}`; `./test.sh` installs it ({install})");
    assert!(std::env::var_os("CI").is_none(), "{reason}");
    eprintln!("SKIPPED: {reason}");
    false
}

/// A working directory opened as a run opens it.
pub fn open_dir(path: &std::path::Path) -> std::sync::Arc<hangar::runtime::WorkDir> {
    let path = path.canonicalize().unwrap();
    std::sync::Arc::new(hangar::runtime::WorkDir::open(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
}

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
        work_dir: Some(open_dir(work_dir)),
    };
    runtime.call_tool(tool, invocation).await.unwrap_or_else(|e| panic!("{tool} {input}: {e}"))
}

/// Builds the plugin crate at `crate_dir` (relative to the repository root)
/// for wasm32-wasip2, once per test binary, and returns the component's bytes.
pub fn build_component(crate_dir: &str) -> Vec<u8> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static BUILT: OnceLock<Mutex<HashMap<String, Vec<u8>>>> = OnceLock::new();
    let mut built = BUILT.get_or_init(Default::default).lock().unwrap();
    if let Some(bytes) = built.get(crate_dir) {
        return bytes.clone();
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let dir = root.join(crate_dir);
    let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("plugin-builds");
    let mut cmd = std::process::Command::new(env!("CARGO"));
    cmd.current_dir(&dir)
        .args(["build", "--release", "--locked", "--target", "wasm32-wasip2", "--target-dir"])
        .arg(&target);
    for var in ["RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "CARGO_TARGET_DIR", "CARGO_BUILD_TARGET"] {
        cmd.env_remove(var);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "building {crate_dir} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let toml = std::fs::read_to_string(dir.join("Cargo.toml")).unwrap();
    let package = toml
        .lines()
        .find_map(|l| l.trim().strip_prefix("name = ").map(|v| v.trim_matches('"').replace('-', "_")))
        .unwrap();
    let bytes = std::fs::read(target.join("wasm32-wasip2/release").join(format!("{package}.wasm"))).unwrap();
    built.insert(crate_dir.to_string(), bytes.clone());
    bytes
}

/// Command lines of the running processes that contain `marker` (a test's
/// own command, found by a number nothing else uses).
pub fn processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(marker) && !cmdline.contains("cargo") {
            found.push(cmdline);
        }
    }
    found
}

/// Whether every process with `marker` is gone within 5 s. A killed
/// process leaves `/proc` only once the kernel has run its exit, which on
/// a loaded machine can come a few milliseconds after the API answered.
pub async fn no_process_left(marker: &str) -> bool {
    for _ in 0..100 {
        if processes_with(marker).is_empty() {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    processes_with(marker).is_empty()
}

/// Waits (up to 10 s) until a process with `marker` runs.
pub async fn wait_for_process(marker: &str) {
    for _ in 0..400 {
        if !processes_with(marker).is_empty() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    panic!("no process `{marker}` started");
}

/// A time field of an API answer. Compare times as times: the text drops a
/// zero fraction (`…:41Z`), so `…:41.001Z` sorts before it as a string.
pub fn time_of(value: &serde_json::Value, field: &str) -> chrono::DateTime<chrono::FixedOffset> {
    let text = value[field].as_str().unwrap_or_else(|| panic!("no `{field}` in {value}"));
    chrono::DateTime::parse_from_rfc3339(text).unwrap_or_else(|e| panic!("`{field}` = {text:?}: {e}"))
}
