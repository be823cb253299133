//! The provider components (`anthropic`, `openai`, `ollama`) driven through
//! the runtime against fake servers on 127.0.0.1. The fakes are raw TCP, so
//! each test controls the bytes exactly: HTTP/1.1 chunked bodies cut at
//! arbitrary points (inside SSE lines, NDJSON lines and UTF-8 characters),
//! connections dropped mid-body, and error statuses with the vendors' own
//! error bodies.

mod common;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hangar::runtime::{
    Completion, CompletionRequest, ContentBlock, ErrorKind, Event, Message, ProviderAccess, ProviderError, Role, Secret,
    StopReason, ToolResult, ToolSpec, ToolUse,
};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

const KEY: &str = "sk-test-THE-SECRET-KEY-1234567890";
/// Text with 2-, 3- and 4-byte UTF-8 characters, so that cutting the body
/// every few bytes splits characters.
const UNICODE: &str = "Grüße, 世界! 🚀 done";

// ---------------------------------------------------------------- the fake

/// A request the fake received.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("request body is JSON")
    }
}

/// One step of writing a response body.
enum Part {
    /// Sent as one HTTP chunk and flushed, then a short pause so that it
    /// travels as its own TCP segment.
    Bytes(Vec<u8>),
    /// Waits until the test says go (to show events arrive before the end).
    Wait(Arc<Notify>),
    /// Drops the connection without finishing the chunked body.
    Abort,
}

/// A scripted response.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    parts: Vec<Part>,
}

impl Reply {
    /// A complete JSON answer in one piece.
    fn json(status: u16, body: Value) -> Reply {
        Reply {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            parts: vec![Part::Bytes(body.to_string().into_bytes())],
        }
    }

    /// A streamed body cut every `every` bytes (which splits SSE fields,
    /// JSON and UTF-8 characters wherever they fall).
    fn stream(content_type: &str, body: &str, every: usize) -> Reply {
        let parts = body.as_bytes().chunks(every).map(|c| Part::Bytes(c.to_vec())).collect();
        Reply { status: 200, headers: vec![("content-type".into(), content_type.into())], parts }
    }

    fn sse(body: &str, every: usize) -> Reply {
        Reply::stream("text/event-stream", body, every)
    }

    fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.into(), value.into()));
        self
    }

    fn then(mut self, part: Part) -> Reply {
        self.parts.push(part);
        self
    }
}

type Handler = dyn Fn(&Seen) -> Reply + Send + Sync;

