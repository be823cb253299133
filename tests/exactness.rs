//! Exactness for API users and operators (issue 11): malformed JSON is 400,
//! lists are paginated with `Link`, model aliases resolve, `GET /metrics`
//! parses as Prometheus text, every request and run is one log line, and
//! the SQLite WAL stays bounded. The real binary over loopback.

mod common;

use std::collections::HashMap;

use common::fake::{FakeServer, Reply, anthropic};
use common::server::Server;
use serde_json::{Value, json};

/// The `rel="next"` target of a `Link` header, if any.
fn next_link(resp: &reqwest::Response) -> Option<String> {
    let link = resp.headers().get("link")?.to_str().unwrap();
    assert!(link.ends_with("; rel=\"next\""), "{link}");
    Some(link.trim_start_matches('<').split('>').next().unwrap().to_string())
}

/// Every item of a list, following `Link` from `first` to the end; also
/// the number of pages.
async fn walk(server: &Server, first: &str) -> (Vec<Value>, usize) {
    let mut items = Vec::new();
    let mut pages = 0;
    let mut next = Some(first.to_string());
    while let Some(path) = next {
        let resp = server.client.get(server.url(&path)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        next = next_link(&resp);
        let page: Vec<Value> = resp.json().await.unwrap();
        assert!(!page.is_empty() || next.is_none(), "an empty page must be the last: {path}");
        items.extend(page);
        pages += 1;
    }
    (items, pages)
}

fn ids(items: &[Value]) -> Vec<String> {
    items.iter().map(|i| i["id"].as_str().unwrap().to_string()).collect()
}

#[tokio::test]
async fn malformed_json_is_400_and_a_body_must_be_an_object() {
    let server = Server::start(&[]);
    let raw = |path: &str, body: &'static str| {
        server.client.post(server.url(path)).header("content-type", "application/json").body(body)
    };
    // Truncated: a syntax error, whatever the route's type would make of it.
    for path in ["/sessions", "/agents"] {
        for body in ["[1,2", "{\"work_dir\": ", "{\"name\": 1,", "nul"] {
            let (status, err) = server.send(raw(path, body)).await;
            assert_eq!(status, 400, "{path} {body}: {err}");
            assert_eq!(err["code"], "malformed_json");
        }
    }
    // Well-formed JSON that is not an object is an invalid value, and
    // creates nothing.
    for body in ["[]", "1", "\"x\"", "null"] {
        let (status, err) = server.send(raw("/sessions", body)).await;
        assert_eq!(status, 422, "{body}: {err}");
        assert_eq!(err["code"], "invalid_request");
    }
    let (_, sessions) = server.get("/sessions").await;
    assert_eq!(sessions, json!([]));
    // A wrong type in a well-formed object is a 422 naming the field.
    let (status, err) = server.send(raw("/agents", "{\"name\": 1}")).await;
    assert_eq!(status, 422, "{err}");
    assert!(err["error"].as_str().unwrap().contains("name"), "{err}");
    // And a body that is not JSON at all says so: 415.
    let (status, _) = server.send(server.client.post(server.url("/sessions")).body("{}")).await;
    assert_eq!(status, 415);
    // A query value of the wrong type is a JSON 422 too.
    let (status, err) = server.get("/sessions?limit=many").await;
    assert_eq!(status, 422, "{err}");
    let (status, err) = server.get("/sessions?limit=0").await;
    assert_eq!(status, 422, "{err}");
    let (status, err) = server.get("/agents?limit=1001").await;
    assert_eq!(status, 422, "{err}");
}

