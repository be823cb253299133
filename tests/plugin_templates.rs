//! `hangar plugin new|build|install`, run as a plugin author runs them: a
//! project from each template is written by the real `hangar` binary into a
//! temporary directory outside the repository, built with its language's
//! toolchain, uploaded with `hangar plugin install --server URL` to a
//! running server, and called from an agent run.
//!
//! The Rust projects share one target directory under `CARGO_TARGET_TMPDIR`
//! (their dependencies compile once per test run). The Python and
//! JavaScript ones need `componentize-py` and `jco` (`./test.sh` installs
//! both): without them the test is skipped with a printed reason, except
//! under CI, where it fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::fake::{FakeServer, Reply, anthropic};
use common::server::Server;
use serde_json::{Value, json};

/// Runs the real `hangar` binary in `cwd` with `PATH` as given (or as the
/// test runs it).
fn hangar(cwd: &Path, args: &[&str], path: Option<&Path>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hangar"));
    cmd.current_dir(cwd).args(args);
    // The outer build's settings are for the host, not for a guest built
    // in a workspace of its own; the Rust projects share a target directory.
    for var in ["RUSTFLAGS", "CARGO_ENCODED_RUSTFLAGS", "CARGO_BUILD_TARGET", "RUSTC_WRAPPER"] {
        cmd.env_remove(var);
    }
    cmd.env("CARGO_TARGET_DIR", Path::new(env!("CARGO_TARGET_TMPDIR")).join("template-builds"));
    if let Some(path) = path {
        cmd.env("PATH", path);
    }
    cmd.output().expect("run hangar")
}

fn text(output: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

/// `hangar plugin new NAME --kind KIND --lang LANG` in a fresh directory,
/// then `hangar plugin build NAME`; returns (the parent, the project).
fn new_and_build(name: &str, kind: &str, lang: &str) -> (tempfile::TempDir, PathBuf) {
    let parent = tempfile::tempdir().unwrap();
    let out = hangar(parent.path(), &["plugin", "new", name, "--kind", kind, "--lang", lang], None);
    assert!(out.status.success(), "plugin new: {}", text(&out));
    let project = parent.path().join(name);
    assert!(project.join(format!("{name}.plugin.toml")).exists());
    let out = hangar(parent.path(), &["plugin", "build", name], None);
    assert!(out.status.success(), "plugin build {lang} {kind}: {}", text(&out));
    assert!(text(&out).contains(&format!("built {name}/{name}.wasm")), "{}", text(&out));
    assert!(project.join(format!("{name}.wasm")).exists());
    (parent, project)
}

/// A server whose operator grants `filesystem = "read"` to `name`.
fn server_granting_read(name: &str) -> (tempfile::TempDir, Server) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hangar.toml");
    std::fs::write(&config, format!("[plugins.{name}]\nfilesystem = \"read\"\n")).unwrap();
    let server = Server::start(&["--config", config.to_str().unwrap()]);
    (dir, server)
}

/// `hangar plugin install PROJECT --server URL`: the plugin as the server
/// answered, and what the command printed on standard error.
fn install(project: &Path, server: &Server) -> (Value, String) {
    let out = hangar(project.parent().unwrap(), &["plugin", "install", project.to_str().unwrap(), "--server", &server.base], None);
    assert!(out.status.success(), "plugin install: {}\n{}", text(&out), server.log());
    let plugin: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(&out)));
    (plugin, String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Has the `anthropic` provider, pointed at a scripted fake, call `tool`
/// once per input, one step after the other in one run, in a session on
/// `work`; returns each call as the run reports it.
async fn call_tool(server: &Server, work: &Path, tool: &str, inputs: &[Value]) -> Vec<Value> {
    let mut script = Vec::new();
    for (i, input) in inputs.iter().enumerate() {
        script.push(Reply::sse(anthropic::tool_answer(&format!("call-{i}"), tool, &[&input.to_string()], 10, 5)));
    }
    script.push(Reply::sse(anthropic::text_answer(&["Done."], 20, 2)));
    let fake = FakeServer::start(script).await;
    let (status, body) = server
        .put("/provider/auth", json!({"providers": {"anthropic": {"type": "api_key", "key": "sk-test", "base_url": fake.url}}}))
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, agent) = server
        .post(
            "/agents",
            json!({"name": "t", "instructions": "Use the tool.", "tools": [tool], "provider": {"id": "anthropic", "model": "claude-test"}}),
        )
        .await;
    assert_eq!(status, 201, "{agent}");
    let (status, session) = server.post("/sessions", json!({"work_dir": work})).await;
    assert_eq!(status, 201, "{session}");
    let (status, body) = server
        .post(&format!("/sessions/{}/message", session["id"].as_str().unwrap()), json!({"agent_id": agent["id"], "message": "go"}))
        .await;
    assert_eq!(status, 200, "{body}\n{}", server.log());
    let calls = body["tool_calls"].as_array().unwrap_or_else(|| panic!("no tool_calls in {body}"));
    assert_eq!(calls.len(), inputs.len(), "{body}");
    calls.clone()
}

