//! JetStream → PostgreSQL ingest of the device stream.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, AckKind};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use liftwire_proto::naming::{
    dead_letter_subject, state_subject, Audience, BuildingId, DeviceId, Downlink, DownlinkKind,
    Uplink, DEAD_LETTER_STREAM, UPLINK_STREAM,
};
use liftwire_proto::{v1, Message, SCHEMA_VERSION};
use liftwire_runtime::admin::ReadinessCheck;
use liftwire_runtime::nats::{ensure_stream, NatsConfig};
use liftwire_runtime::observability::adopt_trace_context;
use liftwire_runtime::service::{BoxError, BuildContext};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::alerts;
use crate::partitions::Partitions;
use crate::state::FoldRules;
use crate::store::{self, Columns, Row, WatermarkAdvance};

/// `[ingest]` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Durable consumer name shared by every replica.
    pub consumer: String,
    /// Largest batch written in one transaction.
    pub batch_size: usize,
    /// Transactions written at once per replica, each for its own share of the devices (so they
    /// never wait for each other's locks); each writer has one share of the next batch waiting.
    pub workers: usize,
    /// Longest a message waits for its batch to fill before the batch is written anyway.
    #[serde(with = "humantime_serde")]
    pub batch_wait: Duration,
    /// How long JetStream waits for an acknowledgement before redelivering.
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// Longest pause between retries while PostgreSQL is failing.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// A device clock ahead of the gateway's by more than this is not believed: the message is
    /// filed under the time the gateway received it.
    #[serde(with = "humantime_serde")]
    pub max_clock_skew: Duration,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            consumer: "telemetry-ingest".into(),
            batch_size: 5000,
            workers: 2,
            batch_wait: Duration::from_millis(100),
            ack_wait: Duration::from_secs(30),
            max_backoff: Duration::from_secs(5),
            max_clock_skew: Duration::from_secs(300),
        }
    }
}

/// Why a message was dead-lettered: a stable label for metrics and the dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

/// Ingest metrics.
#[derive(Clone)]
struct Metrics {
    ingested: Family<KindLabel, Counter>,
    duplicates: Counter,
    dead_letters: Family<ReasonLabel, Counter>,
    unstorable: Counter,
    database_errors: Counter,
    batch_seconds: Histogram,
}

impl Metrics {
    fn register(ctx: &BuildContext) -> Self {
        let metrics = Self {
            ingested: Family::default(),
            duplicates: Counter::default(),
            dead_letters: Family::default(),
            unstorable: Counter::default(),
            database_errors: Counter::default(),
            batch_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 14)),
        };
        let mut registry = ctx.registry();
        let registry = registry.sub_registry_with_prefix("telemetry_ingest");
        registry.register(
            "messages",
            "Device messages persisted, by kind",
            metrics.ingested.clone(),
        );
        registry.register(
            "duplicates",
            "Redelivered or resent messages already persisted",
            metrics.duplicates.clone(),
        );
        registry.register(
            "dead_letters",
            "Messages rejected to the dead-letter stream, by reason",
            metrics.dead_letters.clone(),
        );
        registry.register(
            "unstorable",
            "Messages PostgreSQL refused to store (a value out of its range), kept as placeholders",
            metrics.unstorable.clone(),
        );
        registry.register(
            "database_errors",
            "Batches that failed to commit (retried)",
            metrics.database_errors.clone(),
        );
        registry.register(
            "batch_seconds",
            "Time to write and commit one batch",
            metrics.batch_seconds.clone(),
        );
        metrics
    }
}

/// A message that cannot be ingested, with a stable reason.
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    /// The subject is not a device uplink subject.
    #[error("subject is not a device uplink subject: {0}")]
    Subject(liftwire_proto::naming::NameError),
    /// The payload is not an envelope.
    #[error("payload is not a liftwire.v1.Envelope: {0}")]
    Decode(prost::DecodeError),
    /// An envelope of another schema version.
    #[error("schema version {0} is not supported")]
    SchemaVersion(u32),
    /// The envelope claims another device than the gateway authenticated.
    #[error("envelope device id {envelope:?} differs from the authenticated device {subject:?}")]
    DeviceMismatch {
        /// Device id in the envelope.
        envelope: String,
        /// Device id the gateway authenticated.
        subject: String,
    },
    /// Sequence number 0.
    #[error("sequence number must start at 1 (got 0)")]
    ZeroSequence,
    /// A sequence number beyond `i64::MAX`.
    #[error("sequence number {0} does not fit a signed 64-bit column")]
    SequenceTooLarge(u64),
    /// No body.
    #[error("envelope has no body")]
    EmptyBody,
    /// The body does not match the subject's kind.
    #[error("body kind {body} arrived on the {subject} subject")]
    KindMismatch {
        /// Kind of the body.
        body: &'static str,
        /// Kind of the subject.
        subject: &'static str,
    },
    /// A value no elevator can report.
    #[error("impossible content: {0}")]
    Impossible(String),
}

