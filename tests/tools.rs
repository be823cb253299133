//! Each built-in tool, run as a real component through the runtime: its
//! behaviour and the error messages the model reads.

mod common;

use std::fs;
use std::path::Path;
use std::time::{Duration, SystemTime};

use hangar::runtime::{Runtime, RuntimeConfig, ToolOutput};
use serde_json::json;

fn ok(out: &ToolOutput) -> &str {
    assert!(!out.is_error, "expected success, got error: {}", out.text);
    &out.text
}

fn err(out: &ToolOutput) -> &str {
    assert!(out.is_error, "expected an error, got: {}", out.text);
    &out.text
}

async fn call(rt: &Runtime, tool: &str, input: serde_json::Value, dir: &Path) -> ToolOutput {
    common::call(rt, tool, input, dir).await
}

#[tokio::test]
async fn read_numbers_lines_pages_and_refuses_binaries() {
    let rt = common::runtime();
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path();
    let lines: String = (1..=2500).map(|i| format!("line {i}\n")).collect();
    fs::write(w.join("big.txt"), &lines).unwrap();
    fs::write(w.join("long.txt"), "x".repeat(5000)).unwrap();
    fs::write(w.join("bin.dat"), [0u8, 1, 2, 3, 0, 255]).unwrap();
    fs::create_dir(w.join("sub")).unwrap();
    fs::write(w.join("sub/a.txt"), "a").unwrap();

    let started = std::time::Instant::now();
    let out = call(&rt, "read", json!({"filePath": "big.txt"}), w).await;
    eprintln!("read of a 2,500-line file: {:?}", started.elapsed());
    let text = ok(&out);
    assert!(text.starts_with("     1\tline 1\n"), "{text}");
    assert!(text.contains("  2000\tline 2000\n") && !text.contains("\tline 2001\n"), "default limit is 2000 lines");
    assert!(text.contains("Use offset=2001 to continue"), "footer says how to continue: {text}");

    let text = ok(&call(&rt, "read", json!({"filePath": "big.txt", "offset": 2499, "limit": 5}), w).await).to_string();
    assert!(text.contains("  2499\tline 2499\n  2500\tline 2500\n"), "{text}");
    assert!(text.contains("End of `big.txt`: 2500 lines"), "{text}");

    let text = ok(&call(&rt, "read", json!({"filePath": "long.txt"}), w).await).to_string();
    assert!(text.contains("[line cut at 2000 characters]") && !text.contains(&"x".repeat(2001)), "{text}");

    let huge: String = (0..2000).map(|i| format!("{i:04} {}\n", "y".repeat(100))).collect();
    fs::write(w.join("wide.txt"), huge).unwrap();
    let text = ok(&call(&rt, "read", json!({"filePath": "wide.txt"}), w).await).to_string();
    assert!(text.len() <= 51 * 1024 && text.contains("to continue"), "at most 50 KB, then a footer: {} bytes", text.len());

    assert!(err(&call(&rt, "read", json!({"filePath": "bin.dat"}), w).await).contains("binary file"));
    let text = ok(&call(&rt, "read", json!({"filePath": "."}), w).await).to_string();
    assert!(text.contains("sub/\n") && text.contains("big.txt\n"), "directory listing: {text}");
    assert!(err(&call(&rt, "read", json!({"filePath": "nope.txt"}), w).await).contains("cannot read `nope.txt`"));
    assert!(err(&call(&rt, "read", json!({"filePath": "big.txt", "offset": 9000}), w).await).contains("past the end"));
    assert!(err(&call(&rt, "read", json!({"path": "big.txt"}), w).await).contains("invalid input for `read`"));
}

#[tokio::test]
async fn write_creates_parents_overwrites_and_reports_bytes() {
    let rt = common::runtime();
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path();
    let text = ok(&call(&rt, "write", json!({"filePath": "a/b/c.txt", "content": "hello\n"}), w).await).to_string();
    assert!(text.contains("Created `a/b/c.txt`") && text.contains("6 bytes"), "{text}");
    assert_eq!(fs::read_to_string(w.join("a/b/c.txt")).unwrap(), "hello\n");
    let abs = w.join("a/b/c.txt");
    let text = ok(&call(&rt, "write", json!({"filePath": abs, "content": "é"}), w).await).to_string();
    assert!(text.contains("Overwrote") && text.contains("2 bytes"), "{text}");
    assert_eq!(fs::read_to_string(&abs).unwrap(), "é");
    assert!(err(&call(&rt, "write", json!({"filePath": "a", "content": "x"}), w).await).contains("is a directory"));
    assert!(err(&call(&rt, "write", json!({"filePath": "x"}), w).await).contains("missing field `content`"));
}

