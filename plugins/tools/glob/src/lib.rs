//! `glob`: files whose path matches a glob pattern, newest first.
//!
//! The walk is grep's (`hangar_walk::parts`, in one part): it skips `.git`
//! and whatever `.gitignore` / `.ignore` files exclude, and never follows
//! symlinks. Matching is `globset`'s.

use std::ops::ControlFlow;
use std::time::SystemTime;

use hangar_sdk::{Context, Error, JsonSchema, Tool, ToolSpec, export_tool, schemars, tool_spec_for};
use serde::Deserialize;

const MAX_RESULTS: usize = 100;

struct Glob;

// The doc comments of the fields are the descriptions the model reads.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct Input {
    /// Glob pattern, matched against paths relative to the searched directory
    pattern: String,
    /// Directory to search (default: the working directory)
    path: Option<String>,
}

impl Tool for Glob {
    type Input = Input;

    fn spec() -> ToolSpec {
        tool_spec_for::<Input>(
            "glob",
            "Finds files by name pattern, like `**/*.rs` or `src/**/*.{ts,tsx}`, in the working \
             directory (or in `path` inside it). A pattern without `/` matches file names in any \
             directory. Skips `.git` and gitignored paths. Returns paths newest first, at most 100.",
        )
    }

    fn run(ctx: &Context, input: Input) -> Result<String, Error> {
        let root = ctx.path(input.path.as_deref().unwrap_or("."))?;
        let shown_root = ctx.display(&root).into_owned();
        let meta = std::fs::metadata(&root).map_err(|e| Error::msg(format!("cannot search `{shown_root}`: {}", hangar_sdk::fs::explain(&root, e))))?;
        if !meta.is_dir() {
            return Err(Error::msg(format!("`{shown_root}` is not a directory; `path` must name a directory")));
        }
        let pattern = input.pattern.trim_start_matches("./");
        let matcher = hangar_walk::glob(pattern, "glob")?;
        let by_name = !pattern.contains('/');

        let mut found: Vec<(SystemTime, String)> = Vec::new();
        hangar_walk::parts::walk_names(&root, |entry| {
            let hit = if by_name {
                entry.path().file_name().is_some_and(|n| matcher.is_match(n))
            } else {
                matcher.is_match(entry.key())
            };
            if hit {
                let mtime = entry.modified().unwrap_or(SystemTime::UNIX_EPOCH);
                found.push((mtime, ctx.display(entry.path()).into_owned()));
            }
            ControlFlow::Continue(())
        })
        .map_err(|e| Error::msg(format!("cannot search `{shown_root}`: {e}")))?;
        if found.is_empty() {
            return Ok(format!("No files match `{}` in `{shown_root}`.", input.pattern));
        }
        // Newest first; ties by path so the order is stable.
        found.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        let total = found.len();
        let mut out: String = found.iter().take(MAX_RESULTS).map(|(_, p)| format!("{p}\n")).collect();
        if total > MAX_RESULTS {
            out.push_str(&format!(
                "\n(Showing the {MAX_RESULTS} newest of {total} files. Use a narrower pattern or path to see the rest.)\n"
            ));
        }
        Ok(out)
    }
}

export_tool!(Glob);
