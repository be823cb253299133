//! `write`: creates or replaces a file, creating its parent directories.

use std::fs;

use hangar_sdk::{Context, Error, JsonSchema, Tool, ToolSpec, export_tool, schemars, tool_spec_for};
use serde::Deserialize;

struct Write;

// The doc comments of the fields are the descriptions the model reads.
#[derive(Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Input {
    /// Path of the file, relative to the working directory or absolute inside it
    file_path: String,
    /// The whole new content of the file
    content: String,
}

impl Tool for Write {
    type Input = Input;

    fn spec() -> ToolSpec {
        tool_spec_for::<Input>(
            "write",
            "Writes a file in the working directory, replacing its content if it exists and \
             creating missing parent directories. Prefer `edit` to change part of an existing file.",
        )
    }

    fn run(ctx: &Context, input: Input) -> Result<String, Error> {
        let path = ctx.path(&input.file_path)?;
        let shown = ctx.display(&path).into_owned();
        // Opening through the WASI preopen is what confines this: a parent
        // outside the working directory (by `..`, an absolute path or a
        // symlink) cannot be created or opened.
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)
                .map_err(|e| Error::msg(format!("cannot create the directories of `{shown}`: {}", hangar_sdk::fs::explain(parent, e))))?;
        }
        if fs::metadata(&path).map(|m| m.is_dir()).unwrap_or(false) {
            return Err(Error::msg(format!("`{shown}` is a directory; give the path of a file")));
        }
        let existed = fs::symlink_metadata(&path).is_ok();
        // One write call for the whole content: WASI calls are costly.
        // An existing FIFO or device is refused, not opened (that could block).
        hangar_sdk::fs::write(&path, input.content.as_bytes())
            .map_err(|e| Error::msg(format!("cannot write `{shown}`: {e}")))?;
        let verb = if existed { "Overwrote" } else { "Created" };
        Ok(format!("{verb} `{shown}`: wrote {} bytes.", input.content.len()))
    }
}

export_tool!(Write);
