//! Load mode: many devices publishing at a fixed total rate, measured end to end.
//!
//! All devices connect first; then the schedule starts. Open loop: device `d` of `n` sends its
//! `i`-th message at `start + (d / n + i) * interval` (so the total rate is even from the first
//! instant), carrying that scheduled time in the envelope's `device_time`. Latency is measured
//! from the scheduled time to the arrival at each [`Observer`], so a slow system shows up as
//! latency rather than as a lower send rate (no coordinated omission). Loss is counted per
//! observer from per-device sequence numbers; duplicates separately. For QoS 1 the time from the
//! scheduled send to the PUBACK is measured too.
//!
//! Devices publish over MQTT (to the gateway or any broker) or straight to NATS (the baseline
//! without a broker in between); observers sit on a NATS subject, on a JetStream stream (the
//! message is stored) or on an MQTT subscription.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use hdrhistogram::Histogram;
use liftwire_proto::mqtt as wire;
use liftwire_proto::naming::{BuildingId, DeviceId, Uplink, UplinkKind};
use liftwire_proto::{timestamp, v1, Message, SCHEMA_VERSION};
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use v1::envelope::Body;

/// How the load devices publish.
#[derive(Debug, Clone)]
pub enum Publisher {
    /// One MQTT connection per device.
    Mqtt {
        /// Broker host.
        host: String,
        /// Broker port.
        port: u16,
        /// Secrets per device id; `None` connects without credentials.
        secrets: Option<HashMap<String, String>>,
    },
    /// One NATS connection per device, publishing on the gateway's uplink subjects directly.
    Nats {
        /// NATS server URL.
        url: String,
    },
}

/// Where arrivals are observed.
#[derive(Debug, Clone)]
pub enum Observe {
    /// A core NATS subscription.
    Nats {
        /// NATS server URL.
        url: String,
        /// Subject filter.
        subject: String,
    },
    /// An ordered consumer on a JetStream stream: a message counts once it is stored.
    JetStream {
        /// NATS server URL.
        url: String,
        /// Stream name.
        stream: String,
        /// Filter subject inside the stream.
        subject: String,
    },
    /// An MQTT subscription (QoS 0).
    Mqtt {
        /// Broker host.
        host: String,
        /// Broker port.
        port: u16,
        /// Topic filter.
        topic: String,
    },
}

/// A named place where arrivals are measured.
#[derive(Debug, Clone)]
pub struct Observer {
    /// Name in the report (e.g. "nats", "jetstream").
    pub name: String,
    /// Where.
    pub at: Observe,
}

impl Observer {
    /// The gateway's bridged subjects for `building`'s telemetry on `nats_url`.
    pub fn gateway_subjects(nats_url: &str, building: &str) -> Self {
        Self {
            name: "nats".into(),
            at: Observe::Nats {
                url: nats_url.into(),
                subject: format!("lw.v1.up.{building}.*.telemetry"),
            },
        }
    }
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// How devices publish.
    pub publisher: Publisher,
    /// Where arrivals are measured (at least one).
    pub observers: Vec<Observer>,
    /// Number of devices.
    pub devices: u32,
    /// Total messages per second across all devices.
    pub rate: u32,
    /// MQTT QoS (0 or 1).
    pub qos: u8,
    /// Size of each encoded envelope in bytes (padded).
    pub payload_bytes: usize,
    /// How long to send.
    pub duration: Duration,
    /// The first part of `duration` whose messages are sent and checked for loss but left out
    /// of the latency figures, so that connection set-up, first allocations and cold caches in
    /// the system under test do not decide its percentiles.
    pub warmup: Duration,
    /// Building id of the load devices (`{building}-d0001`, ...).
    pub building: String,
    /// How long devices may take to connect before the run fails.
    pub connect_timeout: Duration,
    /// Longest wait for stragglers after the last send.
    pub drain: Duration,
    /// Added to every sequence number (devices send `seq_base + 1`, `seq_base + 2`, ...): runs
    /// against the same servers need fresh numbers, or JetStream rightly drops them as
    /// duplicates.
    pub seq_base: u64,
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    /// Median.
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Worst.
    pub max_ms: f64,
}

