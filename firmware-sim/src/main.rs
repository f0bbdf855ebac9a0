//! `liftwire-firmware-sim`: simulated elevator firmware.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use liftwire_firmware_sim::{Fleet, FleetConfig, TrafficProfile};
use liftwire_proto::naming::DeviceId;
use liftwire_proto::Message;
use liftwire_runtime::config::{self, ProcessEnv};
use serde::Deserialize;

/// Simulated elevator controllers that produce liftwire's device messages.
#[derive(Parser)]
#[command(version)]
struct Cli {
    /// TOML configuration file (`[fleet]`); `LIFTWIRE_FIRMWARE_SIM__*` variables override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Seed (overrides the configuration).
    #[arg(long)]
    seed: Option<u64>,
    /// Number of buildings (overrides the configuration).
    #[arg(long)]
    buildings: Option<u32>,
    /// Elevators per building (overrides the configuration).
    #[arg(long)]
    elevators_per_building: Option<u32>,
    /// Traffic profile (overrides the configuration).
    #[arg(long, value_enum)]
    profile: Option<TrafficProfile>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Write one encoded envelope (an alarm-button event) to standard output, e.g. to publish it
    /// with `mosquitto_pub -f`.
    Envelope {
        /// Device id in the envelope.
        #[arg(long)]
        device: DeviceId,
        /// Sequence number.
        #[arg(long, default_value_t = 1)]
        seq: u64,
    },
    /// Run the fleet for a simulated duration and print one line per message it would send.
    Trace {
        /// Simulated seconds to run.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Config {
    fleet: FleetConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let mut config: Config = match config::load("firmware-sim", cli.config.as_deref(), &ProcessEnv)
    {
        Ok(config) => config,
        Err(e) => {
            eprintln!("firmware-sim: {e}");
            return ExitCode::from(2);
        }
    };
    let fleet_config = &mut config.fleet;
    fleet_config.seed = cli.seed.unwrap_or(fleet_config.seed);
    fleet_config.buildings = cli.buildings.unwrap_or(fleet_config.buildings);
    fleet_config.elevators_per_building = cli
        .elevators_per_building
        .unwrap_or(fleet_config.elevators_per_building);
    fleet_config.profile = cli.profile.unwrap_or(fleet_config.profile);
    let mut fleet = match Fleet::new(fleet_config) {
        Ok(fleet) => fleet,
        Err(e) => {
            eprintln!("firmware-sim: invalid fleet id: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Command::Envelope { device, seq } => {
            let envelope = liftwire_firmware_sim::elevator::alarm_envelope(
                &device,
                seq,
                std::time::SystemTime::now(),
            );
            if let Err(e) =
                std::io::Write::write_all(&mut std::io::stdout(), &envelope.encode_to_vec())
            {
                eprintln!("firmware-sim: {e}");
                return ExitCode::FAILURE;
            }
        }
        Command::Trace { seconds } => {
            for (uplink, envelope) in fleet.advance(seconds * 1000) {
                let t = envelope.device_time.unwrap_or_default();
                let body = match &envelope.body {
                    Some(liftwire_proto::v1::envelope::Body::Event(e)) => format!("{:?}", e.kind),
                    Some(other) => format!("{other:?}"),
                    None => String::new(),
                };
                println!(
                    "{} seq={} t={}.{:03} {body}",
                    uplink.mqtt_topic(),
                    envelope.seq,
                    t.seconds,
                    t.nanos / 1_000_000
                );
            }
        }
    }
    ExitCode::SUCCESS
}