#[tokio::test]
async fn sessions_are_walked_to_the_end_through_link() {
    let server = Server::start(&[]);
    let mut created = Vec::new();
    for _ in 0..25 {
        let (status, session) = server.post("/sessions", json!({})).await;
        assert_eq!(status, 201);
        created.push(session["id"].as_str().unwrap().to_string());
    }
    // ULIDs made in one millisecond still sort in creation order here
    // (monotonic within the process is not promised): compare as sets of
    // sorted ids, which is the list's order.
    let mut expected = created.clone();
    expected.sort();

    let (all, pages) = walk(&server, "/sessions?limit=10").await;
    assert_eq!(pages, 3);
    assert_eq!(ids(&all), expected);
    assert!(all.iter().all(|s| s["history"] == json!([])), "histories are listed by default");

    // Without histories, and the next links keep saying so.
    let (bare, pages) = walk(&server, "/sessions?limit=7&history=false").await;
    assert_eq!(pages, 4);
    assert_eq!(ids(&bare), expected);
    assert!(bare.iter().all(|s| s.get("history").is_none() && s.get("work_dir").is_some()), "{bare:?}");

    // A page that ends exactly at the end sends no Link.
    let resp = server.client.get(server.url(&format!("/sessions?limit=5&after={}", expected[19]))).send().await.unwrap();
    assert!(next_link(&resp).is_none());
    let last: Vec<Value> = resp.json().await.unwrap();
    assert_eq!(ids(&last), expected[20..]);

    // The default page is the whole of a short list, still a plain array.
    let (status, plain) = server.get("/sessions").await;
    assert_eq!(status, 200);
    assert_eq!(plain.as_array().unwrap().len(), 25);
}

#[tokio::test]
async fn agents_plugins_and_runs_are_walked_through_link() {
    let fake = FakeServer::start(Vec::new()).await;
    let server = Server::start(&[]);
    let (status, _) =
        server.put("/provider/auth", json!({"providers": {"anthropic": {"type": "api_key", "key": "sk-ant-exactness-7c1f", "base_url": fake.url}}})).await;
    assert_eq!(status, 200);
    let mut agents = Vec::new();
    for i in 0..5 {
        let (status, agent) = server
            .post("/agents", json!({"name": format!("a{i}"), "provider": {"id": "anthropic", "model": "claude-sonnet-4-5"}}))
            .await;
        assert_eq!(status, 201, "{agent}");
        agents.push(agent["id"].as_str().unwrap().to_string());
    }
    agents.sort();
    let (all, pages) = walk(&server, "/agents?limit=2").await;
    assert_eq!((ids(&all), pages), (agents.clone(), 3));

    // The built-in plugins, by id.
    let (_, every) = server.get("/plugins").await;
    let mut plugin_ids = ids(every.as_array().unwrap());
    assert!(plugin_ids.len() > 4, "{plugin_ids:?}");
    plugin_ids.sort();
    let (walked, pages) = walk(&server, "/plugins?limit=4").await;
    assert_eq!(ids(&walked), plugin_ids);
    assert_eq!(pages, plugin_ids.len().div_ceil(4));

    // Runs: newest first by default (`before`), oldest first with `after`.
    let (_, session) = server.post("/sessions", json!({})).await;
    let session = session["id"].as_str().unwrap().to_string();
    let mut runs = Vec::new();
    for i in 0..5 {
        fake.push(Reply::sse(anthropic::text_answer(&["ok"], 1, 1)));
        let (status, body) = server
            .post(&format!("/sessions/{session}/message"), json!({"agent_id": agents[0], "message": format!("m{i}")}))
            .await;
        assert_eq!(status, 200, "{body}");
        runs.push(body["run_id"].as_str().unwrap().to_string());
    }
    runs.sort();
    let (newest_first, pages) = walk(&server, &format!("/sessions/{session}/runs?limit=2")).await;
    assert_eq!(pages, 3);
    let mut reversed = runs.clone();
    reversed.reverse();
    assert_eq!(ids(&newest_first), reversed);
    let (oldest_first, _) = walk(&server, &format!("/sessions/{session}/runs?limit=2&after={}", runs[0])).await;
    assert_eq!(ids(&oldest_first), runs[1..]);
    // Both: the runs between, oldest first.
    let (between, _) = walk(&server, &format!("/sessions/{session}/runs?limit=1&before={}&after={}", runs[4], runs[0])).await;
    assert_eq!(ids(&between), runs[1..4]);
}

