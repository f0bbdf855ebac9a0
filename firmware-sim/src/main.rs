//! `liftwire-firmware-sim`: simulated elevator firmware.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use liftwire_firmware_sim::device::{Chaos, ChaosCommand, RunSettings, Target};
use liftwire_firmware_sim::{Fleet, FleetConfig, Scenario, TrafficProfile};
use liftwire_proto::naming::DeviceId;
use liftwire_proto::Message;
use liftwire_runtime::config::{self, ProcessEnv};
use liftwire_runtime::observability::ObservabilityConfig;
use liftwire_runtime::service::block_on;
use serde::Deserialize;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

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
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Generate load: N devices at a total rate, measured from scheduled send to NATS arrival.
    Load {
        /// Number of devices.
        #[arg(long, default_value_t = 100)]
        devices: u32,
        /// Total messages per second.
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        /// MQTT QoS (0 or 1).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
        qos: u8,
        /// Envelope size in bytes.
        #[arg(long, default_value_t = 200)]
        payload_bytes: usize,
        /// Seconds of sending.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Seconds sent first, on top of `--seconds`, whose messages count for loss but not for
        /// latency.
        #[arg(long, default_value_t = 1)]
        warmup: u64,
        /// NATS server where messages are expected.
        #[arg(long, default_value = "nats://127.0.0.1:4222")]
        nats_url: String,
        /// NATS subject filter where messages are expected (default: the gateway's uplink
        /// subjects of the load building; nats-server's own MQTT listener maps topics to
        /// `lw.v1.{building}.*.up.telemetry` instead).
        #[arg(long)]
        subject: Option<String>,
        /// Print the report as JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Connect without credentials (for brokers without device auth).
        #[arg(long)]
        no_auth: bool,
    },
    /// Connect the fleet to the gateway over MQTT and run until Ctrl-C (or `--seconds`); the
    /// default command.
    Run {
        /// Stop after this many real seconds.
        #[arg(long)]
        seconds: Option<u64>,
        /// Simulated seconds per real second (overrides the configuration).
        #[arg(long)]
        speed: Option<f64>,
        /// A chaos scenario to start during the run.
        #[arg(long, value_enum)]
        scenario: Option<Scenario>,
        /// Network chaos to start during the run.
        #[arg(long, value_enum)]
        network: Option<NetworkChaos>,
        /// Real seconds after start at which the scenario / network chaos starts.
        #[arg(long, default_value_t = 30)]
        at: u64,
    },
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
        /// A chaos scenario to start during the run.
        #[arg(long, value_enum)]
        scenario: Option<Scenario>,
        /// Simulated second at which the scenario starts.
        #[arg(long, default_value_t = 30)]
        at: u64,
    },
}

/// Network chaos for `run --network`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum NetworkChaos {
    /// The first device loses the network for a minute, then replays its backlog.
    Partition,
    /// The first device sends malformed, impostor, oversized and foreign-topic messages.
    Misbehave,
    /// Every device drops its connection and redials at once.
    ConnectStorm,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct Config {
    fleet: FleetConfig,
    mqtt: MqttTarget,
    run: RunConfig,
    registry: RegistryTarget,
    observability: ObservabilityConfig,
}

/// `[mqtt]`: the gateway to connect to.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct MqttTarget {
    host: String,
    port: u16,
    #[serde(with = "humantime_serde")]
    keep_alive: Duration,
}

impl Default for MqttTarget {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 1883,
            keep_alive: Duration::from_secs(30),
        }
    }
}

/// `[run]`: where state lives and how fast time goes.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RunConfig {
    data_dir: PathBuf,
    speed: f64,
    resend_per_second: u32,
}

impl Default for RunConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from(".liftwire/firmware-sim"),
            speed: 1.0,
            resend_per_second: 20,
        }
    }
}

/// `[registry]`: the gateway's device registry, to provision the fleet (only used for devices
/// whose secret is not in the data directory yet). Defaults to the local backbone's.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RegistryTarget {
    database_url: Option<String>,
}

