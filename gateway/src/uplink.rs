//! The uplink bridge: device messages into JetStream, untrustworthy ones into the dead-letter
//! stream.
//!
//! A message whose device and sequence number can be trusted goes to `LW_UPLINK` even when its
//! content is flawed (kind mismatch, empty body, implausible clock, NUL in a text field): its
//! consumers judge the content, and telemetry keeps its place in the device's sequence, so the
//! device's watermark passes it. Refused here, it would stop that watermark for good and the
//! device would resend it for ever.

use std::collections::VecDeque;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, context::PublishAckFuture};
use futures::stream::FuturesUnordered;
use futures::StreamExt;
use liftwire_proto::naming::{dead_letter_subject, uplink_msg_id, UplinkKind};
use liftwire_proto::text::nul_in_text;
use liftwire_proto::{v1, Message, SCHEMA_VERSION};
use liftwire_runtime::observability::{inject_trace_context, inject_unsampled_trace_context};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::{Kind, Metrics, Reason};
use crate::session::Incoming;

/// What is wrong with a device message: it cannot be trusted (dead-lettered here), or its
/// content is flawed (kind mismatch, implausible clock, NUL in a text field: bridged, counted).
#[derive(Debug, thiserror::Error)]
pub enum Rejection {
    /// Larger than the configured limit.
    #[error("payload of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// Not a protobuf `Envelope`.
    #[error("payload is not a liftwire.v1.Envelope: {0}")]
    Decode(#[from] prost::DecodeError),
    /// Unsupported schema version.
    #[error("schema version {0} is not supported")]
    SchemaVersion(u32),
    /// The envelope claims another device than the authenticated connection.
    #[error("envelope device id {claimed:?} is not the authenticated device {authenticated:?}")]
    DeviceMismatch {
        /// What the payload says.
        claimed: String,
        /// Who is connected.
        authenticated: String,
    },
    /// The body does not match the topic's kind (or is missing).
    #[error("body kind {body:?} does not match the topic kind {topic}")]
    KindMismatch {
        /// The body's kind, if any.
        body: Option<&'static str>,
        /// The topic's kind.
        topic: &'static str,
    },
    /// Sequence numbers start at 1.
    #[error("sequence number 0")]
    ZeroSequence,
    /// The device clock is absent or implausible.
    #[error("device time {0} is implausible")]
    Timestamp(String),
    /// A text field holds a NUL character, which no consumer could store.
    #[error("{0} contains a NUL character")]
    NulInText(&'static str),
}

impl Rejection {
    /// Metric and dead-letter reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Rejection::TooLarge(_) => "too_large",
            Rejection::Decode(_) => "decode",
            Rejection::SchemaVersion(_) => "schema_version",
            Rejection::DeviceMismatch { .. } => "device_mismatch",
            Rejection::KindMismatch { .. } => "kind_mismatch",
            Rejection::ZeroSequence => "zero_sequence",
            Rejection::Timestamp(_) => "timestamp",
            Rejection::NulInText(_) => "nul_in_text",
        }
    }
}

/// A message to bridge.
#[derive(Debug)]
pub struct Accepted {
    /// The envelope's sequence number.
    pub seq: u64,
    /// What is wrong with its content, if anything (counted; judged by the consumers).
    pub flaw: Option<Rejection>,
    /// Whether the gateway may act on its body (answer an upload request): its kind is the
    /// topic's and no text holds a NUL. An implausible clock alone does not stop that.
    pub actionable: bool,
}

/// Longest part of a device's own text quoted in a dead letter or a log line.
const MAX_QUOTED: usize = 64;

/// `text` shortened to [`MAX_QUOTED`] characters, control characters escaped.
fn quoted(text: &str) -> String {
    let mut quoted: String = text
        .chars()
        .take(MAX_QUOTED)
        .flat_map(char::escape_debug)
        .collect();
    if text.chars().nth(MAX_QUOTED).is_some() {
        quoted.push('…');
    }
    quoted
}

