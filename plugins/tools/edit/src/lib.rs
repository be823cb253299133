//! `edit`: replaces an exact piece of text in a file and shows the diff.

use hangar_sdk::{Context, Error, JsonSchema, Tool, ToolSpec, export_tool, schemars, tool_spec_for};
use serde::Deserialize;
use similar::TextDiff;

/// A diff longer than this is cut: the model only needs to see the change.
const MAX_DIFF_BYTES: usize = 20 * 1024;

struct Edit;

// The doc comments of the fields are the descriptions the model reads.
#[derive(Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Input {
    /// Path of the file, relative to the working directory or absolute inside it
    file_path: String,
    /// The exact text to replace
    old_string: String,
    /// The text to put in its place (must differ from oldString)
    new_string: String,
    /// Replace every occurrence instead of requiring exactly one (default false)
    #[serde(default)]
    replace_all: bool,
}

impl Tool for Edit {
    type Input = Input;

    fn spec() -> ToolSpec {
        tool_spec_for::<Input>(
            "edit",
            "Replaces `oldString` with `newString` in a file of the working directory. The match \
             is exact (whitespace and indentation included) and must be unique unless \
             `replaceAll` is true; include enough surrounding lines to make it unique. Returns a \
             unified diff of the change.",
        )
    }

    fn run(ctx: &Context, input: Input) -> Result<String, Error> {
        if input.old_string == input.new_string {
            return Err(Error::msg("oldString and newString are identical; there is nothing to change"));
        }
        if input.old_string.is_empty() {
            return Err(Error::msg("oldString is empty; use the write tool to create or replace a whole file"));
        }
        let path = ctx.path(&input.file_path)?;
        let shown = ctx.display(&path).into_owned();
        let bytes = hangar_sdk::fs::read(&path).map_err(|e| Error::msg(format!("cannot read `{shown}`: {e}")))?;
        let old = String::from_utf8(bytes)
            .map_err(|_| Error::msg(format!("`{shown}` is not UTF-8 text; edit only changes text files")))?;
        let count = old.matches(&input.old_string).count();
        if count == 0 {
            return Err(Error::msg(format!(
                "oldString was not found in `{shown}`; it must match exactly, including whitespace and indentation"
            )));
        }
        if count > 1 && !input.replace_all {
            return Err(Error::msg(format!(
                "oldString occurs {count} times in `{shown}`; add surrounding lines to make it unique, or set replaceAll to true"
            )));
        }
        let new = if input.replace_all {
            old.replace(&input.old_string, &input.new_string)
        } else {
            old.replacen(&input.old_string, &input.new_string, 1)
        };
        hangar_sdk::fs::write(&path, new.as_bytes()).map_err(|e| Error::msg(format!("cannot write `{shown}`: {e}")))?;

        let diff = TextDiff::from_lines(&old, &new);
        let mut text = diff
            .unified_diff()
            .context_radius(3)
            .header(&format!("a/{shown}"), &format!("b/{shown}"))
            .to_string();
        if text.len() > MAX_DIFF_BYTES {
            let mut cut = MAX_DIFF_BYTES;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
            text.push_str("\n… [diff cut]\n");
        }
        let what = if count == 1 { "1 replacement".to_string() } else { format!("{count} replacements") };
        Ok(format!("Edited `{shown}` ({what}).\n{text}"))
    }
}

export_tool!(Edit);
