//! Hangar as an MCP server (`/sessions/{id}/mcp`): the official MCP Python
//! SDK (`mcp` on PyPI, `tests/mcp_client.py`) lists and calls the session's
//! tools over Streamable HTTP against the real `hangar` binary. A call meets
//! the sandbox and the permission rules as an agent's call does, and is
//! recorded as the session's events; the route is guarded like every other.

mod common;

use std::path::Path;

use common::server::Server;
use common::sse::Events;
use serde_json::{Value, json};

const TOKEN: &str = "mcp-test-token";
const ADMIN: &str = "mcp-admin-token";

/// Deny every `bash` command; ask before every `write`.
const RULES: &str = r#"
[[permissions.rules]]
tool = "bash"
pattern = "*"
action = "deny"

[[permissions.rules]]
tool = "write"
pattern = "*"
action = "ask"
"#;

/// The SDK is there, or the test is skipped (failed under CI).
fn have_sdk() -> bool {
    common::have_python_module("mcp", "pip install mcp")
}

/// Runs `tests/mcp_client.py` with `plan`; what the client saw.
async fn client(plan: Value) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/mcp_client.py");
    let output = tokio::process::Command::new("python3").arg(script).arg(plan.to_string()).output().await.expect("python3 runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "the MCP client failed:\n{stderr}\n{stdout}");
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}\n{stderr}"))
}

fn authed(token: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    headers.insert(reqwest::header::AUTHORIZATION, format!("Bearer {token}").parse().unwrap());
    reqwest::Client::builder().default_headers(headers).build().unwrap()
}

/// An `initialize` request as any MCP client sends it first.
fn initialize(client: &reqwest::Client, url: String) -> reqwest::RequestBuilder {
    client
        .post(url)
        .header("Accept", "application/json, text/event-stream")
        .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}}))
}

