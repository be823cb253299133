//! Permissions over HTTP: rules that allow, ask or deny each tool call, the
//! questions a waiting run asks, and the answers given on another
//! connection (once, always, reject), time-outs and restarts. The real
//! `hangar` binary, a fake Anthropic server scripting the model's calls,
//! and real files in the session's working directory.

mod common;

use std::time::Duration;

use common::fake::{FakeServer, Reply, anthropic};
use common::server::Server;
use common::sse::{Events, Sse};
use serde_json::{Value, json};

struct Setup {
    server: Server,
    fake: FakeServer,
    agent: String,
    session: String,
    work: tempfile::TempDir,
    _config: tempfile::TempDir,
}

/// A server with `config` as its config file, an agent with every built-in
/// tool and `rules`, a session on a fresh directory.
async fn setup(script: Vec<Reply>, config: &str, rules: Value) -> Setup {
    let fake = FakeServer::start(script).await;
    let config_dir = tempfile::tempdir().unwrap();
    let config_file = config_dir.path().join("hangar.toml");
    std::fs::write(&config_file, config).unwrap();
    let server = Server::start(&["--config", config_file.to_str().unwrap()]);
    let work = tempfile::tempdir().unwrap();
    let (status, body) =
        server.put("/provider/auth", json!({"providers": {"anthropic": {"type": "api_key", "key": "sk-ant-perm", "base_url": fake.url}}})).await;
    assert_eq!(status, 200, "{body}");
    let (status, agent) = server
        .post("/agents", json!({"name": "t", "instructions": "", "tools": ["bash", "read", "write", "edit", "glob", "grep"],
            "provider": {"id": "anthropic", "model": "claude-test", "max_tokens": 64}, "permissions": rules}))
        .await;
    assert_eq!(status, 201, "{agent}");
    let (_, session) = server.post("/sessions", json!({"work_dir": work.path()})).await;
    Setup {
        agent: agent["id"].as_str().unwrap().into(),
        session: session["id"].as_str().unwrap().into(),
        server,
        fake,
        work,
        _config: config_dir,
    }
}

/// The model calls one tool, then ends its turn with "done".
fn calls(id: &str, tool: &str, input: Value) -> Reply {
    Reply::sse(anthropic::tool_answer(id, tool, &[&input.to_string()], 5, 5))
}

fn calls_many(uses: &[(&str, &str, Value)]) -> Reply {
    let mut chunks = vec![anthropic::start(5)];
    for (i, (id, tool, input)) in uses.iter().enumerate() {
        chunks.extend(anthropic::tool_block(i as u32, id, tool, &[&input.to_string()]));
    }
    chunks.extend(anthropic::stop("tool_use", 5));
    Reply::sse(chunks)
}

fn done() -> Reply {
    Reply::sse(anthropic::text_answer(&["done"], 5, 1))
}

impl Setup {
    fn path(&self, tail: &str) -> String {
        format!("/sessions/{}{tail}", self.session)
    }

    /// Starts a message as a stream; returns the run id and its events.
    async fn stream(&self) -> (String, Events) {
        let resp = self
            .server
            .client
            .post(self.server.url(&self.path("/message/stream")))
            .json(&json!({"agent_id": self.agent, "message": "go"}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let location = resp.headers()["content-location"].to_str().unwrap().to_string();
        (location.rsplit('/').next().unwrap().to_string(), Events::new(resp))
    }

    async fn reply(&self, request: &str, body: Value) -> (u16, Value) {
        self.server.post(&self.path(&format!("/permissions/{request}")), body).await
    }

    async fn pending(&self) -> Vec<Value> {
        let (status, body) = self.server.get(&self.path("/permissions?status=pending")).await;
        assert_eq!(status, 200, "{body}");
        body.as_array().unwrap().clone()
    }

    /// What the model was sent as the result of tool call `id`.
    fn result_sent(&self, id: &str) -> Value {
        for request in self.fake.requests().iter().rev() {
            for message in request.json()["messages"].as_array().unwrap() {
                for block in message["content"].as_array().into_iter().flatten() {
                    if block["type"] == "tool_result" && block["tool_use_id"] == id {
                        return block.clone();
                    }
                }
            }
        }
        panic!("no tool_result for {id} was sent to the model");
    }
}

/// Events until (and including) the first named `name`.
async fn until(events: &mut Events, name: &str) -> Vec<Sse> {
    let mut seen = Vec::new();
    loop {
        let event = events.next().await.unwrap_or_else(|| panic!("the stream ended before `{name}`: {seen:?}"));
        let last = event.name == name;
        seen.push(event);
        if last {
            return seen;
        }
    }
}

fn named<'a>(events: &'a [Sse], name: &str) -> Vec<&'a Sse> {
    events.iter().filter(|e| e.name == name).collect()
}

