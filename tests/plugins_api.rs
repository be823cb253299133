//! Plugin management over HTTP: install, upgrade, use at once, refuse
//! clashes and ungranted capabilities, remove, reload, survive a restart.

mod common;

use common::fake::{FakeServer, Reply, anthropic};
use common::server::Server;
use reqwest::multipart::{Form, Part};
use serde_json::{Value, json};

const MANIFEST: &str = include_str!("fixtures/misbehave/misbehave.plugin.toml");

fn form(manifest: &str, wasm: Vec<u8>) -> Form {
    Form::new().text("manifest", manifest.to_string()).part("wasm", Part::bytes(wasm).file_name("plugin.wasm"))
}

async fn upload(server: &Server, manifest: &str, wasm: Vec<u8>) -> (u16, Value) {
    server.send(server.client.post(server.url("/plugins")).multipart(form(manifest, wasm))).await
}

async fn upload_form(server: &Server, form: Form) -> (u16, Value) {
    server.send(server.client.post(server.url("/plugins")).multipart(form)).await
}

fn wasm() -> Vec<u8> {
    common::build_component("tests/fixtures/misbehave")
}

fn assert_refused(status: u16, body: &Value, expected: u16, mentions: &str) {
    assert_eq!(status, expected, "{body}");
    assert!(body["error"].as_str().unwrap().contains(mentions), "`{}` should mention `{mentions}`", body["error"]);
}

