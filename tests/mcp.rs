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
