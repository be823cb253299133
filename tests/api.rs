//! The REST API end to end: the real binary over HTTP, every endpoint with
//! its happy path and its error paths, and a restart that finds it all.

mod common;

use std::time::{Duration, Instant};

use common::server::Server;
use serde_json::{Value, json};

fn agent_body(tools: Value) -> Value {
    json!({
        "name": "Assistant",
        "instructions": "Be helpful",
        "tools": tools,
        "provider": {"id": "anthropic", "model": "claude-sonnet-4-5", "max_tokens": 4096, "temperature": 0.7}
    })
}

fn assert_error(status: u16, body: &Value, expected: u16, mentions: &str) {
    assert_eq!(status, expected, "{body}");
    let error = body["error"].as_str().unwrap_or_else(|| panic!("no `error` in {body}"));
    assert!(body["code"].is_string(), "no `code` in {body}");
    assert!(error.contains(mentions), "`{error}` should mention `{mentions}`");
}

fn is_ulid(id: &Value) -> bool {
    id.as_str().is_some_and(|s| s.len() == 26 && ulid::Ulid::from_string(s).is_ok())
}

fn is_rfc3339(t: &Value) -> bool {
    t.as_str().is_some_and(|s| chrono::DateTime::parse_from_rfc3339(s).is_ok() && s.ends_with('Z'))
}

#[tokio::test]
async fn health_answers_at_once_with_no_plugin_files_around() {
    let started = Instant::now();
    let server = Server::start(&[]);
    let (status, body) = server.get("/health").await;
    assert_eq!((status, body), (200, json!({"status": "ok"})));
    // Not a performance threshold: a sanity bound that compilation did not block startup.
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[tokio::test]
async fn providers_come_from_the_plugins() {
    let server = Server::start(&[]);
    let (status, list) = server.get("/provider").await;
    assert_eq!(status, 200);
    let ids: Vec<&str> = list.as_array().unwrap().iter().map(|p| p["id"].as_str().unwrap()).collect();
    for id in ["anthropic", "ollama", "openai"] {
        assert!(ids.contains(&id), "{ids:?}");
    }
    let anthropic = list.as_array().unwrap().iter().find(|p| p["id"] == "anthropic").unwrap();
    assert_eq!(anthropic, &json!({"id": "anthropic", "name": "Anthropic", "auth_types": ["api_key"]}));
    let ollama = list.as_array().unwrap().iter().find(|p| p["id"] == "ollama").unwrap();
    assert_eq!(ollama["auth_types"], json!([]));

    let (status, body) = server.get("/provider/anthropic").await;
    assert_eq!((status, body), (200, json!({"id": "anthropic", "name": "Anthropic", "type": "chat", "models": true})));
    let (status, body) = server.get("/provider/nope").await;
    assert_error(status, &body, 404, "nope");
    // A tool is not a provider.
    let (status, body) = server.get("/provider/read").await;
    assert_error(status, &body, 404, "read");
}

#[tokio::test]
async fn credentials_are_write_only_and_bound_to_their_origin() {
    const KEY: &str = "sk-ant-test-SECRET-0123456789";
    let server = Server::start(&[]);
    let (status, auth) = server.get("/provider/auth").await;
    assert_eq!(status, 200);
    assert_eq!(auth["providers"]["anthropic"]["configured"], false);
    assert_eq!(auth["providers"]["anthropic"]["type"], "api_key");
    assert_eq!(auth["updated_at"], Value::Null);

    let (status, body) = server.put("/provider/auth", json!({"providers": {"anthropic": {"type": "api_key", "key": KEY}}})).await;
    assert_eq!((status, body), (200, json!({"status": "ok"})));
    let (_, auth) = server.get("/provider/auth").await;
    assert_eq!(auth["providers"]["anthropic"]["configured"], true);
    assert_eq!(auth["providers"]["anthropic"]["source"], "stored");
    assert!(is_rfc3339(&auth["updated_at"]), "{auth}");
    let first_update = auth["updated_at"].clone();

    // Merging: ollama gets a base_url only, anthropic keeps its key.
    let (status, _) = server.put("/provider/auth", json!({"providers": {"ollama": {"base_url": "http://127.0.0.1:1"}}})).await;
    assert_eq!(status, 200);
    let (_, auth) = server.get("/provider/auth").await;
    assert_eq!(auth["providers"]["anthropic"]["configured"], true);
    assert_eq!(auth["providers"]["ollama"]["base_url"], "http://127.0.0.1:1");
    assert_ne!(auth["updated_at"], first_update);

    // Errors.
    let (status, body) = server.put("/provider/auth", json!({"providers": {"nope": {"key": "x"}}})).await;
    assert_error(status, &body, 422, "nope");
    let (status, body) = server.put("/provider/auth", json!({"providers": {"ollama": {"key": "x"}}})).await;
    assert_error(status, &body, 422, "ollama");
    let (status, body) = server.put("/provider/auth", json!({"providers": {"anthropic": {"type": "oauth", "key": "x"}}})).await;
    assert_error(status, &body, 422, "oauth");
    let (status, body) = server.put("/provider/auth", json!({"providers": {"anthropic": {"base_url": "ftp://x"}}})).await;
    assert_error(status, &body, 422, "base_url");
    // A stored key never follows a new origin...
    let (status, body) = server.put("/provider/auth", json!({"providers": {"anthropic": {"base_url": "http://127.0.0.1:9"}}})).await;
    assert_error(status, &body, 409, "key again");
    // ...unless it is sent again with it.
    let (status, _) = server
        .put("/provider/auth", json!({"providers": {"anthropic": {"key": KEY, "base_url": "http://127.0.0.1:9"}}}))
        .await;
    assert_eq!(status, 200);

    // Nothing ever shows the key: not the API, not the log.
    for path in ["/provider/auth", "/provider", "/provider/anthropic", "/openapi.json"] {
        let text = server.client.get(server.url(path)).send().await.unwrap().text().await.unwrap();
        assert!(!text.contains(KEY), "{path} leaked the key");
    }
    assert!(!server.log().contains(KEY), "the log holds the key");
    let db = std::fs::metadata(server.db_path()).unwrap();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&db.permissions()) & 0o777, 0o600);

    let (_, before) = server.get("/provider/auth").await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    let (status, body) = server.delete("/provider/auth/anthropic").await;
    assert_eq!((status, body), (200, json!({"status": "deleted"})));
    let (_, auth) = server.get("/provider/auth").await;
    assert_eq!(auth["providers"]["anthropic"]["configured"], false);
    assert!(auth["updated_at"].as_str() > before["updated_at"].as_str(), "a deletion is a change too");
    let (status, body) = server.delete("/provider/auth/nope").await;
    assert_error(status, &body, 404, "nope");
}