impl Rejection {
    /// Stable label for metrics and dead letters.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::Subject(_) => "subject",
            Rejection::Decode(_) => "decode",
            Rejection::SchemaVersion(_) => "schema_version",
            Rejection::DeviceMismatch { .. } => "device_mismatch",
            Rejection::ZeroSequence => "zero_sequence",
            Rejection::SequenceTooLarge(_) => "sequence_too_large",
            Rejection::EmptyBody => "empty_body",
            Rejection::KindMismatch { .. } => "kind_mismatch",
            Rejection::Impossible(_) => "impossible_content",
        }
    }
}

/// Limits of what a real elevator reports; anything beyond is refused as impossible.
const MAX_LOAD_PERCENT: u32 = 200;
const MAX_DOORS: usize = 2;
const MAX_ABS_FLOOR: i32 = 250;
/// A trip's levelling error beyond this (a metre) is no measurement (firmware sentinels such as
/// `i32::MIN` mean "no reading"): the trip counts, its levelling does not.
const MAX_LEVELLING_ERROR_MM: u32 = 1_000;

/// Why a message was refused, and, when its device and sequence number are trustworthy, the
/// placeholder row that keeps its place so the device's watermark can pass it.
#[derive(Debug)]
pub struct Refused {
    /// Why.
    pub rejection: Rejection,
    /// Placeholder (`kind = 'rejected'`).
    pub placeholder: Option<Box<Row>>,
}

/// Times a message is filed under.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// When the gateway stored the message in JetStream.
    pub received_at: DateTime<Utc>,
    /// Messages filed before this are beyond the retention.
    pub oldest: DateTime<Utc>,
    /// Device clocks ahead of `received_at` by more than this are not believed.
    pub max_clock_skew: chrono::Duration,
}

fn check_content(envelope: &v1::Envelope) -> Result<(), Rejection> {
    use v1::event::Kind;
    let missing = |what: &str| Err(Rejection::Impossible(format!("{what} is empty")));
    // PostgreSQL refuses it in `text`: storing it would fail the batch again at every redelivery.
    // The gateway bridges it (flagged), so that it gets its placeholder here.
    if let Some(field) = liftwire_proto::text::nul_in_text(envelope) {
        return Err(Rejection::Impossible(format!(
            "{field} contains a NUL character"
        )));
    }
    match &envelope.body {
        Some(v1::envelope::Body::Telemetry(t)) => {
            if t.load_percent > MAX_LOAD_PERCENT {
                return Err(Rejection::Impossible(format!(
                    "load of {}% of rated load",
                    t.load_percent
                )));
            }
            if t.doors.len() > MAX_DOORS {
                return Err(Rejection::Impossible(format!(
                    "{} car doors",
                    t.doors.len()
                )));
            }
            if t.floor.abs() > MAX_ABS_FLOOR {
                return Err(Rejection::Impossible(format!("floor {}", t.floor)));
            }
        }
        Some(v1::envelope::Body::Event(v1::Event { kind: Some(kind) })) => match kind {
            Kind::FaultRaised(f) if f.fault_id.is_empty() => return missing("fault_id"),
            Kind::FaultCleared(f) if f.fault_id.is_empty() => return missing("fault_id"),
            Kind::EntrapmentStarted(e) if e.entrapment_id.is_empty() => {
                return missing("entrapment_id")
            }
            Kind::EntrapmentReleased(e) if e.entrapment_id.is_empty() => {
                return missing("entrapment_id")
            }
            Kind::MaintenanceVisitStarted(v) if v.visit_id.is_empty() => {
                return missing("visit_id")
            }
            Kind::MaintenanceVisitEnded(v) if v.visit_id.is_empty() => return missing("visit_id"),
            _ => {}
        },
        Some(v1::envelope::Body::Event(v1::Event { kind: None })) => {
            return Err(Rejection::EmptyBody)
        }
        _ => {}
    }
    Ok(())
}

fn event_name(kind: &v1::event::Kind) -> &'static str {
    use v1::event::Kind;
    match kind {
        Kind::TripCompleted(_) => "trip_completed",
        Kind::DoorCycle(_) => "door_cycle",
        Kind::FaultRaised(_) => "fault_raised",
        Kind::FaultCleared(_) => "fault_cleared",
        Kind::AlarmButtonPressed(_) => "alarm_button_pressed",
        Kind::AlarmSelfTest(_) => "alarm_self_test",
        Kind::EntrapmentStarted(_) => "entrapment_started",
        Kind::EntrapmentReleased(_) => "entrapment_released",
        Kind::ModeChanged(_) => "mode_changed",
        Kind::PowerLost(_) => "power_lost",
        Kind::PowerRestored(_) => "power_restored",
        Kind::MaintenanceVisitStarted(_) => "maintenance_visit_started",
        Kind::MaintenanceVisitEnded(_) => "maintenance_visit_ended",
    }
}