impl Default for RegistryTarget {
    fn default() -> Self {
        Self {
            database_url: Some("postgres://liftwire@127.0.0.1:5432/liftwire_gateway".into()),
        }
    }
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
    let command = cli.command.unwrap_or(Command::Run {
        seconds: None,
        speed: None,
        scenario: None,
        network: None,
        at: 30,
    });
    match command {
        Command::Load {
            devices,
            rate,
            qos,
            payload_bytes,
            seconds,
            warmup,
            nats_url,
            subject,
            json,
            no_auth,
        } => {
            use liftwire_firmware_sim::load::{LoadConfig, Observe, Observer, Publisher};
            let building = format!("{}-load", config.fleet.id_prefix);
            let observer = match subject {
                Some(subject) => Observer {
                    name: "nats".into(),
                    at: Observe::Nats {
                        url: nats_url,
                        subject,
                    },
                },
                None => Observer::gateway_subjects(&nats_url, &building),
            };
            let settings = LoadConfig {
                publisher: Publisher::Mqtt {
                    host: config.mqtt.host.clone(),
                    port: config.mqtt.port,
                    secrets: None,
                },
                observers: vec![observer],
                devices,
                rate,
                qos,
                payload_bytes,
                duration: Duration::from_secs(seconds + warmup),
                warmup: Duration::from_secs(warmup),
                building,
                connect_timeout: Duration::from_secs(60),
                drain: Duration::from_secs(5),
                seq_base: 0,
            };
            return block_on(load(settings, config, json, no_auth));
        }
        Command::Run {
            seconds,
            speed,
            scenario,
            network,
            at,
        } => {
            if let Some(speed) = speed {
                config.run.speed = speed;
            }
            let mut commands = match scenario.map(|s| s.commands(&config.fleet)).transpose() {
                Ok(commands) => commands.unwrap_or_default(),
                Err(e) => {
                    eprintln!("firmware-sim: invalid fleet id: {e}");
                    return ExitCode::from(2);
                }
            };
            if let Some(network) = network {
                let first = liftwire_firmware_sim::Fleet::new(&config.fleet)
                    .ok()
                    .and_then(|f| f.into_elevators().into_iter().next())
                    .map(|(_, e)| e.device().clone());
                let (target, chaos) = match network {
                    NetworkChaos::Partition => (
                        first.map(Target::Device),
                        Chaos::Partition(Duration::from_secs(60)),
                    ),
                    NetworkChaos::Misbehave => (first.map(Target::Device), Chaos::Misbehave),
                    NetworkChaos::ConnectStorm => (Some(Target::All), Chaos::Reconnect),
                };
                commands.extend(target.map(|t| (t, chaos)));
            }
            return block_on(run(config, seconds, commands, Duration::from_secs(at)));
        }
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
        Command::Trace {
            seconds,
            scenario,
            at,
        } => {
            let mut sent = Vec::new();
            match scenario {
                Some(scenario) if at < seconds => {
                    sent.extend(fleet.advance(at * 1000));
                    sent.extend(scenario.apply(&mut fleet));
                    sent.extend(fleet.advance((seconds - at) * 1000));
                }
                _ => sent.extend(fleet.advance(seconds * 1000)),
            }
            for (uplink, envelope) in sent {
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

async fn run(
    config: Config,
    seconds: Option<u64>,
    chaos: Vec<ChaosCommand>,
    chaos_at: Duration,
) -> ExitCode {
    let rust_log = std::env::var("RUST_LOG").ok();
    let _tracing = match liftwire_runtime::observability::init(
        "firmware-sim",
        &config.observability,
        rust_log.as_deref(),
    ) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("firmware-sim: {e}");
            return ExitCode::from(2);
        }
    };
    let settings = RunSettings {
        host: config.mqtt.host.clone(),
        port: config.mqtt.port,
        keep_alive: config.mqtt.keep_alive,
        data_dir: config.run.data_dir.clone(),
        speed: config.run.speed,
        resend_per_second: config.run.resend_per_second,
        min_backoff: Duration::from_millis(200),
        max_backoff: Duration::from_secs(30),
    };
    let shutdown = CancellationToken::new();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        match seconds {
            Some(s) => tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(s)) => {}
                _ = liftwire_runtime::shutdown::signal() => {}
            },
            None => {
                liftwire_runtime::shutdown::signal().await;
            }
        }
        stop.cancel();
    });
    let (chaos_tx, chaos_rx) = tokio::sync::broadcast::channel(64);
    if !chaos.is_empty() {
        tokio::spawn(async move {
            tokio::time::sleep(chaos_at).await;
            for command in chaos {
                tracing::info!(?command, "starting chaos");
                let _ = chaos_tx.send(command);
            }
        });
    }
    match liftwire_firmware_sim::run::run_fleet_with_chaos(
        &config.fleet,
        settings,
        config.registry.database_url.as_deref(),
        chaos_rx,
        shutdown,
    )
    .await
    {
        Ok(outboxes) => {
            let pending: usize = outboxes.iter().map(|o| o.len()).sum();
            tracing::info!(
                devices = outboxes.len(),
                unconfirmed = pending,
                "fleet stopped; unconfirmed messages stay in the outboxes"
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "fleet failed");
            ExitCode::FAILURE
        }
    }
}

async fn load(
    mut settings: liftwire_firmware_sim::load::LoadConfig,
    config: Config,
    json: bool,
    no_auth: bool,
) -> ExitCode {
    if !no_auth {
        // Provision (or reuse) the load devices' credentials through the gateway's registry.
        let registry = match config.registry.database_url.as_deref() {
            Some(url) => match sqlx::postgres::PgPoolOptions::new().connect_lazy(url) {
                Ok(pool) => Some(liftwire_gateway::registry::Registry::new(
                    pool,
                    Duration::from_secs(5),
                )),
                Err(e) => {
                    eprintln!("firmware-sim: registry database: {e}");
                    return ExitCode::FAILURE;
                }
            },
            None => None,
        };
        let mut secrets = std::collections::HashMap::new();
        for d in 1..=settings.devices {
            let id = liftwire_firmware_sim::load::device_id(&settings.building, d);
            let (Ok(device), Ok(building)) = (
                DeviceId::new(id.clone()),
                liftwire_proto::naming::BuildingId::new(settings.building.clone()),
            ) else {
                eprintln!("firmware-sim: invalid load device id {id}");
                return ExitCode::from(2);
            };
            match liftwire_firmware_sim::run::secret_for(
                &config.run.data_dir,
                registry.as_ref(),
                &building,
                &device,
                liftwire_gateway::acl::DeviceKind::Elevator,
            )
            .await
            {
                Ok(secret) => {
                    secrets.insert(id, secret);
                }
                Err(e) => {
                    eprintln!("firmware-sim: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        if let liftwire_firmware_sim::load::Publisher::Mqtt { secrets: s, .. } =
            &mut settings.publisher
        {
            *s = Some(secrets);
        }
    }
    match liftwire_firmware_sim::load::run(settings, |line| eprintln!("{line}")).await {
        Ok(report) => {
            if json {
                match serde_json::to_string_pretty(&report) {
                    Ok(text) => println!("{text}"),
                    Err(e) => eprintln!("firmware-sim: {e}"),
                }
            } else {
                println!("{}", report.table());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("firmware-sim: {e}");
            ExitCode::FAILURE
        }
    }
}
