//! The gateway side by side with nats-server's own MQTT listener, in one run (a measurement, not
//! a timed test).
//!
//! ```text
//! cargo bench -p liftwire-firmware-sim --bench mqtt
//! cargo bench -p liftwire-firmware-sim --bench mqtt -- --devices 100,1000 --rates 10000,20000,30000,40000,60000,80000,100000 --seconds 2 --repeat 2
//! ```
//!
//! Systems, each on fresh processes for every (devices, QoS) series, pinned with `taskset` to the
//! system-under-test cores (`--sut-cpus`, default 0) while this process, the load generator and
//! every observer, runs on the others (`--load-cpus`, default 1):
//!
//! * **raw NATS**: devices publish straight to nats-server (the ceiling of the NATS side; QoS 0
//!   only), plus one publisher → one subscriber blast for the pure pub/sub ceiling;
//! * **mosquitto**: a pure MQTT broker, observed by an MQTT subscriber (skipped if `mosquitto` is
//!   not installed: `deploy/setup.sh --bench` installs it);
//! * **native**: nats-server with JetStream and its built-in MQTT listener, observed on the NATS
//!   subjects it maps topics to and, for QoS 1, in its `$MQTT_msgs` stream;
//! * **gateway**: the liftwire gateway (this benchmark's own binary re-executed as the gateway,
//!   same library and release profile as `liftwire-gateway`) with device authentication against
//!   its PostgreSQL registry, in front of a plain nats-server with JetStream; observed on the
//!   bridged subjects and, once stored, in the `LW_UPLINK` stream. Both share the SUT cores. It
//!   traces a share `--trace-sample-ratio` (default 0.01) of device messages, as a deployment at
//!   these rates would; its spans go to no exporter.
//!
//! Workload: `liftwire-firmware-sim`'s load mode (see `load.rs`): N devices, one connection each,
//! ~200-byte telemetry envelopes, open loop at a fixed total rate, latency from the scheduled
//! send time to arrival, loss from per-device sequence numbers, PUBACK latency for QoS 1. Each
//! step first sends one second of warm-up, checked for loss but left out of the latencies. Rates
//! step up until a step loses messages, falls behind (p99 above 500 ms) or the generator itself
//! cannot keep the rate (or is over 90% busy).
//!
//! Also per system: CPU seconds of the SUT processes per 10k messages (at the first rate), RSS per
//! 1,000 idle connections, and a connect/disconnect storm: `--storm` (default 1000) QoS 1 clients
//! connect at once and subscribe to their downlink, all disconnect at once, then all reconnect at
//! once; failures and the time until every client is back are reported.
//!
//! Last, what the throughput targets (QoS 1 at twice native's, QoS 0 at native's) leave per
//! message: the SUT cores' time divided by the target rate, next to what nats-server alone
//! spends storing a message the way the gateway stores it (a fresh nats-server on the SUT cores,
//! one pipelined publisher on the load cores, `LW_UPLINK`'s settings and the gateway's headers:
//! the most it could store if the gateway cost nothing), and each system's CPU per message at
//! its highest rate held.

// A failed setup (server start, provisioning) aborts the benchmark: panicking is the intended
// failure mode here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use liftwire_firmware_sim::load::{self, LoadConfig, LoadReport, Observe, Observer, Publisher};
use liftwire_gateway::acl::DeviceKind;
use liftwire_gateway::registry::{self, Registry};
use liftwire_proto::naming::{
    uplink_msg_id, BuildingId, DeviceId, Uplink, UplinkKind, UPLINK_STREAM,
};
use liftwire_runtime::observability::inject_unsampled_trace_context;
use liftwire_testkit::process::{find_binary, free_port, wait_for_port, ServerProcess};
use liftwire_testkit::Postgres;
use rumqttc::{
    AsyncClient, ConnectionError, Event, Incoming, MqttOptions, QoS, SubscribeReasonCode,
};
use tempfile::TempDir;
use tokio_util::sync::CancellationToken;

const USAGE: &str = "usage: cargo bench -p liftwire-firmware-sim --bench mqtt -- \
    [--devices 100,1000] [--rates 10000,20000,30000,40000,60000,80000,100000] [--qos 0,1] [--seconds 2] [--repeat 2] \
    [--systems raw,mosquitto,native,gateway] [--storm 1000 (0: no storm)] [--payload-bytes 200] \
    [--sut-cpus 0] [--load-cpus 1] [--trace-sample-ratio 0.01]";

/// The building all benchmark devices belong to.
const BUILDING: &str = "bench";
/// Longest a storm phase may take before it is reported as not recovered.
const STORM_LIMIT: Duration = Duration::from_secs(60);
/// Load runs so far (each gets its own sequence numbers).
static RUNS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
/// A step holds only if every observer's p99 latency stays below this.
const HELD_P99_MS: f64 = 500.0;
/// Sent at the start of every step before latencies count (loss still counts): fresh processes
/// otherwise spend the first few hundred milliseconds growing buffers and caches, and with short
/// steps that start-up, not the steady state, decides the p99.
const WARMUP: Duration = Duration::from_secs(1);
/// Messages in the raw pub→sub blast.
const BLAST_MESSAGES: u64 = 1_000_000;
/// Messages in the JetStream store ceiling run.
const CEILING_MESSAGES: u64 = 200_000;
/// Publishes awaiting their JetStream ack at once in the store ceiling run.
const CEILING_WINDOW: usize = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum System {
    Raw,
    Mosquitto,
    Native,
    Gateway,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Raw => "raw NATS",
            System::Mosquitto => "mosquitto",
            System::Native => "nats-server MQTT",
            System::Gateway => "liftwire gateway",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "raw" => System::Raw,
            "mosquitto" => System::Mosquitto,
            "native" => System::Native,
            "gateway" => System::Gateway,
            _ => return None,
        })
    }
}

struct Args {
    devices: Vec<u32>,
    rates: Vec<u32>,
    qos: Vec<u8>,
    seconds: u64,
    repeat: usize,
    systems: Vec<System>,
    storm: u32,
    payload_bytes: usize,
    sut_cpus: String,
    load_cpus: String,
    /// The gateway's `trace_sample_ratio`: the share of device messages it traces.
    trace_sample_ratio: f64,
}

