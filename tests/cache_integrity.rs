//! The compile cache holds native code the server runs, so it is used only
//! when no one else can have written it: a planted or altered entry is
//! refused and the right component compiled (and used: the tool answers),
//! and a directory others can write to, or a symbolic link, is not used at
//! all. See `CompileCache` in host/src/runtime/engine.rs.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hangar::runtime::{BUILTINS, Manifest, PoolSize, Runtime, RuntimeConfig, Source};
use serde_json::json;
use sha2::{Digest, Sha256};

/// A runtime on `cache` with the built-in `read` and `grep` tools alone.
fn runtime_on(cache: &Path) -> Runtime {
    let pool = PoolSize { instances: 16, ..Default::default() };
    let runtime = Runtime::new(RuntimeConfig { cache_dir: Some(cache.into()), pool, ..Default::default() }).unwrap();
    for builtin in BUILTINS.iter().filter(|b| b.name == "read" || b.name == "grep") {
        let manifest = Manifest::parse(builtin.manifest, Some(builtin.name)).unwrap();
        runtime.add(manifest, Arc::from(builtin.wasm), Source::Builtin).unwrap();
    }
    runtime
}

/// `read` is the `read` component: its spec names it, and a call reads.
async fn read_works(runtime: &Runtime, what: &str) {
    let spec = runtime.tool_spec("read").await.unwrap_or_else(|e| panic!("{what}: {e}"));
    assert_eq!(spec.name, "read", "{what}");
    let work = tempfile::tempdir().unwrap();
    fs::write(work.path().join("note.txt"), "from the right component\n").unwrap();
    let out = common::call(runtime, "read", json!({"filePath": "note.txt"}), &work.path().canonicalize().unwrap()).await;
    assert!(!out.is_error && out.text.contains("from the right component"), "{what}: {}", out.text);
}

/// Fills `cache` with entries for `read` and `grep`.
async fn populate(cache: &Path) {
    let runtime = runtime_on(cache);
    runtime.tool_spec("read").await.unwrap();
    runtime.tool_spec("grep").await.unwrap();
}

/// The entry of built-in `name` in `cache`, and its digest file.
fn entry(cache: &Path, name: &str) -> (PathBuf, PathBuf) {
    let wasm = BUILTINS.iter().find(|b| b.name == name).unwrap().wasm;
    let prefix = hex::encode(&Sha256::digest(wasm)[..16]);
    let found: Vec<PathBuf> = fs::read_dir(cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let file = p.file_name().unwrap().to_str().unwrap();
            file.starts_with(&prefix) && file.ends_with(".cwasm")
        })
        .collect();
    assert_eq!(found.len(), 1, "one entry for {name} in {}: {found:?}", cache.display());
    let digest = PathBuf::from(format!("{}.sha256", found[0].display()));
    (found[0].clone(), digest)
}

fn names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    names
}

#[tokio::test]
async fn a_planted_entry_is_refused_and_the_right_component_is_compiled_and_used() {
    type Plant = fn(&(PathBuf, PathBuf), &(PathBuf, PathBuf));
    let cases: [(&str, Plant); 4] = [
        // First: it needs no digest file, so it also runs on a cache without
        // them, where it shows the attack (`read` would run `grep`'s code).
        ("another component's entry, this entry's digest file left", |read, grep| {
            fs::copy(&grep.0, &read.0).unwrap();
        }),
        ("another component's entry and digest file, copied under this name", |read, grep| {
            fs::copy(&grep.0, &read.0).unwrap();
            fs::copy(&grep.1, &read.1).unwrap();
        }),
        ("another component's entry with a plain SHA-256 of it", |read, grep| {
            let bytes = fs::read(&grep.0).unwrap();
            fs::write(&read.0, &bytes).unwrap();
            fs::write(&read.1, hex::encode(Sha256::digest(&bytes))).unwrap();
        }),
        ("garbage with a plain SHA-256 of it", |read, _| {
            fs::write(&read.0, b"\x7fELF garbage").unwrap();
            fs::write(&read.1, hex::encode(Sha256::digest(b"\x7fELF garbage"))).unwrap();
        }),
    ];
    for (what, plant) in cases {
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path().join("cache");
        populate(&cache).await;
        let (read, grep) = (entry(&cache, "read"), entry(&cache, "grep"));
        let good = fs::read(&read.0).unwrap();
        plant(&read, &grep);
        let planted = fs::read(&read.0).unwrap();
        assert_ne!(planted, good, "{what}: planted");

        read_works(&runtime_on(&cache), what).await;
        let now = fs::read(&read.0).unwrap();
        assert_ne!(now, planted, "{what}: the planted entry is replaced");
        assert_eq!(now, good, "{what}: by `read` compiled again");
        // And the rewritten entry is used as is from now on.
        let inode = fs::metadata(&read.0).unwrap().ino();
        read_works(&runtime_on(&cache), what).await;
        assert_eq!(fs::metadata(&read.0).unwrap().ino(), inode, "{what}: a valid entry is not rewritten");
    }
}

