//! Figures for the capabilities that came after issue 7 (issue 21, item 4),
//! against the real `hangar` binary (release build), the real `anthropic`
//! provider component and a scripted fake of its API on loopback.
//!
//! - resume: a session whose run streamed `BENCH_EVENTS` (default 10,000)
//!   text deltas, replayed on `GET /sessions/{id}/events` with
//!   `Last-Event-ID: 0` and from the middle, and on the run's own events
//!   route (which ends after `done`): time to the first byte and to the
//!   last event. Interleaved, `BENCH_ITERS` rounds (default 50).
//! - permission: the model calls `read` once; one agent's rules ask first
//!   (the client answers `once` as soon as it sees `permission_request`),
//!   the other's allow it. Time from `tool_use`, and from
//!   `permission_request`, to the `tool_result` event. A fresh session each
//!   round, sides interleaved, `BENCH_ITERS` rounds (default 200).
//! - mcp: `tools/call` of `read` (a 1 KB file) through hangar's
//!   `/sessions/{id}/mcp` against the same call to a Python MCP server made
//!   with the official SDK (`benches/support/mcp_read_server.py`, a plain
//!   `open`). Both over Streamable HTTP on loopback from one Rust client
//!   (rmcp), each session initialized beforehand; interleaved,
//!   `BENCH_ITERS` calls a side (default 1,000).
//!
//!     cargo bench --bench features                # all three
//!     cargo bench --bench features -- resume      # one of them

#[allow(dead_code)]
#[path = "../tests/common/fake.rs"]
mod fake;
#[path = "support/launch.rs"]
mod launch;
#[allow(dead_code)]
#[path = "../tests/common/sse.rs"]
mod sse;
#[path = "support/stats.rs"]
mod stats;

use std::time::{Duration, Instant};

use fake::{FakeServer, Reply, anthropic};
use futures::StreamExt;
use serde_json::{Value, json};

struct Setup {
    hangar: launch::Hangar,
    fake: FakeServer,
    client: reqwest::Client,
    work: tempfile::TempDir,
    /// Declared last: removed after the server has stopped.
    _cache: tempfile::TempDir,
}

/// 1 KB of text, as figure 1 reads.
const FILE: &str = "a.txt";

async fn setup() -> Setup {
    let fake = FakeServer::start(Vec::new()).await;
    let cache = tempfile::tempdir().unwrap();
    let client = reqwest::Client::builder().pool_max_idle_per_host(64).build().unwrap();
    launch::warm(cache.path(), &client).await;
    let hangar = launch::start(cache.path());
    let work = tempfile::tempdir().unwrap();
    let text: String = (0..16).map(|i| format!("{:<63}\n", format!("line {i:02} of the file that the benchmark reads"))).collect();
    std::fs::write(work.path().join(FILE), text).unwrap();
    launch::use_fake_anthropic(&client, &hangar, &fake.url).await;
    Setup { hangar, fake, client, work, _cache: cache }
}