fn names(listed: &Value) -> Vec<&str> {
    listed["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect()
}

#[tokio::test]
async fn an_mcp_client_lists_and_calls_the_sessions_tools_under_its_rules() {
    if !have_sdk() {
        return;
    }
    let config = tempfile::tempdir().unwrap();
    let config_file = config.path().join("hangar.toml");
    std::fs::write(&config_file, RULES).unwrap();
    let mut server = Server::start(&["--token", TOKEN, "--config", config_file.to_str().unwrap()]);
    server.client = authed(TOKEN);
    let root = tempfile::tempdir().unwrap();
    let work = root.path().join("work");
    std::fs::create_dir(&work).unwrap();
    std::fs::write(work.join("hello.txt"), "hello from the work dir\n").unwrap();
    std::fs::write(root.path().join("outside.txt"), "OUTSIDE-SECRET").unwrap();
    let (status, session) = server.post("/sessions", json!({"work_dir": work})).await;
    assert_eq!(status, 201, "{session}");
    let session = session["id"].as_str().unwrap().to_string();
    let url = server.url(&format!("/sessions/{session}/mcp"));

    let seen = client(json!({"url": url, "token": TOKEN, "calls": [
        {"name": "read", "arguments": {"filePath": "hello.txt"}},
        {"name": "read", "arguments": {"filePath": "../outside.txt"}},
        {"name": "bash", "arguments": {"command": "cat ../outside.txt"}},
        {"name": "write", "arguments": {"filePath": "new.txt", "content": "x"}},
        {"name": "nope", "arguments": {}},
    ]}))
    .await;
    // Every built-in tool, each with its JSON Schema.
    let listed = names(&seen);
    for tool in ["bash", "edit", "glob", "grep", "read", "write"] {
        assert!(listed.contains(&tool), "{tool} missing: {seen}");
    }
    for tool in seen["tools"].as_array().unwrap() {
        assert_eq!(tool["inputSchema"]["type"], "object", "{tool}");
        assert!(tool["description"].as_str().is_some_and(|d| !d.is_empty()), "{tool}");
    }
    let read = seen["tools"].as_array().unwrap().iter().find(|t| t["name"] == "read").unwrap();
    assert!(read["inputSchema"]["properties"]["filePath"].is_object(), "{read}");

    let calls = seen["calls"].as_array().unwrap();
    assert_eq!(calls[0]["isError"], false, "{}", calls[0]);
    assert!(calls[0]["text"].as_str().unwrap().contains("hello from the work dir"), "{}", calls[0]);
    // The sandbox refuses a path out of the working directory.
    assert_eq!(calls[1]["isError"], true, "{}", calls[1]);
    assert!(calls[1]["text"].as_str().unwrap().contains("outside the working directory"), "{}", calls[1]);
    assert!(!calls[1]["text"].as_str().unwrap().contains("OUTSIDE-SECRET"), "{}", calls[1]);
    // A `deny` rule: an error result naming the rule.
    assert_eq!(calls[2]["isError"], true, "{}", calls[2]);
    let denied = calls[2]["text"].as_str().unwrap();
    assert!(denied.contains("denied by") && denied.contains("`bash`"), "{denied}");
    // An `ask` rule with a client that cannot be asked: refused as needing approval.
    assert_eq!(calls[3]["isError"], true, "{}", calls[3]);
    assert!(calls[3]["text"].as_str().unwrap().contains("needs approval"), "{}", calls[3]);
    assert!(!work.join("new.txt").exists());
    assert_eq!(calls[4]["isError"], true, "{}", calls[4]);
    assert!(calls[4]["text"].as_str().unwrap().contains("unknown tool `nope`"), "{}", calls[4]);

    // `?tools=` narrows the list, and a tool left out cannot be called.
    let narrowed = client(json!({"url": format!("{url}?tools=read,grep"), "token": TOKEN,
        "calls": [{"name": "glob", "arguments": {"pattern": "*"}}]}))
    .await;
    assert_eq!(names(&narrowed), ["grep", "read"], "{narrowed}");
    assert_eq!(narrowed["calls"][0]["isError"], true, "{narrowed}");

    // A client that supports elicitation is asked; its yes runs the call.
    let asked = client(json!({"url": url, "token": TOKEN, "elicitation": "accept",
        "calls": [{"name": "write", "arguments": {"filePath": "new.txt", "content": "approved"}}]}))
    .await;
    assert_eq!(asked["calls"][0]["isError"], false, "{asked}");
    assert!(asked["asked"][0].as_str().unwrap().contains("write"), "{asked}");
    assert_eq!(std::fs::read_to_string(work.join("new.txt")).unwrap(), "approved");
    let declined = client(json!({"url": url, "token": TOKEN, "elicitation": "decline",
        "calls": [{"name": "write", "arguments": {"filePath": "new.txt", "content": "declined"}}]}))
    .await;
    assert_eq!(declined["calls"][0]["isError"], true, "{declined}");
    assert_eq!(std::fs::read_to_string(work.join("new.txt")).unwrap(), "approved");

    // Each call is recorded as the session's events, replayable.
    let resp = server.client.get(server.url(&format!("/sessions/{session}/events"))).send().await.unwrap();
    let events = Events::new(resp).take(4).await;
    assert_eq!(events[0].name, "tool_use", "{events:?}");
    assert_eq!(events[0].json()["name"], "read");
    assert_eq!(events[0].json()["input"]["filePath"], "hello.txt");
    assert_eq!(events[1].name, "tool_result", "{events:?}");
    assert_eq!(events[1].json()["tool_use_id"], events[0].json()["id"]);
    assert_eq!(events[1].json()["is_error"], false);
    assert_eq!(events[3].json()["is_error"], true, "{events:?}");
}

#[tokio::test]
async fn the_route_is_guarded_like_every_other() {
    let server = Server::start(&["--token", TOKEN]);
    let work = tempfile::tempdir().unwrap();
    let (status, session) = server.send(authed(TOKEN).post(server.url("/sessions")).json(&json!({"work_dir": work.path()}))).await;
    assert_eq!(status, 201, "{session}");
    let url = server.url(&format!("/sessions/{}/mcp", session["id"].as_str().unwrap()));

    let (status, body) = server.send(initialize(&authed("wrong"), url.clone())).await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = server.send(initialize(&reqwest::Client::new(), url.clone())).await;
    assert_eq!(status, 401, "{body}");
    let (status, body) = server.send(initialize(&authed(TOKEN), server.url("/sessions/01NOSUCHSESSION0000000000/mcp"))).await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = server.send(initialize(&authed(TOKEN), url.clone()).header("Origin", "https://evil.example")).await;
    assert_eq!(status, 403, "{body}");
    // The right token gets an MCP answer.
    let resp = initialize(&authed(TOKEN), url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().contains_key("mcp-session-id"));
    // Not a REST route: absent from the OpenAPI document.
    let (_, doc) = server.send(authed(TOKEN).get(server.url("/openapi.json"))).await;
    assert!(doc["paths"].as_object().unwrap().keys().all(|p| !p.ends_with("/mcp")));
}

#[tokio::test]
async fn a_tenant_key_reaches_only_its_own_sessions() {
    if !have_sdk() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&["--admin-token", ADMIN, "--work-root", root.path().to_str().unwrap()]);
    let admin = authed(ADMIN);
    let mut tenants = Vec::new();
    for name in ["a", "b"] {
        let (status, body) = server.send(admin.post(server.url("/tenants")).json(&json!({"name": name}))).await;
        assert_eq!(status, 201, "{body}");
        let key = body["key"].as_str().unwrap().to_string();
        let (status, session) = server.send(authed(&key).post(server.url("/sessions")).json(&json!({}))).await;
        assert_eq!(status, 201, "{session}");
        let work_dir = session["work_dir"].as_str().unwrap().to_string();
        tenants.push((key, session["id"].as_str().unwrap().to_string(), work_dir));
    }
    let (a_key, a_session, a_dir) = &tenants[0];
    let (b_key, _, _) = &tenants[1];
    std::fs::write(Path::new(a_dir).join("mine.txt"), "A-CONTENT").unwrap();

    // B's key on A's session: 404, as a missing session.
    let (status, body) = server.send(initialize(&authed(b_key), server.url(&format!("/sessions/{a_session}/mcp")))).await;
    assert_eq!(status, 404, "{body}");
    assert!(!body.to_string().contains("A-CONTENT"));
    // A's key on its own session works, in its own directory.
    let seen = client(json!({"url": server.url(&format!("/sessions/{a_session}/mcp")), "token": a_key,
        "calls": [{"name": "read", "arguments": {"filePath": "mine.txt"}}]}))
    .await;
    assert_eq!(seen["calls"][0]["isError"], false, "{seen}");
    assert!(seen["calls"][0]["text"].as_str().unwrap().contains("A-CONTENT"), "{seen}");
}

