//! Plugins written to break the host's limits (issue 24): each fails its
//! own call or load with an error naming the limit, while `/health` and
//! other sessions' tool calls still answer.

mod common;

use common::fake::{FakeServer, Reply, anthropic};
use common::server::Server;
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};

const SLOWINFO: &str = include_str!("fixtures/slowinfo/slowinfo.plugin.toml");
const ROGUE: &str = include_str!("fixtures/rogue/rogue.plugin.toml");

async fn upload(server: &Server, manifest: &str, wasm: Vec<u8>) -> (u16, Value) {
    let form = Form::new().text("manifest", manifest.to_string()).part("wasm", Part::bytes(wasm).file_name("plugin.wasm"));
    server.send(server.client.post(server.url("/plugins")).multipart(form)).await
}

fn config(dir: &std::path::Path, text: &str) -> String {
    let path = dir.join("hangar.toml");
    std::fs::write(&path, text).unwrap();
    path.to_str().unwrap().to_string()
}

fn ids(list: &Value) -> Vec<String> {
    list.as_array().unwrap().iter().map(|p| p["id"].as_str().unwrap().to_string()).collect()
}

#[tokio::test]
async fn a_provider_whose_info_never_returns_fails_at_its_deadline_and_holds_up_nothing() {
    let wasm = common::build_component("tests/fixtures/slowinfo");
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    std::fs::write(plugins.join("slowinfo.plugin.toml"), SLOWINFO).unwrap();
    std::fs::write(plugins.join("slowinfo.wasm"), &wasm).unwrap();
    let config = config(dir.path(), "[plugins.slowinfo]\ntimeout_ms = 500\n");

    // Installed while the server was down (the plugins directory): it
    // loads in the background and fails, and the provider list still answers.
    let server = Server::start(&["--plugins", plugins.to_str().unwrap(), "--config", &config]);
    let (status, _) = server.get("/health").await;
    assert_eq!(status, 200);
    let (status, providers) = server.get("/provider").await;
    assert_eq!(status, 200, "{providers}");
    let listed = ids(&providers);
    assert!(listed.contains(&"anthropic".to_string()) && !listed.contains(&"slowinfo".to_string()), "{listed:?}");
    let (_, plugins_list) = server.get("/plugins").await;
    let slow = plugins_list.as_array().unwrap().iter().find(|p| p["id"] == "slowinfo").expect("listed");
    assert_eq!(slow["state"], "failed", "{slow}");
    assert!(slow["error"].as_str().unwrap().contains("deadline of 500 ms"), "{slow}");
    let (status, body) = server.get("/provider/slowinfo").await;
    assert!(status >= 400 && status < 500 || status == 502, "{status} {body}");
    assert!(body["error"].as_str().unwrap().contains("deadline"), "{body}");

    // Uploaded: the upload is refused at the deadline, and nothing is registered.
    let server = Server::start(&["--config", &config]);
    let (status, body) = upload(&server, SLOWINFO, wasm).await;
    assert_eq!(status, 502, "{body}");
    assert!(body["error"].as_str().unwrap().contains("`slowinfo` ran past its deadline of 500 ms"), "{body}");
    let (_, plugins_list) = server.get("/plugins").await;
    assert!(!ids(&plugins_list).contains(&"slowinfo".to_string()));
    let (status, providers) = server.get("/provider").await;
    assert_eq!(status, 200);
    assert!(ids(&providers).contains(&"anthropic".to_string()));
}

/// A server with `rogue` installed, an agent using it, and another agent
/// (the real `anthropic` provider against a fake, with the `read` tool) in
/// its own session.
struct Rogue {
    server: Server,
    fake: FakeServer,
    rogue_agent: String,
    rogue_session: String,
    other_agent: String,
    other_session: String,
    _work: tempfile::TempDir,
    _config: tempfile::TempDir,
}

