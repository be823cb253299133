//! Context compaction over HTTP, against a scripted Anthropic fake that
//! answers from what each request holds: a session driven past a small
//! context window stays inside it, keeps every `tool_use` with its
//! `tool_result`, gets a summary written by the model, keeps its whole
//! history for people, and recovers once from a context-length error.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use common::fake::{FakeServer, Recorded, Reply, anthropic};
use common::server::Server;
use common::sse::Events;
use serde_json::{Value, json};

const KEY: &str = "sk-ant-compaction-KEY";
const WINDOW: u64 = 6000;
/// Files the model reads, one a step, each about 1,500 tokens once read.
const FILES: usize = 12;
const SUMMARISER: &str = "You are compacting";

fn file_text(n: usize) -> String {
    (0..80).map(|l| format!("f{n:02} line {l:03} {}\n", "abcdefghij".repeat(5))).collect()
}

/// Tokens of a request as this fake counts them: a quarter of its body's bytes.
fn tokens(r: &Recorded) -> u64 {
    r.body.len() as u64 / 4
}

fn is_summary_call(r: &Recorded) -> bool {
    r.path.starts_with("/v1/messages") && r.json()["system"].as_str().is_some_and(|s| s.starts_with(SUMMARISER))
}

fn is_model_call(r: &Recorded) -> bool {
    r.path.starts_with("/v1/messages") && !is_summary_call(r)
}

/// The agent's turns: one `read` a step, then a final answer; a summary
/// request gets `SUMMARY-<n>`. Every answer reports the request's size.
fn reading_agent(files: usize, summaries: Arc<AtomicUsize>, steps: Arc<AtomicUsize>) -> impl Fn(&Recorded) -> Reply + Send + Sync {
    move |r: &Recorded| {
        if r.path.starts_with("/v1/models") {
            return Reply::json(200, json!({"data": [], "has_more": false}));
        }
        if is_summary_call(r) {
            let n = summaries.fetch_add(1, Ordering::SeqCst) + 1;
            let text = format!("SUMMARY-{n}: the user asked for every file to be read; the earlier ones were read.");
            return Reply::sse(anthropic::text_answer(&[&text], tokens(r), 20));
        }
        let step = steps.fetch_add(1, Ordering::SeqCst);
        if step < files {
            let input = format!("{{\"filePath\": \"f{:02}.txt\"}}", step + 1);
            Reply::sse(anthropic::tool_answer(&format!("toolu_{step:02}"), "read", &[&input], tokens(r), 10))
        } else {
            Reply::sse(anthropic::text_answer(&["All files read."], tokens(r), 5))
        }
    }
}

struct Setup {
    server: Server,
    fake: FakeServer,
    agent: String,
    session: String,
    _work: tempfile::TempDir,
}

