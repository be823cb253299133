//! `grep`: lines matching a regular expression, as `path:line: text`.
//!
//! The regex crate guarantees linear-time matching, so no pattern the
//! model writes can hang the call. The walk is the `ignore` crate's
//! (single-threaded): `.git` and gitignored paths are skipped.

use std::fs::{self, File};
use std::io::Read;
use std::path::Path;

use hangar_sdk::{Context, Error, JsonSchema, Tool, ToolSpec, export_tool, schemars, tool_spec_for};
use regex::bytes::{Regex, RegexBuilder};
use serde::Deserialize;

const MAX_MATCHES: usize = 100;
const MAX_LINE_CHARS: usize = 500;
/// Larger files are skipped (and counted): they are data, not source.
const MAX_FILE_BYTES: u64 = 16 << 20;
/// A NUL byte in the first block marks a file as binary.
const BINARY_PROBE: usize = 8192;

struct Grep;

// The doc comments of the fields are the descriptions the model reads.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct Input {
    /// Regular expression to search for
    pattern: String,
    /// File or directory to search (default: the working directory)
    path: Option<String>,
    /// Glob of the files to search, e.g. `*.rs`
    include: Option<String>,
}

impl Tool for Grep {
    type Input = Input;

    fn spec() -> ToolSpec {
        tool_spec_for::<Input>(
            "grep",
            "Searches file contents with a regular expression (Rust regex syntax) in the working \
             directory (or in `path` inside it). `include` filters files by glob, like `*.rs` or \
             `*.{ts,tsx}`. Skips binary files, `.git` and gitignored paths. Returns \
             `path:line: text` lines, at most 100.",
        )
    }

    fn run(ctx: &Context, input: Input) -> Result<String, Error> {
        let regex = RegexBuilder::new(&input.pattern)
            .multi_line(true)
            .size_limit(16 << 20)
            .build()
            .map_err(|e| Error::msg(format!("invalid regular expression: {e}")))?;
        let include = input.include.as_deref().map(|p| hangar_walk::glob(p, "include")).transpose()?;
        let root = ctx.path(input.path.as_deref().unwrap_or("."))?;
        let shown_root = ctx.display(&root).into_owned();
        fs::metadata(&root).map_err(|e| Error::msg(format!("cannot search `{shown_root}`: {}", hangar_sdk::fs::explain(&root, e))))?;

        let mut search = Search { out: String::new(), matches: 0, cut: false, skipped_large: 0 };
        for entry in hangar_walk::walker(&root).flatten() {
            if !entry.file_type().is_some_and(|t| t.is_file()) {
                continue;
            }
            let path = entry.path();
            if let Some(include) = &include {
                let name_hit = path.file_name().is_some_and(|n| include.is_match(n));
                let rel_hit = path.strip_prefix(&root).is_ok_and(|r| include.is_match(r));
                if !name_hit && !rel_hit {
                    continue;
                }
            }
            search.file(ctx, path, &regex);
            if search.cut {
                break;
            }
        }
        let mut out = search.out;
        if search.matches == 0 {
            out = format!("No matches for `{}` in `{shown_root}`.\n", input.pattern);
        } else if search.cut {
            out.push_str(&format!(
                "\n(Showing the first {MAX_MATCHES} matches; there are more. Use a narrower pattern, path or include.)\n"
            ));
        }
        if search.skipped_large > 0 {
            out.push_str(&format!("({} files over {} MB were not searched.)\n", search.skipped_large, MAX_FILE_BYTES >> 20));
        }
        Ok(out)
    }
}

struct Search {
    out: String,
    matches: usize,
    cut: bool,
    skipped_large: usize,
}

impl Search {
    fn file(&mut self, ctx: &Context, path: &Path, regex: &Regex) {
        // Open once and ask the handle for its size: every WASI call is a
        // host round trip, and most files are read only to be ruled out.
        // The walker passes only regular files (by their directory entry's
        // type, without another round trip): a FIFO or a device could block.
        let Ok(file) = File::open(path) else { return };
        let len = match file.metadata() {
            Ok(meta) if meta.len() > MAX_FILE_BYTES => {
                self.skipped_large += 1;
                return;
            }
            Ok(meta) => meta.len(),
            Err(_) => return,
        };
        // Reading exactly `len` bytes spares the read that would find EOF.
        let mut bytes = Vec::with_capacity(len as usize);
        if file.take(len).read_to_end(&mut bytes).is_err() {
            return;
        }
        if memchr::memchr(0, &bytes[..bytes.len().min(BINARY_PROBE)]).is_some() {
            return;
        }
        // Search the whole file at once, as ripgrep does, and look at lines
        // only around matches: most files do not match at all.
        let mut shown = None;
        let mut line_no = 1;
        let mut counted = 0;
        let mut at = 0;
        while let Some(found) = regex.find_at(&bytes, at) {
            let start = memchr::memrchr(b'\n', &bytes[..found.start()]).map_or(0, |i| i + 1);
            let end = memchr::memchr(b'\n', &bytes[start..]).map_or(bytes.len(), |i| start + i);
            at = end + 1;
            // A match may run past its line (`\s` takes newlines); report a
            // line only if the pattern matches it on its own, as grep does.
            let line = &bytes[start..end];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if regex.is_match(line) {
                if self.matches == MAX_MATCHES {
                    self.cut = true;
                    return;
                }
                self.matches += 1;
                line_no += memchr::memchr_iter(b'\n', &bytes[counted..start]).count();
                counted = start;
                let text = String::from_utf8_lossy(line);
                let text = match text.char_indices().nth(MAX_LINE_CHARS) {
                    Some((cut, _)) => format!("{}… [line cut]", &text[..cut]),
                    None => text.into_owned(),
                };
                let shown = shown.get_or_insert_with(|| ctx.display(path).into_owned());
                self.out.push_str(&format!("{shown}:{line_no}: {text}\n"));
            }
            if at >= bytes.len() {
                break;
            }
        }
    }
}

export_tool!(Grep);
