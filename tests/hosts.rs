//! Two `hangar` processes on one PostgreSQL database, as behind a load
//! balancer with no sticky sessions: what one host is told, the other
//! knows; a run on one is followed, refused a twin, cancelled and, when its
//! host dies, interrupted through the other. Each test gets a database of
//! its own on the server `HANGAR_TEST_DATABASE_URL` names (`test.sh`
//! starts one; without it the tests skip with the reason, or fail in CI).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::fake::{Chunk, FakeServer, Reply, anthropic};
use common::server::Server;
use common::sse::Events;
use common::{no_process_left, wait_for_process};
use hangar::store::scratch::ScratchDb;
use serde_json::{Value, json};
use tokio::sync::Notify;

const KEY: &str = "sk-ant-hosts-KEY-77e1d0";
/// Both hosts seal and open provider keys with this server key.
const SECRET: &str = "4f1c2b7a9e0d3c5b6a7f8e9d0c1b2a3f4e5d6c7b8a9f0e1d2c3b4a5f6e7d8c9b";
/// A short lease, so a dead host's run is taken over within seconds.
const LEASE_S: u64 = 4;

/// A text answer in `n` parts that pauses after `at` of them until `gate`.
fn gated_text(n: usize, at: usize, gate: Arc<Notify>) -> Reply {
    let parts: Vec<String> = (0..n).map(|i| format!("part{i} ")).collect();
    let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
    let mut chunks = vec![anthropic::start(5)];
    let mut block = anthropic::text_block(0, &refs);
    block.insert(1 + at, Chunk::Wait(gate));
    chunks.extend(block);
    chunks.extend(anthropic::stop("end_turn", 3));
    Reply::sse(chunks)
}

fn bash(command: &str) -> Reply {
    let input = json!({ "command": command }).to_string();
    Reply::sse(anthropic::tool_answer("toolu_h", "bash", &[&input], 5, 2))
}

/// Two hosts on `db`, with the shared server key and the short lease (and
/// the directory of their config file, to keep while they run).
fn two_hosts(db: &ScratchDb) -> (Server, Server, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hangar.toml");
    std::fs::write(&config, format!("[hosts]\nlease_s = {LEASE_S}\n")).unwrap();
    let host = || Server::start_with_env(&["--db", &db.url, "--config", config.to_str().unwrap()], &[("HANGAR_SECRET_KEY", SECRET)]);
    (host(), host(), dir)
}

async fn run_status(server: &Server, session: &str, run: &str) -> Value {
    let (status, body) = server.get(&format!("/sessions/{session}/runs/{run}")).await;
    assert_eq!(status, 200, "{body}");
    body
}

/// Sends a message to run in the background; its run's id.
async fn background(server: &Server, session: &str, agent: &str, extra: Value) -> String {
    let mut body = json!({"agent_id": agent, "message": "go", "background": true});
    body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    let (status, body) = server.post(&format!("/sessions/{session}/message"), body).await;
    assert_eq!(status, 202, "{body}");
    body["run_id"].as_str().unwrap().to_string()
}

/// A run's events, to its end.
async fn events_of(server: &Server, session: &str, run: &str) -> Vec<common::sse::Sse> {
    let url = server.url(&format!("/sessions/{session}/runs/{run}/events"));
    Events::new(server.client.get(url).send().await.unwrap()).all().await
}

