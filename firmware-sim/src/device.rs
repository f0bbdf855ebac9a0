//! Simulated device firmware on the wire: one MQTT connection per device, exactly like real
//! firmware. Every envelope goes to the persistent outbox before it is sent; after (re)connecting
//! the device resends everything above the backend's watermark, paced so a backlog never exceeds
//! the gateway's per-device rate limit; reconnects back off exponentially with jitter.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use liftwire_proto::naming::{
    device_downlink_filters, Audience, BuildingId, DeviceId, Downlink, DownlinkKind, Uplink,
    UplinkKind,
};
use liftwire_proto::{v1, Message, SCHEMA_VERSION};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rumqttc::{AsyncClient, Event, Incoming, MqttOptions, QoS};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::elevator::Elevator;
use crate::outbox::Outbox;
use crate::screen::Screen;

/// What runs on a device.
#[derive(Debug)]
pub enum Firmware {
    /// An elevator controller, driven by its model.
    Elevator(Box<Elevator>),
    /// An in-cabin screen, driven by the content it receives.
    Screen(Screen),
}

impl Firmware {
    fn device(&self) -> &DeviceId {
        match self {
            Firmware::Elevator(e) => e.device(),
            Firmware::Screen(s) => s.device(),
        }
    }

    fn set_next_seq(&mut self, seq: u64) {
        match self {
            Firmware::Elevator(e) => e.set_next_seq(seq),
            Firmware::Screen(s) => s.set_next_seq(seq),
        }
    }

    fn advance(&mut self, sim_ms: u64) -> Vec<v1::Envelope> {
        match self {
            Firmware::Elevator(e) => e.advance(sim_ms),
            Firmware::Screen(s) => s.take_acks(),
        }
    }

    async fn downlink(&mut self, kind: DownlinkKind, payload: &[u8]) {
        let (Firmware::Screen(screen), DownlinkKind::ScreenContent) = (self, kind) else {
            return;
        };
        let Ok(v1::Downlink {
            body: Some(v1::downlink::Body::ScreenContent(content)),
            ..
        }) = v1::Downlink::decode(payload)
        else {
            return;
        };
        if let Err(e) = screen.show(&content).await {
            tracing::warn!(device = %screen.device(), error = %e, "content not shown");
        }
    }
}

/// How devices connect and run.
#[derive(Debug, Clone)]
pub struct RunSettings {
    /// Gateway MQTT host.
    pub host: String,
    /// Gateway MQTT port.
    pub port: u16,
    /// MQTT keep-alive.
    pub keep_alive: Duration,
    /// Where outboxes (and secrets) live.
    pub data_dir: PathBuf,
    /// Simulated seconds per real second.
    pub speed: f64,
    /// Backlog messages resent per second after a reconnect (below the gateway's rate limit).
    pub resend_per_second: u32,
    /// First reconnect delay; doubles up to `max_backoff`, with ±50 % jitter.
    pub min_backoff: Duration,
    /// Longest reconnect delay.
    pub max_backoff: Duration,
}

/// Fleet-wide counters.
#[derive(Debug, Default)]
pub struct Stats {
    /// Envelopes produced by the models.
    pub produced: AtomicU64,
    /// Publishes handed to MQTT (first sends and resends).
    pub sent: AtomicU64,
    /// Envelopes confirmed by watermarks.
    pub confirmed: AtomicU64,
    /// Devices connected now.
    pub connected: AtomicU64,
    /// Connections lost.
    pub disconnects: AtomicU64,
}

const TICK: Duration = Duration::from_millis(100);

/// Network-level chaos, sent to devices while they run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Chaos {
    /// The device loses the network for a while (no packets at all, no DISCONNECT), keeps
    /// producing into its outbox, and replays the backlog after reconnecting.
    Partition(Duration),
    /// The device misbehaves: a malformed payload, an envelope claiming another device and a
    /// payload over the size limit on its connection, then, on its next connection, a publish on
    /// another device's topic. (The oversized packet and the foreign topic each cost the device
    /// its connection, so both need one.)
    Misbehave,
    /// Drop the connection and reconnect at once (all devices together make a connect storm).
    Reconnect,
    /// Something happens to the elevator (ignored by screens).
    Incident(crate::elevator::Incident),
}

/// Which devices a [`Chaos`] command is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// Every device.
    All,
    /// One device.
    Device(DeviceId),
}

/// A chaos command for some devices.
pub type ChaosCommand = (Target, Chaos);

