//! The real `hangar` binary on PostgreSQL (`--db postgres://…`), each test
//! on a database of its own made on the server `HANGAR_TEST_DATABASE_URL`
//! names (`test.sh` starts one; without it the tests skip with the reason,
//! or fail under CI): agents, sessions, provider keys, messages answered by
//! a scripted fake of the Anthropic API, a stream resumed with
//! `Last-Event-ID`, tenants, and a restart that keeps all of it; and a
//! start against a database that cannot be reached.

mod common;

use std::sync::Arc;

use common::fake::{Chunk, FakeServer, Reply, anthropic};
use common::server::Server;
use common::sse::Events;
use hangar::store::scratch::ScratchDb;
use serde_json::{Value, json};
use tokio::sync::Notify;

const KEY: &str = "sk-ant-postgres-KEY-5c4b3a";

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

/// Every response body of the test goes through here: none may hold the key.
fn keyless((status, body): (u16, Value)) -> (u16, Value) {
    assert!(!body.to_string().contains(KEY), "a response holds the provider key: {body}");
    (status, body)
}

#[tokio::test]
async fn one_host_on_postgresql_serves_and_keeps_everything_across_a_restart() {
    let Some(db) = ScratchDb::create().await else { return };
    let gate = Arc::new(Notify::new());
    let fake = FakeServer::start(vec![
        Reply::sse(anthropic::text_answer(&["Hello ", "from the fake."], 11, 4)),
        gated_text(6, 2, gate.clone()),
        Reply::sse(anthropic::text_answer(&["still here"], 3, 2)),
    ])
    .await;
    let server = Server::start(&["--db", &db.url]);
    assert!(server.log().contains("hangar_test_"), "the log names the database:\n{}", server.log());
    let work = tempfile::tempdir().unwrap();

    let (status, body) = keyless(
        server.put("/provider/auth", json!({"providers": {"anthropic": {"type": "api_key", "key": KEY, "base_url": fake.url}}})).await,
    );
    assert_eq!(status, 200, "{body}");
    let (status, auth) = keyless(server.get("/provider/auth").await);
    assert_eq!(status, 200);
    assert_eq!(auth["providers"]["anthropic"]["configured"], true, "{auth}");
    assert_eq!(auth["providers"]["anthropic"]["source"], "stored", "{auth}");
    let (status, agent) = keyless(
        server
            .post("/agents", json!({"name": "pg", "instructions": "Be terse.", "tools": [],
                "provider": {"id": "anthropic", "model": "claude-test", "max_tokens": 64}}))
            .await,
    );
    assert_eq!(status, 201, "{agent}");
    let agent = agent["id"].as_str().unwrap().to_string();
    let (status, session) = keyless(server.post("/sessions", json!({"work_dir": work.path()})).await);
    assert_eq!(status, 201, "{session}");
    let session = session["id"].as_str().unwrap().to_string();
    let path = |tail: &str| format!("/sessions/{session}{tail}");

    // A message answered through the provider, with the key sent to it.
    let (status, answer) = keyless(server.post(&path("/message"), json!({"agent_id": agent, "message": "hi"})).await);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["response"], "Hello from the fake.");
    assert_eq!(fake.requests()[0].header("x-api-key"), Some(KEY));
    let (_, stored) = keyless(server.get(&path("")).await);
    assert_eq!(stored["history"].as_array().unwrap().len(), 2, "{stored}");

    // A stream dropped mid-way, resumed from its last id through the session's events.
    let resp = server
        .client
        .post(server.url(&path("/message/stream")))
        .json(&json!({"agent_id": agent, "message": "stream it"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut live = Events::new(resp);
    let seen = live.take(2).await;
    assert!(seen.iter().all(|e| e.name == "text"), "{seen:?}");
    drop(live);
    // A second message while this one runs: the session is busy.
    let (status, _) = keyless(server.post(&path("/message"), json!({"agent_id": agent, "message": "too soon"})).await);
    assert_eq!(status, 409);
    gate.notify_one();
    let last = seen[1].id.unwrap();
    let resumed = server.client.get(server.url(&path("/events"))).header("Last-Event-ID", last.to_string()).send().await.unwrap();
    let rest = Events::new(resumed).take(5).await;
    let ids: Vec<u64> = rest.iter().map(|e| e.id.unwrap()).collect();
    assert_eq!(ids, (last + 1..=last + 5).collect::<Vec<_>>(), "exactly the events after the cursor");
    assert_eq!(rest.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(), ["text", "text", "text", "text", "done"]);
    let run_id = rest[4].json()["run_id"].as_str().unwrap().to_string();

    // A restart (SIGTERM, then a new process on the same database) keeps it all.
    let server = server.restart();
    let (_, agents) = keyless(server.get("/agents").await);
    assert_eq!(agents.as_array().unwrap().len(), 1, "{agents}");
    assert_eq!(agents[0]["id"], agent);
    let (status, kept) = keyless(server.get(&path("")).await);
    assert_eq!(status, 200);
    assert_eq!(kept["history"].as_array().unwrap().len(), 4, "{kept}");
    let (status, run) = keyless(server.get(&path(&format!("/runs/{run_id}"))).await);
    assert_eq!((status, run["status"].as_str()), (200, Some("completed")), "{run}");
    assert_eq!(run["response"], "part0 part1 part2 part3 part4 part5 ");
    let replay = Events::new(server.client.get(server.url(&path(&format!("/runs/{run_id}/events")))).send().await.unwrap()).all().await;
    assert_eq!(replay.len(), 7, "6 texts and done, from the database: {replay:?}");
    let (_, auth) = keyless(server.get("/provider/auth").await);
    assert_eq!((auth["providers"]["anthropic"]["configured"].as_bool(), auth["updated_at"].is_string()), (Some(true), true), "{auth}");
    let (status, answer) = keyless(server.post(&path("/message"), json!({"agent_id": agent, "message": "again"})).await);
    assert_eq!((status, answer["response"].as_str()), (200, Some("still here")), "{answer}");
    assert_eq!(fake.requests()[2].header("x-api-key"), Some(KEY), "the sealed key opened after the restart");
    assert!(!server.log().contains(KEY), "the key is never logged");
}

#[tokio::test]
async fn tenants_on_postgresql_keep_their_keys_and_quotas() {
    const ADMIN: &str = "admin-token-for-postgres-tests";
    let Some(db) = ScratchDb::create().await else { return };
    let fake = FakeServer::start(vec![Reply::sse(anthropic::text_answer(&["tenant ", "answer"], 7, 3))]).await;
    let root = tempfile::tempdir().unwrap();
    let config = tempfile::tempdir().unwrap();
    let config_file = config.path().join("hangar.toml");
    std::fs::write(&config_file, format!("[tenants]\nallowed_origins = [{:?}]\n", fake.url)).unwrap();
    // Selected by the variable this time, not by --db.
    let server = Server::start_with_env(
        &["--admin-token", ADMIN, "--work-root", root.path().to_str().unwrap(), "--config", config_file.to_str().unwrap()],
        &[("HANGAR_DATABASE_URL", &db.url)],
    );
    assert!(server.log().contains("hangar_test_"), "the log names the database:\n{}", server.log());
    let with = |key: &str, method: reqwest::Method, path: &str| server.client.request(method, server.url(path)).bearer_auth(key);

    let (status, tenant) = server
        .send(with(ADMIN, reqwest::Method::POST, "/tenants").json(&json!({"name": "acme", "quotas": {"max_sessions": 1}})))
        .await;
    assert_eq!(status, 201, "{tenant}");
    let (id, key) = (tenant["id"].as_str().unwrap().to_string(), tenant["key"].as_str().unwrap().to_string());
    let (status, _) =
        server.send(with(ADMIN, reqwest::Method::POST, "/tenants").json(&json!({"name": "acme"}))).await;
    assert_eq!(status, 409, "a tenant name is unique");

    let (status, body) = keyless(
        server
            .send(with(&key, reqwest::Method::PUT, "/provider/auth").json(
                &json!({"providers": {"anthropic": {"type": "api_key", "key": KEY, "base_url": fake.url}}}),
            ))
            .await,
    );
    assert_eq!(status, 200, "{body}");
    let (status, agent) = server
        .send(with(&key, reqwest::Method::POST, "/agents").json(&json!({"name": "a", "tools": [],
            "provider": {"id": "anthropic", "model": "claude-test", "max_tokens": 64}})))
        .await;
    assert_eq!(status, 201, "{agent}");
    let (status, session) = server.send(with(&key, reqwest::Method::POST, "/sessions").json(&json!({}))).await;
    assert_eq!(status, 201, "{session}");
    let (status, over) = server.send(with(&key, reqwest::Method::POST, "/sessions").json(&json!({}))).await;
    assert_eq!((status, over["quota"].as_str()), (429, Some("max_sessions")), "{over}");
    let session = session["id"].as_str().unwrap().to_string();
    let (status, answer) = keyless(
        server
            .send(
                with(&key, reqwest::Method::POST, &format!("/sessions/{session}/message"))
                    .json(&json!({"agent_id": agent["id"], "message": "hi"})),
            )
            .await,
    );
    assert_eq!((status, answer["response"].as_str()), (200, Some("tenant answer")), "{answer}");

    let server = server.restart();
    let with = |key: &str, method: reqwest::Method, path: &str| server.client.request(method, server.url(path)).bearer_auth(key);
    let (status, sessions) = server.send(with(&key, reqwest::Method::GET, "/sessions")).await;
    assert_eq!(status, 200, "the tenant's key still opens the door: {sessions}");
    assert!(sessions.to_string().contains(&session), "{sessions}");
    let (status, usage) = server.send(with(ADMIN, reqwest::Method::GET, &format!("/tenants/{id}/usage"))).await;
    assert_eq!(status, 200, "{usage}");
    assert_eq!((usage["tokens_today"]["input"].as_u64(), usage["tokens_today"]["output"].as_u64()), (Some(7), Some(3)), "{usage}");
    assert_eq!(usage["runs_today"], 1, "{usage}");
    let (status, _) = server.send(with("hk_not-a-key", reqwest::Method::GET, "/sessions")).await;
    assert_eq!(status, 401);
}

#[test]
fn a_database_that_cannot_be_reached_stops_the_start_with_the_reason_and_no_password() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hangar"))
        .args(["serve", "--port", "0", "--db", "postgres://hangar:pw-s3cret@127.0.0.1:1/hangar", "--cache-dir"])
        .arg(dir.path().join("cache"))
        .env("XDG_DATA_HOME", dir.path())
        .env("XDG_CONFIG_HOME", dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot open the PostgreSQL database postgres://hangar:***@127.0.0.1:1/hangar"), "{err}");
    assert!(err.contains("Connection refused"), "{err}");
    assert!(!err.contains("pw-s3cret"), "{err}");
}

const PLUGIN_MANIFEST: &str = include_str!("fixtures/misbehave/misbehave.plugin.toml");

/// `req` with `bearer` as its token ("": none, a server without tokens).
fn with_bearer(req: reqwest::RequestBuilder, bearer: &str) -> reqwest::RequestBuilder {
    if bearer.is_empty() { req } else { req.bearer_auth(bearer) }
}

async fn upload_plugin(server: &Server, bearer: &str, manifest: &str) -> (u16, Value) {
    let form = reqwest::multipart::Form::new().text("manifest", manifest.to_string()).part(
        "wasm",
        reqwest::multipart::Part::bytes(common::build_component("tests/fixtures/misbehave")).file_name("plugin.wasm"),
    );
    server.send(with_bearer(server.client.post(server.url("/plugins")), bearer).multipart(form)).await
}

/// Tool names `bearer` sees in `GET /tools` of `server`, and the version of
/// `misbehave` in its `GET /plugins`.
async fn misbehave_on(server: &Server, bearer: &str) -> (bool, Option<String>) {
    let (status, tools) = server.send(with_bearer(server.client.get(server.url("/tools")), bearer)).await;
    assert_eq!(status, 200, "{tools}");
    let listed = tools.as_array().unwrap().iter().any(|t| t["name"] == "misbehave");
    let (status, plugins) = server.send(with_bearer(server.client.get(server.url("/plugins")), bearer)).await;
    assert_eq!(status, 200, "{plugins}");
    let version = plugins.as_array().unwrap().iter().find(|p| p["id"] == "misbehave").map(|p| {
        assert_eq!(p["source"], "api", "{p}");
        p["version"].as_str().unwrap().to_string()
    });
    (listed, version)
}

/// Waits (up to 30 s) until `server` shows `misbehave` as `want` to `bearer`.
async fn misbehave_becomes(server: &Server, bearer: &str, want: (bool, Option<String>)) {
    let mut seen = misbehave_on(server, bearer).await;
    for _ in 0..300 {
        if seen == want {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        seen = misbehave_on(server, bearer).await;
    }
    assert_eq!(seen, want, "B never caught up with A's change");
}

/// Two hosts on one database: a plugin installed, upgraded or removed
/// through host A is so on host B while B runs (A's notice makes B load
/// the table again), and an agent on B calls it; a tenant's own plugin
/// too, and deleting the tenant removes it. A host started later loads
/// them from the database.
#[tokio::test]
async fn a_plugin_installed_through_one_host_is_loaded_by_another() {
    const ADMIN: &str = "admin-token-for-plugin-tests";
    let Some(db) = ScratchDb::create().await else { return };
    let root = tempfile::tempdir().unwrap();
    let input = json!({"mode": "ok"}).to_string();
    let fake = FakeServer::start(vec![
        Reply::sse(anthropic::tool_answer("toolu_m", "misbehave", &[&input], 5, 2)),
        Reply::sse(anthropic::text_answer(&["called"], 3, 1)),
    ])
    .await;
    let config = root.path().join("hangar.toml");
    std::fs::write(&config, format!("[tenants]\nallowed_origins = [{:?}]\n", fake.url)).unwrap();
    let args = ["--db", &db.url, "--admin-token", ADMIN, "--work-root", root.path().to_str().unwrap(), "--config", config.to_str().unwrap()];
    let shared_key = [("HANGAR_SECRET_KEY", "5e1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f")];
    let a = Server::start_with_env(&args, &shared_key);
    let (status, plugin) = upload_plugin(&a, ADMIN, PLUGIN_MANIFEST).await;
    assert_eq!(status, 201, "{plugin}");
    assert!(!a.dir.path().join("data/hangar/hangar.plugins").exists(), "kept in the database, not in A's files");

    let b = Server::start_with_env(&args, &shared_key);
    assert_eq!(misbehave_on(&b, ADMIN).await, (true, Some("0.1.0".into())), "B loaded it from the database at its start");
    let upgraded = PLUGIN_MANIFEST.replace("version = \"0.1.0\"", "version = \"0.2.0\"");
    let (status, plugin) = upload_plugin(&a, ADMIN, &upgraded).await;
    assert_eq!(status, 200, "an upgrade: {plugin}");
    misbehave_becomes(&b, ADMIN, (true, Some("0.2.0".into()))).await;
    let (status, body) = a.send(a.client.delete(a.url("/plugins/misbehave")).bearer_auth(ADMIN)).await;
    assert_eq!(status, 200, "{body}");
    misbehave_becomes(&b, ADMIN, (false, None)).await;

    // A tenant's own plugin, installed through A while B runs, called on B.
    let (status, tenant) = a.send(a.client.post(a.url("/tenants")).bearer_auth(ADMIN).json(&json!({"name": "acme"}))).await;
    assert_eq!(status, 201, "{tenant}");
    let (id, key) = (tenant["id"].as_str().unwrap(), tenant["key"].as_str().unwrap());
    let (status, plugin) = upload_plugin(&a, key, PLUGIN_MANIFEST).await;
    assert_eq!((status, plugin["scope"].as_str()), (201, Some("tenant")), "{plugin}");
    misbehave_becomes(&b, key, (true, Some("0.1.0".into()))).await;
    assert_eq!(misbehave_on(&b, ADMIN).await, (false, None), "a tenant's plugin is its own on B too");
    let as_tenant = |server: &Server, method: reqwest::Method, path: &str| server.client.request(method, server.url(path)).bearer_auth(key);
    let (status, _) = b
        .send(as_tenant(&b, reqwest::Method::PUT, "/provider/auth").json(&json!({"providers": {"anthropic":
            {"type": "api_key", "key": KEY, "base_url": fake.url}}})))
        .await;
    assert_eq!(status, 200);
    let (status, agent) = b
        .send(as_tenant(&b, reqwest::Method::POST, "/agents").json(&json!({"name": "m", "tools": ["misbehave"],
            "provider": {"id": "anthropic", "model": "claude-test", "max_tokens": 64}})))
        .await;
    assert_eq!(status, 201, "{agent}");
    let (_, session) = b.send(as_tenant(&b, reqwest::Method::POST, "/sessions").json(&json!({}))).await;
    let (status, answer) = b
        .send(as_tenant(&b, reqwest::Method::POST, &format!("/sessions/{}/message", session["id"].as_str().unwrap()))
            .json(&json!({"agent_id": agent["id"], "message": "call it"})))
        .await;
    assert_eq!((status, answer["response"].as_str()), (200, Some("called")), "{answer}");
    assert_eq!(answer["tool_calls"][0]["output"], "fine", "B ran the plugin installed through A: {answer}");
    let (status, body) = a.send(a.client.delete(a.url(&format!("/tenants/{id}"))).bearer_auth(ADMIN)).await;
    assert_eq!(status, 200, "{body}");
    let (client, connection) = tokio_postgres::connect(&db.url, tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let rows: i64 = client.query_one("SELECT COUNT(*) FROM plugins", &[]).await.unwrap().get(0);
    assert_eq!(rows, 0, "the tenant's plugin went with it");
    assert!(b.logged("plugin loaded from the database").await, "{}", b.log());
}

/// `hangar migrate`, run as an operator would.
fn migrate(from: &std::path::Path, to: &str) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_hangar"))
        .args(["migrate", "--from"])
        .arg(from)
        .args(["--to", to])
        .output()
        .unwrap()
}

/// A SQLite server's data moved into PostgreSQL with `hangar migrate`: a
/// host on PostgreSQL (with the same server key) has its agent, session
/// history, runs and events, the plugin installed through its API, and a
/// stored provider key that still works. A second migrate is refused.
#[tokio::test]
async fn hangar_migrate_moves_a_sqlite_server_into_postgresql() {
    const SERVER_KEY: &str = "4f1c0de5a1b2c3d4e5f60718293a4b5c6d7e8f9012a3b4c5d6e7f8091a2b3c4d";
    let Some(db) = ScratchDb::create().await else { return };
    let fake = FakeServer::start(vec![
        Reply::sse(anthropic::text_answer(&["Hello ", "from SQLite."], 11, 4)),
        Reply::sse(anthropic::text_answer(&["and from PostgreSQL"], 3, 2)),
    ])
    .await;
    let mut sqlite = Server::start_with_env(&[], &[("HANGAR_SECRET_KEY", SERVER_KEY)]);
    let work = tempfile::tempdir().unwrap();
    let (status, body) = keyless(
        sqlite.put("/provider/auth", json!({"providers": {"anthropic": {"type": "api_key", "key": KEY, "base_url": fake.url}}})).await,
    );
    assert_eq!(status, 200, "{body}");
    let (status, agent) = sqlite
        .post("/agents", json!({"name": "moved", "instructions": "Be terse.", "tools": ["misbehave"],
            "provider": {"id": "anthropic", "model": "claude-test", "max_tokens": 64}}))
        .await;
    assert_eq!(status, 422, "misbehave is not installed yet: {agent}");
    let (status, plugin) = upload_plugin(&sqlite, "", PLUGIN_MANIFEST).await;
    assert_eq!(status, 201, "{plugin}");
    let (status, agent) = sqlite
        .post("/agents", json!({"name": "moved", "instructions": "Be terse.", "tools": ["misbehave"],
            "provider": {"id": "anthropic", "model": "claude-test", "max_tokens": 64}}))
        .await;
    assert_eq!(status, 201, "{agent}");
    let agent = agent["id"].as_str().unwrap().to_string();
    let (status, session) = sqlite.post("/sessions", json!({"work_dir": work.path()})).await;
    assert_eq!(status, 201, "{session}");
    let session = session["id"].as_str().unwrap().to_string();
    let path = |tail: &str| format!("/sessions/{session}{tail}");
    let (status, answer) = keyless(sqlite.post(&path("/message"), json!({"agent_id": agent, "message": "hi"})).await);
    assert_eq!((status, answer["response"].as_str()), (200, Some("Hello from SQLite.")), "{answer}");
    let run = answer["run_id"].as_str().unwrap().to_string();
    let events_of = |server: &Server| {
        let url = server.url(&path(&format!("/runs/{run}/events")));
        let client = server.client.clone();
        async move { Events::new(client.get(url).send().await.unwrap()).all().await }
    };
    let events = events_of(&sqlite).await;
    assert!(events.len() >= 3, "{events:?}");
    assert!(sqlite.terminate().success());

    let out = migrate(&sqlite.db_path(), &db.url);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    // Each table's line: `  NAME  COUNT row(s)[ (N from DIR)]`.
    let rows = |table: &str| {
        let line = stdout.lines().find(|l| l.split_whitespace().next() == Some(table)).unwrap_or_else(|| panic!("{table}:\n{stdout}"));
        (line.split_whitespace().nth(1).unwrap().parse::<usize>().unwrap(), line.to_string())
    };
    for table in ["agents", "provider_auth", "runs", "sessions", "tenants"] {
        assert_eq!(rows(table).0, 1, "{table}:\n{stdout}");
    }
    assert_eq!(rows("events").0, events.len(), "{stdout}");
    let (plugins, line) = rows("plugins");
    assert!(plugins == 1 && line.contains(&format!("(1 from {})", sqlite.dir.path().join("hangar.plugins").display())), "{stdout}");
    assert!(stdout.contains("server key the SQLite server used"), "the output says the key must go along:\n{stdout}");
    assert!(!stdout.contains(KEY) && !stderr.contains(KEY));

    let pg = Server::start_with_env(&["--db", &db.url], &[("HANGAR_SECRET_KEY", SERVER_KEY)]);
    let (_, agents) = pg.get("/agents").await;
    assert_eq!((agents.as_array().unwrap().len(), agents[0]["id"].as_str()), (1, Some(agent.as_str())), "{agents}");
    let (status, kept) = pg.get(&path("")).await;
    assert_eq!((status, kept["history"].as_array().map(Vec::len)), (200, Some(2)), "{kept}");
    let (status, shown) = pg.get(&path(&format!("/runs/{run}"))).await;
    assert_eq!((status, shown["status"].as_str(), shown["response"].as_str()), (200, Some("completed"), Some("Hello from SQLite.")), "{shown}");
    let replayed = events_of(&pg).await;
    assert_eq!(replayed, events, "the run's events, from PostgreSQL");
    assert_eq!(misbehave_on(&pg, "").await, (true, Some("0.1.0".into())), "the plugin installed through the SQLite server's API");
    let (status, answer) = keyless(pg.post(&path("/message"), json!({"agent_id": agent, "message": "again"})).await);
    assert_eq!((status, answer["response"].as_str()), (200, Some("and from PostgreSQL")), "{answer}");
    assert_eq!(fake.requests()[1].header("x-api-key"), Some(KEY), "the sealed key opened with the same server key");

    // A second run (a mistake) is refused and changes nothing.
    let again = migrate(&sqlite.db_path(), &db.url);
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(!again.status.success(), "{stderr}");
    assert!(stderr.contains("already holds data"), "{stderr}");
    let (_, kept) = pg.get(&path("")).await;
    assert_eq!(kept["history"].as_array().map(Vec::len), Some(4), "{kept}");
    // A mistyped source is not made into an empty database, and the target must be PostgreSQL.
    let missing = sqlite.dir.path().join("no-such.db");
    let out = migrate(&missing, &db.url);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("there is no SQLite database"), "{out:?}");
    assert!(!missing.exists());
    let out = migrate(&sqlite.db_path(), sqlite.dir.path().join("copy.db").to_str().unwrap());
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--to must name a PostgreSQL database"), "{out:?}");
}

/// What a host's sync does with the rows of `plugins`, on a runtime that
/// is running (as the LISTEN task will call it): a new row is loaded, a
/// changed one replaces the loaded version, a row gone unloads it, a row
/// that cannot load is skipped, and a sync with nothing new changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_loads_replaces_and_unloads_what_the_table_says() {
    use hangar::store::{Store, StoredPlugin};
    let Some(db) = ScratchDb::create().await else { return };
    let config = tempfile::NamedTempFile::new().unwrap();
    let settings = hangar::config::Settings::resolve(hangar::config::ServeArgs {
        db: Some(db.url.clone()),
        config: Some(config.path().into()),
        ..Default::default()
    })
    .unwrap();
    let store = Store::open_postgres(&db.url).await.unwrap();
    let runtime = common::runtime();
    let wasm: Arc<[u8]> = Arc::from(common::build_component("tests/fixtures/misbehave"));
    let version = |runtime: &hangar::runtime::Runtime| runtime.get("misbehave").map(|p| p.manifest.version.clone());

    assert_eq!(hangar::api::load_stored(&store, &runtime, &settings).await.unwrap(), 0);
    store.put_plugin(StoredPlugin::new("misbehave".into(), None, PLUGIN_MANIFEST.into(), wasm.clone())).await.unwrap();
    store.put_plugin(StoredPlugin::new("broken".into(), None, "kind = \"tool\"\nname = \"broken\"".into(), wasm.clone())).await.unwrap();
    assert_eq!(hangar::api::load_stored(&store, &runtime, &settings).await.unwrap(), 1, "the broken row is skipped");
    assert_eq!(version(&runtime).as_deref(), Some("0.1.0"));
    assert!(runtime.tool_spec("misbehave").await.is_ok(), "it loads");
    assert_eq!(hangar::api::load_stored(&store, &runtime, &settings).await.unwrap(), 0, "nothing changed");

    let upgraded = PLUGIN_MANIFEST.replace("version = \"0.1.0\"", "version = \"0.2.0\"");
    store.put_plugin(StoredPlugin::new("misbehave".into(), None, upgraded, wasm.clone())).await.unwrap();
    assert_eq!(hangar::api::load_stored(&store, &runtime, &settings).await.unwrap(), 1);
    assert_eq!(version(&runtime).as_deref(), Some("0.2.0"), "the manifest changed, the component did not");

    assert!(store.delete_plugin("misbehave").await.unwrap());
    assert_eq!(hangar::api::load_stored(&store, &runtime, &settings).await.unwrap(), 1);
    assert_eq!(version(&runtime), None, "its row is gone");
    assert!(runtime.get("read").is_some(), "built-ins are not the table's");
}
