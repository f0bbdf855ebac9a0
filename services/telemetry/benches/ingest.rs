//! Reproducible ingest benchmark of the telemetry service (a measurement, not a timed test).
//!
//! ```text
//! cargo bench -p liftwire-telemetry --bench ingest
//! cargo bench -p liftwire-telemetry --bench ingest -- --messages 200000 --devices 1000 --repeat 3
//! ```
//!
//! Options (after `--`): `--messages N` (default 100000), `--devices N` (default 1000),
//! `--repeat N` (default 3), `--batch-sizes 1000,5000` (ingest batch sizes to compare; 5000 is the default setting),
//! `--replicas N` (default 2: also run N service replicas at the first batch size; 1 skips it).
//!
//! The workload is `messages` telemetry envelopes (`Body::Telemetry`, realistic values, device
//! time within the last hour, sequence numbers 1..=k per device) from `devices` elevators, ten
//! per building, interleaved round-robin as concurrent devices would send them. Every
//! repetition measures, side by side and each on its own freshly started PostgreSQL cluster
//! (migrated with the telemetry migrations) and nats-server (see `liftwire-testkit`):
//!
//! * **raw COPY**: the rows the service would write (same columns, computed with
//!   [`liftwire_telemetry::ingest::validate`]) in one binary `COPY device_messages FROM STDIN`,
//!   after creating their day partition(s): the ceiling for writing into PostgreSQL.
//! * **validate only**: [`liftwire_telemetry::ingest::validate`] of every message (CPU only).
//! * **validate + write_batch**: the service's store path without NATS, batch after batch,
//!   through [`liftwire_telemetry::store::write_batch`] (watermarks, live state, fold).
//! * **JetStream publish**: pre-loading the messages into `LW_UPLINK` (with `Nats-Msg-Id`, acks
//!   collected 1000 at a time).
//! * **JetStream fetch + ack**: a throwaway pull consumer fetching and acknowledging the
//!   pre-loaded stream the way the service does, without writing anything: the ceiling of the
//!   NATS side.
//! * **service ingest**: the telemetry service (in process, as the integration tests start it)
//!   consuming the pre-loaded stream, timed from `Telemetry::build` until its consumer
//!   `telemetry-ingest` has nothing pending or unacknowledged and `device_messages` holds every
//!   message; once per ingest batch size, and once with several replicas in this process
//!   sharing the consumer (as replicas do) at the first batch size. Process RSS (VmRSS sampled
//!   while ingesting, and VmHWM) shows whether memory stays bounded, and CPU seconds per process
//!   (this process, the PostgreSQL backends, nats-server) show where the time goes.
//!
//! It prints a markdown table with the median and the min–max spread over the repetitions.
//! Nothing here sleeps for correctness: completion is detected by polling every 10 ms.

// A failed setup (server start, migration, publish) aborts the benchmark: panicking is the
// intended failure mode here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream::{self, consumer::pull};
use bytes::Bytes;
use chrono::Utc;
use futures::StreamExt;
use liftwire_proto::naming::{
    uplink_msg_id, BuildingId, DeviceId, Uplink, UplinkKind, UPLINK_STREAM,
};
use liftwire_proto::{v1, Message, SCHEMA_VERSION};
use liftwire_runtime::database::DatabaseConfig;
use liftwire_runtime::nats::{ensure_stream, NatsConfig};
use liftwire_runtime::service::{BuildContext, Service};
use liftwire_telemetry::ingest::{validate, Clock, IngestConfig};
use liftwire_telemetry::partitions::{PartitionConfig, Partitions};
use liftwire_telemetry::state::FoldRules;
use liftwire_telemetry::store::{self, Row};
use liftwire_telemetry::Telemetry;
use liftwire_testkit::{Nats, Postgres};
use tokio_util::sync::CancellationToken;

const USAGE: &str = "usage: cargo bench -p liftwire-telemetry --bench ingest -- \
    [--messages N] [--devices N] [--repeat N] [--batch-sizes 1000,5000] [--replicas 2]";

/// Longest a single ingest may take before the benchmark gives up.
const INGEST_TIMEOUT: Duration = Duration::from_secs(600);
/// Devices per building.
const DEVICES_PER_BUILDING: usize = 10;
/// Publish acks collected at a time.
const PUBLISH_WINDOW: usize = 1000;
/// Linux's USER_HZ (clock ticks per second in /proc/*/stat), 100 on every mainstream platform.
const CLOCK_TICKS: f64 = 100.0;