impl Latency {
    fn of(histogram: &Histogram<u64>) -> Self {
        let ms = |v: u64| v as f64 / 1e6;
        if histogram.is_empty() {
            return Self::default();
        }
        Self {
            p50_ms: ms(histogram.value_at_quantile(0.5)),
            p99_ms: ms(histogram.value_at_quantile(0.99)),
            p999_ms: ms(histogram.value_at_quantile(0.999)),
            max_ms: ms(histogram.max()),
        }
    }
}

/// What one observer saw.
#[derive(Debug, Clone, Serialize)]
pub struct Tier {
    /// The observer's name.
    pub name: String,
    /// Distinct messages that arrived.
    pub received: u64,
    /// Sent but never arrived.
    pub lost: u64,
    /// Arrived more than once.
    pub duplicates: u64,
    /// Arrivals per second from the schedule's start to the last arrival.
    pub achieved_rate: f64,
    /// Scheduled send → arrival.
    pub latency: Latency,
}

/// Measurements of one run.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    /// Devices connected.
    pub devices: u32,
    /// Target total rate.
    pub target_rate: u32,
    /// QoS used.
    pub qos: u8,
    /// Payload size.
    pub payload_bytes: usize,
    /// Messages handed to the client.
    pub sent: u64,
    /// Send rate achieved by the generator (sent / duration).
    pub offered_rate: f64,
    /// QoS 1 acknowledgements received (0 for QoS 0).
    pub acked: u64,
    /// Scheduled send → PUBACK (QoS 1 over MQTT only).
    pub ack_latency: Option<Latency>,
    /// Device reconnections during the run.
    pub reconnects: u64,
    /// CPU used by this process while sending, in cores (Linux only): near the number of
    /// cores it may use, the generator itself is the limit.
    pub generator_busy: Option<f64>,
    /// One entry per observer, in configuration order.
    pub tiers: Vec<Tier>,
}

