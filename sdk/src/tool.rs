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

    /// The most parts one call may be split into. The default, 1, runs
    /// every call whole, in [`run`](Tool::run). A tool that sets more (a
    /// search over many files, say) implements [`run_shard`](Tool::run_shard)
    /// and [`merge`](Tool::merge): the host may then run a call as several
    /// parts at once, each in an instance of its own with the same
    /// working directory, and merge their texts in one more instance.
    const MAX_SHARDS: u32 = 1;

    /// Runs one part of a split call: the share of the work that
    /// [`Shard::owns`] gives it. The text goes to [`merge`](Tool::merge),
    /// not to the model; an `Err` answers the whole call.
    fn run_shard(ctx: &Context, input: Self::Input, shard: Shard) -> Result<String, Error> {
        let _ = shard;
        Self::run(ctx, input)
    }

    /// Joins the parts' texts, given in index order, into the answer. It
    /// runs without any filesystem, and must give the answer a whole call
    /// would: the host picks the number of parts.
    fn merge(ctx: &Context, input: Self::Input, parts: Vec<String>) -> Result<String, Error> {
        let _ = (ctx, input);
        Ok(parts.concat())
    }
}

/// Which part of a split call an instance runs: part `index` (from 0) of
/// `count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This part, from 0.
    pub index: u32,
    /// How many parts the call has.
    pub count: u32,
}

impl Shard {
    /// The one part of a call that is not split.
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    /// Whether the `n`th item (from 0) of a sequence that every part sees
    /// in the same order is this part's to do: items are dealt out in
    /// turn, so each part gets an even share of a long sequence.
    pub fn owns(&self, n: usize) -> bool {
        n % self.count.max(1) as usize == self.index as usize
    }
}

/// Builds a [`ToolSpec`] whose input schema is derived from the tool's
/// input type, which derives [`JsonSchema`](crate::JsonSchema) beside
/// `serde::Deserialize`:
///
/// ```ignore
/// use hangar_sdk::{JsonSchema, schemars};
///
/// /// Greets someone.
/// #[derive(serde::Deserialize, JsonSchema)]
/// struct Input {
///     /// Who to greet.
///     name: String,
/// }
///
/// fn spec() -> hangar_sdk::ToolSpec {
///     hangar_sdk::tool_spec_for::<Input>("hello", "Greets someone.")
/// }
/// ```
///
/// Doc comments on fields become their `description`s, which the model
/// reads; `#[serde(deny_unknown_fields)]` becomes `additionalProperties:
/// false`. (The `use hangar_sdk::schemars` line lets the derive find the
/// crate through the SDK, so the plugin needs no dependency of its own.)
pub fn tool_spec_for<I: crate::JsonSchema>(name: &str, description: &str) -> ToolSpec {
    tool_spec(name, description, input_schema::<I>())
}

/// The JSON Schema of an input type, as a tool spec carries it: an object
/// schema (draft 2020-12) without the `$schema` and `title` keys, which
/// only add tokens for the model. An `Option` field is optional (left out
/// of `required`) and typed as its inner type.
pub fn input_schema<I: crate::JsonSchema>() -> serde_json::Value {
    let mut schema = schemars::SchemaGenerator::default().into_root_schema_for::<I>().to_value();
    if let Some(object) = schema.as_object_mut() {
        object.remove("$schema");
        object.remove("title");
    }
    drop_null(&mut schema);
    schema
}

/// An `Option` field is one the model may leave out: typed as its inner
/// type, not as "T or null" (`"type": ["string", "null"]`, or an `anyOf`
/// with `{"type": "null"}`).
fn drop_null(schema: &mut serde_json::Value) {
    use serde_json::Value;
    let Value::Object(object) = schema else {
        if let Value::Array(items) = schema {
            items.iter_mut().for_each(drop_null);
        }
        return;
    };
    if let Some(Value::Array(types)) = object.get_mut("type") {
        types.retain(|t| t != "null");
        if types.len() == 1 {
            let only = types.pop().expect("one type");
            object.insert("type".into(), only);
        }
    }
    if let Some(Value::Array(any_of)) = object.get("anyOf") {
        let rest: Vec<Value> = any_of.iter().filter(|s| s.get("type").is_none_or(|t| t != "null")).cloned().collect();
        if rest.len() == 1 && any_of.len() == 2 {
            object.remove("anyOf");
            if let Value::Object(inner) = &rest[0] {
                for (k, v) in inner {
                    object.entry(k.clone()).or_insert_with(|| v.clone());
                }
            }
        }
    }
    object.values_mut().for_each(drop_null);
}

