//! A runaway plugin fails its own call with an error that names the plugin
//! and the limit; the host and other calls carry on.

mod common;

use std::sync::Arc;
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

use hangar::runtime::policy::{PluginPolicy, Policy};
use hangar::runtime::{Manifest, Runtime, RuntimeConfig, RuntimeError, Source, ToolInvocation};

const MANIFEST: &str = include_str!("fixtures/misbehave/misbehave.plugin.toml");

async fn runtime_with(policy: PluginPolicy) -> Runtime {
    let mut p = Policy::default();
    p.plugins.insert("misbehave".into(), policy);
    let runtime = Runtime::new(RuntimeConfig { cache_dir: Some(common::cache_dir()), policy: p, ..Default::default() }).unwrap();
    runtime.add_builtins().unwrap();
    let wasm = common::build_component("tests/fixtures/misbehave");
    runtime.install(Manifest::parse(MANIFEST, Some("misbehave")).unwrap(), Arc::from(wasm), Source::Api).await.unwrap();
    runtime
}

async fn call(runtime: &Runtime, mode: &str) -> Result<hangar::runtime::ToolOutput, RuntimeError> {
    let input = serde_json::json!({ "mode": mode }).to_string();
    runtime.call_tool("misbehave", ToolInvocation { id: "c".into(), input, work_dir: None }).await
}

#[tokio::test]
async fn an_endless_loop_hits_the_deadline() {
    let runtime = runtime_with(PluginPolicy { timeout_ms: Some(300), ..Default::default() }).await;
    let err = call(&runtime, "spin").await.unwrap_err();
    assert!(matches!(err, RuntimeError::Deadline { ref plugin, limit } if plugin == "misbehave" && limit == Duration::from_millis(300)), "{err}");
    assert!(err.to_string().contains("deadline of 300 ms"), "{err}");
    assert_eq!(call(&runtime, "ok").await.unwrap().text, "fine", "the next call runs normally");
}

#[tokio::test]
async fn unbounded_allocation_hits_the_memory_cap() {
    let runtime = runtime_with(PluginPolicy { memory_mb: Some(32), ..Default::default() }).await;
    let err = call(&runtime, "alloc").await.unwrap_err();
    assert!(matches!(err, RuntimeError::Memory { ref plugin, limit_bytes } if plugin == "misbehave" && limit_bytes == 32 << 20), "{err}");
    assert!(err.to_string().contains("32 MiB"), "{err}");
    assert_eq!(call(&runtime, "ok").await.unwrap().text, "fine");
}

#[tokio::test]
async fn a_flood_of_output_hits_the_output_cap() {
    let runtime = runtime_with(PluginPolicy { output_kb: Some(64), ..Default::default() }).await;
    let err = call(&runtime, "flood").await.unwrap_err();
    assert!(matches!(err, RuntimeError::Output { ref plugin, limit, .. } if plugin == "misbehave" && limit == 64 << 10), "{err}");
}

/// Every call gets memory no other call has written: the pool resets a
/// freed slot (rewriting the pages an instance dirtied, or dropping them)
/// before the next instance, likely of the same plugin, takes it.
#[tokio::test]
async fn a_call_never_sees_what_an_earlier_call_left_in_memory() {
    let runtime = runtime_with(PluginPolicy::default()).await;
    for round in 0..20 {
        let out = call(&runtime, "leftover").await.unwrap();
        assert!(!out.is_error, "round {round}: {}", out.text);
        assert_eq!(out.text, "static=\"\" heap_before=false heap_marked=true", "round {round}");
    }
}