/// Why the command line was not run: help was asked for, or an argument is wrong.
enum ArgsError {
    Help,
    Invalid(String),
}

fn parse<T: std::str::FromStr>(flag: &str, value: &str) -> Result<T, ArgsError> {
    value
        .trim()
        .parse()
        .map_err(|_| ArgsError::Invalid(format!("{flag}: cannot read {value:?}")))
}

fn list<T: std::str::FromStr>(flag: &str, value: &str) -> Result<Vec<T>, ArgsError> {
    value.split(',').map(|v| parse(flag, v)).collect()
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, ArgsError> {
    let mut parsed = Args {
        devices: vec![100, 1000],
        rates: vec![10_000, 20_000, 30_000, 40_000, 60_000, 80_000, 100_000],
        qos: vec![0, 1],
        seconds: 2,
        repeat: 2,
        systems: vec![
            System::Raw,
            System::Mosquitto,
            System::Native,
            System::Gateway,
        ],
        storm: 1000,
        payload_bytes: 200,
        sut_cpus: "0".into(),
        load_cpus: "1".into(),
        trace_sample_ratio: 0.01,
    };
    while let Some(flag) = args.next() {
        // cargo bench passes --bench to harness-less benchmarks.
        if flag == "--bench" {
            continue;
        }
        if flag == "--help" || flag == "-h" {
            return Err(ArgsError::Help);
        }
        let value = args
            .next()
            .ok_or_else(|| ArgsError::Invalid(format!("{flag} needs a value")))?;
        match flag.as_str() {
            "--devices" => parsed.devices = list(&flag, &value)?,
            "--rates" => parsed.rates = list(&flag, &value)?,
            "--qos" => parsed.qos = list(&flag, &value)?,
            "--seconds" => parsed.seconds = parse(&flag, &value)?,
            "--repeat" => parsed.repeat = parse::<usize>(&flag, &value)?.max(1),
            "--systems" => {
                parsed.systems = value
                    .split(',')
                    .map(|s| {
                        System::parse(s.trim())
                            .ok_or_else(|| ArgsError::Invalid(format!("unknown system {s:?}")))
                    })
                    .collect::<Result<_, _>>()?
            }
            "--storm" => parsed.storm = parse(&flag, &value)?,
            "--payload-bytes" => parsed.payload_bytes = parse(&flag, &value)?,
            "--sut-cpus" => parsed.sut_cpus = value,
            "--load-cpus" => parsed.load_cpus = value,
            "--trace-sample-ratio" => parsed.trace_sample_ratio = parse(&flag, &value)?,
            _ => return Err(ArgsError::Invalid(format!("unknown argument {flag}"))),
        }
    }
    Ok(parsed)
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().map(String::as_str) == Some("--serve-gateway") {
        // Child mode: this binary is the gateway under test.
        let config = args.nth(1).map(PathBuf::from);
        let config = match liftwire_runtime::service::load_config::<liftwire_gateway::Gateway>(
            config.as_deref(),
        ) {
            Ok(config) => config,
            Err(code) => return code,
        };
        return liftwire_runtime::service::block_on(liftwire_runtime::service::serve::<
            liftwire_gateway::Gateway,
        >(config));
    }
    let args = match parse_args(args) {
        Ok(args) => args,
        Err(ArgsError::Help) => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(ArgsError::Invalid(error)) => {
            eprintln!("{error}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    // Pin the load generator before the runtime starts, so every worker thread inherits it.
    let pinned = Command::new("taskset")
        .args([
            "-a",
            "-p",
            "-c",
            &args.load_cpus,
            &std::process::id().to_string(),
        ])
        .output()
        .is_ok_and(|o| o.status.success());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(bench(args, pinned));
    ExitCode::SUCCESS
}

// ---------------------------------------------------------------------------------------------
// Process statistics.

/// Resident set size of `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let online = std::fs::read_to_string("/sys/devices/system/cpu/online").unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{model}; CPUs online {}; this process may use {cores}; Linux {}",
        online.trim(),
        kernel.trim()
    )
}

fn version(binary: &Path, flag: &str) -> String {
    Command::new(binary)
        .arg(flag)
        .output()
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stdout).to_string()
                + &String::from_utf8_lossy(&o.stderr);
            text.lines().next().unwrap_or("").trim().to_owned()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// Systems under test.

/// A running system under test.
struct Sut {
    processes: Vec<ServerProcess>,
    /// What each of `processes` is, in the same order.
    names: Vec<&'static str>,
    publisher: Publisher,
    observers: Vec<Observer>,
    /// The MQTT listener devices connect to (none for raw NATS).
    mqtt: Option<SocketAddr>,
    _dir: TempDir,
}

impl Sut {
    fn pids(&self) -> Vec<u32> {
        self.processes
            .iter()
            .filter_map(ServerProcess::id)
            .collect()
    }

    /// CPU seconds used so far by each process, in the order of `processes`.
    fn cpu(&self) -> Vec<f64> {
        self.processes
            .iter()
            .map(|p| {
                p.id()
                    .and_then(|pid| load::cpu_seconds(&pid.to_string()))
                    .unwrap_or(0.0)
            })
            .collect()
    }

    fn rss_kib(&self) -> u64 {
        self.pids().into_iter().map(rss_kib).sum()
    }
}

/// What every system needs.
struct Env {
    sut_cpus: String,
    /// The gateway's `trace_sample_ratio`.
    trace_sample_ratio: f64,
    nats_server: PathBuf,
    mosquitto: Option<PathBuf>,
    /// The gateway's registry database and the provisioned secrets.
    registry_url: String,
    secrets: HashMap<String, String>,
    _postgres: Postgres,
}

fn pinned(env: &Env, binary: &Path) -> Command {
    let mut cmd = Command::new("taskset");
    cmd.arg("-c").arg(&env.sut_cpus).arg(binary);
    cmd
}

/// Starts `cmd` (built with [`pinned`]), logging to `log`, and waits until `name` listens on
/// every port of `ports`.
fn start_pinned(cmd: Command, log: &Path, name: &'static str, ports: &[u16]) -> ServerProcess {
    let mut process = ServerProcess::spawn(cmd, log, None, libc::SIGTERM).unwrap();
    for &port in ports {
        wait_for_port(
            name,
            &mut process,
            SocketAddr::from(([127, 0, 0, 1], port)),
            Duration::from_secs(30),
        )
        .unwrap();
    }
    process
}

fn start_nats(env: &Env, dir: &Path, mqtt_port: Option<u16>) -> (ServerProcess, u16) {
    let port = free_port().unwrap();
    let mqtt = mqtt_port
        .map(|p| format!("mqtt {{\n  listen: \"127.0.0.1:{p}\"\n}}\n"))
        .unwrap_or_default();
    let config = dir.join("nats.conf");
    std::fs::write(
        &config,
        format!(
            "server_name: liftwire_bench\nlisten: \"127.0.0.1:{port}\"\nmax_payload: 1MB\n\
             jetstream {{\n  store_dir: {:?}\n  max_memory_store: 1GB\n  max_file_store: 8GB\n}}\n{mqtt}",
            dir.join("jetstream")
        ),
    )
    .unwrap();
    let mut cmd = pinned(env, &env.nats_server);
    cmd.arg("--config").arg(&config);
    let ports: Vec<u16> = std::iter::once(port).chain(mqtt_port).collect();
    let process = start_pinned(cmd, &dir.join("nats.log"), "nats-server", &ports);
    (process, port)
}

fn nats_observer(url: &str, subject: String) -> Observer {
    Observer {
        name: "nats".into(),
        at: Observe::Nats {
            url: url.into(),
            subject,
        },
    }
}

fn jetstream_observer(url: &str, stream: &str, subject: String) -> Observer {
    Observer {
        name: "jetstream".into(),
        at: Observe::JetStream {
            url: url.into(),
            stream: stream.into(),
            subject,
        },
    }
}

async fn start(env: &Env, system: System, qos: u8) -> Sut {
    let dir = tempfile::Builder::new()
        .prefix("liftwire-mqtt-bench-")
        .tempdir()
        .unwrap();
    match system {
        System::Raw => {
            let (nats, port) = start_nats(env, dir.path(), None);
            let url = format!("nats://127.0.0.1:{port}");
            Sut {
                processes: vec![nats],
                names: vec!["nats-server"],
                publisher: Publisher::Nats { url: url.clone() },
                observers: vec![nats_observer(
                    &url,
                    format!("lw.v1.up.{BUILDING}.*.telemetry"),
                )],
                mqtt: None,
                _dir: dir,
            }
        }
        System::Mosquitto => {
            let port = free_port().unwrap();
            let config = dir.path().join("mosquitto.conf");
            std::fs::write(
                &config,
                format!(
                    "user root\nlistener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                     max_queued_messages 100000\nmax_inflight_messages 1000\nlog_type error\n"
                ),
            )
            .unwrap();
            let binary = env.mosquitto.clone().expect("mosquitto is installed");
            let mut cmd = pinned(env, &binary);
            cmd.arg("-c").arg(&config);
            let process =
                start_pinned(cmd, &dir.path().join("mosquitto.log"), "mosquitto", &[port]);
            Sut {
                processes: vec![process],
                names: vec!["mosquitto"],
                publisher: Publisher::Mqtt {
                    host: "127.0.0.1".into(),
                    port,
                    secrets: None,
                },
                observers: vec![Observer {
                    name: "mqtt".into(),
                    at: Observe::Mqtt {
                        host: "127.0.0.1".into(),
                        port,
                        topic: format!("lw/v1/{BUILDING}/+/up/telemetry"),
                    },
                }],
                mqtt: Some(SocketAddr::from(([127, 0, 0, 1], port))),
                _dir: dir,
            }
        }
        System::Native => {
            let mqtt_port = free_port().unwrap();
            let (nats, port) = start_nats(env, dir.path(), Some(mqtt_port));
            let url = format!("nats://127.0.0.1:{port}");
            let mut observers = vec![nats_observer(
                &url,
                format!("lw.v1.{BUILDING}.*.up.telemetry"),
            )];
            if qos > 0 {
                // nats-server creates its MQTT streams with the first MQTT connection.
                ensure_native_streams(mqtt_port).await;
                observers.push(jetstream_observer(
                    &url,
                    "$MQTT_msgs",
                    format!("$MQTT.msgs.lw.v1.{BUILDING}.*.up.telemetry"),
                ));
            }
            Sut {
                processes: vec![nats],
                names: vec!["nats-server"],
                publisher: Publisher::Mqtt {
                    host: "127.0.0.1".into(),
                    port: mqtt_port,
                    secrets: None,
                },
                observers,
                mqtt: Some(SocketAddr::from(([127, 0, 0, 1], mqtt_port))),
                _dir: dir,
            }
        }
        System::Gateway => {
            let (nats, port) = start_nats(env, dir.path(), None);
            let url = format!("nats://127.0.0.1:{port}");
            let mqtt_port = free_port().unwrap();
            let config = dir.path().join("gateway.toml");
            std::fs::write(
                &config,
                format!(
                    "gateway_id = \"bench\"\n\
                     [runtime.observability]\nlog_filter = \"warn\"\ntrace_sample_ratio = {:?}\n\
                     [nats]\nurl = \"{url}\"\n\
                     [database]\nurl = \"{}\"\n\
                     [mqtt]\nlisten = \"127.0.0.1:{mqtt_port}\"\n\
                     rate_limit_per_second = 1000000.0\nrate_limit_burst = 1000000.0\n",
                    env.trace_sample_ratio, env.registry_url
                ),
            )
            .unwrap();
            let mut cmd = pinned(env, &std::env::current_exe().unwrap());
            cmd.arg("--serve-gateway").arg(&config);
            let gateway = start_pinned(
                cmd,
                &dir.path().join("gateway.log"),
                "gateway",
                &[mqtt_port],
            );
            Sut {
                processes: vec![gateway, nats],
                names: vec!["gateway", "nats-server"],
                publisher: Publisher::Mqtt {
                    host: "127.0.0.1".into(),
                    port: mqtt_port,
                    secrets: Some(env.secrets.clone()),
                },
                observers: vec![
                    nats_observer(&url, format!("lw.v1.up.{BUILDING}.*.telemetry")),
                    jetstream_observer(
                        &url,
                        "LW_UPLINK",
                        format!("lw.v1.up.{BUILDING}.*.telemetry"),
                    ),
                ],
                mqtt: Some(SocketAddr::from(([127, 0, 0, 1], mqtt_port))),
                _dir: dir,
            }
        }
    }
}

/// Connects one MQTT client once, so that nats-server sets up its MQTT JetStream streams.
async fn ensure_native_streams(port: u16) {
    let options = MqttOptions::new("bench-setup", "127.0.0.1", port);
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    let connected = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Incoming::ConnAck(_))) => return true,
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    })
    .await
    .unwrap_or(false);
    assert!(
        connected,
        "nats-server's MQTT listener did not accept a client"
    );
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await;
}

