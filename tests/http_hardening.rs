//! The HTTP layer against hostile clients, end to end on the real binary:
//! half-sent requests time out, one client cannot hold every connection,
//! `Host` is parsed strictly, and `--cors-origin '*'` means any origin.
//!
//! Raw `TcpStream`s where a client library would normalize the request.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::server::Server;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

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