#[tokio::test]
async fn a_panic_is_a_crash_of_that_call_only() {
    let runtime = runtime_with(PluginPolicy::default()).await;
    let err = call(&runtime, "panic").await.unwrap_err();
    assert!(matches!(err, RuntimeError::Trap { ref plugin, .. } if plugin == "misbehave"), "{err}");
    // Other plugins and sessions carry on, concurrently with a runaway call.
    let spinning = tokio::spawn({
        let runtime = runtime.clone();
        async move { call(&runtime, "spin").await }
    });
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("f.txt"), "still here\n").unwrap();
    let input = serde_json::json!({"filePath": "f.txt"}).to_string();
    let read = runtime
        .call_tool("read", ToolInvocation { id: "r".into(), input, work_dir: Some(common::open_dir(work.path())) })
        .await
        .unwrap();
    assert!(read.text.contains("still here"));
    spinning.abort();
}

#[tokio::test]
async fn a_tools_own_open_of_a_fifo_is_refused_at_once_and_holds_no_thread() {
    let mut policy = Policy::default();
    policy.plugins.insert(
        "misbehave".into(),
        PluginPolicy { filesystem: hangar::runtime::FsAccess::Read, timeout_ms: Some(2000), ..Default::default() },
    );
    let runtime = Runtime::new(RuntimeConfig { cache_dir: Some(common::cache_dir()), policy, ..Default::default() }).unwrap();
    runtime.add_builtins().unwrap();
    let manifest = format!("{MANIFEST}\n[capabilities]\nfilesystem = \"read\"\n");
    let wasm = common::build_component("tests/fixtures/misbehave");
    runtime.install(Manifest::parse(&manifest, Some("misbehave")).unwrap(), Arc::from(wasm), Source::Api).await.unwrap();
    let work = tempfile::tempdir().unwrap();
    let fifo = std::ffi::CString::new(work.path().join("fifo").to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
    std::fs::write(work.path().join("f.txt"), "still here\n").unwrap();
    let dir = common::open_dir(work.path());
    // More calls than a thread pool would want, all at once, each opening
    // the FIFO with plain `std::fs` (no check of what it is first). With
    // no writer ever coming, an open(2) that blocks would hold each call
    // to its deadline; the host's open refuses the FIFO instead.
    let calls: Vec<_> = (0..40)
        .map(|i| {
            let runtime = runtime.clone();
            let dir = dir.clone();
            tokio::spawn(async move {
                let input = serde_json::json!({"mode": "open-fifo"}).to_string();
                runtime.call_tool("misbehave", ToolInvocation { id: format!("s{i}"), input, work_dir: Some(dir) }).await
            })
        })
        .collect();
    for call in calls {
        let out = call.await.unwrap().expect("refused inside the call, well before its deadline");
        assert!(out.is_error, "{}", out.text);
        assert!(out.text.to_lowercase().contains("not supported"), "the guest's error names the refusal: {}", out.text);
    }
    // Nothing ever opened the FIFO's other end: a writer finds no reader.
    let writer = std::fs::OpenOptions::new().write(true).custom_flags(libc::O_NONBLOCK).open(work.path().join("fifo"));
    assert_eq!(writer.unwrap_err().raw_os_error(), Some(libc::ENXIO), "no call is left holding the FIFO open");
    let input = serde_json::json!({"filePath": "f.txt"}).to_string();
    let read = runtime.call_tool("read", ToolInvocation { id: "r".into(), input, work_dir: Some(dir.clone()) }).await.unwrap();
    assert!(read.text.contains("still here"), "{}", read.text);
    let store_like = tokio::time::timeout(Duration::from_secs(5), tokio::task::spawn_blocking(|| 7)).await;
    assert_eq!(store_like.unwrap().unwrap(), 7, "tokio's blocking pool is free");
}

/// A call starts on its caller's thread; one that runs on leaves it at
/// the guest's first yield. On a runtime with one thread, a spinning call
/// that kept it would hold every other task until its deadline.
#[tokio::test(flavor = "current_thread")]
async fn a_spinning_call_leaves_the_callers_thread_to_other_tasks() {
    let runtime = runtime_with(PluginPolicy { timeout_ms: Some(5000), ..Default::default() }).await;
    let spinning = tokio::spawn({
        let runtime = runtime.clone();
        async move { call(&runtime, "spin").await }
    });
    // The spinning call takes the thread first.
    tokio::task::yield_now().await;
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("f.txt"), "still here\n").unwrap();
    let input = serde_json::json!({"filePath": "f.txt"}).to_string();
    let dir = common::open_dir(work.path());
    let read = runtime.call_tool("read", ToolInvocation { id: "r".into(), input, work_dir: Some(dir) }).await.unwrap();
    assert!(read.text.contains("still here"));
    assert!(!spinning.is_finished(), "the read ran while the spinning call still ran, before its deadline");
    spinning.abort();
}

