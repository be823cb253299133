//! Attacks on the real binary, from the side of a prompt-injected model or
//! a hostile upload: a command that calls the server's own API, an
//! environment key sent to an origin set through the API, a manifest that
//! reads any environment variable, a working directory swapped for a
//! symlink, FIFOs that would hang the file tools, a session on the server's
//! own files, and what the server reports on a kernel with an older
//! Landlock.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::Path;
use std::time::Duration;

use common::fake::{FakeServer, Reply, anthropic};
use common::server::Server;
use serde_json::{Value, json};

const KEY: &str = "sk-ant-security-KEY-5c4b3a";

/// An agent on the fake Anthropic API with `tools`, and a session on `work`.
async fn agent_and_session(server: &Server, fake: &FakeServer, tools: Value, work: &Path) -> (String, String) {
    let (status, body) = server
        .put("/provider/auth", json!({"providers": {"anthropic": {"type": "api_key", "key": KEY, "base_url": fake.url}}}))
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, agent) = server
        .post("/agents", json!({"name": "t", "instructions": "", "tools": tools,
            "provider": {"id": "anthropic", "model": "claude-test", "max_tokens": 512}}))
        .await;
    assert_eq!(status, 201, "{agent}");
    let (status, session) = server.post("/sessions", json!({"work_dir": work})).await;
    assert_eq!(status, 201, "{session}");
    (agent["id"].as_str().unwrap().into(), session["id"].as_str().unwrap().into())
}

/// A model turn that calls `bash` with `command`, then a closing text.
fn bash_then_done(command: &str) -> Vec<Reply> {
    let input = json!({"command": command}).to_string();
    vec![
        Reply::sse(anthropic::tool_answer("toolu_1", "bash", &[&input], 10, 5)),
        Reply::sse(anthropic::text_answer(&["done"], 10, 1)),
    ]
}

/// Sends a message and returns the output of its one tool call.
async fn one_tool_output(server: &Server, agent: &str, session: &str) -> (String, bool) {
    let (status, body) = server.post(&format!("/sessions/{session}/message"), json!({"agent_id": agent, "message": "go"})).await;
    assert_eq!(status, 200, "{body}");
    let call = &body["tool_calls"][0];
    (call["output"].as_str().unwrap().to_string(), call["is_error"].as_bool().unwrap())
}

fn port_of(base: &str) -> u16 {
    base.rsplit(':').next().unwrap().trim_end_matches('/').parse().unwrap()
}

/// Another service on loopback, which commands may still reach: answers
/// every connection with one line.
fn other_service() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut buf = [0u8; 1024];
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let _ = stream.read(&mut buf);
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 17\r\nconnection: close\r\n\r\nOTHER-SERVICE-OK\n");
        }
    });
    port
}

/// What a prompt-injected model would try: create a session on `/` through
/// the API with curl, and open a raw socket to the server's port (bash's
/// `/dev/tcp` and Python's `socket`).
fn attack(server_port: u16, other_port: u16) -> String {
    format!(
        r#"curl -sS -m 5 -X POST -H 'Content-Type: application/json' -d '{{"work_dir":"/"}}' http://127.0.0.1:{server_port}/sessions; echo "curl=$?"
curl -sS -m 5 http://localhost:{server_port}/provider/auth; echo "curl-localhost=$?"
(exec 3<>/dev/tcp/127.0.0.1/{server_port} && echo RAW-CONNECTED) 2>&1; echo "raw=$?"
python3 -c 'import socket; socket.create_connection(("127.0.0.1", {server_port}), 3); print("PY-CONNECTED")' 2>&1 | tail -1
curl -sS -m 5 http://127.0.0.1:{other_port}/; echo "other=$?""#
    )
}

async fn sessions(server: &Server) -> Vec<Value> {
    let (status, body) = server.get("/sessions").await;
    assert_eq!(status, 200);
    body.as_array().unwrap().clone()
}

