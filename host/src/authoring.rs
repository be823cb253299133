//! `hangar plugin new|build|install`: start a plugin project anywhere, build
//! it with the right toolchain, and upload it to a running server.
//!
//! The SDK's source, the WIT and the templates are carried in the binary
//! (`host/build.rs` embeds them), so a new project builds with no path into
//! the Hangar repository.

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::{Args, Subcommand, ValueEnum};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/authoring_files.rs"));
}

/// The componentize-py release the Python template is built and tested with.
pub const COMPONENTIZE_PY: &str = "0.25.1";
/// How to install what the JavaScript template is built and tested with
/// (jco 1.35.0 fails to read a WIT directory).
pub const JCO_INSTALL: &str = "npm install -g @bytecodealliance/jco@1.34.0 @bytecodealliance/componentize-js@0.23.0";

/// What can go wrong writing, building or installing a plugin project.
#[derive(Debug, thiserror::Error)]
pub enum AuthoringError {
    #[error("`{0}` is not a plugin name: use 1-64 characters of a-z, 0-9, `_` and `-`")]
    BadName(String),
    #[error("`{}` already exists; pick another directory or name", .0.display())]
    Exists(PathBuf),
    #[error("this hangar binary carries no {lang} template for a {kind}")]
    NoTemplate { kind: &'static str, lang: &'static str },
    #[error("{}: {source}", .path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Project(String),
    #[error("`{command}` is not installed (or not on PATH): {install}")]
    Missing { command: String, install: String },
    #[error("{0}")]
    BuildFailed(String),
    #[error("cannot reach {server}: {reason}")]
    Unreachable { server: String, reason: String },
    #[error("the server refused the plugin (HTTP {status}): {message}")]
    Refused { status: u16, message: String },
}

type Result<T, E = AuthoringError> = std::result::Result<T, E>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AuthoringError + '_ {
    move |source| AuthoringError::Io { path: path.to_path_buf(), source }
}

#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Write a new plugin project: manifest, source, the WIT, and for Rust
    /// the SDK and a toolchain file. It builds anywhere, with no path into
    /// the Hangar repository.
    New(NewArgs),
    /// Build the project in DIR (default: the current directory) into
    /// `DIR/NAME.wasm`, with cargo, componentize-py or jco.
    Build(BuildArgs),
    /// Upload a built plugin to a running server (`POST /plugins`).
    Install(InstallArgs),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PluginKind {
    Tool,
    Provider,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Lang {
    Rust,
    Python,
    Js,
}

impl PluginKind {
    fn as_str(self) -> &'static str {
        match self {
            PluginKind::Tool => "tool",
            PluginKind::Provider => "provider",
        }
    }
}

impl Lang {
    fn as_str(self) -> &'static str {
        match self {
            Lang::Rust => "rust",
            Lang::Python => "python",
            Lang::Js => "js",
        }
    }
}

