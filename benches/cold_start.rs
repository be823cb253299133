//! Figure 5: cold start of the real `hangar` binary to a healthy `/health`,
//! with the compile cache empty and warm, interleaved in the same run; and,
//! since `/health` answers before plugins finish compiling, also the time
//! until `GET /plugins` reports every built-in plugin `ready`.
//!
//!     cargo bench --bench cold_start            # BENCH_ITERS rounds (default 10)

#[path = "support/stats.rs"]
mod stats;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One plain HTTP/1.1 GET over a fresh connection; the status and body.
fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(50)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let status = out.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, out))
}

struct Round {
    health: Duration,
    ready: Duration,
}

fn round(cache: &std::path::Path) -> Round {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let started = Instant::now();
    let mut child = Command::new(std::env::var("BENCH_HANGAR").unwrap_or_else(|_| env!("CARGO_BIN_EXE_hangar").to_string()))
        .args(["serve", "--port", &port.to_string(), "--db"])
        .arg(dir.path().join("hangar.db"))
        .arg("--cache-dir")
        .arg(cache)
        .arg("--plugins")
        .arg(dir.path().join("plugins"))
        .env("XDG_CONFIG_HOME", dir.path().join("config"))
        .env("XDG_DATA_HOME", dir.path().join("data"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = started + Duration::from_secs(120);
    let health = loop {
        if let Some((200, _)) = get(addr, "/health") {
            break started.elapsed();
        }
        assert!(Instant::now() < deadline, "no healthy /health");
        std::thread::sleep(Duration::from_micros(500));
    };
    let ready = loop {
        if let Some((200, body)) = get(addr, "/plugins")
            && body.contains("\"state\"")
            && !body.contains("\"compiling\"")
        {
            assert!(!body.contains("\"failed\""), "a plugin failed: {body}");
            break started.elapsed();
        }
        assert!(Instant::now() < deadline, "plugins never became ready");
        std::thread::sleep(Duration::from_millis(1));
    };
    let _ = child.kill();
    let _ = child.wait();
    Round { health, ready }
}

fn main() {
    let rounds = stats::iters(10);
    let warm = tempfile::tempdir().unwrap();
    round(warm.path()); // fills the warm cache
    let (mut cold_h, mut cold_r, mut warm_h, mut warm_r) = (vec![], vec![], vec![], vec![]);
    for _ in 0..rounds {
        let empty = tempfile::tempdir().unwrap();
        let c = round(empty.path());
        cold_h.push(c.health);
        cold_r.push(c.ready);
        let w = round(warm.path());
        warm_h.push(w.health);
        warm_r.push(w.ready);
    }
    println!("\n## cold_start ({}; {rounds} interleaved rounds)\n", stats::machine());
    println!("| compile cache | to healthy /health p50 ms | max ms | to all plugins ready p50 ms | max ms |");
    println!("|---|---|---|---|---|");
    for (name, h, r) in [("empty", &mut cold_h, &mut cold_r), ("warm", &mut warm_h, &mut warm_r)] {
        let hs = stats::summarize(h);
        let rs = stats::summarize(r);
        println!(
            "| {name} | {:.1} | {:.1} | {:.1} | {:.1} |",
            stats::ms(hs.p50),
            stats::ms(*h.last().unwrap()),
            stats::ms(rs.p50),
            stats::ms(*r.last().unwrap())
        );
    }
    println!();
}