async fn rogue(extra_config: &str) -> Rogue {
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("hello.txt"), "the file says hi\n").unwrap();
    let config_dir = tempfile::tempdir().unwrap();
    let config = config(config_dir.path(), &format!("[plugins.rogue]\ntimeout_ms = 3000\n{extra_config}"));
    let fake = FakeServer::start(Vec::new()).await;
    let server = Server::start(&["--config", &config]);
    let (status, body) = upload(&server, ROGUE, common::build_component("tests/fixtures/rogue")).await;
    assert_eq!(status, 201, "{body}");
    let (status, _) =
        server.put("/provider/auth", json!({"providers": {"anthropic": {"type": "api_key", "key": "sk-test", "base_url": fake.url}}})).await;
    assert_eq!(status, 200);
    let (_, rogue_agent) = server.post("/agents", json!({"name": "r", "tools": [], "provider": {"id": "rogue", "model": "m"}})).await;
    let (_, other_agent) =
        server.post("/agents", json!({"name": "o", "tools": ["read"], "provider": {"id": "anthropic", "model": "claude-test"}})).await;
    let (_, rogue_session) = server.post("/sessions", json!({"work_dir": work.path()})).await;
    let (_, other_session) = server.post("/sessions", json!({"work_dir": work.path()})).await;
    let id = |v: &Value| v["id"].as_str().unwrap_or_else(|| panic!("{v}")).to_string();
    Rogue {
        rogue_agent: id(&rogue_agent),
        rogue_session: id(&rogue_session),
        other_agent: id(&other_agent),
        other_session: id(&other_session),
        server,
        fake,
        _work: work,
        _config: config_dir,
    }
}

impl Rogue {
    async fn rogue(&self, text: &str) -> (u16, Value) {
        let body = json!({"agent_id": self.rogue_agent, "message": text});
        self.server.post(&format!("/sessions/{}/message", self.rogue_session), body).await
    }

    async fn history(&self) -> Value {
        self.server.get(&format!("/sessions/{}", self.rogue_session)).await.1["history"].clone()
    }

    /// `/health` answers, and a tool call in another session runs to the end.
    async fn others_carry_on(&self) {
        let (status, _) = self.server.get("/health").await;
        assert_eq!(status, 200);
        self.fake.push(Reply::sse(anthropic::tool_answer("toolu_1", "read", &["{\"filePath\": \"hello.txt\"}"], 10, 5)));
        self.fake.push(Reply::sse(anthropic::text_answer(&["read it"], 10, 5)));
        let body = json!({"agent_id": self.other_agent, "message": "read hello.txt"});
        let (status, body) = self.server.post(&format!("/sessions/{}/message", self.other_session), body).await;
        assert_eq!(status, 200, "{body}");
        assert!(body["tool_calls"][0]["output"].as_str().unwrap().contains("the file says hi"), "{body}");
    }
}

#[tokio::test]
async fn an_answer_over_step_output_kb_ends_the_step_with_an_error_naming_the_limit() {
    let r = rogue("[limits]\nstep_output_kb = 2048\n").await;
    for flood in ["flood 1000", "flood-tool 1000"] {
        let (status, body) = r.rogue(flood).await;
        assert_eq!(status, 502, "{flood}: {body}");
        assert_eq!(body["code"], "answer_too_large", "{flood}: {body}");
        let error = body["error"].as_str().unwrap();
        assert!(error.contains("rogue") && error.contains("2048 KiB") && error.contains("step_output_kb"), "{error}");
    }
    // Nothing of the answers was kept: the history holds the user's words only.
    let history = r.history().await;
    assert_eq!(history.as_array().unwrap().len(), 1, "{history}");
    assert_eq!(history[0]["role"], "user");
    assert!(history.to_string().len() < 10_000, "no flood stored");
    // The next turn is valid, and so is the rest of the server.
    let (status, body) = r.rogue("hello").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["response"], "ok");
    r.others_carry_on().await;
    // Under the limit, an answer goes through whole.
    let (status, body) = r.rogue("flood 1").await;
    assert_eq!(status, 200);
    assert_eq!(body["response"].as_str().unwrap().len(), 1 << 20);
}