async fn setup(fake: FakeServer, provider_extra: Value, compaction: Value) -> Setup {
    let server = Server::start(&[]);
    let work = tempfile::tempdir().unwrap();
    for n in 1..=FILES {
        std::fs::write(work.path().join(format!("f{n:02}.txt")), file_text(n)).unwrap();
    }
    let (status, body) = server
        .put("/provider/auth", json!({"providers": {"anthropic": {"type": "api_key", "key": KEY, "base_url": fake.url}}}))
        .await;
    assert_eq!(status, 200, "{body}");
    let mut provider = json!({"id": "anthropic", "model": "claude-test", "max_tokens": 256});
    provider.as_object_mut().unwrap().extend(provider_extra.as_object().unwrap().clone());
    let (status, agent) = server
        .post("/agents", json!({"name": "reader", "instructions": "Read what you are asked to.", "tools": ["read"],
            "provider": provider, "compaction": compaction}))
        .await;
    assert_eq!(status, 201, "{agent}");
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
    async fn stream(&self, message: &str) -> Vec<common::sse::Sse> {
        let resp = self
            .server
            .client
            .post(self.server.url(&format!("/sessions/{}/message/stream", self.session)))
            .json(&json!({"agent_id": self.agent, "message": message}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        Events::new(resp).all().await
    }
}

/// Every `tool_use` of an assistant message is answered in the next
/// message, and every `tool_result` answers one in the message before.
fn assert_pairs_whole(body: &Value) {
    let messages = body["messages"].as_array().unwrap();
    let ids = |m: &Value, kind: &str, field: &str| -> Vec<String> {
        m["content"]
            .as_array()
            .map(|blocks| {
                blocks.iter().filter(|b| b["type"] == kind).map(|b| b[field].as_str().unwrap().to_string()).collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(messages[0]["role"], "user", "a request starts with the user");
    for (i, m) in messages.iter().enumerate() {
        let uses = ids(m, "tool_use", "id");
        if !uses.is_empty() {
            let answered = messages.get(i + 1).map(|n| ids(n, "tool_result", "tool_use_id")).unwrap_or_default();
            for id in &uses {
                assert!(answered.contains(id), "tool_use {id} lost its tool_result in message {i}");
            }
        }
        for id in ids(m, "tool_result", "tool_use_id") {
            assert!(i > 0 && ids(&messages[i - 1], "tool_use", "id").contains(&id), "tool_result {id} lost its tool_use in message {i}");
        }
    }
}

#[tokio::test]
async fn a_session_driven_past_a_small_window_is_compacted_and_every_request_fits() {
    let (summaries, steps) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let fake = FakeServer::responding(reading_agent(FILES, summaries.clone(), steps.clone())).await;
    let s = setup(fake, json!({"context_window": WINDOW}), json!({"keep_turns": 2})).await;

    let events = s.stream("Read f01.txt to f12.txt, one at a time.").await;
    let done = events.last().unwrap();
    assert_eq!(done.name, "done", "{events:?}");
    assert_eq!(done.json()["stop_reason"], "end_turn");
    assert_eq!(done.json()["steps"], FILES as u64 + 1);

    let requests = s.fake.requests();
    let model_calls: Vec<&Recorded> = requests.iter().filter(|r| is_model_call(r)).collect();
    assert_eq!(model_calls.len(), FILES + 1);
    // Without compaction the last request would hold all twelve files.
    let whole: usize = (1..=FILES).map(|n| file_text(n).len()).sum();
    assert!(whole as u64 / 4 > WINDOW, "the files alone overflow the window");
    for (i, r) in requests.iter().enumerate() {
        assert!(tokens(r) < WINDOW, "request {i} ({}) has {} tokens, over the window of {WINDOW}", r.path, tokens(r));
    }
    for r in &model_calls {
        assert_pairs_whole(&r.json());
    }

    // The summary was asked for (a separate call: no tools, the transcript
    // in one user message), and its text reached the next model call.
    let summary_calls: Vec<(usize, &Recorded)> = requests.iter().enumerate().filter(|(_, r)| is_summary_call(r)).collect();
    assert!(!summary_calls.is_empty(), "no summary was written");
    assert_eq!(summaries.load(Ordering::SeqCst), summary_calls.len());
    let (first_at, first) = summary_calls[0];
    let call = first.json();
    assert!(call.get("tools").is_none_or(|t| t.as_array().is_some_and(|a| a.is_empty())), "{call}");
    assert_eq!(call["messages"].as_array().unwrap().len(), 1);
    assert!(call["messages"][0]["content"].to_string().contains("f01 line 000"), "the transcript holds the oldest turn");
    let next = requests[first_at + 1..].iter().find(|r| is_model_call(r)).expect("a model call after the summary");
    let next_text = String::from_utf8_lossy(&next.body).to_string();
    assert!(next_text.contains("SUMMARY-1"), "the summary reached the next request");
    assert!(!next_text.contains("f01 line 040"), "the summarised turn is gone from the next request");

    // Old outputs were shortened first: their ends are kept, with a note.
    let last = String::from_utf8_lossy(&model_calls.last().unwrap().body).to_string();
    assert!(last.contains("were cut when the conversation was compacted"), "{last}");

    // The stream said so, with the estimate before and after.
    let compactions: Vec<Value> = events.iter().filter(|e| e.name == "compaction").map(|e| e.json()).collect();
    assert!(!compactions.is_empty());
    for c in &compactions {
        assert_eq!(c["type"], "compaction");
        assert_eq!(c["trigger"], "threshold");
        assert!(c["tokens_after"].as_u64().unwrap() < c["tokens_before"].as_u64().unwrap(), "{c}");
        assert!(c["tokens_before"].as_u64().unwrap() > WINDOW * 8 / 10 - 400, "{c}");
    }
    assert!(compactions.iter().any(|c| c["summarized_messages"].as_u64().unwrap() > 0));
    // ...and it is stored like every event: a replay has it.
    let run = done.json()["run_id"].as_str().unwrap().to_string();
    let resp = s.server.client.get(s.server.url(&format!("/sessions/{}/runs/{run}/events", s.session))).send().await.unwrap();
    let replay = Events::new(resp).all().await;
    assert_eq!(replay.iter().filter(|e| e.name == "compaction").count(), compactions.len());

    // The history for people is whole: every file, every line.
    let (status, session) = s.server.get(&format!("/sessions/{}", s.session)).await;
    assert_eq!(status, 200);
    let history = session["history"].to_string();
    for n in 1..=FILES {
        for line in [0, 40, 79] {
            assert!(history.contains(&format!("f{n:02} line {line:03}")), "file {n} line {line} is in the history");
        }
    }
    assert!(!history.contains("SUMMARY-"), "the summary is not part of the history");
    assert_eq!(session["history"].as_array().unwrap().len(), 2 * FILES + 2);

    // What the model sees is stored beside it.
    let (status, context) = s.server.get(&format!("/sessions/{}/context", s.session)).await;
    assert_eq!(status, 200, "{context}");
    assert!(context["summary"].as_str().unwrap().starts_with("SUMMARY-"));
    assert!(context["summarized_messages"].as_u64().unwrap() > 0);
    assert!(context["compactions"].as_u64().unwrap() as usize >= compactions.len());
    assert!(context["estimated_tokens"].as_u64().unwrap() < WINDOW);
    assert!(context["messages"][0]["content"][0]["text"].as_str().unwrap().contains("SUMMARY-"));
    assert_pairs_whole(&context);

    // A restart keeps the view: the next message starts from it.
    let Setup { server, fake, agent, session, _work } = s;
    let s = Setup { server: server.restart(), fake, agent, session, _work };
    let before = s.fake.requests().len();
    let events = s.stream("Thanks. Anything else?").await;
    assert_eq!(events.last().unwrap().name, "done", "{events:?}");
    let after: Vec<Recorded> = s.fake.requests()[before..].iter().filter(|r| is_model_call(r)).cloned().collect();
    let first = String::from_utf8_lossy(&after[0].body).to_string();
    assert!(first.contains("SUMMARY-") && first.contains("Anything else?"), "{first}");
    assert!(tokens(&after[0]) < WINDOW);
}

/// Answers as `reading_agent` with two files, but refuses the third model
/// call as too long (`errors` times in a row).
fn refusing_agent(summaries: Arc<AtomicUsize>, steps: Arc<AtomicUsize>, errors: usize) -> impl Fn(&Recorded) -> Reply + Send + Sync {
    let reader = reading_agent(2, summaries.clone(), steps.clone());
    let refused = Arc::new(AtomicUsize::new(0));
    move |r: &Recorded| {
        if is_model_call(r) && steps.load(Ordering::SeqCst) == 2 && refused.load(Ordering::SeqCst) < errors {
            refused.fetch_add(1, Ordering::SeqCst);
            return anthropic::error(400, "invalid_request_error", "prompt is too long: 212345 tokens > 200000 maximum");
        }
        reader(r)
    }
}

#[tokio::test]
async fn a_context_length_error_is_answered_by_one_compaction_and_one_retry() {
    let (summaries, steps) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let fake = FakeServer::responding(refusing_agent(summaries.clone(), steps.clone(), 1)).await;
    // No window known: the provider's refusal is the only sign.
    let s = setup(fake, json!({}), json!({})).await;
    let events = s.stream("Read f01.txt and f02.txt.").await;
    let done = events.last().unwrap();
    assert_eq!(done.name, "done", "{events:?}");
    assert_eq!(done.json()["stop_reason"], "end_turn");

    let requests = s.fake.requests();
    let model_calls: Vec<&Recorded> = requests.iter().filter(|r| is_model_call(r)).collect();
    assert_eq!(model_calls.len(), 4, "two reads, the refused call, its retry");
    let (refused, retry) = (model_calls[2], model_calls[3]);
    assert!(retry.body.len() < refused.body.len() * 3 / 4, "the retry is smaller: {} vs {}", retry.body.len(), refused.body.len());
    assert_eq!(summaries.load(Ordering::SeqCst), 1);
    assert!(String::from_utf8_lossy(&retry.body).contains("SUMMARY-1"));
    assert_pairs_whole(&retry.json());
    let compactions: Vec<Value> = events.iter().filter(|e| e.name == "compaction").map(|e| e.json()).collect();
    assert_eq!(compactions.len(), 1, "{events:?}");
    assert_eq!(compactions[0]["trigger"], "context_length_error");

    // The history is whole all the same.
    let (_, session) = s.server.get(&format!("/sessions/{}", s.session)).await;
    assert!(session["history"].to_string().contains("f01 line 040"));
}

#[tokio::test]
async fn a_second_context_length_error_fails_the_run() {
    let (summaries, steps) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let fake = FakeServer::responding(refusing_agent(summaries.clone(), steps.clone(), 2)).await;
    let s = setup(fake, json!({}), json!({})).await;
    let events = s.stream("Read f01.txt and f02.txt.").await;
    let end = events.last().unwrap();
    assert_eq!(end.name, "error", "{events:?}");
    assert_eq!(end.json()["code"], "context_length_exceeded");
    let model_calls = s.fake.requests().iter().filter(|r| is_model_call(r)).count();
    assert_eq!(model_calls, 4, "one retry, not more");
    assert_eq!(summaries.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn compaction_settings_are_validated_and_compaction_runs_on_demand() {
    let (summaries, steps) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let fake = FakeServer::responding(reading_agent(3, summaries.clone(), steps.clone())).await;
    let s = setup(fake, json!({}), json!({"keep_turns": 1})).await;

    let (_, agent) = s.server.get(&format!("/agents/{}", s.agent)).await;
    assert_eq!(agent["compaction"], json!({"threshold": 0.8, "keep_turns": 1, "enabled": true}));
    assert_eq!(agent["provider"]["context_window"], Value::Null);
    for bad in [
        json!({"compaction": {"threshold": 1.5}}),
        json!({"compaction": {"threshold": 0}}),
        json!({"compaction": {"keep_turns": 0}}),
        json!({"compaction": {"keep_turns": 2.5}}),
        json!({"compaction": {"enabled": "yes"}}),
        json!({"compaction": {"unknown": 1}}),
        json!({"compaction": [1]}),
        json!({"provider": {"context_window": 0}}),
        json!({"provider": {"context_window": -5}}),
    ] {
        let (status, body) = s.server.put(&format!("/agents/{}", s.agent), bad.clone()).await;
        assert_eq!(status, 422, "{bad} -> {body}");
    }
    let (status, agent) = s
        .server
        .put(&format!("/agents/{}", s.agent), json!({"compaction": {"threshold": 0.5}, "provider": {"context_window": 100000}}))
        .await;
    assert_eq!(status, 200, "{agent}");
    assert_eq!(agent["compaction"], json!({"threshold": 0.5, "keep_turns": 1, "enabled": true}));
    assert_eq!(agent["provider"]["context_window"], 100000);

    // Nothing to compact before any run, and no agent to pick.
    let compact = format!("/sessions/{}/compact", s.session);
    let (status, body) = s.server.post(&compact, json!({})).await;
    assert_eq!(status, 409, "{body}");
    let (status, _) = s.server.post(&compact, json!({"agent_id": "01NOSUCHAGENT0000000000000"})).await;
    assert_eq!(status, 404);
    let (status, _) = s.server.post("/sessions/01NOSUCHSESSION00000000000/compact", json!({})).await;
    assert_eq!(status, 404);
    let (status, context) = s.server.get(&format!("/sessions/{}/context", s.session)).await;
    assert_eq!(status, 200);
    assert_eq!(context["compactions"], 0);
    assert_eq!(context["summary"], Value::Null);

    let events = s.stream("Read three files.").await;
    assert_eq!(events.last().unwrap().name, "done");
    assert!(events.iter().all(|e| e.name != "compaction"), "the window is large: no automatic compaction");
    assert_eq!(summaries.load(Ordering::SeqCst), 0);

    // On demand, with no body: the agent of the latest run.
    let resp = s.server.client.post(s.server.url(&compact)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let context: Value = resp.json().await.unwrap();
    assert_eq!(context["compactions"], 1, "{context}");
    assert_eq!(summaries.load(Ordering::SeqCst), 1);
    assert!(context["summary"].as_str().unwrap().starts_with("SUMMARY-1"));
    assert!(context["tokens_after"].as_u64().unwrap() < context["tokens_before"].as_u64().unwrap());
    assert_pairs_whole(&context);
    let (_, shown) = s.server.get(&format!("/sessions/{}/context", s.session)).await;
    assert_eq!(shown, context);
    let (_, session) = s.server.get(&format!("/sessions/{}", s.session)).await;
    assert_eq!(session["history"].as_array().unwrap().len(), 8, "the history is untouched");
}

#[tokio::test]
async fn compacting_a_busy_session_is_a_conflict() {
    let gate = Arc::new(tokio::sync::Notify::new());
    let released = gate.clone();
    let fake = FakeServer::responding(move |r: &Recorded| {
        if r.path.starts_with("/v1/models") {
            return Reply::json(200, json!({"data": []}));
        }
        let mut chunks = vec![common::fake::Chunk::Wait(released.clone())];
        chunks.extend(anthropic::text_answer(&["ok"], tokens(r), 1));
        Reply::sse(chunks)
    })
    .await;
    let s = setup(fake, json!({}), json!({})).await;
    let (status, run) = s
        .server
        .post(&format!("/sessions/{}/message", s.session), json!({"agent_id": s.agent, "message": "hi", "background": true}))
        .await;
    assert_eq!(status, 202, "{run}");
    let compact = format!("/sessions/{}/compact", s.session);
    let (status, body) = s.server.post(&compact, json!({"agent_id": s.agent})).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["code"], "conflict");
    gate.notify_one();
    // The run's events end with its end.
    let run_id = run["run_id"].as_str().unwrap();
    let resp = s.server.client.get(s.server.url(&format!("/sessions/{}/runs/{run_id}/events", s.session))).send().await.unwrap();
    assert_eq!(Events::new(resp).all().await.last().unwrap().name, "done");
    let (status, context) = s.server.post(&compact, json!({"agent_id": s.agent})).await;
    assert_eq!(status, 200, "{context}");
    assert_eq!(context["compactions"], 0, "one turn, nothing older to compact");
}

/// Each adapter turns its vendor's "too long" answer into
/// `context-length-exceeded` (not retried, the host compacts), and leaves
/// other 400s as they were.
#[tokio::test]
async fn each_adapter_recognises_its_vendors_context_length_error() {
    use hangar::runtime::{CompletionRequest, ContentBlock, ErrorKind, Message, ProviderAccess, Role, Secret};
    let runtime = common::runtime();
    let hello = CompletionRequest {
        model: "m".into(),
        system: None,
        messages: vec![Message { role: Role::User, content: vec![ContentBlock::Text("hi".into())] }],
        tools: Vec::new(),
        max_tokens: 16,
        temperature: None,
    };
    let cases = [
        ("anthropic", anthropic::error(400, "invalid_request_error", "prompt is too long: 212345 tokens > 200000 maximum"), true),
        (
            "anthropic",
            anthropic::error(400, "invalid_request_error", "input length and `max_tokens` exceed context limit: 198000 + 8192 > 200000"),
            true,
        ),
        ("anthropic", anthropic::error(400, "invalid_request_error", "messages: roles must alternate"), false),
        (
            "openai",
            Reply::json(400, json!({"error": {"message": "This model's maximum context length is 8192 tokens. However, your messages resulted in 9000 tokens.",
                "type": "invalid_request_error", "param": "messages", "code": "context_length_exceeded"}})),
            true,
        ),
        ("openai", Reply::json(400, json!({"error": {"message": "Invalid 'messages'", "type": "invalid_request_error", "code": null}})), false),
        ("ollama", Reply::json(400, json!({"error": "prompt too long; exceeded max context length by 120 tokens"})), true),
        ("ollama", Reply::json(400, json!({"error": "input length exceeds the context length"})), true),
        ("ollama", Reply::json(404, json!({"error": "model \"m\" not found, try pulling it first"})), false),
    ];
    for (provider, reply, too_long) in cases {
        let fake = FakeServer::start(vec![reply]).await;
        let access = ProviderAccess { base_url: Some(fake.url.clone()), credential: Some(Secret::new(KEY.into())), tenant: false };
        let err = match runtime.provider_complete(provider, &access, hello.clone()).await.unwrap() {
            Err(err) => err,
            Ok(_) => panic!("{provider}: expected an error"),
        };
        assert_eq!(matches!(err.kind, ErrorKind::ContextLengthExceeded), too_long, "{provider}: {err:?}");
        if too_long {
            assert!(!err.retryable, "{provider}: {err:?}");
        }
    }
}

/// One OpenAI chat-completion chunk as SSE.
fn openai_chunk(delta: Value, finish: Option<&str>) -> String {
    let chunk = json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "local-model",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
    format!("data: {chunk}\n\n")
}

fn openai_answer(delta: Value, finish: &str, prompt_tokens: u64) -> Reply {
    let usage = json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "local-model", "choices": [],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 5, "total_tokens": prompt_tokens + 5}});
    let body = openai_chunk(delta, None) + &openai_chunk(json!({}), Some(finish)) + &format!("data: {usage}\n\ndata: [DONE]\n\n");
    Reply::sse(vec![common::fake::Chunk::Data(body.into_bytes())])
}

/// An OpenAI-compatible server (as vLLM or llama.cpp) whose model list
/// states the window: a run with no `context_window` of its own asks for
/// the list once its requests grow, and compacts to fit.
#[tokio::test]
async fn the_window_comes_from_the_providers_model_list() {
    let (summaries, steps) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (summaries_seen, steps_seen) = (summaries.clone(), steps.clone());
    let fake = FakeServer::responding(move |r: &Recorded| {
        if r.path.ends_with("/models") {
            return Reply::json(200, json!({"object": "list", "data": [{"id": "local-model", "object": "model", "context_length": WINDOW}]}));
        }
        let body = r.json();
        if body["messages"][0]["content"].as_str().is_some_and(|s| s.starts_with(SUMMARISER)) {
            let n = summaries.fetch_add(1, Ordering::SeqCst) + 1;
            return openai_answer(json!({"role": "assistant", "content": format!("SUMMARY-{n}: files were read.")}), "stop", tokens(r));
        }
        let step = steps.fetch_add(1, Ordering::SeqCst);
        if step < FILES {
            let call = json!({"index": 0, "id": format!("call_{step:02}"), "type": "function",
                "function": {"name": "read", "arguments": format!("{{\"filePath\": \"f{:02}.txt\"}}", step + 1)}});
            openai_answer(json!({"role": "assistant", "content": null, "tool_calls": [call]}), "tool_calls", tokens(r))
        } else {
            openai_answer(json!({"role": "assistant", "content": "All files read."}), "stop", tokens(r))
        }
    })
    .await;
    let server = Server::start(&[]);
    let work = tempfile::tempdir().unwrap();
    for n in 1..=FILES {
        std::fs::write(work.path().join(format!("f{n:02}.txt")), file_text(n)).unwrap();
    }
    let base = format!("{}/v1", fake.url);
    let (status, body) = server.put("/provider/auth", json!({"providers": {"openai": {"type": "api_key", "key": KEY, "base_url": base}}})).await;
    assert_eq!(status, 200, "{body}");
    let (status, agent) = server
        .post("/agents", json!({"name": "reader", "instructions": "Read.", "tools": ["read"],
            "provider": {"id": "openai", "model": "local-model", "max_tokens": 256}, "compaction": {"keep_turns": 2}}))
        .await;
    assert_eq!(status, 201, "{agent}");
    let (_, session) = server.post("/sessions", json!({"work_dir": work.path()})).await;
    let s = Setup { agent: agent["id"].as_str().unwrap().into(), session: session["id"].as_str().unwrap().into(), server, fake, _work: work };
    let events = s.stream("Read every file.").await;
    assert_eq!(events.last().unwrap().name, "done", "{events:?}");

    let requests = s.fake.requests();
    assert_eq!(requests.iter().filter(|r| r.path.ends_with("/models")).count(), 1, "the list is asked for once");
    assert!(requests[0].path.ends_with("/chat/completions"), "not before the requests grow");
    for (i, r) in requests.iter().enumerate() {
        assert!(tokens(r) < WINDOW, "request {i} ({}) has {} tokens", r.path, tokens(r));
    }
    assert!(summaries_seen.load(Ordering::SeqCst) >= 1);
    assert_eq!(steps_seen.load(Ordering::SeqCst), FILES + 1);
    assert!(events.iter().any(|e| e.name == "compaction"));
}
