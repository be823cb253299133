//! The agent loop end to end: the real binary, the real `anthropic` provider
//! component, the real `read` tool component, and a scripted fake of the
//! Anthropic Messages API on loopback.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::fake::{Chunk, FakeServer, Reply, anthropic};
use common::server::Server;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::Notify;

const KEY: &str = "sk-ant-e2e-KEY-9f8e7d";

struct Setup {
    server: Server,
    fake: FakeServer,
    agent: String,
    session: String,
    _work: tempfile::TempDir,
}

async fn setup(script: Vec<Reply>, args: &[&str], tools: Value) -> Setup {
    let fake = FakeServer::start(script).await;
    let server = Server::start(args);
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("hello.txt"), "the file says hi\n").unwrap();
    let (status, _) = server
        .put("/provider/auth", json!({"providers": {"anthropic": {"type": "api_key", "key": KEY, "base_url": fake.url}}}))
        .await;
    assert_eq!(status, 200);
    let (_, agent) = server
        .post("/agents", json!({"name": "t", "instructions": "You are terse.", "tools": tools,
            "provider": {"id": "anthropic", "model": "claude-test", "max_tokens": 512}}))
        .await;
    let (_, session) = server.post("/sessions", json!({"work_dir": work.path()})).await;
    Setup {
        agent: agent["id"].as_str().unwrap().into(),
        session: session["id"].as_str().unwrap().into(),
        server,
        fake,
        _work: work,
    }
}

impl Setup {
    async fn message(&self, text: &str) -> (u16, Value) {
        self.server.post(&format!("/sessions/{}/message", self.session), json!({"agent_id": self.agent, "message": text})).await
    }

    async fn stream(&self, text: &str) -> reqwest::Response {
        self.server
            .client
            .post(self.server.url(&format!("/sessions/{}/message/stream", self.session)))
            .json(&json!({"agent_id": self.agent, "message": text}))
            .send()
            .await
            .unwrap()
    }

    /// A stream whose run is cancelled if this client goes away.
    async fn stream_cancelling(&self, text: &str) -> reqwest::Response {
        self.server
            .client
            .post(self.server.url(&format!("/sessions/{}/message/stream", self.session)))
            .json(&json!({"agent_id": self.agent, "message": text, "on_disconnect": "cancel"}))
            .send()
            .await
            .unwrap()
    }

    async fn history(&self) -> Value {
        self.server.get(&format!("/sessions/{}", self.session)).await.1["history"].clone()
    }
}

/// Reads SSE events (name, JSON data) as they arrive.
struct Events {
    body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: String,
}

impl Events {
    fn new(resp: reqwest::Response) -> Events {
        assert_eq!(resp.status(), 200);
        assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
        Events { body: resp.bytes_stream().boxed(), buf: String::new() }
    }

    async fn next(&mut self) -> Option<(String, Value)> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let frame: String = self.buf.drain(..end + 2).collect();
                let mut name = String::new();
                let mut data = String::new();
                for line in frame.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        name = v.trim().into();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if name.is_empty() && data.is_empty() {
                    continue; // a keep-alive comment
                }
                return Some((name, serde_json::from_str(&data).unwrap()));
            }
            match self.body.next().await {
                Some(Ok(bytes)) => self.buf.push_str(&String::from_utf8_lossy(&bytes)),
                _ => return None,
            }
        }
    }

    async fn all(mut self) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        while let Some(e) = self.next().await {
            out.push(e);
        }
        out
    }
}