/// One MQTT connection: the client, and its event loop in a task of its own. rumqttc's
/// `EventLoop::poll` must not be cancelled while it connects (a cancelled connect leaves a
/// half-open CONNECT behind and the next poll dials again), so it never sits in a `select!`.
struct Link {
    client: AsyncClient,
    events: tokio::sync::mpsc::UnboundedReceiver<Result<Event, String>>,
    /// After an error the task waits for this before dialing again (the device's backoff).
    resume: tokio::sync::mpsc::UnboundedSender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Link {
    /// A connection; with `paused` it dials only at the first [`Link::resume`].
    fn open(options: &MqttOptions, paused: bool) -> Self {
        let (client, mut eventloop) = AsyncClient::new(options.clone(), 256);
        let (events_tx, events) = tokio::sync::mpsc::unbounded_channel();
        let (resume, mut resume_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let task = tokio::spawn(async move {
            if paused && resume_rx.recv().await.is_none() {
                return;
            }
            loop {
                let event = eventloop.poll().await;
                let failed = event.is_err();
                if events_tx.send(event.map_err(|e| e.to_string())).is_err() {
                    return;
                }
                if failed && resume_rx.recv().await.is_none() {
                    return;
                }
            }
        });
        Self {
            client,
            events,
            resume,
            task,
        }
    }

    fn resume(&self) {
        let _ = self.resume.send(());
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Dropping the event loop closes the TCP connection without a DISCONNECT.
        self.task.abort();
    }
}

/// What every device of a fleet shares.
#[derive(Debug)]
pub struct Wiring {
    /// How devices connect and run.
    pub settings: Arc<RunSettings>,
    /// Fleet-wide counters.
    pub stats: Arc<Stats>,
    /// Chaos commands.
    pub chaos: tokio::sync::broadcast::Receiver<ChaosCommand>,
    /// Stops the device.
    pub shutdown: CancellationToken,
}

/// Runs one device until `shutdown`; returns its outbox for inspection.
pub async fn run(
    building: BuildingId,
    mut firmware: Firmware,
    secret: String,
    seed: u64,
    wiring: Wiring,
) -> std::io::Result<Outbox> {
    let Wiring {
        settings,
        stats,
        mut chaos,
        shutdown,
    } = wiring;
    let device = firmware.device().clone();
    let mut outbox = Outbox::open(&settings.data_dir.join("outbox").join(device.as_str()))?;
    firmware.set_next_seq(outbox.next_seq());
    let mut options = MqttOptions::new(device.as_str(), settings.host.clone(), settings.port);
    options.set_credentials(device.as_str(), secret);
    options.set_keep_alive(settings.keep_alive);
    options.set_clean_session(true);
    // The gateway, not this client, must be the one that refuses an oversized publish; and the
    // client takes any downlink the gateway passes (at most its default `mqtt.max_payload_bytes`,
    // 64 KiB, per packet), where rumqttc's default would drop the connection above 10 KiB.
    options.set_max_packet_size(128 * 1024, OVERSIZED + 1024);
    // Real firmware registers a last will; the gateway drops it and reports presence itself
    // (a will would bypass its checks), so this only proves the gateway tolerates one.
    let will_topic = Uplink {
        building: building.clone(),
        device: device.clone(),
        kind: UplinkKind::Event,
    }
    .mqtt_topic();
    options.set_last_will(rumqttc::LastWill::new(
        will_topic,
        Vec::<u8>::new(),
        QoS::AtLeastOnce,
        false,
    ));
    let mut link = Link::open(&options, false);
    let downlink = Downlink {
        building: building.clone(),
        audience: Audience::Device(device.clone()),
        kind: DownlinkKind::Watermark,
    };
    let watermark_topic = downlink.mqtt_topic();
    let filters = device_downlink_filters(&building, &device);

    let mut rng = StdRng::seed_from_u64(seed);
    let mut tick = tokio::time::interval(TICK);
    let mut connected = false;
    let mut retry_at: Option<Instant> = None;
    let mut backoff = settings.min_backoff;
    // Next pending sequence number to (re)send, and when the watermark last moved.
    let mut resend_from: Option<u64> = None;
    let mut last_progress = Instant::now();
    let mut chaos_open = true;
    let mut trespass = Trespass::No;
    let per_tick = (settings.resend_per_second as f64 * TICK.as_secs_f64()).ceil() as usize;
    let sim_ms_per_tick = (TICK.as_millis() as f64 * settings.speed) as u64;

    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            command = chaos.recv(), if chaos_open => {
                let (target, command) = match command {
                    Ok(command) => command,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        chaos_open = false;
                        continue;
                    }
                };
                if target != Target::All && target != Target::Device(device.clone()) {
                    continue;
                }
                match command {
                    Chaos::Partition(duration) => {
                        // The link dies without a DISCONNECT; nothing gets through until the
                        // partition heals, then the device dials again and replays its backlog.
                        if connected {
                            stats.connected.fetch_sub(1, Ordering::Relaxed);
                            stats.disconnects.fetch_add(1, Ordering::Relaxed);
                        }
                        connected = false;
                        trespass = trespass.unsent();
                        link = Link::open(&options, true);
                        retry_at = Some(Instant::now() + duration);
                    }
                    Chaos::Misbehave => {
                        misbehave(&link.client, &building, &device);
                        if trespass == Trespass::No {
                            trespass = Trespass::Pending;
                        }
                    }
                    Chaos::Incident(incident) => {
                        if let Firmware::Elevator(elevator) = &mut firmware {
                            for envelope in elevator.inject(incident) {
                                stats.produced.fetch_add(1, Ordering::Relaxed);
                                outbox.push(envelope)?;
                                if connected && resend_from.is_none() {
                                    if let Some(envelope) = outbox.last() {
                                        send(&link.client, &building, envelope, &stats);
                                    }
                                }
                            }
                        }
                    }
                    Chaos::Reconnect => {
                        if connected {
                            stats.connected.fetch_sub(1, Ordering::Relaxed);
                            stats.disconnects.fetch_add(1, Ordering::Relaxed);
                        }
                        connected = false;
                        trespass = trespass.unsent();
                        // A fresh client drops the old TCP connection and dials at once.
                        link = Link::open(&options, false);
                        retry_at = None;
                    }
                }
            }
            _ = tick.tick() => {
                for envelope in firmware.advance(sim_ms_per_tick) {
                    stats.produced.fetch_add(1, Ordering::Relaxed);
                    outbox.push(envelope)?;
                    // Live messages go at once when nothing older is waiting.
                    if connected && resend_from.is_none() {
                        if let Some(envelope) = outbox.last() {
                            send(&link.client, &building, envelope, &stats);
                        }
                    }
                }
                if connected {
                    if let Some(from) = resend_from {
                        resend_from = resend(&link.client, &building, &outbox, from, per_tick, &stats);
                    } else if !outbox.is_empty() && last_progress.elapsed() > Duration::from_secs(30) {
                        // Sent but never confirmed (dropped somewhere): resend from the watermark.
                        resend_from = Some(outbox.watermark() + 1);
                        last_progress = Instant::now();
                    }
                }
            }
            _ = async { tokio::time::sleep_until(retry_at.unwrap_or_else(Instant::now)).await }, if retry_at.is_some() => {
                retry_at = None;
                link.resume();
            }
            Some(event) = link.events.recv() => match event {
                Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                    connected = true;
                    stats.connected.fetch_add(1, Ordering::Relaxed);
                    backoff = settings.min_backoff;
                    for filter in &filters {
                        let _ = link.client.try_subscribe(filter.clone(), QoS::AtLeastOnce);
                    }
                    resend_from = (!outbox.is_empty()).then(|| outbox.watermark() + 1);
                    last_progress = Instant::now();
                    if trespass != Trespass::No {
                        publish_foreign(&link.client, &building, &device);
                        trespass = Trespass::Sent;
                    }
                }
                Ok(Event::Incoming(Incoming::Publish(publish))) if publish.topic == watermark_topic => {
                    if let Ok(v1::Downlink { body: Some(v1::downlink::Body::Watermark(w)), .. }) = v1::Downlink::decode(publish.payload.as_ref()) {
                        let before = outbox.len();
                        if outbox.confirm(w.persisted_seq)? {
                            tracing::warn!(%device, watermark = w.persisted_seq, "the backend holds sequence numbers this device never issued (a reset?): continuing above them");
                            firmware.set_next_seq(outbox.next_seq());
                            resend_from = (!outbox.is_empty()).then(|| outbox.watermark() + 1);
                        }
                        let confirmed = before.saturating_sub(outbox.len());
                        if confirmed > 0 {
                            stats.confirmed.fetch_add(confirmed as u64, Ordering::Relaxed);
                            last_progress = Instant::now();
                        }
                        if resend_from.is_some_and(|from| from <= outbox.watermark()) {
                            resend_from = (!outbox.is_empty()).then(|| outbox.watermark() + 1);
                        }
                    }
                }
                Ok(Event::Incoming(Incoming::Publish(publish))) => {
                    if let Ok(down) = Downlink::from_mqtt_topic(&publish.topic) {
                        firmware.downlink(down.kind, &publish.payload).await;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if trespass == Trespass::Sent {
                        trespass = Trespass::No;
                    }
                    if connected {
                        stats.connected.fetch_sub(1, Ordering::Relaxed);
                        stats.disconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    connected = false;
                    let jitter = rng.random_range(0.5..1.5);
                    let delay = backoff.mul_f64(jitter);
                    tracing::debug!(device = %device, error = %e, retry_in = ?delay, "connection lost");
                    retry_at = Some(Instant::now() + delay);
                    backoff = (backoff * 2).min(settings.max_backoff);
                }
            },
        }
    }
    if connected {
        stats.connected.fetch_sub(1, Ordering::Relaxed);
        let _ = link.client.try_disconnect();
        // Let the DISCONNECT go out.
        let _ = tokio::time::timeout(Duration::from_millis(200), link.events.recv()).await;
    }
    Ok(outbox)
}

