//! Reproducible benchmark of the dashboard API over real HTTP (a measurement, not a timed test).
//!
//! ```text
//! cargo bench -p liftwire-api --bench http
//! cargo bench -p liftwire-api --bench http -- --rates 50,100,200 --seconds 20 --repeat 3
//! ```
//!
//! Options (after `--`): `--buildings N` (default 50), `--elevators N` per building (default
//! 20), `--hours N` simulated hours per elevator (default 6), `--rates R1,R2` target request
//! rates per second (default 100,400), `--seconds N` per measured point (default 10),
//! `--repeat N` repetitions of every point (default 2), `--seed N` (default 1).
//!
//! **Setup.** A private nats-server (JetStream) and PostgreSQL cluster from `liftwire-testkit`;
//! the telemetry service (migrated, ingest batch wait 20 ms, as the integration tests start it)
//! and the API (HS256 tokens, per-token rate limit off) run in this process on a Tokio runtime
//! with one worker per core (`lw-servers`). A fleet of `buildings × elevators` simulated elevators
//! (`liftwire-firmware-sim`, night traffic, telemetry every 5 minutes; every 10th elevator has a
//! 20-minute entrapment, every 25th a planned maintenance visit) runs `hours` from yesterday's
//! UTC midnight; its messages are published into `LW_UPLINK` as the gateway would (one
//! `Nats-Msg-Id` per message, elevators interleaved), and the benchmark waits until every
//! device's persisted watermark reached its last sequence number. Every building is then asked
//! once on each endpoint (warm-up, also checking the answers), unmeasured.
//!
//! **Load.** For each endpoint, `GET /api/v1/buildings/{b}/live` and
//! `GET /api/v1/buildings/{b}/kpis?from=<yesterday 00:00Z>&to=<today 00:00Z>`, and each target
//! rate, an open-loop client sends requests at fixed scheduled times for `seconds` seconds, to a
//! random building each (admin token, one shared `reqwest::Client`, HTTP/1.1 keep-alive). The
//! send schedule is kept by a dispatcher thread that never waits for responses; requests run on
//! a separate one-thread runtime (`lw-client`). Latency is measured from the *scheduled* send
//! time to the end of the response body, so queueing anywhere (including a late dispatcher) is
//! counted: no coordinated omission. Every request's latency is recorded (hdrhistogram, µs),
//! errors included; an error is any answer other than 200 or a transport failure (client
//! timeout 30 s). Achieved req/s is the number of 200 answers divided by the time from the first
//! scheduled send to the last response. A rate beyond what the machine sustains is a valid point:
//! requests then queue until the API's 5 s service timeout (503). Between points the benchmark
//! waits until PostgreSQL has had no active query for 100 ms, so work left over from an
//! overloaded point does not spill into the next one.
//!
//! It prints a markdown table (with `--repeat` > 1: percentiles of all repetitions' latencies
//! together, achieved rate averaged, errors summed, and the min–max of the per-repetition p99),
//! then the CPU time each part used during each point (in cores: 1.0 = one core busy), which
//! shows where the time goes. Everything shares this machine's cores, client included. With the
//! defaults the run takes about 2.5 minutes on 2 cores (after the release build).

// A failed setup (server start, migration, publish, ingest) aborts the benchmark: panicking is
// the intended failure mode here.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use hdrhistogram::Histogram;
use liftwire_api::auth::{mint, AuthConfig, Authenticator, Role};
use liftwire_api::{serve_http, AppState};
use liftwire_firmware_sim::{Elevator, ElevatorSpec, Incident, TrafficProfile};
use liftwire_proto::naming::{uplink_msg_id, BuildingId, DeviceId, Uplink, UPLINK_STREAM};
use liftwire_proto::{v1, Message};
use liftwire_runtime::database::DatabaseConfig;
use liftwire_runtime::nats::{ensure_stream, NatsConfig};
use liftwire_runtime::service::{BuildContext, Service};
use liftwire_telemetry::ingest::IngestConfig;
use liftwire_testkit::{Nats, Postgres};
use tokio_util::sync::CancellationToken;

const USAGE: &str = "usage: cargo bench -p liftwire-api --bench http -- [--buildings N] \
    [--elevators N] [--hours N] [--rates R1,R2] [--seconds N] [--repeat N] [--seed N]";