impl LoadReport {
    /// A human-readable table, one row per observer.
    pub fn table(&self) -> String {
        let mut out = String::from(
            "| devices | rate/s | qos | bytes | sent | acked | observer | received | lost | dup | achieved/s | p50 ms | p99 ms | p99.9 ms | max ms |\n\
             |---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        );
        for tier in &self.tiers {
            let l = tier.latency;
            out.push_str(&format!(
                "\n| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} |",
                self.devices, self.target_rate, self.qos, self.payload_bytes, self.sent, self.acked,
                tier.name, tier.received, tier.lost, tier.duplicates, tier.achieved_rate,
                l.p50_ms, l.p99_ms, l.p999_ms, l.max_ms
            ));
        }
        out
    }

    /// The first observer's view (the configuration requires one).
    pub fn primary(&self) -> Option<&Tier> {
        self.tiers.first()
    }
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Bad identifiers.
    #[error(transparent)]
    Id(#[from] liftwire_proto::naming::IdError),
    /// NATS unreachable or refusing a subscription.
    #[error("NATS: {0}")]
    Nats(String),
    /// The observing MQTT subscription failed.
    #[error("MQTT observer: {0}")]
    Mqtt(String),
    /// Devices did not all connect in time.
    #[error("only {connected} of {devices} devices connected within {timeout:?}")]
    Connect {
        /// Connected devices.
        connected: usize,
        /// All devices.
        devices: u32,
        /// The limit.
        timeout: Duration,
    },
    /// Bad arguments.
    #[error("{0}")]
    Invalid(&'static str),
}

fn nanos(t: SystemTime) -> i128 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

/// CPU seconds (user + system) used so far by process `pid` (`"self"` for this one), all its
/// threads, from `/proc/{pid}/stat`; `None` where there is no such file.
pub fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')';
    // utime and stime (fields 14 and 15) are in clock ticks of 1/100 s.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / 100.0)
}

/// One load device's id.
pub fn device_id(building: &str, index: u32) -> String {
    format!("{building}-d{index:04}")
}

/// A load device's telemetry envelopes: one message, re-stamped and re-encoded for every send.
pub struct Envelopes {
    envelope: v1::Envelope,
    encoded: Vec<u8>,
}

impl Envelopes {
    /// Envelopes of `device` padded to about `payload_bytes` (the padding is sized once, for the
    /// first message; later sequence numbers may add a byte or two).
    pub fn new(device: &DeviceId, payload_bytes: usize) -> Self {
        let mut envelope = v1::Envelope {
            schema_version: SCHEMA_VERSION,
            device_id: device.to_string(),
            seq: 1,
            device_time: Some(timestamp(SystemTime::now())),
            body: Some(Body::Telemetry(v1::Telemetry {
                mode: v1::OperatingMode::Normal as i32,
                floor: 4,
                position_mm: 12_000,
                direction: v1::Direction::Up as i32,
                doors: vec![v1::DoorState::Closed as i32],
                load_percent: 35,
                speed_mm_s: 1_600,
                motor_temp_decicelsius: 412,
                counters: Some(v1::Counters::default()),
            })),
        };
        // Pad with repeated door entries (a real field, one byte each) up to the requested size.
        loop {
            let missing = payload_bytes.saturating_sub(envelope.encoded_len());
            match envelope.body.as_mut() {
                Some(Body::Telemetry(t)) if missing > 0 => t
                    .doors
                    .extend(std::iter::repeat_n(v1::DoorState::Closed as i32, missing)),
                _ => break,
            }
        }
        Self {
            envelope,
            encoded: Vec::with_capacity(payload_bytes + 16),
        }
    }

    /// The encoded envelope number `seq`, stamped with its scheduled send time.
    pub fn encode(&mut self, seq: u64, scheduled: SystemTime) -> &[u8] {
        self.envelope.seq = seq;
        self.envelope.device_time = Some(timestamp(scheduled));
        if let Some(Body::Telemetry(t)) = self.envelope.body.as_mut() {
            t.counters = Some(v1::Counters {
                trips: seq,
                door_cycles: 2 * seq,
                run_seconds: 10 * seq,
                starts: seq,
            });
        }
        self.encoded.clear();
        self.envelope
            .encode(&mut self.encoded)
            .expect("a Vec grows to fit any envelope");
        &self.encoded
    }
}

/// A telemetry envelope of about `payload_bytes`, stamped with its scheduled send time.
pub fn envelope(
    device: &DeviceId,
    seq: u64,
    scheduled: SystemTime,
    payload_bytes: usize,
) -> Vec<u8> {
    Envelopes::new(device, payload_bytes)
        .encode(seq, scheduled)
        .to_vec()
}

fn histogram() -> Histogram<u64> {
    // 1 ns .. 60 s at 3 significant digits.
    Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("constant histogram bounds are valid")
}

/// Arrivals seen by one observer.
struct Arrivals {
    seen: HashMap<String, HashSet<u64>>,
    histogram: Histogram<u64>,
    duplicates: u64,
    received: u64,
    last_arrival_ns: i128,
    /// Messages scheduled before this (the end of the warm-up) are not in the histogram.
    measure_from_ns: i128,
}

impl Arrivals {
    fn new() -> Self {
        Self {
            seen: HashMap::new(),
            histogram: histogram(),
            duplicates: 0,
            received: 0,
            last_arrival_ns: 0,
            measure_from_ns: 0,
        }
    }

    fn record(&mut self, payload: &[u8]) {
        let now = nanos(SystemTime::now());
        let Ok(envelope) = v1::Envelope::decode(payload) else {
            return;
        };
        let scheduled = envelope
            .device_time
            .map_or(now, |t| t.seconds as i128 * 1_000_000_000 + t.nanos as i128);
        self.last_arrival_ns = now;
        if !self
            .seen
            .entry(envelope.device_id)
            .or_default()
            .insert(envelope.seq)
        {
            self.duplicates += 1;
            return;
        }
        self.received += 1;
        if scheduled >= self.measure_from_ns {
            let latency = (now - scheduled).max(1) as u64;
            let _ = self.histogram.record(latency.min(60_000_000_000));
        }
    }
}

type Shared<T> = Arc<Mutex<T>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Starts one observer; returns once it is subscribed.
async fn observe(
    observer: &Observer,
    building: &str,
    arrivals: Shared<Arrivals>,
    stop: CancellationToken,
) -> Result<tokio::task::JoinHandle<()>, LoadError> {
    let nats_err = |e: &dyn std::fmt::Display| LoadError::Nats(e.to_string());
    match &observer.at {
        Observe::Nats { url, subject } => {
            let nats = async_nats::connect(url).await.map_err(|e| nats_err(&e))?;
            let mut subscription = nats
                .subscribe(subject.clone())
                .await
                .map_err(|e| nats_err(&e))?;
            nats.flush().await.map_err(|e| nats_err(&e))?;
            Ok(tokio::spawn(async move {
                loop {
                    tokio::select! {
                        m = subscription.next() => match m {
                            Some(m) => lock(&arrivals).record(&m.payload),
                            None => break,
                        },
                        _ = stop.cancelled() => break,
                    }
                }
            }))
        }
        Observe::JetStream {
            url,
            stream,
            subject,
        } => {
            let nats = async_nats::connect(url).await.map_err(|e| nats_err(&e))?;
            let js = async_nats::jetstream::new(nats.clone());
            let stream = js.get_stream(stream).await.map_err(|e| nats_err(&e))?;
            let consumer = stream
                .create_consumer(async_nats::jetstream::consumer::push::OrderedConfig {
                    deliver_subject: nats.new_inbox(),
                    filter_subject: subject.clone(),
                    deliver_policy: async_nats::jetstream::consumer::DeliverPolicy::New,
                    ..Default::default()
                })
                .await
                .map_err(|e| nats_err(&e))?;
            let mut messages = consumer.messages().await.map_err(|e| nats_err(&e))?;
            Ok(tokio::spawn(async move {
                loop {
                    tokio::select! {
                        m = messages.next() => match m {
                            Some(Ok(m)) => lock(&arrivals).record(&m.payload),
                            Some(Err(e)) => tracing::warn!(error = %e, "JetStream observer"),
                            None => break,
                        },
                        _ = stop.cancelled() => break,
                    }
                }
            }))
        }
        Observe::Mqtt { host, port, topic } => {
            let mut options = MqttOptions::new(format!("{building}-observer"), host.clone(), *port);
            options.set_keep_alive(Duration::from_secs(30));
            options.set_max_packet_size(1 << 20, 1 << 20);
            let (client, mut eventloop) = AsyncClient::new(options, 64);
            client
                .subscribe(topic.clone(), QoS::AtMostOnce)
                .await
                .map_err(|e| LoadError::Mqtt(e.to_string()))?;
            // Wait for the SUBACK so nothing published afterwards is missed.
            let subscribed = tokio::time::timeout(Duration::from_secs(10), async {
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Incoming::SubAck(_))) => return Ok(()),
                        Ok(_) => {}
                        Err(e) => return Err(e.to_string()),
                    }
                }
            })
            .await
            .map_err(|_| LoadError::Mqtt("no SUBACK within 10 s".into()))?;
            subscribed.map_err(LoadError::Mqtt)?;
            Ok(tokio::spawn(async move {
                loop {
                    tokio::select! {
                        event = eventloop.poll() => match event {
                            Ok(Event::Incoming(Incoming::Publish(p))) => lock(&arrivals).record(&p.payload),
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, "MQTT observer");
                                tokio::time::sleep(Duration::from_millis(100)).await;
                            }
                        },
                        _ = stop.cancelled() => break,
                    }
                }
                let _ = client.try_disconnect();
            }))
        }
    }
}

