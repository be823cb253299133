//! Multi-tenant hosting, from two tenants' side and the operator's: the
//! real `hangar` binary with `--admin-token`, each tenant with its own key,
//! its own fake Anthropic server and its own provider key; every route
//! tried with the other tenant's ids, work dirs attacked with `..`,
//! absolute paths, symlinks and `bash`, every quota reached, keys rotated
//! and revoked, and the database file searched for secrets.

mod common;

use std::time::Duration;

use common::fake::{FakeServer, Reply, anthropic};
use common::server::Server;
use serde_json::{Value, json};

const ADMIN: &str = "admin-token-for-tests";

struct Host {
    server: Server,
    root: tempfile::TempDir,
    _config: tempfile::TempDir,
    /// Fake providers, one for each tenant made with [`tenant`]: the
    /// operator allows tenants these origins (they are on loopback, which
    /// tenants reach only where the operator names the host).
    fakes: std::sync::Mutex<Vec<FakeServer>>,
}

/// A multi-tenant server with `config` (which may add `[tenants.*]`
/// tables, not `[tenants]` itself) as its config file.
async fn host(config: &str) -> Host {
    let mut fakes = Vec::new();
    for _ in 0..4 {
        fakes.push(FakeServer::start(Vec::new()).await);
    }
    let origins: Vec<String> = fakes.iter().map(|f| format!("{:?}", f.url)).collect();
    let root = tempfile::tempdir().unwrap();
    let config_dir = tempfile::tempdir().unwrap();
    let config_file = config_dir.path().join("hangar.toml");
    std::fs::write(&config_file, format!("[tenants]\nallowed_origins = [{}]\n{config}", origins.join(", "))).unwrap();
    let server = Server::start(&[
        "--admin-token",
        ADMIN,
        "--work-root",
        root.path().to_str().unwrap(),
        "--config",
        config_file.to_str().unwrap(),
    ]);
    Host { server, root, _config: config_dir, fakes: std::sync::Mutex::new(fakes) }
}

/// Requests with one bearer credential.
struct As<'a> {
    server: &'a Server,
    key: String,
}

impl As<'_> {
    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.server.client.request(method, self.server.url(path)).bearer_auth(&self.key)
    }
    async fn get(&self, path: &str) -> (u16, Value) {
        self.server.send(self.req(reqwest::Method::GET, path)).await
    }
    async fn delete(&self, path: &str) -> (u16, Value) {
        self.server.send(self.req(reqwest::Method::DELETE, path)).await
    }
    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        self.server.send(self.req(reqwest::Method::POST, path).json(&body)).await
    }
    async fn put(&self, path: &str, body: Value) -> (u16, Value) {
        self.server.send(self.req(reqwest::Method::PUT, path).json(&body)).await
    }
    async fn patch(&self, path: &str, body: Value) -> (u16, Value) {
        self.server.send(self.req(reqwest::Method::PATCH, path).json(&body)).await
    }
    /// Status, `Retry-After` and body.
    async fn raw(&self, req: reqwest::RequestBuilder) -> (u16, Option<u64>, Value) {
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let retry = resp.headers().get("retry-after").map(|v| v.to_str().unwrap().parse().unwrap());
        (status, retry, resp.json().await.unwrap_or(Value::Null))
    }
}

impl Host {
    fn admin(&self) -> As<'_> {
        As { server: &self.server, key: ADMIN.into() }
    }
    fn tenant(&self, key: &str) -> As<'_> {
        As { server: &self.server, key: key.into() }
    }

    /// A new tenant: (id, key).
    async fn new_tenant(&self, name: &str, quotas: Value) -> (String, String) {
        let (status, body) = self.admin().post("/tenants", json!({"name": name, "quotas": quotas})).await;
        assert_eq!(status, 201, "{body}");
        (body["id"].as_str().unwrap().into(), body["key"].as_str().unwrap().into())
    }
}

/// A tenant set up to run: its provider key pointing at its own fake, an
/// agent with `bash` (rules `rules`) and a session on a directory of its own.
struct Tenant {
    id: String,
    key: String,
    provider_key: String,
    fake: FakeServer,
    agent: String,
    session: String,
    work_dir: String,
}

async fn tenant(host: &Host, name: &str, quotas: Value, rules: Value) -> Tenant {
    let (id, key) = host.new_tenant(name, quotas).await;
    let me = host.tenant(&key);
    let fake = host.fakes.lock().unwrap().pop().expect("a fake provider left");
    let provider_key = format!("sk-ant-{name}-secret-0123456789");
    let (status, body) = me
        .put("/provider/auth", json!({"providers": {"anthropic": {"type": "api_key", "key": provider_key, "base_url": fake.url}}}))
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, agent) = me
        .post("/agents", json!({"name": name, "tools": ["bash", "read", "write"], "permissions": rules,
            "provider": {"id": "anthropic", "model": "claude-test", "max_tokens": 64}}))
        .await;
    assert_eq!(status, 201, "{agent}");
    let (status, session) = me.post("/sessions", json!({})).await;
    assert_eq!(status, 201, "{session}");
    Tenant {
        id,
        key,
        provider_key,
        fake,
        agent: agent["id"].as_str().unwrap().into(),
        session: session["id"].as_str().unwrap().into(),
        work_dir: session["work_dir"].as_str().unwrap().into(),
    }
}

fn calls(id: &str, tool: &str, input: Value) -> Reply {
    Reply::sse(anthropic::tool_answer(id, tool, &[&input.to_string()], 5, 5))
}

fn done() -> Reply {
    Reply::sse(anthropic::text_answer(&["done"], 5, 1))
}

/// Sends a message and waits for its result (status, body).
async fn message(host: &Host, t: &Tenant, text: &str) -> (u16, Value) {
    host.tenant(&t.key)
        .post(&format!("/sessions/{}/message", t.session), json!({"agent_id": t.agent, "message": text}))
        .await
}