fn send(client: &AsyncClient, building: &BuildingId, envelope: &v1::Envelope, stats: &Stats) {
    let (Some(kind), Ok(device)) = (envelope.kind(), DeviceId::new(envelope.device_id.as_str()))
    else {
        return;
    };
    let topic = Uplink {
        building: building.clone(),
        device,
        kind,
    }
    .mqtt_topic();
    // A full request queue only delays it: the outbox resends it.
    if client
        .try_publish(topic, QoS::AtLeastOnce, false, envelope.encode_to_vec())
        .is_ok()
    {
        stats.sent.fetch_add(1, Ordering::Relaxed);
    }
}

/// Sends up to `budget` pending envelopes from sequence `from`; returns where to continue, or
/// `None` once the backlog is sent.
fn resend(
    client: &AsyncClient,
    building: &BuildingId,
    outbox: &Outbox,
    from: u64,
    budget: usize,
    stats: &Stats,
) -> Option<u64> {
    for (sent, envelope) in outbox.pending().filter(|e| e.seq >= from).enumerate() {
        if sent == budget {
            return Some(envelope.seq);
        }
        send(client, building, envelope, stats);
    }
    None
}

/// A misbehaving device's publish on a foreign topic: sent on each new connection until one that
/// carried it is closed (by the gateway, for it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trespass {
    No,
    /// To send once connected.
    Pending,
    /// Sent on the current connection.
    Sent,
}

