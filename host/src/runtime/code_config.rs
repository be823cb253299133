// Everything about the wasmtime engine that shapes compiled code, in one
// place for the two programs that compile: `include!`d by the server's
// engine (src/runtime/engine.rs) and by build.rs, which precompiles the
// built-in plugins with it. A change here changes both, so the embedded
// artifacts always match the server's engine. (Plain comments only: this
// file is pasted into both as items.)

/// The engine settings that shape compiled code. The server's engine and
/// the compile worker's (`hangar compile-worker`) both start from it, so
/// what the worker compiles the server can deserialize; build.rs compiles
/// the built-in plugins with it too.
pub fn code_config() -> wasmtime::Config {
    let mut config = wasmtime::Config::new();
    config.wasm_component_model(true);
    config.epoch_interruption(true);
    config.memory_init_cow(true);
    config
}
