//! The plugins in `examples/`, built from source as a plugin author builds
//! them, installed into the real `hangar` binary (uploaded to `POST
//! /plugins`, or for the provider copied into the plugins directory), granted
//! what they need by an operator config file, and called from an agent run.
//!
//! Each example is built once per test run. The Rust ones share one target
//! directory under `CARGO_TARGET_TMPDIR` (never the host's own, so the nested
//! cargo does not wait on the outer build's lock); the Python one needs
//! `componentize-py` on `PATH` (`./test.sh` installs it): without it the
//! test is skipped with a printed reason, except under CI, where it fails.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

use common::fake::{Chunk, FakeServer, Reply, anthropic};
use common::server::Server;
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};

/// The componentize-py release the Python example is built and tested with.
const COMPONENTIZE_PY: &str = "0.25.1";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Builds a Rust example with `cargo build --release --target wasm32-wasip2`
/// (what its README tells an author to run) and returns the component.
fn build_rust(example: &str, lib: &str) -> PathBuf {
    let target_dir = scratch("examples-target");
    let started = Instant::now();
    let output = Command::new(env!("CARGO"))
        .current_dir(repo().join("examples").join(example))
        .args(["build", "--release", "--target", "wasm32-wasip2", "--locked", "--target-dir"])
        .arg(&target_dir)
        // The outer build's flags and target dir are for the host, not for
        // a wasm guest in a workspace of its own.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR")
        .output()
        .expect("run cargo");
    assert!(
        output.status.success(),
        "building examples/{example} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let wasm = target_dir.join("wasm32-wasip2/release").join(format!("{lib}.wasm"));
    eprintln!("built examples/{example} in {:.1?}: {} bytes", started.elapsed(), std::fs::metadata(&wasm).unwrap().len());
    wasm
}

/// Builds the Python example with componentize-py, exactly as its README says.
fn build_python() -> PathBuf {
    let version = Command::new("componentize-py").arg("--version").output();
    let install = format!("pip install componentize-py=={COMPONENTIZE_PY}");
    let version = match version {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_string(),
        Ok(out) => panic!("`componentize-py --version` failed ({}); reinstall it: {install}", out.status),
        Err(err) => panic!("componentize-py is not on PATH ({err}); install it: {install}"),
    };
    assert_eq!(version, format!("componentize-py {COMPONENTIZE_PY}"), "the example is pinned to this release: {install}");
    let out = scratch("examples-python").join("csv_stats.wasm");
    let started = Instant::now();
    let output = Command::new("componentize-py")
        .current_dir(repo().join("examples/python-tool"))
        .args(["-d", "../../wit", "-d", "wit", "-w", "hangar:plugin/tool"])
        .args(["componentize", "app", "-i", "example:csv-stats/granted", "-o"])
        .arg(&out)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .output()
        .expect("run componentize-py");
    assert!(
        output.status.success(),
        "componentize-py failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("built examples/python-tool in {:.1?}: {} bytes", started.elapsed(), std::fs::metadata(&out).unwrap().len());
    out
}

/// Builds on a blocking thread, once per test run, whichever test asks first.
async fn built(cell: &'static OnceLock<PathBuf>, build: fn() -> PathBuf) -> PathBuf {
    tokio::task::spawn_blocking(move || cell.get_or_init(build).clone()).await.unwrap()
}

async fn wc_wasm() -> PathBuf {
    static CELL: OnceLock<PathBuf> = OnceLock::new();
    built(&CELL, || build_rust("hello-tool", "hello_tool")).await
}

async fn fetch_wasm() -> PathBuf {
    static CELL: OnceLock<PathBuf> = OnceLock::new();
    built(&CELL, || build_rust("http-tool", "http_tool")).await
}

async fn echo_wasm() -> PathBuf {
    static CELL: OnceLock<PathBuf> = OnceLock::new();
    built(&CELL, || build_rust("echo-provider", "echo_provider")).await
}

async fn csv_stats_wasm() -> PathBuf {
    static CELL: OnceLock<PathBuf> = OnceLock::new();
    built(&CELL, build_python).await
}

/// A plugins directory and an operator config file, as an operator sets
/// them up: `NAME.wasm` beside `NAME.plugin.toml`, and `[plugins.NAME]`
/// grants.
struct Install {
    dir: tempfile::TempDir,
}

impl Install {
    fn new() -> Install {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("plugins")).unwrap();
        std::fs::write(dir.path().join("hangar.toml"), "").unwrap();
        Install { dir }
    }

    /// Copies a component and its manifest into the plugins directory.
    fn plugin(&self, name: &str, wasm: &Path, manifest: &str) -> &Install {
        let plugins = self.dir.path().join("plugins");
        std::fs::copy(wasm, plugins.join(format!("{name}.wasm"))).unwrap();
        std::fs::write(plugins.join(format!("{name}.plugin.toml")), manifest).unwrap();
        self
    }

    /// Copies an example's component, with the manifest it ships, into the
    /// plugins directory.
    fn example(&self, example: &str, name: &str, wasm: &Path) -> &Install {
        self.plugin(name, wasm, &shipped_manifest(example, name))
    }

    /// Appends operator policy to the config file.
    fn config(&self, toml: &str) -> &Install {
        let path = self.dir.path().join("hangar.toml");
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(toml);
        std::fs::write(path, text).unwrap();
        self
    }

    fn start(&self) -> Server {
        let plugins = self.dir.path().join("plugins");
        let config = self.dir.path().join("hangar.toml");
        Server::start(&["--plugins", plugins.to_str().unwrap(), "--config", config.to_str().unwrap()])
    }
}

fn shipped_manifest(example: &str, name: &str) -> String {
    std::fs::read_to_string(repo().join("examples").join(example).join(format!("{name}.plugin.toml"))).unwrap()
}

/// Uploads a component with its manifest to `POST /plugins`, as the guide
/// shows with `curl -F manifest=@... -F wasm=@...`.
async fn upload(server: &Server, manifest: &str, wasm: &Path) -> (u16, Value) {
    let form = Form::new()
        .part("manifest", Part::text(manifest.to_string()).file_name("plugin.toml"))
        .part("wasm", Part::bytes(std::fs::read(wasm).unwrap()).file_name("plugin.wasm"));
    server.send(server.client.post(server.url("/plugins")).multipart(form)).await
}

/// Uploads and expects the plugin to be installed and granted `granted`.
async fn install_by_api(server: &Server, manifest: &str, wasm: &Path, granted: Value) -> Value {
    let (status, plugin) = upload(server, manifest, wasm).await;
    assert_eq!(status, 201, "{plugin}\n{}", server.log());
    assert_eq!(plugin["source"], "api");
    assert_eq!(plugin["capabilities"]["granted"], granted, "{plugin}");
    plugin
}

/// A session on a fresh working directory, with an agent on `provider`.
struct Run {
    server: Server,
    agent: String,
    session: String,
    /// Holds the working directory `work` and, beside it, files a tool
    /// must not reach.
    root: tempfile::TempDir,
    work: PathBuf,
}

impl Run {
    async fn new(server: Server, provider: Value, tools: Value) -> Run {
        let root = tempfile::tempdir().unwrap();
        let work = root.path().join("work");
        std::fs::create_dir(&work).unwrap();
        let (status, agent) = server
            .post("/agents", json!({"name": "examples", "instructions": "Use the tools.", "tools": tools, "provider": provider}))
            .await;
        assert_eq!(status, 201, "{agent}\n{}", server.log());
        let (status, session) = server.post("/sessions", json!({"work_dir": work})).await;
        assert_eq!(status, 201, "{session}");
        Run {
            agent: agent["id"].as_str().unwrap().into(),
            session: session["id"].as_str().unwrap().into(),
            server,
            root,
            work,
        }
    }

    /// An agent on the `anthropic` provider, pointed at a scripted fake.
    async fn anthropic(server: Server, fake: &FakeServer, tools: Value) -> Run {
        let (status, body) = server
            .put("/provider/auth", json!({"providers": {"anthropic": {"type": "api_key", "key": "sk-test", "base_url": fake.url}}}))
            .await;
        assert_eq!(status, 200, "{body}");
        Run::new(server, json!({"id": "anthropic", "model": "claude-test", "max_tokens": 512}), tools).await
    }

    fn write(&self, path: &str, text: &str) {
        std::fs::write(self.work.join(path), text).unwrap();
    }

    async fn message(&self, text: &str) -> Value {
        let (status, body) = self
            .server
            .post(&format!("/sessions/{}/message", self.session), json!({"agent_id": self.agent, "message": text}))
            .await;
        assert_eq!(status, 200, "{body}\n{}", self.server.log());
        body
    }

    /// Sends a message whose scripted answer calls one tool, and returns
    /// that call as the run reports it (`name`, `input`, `output`, `is_error`).
    async fn tool_call(&self, text: &str) -> Value {
        let body = self.message(text).await;
        let calls = body["tool_calls"].as_array().unwrap_or_else(|| panic!("no tool_calls in {body}"));
        assert_eq!(calls.len(), 1, "{body}");
        calls[0].clone()
    }
}

/// The fake model's answers for one turn that calls `tool` with `input`.
fn one_call(id: &str, tool: &str, input: Value) -> [Reply; 2] {
    [
        Reply::sse(anthropic::tool_answer(id, tool, &[&input.to_string()], 10, 5)),
        Reply::sse(anthropic::text_answer(&["Done."], 20, 2)),
    ]
}

/// What the model was sent back for the call `id`: the tool result block.
fn result_sent(fake: &FakeServer, id: &str) -> Value {
    for request in fake.requests().iter().rev() {
        for message in request.json()["messages"].as_array().unwrap() {
            for block in message["content"].as_array().into_iter().flatten() {
                if block["type"] == "tool_result" && block["tool_use_id"] == id {
                    return block.clone();
                }
            }
        }
    }
    panic!("no tool_result for {id} reached the model");
}

#[tokio::test]
async fn hello_tool_counts_lines_words_and_bytes_in_the_work_dir() {
    let wasm = wc_wasm().await;
    let install = Install::new();
    install.config("[plugins.wc]\nfilesystem = \"read\"\n");
    let server = install.start();
    install_by_api(&server, &shipped_manifest("hello-tool", "wc"), &wasm, json!({"filesystem": "read", "http": [], "process": false, "env": []}))
        .await;
    let (_, tools) = server.get("/tools").await;
    let spec = tools.as_array().unwrap().iter().find(|t| t["name"] == "wc").unwrap_or_else(|| panic!("{tools}"));
    assert_eq!(spec["input_schema"]["required"], json!(["paths"]), "{spec}");
    let mut script = Vec::new();
    script.extend(one_call("toolu_1", "wc", json!({"paths": ["notes.txt", "sub/more.txt"]})));
    script.extend(one_call("toolu_2", "wc", json!({"paths": ["../outside.txt"]})));
    let fake = FakeServer::start(script).await;
    let run = Run::anthropic(server, &fake, json!(["wc"])).await;
    run.write("notes.txt", "one two three\nfour  five\n");
    std::fs::create_dir(run.work.join("sub")).unwrap();
    run.write("sub/more.txt", "six\n\nseven eight");

    let call = run.tool_call("How long are my notes?").await;
    assert_eq!(call["name"], "wc");
    assert_eq!(call["is_error"], false, "{call}");
    let output = call["output"].as_str().unwrap();
    assert_eq!(
        output,
        "   lines    words    bytes\n       2        5       25 notes.txt\n       2        3       16 sub/more.txt\n       4        8       41 total\n"
    );
    assert_eq!(result_sent(&fake, "toolu_1")["content"].to_string().contains("41 total"), true);

    // Outside the working directory the sandbox refuses to open the file;
    // the model reads why, and the run goes on.
    std::fs::write(run.root.path().join("outside.txt"), "a secret\n").unwrap();
    let call = run.tool_call("And the file next door?").await;
    assert_eq!(call["is_error"], true, "{call}");
    let output = call["output"].as_str().unwrap();
    assert!(output.starts_with("../outside.txt: "), "{output}");
    assert!(!output.contains("secret") && !output.contains("total"), "{output}");
    assert_eq!(result_sent(&fake, "toolu_2")["is_error"], true);
}

#[tokio::test]
async fn http_tool_fetches_from_the_granted_origin_and_is_refused_elsewhere() {
    let wasm = fetch_wasm().await;
    let docs = FakeServer::start(vec![Reply {
        status: 200,
        headers: vec![("content-type".into(), "text/plain".into())],
        chunks: vec![Chunk::Data(b"Tools are WebAssembly components.".to_vec())],
    }])
    .await;
    let elsewhere = FakeServer::start(vec![Reply::json(200, json!({"leaked": true}))]).await;

    // The shipped manifest names a public docs site; an operator who hosts
    // the docs elsewhere lists that origin instead, in both places.
    let manifest = std::fs::read_to_string(repo().join("examples/http-tool/fetch.plugin.toml"))
        .unwrap()
        .replace("https://docs.example.com", &docs.url);
    assert!(manifest.contains(&docs.url));
    let install = Install::new();
    install.config(&format!("[plugins.fetch]\nhttp = [\"{}\"]\n", docs.url));
    let server = install.start();
    // The shipped manifest's origin is not the one the operator allows.
    let (status, body) = upload(&server, &shipped_manifest("http-tool", "fetch"), &wasm).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(
        body["error"],
        "plugin `fetch` was refused the `http` capability: origin `https://docs.example.com:443` is not allowed by the operator policy"
    );
    install_by_api(&server, &manifest, &wasm, json!({"filesystem": "none", "http": [docs.url], "process": false, "env": []})).await;

    let mut script = Vec::new();
    script.extend(one_call("toolu_1", "fetch", json!({"url": format!("{}/guide.txt", docs.url)})));
    script.extend(one_call("toolu_2", "fetch", json!({"url": format!("{}/steal", elsewhere.url)})));
    let fake = FakeServer::start(script).await;
    let run = Run::anthropic(server, &fake, json!(["fetch"])).await;

    let call = run.tool_call("What do the docs say?").await;
    assert_eq!(call["is_error"], false, "{call}");
    assert_eq!(call["output"], "HTTP 200 (text/plain)\n\nTools are WebAssembly components.");
    let requests = docs.requests();
    assert_eq!(requests.len(), 1);
    assert_eq!((requests[0].method.as_str(), requests[0].path.as_str()), ("GET", "/guide.txt"));
    assert_eq!(requests[0].header("authorization"), None, "no credential was asked for");

    // Another origin: the host refuses it (http-error.denied) before any
    // connection is made, and the model reads the refusal.
    let call = run.tool_call("Now fetch the other one.").await;
    assert_eq!(call["is_error"], true, "{call}");
    let output = call["output"].as_str().unwrap();
    assert_eq!(
        output,
        format!(
            "cannot fetch {0}/steal: request denied by the host: origin {0} is not granted to plugin `fetch`",
            elsewhere.url
        )
    );
    assert!(elsewhere.requests().is_empty(), "nothing reached the other origin");
    let sent = result_sent(&fake, "toolu_2");
    assert_eq!(sent["is_error"], true);
    assert!(sent["content"].to_string().contains("denied"), "{sent}");
}

#[tokio::test]
async fn python_tool_summarises_a_csv_file() {
    if !common::have_command("componentize-py", &format!("pip install componentize-py=={COMPONENTIZE_PY}")) {
        return;
    }
    let wasm = csv_stats_wasm().await;
    let install = Install::new();
    install.config("[plugins.csv_stats]\nfilesystem = \"read\"\n");
    let server = install.start();
    // The upload answers once the component has compiled (or came from the
    // compile cache) and linked: that is the load time.
    let started = Instant::now();
    let manifest = shipped_manifest("python-tool", "csv_stats");
    install_by_api(&server, &manifest, &wasm, json!({"filesystem": "read", "http": [], "process": false, "env": []})).await;
    eprintln!("python tool: POST /plugins answered in {:.1?}", started.elapsed());
    if let Some(line) = server.log().lines().find(|l| l.contains("plugin loaded") && l.contains("csv_stats")) {
        eprintln!("python tool: {line}");
    }
    let mut script = Vec::new();
    script.extend(one_call("toolu_1", "csv_stats", json!({"path": "sales.csv"})));
    script.extend(one_call("toolu_2", "csv_stats", json!({"path": "missing.csv"})));
    let fake = FakeServer::start(script).await;
    let run = Run::anthropic(server, &fake, json!(["csv_stats"])).await;
    run.write("sales.csv", "region,units,price\nnorth,10,2.5\nsouth,4,3\nnorth,7,2.25\n");

    let started = Instant::now();
    let call = run.tool_call("Summarise sales.csv").await;
    eprintln!("python tool: the agent run with one call took {:.1?}", started.elapsed());
    assert_eq!(call["is_error"], false, "{call}");
    assert_eq!(
        call["output"],
        "sales.csv: 3 rows, 3 columns\n\
         - region: text, 2 distinct values\n\
         - units: numeric, min 4, max 10, mean 7\n\
         - price: numeric, min 2.25, max 3, mean 2.583"
    );

    let call = run.tool_call("And missing.csv?").await;
    assert_eq!(call["is_error"], true, "{call}");
    assert!(call["output"].as_str().unwrap().starts_with("cannot read `missing.csv`"), "{call}");
}

#[tokio::test]
async fn echo_provider_is_listed_and_runs_a_session_with_a_tool() {
    let wasm = echo_wasm().await;
    let install = Install::new();
    // A provider with no capabilities needs no grant.
    install.example("echo-provider", "echo", &wasm);
    let server = install.start();
    let (_, plugins) = server.get("/plugins").await;
    let plugin = plugins.as_array().unwrap().iter().find(|p| p["id"] == "echo").unwrap_or_else(|| panic!("{plugins}"));
    assert_eq!((plugin["kind"].as_str(), plugin["source"].as_str()), (Some("provider"), Some("directory")), "{plugin}");

    let (status, providers) = server.get("/provider").await;
    assert_eq!(status, 200);
    let echo = providers.as_array().unwrap().iter().find(|p| p["id"] == "echo").unwrap_or_else(|| panic!("{providers}"));
    assert_eq!(echo["auth_types"], json!([]));
    let (status, models) = server.get("/provider/echo/models").await;
    assert_eq!(status, 200, "{models}");
    assert_eq!(models[0]["id"], "echo-1", "{models}");

    let run = Run::new(server, json!({"id": "echo", "model": "echo-1", "max_tokens": 256}), json!(["read"])).await;
    run.write("hello.txt", "the file says hi\n");

    let body = run.message("hello there").await;
    assert_eq!(body["response"], "You said: hello there");
    assert_eq!(body["stop_reason"], "end_turn");
    assert_eq!(body["steps"], 1);

    // The echo model calls a built-in tool on request and reports its result.
    let body = run.message("call read {\"filePath\": \"hello.txt\"}").await;
    assert_eq!(body["steps"], 2, "{body}");
    let calls = body["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1, "{body}");
    assert_eq!(calls[0]["name"], "read");
    assert_eq!(calls[0]["input"], json!({"filePath": "hello.txt"}));
    let response = body["response"].as_str().unwrap();
    assert!(response.starts_with("`read` returned:\n"), "{response}");
    assert!(response.contains("the file says hi"), "{response}");

    let history = run.server.get(&format!("/sessions/{}", run.session)).await.1["history"].clone();
    let roles: Vec<&str> = history.as_array().unwrap().iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["user", "assistant", "user", "assistant", "user", "assistant"]);
}