const SECRET: &str = "liftwire-bench-http-secret-0123456789abcdef";
const MINUTE: u64 = 60_000;
const HOUR: u64 = 60 * MINUTE;
/// Publish acks awaited at a time.
const PUBLISH_WINDOW: usize = 2_000;
/// Longest the ingest of the seeded fleet may take.
const INGEST_TIMEOUT: Duration = Duration::from_secs(300);
/// Client-side limit of one request (the API itself gives up on a service after 5 s).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Linux's USER_HZ (clock ticks per second in /proc/*/stat), 100 on every mainstream platform.
const CLOCK_TICKS: f64 = 100.0;

struct Args {
    buildings: usize,
    elevators: usize,
    hours: u64,
    rates: Vec<u32>,
    seconds: u64,
    repeat: usize,
    seed: u64,
}

fn parse_args() -> Args {
    let mut args = Args {
        buildings: 50,
        elevators: 20,
        hours: 6,
        rates: vec![100, 400],
        seconds: 10,
        repeat: 2,
        seed: 1,
    };
    fn number(flag: &str, value: Option<String>) -> u64 {
        let value = value.unwrap_or_else(|| panic!("{flag} needs a value\n{USAGE}"));
        match value.trim().parse::<u64>() {
            Ok(n) if n > 0 => n,
            _ => panic!("{flag} {value:?}: expected a positive number\n{USAGE}"),
        }
    }
    let size = |flag: &str, value| usize::try_from(number(flag, value)).expect("fits in usize");
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            // Passed by `cargo bench`.
            "--bench" => {}
            "--buildings" => args.buildings = size("--buildings", it.next()),
            "--elevators" => args.elevators = size("--elevators", it.next()),
            "--hours" => args.hours = number("--hours", it.next()).min(24),
            "--seconds" => args.seconds = number("--seconds", it.next()),
            "--repeat" => args.repeat = size("--repeat", it.next()),
            "--seed" => args.seed = number("--seed", it.next()),
            "--rates" => {
                args.rates = it
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .map(|r| {
                        u32::try_from(number("--rates", Some(r.to_owned()))).expect("rate fits")
                    })
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

/// SplitMix64: a tiny deterministic generator for the building of each request.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

// ---------------------------------------------------------------------------------------------
// Servers.

/// Everything started for the benchmark; dropping it stops the servers.
struct Backbone {
    _nats: Nats,
    _pg: Postgres,
    pool: sqlx::PgPool,
    nats_url: String,
    base: String,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Starts NATS, PostgreSQL, the telemetry service and the API (like the integration tests).
async fn start(nats: Nats) -> Backbone {
    let pg = Postgres::start().await.expect("starting PostgreSQL");
    // Loading the benchmark's history may run longer than a service's statements.
    let database = DatabaseConfig {
        url: pg.url(),
        statement_timeout: std::time::Duration::ZERO,
        ..Default::default()
    };
    let pool = database.pool().unwrap();
    liftwire_telemetry::migrate(&pool).await.unwrap();
    let config = liftwire_telemetry::Config {
        nats: NatsConfig {
            url: nats.url(),
            ..Default::default()
        },
        database,
        ingest: IngestConfig {
            batch_wait: Duration::from_millis(20),
            ..Default::default()
        },
        ..Default::default()
    };
    let telemetry = liftwire_telemetry::Telemetry::build(config, &BuildContext::new())
        .await
        .expect("building the telemetry service");
    let stop = CancellationToken::new();
    let mut tasks = vec![tokio::spawn({
        let stop = stop.clone();
        async move { telemetry.run(stop).await.expect("telemetry service failed") }
    })];
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let state = AppState::new(
        Authenticator::new(&auth_config()).unwrap(),
        nats.client().await.unwrap(),
        0.0,
        1,
    );
    tasks.push(tokio::spawn({
        let stop = stop.clone();
        async move {
            serve_http(listener, state, 64 * 1024, stop)
                .await
                .expect("API server failed")
        }
    }));
    Backbone {
        nats_url: nats.url(),
        _nats: nats,
        _pg: pg,
        pool,
        base,
        stop,
        tasks,
    }
}

fn auth_config() -> AuthConfig {
    AuthConfig {
        hs256_secret: Some(SECRET.into()),
        ..Default::default()
    }
}

// ---------------------------------------------------------------------------------------------
// The fleet.

fn building_id(b: usize) -> String {
    format!("bench-b{b:03}")
}

/// One elevator's simulated hours: its building, id and messages in order.
struct Simulated {
    building: BuildingId,
    device: DeviceId,
    envelopes: Vec<v1::Envelope>,
}

/// Simulates elevator `index` of the fleet for `hours` from `epoch_ms`.
fn simulate(args: &Args, index: usize, epoch_ms: i64) -> Simulated {
    let (b, e) = (index / args.elevators, index % args.elevators);
    let device = DeviceId::new(format!("bench-b{b:03}-e{e:02}")).unwrap();
    let spec = ElevatorSpec {
        telemetry_interval_ms: 5 * MINUTE,
        ..Default::default()
    };
    // The seed also sets the time of day of the alarm self-test (seed mod 24 h): spread them.
    let seed = args.seed.wrapping_mul(1_000_003) + (index as u64 * 7_919 * 1_000) % (24 * HOUR);
    let mut elevator = Elevator::new(device.clone(), spec, TrafficProfile::Night, seed, epoch_ms);
    let mut incidents = Vec::new();
    if index % 10 == 3 {
        incidents.push((
            HOUR,
            Incident::Entrapment {
                duration_ms: 20 * MINUTE,
            },
        ));
    }
    if index % 25 == 7 {
        incidents.push((
            2 * HOUR,
            Incident::Maintenance {
                planned: true,
                duration_ms: 45 * MINUTE,
            },
        ));
    }
    let until = args.hours * HOUR;
    let mut envelopes = Vec::new();
    for (at, incident) in incidents.into_iter().filter(|(at, _)| *at < until) {
        envelopes.extend(elevator.advance(at - elevator.now_ms()));
        envelopes.extend(elevator.inject(incident));
    }
    envelopes.extend(elevator.advance(until - elevator.now_ms()));
    Simulated {
        building: BuildingId::new(building_id(b)).unwrap(),
        device,
        envelopes,
    }
}

/// Simulates the whole fleet on every core.
fn simulate_fleet(args: &Args, epoch_ms: i64) -> Vec<Simulated> {
    let total = args.buildings * args.elevators;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut fleet: Vec<Simulated> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    (t..total)
                        .step_by(threads)
                        .map(|i| simulate(args, i, epoch_ms))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("simulation thread panicked"))
            .collect()
    });
    fleet.sort_by(|a, b| a.device.as_str().cmp(b.device.as_str()));
    fleet
}

