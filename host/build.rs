//! Builds the built-in plugins for wasm32-wasip2 and embeds them, each with
//! its code precompiled for the server's engine.
//!
//! The plugins live in their own workspace (`plugins/`) and are built into
//! their own target directory, so this nested cargo never waits on the
//! outer build's lock. Each kind is built in its own cargo invocation: the
//! SDK's `tool` and `provider` features must not be unified.
//!
//! Each component is then compiled with wasmtime here, with the engine
//! settings the server uses (`code_config()`, the same file the server
//! includes), and the artifact embedded next to it: a first start needs no
//! Cranelift for the built-ins. The artifact is for this machine's CPU; a
//! server on a CPU without its features compiles the component instead
//! (wasmtime refuses the artifact). wasmtime is a build-dependency with the
//! same version and features as the server's, and the workspace resolves
//! features with resolver 1 and builds every dependency with one profile
//! (Cargo.toml), so cargo builds wasmtime once for both.

use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const KINDS: [(&str, &str); 2] = [("tools", "tool"), ("providers", "provider")];

include!("src/runtime/code_config.rs");

fn main() {
    let host_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR").unwrap());
    let root = host_dir.parent().unwrap().to_path_buf();
    let plugins = root.join("plugins");
    for dir in ["plugins", "sdk", "wit", "host/templates", "rust-toolchain.toml"] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    println!("cargo:rerun-if-changed={}", host_dir.join("src/runtime/code_config.rs").display());
    embed_authoring_files(&root);
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");

    let target_dir = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .map(|p| if p.is_absolute() { p } else { root.join(p) })
        .unwrap_or_else(|| root.join("target"))
        .join("plugins");

    ensure_wasm_target();
    let out_dir = PathBuf::from(env::var("OUT_DIR").unwrap());
    let precompiler = Precompiler::new();
    let mut entries = String::from("&[\n");
    for (dir, kind) in KINDS {
        let members = members(&plugins.join(dir));
        if members.is_empty() {
            continue;
        }
        build(&plugins, &target_dir, &members);
        for (name, package) in &members {
            let wasm = target_dir
                .join("wasm32-wasip2/release")
                .join(format!("{}.wasm", package.replace('-', "_")));
            let manifest = plugins.join(dir).join(name).join(format!("{name}.plugin.toml"));
            assert!(manifest.exists(), "missing manifest {}", manifest.display());
            let precompiled = match precompiler.compile(&wasm, &out_dir.join(format!("{name}.cwasm"))) {
                Some(path) => format!("Some(&PageAligned(*include_bytes!({:?})).0)", path.display().to_string()),
                None => "None".to_string(),
            };
            writeln!(
                entries,
                "    Builtin {{ name: {name:?}, kind: {kind:?}, manifest: include_str!({:?}), wasm: include_bytes!({:?}), precompiled: {precompiled} }},",
                manifest.display().to_string(),
                wasm.display().to_string(),
            )
            .unwrap();
        }
    }
    entries.push(']');
    fs::write(out_dir.join("builtin_plugins.rs"), entries).unwrap();
}

/// Compiles components with the server's engine settings, for this
/// machine; or, when cross-compiling, not at all (the server then compiles
/// the built-ins when it starts).
struct Precompiler {
    engine: Option<wasmtime::Engine>,
}

impl Precompiler {
    fn new() -> Precompiler {
        let (host, target) = (env::var("HOST").unwrap(), env::var("TARGET").unwrap());
        if host != target {
            println!("cargo:warning=not precompiling the built-in plugins for {target} on {host}: the server will compile them when it starts");
            return Precompiler { engine: None };
        }
        let engine = wasmtime::Engine::new(&code_config()).expect("a wasmtime engine with the server's settings");
        Precompiler { engine: Some(engine) }
    }

    /// Compiles the component at `wasm` into `out`; `Some(out)` when done.
    fn compile(&self, wasm: &Path, out: &Path) -> Option<PathBuf> {
        let engine = self.engine.as_ref()?;
        let bytes = fs::read(wasm).unwrap_or_else(|e| panic!("read {}: {e}", wasm.display()));
        let artifact = engine
            .precompile_component(&bytes)
            .unwrap_or_else(|e| panic!("precompiling {}: {e:#}", wasm.display()));
        fs::write(out, &artifact).unwrap();
        Some(out.to_path_buf())
    }
}