/// Device clocks later than this ahead of the gateway are flagged as implausible; late clocks are
/// not (a device replays its outbox after a long partition).
pub const MAX_CLOCK_AHEAD: Duration = Duration::from_secs(24 * 3600);
pub use liftwire_proto::EARLIEST_DEVICE_TIME;

/// Checks an accepted publish's payload: `Err` if it cannot be trusted (dead-lettered), else the
/// envelope's sequence number and the first flaw of its content, if any.
pub fn validate(
    incoming: &Incoming,
    max_payload: usize,
    now: SystemTime,
) -> Result<Accepted, Rejection> {
    if incoming.payload.len() > max_payload {
        return Err(Rejection::TooLarge(incoming.payload.len()));
    }
    let envelope = v1::Envelope::decode(incoming.payload.as_ref())?;
    if envelope.schema_version != SCHEMA_VERSION {
        return Err(Rejection::SchemaVersion(envelope.schema_version));
    }
    if envelope.device_id != incoming.identity.device.as_str() {
        return Err(Rejection::DeviceMismatch {
            claimed: quoted(&envelope.device_id),
            authenticated: incoming.identity.device.to_string(),
        });
    }
    if envelope.seq == 0 {
        return Err(Rejection::ZeroSequence);
    }
    // Each check once: the text walk is on every message's path.
    let body = envelope.kind();
    let nul = nul_in_text(&envelope);
    let topic = incoming.uplink.kind;
    let flaw = if body != Some(topic) {
        Some(Rejection::KindMismatch {
            body: body.map(|k| k.as_str()),
            topic: topic.as_str(),
        })
    } else if !plausible_clock(envelope.device_time.as_ref(), now) {
        Some(Rejection::Timestamp(format!("{:?}", envelope.device_time)))
    } else {
        nul.map(Rejection::NulInText)
    };
    Ok(Accepted {
        seq: envelope.seq,
        flaw,
        actionable: body == Some(topic) && nul.is_none(),
    })
}

/// Whether a device time is set (after [`EARLIEST_DEVICE_TIME`]) and at most
/// [`MAX_CLOCK_AHEAD`] ahead of `now`.
fn plausible_clock(device_time: Option<&liftwire_proto::Timestamp>, now: SystemTime) -> bool {
    let now_s = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    device_time.is_some_and(|t| {
        t.seconds >= EARLIEST_DEVICE_TIME && t.seconds <= now_s + MAX_CLOCK_AHEAD.as_secs() as i64
    })
}

/// Bridge settings.
#[derive(Debug, Clone)]
pub struct BridgeSettings {
    /// Largest accepted envelope.
    pub max_payload: usize,
    /// JetStream publishes awaiting their ack at once.
    pub max_in_flight: usize,
    /// First retry delay after a failed publish (doubles up to 5 s).
    pub retry_backoff: Duration,
    /// This gateway's name in presence events.
    pub gateway_id: String,
    /// Answers upload requests, if configured.
    pub uploads: Option<crate::uploads::Uploads>,
    /// Core NATS client for answers to devices.
    pub nats: async_nats::Client,
}

struct Pending {
    incoming: Incoming,
    seq: u64,
    /// [`Accepted::actionable`]: else bridged, but not answered.
    actionable: bool,
    attempt: u32,
}