#[tokio::test]
async fn a_tool_loop_through_the_blocking_endpoint() {
    let s = setup(
        vec![
            Reply::sse(anthropic::tool_answer("toolu_1", "read", &["{\"file", "Path\": \"hel", "lo.txt\"}"], 100, 20)),
            Reply::sse(anthropic::text_answer(&["It says ", "hi."], 150, 5)),
        ],
        &[],
        json!(["read"]),
    )
    .await;
    let (status, body) = s.message("What does hello.txt say?").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["response"], "It says hi.");
    assert_eq!(body["steps"], 2);
    assert_eq!(body["stop_reason"], "end_turn");
    assert_eq!(body["usage"], json!({"input_tokens": 250, "output_tokens": 25}));
    let calls = body["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0]["id"], "toolu_1");
    assert_eq!(calls[0]["name"], "read");
    assert_eq!(calls[0]["input"], json!({"filePath": "hello.txt"}));
    assert_eq!(calls[0]["is_error"], false);
    assert!(calls[0]["output"].as_str().unwrap().contains("the file says hi"), "{}", calls[0]["output"]);

    // What the provider saw: the key only in x-api-key, the system prompt,
    // the tool spec, and in the second call the tool result from the sandbox.
    let requests = s.fake.requests();
    assert_eq!(requests.len(), 2);
    for r in &requests {
        assert_eq!(r.method, "POST");
        assert_eq!(r.path, "/v1/messages");
        assert_eq!(r.header("x-api-key"), Some(KEY));
        assert_eq!(r.header("anthropic-version"), Some("2023-06-01"));
        assert_eq!(r.raw_text().matches(KEY).count(), 1, "the key appears once, in x-api-key");
    }
    let first = requests[0].json();
    assert_eq!(first["model"], "claude-test");
    assert_eq!(first["max_tokens"], 512);
    assert_eq!(first["stream"], true);
    assert_eq!(first["system"], "You are terse.");
    assert_eq!(first["tools"][0]["name"], "read");
    let second = requests[1].json();
    let result = &second["messages"][2]["content"][0];
    assert_eq!(result["type"], "tool_result");
    assert_eq!(result["tool_use_id"], "toolu_1");
    assert!(result.to_string().contains("the file says hi"), "{result}");

    let history = s.history().await;
    let roles: Vec<&str> = history.as_array().unwrap().iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["user", "assistant", "user", "assistant"]);
    assert_eq!(history[1]["content"][0], json!({"type": "tool_use", "id": "toolu_1", "name": "read", "input": {"filePath": "hello.txt"}}));
    assert_eq!(history[2]["content"][0]["type"], "tool_result");
    assert_eq!(history[3]["content"][0], json!({"type": "text", "text": "It says hi."}));
    assert!(!s.server.log().contains(KEY));
}

#[tokio::test]
async fn the_stream_sends_events_in_order_as_they_happen() {
    let gate = Arc::new(Notify::new());
    let mut first = vec![anthropic::start(10)];
    first.extend(anthropic::text_block(0, &["Let me ", "look."]));
    // The provider pauses mid-answer until the test has seen the first text.
    first.push(Chunk::Wait(gate.clone()));
    first.extend(anthropic::tool_block(1, "toolu_9", "read", &["{\"filePath\":", "\"hello.txt\"}"]));
    first.extend(anthropic::stop("tool_use", 7));
    let s = setup(vec![Reply::sse(first), Reply::sse(anthropic::text_answer(&["Done."], 20, 2))], &[], json!(["read"])).await;

    let mut events = Events::new(s.stream("look").await);
    let (name, data) = events.next().await.unwrap();
    assert_eq!((name.as_str(), &data), ("text", &json!({"type": "text", "content": "Let me "})));
    // The first event arrived while the provider was still holding its answer.
    assert_eq!(s.fake.requests().len(), 1);
    gate.notify_one();
    let rest = events.all().await;
    let names: Vec<&str> = rest.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["text", "tool_use", "tool_result", "text", "done"]);
    assert_eq!(rest[1].1, json!({"type": "tool_use", "id": "toolu_9", "name": "read", "input": {"filePath": "hello.txt"}}));
    assert_eq!(rest[2].1["tool_use_id"], "toolu_9");
    assert_eq!(rest[2].1["is_error"], false);
    assert!(rest[2].1["content"].as_str().unwrap().contains("the file says hi"));
    let done = &rest[4].1;
    assert_eq!(done["steps"], 2);
    assert_eq!(done["stop_reason"], "end_turn");
    assert_eq!(done["usage"], json!({"input_tokens": 30, "output_tokens": 9}));
}

/// A run holds its session's directory open only when its agent has tools
/// to run there: a descriptor per stream otherwise adds up against the
/// process's file limit at thousands of streams.
#[tokio::test]
async fn only_a_run_with_tools_holds_the_work_dir_open_while_it_streams() {
    for (tools, held) in [(json!([]), false), (json!(["read"]), true)] {
        let gate = Arc::new(Notify::new());
        let mut answer = vec![anthropic::start(10)];
        answer.extend(anthropic::text_block(0, &["Hel", "lo."]));
        answer.push(Chunk::Wait(gate.clone()));
        answer.extend(anthropic::stop("end_turn", 2));
        let s = setup(vec![Reply::sse(answer)], &[], tools.clone()).await;
        let mut events = Events::new(s.stream("hi").await);
        assert_eq!(events.next().await.unwrap().0, "text");
        // Mid-answer: which of the server's descriptors name the directory.
        let dir = std::fs::canonicalize(s._work.path()).unwrap();
        let open = std::fs::read_dir(format!("/proc/{}/fd", s.server.pid()))
            .unwrap()
            .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
            .filter(|target| *target == dir)
            .count();
        assert_eq!(open > 0, held, "tools {tools}: {open} descriptors on the work dir");
        gate.notify_one();
        assert_eq!(events.all().await.last().unwrap().0, "done");
    }
}