/// Builds a [`ToolSpec`] from a JSON Schema value written by hand (see
/// [`tool_spec_for`] to derive it from the input type instead).
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
    /// or a symlink) fails when it is opened, and the helpers of
    /// [`crate::fs`] then say so (`` path `../x` is outside the working
    /// directory ``).
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

/// The context and the decoded input of a call, or the output that tells
/// the model its input did not fit.
fn start<T: Tool>(call: ToolCall) -> Result<(Context, T::Input), ToolOutput> {
    let input: T::Input = serde_json::from_str(&call.input).map_err(|err| ToolOutput {
        text: format!("invalid input for `{}`: {err}", T::spec().name),
        is_error: true,
    })?;
    let work_dir = (!call.work_dir.is_empty()).then(|| PathBuf::from(call.work_dir));
    crate::fs::set_work_dir(work_dir.clone());
    Ok((Context { call_id: call.id, work_dir }, input))
}

fn output(result: Result<String, Error>) -> ToolOutput {
    match result {
        Ok(text) => ToolOutput { text, is_error: false },
        Err(err) => ToolOutput { text: err.message().to_string(), is_error: true },
    }
}

#[doc(hidden)]
pub fn __invoke<T: Tool>(call: ToolCall) -> ToolOutput {
    match start::<T>(call) {
        Ok((ctx, input)) => output(T::run(&ctx, input)),
        Err(refused) => refused,
    }
}

#[doc(hidden)]
pub fn __invoke_shard<T: Tool>(call: ToolCall, index: u32, count: u32) -> Result<String, ToolOutput> {
    let (ctx, input) = start::<T>(call)?;
    T::run_shard(&ctx, input, Shard { index, count }).map_err(|err| output(Err(err)))
}

#[doc(hidden)]
pub fn __merge<T: Tool>(call: ToolCall, parts: Vec<String>) -> ToolOutput {
    match start::<T>(call) {
        Ok((ctx, input)) => output(T::merge(&ctx, input, parts)),
        Err(refused) => refused,
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

        impl $crate::__bindings::exports::hangar::plugin::shard_api::Guest for __HangarToolExport {
            fn max_shards() -> u32 {
                <$tool as $crate::Tool>::MAX_SHARDS
            }
            fn invoke_shard(
                call: $crate::types::ToolCall,
                index: u32,
                count: u32,
            ) -> ::core::result::Result<::std::string::String, $crate::types::ToolOutput> {
                $crate::tool::__invoke_shard::<$tool>(call, index, count)
            }
            fn merge(
                call: $crate::types::ToolCall,
                parts: ::std::vec::Vec<::std::string::String>,
            ) -> $crate::types::ToolOutput {
                $crate::tool::__merge::<$tool>(call, parts)
            }
        }

        $crate::__bindings::__export_tool_world!(__HangarToolExport with_types_in $crate::__bindings);
    };
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use crate::{JsonSchema, schemars};

    #[allow(dead_code)]
    #[derive(serde::Deserialize, JsonSchema)]
    #[serde(rename_all = "camelCase", deny_unknown_fields)]
    struct Input {
        /// Path of the file
        file_path: String,
        /// First line
        #[schemars(range(min = 1))]
        offset: Option<u32>,
    }

    #[test]
    fn input_schema_is_a_plain_object_schema_with_optional_fields_not_nullable() {
        let schema = super::input_schema::<Input>();
        assert_eq!(schema["type"], "object");
        assert_eq!(schema["additionalProperties"], false);
        assert_eq!(schema["required"], json!(["filePath"]));
        assert_eq!(schema["properties"]["filePath"], json!({"type": "string", "description": "Path of the file"}));
        assert_eq!(schema["properties"]["offset"]["type"], "integer");
        assert_eq!(schema["properties"]["offset"]["minimum"], 1);
        assert!(schema.get("$schema").is_none() && schema.get("title").is_none(), "{schema}");
    }
}
