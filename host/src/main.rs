use clap::Parser;

use hangar::config::{Cli, Command, Settings};

/// jemalloc instead of glibc's malloc, for the whole process (SQLite's
/// own allocations too): `POST /sessions` at 64 connections went about 11%
/// faster with it, in ten runs alternating with glibc, at the same memory
/// for 1,000 and 10,000 streams (BENCHMARKS.md, thirteenth round).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // An author's commands log as plain text; the server as it is told.
    let (format, background) = match &cli.command {
        Command::Serve(args) => (args.log_format, true),
        Command::Plugin(_) | Command::Migrate(_) | Command::CompileWorker => (Default::default(), false),
    };
    let _logs = hangar::telemetry::init_logs(format, background);
    let result = match cli.command {
        // An author's command: its error is for the terminal, not the log.
        Command::Plugin(command) => {
            return match hangar::authoring::run(command) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("hangar: {err}");
                    std::process::ExitCode::FAILURE
                }
            };
        }
        // An operator's command at a terminal, as the author's are.
        Command::Migrate(args) => {
            return match hangar::migrate::run(args) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(err) => {
                    eprintln!("hangar: {err}");
                    std::process::ExitCode::FAILURE
                }
            };
        }
        // The server's own helper: its stdout is the compiled component.
        Command::CompileWorker => return hangar::runtime::compile::worker_main(),
        Command::Serve(args) => Settings::resolve(args).map_err(|e| e.to_string()).and_then(|settings| {
            tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?
                .block_on(hangar::server::serve(settings))
                .map_err(|e| e.to_string())
        }),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err}");
            eprintln!("hangar: {err}");
            std::process::ExitCode::FAILURE
        }
    }
}
