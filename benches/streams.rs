//! Figures 4 and 6, against a scripted fake of the Anthropic Messages API
//! on loopback (the one the tests use: chunked SSE), and the real `hangar`
//! binary running the real `anthropic` provider component.
//!
//! 6. Time to the first `text` event: a streaming message through hangar
//!    (HTTP in, agent loop, WASM provider, HTTP out to the fake, SSE back)
//!    against the same first `text_delta` read straight from the fake.
//!    Sequential, interleaved, `BENCH_ITERS` each (default 300).
//! 4. `BENCH_SESSIONS` (default 1,000) concurrent streaming sessions: each
//!    answer is 20 text deltas 150 ms apart (~3 s; `BENCH_PAUSE_MS` to
//!    change it), so all are open at once.
//!    Counts errors, and reads the hangar process's peak RSS (VmHWM). Each
//!    event goes out with its seq as `id:` and to the store's writer: the
//!    events written per second are the ids the clients read over the time
//!    until the last is stored (an ended run's events route waits for the
//!    writer before it reads the store; its replay is checked against the
//!    stream).
//! 4b. The same streams without the pauses (`burst`): how many events a
//!    second the store takes when the model is not the limit.
//!
//!     cargo bench --bench streams               # all three
//!     cargo bench --bench streams -- ttft       # only figure 6
//!     cargo bench --bench streams -- sessions   # only figure 4
//!     cargo bench --bench streams -- burst      # only figure 4b
//!
//! `BENCH_VENDOR=https` puts the fake behind TLS with HTTP/2 offered by
//! ALPN, as the vendors' endpoints are (the server trusts its CA through
//! `[http] ca_file`); the default is plain HTTP/1.1 on loopback.
//!
//! `BENCH_DATABASE_URL=postgres://…` runs `BENCH_HOSTS` hosts (default 2)
//! on that database instead of one on SQLite: sessions are made on one
//! host and streamed from the next, as a load balancer without sticky
//! sessions would send them; RSS is summed over the hosts.

#[allow(dead_code)]
#[path = "../tests/common/fake.rs"]
mod fake;
#[path = "support/launch.rs"]
mod launch;
#[allow(dead_code)]
#[path = "../tests/common/tls.rs"]
mod tls;
#[path = "support/stats.rs"]
mod stats;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fake::{Chunk, FakeServer, Reply, anthropic};
use futures::StreamExt;
use serde_json::json;

/// The scripted vendor: plain HTTP/1.1, or TLS with HTTP/2 (`BENCH_VENDOR`).
enum Vendor {
    Plain(FakeServer),
    Tls(tls::TlsFake),
}

impl Vendor {
    fn push(&self, reply: Reply) {
        match self {
            Vendor::Plain(fake) => fake.push(reply),
            Vendor::Tls(fake) => fake.push(reply),
        }
    }

    fn url(&self) -> &str {
        match self {
            Vendor::Plain(fake) => &fake.url,
            Vendor::Tls(fake) => &fake.url,
        }
    }
}

struct Setup {
    /// One on SQLite, or `BENCH_HOSTS` on `BENCH_DATABASE_URL`.
    hangars: Vec<launch::Hangar>,
    fake: Vendor,
    agent: String,
    client: reqwest::Client,
    work: tempfile::TempDir,
    _config: tempfile::NamedTempFile,
    /// This run's own compile cache; declared last, so removed after the
    /// server has stopped.
    _cache: tempfile::TempDir,
}