/// Publishes the fleet's messages into `LW_UPLINK` as the gateway would, elevators interleaved
/// (each elevator's messages in order); returns how many.
async fn publish(js: &jetstream::Context, fleet: &[Simulated]) -> usize {
    let longest = fleet.iter().map(|s| s.envelopes.len()).max().unwrap_or(0);
    let mut acks = Vec::with_capacity(PUBLISH_WINDOW);
    let mut published = 0;
    for k in 0..longest {
        for sim in fleet {
            let Some(envelope) = sim.envelopes.get(k) else {
                continue;
            };
            let up = Uplink {
                building: sim.building.clone(),
                device: sim.device.clone(),
                kind: envelope.kind().expect("the simulator sets a body"),
            };
            let mut headers = async_nats::HeaderMap::new();
            headers.insert(
                async_nats::header::NATS_MESSAGE_ID,
                uplink_msg_id(&sim.device, envelope.seq).as_str(),
            );
            acks.push(
                js.publish_with_headers(
                    up.nats_subject(),
                    headers,
                    envelope.encode_to_vec().into(),
                )
                .await
                .expect("publishing into LW_UPLINK"),
            );
            published += 1;
            if acks.len() == PUBLISH_WINDOW {
                for ack in acks.drain(..) {
                    ack.await.expect("JetStream publish ack");
                }
            }
        }
    }
    for ack in acks {
        ack.await.expect("JetStream publish ack");
    }
    published
}