/// When the schedule starts (monotonic and wall clock).
#[derive(Debug, Clone, Copy)]
struct Start {
    at: Instant,
    wall: SystemTime,
}

/// What every device task shares.
#[derive(Clone)]
struct Common {
    sent: Arc<AtomicU64>,
    acked: Arc<AtomicU64>,
    reconnects: Arc<AtomicU64>,
    connected: Arc<AtomicUsize>,
    connected_changed: Arc<tokio::sync::Notify>,
    go: watch::Receiver<Option<Start>>,
    interval: Duration,
    duration: Duration,
    warmup: Duration,
    qos: u8,
    payload_bytes: usize,
    devices: u32,
    seq_base: u64,
}

impl Common {
    fn first_send(&self, start: Start, index: u32) -> Instant {
        start.at
            + self
                .interval
                .mul_f64(f64::from(index) / f64::from(self.devices))
    }
}

/// Keep-alive announced in CONNECT; a device that sent nothing for half of it pings.
const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// How long a device that sent its last message waits for outstanding PUBACKs.
const LINGER: Duration = Duration::from_secs(2);

/// Why a load device's connection ended.
#[derive(Debug, thiserror::Error)]
enum DeviceError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Malformed(#[from] wire::Malformed),
    #[error("CONNECT refused with return code {0}")]
    Refused(u8),
    #[error("expected a CONNACK, got {0:?}")]
    NoConnAck(wire::Incoming),
    #[error("the broker closed the connection")]
    Closed,
}