// ---------------------------------------------------------------------------------------------
// Measurements.

/// One load run against a system.
struct Point {
    system: System,
    devices: u32,
    qos: u8,
    rate: u32,
    report: LoadReport,
    /// CPU seconds of each SUT process during the run, named.
    cpu_s: Vec<(&'static str, f64)>,
    /// The load generator's own CPU use during the run, in cores (it has one).
    load_busy: f64,
}

impl Point {
    /// The generator kept the rate with CPU to spare (else the step says nothing about the
    /// system under test).
    fn offered(&self) -> bool {
        self.report.offered_rate >= 0.95 * f64::from(self.rate) && self.load_busy < 0.9
    }

    /// Every observer got every message once, without falling behind: in an open loop a
    /// system that cannot keep up queues, and its p99 grows towards the run's length.
    fn held(&self) -> bool {
        self.offered()
            && self
                .report
                .tiers
                .iter()
                .all(|t| t.lost == 0 && t.duplicates == 0 && t.latency.p99_ms < HELD_P99_MS)
    }

    fn cpu_per_10k(&self) -> f64 {
        self.cpu_us_per_message(|_| true) / 100.0
    }

    /// CPU microseconds per message received of the SUT processes `which` selects by name.
    fn cpu_us_per_message(&self, which: impl Fn(&str) -> bool) -> f64 {
        let received = self.report.primary().map_or(0, |t| t.received);
        if received == 0 {
            return f64::NAN;
        }
        let cpu: f64 = self
            .cpu_s
            .iter()
            .filter(|(name, _)| which(name))
            .map(|(_, s)| s)
            .sum();
        cpu / received as f64 * 1e6
    }
}

/// A step (the repetitions of one rate) holds when most of its runs held.
fn majority_held<'a>(runs: impl IntoIterator<Item = &'a Point>) -> bool {
    let (mut held, mut all) = (0, 0);
    for run in runs {
        all += 1;
        held += usize::from(run.held());
    }
    held * 2 > all
}

