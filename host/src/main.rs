use clap::Parser;

use hangar::config::{Cli, Command, Settings};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
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
