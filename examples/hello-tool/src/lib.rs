//! `wc`: line, word and byte counts of files in the session's working
//! directory, like the Unix command of that name.

use std::fs::File;
use std::io::{BufRead, BufReader};

use hangar_sdk::{Context, Error, JsonSchema, Tool, ToolSpec, export_tool, schemars, tool_spec_for};
use serde::Deserialize;

struct Wc;

// The input schema the model reads is derived from this type (see
// `tool_spec_for` below); the doc comment is the field's description.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct Input {
    /// Files, relative to the working directory
    #[schemars(length(min = 1))]
    paths: Vec<String>,
}

impl Tool for Wc {
    type Input = Input;

    fn spec() -> ToolSpec {
        tool_spec_for::<Input>(
            "wc",
            "Counts the lines, words and bytes of one or more files in the working directory. \
             Use it to size a file up before reading it.",
        )
    }

    fn run(ctx: &Context, input: Input) -> Result<String, Error> {
        if input.paths.is_empty() {
            return Err(Error::msg("give at least one path"));
        }
        let mut out = String::new();
        let mut total = [0u64; 3];
        for path in &input.paths {
            // The sandbox, not this code, keeps the tool inside the working
            // directory: a path that leads out fails to open.
            let file = File::open(ctx.path(path)?).map_err(|e| Error::msg(format!("{path}: {e}")))?;
            let counts = count(BufReader::with_capacity(256 * 1024, file)).map_err(|e| Error::msg(format!("{path}: {e}")))?;
            out.push_str(&format!("{:>8} {:>8} {:>8} {path}\n", counts[0], counts[1], counts[2]));
            total.iter_mut().zip(counts).for_each(|(t, c)| *t += c);
        }
        if input.paths.len() > 1 {
            out.push_str(&format!("{:>8} {:>8} {:>8} total\n", total[0], total[1], total[2]));
        }
        Ok(format!("   lines    words    bytes\n{out}"))
    }
}

/// Lines, words and bytes, reading by lines of bytes so that a file that
/// is not UTF-8 still counts.
fn count(mut reader: impl BufRead) -> std::io::Result<[u64; 3]> {
    let (mut lines, mut words, mut bytes) = (0, 0, 0);
    let mut line = Vec::new();
    while reader.read_until(b'\n', &mut line)? > 0 {
        bytes += line.len() as u64;
        lines += u64::from(line.ends_with(b"\n"));
        words += line.split(|b| b.is_ascii_whitespace()).filter(|w| !w.is_empty()).count() as u64;
        line.clear();
    }
    Ok([lines, words, bytes])
}

export_tool!(Wc);