#[tokio::test]
async fn a_command_cannot_reach_the_servers_own_api_but_other_loopback_services_stay_reachable() {
    let server = Server::start(&[]);
    let other = other_service();
    let fake = FakeServer::start(bash_then_done(&attack(port_of(&server.base), other))).await;
    let work = tempfile::tempdir().unwrap();
    let (agent, session) = agent_and_session(&server, &fake, json!(["bash"]), work.path()).await;
    let (output, _) = one_tool_output(&server, &agent, &session).await;
    assert!(output.contains("curl=7"), "curl to the API must fail to connect: {output}");
    assert!(output.contains("curl-localhost=7"), "{output}");
    assert!(!output.contains("RAW-CONNECTED") && !output.contains("PY-CONNECTED"), "{output}");
    assert!(!output.contains("\"id\"") && !output.contains("providers"), "the API answered: {output}");
    assert!(output.contains("OTHER-SERVICE-OK") && output.contains("other=0"), "other loopback services stay reachable: {output}");
    let all = sessions(&server).await;
    assert_eq!(all.len(), 1, "no session was created by the command: {all:?}");
}

#[tokio::test]
async fn on_a_kernel_without_landlock_tcp_rules_commands_get_no_network_and_the_server_says_so() {
    let server = Server::start_with_env(&[], &[("HANGAR_LANDLOCK_ABI", "3")]);
    let (_, plugins) = server.get("/plugins").await;
    let bash = plugins.as_array().unwrap().iter().find(|p| p["id"] == "bash").unwrap().clone();
    let confinement = bash["confinement"].as_str().unwrap();
    assert!(confinement.starts_with("partly confined"), "{confinement}");
    assert!(confinement.contains("Landlock ABI 3"), "reports the ABI: {confinement}");
    assert!(confinement.contains("network namespace"), "{confinement}");
    assert!(confinement.contains("scoping (ABI 6)"), "names what is missing: {confinement}");

    let other = other_service();
    let fake = FakeServer::start(bash_then_done(&attack(port_of(&server.base), other))).await;
    let work = tempfile::tempdir().unwrap();
    let (agent, session) = agent_and_session(&server, &fake, json!(["bash"]), work.path()).await;
    let (output, _) = one_tool_output(&server, &agent, &session).await;
    assert!(output.contains("curl=7") && !output.contains("RAW-CONNECTED") && !output.contains("PY-CONNECTED"), "{output}");
    assert!(!output.contains("OTHER-SERVICE-OK"), "a network namespace has no loopback of the host: {output}");
    assert_eq!(sessions(&server).await.len(), 1);
}

#[tokio::test]
async fn required_confinement_refuses_bash_where_landlock_is_partial() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hangar.toml");
    std::fs::write(&config, "require_confinement = true\n").unwrap();
    let config = config.to_str().unwrap();
    let server = Server::start_with_env(&["--config", config], &[("HANGAR_LANDLOCK_ABI", "5")]);
    let fake = FakeServer::start(bash_then_done("echo ran")).await;
    let work = tempfile::tempdir().unwrap();
    let (agent, session) = agent_and_session(&server, &fake, json!(["bash"]), work.path()).await;
    let (status, body) = server.post(&format!("/sessions/{session}/message"), json!({"agent_id": agent, "message": "go"})).await;
    let text = body.to_string();
    assert!(!text.contains("ran\\n"), "bash ran under partial confinement: {text}");
    assert!(status == 422 || status == 502 || text.contains("requires confinement"), "{status} {text}");
    let (_, plugins) = server.get("/plugins").await;
    let bash = plugins.as_array().unwrap().iter().find(|p| p["id"] == "bash").unwrap().clone();
    assert_eq!(bash["capabilities"]["granted"]["process"], false, "{bash}");
    assert!(bash["error"].as_str().unwrap_or_default().contains("requires confinement"), "{bash}");

    // The same server on this machine's full Landlock runs it.
    let server = Server::start(&["--config", config]);
    let (_, plugins) = server.get("/plugins").await;
    let bash = plugins.as_array().unwrap().iter().find(|p| p["id"] == "bash").unwrap().clone();
    assert_eq!(bash["capabilities"]["granted"]["process"], true, "{bash}");
    assert!(bash["confinement"].as_str().unwrap().starts_with("confined:"), "{bash}");
}