#[tokio::test]
async fn calls_together_stay_within_the_servers_memory_budget() {
    // Each call may take 256 MiB, the server's plugins 48 MiB in all.
    let mut policy = Policy::default();
    policy.plugins.insert("misbehave".into(), PluginPolicy::default());
    let config = RuntimeConfig { cache_dir: Some(common::cache_dir()), policy, memory_total_bytes: Some(48 << 20), ..Default::default() };
    let runtime = Runtime::new(config).unwrap();
    let wasm = common::build_component("tests/fixtures/misbehave");
    runtime.install(Manifest::parse(MANIFEST, Some("misbehave")).unwrap(), Arc::from(wasm), Source::Api).await.unwrap();
    let err = call(&runtime, "alloc").await.unwrap_err();
    assert!(matches!(err, RuntimeError::ServerMemory { ref plugin, budget_bytes } if plugin == "misbehave" && budget_bytes == 48 << 20), "{err}");
    assert!(err.to_string().contains("server memory budget of 48 MiB"), "{err}");
    assert_eq!(runtime.memory_budget(), (48 << 20, 0), "the failed call gave its memory back");
    assert_eq!(call(&runtime, "ok").await.unwrap().text, "fine", "the next call gets memory again");
    assert_eq!(runtime.memory_budget().1, 0);
}