#[tokio::test]
async fn edit_replaces_exact_text_and_returns_a_diff() {
    let rt = common::runtime();
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path();
    fs::write(w.join("f.rs"), "fn a() {}\nfn b() {}\nlet x = 1;\nlet x = 1;\n").unwrap();

    let text = ok(&call(&rt, "edit", json!({"filePath": "f.rs", "oldString": "fn b() {}", "newString": "fn c() {}"}), w).await)
        .to_string();
    assert!(text.contains("--- a/f.rs") && text.contains("+++ b/f.rs"), "{text}");
    assert!(text.contains("-fn b() {}\n") && text.contains("+fn c() {}\n") && text.contains("@@"), "{text}");
    assert!(fs::read_to_string(w.join("f.rs")).unwrap().contains("fn c() {}"));

    let e = err(&call(&rt, "edit", json!({"filePath": "f.rs", "oldString": "let x = 1;", "newString": "let y = 2;"}), w).await)
        .to_string();
    assert!(e.contains("occurs 2 times") && e.contains("replaceAll"), "{e}");
    let text = ok(&call(
        &rt,
        "edit",
        json!({"filePath": "f.rs", "oldString": "let x = 1;", "newString": "let y = 2;", "replaceAll": true}),
        w,
    )
    .await)
    .to_string();
    assert!(text.contains("2 replacements"), "{text}");
    assert_eq!(fs::read_to_string(w.join("f.rs")).unwrap(), "fn a() {}\nfn c() {}\nlet y = 2;\nlet y = 2;\n");

    let e = err(&call(&rt, "edit", json!({"filePath": "f.rs", "oldString": "missing", "newString": "x"}), w).await).to_string();
    assert!(e.contains("was not found in `f.rs`"), "{e}");
    let e = err(&call(&rt, "edit", json!({"filePath": "f.rs", "oldString": "fn a", "newString": "fn a"}), w).await).to_string();
    assert!(e.contains("identical"), "{e}");
    let e = err(&call(&rt, "edit", json!({"filePath": "nope.rs", "oldString": "a", "newString": "b"}), w).await).to_string();
    assert!(e.contains("cannot read `nope.rs`"), "{e}");
}

fn touch(path: &Path, content: &str, age_secs: u64) {
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    fs::write(path, content).unwrap();
    let file = fs::File::options().write(true).open(path).unwrap();
    file.set_modified(SystemTime::now() - Duration::from_secs(age_secs)).unwrap();
}

#[tokio::test]
async fn glob_matches_newest_first_and_skips_git_and_ignored() {
    let rt = common::runtime();
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path();
    touch(&w.join("old.rs"), "", 300);
    touch(&w.join("src/new.rs"), "", 10);
    touch(&w.join("src/mid.rs"), "", 100);
    touch(&w.join("src/notes.md"), "", 10);
    touch(&w.join(".git/hooks/x.rs"), "", 0);
    touch(&w.join("target/debug/gen.rs"), "", 0);
    touch(&w.join("secret.rs"), "", 0);
    fs::write(w.join(".gitignore"), "target/\nsecret.rs\n").unwrap();

    let text = ok(&call(&rt, "glob", json!({"pattern": "**/*.rs"}), w).await).to_string();
    assert_eq!(text, "src/new.rs\nsrc/mid.rs\nold.rs\n", "newest first, no .git, no ignored");
    let text = ok(&call(&rt, "glob", json!({"pattern": "*.rs"}), w).await).to_string();
    assert_eq!(text, "src/new.rs\nsrc/mid.rs\nold.rs\n", "a pattern without / matches names anywhere");
    let text = ok(&call(&rt, "glob", json!({"pattern": "*.rs", "path": "src"}), w).await).to_string();
    assert_eq!(text, "src/new.rs\nsrc/mid.rs\n");
    let text = ok(&call(&rt, "glob", json!({"pattern": "src/*.{md,txt}"}), w).await).to_string();
    assert_eq!(text, "src/notes.md\n");
    assert!(ok(&call(&rt, "glob", json!({"pattern": "*.py"}), w).await).contains("No files match"));
    assert!(err(&call(&rt, "glob", json!({"pattern": "a[", "path": "."}), w).await).contains("invalid glob pattern"));
    assert!(err(&call(&rt, "glob", json!({"pattern": "*", "path": "nope"}), w).await).contains("cannot search `nope`"));

    for i in 0..150 {
        fs::write(w.join(format!("src/many{i}.txt")), "").unwrap();
    }
    let text = ok(&call(&rt, "glob", json!({"pattern": "**/*.txt"}), w).await).to_string();
    assert_eq!(text.lines().filter(|l| l.ends_with(".txt")).count(), 100);
    assert!(text.contains("Showing the 100 newest of 150 files"), "{text}");
}

