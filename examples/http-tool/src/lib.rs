//! `fetch`: GETs a URL through the host's `http` capability and gives the
//! model the status and the text of the answer.
//!
//! The tool itself does not check the URL: the host refuses any origin the
//! plugin was not granted, and the refusal reaches the model as an error it
//! can read.

use hangar_sdk::http::{HttpError, Request};
use hangar_sdk::{Context, Error, JsonSchema, Tool, ToolSpec, export_tool, schemars, tool_spec_for};
use serde::Deserialize;

/// The model gets at most this much of a body; a page is rarely worth more.
const MAX_CHARS: usize = 20_000;
const TIMEOUT_MS: u32 = 15_000;

struct Fetch;

// The doc comment of the field is the description the model reads.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct Input {
    /// An absolute http or https URL
    url: String,
}

impl Tool for Fetch {
    type Input = Input;

    fn spec() -> ToolSpec {
        tool_spec_for::<Input>(
            "fetch",
            "Fetches a URL with GET and returns the HTTP status and the body as text \
             (cut at 20,000 characters). Only the sites the operator allows can be reached.",
        )
    }

    fn run(_ctx: &Context, input: Input) -> Result<String, Error> {
        let response = Request::get(&input.url)
            .header("accept", "text/html, text/plain, application/json;q=0.9, */*;q=0.5")
            .timeout_ms(TIMEOUT_MS)
            .send()
            .map_err(|e| refused(&input.url, e))?;
        let status = response.status;
        let kind = response.header("content-type").unwrap_or("unknown type").to_string();
        let body = response.text().map_err(|e| refused(&input.url, e))?;
        let shown: String = body.chars().take(MAX_CHARS).collect();
        let cut = if shown.len() < body.len() { "\n[cut at 20000 characters]" } else { "" };
        let text = format!("HTTP {status} ({kind})\n\n{shown}{cut}");
        // A 4xx or 5xx is still an answer, but the model should treat it as
        // a failed fetch rather than as the page it asked for.
        if status >= 400 { Err(Error::msg(text)) } else { Ok(text) }
    }
}

fn refused(url: &str, err: HttpError) -> Error {
    Error::msg(format!("cannot fetch {url}: {}", err.describe()))
}

export_tool!(Fetch);