// MCP servers as tools (part 2): the official SDK as a Streamable HTTP
// server and as a stdio server, registered over the API and called by an
// agent run through the scripted fake provider.

/// The host pids of processes whose command line contains `needle`.
fn pids_with(needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| String::from_utf8_lossy(&c).replace('\0', " ").contains(needle))
        })
        .collect()
}

/// Starts `tests/mcp_http_server.py` on a free loopback port; its port.
async fn http_mcp_server(token: &str) -> (tokio::process::Child, u16) {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/mcp_http_server.py");
    let child = tokio::process::Command::new("python3")
        .arg(script)
        .arg(port.to_string())
        .arg(token)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 runs");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_err() {
        assert!(std::time::Instant::now() < deadline, "the MCP HTTP server did not start");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    (child, port)
}

/// The confined stdio server runs the system's `python3` (the command
/// `PATH` holds only system directories), so the SDK must be installed there.
fn system_python_has_sdk() -> bool {
    let ok = std::process::Command::new("/usr/bin/python3").args(["-c", "import mcp.server.mcpserver"]).output().is_ok_and(|o| o.status.success());
    if !ok {
        assert!(std::env::var_os("CI").is_none(), "/usr/bin/python3 lacks the MCP SDK (test.sh installs it)");
        eprintln!("skipped: /usr/bin/python3 lacks the MCP SDK: /usr/bin/python3 -m pip install --break-system-packages mcp");
    }
    ok
}

