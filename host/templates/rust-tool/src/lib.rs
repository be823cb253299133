//! `{{name}}`: a Hangar tool. As written it counts the lines of a file in the
//! session's working directory; change `Input`, the description and `run` to
//! make it yours. Build it with `hangar plugin build`.

use hangar_sdk::{Context, Error, JsonSchema, Tool, ToolSpec, export_tool, schemars, tool_spec_for};
use serde::Deserialize;

struct Plugin;

/// The arguments the model sends. The input schema the model reads is
/// derived from this type: each field's doc comment is its description.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct Input {
    /// Path of a text file, relative to the working directory
    path: String,
}

impl Tool for Plugin {
    type Input = Input;

    fn spec() -> ToolSpec {
        // The name must equal `name` in {{name}}.plugin.toml.
        tool_spec_for::<Input>("{{name}}", "Counts the lines of a text file in the working directory.")
    }

    fn run(ctx: &Context, input: Input) -> Result<String, Error> {
        // `hangar_sdk::fs` refuses FIFOs and devices, and when an open fails
        // says why (outside the working directory, no filesystem access...).
        let bytes = hangar_sdk::fs::read(&ctx.path(&input.path)?)
            .map_err(|e| Error::msg(format!("cannot read `{}`: {e}", input.path)))?;
        let lines = bytes.iter().filter(|&&b| b == b'\n').count();
        Ok(format!("{}: {lines} lines", input.path))
    }
}

export_tool!(Plugin);
