//! `liftwire-gateway`: see the library crate for what the gateway does.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use liftwire_gateway::Gateway;
use liftwire_runtime::service::{block_on, load_config, serve};

/// liftwire gateway: the device-facing side of the backbone, bridged to NATS.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// TOML configuration file; `LIFTWIRE_GATEWAY__*` environment variables override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match load_config::<Gateway>(cli.config.as_deref()) {
        Ok(config) => block_on(serve::<Gateway>(config)),
        Err(code) => code,
    }
}