/// Waits until every device's persisted watermark is its last sequence number.
async fn wait_ingested(pool: &sqlx::PgPool, devices: i64, seq_sum: i64) {
    let deadline = Instant::now() + INGEST_TIMEOUT;
    loop {
        let (count, sum): (i64, i64) = sqlx::query_as(
            "SELECT count(*), coalesce(sum(persisted_seq), 0)::int8 FROM device_watermarks",
        )
        .fetch_one(pool)
        .await
        .expect("reading the watermarks");
        if (count, sum) == (devices, seq_sum) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the fleet was not ingested within {INGEST_TIMEOUT:?}: {count} of {devices} devices \
             have a watermark, persisted sequence numbers sum to {sum} of {seq_sum}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until PostgreSQL has had no active query but this one for 100 ms (work left over from an
/// overloaded point: the telemetry service still answers requests the API gave up on); returns
/// how long that took.
async fn quiesce(pool: &sqlx::PgPool) -> Duration {
    let began = Instant::now();
    let limit = Duration::from_secs(90);
    let mut idle_in_a_row = 0;
    while idle_in_a_row < 5 {
        if began.elapsed() > limit {
            eprintln!("  warning: PostgreSQL still busy after {limit:?}; measuring anyway");
            break;
        }
        let active: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_stat_activity
             WHERE state = 'active' AND backend_type = 'client backend' AND pid <> pg_backend_pid()",
        )
        .fetch_one(pool)
        .await
        .expect("reading pg_stat_activity");
        idle_in_a_row = if active == 0 { idle_in_a_row + 1 } else { 0 };
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    began.elapsed()
}

// ---------------------------------------------------------------------------------------------
// Load.

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Endpoint {
    Live,
    Kpis,
}

impl Endpoint {
    const ALL: [Endpoint; 2] = [Endpoint::Live, Endpoint::Kpis];

    fn label(self) -> &'static str {
        match self {
            Endpoint::Live => "GET /buildings/{b}/live",
            Endpoint::Kpis => "GET /buildings/{b}/kpis (1 day)",
        }
    }
}

/// Builds request URLs.
#[derive(Clone)]
struct Urls {
    base: String,
    buildings: Vec<String>,
    /// `from=…&to=…` of the KPI requests.
    range: String,
}

impl Urls {
    fn url(&self, endpoint: Endpoint, building: usize) -> String {
        let b = &self.buildings[building];
        match endpoint {
            Endpoint::Live => format!("{}/api/v1/buildings/{b}/live", self.base),
            Endpoint::Kpis => format!("{}/api/v1/buildings/{b}/kpis?{}", self.base, self.range),
        }
    }
}

/// One request's outcome.
struct Outcome {
    latency: Duration,
    done: Instant,
    /// `None` on success, else what went wrong.
    error: Option<String>,
}

async fn request(client: reqwest::Client, url: String, token: String, at: Instant) -> Outcome {
    let error = match client.get(url).bearer_auth(token).send().await {
        Ok(response) => {
            let status = response.status();
            match response.bytes().await {
                Ok(_) if status == reqwest::StatusCode::OK => None,
                Ok(_) => Some(format!("HTTP {}", status.as_u16())),
                Err(e) => Some(format!("body: {}", kind_of(&e))),
            }
        }
        Err(e) => Some(kind_of(&e).to_owned()),
    };
    let done = Instant::now();
    Outcome {
        latency: done - at,
        done,
        error,
    }
}

fn kind_of(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else {
        "transport"
    }
}

/// The result of one measured point.
struct Point {
    histogram: Histogram<u64>,
    achieved: f64,
    errors: BTreeMap<String, u64>,
    /// Latest a request was dispatched after its scheduled time.
    max_dispatch_lag: Duration,
    /// Cores used by each part during the point.
    cpu: BTreeMap<&'static str, f64>,
}

/// The load client: its runtime, one shared HTTP client, the URLs and the bearer token.
struct Load<'a> {
    rt: &'a tokio::runtime::Runtime,
    client: reqwest::Client,
    urls: Urls,
    token: String,
}

/// Sends `rate` requests per second for `seconds` to random buildings, open loop.
fn run_point(load: &Load<'_>, endpoint: Endpoint, rate: u32, seconds: u64, rng: &mut Rng) -> Point {
    let Load {
        rt: client_rt,
        client,
        urls,
        token,
    } = load;
    let count = u64::from(rate) * seconds;
    let interval = 1.0 / f64::from(rate);
    // Build every URL first, so the dispatcher only spawns.
    let planned: Vec<String> = (0..count)
        .map(|_| urls.url(endpoint, rng.below(urls.buildings.len())))
        .collect();
    let cpu_before = cpu_seconds();
    let wall = Instant::now();
    let start = Instant::now() + Duration::from_millis(20);
    let mut handles = Vec::with_capacity(planned.len());
    let mut max_dispatch_lag = Duration::ZERO;
    for (i, url) in planned.into_iter().enumerate() {
        let at = start + Duration::from_secs_f64(i as f64 * interval);
        let now = Instant::now();
        if at > now {
            std::thread::sleep(at - now);
        }
        max_dispatch_lag = max_dispatch_lag.max(Instant::now().saturating_duration_since(at));
        handles.push(client_rt.spawn(request(client.clone(), url, token.to_owned(), at)));
    }
    let outcomes: Vec<Outcome> = client_rt.block_on(async {
        let mut outcomes = Vec::with_capacity(handles.len());
        for handle in handles {
            outcomes.push(handle.await.expect("request task panicked"));
        }
        outcomes
    });
    let elapsed = wall.elapsed().as_secs_f64();
    let cpu_after = cpu_seconds();
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).unwrap();
    let mut errors = BTreeMap::new();
    let mut last = start;
    let mut ok = 0u64;
    for o in &outcomes {
        histogram.saturating_record(u64::try_from(o.latency.as_micros()).unwrap_or(u64::MAX));
        last = last.max(o.done);
        match &o.error {
            None => ok += 1,
            Some(e) => *errors.entry(e.clone()).or_insert(0) += 1,
        }
    }
    let span = last.saturating_duration_since(start).as_secs_f64();
    let cpu = cpu_after
        .iter()
        .map(|(part, t)| {
            (
                *part,
                (t - cpu_before.get(part).copied().unwrap_or(0.0)) / elapsed,
            )
        })
        .collect();
    Point {
        histogram,
        achieved: if span > 0.0 { ok as f64 / span } else { 0.0 },
        errors,
        max_dispatch_lag,
        cpu,
    }
}