/// A fake vendor server: answers each request with the handler's script and
/// records what it received.
struct Fake {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Fake {
    async fn start(handler: impl Fn(&Seen) -> Reply + Send + Sync + 'static) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Handler> = Arc::new(handler);
        let recorded = seen.clone();
        tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else { return };
                let (handler, recorded) = (handler.clone(), recorded.clone());
                tokio::spawn(async move { serve(socket, &*handler, &recorded).await });
            }
        });
        Fake { addr, seen }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn requests(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

async fn serve(mut socket: TcpStream, handler: &Handler, recorded: &Mutex<Vec<Seen>>) {
    socket.set_nodelay(true).unwrap();
    let Some(request) = read_request(&mut socket).await else { return };
    recorded.lock().unwrap().push(request.clone());
    let reply = handler(&request);
    let mut head = format!("HTTP/1.1 {} Fake\r\ntransfer-encoding: chunked\r\nconnection: close\r\n", reply.status);
    for (name, value) in &reply.headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    if socket.write_all(head.as_bytes()).await.is_err() {
        return;
    }
    for part in reply.parts {
        match part {
            Part::Bytes(bytes) => {
                let mut chunk = format!("{:x}\r\n", bytes.len()).into_bytes();
                chunk.extend_from_slice(&bytes);
                chunk.extend_from_slice(b"\r\n");
                if socket.write_all(&chunk).await.is_err() || socket.flush().await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Part::Wait(go) => go.notified().await,
            Part::Abort => return,
        }
    }
    let _ = socket.write_all(b"0\r\n\r\n").await;
    let _ = socket.shutdown().await;
}

/// Reads one HTTP/1.1 request with a `content-length` body.
async fn read_request(socket: &mut TcpStream) -> Option<Seen> {
    let mut data = Vec::new();
    let mut buf = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = socket.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        data.extend_from_slice(&buf[..n]);
    };
    let head = String::from_utf8_lossy(&data[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next()?.split(' ');
    let (method, path) = (request_line.next()?.to_string(), request_line.next()?.to_string());
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let length: usize = headers.iter().find(|(n, _)| n == "content-length").and_then(|(_, v)| v.parse().ok()).unwrap_or(0);
    let mut body = data[head_end + 4..].to_vec();
    while body.len() < length {
        let n = socket.read(&mut buf).await.ok()?;
        if n == 0 {
            return None;
        }
        body.extend_from_slice(&buf[..n]);
    }
    Some(Seen { method, path, headers, body })
}

// ------------------------------------------------------------- wire texts

/// An SSE event as the vendors frame it.
fn sse(event: &str, data: Value) -> String {
    format!("event: {event}\ndata: {data}\n\n")
}

/// An OpenAI chunk (no `event:` line).
fn chunk(data: Value) -> String {
    format!("data: {data}\n\n")
}

fn anthropic_text_stream(text_pieces: &[&str]) -> String {
    let mut body = sse(
        "message_start",
        json!({"type": "message_start", "message": {"id": "msg_1", "type": "message", "role": "assistant", "content": [],
            "model": "claude-test", "stop_reason": null, "stop_sequence": null,
            "usage": {"input_tokens": 25, "cache_read_input_tokens": 5, "output_tokens": 1}}}),
    );
    body += &sse("content_block_start", json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}));
    body += &sse("ping", json!({"type": "ping"}));
    for piece in text_pieces {
        body += &sse(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": piece}}),
        );
    }
    body += &sse("content_block_stop", json!({"type": "content_block_stop", "index": 0}));
    body += &sse(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": null}, "usage": {"output_tokens": 15}}),
    );
    body += &sse("message_stop", json!({"type": "message_stop"}));
    body
}

// ---------------------------------------------------------------- helpers

fn access(fake: &Fake) -> ProviderAccess {
    ProviderAccess { base_url: Some(fake.url()), credential: Some(Secret::new(KEY.into())), ..Default::default() }
}

fn request(messages: Vec<Message>, tools: Vec<ToolSpec>) -> CompletionRequest {
    CompletionRequest {
        model: "test-model".into(),
        system: Some("Be brief.".into()),
        messages,
        tools,
        max_tokens: 1024,
        temperature: Some(0.5),
    }
}

fn user(text: &str) -> Message {
    Message { role: Role::User, content: vec![ContentBlock::Text(text.into())] }
}

fn hello() -> CompletionRequest {
    request(vec![user("Hello")], Vec::new())
}

/// A history with a tool round trip: user text, assistant text + two tool
/// calls, user with both results (one failed) and more text.
fn tool_history() -> CompletionRequest {
    let messages = vec![
        user("List and read."),
        Message {
            role: Role::Assistant,
            content: vec![
                ContentBlock::Text("Looking.".into()),
                ContentBlock::ToolUse(ToolUse { id: "call_a".into(), name: "glob".into(), input: r#"{"pattern":"*.rs"}"#.into() }),
                ContentBlock::ToolUse(ToolUse { id: "call_b".into(), name: "read".into(), input: r#"{"filePath":"x"}"#.into() }),
            ],
        },
        Message {
            role: Role::User,
            content: vec![
                ContentBlock::ToolResult(ToolResult { tool_use_id: "call_a".into(), content: "a.rs".into(), is_error: false }),
                ContentBlock::ToolResult(ToolResult { tool_use_id: "call_b".into(), content: "no such file".into(), is_error: true }),
                ContentBlock::Text("Go on.".into()),
            ],
        },
    ];
    let tools = vec![ToolSpec {
        name: "glob".into(),
        description: "Finds files.".into(),
        input_schema: r#"{"type":"object","properties":{"pattern":{"type":"string"}}}"#.into(),
    }];
    request(messages, tools)
}

async fn start(provider: &str, access: &ProviderAccess, req: CompletionRequest) -> Result<Completion, ProviderError> {
    common::runtime().provider_complete(provider, access, req).await.expect("the runtime runs the provider")
}

/// Pulls every event; an error ends the list (returned with what came before).
async fn drain(completion: &mut Completion) -> (Vec<Event>, Option<ProviderError>) {
    let mut events = Vec::new();
    loop {
        let next = tokio::time::timeout(Duration::from_secs(30), completion.next()).await.expect("an event within 30 s");
        match next.expect("the runtime runs the provider") {
            Ok(Some(event)) => events.push(event),
            Ok(None) => return (events, None),
            Err(err) => return (events, Some(err)),
        }
    }
}

async fn complete_ok(provider: &str, access: &ProviderAccess, req: CompletionRequest) -> Vec<Event> {
    let mut completion = start(provider, access, req).await.unwrap_or_else(|e| panic!("complete failed: {e:?}"));
    let (events, err) = drain(&mut completion).await;
    assert!(err.is_none(), "stream failed: {err:?} after {events:?}");
    events
}

async fn complete_err(provider: &str, access: &ProviderAccess, req: CompletionRequest) -> (Vec<Event>, ProviderError) {
    match start(provider, access, req).await {
        Err(err) => (Vec::new(), err),
        Ok(mut completion) => {
            let (events, err) = drain(&mut completion).await;
            (events.clone(), err.unwrap_or_else(|| panic!("expected an error, the stream ended with {events:?}")))
        }
    }
}

fn text(events: &[Event]) -> String {
    events.iter().filter_map(|e| if let Event::Text(t) = e { Some(t.as_str()) } else { None }).collect()
}

fn usage(events: &[Event]) -> (u64, u64) {
    events.iter().fold((0, 0), |(i, o), e| match e {
        Event::Usage(u) => (i + u.input_tokens, o + u.output_tokens),
        _ => (i, o),
    })
}

/// The tool calls, assembled as the host would: `(id, name, input)`, in
/// start order; checks every delta and end belongs to a started call.
fn tool_calls(events: &[Event]) -> Vec<(String, String, Value)> {
    let mut calls: Vec<(String, String, String, bool)> = Vec::new();
    for event in events {
        match event {
            Event::ToolUseStart(s) => calls.push((s.id.clone(), s.name.clone(), String::new(), false)),
            Event::ToolUseDelta(d) => {
                let call = calls.iter_mut().find(|c| c.0 == d.id).expect("delta for a started call");
                assert!(!call.3, "delta after end");
                call.2.push_str(&d.partial_json);
            }
            Event::ToolUseEnd(id) => calls.iter_mut().find(|c| &c.0 == id).expect("end of a started call").3 = true,
            _ => {}
        }
    }
    calls
        .into_iter()
        .map(|(id, name, input, ended)| {
            assert!(ended, "tool call {id} never ended");
            (id, name, serde_json::from_str(&input).unwrap_or_else(|e| panic!("input {input:?}: {e}")))
        })
        .collect()
}

fn stop(events: &[Event]) -> StopReason {
    match events.last() {
        Some(Event::Stop(reason)) => *reason,
        other => panic!("the last event is not a stop: {other:?}"),
    }
}

fn assert_kind(err: &ProviderError, kind: ErrorKind, retryable: bool) {
    assert!(
        std::mem::discriminant(&err.kind) == std::mem::discriminant(&kind) && err.retryable == retryable,
        "expected {kind:?} (retryable {retryable}), got {err:?}"
    );
}

// ------------------------------------------------------------- anthropic

#[tokio::test]
async fn anthropic_streams_text_cut_at_every_byte_boundary() {
    for every in [1, 3, 7, 64] {
        let fake = Fake::start(move |_| Reply::sse(&anthropic_text_stream(&["Grü", "ße, 世界! ", "🚀 done"]), every)).await;
        let events = complete_ok("anthropic", &access(&fake), hello()).await;
        assert_eq!(text(&events), UNICODE, "cut every {every} bytes");
        assert_eq!(usage(&events), (30, 15), "input counts cached tokens; output is the final count");
        assert_eq!(stop(&events), StopReason::EndTurn);
    }
}

#[tokio::test]
async fn anthropic_request_carries_the_key_only_in_x_api_key() {
    let fake = Fake::start(|_| Reply::sse(&anthropic_text_stream(&["ok"]), 4096)).await;
    complete_ok("anthropic", &access(&fake), tool_history()).await;
    let seen = fake.requests();
    assert_eq!(seen.len(), 1);
    let req = &seen[0];
    assert_eq!((req.method.as_str(), req.path.as_str()), ("POST", "/v1/messages"));
    assert_eq!(req.header("x-api-key"), Some(KEY));
    assert_eq!(req.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(req.header("authorization"), None);
    let others = req.headers.iter().filter(|(n, _)| n != "x-api-key").any(|(_, v)| v.contains(KEY));
    assert!(!others && !String::from_utf8_lossy(&req.body).contains(KEY), "the key leaked elsewhere: {req:?}");

    let body = req.json();
    assert_eq!(body["stream"], true);
    assert_eq!(body["model"], "test-model");
    assert_eq!(body["system"], "Be brief.");
    assert_eq!(body["max_tokens"], 1024);
    assert_eq!(body["temperature"], 0.5);
    assert_eq!(body["tools"][0]["input_schema"]["properties"]["pattern"]["type"], "string");
    assert_eq!(
        body["messages"],
        json!([
            {"role": "user", "content": [{"type": "text", "text": "List and read."}]},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Looking."},
                {"type": "tool_use", "id": "call_a", "name": "glob", "input": {"pattern": "*.rs"}},
                {"type": "tool_use", "id": "call_b", "name": "read", "input": {"filePath": "x"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "call_a", "content": "a.rs", "is_error": false},
                {"type": "tool_result", "tool_use_id": "call_b", "content": "no such file", "is_error": true},
                {"type": "text", "text": "Go on."}]}
        ])
    );
}

#[tokio::test]
async fn anthropic_parallel_tool_use_with_input_json_deltas() {
    let mut body = sse(
        "message_start",
        json!({"type": "message_start", "message": {"usage": {"input_tokens": 100, "output_tokens": 1}}}),
    );
    body += &sse("content_block_start", json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}));
    body += &sse("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Two calls."}}));
    body += &sse("content_block_stop", json!({"type": "content_block_stop", "index": 0}));
    body += &sse(
        "content_block_start",
        json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_1", "name": "glob", "input": {}}}),
    );
    for piece in ["", "{\"pat", "tern\": \"src/", "**/*.rs\"}"] {
        body += &sse(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": piece}}),
        );
    }
    body += &sse("content_block_stop", json!({"type": "content_block_stop", "index": 1}));
    body += &sse(
        "content_block_start",
        json!({"type": "content_block_start", "index": 2, "content_block": {"type": "tool_use", "id": "toolu_2", "name": "read", "input": {}}}),
    );
    for piece in ["{\"filePath\":", " \"naïve 世界.txt\"}"] {
        body += &sse(
            "content_block_delta",
            json!({"type": "content_block_delta", "index": 2, "delta": {"type": "input_json_delta", "partial_json": piece}}),
        );
    }
    body += &sse("content_block_stop", json!({"type": "content_block_stop", "index": 2}));
    // Input sent whole in the start event, as some compatible servers do.
    body += &sse(
        "content_block_start",
        json!({"type": "content_block_start", "index": 4, "content_block": {"type": "tool_use", "id": "toolu_4", "name": "grep", "input": {"q": "x"}}}),
    );
    body += &sse("content_block_stop", json!({"type": "content_block_stop", "index": 4}));
    // A tool without parameters: no deltas at all.
    body += &sse(
        "content_block_start",
        json!({"type": "content_block_start", "index": 3, "content_block": {"type": "tool_use", "id": "toolu_3", "name": "now", "input": {}}}),
    );
    body += &sse("content_block_stop", json!({"type": "content_block_stop", "index": 3}));
    body += &sse(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": "tool_use", "stop_sequence": null}, "usage": {"output_tokens": 42}}),
    );
    body += &sse("message_stop", json!({"type": "message_stop"}));
    let fake = Fake::start(move |_| Reply::sse(&body, 5)).await;

    let events = complete_ok("anthropic", &access(&fake), tool_history()).await;
    assert_eq!(text(&events), "Two calls.");
    assert_eq!(
        tool_calls(&events),
        vec![
            ("toolu_1".into(), "glob".into(), json!({"pattern": "src/**/*.rs"})),
            ("toolu_2".into(), "read".into(), json!({"filePath": "naïve 世界.txt"})),
            ("toolu_4".into(), "grep".into(), json!({"q": "x"})),
            ("toolu_3".into(), "now".into(), json!({})),
        ]
    );
    assert_eq!(usage(&events), (100, 42));
    assert_eq!(stop(&events), StopReason::ToolUse);
}

