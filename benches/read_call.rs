//! Figure 1: one `read` tool call on a 1 KB file through Hangar's full
//! runtime (fresh store from an `InstancePre`, WASI preopen, deadline,
//! limits), against the same read as a native Rust function and as a
//! subprocess speaking JSON over stdio (this very binary, re-executed as a
//! helper: once as a long-lived process like an MCP stdio server, and once
//! spawned per call). All sides are interleaved in the same run.
//!
//!     cargo bench --bench read_call                       # percentiles, then criterion
//!     BENCH_ITERS=5000 cargo bench --bench read_call -- --percentiles-only

#[path = "support/stats.rs"]
mod stats;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use criterion::Criterion;
use hangar::runtime::{Runtime, RuntimeConfig, ToolInvocation};

const HELPER_ENV: &str = "HANGAR_BENCH_READ_HELPER";

/// The read tool's work, natively: line-numbered text of the file.
fn native_read(work_dir: &Path, file_path: &str) -> String {
    let path = work_dir.join(file_path);
    let mut bytes = Vec::new();
    std::fs::File::open(&path).and_then(|mut f| f.read_to_end(&mut bytes)).expect("read");
    assert!(!bytes[..bytes.len().min(8192)].contains(&0), "binary");
    let text = String::from_utf8_lossy(&bytes);
    let mut out = String::with_capacity(bytes.len() + 512);
    let mut n = 0;
    for (i, line) in text.lines().enumerate() {
        out.push_str(&format!("{:>6}\t{line}\n", i + 1));
        n = i + 1;
    }
    out.push_str(&format!("\n(End of `{file_path}`: {n} lines.)"));
    out
}

/// The file's text as a `read` output shows it: the text after each
/// `N<TAB>` line number, one line each; panics if the numbers skip.
fn shown_content(output: &str) -> String {
    let mut content = String::new();
    let mut next = 1;
    for line in output.lines() {
        let Some((number, text)) = line.split_once('\t') else { continue };
        let Ok(number) = number.trim_start().parse::<usize>() else { continue };
        assert_eq!(number, next, "read_call: line numbers out of order in {output:?}");
        next += 1;
        content.push_str(text);
        content.push('\n');
    }
    content
}

/// The helper: one JSON request per line on stdin, one JSON reply per line.
fn helper_main() {
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout().lock();
    for line in stdin.lock().lines() {
        let line = line.unwrap();
        let req: serde_json::Value = serde_json::from_str(&line).unwrap();
        let dir = PathBuf::from(req["work_dir"].as_str().unwrap());
        let text = native_read(&dir, req["input"]["filePath"].as_str().unwrap());
        serde_json::to_writer(&mut stdout, &serde_json::json!({"id": req["id"], "text": text, "is_error": false})).unwrap();
        stdout.write_all(b"\n").unwrap();
        stdout.flush().unwrap();
    }
}

struct Helper {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    line: String,
}

