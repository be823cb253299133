//! `bash`: runs a command through the host's `process` capability.
//!
//! The component itself sees no files: the host runs `bash -c` in the
//! session's working directory, confined (Landlock, a PID namespace), with
//! a reduced environment, and kills every process it started when the
//! command ends or times out.

use hangar_sdk::process::{self, Command};
use hangar_sdk::{Context, Error, JsonSchema, Tool, ToolSpec, export_tool, schemars, tool_spec_for};
use serde::Deserialize;

const DEFAULT_TIMEOUT_MS: u64 = 120_000;
const MAX_TIMEOUT_MS: u64 = 600_000;
/// Output kept, head and tail; the host cuts the middle.
const MAX_OUTPUT: u32 = 30_000;

struct Bash;

// The doc comments of the fields are the descriptions the model reads.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct Input {
    /// The command to run
    command: String,
    /// Timeout in milliseconds (default 120000, at most 600000)
    #[schemars(range(min = 1, max = MAX_TIMEOUT_MS))]
    timeout: Option<u64>,
    /// What the command does, in 5-10 words
    // For people watching; not used to run it.
    #[allow(dead_code)]
    description: Option<String>,
}

impl Tool for Bash {
    type Input = Input;

    fn spec() -> ToolSpec {
        tool_spec_for::<Input>(
            "bash",
            "Runs a command with `bash -c` in the working directory and returns its combined \
             stdout and stderr (at most 30,000 characters: the head and the tail) and its exit \
             code. Only the working directory and a private temporary directory ($TMPDIR) are \
             writable; system directories are readable. Every process the command starts, \
             including background ones, is killed when it ends or times out.",
        )
    }

    fn run(_ctx: &Context, input: Input) -> Result<String, Error> {
        if input.command.trim().is_empty() {
            return Err(Error::msg("command is empty"));
        }
        let timeout = input.timeout.unwrap_or(DEFAULT_TIMEOUT_MS);
        if timeout == 0 || timeout > MAX_TIMEOUT_MS {
            return Err(Error::msg(format!("timeout must be between 1 and {MAX_TIMEOUT_MS} milliseconds, got {timeout}")));
        }
        let outcome = process::run(&Command {
            script: input.command,
            timeout_ms: timeout as u32,
            max_output_bytes: MAX_OUTPUT,
        })?;
        let mut text = outcome.output;
        if !text.is_empty() && !text.ends_with('\n') {
            text.push('\n');
        }
        if outcome.timed_out {
            text.push_str(&format!(
                "(The command timed out after {timeout} ms and was killed, with every process it started.)"
            ));
            return Err(Error::msg(text));
        }
        match outcome.exit_code {
            Some(code) => text.push_str(&format!("(exit code {code})")),
            None => text.push_str("(killed by a signal)"),
        }
        if outcome.truncated {
            text.push_str(" (output cut: the middle was left out)");
        }
        Ok(text)
    }
}

export_tool!(Bash);