/// Runs the uplink bridge until `shutdown`, then drains what is queued and in flight.
pub async fn run(
    mut rx: mpsc::Receiver<Incoming>,
    js: jetstream::Context,
    metrics: Metrics,
    settings: BridgeSettings,
    shutdown: CancellationToken,
) {
    let dead_letters = dead_letter_subject("gateway").unwrap_or_default();
    let mut in_flight = FuturesUnordered::new();
    // Dead letters are stored beside the bridged messages, never in front of them: waiting
    // for each one's ack here would let one device's garbage, with JetStream slow, hold up
    // every other device. They share the in-flight bound.
    let mut letters = FuturesUnordered::new();
    let mut retry: VecDeque<Pending> = VecDeque::new();
    // Failed publishes wait together: a failure is rarely one message's (validation is done),
    // it is JetStream's, so every failure pushes this one instant back, and a thousand
    // failures cost one backoff, not a thousand in a row.
    let mut retry_at = tokio::time::Instant::now();
    let mut closing = false;
    let mut rx_open = true;
    loop {
        // Retries first, in order, once their backoff is over and as long as there is room.
        let retry_due = tokio::time::Instant::now() >= retry_at;
        while retry_due && in_flight.len() < settings.max_in_flight {
            let Some(pending) = retry.pop_front() else {
                break;
            };
            in_flight.push(publish(&js, pending));
        }
        let room = in_flight.len() + letters.len() < settings.max_in_flight && retry.is_empty();
        tokio::select! {
            biased;
            Some((pending, result)) = in_flight.next(), if !in_flight.is_empty() => {
                match result {
                    Ok(Stored { elapsed, duplicate }) => {
                        metrics.jetstream_publish_seconds.observe(elapsed);
                        // A first publish JetStream already had: a device's resend within the
                        // duplicate window. (A retry's may be its own first attempt, stored with
                        // the ack lost.)
                        if duplicate && pending.attempt == 0 {
                            metrics.uplink_duplicates.inc();
                        } else {
                            metrics.uplink_messages.get_or_create(&Kind { kind: pending.incoming.uplink.kind.as_str() }).inc();
                        }
                        if pending.incoming.uplink.kind == UplinkKind::UploadRequest && pending.actionable {
                            answer_upload(&settings, &pending).await;
                        }
                    }
                    Err(e) => {
                        metrics.jetstream_retries.inc();
                        let delay = settings.retry_backoff.saturating_mul(1 << pending.attempt.min(6)).min(Duration::from_secs(5));
                        tracing::warn!(error = %e, device = %pending.incoming.identity.device, seq = pending.seq, retry_in = ?delay, "JetStream publish failed; retrying with the same message id");
                        retry_at = retry_at.max(tokio::time::Instant::now() + delay);
                        retry.push_back(Pending { attempt: pending.attempt + 1, ..pending });
                    }
                }
            }
            () = tokio::time::sleep_until(retry_at), if !retry.is_empty() && !retry_due => {}
            Some(()) = letters.next(), if !letters.is_empty() => {}
            received = rx.recv(), if room && rx_open => match received {
                // Closed and empty: only in-flight work remains.
                None => rx_open = false,
                Some(incoming) => {
                    // Counted out of the queue as it leaves the channel, not after the yield: the
                    // freed slot may be refilled meanwhile, and the gauge must never read more
                    // than the channel can hold.
                    metrics.uplink_queue_depth.dec();
                    // Let the other connections whose packets arrived with this one queue theirs
                    // first, then take them all: their publishes leave in one write to NATS. The
                    // scheduler would otherwise run this task right after each connection, and
                    // every message would cost its own write, its own wake-up in nats-server and
                    // its own write of the ack back.
                    tokio::task::yield_now().await;
                    let mut next = Some(incoming);
                    while let Some(incoming) = next.take() {
                        match validate(&incoming, settings.max_payload, SystemTime::now()) {
                            Ok(Accepted { seq, flaw, actionable }) => {
                                if let Some(flaw) = &flaw {
                                    metrics.uplink_flaws.get_or_create(&Reason { reason: flaw.reason() }).inc();
                                    tracing::debug!(parent: &incoming.span, device = %incoming.identity.device, seq, reason = flaw.reason(), error = %flaw, "bridging a message with flawed content");
                                }
                                in_flight.push(publish(&js, Pending { incoming, seq, actionable, attempt: 0 }));
                            }
                            Err(rejection) => letters.push(dead_letter(&js, &dead_letters, &metrics, incoming, rejection)),
                        }
                        if in_flight.len() + letters.len() < settings.max_in_flight {
                            next = rx.try_recv().ok();
                            if next.is_some() {
                                metrics.uplink_queue_depth.dec();
                            }
                        }
                    }
                }
            },
            _ = shutdown.cancelled(), if !closing => {
                // Take no new messages, but drain what is queued and in flight.
                closing = true;
                rx.close();
            }
            else => {}
        }
        if !rx_open && in_flight.is_empty() && retry.is_empty() && letters.is_empty() {
            break;
        }
    }
    tracing::info!("uplink bridge drained");
}