#[tokio::test]
async fn anthropic_events_arrive_while_the_answer_is_still_streaming() {
    let go = Arc::new(Notify::new());
    let full = anthropic_text_stream(&["first ", "second"]);
    // Everything up to and including the first text delta, then a pause the
    // test ends only once it has seen that text.
    let cut = full.find("first ").unwrap();
    let cut = cut + full[cut..].find("\n\n").unwrap() + 2;
    let (head, tail) = (full[..cut].to_string(), full[cut..].to_string());
    let gate = go.clone();
    let fake = Fake::start(move |_| {
        Reply::sse(&head, 4096).then(Part::Wait(gate.clone())).then(Part::Bytes(tail.clone().into_bytes()))
    })
    .await;
    let mut completion = start("anthropic", &access(&fake), hello()).await.unwrap();
    let first_text = loop {
        let event = tokio::time::timeout(Duration::from_secs(10), completion.next())
            .await
            .expect("the first text arrives while the server still holds the rest")
            .unwrap()
            .unwrap()
            .unwrap();
        if let Event::Text(t) = event {
            break t;
        }
    };
    assert_eq!(first_text, "first ");
    go.notify_one();
    let (rest, err) = drain(&mut completion).await;
    assert!(err.is_none());
    assert_eq!(text(&rest), "second");
    assert_eq!(stop(&rest), StopReason::EndTurn);
}