/// Asks every building once on each endpoint and checks the answers (warms caches and
/// connections; not measured).
fn warm_up(load: &Load<'_>, elevators: usize) {
    let Load {
        rt,
        client,
        urls,
        token,
    } = load;
    rt.block_on(async {
        let requests = Endpoint::ALL
            .iter()
            .flat_map(|&e| (0..urls.buildings.len()).map(move |b| (e, b)));
        futures::stream::iter(requests)
            .for_each_concurrent(4, |(endpoint, b)| async move {
                let url = urls.url(endpoint, b);
                let response = client.get(&url).bearer_auth(token).send().await.unwrap();
                let status = response.status();
                let body: serde_json::Value = response.json().await.unwrap();
                assert_eq!(status, 200, "GET {url}: {body}");
                let units = match endpoint {
                    Endpoint::Live => body["elevators"].as_array().map(Vec::len),
                    Endpoint::Kpis => body["total"]["units"]
                        .as_u64()
                        .map(|u| usize::try_from(u).unwrap()),
                };
                assert_eq!(units, Some(elevators), "GET {url}: {body}");
            })
            .await;
    });
}

// ---------------------------------------------------------------------------------------------
// Process statistics from /proc.

/// `(ppid, comm, cpu seconds)` of `/proc/<pid>/stat` or `/proc/<pid>/task/<tid>/stat`.
fn stat(path: &std::path::Path) -> Option<(u32, String, f64)> {
    let stat = std::fs::read_to_string(path).ok()?;
    // pid (comm) state ppid ... utime(14) stime(15): comm may hold spaces, so split at ')'.
    let (open, close) = (stat.find('(')?, stat.rfind(')')?);
    let comm = stat[open + 1..close].to_owned();
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let ppid = u32::try_from(field(1)).unwrap_or(0);
    Some((ppid, comm, (field(11) + field(12)) as f64 / CLOCK_TICKS))
}

/// CPU seconds used so far: this process's threads split into the load client (the dispatcher
/// and `lw-client`) and the servers (`lw-servers`: API and telemetry service), and the child
/// processes (`postgres`, `nats-server`).
fn cpu_seconds() -> BTreeMap<&'static str, f64> {
    let me = std::process::id();
    let mut out = BTreeMap::new();
    for task in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let Some((_, comm, cpu)) = stat(&task.path().join("stat")) else {
            continue;
        };
        let tid = task
            .file_name()
            .to_str()
            .and_then(|t| t.parse::<u32>().ok());
        let part = if comm.starts_with("lw-servers") {
            "api+telemetry"
        } else if comm.starts_with("lw-client") || tid == Some(me) {
            "client"
        } else {
            "other"
        };
        *out.entry(part).or_insert(0.0) += cpu;
    }
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Some((ppid, comm, cpu)) = stat(&entry.path().join("stat")) else {
            continue;
        };
        // The servers are our children, PostgreSQL's backends our grandchildren.
        let parent_of_parent = stat(
            &std::path::Path::new("/proc")
                .join(ppid.to_string())
                .join("stat"),
        )
        .map_or(0, |(p, _, _)| p);
        if ppid != me && parent_of_parent != me {
            continue;
        }
        let part = match comm.as_str() {
            "postgres" => "postgres",
            "nats-server" => "nats-server",
            _ => "other",
        };
        *out.entry(part).or_insert(0.0) += cpu;
    }
    out
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| Some(l.split_once(':')?.1.trim().to_owned()))
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