/// Answers a stored upload request on the device's `upload-grant` topic.
async fn answer_upload(settings: &BridgeSettings, pending: &Pending) {
    let answer = match &settings.uploads {
        Some(uploads) => uploads.answer(&pending.incoming, pending.seq).await,
        None => None,
    };
    let Some((subject, grant)) = answer else {
        tracing::debug!(device = %pending.incoming.identity.device, "upload request without an uploads store configured");
        return;
    };
    if let Err(e) = settings
        .nats
        .publish(subject, grant.encode_to_vec().into())
        .await
    {
        tracing::warn!(error = %e, device = %pending.incoming.identity.device, "publishing an upload grant failed");
    }
}

/// A publish JetStream acknowledged.
struct Stored {
    /// Seconds from publish to ack.
    elapsed: f64,
    /// JetStream had it already (same `Nats-Msg-Id` within the duplicate window).
    duplicate: bool,
}

type PublishResult = (
    Pending,
    Result<Stored, Box<dyn std::error::Error + Send + Sync>>,
);

async fn publish(js: &jetstream::Context, pending: Pending) -> PublishResult {
    let started = std::time::Instant::now();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        uplink_msg_id(&pending.incoming.identity.device, pending.seq).as_str(),
    );
    if pending.incoming.span.is_none() {
        inject_unsampled_trace_context(&mut headers);
    } else {
        inject_trace_context(&pending.incoming.span, &mut headers);
    }
    let subject = pending.incoming.uplink.nats_subject();
    let sent: Result<PublishAckFuture, _> = js
        .publish_with_headers(subject, headers, pending.incoming.payload.clone())
        .await;
    let result = match sent {
        Ok(ack) => ack
            .await
            .map(|ack| Stored {
                elapsed: started.elapsed().as_secs_f64(),
                duplicate: ack.duplicate,
            })
            .map_err(Into::into),
        Err(e) => Err(e.into()),
    };
    (pending, result)
}

