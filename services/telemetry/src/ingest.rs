//! JetStream → PostgreSQL ingest of the device stream.

use std::collections::{BTreeMap, HashMap};
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
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// `[ingest]` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IngestConfig {
    /// Durable consumer name shared by every replica.
    pub consumer: String,
    /// Largest batch written in one transaction.
    pub batch_size: usize,
    /// Longest a message waits for its batch to fill before the batch is written anyway.
    #[serde(with = "humantime_serde")]
    pub batch_wait: Duration,
    /// How long JetStream waits for an acknowledgement before redelivering.
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// Longest pause between retries while PostgreSQL is failing.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            consumer: "telemetry-ingest".into(),
            batch_size: 500,
            batch_wait: Duration::from_millis(100),
            ack_wait: Duration::from_secs(30),
            max_backoff: Duration::from_secs(5),
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
    database_errors: Counter,
    batch_seconds: Histogram,
}

impl Metrics {
    fn register(ctx: &BuildContext) -> Self {
        let metrics = Self {
            ingested: Family::default(),
            duplicates: Counter::default(),
            dead_letters: Family::default(),
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
enum Rejection {
    #[error("subject is not a device uplink subject: {0}")]
    Subject(liftwire_proto::naming::NameError),
    #[error("payload is not a liftwire.v1.Envelope: {0}")]
    Decode(prost::DecodeError),
    #[error("schema version {0} is not supported")]
    SchemaVersion(u32),
    #[error("envelope device id {envelope:?} differs from the authenticated device {subject:?}")]
    DeviceMismatch { envelope: String, subject: String },
    #[error("envelope has no body")]
    EmptyBody,
    #[error("body kind {body} arrived on the {subject} subject")]
    KindMismatch {
        body: &'static str,
        subject: &'static str,
    },
    #[error("sequence number must start at 1 (got 0)")]
    ZeroSequence,
    #[error("sequence number {0} does not fit a signed 64-bit column")]
    SequenceTooLarge(u64),
}

impl Rejection {
    fn reason(&self) -> &'static str {
        match self {
            Rejection::Subject(_) => "subject",
            Rejection::Decode(_) => "decode",
            Rejection::SchemaVersion(_) => "schema_version",
            Rejection::DeviceMismatch { .. } => "device_mismatch",
            Rejection::EmptyBody => "empty_body",
            Rejection::KindMismatch { .. } => "kind_mismatch",
            Rejection::ZeroSequence => "zero_sequence",
            Rejection::SequenceTooLarge(_) => "sequence_too_large",
        }
    }
}

/// One row of `device_messages`.
#[derive(Debug, Clone)]
struct Row {
    device: DeviceId,
    building: BuildingId,
    seq: i64,
    kind: &'static str,
    device_time: Option<DateTime<Utc>>,
    payload: Vec<u8>,
}

fn validate(subject: &str, payload: &[u8]) -> Result<Row, Rejection> {
    let uplink = Uplink::from_nats_subject(subject).map_err(Rejection::Subject)?;
    let envelope = v1::Envelope::decode(payload).map_err(Rejection::Decode)?;
    if envelope.schema_version != SCHEMA_VERSION {
        return Err(Rejection::SchemaVersion(envelope.schema_version));
    }
    if envelope.device_id != uplink.device.as_str() {
        return Err(Rejection::DeviceMismatch {
            envelope: envelope.device_id,
            subject: uplink.device.to_string(),
        });
    }
    let kind = envelope.kind().ok_or(Rejection::EmptyBody)?;
    if kind != uplink.kind {
        return Err(Rejection::KindMismatch {
            body: kind.as_str(),
            subject: uplink.kind.as_str(),
        });
    }
    if envelope.seq == 0 {
        return Err(Rejection::ZeroSequence);
    }
    let seq = i64::try_from(envelope.seq).map_err(|_| Rejection::SequenceTooLarge(envelope.seq))?;
    let device_time = envelope
        .device_time
        .and_then(|t| DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0)));
    Ok(Row {
        device: uplink.device,
        building: uplink.building,
        seq,
        kind: kind.as_str(),
        device_time,
        payload: payload.to_vec(),
    })
}

/// A device whose persisted watermark advanced in a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatermarkAdvance {
    /// The device.
    pub device_id: String,
    /// Its building.
    pub building_id: String,
    /// Every message up to this sequence number is persisted.
    pub persisted_seq: i64,
}