#[tokio::test]
async fn grep_reports_path_line_text_and_skips_binary_git_and_ignored() {
    let rt = common::runtime();
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path();
    fs::create_dir_all(w.join("src")).unwrap();
    fs::write(w.join("src/a.rs"), "fn main() {\n    let needle = 1;\n}\n").unwrap();
    fs::write(w.join("src/b.txt"), "a needle here\nnothing\n").unwrap();
    fs::write(w.join("bin.dat"), b"needle\0\x01").unwrap();
    fs::create_dir_all(w.join(".git")).unwrap();
    fs::write(w.join(".git/config"), "needle").unwrap();
    fs::write(w.join("ignored.log"), "needle").unwrap();
    fs::write(w.join(".gitignore"), "*.log\n").unwrap();
    fs::write(w.join("long.txt"), format!("needle{}", "z".repeat(3000))).unwrap();

    let text = ok(&call(&rt, "grep", json!({"pattern": "needle"}), w).await).to_string();
    assert!(text.contains("src/a.rs:2:     let needle = 1;\n"), "{text}");
    assert!(text.contains("src/b.txt:1: a needle here\n"), "{text}");
    assert!(text.contains("long.txt:1: needle") && text.contains("[line cut]") && !text.contains(&"z".repeat(600)), "{text}");
    assert!(!text.contains("bin.dat") && !text.contains(".git/") && !text.contains("ignored.log"), "{text}");

    let text = ok(&call(&rt, "grep", json!({"pattern": "need(le)?", "include": "*.rs"}), w).await).to_string();
    assert_eq!(text, "src/a.rs:2:     let needle = 1;\n");
    let text = ok(&call(&rt, "grep", json!({"pattern": "^a ", "path": "src/b.txt"}), w).await).to_string();
    assert_eq!(text, "src/b.txt:1: a needle here\n");
    assert!(ok(&call(&rt, "grep", json!({"pattern": "absent"}), w).await).contains("No matches"));
    assert!(err(&call(&rt, "grep", json!({"pattern": "(unclosed"}), w).await).contains("invalid regular expression"));

    let many: String = (0..300).map(|i| format!("hit {i}\n")).collect();
    fs::write(w.join("src/many.txt"), many).unwrap();
    let text = ok(&call(&rt, "grep", json!({"pattern": "^hit", "path": "src"}), w).await).to_string();
    assert_eq!(text.lines().filter(|l| l.starts_with("src/many.txt:")).count(), 100);
    assert!(text.contains("Showing the first 100 matches"), "{text}");
}