/// The three built-ins export `provider-stream`: while an answer waits on
/// the model, the host holds the response and no instance of the provider
/// is alive (each piece is decoded in an instance that is gone once it
/// returns). A store alive holds part of the runtime's memory budget, as
/// every `complete` answer's instance does until its end.
#[tokio::test]
async fn no_instance_is_alive_while_an_answer_waits_on_the_model() {
    let streams = [
        ("anthropic", anthropic_text_stream(&["first ", "second"])),
        ("openai", openai_text_stream(&["first ", "second"])),
        ("ollama", ollama_text_stream(&["first ", "second"])),
    ];
    for (provider, full) in streams {
        let go = Arc::new(Notify::new());
        let at = full.find("first ").unwrap();
        let cut = at + full[at..].find('\n').unwrap() + 1;
        let cut = if provider == "ollama" { cut } else { cut + full[cut..].find('\n').unwrap() + 1 };
        let (head, tail) = (full[..cut].to_string(), full[cut..].to_string());
        let gate = go.clone();
        let fake = Fake::start(move |_| {
            let reply = Reply::stream(if provider == "ollama" { "application/x-ndjson" } else { "text/event-stream" }, &head, 4096);
            reply.then(Part::Wait(gate.clone())).then(Part::Bytes(tail.clone().into_bytes()))
        })
        .await;
        let access = if provider == "ollama" { ollama_access(&fake) } else { access(&fake) };
        let runtime = common::runtime();
        // The built-ins load in the background, each described in an
        // instance; only the answer's instances may count below.
        runtime.loads_settled().await;
        let mut completion = runtime.provider_complete(provider, &access, hello()).await.unwrap().unwrap();
        loop {
            let event = tokio::time::timeout(Duration::from_secs(10), completion.next()).await.unwrap().unwrap().unwrap();
            if matches!(event, Some(Event::Text(_))) {
                break;
            }
        }
        assert_eq!(runtime.memory_budget().1, 0, "{provider}: an instance is alive while the answer waits");
        go.notify_one();
        let (rest, err) = drain(&mut completion).await;
        assert!(err.is_none(), "{provider}: {err:?}");
        assert_eq!(text(&rest), "second", "{provider}");
    }
}

/// The built-ins with `deadline` as every plugin's.
fn runtime_with_deadline(deadline: Duration) -> hangar::runtime::Runtime {
    let mut policy = hangar::runtime::Policy::default();
    policy.defaults.deadline = deadline;
    let runtime = hangar::runtime::Runtime::new(hangar::runtime::RuntimeConfig { cache_dir: Some(common::cache_dir()), policy, ..Default::default() }).unwrap();
    runtime.add_builtins().unwrap();
    runtime
}

/// One pull of a held answer has one deadline, as a guest's `next()` has:
/// a vendor that keeps the body open with pings only (no event) ends the
/// pull when the deadline passes, though each read and step is short.
#[tokio::test]
async fn a_held_pull_that_makes_no_event_ends_at_the_deadline() {
    let full = anthropic_text_stream(&["never"]);
    let head = full[..full.find("event: content_block_delta").unwrap()].to_string();
    let fake = Fake::start(move |_| {
        let mut reply = Reply::sse(&head, 4096);
        // ~1 ms apart: 5,000 keep the body open well past the deadline.
        for _ in 0..5000 {
            reply = reply.then(Part::Bytes(b"event: ping\ndata: {\"type\": \"ping\"}\n\n".to_vec()));
        }
        reply
    })
    .await;
    let runtime = runtime_with_deadline(Duration::from_millis(1000));
    let mut completion = runtime.provider_complete("anthropic", &access(&fake), hello()).await.unwrap().unwrap();
    let started = std::time::Instant::now();
    let outcome = loop {
        match tokio::time::timeout(Duration::from_secs(30), completion.next()).await.expect("the pull ends") {
            Ok(Ok(Some(_))) => continue,
            other => break other,
        }
    };
    assert!(matches!(outcome, Err(hangar::runtime::RuntimeError::Deadline { .. })), "{:?}", outcome.map(|_| ()));
    assert!(started.elapsed() >= Duration::from_millis(1000), "not before the deadline");
}

/// The wait for a held answer's headers is under the plugin's deadline
/// too, as it was while the instance sent the request itself: a vendor
/// that takes the request and never answers ends the call at the
/// deadline, not at the request's own (much longer) timeout.
#[tokio::test]
async fn a_vendor_that_never_sends_headers_ends_the_call_at_the_deadline() {
    // Accepts connections and holds them, reading nothing, answering nothing.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let silent = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let runtime = runtime_with_deadline(Duration::from_millis(1000));
    let access = ProviderAccess { base_url: Some(format!("http://{addr}")), credential: Some(Secret::new(KEY.into())), ..Default::default() };
    let started = std::time::Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(30), runtime.provider_complete("anthropic", &access, hello())).await.expect("the call ends");
    assert!(matches!(outcome, Err(hangar::runtime::RuntimeError::Deadline { .. })), "{:?}", outcome.map(|_| ()));
    assert!(started.elapsed() >= Duration::from_millis(1000), "not before the deadline");
    silent.abort();
}

#[tokio::test]
async fn anthropic_429_is_retryable_with_retry_after() {
    let fake = Fake::start(|_| {
        Reply::json(429, json!({"type": "error", "error": {"type": "rate_limit_error", "message": "Number of request tokens has exceeded your per-minute rate limit"}}))
            .header("retry-after", "7")
    })
    .await;
    let (_, err) = complete_err("anthropic", &access(&fake), hello()).await;
    assert_kind(&err, ErrorKind::RateLimited, true);
    assert_eq!(err.status, Some(429));
    assert_eq!(err.retry_after_ms, Some(7000));
    assert!(err.message.contains("per-minute rate limit"), "{}", err.message);
}

