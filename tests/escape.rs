//! The escape corpus (`escape_corpus.tsv`, one attempt per row) run through
//! the real components: no planted secret in any result, nothing outside the
//! working directory changed, no process left behind. Then the limits, and a
//! test per capability that it is refused when not granted.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use hangar::runtime::policy::PluginPolicy;
use hangar::runtime::{
    BUILTINS, FsAccess, Manifest, Policy, Runtime, RuntimeConfig, RuntimeError, Source, ToolInvocation,
};
use serde_json::json;

const SECRET: &str = "TOP-SECRET-OUTSIDE-THE-WORK-DIR";
/// Every process a corpus row tries to leave behind has this in its command line.
const PROCESS_MARKER: &str = "sleep 42424";

struct Fixture {
    root: tempfile::TempDir,
    work: PathBuf,
    outside: PathBuf,
    home_secret: PathBuf,
    /// Places outside every fixture directory a row may try to create.
    planted: Vec<PathBuf>,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.home_secret);
        for p in &self.planted {
            let _ = fs::remove_file(p);
        }
    }
}

fn home() -> PathBuf {
    std::env::home_dir().unwrap_or_else(|| PathBuf::from("/root"))
}

fn fixture() -> Fixture {
    let root = tempfile::tempdir().unwrap();
    let work = root.path().join("work");
    let outside = root.path().join("outside");
    fs::create_dir_all(work.join("sub")).unwrap();
    fs::create_dir_all(&outside).unwrap();
    fs::write(work.join("hello.txt"), "hello\n").unwrap();
    fs::write(outside.join("secret.txt"), SECRET).unwrap();
    symlink(outside.join("secret.txt"), work.join("abs-link")).unwrap();
    symlink("../outside/secret.txt", work.join("rel-link")).unwrap();
    symlink(&outside, work.join("dir-link")).unwrap();
    let home_secret = home().join(format!(".hangar-escape-secret-{}", std::process::id()));
    fs::write(&home_secret, SECRET).unwrap();
    let planted = vec![PathBuf::from("/tmp/hangar-escape-planted"), home().join(".hangar-planted")];
    for p in &planted {
        let _ = fs::remove_file(p);
    }
    Fixture { root, work, outside, home_secret, planted }
}

/// Everything outside `work/` that a row could change: the fixture's other
/// files (names, contents, symlink targets), the home secret, and whether
/// the planted paths exist.
fn snapshot(fx: &Fixture) -> BTreeMap<String, String> {
    fn walk(dir: &Path, skip: &Path, out: &mut BTreeMap<String, String>) {
        let mut entries: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        entries.sort();
        for path in entries {
            if path == skip {
                continue;
            }
            let meta = fs::symlink_metadata(&path).unwrap();
            let value = if meta.is_symlink() {
                format!("link {}", fs::read_link(&path).unwrap().display())
            } else if meta.is_dir() {
                walk(&path, skip, out);
                "dir".into()
            } else {
                format!("file {:?}", fs::read(&path).unwrap())
            };
            out.insert(path.display().to_string(), value);
        }
    }
    let mut out = BTreeMap::new();
    walk(fx.root.path(), &fx.work, &mut out);
    out.insert("home secret".into(), fs::read_to_string(&fx.home_secret).unwrap_or_else(|e| e.to_string()));
    for p in &fx.planted {
        out.insert(p.display().to_string(), p.exists().to_string());
    }
    out
}

/// Processes whose command line holds the marker, anywhere on the machine.
fn leftover_processes() -> Vec<String> {
    let mut found = Vec::new();
    for entry in fs::read_dir("/proc").unwrap().flatten() {
        if !entry.file_name().to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(cmdline) = fs::read(entry.path().join("cmdline")) else { continue };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(PROCESS_MARKER) {
            found.push(format!("{}: {cmdline}", entry.file_name().to_string_lossy()));
        }
    }
    found
}