#[tokio::test]
async fn install_use_upgrade_and_remove_a_plugin() {
    let server = Server::start(&[]);
    let work = tempfile::tempdir().unwrap();
    std::fs::write(work.path().join("notes.txt"), "hello\n").unwrap();
    let (status, plugin) = upload(&server, MANIFEST, wasm()).await;
    assert_eq!(status, 201, "{plugin}");
    assert_eq!(plugin["id"], "misbehave");
    assert_eq!(plugin["kind"], "tool");
    assert_eq!(plugin["source"], "api");
    assert_eq!(plugin["state"], "ready");
    assert_eq!(plugin["capabilities"]["requested"]["filesystem"], "none");
    assert_eq!(plugin["capabilities"]["granted"], json!({"filesystem": "none", "http": [], "process": false, "env": []}));
    // A tool that declares no filesystem access is installed, with a warning
    // in the answer and the log: every open it tries would fail.
    let warning = plugin["warnings"][0].as_str().unwrap_or_else(|| panic!("a warning: {plugin}"));
    assert!(warning.contains("tool `misbehave` declares no filesystem access"), "{warning}");
    assert!(warning.contains("add `filesystem = \"read\"` to its manifest and the operator's policy"), "{warning}");
    assert!(server.logged("declares no filesystem access").await, "{}", server.log());

    let (_, plugins) = server.get("/plugins").await;
    assert!(plugins.as_array().unwrap().iter().all(|p| p.get("warnings").is_none()), "warnings come with the install only");
    let ids: Vec<&str> = plugins.as_array().unwrap().iter().map(|p| p["id"].as_str().unwrap()).collect();
    for id in ["anthropic", "bash", "misbehave", "read"] {
        assert!(ids.contains(&id), "{ids:?}");
    }
    let bash = plugins.as_array().unwrap().iter().find(|p| p["id"] == "bash").unwrap();
    assert_eq!(bash["source"], "builtin");
    assert!(bash["confinement"].is_string(), "bash says how it is confined: {bash}");
    let (_, tools) = server.get("/tools").await;
    let tool = tools.as_array().unwrap().iter().find(|t| t["name"] == "misbehave").expect("listed in /tools");
    assert_eq!(tool["input_schema"]["required"], json!(["mode"]));

    // Usable by agents at once.
    let (status, agent) = server
        .post("/agents", json!({"name": "a", "tools": ["misbehave"], "provider": {"id": "anthropic", "model": "m"}}))
        .await;
    assert_eq!(status, 201, "{agent}");

    // The same id again is an upgrade.
    let upgraded = MANIFEST.replace("version = \"0.1.0\"", "version = \"0.2.0\"");
    let (status, plugin) = upload(&server, &upgraded, wasm()).await;
    assert_eq!(status, 200, "{plugin}");
    assert_eq!(plugin["version"], "0.2.0");

    // At call time, a failed open in a store with no preopen says why.
    let (_, session) = server.post("/sessions", json!({"work_dir": work.path()})).await;
    let fake = FakeServer::start(vec![
        Reply::sse(anthropic::tool_answer("call-1", "misbehave", &[r#"{"mode": "read-file"}"#], 10, 5)),
        Reply::sse(anthropic::text_answer(&["Done."], 20, 2)),
    ])
    .await;
    let (status, body) = server
        .put("/provider/auth", json!({"providers": {"anthropic": {"type": "api_key", "key": "sk-test", "base_url": fake.url}}}))
        .await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = server
        .post(&format!("/sessions/{}/message", session["id"].as_str().unwrap()), json!({"agent_id": agent["id"], "message": "go"}))
        .await;
    assert_eq!(status, 200, "{body}");
    let call = &body["tool_calls"][0];
    assert_eq!(call["is_error"], true, "{body}");
    assert_eq!(
        call["output"],
        "this plugin has no filesystem access (add `filesystem = \"read\"` to its manifest and the operator's policy)",
        "{body}"
    );

    // Removing a tool that agents still list names them.
    let (status, body) = server.delete("/plugins/misbehave").await;
    assert_refused(status, &body, 409, agent["id"].as_str().unwrap());
    let (status, body) = server.delete("/plugins/read").await;
    assert_refused(status, &body, 409, "built in");
    let (status, body) = server.delete("/plugins/nope").await;
    assert_refused(status, &body, 404, "nope");

    // It survives a restart (stored beside the database), then goes for good.
    let server = server.restart();
    let (_, plugins) = server.get("/plugins").await;
    let again = plugins.as_array().unwrap().iter().find(|p| p["id"] == "misbehave").expect("still installed");
    assert_eq!((again["version"].as_str(), again["source"].as_str()), (Some("0.2.0"), Some("api")));
    server.delete(&format!("/agents/{}", agent["id"].as_str().unwrap())).await;
    let (status, body) = server.delete("/plugins/misbehave").await;
    assert_eq!((status, body), (200, json!({"status": "deleted"})));
    let (_, plugins) = server.get("/plugins").await;
    assert!(!plugins.as_array().unwrap().iter().any(|p| p["id"] == "misbehave"));
    let (status, body) = server
        .post("/agents", json!({"name": "a", "tools": ["misbehave"], "provider": {"id": "anthropic", "model": "m"}}))
        .await;
    assert_refused(status, &body, 422, "misbehave");
    let server = server.restart();
    let (_, plugins) = server.get("/plugins").await;
    assert!(!plugins.as_array().unwrap().iter().any(|p| p["id"] == "misbehave"), "gone after a restart too");
}

#[tokio::test]
async fn invalid_plugins_are_refused_with_the_reason() {
    let server = Server::start(&[]);
    let read_wasm = hangar::runtime::BUILTINS.iter().find(|b| b.name == "read").unwrap().wasm.to_vec();
    let cases: Vec<(String, Vec<u8>, &str)> = vec![
        // A name taken by a built-in.
        (MANIFEST.replace("name = \"misbehave\"", "name = \"read\""), read_wasm.clone(), "built-in"),
        // Capabilities the operator did not grant.
        (format!("{MANIFEST}\n[capabilities]\nprocess = true\n"), wasm(), "process"),
        (format!("{MANIFEST}\n[capabilities]\nhttp = [\"https://example.test\"]\n"), wasm(), "https://example.test"),
        (
            format!("{MANIFEST}\n[capabilities]\nfilesystem = \"read-write\"\n"),
            wasm(),
            "the manifest asks for `read-write` access and the operator policy allows `none`",
        ),
        // Not a component at all.
        (MANIFEST.to_string(), b"\0asm not really".to_vec(), "not a valid component"),
        // A component whose spec() names another tool.
        (MANIFEST.to_string(), read_wasm.clone(), "spec() names the tool `read`"),
        // A tool component presented as a provider.
        (MANIFEST.replace("kind = \"tool\"", "kind = \"provider\""), wasm(), "provider"),
        // A manifest that is not one.
        ("kind = \"gadget\"".to_string(), wasm(), "the uploaded manifest is invalid"),
        // One that names its plugin is reported under that name.
        (MANIFEST.replace("kind = \"tool\"", "kind = \"gadget\""), wasm(), "plugin `misbehave` has an invalid manifest"),
        // A tool whose spec()'s input schema is not JSON.
        (
            include_str!("fixtures/badschema/badschema.plugin.toml").to_string(),
            common::build_component("tests/fixtures/badschema"),
            "input_schema is not JSON",
        ),
    ];
    for (manifest, bytes, mentions) in cases {
        let (status, body) = upload(&server, &manifest, bytes).await;
        assert_refused(status, &body, 422, mentions);
    }
    let (status, body) = server.send(server.client.post(server.url("/plugins")).multipart(Form::new().text("manifest", MANIFEST))).await;
    assert_refused(status, &body, 422, "wasm");
    let (status, body) = upload_form(&server, form(MANIFEST, wasm()).part("file", Part::bytes(vec![1]).file_name("x"))).await;
    assert_refused(status, &body, 422, "unexpected form field `file`; send `manifest` and `wasm`");
    // Every refusal is in the log too.
    assert!(server.logged("plugin upload refused").await, "{}", server.log());
    assert!(server.logged("the uploaded manifest is invalid").await, "{}", server.log());
    let (status, body) = server.send(server.client.post(server.url("/plugins")).json(&json!({}))).await;
    assert_eq!(status, 400, "{body}");
    let (_, plugins) = server.get("/plugins").await;
    assert!(!plugins.as_array().unwrap().iter().any(|p| p["id"] == "misbehave" || p["id"] == "badschema"), "nothing refused was registered");
    let (_, tools) = server.get("/tools").await;
    assert!(!tools.as_array().unwrap().iter().any(|t| t["name"] == "badschema" || t["input_schema"].is_null()), "{tools}");
}

#[tokio::test]
async fn policy_grants_capabilities_named_plugin_by_named_plugin() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("hangar.toml");
    std::fs::write(&config, "[plugins.misbehave]\nfilesystem = \"read\"\nhttp = [\"https://*.example.test\"]\n").unwrap();
    let server = Server::start(&["--config", config.to_str().unwrap()]);
    let manifest = format!("{MANIFEST}\n[capabilities]\nfilesystem = \"read\"\nhttp = [\"https://api.example.test\"]\n");
    let (status, plugin) = upload(&server, &manifest, wasm()).await;
    assert_eq!(status, 201, "{plugin}");
    assert_eq!(plugin["capabilities"]["granted"]["filesystem"], "read");
    assert_eq!(plugin["capabilities"]["granted"]["http"], json!(["https://api.example.test:443"]));
    let beyond = format!("{MANIFEST}\n[capabilities]\nhttp = [\"https://example.org\"]\n");
    let (status, body) = upload(&server, &beyond, wasm()).await;
    assert_refused(status, &body, 422, "misbehave");
}

#[tokio::test]
async fn reload_rescans_the_plugins_directory() {
    let plugins = tempfile::tempdir().unwrap();
    let server = Server::start(&["--plugins", plugins.path().to_str().unwrap()]);
    let (_, report) = server.post("/plugins/reload", json!({})).await;
    assert_eq!(report["loaded"], json!([]));
    std::fs::write(plugins.path().join("misbehave.plugin.toml"), MANIFEST).unwrap();
    std::fs::write(plugins.path().join("misbehave.wasm"), wasm()).unwrap();
    std::fs::write(plugins.path().join("broken.plugin.toml"), "kind = \"tool\"\nname = \"broken\"\nversion = \"1\"\n").unwrap();
    let (status, report) = server.post("/plugins/reload", json!({})).await;
    assert_eq!(status, 200);
    assert_eq!(report["loaded"], json!(["misbehave"]), "{report}");
    assert_eq!(report["errors"][0]["plugin"], "broken", "{report}");
    let (_, report) = server.post("/plugins/reload", json!({})).await;
    assert_eq!(report["unchanged"], json!(["misbehave"]), "{report}");
    let (status, body) = server.delete("/plugins/misbehave").await;
    assert_refused(status, &body, 409, "plugins directory");
    std::fs::remove_file(plugins.path().join("misbehave.plugin.toml")).unwrap();
    let (_, report) = server.post("/plugins/reload", json!({})).await;
    assert_eq!(report["removed"], json!(["misbehave"]), "{report}");
}