impl Trespass {
    /// After the connection was replaced by the device itself: not done yet.
    fn unsent(self) -> Self {
        match self {
            Trespass::Sent => Trespass::Pending,
            other => other,
        }
    }
}

/// Size of the oversized payload a misbehaving device sends (the gateway's limit is far lower).
const OVERSIZED: usize = 2 * 1024 * 1024;

/// Publishes what a broken or malicious firmware would, in an order that gets each to the
/// gateway: the oversized packet last, as the gateway closes the connection on it.
fn misbehave(client: &AsyncClient, building: &BuildingId, device: &DeviceId) {
    let own = Uplink {
        building: building.clone(),
        device: device.clone(),
        kind: UplinkKind::Event,
    }
    .mqtt_topic();
    let impostor = v1::Envelope {
        schema_version: SCHEMA_VERSION,
        device_id: format!("{device}-impostor"),
        seq: 1,
        ..Default::default()
    };
    let _ = client.try_publish(
        own.clone(),
        QoS::AtLeastOnce,
        false,
        vec![0xff, 0x00, 0x13, 0x37],
    );
    let _ = client.try_publish(
        own.clone(),
        QoS::AtLeastOnce,
        false,
        impostor.encode_to_vec(),
    );
    let _ = client.try_publish(own, QoS::AtLeastOnce, false, vec![0u8; OVERSIZED]);
}

/// Publishes on another device's topic (the gateway closes the connection on it).
fn publish_foreign(client: &AsyncClient, building: &BuildingId, device: &DeviceId) {
    let other = Uplink {
        building: building.clone(),
        device: DeviceId::new(format!("{device}-x")).unwrap_or_else(|_| device.clone()),
        kind: UplinkKind::Event,
    }
    .mqtt_topic();
    let _ = client.try_publish(other, QoS::AtLeastOnce, false, vec![1]);
}
