//! The `read` tool as a real component, called through the runtime: it
//! reads inside the working directory, and every way out fails inside the
//! WASI sandbox (the host does no path checks of its own).

mod common;

use std::fs;
use std::os::unix::fs::symlink;

use hangar::runtime::{ToolInvocation, ToolOutput};

const SECRET: &str = "TOP-SECRET-OUTSIDE-THE-WORK-DIR";

struct Fixture {
    _root: tempfile::TempDir,
    work: std::path::PathBuf,
    outside: std::path::PathBuf,
}

fn fixture() -> Fixture {
    let root = tempfile::tempdir().unwrap();
    let work = root.path().join("work");
    let outside = root.path().join("outside");
    fs::create_dir_all(work.join("sub")).unwrap();
    fs::create_dir_all(&outside).unwrap();
    fs::write(work.join("hello.txt"), "first line\nsecond line\n").unwrap();
    fs::write(outside.join("secret.txt"), SECRET).unwrap();
    symlink(outside.join("secret.txt"), work.join("abs-link")).unwrap();
    symlink("../outside/secret.txt", work.join("rel-link")).unwrap();
    symlink(&outside, work.join("dir-link")).unwrap();
    Fixture { _root: root, work, outside }
}

async fn read(fx: &Fixture, file_path: &str) -> ToolOutput {
    let runtime = common::runtime();
    let input = serde_json::json!({ "filePath": file_path }).to_string();
    runtime
        .call_tool("read", ToolInvocation { id: "t1".into(), input, work_dir: Some(common::open_dir(&fx.work)) })
        .await
        .expect("the call itself runs")
}

fn assert_refused(out: &ToolOutput, what: &str) {
    assert!(out.is_error, "{what}: expected an error, got {:?}", out.text);
    assert!(!out.text.contains(SECRET), "{what}: leaked the secret: {}", out.text);
}

#[tokio::test]
async fn reads_a_file_inside_the_work_dir() {
    let fx = fixture();
    let out = read(&fx, "hello.txt").await;
    assert!(!out.is_error, "{}", out.text);
    assert!(out.text.contains("     1\tfirst line\n     2\tsecond line\n"), "{}", out.text);
    // An absolute path inside the work dir works too, and so does `..` that stays inside.
    let out = read(&fx, fx.work.join("hello.txt").to_str().unwrap()).await;
    assert!(!out.is_error && out.text.contains("first line"), "{}", out.text);
    let out = read(&fx, "sub/../hello.txt").await;
    assert!(!out.is_error && out.text.contains("first line"), "{}", out.text);
}

#[tokio::test]
async fn dot_dot_out_of_the_work_dir_is_refused_by_the_sandbox() {
    let fx = fixture();
    assert_refused(&read(&fx, "../outside/secret.txt").await, "`..`");
    assert_refused(&read(&fx, "sub/../../outside/secret.txt").await, "nested `..`");
}

#[tokio::test]
async fn absolute_path_outside_is_refused_by_the_sandbox() {
    let fx = fixture();
    let path = fx.outside.join("secret.txt");
    assert_refused(&read(&fx, path.to_str().unwrap()).await, "absolute path");
    assert_refused(&read(&fx, "/etc/passwd").await, "/etc/passwd");
}

#[tokio::test]
async fn symlinks_pointing_outside_are_refused_by_the_sandbox() {
    let fx = fixture();
    assert_refused(&read(&fx, "abs-link").await, "absolute symlink");
    assert_refused(&read(&fx, "rel-link").await, "relative symlink");
    assert_refused(&read(&fx, "dir-link/secret.txt").await, "symlinked directory");
}

#[tokio::test]
async fn without_a_work_dir_the_tool_sees_no_files() {
    let fx = fixture();
    let runtime = common::runtime();
    let path = fx.work.join("hello.txt");
    let input = serde_json::json!({ "filePath": path }).to_string();
    let out = runtime
        .call_tool("read", ToolInvocation { id: "t1".into(), input, work_dir: None })
        .await
        .unwrap();
    assert!(out.is_error && !out.text.contains("first line"), "{}", out.text);
}