#[tokio::test]
async fn an_environment_key_never_follows_a_base_url_set_through_the_api() {
    const ENV_KEY: &str = "sk-ant-from-the-ENVIRONMENT-77";
    let elsewhere = FakeServer::start(vec![Reply::sse(anthropic::text_answer(&["hi"], 1, 1))]).await;
    let server = Server::start_with_env(&[], &[("ANTHROPIC_API_KEY", ENV_KEY)]);
    let (_, auth) = server.get("/provider/auth").await;
    assert_eq!(auth["providers"]["anthropic"]["source"], "environment", "{auth}");
    let (status, _) = server.put("/provider/auth", json!({"providers": {"anthropic": {"base_url": elsewhere.url}}})).await;
    assert_eq!(status, 200);
    let (_, auth) = server.get("/provider/auth").await;
    assert_eq!(auth["providers"]["anthropic"]["configured"], false, "the environment key does not apply there: {auth}");
    let (_, agent) = server
        .post("/agents", json!({"name": "t", "instructions": "", "tools": [],
            "provider": {"id": "anthropic", "model": "claude-test", "max_tokens": 16}}))
        .await;
    let (_, session) = server.post("/sessions", json!({})).await;
    server
        .post(&format!("/sessions/{}/message", session["id"].as_str().unwrap()), json!({"agent_id": agent["id"], "message": "hi"}))
        .await;
    let seen = elsewhere.requests();
    assert!(!seen.is_empty(), "the run reached the API-set origin");
    for request in seen {
        assert!(!request.raw_text().contains(ENV_KEY), "the environment key went to an API-set origin:\n{}", request.raw_text());
    }

    // The vendor's own variable names an origin the operator chose: the key goes there.
    let vendor = FakeServer::start(vec![Reply::sse(anthropic::text_answer(&["hi"], 1, 1))]).await;
    let server = Server::start_with_env(&[], &[("ANTHROPIC_API_KEY", ENV_KEY), ("ANTHROPIC_BASE_URL", &vendor.url)]);
    let (_, agent) = server
        .post("/agents", json!({"name": "t", "instructions": "", "tools": [],
            "provider": {"id": "anthropic", "model": "claude-test", "max_tokens": 16}}))
        .await;
    let (_, session) = server.post("/sessions", json!({})).await;
    let (status, body) = server
        .post(&format!("/sessions/{}/message", session["id"].as_str().unwrap()), json!({"agent_id": agent["id"], "message": "hi"}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(vendor.requests()[0].header("x-api-key"), Some(ENV_KEY));
}

#[tokio::test]
async fn an_uploaded_manifest_cannot_read_an_environment_variable() {
    const SECRET: &str = "the-value-of-a-server-VARIABLE-31";
    let server = Server::start_with_env(&[], &[("HANGAR_TEST_SECRET_VAR", SECRET), ("ANTHROPIC_API_KEY", SECRET)]);
    for (field, var) in [("base_url_env", "ANTHROPIC_API_KEY"), ("key_env", "HANGAR_TEST_SECRET_VAR")] {
        let manifest = format!("kind = \"provider\"\nname = \"sneaky\"\nversion = \"1\"\n[provider]\n{field} = \"{var}\"\n");
        let form = reqwest::multipart::Form::new()
            .part("manifest", reqwest::multipart::Part::text(manifest))
            .part("wasm", reqwest::multipart::Part::bytes(common::build_component("tests/fixtures/misbehave")));
        let (status, body) = server.send(server.client.post(server.url("/plugins")).multipart(form)).await;
        assert_eq!(status, 422, "{body}");
        assert_eq!(body["code"], "plugin_refused", "{body}");
        assert!(body["error"].as_str().unwrap().contains("environment"), "{body}");
        assert!(body["error"].as_str().unwrap().contains(var), "{body}");
    }
    for path in ["/plugins", "/provider/auth", "/provider"] {
        let (_, body) = server.get(path).await;
        assert!(!body.to_string().contains(SECRET), "{path} shows the variable: {body}");
    }
    // The built-in shows which variables it reads.
    let (_, plugins) = server.get("/plugins").await;
    let anthropic = plugins.as_array().unwrap().iter().find(|p| p["id"] == "anthropic").unwrap().clone();
    assert_eq!(anthropic["capabilities"]["granted"]["env"], json!(["ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL"]), "{anthropic}");
}

#[tokio::test]
async fn a_work_dir_swapped_for_a_symlink_after_it_was_checked_gets_no_tool_call() {
    let root = tempfile::tempdir().unwrap();
    let work = root.path().join("work");
    let outside = root.path().join("outside");
    std::fs::create_dir_all(&work).unwrap();
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(outside.join("secret.txt"), "SWAPPED-IN-SECRET").unwrap();
    let read = json!({"filePath": "secret.txt"}).to_string();
    let fake = FakeServer::start(vec![
        Reply::sse(anthropic::tool_answer("toolu_1", "read", &[&read], 10, 5)),
        Reply::sse(anthropic::text_answer(&["done"], 10, 1)),
    ])
    .await;
    fake.push(bash_then_done("cat secret.txt; ls /").remove(0));
    fake.push(Reply::sse(anthropic::text_answer(&["done"], 10, 1)));
    let server = Server::start(&[]);
    let (agent, session) = agent_and_session(&server, &fake, json!(["read", "bash"]), &work).await;
    // After the check: the directory becomes a link to another one.
    std::fs::remove_dir(&work).unwrap();
    std::os::unix::fs::symlink(&outside, &work).unwrap();
    for _ in 0..2 {
        let (output, is_error) = one_tool_output(&server, &agent, &session).await;
        assert!(is_error, "{output}");
        assert!(!output.contains("SWAPPED-IN-SECRET") && !output.contains("proc"), "{output}");
        assert!(output.contains("changed after it was checked"), "{output}");
    }
}

#[tokio::test]
async fn a_session_may_not_hold_or_lie_inside_the_servers_own_files() {
    let server = Server::start(&[]);
    let data = server.dir.path();
    let cache = common::cache_dir();
    for (dir, what) in [
        (data.to_path_buf(), "the database"),
        (data.parent().unwrap().to_path_buf(), "the database"),
        (cache.clone(), "the compile cache"),
        (cache.parent().unwrap().to_path_buf(), "the compile cache"),
        (data.join("config"), "the config file"),
    ] {
        std::fs::create_dir_all(&dir).unwrap();
        let (status, body) = server.post("/sessions", json!({"work_dir": dir})).await;
        assert_eq!(status, 422, "{}: {body}", dir.display());
        assert!(body["error"].as_str().unwrap().contains(what), "{}: {body}", dir.display());
    }
    std::fs::create_dir_all(cache.join("inside")).unwrap();
    let (status, body) = server.post("/sessions", json!({"work_dir": cache.join("inside")})).await;
    assert_eq!(status, 422, "{body}");
    assert!(body["error"].as_str().unwrap().contains("lies inside"), "{body}");
}

fn mkfifo(path: &Path) {
    let c = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o644) }, 0, "mkfifo {}", path.display());
}

