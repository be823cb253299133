//! Reading a `text/event-stream` response in tests: each event with its
//! `id`, name and data, keep-alive comments skipped.

use std::time::Duration;

use futures::StreamExt;

/// One SSE event: id, name, data (the JSON text as sent).
#[derive(Debug, Clone, PartialEq)]
pub struct Sse {
    pub id: Option<u64>,
    pub name: String,
    pub data: String,
}

pub struct Events {
    body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buf: String,
}

impl Events {
    pub fn new(resp: reqwest::Response) -> Events {
        assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
        Events { body: resp.bytes_stream().boxed(), buf: String::new() }
    }

    pub async fn next(&mut self) -> Option<Sse> {
        loop {
            if let Some(end) = self.buf.find("\n\n") {
                let frame: String = self.buf.drain(..end + 2).collect();
                let (mut id, mut name, mut data) = (None, String::new(), String::new());
                for line in frame.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = Some(v.trim().parse().unwrap());
                    } else if let Some(v) = line.strip_prefix("event:") {
                        name = v.trim().into();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.strip_prefix(' ').unwrap_or(v));
                    }
                }
                if name.is_empty() && data.is_empty() {
                    continue; // a keep-alive comment
                }
                return Some(Sse { id, name, data });
            }
            match tokio::time::timeout(Duration::from_secs(30), self.body.next()).await.expect("an event within 30 s") {
                Some(Ok(bytes)) => self.buf.push_str(&String::from_utf8_lossy(&bytes)),
                _ => return None,
            }
        }
    }

    pub async fn take(&mut self, n: usize) -> Vec<Sse> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(self.next().await.expect("the stream ended early"));
        }
        out
    }

    pub async fn all(mut self) -> Vec<Sse> {
        let mut out = Vec::new();
        while let Some(e) = self.next().await {
            out.push(e);
        }
        out
    }
}

impl Sse {
    /// The data as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.data).expect("event data is JSON")
    }
}
