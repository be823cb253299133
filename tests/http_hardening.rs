//! The HTTP layer against hostile clients, end to end on the real binary:
//! half-sent requests time out, one client cannot hold every connection,
//! `Host` is parsed strictly, plugin uploads are streamed to disk and
//! received at most two at once, and `--cors-origin '*'` means any origin.
//!
//! Raw `TcpStream`s where a client library would normalize the request.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::server::Server;
use reqwest::multipart::{Form, Part};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MANIFEST: &str = include_str!("fixtures/misbehave/misbehave.plugin.toml");
/// Liveness bound of anything the tests wait for: not a performance target.
const PATIENCE: Duration = Duration::from_secs(60);

fn addr(server: &Server) -> SocketAddr {
    server.base.trim_start_matches("http://").parse().unwrap()
}

/// Sends `request` as is and reads until the server closes.
async fn raw(server: &Server, request: &str) -> String {
    let mut tcp = TcpStream::connect(addr(server)).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(PATIENCE, tcp.read_to_end(&mut out)).await.expect("the server answers and closes").unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

fn status_of(response: &str) -> u16 {
    response.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("not a response: {response:?}"))
}

fn body_of(response: &str) -> Value {
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(body).unwrap_or_else(|_| panic!("body is not JSON: {response:?}"))
}

/// Reads one response with a `content-length` off a kept-alive connection.
async fn read_response(tcp: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&out).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap()))
                .expect("content-length");
            if body.len() >= length {
                return text;
            }
        }
        let n = tokio::time::timeout(PATIENCE, tcp.read(&mut buf)).await.expect("a response").unwrap();
        assert!(n > 0, "closed mid-response: {text:?}");
        out.extend_from_slice(&buf[..n]);
    }
}

