//! `grep`: lines matching a regular expression, as `path:line: text`.
//!
//! The regex crate guarantees linear-time matching, so no pattern the
//! model writes can hang the call. The walk (`hangar_walk::parts`) skips
//! `.git` and gitignored paths, like ripgrep's.
//!
//! A call may run as several parts at once (`MAX_SHARDS`): the walk deals
//! the tree's files out to the parts, and the merge puts the matches back
//! in walk order, so the answer is the one a single part gives.

use std::fs;
use std::ops::ControlFlow;

use hangar_sdk::{Context, Error, JsonSchema, Shard, Tool, ToolSpec, export_tool, schemars, tool_spec_for};
use hangar_walk::parts::{File, compare_keys};
use regex::bytes::{Regex, RegexBuilder};
use serde::{Deserialize, Serialize};

const MAX_MATCHES: usize = 100;
const MAX_LINE_CHARS: usize = 500;
/// Larger files are skipped (and counted): they are data, not source.
const MAX_FILE_BYTES: u64 = 16 << 20;
/// A NUL byte in the first block marks a file as binary.
const BINARY_PROBE: usize = 8192;

struct Grep;

// The doc comments of the fields are the descriptions the model reads.
#[derive(Clone, Deserialize, JsonSchema)]
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
        let part = Self::run_shard(ctx, input.clone(), Shard::WHOLE)?;
        Self::merge(ctx, input, vec![part])
    }

    // Two parts on two cores take the search over figure 2's tree from
    // 2.55× ripgrep's time to 1.5× (BENCHMARKS.md); parts beyond the cores
    // only add listings of the top of the tree, which every part reads.
    const MAX_SHARDS: u32 = 16;

    fn run_shard(ctx: &Context, input: Input, shard: Shard) -> Result<String, Error> {
        let regex = RegexBuilder::new(&input.pattern)
            .multi_line(true)
            .size_limit(16 << 20)
            .build()
            .map_err(|e| Error::msg(format!("invalid regular expression: {e}")))?;
        let include = input.include.as_deref().map(|p| hangar_walk::glob(p, "include")).transpose()?;
        let root = ctx.path(input.path.as_deref().unwrap_or("."))?;
        let shown_root = ctx.display(&root).into_owned();
        fs::metadata(&root).map_err(|e| Error::msg(format!("cannot search `{shown_root}`: {}", hangar_sdk::fs::explain(&root, e))))?;

        let mut search = Search { part: Part::default(), buf: Vec::new() };
        hangar_walk::parts::walk(&root, shard, |file| {
            if let Some(include) = &include {
                let name_hit = file.path().file_name().is_some_and(|n| include.is_match(n));
                let rel_hit = file.path().strip_prefix(&root).is_ok_and(|r| include.is_match(r));
                if !name_hit && !rel_hit {
                    return ControlFlow::Continue(());
                }
            }
            search.file(ctx, file, &regex)
        })
        .map_err(|e| Error::msg(format!("cannot search `{shown_root}`: {e}")))?;
        serde_json::to_string(&search.part).map_err(|e| Error::msg(format!("grep: writing a part: {e}")))
    }

    fn merge(ctx: &Context, input: Input, parts: Vec<String>) -> Result<String, Error> {
        let mut hits = Vec::new();
        let mut skipped = Vec::new();
        for part in parts {
            let part: Part = serde_json::from_str(&part).map_err(|e| Error::msg(format!("grep: reading a part: {e}")))?;
            hits.extend(part.hits);
            skipped.extend(part.skipped);
        }
        // Parts hold disjoint files, each file's lines in order: a stable
        // sort by file puts the lines in the order one walk finds them.
        hits.sort_by(|(a, _), (b, _)| compare_keys(a, b));
        // A part stops after one match more than is shown, so the file of
        // the first match not shown is known whenever there are more.
        let cut_at = hits.get(MAX_MATCHES).map(|(file, _)| file.clone());
        hits.truncate(MAX_MATCHES);
        // Large files the search passed before it stopped.
        let skipped = skipped.iter().filter(|file| cut_at.as_ref().is_none_or(|cut| compare_keys(file, cut).is_lt())).count();

        let mut out = String::new();
        if hits.is_empty() {
            let root = ctx.path(input.path.as_deref().unwrap_or("."))?;
            out = format!("No matches for `{}` in `{}`.\n", input.pattern, ctx.display(&root));
        } else {
            for (_, line) in &hits {
                out.push_str(line);
                out.push('\n');
            }
            if cut_at.is_some() {
                out.push_str(&format!(
                    "\n(Showing the first {MAX_MATCHES} matches; there are more. Use a narrower pattern, path or include.)\n"
                ));
            }
        }
        if skipped > 0 {
            out.push_str(&format!("({skipped} files over {} MB were not searched.)\n", MAX_FILE_BYTES >> 20));
        }
        Ok(out)
    }
}