#[tokio::test]
async fn a_provider_spinning_in_next_fails_at_its_deadline_while_others_carry_on() {
    let r = rogue("").await;
    let spinning = {
        let body = json!({"agent_id": r.rogue_agent, "message": "spin"});
        let request = r.server.client.post(r.server.url(&format!("/sessions/{}/message", r.rogue_session))).json(&body);
        tokio::spawn(request.send())
    };
    r.others_carry_on().await;
    let response = spinning.await.unwrap().unwrap();
    assert_eq!(response.status(), 502);
    let body: Value = response.json().await.unwrap();
    assert!(body["error"].as_str().unwrap().contains("`rogue` ran past its deadline of 3 s"), "{body}");
    let (status, body) = r.rogue("hello").await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn plugin_log_lines_are_escaped_and_rate_limited() {
    let r = rogue("").await;
    let (status, body) = r.rogue("log-forge").await;
    assert_eq!(status, 200, "{body}");
    let log = r.server.log();
    assert!(log.contains("benign\\n2026-01-01T00:00:00"), "the newline is escaped: {log}");
    assert!(log.contains("\\u{1b}[2K"), "so is ESC");
    assert!(!log.contains('\u{1b}'), "no raw escape reaches the log");
    for line in log.lines().filter(|l| l.contains("plugin=evil")) {
        assert!(line.contains("benign"), "a forged line of its own: {line}");
    }

    let (status, body) = r.rogue("log-flood").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["response"], "logged");
    let log = r.server.log();
    let written = log.lines().filter(|l| l.contains(&"y".repeat(1024))).count();
    assert!(written > 0 && written < 2_000, "{written} of 100,000 lines written");
    assert!(log.contains("lines dropped"), "the excess is counted");
    r.others_carry_on().await;
}

/// Item 8: an upload under the name of the operator's plugin (from the
/// plugins directory, which `[plugins.NAME]` grants) is a clash, not an
/// upgrade that would take those grants.
#[tokio::test]
async fn an_upload_under_the_name_of_a_directory_plugin_is_a_clash() {
    const MISBEHAVE: &str = include_str!("fixtures/misbehave/misbehave.plugin.toml");
    let wasm = common::build_component("tests/fixtures/misbehave");
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    let granted = format!("{MISBEHAVE}\n[capabilities]\nfilesystem = \"read\"\n");
    std::fs::write(plugins.join("misbehave.plugin.toml"), &granted).unwrap();
    std::fs::write(plugins.join("misbehave.wasm"), &wasm).unwrap();
    let config = config(dir.path(), "[plugins.misbehave]\nfilesystem = \"read\"\n");
    let server = Server::start(&["--plugins", plugins.to_str().unwrap(), "--config", &config]);
    let (status, body) = upload(&server, &granted, wasm).await;
    assert_eq!(status, 422, "{body}");
    assert!(body["error"].as_str().unwrap().contains("a plugin installed from the plugins directory has this name"), "{body}");
    let (_, list) = server.get("/plugins").await;
    let plugin = list.as_array().unwrap().iter().find(|p| p["id"] == "misbehave").unwrap();
    assert_eq!(plugin["source"], "directory", "the operator's plugin stays");
}

/// A provider whose load runs into a long deadline holds the provider list
/// up for a bounded wait only: it is left out (still `compiling`), and the
/// list answers.
#[tokio::test]
async fn the_provider_list_does_not_wait_out_a_long_deadline() {
    let wasm = common::build_component("tests/fixtures/slowinfo");
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    std::fs::write(plugins.join("slowinfo.plugin.toml"), SLOWINFO).unwrap();
    std::fs::write(plugins.join("slowinfo.wasm"), &wasm).unwrap();
    let config = config(dir.path(), "[plugins.slowinfo]\ntimeout_ms = 120000\n");
    let server = Server::start(&["--plugins", plugins.to_str().unwrap(), "--config", &config]);
    let (status, providers) = server.get("/provider").await;
    assert_eq!(status, 200, "{providers}");
    let listed = ids(&providers);
    assert!(listed.contains(&"anthropic".to_string()) && !listed.contains(&"slowinfo".to_string()), "{listed:?}");
    let (status, _) = server.get("/health").await;
    assert_eq!(status, 200);
}

const MISBEHAVE: &str = include_str!("fixtures/misbehave/misbehave.plugin.toml");