const ASK_BASH: &str = r#"[{"tool": "bash", "pattern": "*", "action": "ask"}]"#;

fn rules(text: &str) -> Value {
    serde_json::from_str(text).unwrap()
}

#[tokio::test]
async fn a_denied_call_is_not_run_and_the_model_is_told_which_rule() {
    let s = setup(
        vec![calls("w1", "write", json!({"filePath": "secret/key.txt", "content": "x"})), done()],
        "",
        json!([{"tool": "write", "pattern": "*", "action": "allow"}, {"tool": "write", "pattern": "secret/**", "action": "deny"}]),
    )
    .await;
    std::fs::create_dir(s.work.path().join("secret")).unwrap();
    let (status, body) = s.server.post(&s.path("/message"), json!({"agent_id": s.agent, "message": "go"})).await;
    assert_eq!(status, 200, "{body}");
    assert!(!s.work.path().join("secret/key.txt").exists(), "a denied write left a file");
    let sent = s.result_sent("w1");
    assert_eq!(sent["is_error"], true);
    let text = sent["content"].to_string();
    assert!(text.contains("denied by `permissions[1]`") && text.contains("secret/**"), "{text}");
    assert!(s.pending().await.is_empty(), "a deny asks nobody");
}

#[tokio::test]
async fn an_asked_call_waits_and_runs_once_approved() {
    let s = setup(vec![calls("b1", "bash", json!({"command": "echo hi > out.txt"})), done()], "", rules(ASK_BASH)).await;
    let (run_id, mut events) = s.stream().await;
    let seen = until(&mut events, "permission_request").await;
    assert_eq!(named(&seen, "tool_use").len(), 1);
    let asked = seen.last().unwrap().json();
    assert_eq!(asked["run_id"], run_id.as_str());
    assert_eq!(asked["tool_use_id"], "b1");
    assert_eq!(asked["tool"], "bash");
    assert_eq!(asked["input"]["command"], "echo hi > out.txt");
    assert_eq!(asked["patterns"], json!(["echo hi *"]));
    let request = asked["request_id"].as_str().unwrap().to_string();

    let (_, run) = s.server.get(&s.path(&format!("/runs/{run_id}"))).await;
    assert_eq!(run["status"], "waiting");
    let pending = s.pending().await;
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0]["id"], request.as_str());
    assert_eq!(pending[0]["status"], "pending");
    assert!(!s.work.path().join("out.txt").exists(), "nothing runs before the answer");

    // Bad answers change nothing.
    assert_eq!(s.reply("01NOSUCHREQUEST", json!({"reply": "once"})).await.0, 404);
    let (status, body) = s.reply(&request, json!({"reply": "sometimes"})).await;
    assert_eq!(status, 422, "{body}");
    let (status, body) = s.reply(&request, json!({"reply": "once", "message": "ok", "extra": 1})).await;
    assert_eq!(status, 422, "{body}");

    let (status, answered) = s.reply(&request, json!({"reply": "once"})).await;
    assert_eq!(status, 200, "{answered}");
    assert_eq!(answered["status"], "approved");
    assert_eq!(answered["reply"], "once");
    assert!(answered["answered_at"].is_string());
    let (status, body) = s.reply(&request, json!({"reply": "reject"})).await;
    assert_eq!(status, 409, "an answered request cannot be answered again: {body}");

    let rest = until(&mut events, "done").await;
    let replied = named(&rest, "permission_replied")[0].json();
    assert_eq!(replied["request_id"], request.as_str());
    assert_eq!(replied["status"], "approved");
    let result = named(&rest, "tool_result")[0].json();
    assert_eq!(result["is_error"], false, "{result}");
    assert_eq!(std::fs::read_to_string(s.work.path().join("out.txt")).unwrap(), "hi\n");
    let (_, run) = s.server.get(&s.path(&format!("/runs/{run_id}"))).await;
    assert_eq!(run["status"], "completed");
    let (_, all) = s.server.get(&s.path("/permissions")).await;
    assert_eq!(all.as_array().unwrap().len(), 1);
    assert_eq!(all[0]["status"], "approved");
    // The audit trail holds the one accepted reply, none of the refused ones,
    // with the status it was answered with: its entry is written with the
    // reply, before the answer, as 201 (a POST's usual status), and corrected.
    let (_, audit) = s.server.get("/audit").await;
    let replies: Vec<&Value> =
        audit.as_array().unwrap().iter().filter(|e| e["route"] == "/sessions/{id}/permissions/{request_id}").collect();
    assert_eq!(replies.len(), 1, "{audit}");
    assert_eq!(replies[0]["status"], 200, "{audit}");
}