/// What a part found, for the merge. Files are named by their walk key,
/// which orders them as one walk meets them.
#[derive(Default, Serialize, Deserialize)]
struct Part {
    /// Matched lines as shown (`path:line: text`), with their file's key;
    /// at most one more than is shown.
    hits: Vec<(String, String)>,
    /// The keys of the files skipped for their size.
    skipped: Vec<String>,
}

struct Search {
    part: Part,
    /// The buffer of the last file read, reused when it is ours.
    buf: Vec<u8>,
}

impl Search {
    /// Searches one file; breaks once the part has all the matches it may
    /// hold. A file that cannot be read is passed over, as a native grep
    /// that cannot open it would (with a note on stderr nobody reads).
    fn file(&mut self, ctx: &Context, file: &File, regex: &Regex) -> ControlFlow<()> {
        let mut buf = std::mem::take(&mut self.buf);
        let more = match file.read(MAX_FILE_BYTES, &mut buf) {
            Ok(true) => self.search(ctx, file, &buf, regex),
            Ok(false) => {
                self.part.skipped.push(file.key().to_string());
                true
            }
            Err(_) => true,
        };
        self.buf = buf;
        if more { ControlFlow::Continue(()) } else { ControlFlow::Break(()) }
    }

    fn search(&mut self, ctx: &Context, file: &File, bytes: &[u8], regex: &Regex) -> bool {
        if memchr::memchr(0, &bytes[..bytes.len().min(BINARY_PROBE)]).is_some() {
            return true;
        }
        // Search the whole file at once, as ripgrep does, and look at lines
        // only around matches: most files do not match at all.
        let mut shown = None;
        let mut line_no = 1;
        let mut counted = 0;
        let mut at = 0;
        while let Some(found) = regex.find_at(bytes, at) {
            let start = memchr::memrchr(b'\n', &bytes[..found.start()]).map_or(0, |i| i + 1);
            let end = memchr::memchr(b'\n', &bytes[start..]).map_or(bytes.len(), |i| start + i);
            at = end + 1;
            // A match may run past its line (`\s` takes newlines); report a
            // line only if the pattern matches it on its own, as grep does.
            let line = &bytes[start..end];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if regex.is_match(line) {
                line_no += memchr::memchr_iter(b'\n', &bytes[counted..start]).count();
                counted = start;
                let text = String::from_utf8_lossy(line);
                let text = match text.char_indices().nth(MAX_LINE_CHARS) {
                    Some((cut, _)) => format!("{}… [line cut]", &text[..cut]),
                    None => text.into_owned(),
                };
                let shown = shown.get_or_insert_with(|| ctx.display(file.path()).into_owned());
                self.part.hits.push((file.key().to_string(), format!("{shown}:{line_no}: {text}")));
                if self.part.hits.len() > MAX_MATCHES {
                    return false;
                }
            }
            if at >= bytes.len() {
                break;
            }
        }
        true
    }
}

export_tool!(Grep);
