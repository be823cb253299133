//! Figure 2: the `grep` tool over a generated ~200 MB tree of source-like
//! files, against `rg` and `grep -rn` on the same tree with the same
//! pattern, all in the same run (page cache warm for every side).
//!
//!     cargo bench --bench grep_tree                 # BENCH_ITERS rounds (default 5)
//!
//! The tree is generated under /tmp/hangar-bench-tree (`BENCH_TREE`) on
//! first use.

#[path = "support/stats.rs"]
mod stats;
#[path = "support/tree.rs"]
mod tree;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use hangar::runtime::{Runtime, RuntimeConfig, ToolInvocation};

fn count_matches(text: &str) -> usize {
    text.lines().filter(|l| l.contains("_found")).count()
}

fn command(program: &str, args: &[&str], dir: &Path) -> usize {
    let out = Command::new(program).args(args).current_dir(dir).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(out.status.success(), "{program} failed: {}", String::from_utf8_lossy(&out.stderr));
    count_matches(&String::from_utf8_lossy(&out.stdout))
}

fn main() {
    let (root, files, bytes) = tree::ensure();
    let root = root.canonicalize().unwrap();
    let rounds = stats::iters(5);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let cache = std::env::temp_dir().join("hangar-bench-compile-cache");
    let runtime = rt.block_on(async {
        let runtime = Runtime::new(RuntimeConfig { cache_dir: Some(cache), ..Default::default() }).unwrap();
        runtime.add_builtins().unwrap();
        runtime.tool_spec("grep").await.unwrap();
        runtime
    });
    let input = serde_json::json!({"pattern": tree::PATTERN}).to_string();
    // A run opens its working directory once.
    let dir = std::sync::Arc::new(hangar::runtime::WorkDir::open(&root).unwrap());

    let hangar_call = || {
        let call = ToolInvocation { id: "g".into(), input: input.clone(), work_dir: Some(dir.clone()) };
        let out = rt.block_on(runtime.call_tool("grep", call)).unwrap();
        assert!(!out.is_error, "{}", out.text);
        count_matches(&out.text)
    };

    let sides: Vec<(&str, Box<dyn Fn() -> usize + '_>)> = vec![
        ("rg -n (default threads)", Box::new(|| command("rg", &["-n", tree::PATTERN, "."], &root))),
        ("rg -n -j1 (one thread)", Box::new(|| command("rg", &["-n", "-j1", tree::PATTERN, "."], &root))),
        ("grep -rnE", Box::new(|| command("grep", &["-rnE", tree::PATTERN, "."], &root))),
        ("hangar runtime call_tool(\"grep\") (WASM)", Box::new(hangar_call)),
    ];

    // Warm the page cache and check every side finds the same lines.
    let found: Vec<usize> = sides.iter().map(|(_, f)| f()).collect();
    println!("grep_tree: matches per side {found:?} (expected {})", tree::NEEDLES);
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); sides.len()];
    for _ in 0..rounds {
        for (k, (_, f)) in sides.iter().enumerate() {
            let t = Instant::now();
            std::hint::black_box(f());
            samples[k].push(t.elapsed());
        }
    }
    let rg = stats::summarize(&mut samples[0].clone());
    println!(
        "\n## grep_tree ({}; {} files, {} MB; pattern `{}`; {rounds} interleaved rounds)\n",
        stats::machine(),
        files,
        bytes >> 20,
        tree::PATTERN
    );
    println!("| side | p50 ms | min ms | max ms | p50 ratio to rg |");
    println!("|---|---|---|---|---|");
    for (k, (name, _)) in sides.iter().enumerate() {
        let s = stats::summarize(&mut samples[k]);
        let max = *samples[k].last().unwrap();
        println!(
            "| {name} | {:.0} | {:.0} | {:.0} | {:.2}× |",
            stats::ms(s.p50),
            stats::ms(s.min),
            stats::ms(max),
            s.p50.as_secs_f64() / rg.p50.as_secs_f64()
        );
    }
    println!();
}