#[derive(Debug, Args)]
pub struct NewArgs {
    /// The plugin's name: the tool name the model calls, or the provider id.
    pub name: String,
    #[arg(long, value_enum, default_value = "tool")]
    pub kind: PluginKind,
    #[arg(long, value_enum, default_value = "rust")]
    pub lang: Lang,
    /// Where to write the project [default: ./NAME]
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The project directory [default: .]
    pub dir: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct InstallArgs {
    /// A project directory (after `hangar plugin build`), a `NAME.wasm` or a
    /// `NAME.plugin.toml`; the other file is looked for beside it.
    pub path: PathBuf,
    /// The server's base URL.
    #[arg(long, default_value = "http://127.0.0.1:2323")]
    pub server: String,
    /// API token, when the server requires one.
    #[arg(long, env = "HANGAR_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// Runs one `hangar plugin` subcommand, printing what it did.
pub fn run(command: PluginCommand) -> Result<()> {
    match command {
        PluginCommand::New(args) => {
            let dir = args.dir.clone().unwrap_or_else(|| PathBuf::from(&args.name));
            new_project(&args.name, args.kind, args.lang, &dir)?;
            println!("wrote a {} {} project in {}", args.lang.as_str(), args.kind.as_str(), dir.display());
            println!("next: hangar plugin build {0} && hangar plugin install {0} --server URL", dir.display());
            Ok(())
        }
        PluginCommand::Build(args) => {
            let dir = args.dir.unwrap_or_else(|| PathBuf::from("."));
            let wasm = build(&dir)?;
            println!("built {}", wasm.display());
            Ok(())
        }
        PluginCommand::Install(args) => {
            let body = install(&args.path, &args.server, args.token.as_deref())?;
            for warning in body["warnings"].as_array().into_iter().flatten() {
                eprintln!("warning: {}", warning.as_str().unwrap_or_default());
            }
            println!("{}", serde_json::to_string_pretty(&body).unwrap_or_default());
            Ok(())
        }
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Writes a new project for `name` in `dir`, which must not exist yet.
pub fn new_project(name: &str, kind: PluginKind, lang: Lang, dir: &Path) -> Result<()> {
    if !valid_name(name) {
        return Err(AuthoringError::BadName(name.into()));
    }
    if dir.exists() {
        return Err(AuthoringError::Exists(dir.to_path_buf()));
    }
    let template = format!("{}-{}/", lang.as_str(), kind.as_str());
    let files: Vec<_> = embedded::TEMPLATE_FILES.iter().filter(|(path, _)| path.starts_with(&template)).collect();
    if files.is_empty() {
        return Err(AuthoringError::NoTemplate { kind: kind.as_str(), lang: lang.as_str() });
    }
    let mut out: Vec<(String, String)> = files
        .iter()
        .map(|(path, text)| {
            let rel = path[template.len()..].replace("NAME", name);
            let rel = if rel == "gitignore" { ".gitignore".to_string() } else { rel };
            (rel, text.replace("{{name}}", name))
        })
        .collect();
    // Rust builds against the vendored SDK, whose bindings read `../wit`;
    // Python and JavaScript build against a world of their own in `wit/`,
    // with Hangar's package as a dependency.
    let wit_dir = if lang == Lang::Rust { "wit" } else { "wit/deps/hangar-plugin" };
    out.extend(embedded::WIT_FILES.iter().map(|(path, text)| (format!("{wit_dir}/{path}"), text.to_string())));
    if lang == Lang::Rust {
        out.extend(embedded::SDK_FILES.iter().map(|(path, text)| (format!("hangar-sdk/{path}"), text.to_string())));
        out.push(("rust-toolchain.toml".into(), embedded::TOOLCHAIN.to_string()));
    }
    for (rel, text) in out {
        let path = dir.join(&rel);
        let parent = path.parent().expect("a file in the project");
        std::fs::create_dir_all(parent).map_err(io(parent))?;
        std::fs::write(&path, text).map_err(io(&path))?;
    }
    Ok(())
}

/// The project's manifest: the one `*.plugin.toml` in `dir`, and its name.
fn manifest_in(dir: &Path) -> Result<(PathBuf, String)> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let entry = entry.map_err(io(dir))?;
        let file = entry.file_name().to_string_lossy().into_owned();
        if let Some(name) = file.strip_suffix(".plugin.toml") {
            found.push((entry.path(), name.to_string()));
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(AuthoringError::Project(format!(
            "{} has no NAME.plugin.toml; is it a plugin project (`hangar plugin new`)?",
            dir.display()
        ))),
        _ => Err(AuthoringError::Project(format!("{} has more than one NAME.plugin.toml", dir.display()))),
    }
}

/// Whether `command --version` runs; what to install when it does not.
fn require(command: &str, install: &str) -> Result<()> {
    match Command::new(command).arg("--version").output() {
        Ok(_) => Ok(()),
        Err(_) => Err(AuthoringError::Missing { command: command.into(), install: install.into() }),
    }
}

fn run_step(mut cmd: Command, what: &str, hint: &str) -> Result<()> {
    let status = cmd.status().map_err(|e| AuthoringError::BuildFailed(format!("cannot run {what}: {e}")))?;
    if status.success() {
        Ok(())
    } else {
        Err(AuthoringError::BuildFailed(format!("{what} failed ({status}){hint}")))
    }
}

/// Builds the project in `dir` into `dir/NAME.wasm` and returns that path.
pub fn build(dir: &Path) -> Result<PathBuf> {
    let (_, name) = manifest_in(dir)?;
    let out = dir.join(format!("{name}.wasm"));
    if dir.join("Cargo.toml").exists() {
        build_rust(dir, &out)?;
    } else if dir.join("app.py").exists() {
        require("componentize-py", &format!("pip install componentize-py=={COMPONENTIZE_PY}"))?;
        let mut cmd = Command::new("componentize-py");
        cmd.current_dir(dir)
            .args(["-d", "wit", "-w", "local:plugin/granted", "componentize", "app", "-o"])
            .arg(format!("{name}.wasm"));
        run_step(cmd, "componentize-py", &format!("; this template is tested with componentize-py {COMPONENTIZE_PY}"))?;
    } else if dir.join("app.js").exists() {
        require("jco", &format!("{JCO_INSTALL} (Node.js 18 or later)"))?;
        let dir = dir.canonicalize().map_err(io(dir))?;
        let mut cmd = Command::new("jco");
        // wasi:http is left out: Hangar links none, and a tool reaches the
        // network through `hangar:plugin/http` when granted.
        cmd.current_dir(&dir)
            .arg("componentize")
            .arg(dir.join("app.js"))
            .arg("--wit")
            .arg(dir.join("wit"))
            .args(["--world-name", "local:plugin/granted", "--disable", "http", "fetch-event", "-o"])
            .arg(dir.join(format!("{name}.wasm")));
        run_step(cmd, "jco componentize", &format!("; it needs both packages: {JCO_INSTALL}"))?;
    } else {
        return Err(AuthoringError::Project(format!(
            "{} has none of Cargo.toml, app.py or app.js: which language is it?",
            dir.display()
        )));
    }
    Ok(out)
}

fn build_rust(dir: &Path, out: &Path) -> Result<()> {
    require("cargo", "install Rust with rustup; the project's rust-toolchain.toml then picks the version and the wasm32-wasip2 target")?;
    // rustup adds a toolchain file's targets only when it installs the
    // toolchain itself: say so before cargo fails on a missing `core`.
    let libdir = Command::new("rustc")
        .current_dir(dir)
        .args(["--print", "target-libdir", "--target", "wasm32-wasip2"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    if !libdir.is_some_and(|d| d.exists()) {
        return Err(AuthoringError::Missing {
            command: "the wasm32-wasip2 target".into(),
            install: "rustup target add wasm32-wasip2".into(),
        });
    }
    let cargo_toml = dir.join("Cargo.toml");
    let text = std::fs::read_to_string(&cargo_toml).map_err(io(&cargo_toml))?;
    let package = text
        .parse::<toml::Table>()
        .ok()
        .and_then(|t| t.get("package")?.get("name")?.as_str().map(str::to_string))
        .ok_or_else(|| AuthoringError::Project(format!("{} names no package", cargo_toml.display())))?;
    let target_dir = std::env::var_os("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|| dir.join("target"));
    let mut cmd = Command::new("cargo");
    cmd.current_dir(dir).args(["build", "--release", "--target", "wasm32-wasip2", "--target-dir"]).arg(&target_dir);
    run_step(cmd, "cargo build", "")?;
    let built = target_dir.join("wasm32-wasip2/release").join(format!("{}.wasm", package.replace('-', "_")));
    std::fs::copy(&built, out).map_err(io(&built))?;
    Ok(())
}

/// The manifest and component `path` names: a directory holding both, or
/// either file with the other beside it.
fn plugin_files(path: &Path) -> Result<(PathBuf, PathBuf)> {
    let (manifest, name) = if path.is_dir() {
        manifest_in(path)?
    } else {
        let file = path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_default();
        let name = file
            .strip_suffix(".plugin.toml")
            .or_else(|| file.strip_suffix(".wasm"))
            .ok_or_else(|| AuthoringError::Project(format!("{} is neither NAME.wasm nor NAME.plugin.toml", path.display())))?;
        (path.with_file_name(format!("{name}.plugin.toml")), name.to_string())
    };
    let wasm = manifest.with_file_name(format!("{name}.wasm"));
    if !manifest.exists() {
        return Err(AuthoringError::Project(format!("{} is missing", manifest.display())));
    }
    if !wasm.exists() {
        return Err(AuthoringError::Project(format!(
            "{} is missing: build it first with `hangar plugin build {}`",
            wasm.display(),
            manifest.parent().map(|p| p.display().to_string()).unwrap_or_default()
        )));
    }
    Ok((manifest, wasm))
}

/// Uploads the plugin at `path` to `server` and returns the server's answer
/// (the plugin, with any `warnings`).
pub fn install(path: &Path, server: &str, token: Option<&str>) -> Result<serde_json::Value> {
    let (manifest_path, wasm_path) = plugin_files(path)?;
    let manifest = std::fs::read_to_string(&manifest_path).map_err(io(&manifest_path))?;
    let wasm = std::fs::read(&wasm_path).map_err(io(&wasm_path))?;
    let url = format!("{}/plugins", server.trim_end_matches('/'));
    let unreachable = |e: reqwest::Error| AuthoringError::Unreachable { server: server.to_string(), reason: e.to_string() };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| AuthoringError::Unreachable { server: server.into(), reason: e.to_string() })?;
    runtime.block_on(async {
        let form = reqwest::multipart::Form::new()
            .part("manifest", reqwest::multipart::Part::text(manifest).file_name("plugin.toml"))
            .part("wasm", reqwest::multipart::Part::bytes(wasm).file_name("plugin.wasm"));
        let mut request = reqwest::Client::new().post(&url).multipart(form);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status();
        let text = response.text().await.map_err(unreachable)?;
        let body: serde_json::Value = serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text));
        if status.is_success() {
            Ok(body)
        } else {
            let message = body["error"]
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| body.to_string());
            Err(AuthoringError::Refused { status: status.as_u16(), message })
        }
    })
}
