//! `liftwire-gateway`: see the library crate for what the gateway does.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use liftwire_gateway::acl::DeviceKind;
use liftwire_gateway::registry::{self, Registry};
use liftwire_gateway::{Config, Gateway};
use liftwire_proto::naming::{BuildingId, DeviceId};
use liftwire_runtime::service::{block_on, load_config, serve};

/// liftwire gateway: the device-facing MQTT broker bridged to NATS.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// TOML configuration file; `LIFTWIRE_GATEWAY__*` environment variables override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Kind {
    Elevator,
    Screen,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (the default).
    Run,
    /// Apply the device registry's migrations, then exit.
    Migrate,
    /// Register a device and print its secret (shown once, stored hashed).
    Provision {
        /// Building of the device.
        #[arg(long)]
        building: BuildingId,
        /// Device id (also its MQTT client id and username).
        #[arg(long)]
        device: DeviceId,
        /// Elevator controller or in-cabin screen.
        #[arg(long, value_enum, default_value = "elevator")]
        kind: Kind,
    },
    /// Replace a device's secret and print the new one.
    Rotate {
        /// Device id.
        #[arg(long)]
        device: DeviceId,
    },
    /// Revoke a device: refused at its next login, disconnected from running gateways.
    Revoke {
        /// Device id.
        #[arg(long)]
        device: DeviceId,
    },
}

async fn admin(config: Config, command: Command) -> ExitCode {
    let pool = match sqlx::PgPool::connect(&config.database.url).await {
        Ok(pool) => pool,
        Err(e) => {
            eprintln!("gateway: cannot connect to the registry database: {e}");
            return ExitCode::FAILURE;
        }
    };
    let registry = Registry::new(pool.clone(), config.mqtt.registry_cache_ttl);
    let result = match command {
        Command::Migrate => registry::migrate(&pool)
            .await
            .map(|()| "registry schema is up to date".to_owned())
            .map_err(|e| e.to_string()),
        Command::Provision {
            building,
            device,
            kind,
        } => {
            let kind = match kind {
                Kind::Elevator => DeviceKind::Elevator,
                Kind::Screen => DeviceKind::Screen,
            };
            registry
                .provision(&building, &device, kind)
                .await
                .map_err(|e| e.to_string())
        }
        Command::Rotate { device } => registry.rotate(&device).await.map_err(|e| e.to_string()),
        Command::Revoke { device } => registry
            .revoke(&device)
            .await
            .map(|()| format!("{device} revoked"))
            .map_err(|e| e.to_string()),
        Command::Run => unreachable!("run is not an admin command"),
    };
    match result {
        Ok(output) => {
            println!("{output}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("gateway: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match load_config::<Gateway>(cli.config.as_deref()) {
        Ok(config) => config,
        Err(code) => return code,
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::Run => block_on(serve::<Gateway>(config)),
        command => block_on(admin(config, command)),
    }
}
