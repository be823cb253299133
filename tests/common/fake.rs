//! A scripted HTTP server on loopback that answers each request with the
//! next reply of its script, written chunk by chunk (chunked transfer
//! encoding, as streaming vendors do), and records what it was sent.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;

#[derive(Clone)]
pub enum Chunk {
    Data(Vec<u8>),
    /// Waits until the test releases the gate.
    Wait(Arc<Notify>),
    Sleep(Duration),
}

#[derive(Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub chunks: Vec<Chunk>,
}

impl Reply {
    pub fn sse(chunks: Vec<Chunk>) -> Reply {
        Reply { status: 200, headers: vec![("content-type".into(), "text/event-stream".into())], chunks }
    }
    pub fn json(status: u16, body: serde_json::Value) -> Reply {
        Reply {
            status,
            headers: vec![("content-type".into(), "application/json".into())],
            chunks: vec![Chunk::Data(body.to_string().into_bytes())],
        }
    }
    /// What a scripted server answers once its script has run out.
    pub fn script_exhausted() -> Reply {
        Reply::json(500, serde_json::json!({"type": "error", "error": {"type": "api_error", "message": "script exhausted"}}))
    }
    pub fn header(mut self, name: &str, value: &str) -> Reply {
        self.headers.push((name.into(), value.into()));
        self
    }
}

/// One request as received.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Recorded {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap()
    }
    /// The request as it came over the wire, for checks that a secret
    /// appears only where it should.
    pub fn raw_text(&self) -> String {
        let mut s = format!("{} {}\n", self.method, self.path);
        for (n, v) in &self.headers {
            s.push_str(&format!("{n}: {v}\n"));
        }
        s.push_str(&String::from_utf8_lossy(&self.body));
        s
    }
}

/// Answers each request from what it holds, instead of a fixed script.
pub type Responder = Arc<dyn Fn(&Recorded) -> Reply + Send + Sync>;

pub struct FakeServer {
    pub url: String,
    pub requests: Arc<Mutex<Vec<Recorded>>>,
    script: Arc<Mutex<std::collections::VecDeque<Reply>>>,
}

impl FakeServer {
    /// A server whose replies are computed from each request by `respond`.
    pub async fn responding(respond: impl Fn(&Recorded) -> Reply + Send + Sync + 'static) -> FakeServer {
        Self::start_with(Vec::new(), Some(Arc::new(respond))).await
    }

    pub async fn start(script: Vec<Reply>) -> FakeServer {
        Self::start_with(script, None).await
    }

    async fn start_with(script: Vec<Reply>, responder: Option<Responder>) -> FakeServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let requests = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(script.into_iter().collect::<std::collections::VecDeque<_>>()));
        let (reqs, scr) = (requests.clone(), script.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                // Like a real streaming server: each event goes out at once,
                // not held by Nagle's algorithm until the peer ACKs.
                let _ = stream.set_nodelay(true);
                let (reqs, scr, responder) = (reqs.clone(), scr.clone(), responder.clone());
                tokio::spawn(async move {
                    let _ = serve(stream, reqs, scr, responder).await;
                });
            }
        });
        FakeServer { url, requests, script }
    }

    pub fn push(&self, reply: Reply) {
        self.script.lock().unwrap().push_back(reply);
    }

    pub fn requests(&self) -> Vec<Recorded> {
        self.requests.lock().unwrap().clone()
    }
}