/// The SDK writes JSON and reads retry waits without float tables of its
/// own (they would sit in every live instance's memory): the request still
/// says `0.7` for an `f32` 0.7, and fractional waits still count.
#[tokio::test]
async fn temperatures_go_out_short_and_fractional_waits_count() {
    for (provider, temperature) in [("anthropic", 0.7f32), ("openai", 0.7), ("ollama", 1.25)] {
        let fake = Fake::start(|_| Reply::json(500, json!({"error": {"message": "down"}}))).await;
        let mut req = hello();
        req.temperature = Some(temperature);
        complete_err(provider, &access(&fake), req).await;
        let body = String::from_utf8(fake.requests()[0].body.clone()).unwrap();
        assert!(body.contains(&format!(":{temperature:?}")) && !body.contains("99999"), "{provider}: {body}");
    }
    let cases = [("retry-after", "1.5", 1500), ("retry-after", "0.25", 250), ("retry-after-ms", "250.9", 250)];
    for (header, value, ms) in cases {
        let fake = Fake::start(move |_| Reply::json(429, json!({"error": {"message": "slow down"}})).header(header, value)).await;
        let (_, err) = complete_err("openai", &access(&fake), hello()).await;
        assert_eq!(err.retry_after_ms, Some(ms), "{header}: {value}");
    }
}

#[tokio::test]
async fn anthropic_401_500_and_529_are_classified() {
    let cases = [
        (401, "authentication_error", "invalid x-api-key", ErrorKind::Auth, false),
        (400, "invalid_request_error", "max_tokens: must be positive", ErrorKind::InvalidRequest, false),
        (500, "api_error", "Internal server error", ErrorKind::Server, true),
        (529, "overloaded_error", "Overloaded", ErrorKind::Overloaded, true),
    ];
    for (status, kind_name, message, kind, retryable) in cases {
        let fake =
            Fake::start(move |_| Reply::json(status, json!({"type": "error", "error": {"type": kind_name, "message": message}}))).await;
        let (_, err) = complete_err("anthropic", &access(&fake), hello()).await;
        assert_kind(&err, kind, retryable);
        assert_eq!(err.status, Some(status));
        assert_eq!(err.retry_after_ms, None);
        assert!(err.message.contains(message), "{status}: {}", err.message);
    }
}

#[tokio::test]
async fn anthropic_error_event_mid_stream() {
    let full = anthropic_text_stream(&["partial"]);
    let cut = full.find("content_block_stop").unwrap() - "event: ".len();
    let body = full[..cut].to_string()
        + &sse("error", json!({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}));
    let fake = Fake::start(move |_| Reply::sse(&body, 9)).await;
    let (events, err) = complete_err("anthropic", &access(&fake), hello()).await;
    assert_eq!(text(&events), "partial");
    assert_kind(&err, ErrorKind::Overloaded, true);
    assert!(err.message.contains("Overloaded"));
}

#[tokio::test]
async fn anthropic_truncated_stream_is_a_bad_response() {
    let full = anthropic_text_stream(&["never ", "finished"]);
    let cut = full.find("message_delta").unwrap() + 20;
    // Once with the connection dropped mid-chunked-body, once with a body
    // that ends cleanly but before `message_stop`.
    for abort in [true, false] {
        let head = full[..cut].to_string();
        let fake = Fake::start(move |_| {
            let reply = Reply::sse(&head, 11);
            if abort { reply.then(Part::Abort) } else { reply }
        })
        .await;
        let (events, err) = complete_err("anthropic", &access(&fake), hello()).await;
        assert_eq!(text(&events), "never finished");
        assert_kind(&err, ErrorKind::BadResponse, false);
        assert!(!events.iter().any(|e| matches!(e, Event::Stop(_))), "no stop on a cut stream");
    }
}

#[tokio::test]
async fn anthropic_malformed_json_is_a_bad_response() {
    let full = anthropic_text_stream(&["ok"]);
    let cut = full.find("event: content_block_start").unwrap();
    let body = full[..cut].to_string() + "event: content_block_start\ndata: {\"type\": \"content_block_start\",, \"index\": 0}\n\n";
    let fake = Fake::start(move |_| Reply::sse(&body, 4096)).await;
    let (_, err) = complete_err("anthropic", &access(&fake), hello()).await;
    assert_kind(&err, ErrorKind::BadResponse, false);
    assert!(err.message.contains("content_block_start"), "{}", err.message);
}

#[tokio::test]
async fn anthropic_component_never_sees_the_key_echoed_back() {
    // A hostile or careless server echoes the key in a header and in the
    // streamed text (split across chunks); the component gets `[redacted]`.
    let fake = Fake::start(|seen| {
        let key = seen.header("x-api-key").unwrap_or_default().to_string();
        // Cut every 6 bytes, so the key is split across chunks on the wire.
        Reply::sse(&anthropic_text_stream(&["your key is ", &key, "!"]), 6).header("x-echo", &key)
    })
    .await;
    let events = complete_ok("anthropic", &access(&fake), hello()).await;
    assert_eq!(text(&events), "your key is [redacted]!");
    assert!(!format!("{events:?}").contains(KEY));

    // The same on an error body: the message the host gets is scrubbed too.
    let fake = Fake::start(|seen| {
        let key = seen.header("x-api-key").unwrap_or_default().to_string();
        Reply::json(401, json!({"type": "error", "error": {"type": "authentication_error", "message": format!("bad key {key}")}}))
            .header("retry-after", &key)
    })
    .await;
    let (_, err) = complete_err("anthropic", &access(&fake), hello()).await;
    assert!(err.message.contains("bad key [redacted]") && !err.message.contains(KEY), "{}", err.message);
}

#[tokio::test]
async fn anthropic_redirect_is_not_followed_with_the_key() {
    let elsewhere = Fake::start(|_| Reply::sse(&anthropic_text_stream(&["stolen"]), 4096)).await;
    let target = format!("{}/v1/messages", elsewhere.url());
    let fake = Fake::start(move |_| Reply::json(307, json!({})).header("location", &target)).await;
    let (_, err) = complete_err("anthropic", &access(&fake), hello()).await;
    assert_kind(&err, ErrorKind::InvalidRequest, false);
    assert_eq!(err.status, Some(307));
    assert!(elsewhere.requests().is_empty(), "the redirect was followed");
}