fn work_dir_with_notes() -> (tempfile::TempDir, PathBuf) {
    let root = tempfile::tempdir().unwrap();
    let work = root.path().join("work");
    std::fs::create_dir(&work).unwrap();
    std::fs::write(work.join("notes.txt"), "one\ntwo\nthree\n").unwrap();
    std::fs::write(root.path().join("outside.txt"), "not yours\n").unwrap();
    (root, work)
}

#[tokio::test]
async fn rust_tool_template_builds_outside_the_repository_installs_and_answers() {
    let name = "lines_rs";
    let (_parent, project) = tokio::task::spawn_blocking(move || new_and_build(name, "tool", "rust")).await.unwrap();
    // The SDK and the WIT are in the project; nothing points back here.
    let cargo_toml = std::fs::read_to_string(project.join("Cargo.toml")).unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    assert!(!cargo_toml.contains(repo.to_str().unwrap()) && !cargo_toml.contains(".."), "{cargo_toml}");
    for file in ["hangar-sdk/Cargo.toml", "hangar-sdk/src/fs.rs", "wit/worlds.wit", "rust-toolchain.toml"] {
        assert!(project.join(file).exists(), "{file} is vendored");
    }

    let (_config, server) = server_granting_read(name);
    let (plugin, warnings) = install(&project, &server);
    assert_eq!((plugin["id"].as_str(), plugin["kind"].as_str()), (Some(name), Some("tool")), "{plugin}");
    assert_eq!(plugin["capabilities"]["granted"]["filesystem"], "read");
    assert!(warnings.is_empty(), "a tool granted the filesystem is not warned: {warnings}");
    let (_, tools) = server.get("/tools").await;
    let spec = tools.as_array().unwrap().iter().find(|t| t["name"] == name).expect("listed in /tools");
    assert_eq!(spec["input_schema"]["required"], json!(["path"]), "derived from the input type: {spec}");
    assert_eq!(spec["input_schema"]["additionalProperties"], false, "{spec}");

    let (_root, work) = work_dir_with_notes();
    let outputs = call_tool(&server, &work, name, &[json!({"path": "notes.txt"}), json!({"path": "../outside.txt"})]).await;
    assert_eq!((outputs[0]["output"].as_str(), outputs[0]["is_error"].as_bool()), (Some("notes.txt: 3 lines"), Some(false)));
    assert_eq!(outputs[1]["is_error"], true, "{}", outputs[1]);
    assert!(
        outputs[1]["output"].as_str().unwrap().contains("path `../outside.txt` is outside the working directory"),
        "the vendored SDK explains the refusal: {}",
        outputs[1]
    );
}

#[tokio::test]
async fn rust_provider_template_builds_installs_and_answers() {
    let name = "echo_rs";
    let (_parent, project) = tokio::task::spawn_blocking(move || new_and_build(name, "provider", "rust")).await.unwrap();
    let server = Server::start(&[]);
    let (plugin, _) = install(&project, &server);
    assert_eq!((plugin["id"].as_str(), plugin["kind"].as_str()), (Some(name), Some("provider")), "{plugin}");
    assert_eq!(provider_answer(&server, name).await, "echo_rs heard: hello there");
}

#[tokio::test]
async fn python_provider_template_builds_installs_and_answers() {
    if !common::have_command("componentize-py", "pip install componentize-py==0.25.1") {
        return;
    }
    let name = "echo_py";
    let (_parent, project) = tokio::task::spawn_blocking(move || new_and_build(name, "provider", "python")).await.unwrap();
    let server = Server::start(&[]);
    let (plugin, _) = install(&project, &server);
    assert_eq!((plugin["id"].as_str(), plugin["kind"].as_str()), (Some(name), Some("provider")), "{plugin}");
    assert_eq!(provider_answer(&server, name).await, "echo_py heard: hello there");
}

#[tokio::test]
async fn javascript_provider_template_builds_installs_and_answers() {
    if !common::have_command("jco", "npm install -g @bytecodealliance/jco@1.34.0 @bytecodealliance/componentize-js@0.23.0") {
        return;
    }
    let name = "echo_js";
    let (_parent, project) = tokio::task::spawn_blocking(move || new_and_build(name, "provider", "js")).await.unwrap();
    let server = Server::start(&[]);
    let (plugin, _) = install(&project, &server);
    assert_eq!((plugin["id"].as_str(), plugin["kind"].as_str()), (Some(name), Some("provider")), "{plugin}");
    assert_eq!(provider_answer(&server, name).await, "echo_js heard: hello there");
}