#[tokio::test]
async fn a_rejection_reaches_the_model_with_its_message() {
    let s = setup(vec![calls("b1", "bash", json!({"command": "touch pwned"})), done()], "", rules(ASK_BASH)).await;
    let (_, mut events) = s.stream().await;
    let asked = until(&mut events, "permission_request").await.pop().unwrap().json();
    let (status, body) =
        s.reply(asked["request_id"].as_str().unwrap(), json!({"reply": "reject", "message": "use git stash instead"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "rejected");
    let rest = until(&mut events, "done").await;
    assert_eq!(named(&rest, "permission_replied")[0].json()["reply"], "reject");
    assert!(!s.work.path().join("pwned").exists());
    let sent = s.result_sent("b1");
    assert_eq!(sent["is_error"], true);
    let text = sent["content"].to_string();
    assert!(text.contains("rejected") && text.contains("use git stash instead"), "{text}");
}

#[tokio::test]
async fn always_allows_later_matching_calls_of_the_session_without_asking() {
    let s = setup(
        vec![
            calls("b1", "bash", json!({"command": "touch a.txt"})),
            calls("b2", "bash", json!({"command": "touch b.txt"})),
            calls("b3", "bash", json!({"command": "rm a.txt"})),
            done(),
        ],
        "",
        rules(ASK_BASH),
    )
    .await;
    let (_, mut events) = s.stream().await;
    let asked = until(&mut events, "permission_request").await.pop().unwrap().json();
    assert_eq!(asked["patterns"], json!(["touch *"]));
    let (status, body) = s.reply(asked["request_id"].as_str().unwrap(), json!({"reply": "always"})).await;
    assert_eq!(status, 200, "{body}");
    // `touch b.txt` matches the grant and runs; `rm a.txt` does not and is asked.
    let seen = until(&mut events, "permission_request").await;
    assert_eq!(named(&seen, "tool_result").len(), 2, "{seen:?}");
    assert!(s.work.path().join("b.txt").exists());
    let second = seen.last().unwrap().json();
    assert_eq!(second["tool_use_id"], "b3");
    s.reply(second["request_id"].as_str().unwrap(), json!({"reply": "reject"})).await;
    until(&mut events, "done").await;
    assert!(s.work.path().join("a.txt").exists(), "the rejected rm did not run");
    let (_, all) = s.server.get(&s.path("/permissions")).await;
    assert_eq!(all.as_array().unwrap().len(), 2, "the granted call was not asked: {all}");
}

#[tokio::test]
async fn a_compound_line_partly_outside_an_allow_rule_is_asked() {
    let s = setup(
        vec![
            calls("b1", "bash", json!({"command": "git --version && echo ok"})),
            calls("b2", "bash", json!({"command": "echo ok; touch pwned"})),
            calls("b3", "bash", json!({"command": "echo $(touch pwned2)"})),
            done(),
        ],
        "",
        json!([{"tool": "bash", "pattern": "*", "action": "ask"},
               {"tool": "bash", "pattern": "echo *", "action": "allow"},
               {"tool": "bash", "pattern": "git *", "action": "allow"}]),
    )
    .await;
    let (_, mut events) = s.stream().await;
    let seen = until(&mut events, "permission_request").await;
    assert_eq!(named(&seen, "tool_result").len(), 1, "every command of the first line is allowed");
    let asked = seen.last().unwrap().json();
    assert_eq!(asked["tool_use_id"], "b2");
    assert_eq!(asked["patterns"], json!(["touch pwned *"]));
    s.reply(asked["request_id"].as_str().unwrap(), json!({"reply": "reject"})).await;
    let asked = until(&mut events, "permission_request").await.pop().unwrap().json();
    assert_eq!(asked["tool_use_id"], "b3", "a command substitution is a command too");
    s.reply(asked["request_id"].as_str().unwrap(), json!({"reply": "reject"})).await;
    until(&mut events, "done").await;
    assert!(!s.work.path().join("pwned").exists());
    assert!(!s.work.path().join("pwned2").exists());
}

#[tokio::test]
async fn an_unanswered_request_times_out_and_the_run_goes_on() {
    let s = setup(
        vec![calls("b1", "bash", json!({"command": "touch late"})), done()],
        "[permissions]\ntimeout_s = 1\n",
        rules(ASK_BASH),
    )
    .await;
    let (run_id, mut events) = s.stream().await;
    let asked = until(&mut events, "permission_request").await.pop().unwrap().json();
    let rest = until(&mut events, "done").await;
    let replied = named(&rest, "permission_replied").first().unwrap_or_else(|| panic!("{rest:?}")).json();
    assert_eq!(replied["status"], "timed_out", "{replied}");
    assert!(!s.work.path().join("late").exists());
    assert!(s.result_sent("b1")["content"].to_string().contains("timed out"));
    let (status, request) = s.server.get(&s.path(&format!("/permissions/{}", asked["request_id"].as_str().unwrap()))).await;
    assert_eq!(status, 200);
    assert_eq!(request["status"], "timed_out");
    let (status, body) = s.reply(asked["request_id"].as_str().unwrap(), json!({"reply": "once"})).await;
    assert_eq!(status, 409, "{body}");
    let (_, run) = s.server.get(&s.path(&format!("/runs/{run_id}"))).await;
    assert_eq!(run["status"], "completed");
}

#[tokio::test]
async fn a_restart_interrupts_pending_requests_with_their_run() {
    let mut s = setup(vec![calls("b1", "bash", json!({"command": "touch x"}))], "", rules(ASK_BASH)).await;
    let (run_id, mut events) = s.stream().await;
    let asked = until(&mut events, "permission_request").await.pop().unwrap().json();
    drop(events);
    s.server = s.server.crash_and_restart();
    let (_, request) = s.server.get(&s.path(&format!("/permissions/{}", asked["request_id"].as_str().unwrap()))).await;
    assert_eq!(request["status"], "interrupted", "{request}");
    let (_, run) = s.server.get(&s.path(&format!("/runs/{run_id}"))).await;
    assert_eq!(run["status"], "interrupted", "{run}");
    let (status, _) = s.reply(asked["request_id"].as_str().unwrap(), json!({"reply": "once"})).await;
    assert_eq!(status, 409);
    assert!(!s.work.path().join("x").exists());
    let (_, session) = s.server.get(&s.path("")).await;
    let last = session["history"].as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["content"][0]["type"], "tool_result", "the history stays valid: {last}");
}

#[tokio::test]
async fn the_blocking_endpoint_waits_for_an_answer_sent_on_another_connection() {
    let s = setup(vec![calls("b1", "bash", json!({"command": "echo blocked > b.txt"})), done()], "", rules(ASK_BASH)).await;
    let url = s.server.url(&s.path("/message"));
    let body = json!({"agent_id": s.agent, "message": "go"});
    let client = s.server.client.clone();
    let blocking = tokio::spawn(async move { client.post(url).json(&body).send().await.unwrap().json::<Value>().await.unwrap() });
    let mut pending = Vec::new();
    for _ in 0..400 {
        pending = s.pending().await;
        if !pending.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(pending.len(), 1, "the call was asked");
    assert!(!blocking.is_finished(), "the blocking request waits");
    let (status, _) = s.reply(pending[0]["id"].as_str().unwrap(), json!({"reply": "once"})).await;
    assert_eq!(status, 200);
    let result = blocking.await.unwrap();
    assert_eq!(result["response"], "done", "{result}");
    assert_eq!(result["tool_calls"][0]["is_error"], false, "{result}");
    assert_eq!(std::fs::read_to_string(s.work.path().join("b.txt")).unwrap(), "blocked\n");
}

#[tokio::test]
async fn cancelling_a_waiting_run_rejects_its_requests() {
    let s = setup(vec![calls("b1", "bash", json!({"command": "touch never"}))], "", rules(ASK_BASH)).await;
    let (run_id, mut events) = s.stream().await;
    let asked = until(&mut events, "permission_request").await.pop().unwrap().json();
    let (status, run) = s.server.post(&s.path(&format!("/runs/{run_id}/cancel")), json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(run["status"], "cancelled", "{run}");
    let (_, request) = s.server.get(&s.path(&format!("/permissions/{}", asked["request_id"].as_str().unwrap()))).await;
    assert_eq!(request["status"], "rejected", "{request}");
    assert!(!s.work.path().join("never").exists());
}

#[tokio::test]
async fn allowed_reads_of_a_step_are_answered_while_another_call_waits() {
    let s = setup(
        vec![
            calls_many(&[
                ("r1", "read", json!({"filePath": "a.txt"})),
                ("r2", "read", json!({"filePath": "private/b.txt"})),
                ("r3", "read", json!({"filePath": "c.txt"})),
                ("g1", "grep", json!({"pattern": "x", "path": "private"})),
            ]),
            done(),
        ],
        "",
        json!([{"tool": "*", "pattern": "private/**", "action": "ask"}, {"tool": "grep", "pattern": "private", "action": "ask"}]),
    )
    .await;
    for f in ["a.txt", "c.txt"] {
        std::fs::write(s.work.path().join(f), f).unwrap();
    }
    std::fs::create_dir(s.work.path().join("private")).unwrap();
    std::fs::write(s.work.path().join("private/b.txt"), "b").unwrap();
    let (_, mut events) = s.stream().await;
    // Both questions of the step come together, before any result.
    let mut seen = until(&mut events, "permission_request").await;
    seen.extend(until(&mut events, "permission_request").await);
    let asked: Vec<Value> = named(&seen, "permission_request").iter().map(|e| e.json()).collect();
    assert_eq!(asked.iter().map(|a| a["tool_use_id"].clone()).collect::<Vec<_>>(), [json!("r2"), json!("g1")]);
    // The first read is answered while the second waits.
    let first = events.next().await.unwrap();
    assert_eq!((first.name.as_str(), first.json()["tool_use_id"].clone()), ("tool_result", json!("r1")));
    // Answered out of order, each on its own.
    s.reply(asked[1]["request_id"].as_str().unwrap(), json!({"reply": "reject", "message": "not there"})).await;
    s.reply(asked[0]["request_id"].as_str().unwrap(), json!({"reply": "once"})).await;
    let rest = until(&mut events, "done").await;
    let results: Vec<Value> = named(&rest, "tool_result").iter().map(|e| e.json()).collect();
    assert_eq!(results.iter().map(|r| r["tool_use_id"].clone()).collect::<Vec<_>>(), [json!("r2"), json!("r3"), json!("g1")]);
    assert_eq!(results[0]["is_error"], false, "{results:?}");
    assert!(results[0]["content"].as_str().unwrap().contains('b'));
    assert_eq!(results[2]["is_error"], true);
}

#[tokio::test]
async fn config_rules_and_default_come_before_the_agents() {
    let config = r#"
[permissions]
default = "ask"

[[permissions.rules]]
tool = "read"
pattern = "*"
action = "allow"

[[permissions.rules]]
tool = "write"
pattern = "*"
action = "deny"

[[permissions.enforce]]
tool = "bash"
pattern = "sudo *"
action = "deny"
"#;
    let s = setup(
        vec![
            calls_many(&[
                ("r1", "read", json!({"filePath": "a.txt"})),
                ("w1", "write", json!({"filePath": "a.txt", "content": "changed"})),
                ("w2", "write", json!({"filePath": "notes/n.txt", "content": "n"})),
                ("b1", "bash", json!({"command": "ls"})),
                ("b2", "bash", json!({"command": "ls; sudo id"})),
            ]),
            done(),
        ],
        config,
        json!([{"tool": "write", "pattern": "notes/**", "action": "allow"}, {"tool": "bash", "pattern": "sudo *", "action": "allow"}]),
    )
    .await;
    std::fs::write(s.work.path().join("a.txt"), "a").unwrap();
    let (_, mut events) = s.stream().await;
    let seen = until(&mut events, "permission_request").await;
    let asked = seen.last().unwrap().json();
    assert_eq!(asked["tool_use_id"], "b1", "the default asks for what no rule matches");
    assert_eq!(named(&seen, "permission_request").len(), 1);
    s.reply(asked["request_id"].as_str().unwrap(), json!({"reply": "reject"})).await;
    let rest = until(&mut events, "done").await;
    let results: Vec<Value> = seen.iter().chain(&rest).filter(|e| e.name == "tool_result").map(|e| e.json()).collect();
    let by_id = |id: &str| results.iter().find(|r| r["tool_use_id"] == id).unwrap().clone();
    assert_eq!(by_id("r1")["is_error"], false, "{results:?}");
    assert!(by_id("w1")["content"].as_str().unwrap().contains("rule 1 of [permissions] in the config file"), "{results:?}");
    assert_eq!(by_id("w2")["is_error"], false, "the agent's rule comes after the config's");
    assert_eq!(std::fs::read_to_string(s.work.path().join("a.txt")).unwrap(), "a");
    assert!(s.work.path().join("notes/n.txt").exists());
    assert!(by_id("b2")["content"].as_str().unwrap().contains("enforced rule 0"), "an agent cannot lift an enforced rule: {results:?}");
}

#[tokio::test]
async fn invalid_rules_are_refused_naming_the_rule() {
    let s = setup(vec![], "", json!([])).await;
    let create = |rules: Value| {
        json!({"name": "t", "tools": ["bash"], "provider": {"id": "anthropic", "model": "m"}, "permissions": rules})
    };
    for (rules, needle) in [
        (json!([{"tool": "bash", "pattern": "*", "action": "maybe"}]), "maybe"),
        (json!([{"tool": "bash", "pattern": "*", "action": "ask"}, {"tool": "bash", "pattern": "git [", "action": "ask"}]), "permissions[1]"),
        (json!([{"tool": "nosuchtool", "pattern": "*", "action": "deny"}]), "nosuchtool"),
        (json!([{"tool": "", "action": "deny"}]), "permissions[0]"),
    ] {
        let (status, body) = s.server.post("/agents", create(rules.clone())).await;
        assert_eq!(status, 422, "{rules}: {body}");
        assert!(body["error"].as_str().unwrap().contains(needle), "{rules}: {body}");
    }
    let (status, body) = s.server.put(&format!("/agents/{}", s.agent), json!({"permissions": [{"tool": "bash", "pattern": "{", "action": "ask"}]})).await;
    assert_eq!(status, 422, "{body}");
    let (status, body) = s.server.put(&format!("/agents/{}", s.agent), json!({"permissions": [{"tool": "bash", "pattern": "git *", "action": "allow"}]})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["permissions"][0]["pattern"], "git *");
    let (status, _) = s.server.get("/sessions/01NOSUCHSESSION/permissions").await;
    assert_eq!(status, 404);
    let (status, _) = s.server.get(&s.path("/permissions?status=bogus")).await;
    assert_eq!(status, 422);
}

#[tokio::test]
async fn a_bad_config_rule_stops_the_server_at_start_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("hangar.toml");
    std::fs::write(&file, "[[permissions.rules]]\ntool = \"bash\"\npattern = \"a[\"\naction = \"deny\"\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hangar"))
        .args(["serve", "--port", "0", "--config", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("rule 0 of [permissions] in the config file"), "{err}");
}

#[tokio::test]
async fn a_symlink_cannot_carry_a_write_past_a_path_rule() {
    let s = setup(
        vec![calls("w1", "write", json!({"filePath": "src/link/stolen.txt", "content": "x"})), done()],
        "",
        json!([{"tool": "write", "pattern": "*", "action": "deny"}, {"tool": "write", "pattern": "src/**", "action": "allow"}]),
    )
    .await;
    std::fs::create_dir_all(s.work.path().join("src")).unwrap();
    std::fs::create_dir_all(s.work.path().join("config")).unwrap();
    std::os::unix::fs::symlink("../config", s.work.path().join("src/link")).unwrap();
    let (status, body) = s.server.post(&s.path("/message"), json!({"agent_id": s.agent, "message": "go"})).await;
    assert_eq!(status, 200, "{body}");
    assert!(!s.work.path().join("config/stolen.txt").exists(), "the write went through the link");
    let text = s.result_sent("w1")["content"].to_string();
    assert!(text.contains("config/stolen.txt") && text.contains("denied"), "{text}");
}
