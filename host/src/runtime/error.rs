use std::time::Duration;

/// What can go wrong loading or calling a plugin. Each variant names the
/// plugin, and the capability or limit involved, so an operator can act on
/// the message alone.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RuntimeError {
    #[error("no plugin named `{0}` is loaded")]
    NotFound(String),

    #[error("plugin `{plugin}` is a {actual}, not a {expected}")]
    WrongKind { plugin: String, expected: &'static str, actual: &'static str },

    #[error("plugin `{plugin}` has an invalid manifest: {reason}")]
    Manifest { plugin: String, reason: String },

    /// An uploaded manifest that does not even name its plugin.
    #[error("the uploaded manifest is invalid: {reason}")]
    UploadedManifest { reason: String },

    #[error("plugin `{plugin}` was refused the `{capability}` capability: {reason}")]
    CapabilityDenied { plugin: String, capability: String, reason: String },

    #[error("plugin `{plugin}` is refused: {reason}")]
    Clash { plugin: String, reason: String },

    #[error("plugin `{plugin}` failed to load: {reason}")]
    Load { plugin: String, reason: String },

    /// Compiling the component ran into `[limits] compile_timeout_s` or
    /// `compile_memory_mb`: `reason` names the limit and its setting.
    #[error("plugin `{plugin}` is refused: compiling it {reason}")]
    CompileLimit { plugin: String, reason: String },

    #[error("plugin `{plugin}` ran past its deadline of {}", humantime(*.limit))]
    Deadline { plugin: String, limit: Duration },

    #[error("plugin `{plugin}` tried to use more than its memory limit of {} MiB", .limit_bytes / (1024 * 1024))]
    Memory { plugin: String, limit_bytes: usize },

    /// Refused because the calls running now hold the server's budget, not
    /// because of this plugin's own cap: the same call may work later.
    #[error("plugin `{plugin}` was refused memory: the server memory budget of {} MiB for all plugin calls is in use by other calls", .budget_bytes / (1024 * 1024))]
    ServerMemory { plugin: String, budget_bytes: usize },

    /// Every slot of the instance pool (`[limits] plugin_instances`) is
    /// held by calls and model streams running now: the same call may work
    /// later.
    #[error("plugin `{plugin}` cannot start: all {limit} plugin instances of the server are in use by other calls")]
    Instances { plugin: String, limit: u32 },

    #[error("plugin `{plugin}` reached its limit of {limit}; writes past it failed")]
    Writes { plugin: String, limit: super::WriteLimit },

    #[error("plugin `{plugin}` produced {actual} bytes of output, over its limit of {limit} bytes")]
    Output { plugin: String, actual: usize, limit: usize },

    #[error("plugin `{plugin}` crashed: {reason}")]
    Trap { plugin: String, reason: String },

    #[error("plugin `{plugin}` cannot run: {reason}")]
    Unavailable { plugin: String, reason: String },
}

fn humantime(d: Duration) -> String {
    if d.as_millis() % 1000 == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{} ms", d.as_millis())
    }
}