// ---------------------------------------------------------------------------------------------
// Report.

fn ms(us: u64) -> String {
    let ms = us as f64 / 1000.0;
    if ms < 10.0 {
        format!("{ms:.2}")
    } else if ms < 100.0 {
        format!("{ms:.1}")
    } else {
        format!("{ms:.0}")
    }
}

fn report(args: &Args, results: &BTreeMap<(Endpoint, u32), Vec<Point>>) {
    let repeated = args.repeat > 1;
    println!();
    print!("| endpoint | target rate | achieved req/s | p50 ms | p99 ms | p99.9 ms | max ms | errors |");
    println!("{}", if repeated { " p99 spread ms |" } else { "" });
    print!("|---|--:|--:|--:|--:|--:|--:|--:|");
    println!("{}", if repeated { "--:|" } else { "" });
    let mut notes = Vec::new();
    for ((endpoint, rate), points) in results {
        let mut all = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3).unwrap();
        let mut errors: BTreeMap<String, u64> = BTreeMap::new();
        for p in points {
            all.add(&p.histogram).unwrap();
            for (e, n) in &p.errors {
                *errors.entry(e.clone()).or_insert(0) += n;
            }
        }
        let achieved = points.iter().map(|p| p.achieved).sum::<f64>() / points.len() as f64;
        let total_errors: u64 = errors.values().sum();
        print!(
            "| {} | {rate} | {achieved:.1} | {} | {} | {} | {} | {total_errors} |",
            endpoint.label(),
            ms(all.value_at_quantile(0.5)),
            ms(all.value_at_quantile(0.99)),
            ms(all.value_at_quantile(0.999)),
            ms(all.max()),
        );
        if repeated {
            let p99: Vec<u64> = points
                .iter()
                .map(|p| p.histogram.value_at_quantile(0.99))
                .collect();
            let (lo, hi) = (
                p99.iter().min().copied().unwrap_or(0),
                p99.iter().max().copied().unwrap_or(0),
            );
            print!(" {}–{} |", ms(lo), ms(hi));
        }
        println!();
        if total_errors > 0 {
            let kinds: Vec<String> = errors.iter().map(|(e, n)| format!("{e} ×{n}")).collect();
            notes.push(format!(
                "errors at {} {rate}/s: {}",
                endpoint.label(),
                kinds.join(", ")
            ));
        }
    }
    for note in notes {
        println!("\n{note}");
    }
    println!("\nCPU during each point, in cores (mean over repetitions), and the latest dispatch after its scheduled time:\n");
    println!("| endpoint | target rate | api+telemetry | postgres | nats-server | client | total | dispatch lag ms |");
    println!("|---|--:|--:|--:|--:|--:|--:|--:|");
    for ((endpoint, rate), points) in results {
        let n = points.len() as f64;
        let part = |name: &str| {
            points
                .iter()
                .map(|p| p.cpu.get(name).copied().unwrap_or(0.0))
                .sum::<f64>()
                / n
        };
        let total: f64 = points
            .iter()
            .map(|p| p.cpu.values().sum::<f64>())
            .sum::<f64>()
            / n;
        let lag = points
            .iter()
            .map(|p| p.max_dispatch_lag)
            .max()
            .unwrap_or_default();
        println!(
            "| {} | {rate} | {:.2} | {:.2} | {:.2} | {:.2} | {total:.2} | {:.1} |",
            endpoint.label(),
            part("api+telemetry"),
            part("postgres"),
            part("nats-server"),
            part("client"),
            lag.as_secs_f64() * 1000.0,
        );
    }
}

// ---------------------------------------------------------------------------------------------