impl Helper {
    fn spawn() -> Helper {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env(HELPER_ENV, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Helper { child, stdin, stdout, line: String::new() }
    }

    fn call(&mut self, request: &str) -> usize {
        self.stdin.write_all(request.as_bytes()).unwrap();
        self.stdin.write_all(b"\n").unwrap();
        self.stdin.flush().unwrap();
        self.line.clear();
        self.stdout.read_line(&mut self.line).unwrap();
        let reply: serde_json::Value = serde_json::from_str(&self.line).unwrap();
        reply["text"].as_str().unwrap().len()
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    /// This run's own compile cache, removed at the end.
    _cache: tempfile::TempDir,
    work: PathBuf,
    /// `work`, opened as a run opens it.
    dir: std::sync::Arc<hangar::runtime::WorkDir>,
    input: String,
    request: String,
    rt: tokio::runtime::Runtime,
    runtime: Runtime,
    helper: Helper,
}

impl Fixture {
    fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path().canonicalize().unwrap();
        // 1 KB of source-like text: 24 lines.
        let mut text = String::new();
        for i in 0..24 {
            text.push_str(&format!("    let value_{i:02} = compute(input, {i:03}); // step {i:02}\n"));
        }
        text.truncate(1024 - 1);
        text.push('\n');
        assert_eq!(text.len(), 1024);
        std::fs::write(work.join("file.txt"), &text).unwrap();
        let input = serde_json::json!({"filePath": "file.txt"}).to_string();
        let request =
            serde_json::json!({"id": "call-1", "input": {"filePath": "file.txt"}, "work_dir": work}).to_string();

        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        // A private compile cache for this run (a shared, predictable path
        // under /tmp is one anyone on the machine could fill first).
        let cache = tempfile::tempdir().unwrap();
        let runtime = rt.block_on(async {
            let runtime =
                Runtime::new(RuntimeConfig { cache_dir: Some(cache.path().into()), ..Default::default() }).unwrap();
            runtime.add_builtins().unwrap();
            runtime.tool_spec("read").await.unwrap();
            runtime
        });
        // A run opens its working directory once.
        let open = std::sync::Arc::new(hangar::runtime::WorkDir::open(&work.canonicalize().unwrap()).unwrap());
        let fixture = Fixture { _dir: dir, _cache: cache, work, dir: open, input, request, rt, runtime, helper: Helper::spawn() };
        fixture.check_same_content(&text);
        fixture
    }

    /// Panics unless the Hangar side shows the file's content exactly as
    /// the native side does, before anything is timed.
    fn check_same_content(&self, file: &str) {
        let native_text = native_read(&self.work, "file.txt");
        let native = shown_content(&native_text);
        assert_eq!(native, file, "read_call: the native side does not show the file's content");
        let hangar_text = self.runtime_text();
        let hangar = shown_content(&hangar_text);
        if hangar != native {
            panic!(
                "read_call: the read tool (WASM) and the native read show different content of file.txt\n\
                 --- native:\n{native_text}\n--- hangar runtime call_tool(\"read\"):\n{hangar_text}"
            );
        }
    }

    fn runtime_text(&self) -> String {
        let call = ToolInvocation { id: "call-1".into(), input: self.input.clone(), work_dir: Some(self.dir.clone()) };
        let out = self.rt.block_on(self.runtime.call_tool("read", call)).unwrap();
        assert!(!out.is_error, "{}", out.text);
        out.text
    }

    fn runtime_call(&self) -> usize {
        self.runtime_text().len()
    }

    fn native_call(&self) -> usize {
        native_read(&self.work, "file.txt").len()
    }

    fn helper_call(&mut self) -> usize {
        self.helper.call(&self.request)
    }

    fn spawn_call(&self) -> usize {
        let mut helper = Helper::spawn();
        helper.call(&self.request)
    }
}

type Side = (&'static str, fn(&mut Fixture) -> usize);

const SIDES: &[Side] = &[
    ("native Rust function", |f| f.native_call()),
    ("subprocess, JSON over stdio (long-lived)", |f| f.helper_call()),
    ("subprocess, JSON over stdio (spawn per call)", |f| f.spawn_call()),
    ("hangar runtime call_tool (WASM)", |f| f.runtime_call()),
];

fn percentiles(fixture: &mut Fixture) {
    let n = stats::iters(2000);
    // `BENCH_ONLY=hangar` runs one side alone, e.g. under `perf record`.
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let sides: Vec<&Side> = SIDES.iter().filter(|(name, _)| name.contains(only.as_str())).collect();

    // Warm up every side, and check they agree on the output size.
    let sizes: Vec<usize> = sides.iter().map(|(_, f)| f(fixture)).collect();
    println!("read_call: output bytes per side {sizes:?}");
    for _ in 0..50 {
        for (_, f) in &sides {
            f(fixture);
        }
    }
    let mut samples: Vec<Vec<Duration>> = vec![Vec::with_capacity(n); sides.len()];
    for i in 0..n {
        for (k, (name, f)) in sides.iter().enumerate() {
            // Spawning a process per call is slow: sample it 1 in 10 rounds.
            if name.contains("spawn per call") && i % 10 != 0 {
                continue;
            }
            let t = Instant::now();
            std::hint::black_box(f(fixture));
            samples[k].push(t.elapsed());
        }
    }
    // Ratios are to the first side run (native, unless BENCH_ONLY says otherwise).
    let native = stats::summarize(&mut samples[0].clone());
    println!("\n## read_call ({}; {n} interleaved rounds)\n", stats::machine());
    println!("| side | n | p50 µs | p99 µs | mean µs | p50 overhead vs native µs | p50 ratio to native |");
    println!("|---|---|---|---|---|---|---|");
    for (k, (name, _)) in sides.iter().enumerate() {
        let s = stats::summarize(&mut samples[k]);
        println!(
            "| {name} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1}× |",
            s.n,
            stats::us(s.p50),
            stats::us(s.p99),
            stats::us(s.mean),
            stats::us(s.p50) - stats::us(native.p50),
            s.p50.as_secs_f64() / native.p50.as_secs_f64()
        );
    }
    println!();
}

fn main() {
    if std::env::var_os(HELPER_ENV).is_some() {
        return helper_main();
    }
    let percentiles_only = std::env::args().any(|a| a == "--percentiles-only");
    let mut fixture = Fixture::new();
    percentiles(&mut fixture);
    if percentiles_only {
        return;
    }
    let mut c = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    let mut group = c.benchmark_group("read_1kb");
    for (name, f) in SIDES {
        if name.contains("spawn per call") {
            continue;
        }
        group.bench_function(*name, |b| b.iter(|| f(&mut fixture)));
    }
    group.finish();
    c.final_summary();
}