async fn run_point(
    sut: &Sut,
    system: System,
    devices: u32,
    qos: u8,
    rate: u32,
    seconds: u64,
    payload_bytes: usize,
) -> Option<Point> {
    let config = LoadConfig {
        publisher: sut.publisher.clone(),
        observers: sut.observers.clone(),
        devices,
        rate,
        qos,
        payload_bytes,
        // The warm-up is sent first, on top of the measured seconds.
        duration: Duration::from_secs(seconds) + WARMUP,
        warmup: WARMUP,
        building: BUILDING.into(),
        connect_timeout: Duration::from_secs(60),
        drain: Duration::from_secs(5),
        // Each run on the same servers gets its own sequence numbers.
        seq_base: u64::from(RUNS.fetch_add(1, Ordering::Relaxed)) * 1_000_000,
    };
    let before = sut.cpu();
    match load::run(config, |_| {}).await {
        Ok(report) => Some(Point {
            system,
            devices,
            qos,
            rate,
            cpu_s: sut
                .names
                .iter()
                .zip(sut.cpu())
                .zip(before)
                .map(|((&name, after), before)| (name, after - before))
                .collect(),
            load_busy: report.generator_busy.unwrap_or(0.0),
            report,
        }),
        Err(e) => {
            eprintln!(
                "  {} n={devices} qos{qos} {rate}/s: run failed: {e}",
                system.name()
            );
            None
        }
    }
}

/// A connect/disconnect storm and the idle memory per connection.
#[derive(Debug, Default)]
struct Storm {
    first: Phase,
    reconnect: Phase,
    /// RSS growth per 1,000 idle connections without subscriptions.
    kib_per_1k_connected: f64,
    /// RSS growth per 1,000 idle connections, each with its QoS 1 downlink subscription.
    kib_per_1k_subscribed: f64,
}

#[derive(Debug, Default)]
struct Phase {
    /// Failed connects or subscriptions (each retried after 500 ms).
    failures: u64,
    /// Until every client is connected and subscribed; `None` if not within the limit.
    all_ready: Option<Duration>,
}