fn main() {
    let args = parse_args();
    let began = Instant::now();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let servers_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores)
        .thread_name("lw-servers")
        .enable_all()
        .build()
        .unwrap();
    // The load client on its own runtime and thread, so that its timing does not wait for the
    // servers' tasks (it still shares the cores with them).
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("lw-client")
        .enable_all()
        .build()
        .unwrap();

    let epoch: DateTime<Utc> = (Utc::now().date_naive() - chrono::Days::new(1))
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc();
    let devices = args.buildings * args.elevators;
    eprintln!(
        "simulating {devices} elevators ({} buildings × {}) for {} h from {epoch} …",
        args.buildings, args.elevators, args.hours
    );
    let t = Instant::now();
    let fleet = simulate_fleet(&args, epoch.timestamp_millis());
    let messages: usize = fleet.iter().map(|s| s.envelopes.len()).sum();
    let seq_sum: u64 = fleet
        .iter()
        .map(|s| s.envelopes.last().map_or(0, |e| e.seq))
        .sum();
    eprintln!(
        "  {messages} messages in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let nats = Nats::start().expect("starting nats-server");
    let backbone = servers_rt.block_on(start(nats));
    let js = servers_rt.block_on(async {
        let js = jetstream::new(async_nats::connect(&backbone.nats_url).await.unwrap());
        ensure_stream(
            &js,
            &UPLINK_STREAM,
            &NatsConfig {
                url: backbone.nats_url.clone(),
                ..Default::default()
            },
        )
        .await
        .expect("creating LW_UPLINK");
        js
    });
    let t = Instant::now();
    let published = servers_rt.block_on(publish(&js, &fleet));
    let publish_s = t.elapsed().as_secs_f64();
    eprintln!("  published {published} messages in {publish_s:.1} s");
    drop(fleet);
    servers_rt.block_on(wait_ingested(
        &backbone.pool,
        i64::try_from(devices).unwrap(),
        i64::try_from(seq_sum).unwrap(),
    ));
    let ingest_s = t.elapsed().as_secs_f64();
    eprintln!(
        "  ingested in {ingest_s:.1} s from the first publish ({:.0} messages/s)",
        messages as f64 / ingest_s
    );

    let token = mint(
        &auth_config(),
        "bench",
        Role::Admin,
        &[],
        Duration::from_secs(3_600),
    )
    .unwrap();
    let urls = Urls {
        base: backbone.base.clone(),
        buildings: (0..args.buildings).map(building_id).collect(),
        range: format!(
            "from={}&to={}",
            epoch.to_rfc3339().replace('+', "%2B"),
            (epoch + chrono::Duration::days(1))
                .to_rfc3339()
                .replace('+', "%2B")
        ),
    };
    let load = Load {
        rt: &client_rt,
        client: reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .unwrap(),
        urls,
        token,
    };
    let t = Instant::now();
    warm_up(&load, args.elevators);
    eprintln!("  warm-up in {:.1} s", t.elapsed().as_secs_f64());

    let mut rng = Rng(args.seed);
    let mut results: BTreeMap<(Endpoint, u32), Vec<Point>> = BTreeMap::new();
    for repetition in 1..=args.repeat {
        for endpoint in Endpoint::ALL {
            for &rate in &args.rates {
                let settled = servers_rt.block_on(quiesce(&backbone.pool));
                let point = run_point(&load, endpoint, rate, args.seconds, &mut rng);
                eprintln!(
                    "  [{repetition}/{}] (settled in {:.1} s) {} at {rate}/s: p50 {} ms, \
                     p99 {} ms, {} errors",
                    args.repeat,
                    settled.as_secs_f64(),
                    endpoint.label(),
                    ms(point.histogram.value_at_quantile(0.5)),
                    ms(point.histogram.value_at_quantile(0.99)),
                    point.errors.values().sum::<u64>(),
                );
                results.entry((endpoint, rate)).or_default().push(point);
            }
        }
    }

    println!(
        "\n## liftwire-api HTTP benchmark\n\nMachine: {cores} cores, {}. Fleet: {devices} elevators \
         ({} buildings × {}), {} simulated hours each, {messages} messages. {} s per point, {} \
         repetition(s); open loop, latency from the scheduled send to the full response.",
        cpu_model(),
        args.buildings,
        args.elevators,
        args.hours,
        args.seconds,
        args.repeat,
    );
    report(&args, &results);

    servers_rt.block_on(async move {
        backbone.stop.cancel();
        for task in backbone.tasks {
            task.await.expect("a server task panicked");
        }
    });
    eprintln!("\ntotal run time {:.1} s", began.elapsed().as_secs_f64());
}
