//! A third-party fuzzer against the real binary: Schemathesis reads
//! `GET /openapi.json`, sends what the document calls valid and invalid to
//! every operation, and checks every answer against the document (status,
//! content type, headers, body schema, valid data accepted, invalid data
//! refused, 405 with `Allow` for other methods, no 5xx). It must find
//! nothing.
//!
//! The server and Schemathesis run in a network namespace of their own with
//! only a loopback device: the fuzzer stores provider base URLs of its own
//! making, and nothing the server then tries to reach leaves the machine.

mod common;

use std::process::Command;

/// Examples per operation and phase; the seed makes a failure repeatable.
const MAX_EXAMPLES: &str = "40";
const SEED: &str = "11";

#[test]
fn schemathesis_finds_no_failure_on_any_operation() {
    if !common::have_command("st", "pip: schemathesis")
        || !common::have_command("unshare", "Debian: util-linux")
        || !common::have_command("ip", "Debian: iproute2")
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("work");
    std::fs::create_dir(&work).unwrap();
    std::fs::create_dir(work.join("project")).unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    // Waits for the server's address, then runs the fuzzer with the
    // repository's `schemathesis.toml`, in the temporary directory (where
    // it keeps its cache and reports).
    let script = r#"
        set -eu
        ip link set lo up
        "$HANGAR" serve --port 0 --db "$DIR/hangar.db" --cache-dir "$CACHE" --work-root "$WORK" \
            --plugins "$DIR/plugins" --config "$DIR/none.toml" 2> "$DIR/server.log" &
        server=$!
        trap 'kill $server 2>/dev/null || true' EXIT
        : > "$DIR/none.toml"
        for _ in $(seq 600); do
            base=$(grep -o 'listening on http://[0-9.:]*' "$DIR/server.log" | head -n 1 | cut -d' ' -f3 || true)
            [ -n "$base" ] && break
            sleep 0.1
        done
        [ -n "$base" ] || { cat "$DIR/server.log"; exit 2; }
        cd "$DIR"
        st --config-file "$ROOT/schemathesis.toml" run "$base/openapi.json" --checks all --exclude-checks ignored_auth,object_level_authorization \
            --max-examples "$EXAMPLES" --seed "$SEED" --no-color --generation-database none \
            --report-dir "$DIR/reports" --workers 2
    "#;
    let output = Command::new("unshare")
        .args(["--net", "--", "bash", "-c", script])
        .env("HANGAR", env!("CARGO_BIN_EXE_hangar"))
        .env("DIR", dir.path())
        .env("WORK", &work)
        .env("CACHE", common::cache_dir())
        .env("ROOT", &root)
        .env("EXAMPLES", MAX_EXAMPLES)
        .env("SEED", SEED)
        .env("XDG_CONFIG_HOME", dir.path().join("config"))
        .env("XDG_DATA_HOME", dir.path().join("data"))
        .env_remove("ANTHROPIC_API_KEY")
        .env_remove("OPENAI_API_KEY")
        .env_remove("HANGAR_TOKEN")
        .output()
        .expect("unshare runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "schemathesis found failures ({}):\n{stdout}\n{stderr}", output.status);
    // It ran every operation, not none.
    assert!(stdout.contains("No issues found") || stdout.contains("passed"), "{stdout}");
}