#[tokio::test]
async fn environment_keys_count_as_configured() {
    let server = Server::start_with_env(
        &[],
        &[("ANTHROPIC_API_KEY", "sk-env"), ("OPENAI_API_KEY", "sk-env2"), ("OLLAMA_HOST", "127.0.0.1:9")],
    );
    let (_, auth) = server.get("/provider/auth").await;
    assert_eq!(auth["providers"]["ollama"]["base_url"], "http://127.0.0.1:9", "{auth}");
    // The scheme-less OLLAMA_HOST is a granted origin: the error is the
    // connection, not a refusal.
    let (status, body) = server.get("/provider/ollama/models").await;
    assert_eq!(status, 502, "{body}");
    assert!(body["error"].as_str().unwrap().contains("127.0.0.1:9"), "{body}");
    assert!(!body["error"].as_str().unwrap().contains("not granted"), "{body}");
    let (_, auth) = server.get("/provider/auth").await;
    for id in ["anthropic", "openai"] {
        assert_eq!(auth["providers"][id]["configured"], true, "{auth}");
        assert_eq!(auth["providers"][id]["source"], "environment", "{auth}");
    }
}

#[tokio::test]
async fn models_from_the_catalog_and_a_clear_error_when_ollama_is_down() {
    let server = Server::start(&[]);
    let (status, models) = server.get("/provider/anthropic/models").await;
    assert_eq!(status, 200, "{models}");
    let models = models.as_array().unwrap();
    assert!(!models.is_empty());
    for m in models {
        assert!(m["id"].is_string() && m["name"].is_string(), "{m}");
    }
    let id = models[0]["id"].as_str().unwrap();
    let (status, model) = server.get(&format!("/provider/anthropic/models/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(model["id"], id);
    assert!(model["context_window"].as_u64().unwrap() > 0, "{model}");
    let (status, body) = server.get("/provider/anthropic/models/not-a-model").await;
    assert_error(status, &body, 404, "not-a-model");
    let (status, body) = server.get("/provider/nope/models").await;
    assert_error(status, &body, 404, "nope");

    server.put("/provider/auth", json!({"providers": {"ollama": {"base_url": "http://127.0.0.1:9"}}})).await;
    let (status, body) = server.get("/provider/ollama/models").await;
    assert_error(status, &body, 502, "127.0.0.1:9");
}

#[tokio::test]
async fn agents_crud() {
    let server = Server::start(&[]);
    let (status, agent) = server.post("/agents", agent_body(json!(["read", "bash"]))).await;
    assert_eq!(status, 201, "{agent}");
    assert!(is_ulid(&agent["id"]), "{agent}");
    assert!(is_rfc3339(&agent["created_at"]) && is_rfc3339(&agent["updated_at"]));
    assert_eq!(agent["name"], "Assistant");
    assert_eq!(agent["instructions"], "Be helpful");
    assert_eq!(agent["tools"], json!(["read", "bash"]));
    assert_eq!(
        agent["provider"],
        json!({"id": "anthropic", "model": "claude-sonnet-4-5", "max_tokens": 4096, "temperature": 0.7, "context_window": null})
    );
    assert_eq!(agent["compaction"], json!({"threshold": 0.8, "keep_turns": 4, "enabled": true}));
    let id = agent["id"].as_str().unwrap();

    let (status, list) = server.get("/agents").await;
    assert_eq!(status, 200);
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(list[0], agent);
    let (status, got) = server.get(&format!("/agents/{id}")).await;
    assert_eq!((status, &got), (200, &agent));

    tokio::time::sleep(Duration::from_millis(5)).await;
    let (status, updated) = server
        .put(&format!("/agents/{id}"), json!({"instructions": "Be brief", "tools": ["read"], "provider": {"max_tokens": 100}}))
        .await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["instructions"], "Be brief");
    assert_eq!(updated["tools"], json!(["read"]));
    assert_eq!(updated["name"], "Assistant");
    assert_eq!(updated["provider"]["max_tokens"], 100);
    assert_eq!(updated["provider"]["model"], "claude-sonnet-4-5");
    assert_eq!(updated["created_at"], agent["created_at"]);
    assert!(updated["updated_at"].as_str() > agent["updated_at"].as_str());
    // Agents are served from memory after the first read: every write must
    // show at once in both the list and the single agent.
    assert_eq!(server.get("/agents").await.1, json!([updated.clone()]));
    assert_eq!(server.get(&format!("/agents/{id}")).await.1, updated);

    let (status, body) = server.delete(&format!("/agents/{id}")).await;
    assert_eq!((status, body), (200, json!({"status": "deleted"})));
    assert_eq!(server.get("/agents").await, (200, json!([])));
    for (status, body) in [
        server.get(&format!("/agents/{id}")).await,
        server.delete(&format!("/agents/{id}")).await,
        server.put(&format!("/agents/{id}"), json!({"name": "x"})).await,
    ] {
        assert_error(status, &body, 404, id);
    }
}

#[tokio::test]
async fn agent_validation() {
    let server = Server::start(&[]);
    let mut cases = vec![
        (json!({"tools": [], "provider": {"id": "anthropic", "model": "m"}}), "name"),
        (json!({"name": " ", "provider": {"id": "anthropic", "model": "m"}}), "name"),
        (json!({"name": "a"}), "provider"),
        (json!({"name": "a", "tools": ["read", "telepathy"], "provider": {"id": "anthropic", "model": "m"}}), "telepathy"),
        (json!({"name": "a", "provider": {"id": "skynet", "model": "m"}}), "skynet"),
        (json!({"name": "a", "provider": {"id": "anthropic", "model": "m", "max_tokens": 0}}), "max_tokens"),
        (json!({"name": "a", "provider": {"id": "anthropic", "model": "m", "temperature": 2.5}}), "temperature"),
        (json!({"name": "a", "provider": {"id": "anthropic", "model": "m", "temperature": -0.1}}), "temperature"),
        (json!({"name": "a", "provider": {"id": "anthropic", "model": ""}}), "model"),
    ];
    // Wrong JSON types are 422 too.
    cases.push((json!({"name": 5, "provider": {"id": "anthropic", "model": "m"}}), "name"));
    cases.push((json!({"name": "a", "tools": "read", "provider": {"id": "anthropic", "model": "m"}}), "tools"));
    cases.push((json!({"name": "a", "provider": {"id": "anthropic", "model": "m", "max_tokens": -1}}), "max_tokens"));
    for (body, mentions) in cases {
        let (status, err) = server.post("/agents", body.clone()).await;
        assert_error(status, &err, 422, mentions);
    }
    let (_, agent) = server.post("/agents", agent_body(json!([]))).await;
    let (status, err) = server.put(&format!("/agents/{}", agent["id"].as_str().unwrap()), json!({"tools": ["nope"]})).await;
    assert_error(status, &err, 422, "nope");
    let (_, list) = server.get("/agents").await;
    assert_eq!(list.as_array().unwrap().len(), 1, "a refused request stores nothing");
}

#[tokio::test]
async fn bodies_that_are_not_valid_json_requests() {
    let server = Server::start(&[]);
    let c = &server.client;
    let url = server.url("/agents");
    let (status, body) = server.send(c.post(&url).header("content-type", "application/json").body("{\"name\": ")).await;
    assert_error(status, &body, 400, "JSON");
    let (status, body) = server.send(c.post(&url).body(agent_body(json!([])).to_string())).await;
    assert_error(status, &body, 415, "application/json");
    let (status, body) = server.send(c.post(&url).header("content-type", "text/plain").body("{}")).await;
    assert_error(status, &body, 415, "application/json");
    // One byte over the limit: big enough to refuse, small enough that the
    // server has read it all before answering (no reset mid-upload).
    let limit = 10 * 1024 * 1024;
    let big = format!("{{\"name\": \"{}\"}}", "x".repeat(limit + 1 - 12));
    assert_eq!(big.len(), limit + 1);
    let (status, body) = server.send(c.post(&url).header("content-type", "application/json").body(big)).await;
    assert_error(status, &body, 413, "limit");
    let (status, body) = server.get("/no/such/route").await;
    assert_error(status, &body, 404, "/no/such/route");
    let (status, body) = server.send(c.patch(&url)).await;
    assert_error(status, &body, 405, "PATCH");
    let (status, body) = server.send(c.delete(&url)).await;
    assert_error(status, &body, 405, "DELETE");
}

#[tokio::test]
async fn sessions_crud_and_work_dir_rules() {
    let server = Server::start(&[]);
    let work = tempfile::tempdir().unwrap();
    let work_dir = work.path().canonicalize().unwrap().to_str().unwrap().to_string();

    let (status, session) = server.post("/sessions", json!({"work_dir": work_dir})).await;
    assert_eq!(status, 201, "{session}");
    assert!(is_ulid(&session["id"]));
    assert_eq!(session["work_dir"], work_dir);
    assert_eq!(session["history"], json!([]));
    assert!(is_rfc3339(&session["created_at"]) && is_rfc3339(&session["updated_at"]));
    let id = session["id"].as_str().unwrap().to_string();

    for body in [json!({}), json!({"work_dir": null})] {
        let (status, s) = server.post("/sessions", body).await;
        assert_eq!(status, 201);
        assert_eq!(s["work_dir"], Value::Null);
    }
    let (_, list) = server.get("/sessions").await;
    assert_eq!(list.as_array().unwrap().len(), 3);
    let (status, got) = server.get(&format!("/sessions/{id}")).await;
    assert_eq!((status, &got), (200, &session));

    let file = work.path().join("file.txt");
    std::fs::write(&file, "x").unwrap();
    for (dir, mentions) in [
        (json!("relative/dir"), "absolute"),
        (json!("/no/such/dir/anywhere"), "/no/such/dir/anywhere"),
        (json!(file.to_str().unwrap()), "not a directory"),
        (json!(7), "work_dir"),
    ] {
        let (status, body) = server.post("/sessions", json!({"work_dir": dir})).await;
        assert_error(status, &body, 422, mentions);
    }

    let other = tempfile::tempdir().unwrap();
    let other_dir = other.path().canonicalize().unwrap().to_str().unwrap().to_string();
    tokio::time::sleep(Duration::from_millis(5)).await;
    let (status, updated) = server.put(&format!("/sessions/{id}"), json!({"work_dir": other_dir})).await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(updated["work_dir"], other_dir);
    assert_eq!(updated["created_at"], session["created_at"]);
    assert!(updated["updated_at"].as_str() > session["updated_at"].as_str());
    let (status, updated) = server.put(&format!("/sessions/{id}"), json!({})).await;
    assert_eq!((status, &updated["work_dir"]), (200, &json!(other_dir)), "PUT without fields keeps them");
    let (_, updated) = server.put(&format!("/sessions/{id}"), json!({"work_dir": null})).await;
    assert_eq!(updated["work_dir"], Value::Null);

    let (status, body) = server.delete(&format!("/sessions/{id}")).await;
    assert_eq!((status, body), (200, json!({"status": "deleted"})));
    let (status, body) = server.get(&format!("/sessions/{id}")).await;
    assert_error(status, &body, 404, &id);
    let (status, body) = server.put("/sessions/01NOTTHERE", json!({})).await;
    assert_error(status, &body, 404, "01NOTTHERE");
}

#[tokio::test]
async fn work_roots_confine_work_dirs() {
    let root = tempfile::tempdir().unwrap();
    let inside = root.path().join("project");
    std::fs::create_dir(&inside).unwrap();
    let outside = tempfile::tempdir().unwrap();
    let server = Server::start(&["--work-root", root.path().to_str().unwrap()]);
    let (status, _) = server.post("/sessions", json!({"work_dir": inside})).await;
    assert_eq!(status, 201);
    let (status, body) = server.post("/sessions", json!({"work_dir": outside.path()})).await;
    assert_error(status, &body, 422, "work root");
    // `..` cannot climb out of a root either: the path is resolved first.
    let sneaky = format!("{}/project/../../{}", root.path().display(), outside.path().file_name().unwrap().to_str().unwrap());
    let (status, body) = server.post("/sessions", json!({"work_dir": sneaky})).await;
    assert_eq!(status, 422, "{body}");
}

#[tokio::test]
async fn messages_are_refused_before_the_run_starts() {
    let server = Server::start(&[]);
    let (_, agent) = server.post("/agents", agent_body(json!(["read"]))).await;
    let agent_id = agent["id"].as_str().unwrap();
    let (_, session) = server.post("/sessions", json!({})).await;
    let sid = session["id"].as_str().unwrap();
    for endpoint in ["message", "message/stream"] {
        let (status, body) = server.post(&format!("/sessions/nope/{endpoint}"), json!({"agent_id": agent_id, "message": "hi"})).await;
        assert_error(status, &body, 404, "nope");
        let (status, body) = server.post(&format!("/sessions/{sid}/{endpoint}"), json!({"agent_id": "01NOAGENT", "message": "hi"})).await;
        assert_error(status, &body, 404, "01NOAGENT");
        let (status, body) = server.post(&format!("/sessions/{sid}/{endpoint}"), json!({"agent_id": agent_id})).await;
        assert_error(status, &body, 422, "message");
        let (status, body) = server.post(&format!("/sessions/{sid}/{endpoint}"), json!({"agent_id": agent_id, "message": "hi"})).await;
        assert_error(status, &body, 409, "work_dir");
    }
}

#[tokio::test]
async fn cross_origin_and_rebinding_requests_are_refused() {
    let server = Server::start(&["--cors-origin", "http://app.test"]);
    let c = &server.client;
    let (status, body) = server.send(c.get(server.url("/agents")).header("origin", "http://evil.test")).await;
    assert_error(status, &body, 403, "evil.test");
    let (status, body) = server.send(c.get(server.url("/agents")).header("host", "evil.test:2323")).await;
    assert_error(status, &body, 403, "evil.test");
    let resp = c.get(server.url("/agents")).header("origin", "http://app.test").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["access-control-allow-origin"], "http://app.test");
    let preflight = c
        .request(reqwest::Method::OPTIONS, server.url("/agents"))
        .header("origin", "http://app.test")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type")
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success());
    assert_eq!(preflight.headers()["access-control-allow-origin"], "http://app.test");
    let (status, _) = server.send(c.get(server.url("/health")).header("host", "localhost:2323")).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn the_token_guards_every_route_but_health() {
    let server = Server::start(&["--token", "s3cret"]);
    let c = &server.client;
    let (status, _) = server.get("/health").await;
    assert_eq!(status, 200);
    for path in ["/agents", "/sessions", "/provider", "/provider/auth", "/openapi.json", "/nope"] {
        let (status, body) = server.get(path).await;
        assert_error(status, &body, 401, "token");
        let (status, body) = server.send(c.get(server.url(path)).bearer_auth("wrong")).await;
        assert_error(status, &body, 401, "token");
    }
    let (status, _) = server.send(c.get(server.url("/agents")).bearer_auth("s3cret")).await;
    assert_eq!(status, 200);
    assert!(!server.log().contains("s3cret"));
}