impl Setup {
    /// An agent with the built-in `read` and these permission rules.
    async fn agent(&self, rules: Value) -> String {
        let r = self
            .client
            .post(self.hangar.url("/agents"))
            .json(&json!({"name": "bench", "instructions": "", "tools": ["read"],
                "provider": {"id": "anthropic", "model": "claude-test", "max_tokens": 512}, "permissions": rules}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        r.json::<Value>().await.unwrap()["id"].as_str().unwrap().into()
    }

    async fn session(&self) -> String {
        let s: Value =
            self.client.post(self.hangar.url("/sessions")).json(&json!({"work_dir": self.work.path()})).send().await.unwrap().json().await.unwrap();
        s["id"].as_str().expect("session id").to_string()
    }

    async fn stream(&self, session: &str, agent: &str) -> reqwest::Response {
        let resp = self
            .client
            .post(self.hangar.url(&format!("/sessions/{session}/message/stream")))
            .json(&json!({"agent_id": agent, "message": "go"}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        resp
    }
}

fn row(name: &str, s: &stats::Summary) {
    println!("| {name} | {:.2} | {:.2} | {:.2} |", stats::ms(s.p50), stats::ms(s.p99), stats::ms(s.mean));
}

/// Reads an SSE body until the event with id `last`: (first byte, last event).
async fn replay(resp: reqwest::Response, started: Instant, last: u64) -> (Duration, Duration) {
    assert_eq!(resp.status(), 200);
    let needle = format!("id: {last}\n").into_bytes();
    let mut body = resp.bytes_stream();
    let mut first = None;
    // The end of the previous chunk, so a needle split across two is seen.
    let mut tail: Vec<u8> = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.expect("the replay broke off");
        first.get_or_insert_with(|| started.elapsed());
        tail.extend_from_slice(&chunk);
        if tail.windows(needle.len()).any(|w| w == needle) {
            return (first.unwrap(), started.elapsed());
        }
        let keep = tail.len().saturating_sub(needle.len());
        tail.drain(..keep);
    }
    panic!("the replay ended before event {last}");
}

async fn resume(s: &Setup) {
    let events: usize = stats::setting("BENCH_EVENTS", 10_000);
    let n = stats::iters(50);
    let agent = s.agent(json!([])).await;
    let session = s.session().await;
    let parts: Vec<String> = (0..events).map(|i| format!("w{i} ")).collect();
    let parts: Vec<&str> = parts.iter().map(String::as_str).collect();
    s.fake.push(Reply::sse(anthropic::text_answer(&parts, 10, events as u64)));
    let written = Instant::now();
    let resp = s.stream(&session, &agent).await;
    let run = resp.headers()["content-location"].to_str().unwrap().rsplit('/').next().unwrap().to_string();
    let all = sse::Events::new(resp).all().await;
    let written = written.elapsed();
    let done = all.last().expect("events");
    assert_eq!(done.name, "done", "{done:?}");
    let last = done.id.expect("an id");
    let texts = all.iter().filter(|e| e.name == "text").count();
    assert_eq!(texts, events, "one `text` event per delta");

    let middle = last / 2;
    let sides: [(&str, String, u64); 3] = [
        ("session events, `Last-Event-ID: 0`", format!("/sessions/{session}/events"), 0),
        ("session events, from the middle", format!("/sessions/{session}/events"), middle),
        ("run events, `Last-Event-ID: 0` (ends after `done`)", format!("/sessions/{session}/runs/{run}/events"), 0),
    ];
    let mut first: Vec<Vec<Duration>> = vec![Vec::new(); sides.len()];
    let mut whole: Vec<Vec<Duration>> = vec![Vec::new(); sides.len()];
    for i in 0..n + 3 {
        for (k, (_, path, after)) in sides.iter().enumerate() {
            let t = Instant::now();
            let resp = s.client.get(s.hangar.url(path)).header("Last-Event-ID", after.to_string()).send().await.unwrap();
            let (f, w) = replay(resp, t, last).await;
            if i >= 3 {
                first[k].push(f);
                whole[k].push(w);
            }
        }
    }
    println!("\n## resume ({}; {n} interleaved rounds after 3 warm-up)\n", stats::machine());
    println!(
        "One run of {events} text deltas: {} events stored (last id {last}), streamed live in {:.0} ms.\n",
        all.len(),
        stats::ms(written)
    );
    println!("| replay | events | first byte p50 ms | p99 ms | last event p50 ms | p99 ms | events/s (p50) |");
    println!("|---|---|---|---|---|---|---|");
    for (k, (name, _, after)) in sides.iter().enumerate() {
        let f = stats::summarize(&mut first[k]);
        let w = stats::summarize(&mut whole[k]);
        let count = last - after;
        println!(
            "| {name} | {count} | {:.2} | {:.2} | {:.1} | {:.1} | {:.0} |",
            stats::ms(f.p50),
            stats::ms(f.p99),
            stats::ms(w.p50),
            stats::ms(w.p99),
            count as f64 / w.p50.as_secs_f64()
        );
    }
    println!();
}

/// Times of one round of the permission figure.
struct Round {
    use_to_result: Duration,
    /// `permission_request` to `tool_result`, and the reply's own request.
    ask_to_result: Option<(Duration, Duration)>,
}

async fn permission_round(s: &Setup, agent: &str) -> Round {
    let session = s.session().await;
    let input = json!({"filePath": FILE}).to_string();
    s.fake.push(Reply::sse(anthropic::tool_answer("r1", "read", &[&input], 5, 5)));
    s.fake.push(Reply::sse(anthropic::text_answer(&["done"], 5, 1)));
    let mut events = sse::Events::new(s.stream(&session, agent).await);
    let (mut used, mut asked, mut reply, mut result) = (None, None, None, None);
    while let Some(event) = events.next().await {
        let now = Instant::now();
        match event.name.as_str() {
            "tool_use" => used = Some(now),
            "permission_request" => {
                asked = Some(now);
                let request = event.json()["request_id"].as_str().unwrap().to_string();
                let r = s
                    .client
                    .post(s.hangar.url(&format!("/sessions/{session}/permissions/{request}")))
                    .json(&json!({"reply": "once"}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
                reply = Some(now.elapsed());
            }
            "tool_result" => {
                assert_eq!(event.json()["is_error"], false, "{}", event.data);
                result = Some(now);
            }
            "done" => break,
            "error" => panic!("the run failed: {}", event.data),
            _ => {}
        }
    }
    let (used, result) = (used.expect("tool_use"), result.expect("tool_result"));
    Round { use_to_result: result - used, ask_to_result: asked.map(|a| (result - a, reply.unwrap())) }
}

async fn permission(s: &Setup) {
    let n = stats::iters(200);
    let ask = s.agent(json!([{"tool": "read", "pattern": "*", "action": "ask"}])).await;
    let allow = s.agent(json!([{"tool": "read", "pattern": "*", "action": "allow"}])).await;
    let (mut allowed, mut asked_use, mut asked, mut replies) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..n + 10 {
        let a = permission_round(s, &allow).await;
        let q = permission_round(s, &ask).await;
        assert!(a.ask_to_result.is_none(), "an allowed call was asked");
        let (ask_to_result, reply) = q.ask_to_result.expect("the asked call asked");
        if i >= 10 {
            allowed.push(a.use_to_result);
            asked_use.push(q.use_to_result);
            asked.push(ask_to_result);
            replies.push(reply);
        }
    }
    println!("\n## permission ({}; {n} interleaved rounds after 10 warm-up)\n", stats::machine());
    println!("| `read` of 1 KB | p50 ms | p99 ms | mean ms |");
    println!("|---|---|---|---|");
    let allowed = stats::summarize(&mut allowed);
    let asked_use = stats::summarize(&mut asked_use);
    row("allowed: `tool_use` → `tool_result`", &allowed);
    row("asked: `tool_use` → `tool_result` (client replies at once)", &asked_use);
    row("asked: `permission_request` → `tool_result`", &stats::summarize(&mut asked));
    row("asked: the reply's `POST /sessions/{id}/permissions/{request}`", &stats::summarize(&mut replies));
    println!("\nadded by asking, p50: {:.2} ms\n", stats::ms(asked_use.p50) - stats::ms(allowed.p50));
}

type McpClient = rmcp::service::RunningService<rmcp::RoleClient, ()>;

async fn mcp_connect(url: &str) -> McpClient {
    use rmcp::ServiceExt;
    use rmcp::transport::StreamableHttpClientTransport;
    use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
    let http = reqwest013::Client::builder().build().unwrap();
    let transport = StreamableHttpClientTransport::with_client(http, StreamableHttpClientTransportConfig::with_uri(url));
    ().serve(transport).await.unwrap_or_else(|e| panic!("MCP initialize at {url}: {e}"))
}

async fn mcp_read(client: &McpClient) -> String {
    let args = json!({"filePath": FILE}).as_object().unwrap().clone();
    let result = client.peer().call_tool(rmcp::model::CallToolRequestParams::new("read").with_arguments(args)).await.unwrap();
    assert_ne!(result.is_error, Some(true), "{result:?}");
    serde_json::to_string(&result.content).unwrap()
}

async fn mcp(s: &Setup) {
    let n = stats::iters(1000);
    // reqwest 0.13 is built without a TLS provider of its own; loopback
    // HTTP needs none, but building a client asks for one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../benches/support/mcp_read_server.py");
    let mut python = std::process::Command::new("python3")
        .arg(script)
        .arg(port.to_string())
        .arg(s.work.path())
        .spawn()
        .expect("python3 with the `mcp` package (pip install mcp)");
    let py_url = format!("http://127.0.0.1:{port}/mcp");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the Python MCP server did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let session = s.session().await;
    let hangar = mcp_connect(&s.hangar.url(&format!("/sessions/{session}/mcp"))).await;
    let py = mcp_connect(&py_url).await;
    for client in [&hangar, &py] {
        assert!(mcp_read(client).await.contains("line 15 of the file"));
    }
    let (mut through, mut direct) = (Vec::with_capacity(n), Vec::with_capacity(n));
    for i in 0..n + 50 {
        let t = Instant::now();
        mcp_read(&hangar).await;
        let h = t.elapsed();
        let t = Instant::now();
        mcp_read(&py).await;
        let p = t.elapsed();
        if i >= 50 {
            through.push(h);
            direct.push(p);
        }
    }
    let _ = hangar.cancel().await;
    let _ = py.cancel().await;
    let _ = python.kill();
    let _ = python.wait();
    let h = stats::summarize(&mut through);
    let p = stats::summarize(&mut direct);
    println!("\n## mcp ({}; {n} interleaved calls a side after 50 warm-up)\n", stats::machine());
    println!("| `tools/call` `read` (1 KB), initialized session | p50 µs | p99 µs | mean µs |");
    println!("|---|---|---|---|");
    for (name, x) in [("hangar `/sessions/{id}/mcp` (WASM `read`, call recorded as events)", &h), ("Python MCP SDK server, plain `open`", &p)] {
        println!("| {name} | {:.0} | {:.0} | {:.0} |", stats::us(x.p50), stats::us(x.p99), stats::us(x.mean));
    }
    println!("\nhangar / Python, p50: {:.2}×\n", h.p50.as_secs_f64() / p.p50.as_secs_f64());
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let want = |name: &str| args.is_empty() || args.iter().any(|a| a == name);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let s = setup().await;
        if want("resume") {
            resume(&s).await;
        }
        if want("permission") {
            permission(&s).await;
        }
        if want("mcp") {
            mcp(&s).await;
        }
    });
}