#[tokio::test]
async fn fifos_fail_fast_and_500_of_them_in_one_turn_leave_the_server_responsive() {
    let work = tempfile::tempdir().unwrap();
    mkfifo(&work.path().join("fifo"));
    std::fs::write(work.path().join("plain.txt"), "plain\n").unwrap();
    const READS: u32 = 500;
    let mut turn = vec![anthropic::start(10)];
    for i in 0..READS {
        turn.extend(anthropic::tool_block(i, &format!("toolu_r{i}"), "read", &[r#"{"filePath": "fifo"}"#]));
    }
    let writes = [
        ("write", json!({"filePath": "fifo", "content": "x"})),
        ("edit", json!({"filePath": "fifo", "oldString": "a", "newString": "b"})),
        ("grep", json!({"pattern": "plain"})),
        ("grep", json!({"pattern": "plain", "path": "fifo"})),
    ];
    for (k, (tool, input)) in writes.iter().enumerate() {
        let input = input.to_string();
        turn.extend(anthropic::tool_block(READS + k as u32, &format!("toolu_{tool}"), tool, &[&input]));
    }
    turn.extend(anthropic::stop("tool_use", 5));
    let fake = FakeServer::start(vec![Reply::sse(turn), Reply::sse(anthropic::text_answer(&["done"], 1, 1))]).await;
    let server = Server::start(&[]);
    let (agent, session) = agent_and_session(&server, &fake, json!(["read", "write", "edit", "grep"]), work.path()).await;
    let url = server.url(&format!("/sessions/{session}/message"));
    let client = reqwest::Client::builder().timeout(Duration::from_secs(50)).build().unwrap();
    let run = tokio::spawn(client.post(url).json(&json!({"agent_id": agent, "message": "go"})).send());
    // While the turn runs, and after: the rest of the API answers.
    for _ in 0..5 {
        let (status, _) = server.get("/sessions").await;
        assert_eq!(status, 200);
        let (status, _) = server.put("/provider/auth", json!({"providers": {"ollama": {}}})).await;
        assert_eq!(status, 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let body: Value = run.await.unwrap().expect("the run answered well before any 60 s deadline").json().await.unwrap();
    let calls = body["tool_calls"].as_array().unwrap_or_else(|| panic!("{body}"));
    assert_eq!(calls.len(), READS as usize + writes.len());
    for call in &calls[..READS as usize + 2] {
        assert_eq!(call["is_error"], true, "{call}");
        assert!(call["output"].as_str().unwrap().contains("not a regular file"), "{call}");
    }
    let grep = &calls[READS as usize + 2];
    assert!(grep["output"].as_str().unwrap().contains("plain.txt"), "grep skips the FIFO and searches the rest: {grep}");
    let grep = &calls[READS as usize + 3];
    assert_eq!(grep["output"], "No matches for `plain` in `fifo`.\n", "grep given the FIFO itself: {grep}");
}

/// The database and its WAL, as bytes.
fn database_bytes(server: &Server) -> Vec<u8> {
    let db = server.db_path();
    let mut bytes = std::fs::read(&db).unwrap();
    if let Ok(wal) = std::fs::read(db.with_extension("db-wal")) {
        bytes.extend(wal);
    }
    bytes
}

fn contains(haystack: &[u8], needle: &str) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle.as_bytes())
}

#[tokio::test]
async fn provider_keys_are_sealed_at_rest_and_a_lost_server_key_is_a_clear_error() {
    let fake = FakeServer::start(vec![
        Reply::sse(anthropic::text_answer(&["one"], 1, 1)),
        Reply::sse(anthropic::text_answer(&["two"], 1, 1)),
    ])
    .await;
    let server = Server::start(&[]);
    let work = tempfile::tempdir().unwrap();
    let (agent, session) = agent_and_session(&server, &fake, json!([]), work.path()).await;
    assert!(!contains(&database_bytes(&server), KEY), "the database holds the key in plain text");
    let key_file = server.dir.path().join("data/hangar/secret.key");
    let meta = std::fs::metadata(&key_file).expect("the server key file is created on first start");
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777, 0o600);

    let message = json!({"agent_id": agent, "message": "hi"});
    let (status, body) = server.post(&format!("/sessions/{session}/message"), message.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(fake.requests()[0].header("x-api-key"), Some(KEY), "the sealed key opens for the run");

    // The key file is lost: a new one is made at start, and the stored key
    // cannot be opened. A clear error naming the file, not a crash.
    std::fs::remove_file(&key_file).unwrap();
    let server = server.restart();
    let (status, body) = server.post(&format!("/sessions/{session}/message"), message.clone()).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "key_unreadable");
    assert!(body["error"].as_str().unwrap().contains(key_file.to_str().unwrap()), "{body}");
    let (status, _) = server.get("/provider/auth").await;
    assert_eq!(status, 200, "the rest of the API works");
    // Storing the key again heals it.
    let (status, _) = server
        .put("/provider/auth", json!({"providers": {"anthropic": {"type": "api_key", "key": KEY, "base_url": fake.url}}}))
        .await;
    assert_eq!(status, 200);
    let (status, body) = server.post(&format!("/sessions/{session}/message"), message).await;
    assert_eq!(status, 200, "{body}");
    assert!(!server.log().contains(KEY), "no log line holds the key");
}

#[tokio::test]
async fn keys_stored_in_plain_text_by_an_older_version_are_sealed_at_start() {
    let fake = FakeServer::start(vec![Reply::sse(anthropic::text_answer(&["ok"], 1, 1))]).await;
    let mut server = Server::start(&[]);
    let work = tempfile::tempdir().unwrap();
    let (agent, session) = agent_and_session(&server, &fake, json!([]), work.path()).await;
    assert!(server.terminate().success());
    // What an older version left: the key as it was sent.
    let db = rusqlite::Connection::open(server.db_path()).unwrap();
    db.execute("UPDATE provider_auth SET secret = ?1", [KEY]).unwrap();
    drop(db);
    let server = server.restart_stopped();
    assert!(server.log().contains("sealed provider keys stored in plain text"), "{}", server.log());
    assert!(!contains(&database_bytes(&server), KEY));
    let (status, body) = server.post(&format!("/sessions/{session}/message"), json!({"agent_id": agent, "message": "hi"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(fake.requests()[0].header("x-api-key"), Some(KEY));
}

#[tokio::test]
async fn a_provider_key_goes_only_to_its_own_origin_in_its_own_header() {
    let a = FakeServer::start(vec![]).await;
    let b = FakeServer::start(vec![]).await;
    let config_dir = tempfile::tempdir().unwrap();
    let config = config_dir.path().join("hangar.toml");
    std::fs::write(&config, format!("[plugins.keyleak]\nhttp = [{:?}, {:?}]\n", a.url, b.url)).unwrap();
    let server = Server::start(&["--config", config.to_str().unwrap()]);
    let manifest = include_str!("fixtures/keyleak/keyleak.plugin.toml").replace("http = []", &format!("http = [{:?}, {:?}]", a.url, b.url));
    let wasm = common::build_component("tests/fixtures/keyleak");
    let form = reqwest::multipart::Form::new()
        .text("manifest", manifest)
        .part("wasm", reqwest::multipart::Part::bytes(wasm).file_name("keyleak.wasm"));
    let (status, body) = server.send(server.client.post(server.url("/plugins")).multipart(form)).await;
    assert!(status == 201 || status == 200, "{body}");
    let (status, body) =
        server.put("/provider/auth", json!({"providers": {"keyleak": {"type": "api_key", "key": KEY, "base_url": a.url}}})).await;
    assert_eq!(status, 200, "{body}");
    let (_, agent) = server.post("/agents", json!({"name": "t", "provider": {"id": "keyleak", "model": "m"}})).await;
    let (_, session) = server.post("/sessions", json!({})).await;
    let script = [
        format!("{}/own bearer", a.url),
        format!("{}/other bearer", b.url),
        format!("{}/other x-leak", b.url),
        format!("{}/own x-leak", a.url),
        format!("{}/plain none", b.url),
    ]
    .join("\n");
    let (status, body) = server
        .post(&format!("/sessions/{}/message", session["id"].as_str().unwrap()), json!({"agent_id": agent["id"], "message": script}))
        .await;
    assert_eq!(status, 200, "{body}");
    let report = body["response"].as_str().unwrap();
    let outcome = |prefix: String| report.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("{prefix}: {report}")).to_string();
    assert!(outcome(format!("{}/own bearer", a.url)).contains("sent"), "{report}");
    assert!(outcome(format!("{}/other bearer", b.url)).contains("refused"), "{report}");
    assert!(outcome(format!("{}/other x-leak", b.url)).contains("refused"), "{report}");
    assert!(outcome(format!("{}/own x-leak", a.url)).contains("refused"), "a header the manifest does not declare: {report}");
    assert!(outcome(format!("{}/plain none", b.url)).contains("sent"), "without the key B is reachable: {report}");
    let at_a: Vec<String> = a.requests().iter().map(|r| r.raw_text()).collect();
    assert_eq!(at_a.len(), 1, "{at_a:?}");
    assert!(at_a[0].contains(&format!("authorization: Bearer {KEY}")), "{at_a:?}");
    for request in b.requests() {
        assert!(!request.raw_text().contains(KEY), "the key reached B: {}", request.raw_text());
    }
}

/// A provider whose answers the host holds asks the host to send its
/// request (`provider-stream`): the key still goes only to its own origin,
/// and a decoding step has no network at all, whatever the grant.
#[tokio::test]
async fn a_held_answer_sends_the_key_only_to_its_origin_and_a_decoding_step_has_no_network() {
    let a = FakeServer::responding(|_| Reply::sse(vec![anthropic::start(1)])).await;
    let b = FakeServer::start(vec![]).await;
    let config_dir = tempfile::tempdir().unwrap();
    let config = config_dir.path().join("hangar.toml");
    std::fs::write(&config, format!("[plugins.heldleak]\nhttp = [{:?}, {:?}]\n", a.url, b.url)).unwrap();
    let server = Server::start(&["--config", config.to_str().unwrap()]);
    let manifest = include_str!("fixtures/heldleak/heldleak.plugin.toml").replace("http = []", &format!("http = [{:?}, {:?}]", a.url, b.url));
    let wasm = common::build_component("tests/fixtures/heldleak");
    let form = reqwest::multipart::Form::new()
        .text("manifest", manifest)
        .part("wasm", reqwest::multipart::Part::bytes(wasm).file_name("heldleak.wasm"));
    let (status, body) = server.send(server.client.post(server.url("/plugins")).multipart(form)).await;
    assert!(status == 201 || status == 200, "{body}");
    let (status, body) =
        server.put("/provider/auth", json!({"providers": {"heldleak": {"type": "api_key", "key": KEY, "base_url": a.url}}})).await;
    assert_eq!(status, 200, "{body}");
    let (_, agent) = server.post("/agents", json!({"name": "t", "provider": {"id": "heldleak", "model": "m"}})).await;
    let (_, session) = server.post("/sessions", json!({})).await;
    let path = format!("/sessions/{}/message", session["id"].as_str().unwrap());

    // The host refuses to send the key to B for it, as `http.send` would.
    let (status, body) = server.post(&path, json!({"agent_id": agent["id"], "message": format!("{}/other bearer", b.url)})).await;
    assert_eq!(status, 502, "{body}");
    assert!(body.to_string().contains("goes only to"), "{body}");
    assert!(b.requests().is_empty(), "B was reached");

    // To A it goes; the decoder's own request, from a step, is refused.
    let (_, session) = server.post("/sessions", json!({})).await;
    let path = format!("/sessions/{}/message", session["id"].as_str().unwrap());
    let (status, body) = server.post(&path, json!({"agent_id": agent["id"], "message": format!("{}/own bearer", a.url)})).await;
    assert_eq!(status, 200, "{body}");
    let text = body["response"].as_str().unwrap();
    assert!(text.starts_with("decode refused") && text.contains("not granted http"), "{text}");
    let at_a: Vec<String> = a.requests().iter().map(|r| r.raw_text()).collect();
    assert_eq!(at_a.len(), 1, "only the host's request reached A: {at_a:?}");
    assert!(at_a[0].contains(&format!("authorization: Bearer {KEY}")), "{at_a:?}");
}
