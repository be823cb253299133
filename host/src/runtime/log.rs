//! The `log` capability: plugin log lines into the host's tracing.

use super::bindings::wit_log::{Host, Level};
use super::state::PluginState;

const MAX_LINE: usize = 4096;

impl Host for PluginState {
    async fn log(&mut self, level: Level, mut message: String) -> wasmtime::Result<()> {
        if message.len() > MAX_LINE {
            let mut cut = MAX_LINE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push_str(" …");
        }
        let plugin = &*self.plugin;
        match level {
            Level::Trace => tracing::trace!(target: "hangar::plugin", plugin, "{message}"),
            Level::Debug => tracing::debug!(target: "hangar::plugin", plugin, "{message}"),
            Level::Info => tracing::info!(target: "hangar::plugin", plugin, "{message}"),
            Level::Warn => tracing::warn!(target: "hangar::plugin", plugin, "{message}"),
            Level::Error => tracing::error!(target: "hangar::plugin", plugin, "{message}"),
        }
        Ok(())
    }
}

// `types` holds only type definitions; linking it needs an (empty) host.
impl super::bindings::types::Host for PluginState {}
