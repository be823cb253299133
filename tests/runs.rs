//! Durable runs over HTTP: a run outlives its connection, its events can be
//! replayed from any id, it can be cancelled, queued, repeated
//! idempotently, and it survives `kill -9` of the server as `interrupted`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::fake::{Chunk, FakeServer, Reply, anthropic};
use common::{no_process_left, wait_for_process};
use common::server::Server;
use common::sse::Events;
use serde_json::{Value, json};
use tokio::sync::Notify;

const KEY: &str = "sk-ant-runs-KEY-1a2b3c";

struct Setup {
    server: Server,
    fake: FakeServer,
    agent: String,
    session: String,
    work: tempfile::TempDir,
}

async fn setup(script: Vec<Reply>, args: &[&str], tools: Value) -> Setup {
    let fake = FakeServer::start(script).await;
    let server = Server::start(args);
    let work = tempfile::tempdir().unwrap();
    let (status, _) = server
        .put("/provider/auth", json!({"providers": {"anthropic": {"type": "api_key", "key": KEY, "base_url": fake.url}}}))
        .await;
    assert_eq!(status, 200);
    let (_, agent) = server
        .post("/agents", json!({"name": "t", "instructions": "", "tools": tools,
            "provider": {"id": "anthropic", "model": "claude-test", "max_tokens": 64}}))
        .await;
    let (_, session) = server.post("/sessions", json!({"work_dir": work.path()})).await;
    Setup { agent: agent["id"].as_str().unwrap().into(), session: session["id"].as_str().unwrap().into(), server, fake, work }
}

impl Setup {
    /// `kill -9` of the server, then a start on the same database.
    fn crash(self) -> Setup {
        let Setup { server, fake, agent, session, work } = self;
        Setup { server: server.crash_and_restart(), fake, agent, session, work }
    }

    fn path(&self, tail: &str) -> String {
        format!("/sessions/{}{tail}", self.session)
    }

    async fn send(&self, extra: Value) -> (u16, Value) {
        let mut body = json!({"agent_id": self.agent, "message": "go"});
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        self.server.post(&self.path("/message"), body).await
    }

    async fn background(&self, extra: Value) -> String {
        let mut extra = extra;
        extra["background"] = json!(true);
        let (status, body) = self.send(extra).await;
        assert_eq!(status, 202, "{body}");
        body["run_id"].as_str().unwrap().to_string()
    }