struct Args {
    messages: usize,
    devices: usize,
    repeat: usize,
    batch_sizes: Vec<usize>,
    replicas: usize,
}

fn parse_args() -> Args {
    let mut args = Args {
        messages: 100_000,
        devices: 1000,
        repeat: 3,
        batch_sizes: vec![1000, 5000],
        replicas: 2,
    };
    let number = |flag: &str, value: Option<String>| -> usize {
        let value = value.unwrap_or_else(|| panic!("{flag} needs a value\n{USAGE}"));
        match value.parse::<usize>() {
            Ok(n) if n > 0 => n,
            _ => panic!("{flag} {value:?}: expected a positive number\n{USAGE}"),
        }
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            // Passed by `cargo bench`.
            "--bench" => {}
            "--messages" => args.messages = number("--messages", it.next()),
            "--devices" => args.devices = number("--devices", it.next()),
            "--repeat" => args.repeat = number("--repeat", it.next()),
            "--replicas" => args.replicas = number("--replicas", it.next()),
            "--batch-sizes" => {
                let list = it.next().unwrap_or_default();
                args.batch_sizes = list
                    .split(',')
                    .map(|s| number("--batch-sizes", Some(s.trim().to_owned())))
                    .collect();
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => panic!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    args
}

/// One pre-encoded device message.
struct Msg {
    subject: String,
    msg_id: String,
    payload: Bytes,
}

/// The workload: `messages` telemetry envelopes, round-robin over `devices`.
fn workload(messages: usize, devices: usize) -> Vec<Msg> {
    let ids: Vec<(BuildingId, DeviceId)> = (0..devices)
        .map(|d| {
            let building = format!("bldg-{:04}", d / DEVICES_PER_BUILDING);
            let device = format!("{building}-e{:02}", d % DEVICES_PER_BUILDING);
            (
                BuildingId::new(building).expect("valid building id"),
                DeviceId::new(device).expect("valid device id"),
            )
        })
        .collect();
    let per_device = messages.div_ceil(devices) as u64;
    // Device times spread over 50 minutes ending 10 minutes ago: within the last day, never in
    // the future, and ascending per device.
    let start = SystemTime::now() - Duration::from_secs(3600);
    let step = Duration::from_secs(3000) / u32::try_from(per_device).unwrap_or(u32::MAX);
    (0..messages)
        .map(|i| {
            let (building, device) = &ids[i % devices];
            let seq = (i / devices) as u64 + 1;
            let floor = i32::try_from(seq % 24).unwrap_or(0) - 2;
            let moving = seq % 3 != 0;
            let envelope = v1::Envelope {
                schema_version: SCHEMA_VERSION,
                device_id: device.to_string(),
                seq,
                device_time: Some(liftwire_proto::timestamp(
                    start + step * u32::try_from(seq).unwrap_or(u32::MAX),
                )),
                body: Some(v1::envelope::Body::Telemetry(v1::Telemetry {
                    mode: v1::OperatingMode::Normal as i32,
                    floor,
                    position_mm: i64::from(floor + 2) * 3_150 + i64::from(moving) * 1_234,
                    direction: if moving {
                        v1::Direction::Up as i32
                    } else {
                        v1::Direction::Stopped as i32
                    },
                    doors: vec![v1::DoorState::Closed as i32],
                    load_percent: u32::try_from(seq * 7 % 90).unwrap_or(0),
                    speed_mm_s: if moving { 1_600 } else { 0 },
                    motor_temp_decicelsius: 380 + i32::try_from(seq % 120).unwrap_or(0),
                    counters: Some(v1::Counters {
                        trips: 1_250_000 + seq,
                        door_cycles: 2_600_000 + 2 * seq,
                        run_seconds: 9_800_000 + 11 * seq,
                        starts: 1_300_000 + seq,
                    }),
                })),
            };
            Msg {
                subject: Uplink {
                    building: building.clone(),
                    device: device.clone(),
                    kind: UplinkKind::Telemetry,
                }
                .nats_subject(),
                msg_id: uplink_msg_id(device, seq),
                payload: envelope.encode_to_vec().into(),
            }
        })
        .collect()
}

fn clock(partitions: &Partitions) -> Clock {
    let now = Utc::now();
    Clock {
        received_at: now,
        oldest: partitions
            .oldest_day(now)
            .and_hms_opt(0, 0, 0)
            .expect("midnight exists")
            .and_utc(),
        max_clock_skew: chrono::Duration::seconds(300),
    }
}

fn validate_all(messages: &[Msg], clock: &Clock) -> Vec<Row> {
    messages
        .iter()
        .map(|m| {
            validate(&m.subject, &m.payload, clock)
                .unwrap_or_else(|r| panic!("workload message refused: {}", r.rejection))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Process statistics from /proc.

fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn rss_mib() -> f64 {
    status_kib("VmRSS:") as f64 / 1024.0
}

fn hwm_mib() -> f64 {
    status_kib("VmHWM:") as f64 / 1024.0
}

/// CPU seconds used so far by this process and its descendants, by command name
/// (`bench` for this process, with the in-process service; `postgres`; `nats-server`).
fn cpu_seconds() -> BTreeMap<String, f64> {
    let me = std::process::id();
    let mut procs: HashMap<u32, (u32, String, f64)> = HashMap::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid ... utime(14) stime(15): comm may hold spaces, so split at ')'.
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = stat[open + 1..close].to_owned();
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let field = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        let ppid = u32::try_from(field(1)).unwrap_or(0);
        let ticks = field(11) + field(12);
        procs.insert(pid, (ppid, comm, ticks as f64 / CLOCK_TICKS));
    }
    let mut out = BTreeMap::new();
    for (&pid, (_, comm, cpu)) in &procs {
        let mut at = pid;
        let mut depth = 0;
        let descends = loop {
            if at == me {
                break true;
            }
            match procs.get(&at) {
                Some((ppid, _, _)) if *ppid != 0 && depth < 64 => {
                    at = *ppid;
                    depth += 1;
                }
                _ => break false,
            }
        };
        if descends {
            let name = if pid == me {
                "bench".to_owned()
            } else {
                comm.clone()
            };
            *out.entry(name).or_insert(0.0) += cpu;
        }
    }
    out
}

fn cpu_delta(before: &BTreeMap<String, f64>, after: &BTreeMap<String, f64>) -> String {
    after
        .iter()
        .map(|(name, t)| (name, t - before.get(name).copied().unwrap_or(0.0)))
        .filter(|(_, t)| *t >= 0.01)
        .map(|(name, t)| format!("{name} {t:.1}"))
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------------------------
// Servers.

/// A fresh PostgreSQL cluster with the telemetry schema.
async fn fresh_database() -> (Postgres, sqlx::PgPool) {
    let pg = Postgres::start().await.expect("PostgreSQL starts");
    // Bulk loads (COPY of a whole scenario) may run longer than a service's statements.
    let pool = DatabaseConfig {
        url: pg.url(),
        statement_timeout: Duration::ZERO,
        ..Default::default()
    }
    .pool()
    .expect("pool");
    liftwire_telemetry::migrate(&pool)
        .await
        .expect("migrations apply");
    (pg, pool)
}

async fn count_rows(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM device_messages")
        .fetch_one(pool)
        .await
        .expect("count rows")
}

// ---------------------------------------------------------------------------------------------
// Measurements. Each returns the elapsed time of the measured part.

async fn measure_copy(messages: &[Msg]) -> Duration {
    let (_pg, pool) = fresh_database().await;
    let partitions = Partitions::new(PartitionConfig::default());
    let rows = validate_all(messages, &clock(&partitions));
    partitions
        .ensure(&pool, &store::days(&rows))
        .await
        .expect("partitions");
    let mut conn = pool.acquire().await.expect("connection");
    let started = Instant::now();
    // The service's own encoder and statement (store::copy_rows), without its bookkeeping.
    let copied = store::copy_rows(&mut conn, &rows.iter().collect::<Vec<_>>())
        .await
        .expect("COPY");
    let elapsed = started.elapsed();
    drop(conn);
    assert_eq!(copied, messages.len() as u64, "COPY wrote every row");
    assert_eq!(count_rows(&pool).await, messages.len() as i64);
    pool.close().await;
    elapsed
}

fn measure_validate(messages: &[Msg]) -> Duration {
    let partitions = Partitions::new(PartitionConfig::default());
    let clock = clock(&partitions);
    let started = Instant::now();
    let rows = validate_all(messages, &clock);
    let elapsed = started.elapsed();
    assert_eq!(rows.len(), messages.len());
    elapsed
}

async fn measure_write_batch(messages: &[Msg], batch_size: usize) -> (Duration, String) {
    let (_pg, pool) = fresh_database().await;
    let partitions = Partitions::new(PartitionConfig::default());
    let rules = FoldRules::default();
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    for chunk in messages.chunks(batch_size) {
        let rows = validate_all(chunk, &clock(&partitions));
        partitions
            .ensure(&pool, &store::days(&rows))
            .await
            .expect("partitions");
        let outcome = store::write_batch(&pool, rows, &rules)
            .await
            .expect("write_batch");
        assert_eq!(outcome.inserted, chunk.len() as u64);
    }
    let elapsed = started.elapsed();
    let cpu = cpu_delta(&cpu_before, &cpu_seconds());
    assert_eq!(count_rows(&pool).await, messages.len() as i64);
    pool.close().await;
    (elapsed, cpu)
}

async fn preload(js: &jetstream::Context, messages: &[Msg]) -> Duration {
    let started = Instant::now();
    for chunk in messages.chunks(PUBLISH_WINDOW) {
        let mut acks = Vec::with_capacity(chunk.len());
        for m in chunk {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(async_nats::header::NATS_MESSAGE_ID, m.msg_id.as_str());
            acks.push(
                js.publish_with_headers(m.subject.clone(), headers, m.payload.clone())
                    .await
                    .expect("publish"),
            );
        }
        // The acks arrive concurrently; awaiting them in order only collects them.
        for ack in acks {
            let ack = ack.await.expect("publish acknowledged");
            assert!(!ack.duplicate, "workload message ids are unique");
        }
    }
    started.elapsed()
}

/// Fetches and acknowledges the whole stream with a throwaway consumer, like the service does
/// (one pull request per batch, one ack publish per message, then a flush), without a database.
async fn measure_fetch_ack(
    client: &async_nats::Client,
    stream: &jetstream::stream::Stream,
    total: usize,
    batch_size: usize,
) -> Duration {
    let name = "bench-fetch";
    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some(name.into()),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            max_ack_pending: i64::try_from(batch_size * 20).unwrap_or(i64::MAX),
            ..Default::default()
        })
        .await
        .expect("consumer");
    let started = Instant::now();
    let mut seen = 0;
    while seen < total {
        let mut batch = consumer
            .batch()
            .max_messages(batch_size)
            .expires(Duration::from_millis(100))
            .messages()
            .await
            .expect("fetch");
        let mut messages = Vec::with_capacity(batch_size);
        while let Some(message) = batch.next().await {
            messages.push(message.expect("message"));
        }
        for message in &messages {
            message.ack().await.expect("ack");
        }
        client.flush().await.expect("flush");
        seen += messages.len();
    }
    let elapsed = started.elapsed();
    stream.delete_consumer(name).await.expect("delete consumer");
    elapsed
}

struct ServiceRun {
    /// Batches the service wrote, and the seconds they took from receipt to commit (summed over
    /// replicas), from its `telemetry_ingest_batch_seconds` histogram.
    batches: u64,
    in_batches: f64,
    publish: Duration,
    fetch_ack: Option<Duration>,
    ingest: Duration,
    rss_before: f64,
    rss_peak: f64,
    rss_after: f64,
    cpu: String,
}

/// Pre-loads the stream, optionally measures fetch + ack alone, then runs `replicas` instances
/// of the service (sharing the durable consumer, as replicas do) until everything is ingested.
async fn measure_service(
    messages: &[Msg],
    batch_size: usize,
    replicas: usize,
    fetch_ack: bool,
) -> ServiceRun {
    let nats = Nats::start().expect("nats-server starts");
    let nats_config = NatsConfig {
        url: nats.url(),
        ..Default::default()
    };
    let client = nats.client().await.expect("NATS client");
    let js = jetstream::new(client.clone());
    let stream = ensure_stream(&js, &UPLINK_STREAM, &nats_config)
        .await
        .expect("LW_UPLINK");
    let publish = preload(&js, messages).await;
    let stored = stream.get_info().await.expect("stream info").state.messages;
    assert_eq!(stored, messages.len() as u64, "stream holds the workload");
    let fetch_ack = if fetch_ack {
        Some(measure_fetch_ack(&client, &stream, messages.len(), batch_size).await)
    } else {
        None
    };

    let (pg, pool) = fresh_database().await;
    let config = liftwire_telemetry::Config {
        nats: nats_config,
        database: DatabaseConfig {
            url: pg.url(),
            ..Default::default()
        },
        ingest: IngestConfig {
            batch_size,
            ..Default::default()
        },
        ..Default::default()
    };
    let consumer_name = config.ingest.consumer.clone();
    let rss_before = rss_mib();
    let cpu_before = cpu_seconds();
    let started = Instant::now();
    let stop = CancellationToken::new();
    let mut tasks = Vec::with_capacity(replicas);
    let mut contexts = Vec::with_capacity(replicas);
    for _ in 0..replicas {
        let ctx = BuildContext::new();
        let service = Telemetry::build(config.clone(), &ctx)
            .await
            .expect("telemetry builds");
        contexts.push(ctx);
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            service.run(stop).await.expect("telemetry runs")
        }));
    }

    let mut rss_peak = rss_before;
    let ingest = loop {
        assert!(
            started.elapsed() < INGEST_TIMEOUT,
            "ingest did not finish within {INGEST_TIMEOUT:?}"
        );
        rss_peak = rss_peak.max(rss_mib());
        let info = stream
            .consumer_info(&consumer_name)
            .await
            .expect("consumer info");
        if info.num_pending == 0 && info.num_ack_pending == 0 {
            // Acknowledged only after the commit, so every row is there; the count confirms it.
            let observed = started.elapsed();
            if count_rows(&pool).await == messages.len() as i64 {
                break observed;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let cpu = cpu_delta(&cpu_before, &cpu_seconds());
    let rss_after = rss_mib();
    stop.cancel();
    for task in tasks {
        task.await.expect("telemetry stops");
    }
    let (batches, in_batches) = contexts
        .iter()
        .map(batch_seconds)
        .fold((0, 0.0), |(n, t), (dn, dt)| (n + dn, t + dt));
    pool.close().await;
    drop(pg);
    drop(nats);
    ServiceRun {
        batches,
        in_batches,
        publish,
        fetch_ack,
        ingest,
        rss_before,
        rss_peak,
        rss_after,
        cpu,
    }
}

/// Count and sum of the service's `telemetry_ingest_batch_seconds` histogram: the time from
/// receiving a batch to its commit (validate + write_batch), without fetching, acknowledging
/// and publishing watermarks and states.
fn batch_seconds(ctx: &BuildContext) -> (u64, f64) {
    let text = ctx.admin_state().metrics_text().expect("metrics encode");
    let value = |suffix: &str| {
        text.lines()
            .find(|l| {
                l.starts_with(&format!(
                    "liftwire_telemetry_ingest_batch_seconds_{suffix} "
                ))
            })
            .and_then(|l| l.split_whitespace().last()?.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (value("count") as u64, value("sum"))
}

// ---------------------------------------------------------------------------------------------
// Report.

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn spread(values: &[f64]) -> (f64, f64) {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (min, max)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn nats_server_version() -> String {
    std::process::Command::new("nats-server")
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

#[tokio::main]
async fn main() {
    let args = parse_args();
    let run_started = Instant::now();
    let messages = workload(args.messages, args.devices);
    let payload_bytes: usize = messages.iter().map(|m| m.payload.len()).sum();
    let subject_bytes: usize = messages.iter().map(|m| m.subject.len()).sum();

    // Rows of the table: label → rates (messages/s), one per repetition.
    let mut rates: BTreeMap<(u8, usize, String), Vec<f64>> = BTreeMap::new();
    let mut notes: BTreeMap<(u8, usize, String), Vec<String>> = BTreeMap::new();
    let mut pg_version = String::new();
    let mut hwm_before_service = None;
    let load_before = loadavg();
    let rate = |d: Duration| args.messages as f64 / d.as_secs_f64();

    for r in 1..=args.repeat {
        eprintln!("repetition {r}/{}: raw COPY", args.repeat);
        let d = measure_copy(&messages).await;
        rates
            .entry((0, 0, "raw COPY (binary, one statement)".into()))
            .or_default()
            .push(rate(d));

        let d = measure_validate(&messages);
        rates
            .entry((1, 0, "validate() only, CPU".into()))
            .or_default()
            .push(rate(d));

        for (b, &batch) in args.batch_sizes.iter().enumerate() {
            eprintln!(
                "repetition {r}/{}: validate + write_batch, batch {batch}",
                args.repeat
            );
            let (d, cpu) = measure_write_batch(&messages, batch).await;
            let key = (
                2,
                b,
                format!("validate + store::write_batch, no NATS (batch {batch})"),
            );
            rates.entry(key.clone()).or_default().push(rate(d));
            notes
                .entry(key)
                .or_default()
                .push(format!("#{r}: {:.1} s; CPU s: {cpu}", d.as_secs_f64()));
        }

        // Every batch size with one replica, then the first batch size with more replicas.
        let mut runs: Vec<(usize, usize, usize)> = (0..args.batch_sizes.len())
            .map(|b| (b, args.batch_sizes[b], 1))
            .collect();
        if args.replicas > 1 {
            runs.push((args.batch_sizes.len(), args.batch_sizes[0], args.replicas));
        }
        for (b, batch, replicas) in runs {
            eprintln!(
                "repetition {r}/{}: service ingest, batch {batch}, {replicas} replica(s)",
                args.repeat
            );
            if hwm_before_service.is_none() {
                hwm_before_service = Some(hwm_mib());
            }
            let run = measure_service(&messages, batch, replicas, replicas == 1).await;
            rates
                .entry((
                    3,
                    0,
                    "JetStream publish (pre-load, 1000 acks in flight)".into(),
                ))
                .or_default()
                .push(rate(run.publish));
            if let Some(fetch_ack) = run.fetch_ack {
                rates
                    .entry((
                        4,
                        b,
                        format!("JetStream fetch + ack only, no DB (batch {batch})"),
                    ))
                    .or_default()
                    .push(rate(fetch_ack));
            }
            let label = if replicas == 1 {
                format!("**service ingest (batch {batch})**")
            } else {
                format!("**service ingest, {replicas} replicas in process (batch {batch})**")
            };
            let key = (5, b, label);
            rates.entry(key.clone()).or_default().push(rate(run.ingest));
            notes.entry(key).or_default().push(format!(
                "#{r}: {:.1} s, of which {:.1} s in {} batches from receipt to commit; \
                 RSS {:.0}→{:.0}→{:.0} MiB; CPU s: {}",
                run.ingest.as_secs_f64(),
                run.in_batches,
                run.batches,
                run.rss_before,
                run.rss_peak,
                run.rss_after,
                run.cpu
            ));
        }
        if pg_version.is_empty() {
            let (_pg, pool) = fresh_database().await;
            pg_version = sqlx::query_scalar::<_, String>("SHOW server_version")
                .fetch_one(&pool)
                .await
                .unwrap_or_default();
            pool.close().await;
        }
    }

    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let copy_median = rates
        .iter()
        .find(|((order, _, _), _)| *order == 0)
        .map_or(f64::NAN, |(_, v)| median(v));
    println!();
    println!("## liftwire telemetry ingest benchmark");
    println!();
    println!(
        "- machine: {cores} cores (available_parallelism), CPU: {}",
        cpu_model()
    );
    println!(
        "- servers: PostgreSQL {pg_version} (testkit: fsync=off, synchronous_commit=off, \
         shared_buffers=32MB), {} (JetStream file storage)",
        nats_server_version()
    );
    println!(
        "- workload: {} telemetry messages from {} devices ({} per device, {} per building), \
         envelope {:.0} B avg, subject {:.0} B avg",
        args.messages,
        args.devices,
        args.messages.div_ceil(args.devices),
        DEVICES_PER_BUILDING,
        payload_bytes as f64 / args.messages as f64,
        subject_bytes as f64 / args.messages as f64,
    );
    println!(
        "- {} repetitions, each measurement on freshly started servers and a freshly migrated \
         database",
        args.repeat
    );
    println!(
        "- load average before: {load_before}; after: {} (other work on the machine skews \
         the numbers)",
        loadavg()
    );
    println!();
    println!("| measurement | median msg/s | min–max msg/s | vs raw COPY |");
    println!("|---|---:|---:|---:|");
    for ((_, _, label), values) in &rates {
        let (min, max) = spread(values);
        let m = median(values);
        println!(
            "| {label} | {m:.0} | {min:.0}–{max:.0} | {:.0}% |",
            100.0 * m / copy_median
        );
    }
    println!();
    for ((_, _, label), lines) in &notes {
        println!("{label}:");
        for line in lines {
            println!("- {line}");
        }
    }
    println!();
    println!(
        "RSS a→b→c: this process before starting the service, highest sampled while it ingested, \
         when it was done. \"from receipt to commit\": the service's own \
         telemetry_ingest_batch_seconds (validate + write_batch; the rest is fetching, acking \
         and publishing watermarks and states), summed over replicas. Peak RSS (VmHWM) before the first service run {:.0} MiB (the \
         benchmark's own workload and rows), at the end {:.0} MiB. CPU s: CPU seconds during the \
         measurement by process (bench = this process, including the in-process service).",
        hwm_before_service.unwrap_or(0.0),
        hwm_mib(),
    );
    println!();
    println!(
        "Total run time {:.0} s.",
        run_started.elapsed().as_secs_f64()
    );
}