/// One MQTT connection of a load device.
struct Session {
    reader: OwnedReadHalf,
    writer: OwnedWriteHalf,
    /// Bytes read and not yet parsed start at `start`.
    buf: Vec<u8>,
    start: usize,
}

impl Session {
    /// Connects, sends `connect` and waits for an accepting CONNACK.
    async fn open(host: &str, port: u16, connect: &[u8]) -> Result<Self, DeviceError> {
        let stream = TcpStream::connect((host, port)).await?;
        // Latency-sensitive devices disable Nagle's algorithm; otherwise the device's own send
        // coalescing, not the broker, would dominate QoS 0 latency.
        stream.set_nodelay(true)?;
        let (reader, mut writer) = stream.into_split();
        writer.write_all(connect).await?;
        let mut session = Self {
            reader,
            writer,
            buf: Vec::with_capacity(1024),
            start: 0,
        };
        match session.next().await? {
            wire::Incoming::ConnAck(0) => Ok(session),
            wire::Incoming::ConnAck(code) => Err(DeviceError::Refused(code)),
            other => Err(DeviceError::NoConnAck(other)),
        }
    }

    /// The broker's next packet. Cancel-safe: bytes read stay in the buffer.
    async fn next(&mut self) -> Result<wire::Incoming, DeviceError> {
        loop {
            if let Some(packet) = wire::next_packet(&mut self.buf, &mut self.start)? {
                return Ok(packet);
            }
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            if self.reader.read_buf(&mut self.buf).await? == 0 {
                return Err(DeviceError::Closed);
            }
        }
    }
}

/// A device's place in the schedule.
#[derive(Clone, Copy)]
struct Schedule {
    start: Start,
    first: Instant,
    end: Instant,
}