#[tokio::test]
async fn a_provider_failure_is_a_502_and_keeps_the_user_message() {
    let s = setup(vec![anthropic::error(401, "authentication_error", "invalid x-api-key")], &[], json!([])).await;
    let (status, body) = s.message("hello").await;
    assert_eq!(status, 502, "{body}");
    let error = body["error"].as_str().unwrap();
    assert!(error.contains("anthropic") && error.contains("401") && error.contains("invalid x-api-key"), "{error}");
    assert_eq!(body["code"], "provider_error");
    let history = s.history().await;
    assert_eq!(history, json!([{"role": "user", "content": [{"type": "text", "text": "hello"}]}]));

    // Through the stream it is an `error` event, last.
    s.fake.push(anthropic::error(400, "invalid_request_error", "bad thing"));
    let events = Events::new(s.stream("again").await).all().await;
    let (name, data) = events.last().unwrap();
    assert_eq!(name, "error");
    assert_eq!(data["type"], "error");
    assert!(data["error"].as_str().unwrap().contains("bad thing"));
    // The next turn is still valid: both user texts are one user message.
    let history = s.history().await;
    assert_eq!(history.as_array().unwrap().len(), 1);
    assert_eq!(history[0]["content"].as_array().unwrap().len(), 2);
}

#[tokio::test]
async fn rate_limits_are_retried_honouring_retry_after() {
    let s = setup(
        vec![
            anthropic::error(429, "rate_limit_error", "slow down").header("retry-after", "1"),
            anthropic::error(529, "overloaded_error", "overloaded"),
            Reply::sse(anthropic::text_answer(&["ok"], 1, 1)),
        ],
        &[],
        json!([]),
    )
    .await;
    let started = std::time::Instant::now();
    let (status, body) = s.message("hi").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["response"], "ok");
    assert_eq!(s.fake.requests().len(), 3);
    // The retry-after of 1 s was honoured (a lower bound, not a performance threshold).
    assert!(started.elapsed() >= Duration::from_secs(1));
}

#[tokio::test]
async fn a_busy_session_refuses_a_second_message() {
    let gate = Arc::new(Notify::new());
    let mut held = vec![anthropic::start(1)];
    held.extend(anthropic::text_block(0, &["wait"]));
    held.push(Chunk::Wait(gate.clone()));
    held.extend(anthropic::stop("end_turn", 1));
    let s = setup(vec![Reply::sse(held)], &[], json!([])).await;
    let mut events = Events::new(s.stream("first").await);
    assert_eq!(events.next().await.unwrap().0, "text");
    let (status, body) = s.message("second").await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["code"], "conflict");
    gate.notify_one();
    assert_eq!(events.all().await.last().unwrap().0, "done");
}

#[tokio::test]
async fn the_step_limit_ends_the_run_with_a_valid_history() {
    let script = (0..3)
        .map(|i| Reply::sse(anthropic::tool_answer(&format!("toolu_{i}"), "read", &["{\"filePath\": \"hello.txt\"}"], 1, 1)))
        .collect();
    let s = setup(script, &["--max-steps", "2"], json!(["read"])).await;
    let (status, body) = s.message("loop").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["stop_reason"], "max_steps");
    assert_eq!(body["steps"], 2);
    assert_eq!(s.fake.requests().len(), 2);
    let history = s.history().await;
    let last = history.as_array().unwrap().last().unwrap();
    assert_eq!(last["role"], "user");
    assert_eq!(last["content"][0]["type"], "tool_result");
}