/// One storm client: connects, subscribes QoS 1 to its downlink (if `subscribe`), reports
/// ready, holds the connection until `release`, then disconnects.
async fn storm_client(
    addr: SocketAddr,
    id: String,
    secret: Option<String>,
    subscribe: bool,
    ready: Arc<AtomicUsize>,
    failures: Arc<AtomicU64>,
    release: CancellationToken,
) {
    let mut options = MqttOptions::new(id.clone(), addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(60));
    options.set_clean_session(true);
    if let Some(secret) = secret {
        options.set_credentials(id.clone(), secret);
    }
    let (client, mut eventloop) = AsyncClient::new(options, 10);
    let topic = format!("lw/v1/{BUILDING}/{id}/down/+");
    let mut is_ready = false;
    loop {
        tokio::select! {
            event = eventloop.poll() => match event {
                Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                    if subscribe {
                        let _ = client.try_subscribe(topic.clone(), QoS::AtLeastOnce);
                    } else if !is_ready {
                        is_ready = true;
                        ready.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(Event::Incoming(Incoming::SubAck(ack))) => {
                    if ack.return_codes.iter().all(|c| matches!(c, SubscribeReasonCode::Success(_))) {
                        if !is_ready {
                            is_ready = true;
                            ready.fetch_add(1, Ordering::Relaxed);
                        }
                    } else {
                        failures.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        let _ = client.try_subscribe(topic.clone(), QoS::AtLeastOnce);
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if is_ready {
                        is_ready = false;
                        ready.fetch_sub(1, Ordering::Relaxed);
                    }
                    if !matches!(e, ConnectionError::RequestsDone) {
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            },
            _ = release.cancelled() => break,
        }
    }
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        loop {
            if eventloop.poll().await.is_err() {
                break;
            }
        }
    })
    .await;
}

/// Starts `n` storm clients at once and waits until all are ready (or the limit).
async fn storm_phase(
    env: &Env,
    addr: SocketAddr,
    n: u32,
    authenticated: bool,
    subscribe: bool,
) -> (Phase, CancellationToken, tokio::task::JoinSet<()>) {
    let ready = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(AtomicU64::new(0));
    let release = CancellationToken::new();
    let mut clients = tokio::task::JoinSet::new();
    let started = Instant::now();
    for d in 1..=n {
        let id = load::device_id(BUILDING, d);
        let secret = authenticated
            .then(|| env.secrets.get(&id).cloned())
            .flatten();
        clients.spawn(storm_client(
            addr,
            id,
            secret,
            subscribe,
            ready.clone(),
            failures.clone(),
            release.clone(),
        ));
    }
    let mut all_ready = None;
    while started.elapsed() < STORM_LIMIT {
        if ready.load(Ordering::Relaxed) >= n as usize {
            all_ready = Some(started.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (
        Phase {
            failures: failures.load(Ordering::Relaxed),
            all_ready,
        },
        release,
        clients,
    )
}

/// Disconnects every storm client of a phase and waits until they are gone.
async fn hang_up(release: CancellationToken, mut clients: tokio::task::JoinSet<()>) {
    release.cancel();
    while clients.join_next().await.is_some() {}
}

async fn storm(env: &Env, sut: &Sut, n: u32, authenticated: bool) -> Storm {
    let addr = sut.mqtt.expect("an MQTT system");
    let per_1k =
        |before: u64, after: u64| after.saturating_sub(before) as f64 / f64::from(n) * 1000.0;
    // Idle connections alone: connect, let buffers settle, measure, leave.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before = sut.rss_kib();
    let (_, release, clients) = storm_phase(env, addr, n, authenticated, false).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let kib_per_1k_connected = per_1k(rss_before, sut.rss_kib());
    hang_up(release, clients).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // The storm: everyone connects and subscribes at once...
    let rss_before = sut.rss_kib();
    let (first, release, clients) = storm_phase(env, addr, n, authenticated, true).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let kib_per_1k_subscribed = per_1k(rss_before, sut.rss_kib());
    // ...everyone disconnects at once, and comes back at once.
    hang_up(release, clients).await;
    let (reconnect, release, clients) = storm_phase(env, addr, n, authenticated, true).await;
    hang_up(release, clients).await;
    Storm {
        first,
        reconnect,
        kib_per_1k_connected,
        kib_per_1k_subscribed,
    }
}

/// One publisher blasting as fast as it can at one subscriber on a fresh nats-server: messages
/// received per second, from the first publish to the last arrival.
async fn blast(env: &Env, payload_bytes: usize) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let (_nats, port) = start_nats(env, dir.path(), None);
    let url = format!("nats://127.0.0.1:{port}");
    let subscriber = async_nats::ConnectOptions::new()
        .subscription_capacity(1 << 20)
        .connect(&url)
        .await
        .unwrap();
    let mut subscription = subscriber.subscribe("bench.blast").await.unwrap();
    subscriber.flush().await.unwrap();
    let publisher = async_nats::connect(&url).await.unwrap();
    let payload = bytes::Bytes::from(vec![7u8; payload_bytes]);
    let started = Instant::now();
    let receiving = tokio::spawn(async move {
        let (mut n, mut last) = (0u64, Instant::now());
        while n < BLAST_MESSAGES {
            match tokio::time::timeout(Duration::from_secs(2), subscription.next()).await {
                Ok(Some(_)) => {
                    n += 1;
                    last = Instant::now();
                }
                _ => break,
            }
        }
        (n, last)
    });
    for _ in 0..BLAST_MESSAGES {
        publisher
            .publish("bench.blast", payload.clone())
            .await
            .unwrap();
    }
    publisher.flush().await.unwrap();
    let (received, last) = receiving.await.unwrap_or((0, started));
    if received < BLAST_MESSAGES {
        eprintln!(
            "  raw blast: {} of {BLAST_MESSAGES} arrived (slow consumer)",
            received
        );
    }
    received as f64 / last.duration_since(started).as_secs_f64()
}

/// What nats-server alone can store on the SUT cores the way the gateway stores uplink.
struct Ceiling {
    /// Messages stored (acknowledged) per second.
    rate: f64,
    /// nats-server's CPU microseconds per stored message.
    us_per_message: f64,
    /// nats-server's CPU use during the run, in cores.
    busy: f64,
}

/// One publisher on the load cores storing [`CEILING_MESSAGES`] into a stream set up as the
/// gateway sets up `LW_UPLINK`, on a fresh nats-server on the SUT cores, each publish as the
/// gateway's: a device subject, `Nats-Msg-Id` `{device}:{seq}` over `devices` devices and an
/// unsampled `traceparent`, [`CEILING_WINDOW`] awaiting their ack at once. This is the most the
/// gateway's nats-server could store if the gateway cost nothing.
async fn store_ceiling(env: &Env, devices: u32, payload_bytes: usize) -> Ceiling {
    let dir = tempfile::tempdir().unwrap();
    let (nats, port) = start_nats(env, dir.path(), None);
    let config = liftwire_runtime::nats::NatsConfig {
        url: format!("nats://127.0.0.1:{port}"),
        ..Default::default()
    };
    let client = liftwire_runtime::nats::connect(&config, "bench-ceiling")
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client);
    liftwire_runtime::nats::ensure_stream(&js, &UPLINK_STREAM, &config)
        .await
        .unwrap();
    let building = BuildingId::new(BUILDING).unwrap();
    let targets: Vec<(String, DeviceId)> = (1..=devices.max(1))
        .map(|d| {
            let device = DeviceId::new(load::device_id(BUILDING, d)).unwrap();
            let uplink = Uplink {
                building: building.clone(),
                device: device.clone(),
                kind: UplinkKind::Telemetry,
            };
            (uplink.nats_subject(), device)
        })
        .collect();
    let payload = bytes::Bytes::from(vec![7u8; payload_bytes]);
    let pid = nats.id().unwrap().to_string();
    let cpu_before = load::cpu_seconds(&pid).unwrap_or(0.0);
    let started = Instant::now();
    let stored = futures::stream::iter(0..CEILING_MESSAGES)
        .map(|i| {
            let (subject, device) = &targets[(i % targets.len() as u64) as usize];
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(
                async_nats::header::NATS_MESSAGE_ID,
                uplink_msg_id(device, i / targets.len() as u64).as_str(),
            );
            inject_unsampled_trace_context(&mut headers);
            let publish = js.publish_with_headers(subject.clone(), headers, payload.clone());
            async move { publish.await.ok()?.await.ok().filter(|ack| !ack.duplicate) }
        })
        .buffer_unordered(CEILING_WINDOW)
        .filter(|ack| std::future::ready(ack.is_some()))
        .count()
        .await;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = load::cpu_seconds(&pid).unwrap_or(0.0) - cpu_before;
    if (stored as u64) < CEILING_MESSAGES {
        eprintln!("  store ceiling: {stored} of {CEILING_MESSAGES} stored");
    }
    Ceiling {
        rate: stored as f64 / elapsed,
        us_per_message: cpu / stored.max(1) as f64 * 1e6,
        busy: cpu / elapsed,
    }
}

// ---------------------------------------------------------------------------------------------
// The run and the tables.

fn median(mut values: Vec<f64>) -> f64 {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn spread(values: &[f64]) -> String {
    let finite: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if finite.is_empty() {
        return "–".into();
    }
    let min = finite.iter().copied().fold(f64::INFINITY, f64::min);
    let max = finite.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{} ({}–{})", ms(median(finite.clone())), ms(min), ms(max))
}

fn ms(v: f64) -> String {
    if !v.is_finite() {
        "–".into()
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn thousands(v: f64) -> String {
    if !v.is_finite() {
        return "–".into();
    }
    format!("{:.1}k", v / 1000.0)
}

fn ratio(ours: f64, theirs: f64) -> String {
    if ours.is_finite() && theirs.is_finite() && theirs > 0.0 {
        format!("{:.2}×", ours / theirs)
    } else {
        "–".into()
    }
}

async fn bench(args: Args, pinned: bool) {
    let nats_server = find_binary("nats-server", &[]).unwrap_or_else(|e| panic!("{e}"));
    let mosquitto = find_binary("mosquitto", &[PathBuf::from("/usr/sbin")]).ok();
    let mut systems = args.systems.clone();
    if mosquitto.is_none() && systems.contains(&System::Mosquitto) {
        eprintln!("mosquitto is not installed: skipping that baseline (deploy/setup.sh --bench installs it)");
        systems.retain(|s| *s != System::Mosquitto);
    }

    // The gateway's registry: every benchmark device provisioned once.
    let postgres = Postgres::start().await.unwrap();
    let registry_url = postgres.create_database("bench_registry").await.unwrap();
    let pool = sqlx::PgPool::connect(&registry_url).await.unwrap();
    registry::migrate(&pool).await.unwrap();
    let registry = Registry::new(pool.clone(), Duration::from_secs(5));
    let building = BuildingId::new(BUILDING).unwrap();
    let most = args
        .devices
        .iter()
        .copied()
        .chain([args.storm])
        .max()
        .unwrap_or(0);
    let mut secrets = HashMap::new();
    for d in 1..=most {
        let id = load::device_id(BUILDING, d);
        let secret = registry
            .provision(
                &building,
                &DeviceId::new(id.clone()).unwrap(),
                DeviceKind::Elevator,
            )
            .await
            .unwrap();
        secrets.insert(id, secret);
    }
    pool.close().await;
    let env = Env {
        sut_cpus: args.sut_cpus.clone(),
        trace_sample_ratio: args.trace_sample_ratio,
        nats_server: nats_server.clone(),
        mosquitto: mosquitto.clone(),
        registry_url,
        secrets,
        _postgres: postgres,
    };

    println!("## MQTT ingest: liftwire gateway vs nats-server's MQTT listener\n");
    println!("- machine: {}", machine());
    println!(
        "- pinning: systems under test on CPU {}, load generator and observers on CPU {}{}",
        args.sut_cpus,
        args.load_cpus,
        if pinned {
            ""
        } else {
            " (taskset failed: NOT pinned)"
        }
    );
    println!(
        "- {}; {}",
        version(&nats_server, "--version"),
        mosquitto
            .as_deref()
            .map_or("mosquitto not installed".into(), |m| version(m, "-h"))
    );
    println!(
        "- workload: {:?} devices, {}-byte telemetry envelopes, rates {:?} msg/s for {} s each after a 1 s warm-up, {} repetition(s)",
        args.devices, args.payload_bytes, args.rates, args.seconds, args.repeat
    );
    println!(
        "- the gateway traces a share {} of device messages (`trace_sample_ratio`; no exporter)\n",
        args.trace_sample_ratio
    );

    let mut points: Vec<Point> = Vec::new();
    for &system in &systems {
        for &devices in &args.devices {
            for &qos in &args.qos {
                if system == System::Raw && qos > 0 {
                    continue;
                }
                let sut = start(&env, system, qos).await;
                for &rate in &args.rates {
                    let mut step = Vec::new();
                    for _ in 0..args.repeat {
                        if let Some(point) = run_point(
                            &sut,
                            system,
                            devices,
                            qos,
                            rate,
                            args.seconds,
                            args.payload_bytes,
                        )
                        .await
                        {
                            eprintln!(
                                "  {:<17} n={devices:<5} qos{qos} {rate:>6}/s: offered {:>7.0}/s (generator {:.0}% busy), {} {}",
                                system.name(),
                                point.report.offered_rate,
                                point.load_busy * 100.0,
                                point.report.tiers.iter().map(|t| format!("{} lost {} p99 {:.1} ms", t.name, t.lost, t.latency.p99_ms)).collect::<Vec<_>>().join("; "),
                                if point.held() { "held" } else if !point.offered() { "GENERATOR LIMIT" } else { "FAILED" }
                            );
                            step.push(point);
                        }
                        tokio::time::sleep(Duration::from_millis(300)).await;
                    }
                    let held = majority_held(&step);
                    let generator_limited = step.iter().any(|p| !p.offered());
                    points.extend(step);
                    if !held || generator_limited {
                        break;
                    }
                }
            }
        }
    }

    let mut storms = Vec::new();
    for &system in &systems {
        if system == System::Raw || args.storm == 0 {
            continue;
        }
        let sut = start(&env, system, 1).await;
        let result = storm(&env, &sut, args.storm, system == System::Gateway).await;
        eprintln!("  {:<17} storm: {result:?}", system.name());
        if result.first.failures + result.reconnect.failures > 0 {
            for process in &sut.processes {
                eprintln!("    log tail:\n{}", process.log_tail(15));
            }
        }
        storms.push((system, result));
    }
    let blast_rate = if systems.contains(&System::Raw) {
        Some(blast(&env, args.payload_bytes).await)
    } else {
        None
    };
    let ceiling = if systems.contains(&System::Gateway) {
        let devices = args.devices.last().copied().unwrap_or(1000);
        Some(store_ceiling(&env, devices, args.payload_bytes).await)
    } else {
        None
    };

    print_tables(&args, &systems, &points, &storms, blast_rate);
    print_budget(&args, &points, ceiling);
}

/// The runs of `system` at `qos` in its highest step that held (most repetitions held, as in
/// the throughput table), over every device count: where its cost per message is lowest. Only
/// the runs that held count.
fn at_highest_held(points: &[Point], system: System, qos: u8) -> Vec<&Point> {
    let step = |devices: u32, rate: u32| {
        points.iter().filter(move |p| {
            p.system == system && p.qos == qos && p.devices == devices && p.rate == rate
        })
    };
    let step_held = |p: &Point| majority_held(step(p.devices, p.rate));
    let held = || {
        points
            .iter()
            .filter(move |p| p.system == system && p.qos == qos && p.held() && step_held(p))
    };
    let Some(top) = held().map(|p| p.rate).max() else {
        return Vec::new();
    };
    held().filter(|p| p.rate == top).collect()
}

/// How many CPUs a `taskset -c` list names (`0`, `0,2`, `0-3`).
fn cpu_count(list: &str) -> usize {
    list.split(',')
        .map(|part| match part.split_once('-') {
            Some((a, b)) => match (a.trim().parse::<usize>(), b.trim().parse::<usize>()) {
                (Ok(a), Ok(b)) if b >= a => b - a + 1,
                _ => 1,
            },
            None => 1,
        })
        .sum()
}

/// Selects SUT processes by name.
type ProcessFilter = fn(&str) -> bool;

/// What the throughput targets (QoS 1 at twice native's, QoS 0 at native's) leave per message,
/// next to what storing a message and handling one cost here.
fn print_budget(args: &Args, points: &[Point], ceiling: Option<Ceiling>) {
    let Some(ceiling) = ceiling else { return };
    let cores = cpu_count(&args.sut_cpus) as f64;
    println!("\n### What the throughput targets take\n");
    println!(
        "- nats-server alone, storing as the gateway stores every message it accepts (stream `LW_UPLINK`'s settings, a device subject, `Nats-Msg-Id` and `traceparent`; one publisher on the load core, {CEILING_WINDOW} acks outstanding): {} msg/s at {:.0}% of a core, {:.1} µs per message;",
        thousands(ceiling.rate),
        ceiling.busy * 100.0,
        ceiling.us_per_message,
    );
    let processes: [(System, &str, ProcessFilter); 4] = [
        (System::Gateway, "the gateway process", |n| n == "gateway"),
        (System::Gateway, "its nats-server", |n| n == "nats-server"),
        (System::Native, "native", |_| true),
        (System::Mosquitto, "mosquitto (stores nothing)", |_| true),
    ];
    for &qos in args.qos.iter().rev() {
        let (factor, what) = if qos == 0 {
            (1.0, "native's")
        } else {
            (2.0, "2 × native's")
        };
        let native = at_highest_held(points, System::Native, qos);
        let native_best = median(native.iter().map(|p| p.report.offered_rate).collect());
        let limited = points
            .iter()
            .any(|p| p.system == System::Native && p.qos == qos && !p.offered());
        let mut line = format!("- QoS {qos}, target {what} best");
        if native_best.is_finite() {
            let target = factor * native_best;
            let budget = cores * 1e6 / target;
            let left = budget - ceiling.us_per_message;
            line += &format!(
                " ({}{}) = {} msg/s: {budget:.1} µs of the SUT core{} per message for the gateway and its nats-server together; storing alone takes {:.1} µs, {}",
                thousands(native_best),
                if limited { ", or more: the generator's limit" } else { "" },
                thousands(target),
                if cores > 1.0 { "s" } else { "" },
                ceiling.us_per_message,
                if left > 0.0 {
                    format!("which leaves {left:.1} µs to handle the MQTT message")
                } else {
                    "more than the whole budget".into()
                },
            );
        } else {
            line += ": no native run held";
        }
        let spent: Vec<String> = processes
            .iter()
            .filter_map(|&(system, label, which)| {
                let at = at_highest_held(points, system, qos);
                let rate = at.first()?.rate;
                let us = median(at.iter().map(|p| p.cpu_us_per_message(which)).collect());
                us.is_finite()
                    .then(|| format!("{label} {us:.1} µs at {}/s", thousands(f64::from(rate))))
            })
            .collect();
        if !spent.is_empty() {
            line += &format!(
                ". CPU per message at each system's highest rate held: {}",
                spent.join("; ")
            );
        }
        println!("{line}.");
    }
}

fn print_tables(
    args: &Args,
    systems: &[System],
    points: &[Point],
    storms: &[(System, Storm)],
    blast_rate: Option<f64>,
) {
    let series = |system: System, devices: u32, qos: u8| -> Vec<&Point> {
        points
            .iter()
            .filter(|p| p.system == system && p.devices == devices && p.qos == qos)
            .collect()
    };
    // Highest rate at which the majority of repetitions held.
    let max_lossless = |s: &[&Point]| -> f64 {
        let mut best = f64::NAN;
        for &rate in &args.rates {
            let at: Vec<&&Point> = s.iter().filter(|p| p.rate == rate).collect();
            if at.is_empty() {
                break;
            }
            if majority_held(at.iter().map(|p| **p)) {
                best = median(at.iter().map(|p| p.report.offered_rate).collect());
            } else {
                break;
            }
        }
        best
    };
    let limited = |s: &[&Point]| s.iter().any(|p| !p.offered());

    println!(
        "### Max lossless throughput (msg/s; highest step that held, rates {:?})\n",
        args.rates
    );
    println!(
        "| devices | QoS | {} | gateway / native |",
        systems
            .iter()
            .map(|s| s.name())
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!("|---|---|{}---|", "--:|".repeat(systems.len()));
    for &devices in &args.devices {
        for &qos in &args.qos {
            let mut cells = Vec::new();
            let mut by: HashMap<System, f64> = HashMap::new();
            for &system in systems {
                let s = series(system, devices, qos);
                if s.is_empty() {
                    cells.push("–".to_owned());
                    continue;
                }
                let best = max_lossless(&s);
                by.insert(system, best);
                let top = args.rates.last().copied().unwrap_or(0);
                let suffix = if limited(&s) {
                    " (generator limit)"
                } else if s.iter().any(|p| p.rate == top && p.held()) {
                    "+"
                } else {
                    ""
                };
                cells.push(format!("{}{suffix}", thousands(best)));
            }
            println!(
                "| {devices} | {qos} | {} | {} |",
                cells.join(" | "),
                ratio(
                    by.get(&System::Gateway).copied().unwrap_or(f64::NAN),
                    by.get(&System::Native).copied().unwrap_or(f64::NAN)
                )
            );
        }
    }
    if let Some(rate) = blast_rate {
        println!(
            "\nRaw NATS, one publisher → one subscriber as fast as possible: {} msg/s.",
            thousands(rate)
        );
    }

    let first_rate = args.rates.first().copied().unwrap_or(0);
    println!("\n### Latency at {first_rate} msg/s (ms from scheduled send; median of repetitions, min–max)\n");
    println!("| devices | QoS | system | observed at | p50 | p99 | p99.9 | PUBACK p99 |");
    println!("|---|---|---|---|--:|--:|--:|--:|");
    for &devices in &args.devices {
        for &qos in &args.qos {
            for &system in systems {
                let at: Vec<&Point> = series(system, devices, qos)
                    .into_iter()
                    .filter(|p| p.rate == first_rate)
                    .collect();
                let Some(first) = at.first() else { continue };
                for (i, tier) in first.report.tiers.iter().enumerate() {
                    let values = |f: fn(&load::Latency) -> f64| -> Vec<f64> {
                        at.iter()
                            .filter_map(|p| p.report.tiers.get(i))
                            .map(|t| f(&t.latency))
                            .collect()
                    };
                    let ack: Vec<f64> = at
                        .iter()
                        .filter_map(|p| p.report.ack_latency.map(|l| l.p99_ms))
                        .collect();
                    println!(
                        "| {devices} | {qos} | {} | {} | {} | {} | {} | {} |",
                        system.name(),
                        tier.name,
                        spread(&values(|l| l.p50_ms)),
                        spread(&values(|l| l.p99_ms)),
                        spread(&values(|l| l.p999_ms)),
                        if i == 0 && !ack.is_empty() {
                            spread(&ack)
                        } else {
                            "".into()
                        },
                    );
                }
            }
        }
    }

    println!("\n### Cost and robustness\n");
    println!("| system | CPU s per 10k msgs (QoS 0 / QoS 1, {} devices, {first_rate}/s) | RSS per idle connection (connected / + QoS 1 subscription) | storm: {} connect and subscribe at once | all disconnect, then reconnect at once |", args.devices.last().copied().unwrap_or(0), args.storm);
    println!("|---|--:|--:|---|---|");
    let phase = |p: &Phase| match p.all_ready {
        Some(t) => format!("all in {:.2} s, {} failures", t.as_secs_f64(), p.failures),
        None => format!(
            "NOT all within {} s, {} failures",
            STORM_LIMIT.as_secs(),
            p.failures
        ),
    };
    for &system in systems {
        let devices = args.devices.last().copied().unwrap_or(0);
        let cpu = |qos: u8| {
            median(
                series(system, devices, qos)
                    .into_iter()
                    .filter(|p| p.rate == first_rate)
                    .map(Point::cpu_per_10k)
                    .collect(),
            )
        };
        let storm = storms.iter().find(|(s, _)| *s == system).map(|(_, s)| s);
        println!(
            "| {} | {} / {} | {} | {} | {} |",
            system.name(),
            ms(cpu(0)),
            ms(cpu(1)),
            storm.map_or("–".into(), |s| format!(
                "{:.0} KiB / {:.0} KiB",
                s.kib_per_1k_connected / 1000.0,
                s.kib_per_1k_subscribed / 1000.0
            )),
            storm.map_or("–".into(), |s| phase(&s.first)),
            storm.map_or("–".into(), |s| phase(&s.reconnect)),
        );
    }
}