/// Writes `rows` in one transaction: idempotent insert, then the contiguous watermark of every
/// device in the batch. Returns how many rows were new and which watermarks advanced.
async fn write_batch(
    pool: &sqlx::PgPool,
    rows: &[Row],
) -> Result<(u64, Vec<WatermarkAdvance>, Vec<v1::ElevatorState>), sqlx::Error> {
    let mut tx = pool.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO device_messages (device_id, seq, building_id, kind, device_time, payload)
         SELECT * FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::text[], $5::timestamptz[], $6::bytea[])
         ON CONFLICT (device_id, seq) DO NOTHING",
    )
    .bind(rows.iter().map(|r| r.device.to_string()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.seq).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.building.to_string()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.kind).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.device_time).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.payload.clone()).collect::<Vec<_>>())
    .execute(&mut *tx)
    .await?
    .rows_affected();

    let devices: BTreeMap<String, String> = rows
        .iter()
        .map(|r| (r.device.to_string(), r.building.to_string()))
        .collect();
    let (device_ids, building_ids): (Vec<String>, Vec<String>) = devices.into_iter().unzip();
    sqlx::query(
        "INSERT INTO device_watermarks (device_id, building_id, persisted_seq)
         SELECT d, b, 0 FROM UNNEST($1::text[], $2::text[]) AS t(d, b)
         ON CONFLICT (device_id) DO NOTHING",
    )
    .bind(&device_ids)
    .bind(&building_ids)
    .execute(&mut *tx)
    .await?;
    // Lock the devices' watermarks (in a fixed order, so replicas cannot deadlock): their old
    // values bound the range of messages this transaction makes contiguous.
    let before: Vec<(String, i64)> = sqlx::query_as(
        "SELECT device_id, persisted_seq FROM device_watermarks WHERE device_id = ANY($1) ORDER BY device_id FOR UPDATE",
    )
    .bind(&device_ids)
    .fetch_all(&mut *tx)
    .await?;
    let before: HashMap<String, i64> = before.into_iter().collect();
    // The contiguous prefix above the current watermark: the n-th stored sequence number above
    // it equals watermark + n exactly as long as there is no gap.
    let advanced: Vec<(String, String, i64)> = sqlx::query_as(
        "UPDATE device_watermarks w SET persisted_seq = x.new_seq
         FROM (
             SELECT w2.device_id, w2.persisted_seq + (
                 SELECT count(*) FROM (
                     SELECT m.seq, row_number() OVER (ORDER BY m.seq) AS n
                     FROM device_messages m
                     WHERE m.device_id = w2.device_id AND m.seq > w2.persisted_seq
                     ORDER BY m.seq
                     LIMIT 100000
                 ) above WHERE above.seq - w2.persisted_seq = above.n
             ) AS new_seq
             FROM device_watermarks w2
             WHERE w2.device_id = ANY($1)
         ) x
         WHERE w.device_id = x.device_id AND x.new_seq > w.persisted_seq
         RETURNING w.device_id, w.building_id, w.persisted_seq",
    )
    .bind(&device_ids)
    .fetch_all(&mut *tx)
    .await?;
    let mut states = Vec::new();
    for (device_id, building_id, persisted_seq) in &advanced {
        let from = before.get(device_id).copied().unwrap_or(0);
        states.extend(update_state(&mut tx, device_id, building_id, from, *persisted_seq).await?);
    }
    tx.commit().await?;
    let advanced = advanced
        .into_iter()
        .map(|(device_id, building_id, persisted_seq)| WatermarkAdvance {
            device_id,
            building_id,
            persisted_seq,
        })
        .collect();
    Ok((inserted, advanced, states))
}