#[tokio::test]
async fn model_aliases_and_dated_ids_both_resolve() {
    let server = Server::start(&[]);
    let (status, models) = server.get("/provider/anthropic/models").await;
    assert_eq!(status, 200, "{models}");
    let listed = ids(models.as_array().unwrap());
    for id in ["claude-sonnet-4-5", "claude-sonnet-4-5-20250929", "claude-haiku-4-5", "claude-haiku-4-5-20251001"] {
        assert!(listed.iter().any(|l| l == id), "{id} not in {listed:?}");
    }
    for (asked, name) in [("claude-sonnet-4-5", "Claude Sonnet 4.5"), ("claude-sonnet-4-5-20250929", "Claude Sonnet 4.5")] {
        let (status, model) = server.get(&format!("/provider/anthropic/models/{asked}")).await;
        assert_eq!(status, 200, "{asked}: {model}");
        assert_eq!(model["id"], asked);
        assert_eq!(model["name"], name);
        assert_eq!(model["context_window"], 200_000);
    }
    // `-latest` and another date of a known model name the same model.
    let (status, model) = server.get("/provider/anthropic/models/claude-sonnet-4-5-latest").await;
    assert_eq!(status, 200, "{model}");
    assert_eq!(model["name"], "Claude Sonnet 4.5");
    let (status, _) = server.get("/provider/anthropic/models/claude-nonesuch-9").await;
    assert_eq!(status, 404);
}

/// Every sample of `text` as the reference Prometheus client library's
/// parser reads it (`prometheus_client.parser`): name, labels, value. A
/// line it cannot read fails the test.
fn parse_metrics(text: &str) -> Vec<(String, HashMap<String, String>, f64)> {
    use std::io::Write;
    let script = "import sys, json\n\
        from prometheus_client.parser import text_string_to_metric_families\n\
        out = [[s.name, s.labels, s.value] for f in text_string_to_metric_families(sys.stdin.read()) for s in f.samples]\n\
        print(json.dumps(out))\n";
    let mut child = std::process::Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "not the Prometheus text format: {}\n{text}", String::from_utf8_lossy(&out.stderr));
    let parsed: Vec<(String, HashMap<String, String>, f64)> = serde_json::from_slice(&out.stdout).unwrap();
    // Every sample line was read (none skipped).
    let lines = text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')).count();
    assert_eq!(parsed.len(), lines, "{text}");
    parsed
}

/// Samples named `name`, by their labels.
fn samples(text: &str, name: &str) -> Vec<(HashMap<String, String>, f64)> {
    parse_metrics(text).into_iter().filter(|(n, _, _)| n == name).map(|(_, labels, v)| (labels, v)).collect()
}

fn value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    samples(text, name)
        .into_iter()
        .find(|(have, _)| labels.iter().all(|(k, v)| have.get(*k).map(String::as_str) == Some(*v)))
        .map(|(_, v)| v)
}