#[tokio::test]
async fn two_hosts_share_agents_runs_events_cancels_and_a_dead_hosts_runs() {
    let Some(db) = ScratchDb::create().await else { return };
    let gate = Arc::new(Notify::new());
    let fake = FakeServer::start(vec![
        Reply::sse(anthropic::text_answer(&["answered ", "on B"], 4, 2)),
        gated_text(6, 2, gate.clone()),
        bash("sleep 42441; echo never"),
        bash("sleep 42442; echo never"),
        Reply::sse(anthropic::text_answer(&["B took over"], 3, 2)),
    ])
    .await;
    let (a, b, _config) = two_hosts(&db);
    let work = tempfile::tempdir().unwrap();

    // Made on A, used on B.
    let (status, _) =
        a.put("/provider/auth", json!({"providers": {"anthropic": {"type": "api_key", "key": KEY, "base_url": fake.url}}})).await;
    assert_eq!(status, 200);
    // B reads the agents once before A makes one: a cache would go stale.
    assert_eq!(b.get("/agents").await.1, json!([]));
    let (status, agent) = a
        .post("/agents", json!({"name": "shared", "instructions": "", "tools": ["bash"],
            "provider": {"id": "anthropic", "model": "claude-test", "max_tokens": 64}}))
        .await;
    assert_eq!(status, 201, "{agent}");
    let agent = agent["id"].as_str().unwrap().to_string();
    let (status, session) = a.post("/sessions", json!({"work_dir": work.path()})).await;
    assert_eq!(status, 201, "{session}");
    let session = session["id"].as_str().unwrap().to_string();
    let path = |tail: &str| format!("/sessions/{session}{tail}");
    let message = |text: &str| json!({"agent_id": agent, "message": text});
    let (status, answer) = b.post(&path("/message"), message("hi")).await;
    assert_eq!((status, answer["response"].as_str()), (200, Some("answered on B")), "{answer}");
    assert_eq!(fake.requests()[0].header("x-api-key"), Some(KEY), "B opened the key A sealed");

    // A stream started on A, resumed on B from its last id.
    let resp = a.client.post(a.url(&path("/message/stream"))).json(&message("stream it")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let active = resp.headers()["content-location"].to_str().unwrap().rsplit('/').next().unwrap().to_string();
    let mut live = Events::new(resp);
    let seen = live.take(2).await;
    assert!(seen.iter().all(|e| e.name == "text"), "{seen:?}");
    drop(live);
    // Meanwhile the session is busy on every host.
    let (status, busy) = b.post(&path("/message"), message("too soon")).await;
    assert_eq!(status, 409, "{busy}");
    assert!(busy["error"].as_str().unwrap().contains(&active), "names the run active on A: {busy}");
    let last = seen[1].id.unwrap();
    let resumed = b.client.get(b.url(&path("/events"))).header("Last-Event-ID", last.to_string()).send().await.unwrap();
    assert_eq!(resumed.status(), 200);
    let mut resumed = Events::new(resumed);
    // A goes on only once B follows: the rest reaches B as A stores it.
    gate.notify_one();
    let rest = resumed.take(5).await;
    let ids: Vec<u64> = rest.iter().map(|e| e.id.unwrap()).collect();
    assert_eq!(ids, (last + 1..=last + 5).collect::<Vec<_>>(), "exactly the events after the cursor, from A's run");
    assert_eq!(rest.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(), ["text", "text", "text", "text", "done"]);
    drop(resumed);

    // A command running on A, cancelled through B.
    let (status, started) = a.post(&path("/message"), json!({"agent_id": agent, "message": "sleep", "background": true})).await;
    assert_eq!(status, 202, "{started}");
    let run = started["run_id"].as_str().unwrap().to_string();
    wait_for_process("sleep 42441").await;
    let (status, cancelled) = b.post(&path(&format!("/runs/{run}/cancel")), json!({})).await;
    assert_eq!(status, 200, "{cancelled}");
    assert_eq!(cancelled["status"], "cancelled", "{cancelled}");
    assert!(no_process_left("sleep 42441").await, "the command on A is gone");

    // A dies (kill -9) in the middle of a command: B interrupts its run
    // once the lease runs out, repairs the history, and takes the next message.
    let (status, started) = a.post(&path("/message"), json!({"agent_id": agent, "message": "sleep", "background": true})).await;
    assert_eq!(status, 202, "{started}");
    let run = started["run_id"].as_str().unwrap().to_string();
    wait_for_process("sleep 42442").await;
    let killed = Instant::now();
    drop(a);
    let mut ended = run_status(&b, &session, &run).await;
    while ended["status"] != "interrupted" && killed.elapsed() < Duration::from_secs(LEASE_S * 5) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        ended = run_status(&b, &session, &run).await;
    }
    assert_eq!(ended["status"], "interrupted", "{ended}");
    assert_eq!(ended["error"]["code"], "interrupted");
    println!("B interrupted A's run {:?} after the kill (lease {LEASE_S} s)", killed.elapsed());
    let events = Events::new(b.client.get(b.url(&path(&format!("/runs/{run}/events")))).send().await.unwrap()).all().await;
    assert_eq!(events.last().map(|e| e.name.as_str()), Some("error"), "{events:?}");
    let (status, answer) = b.post(&path("/message"), message("still there?")).await;
    assert_eq!((status, answer["response"].as_str()), (200, Some("B took over")), "{answer}");
    let (_, stored) = b.get(&path("")).await;
    let history = stored["history"].as_array().unwrap();
    let blocks = |kind: &str| history.iter().flat_map(|m| m["content"].as_array().unwrap()).filter(|b| b["type"] == kind).count();
    assert_eq!(blocks("tool_use"), blocks("tool_result"), "every tool_use answered: {stored}");
    assert!(!b.log().contains(KEY), "the key is never logged");
}