async fn setup() -> Setup {
    let fake = match std::env::var("BENCH_VENDOR").as_deref() {
        Ok("https") => Vendor::Tls(tls::TlsFake::scripted().await),
        Ok("http") | Err(_) => Vendor::Plain(FakeServer::start(Vec::new()).await),
        Ok(other) => panic!("BENCH_VENDOR is `http` or `https`, not `{other}`"),
    };
    // A private compile cache for this run (a shared, predictable path
    // under /tmp is one anyone on the machine could fill first).
    let cache = tempfile::tempdir().unwrap();
    let mut client = reqwest::Client::builder().pool_max_idle_per_host(2000);
    if let Vendor::Tls(fake) = &fake {
        client = client.add_root_certificate(reqwest::Certificate::from_pem(fake.ca_pem.as_bytes()).unwrap());
    }
    let client = client.build().unwrap();
    launch::warm(cache.path(), &client).await;
    let db = std::env::var("BENCH_DATABASE_URL").ok();
    let hosts = if db.is_some() { stats::setting("BENCH_HOSTS", 2) } else { 1 };
    // Every stream comes from this one loopback address, and each holds a
    // provider instance while it runs: room for all of them, and the
    // session requests beside.
    let room = (sessions_wanted() + 64).max(1024);
    let config = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
    let mut settings = format!("[limits]\nplugin_instances = {}\n", room.max(2000));
    if let Vendor::Tls(fake) = &fake {
        let ca = cache.path().join("vendor-ca.pem");
        std::fs::write(&ca, &fake.ca_pem).unwrap();
        settings.push_str(&format!("[http]\nca_file = {ca:?}\n"));
    }
    std::fs::write(config.path(), settings).unwrap();
    let args = ["--max-connections-per-client".to_string(), room.to_string(), "--config".into(), config.path().display().to_string()];
    let hangars: Vec<launch::Hangar> = (0..hosts).map(|_| launch::start_with(cache.path(), db.as_deref(), &args)).collect();
    let hangar = &hangars[0];
    let work = tempfile::tempdir().unwrap();
    launch::use_fake_anthropic(&client, hangar, fake.url()).await;
    let agent: serde_json::Value = client
        .post(hangar.url("/agents"))
        .json(&json!({"name": "bench", "instructions": "You are terse.", "tools": [],
            "provider": {"id": "anthropic", "model": "claude-test", "max_tokens": 512}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    Setup { hangars, fake, agent: agent["id"].as_str().unwrap().into(), client, work, _config: config, _cache: cache }
}

impl Setup {
    /// The host a stream of session number `i` goes to.
    fn host(&self, i: usize) -> &launch::Hangar {
        &self.hangars[i % self.hangars.len()]
    }

    /// (VmRSS, VmHWM) in KiB, summed over the hosts.
    fn rss_kib(&self) -> (u64, u64) {
        self.hangars.iter().map(|h| h.rss_kib()).fold((0, 0), |(a, b), (c, d)| (a + c, b + d))
    }

    async fn session(&self) -> String {
        self.session_on(0).await
    }

    /// A session made on the host after session `i`'s.
    async fn session_on(&self, i: usize) -> String {
        let s: serde_json::Value = self
            .client
            .post(self.host(i + 1).url("/sessions"))
            .json(&json!({"work_dir": self.work.path()}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        s["id"].as_str().expect("session id").to_string()
    }

    fn stream(&self, session: &str, text: &str) -> reqwest::RequestBuilder {
        self.stream_on(0, session, text)
    }

    fn stream_on(&self, i: usize, session: &str, text: &str) -> reqwest::RequestBuilder {
        self.client
            .post(self.host(i).url(&format!("/sessions/{session}/message/stream")))
            .json(&json!({"agent_id": self.agent, "message": text}))
    }
}

/// Reads a response body until `needle` has been seen; returns whether it was.
async fn until(resp: reqwest::Response, needle: &str) -> (bool, String) {
    let mut body = resp.bytes_stream();
    let mut seen = String::new();
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(bytes) => seen.push_str(&String::from_utf8_lossy(&bytes)),
            Err(e) => return (false, format!("{seen}\n[body error: {e}]")),
        }
        if seen.contains(needle) {
            return (true, seen);
        }
    }
    (false, seen)
}

async fn ttft(s: &Setup) {
    let n = stats::iters(300);
    let answer = || Reply::sse(anthropic::text_answer(&["Hello", " there."], 10, 2));
    let direct_body = json!({"model": "claude-test", "max_tokens": 16, "stream": true,
        "messages": [{"role": "user", "content": "hi"}]});
    let mut direct = Vec::with_capacity(n);
    let mut through = Vec::with_capacity(n);
    for i in 0..n + 20 {
        // Straight from the fake: request, first text_delta.
        s.fake.push(answer());
        let t = Instant::now();
        let resp = s.client.post(format!("{}/v1/messages", s.fake.url())).json(&direct_body).send().await.unwrap();
        let (ok, _) = until(resp, "text_delta").await;
        let d = t.elapsed();
        assert!(ok);
        // Through hangar: request, first `text` event, on a fresh session so
        // that both sides send the model one message (a session that grew
        // over hundreds of rounds would measure history size instead).
        let session = s.session().await;
        s.fake.push(answer());
        let t = Instant::now();
        let resp = s.stream(&session, "hi").send().await.unwrap();
        assert_eq!(resp.status(), 200);
        let mut body = resp.bytes_stream();
        let mut seen = String::new();
        let mut first = None;
        while let Some(chunk) = body.next().await {
            seen.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            if first.is_none() && seen.contains("event: text") {
                first = Some(t.elapsed());
            }
        }
        assert!(seen.contains("event: done"), "{seen}");
        if i >= 20 {
            direct.push(d);
            through.push(first.expect("a text event"));
        }
    }
    let d = stats::summarize(&mut direct);
    let h = stats::summarize(&mut through);
    println!("\n## ttft ({}; {n} interleaved rounds after 20 warm-up)\n", stats::machine());
    println!("| side | p50 µs | p99 µs | mean µs |");
    println!("|---|---|---|---|");
    println!("| fake provider alone (first text_delta) | {:.0} | {:.0} | {:.0} |", stats::us(d.p50), stats::us(d.p99), stats::us(d.mean));
    println!("| through hangar + WASM provider (first `text` event) | {:.0} | {:.0} | {:.0} |", stats::us(h.p50), stats::us(h.p99), stats::us(h.mean));
    println!(
        "\nadded p50: {:.0} µs ({:.1}× the fake alone)\n",
        stats::us(h.p50) - stats::us(d.p50),
        h.p50.as_secs_f64() / d.p50.as_secs_f64()
    );
}

/// The ids (seqs) of the SSE events in `seen`.
fn event_ids(seen: &str) -> impl Iterator<Item = u64> + '_ {
    seen.lines().filter_map(|l| l.strip_prefix("id:")).filter_map(|v| v.trim().parse().ok())
}

/// `BENCH_SESSIONS`: how many streams figure 4 holds open at once.
fn sessions_wanted() -> usize {
    stats::setting("BENCH_SESSIONS", 1000)
}

/// Figure 4 (`pause` between deltas) or 4b (none).
async fn sessions(s: &Setup, name: &str, pause: Duration) {
    let n = sessions_wanted();
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        ids.push(s.session_on(i).await);
    }
    let (rss_before, _) = s.rss_kib();
    let parts: Vec<String> = (0..20).map(|i| format!("part {i} ")).collect();
    for _ in 0..n {
        let mut chunks = vec![anthropic::start(10)];
        let block = anthropic::text_block(0, &parts.iter().map(String::as_str).collect::<Vec<_>>());
        // content_block_start, then each delta after a pause.
        let mut block = block.into_iter();
        chunks.push(block.next().unwrap());
        for c in block {
            if !pause.is_zero() {
                chunks.push(Chunk::Sleep(pause));
            }
            chunks.push(c);
        }
        chunks.extend(anthropic::stop("end_turn", 20));
        s.fake.push(Reply::sse(chunks));
    }
    // Sample RSS while the streams run.
    let pids: Vec<u32> = s.hangars.iter().map(|h| h.child.id()).collect();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !stop.load(Ordering::Relaxed) {
                peak = peak.max(pids.iter().map(|&pid| launch::rss_kib(pid).0).sum());
                std::thread::sleep(Duration::from_millis(20));
            }
            peak
        })
    };
    let open = Arc::new(AtomicUsize::new(0));
    let max_open = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let runs = ids.iter().enumerate().map(|(i, id)| {
        let req = s.stream_on(i, id, "stream please");
        let (open, max_open) = (open.clone(), max_open.clone());
        async move {
            let resp = match req.send().await {
                Ok(r) => r,
                Err(e) => return Err(format!("request: {e}")),
            };
            if resp.status() != 200 {
                return Err(format!("status {}", resp.status()));
            }
            let run = resp.headers().get("content-location").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
            let now = open.fetch_add(1, Ordering::SeqCst) + 1;
            max_open.fetch_max(now, Ordering::SeqCst);
            let (ok, seen) = until(resp, "event: done").await;
            open.fetch_sub(1, Ordering::SeqCst);
            if !ok {
                return Err(format!("no done event: {}", seen.chars().rev().take(300).collect::<String>().chars().rev().collect::<String>()));
            }
            if seen.contains("event: error") || seen.matches("event: text").count() != 20 {
                return Err(format!("bad stream: {} text events", seen.matches("event: text").count()));
            }
            Ok((event_ids(&seen).count(), run))
        }
    });
    let results = tokio::time::timeout(Duration::from_secs(180), futures::future::join_all(runs)).await;
    let elapsed = started.elapsed();
    stop.store(true, Ordering::Relaxed);
    let sampled_peak = sampler.join().unwrap();
    let (_, hwm) = s.rss_kib();
    let results = results.unwrap_or_else(|_| panic!("{n} sessions did not finish within 180 s"));
    let errors: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    let events: usize = results.iter().filter_map(|r| r.as_ref().ok()).map(|(count, _)| count).sum();
    // Every host's writer has stored what it was given once an ended run's
    // events route answers there: the last run each host ran, replayed
    // whole, is what its stream carried.
    for h in 0..s.hangars.len() {
        let Some((i, Ok((count, run)))) = results.iter().enumerate().rev().find(|(i, r)| i % s.hangars.len() == h && r.is_ok()) else {
            continue;
        };
        let resp = s.client.get(s.host(i).url(&format!("{run}/events"))).send().await.unwrap();
        let (_, replayed) = until(resp, "event: done").await;
        assert_eq!(event_ids(&replayed).count(), *count, "the store holds other events than the stream sent");
    }
    let stored = started.elapsed();
    println!(
        "\n## {name} ({}; {} host(s){}; {} ms between deltas; vendor over {})\n",
        stats::machine(),
        s.hangars.len(),
        if s.hangars.len() > 1 { ", RSS summed" } else { "" },
        pause.as_millis(),
        match s.fake {
            Vendor::Plain(_) => "HTTP/1.1",
            Vendor::Tls(_) => "TLS, HTTP/2 by ALPN",
        }
    );
    println!("| sessions | errors | max open at once | wall s | events stored | written/s | RSS before MB | peak RSS (VmHWM) MB | peak sampled VmRSS MB |");
    println!("|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {n} | {} | {} | {:.1} | {events} | {:.0} | {:.1} | {:.1} | {:.1} |\n",
        errors.len(),
        max_open.load(Ordering::SeqCst),
        elapsed.as_secs_f64(),
        events as f64 / stored.as_secs_f64(),
        rss_before as f64 / 1024.0,
        hwm as f64 / 1024.0,
        sampled_peak as f64 / 1024.0
    );
    for e in errors.iter().take(5) {
        println!("error: {e}");
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with("--")).collect();
    let want = |name: &str| args.is_empty() || args.iter().any(|a| a == name);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async {
        let s = setup().await;
        if want("ttft") {
            ttft(&s).await;
        }
        if want("sessions") {
            // Longer pauses (`BENCH_PAUSE_MS`) keep more streams open at
            // once: 10,000 take longer to start than 20 × 150 ms.
            let pause = stats::setting("BENCH_PAUSE_MS", 150);
            sessions(&s, "sessions", Duration::from_millis(pause)).await;
        }
        if want("burst") {
            sessions(&s, "burst", Duration::ZERO).await;
        }
    });
}