#[tokio::test]
async fn anthropic_models_from_the_catalog_and_the_live_list() {
    let fake = Fake::start(|seen| {
        if seen.path.starts_with("/v1/models") {
            Reply::json(200, json!({"data": [
                {"type": "model", "id": "claude-sonnet-4-5-20250929", "display_name": "Claude Sonnet 4.5", "created_at": "2025-09-29T00:00:00Z"},
                {"type": "model", "id": "claude-brand-new-20990101", "display_name": "Claude Brand New", "created_at": "2099-01-01T00:00:00Z"}
            ], "has_more": false, "first_id": "claude-sonnet-4-5-20250929", "last_id": "claude-brand-new-20990101"}))
        } else {
            Reply::json(404, json!({}))
        }
    })
    .await;
    let runtime = common::runtime();

    // No key: the catalog, without touching the network.
    let no_key = ProviderAccess { base_url: Some(fake.url()), credential: None, ..Default::default() };
    let models = runtime.provider_models("anthropic", &no_key).await.unwrap().unwrap();
    assert!(fake.requests().is_empty());
    assert!(models.len() >= 5 && models.iter().all(|m| m.context_window.is_some()), "{models:?}");

    // A key: the live list first (names from it, windows from the catalog), then the rest.
    let models = runtime.provider_models("anthropic", &access(&fake)).await.unwrap().unwrap();
    let seen = fake.requests();
    assert_eq!(seen[0].header("x-api-key"), Some(KEY));
    assert_eq!(models[0].id, "claude-sonnet-4-5-20250929");
    assert_eq!(models[0].context_window, Some(200_000));
    assert_eq!((models[1].name.as_str(), models[1].context_window), ("Claude Brand New", None));
    assert!(models.iter().any(|m| m.id == "claude-haiku-4-5-20251001"));

    // The live list fails: still the catalog.
    let broken = Fake::start(|_| Reply::json(500, json!({"type": "error", "error": {"type": "api_error", "message": "down"}}))).await;
    let models = runtime.provider_models("anthropic", &access(&broken)).await.unwrap().unwrap();
    assert!(!broken.requests().is_empty() && models.iter().any(|m| m.id == "claude-sonnet-4-5-20250929"));
}

// ---------------------------------------------------------------- openai

fn openai_chunk(delta: Value, finish: Option<&str>) -> String {
    chunk(json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "test-model",
        "choices": [{"index": 0, "delta": delta, "logprobs": null, "finish_reason": finish}], "usage": null}))
}

fn openai_usage(prompt: u64, completion: u64) -> String {
    chunk(json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "test-model", "choices": [],
        "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}))
}

fn openai_text_stream(pieces: &[&str]) -> String {
    let mut body = openai_chunk(json!({"role": "assistant", "content": ""}), None);
    for piece in pieces {
        body += &openai_chunk(json!({"content": piece}), None);
    }
    body += &openai_chunk(json!({}), Some("stop"));
    body += &openai_usage(12, 7);
    body + "data: [DONE]\n\n"
}

#[tokio::test]
async fn openai_streams_text_cut_at_every_byte_boundary() {
    for every in [1, 5, 13, 4096] {
        let fake = Fake::start(move |_| Reply::sse(&openai_text_stream(&["Grü", "ße, 世界! ", "🚀 done"]), every)).await;
        let events = complete_ok("openai", &access(&fake), hello()).await;
        assert_eq!(text(&events), UNICODE, "cut every {every} bytes");
        assert_eq!(usage(&events), (12, 7));
        assert_eq!(stop(&events), StopReason::EndTurn);
    }
}

#[tokio::test]
async fn openai_request_uses_bearer_and_converts_history() {
    let fake = Fake::start(|_| Reply::sse(&openai_text_stream(&["ok"]), 4096)).await;
    complete_ok("openai", &access(&fake), tool_history()).await;
    let req = &fake.requests()[0];
    assert_eq!((req.method.as_str(), req.path.as_str()), ("POST", "/v1/chat/completions"));
    assert_eq!(req.header("authorization"), Some(format!("Bearer {KEY}").as_str()));
    assert_eq!(req.header("x-api-key"), None);
    let body = req.json();
    assert_eq!(body["stream"], true);
    assert_eq!(body["stream_options"], json!({"include_usage": true}));
    assert_eq!(body["max_tokens"], 1024);
    assert_eq!(body["tools"][0], json!({"type": "function", "function": {"name": "glob", "description": "Finds files.",
        "parameters": {"type": "object", "properties": {"pattern": {"type": "string"}}}}}));
    assert_eq!(
        body["messages"],
        json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "List and read."},
            {"role": "assistant", "content": "Looking.", "tool_calls": [
                {"id": "call_a", "type": "function", "function": {"name": "glob", "arguments": "{\"pattern\":\"*.rs\"}"}},
                {"id": "call_b", "type": "function", "function": {"name": "read", "arguments": "{\"filePath\":\"x\"}"}}]},
            {"role": "tool", "tool_call_id": "call_a", "content": "a.rs"},
            {"role": "tool", "tool_call_id": "call_b", "content": "Error: no such file"},
            {"role": "user", "content": "Go on."}
        ])
    );
}

