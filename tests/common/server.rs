//! The real `hangar` binary, started on an ephemeral port with a temporary
//! database, driven over HTTP.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Server {
    child: Option<Child>,
    pub base: String,
    pub dir: Arc<tempfile::TempDir>,
    pub args: Vec<String>,
    pub envs: Vec<(String, String)>,
    log: Arc<Mutex<String>>,
    pub client: reqwest::Client,
}

impl Server {
    /// A server with a fresh data directory.
    pub fn start(args: &[&str]) -> Server {
        Self::start_with_env(args, &[])
    }

    pub fn start_with_env(args: &[&str], envs: &[(&str, &str)]) -> Server {
        let dir = Arc::new(tempfile::tempdir().unwrap());
        Self::launch(dir, args.iter().map(|s| s.to_string()).collect(), envs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
    }

    fn launch(dir: Arc<tempfile::TempDir>, args: Vec<String>, envs: Vec<(String, String)>) -> Server {
        let (child, base, log) = spawn(dir.path(), &args, &envs).unwrap_or_else(|log| panic!("server did not start:\n{log}"));
        Server { child: Some(child), base, dir, args, envs, log, client: reqwest::Client::new() }
    }

    /// Kills the server with SIGKILL (a crash) and starts it again on the
    /// same data directory.
    pub fn crash_and_restart(mut self) -> Server {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
        let (dir, args, envs) = (self.dir.clone(), self.args.clone(), self.envs.clone());
        drop(self);
        Self::launch(dir, args, envs)
    }

    /// Stops with SIGTERM and starts again on the same data directory.
    pub fn restart(mut self) -> Server {
        let status = self.terminate();
        assert!(status.success(), "clean exit on SIGTERM, got {status:?}");
        let (dir, args, envs) = (self.dir.clone(), self.args.clone(), self.envs.clone());
        drop(self);
        Self::launch(dir, args, envs)
    }

    /// Stops with SIGTERM and starts again on the same data directory with
    /// other arguments.
    pub fn restart_with(mut self, args: &[&str]) -> Server {
        let status = self.terminate();
        assert!(status.success(), "clean exit on SIGTERM, got {status:?}");
        let (dir, envs) = (self.dir.clone(), self.envs.clone());
        drop(self);
        Self::launch(dir, args.iter().map(|s| s.to_string()).collect(), envs)
    }

    /// Starts a server stopped with [`Server::terminate`] again, on the same
    /// data directory.
    pub fn restart_stopped(self) -> Server {
        assert!(self.child.is_none(), "stopped first");
        let (dir, args, envs) = (self.dir.clone(), self.args.clone(), self.envs.clone());
        drop(self);
        Self::launch(dir, args, envs)
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("hangar.db")
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Whether the server logs `needle` within 10 s. A line logged while
    /// a request is answered may reach the reader of the server's stderr
    /// only after the answer has reached the test.
    pub async fn logged(&self, needle: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.log().contains(needle) {
            if Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "server did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        self.send(self.client.get(self.url(path))).await
    }

    pub async fn delete(&self, path: &str) -> (u16, serde_json::Value) {
        self.send(self.client.delete(self.url(path))).await
    }

    pub async fn post(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        self.send(self.client.post(self.url(path)).json(&body)).await
    }

    pub async fn put(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        self.send(self.client.put(self.url(path)).json(&body)).await
    }

    pub async fn send(&self, req: reqwest::RequestBuilder) -> (u16, serde_json::Value) {
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap();
        let value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("status {status}: body is not JSON: {text:?}"));
        (status, value)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts the binary and waits for its "listening on" line.
fn spawn(dir: &Path, args: &[String], envs: &[(String, String)]) -> Result<(Child, String, Arc<Mutex<String>>), String> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hangar"));
    cmd.arg("serve").args(["--port", "0"]);
    // A test may name its own database (`--db postgres://…`, or the variable).
    if !args.iter().any(|a| a == "--db") && !envs.iter().any(|(k, _)| k == "HANGAR_DATABASE_URL") {
        cmd.arg("--db").arg(dir.join("hangar.db"));
    }
    cmd.arg("--cache-dir")
        .arg(super::cache_dir())
        .args(args)
        // Nothing of the developer's own setup may leak in.
        .env("XDG_CONFIG_HOME", dir.join("config"))
        .env("XDG_DATA_HOME", dir.join("data"))
        .env_remove("ANTHROPIC_API_KEY")
        .env_remove("OPENAI_API_KEY")
        .env_remove("ANTHROPIC_BASE_URL")
        .env_remove("OPENAI_BASE_URL")
        .env_remove("OLLAMA_HOST")
        .env_remove("HANGAR_TOKEN")
        .env_remove("HANGAR_SECRET_KEY")
        .env("RUST_LOG", "info,hangar=debug")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().map_err(|e| e.to_string())?;
    let stderr = child.stderr.take().unwrap();
    let log = Arc::new(Mutex::new(String::new()));
    let sink = log.clone();
    let rx = super::listen::listen_address(stderr, move |line| {
        let mut log = sink.lock().unwrap();
        log.push_str(line);
        log.push('\n');
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(base) => Ok((child, base, log)),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            std::thread::sleep(Duration::from_millis(100));
            let text = log.lock().unwrap().clone();
            Err(text)
        }
    }
}