/// grep splits a call into parts (one walk each, files dealt out in turn)
/// when the runtime allows: whatever the number of parts, the answer is the
/// one a whole call gives, down to which matches are cut and which large
/// files are counted.
#[tokio::test]
async fn grep_answers_the_same_whatever_the_number_of_parts() {
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path();
    // Each d* directory has 13 subdirectories: enough for 2 and 3 parts to
    // deal them out whole, not for 5 (FANOUT_PER_PART in hangar_walk).
    for d in 0..6 {
        for f in 0..13 {
            let sub = w.join(format!("d{d}/s{f:02}"));
            fs::create_dir_all(sub.join("z")).unwrap();
            // 4 hits in each file, over 100 in all.
            let lines: String = (0..12).map(|i| if (i + d + f) % 3 == 0 { format!("hit {d}.{f}.{i}\n") } else { "plain\n".into() }).collect();
            fs::write(sub.join(format!("f{f}.txt")), lines).unwrap();
            // Deeper than the directories dealt out.
            fs::write(sub.join("z/g.txt"), format!("hit {d}.{f} deep\n")).unwrap();
        }
    }
    // Ignore files inside a dealt subtree and above a searched path.
    fs::write(w.join("d3/s07/.gitignore"), "f7.txt\n").unwrap();
    fs::write(w.join(".gitignore"), "secret.txt\n").unwrap();
    fs::write(w.join("d1/s00/secret.txt"), "hit secret\n").unwrap();
    // Over 16 MB: counted, not searched; one before the cut, one after it.
    let big = "hit\n".repeat((16 << 20) / 4 + 1);
    fs::write(w.join("d0/a-big.txt"), &big).unwrap();
    fs::write(w.join("d5/z-big.txt"), &big).unwrap();
    drop(big);

    let mut answers = Vec::new();
    for parts in [1, 2, 3, 5] {
        let rt = Runtime::new(RuntimeConfig { cache_dir: Some(common::cache_dir()), tool_shards: Some(parts), ..Default::default() }).unwrap();
        rt.add_builtins().unwrap();
        assert_eq!(rt.tool_parts("grep").await.unwrap(), parts as u32);
        assert_eq!(rt.tool_parts("read").await.unwrap(), 1, "a tool that does not split its calls");
        let all = ok(&call(&rt, "grep", json!({"pattern": "^hit"}), w).await).to_string();
        let some = ok(&call(&rt, "grep", json!({"pattern": "^hit 3\\.", "include": "f*.txt"}), w).await).to_string();
        let none = ok(&call(&rt, "grep", json!({"pattern": "secret", "path": "d1"}), w).await).to_string();
        let deep = ok(&call(&rt, "grep", json!({"pattern": "deep$"}), w).await).to_string();
        let bad = err(&call(&rt, "grep", json!({"pattern": "(unclosed"}), w).await).to_string();
        answers.push((parts, [all, some, none, deep, bad]));
    }
    let (_, whole) = &answers[0];
    let [all, some, none, deep, bad] = whole;
    let shown: Vec<&str> = all.lines().filter(|l| l.contains(": hit ")).collect();
    assert_eq!(shown.len(), 100, "{all}");
    assert_eq!(shown[0], "d0/s00/f0.txt:1: hit 0.0.0", "{all}");
    assert_eq!(shown[4], "d0/s00/z/g.txt:1: hit 0.0 deep", "{all}");
    assert!(all.contains("Showing the first 100 matches") && all.contains("(1 files over 16 MB were not searched.)"), "{all}");
    // 13 files of 4 hits under d3, but for the ignored d3/s07/f7.txt.
    assert!(some.lines().all(|l| l.starts_with("d3/") && !l.contains("f7.txt")) && some.lines().count() == 48, "{some}");
    assert_eq!(none, "No matches for `secret` in `d1`.\n");
    let deep_hits: Vec<&str> = deep.lines().filter(|l| l.ends_with(" deep")).collect();
    assert_eq!(deep_hits.len(), 78, "{deep}");
    assert!(deep_hits.windows(2).all(|w| w[0] < w[1]), "in walk order: {deep}");
    assert!(deep.ends_with("\n(2 files over 16 MB were not searched.)\n"), "{deep}");
    assert!(bad.contains("invalid regular expression"), "{bad}");
    for (parts, answer) in &answers[1..] {
        assert_eq!(answer, whole, "{parts} parts answered otherwise than a whole call");
    }
}