#[test]
fn a_public_address_needs_a_token() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hangar"))
        .args(["serve", "--host", "0.0.0.0", "--port", "0", "--db"])
        .arg(tempfile::tempdir().unwrap().path().join("x.db"))
        .env_remove("HANGAR_TOKEN")
        .env("XDG_CONFIG_HOME", "/nonexistent")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("token"));
}

#[tokio::test]
async fn everything_survives_a_restart() {
    let server = Server::start(&[]);
    let work = tempfile::tempdir().unwrap();
    let (_, agent) = server.post("/agents", agent_body(json!(["read"]))).await;
    let (_, session) = server.post("/sessions", json!({"work_dir": work.path()})).await;
    server.put("/provider/auth", json!({"providers": {"openai": {"key": "sk-x", "base_url": "http://127.0.0.1:9"}}})).await;
    let (_, auth) = server.get("/provider/auth").await;

    let server = server.restart();
    let (_, agents) = server.get("/agents").await;
    assert_eq!(agents, json!([agent]));
    let (_, sessions) = server.get("/sessions").await;
    assert_eq!(sessions, json!([session]));
    let (_, auth_after) = server.get("/provider/auth").await;
    assert_eq!(auth_after, auth);
}

#[tokio::test]
async fn openapi_describes_every_route() {
    let server = Server::start(&[]);
    let (status, doc) = server.get("/openapi.json").await;
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    let paths = doc["paths"].as_object().unwrap();
    for (path, method) in [
        ("/health", "get"),
        ("/provider", "get"),
        ("/provider/auth", "put"),
        ("/provider/auth/{provider}", "delete"),
        ("/provider/{name}/models/{model}", "get"),
        ("/agents", "post"),
        ("/agents/{id}", "put"),
        ("/sessions/{id}", "delete"),
        ("/sessions/{id}/message", "post"),
        ("/sessions/{id}/message/stream", "post"),
    ] {
        assert!(paths.get(path).and_then(|p| p.get(method)).is_some(), "{method} {path} missing");
    }
    let mut ids: Vec<&str> = paths.values().flat_map(|p| p.as_object().unwrap().values()).filter_map(|op| op["operationId"].as_str()).collect();
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "operation ids are unique");
    assert!(doc["components"]["schemas"]["ErrorBody"].is_object());
}
