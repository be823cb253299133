//! Plugins' outbound HTTPS through the real server: the `anthropic`
//! provider against a vendor fake behind TLS that offers HTTP/2 (as the
//! vendors do), trusted through `[http] ca_file` and only through it.

mod common;

use std::time::Duration;

use common::fake::{Chunk, Reply, anthropic};
use common::server::Server;
use common::tls::TlsFake;
use serde_json::json;

const KEY: &str = "sk-ant-tls-KEY-4b5c6d";

/// A text answer whose middle waits `pause`, so that answers started
/// together are open together.
fn answer(text: &str, pause: Duration) -> Reply {
    let mut chunks = vec![anthropic::start(5)];
    let block = anthropic::text_block(0, &[text, "!"]);
    let (head, tail) = block.split_at(2);
    chunks.extend_from_slice(head);
    chunks.push(Chunk::Sleep(pause));
    chunks.extend_from_slice(tail);
    chunks.extend(anthropic::stop("end_turn", 2));
    Reply::sse(chunks)
}

/// A server trusting `fake`'s CA when `trust`, with an agent on it, and
/// a work dir (apart from the config, which no session may get).
async fn server_for(fake: &TlsFake, trust: bool) -> (Server, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, &fake.ca_pem).unwrap();
    let config = dir.path().join("hangar.toml");
    let text = if trust { format!("[http]\nca_file = {:?}\n", ca) } else { String::new() };
    std::fs::write(&config, text).unwrap();
    let server = Server::start(&["--config", config.to_str().unwrap()]);
    let (status, _) = server
        .put("/provider/auth", json!({"providers": {"anthropic": {"type": "api_key", "key": KEY, "base_url": fake.url}}}))
        .await;
    assert_eq!(status, 200);
    let (status, agent) = server
        .post("/agents", json!({"name": "t", "instructions": "Be terse.", "tools": [],
            "provider": {"id": "anthropic", "model": "claude-test", "max_tokens": 64}}))
        .await;
    assert_eq!(status, 201, "{agent}");
    drop(dir);
    (server, agent["id"].as_str().unwrap().to_string(), work)
}

async fn ask(server: &Server, agent: &str, work: &std::path::Path, text: &str) -> (u16, serde_json::Value) {
    let (status, session) = server.post("/sessions", json!({"work_dir": work})).await;
    assert_eq!(status, 201, "{session}");
    let id = session["id"].as_str().unwrap();
    server.post(&format!("/sessions/{id}/message"), json!({"agent_id": agent, "message": text})).await
}

#[tokio::test]
async fn concurrent_answers_from_an_http2_vendor_share_one_connection() {
    let fake = TlsFake::responding(|req| {
        let content = &req.json()["messages"][0]["content"];
        let said = content.as_str().or(content[0]["text"].as_str()).unwrap_or_default().to_string();
        answer(&format!("re {said}"), Duration::from_millis(400))
    })
    .await;
    let (server, agent, dir) = server_for(&fake, true).await;

    // First one answer alone: a burst to an origin with no connection yet
    // races to open several (the pool learns the protocol only from the
    // handshake), which is hyper's, not what is tested here.
    let (status, reply) = ask(&server, &agent, dir.path(), "first").await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(fake.connections.load(std::sync::atomic::Ordering::SeqCst), 1);

    // Twenty answers at once, each open for 400 ms: all on the one
    // connection the first answer made, several of them at the same time.
    let asks = (0..20).map(|i| {
        let (server, agent, work) = (&server, &agent, dir.path());
        async move { ask(server, agent, work, &format!("q{i}")).await }
    });
    let replies = futures::future::join_all(asks).await;
    for (i, (status, reply)) in replies.iter().enumerate() {
        assert_eq!(*status, 200, "{reply}");
        assert_eq!(reply["response"], format!("re q{i}!"), "{reply}");
    }
    let seen = fake.requests();
    assert_eq!(seen.len(), 21);
    assert!(seen.iter().all(|(version, _)| *version == hyper::Version::HTTP_2), "every request over HTTP/2");
    assert!(seen.iter().all(|(_, req)| req.header("x-api-key") == Some(KEY)), "the key in its header on every stream");
    assert_eq!(fake.connections.load(std::sync::atomic::Ordering::SeqCst), 1, "one connection for all twenty");
    let most = fake.most_open.load(std::sync::atomic::Ordering::SeqCst);
    assert!(most >= 2, "the answers shared the connection at the same time ({most} at most)");
}

#[tokio::test]
async fn a_vendor_certificate_from_a_ca_the_operator_did_not_name_is_refused() {
    let fake = TlsFake::responding(|_| answer("never", Duration::ZERO)).await;
    let (server, agent, dir) = server_for(&fake, false).await;
    let (status, body) = ask(&server, &agent, dir.path(), "hello").await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["code"], "provider_error", "{body}");
    assert!(body["error"].as_str().unwrap_or_default().contains("certificate"), "{body}");
    assert!(fake.requests().is_empty(), "no request got through the handshake");
}

#[tokio::test]
async fn a_ca_file_without_a_usable_certificate_stops_the_server_at_start() {
    let damaged = "-----BEGIN CERTIFICATE-----\nMIIBAAAA\n-----END CERTIFICATE-----\n";
    for (text, says) in [("not a certificate\n", "holds no PEM certificate"), (damaged, "[http] ca_file")] {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, text).unwrap();
        let config = dir.path().join("hangar.toml");
        std::fs::write(&config, format!("[http]\nca_file = {ca:?}\n")).unwrap();
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_hangar"))
            .args(["serve", "--port", "0", "--db"])
            .arg(dir.path().join("h.db"))
            .arg("--config")
            .arg(&config)
            .env("XDG_DATA_HOME", dir.path())
            .env("XDG_CACHE_HOME", dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // A server that starts anyway would run until killed: bounded.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                child.kill().unwrap();
                panic!("the server started with the ca_file {text:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert!(!status.success());
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
        assert!(stderr.contains("[http] ca_file") && stderr.contains(says), "{stderr}");
    }
}
