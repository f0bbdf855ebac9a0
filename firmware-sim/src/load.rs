//! Load mode: many devices publishing at a fixed total rate, measured end to end.
//!
//! Open loop: every message has a scheduled send time (device `d` sends its `i`-th message at
//! `start + ramp(d) + i / per_device_rate`), carried in the envelope's `device_time`. Latency is
//! measured from that scheduled time to the arrival at a NATS subscriber, so a slow system shows
//! up as latency (coordinated omission is avoided) rather than as a lower send rate. Loss is
//! counted from per-device sequence gaps; duplicates separately.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use hdrhistogram::Histogram;
use liftwire_proto::naming::{BuildingId, DeviceId, Uplink, UplinkKind};
use liftwire_proto::{timestamp, v1, Message, SCHEMA_VERSION};
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What to generate.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Gateway (or any MQTT broker) host.
    pub host: String,
    /// Its port.
    pub port: u16,
    /// NATS server where the messages are expected.
    pub nats_url: String,
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
    /// Devices start spread over this time.
    pub ramp_up: Duration,
    /// Building id of the load devices (`{building}-d0001`, ...).
    pub building: String,
    /// Secrets per device id; `None` connects without credentials (e.g. a broker without auth).
    pub secrets: Option<HashMap<String, String>>,
    /// How long to wait for stragglers after the last send.
    pub drain: Duration,
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
    /// Messages handed to the MQTT client.
    pub sent: u64,
    /// QoS 1 acknowledgements received (0 for QoS 0).
    pub acked: u64,
    /// Distinct messages that arrived on NATS.
    pub received: u64,
    /// Sent but never arrived.
    pub lost: u64,
    /// Arrived more than once.
    pub duplicates: u64,
    /// Achieved arrival rate over the send window.
    pub achieved_rate: f64,
    /// Latency percentiles in milliseconds (scheduled send → NATS arrival).
    pub p50_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Worst.
    pub max_ms: f64,
}

impl LoadReport {
    /// A human-readable table.
    pub fn table(&self) -> String {
        format!(
            "| devices | rate/s | qos | bytes | sent | acked | received | lost | dup | achieved/s | p50 ms | p99 ms | p99.9 ms | max ms |\n\
             |---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n\
             | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} |",
            self.devices, self.target_rate, self.qos, self.payload_bytes, self.sent, self.acked, self.received, self.lost, self.duplicates,
            self.achieved_rate, self.p50_ms, self.p99_ms, self.p999_ms, self.max_ms
        )
    }
}

/// Why a run failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Bad identifiers.
    #[error(transparent)]
    Id(#[from] liftwire_proto::naming::IdError),
    /// NATS unreachable.
    #[error("NATS: {0}")]
    Nats(String),
    /// Bad arguments.
    #[error("{0}")]
    Invalid(&'static str),
}

fn nanos(t: SystemTime) -> i128 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128)
}

/// One load device's id.
pub fn device_id(building: &str, index: u32) -> String {
    format!("{building}-d{index:04}")
}

fn envelope(device: &DeviceId, seq: u64, scheduled: SystemTime, payload_bytes: usize) -> Vec<u8> {
    let mut envelope = v1::Envelope {
        schema_version: SCHEMA_VERSION,
        device_id: device.to_string(),
        seq,
        device_time: Some(timestamp(scheduled)),
        body: Some(v1::envelope::Body::Telemetry(v1::Telemetry {
            mode: v1::OperatingMode::Normal as i32,
            floor: 4,
            position_mm: 12_000,
            direction: v1::Direction::Up as i32,
            doors: vec![v1::DoorState::Closed as i32],
            load_percent: 35,
            speed_mm_s: 1_600,
            motor_temp_decicelsius: 412,
            counters: Some(v1::Counters {
                trips: seq,
                door_cycles: 2 * seq,
                run_seconds: 10 * seq,
                starts: seq,
            }),
        })),
    };
    // Pad with repeated door entries (a real field) up to the requested size.
    while envelope.encoded_len() < payload_bytes {
        if let Some(Body::Telemetry(t)) = envelope.body.as_mut() {
            t.doors.push(v1::DoorState::Closed as i32);
        }
    }
    envelope.encode_to_vec()
}

use v1::envelope::Body;

#[derive(Default)]
struct Arrivals {
    seen: HashMap<String, HashSet<u64>>,
    histogram: Option<Histogram<u64>>,
    duplicates: u64,
    last_arrival_ns: i128,
}