/// The tools walk the tree on `wasi:filesystem` themselves; what they see
/// must be what ripgrep's walker (the `ignore` crate, run natively with the
/// settings the tools document) sees, ignore file by ignore file.
#[tokio::test]
async fn glob_and_grep_see_what_ripgreps_walker_sees() {
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path();
    let files = [
        "a.log", "keep.log", "a-from-ignore.log", "build/x.txt", "sub/build/y.txt", "rootonly.txt",
        "sub/rootonly.txt", "sub/important.log", "sub/t.tmp", "sub/deeper/t.tmp", "secret.txt",
        "excluded.txt", "sub/excluded.txt", ".hidden.txt", "plain.txt", "docs/only-dir/file.md",
        "nested/c.log", "nested/shown.txt", "nested/secret2.txt", "nested/inner/d.log", "nested/excluded.txt", "z/1.txt", "z/2.txt",
    ];
    for f in files {
        let path = w.join(f);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, "x\n").unwrap();
    }
    fs::write(w.join(".gitignore"), "*.log\n!keep.log\nbuild/\n/rootonly.txt\nonly-dir/\n").unwrap();
    fs::write(w.join("sub/.gitignore"), "*.tmp\n!important.log\n").unwrap();
    fs::write(w.join(".ignore"), "!a-from-ignore.log\nsecret*\n").unwrap();
    fs::create_dir_all(w.join(".git/info")).unwrap();
    fs::write(w.join(".git/HEAD"), "x\n").unwrap();
    fs::write(w.join(".git/info/exclude"), "excluded.txt\n").unwrap();
    // A repository inside: without `require_git` the outer rules reach in.
    fs::create_dir_all(w.join("nested/.git")).unwrap();
    fs::write(w.join("nested/.gitignore"), "inner/\n").unwrap();
    std::os::unix::fs::symlink("keep.log", w.join("link.txt")).unwrap();
    std::os::unix::fs::symlink("sub", w.join("dir-link")).unwrap();

    // Relative paths of the entries the walker yields under `root`.
    let reference = |root: &Path, regular_only: bool| -> Vec<String> {
        let mut builder = ignore::WalkBuilder::new(root);
        builder
            .hidden(false)
            .git_ignore(true)
            .git_exclude(true)
            .git_global(false)
            .require_git(false)
            .follow_links(false)
            .filter_entry(|e| e.file_name() != ".git");
        let mut seen: Vec<String> = builder
            .build()
            .map(Result::unwrap)
            .filter(|e| e.depth() > 0)
            .filter(|e| {
                let kind = e.file_type().unwrap();
                if regular_only { kind.is_file() } else { !kind.is_dir() }
            })
            .map(|e| e.path().strip_prefix(w).unwrap().to_str().unwrap().to_string())
            .collect();
        seen.sort();
        seen
    };
    let sorted = |text: &str, grep: bool| -> Vec<String> {
        let mut seen: Vec<String> =
            text.lines().filter(|l| !l.is_empty()).map(|l| if grep { l.strip_suffix(":1: x").unwrap_or(l) } else { l }.to_string()).collect();
        seen.sort();
        seen
    };
    let whole = reference(w, false);
    for must in ["keep.log", "a-from-ignore.log", "sub/important.log", "sub/rootonly.txt", "link.txt", ".gitignore"] {
        assert!(whole.contains(&must.to_string()), "the reference walk should show {must}: {whole:?}");
    }
    for parts in [1, 3] {
        let rt = Runtime::new(RuntimeConfig { cache_dir: Some(common::cache_dir()), tool_shards: Some(parts), ..Default::default() }).unwrap();
        rt.add_builtins().unwrap();
        for (sub, root) in [(".", w.to_path_buf()), ("sub", w.join("sub")), ("nested", w.join("nested"))] {
            let glob = ok(&call(&rt, "glob", json!({"pattern": "**", "path": sub}), w).await).to_string();
            assert_eq!(sorted(&glob, false), reference(&root, false), "glob in `{sub}`");
            let grep = ok(&call(&rt, "grep", json!({"pattern": "^x$", "path": sub}), w).await).to_string();
            // The ignore files hold no line `x`: grep lists every other file.
            let files: Vec<String> = reference(&root, true).into_iter().filter(|p| !p.ends_with("ignore")).collect();
            assert_eq!(sorted(&grep, true), files, "grep in `{sub}`, {parts} parts");
        }
    }
}