#[tokio::test]
async fn an_agent_calls_tools_of_an_http_and_a_stdio_mcp_server() {
    use common::fake::{FakeServer, Reply, anthropic};
    if !have_sdk() || !system_python_has_sdk() {
        return;
    }
    let header_secret = "hdr-secret-7c1e0a9b";
    let (_http, port) = http_mcp_server(header_secret).await;
    let config = tempfile::tempdir().unwrap();
    let config_file = config.path().join("hangar.toml");
    std::fs::write(&config_file, format!("[mcp]\nallowed_origins = [\"http://127.0.0.1:{port}\"]\nidle_timeout_s = 5\n")).unwrap();
    let server = Server::start(&["--config", config_file.to_str().unwrap()]);

    // Registration: refused origins, bad names and bodies are 4xx; a
    // server whose header is missing cannot list its tools.
    for (body, status) in [
        (json!({"name": "far", "transport": "http", "url": "http://127.0.0.1:1/mcp"}), 422),
        (json!({"name": "a__b", "transport": "http", "url": format!("http://127.0.0.1:{port}/mcp")}), 422),
        (json!({"name": "x", "transport": "ftp"}), 422),
        (json!({"name": "x", "transport": "http"}), 422),
        (json!({"name": "nohdr", "transport": "http", "url": format!("http://127.0.0.1:{port}/mcp")}), 422),
    ] {
        let (got, answer) = server.post("/mcp/servers", body.clone()).await;
        assert_eq!(got, status, "{body}: {answer}");
        assert!(answer["error"].is_string(), "{answer}");
    }
    let (status, calc) = server
        .post("/mcp/servers", json!({"name": "calc", "transport": "http", "url": format!("http://127.0.0.1:{port}/mcp"),
            "headers": {"x-token": header_secret}}))
        .await;
    assert_eq!(status, 201, "{calc}");
    assert_eq!(calc["secret_names"], json!(["x-token"]));
    assert!(!calc.to_string().contains(header_secret));
    assert_eq!(calc["tools"][0]["name"], "calc__add", "{calc}");

    let code = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/mcp_stdio_server.py")).unwrap();
    let (status, py) = server
        .post("/mcp/servers", json!({"name": "py", "transport": "stdio", "command": "python3", "args": ["-c", code],
            "env": {"PY_SECRET": "env-secret-55aa"}}))
        .await;
    assert_eq!(status, 201, "{py}");
    let mut tools: Vec<&str> = py["tools"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    tools.sort();
    assert_eq!(tools, ["py__die", "py__echo", "py__fail", "py__peek", "py__picture", "py__spawn"]);
    let (status, _) = server.post("/mcp/servers", json!({"name": "py", "transport": "stdio", "command": "true"})).await;
    assert_eq!(status, 409);
    // A program that cannot start is refused with what it said.
    let (status, body) = server
        .post("/mcp/servers", json!({"name": "broken", "transport": "stdio", "command": "python3",
            "args": ["-c", "import sys; sys.stderr.write('no config file found'); sys.exit(2)"]}))
        .await;
    assert_eq!(status, 422, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("exit status: 2") && error.contains("no config file found"), "{error}");

    let (_, listed) = server.get("/tools").await;
    let listed: Vec<&str> = listed.as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert!(listed.contains(&"calc__add") && listed.contains(&"py__echo"), "{listed:?}");

    // An agent uses them; the fake provider asks for each call in turn.
    let root = tempfile::tempdir().unwrap();
    let work = root.path().join("work");
    std::fs::create_dir(&work).unwrap();
    std::fs::write(root.path().join("outside.txt"), "OUTSIDE-SECRET").unwrap();
    let marker = "913.37";
    let calls = [
        ("t1", "calc__add", json!({"a": 2, "b": 3})),
        ("t2", "py__echo", json!({"text": "hi"})),
        ("t3", "py__peek", json!({"path": root.path().join("outside.txt")})),
        ("t4", "py__picture", json!({})),
        ("t5", "py__fail", json!({})),
        ("t6", "py__die", json!({})),
        ("t7", "py__echo", json!({"text": "again"})),
        ("t8", "py__spawn", json!({"marker": marker})),
    ];
    let mut script: Vec<Reply> =
        calls.iter().map(|(id, name, input)| Reply::sse(anthropic::tool_answer(id, name, &[&input.to_string()], 5, 5))).collect();
    script.push(Reply::sse(anthropic::text_answer(&["done"], 5, 1)));
    let fake = FakeServer::start(script).await;
    let (status, _) =
        server.put("/provider/auth", json!({"providers": {"anthropic": {"type": "api_key", "key": "sk-test", "base_url": fake.url}}})).await;
    assert_eq!(status, 200);
    let mut names: Vec<&str> = calls.iter().map(|c| c.1).collect();
    names.sort();
    names.dedup();
    let (status, agent) = server
        .post("/agents", json!({"name": "m", "tools": names, "provider": {"id": "anthropic", "model": "claude-test", "max_tokens": 64}}))
        .await;
    assert_eq!(status, 201, "{agent}");
    let (_, session) = server.post("/sessions", json!({"work_dir": work})).await;
    let (status, body) = server
        .post(&format!("/sessions/{}/message", session["id"].as_str().unwrap()), json!({"agent_id": agent["id"], "message": "go"}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["response"], "done");
    let results = body["tool_calls"].as_array().unwrap();
    let result = |i: usize| (results[i]["output"].as_str().unwrap().to_string(), results[i]["is_error"].as_bool().unwrap());
    assert_eq!(result(0), ("5".to_string(), false));
    let (echo, error) = result(1);
    assert!(!error && echo == format!("hi from {}", work.canonicalize().unwrap().display()), "{echo}");
    let (peek, error) = result(2);
    assert!(error && !peek.contains("OUTSIDE-SECRET") && peek.contains("Permission denied"), "{peek}");
    let (picture, error) = result(3);
    assert!(!error && picture.starts_with("[image: image/png, 2 KB]"), "{picture}");
    let (fail, error) = result(4);
    assert!(error && fail.contains("boom"), "{fail}");
    // A server that dies mid-call is that call's error; the next call starts it anew.
    let (died, error) = result(5);
    assert!(error && died.contains("`py__die` failed"), "{died}");
    let (again, error) = result(6);
    assert!(!error && again.starts_with("again from"), "{again}");
    let (spawned, error) = result(7);
    assert!(!error && spawned.starts_with("started"), "{spawned}");
    assert!(!pids_with(&format!("sleep {marker}")).is_empty(), "the server's child runs while the server does");

    // Idle for longer than `idle_timeout_s`: the program and all it started are gone.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !pids_with(&format!("sleep {marker}")).is_empty() || !pids_with("hangar-test-stdio").is_empty() {
        assert!(std::time::Instant::now() < deadline, "the idle stdio server or its child outlived the idle timeout");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    // Secrets are stored sealed and never shown.
    let (_, servers) = server.get("/mcp/servers").await;
    assert!(!servers.to_string().contains(header_secret) && !servers.to_string().contains("env-secret-55aa"), "{servers}");
    let db = std::fs::read(server.db_path()).unwrap();
    for secret in [header_secret, "env-secret-55aa"] {
        assert!(!db.windows(secret.len()).any(|w| w == secret.as_bytes()), "{secret} is in the database in clear");
    }

    // Deleted: gone from /tools, and an agent can no longer name it.
    let (status, _) = server.delete("/mcp/servers/py").await;
    assert_eq!(status, 200);
    let (status, _) = server.delete("/mcp/servers/py").await;
    assert_eq!(status, 404);
    let (_, listed) = server.get("/tools").await;
    assert!(!listed.to_string().contains("py__echo"));
    let (status, _) = server
        .post("/agents", json!({"name": "n", "tools": ["py__echo"], "provider": {"id": "anthropic", "model": "claude-test"}}))
        .await;
    assert_eq!(status, 422);
}

#[tokio::test]
async fn tenants_register_only_allowed_http_servers_and_no_stdio_by_default() {
    let root = tempfile::tempdir().unwrap();
    let server = Server::start(&["--admin-token", ADMIN, "--work-root", root.path().to_str().unwrap()]);
    let admin = authed(ADMIN);
    let resp = admin.post(server.url("/tenants")).json(&json!({"name": "t"})).send().await.unwrap();
    let tenant: Value = resp.json().await.unwrap();
    let me = authed(tenant["key"].as_str().unwrap());
    for body in [
        json!({"name": "s", "transport": "stdio", "command": "python3"}),
        json!({"name": "h", "transport": "http", "url": "http://127.0.0.1:9/mcp"}),
        json!({"name": "m", "transport": "http", "url": "http://169.254.169.254/mcp"}),
    ] {
        let resp = me.post(server.url("/mcp/servers")).json(&body).send().await.unwrap();
        let status = resp.status().as_u16();
        let answer: Value = resp.json().await.unwrap();
        assert_eq!(status, 422, "{body}: {answer}");
        let error = answer["error"].as_str().unwrap();
        assert!(error.contains("[mcp] stdio = false") || error.contains("allowed_origins"), "{error}");
    }
    // Nothing of theirs is listed, for them or the admin.
    for client in [&me, &admin] {
        let listed: Value = client.get(server.url("/mcp/servers")).send().await.unwrap().json().await.unwrap();
        assert_eq!(listed, json!([]));
    }
}

/// An MCP server over HTTPS whose certificate comes from the operator's
/// own CA is reached when `[http] ca_file` names that CA, as a provider
/// behind it is, and refused without it: the web's roots alone do not
/// trust it.
#[tokio::test]
async fn an_https_mcp_server_is_trusted_through_the_ca_file_only() {
    use common::fake::Reply;
    use common::tls::TlsFake;
    // The three requests of a Streamable HTTP client's start and listing,
    // answered as plain JSON; no stream of server messages (GET: 405).
    let fake = TlsFake::responding(|req| {
        if req.method != "POST" {
            return Reply::json(405, json!({"error": "no stream here"}));
        }
        let call = req.json();
        let result = match call["method"].as_str().unwrap_or("") {
            "initialize" => json!({"protocolVersion": call["params"]["protocolVersion"], "capabilities": {"tools": {}},
                "serverInfo": {"name": "tls-fake", "version": "1"}}),
            "tools/list" => json!({"tools": [{"name": "echo", "description": "Says it back.", "inputSchema": {"type": "object"}}]}),
            _ => return Reply::json(202, json!({})),
        };
        Reply::json(200, json!({"jsonrpc": "2.0", "id": call["id"], "result": result}))
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &fake.ca_pem).unwrap();
    for trust in [false, true] {
        let config = dir.path().join("hangar.toml");
        let ca_file = if trust { format!("[http]\nca_file = {ca:?}\n") } else { String::new() };
        std::fs::write(&config, format!("{ca_file}[mcp]\nallowed_origins = [\"{}\"]\n", fake.url)).unwrap();
        let server = Server::start(&["--config", config.to_str().unwrap()]);
        let (status, answer) =
            server.post("/mcp/servers", json!({"name": "tls", "transport": "http", "url": format!("{}/mcp", fake.url)})).await;
        if trust {
            assert_eq!(status, 201, "{answer}");
            assert_eq!(answer["tools"][0]["name"], "tls__echo", "{answer}");
        } else {
            assert_eq!(status, 422, "{answer}");
            let error = answer["error"].as_str().unwrap();
            assert!(error.contains("tls") && error.contains("certificate"), "the cause is shown: {error}");
        }
    }
    let listed: Vec<String> = fake.requests.lock().unwrap().iter().map(|(_, r)| r.method.clone()).collect();
    assert!(listed.iter().any(|m| m == "POST"), "the trusted server's requests reached it: {listed:?}");
}
