//! `liftwire-api`: see the library crate for what the API does.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use liftwire_api::auth::{mint, Role};
use liftwire_api::Api;
use liftwire_runtime::service::{block_on, load_config, serve};

/// liftwire dashboard API for building managers.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// TOML configuration file; `LIFTWIRE_API__*` environment variables override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the API (the default).
    Run,
    /// Print a development token signed with `auth.hs256_secret`.
    MintToken {
        /// User id (`sub`).
        #[arg(long, default_value = "dev")]
        subject: String,
        /// Role.
        #[arg(long, value_enum, default_value = "manager")]
        role: Role,
        /// A building in scope (repeat for several).
        #[arg(long = "building")]
        buildings: Vec<String>,
        /// Lifetime, e.g. `1h` or `30m`.
        #[arg(long, default_value = "8h", value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Print the OpenAPI document (what `services/api/openapi.json` holds).
    Openapi,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Openapi) = cli.command {
        println!("{}", liftwire_api::openapi::json());
        return ExitCode::SUCCESS;
    }
    let config = match load_config::<Api>(cli.config.as_deref()) {
        Ok(config) => config,
        Err(code) => return code,
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => block_on(serve::<Api>(config)),
        Command::Openapi => ExitCode::SUCCESS,
        Command::MintToken {
            subject,
            role,
            buildings,
            ttl,
        } => match mint(&config.auth, &subject, role, &buildings, ttl) {
            Ok(token) => {
                println!("{token}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("api mint-token: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
