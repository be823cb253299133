use clap::Parser;

use hangar::config::{Cli, Command, Settings};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let Command::Serve(args) = &cli.command;
    hangar::telemetry::init_logs(args.log_format);
    let result = match cli.command {
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