#[tokio::test]
async fn metrics_are_prometheus_text_and_count_runs_tools_and_requests() {
    let fake = FakeServer::start(vec![
        Reply::sse(anthropic::tool_answer("toolu_1", "read", &["{\"filePath\": \"a.txt\"}"], 100, 20)),
        Reply::sse(anthropic::text_answer(&["done"], 150, 5)),
    ])
    .await;
    if !common::have_python_module("prometheus_client", "pip: prometheus-client") {
        return;
    }
    let server = Server::start(&["--token", "metrics-token"]);
    let auth = |req: reqwest::RequestBuilder| req.bearer_auth("metrics-token");
    // Guarded like every route.
    let resp = server.client.get(server.url("/metrics")).send().await.unwrap();
    assert_eq!(resp.status(), 401);

    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("a.txt"), "alpha\n").unwrap();
    let (status, _) = server
        .send(auth(server.client.put(server.url("/provider/auth"))).json(
            &json!({"providers": {"anthropic": {"type": "api_key", "key": "sk-ant-exactness-7c1f", "base_url": fake.url}}}),
        ))
        .await;
    assert_eq!(status, 200);
    let (_, agent) = server
        .send(auth(server.client.post(server.url("/agents"))).json(
            &json!({"name": "m", "tools": ["read"], "provider": {"id": "anthropic", "model": "claude-sonnet-4-5"}}),
        ))
        .await;
    let (_, session) = server.send(auth(server.client.post(server.url("/sessions"))).json(&json!({"work_dir": work.path()}))).await;
    let (status, body) = server
        .send(auth(server.client.post(server.url(&format!("/sessions/{}/message", session["id"].as_str().unwrap())))).json(
            &json!({"agent_id": agent["id"], "message": "read a.txt"}),
        ))
        .await;
    assert_eq!(status, 200, "{body}");

    let resp = auth(server.client.get(server.url("/metrics"))).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/plain"));
    let text = resp.text().await.unwrap();

    assert_eq!(value(&text, "hangar_runs_total", &[("status", "completed")]), Some(1.0), "{text}");
    assert_eq!(value(&text, "hangar_run_duration_seconds_count", &[("status", "completed")]), Some(1.0));
    assert_eq!(value(&text, "hangar_step_duration_seconds_count", &[("provider", "anthropic")]), Some(2.0), "{text}");
    assert_eq!(value(&text, "hangar_time_to_first_token_seconds_count", &[("provider", "anthropic")]), Some(2.0));
    assert_eq!(value(&text, "hangar_tool_call_duration_seconds_count", &[("tool", "read")]), Some(1.0));
    assert_eq!(value(&text, "hangar_tokens_total", &[("provider", "anthropic"), ("kind", "input")]), Some(250.0));
    assert_eq!(value(&text, "hangar_tokens_total", &[("provider", "anthropic"), ("kind", "output")]), Some(25.0));
    assert_eq!(value(&text, "hangar_active_runs", &[]), Some(0.0));
    // Built-in plugins load the code compiled into the binary (on this
    // machine, which built it): no cache, no compile.
    let built_in = value(&text, "hangar_compile_cache_total", &[("result", "built_in")]).unwrap_or(0.0);
    assert!(built_in >= 2.0, "the anthropic and read components were loaded from the binary: {text}");
    // Requests by route template, never by id; the refused one too.
    assert_eq!(
        value(&text, "hangar_http_requests_total", &[("method", "POST"), ("route", "/sessions/{id}/message"), ("status", "200")]),
        Some(1.0)
    );
    assert_eq!(value(&text, "hangar_http_requests_total", &[("route", "/metrics"), ("status", "401")]), Some(1.0));
    assert!(!text.contains(session["id"].as_str().unwrap()), "no ids in labels");
}

/// The JSON log lines of `target` in a server's log.
fn json_lines(log: &str, target: &str) -> Vec<Value> {
    log.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).filter(|l| l["target"] == target).collect()
}