/// grep searches each file as one buffer and finds lines around matches:
/// line numbers, CRLF, several matches on a line, matches across lines and
/// bytes that are not UTF-8 must all come out as a line-by-line grep's.
#[tokio::test]
async fn grep_numbers_lines_like_a_line_by_line_search() {
    let rt = common::runtime();
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path();
    let mut text = String::new();
    for i in 1..=50 {
        text.push_str(if i % 10 == 0 { "x hit hit x\r\n" } else { "plain\r\n" });
    }
    text.push_str("last hit");
    fs::write(w.join("crlf.txt"), &text).unwrap();
    fs::write(w.join("latin1.txt"), b"caf\xe9 hit\nnone\n").unwrap();
    fs::write(w.join("split.txt"), "ends with foo\nbar starts\nfoo bar\n").unwrap();

    let out = ok(&call(&rt, "grep", json!({"pattern": "hit", "path": "crlf.txt"}), w).await).to_string();
    let want: String = [10, 20, 30, 40, 50].iter().map(|n| format!("crlf.txt:{n}: x hit hit x\n")).collect::<String>()
        + "crlf.txt:51: last hit\n";
    assert_eq!(out, want);

    let out = ok(&call(&rt, "grep", json!({"pattern": "hit$", "path": "latin1.txt"}), w).await).to_string();
    assert_eq!(out, "latin1.txt:1: caf\u{fffd} hit\n");

    // `\s+` could match the newline in the whole file: only a line that
    // matches on its own is reported.
    let out = ok(&call(&rt, "grep", json!({"pattern": "foo\\s+bar", "path": "split.txt"}), w).await).to_string();
    assert_eq!(out, "split.txt:3: foo bar\n");
}

#[tokio::test]
async fn bash_runs_in_the_work_dir_with_a_clean_environment() {
    let rt = common::runtime();
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path();
    let started = std::time::Instant::now();
    let text = ok(&call(&rt, "bash", json!({"command": "echo out; echo err >&2; pwd", "description": "prints"}), w).await)
        .to_string();
    eprintln!("bash `echo` call: {:?}", started.elapsed());
    assert!(text.contains("out\n") && text.contains("err\n"), "stdout and stderr combined: {text}");
    assert!(text.contains(&format!("{}\n", w.display())) && text.ends_with("(exit code 0)"), "{text}");

    let text = ok(&call(&rt, "bash", json!({"command": "exit 3"}), w).await).to_string();
    assert!(text.contains("(exit code 3)"), "{text}");

    let text = ok(&call(&rt, "bash", json!({"command": "env | cut -d= -f1 | sort | tr '\\n' ' '"}), w).await).to_string();
    for name in text.lines().next().unwrap_or_default().split_whitespace() {
        assert!(
            ["PATH", "HOME", "LANG", "TERM", "TMPDIR", "PWD", "SHLVL", "_", "OLDPWD"].contains(&name),
            "unexpected variable {name} in {text}"
        );
    }

    let text = ok(&call(&rt, "bash", json!({"command": "echo data > \"$TMPDIR/t\" && cat \"$TMPDIR/t\" && echo made > here.txt"}), w).await)
        .to_string();
    assert!(text.starts_with("data\n"), "TMPDIR is writable: {text}");
    assert_eq!(fs::read_to_string(w.join("here.txt")).unwrap(), "made\n");

    let text = ok(&call(&rt, "bash", json!({"command": "ls /usr/bin/bash && echo ok > /dev/null"}), w).await).to_string();
    assert!(text.contains("/usr/bin/bash") && text.contains("(exit code 0)"), "system dirs are readable: {text}");
}

#[tokio::test]
async fn bash_caps_output_and_times_out_with_a_readable_error() {
    let rt = common::runtime();
    let dir = tempfile::tempdir().unwrap();
    let w = dir.path();
    let text = ok(&call(&rt, "bash", json!({"command": "seq 1 200000"}), w).await).to_string();
    assert!(text.starts_with("1\n2\n3\n") && text.contains("200000\n"), "head and tail kept");
    assert!(text.contains("bytes of output omitted") && text.contains("output cut"), "{}", &text[..200]);
    assert!(text.chars().count() < 30_500, "{} characters", text.chars().count());

    let e = err(&call(&rt, "bash", json!({"command": "echo started; while :; do :; done", "timeout": 500}), w).await)
        .to_string();
    assert!(e.contains("started") && e.contains("timed out after 500 ms"), "{e}");

    let e = err(&call(&rt, "bash", json!({"command": "true", "timeout": 600_001}), w).await).to_string();
    assert!(e.contains("timeout must be between 1 and 600000"), "{e}");
    assert!(err(&call(&rt, "bash", json!({"command": "  "}), w).await).contains("command is empty"));
}