#[tokio::test]
async fn a_call_past_the_servers_instances_is_refused_as_busy_and_the_next_one_runs() {
    // One instance for the whole server, held by a call that spins for 3 s.
    let mut policy = Policy::default();
    policy.plugins.insert("misbehave".into(), PluginPolicy { timeout_ms: Some(3000), ..Default::default() });
    let pool = hangar::runtime::PoolSize { instances: 1, ..Default::default() };
    let runtime = Runtime::new(RuntimeConfig { cache_dir: Some(common::cache_dir()), policy, pool, ..Default::default() }).unwrap();
    let wasm = common::build_component("tests/fixtures/misbehave");
    runtime.install(Manifest::parse(MANIFEST, Some("misbehave")).unwrap(), Arc::from(wasm), Source::Api).await.unwrap();
    let spinning = tokio::spawn({
        let runtime = runtime.clone();
        async move { call(&runtime, "spin").await }
    });
    // Once the spinning call holds the slot (it starts in well under this),
    // another call cannot start.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut refused = None;
    for _ in 0..50 {
        match call(&runtime, "ok").await {
            Err(err) => {
                refused = Some(err);
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let err = refused.expect("a second call while the only instance is held is refused");
    assert!(matches!(err, RuntimeError::Instances { ref plugin, limit: 1 } if plugin == "misbehave"), "{err}");
    assert!(err.to_string().contains("all 1 plugin instances of the server are in use"), "{err}");
    let spun = spinning.await.unwrap().unwrap_err();
    assert!(matches!(spun, RuntimeError::Deadline { .. }), "{spun}");
    assert_eq!(call(&runtime, "ok").await.unwrap().text, "fine", "the freed slot serves the next call");

    // A plugin that loads while every slot is held waits for one: a load
    // refused would leave it failed until the next start.
    let spinning = tokio::spawn({
        let runtime = runtime.clone();
        async move { call(&runtime, "spin").await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    runtime.add_builtins().unwrap();
    for tool in ["read", "grep", "bash"] {
        let spec = runtime.tool_spec(tool).await;
        assert!(spec.is_ok(), "`{tool}` loads once the slot is free: {:?}", spec.err());
    }
    assert!(matches!(spinning.await.unwrap(), Err(RuntimeError::Deadline { .. })), "the spinning call kept its slot to the end");
}

/// `misbehave` granted `read-write` with a call's writes capped at 1 MB and 10 files.
async fn writer() -> Runtime {
    let mut policy = Policy::default();
    policy.plugins.insert(
        "misbehave".into(),
        PluginPolicy { filesystem: hangar::runtime::FsAccess::ReadWrite, write_mb: Some(1), max_files: Some(10), ..Default::default() },
    );
    let runtime = Runtime::new(RuntimeConfig { cache_dir: Some(common::cache_dir()), policy, ..Default::default() }).unwrap();
    let manifest = format!("{MANIFEST}\n[capabilities]\nfilesystem = \"read-write\"\n");
    let wasm = common::build_component("tests/fixtures/misbehave");
    runtime.install(Manifest::parse(&manifest, Some("misbehave")).unwrap(), Arc::from(wasm), Source::Api).await.unwrap();
    runtime
}

async fn call_in(runtime: &Runtime, dir: &Arc<hangar::runtime::WorkDir>, mode: &str) -> hangar::runtime::ToolOutput {
    let input = serde_json::json!({ "mode": mode }).to_string();
    runtime.call_tool("misbehave", ToolInvocation { id: "w".into(), input, work_dir: Some(dir.clone()) }).await.unwrap()
}

#[tokio::test]
async fn a_call_writes_no_more_than_its_write_limits_and_the_next_call_works() {
    let runtime = writer().await;
    let work = tempfile::tempdir().unwrap();
    let dir = common::open_dir(work.path());

    // 5 MB in 64 KiB writes: refused once past 1 MB, and nothing past it lands.
    let out = call_in(&runtime, &dir, "write-5mb").await;
    assert!(out.is_error, "{}", out.text);
    // Through a stream, which Rust's standard library reports as an I/O error.
    assert!(out.text.contains("wrote 1048576 bytes, then: I/O error"), "the guest's write failed at the limit: {}", out.text);
    assert!(out.text.contains("plugin `misbehave` reached its limit of 1 MB written in one call"), "{}", out.text);
    assert_eq!(std::fs::metadata(work.path().join("big.bin")).unwrap().len(), 1 << 20);

    // A 1 TiB sparse file: the hole counts as written.
    let out = call_in(&runtime, &dir, "sparse-1tib").await;
    assert!(out.is_error && out.text.contains("set_len: No space left on device"), "{}", out.text);
    assert!(out.text.contains("limit of 1 MB written in one call"), "{}", out.text);
    assert_eq!(std::fs::metadata(work.path().join("sparse.bin")).unwrap().len(), 0);

    // 100 files: the eleventh is refused, and never appears.
    let out = call_in(&runtime, &dir, "create-100").await;
    assert!(out.is_error, "{}", out.text);
    assert!(out.text.contains("created 10 files, then: Quota exceeded"), "{}", out.text);
    assert!(out.text.contains("plugin `misbehave` reached its limit of 10 files created in one call"), "{}", out.text);
    assert!(work.path().join("f9.txt").exists() && !work.path().join("f10.txt").exists());

    // Each call has limits of its own: the next one writes as usual.
    let out = call_in(&runtime, &dir, "write-small").await;
    assert!(!out.is_error, "{}", out.text);
    assert_eq!(std::fs::read_to_string(work.path().join("small.txt")).unwrap(), "hello");
    // Rewriting a file that exists creates nothing.
    for _ in 0..3 {
        assert!(!call_in(&runtime, &dir, "write-small").await.is_error);
    }
}