/// What `hangar plugin new` writes, carried in the binary so a new project
/// needs no path into this repository: the SDK's source, the WIT, the
/// toolchain file and the templates (`host/templates/LANG-KIND/`).
fn embed_authoring_files(root: &Path) {
    let mut out = String::new();
    for (name, dir, skip) in [
        ("SDK_FILES", root.join("sdk"), &["target", "Cargo.lock"][..]),
        ("WIT_FILES", root.join("wit"), &[][..]),
        ("TEMPLATE_FILES", root.join("host/templates"), &["README.md"][..]),
    ] {
        let mut files = Vec::new();
        collect(&dir, &dir, skip, &mut files);
        files.sort();
        writeln!(out, "pub static {name}: &[(&str, &str)] = &[").unwrap();
        for (rel, path) in files {
            writeln!(out, "    ({rel:?}, include_str!({:?})),", path.display().to_string()).unwrap();
        }
        writeln!(out, "];").unwrap();
    }
    writeln!(out, "pub static TOOLCHAIN: &str = include_str!({:?});", root.join("rust-toolchain.toml").display().to_string()).unwrap();
    fs::write(PathBuf::from(env::var("OUT_DIR").unwrap()).join("authoring_files.rs"), out).unwrap();
}

/// Every file under `dir` (relative path with `/`, full path), leaving out
/// the top-level entries named in `skip`.
fn collect(base: &Path, dir: &Path, skip: &[&str], out: &mut Vec<(String, PathBuf)>) {
    for entry in fs::read_dir(dir).unwrap().filter_map(|e| e.ok()) {
        let path = entry.path();
        let rel = path.strip_prefix(base).unwrap().to_string_lossy().replace('\\', "/");
        if dir == base && skip.contains(&rel.as_str()) {
            continue;
        }
        if path.is_dir() {
            collect(base, &path, skip, out);
        } else {
            out.push((rel, path));
        }
    }
}

/// A fresh machine may have the pinned toolchain without the wasm target
/// (rustup adds the toolchain file's targets only when it installs the
/// toolchain itself): add it, so one `cargo build` is all a newcomer runs.
fn ensure_wasm_target() {
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(&rustc).args(["--print", "sysroot"]).output().ok().filter(|o| o.status.success());
    let Some(sysroot) = sysroot.map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()) else { return };
    if Path::new(&sysroot).join("lib/rustlib/wasm32-wasip2").exists() {
        return;
    }
    println!("cargo:warning=installing the wasm32-wasip2 target with rustup (needed for the built-in plugins)");
    let status = Command::new("rustup").args(["target", "add", "wasm32-wasip2"]).status();
    if !matches!(status, Ok(s) if s.success()) {
        println!("cargo:warning=`rustup target add wasm32-wasip2` failed; install the target by hand");
    }
}

/// `(directory name, package name)` of each plugin crate under `dir`.
fn members(dir: &Path) -> Vec<(String, String)> {
    let Ok(read) = fs::read_dir(dir) else { return Vec::new() };
    let mut out: Vec<(String, String)> = read
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("Cargo.toml").exists())
        .map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let toml = fs::read_to_string(e.path().join("Cargo.toml")).unwrap();
            let package = toml
                .lines()
                .find_map(|l| l.trim().strip_prefix("name = ").map(|v| v.trim_matches('"').to_string()))
                .expect("plugin Cargo.toml has a package name");
            (name, package)
        })
        .collect();
    out.sort();
    out
}

fn build(plugins: &Path, target_dir: &Path, members: &[(String, String)]) {
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(plugins)
        .args(["build", "--release", "--locked", "--target", "wasm32-wasip2", "--target-dir"])
        .arg(target_dir);
    for (_, package) in members {
        cmd.args(["-p", package]);
    }
    // Flags meant for the host build must not leak into the wasm build.
    for var in ["CARGO_ENCODED_RUSTFLAGS", "RUSTFLAGS", "CARGO_BUILD_TARGET", "CARGO_TARGET_DIR", "CARGO_BUILD_RUSTFLAGS"] {
        cmd.env_remove(var);
    }
    for (key, _) in env::vars_os() {
        let key = key.to_string_lossy();
        if key.starts_with("CARGO_PROFILE_") || key.starts_with("CARGO_CFG_") || key.starts_with("CARGO_FEATURE_") {
            cmd.env_remove(key.as_ref());
        }
    }
    let status = cmd.status().expect("run cargo for the built-in plugins");
    assert!(
        status.success(),
        "building the built-in plugins failed (is the wasm32-wasip2 target installed? `rustup target add wasm32-wasip2`)"
    );
}