/// Folds the messages `(from, to]` of a device (now contiguous) into its live state.
async fn update_state(
    tx: &mut sqlx::PgConnection,
    device_id: &str,
    building_id: &str,
    from: i64,
    to: i64,
) -> Result<Option<v1::ElevatorState>, sqlx::Error> {
    let current: Option<(i64, Vec<u8>)> = sqlx::query_as(
        "SELECT applied_seq, state FROM elevator_state WHERE device_id = $1 FOR UPDATE",
    )
    .bind(device_id)
    .fetch_optional(&mut *tx)
    .await?;
    let from = from.max(current.as_ref().map_or(0, |(applied, _)| *applied));
    let messages: Vec<(Vec<u8>,)> = sqlx::query_as(
        "SELECT payload FROM device_messages WHERE device_id = $1 AND seq > $2 AND seq <= $3 AND kind IN ('telemetry', 'event') ORDER BY seq",
    )
    .bind(device_id)
    .bind(from)
    .bind(to)
    .fetch_all(&mut *tx)
    .await?;
    if messages.is_empty() && current.is_none() {
        // Not an elevator (e.g. a screen): no state to keep.
        return Ok(None);
    }
    let mut state = current
        .and_then(|(_, bytes)| v1::ElevatorState::decode(bytes.as_slice()).ok())
        .unwrap_or_else(|| v1::ElevatorState {
            device_id: device_id.into(),
            building_id: building_id.into(),
            ..Default::default()
        });
    for (payload,) in messages {
        if let Ok(envelope) = v1::Envelope::decode(payload.as_slice()) {
            crate::state::apply(&mut state, &envelope);
        }
    }
    state.applied_seq = u64::try_from(to).unwrap_or(0);
    sqlx::query(
        "INSERT INTO elevator_state (device_id, building_id, applied_seq, state) VALUES ($1, $2, $3, $4)
         ON CONFLICT (device_id) DO UPDATE SET applied_seq = EXCLUDED.applied_seq, state = EXCLUDED.state",
    )
    .bind(device_id)
    .bind(building_id)
    .bind(to)
    .bind(state.encode_to_vec())
    .execute(&mut *tx)
    .await?;
    Ok(Some(state))
}