#[tokio::test]
async fn openai_parallel_tool_calls_assembled_by_index() {
    let mut body = openai_chunk(json!({"role": "assistant", "content": null}), None);
    body += &openai_chunk(
        json!({"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "glob", "arguments": ""}}]}),
        None,
    );
    body += &openai_chunk(json!({"tool_calls": [{"index": 0, "function": {"arguments": "{\"pattern\""}}]}), None);
    body += &openai_chunk(
        json!({"tool_calls": [{"index": 1, "id": "call_2", "type": "function", "function": {"name": "read", "arguments": "{\"file"}}]}),
        None,
    );
    // Interleaved: more of the first call after the second began.
    body += &openai_chunk(json!({"tool_calls": [{"index": 0, "function": {"arguments": ": \"*.md\"}"}}]}), None);
    body += &openai_chunk(json!({"tool_calls": [{"index": 1, "function": {"arguments": "Path\": \"ü.txt\"}"}}]}), None);
    body += &openai_chunk(json!({}), Some("tool_calls"));
    body += &openai_usage(50, 20);
    body += "data: [DONE]\n\n";
    let fake = Fake::start(move |_| Reply::sse(&body, 3)).await;
    let events = complete_ok("openai", &access(&fake), tool_history()).await;
    assert_eq!(
        tool_calls(&events),
        vec![
            ("call_1".into(), "glob".into(), json!({"pattern": "*.md"})),
            ("call_2".into(), "read".into(), json!({"filePath": "ü.txt"})),
        ]
    );
    assert_eq!(usage(&events), (50, 20));
    assert_eq!(stop(&events), StopReason::ToolUse);
}

#[tokio::test]
async fn openai_errors_are_classified() {
    let fake = Fake::start(|_| {
        Reply::json(429, json!({"error": {"message": "Rate limit reached for requests", "type": "requests", "param": null, "code": "rate_limit_exceeded"}}))
            .header("retry-after", "2")
    })
    .await;
    let (_, err) = complete_err("openai", &access(&fake), hello()).await;
    assert_kind(&err, ErrorKind::RateLimited, true);
    assert_eq!(err.retry_after_ms, Some(2000));
    assert!(err.message.contains("Rate limit reached"), "{}", err.message);

    let fake = Fake::start(|_| {
        Reply::json(401, json!({"error": {"message": "Incorrect API key provided", "type": "invalid_request_error", "code": "invalid_api_key"}}))
    })
    .await;
    let (_, err) = complete_err("openai", &access(&fake), hello()).await;
    assert_kind(&err, ErrorKind::Auth, false);
    assert!(err.message.contains("Incorrect API key"));

    let fake = Fake::start(|_| Reply::json(500, json!({"error": {"message": "The server had an error", "type": "server_error"}}))).await;
    let (_, err) = complete_err("openai", &access(&fake), hello()).await;
    assert_kind(&err, ErrorKind::Server, true);
    assert!(err.message.contains("The server had an error"));

    // An error object in place of a chunk, after the 200 (OpenRouter does this).
    let body = openai_chunk(json!({"content": "par"}), None) + &chunk(json!({"error": {"code": 502, "message": "Provider returned error"}}));
    let fake = Fake::start(move |_| Reply::sse(&body, 7)).await;
    let (events, err) = complete_err("openai", &access(&fake), hello()).await;
    assert_eq!(text(&events), "par");
    assert_kind(&err, ErrorKind::Server, true);
    assert!(err.message.contains("Provider returned error"));
}

#[tokio::test]
async fn openai_truncated_and_malformed_streams_are_bad_responses() {
    let full = openai_text_stream(&["cut ", "here"]);
    let cut = full.find("\"stop\"").unwrap() - 40;
    for abort in [true, false] {
        let head = full[..cut].to_string();
        let fake = Fake::start(move |_| {
            let reply = Reply::sse(&head, 8);
            if abort { reply.then(Part::Abort) } else { reply }
        })
        .await;
        let (_, err) = complete_err("openai", &access(&fake), hello()).await;
        assert_kind(&err, ErrorKind::BadResponse, false);
    }

    let body = openai_chunk(json!({"content": "a"}), None) + "data: {\"choices\": [oops\n\n";
    let fake = Fake::start(move |_| Reply::sse(&body, 4096)).await;
    let (_, err) = complete_err("openai", &access(&fake), hello()).await;
    assert_kind(&err, ErrorKind::BadResponse, false);
    assert!(err.message.contains("oops"), "{}", err.message);
}

#[tokio::test]
async fn openai_key_echoed_back_is_redacted() {
    let fake = Fake::start(|seen| {
        let key = seen.header("authorization").unwrap_or_default().trim_start_matches("Bearer ").to_string();
        Reply::sse(&openai_text_stream(&["echo: ", &key]), 5).header("x-echo", &key)
    })
    .await;
    let events = complete_ok("openai", &access(&fake), hello()).await;
    assert_eq!(text(&events), "echo: [redacted]");
}

#[tokio::test]
async fn openai_compatible_server_without_key_and_models() {
    // A local llama.cpp-like server: no key configured, base URL with `/v1`.
    let fake = Fake::start(|seen| match seen.path.as_str() {
        "/v1/models" => Reply::json(200, json!({"object": "list", "data": [
            {"id": "qwen2.5-7b", "object": "model", "owned_by": "llamacpp", "meta": {"n_ctx_train": 32768}},
            {"id": "plain", "object": "model", "owned_by": "me"}]})),
        _ => Reply::sse(&openai_text_stream(&["local"]), 4096),
    })
    .await;
    let no_key = ProviderAccess { base_url: Some(format!("{}/v1/", fake.url())), credential: None, ..Default::default() };
    let events = complete_ok("openai", &no_key, hello()).await;
    assert_eq!(text(&events), "local");
    let models = common::runtime().provider_models("openai", &no_key).await.unwrap().unwrap();
    assert_eq!(models.len(), 2);
    assert_eq!((models[0].id.as_str(), models[0].context_window), ("qwen2.5-7b", Some(32768)));
    assert_eq!(models[1].context_window, None);
    assert!(fake.requests().iter().all(|r| r.header("authorization").is_none()));
}

// ---------------------------------------------------------------- ollama

fn ollama_line(message: Value, done: bool) -> String {
    let mut line = json!({"model": "llama3.2", "created_at": "2025-01-01T00:00:00Z", "message": message, "done": done});
    if done {
        let extra = json!({"done_reason": "stop", "total_duration": 1000, "load_duration": 10,
            "prompt_eval_count": 26, "prompt_eval_duration": 100, "eval_count": 9, "eval_duration": 200});
        line.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    }
    line.to_string() + "\n"
}

fn ollama_text_stream(pieces: &[&str]) -> String {
    let mut body: String = pieces.iter().map(|p| ollama_line(json!({"role": "assistant", "content": p}), false)).collect();
    body += &ollama_line(json!({"role": "assistant", "content": ""}), true);
    body
}

fn ollama_access(fake: &Fake) -> ProviderAccess {
    ProviderAccess { base_url: Some(fake.url()), credential: None, ..Default::default() }
}

#[tokio::test]
async fn ollama_streams_ndjson_cut_at_every_byte_boundary() {
    for every in [1, 4, 17, 4096] {
        let fake = Fake::start(move |_| Reply::stream("application/x-ndjson", &ollama_text_stream(&["Grü", "ße, 世界! ", "🚀 done"]), every)).await;
        let events = complete_ok("ollama", &ollama_access(&fake), hello()).await;
        assert_eq!(text(&events), UNICODE, "cut every {every} bytes");
        assert_eq!(usage(&events), (26, 9));
        assert_eq!(stop(&events), StopReason::EndTurn);
    }
}

#[tokio::test]
async fn ollama_tool_calls_and_history_conversion() {
    let mut body = ollama_line(json!({"role": "assistant", "content": "", "tool_calls": [
        {"function": {"name": "glob", "arguments": {"pattern": "*.rs"}}},
        {"function": {"name": "read", "arguments": {"filePath": "naïve.txt"}}}]}), false);
    body += &ollama_line(json!({"role": "assistant", "content": ""}), true);
    let fake = Fake::start(move |_| Reply::stream("application/x-ndjson", &body, 10)).await;
    let events = complete_ok("ollama", &ollama_access(&fake), tool_history()).await;
    let calls = tool_calls(&events);
    assert_eq!(calls.len(), 2);
    assert_eq!((calls[0].1.as_str(), &calls[0].2), ("glob", &json!({"pattern": "*.rs"})));
    assert_eq!((calls[1].1.as_str(), &calls[1].2), ("read", &json!({"filePath": "naïve.txt"})));
    assert_ne!(calls[0].0, calls[1].0, "made-up ids are distinct");
    assert_eq!(stop(&events), StopReason::ToolUse);

    let req = &fake.requests()[0];
    assert_eq!(req.path, "/api/chat");
    assert_eq!(req.header("authorization"), None);
    let body = req.json();
    assert_eq!(body["stream"], true);
    assert_eq!(body["options"], json!({"num_predict": 1024, "temperature": 0.5}));
    assert_eq!(body["tools"][0]["function"]["name"], "glob");
    assert_eq!(
        body["messages"],
        json!([
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "List and read."},
            {"role": "assistant", "content": "Looking.", "tool_calls": [
                {"id": "call_a", "function": {"name": "glob", "arguments": {"pattern": "*.rs"}}},
                {"id": "call_b", "function": {"name": "read", "arguments": {"filePath": "x"}}}]},
            {"role": "tool", "tool_call_id": "call_a", "tool_name": "glob", "content": "a.rs"},
            {"role": "tool", "tool_call_id": "call_b", "tool_name": "read", "content": "Error: no such file"},
            {"role": "user", "content": "Go on."}
        ])
    );
}

#[tokio::test]
async fn ollama_errors_truncation_and_unreachable() {
    let fake = Fake::start(|_| Reply::json(404, json!({"error": "model \"nope\" not found, try pulling it first"}))).await;
    let (_, err) = complete_err("ollama", &ollama_access(&fake), hello()).await;
    assert_kind(&err, ErrorKind::InvalidRequest, false);
    assert!(err.message.contains("try pulling it first"), "{}", err.message);

    let fake = Fake::start(|_| Reply::json(500, json!({"error": "llama runner process has terminated"}))).await;
    let (_, err) = complete_err("ollama", &ollama_access(&fake), hello()).await;
    assert_kind(&err, ErrorKind::Server, true);

    let full = ollama_text_stream(&["one ", "two"]);
    let cut = full.rfind("\"done\":true").unwrap();
    let head = full[..cut].to_string();
    let fake = Fake::start(move |_| Reply::stream("application/x-ndjson", &head, 6).then(Part::Abort)).await;
    let (events, err) = complete_err("ollama", &ollama_access(&fake), hello()).await;
    assert_eq!(text(&events), "one two");
    assert_kind(&err, ErrorKind::BadResponse, false);

    // Nothing listens there: the message names the address tried.
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let gone = ProviderAccess { base_url: Some(format!("http://{addr}")), credential: None, ..Default::default() };
    let (_, err) = complete_err("ollama", &gone, hello()).await;
    assert_kind(&err, ErrorKind::Connection, true);
    assert!(err.message.contains(&format!("http://{addr}")), "{}", err.message);
}

#[tokio::test]
async fn ollama_models_from_tags_and_show() {
    let fake = Fake::start(|seen| match seen.path.as_str() {
        "/api/tags" => Reply::json(200, json!({"models": [
            {"name": "llama3.2:latest", "model": "llama3.2:latest", "size": 2019393189, "details": {"family": "llama"}},
            {"name": "mystery:7b", "model": "mystery:7b", "size": 1, "details": {}}]})),
        "/api/show" if seen.json()["model"] == "llama3.2:latest" => Reply::json(200, json!({"model_info": {
            "general.architecture": "llama", "llama.context_length": 131072, "llama.embedding_length": 3072}})),
        _ => Reply::json(404, json!({"error": "model not found"})),
    })
    .await;
    let models = common::runtime().provider_models("ollama", &ollama_access(&fake)).await.unwrap().unwrap();
    assert_eq!(models.len(), 2);
    assert_eq!((models[0].id.as_str(), models[0].context_window), ("llama3.2:latest", Some(131072)));
    assert_eq!((models[1].id.as_str(), models[1].context_window), ("mystery:7b", None));
}

// ------------------------------------------------------------ the grant

#[tokio::test]
async fn a_request_outside_the_grant_is_denied() {
    // The component resolves an `OLLAMA_HOST`-style address without a scheme
    // to `http://127.0.0.1:PORT`. That origin is neither in the manifest's
    // grant nor the configured base URL's origin (the host cannot read one
    // from `127.0.0.1:PORT`), so the host refuses it and nothing arrives.
    let fake = Fake::start(|_| Reply::stream("application/x-ndjson", &ollama_text_stream(&["no"]), 4096)).await;
    let schemeless = ProviderAccess { base_url: Some(fake.addr.to_string()), credential: None, ..Default::default() };
    let (_, err) = complete_err("ollama", &schemeless, hello()).await;
    assert_kind(&err, ErrorKind::Denied, false);
    assert!(err.message.contains(&fake.addr.port().to_string()), "{}", err.message);
    assert!(fake.requests().is_empty());
}

#[tokio::test]
async fn a_connection_dropped_before_the_answer_is_retryable() {
    // Accepts, reads the request, and closes without a status line: what a
    // crashed or restarting server looks like. Nothing reached the client,
    // so the host may try again.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let _ = read_request(&mut socket).await;
            drop(socket);
        }
    });
    let dropped = ProviderAccess { base_url: Some(format!("http://{addr}")), credential: Some(Secret::new(KEY.into())), ..Default::default() };
    for provider in ["anthropic", "openai", "ollama"] {
        let (_, err) = complete_err(provider, &dropped, hello()).await;
        assert_kind(&err, ErrorKind::Connection, true);
    }
}
