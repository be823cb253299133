//! Starts the real `hangar` binary (the one cargo built with this bench) on
//! loopback with a temporary database, and reads its memory from /proc.
#![allow(dead_code)]

#[path = "../../tests/common/listen.rs"]
mod listen;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Hangar {
    pub child: Child,
    pub base: String,
    pub dir: tempfile::TempDir,
}

/// The `hangar` built with this bench, or the one `BENCH_HANGAR` names
/// (to compare two builds under the same load, run for run).
pub fn binary() -> String {
    std::env::var("BENCH_HANGAR").unwrap_or_else(|_| env!("CARGO_BIN_EXE_hangar").to_string())
}

/// `serve --port 0` with a fresh database and `cache_dir`; waits for the
/// "listening on" line. Logs go to a drain thread at `RUST_LOG` (default warn).
pub fn start(cache_dir: &Path) -> Hangar {
    start_on(cache_dir, None)
}

/// The server key of hosts sharing a database (each must open the
/// provider keys the others sealed).
const SHARED_SECRET: &str = "0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f9a0b1c";

/// [`start`] on the PostgreSQL database `db` when given (several hosts
/// may share it), else on a fresh SQLite file.
pub fn start_on(cache_dir: &Path, db: Option<&str>) -> Hangar {
    start_with(cache_dir, db, &[])
}

/// [`start_on`] with more `serve` arguments.
pub fn start_with(cache_dir: &Path, db: Option<&str>, args: &[String]) -> Hangar {
    let dir = tempfile::tempdir().unwrap();
    let db = db.map_or_else(|| dir.path().join("hangar.db").into_os_string(), Into::into);
    let mut child = Command::new(binary())
        .args(["serve", "--port", "0", "--db"])
        .arg(db)
        .env("HANGAR_SECRET_KEY", SHARED_SECRET)
        .arg("--cache-dir")
        .arg(cache_dir)
        .arg("--plugins")
        .arg(dir.path().join("plugins"))
        .args(args)
        .env("XDG_CONFIG_HOME", dir.path().join("config"))
        .env("XDG_DATA_HOME", dir.path().join("data"))
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .env_remove("ANTHROPIC_API_KEY")
        .env_remove("ANTHROPIC_BASE_URL")
        .env_remove("HANGAR_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let rx = listen::listen_address(stderr, |line| {
        if line.contains("ERROR") {
            eprintln!("hangar: {line}");
        }
    });
    let base = rx.recv_timeout(Duration::from_secs(60)).expect("hangar did not start");
    Hangar { child, base, dir }
}

impl Hangar {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// (VmRSS, VmHWM) in KiB.
    pub fn rss_kib(&self) -> (u64, u64) {
        rss_kib(self.child.id())
    }
}

/// Stores an Anthropic key on `hangar` whose requests go to the fake
/// provider at `fake_url`.
pub async fn use_fake_anthropic(client: &reqwest::Client, hangar: &Hangar, fake_url: &str) {
    let r = client
        .put(hangar.url("/provider/auth"))
        .json(&serde_json::json!({"providers": {"anthropic": {"type": "api_key", "key": "sk-ant-bench", "base_url": fake_url}}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

/// Runs hangar once on `cache` until every plugin is compiled, so that the
/// measured server starts from a warm cache as it always has: compiling in
/// the measured process would leave Cranelift's memory in it and change
/// the RSS figures.
pub async fn warm(cache: &std::path::Path, client: &reqwest::Client) {
    let hangar = start(cache);
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        if let Ok(resp) = client.get(hangar.url("/plugins")).send().await
            && resp.status() == 200
        {
            let body = resp.text().await.unwrap_or_default();
            if body.contains("\"state\"") && !body.contains("\"compiling\"") {
                assert!(!body.contains("\"failed\""), "a plugin failed to compile: {body}");
                break;
            }
        }
        assert!(Instant::now() < deadline, "plugins never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Stopping waits for the process (blocking).
    tokio::task::block_in_place(|| drop(hangar));
}

pub fn rss_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

impl Drop for Hangar {
    /// SIGTERM first, as an operator would stop it (and so that a wrapper
    /// such as a heap profiler can finish its report); SIGKILL after 10 s.
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        for _ in 0..100 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