#[tokio::test]
async fn each_tool_reports_the_name_its_manifest_gives() {
    let rt = common::runtime();
    for name in ["read", "write", "edit", "glob", "grep", "bash"] {
        let spec = rt.tool_spec(name).await.unwrap();
        assert_eq!(spec.name, name);
        let schema: serde_json::Value = serde_json::from_str(&spec.input_schema).unwrap();
        assert_eq!(schema["type"], "object", "{name}");
    }
}

/// A path that leads out of the working directory is refused by the
/// sandbox (the WASI open fails in the host); the tool then says why, in
/// words the model can act on, instead of "No such file" with a WASI errno.
#[tokio::test]
async fn refusals_say_the_path_is_outside_the_working_directory() {
    let rt = common::runtime();
    let root = tempfile::tempdir().unwrap();
    let w = root.path().join("work");
    let outside = root.path().join("outside");
    fs::create_dir_all(w.join("sub")).unwrap();
    fs::create_dir_all(&outside).unwrap();
    fs::write(outside.join("secret.txt"), "secret").unwrap();
    std::os::unix::fs::symlink(outside.join("secret.txt"), w.join("abs-link")).unwrap();
    std::os::unix::fs::symlink("../outside/secret.txt", w.join("rel-link")).unwrap();
    std::os::unix::fs::symlink(&outside, w.join("dir-link")).unwrap();
    std::os::unix::fs::symlink("sub", w.join("inner-link")).unwrap();
    let secret = outside.join("secret.txt");
    let secret = secret.to_str().unwrap();

    let cases = [
        ("read", json!({"filePath": "../outside/secret.txt"}), "path `../outside/secret.txt` is outside the working directory"),
        ("read", json!({"filePath": "sub/../../outside/secret.txt"}), "path `sub/../../outside/secret.txt` is outside the working directory"),
        ("read", json!({"filePath": secret}), &format!("path `{secret}` is outside the working directory")),
        ("read", json!({"filePath": "/etc/hostname"}), "path `/etc/hostname` is outside the working directory"),
        ("read", json!({"filePath": "abs-link"}), "path `abs-link` is a symlink pointing outside the working directory"),
        ("read", json!({"filePath": "rel-link"}), "path `rel-link` is a symlink pointing outside the working directory"),
        (
            "read",
            json!({"filePath": "dir-link/secret.txt"}),
            "path `dir-link/secret.txt` goes through `dir-link`, a symlink pointing outside the working directory",
        ),
        ("read", json!({"filePath": ".."}), "path `..` is outside the working directory"),
        // write makes the parent directories first: that is what is refused.
        (
            "write",
            json!({"filePath": "../outside/new.txt", "content": "x"}),
            "cannot create the directories of `../outside/new.txt`: path `../outside` is outside the working directory",
        ),
        ("write", json!({"filePath": "abs-link", "content": "x"}), "path `abs-link` is a symlink pointing outside the working directory"),
        (
            "edit",
            json!({"filePath": "rel-link", "oldString": "secret", "newString": "x"}),
            "path `rel-link` is a symlink pointing outside the working directory",
        ),
        ("glob", json!({"pattern": "*", "path": "../outside"}), "path `../outside` is outside the working directory"),
        ("grep", json!({"pattern": "secret", "path": "dir-link"}), "path `dir-link` is a symlink pointing outside the working directory"),
    ];
    for (tool, input, expected) in cases {
        let text = err(&call(&rt, tool, input.clone(), &w).await).to_string();
        assert!(text.contains(expected), "{tool} {input}: expected `{expected}`, got `{text}`");
        assert!(!text.contains("os error"), "{tool} {input}: a WASI errno number in `{text}`");
    }
    assert_eq!(fs::read_to_string(outside.join("secret.txt")).unwrap(), "secret");
    assert!(!outside.join("new.txt").exists());

    // Inside the working directory, a missing file is just that, with the
    // error's Linux name; a symlink that stays inside is followed.
    let text = err(&call(&rt, "read", json!({"filePath": "missing.txt"}), &w).await).to_string();
    assert!(text.contains("No such file or directory (ENOENT)") && !text.contains("outside"), "{text}");
    fs::write(w.join("sub/in.txt"), "inside\n").unwrap();
    let text = ok(&call(&rt, "read", json!({"filePath": "inner-link/in.txt"}), &w).await).to_string();
    assert!(text.contains("inside"), "{text}");
}
