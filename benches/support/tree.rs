//! A deterministic tree of source-like files for the grep figure: about
//! 200 MB of Rust-looking text in nested directories, with a known number
//! of needle lines. Generated once under /tmp (or `BENCH_TREE`), never
//! committed; a marker beside it records the generator version.
#![allow(dead_code)]

use std::fmt::Write as _;
use std::path::PathBuf;

const VERSION: &str = "tree-v1 seed=0x5eed files=12000";
pub const PATTERN: &str = r"needle_[0-9]+_found";
pub const NEEDLES: usize = 60;

pub fn root() -> PathBuf {
    std::env::var_os("BENCH_TREE").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/tmp/hangar-bench-tree"))
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const WORDS: &[&str] = &[
    "let", "mut", "fn", "self", "value", "result", "config", "buffer", "index", "count", "state", "handle", "request",
    "response", "error", "Option", "Result", "Vec", "String", "match", "return", "impl", "pub", "struct", "where",
    "async", "await", "iter", "map", "collect", "unwrap", "clone", "into", "from", "len", "push", "insert", "get",
    "parse", "write", "read", "session", "agent", "tool", "stream", "event", "token", "limit", "offset", "path",
];

/// Generates the tree if it is missing or from another generator version;
/// returns (root, files, bytes).
pub fn ensure() -> (PathBuf, usize, u64) {
    let root = root();
    let marker = root.with_extension("done");
    if std::fs::read_to_string(&marker).is_ok_and(|m| m.starts_with(VERSION)) {
        let text = std::fs::read_to_string(&marker).unwrap();
        let mut parts = text.split_whitespace().rev();
        let bytes = parts.next().unwrap().parse().unwrap();
        let files = parts.next().unwrap().parse().unwrap();
        return (root, files, bytes);
    }
    let _ = std::fs::remove_dir_all(&root);
    let started = std::time::Instant::now();
    let mut rng = Rng(0x5eed);
    let files = 12_000usize;
    // Which files get a needle line.
    let mut needle_files: Vec<usize> = (0..NEEDLES).map(|_| rng.below(files as u64) as usize).collect();
    needle_files.sort();
    let mut bytes = 0u64;
    let mut text = String::with_capacity(64 << 10);
    for f in 0..files {
        let dir = root.join(format!("crate_{:02}/src/mod_{:02}", f % 40, (f / 40) % 25));
        std::fs::create_dir_all(&dir).unwrap();
        text.clear();
        // 4 KB to 30 KB per file, ~17 KB on average.
        let target = 4096 + rng.below(26 * 1024) as usize;
        let mut line_no = 0;
        while text.len() < target {
            line_no += 1;
            let indent = (rng.below(4) * 4) as usize;
            text.extend(std::iter::repeat_n(' ', indent));
            let words = 3 + rng.below(10);
            for w in 0..words {
                if w > 0 {
                    text.push(if rng.below(5) == 0 { '.' } else { ' ' });
                }
                text.push_str(WORDS[rng.below(WORDS.len() as u64) as usize]);
                if rng.below(7) == 0 {
                    let _ = write!(text, "_{}", rng.below(1000));
                }
            }
            text.push_str(if rng.below(3) == 0 { "(); // note\n" } else { ";\n" });
            if line_no == 7 {
                for _ in needle_files.iter().filter(|&&n| n == f) {
                    let _ = writeln!(text, "    let marker = \"needle_{f}_found\";");
                }
            }
        }
        std::fs::write(dir.join(format!("file_{f:05}.rs")), &text).unwrap();
        bytes += text.len() as u64;
    }
    std::fs::write(&marker, format!("{VERSION} {files} {bytes}\n")).unwrap();
    eprintln!("generated {} ({files} files, {} MB) in {:.1}s", root.display(), bytes >> 20, started.elapsed().as_secs_f64());
    (root, files, bytes)
}
