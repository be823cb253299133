//! Host-side bindings generated from `wit/`: one `bindgen!` per world. The
//! provider world reuses the interfaces generated for the tool world, so
//! both share one set of types and one implementation of each capability.

pub mod tool {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "hangar:plugin/tool",
        imports: { default: async | trappable },
        exports: { default: async },
        with: {
            "hangar:plugin/http.body": crate::runtime::http::HttpBody,
        },
    });
}

/// A tool that can split a call into parts: the `tool` world and
/// `shard-api`. Its imports are the tool world's, so the same linker serves
/// both.
pub mod sharded_tool {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "hangar:plugin/sharded-tool",
        imports: { default: async | trappable },
        exports: { default: async },
        with: {
            "hangar:plugin/types": super::tool::hangar::plugin::types,
            "hangar:plugin/log": super::tool::hangar::plugin::log,
            "hangar:plugin/http": super::tool::hangar::plugin::http,
            "hangar:plugin/process": super::tool::hangar::plugin::process,
        },
    });
}

/// A provider: `provider-api`, and `provider-stream` when it has it. Used
/// through each interface's export indices, not the world's `Pre`: a
/// provider built before `provider-stream` (every Python and JavaScript
/// one) exports `provider-api` alone, with the same types.
pub mod provider {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "hangar:plugin/streaming-provider",
        imports: { default: async | trappable },
        exports: { default: async },
        with: {
            "hangar:plugin/types": super::tool::hangar::plugin::types,
            "hangar:plugin/log": super::tool::hangar::plugin::log,
            "hangar:plugin/http": super::tool::hangar::plugin::http,
        },
    });
}

pub use provider::exports::hangar::plugin::{provider_api, provider_stream};
pub use tool::hangar::plugin::{http as wit_http, log as wit_log, process as wit_process, types};
