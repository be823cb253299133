//! Hangar: an agent host whose tools and model providers are sandboxed
//! WebAssembly components.

pub mod runtime;