fn columns(envelope: &v1::Envelope) -> Columns {
    use v1::event::Kind;
    match &envelope.body {
        Some(v1::envelope::Body::Telemetry(t)) => Columns {
            mode: i16::try_from(t.mode).ok(),
            floor: Some(t.floor),
            load_percent: i16::try_from(t.load_percent).ok(),
            speed_mm_s: i32::try_from(t.speed_mm_s).ok(),
            motor_temp_decicelsius: Some(t.motor_temp_decicelsius),
            ..Default::default()
        },
        Some(v1::envelope::Body::Event(v1::Event { kind: Some(kind) })) => Columns {
            event: Some(event_name(kind)),
            event_value: match kind {
                Kind::TripCompleted(t) => Some(t.levelling_error_mm)
                    .filter(|mm| mm.unsigned_abs() <= MAX_LEVELLING_ERROR_MM),
                Kind::AlarmSelfTest(t) => Some(i32::from(t.passed)),
                _ => None,
            },
            ..Default::default()
        },
        _ => Columns::default(),
    }
}

/// Validates one message of the uplink stream into a row.
pub fn validate(subject: &str, payload: &bytes::Bytes, clock: &Clock) -> Result<Row, Refused> {
    let refuse = |rejection| Refused {
        rejection,
        placeholder: None,
    };
    let uplink = Uplink::from_nats_subject(subject).map_err(|e| refuse(Rejection::Subject(e)))?;
    let envelope =
        v1::Envelope::decode(payload.as_ref()).map_err(|e| refuse(Rejection::Decode(e)))?;
    if envelope.schema_version != SCHEMA_VERSION {
        return Err(refuse(Rejection::SchemaVersion(envelope.schema_version)));
    }
    if envelope.device_id != uplink.device.as_str() {
        return Err(refuse(Rejection::DeviceMismatch {
            envelope: envelope.device_id,
            subject: uplink.device.to_string(),
        }));
    }
    if envelope.seq == 0 {
        return Err(refuse(Rejection::ZeroSequence));
    }
    let seq = i64::try_from(envelope.seq)
        .map_err(|_| refuse(Rejection::SequenceTooLarge(envelope.seq)))?;
    // An unset clock (before 2020: a controller whose clock battery died) reads as none.
    let device_time = envelope
        .device_time
        .as_ref()
        .and_then(crate::state::datetime)
        .filter(|t| t.timestamp() >= liftwire_proto::EARLIEST_DEVICE_TIME);
    // The device clock, unless missing, ahead of the gateway's by more than the allowed skew,
    // or older than the retention (a clock reset to its firmware's build date, say; the day's
    // partition is gone too): then the arrival time. Whatever its clock, what a device reports,
    // an entrapment first, is kept.
    let at = device_time
        .filter(|t| *t <= clock.received_at + clock.max_clock_skew && *t >= clock.oldest)
        .unwrap_or(clock.received_at);
    let mut row = Row {
        device: uplink.device.to_string(),
        building: uplink.building.to_string(),
        seq,
        kind: "rejected",
        at,
        device_time,
        received_at: clock.received_at,
        payload: payload.clone(),
        columns: Columns::default(),
        envelope: None,
    };
    // From here on the device and sequence number are trustworthy: a refused message keeps its
    // place in the sequence (filed under its arrival time).
    let content = (|| {
        let kind = envelope.kind().ok_or(Rejection::EmptyBody)?;
        if kind != uplink.kind {
            return Err(Rejection::KindMismatch {
                body: kind.as_str(),
                subject: uplink.kind.as_str(),
            });
        }
        check_content(&envelope)?;
        Ok(kind)
    })();
    match content {
        Ok(kind) => {
            row.kind = kind.as_str();
            row.columns = columns(&envelope);
            row.envelope = Some(envelope);
            Ok(row)
        }
        Err(rejection) => {
            row.at = clock.received_at;
            Err(Refused {
                rejection,
                placeholder: Some(Box::new(row)),
            })
        }
    }
}

/// The writer of a device's messages, out of `writers`: always the same one, so that a device's
/// batches are written in order and a replica's writers never wait for each other's locks.
fn writer_of(device: &str, writers: usize) -> usize {
    use std::hash::{Hash, Hasher};
    if writers <= 1 {
        return 0;
    }
    // A fixed hash (not a random seed): any stable spread does.
    let mut hasher = std::hash::DefaultHasher::new();
    device.hash(&mut hasher);
    usize::try_from(hasher.finish() % writers as u64).unwrap_or(0)
}

/// How often the server signals an idle pull subscription, so that a lost one is noticed.
const PULL_HEARTBEAT: Duration = Duration::from_secs(5);