/// The content of the tool result sent back to the model for call `id`.
fn result_sent(fake: &FakeServer, id: &str) -> Value {
    for request in fake.requests().iter().rev() {
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

#[tokio::test]
async fn two_tenants_see_only_their_own_on_every_route() {
    let host = host("").await;
    let a = tenant(&host, "alpha", json!({}), json!([])).await;
    let b = tenant(&host, "beta", json!({}), json!([{"tool": "bash", "pattern": "*", "action": "ask"}])).await;
    let (as_a, as_b) = (host.tenant(&a.key), host.tenant(&b.key));

    // A run of B leaves a run, events and a pending permission request.
    b.fake.push(calls("tu_b", "bash", json!({"command": "echo hi"})));
    let (status, accepted) = as_b
        .post(&format!("/sessions/{}/message", b.session), json!({"agent_id": b.agent, "message": "go", "background": true}))
        .await;
    assert_eq!(status, 202, "{accepted}");
    let b_run = accepted["run_id"].as_str().unwrap().to_string();
    let b_request = loop {
        let (_, pending) = as_b.get(&format!("/sessions/{}/permissions?status=pending", b.session)).await;
        if let Some(first) = pending.as_array().and_then(|p| p.first()) {
            break first["id"].as_str().unwrap().to_string();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // Every route that takes B's ids, tried by A, answers as a missing id
    // does: the same status, code and message.
    let missing_session = "01JMISSINGSESSION000000000";
    let missing_agent = "01JMISSINGAGENT00000000000";
    let s = &b.session;
    let routes: Vec<(reqwest::Method, String, Option<Value>)> = vec![
        (reqwest::Method::GET, format!("/sessions/{s}"), None),
        (reqwest::Method::PUT, format!("/sessions/{s}"), Some(json!({}))),
        (reqwest::Method::DELETE, format!("/sessions/{s}"), None),
        (reqwest::Method::POST, format!("/sessions/{s}/message"), Some(json!({"agent_id": a.agent, "message": "x"}))),
        (reqwest::Method::POST, format!("/sessions/{s}/message/stream"), Some(json!({"agent_id": a.agent, "message": "x"}))),
        (reqwest::Method::GET, format!("/sessions/{s}/runs"), None),
        (reqwest::Method::GET, format!("/sessions/{s}/runs/{b_run}"), None),
        (reqwest::Method::POST, format!("/sessions/{s}/runs/{b_run}/cancel"), None),
        (reqwest::Method::GET, format!("/sessions/{s}/runs/{b_run}/events"), None),
        (reqwest::Method::GET, format!("/sessions/{s}/events"), None),
        (reqwest::Method::POST, format!("/sessions/{s}/abort"), None),
        (reqwest::Method::GET, format!("/sessions/{s}/permissions"), None),
        (reqwest::Method::GET, format!("/sessions/{s}/permissions/{b_request}"), None),
        (reqwest::Method::POST, format!("/sessions/{s}/permissions/{b_request}"), Some(json!({"reply": "once"}))),
    ];
    for (method, path, body) in &routes {
        let send = |path: &str| {
            let mut req = as_a.req(method.clone(), path);
            if let Some(body) = body {
                req = req.json(body);
            }
            req
        };
        let (status, theirs) = host.server.send(send(path)).await;
        let (missing_status, missing) = host.server.send(send(&path.replace(s.as_str(), missing_session))).await;
        assert_eq!(status, 404, "{method} {path} by another tenant: {theirs}");
        assert_eq!((status, &theirs["code"]), (missing_status, &missing["code"]), "{method} {path}");
        assert_eq!(theirs["error"].as_str().unwrap().replace(s.as_str(), missing_session), missing["error"], "{method} {path}");
    }
    for (method, body) in [(reqwest::Method::GET, None), (reqwest::Method::PUT, Some(json!({"name": "x"}))), (reqwest::Method::DELETE, None)] {
        let send = |id: &str| {
            let mut req = as_a.req(method.clone(), &format!("/agents/{id}"));
            if let Some(body) = &body {
                req = req.json(body);
            }
            req
        };
        let (status, theirs) = host.server.send(send(&b.agent)).await;
        let (_, missing) = host.server.send(send(missing_agent)).await;
        assert_eq!(status, 404, "{method} /agents/B: {theirs}");
        assert_eq!(theirs["code"], missing["code"]);
        assert_eq!(theirs["error"].as_str().unwrap().replace(b.agent.as_str(), missing_agent), missing["error"]);
    }
    // A's own session with B's agent: as if the agent did not exist.
    let (status, body) =
        as_a.post(&format!("/sessions/{}/message", a.session), json!({"agent_id": b.agent, "message": "x"})).await;
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")), "{body}");
    // Nothing of B's changed: the request is still pending, the session there.
    let (status, _) = as_b.get(&format!("/sessions/{s}/permissions/{b_request}")).await;
    assert_eq!(status, 200);
    let (status, _) = as_b.post(&format!("/sessions/{s}/permissions/{b_request}"), json!({"reply": "reject"})).await;
    assert_eq!(status, 200);

    // Lists are disjoint; the admin sees both.
    for (me, mine, theirs) in [(&as_a, &a, &b), (&as_b, &b, &a)] {
        let (_, agents) = me.get("/agents").await;
        let ids: Vec<&str> = agents.as_array().unwrap().iter().map(|x| x["id"].as_str().unwrap()).collect();
        assert_eq!(ids, vec![mine.agent.as_str()]);
        let (_, sessions) = me.get("/sessions").await;
        let ids: Vec<&str> = sessions.as_array().unwrap().iter().map(|x| x["id"].as_str().unwrap()).collect();
        assert_eq!(ids, vec![mine.session.as_str()]);
        assert!(!ids.contains(&theirs.session.as_str()));
    }
    let (_, all) = host.admin().get("/sessions").await;
    assert_eq!(all.as_array().unwrap().len(), 2);

    // A tenant key cannot administer; no key, a wrong key: 401.
    let (status, _) = as_a.get("/tenants").await;
    assert_eq!(status, 403);
    let (status, _, _) = as_a.raw(as_a.req(reqwest::Method::GET, "/metrics")).await;
    assert_eq!(status, 403);
    // The plugins directory is the operator's.
    let (status, _, body) = as_a.raw(as_a.req(reqwest::Method::POST, "/plugins/reload")).await;
    assert_eq!((status, body["code"].as_str()), (403, Some("forbidden")));
    let (status, body) = host.server.get("/agents").await;
    assert_eq!((status, body["code"].as_str()), (401, Some("unauthorized")));
    let (status, _) = host.tenant("hk_0000000000000000000000000000000000000000000000000000000000000000").get("/agents").await;
    assert_eq!(status, 401);
    let health = reqwest::get(host.server.url("/health")).await.unwrap();
    assert_eq!(health.status(), 200);
}

#[tokio::test]
async fn work_dirs_are_separate_and_commands_cannot_cross() {
    let host = host("").await;
    let a = tenant(&host, "alpha", json!({}), json!([])).await;
    let b = tenant(&host, "beta", json!({}), json!([])).await;
    let root = host.root.path().canonicalize().unwrap();
    assert_eq!(a.work_dir, root.join(&a.id).join(&a.session).to_str().unwrap());
    assert!(std::path::Path::new(&a.work_dir).is_dir());
    std::fs::write(std::path::Path::new(&b.work_dir).join("secret.txt"), "B-SECRET-CONTENT").unwrap();
    let as_a = host.tenant(&a.key);

    // `..`, another tenant's absolute path, a symlink that leads out: 422.
    let b_dir = root.join(&b.id);
    std::os::unix::fs::symlink(&b_dir, root.join(&a.id).join("link-to-b")).unwrap();
    for work_dir in [format!("../{}", b.id), b.work_dir.clone(), b_dir.to_str().unwrap().to_string(), "link-to-b".into(), "/tmp".into()] {
        let (status, body) = as_a.post("/sessions", json!({"work_dir": work_dir})).await;
        assert_eq!(status, 422, "{work_dir}: {body}");
    }
    // Relative to the tenant's directory, and absolute inside it: fine.
    std::fs::create_dir(root.join(&a.id).join("project")).unwrap();
    let (status, body) = as_a.post("/sessions", json!({"work_dir": "project"})).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["work_dir"], root.join(&a.id).join("project").to_str().unwrap());
    let (status, _) = as_a.put(&format!("/sessions/{}", a.session), json!({"work_dir": b.work_dir})).await;
    assert_eq!(status, 422);

    // A's commands see neither B's files nor the tenants' directory.
    let probe = format!("ls {root} ; ls {b} ; cat {b}/secret.txt ; cat ../../{bid}/{bs}/secret.txt ; echo END",
        root = root.display(), b = b.work_dir, bid = b.id, bs = b.session);
    a.fake.push(calls("tu_1", "bash", json!({"command": probe})));
    a.fake.push(done());
    let (status, body) = message(&host, &a, "look around").await;
    assert_eq!(status, 200, "{body}");
    let result = result_sent(&a.fake, "tu_1");
    let text = result["content"].to_string();
    assert!(text.contains("END"), "{text}");
    assert!(!text.contains("B-SECRET-CONTENT"), "{text}");
    // Every probe was refused (the names in the output are the probes' own
    // arguments, echoed in the errors).
    assert_eq!(text.matches("Permission denied").count(), 4, "{text}");

    // Each tenant's commands run as a uid of its own (never root), which
    // owns its directories, and reach no network port by default.
    let port = a.fake.url.rsplit(':').next().unwrap().to_string();
    let whoami = format!(
        "echo uid=$(id -u) ; stat -c owner=%u . ; (exec 3<>/dev/tcp/127.0.0.1/{port}) 2>/dev/null && echo net=open || echo net=closed"
    );
    let mut uids = Vec::new();
    for (t, id) in [(&a, "tu_w1"), (&b, "tu_w2")] {
        t.fake.push(calls(id, "bash", json!({"command": whoami})));
        t.fake.push(done());
        let (status, body) = message(&host, t, "who am i").await;
        assert_eq!(status, 200, "{body}");
        let text = result_sent(&t.fake, id)["content"].as_str().unwrap().to_string();
        assert!(text.contains("net=closed"), "{text}");
        let field = |name: &str| text.lines().find_map(|l| l.strip_prefix(name)).map(str::to_string).unwrap();
        // SAFETY: plain syscall.
        if unsafe { libc::geteuid() } == 0 {
            let uid: u32 = field("uid=").parse().unwrap();
            assert!(uid >= 200_000, "{text}");
            assert_eq!(field("owner="), uid.to_string(), "{text}");
            uids.push(uid);
        }
    }
    if uids.len() == 2 {
        assert_ne!(uids[0], uids[1]);
    }

    // Each tenant's provider key reached only its own fake, for its own run.
    b.fake.push(done());
    let (status, _) = message(&host, &b, "hello").await;
    assert_eq!(status, 200);
    for (fake, mine, theirs) in [(&a.fake, &a.provider_key, &b.provider_key), (&b.fake, &b.provider_key, &a.provider_key)] {
        let requests = fake.requests();
        assert!(!requests.is_empty());
        for r in &requests {
            assert_eq!(r.header("x-api-key"), Some(mine.as_str()));
            assert!(!r.raw_text().contains(theirs.as_str()));
        }
    }

    // Deleting a session removes the directory made for it.
    let (status, _) = as_a.delete(&format!("/sessions/{}", a.session)).await;
    assert_eq!(status, 200);
    assert!(!std::path::Path::new(&a.work_dir).exists());

    // Deleting a tenant removes all it had, and its key stops working.
    let (status, body) = host.admin().delete(&format!("/tenants/{}", b.id)).await;
    assert_eq!(status, 200, "{body}");
    assert!(!b_dir.exists());
    let (status, _) = host.tenant(&b.key).get("/agents").await;
    assert_eq!(status, 401);
    let (status, _) = host.admin().get(&format!("/sessions/{}", b.session)).await;
    assert_eq!(status, 404);
    let (status, _) = host.admin().get(&format!("/agents/{}", b.agent)).await;
    assert_eq!(status, 404);
    let (status, _) = host.admin().delete("/tenants/default").await;
    assert_eq!(status, 409);
}

#[tokio::test]
async fn keys_rotate_and_a_revoked_key_is_refused_at_once_and_no_secret_is_stored_in_clear() {
    let host = host("").await;
    let a = tenant(&host, "alpha", json!({}), json!([])).await;
    let admin = host.admin();
    let (status, tenant) = admin.get(&format!("/tenants/{}", a.id)).await;
    assert_eq!(status, 200);
    let keys = tenant["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    let first_key_id = keys[0]["id"].as_str().unwrap().to_string();
    assert!(a.key.starts_with(keys[0]["prefix"].as_str().unwrap()));
    assert!(a.key.len() >= 3 + 64 && a.key.starts_with("hk_"));
    assert!(!tenant.to_string().contains(&a.key));

    let (status, second) = admin.post(&format!("/tenants/{}/keys", a.id), json!({})).await;
    assert_eq!(status, 201, "{second}");
    let second_key = second["key"].as_str().unwrap().to_string();
    let (status, _) = host.tenant(&second_key).get("/agents").await;
    assert_eq!(status, 200);
    let (status, _) = admin.delete(&format!("/tenants/{}/keys/{first_key_id}", a.id)).await;
    assert_eq!(status, 200);
    let (status, _) = host.tenant(&a.key).get("/agents").await;
    assert_eq!(status, 401, "a revoked key still works");
    let (status, agents) = host.tenant(&second_key).get("/agents").await;
    assert_eq!((status, agents.as_array().unwrap().len()), (200, 1));
    let (_, tenant) = admin.get(&format!("/tenants/{}", a.id)).await;
    assert!(tenant["keys"][0]["last_used_at"].is_string(), "{tenant}");

    // A tenant's provider status shows its own key as stored, never the key.
    let (_, auth) = host.tenant(&second_key).get("/provider/auth").await;
    assert_eq!(auth["providers"]["anthropic"]["source"], "stored");
    assert!(!auth.to_string().contains(&a.provider_key));

    // Neither the database nor its log holds a provider key or a tenant key.
    let mut server = host.server;
    let log = server.log();
    assert!(server.terminate().success());
    let mut bytes = std::fs::read(server.db_path()).unwrap();
    if let Ok(wal) = std::fs::read(format!("{}-wal", server.db_path().display())) {
        bytes.extend(wal);
    }
    let text = String::from_utf8_lossy(&bytes);
    for secret in [&a.provider_key, &a.key, &second_key] {
        assert!(!text.contains(secret.as_str()), "the database holds {secret}");
        assert!(!log.contains(secret.as_str()), "the log holds {secret}");
    }
    // Request and run lines name the tenant.
    assert!(log.lines().any(|l| l.contains("request") && l.contains(&a.id)), "no request line names the tenant");
}

#[tokio::test]
async fn every_quota_is_answered_with_429_and_retry_after() {
    let host = host("[tenants.quotas]\nmax_sessions = 3\n").await;
    let a = tenant(&host, "alpha", json!({"requests_per_minute": 1000}), json!([])).await;
    let as_a = host.tenant(&a.key);

    // max_sessions, from the server's defaults: one exists; two more fit.
    for _ in 0..2 {
        let (status, body) = as_a.post("/sessions", json!({})).await;
        assert_eq!(status, 201, "{body}");
    }
    let (status, retry, body) = as_a.raw(as_a.req(reqwest::Method::POST, "/sessions").json(&json!({}))).await;
    assert_eq!(status, 429, "{body}");
    assert!(retry.is_some());
    assert_eq!(body["code"], "quota_exceeded");
    assert_eq!((body["quota"].as_str(), body["limit"].as_u64(), body["used"].as_u64()), (Some("max_sessions"), Some(3), Some(3)));
    // An override lifts it.
    let (status, tenant) = host.admin().patch(&format!("/tenants/{}", a.id), json!({"quotas": {"max_sessions": 10}})).await;
    assert_eq!(status, 200, "{tenant}");
    assert_eq!(tenant["quotas"]["max_sessions"], 10);
    let (status, _) = as_a.post("/sessions", json!({})).await;
    assert_eq!(status, 201);

    // tokens_per_day: a run that crosses it ends after its step with
    // `quota_exceeded`; the next message is refused before it starts.
    let (status, _) = host.admin().patch(&format!("/tenants/{}", a.id), json!({"quotas": {"tokens_per_day": 8}})).await;
    assert_eq!(status, 200);
    // 5 + 5 tokens: the first step crosses 8.
    a.fake.push(calls("tu_t", "bash", json!({"command": "echo step"})));
    let (status, body) = message(&host, &a, "spend").await;
    assert_eq!((status, body["code"].as_str()), (429, Some("quota_exceeded")), "{body}");
    let (_, session) = as_a.get(&format!("/sessions/{}", a.session)).await;
    let history = session["history"].as_array().unwrap();
    assert_eq!(history.last().unwrap()["content"][0]["type"], "tool_result", "the step finished: {session}");
    let (status, retry, body) = as_a
        .raw(as_a.req(reqwest::Method::POST, &format!("/sessions/{}/message", a.session)).json(&json!({"agent_id": a.agent, "message": "more"})))
        .await;
    assert_eq!((status, body["quota"].as_str()), (429, Some("tokens_per_day")), "{body}");
    assert!(retry.unwrap() <= 86_400);
    let (_, usage) = as_a.get("/usage").await;
    assert_eq!(usage["tokens_today"]["input"], 5);
    assert_eq!(usage["tokens_today"]["output"], 5);
    assert_eq!(usage["quotas"]["tokens_per_day"], 8);
    assert_eq!(usage["runs_today"], 1);
    let (status, _) = host.admin().patch(&format!("/tenants/{}", a.id), json!({"quotas": {"tokens_per_day": null, "storage_mb": 1}})).await;
    assert_eq!(status, 200);

    // storage_mb: a command that writes past it is told so; the next
    // writing call is refused until files are deleted.
    a.fake.push(calls("tu_s1", "bash", json!({"command": "head -c 2000000 /dev/zero > big && echo wrote"})));
    a.fake.push(calls("tu_s2", "write", json!({"filePath": "more.txt", "content": "x"})));
    a.fake.push(done());
    let (status, body) = message(&host, &a, "fill").await;
    assert_eq!(status, 200, "{body}");
    let first = result_sent(&a.fake, "tu_s1");
    assert_eq!(first["is_error"], true, "{first}");
    assert!(first["content"].to_string().contains("storage quota exceeded"), "{first}");
    let second = result_sent(&a.fake, "tu_s2");
    assert!(second["content"].to_string().contains("not run: storage quota exceeded"), "{second}");
    assert!(!std::path::Path::new(&a.work_dir).join("more.txt").exists());
    let (_, usage) = host.admin().get(&format!("/tenants/{}/usage", a.id)).await;
    assert!(usage["storage_bytes"].as_u64().unwrap() >= 2_000_000, "{usage}");

    // requests_per_minute.
    let (_, tight) = host.new_tenant("gamma", json!({"requests_per_minute": 5})).await;
    let as_c = host.tenant(&tight);
    for _ in 0..5 {
        let (status, _) = as_c.get("/agents").await;
        assert_eq!(status, 200);
    }
    let (status, retry, body) = as_c.raw(as_c.req(reqwest::Method::GET, "/agents")).await;
    assert_eq!((status, body["quota"].as_str()), (429, Some("requests_per_minute")), "{body}");
    assert!((1..=60).contains(&retry.unwrap()));
}

#[tokio::test]
async fn concurrent_runs_never_pass_the_limit() {
    let host = host("").await;
    // Each run waits for a permission answer, so it stays active.
    let a = tenant(&host, "alpha", json!({"max_concurrent_runs": 3}), json!([{"tool": "bash", "pattern": "*", "action": "ask"}])).await;
    for i in 0..50 {
        a.fake.push(calls(&format!("tu_{i}"), "bash", json!({"command": "true"})));
    }
    let submits = (0..50).map(|i| {
        let req = host
            .tenant(&a.key)
            .req(reqwest::Method::POST, &format!("/sessions/{}/message", a.session))
            .json(&json!({"agent_id": a.agent, "message": format!("m{i}"), "background": true, "multitask": "enqueue"}));
        async move {
            let resp = req.send().await.unwrap();
            (resp.status().as_u16(), resp.headers().get("retry-after").is_some())
        }
    });
    let results = futures::future::join_all(submits).await;
    let accepted = results.iter().filter(|(s, _)| *s == 202).count();
    let refused = results.iter().filter(|(s, retry)| *s == 429 && *retry).count();
    let (_, runs) = host.tenant(&a.key).get(&format!("/sessions/{}/runs", a.session)).await;
    assert_eq!((accepted, refused), (3, 47), "{results:?}\n{runs}\n{}", host.server.log());
    let (_, usage) = host.tenant(&a.key).get("/usage").await;
    let (_, runs) = host.tenant(&a.key).get(&format!("/sessions/{}/runs", a.session)).await;
    assert_eq!(usage["active_runs"], 3, "{usage}\n{runs}");
}

/// A run whose row the quota refuses is started while the row is written
/// (its reads overlap the write): it must end without asking the model and
/// free its session.
#[tokio::test]
async fn a_run_the_quota_refuses_never_asks_the_model_and_frees_its_session() {
    let host = host("").await;
    let a = tenant(&host, "alpha", json!({"max_concurrent_runs": 1}), json!([{"tool": "bash", "pattern": "*", "action": "ask"}])).await;
    let as_a = host.tenant(&a.key);
    // The first run waits for a permission answer, so it stays active.
    a.fake.push(calls("tu_1", "bash", json!({"command": "true"})));
    let (status, body) =
        as_a.post(&format!("/sessions/{}/message", a.session), json!({"agent_id": a.agent, "message": "first", "background": true})).await;
    assert_eq!(status, 202, "{body}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while a.fake.requests().is_empty() {
        assert!(std::time::Instant::now() < deadline, "the first run never asked the model");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, other) = as_a.post("/sessions", json!({})).await;
    assert_eq!(status, 201, "{other}");
    let second = format!("/sessions/{}/message", other["id"].as_str().unwrap());
    let (status, body) = as_a.post(&second, json!({"agent_id": a.agent, "message": "second", "background": true})).await;
    assert_eq!((status, body["quota"].as_str()), (429, Some("max_concurrent_runs")), "{body}");
    // Its claim is let go (a busy session would answer 409 before the
    // quota is looked at): the refused run has ended.
    loop {
        let (status, body) = as_a.post(&second, json!({"agent_id": a.agent, "message": "again", "background": true})).await;
        if status == 429 {
            break;
        }
        assert_eq!(status, 409, "{body}");
        assert!(std::time::Instant::now() < deadline, "the refused run still holds its session");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(a.fake.requests().len(), 1, "only the first run asked the model");
    let (_, runs) = as_a.get(&format!("/sessions/{}/runs", other["id"].as_str().unwrap())).await;
    assert_eq!(runs.as_array().unwrap().len(), 0, "{runs}");
}

const MISBEHAVE: &str = include_str!("fixtures/misbehave/misbehave.plugin.toml");

async fn upload(host: &Host, key: &str, manifest: &str) -> (u16, Value) {
    let wasm = common::build_component("tests/fixtures/misbehave");
    let form = reqwest::multipart::Form::new()
        .text("manifest", manifest.to_string())
        .part("wasm", reqwest::multipart::Part::bytes(wasm).file_name("misbehave.wasm"));
    host.server.send(host.tenant(key).req(reqwest::Method::POST, "/plugins").multipart(form)).await
}

fn names(list: &Value, field: &str) -> Vec<String> {
    list.as_array().unwrap().iter().map(|p| p[field].as_str().unwrap().to_string()).collect()
}

#[tokio::test]
async fn a_tenants_plugin_is_its_own_and_capped_by_the_plugin_policy() {
    let mut host = host("").await;
    let a = tenant(&host, "alpha", json!({}), json!([])).await;
    let b = tenant(&host, "beta", json!({}), json!([])).await;
    let (as_a, as_b) = (host.tenant(&a.key), host.tenant(&b.key));

    // More than the tenants' plugin policy allows (no `process`, no
    // `http` by default), a provider, or a server-wide name: refused.
    for (manifest, mentions) in [
        (format!("{MISBEHAVE}\n[capabilities]\nprocess = true\n"), "process"),
        (format!("{MISBEHAVE}\n[capabilities]\nhttp = [\"https://example.com\"]\n"), "http"),
        (MISBEHAVE.replace("name = \"misbehave\"", "name = \"bash\""), "server-wide"),
    ] {
        let (status, body) = upload(&host, &a.key, &manifest).await;
        assert_eq!(status, 422, "{body}");
        assert!(body["error"].as_str().unwrap().contains(mentions), "{body}");
    }
    let (status, body) = upload(&host, &a.key, &format!("{MISBEHAVE}\n[capabilities]\nfilesystem = \"read\"\n")).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["scope"], "tenant");
    // Its `plugins` and `plugin_mb` quotas: an upgrade replaces, a second plugin counts.
    let (status, _) = host.admin().patch(&format!("/tenants/{}", a.id), json!({"quotas": {"plugins": 1}})).await;
    assert_eq!(status, 200);
    let (status, body) = upload(&host, &a.key, &format!("{MISBEHAVE}\n[capabilities]\nfilesystem = \"read\"\n")).await;
    assert_eq!(status, 200, "an upgrade: {body}");
    let (status, body) = upload(&host, &a.key, &MISBEHAVE.replace("name = \"misbehave\"", "name = \"second\"")).await;
    assert_eq!((status, body["quota"].as_str()), (429, Some("plugins")), "{body}");
    let (status, body) = host.admin().patch(&format!("/tenants/{}", a.id), json!({"quotas": {"plugins": null, "plugin_mb": 0}})).await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = upload(&host, &a.key, &MISBEHAVE.replace("name = \"misbehave\"", "name = \"second\"")).await;
    assert_eq!((status, body["quota"].as_str()), (429, Some("plugin_mb")), "{body}");

    // A sees it; B and the server-wide list do not.
    let (_, tools) = as_a.get("/tools").await;
    assert!(names(&tools, "name").contains(&"misbehave".to_string()));
    for who in [&as_b, &host.admin()] {
        let (_, tools) = who.get("/tools").await;
        assert!(!names(&tools, "name").contains(&"misbehave".to_string()));
        let (_, plugins) = who.get("/plugins").await;
        assert!(!names(&plugins, "id").contains(&"misbehave".to_string()));
    }
    let (status, body) = as_b
        .post("/agents", json!({"name": "x", "tools": ["misbehave"], "provider": {"id": "anthropic", "model": "m"}}))
        .await;
    assert_eq!(status, 422, "{body}");
    let (status, _) = as_b.delete("/plugins/misbehave").await;
    assert_eq!(status, 404);
    let (status, _) = as_a.delete("/plugins/bash").await;
    assert_eq!(status, 403);

    // A's agents use it, in A's work dir, after a restart too.
    host.server = host.server.restart();
    let as_a = host.tenant(&a.key);
    let (status, agent) = as_a
        .post("/agents", json!({"name": "m", "tools": ["misbehave"], "provider": {"id": "anthropic", "model": "claude-test"}}))
        .await;
    assert_eq!(status, 201, "{agent}");
    std::fs::write(std::path::Path::new(&a.work_dir).join("notes.txt"), "A's notes").unwrap();
    a.fake.push(calls("tu_m", "misbehave", json!({"mode": "read-file"})));
    a.fake.push(done());
    let (status, body) = as_a
        .post(&format!("/sessions/{}/message", a.session), json!({"agent_id": agent["id"], "message": "read"}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(result_sent(&a.fake, "tu_m")["content"], "A's notes");

    // Deleting the tenant takes its plugin with it.
    let (status, _) = as_a.delete(&format!("/agents/{}", agent["id"].as_str().unwrap())).await;
    assert_eq!(status, 200);
    let (status, _) = as_a.delete("/plugins/misbehave").await;
    assert_eq!(status, 200);
    let (_, tools) = as_a.get("/tools").await;
    assert!(!names(&tools, "name").contains(&"misbehave".to_string()));
}

#[tokio::test]
async fn data_from_before_belongs_to_the_default_tenant_and_shared_providers_use_the_servers_key() {
    // A single-user server first, with an agent, a session and a key.
    let fake = FakeServer::start(Vec::new()).await;
    let root = tempfile::tempdir().unwrap();
    let config_dir = tempfile::tempdir().unwrap();
    let config_file = config_dir.path().join("hangar.toml");
    // The operator lets the default tenant keep its local provider.
    std::fs::write(&config_file, format!("[tenants]\nshared_providers = [\"anthropic\"]\nallowed_origins = [{:?}]\n", fake.url)).unwrap();
    let server = Server::start(&["--work-root", root.path().to_str().unwrap(), "--config", config_file.to_str().unwrap()]);
    server
        .put("/provider/auth", json!({"providers": {"anthropic": {"type": "api_key", "key": "sk-ant-old-0001", "base_url": fake.url}}}))
        .await;
    let (_, agent) = server.post("/agents", json!({"name": "old", "provider": {"id": "anthropic", "model": "claude-test"}})).await;
    let old_dir = root.path().join("default").join("old");
    std::fs::create_dir_all(&old_dir).unwrap();
    let (status, session) = server.post("/sessions", json!({"work_dir": old_dir})).await;
    assert_eq!(status, 201, "{session}");
    let (status, _) = server.get("/tenants").await;
    assert_eq!(status, 404, "no tenants without --admin-token");

    // The same data, multi-tenant: it is the default tenant's.
    let server = server.restart_with(&[
        "--admin-token", ADMIN, "--work-root", root.path().to_str().unwrap(), "--config", config_file.to_str().unwrap(),
    ]);
    let host = Host { server, root, _config: config_dir, fakes: Default::default() };
    let (_, tenants) = host.admin().get("/tenants").await;
    assert_eq!(names(&tenants, "name"), vec!["default"]);
    let (status, key) = host.admin().post("/tenants/default/keys", json!({})).await;
    assert_eq!(status, 201, "{key}");
    let as_default = host.tenant(key["key"].as_str().unwrap());
    let (_, agents) = as_default.get("/agents").await;
    assert_eq!(names(&agents, "id"), vec![agent["id"].as_str().unwrap()]);
    let (_, sessions) = as_default.get("/sessions").await;
    assert_eq!(names(&sessions, "id"), vec![session["id"].as_str().unwrap()]);
    fake.push(done());
    let (status, body) = as_default
        .post(&format!("/sessions/{}/message", session["id"].as_str().unwrap()), json!({"agent_id": agent["id"], "message": "hi"}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(fake.requests().last().unwrap().header("x-api-key"), Some("sk-ant-old-0001"));

    // A new tenant without a key of its own: the server's key, for a shared
    // provider only; it sees that it works, not which key or where.
    let server_fake = FakeServer::start(vec![done()]).await;
    let (status, _) = host
        .admin()
        .put("/provider/auth", json!({"providers": {"anthropic": {"type": "api_key", "key": "sk-ant-server-0002", "base_url": server_fake.url},
            "openai": {"type": "api_key", "key": "sk-openai-server-0003"}}}))
        .await;
    assert_eq!(status, 200);
    let (_, key) = host.new_tenant("newcomer", json!({})).await;
    let me = host.tenant(&key);
    let (_, auth) = me.get("/provider/auth").await;
    assert_eq!(auth["providers"]["anthropic"]["configured"], true, "{auth}");
    assert_eq!(auth["providers"]["anthropic"]["base_url"], Value::Null, "{auth}");
    assert_eq!(auth["providers"]["openai"]["configured"], false, "not shared: {auth}");
    assert!(!auth.to_string().contains("server-0002") && !auth.to_string().contains(&server_fake.url));
    let (_, agent) = me.post("/agents", json!({"name": "n", "provider": {"id": "anthropic", "model": "claude-test"}})).await;
    let (_, session) = me.post("/sessions", json!({})).await;
    let (status, body) = me
        .post(&format!("/sessions/{}/message", session["id"].as_str().unwrap()), json!({"agent_id": agent["id"], "message": "hi"}))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(server_fake.requests()[0].header("x-api-key"), Some("sk-ant-server-0002"));
    let (_, usage) = me.get("/usage").await;
    assert_eq!(usage["tokens_today"]["input"], 5, "counted against the tenant: {usage}");
}

#[tokio::test]
async fn a_tenants_provider_url_reaches_only_what_the_operator_allows() {
    let host = host("").await;
    let a = tenant(&host, "alpha", json!({}), json!([])).await;
    let me = host.tenant(&a.key);
    // A listener no tenant is allowed: it must never see a connection.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    for url in [
        format!("http://127.0.0.1:{port}"),
        format!("http://localhost:{port}"),
        "http://169.254.169.254".to_string(),
        "http://[::1]:8080".to_string(),
        "http://10.0.0.7:11434".to_string(),
    ] {
        let (status, body) = me.put("/provider/auth", json!({"providers": {"anthropic": {"key": "sk-ant-x", "base_url": url}}})).await;
        assert_eq!(status, 422, "{url}: {body}");
        assert!(body["error"].as_str().unwrap().contains("allowed_origins"), "{body}");
    }
    // The admin may (the server's own settings are the operator's).
    let (status, body) = host
        .admin()
        .put("/provider/auth", json!({"providers": {"ollama": {"base_url": format!("http://127.0.0.1:{port}")}}}))
        .await;
    assert_eq!(status, 200, "{body}");

    // At connect time too: a URL stored while the operator allowed it is
    // refused once the operator no longer names its host.
    let root = host.root;
    let config_dir = tempfile::tempdir().unwrap();
    let config_file = config_dir.path().join("hangar.toml");
    std::fs::write(&config_file, "").unwrap();
    let server = host.server.restart_with(&[
        "--admin-token", ADMIN, "--work-root", root.path().to_str().unwrap(), "--config", config_file.to_str().unwrap(),
    ]);
    let before = a.fake.requests().len();
    let resp = server
        .client
        .post(server.url(&format!("/sessions/{}/message", a.session)))
        .bearer_auth(&a.key)
        .json(&json!({"agent_id": a.agent, "message": "hi"}))
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let body: Value = resp.json().await.unwrap();
    assert_eq!((status, body["code"].as_str()), (502, Some("provider_error")), "{body}");
    assert!(body["error"].as_str().unwrap().contains("internal address"), "{body}");
    assert_eq!(a.fake.requests().len(), before, "the fake saw a connection");
    assert!(listener.accept().is_err(), "the unlisted listener saw a connection");
}

#[tokio::test]
async fn open_event_streams_count_against_max_streams() {
    let host = host("").await;
    let a = tenant(&host, "alpha", json!({"max_streams": 1}), json!([])).await;
    let me = host.tenant(&a.key);
    let path = format!("/sessions/{}/events", a.session);
    let first = me.req(reqwest::Method::GET, &path).send().await.unwrap();
    assert_eq!(first.status(), 200);
    let (status, retry, body) = me.raw(me.req(reqwest::Method::GET, &path)).await;
    assert_eq!((status, body["quota"].as_str()), (429, Some("max_streams")), "{body}");
    assert!(retry.is_some());
    let (_, usage) = me.get("/usage").await;
    assert_eq!(usage["streams"], 1, "{usage}");
    // Closing the stream frees its place.
    drop(first);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let resp = me.req(reqwest::Method::GET, &path).send().await.unwrap();
        if resp.status() == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the closed stream still counts");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Opens an MCP session on `session` (initialize, then initialized) and
/// returns its `Mcp-Session-Id`.
async fn mcp_session(me: &As<'_>, session: &str) -> String {
    let path = format!("/sessions/{session}/mcp");
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "test", "version": "0"}}});
    let resp = me
        .req(reqwest::Method::POST, &path)
        .header("accept", "application/json, text/event-stream")
        .json(&init)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let id = resp.headers()["mcp-session-id"].to_str().unwrap().to_string();
    drop(resp);
    let resp = me
        .req(reqwest::Method::POST, &path)
        .header("accept", "application/json, text/event-stream")
        .header("mcp-session-id", &id)
        .json(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 202);
    id
}

#[tokio::test]
async fn an_mcp_clients_open_stream_counts_against_max_streams() {
    let host = host("").await;
    let a = tenant(&host, "alpha", json!({"max_streams": 1}), json!([])).await;
    let me = host.tenant(&a.key);
    let id = mcp_session(&me, &a.session).await;
    let path = format!("/sessions/{}/mcp", a.session);
    let get = || me.req(reqwest::Method::GET, &path).header("accept", "text/event-stream").header("mcp-session-id", &id);
    let open = get().send().await.unwrap();
    assert_eq!(open.status(), 200);
    // The MCP stream holds the tenant's one place: a run's event stream is refused...
    let (status, _, body) = me.raw(me.req(reqwest::Method::GET, &format!("/sessions/{}/events", a.session))).await;
    assert_eq!((status, body["quota"].as_str()), (429, Some("max_streams")), "{body}");
    // ...while the MCP client's requests (each answered and ended) go on.
    let (status, _, body) = me
        .raw(
            me.req(reqwest::Method::POST, &path)
                .header("accept", "application/json, text/event-stream")
                .header("mcp-session-id", &id)
                .json(&json!({"jsonrpc": "2.0", "id": 2, "method": "tools/list"})),
        )
        .await;
    assert_ne!(status, 429, "{body}");
    drop(open);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let resp = me.req(reqwest::Method::GET, &format!("/sessions/{}/events", a.session)).send().await.unwrap();
        if resp.status() == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the closed MCP stream still counts");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The uid of a process, from `/proc/PID/status`.
fn proc_uid(pid: u32) -> Option<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix("Uid:"))?.split_whitespace().next()?.parse().ok()
}

/// Host pids of processes whose command line is exactly `argv`.
fn pids_running(argv: &[&str]) -> Vec<u32> {
    let want: Vec<u8> = argv.iter().flat_map(|a| a.bytes().chain([0])).collect();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == want))
        .collect()
}

#[tokio::test]
async fn a_tenants_commands_cannot_signal_another_tenants_and_plugins_say_who_they_run_as() {
    let host = host("").await;
    let a = tenant(&host, "alpha", json!({}), json!([])).await;
    let b = tenant(&host, "beta", json!({}), json!([])).await;
    // SAFETY: plain syscall.
    let root = unsafe { libc::geteuid() } == 0;

    // GET /plugins tells each tenant who its commands run as.
    let bash_of = |list: &Value| list.as_array().unwrap().iter().find(|p| p["id"] == "bash").cloned().unwrap();
    let (_, list_a) = host.tenant(&a.key).get("/plugins").await;
    let (_, list_b) = host.tenant(&b.key).get("/plugins").await;
    let (_, list_admin) = host.admin().get("/plugins").await;
    let (cmd_a, cmd_b, cmd_admin) = (bash_of(&list_a)["commands"].clone(), bash_of(&list_b)["commands"].clone(), bash_of(&list_admin)["commands"].clone());
    for c in [&cmd_a, &cmd_b, &cmd_admin] {
        assert_eq!(c["network"], "none", "{c}");
        assert_eq!(c["memory_mb"], 1024, "{c}");
        assert_eq!(c["max_processes"], 256, "{c}");
    }
    if root {
        assert!(cmd_a["user"].as_str().unwrap().contains("this tenant's own"), "{cmd_a}");
        assert_ne!(cmd_a["uid"], cmd_b["uid"]);
        assert!(cmd_admin["user"].as_str().unwrap().contains("uid_range 200000-265535"), "{cmd_admin}");
        assert!(cmd_admin.get("uid").is_none(), "{cmd_admin}");
    }
    // The start log says it too.
    assert!(host.server.log().contains("`process` commands run as each tenant's own uid") || !root, "{}", host.server.log());

    // A runs a long command; B, knowing its pid on the host, tries to stop it.
    let marker = "7.31";
    a.fake.push(calls("tu_a", "bash", json!({"command": format!("sleep {marker} ; echo A-SURVIVED")})));
    a.fake.push(done());
    let a_run = message(&host, &a, "sleep");
    let b_side = async {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let pid = loop {
            if let Some(pid) = pids_running(&["sleep", marker]).first() {
                break *pid;
            }
            assert!(std::time::Instant::now() < deadline, "A's command never started");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        if root {
            assert_eq!(proc_uid(pid), cmd_a["uid"].as_u64().map(|u| u as u32), "A's command runs as A's uid");
        }
        let attack = format!(
            "kill -9 {pid} ; echo kill=$? ; kill -STOP {pid} ; echo stop=$? ; kill -9 -1 ; echo all=$? ; echo B-DONE"
        );
        b.fake.push(calls("tu_b", "bash", json!({"command": attack})));
        b.fake.push(done());
        let (status, body) = message(&host, &b, "attack").await;
        assert_eq!(status, 200, "{body}");
        // The process is still there, and not stopped.
        let state = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        assert!(state.contains("State:\tS") || state.contains("State:\tR"), "{state}");
        result_sent(&b.fake, "tu_b")["content"].to_string()
    };
    let ((status, body), b_text) = tokio::join!(a_run, b_side);
    assert_eq!(status, 200, "{body}");
    assert!(b_text.contains("B-DONE"), "{b_text}");
    assert!(b_text.contains("kill=1") && b_text.contains("stop=1"), "B's signals were refused: {b_text}");
    let a_text = result_sent(&a.fake, "tu_a")["content"].to_string();
    assert!(a_text.contains("A-SURVIVED"), "{a_text}");
    // Nothing of A's outlives its call.
    assert!(pids_running(&["sleep", marker]).is_empty());
}

#[tokio::test]
async fn every_change_is_in_the_audit_trail_without_secrets() {
    let host = host("").await;
    let a = tenant(&host, "alpha", json!({}), json!([])).await;
    let b = tenant(&host, "beta", json!({}), json!([])).await;
    let (status, _) = host.admin().patch(&format!("/tenants/{}", a.id), json!({"quotas": {"max_sessions": 9}})).await;
    assert_eq!(status, 200);
    let (status, _) = host.tenant(&a.key).delete(&format!("/sessions/{}", a.session)).await;
    assert_eq!(status, 200);
    // Not changes: reads, refusals, and another tenant's ids.
    let (status, _) = host.tenant(&a.key).delete(&format!("/agents/{}", b.agent)).await;
    assert_eq!(status, 404);

    let (status, all) = host.admin().get("/audit").await;
    assert_eq!(status, 200, "{all}");
    let entries = all.as_array().unwrap();
    // Each with the status its answer had (most are written with the
    // change, before the answer, and corrected when the answer differs).
    let has = |actor: &str, method: &str, route: &str, status: u16| {
        entries.iter().any(|e| {
            e["actor"] == actor && e["method"] == method && e["route"] == route && e["address"] == "127.0.0.1" && e["status"] == status
        })
    };
    assert!(has("admin", "POST", "/tenants", 201), "{all}");
    assert!(has("admin", "PATCH", "/tenants/{id}", 200), "{all}");
    assert!(has("tenant", "PUT", "/provider/auth", 200), "{all}");
    assert!(has("tenant", "POST", "/agents", 201), "{all}");
    assert!(has("tenant", "DELETE", "/sessions/{id}", 200), "{all}");
    assert!(!entries.iter().any(|e| e["status"] == 404), "{all}");
    let text = all.to_string();
    for secret in [&a.key, &b.key, &a.provider_key, &b.provider_key] {
        assert!(!text.contains(secret.as_str()));
    }
    // A tenant sees its own entries only.
    let (_, mine) = host.tenant(&a.key).get("/audit").await;
    let mine = mine.as_array().unwrap();
    assert!(!mine.is_empty());
    assert!(mine.iter().all(|e| e["tenant_id"] == a.id.as_str()), "{mine:?}");
}

/// Issue 24, item 8: grants come from who installs, never from the name. The
/// operator's `[plugins.misbehave]` is for the server-wide plugin of that
/// name; a tenant's plugin so named gets the tenants' policy, and one
/// tenant's upload never replaces (or takes the grants of) another's.
#[tokio::test]
async fn a_plugin_name_never_carries_another_installers_grants() {
    let host = host("[plugins.misbehave]\nfilesystem = \"read-write\"\nhttp = [\"https://api.example.test\"]\n").await;
    let a = tenant(&host, "alpha", json!({}), json!([])).await;
    let b = tenant(&host, "beta", json!({}), json!([])).await;
    let asks_http = format!("{MISBEHAVE}\n[capabilities]\nhttp = [\"https://api.example.test\"]\n");
    let (status, body) = upload(&host, &a.key, &asks_http).await;
    assert_eq!(status, 422, "the operator's grant of `misbehave` is not a tenant's: {body}");
    assert!(body["error"].as_str().unwrap().contains("http"), "{body}");
    let (status, body) = upload(&host, &a.key, &format!("{MISBEHAVE}\n[capabilities]\nfilesystem = \"read\"\n")).await;
    assert_eq!(status, 201, "{body}");
    // B's upload under the same name is B's own plugin, with B's grants;
    // A's is left as it was.
    let (status, body) = upload(&host, &b.key, MISBEHAVE).await;
    assert_eq!(status, 201, "a plugin of B's, not an upgrade of A's: {body}");
    assert_eq!(body["capabilities"]["granted"]["filesystem"], "none");
    let granted = |list: &Value| {
        list.as_array().unwrap().iter().find(|p| p["id"] == "misbehave").unwrap()["capabilities"]["granted"]["filesystem"].clone()
    };
    assert_eq!(granted(&host.tenant(&a.key).get("/plugins").await.1), "read");
    assert_eq!(granted(&host.tenant(&b.key).get("/plugins").await.1), "none");
    // Its own again is an upgrade, with what the new manifest asks.
    let (status, body) = upload(&host, &b.key, &format!("{MISBEHAVE}\n[capabilities]\nfilesystem = \"read\"\n")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["capabilities"]["granted"]["filesystem"], "read");
    assert_eq!(granted(&host.tenant(&a.key).get("/plugins").await.1), "read");
}