async fn dead_letter(
    js: &jetstream::Context,
    subject: &str,
    metrics: &Metrics,
    incoming: Incoming,
    rejection: Rejection,
) {
    let reason = rejection.reason();
    metrics
        .uplink_rejects
        .get_or_create(&Reason { reason })
        .inc();
    tracing::warn!(parent: &incoming.span, device = %incoming.identity.device, reason, error = %rejection, "dead-lettering an uplink message");
    let letter = v1::DeadLetter {
        source: "gateway".into(),
        reason: reason.into(),
        detail: rejection.to_string(),
        device_id: incoming.identity.device.to_string(),
        origin: incoming.uplink.mqtt_topic(),
        payload: incoming
            .payload
            .slice(..incoming.payload.len().min(4096))
            .to_vec(),
        at: Some(liftwire_proto::timestamp(SystemTime::now())),
    };
    let stored = match js
        .publish(subject.to_owned(), letter.encode_to_vec().into())
        .await
    {
        Ok(ack) => ack.await.map(drop).map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = stored {
        metrics.dead_letter_failures.inc();
        tracing::error!(error = %e, device = %incoming.identity.device, "could not store a dead letter");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acl::{DeviceKind, Identity};
    use liftwire_proto::naming::{BuildingId, DeviceId, Uplink};
    use liftwire_proto::Timestamp;
    use std::sync::Arc;
    use std::time::Instant;

    fn incoming(payload: Vec<u8>) -> Incoming {
        Incoming {
            identity: Arc::new(Identity {
                device: DeviceId::new("elev-1").unwrap(),
                building: BuildingId::new("b1").unwrap(),
                kind: DeviceKind::Elevator,
            }),
            uplink: Uplink::from_mqtt_topic("lw/v1/b1/elev-1/up/event").unwrap(),
            payload: payload.into(),
            qos: 1,
            received: Instant::now(),
            span: tracing::Span::none(),
        }
    }

    fn envelope(seconds: Option<i64>) -> Vec<u8> {
        v1::Envelope {
            schema_version: SCHEMA_VERSION,
            device_id: "elev-1".into(),
            seq: 3,
            device_time: seconds.map(|seconds| Timestamp { seconds, nanos: 0 }),
            body: Some(v1::envelope::Body::Event(v1::Event {
                kind: Some(v1::event::Kind::PowerLost(v1::PowerLost {})),
            })),
        }
        .encode_to_vec()
    }

    #[test]
    fn size_and_clock_sanity() {
        let now = UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        let flaw = |payload: Vec<u8>| {
            let accepted = validate(&incoming(payload), 1024, now).unwrap();
            assert_eq!(accepted.seq, 3);
            accepted.flaw.map(|flaw| flaw.reason())
        };
        assert_eq!(flaw(envelope(Some(1_794_999_000))), None);
        // A device replaying a month-old backlog is fine.
        assert_eq!(flaw(envelope(Some(1_792_400_000))), None);
        assert_eq!(
            validate(&incoming(envelope(Some(1_794_999_000))), 8, now)
                .unwrap_err()
                .reason(),
            "too_large"
        );
        // An implausible clock is bridged all the same, flagged.
        assert_eq!(flaw(envelope(None)), Some("timestamp"));
        assert_eq!(flaw(envelope(Some(0))), Some("timestamp"), "an unset clock");
        assert_eq!(
            flaw(envelope(Some(1_795_000_000 + 2 * 24 * 3600))),
            Some("timestamp"),
            "two days ahead"
        );
    }

    #[test]
    fn only_a_body_of_the_topics_kind_without_nul_is_acted_on_whatever_the_clock() {
        let now = UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        let actionable = |envelope: &v1::Envelope| {
            validate(&incoming(envelope.encode_to_vec()), 1024, now)
                .unwrap()
                .actionable
        };
        let mut envelope = v1::Envelope::decode(envelope(None).as_slice()).unwrap();
        assert!(actionable(&envelope), "a dead clock alone");
        envelope.body = Some(v1::envelope::Body::Event(v1::Event {
            kind: Some(v1::event::Kind::AlarmSelfTest(v1::AlarmSelfTest {
                detail: "relay\0stuck".into(),
                ..Default::default()
            })),
        }));
        assert!(!actionable(&envelope), "a NUL behind a dead clock");
        envelope.body = Some(v1::envelope::Body::Telemetry(v1::Telemetry::default()));
        assert!(!actionable(&envelope), "a body of another kind");
    }

    #[test]
    fn a_claimed_device_id_is_quoted_short_and_escaped() {
        let now = UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        let mut envelope = v1::Envelope::decode(envelope(Some(1_794_999_000)).as_slice()).unwrap();
        envelope.device_id = format!("evil\n{}", "x".repeat(10_000));
        let rejection = validate(&incoming(envelope.encode_to_vec()), 1 << 20, now).unwrap_err();
        let Rejection::DeviceMismatch { claimed, .. } = &rejection else {
            panic!("{rejection:?}");
        };
        assert!(claimed.starts_with("evil\\nxxx"), "{claimed}");
        assert!(
            claimed.ends_with('…') && claimed.chars().count() == MAX_QUOTED + 2,
            "{claimed}"
        );
    }

    #[test]
    fn a_nul_in_a_text_field_is_flagged_naming_the_field() {
        let now = UNIX_EPOCH + Duration::from_secs(1_795_000_000);
        let payload = v1::Envelope {
            schema_version: SCHEMA_VERSION,
            device_id: "elev-1".into(),
            seq: 3,
            device_time: Some(Timestamp {
                seconds: 1_794_999_000,
                nanos: 0,
            }),
            body: Some(v1::envelope::Body::Event(v1::Event {
                kind: Some(v1::event::Kind::AlarmSelfTest(v1::AlarmSelfTest {
                    detail: "relay\0stuck".into(),
                    ..Default::default()
                })),
            })),
        }
        .encode_to_vec();
        let rejection = validate(&incoming(payload), 1024, now)
            .unwrap()
            .flaw
            .unwrap();
        assert_eq!(rejection.reason(), "nul_in_text");
        assert_eq!(
            rejection.to_string(),
            "AlarmSelfTest.detail contains a NUL character"
        );
    }
}