/// An agent on the provider `name`: its answer to "hello there".
async fn provider_answer(server: &Server, name: &str) -> Value {
    let (status, agent) =
        server.post("/agents", json!({"name": "t", "tools": [], "provider": {"id": name, "model": format!("{name}-1")}})).await;
    assert_eq!(status, 201, "{agent}");
    let (_, session) = server.post("/sessions", json!({})).await;
    let (status, body) = server
        .post(&format!("/sessions/{}/message", session["id"].as_str().unwrap()), json!({"agent_id": agent["id"], "message": "hello there"}))
        .await;
    assert_eq!(status, 200, "{body}\n{}", server.log());
    assert_eq!(body["stop_reason"], "end_turn", "{body}");
    body["response"].clone()
}

#[tokio::test]
async fn python_tool_template_builds_installs_and_answers() {
    if !common::have_command("componentize-py", "pip install componentize-py==0.25.1") {
        return;
    }
    let name = "lines_py";
    let (_parent, project) = tokio::task::spawn_blocking(move || new_and_build(name, "tool", "python")).await.unwrap();
    let (_config, server) = server_granting_read(name);
    let (plugin, _) = install(&project, &server);
    assert_eq!(plugin["id"], name, "{plugin}");
    let (_root, work) = work_dir_with_notes();
    let outputs = call_tool(&server, &work, name, &[json!({"path": "notes.txt"})]).await;
    assert_eq!((outputs[0]["output"].as_str(), outputs[0]["is_error"].as_bool()), (Some("notes.txt: 3 lines"), Some(false)));
}

#[tokio::test]
async fn javascript_tool_template_builds_installs_and_answers() {
    if !common::have_command("jco", "npm install -g @bytecodealliance/jco@1.34.0 @bytecodealliance/componentize-js@0.23.0") {
        return;
    }
    let name = "words_js";
    let (_parent, project) = tokio::task::spawn_blocking(move || new_and_build(name, "tool", "js")).await.unwrap();
    let server = Server::start(&[]);
    let (plugin, warnings) = install(&project, &server);
    assert_eq!(plugin["id"], name, "{plugin}");
    // It asks for no filesystem: installed, with a warning that says so.
    assert!(warnings.contains(&format!("tool `{name}` declares no filesystem access")), "{warnings}");
    let (_root, work) = work_dir_with_notes();
    let outputs = call_tool(&server, &work, name, &[json!({"text": "one two  three"})]).await;
    assert_eq!((outputs[0]["output"].as_str(), outputs[0]["is_error"].as_bool()), (Some("3 words"), Some(false)));
}

/// What an author sees when a toolchain is missing, a project is not built
/// yet, or a template does not exist: what to do next.
#[test]
fn missing_toolchains_and_unbuilt_projects_say_what_to_do() {
    let parent = tempfile::tempdir().unwrap();
    let empty_path = parent.path().join("empty-path");
    std::fs::create_dir(&empty_path).unwrap();
    for (name, lang, says) in [
        ("a_rs", "rust", "`cargo` is not installed (or not on PATH): install Rust with rustup"),
        ("a_py", "python", "`componentize-py` is not installed (or not on PATH): pip install componentize-py==0.25.1"),
        (
            "a_js",
            "js",
            "`jco` is not installed (or not on PATH): npm install -g @bytecodealliance/jco@1.34.0 @bytecodealliance/componentize-js@0.23.0",
        ),
    ] {
        let out = hangar(parent.path(), &["plugin", "new", name, "--lang", lang], None);
        assert!(out.status.success(), "{}", text(&out));
        let out = hangar(parent.path(), &["plugin", "build", name], Some(&empty_path));
        assert!(!out.status.success());
        assert!(text(&out).contains(says), "{lang}: {}", text(&out));
        let out = hangar(parent.path(), &["plugin", "install", name, "--server", "http://127.0.0.1:9"], None);
        assert!(!out.status.success());
        assert!(text(&out).contains("build it first with `hangar plugin build"), "{}", text(&out));
    }
    let out = hangar(parent.path(), &["plugin", "new", "a_rs"], None);
    assert!(!out.status.success() && text(&out).contains("already exists"), "{}", text(&out));
    let out = hangar(parent.path(), &["plugin", "new", "Bad Name"], None);
    assert!(!out.status.success() && text(&out).contains("is not a plugin name"), "{}", text(&out));
}