async fn serve(
    mut stream: TcpStream,
    requests: Arc<Mutex<Vec<Recorded>>>,
    script: Arc<Mutex<std::collections::VecDeque<Reply>>>,
    responder: Option<Responder>,
) -> std::io::Result<()> {
    loop {
        let Some(request) = read_request(&mut stream).await? else { return Ok(()) };
        let answer = responder.as_ref().map(|respond| respond(&request));
        requests.lock().unwrap().push(request);
        let reply = answer.or_else(|| script.lock().unwrap().pop_front()).unwrap_or_else(Reply::script_exhausted);
        let mut head = format!("HTTP/1.1 {} X\r\ntransfer-encoding: chunked\r\n", reply.status);
        for (n, v) in &reply.headers {
            head.push_str(&format!("{n}: {v}\r\n"));
        }
        head.push_str("\r\n");
        stream.write_all(head.as_bytes()).await?;
        for chunk in reply.chunks {
            match chunk {
                Chunk::Data(data) if !data.is_empty() => {
                    stream.write_all(format!("{:x}\r\n", data.len()).as_bytes()).await?;
                    stream.write_all(&data).await?;
                    stream.write_all(b"\r\n").await?;
                    stream.flush().await?;
                }
                Chunk::Data(_) => {}
                Chunk::Wait(gate) => gate.notified().await,
                Chunk::Sleep(d) => tokio::time::sleep(d).await,
            }
        }
        stream.write_all(b"0\r\n\r\n").await?;
    }
}

async fn read_request(stream: &mut TcpStream) -> std::io::Result<Option<Recorded>> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await? == 0 {
            return Ok(None);
        }
        buf.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let mut lines = text.split("\r\n");
    let mut first = lines.next().unwrap_or("").split(' ');
    let method = first.next().unwrap_or("").to_string();
    let path = first.next().unwrap_or("").to_string();
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let len = headers.iter().find(|(n, _)| n == "content-length").and_then(|(_, v)| v.parse().ok()).unwrap_or(0);
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    Ok(Some(Recorded { method, path, headers, body }))
}

/// Anthropic Messages API stream events (`event:` + `data:` lines).
pub mod anthropic {
    use serde_json::{Value, json};

    use super::Chunk;

    pub fn event(name: &str, data: Value) -> Chunk {
        Chunk::Data(format!("event: {name}\ndata: {data}\n\n").into_bytes())
    }

    pub fn start(input_tokens: u64) -> Chunk {
        event("message_start", json!({"type": "message_start", "message": {
            "id": "msg_1", "type": "message", "role": "assistant", "content": [], "model": "claude-test",
            "stop_reason": null, "stop_sequence": null, "usage": {"input_tokens": input_tokens, "output_tokens": 1}}}))
    }

    pub fn text_block(index: u32, parts: &[&str]) -> Vec<Chunk> {
        let mut out = vec![event("content_block_start", json!({"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}))];
        for p in parts {
            out.push(event("content_block_delta", json!({"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": p}})));
        }
        out.push(event("content_block_stop", json!({"type": "content_block_stop", "index": index})));
        out
    }

    pub fn tool_block(index: u32, id: &str, name: &str, json_parts: &[&str]) -> Vec<Chunk> {
        let mut out = vec![event("content_block_start", json!({"type": "content_block_start", "index": index,
            "content_block": {"type": "tool_use", "id": id, "name": name, "input": {}}}))];
        for p in json_parts {
            out.push(event("content_block_delta", json!({"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": p}})));
        }
        out.push(event("content_block_stop", json!({"type": "content_block_stop", "index": index})));
        out
    }

    pub fn stop(reason: &str, output_tokens: u64) -> Vec<Chunk> {
        vec![
            event("message_delta", json!({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": null}, "usage": {"output_tokens": output_tokens}})),
            event("message_stop", json!({"type": "message_stop"})),
        ]
    }

    /// A whole answer of text.
    pub fn text_answer(parts: &[&str], input_tokens: u64, output_tokens: u64) -> Vec<Chunk> {
        let mut out = vec![start(input_tokens)];
        out.extend(text_block(0, parts));
        out.extend(stop("end_turn", output_tokens));
        out
    }

    /// An answer that calls one tool.
    pub fn tool_answer(id: &str, name: &str, json_parts: &[&str], input_tokens: u64, output_tokens: u64) -> Vec<Chunk> {
        let mut out = vec![start(input_tokens)];
        out.extend(tool_block(0, id, name, json_parts));
        out.extend(stop("tool_use", output_tokens));
        out
    }

    pub fn error(status: u16, kind: &str, message: &str) -> super::Reply {
        super::Reply::json(status, json!({"type": "error", "error": {"type": kind, "message": message}}))
    }
}
