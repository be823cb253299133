//! `read`: a file, line-numbered, or a directory's entries.

use std::fs;
use std::io::{BufRead, BufReader, Read};

use hangar_sdk::{Context, Error, JsonSchema, Tool, ToolSpec, export_tool, schemars, tool_spec_for};
use serde::Deserialize;

const DEFAULT_LIMIT: usize = 2000;
const MAX_LINE_CHARS: usize = 2000;
const MAX_BYTES: usize = 50 * 1024;
/// WASI reads cost a host round trip each: read in large chunks.
const CHUNK: usize = 256 * 1024;
/// How much of the start of a file is looked at for a NUL byte.
const BINARY_PROBE: usize = 8192;

struct Read_;

// The doc comments of the fields are the descriptions the model reads.
#[derive(Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Input {
    /// Path of the file, relative to the working directory or absolute inside it
    file_path: String,
    /// First line to return (1-based, default 1)
    #[schemars(range(min = 1))]
    offset: Option<usize>,
    /// Number of lines to return (default 2000)
    #[schemars(range(min = 1))]
    limit: Option<usize>,
}

impl Tool for Read_ {
    type Input = Input;

    fn spec() -> ToolSpec {
        tool_spec_for::<Input>(
            "read",
            "Reads a file from the working directory and returns its lines numbered from 1. \
             By default up to 2000 lines from the start; use `offset` (the first line to show, \
             1-based) and `limit` to page through large files. Lines longer than 2000 \
             characters are cut. Reading a directory lists its entries. Binary files are refused.",
        )
    }

    fn run(ctx: &Context, input: Input) -> Result<String, Error> {
        let path = ctx.path(&input.file_path)?;
        let shown = ctx.display(&path).into_owned();
        let meta = fs::metadata(&path).map_err(|e| Error::msg(format!("cannot read `{shown}`: {}", hangar_sdk::fs::explain(&path, e))))?;
        if meta.is_dir() {
            return list_dir(&path, &shown);
        }
        // Never a FIFO or a device: opening one could block the call.
        hangar_sdk::fs::ensure_regular(&meta).map_err(|e| Error::msg(format!("cannot read `{shown}`: {e}")))?;
        let file = fs::File::open(&path).map_err(|e| Error::msg(format!("cannot read `{shown}`: {}", hangar_sdk::fs::explain(&path, e))))?;
        // A buffer the size of the file (within 8 KiB..CHUNK): a small file
        // then fits the guest's initial heap, and the call never grows its
        // linear memory (each growth costs the host an `mprotect` now and
        // another when the pool slot is reused).
        let capacity = usize::try_from(meta.len()).unwrap_or(CHUNK).saturating_add(1).clamp(BINARY_PROBE, CHUNK);
        let mut reader = BufReader::with_capacity(capacity, file);
        if looks_binary(reader.fill_buf()?) {
            return Err(Error::msg(format!("`{shown}` is a binary file; read only shows text")));
        }
        let offset = input.offset.unwrap_or(1).max(1);
        let limit = input.limit.unwrap_or(DEFAULT_LIMIT).max(1);
        number_lines(reader, offset, limit, &shown)
    }
}

/// A NUL byte in the first block is the usual sign of a binary file.
fn looks_binary(head: &[u8]) -> bool {
    head[..head.len().min(BINARY_PROBE)].contains(&0)
}

fn number_lines(mut reader: impl BufRead, offset: usize, limit: usize, shown: &str) -> Result<String, Error> {
    let mut out = String::new();
    let mut line = Vec::new();
    let mut number = 0usize;
    let mut last_shown = 0usize;
    let mut cut_by_size = false;
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            break;
        }
        number += 1;
        if number < offset {
            continue;
        }
        if number >= offset + limit {
            // One line past the window: there is more to read.
            return Ok(finish(out, shown, Some(number), number - 1));
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\n', '\r']);
        let entry = match text.char_indices().nth(MAX_LINE_CHARS) {
            Some((cut, _)) => format!("{number:>6}\t{}… [line cut at {MAX_LINE_CHARS} characters]\n", &text[..cut]),
            None => format!("{number:>6}\t{text}\n"),
        };
        if out.len() + entry.len() > MAX_BYTES {
            cut_by_size = true;
            break;
        }
        out.push_str(&entry);
        last_shown = number;
    }
    if cut_by_size {
        return Ok(finish(out, shown, Some(last_shown + 1), last_shown));
    }
    if number < offset && number > 0 {
        return Err(Error::msg(format!("`{shown}` has {number} lines; offset {offset} is past the end")));
    }
    if number == 0 {
        return Ok(format!("(`{shown}` is empty)"));
    }
    Ok(finish(out, shown, None, number))
}

fn finish(mut out: String, shown: &str, next: Option<usize>, last: usize) -> String {
    match next {
        Some(next) => out.push_str(&format!(
            "\n(`{shown}` has more lines; showing up to line {last}. Use offset={next} to continue.)"
        )),
        None => out.push_str(&format!("\n(End of `{shown}`: {last} lines.)")),
    }
    out
}

fn list_dir(path: &std::path::Path, shown: &str) -> Result<String, Error> {
    let mut entries: Vec<String> = fs::read_dir(path)
        .map_err(|e| Error::msg(format!("cannot list `{shown}`: {}", hangar_sdk::fs::explain(path, e))))?
        .filter_map(|entry| entry.ok())
        .map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            match entry.file_type() {
                Ok(t) if t.is_dir() => format!("{name}/"),
                _ => name,
            }
        })
        .collect();
    entries.sort();
    let mut out = format!("Directory `{shown}` ({} entries):\n", entries.len());
    for entry in entries {
        if out.len() + entry.len() + 1 > MAX_BYTES {
            out.push_str("… (listing cut at 50 KB)\n");
            break;
        }
        out.push_str(&entry);
        out.push('\n');
    }
    Ok(out)
}

// `Read` is the name models know; the struct avoids clashing with io::Read.
#[allow(unused_imports)]
use Read as _;

export_tool!(Read_);