    async fn run(&self, run: &str) -> Value {
        let (status, body) = self.server.get(&self.path(&format!("/runs/{run}"))).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Polls the run until it has ended.
    async fn ended(&self, run: &str) -> Value {
        for _ in 0..600 {
            let body = self.run(run).await;
            if ["completed", "failed", "cancelled", "interrupted"].contains(&body["status"].as_str().unwrap()) {
                return body;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("run {run} did not end");
    }

    async fn get_events(&self, tail: &str, last_event_id: Option<u64>) -> reqwest::Response {
        let mut req = self.server.client.get(self.server.url(&self.path(tail)));
        if let Some(id) = last_event_id {
            req = req.header("Last-Event-ID", id.to_string());
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 200);
        resp
    }
}

fn text_in_parts(n: usize, gate: Option<(usize, Arc<Notify>)>) -> Reply {
    let parts: Vec<String> = (0..n).map(|i| format!("part{i} ")).collect();
    let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
    let mut chunks = vec![anthropic::start(5)];
    let mut block = anthropic::text_block(0, &refs);
    if let Some((at, gate)) = gate {
        // After the block start and `at` deltas.
        block.insert(1 + at, Chunk::Wait(gate));
    }
    chunks.extend(block);
    chunks.extend(anthropic::stop("end_turn", 3));
    Reply::sse(chunks)
}

#[tokio::test]
async fn a_dropped_stream_goes_on_and_resumes_from_any_id_exactly_once() {
    let gate = Arc::new(Notify::new());
    let s = setup(vec![text_in_parts(8, Some((3, gate.clone())))], &[], json!([])).await;
    // A follower that never disconnects sees everything live.
    let follower = Events::new(s.get_events("/events", None).await);
    let resp = s
        .server
        .client
        .post(s.server.url(&s.path("/message/stream")))
        .json(&json!({"agent_id": s.agent, "message": "go"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let location = resp.headers()["content-location"].to_str().unwrap().to_string();
    let run_id = location.rsplit('/').next().unwrap().to_string();
    assert_eq!(location, s.path(&format!("/runs/{run_id}")));
    let mut live = Events::new(resp);
    let first = live.take(3).await;
    assert!(first.iter().all(|e| e.name == "text" && e.id.is_some()), "{first:?}");
    drop(live); // the client goes away mid-stream
    gate.notify_one();
    let run = s.ended(&run_id).await;
    assert_eq!(run["status"], "completed", "a disconnect no longer cancels: {run}");
    assert_eq!(run["response"], (0..8).map(|i| format!("part{i} ")).collect::<String>());

    let all = Events::new(s.get_events(&format!("/runs/{run_id}/events"), None).await).all().await;
    assert_eq!(all.len(), 9, "8 texts and done: {all:?}");
    assert_eq!(&all[..3], &first[..], "replay is byte-identical to what was sent live");
    let done: Value = serde_json::from_str(&all[8].data).unwrap();
    assert_eq!((all[8].name.as_str(), done["run_id"].as_str()), ("done", Some(run_id.as_str())));
    let ids: Vec<u64> = all.iter().map(|e| e.id.unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "{ids:?}");
    // Resume from several ids: exactly the events after it, once each.
    for (k, e) in all.iter().enumerate() {
        let resumed = Events::new(s.get_events(&format!("/runs/{run_id}/events"), e.id).await).all().await;
        assert_eq!(resumed, all[k + 1..].to_vec(), "after id {:?}", e.id);
    }
    let after = all[4].id.unwrap();
    let by_query = Events::new(s.get_events(&format!("/runs/{run_id}/events?after={after}"), None).await).all().await;
    assert_eq!(by_query, all[5..].to_vec());
    // The uninterrupted follower saw the same bytes with the same ids.
    let mut follower = follower;
    assert_eq!(follower.take(9).await, all);
}

#[tokio::test]
async fn a_background_run_answers_202_and_is_polled_to_its_end() {
    let s = setup(vec![Reply::sse(anthropic::text_answer(&["done ", "in the background"], 5, 2))], &[], json!([])).await;
    let resp = s
        .server
        .client
        .post(s.server.url(&s.path("/message")))
        .json(&json!({"agent_id": s.agent, "message": "go", "background": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    let location = resp.headers()["location"].to_str().unwrap().to_string();
    let body: Value = resp.json().await.unwrap();
    let run_id = body["run_id"].as_str().unwrap();
    assert_eq!(location, s.path(&format!("/runs/{run_id}")));
    assert!(["queued", "running"].contains(&body["status"].as_str().unwrap()), "{body}");
    let run = s.ended(run_id).await;
    assert_eq!(run["status"], "completed");
    assert_eq!(run["response"], "done in the background");
    assert_eq!(run["usage"], json!({"input_tokens": 5, "output_tokens": 2}));
    for field in ["created_at", "started_at", "ended_at"] {
        assert!(run[field].is_string(), "{field}: {run}");
    }
    let (_, runs) = s.server.get(&s.path("/runs")).await;
    assert_eq!(runs.as_array().unwrap().len(), 1);
    assert_eq!(runs[0]["id"], run_id);
    let (_, session) = s.server.get(&s.path("")).await;
    assert_eq!(session["history"].as_array().unwrap().len(), 2, "{session}");
    let (status, body) = s.server.get(&s.path("/runs/01NOSUCHRUN0000000000000000")).await;
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")));
}


#[tokio::test]
async fn cancel_stops_a_slow_command_leaves_no_process_and_is_idempotent() {
    let command = json!({"command": "sleep 42431; echo never"}).to_string();
    let s = setup(
        vec![Reply::sse(anthropic::tool_answer("toolu_1", "bash", &[&command], 5, 2))],
        &[],
        json!(["bash"]),
    )
    .await;
    let run_id = s.background(json!({})).await;
    wait_for_process("sleep 42431").await;
    let (status, run) = s.server.post(&s.path(&format!("/runs/{run_id}/cancel")), json!({})).await;
    assert_eq!(status, 200, "{run}");
    assert_eq!(run["status"], "cancelled", "{run}");
    assert_eq!(run["stop_reason"], "cancelled");
    assert!(no_process_left("sleep 42431").await, "the command's processes are gone");
    let (_, again) = s.server.post(&s.path(&format!("/runs/{run_id}/cancel")), json!({})).await;
    assert_eq!(again, run, "cancelling an ended run answers it unchanged");
    let (status, aborted) = s.server.post(&s.path("/abort"), json!({})).await;
    assert_eq!((status, &aborted), (200, &run), "abort without an active run answers the latest run");
    // The history is valid: the tool use has its (error) result.
    let (_, session) = s.server.get(&s.path("")).await;
    let history = session["history"].as_array().unwrap();
    let results: Vec<&Value> = history.iter().flat_map(|m| m["content"].as_array().unwrap()).filter(|b| b["type"] == "tool_result").collect();
    assert_eq!(results.len(), 1, "{session}");
    assert_eq!(results[0]["tool_use_id"], "toolu_1");
    let events = Events::new(s.get_events(&format!("/runs/{run_id}/events"), None).await).all().await;
    assert_eq!(events.last().unwrap().name, "done");
}

#[tokio::test]
async fn a_busy_session_rejects_queues_or_interrupts() {
    let gate = Arc::new(Notify::new());
    let never = Arc::new(Notify::new());
    let s = setup(
        vec![
            text_in_parts(2, Some((1, gate.clone()))),
            Reply::sse(anthropic::text_answer(&["second"], 1, 1)),
            text_in_parts(2, Some((1, never.clone()))),
            Reply::sse(anthropic::text_answer(&["fourth"], 1, 1)),
        ],
        &[],
        json!([]),
    )
    .await;
    let first = s.background(json!({})).await;
    let (status, body) = s.send(json!({})).await;
    assert_eq!(status, 409, "{body}");
    assert!(body["error"].as_str().unwrap().contains(&first), "names the active run: {body}");
    let second = s.background(json!({"multitask": "enqueue"})).await;
    assert_eq!(s.run(&second).await["status"], "queued");
    gate.notify_one();
    let (one, two) = (s.ended(&first).await, s.ended(&second).await);
    assert_eq!((one["status"].as_str(), two["status"].as_str()), (Some("completed"), Some("completed")));
    assert!(common::time_of(&two, "started_at") >= common::time_of(&one, "ended_at"), "in order: {one} {two}");
    assert_eq!(two["response"], "second");

    let third = s.background(json!({})).await;
    for _ in 0..200 {
        if s.fake.requests().len() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, fourth) = s.send(json!({"multitask": "interrupt"})).await;
    assert_eq!(status, 200, "{fourth}");
    assert_eq!(fourth["response"], "fourth");
    assert_eq!(s.run(&third).await["status"], "cancelled");
    let (_, runs) = s.server.get(&s.path("/runs?limit=2")).await;
    assert_eq!(runs.as_array().unwrap().len(), 2);
    assert_eq!(runs[1]["id"], third, "newest first");
    let (_, older) = s.server.get(&s.path(&format!("/runs?before={third}"))).await;
    assert_eq!(older.as_array().unwrap().iter().map(|r| r["id"].clone()).collect::<Vec<_>>(), vec![json!(second), json!(first)]);
}

#[tokio::test]
async fn an_idempotent_repeat_returns_the_same_run() {
    let s = setup(vec![Reply::sse(anthropic::text_answer(&["once"], 1, 1))], &[], json!([])).await;
    let send = |key: &'static str, message: &'static str| {
        let body = json!({"agent_id": s.agent, "message": message});
        s.server.send(s.server.client.post(s.server.url(&s.path("/message"))).header("Idempotency-Key", key).json(&body))
    };
    let (status, first) = send("key-1", "go").await;
    assert_eq!(status, 200, "{first}");
    let (status, again) = send("key-1", "go").await;
    assert_eq!((status, &again), (200, &first), "the same run, not a second one");
    assert_eq!(s.fake.requests().len(), 1, "the model was asked once");
    let (status, body) = send("key-1", "something else").await;
    assert_eq!((status, body["code"].as_str()), (409, Some("conflict")), "{body}");
    // The stream with the same key replays that run's events.
    let resp = s
        .server
        .client
        .post(s.server.url(&s.path("/message/stream")))
        .header("Idempotency-Key", "key-1")
        .json(&json!({"agent_id": s.agent, "message": "go"}))
        .send()
        .await
        .unwrap();
    let events = Events::new(resp).all().await;
    assert_eq!(events.last().unwrap().name, "done");
    assert!(events.last().unwrap().data.contains(first["run_id"].as_str().unwrap()));
    let (_, runs) = s.server.get(&s.path("/runs")).await;
    assert_eq!(runs.as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_message_sent_as_soon_as_the_last_one_answered_never_finds_the_session_busy() {
    let script = (0..30).map(|i| Reply::sse(anthropic::text_answer(&[&format!("answer {i}")], 1, 1))).collect();
    let s = setup(script, &[], json!([])).await;
    for i in 0..30 {
        let (status, body) = s.send(json!({})).await;
        assert_eq!(status, 200, "message {i}: {body}");
    }
}

#[tokio::test]
async fn concurrent_submits_with_one_idempotency_key_make_one_run() {
    let s = setup(vec![Reply::sse(anthropic::text_answer(&["once"], 1, 1))], &[], json!([])).await;
    let body = json!({"agent_id": s.agent, "message": "go", "background": true, "multitask": "enqueue"});
    let sends = (0..24).map(|_| {
        s.server.send(s.server.client.post(s.server.url(&s.path("/message"))).header("Idempotency-Key", "raced").json(&body))
    });
    let answers = futures::future::join_all(sends).await;
    let ids: std::collections::BTreeSet<String> = answers
        .iter()
        .map(|(status, body)| {
            assert_eq!(*status, 202, "{body}");
            body["run_id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(ids.len(), 1, "every submit got the one run: {ids:?}");
    s.ended(ids.iter().next().unwrap()).await;
    let (_, runs) = s.server.get(&s.path("/runs")).await;
    assert_eq!(runs.as_array().unwrap().len(), 1, "{runs}");
    assert_eq!(s.fake.requests().len(), 1, "the model was asked once");
}

#[tokio::test]
async fn kill_9_during_a_tool_call_or_a_stream_leaves_an_interrupted_run_a_valid_history_and_a_working_session() {
    let command = json!({"command": "sleep 42432"}).to_string();
    let gate = Arc::new(Notify::new());
    let s = setup(
        vec![
            Reply::sse(anthropic::tool_answer("toolu_k", "bash", &[&command], 5, 2)),
            text_in_parts(4, Some((2, gate.clone()))),
            Reply::sse(anthropic::text_answer(&["alive again"], 1, 1)),
        ],
        &[],
        json!(["bash"]),
    )
    .await;
    // During a tool call.
    let run = s.background(json!({})).await;
    wait_for_process("sleep 42432").await;
    let s = s.crash();
    let ended = s.run(&run).await;
    assert_eq!(ended["status"], "interrupted", "{ended}");
    assert_eq!(ended["error"]["code"], "interrupted");
    assert!(no_process_left("sleep 42432").await, "the command died with the server");
    let events = Events::new(s.get_events(&format!("/runs/{run}/events"), None).await).all().await;
    let last = events.last().unwrap();
    assert_eq!(last.name, "error");
    assert!(last.data.contains("\"code\":\"interrupted\""), "{last:?}");

    // Mid-stream.
    let resp = s
        .server
        .client
        .post(s.server.url(&s.path("/message/stream")))
        .json(&json!({"agent_id": s.agent, "message": "go on"}))
        .send()
        .await
        .unwrap();
    let run = resp.headers()["content-location"].to_str().unwrap().rsplit('/').next().unwrap().to_string();
    let mut live = Events::new(resp);
    live.take(2).await;
    let s = s.crash();
    assert_eq!(s.run(&run).await["status"], "interrupted");

    // The history is valid for the provider, and the next message works.
    let (status, body) = s.send(json!({})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["response"], "alive again");
    let (_, session) = s.server.get(&s.path("")).await;
    let history = session["history"].as_array().unwrap();
    let blocks = |kind: &str| history.iter().flat_map(|m| m["content"].as_array().unwrap()).filter(|b| b["type"] == kind).count();
    assert_eq!(blocks("tool_use"), blocks("tool_result"), "every tool_use answered: {session}");
    let roles: Vec<&str> = history.iter().map(|m| m["role"].as_str().unwrap()).collect();
    assert!(roles.windows(2).all(|w| w[0] != w[1]), "roles alternate: {roles:?}");
    gate.notify_one();
}

#[tokio::test]
async fn a_cursor_older_than_the_events_kept_gets_resync_required() {
    let s = setup(vec![Reply::sse(anthropic::text_answer(&["short-lived"], 1, 1))], &["--event-retention", "1s"], json!([])).await;
    let (status, body) = s.send(json!({})).await;
    assert_eq!(status, 200, "{body}");
    let mut pruned = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut events = Events::new(s.get_events("/events", Some(0)).await);
        let first = events.next().await.unwrap();
        if first.name == "resync_required" {
            assert!(events.next().await.is_none(), "the stream closes after resync_required");
            pruned = true;
            break;
        }
    }
    assert!(pruned, "events past their retention are removed and an old cursor is told so");
    // Without a cursor the stream starts from what is kept (nothing), live.
    let resp = s.get_events("/events", None).await;
    let mut live = Events::new(resp);
    let (status, _) = s.server.post(&s.path("/message"), json!({"agent_id": s.agent, "message": "again"})).await;
    assert_eq!(status, 502, "the fake has no second answer");
    let first = live.next().await.unwrap();
    assert_eq!(first.name, "error");
}