struct Row {
    line: usize,
    tool: String,
    input: String,
    expect_error: bool,
    note: String,
}

fn corpus() -> Vec<Row> {
    let text = include_str!("escape_corpus.tsv");
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|(i, l)| {
            let cols: Vec<&str> = l.split('\t').collect();
            assert_eq!(cols.len(), 4, "escape_corpus.tsv line {}: want 4 tab-separated columns", i + 1);
            assert!(["error", "any"].contains(&cols[2]), "line {}: expect is `error` or `any`", i + 1);
            Row {
                line: i + 1,
                tool: cols[0].into(),
                input: cols[1].into(),
                expect_error: cols[2] == "error",
                note: cols[3].into(),
            }
        })
        .collect()
}

#[tokio::test]
async fn the_escape_corpus_leaks_nothing_changes_nothing_and_leaves_no_process() {
    let rt = common::runtime();
    let fx = fixture();
    let before = snapshot(&fx);
    // A variable of this test process: if a command could read the host's
    // environment, `NAME=value` would show up in its output.
    let host_env = std::env::vars()
        .find(|(k, _)| k == "CARGO_MANIFEST_DIR" || k == "PATH")
        .map(|(k, v)| format!("{k}={v}"))
        .unwrap();
    let rows = corpus();
    assert!(rows.len() >= 40, "the corpus has {} rows", rows.len());
    let mut failures = Vec::new();
    for row in rows {
        let input = row
            .input
            .replace("{WORK}", fx.work.to_str().unwrap())
            .replace("{OUTSIDE}", fx.outside.to_str().unwrap())
            .replace("{ROOT}", fx.root.path().to_str().unwrap())
            .replace("{HOME_SECRET}", fx.home_secret.to_str().unwrap())
            .replace("{HOST_PID}", &std::process::id().to_string());
        let value: serde_json::Value =
            serde_json::from_str(&input).unwrap_or_else(|e| panic!("line {}: bad JSON {input}: {e}", row.line));
        let what = format!("line {} ({} {}): {}", row.line, row.tool, row.note, input);
        let out = common::call(&rt, &row.tool, value, &fx.work).await;
        if std::env::var_os("HANGAR_ESCAPE_VERBOSE").is_some() {
            eprintln!("{what}\n  -> is_error={} {}", out.is_error, out.text.replace('\n', "\n     "));
        }
        if out.text.contains(SECRET) {
            failures.push(format!("{what}: LEAKED the secret: {}", out.text));
        }
        if out.text.contains(&host_env) {
            failures.push(format!("{what}: LEAKED the host environment"));
        }
        if row.expect_error && !out.is_error {
            failures.push(format!("{what}: expected an error, got {}", out.text));
        }
        let after = snapshot(&fx);
        if after != before {
            let changed: Vec<_> = after.iter().filter(|(k, v)| before.get(*k) != Some(*v)).map(|(k, _)| k).collect();
            failures.push(format!("{what}: CHANGED outside the work dir: {changed:?}"));
        }
        let left = leftover_processes();
        if !left.is_empty() {
            failures.push(format!("{what}: LEFT processes behind: {left:?}"));
            for p in left {
                let pid: i32 = p.split(':').next().unwrap().parse().unwrap();
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    // The host survived every row, signals included.
    let out = common::call(&rt, "bash", json!({"command": "echo alive"}), &fx.work).await;
    assert!(out.text.starts_with("alive\n"), "{}", out.text);
    assert!(failures.is_empty(), "{} escape(s):\n{}", failures.len(), failures.join("\n"));
}

#[tokio::test]
async fn a_path_with_dot_dot_that_stays_inside_works() {
    let rt = common::runtime();
    let fx = fixture();
    let out = common::call(&rt, "read", json!({"filePath": "sub/../hello.txt"}), &fx.work).await;
    assert!(!out.is_error && out.text.contains("hello"), "{}", out.text);
    let out = common::call(&rt, "write", json!({"filePath": "sub/../sub/new.txt", "content": "x"}), &fx.work).await;
    assert!(!out.is_error, "{}", out.text);
    assert!(fx.work.join("sub/new.txt").exists());
}

#[tokio::test]
async fn runaway_commands_end_within_their_timeout_with_a_readable_error() {
    let rt = common::runtime();
    let fx = fixture();
    for command in [
        "while :; do :; done",
        "yes",
        "cat /dev/zero",
        "for i in 1 2 3 4; do (while :; do echo flood; done) & done; wait",
    ] {
        let out = common::call(&rt, "bash", json!({"command": command, "timeout": 1000}), &fx.work).await;
        assert!(out.is_error, "{command}: {}", &out.text[..out.text.len().min(300)]);
        assert!(out.text.contains("timed out after 1000 ms and was killed"), "{command}: {}", &out.text[out.text.len().saturating_sub(300)..]);
        assert!(out.text.len() < 40_000, "{command}: output is capped, got {} bytes", out.text.len());
    }
    // A fork bomb put in the background dies with the command's PID namespace.
    let out = common::call(&rt, "bash", json!({"command": ":(){ :|:& };:", "timeout": 1000}), &fx.work).await;
    assert!(out.text.contains("exit code") || out.text.contains("timed out"), "{}", out.text);
    let out = common::call(&rt, "bash", json!({"command": "echo still fine"}), &fx.work).await;
    assert!(out.text.starts_with("still fine\n"), "the host carries on: {}", out.text);
}

fn builtin(name: &str) -> &'static hangar::runtime::Builtin {
    BUILTINS.iter().find(|b| b.name == name).unwrap()
}

fn manifest(name: &str, caps: &str) -> Manifest {
    Manifest::parse(&format!("kind = \"tool\"\nname = \"{name}\"\nversion = \"0.1.0\"\n[capabilities]\n{caps}\n"), Some(name)).unwrap()
}

fn bare_runtime(policy: Policy) -> Runtime {
    Runtime::new(RuntimeConfig { cache_dir: Some(common::cache_dir()), policy, ..Default::default() }).unwrap()
}

#[tokio::test]
async fn third_party_plugins_are_refused_every_capability_the_policy_does_not_grant() {
    let rt = bare_runtime(Policy::default());
    for (name, capability) in
        [("read", "filesystem"), ("glob", "filesystem"), ("grep", "filesystem"), ("write", "filesystem"), ("edit", "filesystem"), ("bash", "process")]
    {
        let b = builtin(name);
        let m = Manifest::parse(b.manifest, Some(name)).unwrap();
        match rt.add(m, Arc::from(b.wasm), Source::Api) {
            Err(RuntimeError::CapabilityDenied { plugin, capability: denied, .. }) => {
                assert_eq!((plugin.as_str(), denied.as_str()), (name, capability));
            }
            Err(other) => panic!("{name}: wrong error {other}"),
            Ok(_) => panic!("{name}: a third-party plugin got `{capability}` from the default policy"),
        }
    }
}

#[tokio::test]
async fn a_component_importing_process_without_asking_is_refused_at_load() {
    let rt = bare_runtime(Policy::default());
    rt.add(manifest("bash", ""), Arc::from(builtin("bash").wasm), Source::Api).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let call = ToolInvocation { id: "1".into(), input: json!({"command": "echo hi"}).to_string(), work_dir: Some(common::open_dir(dir.path())) };
    match rt.call_tool("bash", call).await {
        Err(RuntimeError::CapabilityDenied { plugin, capability, reason }) => {
            assert_eq!((plugin.as_str(), capability.as_str()), ("bash", "process"));
            assert!(reason.contains("manifest does not ask"), "{reason}");
        }
        Err(other) => panic!("wrong error {other}"),
        Ok(out) => panic!("ran without the grant: {}", out.text),
    }
}

/// `http` imported for its functions needs the grant. Every SDK provider
/// imports it for its types too (`provider-stream` names its request and
/// error), and one that sends nothing itself (`examples/echo-provider`,
/// `tests/fixtures/slowinfo`) loads with an empty instance of it.
#[tokio::test]
async fn a_provider_importing_http_without_asking_is_refused_at_load() {
    let rt = bare_runtime(Policy::default());
    let manifest = Manifest::parse("kind = \"provider\"\nname = \"anthropic\"\nversion = \"0.1.0\"\n", Some("anthropic")).unwrap();
    rt.add(manifest, Arc::from(builtin("anthropic").wasm), Source::Api).unwrap();
    match rt.provider_info("anthropic").await {
        Err(RuntimeError::CapabilityDenied { plugin, capability, reason }) => {
            assert_eq!((plugin.as_str(), capability.as_str()), ("anthropic", "http"));
            assert!(reason.contains("manifest does not ask"), "{reason}");
        }
        Err(other) => panic!("wrong error {other}"),
        Ok(info) => panic!("loaded without the grant: {info:?}"),
    }
}

#[tokio::test]
async fn a_tool_without_filesystem_sees_no_files_and_a_read_grant_cannot_write() {
    let mut policy = Policy::default();
    policy.plugins.insert("write".into(), PluginPolicy { filesystem: FsAccess::Read, ..Default::default() });
    let rt = bare_runtime(policy);
    rt.add(manifest("read", ""), Arc::from(builtin("read").wasm), Source::Api).unwrap();
    rt.add(manifest("write", "filesystem = \"read\""), Arc::from(builtin("write").wasm), Source::Api).unwrap();
    let fx = fixture();
    let out = common::call(&rt, "read", json!({"filePath": "hello.txt"}), &fx.work).await;
    assert!(out.is_error && !out.text.contains("hello\n"), "no filesystem grant, no file: {}", out.text);
    // The tool is told why, rather than "No such file".
    assert!(
        out.text.contains("this plugin has no filesystem access (add `filesystem = \"read\"` to its manifest and the operator's policy)"),
        "{}",
        out.text
    );
    let out = common::call(&rt, "write", json!({"filePath": "new.txt", "content": "x"}), &fx.work).await;
    assert!(out.is_error, "a read-only grant cannot create files: {}", out.text);
    assert!(!fx.work.join("new.txt").exists());
}

#[tokio::test]
async fn a_command_holds_no_capability_and_cannot_touch_the_host_or_make_devices() {
    let rt = common::runtime();
    let fx = fixture();
    let hostname = fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    // capsh asks the kernel (capget, prctl): /proc is out of the sandbox's reach.
    let script = "capsh --print | grep -E '^(Current|Bounding set|Ambient set|Securebits)'
hostname pwned-host 2>/dev/null; echo hostname=$?
ip link add hangar0 type dummy 2>/dev/null; echo iplink=$?
ip link set lo mtu 1300 2>/dev/null; echo mtu=$?
mknod kmsg c 1 11 2>/dev/null; echo mknod=$?
mkfifo fifo 2>/dev/null; echo mkfifo=$?
mkfifo \"$TMPDIR/fifo\"; echo tmpfifo=$?";
    let out = common::call(&rt, "bash", json!({"command": script}), &fx.work).await;
    let text = out.text;
    assert!(text.contains("Current: =\n"), "no capability in effect: {text}");
    assert!(text.contains("Bounding set =\n"), "the bounding set is empty: {text}");
    assert!(text.contains("Ambient set =\n"), "{text}");
    assert!(text.contains("no-new-privs=1"), "{text}");
    for refused in ["hostname", "iplink", "mtu", "mknod", "mkfifo"] {
        assert!(text.contains(&format!("{refused}=")) && !text.contains(&format!("{refused}=0")), "{refused} was allowed: {text}");
    }
    assert!(text.contains("tmpfifo=0"), "its private TMPDIR may hold a FIFO: {text}");
    assert_eq!(fs::read_to_string("/proc/sys/kernel/hostname").unwrap(), hostname);
    assert!(!fx.work.join("kmsg").exists() && !fx.work.join("fifo").exists());
}

#[tokio::test]
async fn a_command_running_as_root_reads_only_the_parts_of_etc_programs_need() {
    let rt = common::runtime();
    let fx = fixture();
    let script = "for f in /etc/shadow /etc/gshadow /etc/sudoers /etc/ssh/sshd_config /etc/hostname /etc/machine-id; do
  if [ -e \"$f\" ]; then cat \"$f\" > /dev/null 2>&1; echo \"$f=$?\"; fi
done
ls /etc > /dev/null 2>&1; echo list=$?
head -c 5 /etc/passwd; echo
getent passwd root | cut -d: -f1
echo tls=$(ls /etc/ssl/certs | head -1 | wc -l)
id -un";
    let out = common::call(&rt, "bash", json!({"command": script}), &fx.work).await;
    let text = out.text;
    if hangar::runtime::policy::confinement().landlock_abi == 0 {
        eprintln!("SKIPPED: no Landlock on this kernel");
        return;
    }
    assert!(text.contains("/etc/shadow=1"), "shadow is unreadable, even to root: {text}");
    for line in text.lines().filter(|l| l.starts_with("/etc/")) {
        assert!(!line.ends_with("=0"), "read outside the list: {line} in {text}");
    }
    assert!(text.contains("list=2"), "/etc cannot be listed: {text}");
    assert!(text.contains("root:"), "passwd is readable: {text}");
    assert!(text.contains("\nroot\n"), "users resolve by name: {text}");
    assert!(text.contains("tls=1"), "TLS roots are readable: {text}");
}

/// A runtime whose commands get `limits`.
fn runtime_with_command_limits(limits: hangar::runtime::cgroup::CommandLimits) -> Runtime {
    let rt = bare_runtime(Policy { commands: limits, ..Default::default() });
    rt.add_builtins().unwrap();
    rt
}

#[tokio::test]
async fn commands_are_held_to_their_memory_process_and_file_size_limits() {
    let limits = hangar::runtime::cgroup::CommandLimits {
        memory_bytes: 64 << 20,
        max_processes: 32,
        cpu_seconds: None,
        file_size_bytes: 1 << 20,
        ..Default::default()
    };
    let rt = runtime_with_command_limits(limits);
    let fx = fixture();
    let controllers = hangar::runtime::cgroup::controllers();

    // 2 GB asked for: stopped at the memory limit, and the host carries on.
    let hog = "python3 -c 'b = bytearray(2 * 1024 ** 3); print(len(b))'";
    let out = common::call(&rt, "bash", json!({"command": hog}), &fx.work).await;
    assert!(!out.text.contains("2147483648"), "the allocation succeeded: {}", out.text);
    if controllers.memory.is_some() {
        assert!(out.text.contains("killed: memory limit 64 MB"), "{}", out.text);
    }

    // A file over the size limit is cut off and the result says so.
    let big = "head -c 3000000 /dev/zero > big.bin";
    let out = common::call(&rt, "bash", json!({"command": big}), &fx.work).await;
    assert!(out.text.contains("file size limit 1 MB"), "{}", out.text);
    assert!(fs::metadata(fx.work.join("big.bin")).unwrap().len() <= 1 << 20);

    // A fork bomb meets the process limit and ends with its call.
    if controllers.pids.is_some() {
        let bomb = "bomb() { bomb | bomb & }; bomb; sleep 2; echo survived";
        let out = common::call(&rt, "bash", json!({"command": bomb, "timeout": 8000}), &fx.work).await;
        assert!(out.text.contains("process limit 32 reached"), "{}", out.text);
    } else {
        eprintln!("SKIPPED: fork bomb check: no pids cgroup on this host");
    }
    // The host is fine: a normal command still runs.
    let out = common::call(&rt, "bash", json!({"command": "echo still-here"}), &fx.work).await;
    assert!(out.text.contains("still-here"), "{}", out.text);
}

#[tokio::test]
async fn without_network_a_command_reaches_only_the_ports_the_operator_allows() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let other_port = other.local_addr().unwrap().port();
    let connect = |p: u16| {
        format!("python3 -c \"import socket; socket.create_connection(('127.0.0.1', {p}), 2); print('connected-{p}')\" 2>&1 | tail -1")
    };
    let fx = fixture();
    let none = hangar::runtime::cgroup::CommandLimits { network: false, ..Default::default() };
    let rt = runtime_with_command_limits(none);
    let out = common::call(&rt, "bash", json!({"command": connect(port)}), &fx.work).await;
    assert!(!out.text.contains(&format!("connected-{port}")), "no network means no connection: {}", out.text);

    let listed = hangar::runtime::cgroup::CommandLimits { network: false, allowed_ports: vec![port], ..Default::default() };
    let rt = runtime_with_command_limits(listed);
    if hangar::runtime::policy::confinement().landlock_abi < 4 {
        eprintln!("SKIPPED: allowed ports need Landlock TCP rules (ABI 4)");
        return;
    }
    let script = format!("{}; {}", connect(port), connect(other_port));
    let out = common::call(&rt, "bash", json!({"command": script}), &fx.work).await;
    assert!(out.text.contains(&format!("connected-{port}")), "an allowed port is reachable: {}", out.text);
    assert!(!out.text.contains(&format!("connected-{other_port}")), "{}", out.text);

    let all = runtime_with_command_limits(Default::default());
    let out = common::call(&all, "bash", json!({"command": connect(other_port)}), &fx.work).await;
    assert!(out.text.contains(&format!("connected-{other_port}")), "`all` keeps loopback services reachable: {}", out.text);

    // The operator's per-plugin setting wins over `[process]`.
    let overrides = hangar::runtime::policy::CommandOverrides { network: Some(false), ..Default::default() };
    let plugins = [("bash".to_string(), PluginPolicy { commands: overrides, ..Default::default() })].into_iter().collect();
    let rt = bare_runtime(Policy { plugins, ..Default::default() });
    rt.add_builtins().unwrap();
    let out = common::call(&rt, "bash", json!({"command": connect(other_port)}), &fx.work).await;
    assert!(!out.text.contains(&format!("connected-{other_port}")), "[plugins.bash.commands] network = false: {}", out.text);
    drop((listener, other));
}

#[tokio::test]
async fn a_command_runs_as_the_owner_of_its_working_directory_not_as_root() {
    // SAFETY: plain syscall.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: the server is not root, so commands already run as its user");
        return;
    }
    let rt = common::runtime();
    let fx = fixture();
    std::os::unix::fs::chown(&fx.work, Some(4242), Some(4243)).unwrap();
    fs::write(fx.work.join("root-only.txt"), "ROOT-ONLY").unwrap();
    fs::set_permissions(fx.work.join("root-only.txt"), std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let script = "id -u; id -g; touch made.txt; echo hi > \"$TMPDIR/t\" && echo tmp-ok; cat root-only.txt 2>&1 | head -1";
    let out = common::call(&rt, "bash", json!({"command": script}), &fx.work).await;
    let lines: Vec<&str> = out.text.lines().collect();
    assert_eq!(&lines[..3], ["4242", "4243", "tmp-ok"], "{}", out.text);
    assert!(!out.text.contains("ROOT-ONLY"), "{}", out.text);
    use std::os::unix::fs::MetadataExt;
    assert_eq!(fs::metadata(fx.work.join("made.txt")).unwrap().uid(), 4242);
    // The WASM file tools still work on what the command made.
    let read = common::call(&rt, "write", json!({"filePath": "made.txt", "content": "by the tool"}), &fx.work).await;
    assert!(!read.is_error, "{}", read.text);
}