/// Runs queued on either host start in order as the session frees, on
/// whichever host frees it; `interrupt` sent to B stops A's run.
#[tokio::test]
async fn a_queue_spans_hosts_and_interrupt_reaches_the_other_host() {
    let Some(db) = ScratchDb::create().await else { return };
    let gate = Arc::new(Notify::new());
    let never = Arc::new(Notify::new());
    let fake = FakeServer::start(vec![
        gated_text(2, 1, gate.clone()),
        Reply::sse(anthropic::text_answer(&["second"], 1, 1)),
        Reply::sse(anthropic::text_answer(&["third"], 1, 1)),
        gated_text(2, 1, never.clone()),
        Reply::sse(anthropic::text_answer(&["interrupter"], 1, 1)),
        gated_text(2, 1, never.clone()),
        Reply::sse(anthropic::text_answer(&["after the abort"], 1, 1)),
    ])
    .await;
    let (a, b, _config) = two_hosts(&db);
    let work = tempfile::tempdir().unwrap();
    a.put("/provider/auth", json!({"providers": {"anthropic": {"type": "api_key", "key": KEY, "base_url": fake.url}}})).await;
    let (_, agent) = a
        .post("/agents", json!({"name": "q", "instructions": "", "tools": [],
            "provider": {"id": "anthropic", "model": "claude-test", "max_tokens": 64}}))
        .await;
    let (_, session) = b.post("/sessions", json!({"work_dir": work.path()})).await;
    let (agent, session) = (agent["id"].as_str().unwrap().to_string(), session["id"].as_str().unwrap().to_string());
    let send = |server, extra| background(server, &session, &agent, extra);
    let wait_end = |server, run| events_of(server, &session, run);
    let first = send(&a, json!({})).await;
    let second = send(&b, json!({"multitask": "enqueue"})).await;
    let third = send(&a, json!({"multitask": "enqueue"})).await;
    assert_eq!(run_status(&b, &session, &second).await["status"], "queued");
    gate.notify_one();
    for run in [&first, &second, &third] {
        let events = wait_end(&b, run).await;
        assert_eq!(events.last().unwrap().name, "done", "{run}: {events:?}");
    }
    let (r1, r2, r3) = (run_status(&a, &session, &first).await, run_status(&a, &session, &second).await, run_status(&a, &session, &third).await);
    assert_eq!([&r1["response"], &r2["response"], &r3["response"]], ["part0 part1 ", "second", "third"]);
    let time = common::time_of;
    assert!(time(&r1, "ended_at") <= time(&r2, "started_at") && time(&r2, "ended_at") <= time(&r3, "started_at"), "one after another");

    // A run on A that would never end, interrupted by a message sent to B.
    let stuck = send(&a, json!({})).await;
    for _ in 0..100 {
        if fake.requests().len() >= 4 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let interrupter = send(&b, json!({"multitask": "interrupt"})).await;
    let events = wait_end(&a, &interrupter).await;
    assert_eq!(events.last().unwrap().name, "done", "{events:?}");
    assert_eq!(run_status(&b, &session, &stuck).await["status"], "cancelled");
    assert_eq!(run_status(&b, &session, &interrupter).await["response"], "interrupter");

    // Abort sent to B stops the run active on A, not the one queued behind it.
    let stuck = send(&a, json!({})).await;
    let queued = send(&a, json!({"multitask": "enqueue"})).await;
    for _ in 0..100 {
        if fake.requests().len() >= 6 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, aborted) = b.post(&format!("/sessions/{session}/abort"), json!({})).await;
    assert_eq!((status, aborted["id"].as_str(), aborted["status"].as_str()), (200, Some(stuck.as_str()), Some("cancelled")), "{aborted}");
    let events = wait_end(&b, &queued).await;
    assert_eq!(events.last().unwrap().name, "done", "{events:?}");
    assert_eq!(run_status(&b, &session, &queued).await["response"], "after the abort");
    never.notify_waiters();
}

/// A permission asked on A is answered through B; a tenant key revoked on
/// A is refused by B, which had just let it in; a quota is counted across hosts.
#[tokio::test]
async fn replies_revoked_keys_and_quotas_reach_the_other_host() {
    const ADMIN: &str = "admin-token-for-two-hosts";
    let Some(db) = ScratchDb::create().await else { return };
    let write = json!({"command": "echo approved > out.txt"}).to_string();
    let fake = FakeServer::start(vec![
        Reply::sse(anthropic::tool_answer("toolu_p", "bash", &[&write], 5, 2)),
        Reply::sse(anthropic::text_answer(&["written"], 3, 1)),
    ])
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hangar.toml");
    std::fs::write(&config, format!("[hosts]\nlease_s = {LEASE_S}\n[tenants]\nallowed_origins = [{:?}]\n", fake.url)).unwrap();
    let root = dir.path().join("tenants");
    std::fs::create_dir(&root).unwrap();
    let start = || {
        Server::start_with_env(
            &["--db", &db.url, "--config", config.to_str().unwrap(), "--admin-token", ADMIN, "--work-root", root.to_str().unwrap()],
            &[("HANGAR_SECRET_KEY", SECRET)],
        )
    };
    let (a, b) = (start(), start());
    let with = |server: &Server, key: &str, method: reqwest::Method, path: &str| {
        server.client.request(method, server.url(path)).bearer_auth(key.to_string())
    };
    use reqwest::Method;

    let (status, tenant) =
        a.send(with(&a, ADMIN, Method::POST, "/tenants").json(&json!({"name": "acme", "quotas": {"max_sessions": 1}}))).await;
    assert_eq!(status, 201, "{tenant}");
    let (id, key) = (tenant["id"].as_str().unwrap().to_string(), tenant["key"].as_str().unwrap().to_string());
    let (status, _) = b
        .send(with(&b, &key, Method::PUT, "/provider/auth").json(&json!({"providers": {"anthropic":
            {"type": "api_key", "key": KEY, "base_url": fake.url}}})))
        .await;
    assert_eq!(status, 200);
    let (status, agent) = a
        .send(with(&a, &key, Method::POST, "/agents").json(&json!({"name": "asker", "tools": ["bash"],
            "provider": {"id": "anthropic", "model": "claude-test", "max_tokens": 64},
            "permissions": [{"tool": "bash", "pattern": "*", "action": "ask"}]})))
        .await;
    assert_eq!(status, 201, "{agent}");
    let (status, session) = a.send(with(&a, &key, Method::POST, "/sessions").json(&json!({}))).await;
    assert_eq!(status, 201, "{session}");
    let (status, over) = b.send(with(&b, &key, Method::POST, "/sessions").json(&json!({}))).await;
    assert_eq!((status, over["quota"].as_str()), (429, Some("max_sessions")), "one session across both hosts: {over}");
    let session = session["id"].as_str().unwrap().to_string();

    // Asked on A, answered on B.
    let resp = with(&a, &key, Method::POST, &format!("/sessions/{session}/message/stream"))
        .json(&json!({"agent_id": agent["id"], "message": "write it"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut events = Events::new(resp);
    let asked = loop {
        let event = events.next().await.expect("a permission_request event");
        if event.name == "permission_request" {
            break event.json();
        }
    };
    let request = asked["request_id"].as_str().unwrap();
    let (status, answered) = b
        .send(with(&b, &key, Method::POST, &format!("/sessions/{session}/permissions/{request}")).json(&json!({"reply": "once"})))
        .await;
    assert_eq!((status, answered["status"].as_str()), (200, Some("approved")), "{answered}");
    let rest = events.all().await;
    assert_eq!(rest.last().map(|e| e.name.as_str()), Some("done"), "{rest:?}");
    let (_, stored) = b.send(with(&b, &key, Method::GET, &format!("/sessions/{session}"))).await;
    let work_dir = stored["work_dir"].as_str().unwrap();
    assert_eq!(std::fs::read_to_string(std::path::Path::new(work_dir).join("out.txt")).unwrap(), "approved\n");

    // B knows the key (it has just used it); revoked on A, B refuses it.
    let (_, view) = a.send(with(&a, ADMIN, Method::GET, &format!("/tenants/{id}"))).await;
    let key_id = view["keys"][0]["id"].as_str().unwrap().to_string();
    let (status, _) = a.send(with(&a, ADMIN, Method::DELETE, &format!("/tenants/{id}/keys/{key_id}"))).await;
    assert_eq!(status, 200);
    let mut refused = 0;
    for _ in 0..50 {
        refused = b.send(with(&b, &key, Method::GET, "/agents")).await.0;
        if refused == 401 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(refused, 401, "a key revoked on A still opens B");
}