/// The ingest loop.
pub struct Ingest {
    config: IngestConfig,
    nats: async_nats::Client,
    js: jetstream::Context,
    consumer: jetstream::consumer::Consumer<pull::Config>,
    pool: sqlx::PgPool,
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
                    max_ack_pending: i64::try_from(config.batch_size * 20).unwrap_or(i64::MAX),
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
            database_ready,
            dead_letters: dead_letter_subject("telemetry")?,
        })
    }

    /// Ingests until `shutdown`; the batch in progress is finished (committed and acknowledged)
    /// before returning.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), BoxError> {
        let mut backoff = Duration::from_millis(100);
        while !shutdown.is_cancelled() {
            let batch = tokio::select! {
                batch = self.next_batch() => batch,
                _ = shutdown.cancelled() => break,
            };
            let messages = match batch {
                Ok(messages) => messages,
                Err(e) => {
                    tracing::warn!(error = %e, "fetching from JetStream failed; retrying");
                    tokio::time::sleep(backoff).await;
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
            match self.process(messages).await {
                Ok(()) => {
                    self.database_ready.set(true);
                    backoff = Duration::from_millis(100);
                }
                Err(e) => {
                    self.database_ready.set(false);
                    self.metrics.database_errors.inc();
                    tracing::warn!(error = %e, retry_in = ?backoff, "writing a batch failed; JetStream keeps it for redelivery");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = shutdown.cancelled() => break,
                    }
                    backoff = (backoff * 2).min(self.config.max_backoff);
                }
            }
        }
        tracing::info!("ingest stopped");
        Ok(())
    }

    async fn next_batch(&self) -> Result<Vec<jetstream::Message>, BoxError> {
        let mut batch = self
            .consumer
            .batch()
            .max_messages(self.config.batch_size)
            .expires(self.config.batch_wait)
            .messages()
            .await?;
        let mut messages = Vec::with_capacity(self.config.batch_size);
        while let Some(message) = batch.next().await {
            messages.push(message?);
        }
        Ok(messages)
    }

    async fn process(&self, messages: Vec<jetstream::Message>) -> Result<(), BoxError> {
        let started = Instant::now();
        let mut rows = Vec::with_capacity(messages.len());
        let mut accepted = Vec::with_capacity(messages.len());
        let mut spans = Vec::with_capacity(messages.len());
        for message in messages {
            // Each message continues the trace its device started at the gateway.
            let span = tracing::info_span!("telemetry_ingest", subject = %message.subject);
            if let Some(headers) = &message.headers {
                adopt_trace_context(&span, headers);
            }
            match span.in_scope(|| validate(&message.subject, &message.payload)) {
                Ok(row) => {
                    rows.push(row);
                    accepted.push(message);
                    spans.push(span);
                }
                Err(rejection) => {
                    self.dead_letter(message, rejection)
                        .instrument(span)
                        .await?
                }
            }
        }
        if rows.is_empty() {
            return Ok(());
        }
        let written = write_batch(&self.pool, &rows).await;
        let (inserted, advanced, states) = match written {
            Ok(result) => result,
            Err(e) => {
                for message in &accepted {
                    // Redeliver soon rather than after the full ack wait.
                    let _ = message
                        .ack_with(AckKind::Nak(Some(self.config.max_backoff)))
                        .await;
                }
                return Err(e.into());
            }
        };
        self.metrics
            .batch_seconds
            .observe(started.elapsed().as_secs_f64());
        self.metrics
            .duplicates
            .inc_by((rows.len() as u64).saturating_sub(inserted));
        for row in &rows {
            self.metrics
                .ingested
                .get_or_create(&KindLabel { kind: row.kind })
                .inc();
        }
        for message in &accepted {
            // Committed: a lost ack only causes a redelivery, which the insert ignores.
            if let Err(e) = message.double_ack().await {
                tracing::warn!(error = %e, "acknowledging a persisted message failed");
            }
        }
        for advance in advanced {
            self.publish_watermark(&advance).await;
        }
        for state in states {
            self.publish_state(&state).await;
        }
        Ok(())
    }

    /// Announces an elevator's new live state (for live dashboards; best effort, the state
    /// itself is in the database).
    async fn publish_state(&self, state: &v1::ElevatorState) {
        let (Ok(building), Ok(device)) = (
            BuildingId::new(state.building_id.as_str()),
            DeviceId::new(state.device_id.as_str()),
        ) else {
            return;
        };
        if let Err(e) = self
            .nats
            .publish(
                state_subject(&building, &device),
                state.encode_to_vec().into(),
            )
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

    async fn dead_letter(
        &self,
        message: jetstream::Message,
        rejection: Rejection,
    ) -> Result<(), BoxError> {
        let reason = rejection.reason();
        self.metrics
            .dead_letters
            .get_or_create(&ReasonLabel { reason })
            .inc();
        let device_id = Uplink::from_nats_subject(&message.subject)
            .map(|u| u.device.to_string())
            .unwrap_or_default();
        tracing::warn!(reason, device = %device_id, error = %rejection, "dead-lettering a message");
        let letter = v1::DeadLetter {
            source: "telemetry".into(),
            reason: reason.into(),
            detail: rejection.to_string(),
            device_id,
            origin: message.subject.to_string(),
            payload: message.payload.to_vec(),
            at: Some(liftwire_proto::timestamp(std::time::SystemTime::now())),
        };
        // Stored in the dead-letter stream before the original is terminated: nothing is lost.
        self.js
            .publish(self.dead_letters.clone(), letter.encode_to_vec().into())
            .await?
            .await?;
        message
            .ack_with(AckKind::Term)
            .await
            .map_err(|e| -> BoxError { e.to_string().into() })?;
        Ok(())
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
            device_time: None,
            body: Some(v1::envelope::Body::Event(v1::Event {
                kind: Some(v1::event::Kind::AlarmButtonPressed(
                    v1::AlarmButtonPressed {},
                )),
            })),
        }
    }

    #[test]
    fn validation_reasons() {
        let subject = "lw.v1.up.b1.elev-1.event";
        assert!(validate(subject, &envelope("elev-1", 1).encode_to_vec()).is_ok());
        let reason = |s: &str, p: Vec<u8>| validate(s, &p).unwrap_err().reason();
        assert_eq!(reason("lw.v1.up.b1.elev-1", vec![]), "subject");
        assert_eq!(reason(subject, vec![0xff, 0xff]), "decode");
        assert_eq!(
            reason(subject, envelope("elev-2", 1).encode_to_vec()),
            "device_mismatch"
        );
        assert_eq!(
            reason(subject, envelope("elev-1", 0).encode_to_vec()),
            "zero_sequence"
        );
        assert_eq!(
            reason(subject, envelope("elev-1", u64::MAX).encode_to_vec()),
            "sequence_too_large"
        );
        assert_eq!(
            reason(
                "lw.v1.up.b1.elev-1.telemetry",
                envelope("elev-1", 1).encode_to_vec()
            ),
            "kind_mismatch"
        );
        let mut old = envelope("elev-1", 1);
        old.schema_version = 0;
        assert_eq!(reason(subject, old.encode_to_vec()), "schema_version");
        let mut empty = envelope("elev-1", 1);
        empty.body = None;
        assert_eq!(reason(subject, empty.encode_to_vec()), "empty_body");
    }
}