/// One MQTT device: connect, wait for the start, publish on schedule (reconnecting if the
/// broker drops it); returns its PUBACK latency histogram.
async fn mqtt_device(
    common: Common,
    index: u32,
    id: DeviceId,
    topic: String,
    (host, port): (String, u16),
    secret: Option<String>,
) -> Histogram<u64> {
    let connect = wire::connect(
        id.as_str(),
        secret.as_deref().map(|s| (id.as_str(), s)),
        KEEP_ALIVE.as_secs() as u16,
    );
    let qos1 = common.qos > 0;
    let mut acks = histogram();
    let mut envelopes = Envelopes::new(&id, common.payload_bytes);
    let mut packet = Vec::with_capacity(common.payload_bytes + topic.len() + 16);
    let mut go = common.go.clone();
    let mut schedule: Option<Schedule> = None;
    // PUBACKs of messages scheduled before this (the warm-up) are not in the histogram.
    let mut measure_from = 0i128;
    let mut seq = 0u64;
    let mut pkid = 0u16;
    let mut next = Instant::now();
    let mut ever_connected = false;
    let timer = tokio::time::sleep(KEEP_ALIVE);
    tokio::pin!(timer);
    'connection: loop {
        if schedule.is_some_and(|s| Instant::now() >= s.end + LINGER) {
            break;
        }
        let mut session = match Session::open(&host, port, &connect).await {
            Ok(session) => session,
            Err(e) => {
                tracing::debug!(error = %e, device = %id, "load device could not connect");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        if ever_connected {
            common.reconnects.fetch_add(1, Ordering::Relaxed);
        } else {
            ever_connected = true;
            common.connected.fetch_add(1, Ordering::Relaxed);
            common.connected_changed.notify_one();
        }
        // Packet ids and scheduled times of unacknowledged QoS 1 publishes, oldest first.
        let mut inflight: VecDeque<(u16, i128)> = VecDeque::new();
        let mut last_write = Instant::now();
        let mut armed = None;
        let ended = loop {
            let ping_at = last_write + KEEP_ALIVE / 2;
            let deadline = match schedule {
                Some(s) if next < s.end => next.min(ping_at),
                Some(_) if inflight.is_empty() => break Ok(()),
                Some(s) => (s.end + LINGER).min(ping_at),
                None => ping_at,
            };
            if armed != Some(deadline) {
                timer.as_mut().reset(deadline);
                armed = Some(deadline);
            }
            tokio::select! {
                packet = session.next() => match packet {
                    Ok(wire::Incoming::PubAck(acked)) => {
                        common.acked.fetch_add(1, Ordering::Relaxed);
                        let position = if inflight.front().is_some_and(|(p, _)| *p == acked) {
                            Some(0)
                        } else {
                            inflight.iter().position(|(p, _)| *p == acked)
                        };
                        if let Some((_, scheduled)) = position.and_then(|i| inflight.remove(i)) {
                            if scheduled >= measure_from {
                                let latency = (nanos(SystemTime::now()) - scheduled).max(1) as u64;
                                let _ = acks.record(latency.min(60_000_000_000));
                            }
                        }
                    }
                    Ok(_) => {}
                    Err(e) => break Err(e),
                },
                changed = go.changed(), if schedule.is_none() => {
                    if changed.is_err() {
                        break 'connection;
                    }
                    if let Some(start) = *go.borrow_and_update() {
                        let first = common.first_send(start, index);
                        next = first;
                        schedule = Some(Schedule { start, first, end: start.at + common.duration });
                        measure_from = nanos(start.wall + common.warmup);
                    }
                }
                () = &mut timer => {
                    armed = None;
                    let now = Instant::now();
                    match schedule {
                        Some(s) if next < s.end && next <= now => {
                            // Everything due, including what a slow moment delayed.
                            let mut failed = None;
                            while next < s.end && next <= now {
                                seq += 1;
                                let scheduled = s.start.wall + (next - s.start.at);
                                let id = qos1.then(|| {
                                    pkid = pkid.checked_add(1).unwrap_or(1);
                                    pkid
                                });
                                packet.clear();
                                wire::put_publish(&mut packet, &topic, id, false, envelopes.encode(common.seq_base + seq, scheduled));
                                if let Err(e) = session.writer.write_all(&packet).await {
                                    failed = Some(e);
                                    break;
                                }
                                common.sent.fetch_add(1, Ordering::Relaxed);
                                if let Some(id) = id {
                                    inflight.push_back((id, nanos(scheduled)));
                                }
                                next = s.first + common.interval.mul_f64(seq as f64);
                            }
                            if let Some(e) = failed {
                                break Err(e.into());
                            }
                            last_write = now;
                        }
                        Some(s) if next >= s.end && now >= s.end + LINGER => break Ok(()),
                        _ if now >= ping_at => {
                            if let Err(e) = session.writer.write_all(&wire::PINGREQ).await {
                                break Err(e.into());
                            }
                            last_write = now;
                        }
                        _ => {}
                    }
                }
            }
        };
        match ended {
            Ok(()) => {
                let _ = session.writer.write_all(&wire::DISCONNECT).await;
                break;
            }
            Err(e) => {
                tracing::debug!(error = %e, device = %id, "load device lost its connection");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    acks
}

/// One device publishing straight to NATS.
async fn nats_device(common: Common, index: u32, id: DeviceId, subject: String, url: String) {
    let client = match async_nats::connect(&url).await {
        Ok(client) => client,
        Err(e) => {
            tracing::warn!(error = %e, device = %id, "NATS load device could not connect");
            return;
        }
    };
    common.connected.fetch_add(1, Ordering::Relaxed);
    common.connected_changed.notify_one();
    let mut go = common.go.clone();
    let start = loop {
        if go.changed().await.is_err() {
            return;
        }
        if let Some(start) = *go.borrow_and_update() {
            break start;
        }
    };
    let first = common.first_send(start, index);
    let end = start.at + common.duration;
    let mut envelopes = Envelopes::new(&id, common.payload_bytes);
    let mut next = first;
    let mut seq = 0u64;
    while next < end {
        tokio::time::sleep_until(next).await;
        seq += 1;
        let scheduled = start.wall + (next - start.at);
        let payload = envelopes.encode(common.seq_base + seq, scheduled).to_vec();
        if client
            .publish(subject.clone(), payload.into())
            .await
            .is_ok()
        {
            common.sent.fetch_add(1, Ordering::Relaxed);
        }
        next = first + common.interval.mul_f64(seq as f64);
    }
    let _ = client.flush().await;
}

/// Runs the load and measures it.
pub async fn run(
    config: LoadConfig,
    progress: impl Fn(&str) + Send + Sync + 'static,
) -> Result<LoadReport, LoadError> {
    if config.devices == 0 || config.rate == 0 {
        return Err(LoadError::Invalid("devices and rate must be positive"));
    }
    if config.observers.is_empty() {
        return Err(LoadError::Invalid("at least one observer is needed"));
    }
    if config.warmup >= config.duration {
        return Err(LoadError::Invalid(
            "the warm-up must be shorter than the duration",
        ));
    }
    let building = BuildingId::new(config.building.clone())?;

    let stop_observing = CancellationToken::new();
    let mut observers = Vec::new();
    for observer in &config.observers {
        let arrivals = Arc::new(Mutex::new(Arrivals::new()));
        let task = observe(
            observer,
            building.as_str(),
            arrivals.clone(),
            stop_observing.clone(),
        )
        .await?;
        observers.push((observer.name.clone(), arrivals, task));
    }

    let (go_tx, go_rx) = watch::channel(None);
    let per_device_rate = f64::from(config.rate) / f64::from(config.devices);
    let common = Common {
        sent: Arc::new(AtomicU64::new(0)),
        acked: Arc::new(AtomicU64::new(0)),
        reconnects: Arc::new(AtomicU64::new(0)),
        connected: Arc::new(AtomicUsize::new(0)),
        connected_changed: Arc::new(tokio::sync::Notify::new()),
        go: go_rx,
        interval: Duration::from_secs_f64(1.0 / per_device_rate),
        duration: config.duration,
        warmup: config.warmup,
        qos: config.qos,
        payload_bytes: config.payload_bytes,
        devices: config.devices,
        seq_base: config.seq_base,
    };
    let mut devices = tokio::task::JoinSet::new();
    for d in 0..config.devices {
        let id = DeviceId::new(device_id(building.as_str(), d + 1))?;
        let uplink = Uplink {
            building: building.clone(),
            device: id.clone(),
            kind: UplinkKind::Telemetry,
        };
        let common = common.clone();
        match &config.publisher {
            Publisher::Mqtt {
                host,
                port,
                secrets,
            } => {
                let secret = secrets.as_ref().and_then(|s| s.get(id.as_str())).cloned();
                let topic = uplink.mqtt_topic();
                devices.spawn(mqtt_device(
                    common,
                    d,
                    id,
                    topic,
                    (host.clone(), *port),
                    secret,
                ));
            }
            Publisher::Nats { url } => {
                let (subject, url) = (uplink.nats_subject(), url.clone());
                devices.spawn(async move {
                    nats_device(common, d, id, subject, url).await;
                    histogram()
                });
            }
        }
    }

    // Every device connected, then the schedule starts.
    let deadline = Instant::now() + config.connect_timeout;
    while common.connected.load(Ordering::Relaxed) < config.devices as usize {
        if tokio::time::timeout_at(deadline, common.connected_changed.notified())
            .await
            .is_err()
        {
            stop_observing.cancel();
            devices.abort_all();
            return Err(LoadError::Connect {
                connected: common.connected.load(Ordering::Relaxed),
                devices: config.devices,
                timeout: config.connect_timeout,
            });
        }
    }
    let start = Start {
        at: Instant::now() + Duration::from_millis(200),
        wall: SystemTime::now() + Duration::from_millis(200),
    };
    for (_, arrivals, _) in &observers {
        lock(arrivals).measure_from_ns = nanos(start.wall + config.warmup);
    }
    let _ = go_tx.send(Some(start));
    let end = start.at + config.duration;
    let cpu_at_start = cpu_seconds("self");

    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    while Instant::now() < end {
        ticker.tick().await;
        let received: Vec<String> = observers
            .iter()
            .map(|(name, a, _)| format!("{name} {}", lock(a).received))
            .collect();
        progress(&format!(
            "sent {} acked {} received: {}",
            common.sent.load(Ordering::Relaxed),
            common.acked.load(Ordering::Relaxed),
            received.join(", ")
        ));
    }
    let generator_busy = cpu_at_start
        .zip(cpu_seconds("self"))
        .map(|(before, after)| (after - before) / (config.duration.as_secs_f64() + 0.2));
    let mut acks = histogram();
    while let Some(done) = devices.join_next().await {
        if let Ok(h) = done {
            let _ = acks.add(&h);
        }
    }
    // Wait for stragglers: until every observer has everything, or the drain limit.
    let sent = common.sent.load(Ordering::Relaxed);
    let drain_until = Instant::now() + config.drain;
    while Instant::now() < drain_until && observers.iter().any(|(_, a, _)| lock(a).received < sent)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop_observing.cancel();
    let start_ns = nanos(start.wall);
    let mut tiers = Vec::new();
    for (name, arrivals, task) in observers {
        let _ = task.await;
        let a = lock(&arrivals);
        let span_s =
            ((a.last_arrival_ns - start_ns) as f64 / 1e9).max(config.duration.as_secs_f64());
        tiers.push(Tier {
            name,
            received: a.received,
            lost: sent.saturating_sub(a.received),
            duplicates: a.duplicates,
            achieved_rate: a.received as f64 / span_s,
            latency: Latency::of(&a.histogram),
        });
    }
    let mqtt_qos1 = config.qos > 0 && matches!(config.publisher, Publisher::Mqtt { .. });
    Ok(LoadReport {
        devices: config.devices,
        target_rate: config.rate,
        qos: config.qos,
        payload_bytes: config.payload_bytes,
        sent,
        offered_rate: sent as f64 / config.duration.as_secs_f64(),
        acked: common.acked.load(Ordering::Relaxed),
        ack_latency: mqtt_qos1.then(|| Latency::of(&acks)),
        reconnects: common.reconnects.load(Ordering::Relaxed),
        generator_busy,
        tiers,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn warm_up_messages_count_for_loss_but_not_for_latency() {
        let device = DeviceId::new("b-d0001").unwrap();
        let now = SystemTime::now();
        let mut arrivals = Arrivals::new();
        arrivals.measure_from_ns = nanos(now - Duration::from_secs(5));
        // Scheduled 10 s ago (warm-up), then 1 s ago (measured), then the warm-up one again.
        arrivals.record(&envelope(&device, 1, now - Duration::from_secs(10), 64));
        arrivals.record(&envelope(&device, 2, now - Duration::from_secs(1), 64));
        arrivals.record(&envelope(&device, 1, now - Duration::from_secs(10), 64));
        assert_eq!((arrivals.received, arrivals.duplicates), (2, 1));
        assert_eq!(arrivals.histogram.len(), 1, "only the measured message");
        let latency = Latency::of(&arrivals.histogram);
        assert!(
            (900.0..5000.0).contains(&latency.max_ms),
            "the measured message's latency, not the warm-up's 10 s: {latency:?}"
        );
    }
}