/// How many rows of each kind a batch has, so each counter is updated once per batch.
fn count_kinds(kinds: impl IntoIterator<Item = &'static str>) -> Vec<(&'static str, u64)> {
    let mut counts: Vec<(&'static str, u64)> = Vec::new();
    for kind in kinds {
        match counts.iter_mut().find(|(k, _)| *k == kind) {
            Some((_, n)) => *n += 1,
            None => counts.push((kind, 1)),
        }
    }
    counts
}

/// A fetched batch (or a writer's share of it), validated: the rows to write and the messages
/// they came from.
struct Prepared {
    /// When the batch was received.
    started: Instant,
    rows: Vec<Row>,
    /// Acknowledged once the rows commit.
    pending: Vec<jetstream::Message>,
}

/// A committed batch: its messages to acknowledge and what to announce.
struct Committed {
    pending: Vec<jetstream::Message>,
    outcome: store::Outcome,
}

/// The ingest loop.
pub struct Ingest {
    config: IngestConfig,
    nats: async_nats::Client,
    js: jetstream::Context,
    consumer: jetstream::consumer::Consumer<pull::Config>,
    pool: sqlx::PgPool,
    partitions: Arc<Partitions>,
    rules: FoldRules,
    metrics: Metrics,
    database_ready: ReadinessCheck,
    dead_letters: String,
}

impl Ingest {
    /// Declares the streams and the durable consumer, and registers metrics.
    pub async fn build(
        config: IngestConfig,
        nats_config: &NatsConfig,
        nats: async_nats::Client,
        pool: sqlx::PgPool,
        partitions: Arc<Partitions>,
        rules: FoldRules,
        ctx: &BuildContext,
    ) -> Result<Self, BoxError> {
        let js = jetstream::new(nats.clone());
        let stream = ensure_stream(&js, &UPLINK_STREAM, nats_config).await?;
        ensure_stream(&js, &DEAD_LETTER_STREAM, nats_config).await?;
        let consumer = stream
            .get_or_create_consumer(
                &config.consumer,
                pull::Config {
                    durable_name: Some(config.consumer.clone()),
                    description: Some("telemetry service ingest (shared by every replica)".into()),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: config.ack_wait,
                    max_ack_pending: i64::try_from(config.batch_size * config.workers.max(1) * 10)
                        .unwrap_or(i64::MAX),
                    ..Default::default()
                },
            )
            .await?;
        let database_ready = ctx.readiness.register("database");
        Ok(Self {
            metrics: Metrics::register(ctx),
            config,
            nats,
            js,
            consumer,
            pool,
            partitions,
            rules,
            database_ready,
            dead_letters: dead_letter_subject("telemetry")?,
        })
    }

    /// Ingests until `shutdown`, as a pipeline whose stages run at once: fetching and validating
    /// the next batch; writing, with `workers` writers, each its share of the devices (by a hash
    /// of the device id, so a replica's transactions never wait for each other's device locks,
    /// and each device's messages are written in the order JetStream delivered them); and
    /// acknowledging and announcing what committed. Batches in progress are finished (committed
    /// and acknowledged) before returning.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), BoxError> {
        let this = Arc::new(self);
        let writers = this.config.workers.max(1);
        let (to_acknowledge, acknowledging) = mpsc::channel(writers);
        let mut to_write = Vec::with_capacity(writers);
        let mut write = Vec::with_capacity(writers);
        for _ in 0..writers {
            // One share of a batch waits for each writer while it writes the previous one.
            let (tx, rx) = mpsc::channel(1);
            to_write.push(tx);
            write.push(tokio::spawn(this.clone().write(
                rx,
                to_acknowledge.clone(),
                shutdown.clone(),
            )));
        }
        drop(to_acknowledge);
        let fetch = tokio::spawn(this.clone().fetch(to_write, shutdown));
        let acknowledge = tokio::spawn(this.clone().acknowledge_committed(acknowledging));
        let (fetched, written, acknowledged) =
            tokio::join!(fetch, futures::future::join_all(write), acknowledge);
        tracing::info!("ingest stopped");
        fetched?;
        for w in written {
            w?;
        }
        acknowledged?;
        Ok(())
    }

    /// Stage 1: fetch a batch, validate it (dead-lettering what is refused), hand each writer
    /// its share.
    async fn fetch(
        self: Arc<Self>,
        to_write: Vec<mpsc::Sender<Prepared>>,
        shutdown: CancellationToken,
    ) {
        let mut backoff = Duration::from_millis(100);
        let mut pulling = None;
        'fetching: while !shutdown.is_cancelled() {
            let batch = tokio::select! {
                batch = self.next_batch(&mut pulling) => batch,
                _ = shutdown.cancelled() => break,
            };
            let messages = match batch {
                Ok(messages) => messages,
                Err(e) => {
                    tracing::warn!(error = %e, "fetching from JetStream failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => break,
                    }
                    continue;
                }
            };
            if messages.is_empty() {
                if !self.database_ready.is_ready() {
                    // Idle: nothing to write, so probe the database to report readiness.
                    let probe = sqlx::query("SELECT 1").execute(&self.pool).await;
                    self.database_ready.set(probe.is_ok());
                }
                continue;
            }
            match self.prepare(messages, to_write.len()).await {
                Ok(shares) => {
                    backoff = Duration::from_millis(100);
                    for (share, writer) in shares.into_iter().zip(&to_write) {
                        if !share.rows.is_empty() && writer.send(share).await.is_err() {
                            break 'fetching;
                        }
                    }
                }
                Err(e) => {
                    // Nothing of the batch is acknowledged: JetStream redelivers it.
                    tracing::warn!(error = %e, retry_in = ?backoff, "dead-lettering failed; JetStream keeps the batch for redelivery");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => break,
                    }
                    backoff = (backoff * 2).min(self.config.max_backoff);
                }
            }
        }
    }

    /// Stage 2: write each batch in one transaction, then hand it on to be acknowledged. A batch
    /// that fails is negatively acknowledged (JetStream redelivers it) and the writer backs off.
    async fn write(
        self: Arc<Self>,
        mut writing: mpsc::Receiver<Prepared>,
        to_acknowledge: mpsc::Sender<Committed>,
        shutdown: CancellationToken,
    ) {
        let mut backoff = Duration::from_millis(100);
        while let Some(prepared) = writing.recv().await {
            let Prepared {
                started,
                rows,
                pending,
            } = prepared;
            let kinds = count_kinds(rows.iter().map(|r| r.kind));
            let total = rows.len() as u64;
            let written = async {
                self.partitions
                    .ensure(&self.pool, &store::days(&rows))
                    .await?;
                store::write_batch(&self.pool, rows, &self.rules).await
            }
            .await;
            match written {
                Ok(outcome) => {
                    self.database_ready.set(true);
                    backoff = Duration::from_millis(100);
                    self.metrics
                        .batch_seconds
                        .observe(started.elapsed().as_secs_f64());
                    self.metrics
                        .duplicates
                        .inc_by(total.saturating_sub(outcome.inserted));
                    self.metrics.unstorable.inc_by(outcome.unstorable);
                    for (kind, count) in kinds {
                        self.metrics
                            .ingested
                            .get_or_create(&KindLabel { kind })
                            .inc_by(count);
                    }
                    let committed = Committed { pending, outcome };
                    if let Err(mpsc::error::SendError(committed)) =
                        to_acknowledge.send(committed).await
                    {
                        // The acknowledging stage is gone (it panicked): acknowledge here.
                        self.acknowledge(&committed.pending).await;
                    }
                }
                Err(store::WriteError {
                    error: e,
                    committed,
                }) => {
                    if store::is_missing_partition(&e) {
                        self.partitions.forget();
                    }
                    // Part of the batch committed before the rest failed: announce it (its
                    // messages come back as duplicates), acknowledging nothing.
                    if committed.inserted > 0 {
                        self.metrics.unstorable.inc_by(committed.unstorable);
                        let _ = to_acknowledge
                            .send(Committed {
                                pending: Vec::new(),
                                outcome: committed,
                            })
                            .await;
                    }
                    self.database_ready.set(false);
                    self.metrics.database_errors.inc();
                    tracing::warn!(error = %e, retry_in = ?backoff, "writing a batch failed; JetStream keeps it for redelivery");
                    self.nak(&pending).await;
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => {
                            // Hand back what was fetched ahead instead of writing it.
                            writing.close();
                            while let Some(prepared) = writing.recv().await {
                                self.nak(&prepared.pending).await;
                            }
                            break;
                        }
                    }
                    backoff = (backoff * 2).min(self.config.max_backoff);
                }
            }
        }
    }

    /// Stage 3: acknowledge each committed batch, then announce watermarks, states and alerts.
    async fn acknowledge_committed(self: Arc<Self>, mut acknowledging: mpsc::Receiver<Committed>) {
        while let Some(Committed { pending, outcome }) = acknowledging.recv().await {
            self.acknowledge(&pending).await;
            for advance in &outcome.advanced {
                self.publish_watermark(advance).await;
            }
            for state in &outcome.states {
                self.publish_state(state).await;
            }
            for change in &outcome.alerts {
                alerts::announce(&self.nats, change).await;
            }
        }
    }

    /// The next batch: up to `batch_size` messages, cut `batch_wait` after its first one arrived
    /// (empty if none arrived within `batch_wait`). Messages come from one long-lived pull
    /// subscription (`pulling`, opened on first use and again after an error) that keeps a
    /// batch's worth requested ahead, so a batch is cut by the client's clock, never by a pull
    /// request expiring half delivered. (One pull request per batch, expiring after
    /// `batch_wait`, stalled for the client's 5 s grace now and then when the server's
    /// end-of-request answer did not come; batches of 10,000 did so in most runs.)
    async fn next_batch(
        &self,
        pulling: &mut Option<pull::Stream>,
    ) -> Result<Vec<jetstream::Message>, BoxError> {
        let stream = match pulling {
            Some(stream) => stream,
            None => pulling.insert(
                self.consumer
                    .stream()
                    .max_messages_per_batch(self.config.batch_size)
                    .heartbeat(PULL_HEARTBEAT)
                    .messages()
                    .await?,
            ),
        };
        let mut messages = Vec::with_capacity(self.config.batch_size);
        let mut deadline = tokio::time::Instant::now() + self.config.batch_wait;
        while messages.len() < self.config.batch_size {
            match tokio::time::timeout_at(deadline, stream.next()).await {
                Err(_) => break,
                Ok(Some(Ok(message))) => {
                    if messages.is_empty() {
                        deadline = tokio::time::Instant::now() + self.config.batch_wait;
                    }
                    messages.push(message);
                }
                Ok(Some(Err(e))) => {
                    // Opened again on the next call; what arrived is delivered: write it rather
                    // than wait for its redelivery.
                    *pulling = None;
                    if messages.is_empty() {
                        return Err(e.into());
                    }
                    tracing::warn!(error = %e, received = messages.len(), "pulling from JetStream failed mid-batch");
                    break;
                }
                Ok(None) => {
                    *pulling = None;
                    break;
                }
            }
        }
        Ok(messages)
    }

    /// The clock of a batch processed at `now`; each message then sets its own `received_at`.
    fn clock(&self, now: DateTime<Utc>) -> Clock {
        Clock {
            received_at: now,
            oldest: self
                .partitions
                .oldest_day(now)
                .and_hms_opt(0, 0, 0)
                .map_or(DateTime::<Utc>::MIN_UTC, |t| t.and_utc()),
            max_clock_skew: chrono::Duration::from_std(self.config.max_clock_skew)
                .unwrap_or(chrono::Duration::zero()),
        }
    }

    /// Validates a fetched batch: the rows to write, with the messages to acknowledge once they
    /// commit. Refused messages go to the dead-letter stream first (an error leaves the whole
    /// batch to JetStream's redelivery).
    async fn prepare(
        &self,
        messages: Vec<jetstream::Message>,
        writers: usize,
    ) -> Result<Vec<Prepared>, BoxError> {
        let started = Instant::now();
        let now = Utc::now();
        let batch_clock = self.clock(now);
        let mut shares: Vec<Prepared> = (0..writers.max(1))
            .map(|_| Prepared {
                started,
                rows: Vec::with_capacity(messages.len() / writers.max(1) + 1),
                pending: Vec::with_capacity(messages.len() / writers.max(1) + 1),
            })
            .collect();
        let mut letters = Vec::new();
        let mut terminate = Vec::new();
        let mut keep = |row: Row, message: jetstream::Message| {
            let share = &mut shares[writer_of(&row.device, writers)];
            share.rows.push(row);
            share.pending.push(message);
        };
        for message in messages {
            // Each message continues the trace its device started at the gateway.
            let span = tracing::info_span!("telemetry_ingest", subject = %message.subject);
            if let Some(headers) = &message.headers {
                adopt_trace_context(&span, headers);
            }
            // When the gateway stored it in JetStream (the batch time if unknown).
            let received_at = message
                .info()
                .ok()
                .and_then(|info| i64::try_from(info.published.unix_timestamp_nanos()).ok())
                .map_or(now, DateTime::from_timestamp_nanos);
            let clock = Clock {
                received_at,
                ..batch_clock
            };
            match span.in_scope(|| validate(&message.subject, &message.payload, &clock)) {
                Ok(row) => keep(row, message),
                Err(Refused {
                    rejection,
                    placeholder,
                }) => {
                    letters.push(
                        span.in_scope(|| self.dead_letter(&message, rejection))
                            .instrument(span),
                    );
                    match placeholder {
                        Some(row) => keep(*row, message),
                        None => terminate.push(message),
                    }
                }
            }
        }
        // Stored in the dead-letter stream before anything is acknowledged: all of the batch's
        // letters at once, then their acks together. If one is not stored, the whole batch is
        // handed back for redelivery after the backoff (not left for the full ack wait).
        if let Err(e) = futures::future::try_join_all(letters).await {
            let mut held: Vec<&jetstream::Message> = terminate.iter().collect();
            for share in &shares {
                held.extend(&share.pending);
            }
            self.nak(held).await;
            return Err(e);
        }
        for message in terminate {
            if let Err(e) = message.ack_with(AckKind::Term).await {
                tracing::warn!(error = %e, "terminating a dead-lettered message failed");
            }
        }
        Ok(shares)
    }

    /// Acknowledges committed messages: one publish each, then a single flush. A lost ack only
    /// causes a redelivery, which the store recognizes as a duplicate.
    async fn acknowledge(&self, messages: &[jetstream::Message]) {
        for message in messages {
            if let Err(e) = message.ack().await {
                tracing::warn!(error = %e, "acknowledging a persisted message failed");
            }
        }
        if let Err(e) = self.nats.flush().await {
            tracing::warn!(error = %e, "flushing acknowledgements failed");
        }
    }

    /// Hands messages back for redelivery soon rather than after the full ack wait.
    async fn nak(&self, messages: impl IntoIterator<Item = &jetstream::Message>) {
        for message in messages {
            let _ = message
                .ack_with(AckKind::Nak(Some(self.config.max_backoff)))
                .await;
        }
    }

    /// Announces an elevator's new live state (for live dashboards; best effort, the state
    /// itself is in the database).
    async fn publish_state(&self, change: &store::StateChange) {
        let state = &change.state;
        let (Ok(building), Ok(device)) = (
            BuildingId::new(state.building_id.as_str()),
            DeviceId::new(state.device_id.as_str()),
        ) else {
            return;
        };
        if let Err(e) = self
            .nats
            .publish(state_subject(&building, &device), change.encoded.clone())
            .await
        {
            tracing::warn!(error = %e, device = %state.device_id, "publishing a state change failed");
        }
    }

    async fn publish_watermark(&self, advance: &WatermarkAdvance) {
        let (Ok(building), Ok(device)) = (
            BuildingId::new(advance.building_id.as_str()),
            DeviceId::new(advance.device_id.as_str()),
        ) else {
            return;
        };
        let subject = Downlink {
            building,
            audience: Audience::Device(device),
            kind: DownlinkKind::Watermark,
        }
        .nats_subject();
        let message = v1::Downlink {
            message_id: uuid::Uuid::new_v4().to_string(),
            issued_at: Some(liftwire_proto::timestamp(std::time::SystemTime::now())),
            body: Some(v1::downlink::Body::Watermark(v1::Watermark {
                persisted_seq: u64::try_from(advance.persisted_seq).unwrap_or(0),
            })),
        };
        if let Err(e) = self
            .nats
            .publish(subject, message.encode_to_vec().into())
            .await
        {
            // The next advance supersedes this one; the device simply keeps its outbox longer.
            tracing::warn!(error = %e, device = %advance.device_id, "publishing a watermark failed");
        }
    }

    fn dead_letter(
        &self,
        message: &jetstream::Message,
        rejection: Rejection,
    ) -> impl std::future::Future<Output = Result<(), BoxError>> + '_ {
        let reason = rejection.reason();
        self.metrics
            .dead_letters
            .get_or_create(&ReasonLabel { reason })
            .inc();
        let device_id = Uplink::from_nats_subject(&message.subject)
            .map(|u| u.device.to_string())
            .unwrap_or_default();
        tracing::warn!(reason, device = %device_id, error = %rejection, "dead-lettering a message");
        // Dead-lettered again after a failed batch, it is de-duplicated on its stream position.
        let mut headers = async_nats::HeaderMap::new();
        if let Ok(info) = message.info() {
            headers.insert(
                async_nats::header::NATS_MESSAGE_ID,
                format!("telemetry:{}", info.stream_sequence).as_str(),
            );
        }
        let letter = v1::DeadLetter {
            source: "telemetry".into(),
            reason: reason.into(),
            detail: rejection.to_string(),
            device_id,
            origin: message.subject.to_string(),
            payload: message.payload.to_vec(),
            at: Some(liftwire_proto::timestamp(std::time::SystemTime::now())),
        };
        let payload = letter.encode_to_vec().into();
        async move {
            self.js
                .publish_with_headers(self.dead_letters.clone(), headers, payload)
                .await?
                .await?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(device: &str, seq: u64) -> v1::Envelope {
        v1::Envelope {
            schema_version: SCHEMA_VERSION,
            device_id: device.into(),
            seq,
            device_time: Some(liftwire_proto::Timestamp {
                seconds: 1_795_000_000,
                nanos: 0,
            }),
            body: Some(v1::envelope::Body::Event(v1::Event {
                kind: Some(v1::event::Kind::AlarmButtonPressed(
                    v1::AlarmButtonPressed {},
                )),
            })),
        }
    }

    fn clock() -> Clock {
        Clock {
            received_at: DateTime::from_timestamp(1_795_000_100, 0).unwrap(),
            oldest: DateTime::from_timestamp(1_790_000_000, 0).unwrap(),
            max_clock_skew: chrono::Duration::seconds(300),
        }
    }

    fn check(subject: &str, envelope: &v1::Envelope) -> Result<Row, Refused> {
        validate(subject, &envelope.encode_to_vec().into(), &clock())
    }

    const SUBJECT: &str = "lw.v1.up.b1.elev-1.event";

    #[test]
    fn kinds_are_counted_once_per_batch() {
        let counts = count_kinds(["telemetry", "event", "telemetry", "rejected", "telemetry"]);
        assert_eq!(
            counts,
            vec![("telemetry", 3), ("event", 1), ("rejected", 1)]
        );
        assert!(count_kinds([]).is_empty());
    }

    #[test]
    fn envelope_and_identity_errors_have_no_placeholder() {
        let reason = |s: &str, p: Vec<u8>| {
            let refused = validate(s, &p.into(), &clock()).unwrap_err();
            assert!(refused.placeholder.is_none());
            refused.rejection.reason()
        };
        assert_eq!(reason("lw.v1.up.b1.elev-1", vec![]), "subject");
        assert_eq!(reason(SUBJECT, vec![0xff, 0xff]), "decode");
        assert_eq!(
            reason(SUBJECT, envelope("elev-2", 1).encode_to_vec()),
            "device_mismatch"
        );
        assert_eq!(
            reason(SUBJECT, envelope("elev-1", 0).encode_to_vec()),
            "zero_sequence"
        );
        assert_eq!(
            reason(SUBJECT, envelope("elev-1", u64::MAX).encode_to_vec()),
            "sequence_too_large"
        );
        let mut old = envelope("elev-1", 1);
        old.schema_version = 0;
        assert_eq!(reason(SUBJECT, old.encode_to_vec()), "schema_version");
    }

    #[test]
    fn content_errors_keep_the_sequence_number_with_a_placeholder() {
        let refused = |subject: &str, e: v1::Envelope| {
            let refused = check(subject, &e).unwrap_err();
            let placeholder = refused.placeholder.expect("a placeholder");
            assert_eq!((placeholder.kind, placeholder.seq), ("rejected", 7));
            assert_eq!(placeholder.at, clock().received_at);
            refused.rejection.reason()
        };
        assert_eq!(
            refused("lw.v1.up.b1.elev-1.telemetry", envelope("elev-1", 7)),
            "kind_mismatch"
        );
        let mut empty = envelope("elev-1", 7);
        empty.body = None;
        assert_eq!(refused(SUBJECT, empty), "empty_body");
        let mut overloaded = envelope("elev-1", 7);
        overloaded.body = Some(v1::envelope::Body::Telemetry(v1::Telemetry {
            load_percent: 900,
            ..Default::default()
        }));
        assert_eq!(
            refused("lw.v1.up.b1.elev-1.telemetry", overloaded),
            "impossible_content"
        );
        let mut anonymous = envelope("elev-1", 7);
        anonymous.body = Some(v1::envelope::Body::Event(v1::Event {
            kind: Some(v1::event::Kind::FaultRaised(v1::FaultRaised::default())),
        }));
        assert_eq!(refused(SUBJECT, anonymous), "impossible_content");
        let mut unstorable = envelope("elev-1", 7);
        unstorable.body = Some(v1::envelope::Body::Event(v1::Event {
            kind: Some(v1::event::Kind::MaintenanceVisitStarted(
                v1::MaintenanceVisitStarted {
                    visit_id: "v-1".into(),
                    technician: "J\0hn".into(),
                    ..Default::default()
                },
            )),
        }));
        assert_eq!(refused(SUBJECT, unstorable), "impossible_content");
    }

    #[test]
    fn messages_are_filed_under_the_device_clock_unless_it_runs_ahead() {
        let row = check(SUBJECT, &envelope("elev-1", 1)).unwrap();
        assert_eq!(row.at.timestamp(), 1_795_000_000);
        assert_eq!(row.columns.event, Some("alarm_button_pressed"));
        let mut ahead = envelope("elev-1", 2);
        ahead.device_time = Some(liftwire_proto::Timestamp {
            seconds: 1_795_007_200,
            nanos: 0,
        });
        let row = check(SUBJECT, &ahead).unwrap();
        assert_eq!(
            row.at,
            clock().received_at,
            "two hours ahead is not believed"
        );
        assert_eq!(row.device_time.unwrap().timestamp(), 1_795_007_200);
        let mut none = envelope("elev-1", 3);
        none.device_time = None;
        assert_eq!(check(SUBJECT, &none).unwrap().at, clock().received_at);
        // An unset clock (1970, or a year PostgreSQL cannot even store) is no clock, and one
        // older than the retention is not believed: the message is kept, under its arrival time.
        for seconds in [0, 946_684_800, -300_000_000_000, 1_700_000_000] {
            let mut unset = envelope("elev-1", 4);
            unset.device_time = Some(liftwire_proto::Timestamp { seconds, nanos: 0 });
            let row = check(SUBJECT, &unset).unwrap();
            assert_eq!(row.at, clock().received_at, "{seconds}");
            assert_eq!(
                row.device_time.is_none(),
                seconds < liftwire_proto::EARLIEST_DEVICE_TIME,
                "{seconds}: an unset clock is not even recorded"
            );
        }
    }

    #[test]
    fn a_levelling_error_beyond_a_metre_is_no_measurement() {
        let trip = |levelling_error_mm| {
            let mut trip = envelope("elev-1", 1);
            trip.body = Some(v1::envelope::Body::Event(v1::Event {
                kind: Some(v1::event::Kind::TripCompleted(v1::TripCompleted {
                    levelling_error_mm,
                    ..Default::default()
                })),
            }));
            check(SUBJECT, &trip).unwrap().columns
        };
        assert_eq!(trip(-12).event_value, Some(-12));
        assert_eq!(trip(1_000).event_value, Some(1_000));
        for sentinel in [i32::MIN, i32::MAX, 1_001] {
            let columns = trip(sentinel);
            assert_eq!(columns.event, Some("trip_completed"), "the trip counts");
            assert_eq!(columns.event_value, None, "{sentinel}");
        }
    }
}