#[tokio::test]
async fn an_entry_whose_digest_file_does_not_match_is_refused_and_rewritten() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    populate(&cache).await;
    let (entry, digest) = entry(&cache, "read");
    let recorded = fs::read_to_string(&digest).unwrap();
    assert_eq!(recorded.trim().len(), 64, "a hex SHA-256: {recorded:?}");
    // Held open, the old entry keeps its inode: a file written after it
    // was deleted cannot be given the same number.
    let old = fs::File::open(&entry).unwrap();
    let inode = old.metadata().unwrap().ino();
    fs::write(&digest, "0".repeat(64)).unwrap();

    read_works(&runtime_on(&cache), "digest file of zeros").await;
    assert_ne!(fs::metadata(&entry).unwrap().ino(), inode, "the entry was discarded and written again");
    assert_eq!(fs::read_to_string(&digest).unwrap(), recorded, "with its true digest");
}

#[tokio::test]
async fn a_cache_directory_writable_by_others_is_not_used() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("shared");
    fs::create_dir(&cache).unwrap();
    fs::set_permissions(&cache, fs::Permissions::from_mode(0o777)).unwrap();
    let runtime = runtime_on(&cache);
    read_works(&runtime, "0777 cache directory").await;
    runtime.tool_spec("grep").await.unwrap();
    assert!(names(&cache).is_empty(), "nothing written in a 0777 directory: {:?}", names(&cache));
    assert_eq!(fs::metadata(&cache).unwrap().mode() & 0o777, 0o777, "and its mode left alone");
}

#[tokio::test]
async fn a_cache_directory_that_is_a_symbolic_link_is_not_used() {
    let tmp = tempfile::tempdir().unwrap();
    let real = tmp.path().join("real");
    fs::create_dir(&real).unwrap();
    fs::set_permissions(&real, fs::Permissions::from_mode(0o700)).unwrap();
    let link = tmp.path().join("link");
    symlink(&real, &link).unwrap();
    let runtime = runtime_on(&link);
    read_works(&runtime, "symlinked cache directory").await;
    runtime.tool_spec("grep").await.unwrap();
    assert!(names(&real).is_empty(), "nothing written through the link: {:?}", names(&real));
    assert!(fs::symlink_metadata(&link).unwrap().file_type().is_symlink());
}

#[tokio::test]
async fn a_fresh_cache_directory_is_created_private() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("xdg/hangar/compiled");
    let runtime = runtime_on(&cache);
    read_works(&runtime, "fresh cache directory").await;
    runtime.tool_spec("grep").await.unwrap();
    for dir in [tmp.path().join("xdg"), tmp.path().join("xdg/hangar"), cache.clone()] {
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o700, "{}", dir.display());
    }
    for (entry, digest) in [entry(&cache, "read"), entry(&cache, "grep")] {
        assert_eq!(fs::metadata(&entry).unwrap().mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(&digest).unwrap().mode() & 0o777, 0o600);
    }
    assert_eq!(names(&cache).len(), 4, "two entries, two digest files, no temporary left: {:?}", names(&cache));
}
