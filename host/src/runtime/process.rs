//! The `process` capability: `bash -c` in the session's working directory,
//! with a reduced environment, a timeout and an output cap. The host owns
//! the process group and kills all of it when the call ends, times out or
//! is cancelled.

use std::collections::VecDeque;
use std::io::Read;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use super::bindings::wit_process::{Command, Host, Outcome};
use super::state::PluginState;

const MAX_TIMEOUT: Duration = Duration::from_secs(600);
const MAX_OUTPUT: usize = 1 << 20;
/// How long to wait for output after the command ended, in case a process
/// that left the group still holds the pipe open.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// What a call granted `process` may run in.
pub struct ProcessAccess {
    pub work_dir: Option<PathBuf>,
}

impl Host for PluginState {
    async fn run(&mut self, cmd: Command) -> wasmtime::Result<Result<Outcome, String>> {
        let Some(access) = &self.process else {
            return Ok(Err(format!("plugin `{}` is not granted process", self.plugin)));
        };
        let Some(work_dir) = access.work_dir.clone() else {
            return Ok(Err("this session has no working directory".into()));
        };
        Ok(run(work_dir, cmd).await.map_err(|err| format!("cannot run the command: {err}")))
    }
}

/// Kills the whole process group when dropped: on completion, on timeout,
/// and when the calling future is cancelled.
struct KillGroup(i32);

impl Drop for KillGroup {
    fn drop(&mut self) {
        // SAFETY: plain syscall; the group id is the pid of our own child.
        unsafe {
            libc::killpg(self.0, libc::SIGKILL);
        }
    }
}

async fn run(work_dir: PathBuf, cmd: Command) -> std::io::Result<Outcome> {
    let timeout = Duration::from_millis(cmd.timeout_ms.max(1).into()).min(MAX_TIMEOUT);
    let cap = (cmd.max_output_bytes as usize).clamp(256, MAX_OUTPUT);
    let (reader, writer) = std::io::pipe()?;

    let mut command = tokio::process::Command::new("bash");
    command
        .arg("-c")
        .arg(&cmd.script)
        .current_dir(&work_dir)
        // Nothing of the server's environment (keys above all) reaches the command.
        .env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", &work_dir)
        .env("LANG", "C.UTF-8")
        .env("TERM", "dumb")
        .stdin(Stdio::null())
        .stdout(writer.try_clone()?)
        .stderr(writer)
        .process_group(0)
        .kill_on_drop(true);
    let mut child = command.spawn()?;
    // The command keeps copies of the pipe's write end: drop them, or the
    // reader never sees the end of the output.
    drop(command);
    let group = KillGroup(child.id().map(|id| id as i32).unwrap_or(-1));
    let mut reading = tokio::task::spawn_blocking(move || read_capped(reader, cap));

    let (exit_code, timed_out) = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => (status?.code(), false),
        Err(_) => (None, true),
    };
    drop(group);
    let (output, truncated) = match tokio::time::timeout(DRAIN_GRACE, &mut reading).await {
        Ok(Ok(result)) => result,
        _ => {
            reading.abort();
            ("(output unavailable: a process that left the command's group still holds it)".into(), false)
        }
    };
    Ok(Outcome { output, exit_code, timed_out, truncated })
}

/// Reads everything, keeping the first and the last `cap / 2` bytes.
fn read_capped(mut reader: impl Read, cap: usize) -> (String, bool) {
    let half = cap / 2;
    let mut head = Vec::with_capacity(half.min(64 * 1024));
    let mut tail: VecDeque<u8> = VecDeque::new();
    let mut total = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        total += n;
        let mut chunk = &buf[..n];
        if head.len() < half {
            let take = (half - head.len()).min(chunk.len());
            head.extend_from_slice(&chunk[..take]);
            chunk = &chunk[take..];
        }
        tail.extend(chunk);
        while tail.len() > half {
            tail.pop_front();
        }
    }
    let kept = head.len() + tail.len();
    let mut out = String::from_utf8_lossy(&head).into_owned();
    if total > kept {
        out.push_str(&format!("\n… [{} bytes of output omitted] …\n", total - kept));
    }
    out.push_str(&String::from_utf8_lossy(tail.make_contiguous()));
    (out, total > kept)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_keeps_head_and_tail() {
        let data: Vec<u8> = (0..10_000u32).flat_map(|i| format!("{i}\n").into_bytes()).collect();
        let (out, truncated) = read_capped(&data[..], 1000);
        assert!(truncated);
        assert!(out.starts_with("0\n1\n2\n"));
        assert!(out.trim_end().ends_with("9999"));
        assert!(out.contains("bytes of output omitted"));
        let (out, truncated) = read_capped(&b"short"[..], 1000);
        assert_eq!((out.as_str(), truncated), ("short", false));
    }
}