#[tokio::test]
async fn every_request_and_every_run_is_one_json_log_line() {
    let fake = FakeServer::start(vec![Reply::sse(anthropic::text_answer(&["hi"], 7, 3))]).await;
    let server = Server::start(&["--log-format", "json"]);
    assert!(server.log().lines().all(|l| serde_json::from_str::<Value>(l).is_ok()), "{}", server.log());
    server.put("/provider/auth", json!({"providers": {"anthropic": {"type": "api_key", "key": "sk-ant-exactness-7c1f", "base_url": fake.url}}})).await;
    let (_, agent) = server.post("/agents", json!({"name": "l", "provider": {"id": "anthropic", "model": "claude-sonnet-4-5"}})).await;
    let (_, session) = server.post("/sessions", json!({})).await;
    let sid = session["id"].as_str().unwrap();
    let (status, run) = server.post(&format!("/sessions/{sid}/message"), json!({"agent_id": agent["id"], "message": "hello"})).await;
    assert_eq!(status, 200);
    let (status, _) = server.get("/sessions/01NOSUCHSESSION0000000000").await;
    assert_eq!(status, 404);

    // The server's output reaches `log()` through a pipe and a reader
    // thread: wait until the last request's line has come through.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !server.log().contains("\"status\":404") && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let log = server.log();
    let requests = json_lines(&log, "hangar::http");
    let line = |method: &str, route: &str, status: u64| {
        requests.iter().filter(|l| l["method"] == method && l["route"] == route && l["status"] == status).count()
    };
    assert_eq!(line("PUT", "/provider/auth", 200), 1, "{log}");
    assert_eq!(line("POST", "/sessions/{id}/message", 200), 1, "{log}");
    assert_eq!(line("GET", "/sessions/{id}", 404), 1, "{log}");
    assert!(requests.iter().all(|l| l["duration_ms"].is_number()), "{requests:?}");
    assert_eq!(requests.len(), 5, "one line per request: {requests:?}");

    let runs = json_lines(&log, "hangar::run");
    assert_eq!(runs.len(), 1, "{log}");
    let r = &runs[0];
    assert_eq!(r["run"], run["run_id"]);
    assert_eq!(r["agent"], agent["id"]);
    assert_eq!(r["session"], sid);
    assert_eq!(r["status"], "completed");
    assert_eq!(r["steps"], 1);
    assert_eq!(r["input_tokens"], 7, "{r} {:?} {run}", fake.requests().iter().map(|r| (&r.method, &r.path)).collect::<Vec<_>>());
    assert_eq!(r["output_tokens"], 3);
    assert_eq!(r["stop_reason"], "end_turn");
}

/// Under sustained writes the WAL stays near its limit (a TRUNCATE
/// checkpoint once it passes it), and an idle server cuts it to nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_wal_stays_bounded_under_writes_and_empties_when_idle() {
    const LIMIT_MB: u64 = 1;
    let server = std::sync::Arc::new(Server::start(&["--wal-limit-mb", "1"]));
    let wal = hangar::store::wal_path(&server.db_path());
    let wal_size = || std::fs::metadata(&wal).map_or(0, |m| m.len());
    let mut largest = 0;
    // 40 rounds of 256 sessions from 16 clients at once: every group
    // commit writes a few pages, about ten times the limit in all.
    for _ in 0..40 {
        let writers = (0..16).map(|_| {
            let server = server.clone();
            tokio::spawn(async move {
                for _ in 0..16 {
                    let (status, _) = server.post("/sessions", json!({})).await;
                    assert_eq!(status, 201);
                }
            })
        });
        for w in futures::future::join_all(writers).await {
            w.unwrap();
        }
        largest = largest.max(wal_size());
    }
    let (_, sessions) = server.get("/sessions?limit=1000&history=false").await;
    assert_eq!(sessions.as_array().unwrap().len(), 1000, "the first thousand of 10,240");
    // A write group or two may land between the size check and the
    // checkpoint: the bound is the limit plus that, not the whole load.
    assert!(largest <= 3 * (LIMIT_MB << 20), "WAL reached {largest} bytes with a limit of {LIMIT_MB} MB");
    // Idle: cut to nothing (polled; the checkpoint comes after a quiet second).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while wal_size() > 0 {
        assert!(std::time::Instant::now() < deadline, "the WAL was not truncated when idle: {} bytes", wal_size());
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let metrics = server.client.get(server.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert_eq!(value(&metrics, "hangar_wal_bytes", &[]), Some(0.0), "{metrics}");
}