#[tokio::test]
async fn unknown_tools_and_bad_input_become_error_results() {
    let mut answer = vec![anthropic::start(1)];
    answer.extend(anthropic::tool_block(0, "toolu_a", "telepathy", &["{}"]));
    answer.extend(anthropic::tool_block(1, "toolu_b", "read", &["{\"filePath\": 3}"]));
    answer.extend(anthropic::tool_block(2, "toolu_c", "read", &["{\"filePath\": \"nope.txt\"}"]));
    answer.extend(anthropic::stop("tool_use", 1));
    let s = setup(vec![Reply::sse(answer), Reply::sse(anthropic::text_answer(&["recovered"], 1, 1))], &[], json!(["read"])).await;
    let (status, body) = s.message("go").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["response"], "recovered");
    let calls = body["tool_calls"].as_array().unwrap();
    assert_eq!(calls.len(), 3);
    assert!(calls.iter().all(|c| c["is_error"] == true), "{calls:?}");
    assert!(calls[0]["output"].as_str().unwrap().contains("unknown tool `telepathy`"));
    assert!(calls[1]["output"].as_str().unwrap().contains("invalid input"));
    assert!(calls[2]["output"].as_str().unwrap().contains("nope.txt"));
    // Results went back in the model's order.
    let second = s.fake.requests()[1].json();
    let ids: Vec<&str> = second["messages"][2]["content"].as_array().unwrap().iter().map(|b| b["tool_use_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["toolu_a", "toolu_b", "toolu_c"]);
}

#[tokio::test]
async fn a_client_that_asked_to_cancel_on_disconnect_cancels_the_run_by_disconnecting() {
    let gate = Arc::new(Notify::new());
    let mut held = vec![anthropic::start(1)];
    held.extend(anthropic::text_block(0, &["partial"]));
    held.push(Chunk::Wait(gate.clone()));
    held.extend(anthropic::stop("end_turn", 1));
    let s = setup(vec![Reply::sse(held), Reply::sse(anthropic::text_answer(&["fresh"], 1, 1))], &[], json!([])).await;
    let mut events = Events::new(s.stream_cancelling("first").await);
    assert_eq!(events.next().await.unwrap().0, "text");
    drop(events);
    // The session frees up without the provider ever finishing.
    let mut status = 0;
    for _ in 0..200 {
        let (st, _) = s.message("second").await;
        status = st;
        if st != 409 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(status, 200);
    let history = s.history().await;
    let roles: Vec<&str> = history.as_array().unwrap().iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert_eq!(roles, ["user", "assistant", "user", "assistant"]);
    assert_eq!(history[1]["content"][0]["text"], "partial");
}

fn processes_matching(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(needle) && !cmdline.contains("cargo") {
                found.push(cmdline);
            }
        }
    }
    found
}

#[tokio::test]
async fn disconnecting_with_on_disconnect_cancel_kills_the_running_tool_processes() {
    // A sleep no other test runs, so it can be looked for in /proc.
    let command = "sleep 297.25";
    let input = json!({"command": command}).to_string();
    let s = setup(
        vec![Reply::sse(anthropic::tool_answer("toolu_s", "bash", &[&input], 1, 1)), Reply::sse(anthropic::text_answer(&["next"], 1, 1))],
        &[],
        json!(["bash"]),
    )
    .await;
    let mut events = Events::new(s.stream_cancelling("sleep").await);
    assert_eq!(events.next().await.unwrap().0, "tool_use");
    let mut seen = false;
    for _ in 0..200 {
        if !processes_matching(command).is_empty() {
            seen = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(seen, "the command started");
    drop(events);
    let mut gone = false;
    for _ in 0..400 {
        if processes_matching(command).is_empty() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(gone, "still running: {:?}", processes_matching(command));
    // The cancelled call got an error result, so the history is valid.
    let mut history = Value::Null;
    for _ in 0..200 {
        history = s.history().await;
        if history.as_array().unwrap().len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(history[2]["content"][0]["tool_use_id"], "toolu_s", "{history}");
    assert_eq!(history[2]["content"][0]["is_error"], true);
}

#[tokio::test]
async fn sigterm_lets_the_server_exit_cleanly_mid_run() {
    let gate = Arc::new(Notify::new());
    let mut held = vec![anthropic::start(1)];
    held.extend(anthropic::text_block(0, &["half an answer"]));
    held.push(Chunk::Wait(gate.clone()));
    held.extend(anthropic::stop("end_turn", 1));
    let mut s = setup(vec![Reply::sse(held)], &[], json!([])).await;
    let mut events = Events::new(s.stream("long question").await);
    assert_eq!(events.next().await.unwrap().0, "text");
    let status = s.server.terminate();
    assert!(status.success(), "{status:?}");
    // The run was cancelled after the grace period, and said so.
    let rest = events.all().await;
    let (name, done) = rest.last().expect("the stream ended with an event");
    assert_eq!(name, "done");
    assert_eq!(done["stop_reason"], "cancelled");
    gate.notify_one();
}