/// Runs the load and measures it.
pub async fn run(
    config: LoadConfig,
    progress: impl Fn(&str) + Send + Sync + 'static,
) -> Result<LoadReport, LoadError> {
    if config.devices == 0 || config.rate == 0 {
        return Err(LoadError::Invalid("devices and rate must be positive"));
    }
    let building = BuildingId::new(config.building.clone())?;
    let nats = async_nats::connect(&config.nats_url)
        .await
        .map_err(|e| LoadError::Nats(e.to_string()))?;
    let filter = format!("lw.v1.up.{building}.*.telemetry");
    let mut subscription = nats
        .subscribe(filter)
        .await
        .map_err(|e| LoadError::Nats(e.to_string()))?;
    nats.flush()
        .await
        .map_err(|e| LoadError::Nats(e.to_string()))?;

    let arrivals = Arc::new(Mutex::new(Arrivals {
        histogram: Histogram::new_with_bounds(1, 60_000_000_000, 3).ok(),
        ..Default::default()
    }));
    let stop_receiving = CancellationToken::new();
    let receiver = tokio::spawn({
        let arrivals = arrivals.clone();
        let stop = stop_receiving.clone();
        async move {
            loop {
                let message = tokio::select! {
                    m = subscription.next() => match m { Some(m) => m, None => break },
                    _ = stop.cancelled() => break,
                };
                let now = nanos(SystemTime::now());
                let Ok(envelope) = v1::Envelope::decode(message.payload.as_ref()) else {
                    continue;
                };
                let scheduled = envelope
                    .device_time
                    .map_or(now, |t| t.seconds as i128 * 1_000_000_000 + t.nanos as i128);
                let mut arrivals = arrivals
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                arrivals.last_arrival_ns = now;
                if !arrivals
                    .seen
                    .entry(envelope.device_id)
                    .or_default()
                    .insert(envelope.seq)
                {
                    arrivals.duplicates += 1;
                    continue;
                }
                let latency = (now - scheduled).max(1) as u64;
                if let Some(h) = arrivals.histogram.as_mut() {
                    let _ = h.record(latency.min(60_000_000_000));
                }
            }
        }
    });

    let sent = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let per_device_rate = config.rate as f64 / config.devices as f64;
    let interval = Duration::from_secs_f64(1.0 / per_device_rate);
    let start = Instant::now() + Duration::from_millis(500);
    let start_wall = SystemTime::now() + Duration::from_millis(500);
    let end = start + config.ramp_up + config.duration;
    let qos = if config.qos == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    };
    let mut devices = tokio::task::JoinSet::new();
    for d in 0..config.devices {
        let id = DeviceId::new(device_id(building.as_str(), d + 1))?;
        let topic = Uplink {
            building: building.clone(),
            device: id.clone(),
            kind: UplinkKind::Telemetry,
        }
        .mqtt_topic();
        let offset = config.ramp_up.mul_f64(d as f64 / config.devices as f64);
        let mut options = MqttOptions::new(id.as_str(), config.host.clone(), config.port);
        options.set_keep_alive(Duration::from_secs(30));
        options.set_inflight(1000);
        if let Some(secret) = config.secrets.as_ref().and_then(|s| s.get(id.as_str())) {
            options.set_credentials(id.as_str(), secret.as_str());
        }
        let (client, mut eventloop) = AsyncClient::new(options, 1024);
        let (sent, acked, payload_bytes) = (sent.clone(), acked.clone(), config.payload_bytes);
        devices.spawn(async move {
            let first = start + offset;
            let mut seq = 0u64;
            let mut next = first;
            let mut connected = false;
            loop {
                tokio::select! {
                    event = eventloop.poll() => match event {
                        Ok(Event::Incoming(Incoming::ConnAck(_))) => connected = true,
                        Ok(Event::Incoming(Incoming::PubAck(_))) => { acked.fetch_add(1, Ordering::Relaxed); }
                        Ok(_) => {}
                        Err(_) => {
                            connected = false;
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    },
                    _ = tokio::time::sleep_until(next), if next < end && connected => {
                        seq += 1;
                        let scheduled = start_wall + (next - start);
                        let payload = envelope(&id, seq, scheduled, payload_bytes);
                        if client.try_publish(topic.clone(), qos, false, payload).is_ok() {
                            sent.fetch_add(1, Ordering::Relaxed);
                        }
                        next = first + interval.mul_f64(seq as f64);
                    }
                    _ = tokio::time::sleep_until(end + Duration::from_secs(2)), if next >= end => break,
                }
            }
            let _ = client.try_disconnect();
            let _ = tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await;
        });
    }
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    while Instant::now() < end {
        ticker.tick().await;
        let received: usize = arrivals
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .seen
            .values()
            .map(HashSet::len)
            .sum();
        progress(&format!(
            "sent {} acked {} received {}",
            sent.load(Ordering::Relaxed),
            acked.load(Ordering::Relaxed),
            received
        ));
    }
    while devices.join_next().await.is_some() {}
    tokio::time::sleep(config.drain).await;
    stop_receiving.cancel();
    let _ = receiver.await;

    let arrivals = arrivals
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let received: u64 = arrivals.seen.values().map(|s| s.len() as u64).sum();
    let sent = sent.load(Ordering::Relaxed);
    let window = config.ramp_up + config.duration;
    let ms = |q: f64| {
        arrivals
            .histogram
            .as_ref()
            .map_or(0.0, |h| h.value_at_quantile(q) as f64 / 1e6)
    };
    Ok(LoadReport {
        devices: config.devices,
        target_rate: config.rate,
        qos: config.qos,
        payload_bytes: config.payload_bytes,
        sent,
        acked: acked.load(Ordering::Relaxed),
        received,
        lost: sent.saturating_sub(received),
        duplicates: arrivals.duplicates,
        achieved_rate: received as f64 / window.as_secs_f64(),
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: arrivals
            .histogram
            .as_ref()
            .map_or(0.0, |h| h.max() as f64 / 1e6),
    })
}
