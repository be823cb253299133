//! Figure 2: the `grep` tool over a generated ~200 MB tree of source-like
//! files, against `rg` and `grep -rn` on the same tree with the same
//! pattern, all in the same run (page cache warm for every side).
//!
//!     cargo bench --bench grep_tree                 # BENCH_ITERS rounds (default 5)
//!     BENCH_TOOL_SHARDS=1 cargo bench --bench grep_tree   # the tool in one part
//!
//! The tree is generated under /tmp/hangar-bench-tree (`BENCH_TREE`) on
//! first use.

#[path = "support/stats.rs"]
mod stats;
#[path = "support/tree.rs"]
mod tree;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use hangar::runtime::{Runtime, RuntimeConfig, ToolInvocation};

/// One matched line: path under the tree, line number, text.
type Hit = (String, usize, String);

/// The matched lines of `path:line:text` output (`rg -n`, `grep -rn`), or
/// with `sep = ": "` of the grep tool's `path:line: text`. Other lines (the
/// tool's notes) are skipped.
fn hits(output: &str, sep: &str) -> BTreeSet<Hit> {
    output
        .lines()
        .filter_map(|line| {
            let (path, rest) = line.split_once(':')?;
            let (number, text) = rest.split_once(sep)?;
            let number = number.parse().ok()?;
            Some((path.strip_prefix("./").unwrap_or(path).to_string(), number, text.to_string()))
        })
        .collect()
}

fn command(program: &str, args: &[&str], dir: &Path) -> String {
    let out = Command::new(program).args(args).current_dir(dir).output().unwrap_or_else(|e| panic!("{program}: {e}"));
    assert!(out.status.success(), "{program} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Panics unless the Hangar side found exactly the native side's lines.
fn check_same(native_name: &str, native: &BTreeSet<Hit>, hangar: &BTreeSet<Hit>) {
    if native == hangar {
        return;
    }
    let only_native: Vec<&Hit> = native.difference(hangar).take(5).collect();
    let only_hangar: Vec<&Hit> = hangar.difference(native).take(5).collect();
    panic!(
        "grep_tree: the grep tool and `{native_name}` disagree ({} against {} matched lines); \
         only in `{native_name}` (first 5): {only_native:?}; only in the grep tool (first 5): {only_hangar:?}",
        hangar.len(),
        native.len()
    );
}

fn main() {
    let (root, files, bytes) = tree::ensure();
    let root = root.canonicalize().unwrap();
    let rounds = stats::iters(5);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    // A private compile cache for this run (a shared, predictable path
    // under /tmp is one anyone on the machine could fill first).
    let cache = tempfile::tempdir().unwrap();
    let runtime = rt.block_on(async {
        // `BENCH_TOOL_SHARDS` pins the number of parts a call is split
        // into (default: one per CPU, as the server does).
        let tool_shards = std::env::var("BENCH_TOOL_SHARDS").ok().map(|v| v.parse().expect("BENCH_TOOL_SHARDS: a number"));
        let runtime =
            Runtime::new(RuntimeConfig { cache_dir: Some(cache.path().into()), tool_shards, ..Default::default() })
                .unwrap();
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
        out.text
    };

    const HANGAR: &str = "hangar runtime call_tool(\"grep\") (WASM)";
    let sides: Vec<(&str, Box<dyn Fn() -> String + '_>)> = vec![
        ("rg -n (default threads)", Box::new(|| command("rg", &["-n", tree::PATTERN, "."], &root))),
        ("rg -n -j1 (one thread)", Box::new(|| command("rg", &["-n", "-j1", tree::PATTERN, "."], &root))),
        ("grep -rnE", Box::new(|| command("grep", &["-rnE", tree::PATTERN, "."], &root))),
        (HANGAR, Box::new(hangar_call)),
    ];

    // Warm the page cache, and check the Hangar side finds the very lines
    // every native side finds before timing anything.
    let found: Vec<BTreeSet<Hit>> =
        sides.iter().map(|(name, f)| hits(&f(), if *name == HANGAR { ": " } else { ":" })).collect();
    println!(
        "grep_tree: matches per side {:?} (expected {})",
        found.iter().map(BTreeSet::len).collect::<Vec<_>>(),
        tree::NEEDLES
    );
    let hangar = found.last().unwrap();
    for ((name, _), native) in sides.iter().zip(&found).filter(|((name, _), _)| *name != HANGAR) {
        check_same(name, native, hangar);
    }
    assert_eq!(hangar.len(), tree::NEEDLES, "grep_tree: every side agrees, on the wrong number of lines");
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