#[tokio::test]
async fn a_read_write_tool_call_stops_at_its_write_limits_and_the_run_goes_on() {
    let work = tempfile::tempdir().unwrap();
    let config_dir = tempfile::tempdir().unwrap();
    let config = config(config_dir.path(), "[plugins.misbehave]\nfilesystem = \"read-write\"\nwrite_mb = 1\nmax_files = 10\n");
    let server = Server::start(&["--config", &config]);
    let manifest = format!("{MISBEHAVE}\n[capabilities]\nfilesystem = \"read-write\"\n");
    let (status, body) = upload(&server, &manifest, common::build_component("tests/fixtures/misbehave")).await;
    assert_eq!(status, 201, "{body}");
    let granted = &body["capabilities"]["granted"];
    assert_eq!((granted["write_mb"].as_u64(), granted["max_files"].as_u64()), (Some(1), Some(10)), "{body}");
    let (_, plugins) = server.get("/plugins").await;
    let write = plugins.as_array().unwrap().iter().find(|p| p["id"] == "write").unwrap();
    assert_eq!(write["capabilities"]["granted"]["write_mb"], 4096, "built-ins get generous caps: {write}");
    let read = plugins.as_array().unwrap().iter().find(|p| p["id"] == "read").unwrap();
    assert!(read["capabilities"]["granted"].get("write_mb").is_none(), "no write cap where nothing is written: {read}");

    // One run: the model calls each mode in turn, then a normal write, and answers.
    let modes = ["write-5mb", "sparse-1tib", "create-100", "write-small"];
    let mut replies: Vec<Reply> = modes
        .iter()
        .enumerate()
        .map(|(i, mode)| Reply::sse(anthropic::tool_answer(&format!("toolu_{i}"), "misbehave", &[&json!({"mode": mode}).to_string()], 10, 5)))
        .collect();
    replies.push(Reply::sse(anthropic::text_answer(&["done"], 10, 5)));
    let fake = FakeServer::start(replies).await;
    let (status, _) =
        server.put("/provider/auth", json!({"providers": {"anthropic": {"type": "api_key", "key": "sk-test", "base_url": fake.url}}})).await;
    assert_eq!(status, 200);
    let (_, agent) =
        server.post("/agents", json!({"name": "w", "tools": ["misbehave"], "provider": {"id": "anthropic", "model": "claude-test"}})).await;
    let (_, session) = server.post("/sessions", json!({"work_dir": work.path()})).await;
    let (status, body) = server
        .post(&format!("/sessions/{}/message", session["id"].as_str().unwrap()), json!({"agent_id": agent["id"], "message": "go"}))
        .await;
    assert_eq!(status, 200, "{body}");
    let calls = body["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 4, "{body}");
    let limit = |i: usize, text: &str| {
        assert_eq!(calls[i]["is_error"], true, "{}", calls[i]);
        let output = calls[i]["output"].as_str().unwrap();
        assert!(output.contains(&format!("plugin `misbehave` reached its limit of {text}")), "{output}");
    };
    limit(0, "1 MB written in one call");
    limit(1, "1 MB written in one call");
    limit(2, "10 files created in one call");
    assert_eq!(calls[3]["is_error"], false, "{}", calls[3]);
    assert_eq!(calls[3]["output"], "wrote small.txt");

    // What the calls left: at most a megabyte, no sparse giant, ten files.
    assert_eq!(std::fs::metadata(work.path().join("big.bin")).unwrap().len(), 1 << 20);
    assert_eq!(std::fs::metadata(work.path().join("sparse.bin")).unwrap().len(), 0);
    assert!(work.path().join("f9.txt").exists() && !work.path().join("f10.txt").exists());
    assert_eq!(std::fs::read_to_string(work.path().join("small.txt")).unwrap(), "hello");
}

// Compiling an upload is bounded (issue 24.4, issue 22.2): the compile runs
// in a child process with a time and a memory limit, is killed when its
// client leaves or the server stops, and a refused upload caches nothing.

const SLOWBUILD: &str = "kind = \"tool\"\nname = \"slowbuild\"\nversion = \"0.1.0\"\ndescription = \"One huge function, slow to compile (tests only).\"\n";

fn leb128(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let byte = (n & 0x7f) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

fn section(id: u8, payload: &[u8], out: &mut Vec<u8>) {
    out.push(id);
    leb128(payload.len(), out);
    out.extend_from_slice(payload);
}

/// A valid component holding one core module with one function of about
/// `body_bytes` bytes: `locals` i64 locals and one small `loop` after
/// another, each reading one local and writing another. Every loop is a
/// block whose parameters Cranelift must build for the locals live across
/// it, so compiling it takes time and memory far beyond its size (100 KB:
/// about 20 s and 300 MB in a debug build of this host).
fn slow_to_compile(body_bytes: usize, locals: usize) -> Vec<u8> {
    let mut body = Vec::new();
    // One run of 1000 i64 locals.
    leb128(1, &mut body);
    leb128(locals, &mut body);
    body.push(0x7e);
    let mut i = 0;
    while body.len() < body_bytes {
        let (read, write) = ((i * 7) % locals, (i * 31 + 3) % locals);
        body.extend_from_slice(&[0x03, 0x40, 0x20]); // loop (empty type), local.get
        leb128(read, &mut body);
        body.extend_from_slice(&[0x42, 0x01, 0x7c, 0x21]); // i64.const 1, i64.add, local.set
        leb128(write, &mut body);
        body.push(0x0b); // end
        i += 1;
    }
    body.push(0x0b);
    let mut module = b"\0asm\x01\0\0\0".to_vec();
    section(1, &[1, 0x60, 0, 0], &mut module); // one type: [] -> []
    section(3, &[1, 0], &mut module); // one function of that type
    let mut code = vec![1];
    leb128(body.len(), &mut code);
    code.extend_from_slice(&body);
    section(10, &code, &mut module);
    let mut component = b"\0asm\x0d\x00\x01\x00".to_vec();
    section(1, &module, &mut component); // a core module section
    component
}

/// The live (not zombie) child processes of `pid`.
fn children(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // `PID (COMM) STATE PPID ...`; COMM may hold spaces and parentheses.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else { continue };
        let mut fields = rest.split_whitespace();
        let (Some(state), Some(ppid)) = (fields.next(), fields.next()) else { continue };
        if ppid == pid.to_string() && state != "Z" {
            found.push(entry.file_name().to_str().unwrap().parse().unwrap());
        }
    }
    found
}

/// Waits (up to `within`) for `pid` to have a live child: the compile worker.
async fn wait_for_worker(pid: u32, within: std::time::Duration) -> Vec<u32> {
    let deadline = std::time::Instant::now() + within;
    loop {
        let found = children(pid);
        if !found.is_empty() {
            return found;
        }
        assert!(std::time::Instant::now() < deadline, "no compile worker started");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Waits (up to `within`) for `pid` to have no live child left.
async fn wait_no_children(pid: u32, within: std::time::Duration, what: &str) {
    let deadline = std::time::Instant::now() + within;
    while !children(pid).is_empty() {
        assert!(std::time::Instant::now() < deadline, "{what}: processes left: {:?}", children(pid));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Compile cache entries of `wasm` in the tests' shared cache.
fn cache_entries(wasm: &[u8]) -> Vec<String> {
    use sha2::Digest;
    let prefix = hex::encode(&sha2::Sha256::digest(wasm)[..16]);
    std::fs::read_dir(common::cache_dir())
        .map(|dir| dir.flatten().filter_map(|e| e.file_name().into_string().ok()).filter(|n| n.starts_with(&prefix)).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn a_component_slow_to_compile_is_refused_at_its_compile_timeout_while_the_server_answers() {
    let wasm = slow_to_compile(100_000, 1000);
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), "[limits]\ncompile_timeout_s = 3\n");
    let server = std::sync::Arc::new(Server::start(&["--config", &config]));
    let uploading = {
        let (server, wasm) = (server.clone(), wasm.clone());
        tokio::spawn(async move { upload(&server, SLOWBUILD, wasm).await })
    };
    // The compile runs in a worker process, and the server answers meanwhile.
    // (It may first wait for a turn behind the built-ins on a cold cache.)
    let worker = wait_for_worker(server.pid(), std::time::Duration::from_secs(120)).await;
    let started = std::time::Instant::now();
    let (status, _) = server.get("/health").await;
    assert_eq!(status, 200);
    let (status, tools) = server.get("/tools").await;
    assert_eq!(status, 200, "{tools}");
    assert!(children(server.pid()).iter().any(|pid| worker.contains(pid)), "still compiling while the server answered");

    let (status, body) = uploading.await.unwrap();
    let took = started.elapsed();
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["code"], "plugin_refused", "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("`slowbuild`") && error.contains("took longer than 3 s (limits.compile_timeout_s)"), "{error}");
    assert!(took < std::time::Duration::from_secs(3 + 30), "refused within its bound: {took:?}");
    // The worker was killed and reaped before the answer.
    assert!(children(server.pid()).is_empty(), "processes left: {:?}", children(server.pid()));
    let (_, plugins) = server.get("/plugins").await;
    assert!(!ids(&plugins).contains(&"slowbuild".to_string()), "{plugins}");
    assert!(cache_entries(&wasm).is_empty(), "nothing cached: {:?}", cache_entries(&wasm));
}

#[tokio::test]
async fn a_compile_over_its_memory_limit_fails_the_upload_naming_the_limit() {
    let wasm = slow_to_compile(100_000, 1000);
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), "[limits]\ncompile_memory_mb = 128\ncompile_timeout_s = 300\n");
    let server = Server::start(&["--config", &config]);
    let (status, body) = upload(&server, SLOWBUILD, wasm.clone()).await;
    assert_eq!(status, 422, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("`slowbuild`") && error.contains("needed more than 128 MB of memory (limits.compile_memory_mb)"), "{error}");
    assert!(children(server.pid()).is_empty(), "processes left: {:?}", children(server.pid()));
    let (_, plugins) = server.get("/plugins").await;
    assert!(!ids(&plugins).contains(&"slowbuild".to_string()), "{plugins}");
    assert!(cache_entries(&wasm).is_empty());

    // An ordinary plugin still compiles under that limit (in the worker,
    // unless an earlier test cached it), loads, and is cached.
    let small = common::build_component("tests/fixtures/rogue");
    let (status, body) = upload(&server, ROGUE, small.clone()).await;
    assert_eq!(status, 201, "{body}");
    assert!(!cache_entries(&small).is_empty(), "a plugin that loaded is cached");
}

#[tokio::test]
async fn an_abandoned_upload_or_a_stopping_server_kills_its_compile() {
    let wasm = slow_to_compile(100_000, 1000);
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), "[limits]\ncompile_timeout_s = 300\n");
    let mut server = Server::start(&["--config", &config]);

    // The client goes away while the component compiles.
    let client = server.client.clone();
    let url = server.url("/plugins");
    let form = Form::new().text("manifest", SLOWBUILD.to_string()).part("wasm", Part::bytes(wasm.clone()).file_name("plugin.wasm"));
    let abandoned = tokio::spawn(async move { client.post(url).multipart(form).send().await });
    wait_for_worker(server.pid(), std::time::Duration::from_secs(120)).await;
    abandoned.abort();
    let _ = abandoned.await;
    wait_no_children(server.pid(), std::time::Duration::from_secs(10), "after the client left").await;
    let (status, _) = server.get("/health").await;
    assert_eq!(status, 200);

    // The server is told to stop while a compile runs: it stops, and the
    // worker with it.
    let uploading = {
        let (client, url) = (reqwest::Client::new(), server.url("/plugins"));
        let form = Form::new().text("manifest", SLOWBUILD.to_string()).part("wasm", Part::bytes(wasm).file_name("plugin.wasm"));
        tokio::spawn(async move { client.post(url).multipart(form).send().await })
    };
    let workers = wait_for_worker(server.pid(), std::time::Duration::from_secs(120)).await;
    let status = server.terminate();
    assert!(status.success(), "clean exit on SIGTERM while compiling: {status:?}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    for pid in workers {
        let alive = || {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|stat| stat.rfind(')').is_some_and(|i| !stat[i + 2..].starts_with('Z')))
        };
        while alive() {
            assert!(std::time::Instant::now() < deadline, "the compile worker {pid} outlived the server");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    let _ = uploading.await;
}

#[tokio::test]
async fn a_directory_plugin_slow_to_compile_fails_at_its_compile_timeout_and_the_server_serves() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = dir.path().join("plugins");
    std::fs::create_dir(&plugins).unwrap();
    std::fs::write(plugins.join("slowbuild.plugin.toml"), SLOWBUILD).unwrap();
    // Not the uploads' component: a cache entry from another test can't interfere.
    let wasm = slow_to_compile(100_001, 1000);
    std::fs::write(plugins.join("slowbuild.wasm"), &wasm).unwrap();
    let config = config(dir.path(), "[limits]\ncompile_timeout_s = 2\n");
    let server = Server::start(&["--plugins", plugins.to_str().unwrap(), "--config", &config]);
    let (status, _) = server.get("/health").await;
    assert_eq!(status, 200);
    // Loaded in the background, in a worker, and failed at its bound.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(150);
    let slow = loop {
        let (_, list) = server.get("/plugins").await;
        let slow = list.as_array().unwrap().iter().find(|p| p["id"] == "slowbuild").expect("listed").clone();
        if slow["state"] != "compiling" {
            break slow;
        }
        assert!(std::time::Instant::now() < deadline, "still compiling: {slow}");
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    };
    assert_eq!(slow["state"], "failed", "{slow}");
    assert!(slow["error"].as_str().unwrap().contains("took longer than 2 s (limits.compile_timeout_s)"), "{slow}");
    assert!(children(server.pid()).is_empty(), "processes left: {:?}", children(server.pid()));
    assert!(cache_entries(&wasm).is_empty());
    let (status, tools) = server.get("/tools").await;
    assert_eq!(status, 200, "{tools}");
}

#[test]
fn a_compile_limit_of_zero_is_refused_at_start() {
    for key in ["compile_timeout_s", "compile_memory_mb", "max_concurrent_compiles", "compile_cache_mb"] {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path(), &format!("[limits]\n{key} = 0\n"));
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_hangar"))
            .args(["serve", "--port", "0", "--config", &config, "--db"])
            .arg(dir.path().join("hangar.db"))
            .arg("--cache-dir")
            .arg(dir.path().join("cache"))
            .output()
            .unwrap();
        assert!(!out.status.success(), "{key} = 0 must be refused");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(&format!("[limits] {key} must be at least 1")), "{key}: {stderr}");
    }
}

