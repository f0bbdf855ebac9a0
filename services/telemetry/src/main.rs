//! `liftwire-telemetry`: see the library crate for what the service does.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use liftwire_runtime::service::{block_on, load_config, serve};
use liftwire_telemetry::Telemetry;

/// liftwire telemetry service: ingests the device stream from JetStream into PostgreSQL.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// TOML configuration file; `LIFTWIRE_TELEMETRY__*` environment variables override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service (the default).
    Run,
    /// Apply database migrations, then exit. Run once per deploy, before the replicas start.
    Migrate,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match load_config::<Telemetry>(cli.config.as_deref()) {
        Ok(config) => config,
        Err(code) => return code,
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => block_on(serve::<Telemetry>(config)),
        Command::Migrate => block_on(liftwire_telemetry::migrate_command(config)),
    }
}
