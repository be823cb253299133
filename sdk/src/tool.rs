//! Tools: functions the model can call.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use crate::Error;
use crate::types::{ToolCall, ToolOutput, ToolSpec};

/// A tool. Implement it on a unit struct and pass the struct to
/// [`export_tool!`](crate::export_tool).
///
/// Each call runs in a fresh instance of the component, so a tool keeps no
/// state between calls.
pub trait Tool {
    /// The arguments, deserialized from the model's JSON. When the JSON does
    /// not fit, the model gets an error that says why and `run` is not
    /// called.
    type Input: DeserializeOwned;

    /// Describes the tool to the model. `name` must equal the name in the
    /// plugin's manifest.
    fn spec() -> ToolSpec;

    /// Runs one call. `Ok` text goes to the model as the result; `Err` text
    /// goes to it as a failed result it can recover from.
    fn run(ctx: &Context, input: Self::Input) -> Result<String, Error>;
}

/// Builds a [`ToolSpec`] from a JSON Schema value.
pub fn tool_spec(name: &str, description: &str, input_schema: serde_json::Value) -> ToolSpec {
    ToolSpec {
        name: name.to_string(),
        description: description.to_string(),
        input_schema: input_schema.to_string(),
    }
}

/// What a call knows about where it runs.
pub struct Context {
    call_id: String,
    work_dir: Option<PathBuf>,
}

impl Context {
    /// The model's id for this call.
    pub fn call_id(&self) -> &str {
        &self.call_id
    }

    /// The session's working directory, the one directory the tool can see.
    pub fn work_dir(&self) -> Result<&Path, Error> {
        self.work_dir
            .as_deref()
            .ok_or_else(|| Error::msg("this session has no working directory"))
    }

    /// Where a path the model gave lives: relative paths are taken from the
    /// working directory, absolute ones are kept as they are.
    ///
    /// This does no checking of its own. The sandbox decides: a path that
    /// leads outside the working directory (through `..`, an absolute path
    /// or a symlink) fails when it is opened.
    pub fn path(&self, path: &str) -> Result<PathBuf, Error> {
        let path = Path::new(path);
        if path.is_absolute() {
            Ok(path.to_path_buf())
        } else {
            Ok(self.work_dir()?.join(path))
        }
    }

    /// The path relative to the working directory, for showing to the
    /// model; the path itself when it is not under it.
    pub fn display<'a>(&self, path: &'a Path) -> std::borrow::Cow<'a, str> {
        match self.work_dir.as_deref().and_then(|w| path.strip_prefix(w).ok()) {
            Some(rel) if rel.as_os_str().is_empty() => ".".into(),
            Some(rel) => rel.to_string_lossy(),
            None => path.to_string_lossy(),
        }
    }
}

#[doc(hidden)]
pub fn __invoke<T: Tool>(call: ToolCall) -> ToolOutput {
    let input: T::Input = match serde_json::from_str(&call.input) {
        Ok(input) => input,
        Err(err) => {
            return ToolOutput {
                text: format!("invalid input for `{}`: {err}", T::spec().name),
                is_error: true,
            };
        }
    };
    let ctx = Context {
        call_id: call.id,
        work_dir: (!call.work_dir.is_empty()).then(|| PathBuf::from(call.work_dir)),
    };
    match T::run(&ctx, input) {
        Ok(text) => ToolOutput { text, is_error: false },
        Err(err) => ToolOutput { text: err.message().to_string(), is_error: true },
    }
}

/// Exports a [`Tool`] as the component's `tool-api`.
///
/// Call it once, at the crate root of a `cdylib` crate built for
/// `wasm32-wasip2`.
#[macro_export]
macro_rules! export_tool {
    ($tool:ty) => {
        #[doc(hidden)]
        pub struct __HangarToolExport;

        impl $crate::__bindings::exports::hangar::plugin::tool_api::Guest for __HangarToolExport {
            fn spec() -> $crate::types::ToolSpec {
                <$tool as $crate::Tool>::spec()
            }
            fn invoke(call: $crate::types::ToolCall) -> $crate::types::ToolOutput {
                $crate::tool::__invoke::<$tool>(call)
            }
        }

        $crate::__bindings::__export_tool_world!(__HangarToolExport with_types_in $crate::__bindings);
    };
}