#[tokio::test]
async fn compiles_run_at_most_max_concurrent_compiles_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path(), "[limits]\ncompile_timeout_s = 2\nmax_concurrent_compiles = 1\n");
    let server = std::sync::Arc::new(Server::start(&["--config", &config]));
    // Two uploads at once (the most the server receives together); each
    // compile runs into its timeout, the second after the first.
    let uploads: Vec<_> = ["slowone", "slowtwo"]
        .into_iter()
        .enumerate()
        .map(|(i, name)| {
            let server = server.clone();
            let manifest = SLOWBUILD.replace("slowbuild", name);
            let wasm = slow_to_compile(100_000 + i, 1000);
            tokio::spawn(async move { upload(&server, &manifest, wasm).await })
        })
        .collect();
    wait_for_worker(server.pid(), std::time::Duration::from_secs(120)).await;
    let mut most = 0;
    let mut seen = std::collections::BTreeSet::new();
    while uploads.iter().any(|u| !u.is_finished()) {
        let now = children(server.pid());
        most = most.max(now.len());
        seen.extend(now);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    for upload in uploads {
        let (status, body) = upload.await.unwrap();
        assert_eq!(status, 422, "{body}");
        assert!(body["error"].as_str().unwrap().contains("took longer than 2 s (limits.compile_timeout_s)"), "{body}");
    }
    assert_eq!(most, 1, "one compile at a time");
    assert_eq!(seen.len(), 2, "each upload had its own worker, one after the other: {seen:?}");
}