/// Waits until `done` holds (a liveness bound only).
async fn eventually<F: std::future::Future<Output = bool>>(what: &str, mut done: impl FnMut() -> F) {
    let deadline = Instant::now() + PATIENCE;
    while !done().await {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn half_sent_and_silent_connections_are_closed_after_the_header_timeout() {
    let server = Server::start(&["--header-timeout-ms", "1000"]);
    for sent in [&b"GET /hea"[..], b"GET /health HTTP/1.1\r\nHost: local", b""] {
        let mut tcp = TcpStream::connect(addr(&server)).await.unwrap();
        tcp.write_all(sent).await.unwrap();
        let started = Instant::now();
        // Without a timeout the server would wait for the rest forever.
        let mut out = Vec::new();
        let read = tokio::time::timeout(PATIENCE, tcp.read_to_end(&mut out)).await;
        assert!(read.is_ok(), "a connection that sent {:?} is still open after {:?}", String::from_utf8_lossy(sent), started.elapsed());
        assert!(!String::from_utf8_lossy(&out).contains(" 200 "), "{out:?}");
    }
    // Whole requests are not affected.
    let (status, body) = server.get("/health").await;
    assert_eq!(status, 200, "{body}");
    let response = raw(&server, "GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await;
    assert_eq!(status_of(&response), 200, "{response}");
}

#[tokio::test]
async fn one_client_cannot_hold_more_than_its_share_of_connections() {
    // A long header timeout, so the held connections stay open.
    let server = Server::start(&["--max-connections-per-client", "5", "--header-timeout-ms", "600000"]);
    let mut held = Vec::new();
    for _ in 0..5 {
        let mut tcp = TcpStream::connect(addr(&server)).await.unwrap();
        // Answered, so the server has counted it.
        tcp.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
        assert_eq!(status_of(&read_response(&mut tcp).await), 200);
        held.push(tcp);
    }
    let response = raw(&server, "GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n").await;
    assert_eq!(status_of(&response), 429, "{response}");
    assert!(response.to_ascii_lowercase().contains("\r\nconnection: close\r\n"), "{response}");
    let body = body_of(&response);
    assert_eq!(body["code"], "too_many_connections", "{body}");
    assert!(body["error"].as_str().unwrap().contains('5'), "{body}");
    // The held ones still work.
    held[0].write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\n\r\n").await.unwrap();
    assert_eq!(status_of(&read_response(&mut held[0]).await), 200);

    drop(held);
    // The server sees the closes on its own time: wait for a free slot.
    eventually("a connection after the held ones closed", || async {
        status_of(&raw(&server, "GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await) == 200
    })
    .await;
    // Refusals are logged at debug level only: a flood must not flood the log.
    let log = server.log();
    assert!(log.contains("too many open from this client"), "the refusal is logged at debug level");
    for line in log.lines().filter(|l| l.contains("too many open")) {
        assert!(line.contains("DEBUG"), "{line}");
    }
}

#[tokio::test]
async fn host_and_request_target_must_name_loopback_exactly() {
    let server = Server::start(&[]);
    let port = addr(&server).port();
    for host in ["localhost", &format!("localhost:{port}"), "127.0.0.1", &format!("127.0.0.1:{port}"), "[::1]", "[::1]:2323", "127.9.8.7", "LOCALHOST"] {
        let response = raw(&server, &format!("GET /agents HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")).await;
        assert_eq!(status_of(&response), 200, "Host: {host}\n{response}");
    }
    let response = raw(&server, &format!("GET http://localhost:{port}/agents HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\n\r\n")).await;
    assert_eq!(status_of(&response), 200, "{response}");
    for request in [
        "GET /agents HTTP/1.1\r\nHost: [::1]evil.com\r\n",
        "GET /agents HTTP/1.1\r\nHost: 127.0.0.1:80@evil.com\r\n",
        "GET /agents HTTP/1.1\r\nHost: localhost:abc\r\n",
        "GET /agents HTTP/1.1\r\nHost: localhost:99999\r\n",
        "GET /agents HTTP/1.1\r\nHost: localhost\r\nHost: evil.com\r\n",
        "GET /agents HTTP/1.1\r\nHost: localhost\r\nHost: localhost\r\n",
        "GET http://evil.com/agents HTTP/1.1\r\nHost: localhost\r\n",
        "GET http://evil.com:2323/agents HTTP/1.1\r\nHost: localhost:2323\r\n",
    ] {
        let response = raw(&server, &format!("{request}Connection: close\r\n\r\n")).await;
        assert_eq!(status_of(&response), 403, "{request}\n{response}");
        assert_eq!(body_of(&response)["code"], "forbidden", "{response}");
    }
}

/// A multipart upload whose `wasm` part comes from a channel, so the test
/// decides when each piece is sent.
fn streamed_upload(server: &Server) -> (tokio::sync::mpsc::Sender<Result<Vec<u8>, std::io::Error>>, tokio::task::JoinHandle<reqwest::Result<reqwest::Response>>) {
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let body = reqwest::Body::wrap_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    let form = Form::new().text("manifest", MANIFEST).part("wasm", Part::stream(body).file_name("plugin.wasm"));
    let request = server.client.post(server.url("/plugins")).multipart(form);
    (tx, tokio::spawn(request.send()))
}

#[tokio::test]
async fn at_most_two_uploads_are_received_at_once() {
    let server = Server::start(&[]);
    let wasm = common::build_component("tests/fixtures/misbehave");
    let (first_tx, first) = streamed_upload(&server);
    let (second_tx, second) = streamed_upload(&server);
    for tx in [&first_tx, &second_tx] {
        tx.send(Ok(wasm[..1024].to_vec())).await.unwrap();
    }
    // Both are being received (the server says so at debug level).
    eventually("two uploads being received", || async { server.log().matches("receiving a plugin upload").count() >= 2 }).await;

    let form = Form::new().text("manifest", MANIFEST).part("wasm", Part::bytes(wasm.clone()).file_name("plugin.wasm"));
    let third = server.client.post(server.url("/plugins")).multipart(form).send().await.unwrap();
    assert_eq!(third.status(), 429);
    assert_eq!(third.headers()["retry-after"], "5");
    let body: Value = third.json().await.unwrap();
    assert_eq!(body["code"], "too_many_uploads", "{body}");

    // The two held ones finish and install.
    for (tx, upload) in [(first_tx, first), (second_tx, second)] {
        tx.send(Ok(wasm[1024..].to_vec())).await.unwrap();
        drop(tx);
        let response = upload.await.unwrap().unwrap();
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap();
        assert!(status == 200 || status == 201, "{status} {body}");
        assert_eq!(body["id"], "misbehave");
    }
    // And the slots are free again.
    let form = Form::new().text("manifest", MANIFEST).part("wasm", Part::bytes(wasm).file_name("plugin.wasm"));
    let (status, body) = server.send(server.client.post(server.url("/plugins")).multipart(form)).await;
    assert_eq!(status, 200, "{body}");
}

fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn upload_files(server: &Server) -> Vec<String> {
    std::fs::read_dir(server.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".hangar-upload-"))
        .collect()
}

#[tokio::test]
async fn an_upload_over_the_limit_is_refused_without_holding_it_in_memory() {
    const MIB: usize = 1024 * 1024;
    let server = Server::start(&[]);
    // Settle first: built-in plugins load in the background at start.
    eventually("every plugin loaded", || async {
        let (_, plugins) = server.get("/plugins").await;
        plugins.as_array().unwrap().iter().all(|p| p["state"] != "compiling")
    })
    .await;
    let pid = server.pid();
    let before = vm_rss_kib(pid);

    // A declared length over the limit: refused before any of it is sent.
    let response = raw(
        &server,
        &format!("POST /plugins HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; boundary=B\r\nContent-Length: {}\r\n\r\n", 300 * MIB),
    )
    .await;
    assert_eq!(status_of(&response), 413, "{response}");

    // No length given (chunked): the server counts while it receives.
    let mut tcp = TcpStream::connect(addr(&server)).await.unwrap();
    let boundary = "hangar-test-boundary";
    tcp.write_all(
        format!("POST /plugins HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; boundary={boundary}\r\nTransfer-Encoding: chunked\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let (mut reader, mut writer) = tcp.into_split();
    let answered = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let sending = {
        let (answered, sent) = (answered.clone(), sent.clone());
        tokio::spawn(async move {
            let head = format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"manifest\"\r\n\r\n{MANIFEST}\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"wasm\"; filename=\"big.wasm\"\r\nContent-Type: application/wasm\r\n\r\n"
            );
            let piece = vec![0x61u8; MIB];
            // 300 MiB of component, more than the 256 MiB limit.
            let chunks = std::iter::once(head.into_bytes()).chain(std::iter::repeat_n(piece, 300));
            for chunk in chunks {
                if answered.load(Ordering::Relaxed) {
                    break;
                }
                let framed = [format!("{:x}\r\n", chunk.len()).as_bytes(), &chunk, b"\r\n"].concat();
                if writer.write_all(&framed).await.is_err() {
                    break;
                }
                sent.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            }
        })
    };
    let watching = {
        let answered = answered.clone();
        tokio::spawn(async move {
            let mut peak = 0;
            while !answered.load(Ordering::Relaxed) {
                peak = peak.max(vm_rss_kib(pid));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            peak.max(vm_rss_kib(pid))
        })
    };
    let mut response = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(300);
    while !String::from_utf8_lossy(&response).contains("\r\n\r\n") {
        assert!(Instant::now() < deadline, "no answer to an oversized upload");
        match tokio::time::timeout(PATIENCE, reader.read(&mut buf)).await.expect("an answer") {
            Ok(0) | Err(_) => break,
            Ok(n) => response.extend_from_slice(&buf[..n]),
        }
    }
    answered.store(true, Ordering::Relaxed);
    let peak = watching.await.unwrap();
    sending.abort();
    let response = String::from_utf8_lossy(&response).into_owned();
    assert_eq!(status_of(&response), 413, "{response}");
    let sent = sent.load(Ordering::Relaxed);
    assert!(sent >= 256 * MIB as u64, "the server answered after {} MiB, before the limit", sent >> 20);
    let grew = peak.saturating_sub(before) / 1024;
    eprintln!("413 after {} MiB sent; server RSS {} MiB before, {} MiB at the peak", sent >> 20, before / 1024, peak / 1024);
    assert!(grew < 100, "the server's RSS grew by {grew} MiB ({} MiB before) receiving {} MiB", before / 1024, sent >> 20);

    // Nothing is left behind, and the server carries on.
    eventually("the upload's temporary file removed", || async { upload_files(&server).is_empty() }).await;
    let (status, _) = server.get("/health").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn cors_origin_star_allows_any_origin() {
    let server = Server::start(&["--cors-origin", "*"]);
    let c = &server.client;
    let response = c.get(server.url("/agents")).header("origin", "http://anything.test").send().await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["access-control-allow-origin"], "*");
    let preflight = c
        .request(reqwest::Method::OPTIONS, server.url("/agents"))
        .header("origin", "https://other.test:8443")
        .header("access-control-request-method", "POST")
        .header("access-control-request-headers", "content-type")
        .send()
        .await
        .unwrap();
    assert!(preflight.status().is_success(), "{}", preflight.status());
    assert_eq!(preflight.headers()["access-control-allow-origin"], "*");
    assert!(
        server.log().lines().any(|l| l.contains("WARN") && l.contains("--cors-origin '*'")),
        "a warning at start:\n{}",
        server.log()
    );
    // DNS rebinding is still refused: `*` is about origins, not hosts.
    let (status, _) = server.send(c.get(server.url("/agents")).header("host", "evil.test")).await;
    assert_eq!(status, 403);
}
