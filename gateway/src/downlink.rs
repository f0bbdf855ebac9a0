//! The downlink bridge: messages services publish on NATS reach exactly the addressed device (or
//! every device of a building) through the embedded broker, via one reserved in-process link.
//!
//! Every gateway replica delivers every downlink message to the devices connected to it, so a
//! device is reached whichever replica holds its connection. Retained kinds (screen content,
//! watermarks) come from the `LW_RETAINED` stream, last message per subject first, so a replica
//! that starts later still has the current content for screens that (re)connect.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use liftwire_proto::naming::{downlink_kind_filter, Downlink, DownlinkKind, RETAINED_STREAM};
use liftwire_proto::{mqtt, v1, Message};
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{v4::V4, Packet, Protocol};
use rumqttd::Notification;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::{Kind, Metrics, Reason};

/// Client id of the gateway's own link into the broker. Device ids cannot start with `_`, so no
/// device can authenticate as (or take over) this link.
pub const BRIDGE_CLIENT_ID: &str = "_liftwire-bridge";

/// Why a downlink message is refused.
#[derive(Debug, thiserror::Error)]
pub enum DownlinkError {
    /// The subject is not a downlink subject of the contract.
    #[error(transparent)]
    Subject(#[from] liftwire_proto::naming::NameError),
    /// The payload is not a `Downlink` of the subject's kind.
    #[error("payload is not a liftwire.v1.Downlink of kind {0}")]
    Payload(&'static str),
    /// The packet is larger than devices take (`mqtt.max_payload_bytes`, which bounds a packet's
    /// topic, packet id and payload).
    #[error("packet of {0} bytes exceeds the limit")]
    TooLarge(usize),
}

impl DownlinkError {
    fn reason(&self) -> &'static str {
        match self {
            DownlinkError::Subject(_) => "subject",
            DownlinkError::Payload(_) => "payload",
            DownlinkError::TooLarge(_) => "too_large",
        }
    }
}

/// Builds the broker packet for a downlink message: QoS 1, retained for retained kinds. An empty
/// payload on a retained kind clears the retained message. A payload over `max_payload` bytes is
/// refused: devices would drop the connection on it (and, retained, again at every reconnect).
pub fn packet(
    subject: &str,
    payload: Bytes,
    pkid: u16,
    max_payload: usize,
) -> Result<(DownlinkKind, Packet), DownlinkError> {
    let down = Downlink::from_nats_subject(subject)?;
    let topic = down.mqtt_topic();
    // What an MQTT 3.1.1 peer counts against its limit: topic length, topic, packet id, payload.
    let packet_bytes = 2 + topic.len() + 2 + payload.len();
    if packet_bytes > max_payload {
        return Err(DownlinkError::TooLarge(packet_bytes));
    }
    let clearing = payload.is_empty() && down.kind.retained();
    if !clearing {
        let decoded = v1::Downlink::decode(payload.as_ref())
            .map_err(|_| DownlinkError::Payload(down.kind.as_str()))?;
        if decoded.kind() != Some(down.kind) {
            return Err(DownlinkError::Payload(down.kind.as_str()));
        }
    }
    // rumqttd only builds QoS 0 publishes for local links; encode a QoS 1 PUBLISH and let its own
    // codec parse it, so devices get at-least-once delivery of commands and content.
    let mut raw = BytesMut::with_capacity(topic.len() + payload.len() + 8);
    mqtt::put_publish(
        &mut raw,
        &topic,
        Some(pkid.max(1)),
        down.kind.retained(),
        &payload,
    );
    let packet = V4
        .read_mut(&mut raw, usize::MAX)
        .map_err(|_| DownlinkError::Payload(down.kind.as_str()))?;
    Ok((down.kind, packet))
}

/// Feeds the broker from a dedicated thread: rumqttd's link calls block on the router channel.
pub fn spawn_link_writer(
    mut link_tx: LinkTx,
) -> std::io::Result<(mpsc::Sender<Packet>, std::thread::JoinHandle<()>)> {
    let (tx, mut rx) = mpsc::channel::<Packet>(4096);
    let handle = std::thread::Builder::new()
        .name("liftwire-downlink".into())
        .spawn(move || {
            while let Some(packet) = rx.blocking_recv() {
                if let Err(e) = futures::executor::block_on(link_tx.send(packet)) {
                    tracing::error!(error = %e, "the broker refused a downlink message; stopping downlink");
                    break;
                }
            }
        })?;
    Ok((tx, handle))
}

/// Drains the link's notifications (acks) and answers `Unschedule`, without which the router
/// stops serving the link after ~200 buffered notifications.
pub async fn drain_link(mut link_rx: LinkRx, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            notification = link_rx.next() => match notification {
                Ok(Some(Notification::Unschedule)) => {
                    if link_rx.wake().await.is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "broker link closed");
                    break;
                }
            },
            _ = shutdown.cancelled() => break,
        }
    }
}

/// Forwards downlink messages from NATS into the broker until `shutdown`.
///
/// Live kinds (commands, upload grants) flow while the retained consumers are being (re)opened:
/// `LW_RETAINED` being unavailable never holds up a command.
pub async fn run(
    nats: async_nats::Client,
    js: jetstream::Context,
    to_broker: mpsc::Sender<Packet>,
    metrics: Metrics,
    max_payload: usize,
    shutdown: CancellationToken,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let mut live = futures::stream::select_all(Vec::new());
    for kind in DownlinkKind::ALL.iter().filter(|k| !k.retained()) {
        live.push(nats.subscribe(downlink_kind_filter(*kind)).await?);
    }
    let mut retained: RetainedMessages = futures::stream::select_all(Vec::new());
    let mut cursor = RetainedCursor::default();
    let mut opening: Option<OpeningRetained> = None;
    let mut open_at = tokio::time::Instant::now();
    let mut retry = Duration::from_millis(100);
    let mut pkid: u16 = 0;
    // Ordered consumers notice a server restart only after missing heartbeats; watching the
    // connection restarts them as soon as NATS is back.
    let mut watch = tokio::time::interval(Duration::from_millis(250));
    let mut was_connected = true;
    // An ordered consumer whose stream is deleted and created again resumes at its old
    // sequence, skipping the new stream's first messages: the stream is checked now and then.
    let mut recheck = tokio::time::interval(STREAM_CHECK);
    let mut checking: Option<CheckingStream> = None;
    loop {
        if retained.is_empty() && opening.is_none() && tokio::time::Instant::now() >= open_at {
            // At start-up, the last message per subject, then live; after a NATS restart, from
            // where each kind left off (not the whole fleet's retained messages again).
            let (js, from) = (js.clone(), cursor.clone());
            opening = Some(Box::pin(
                async move { retained_consumers(&js, &from).await },
            ));
        }
        let (subject, payload) = tokio::select! {
            Some(message) = live.next() => (message.subject, message.payload),
            opened = async { opening.as_mut().expect("guarded").await }, if opening.is_some() => {
                opening = None;
                match opened {
                    Ok((consumers, stream)) => {
                        if cursor.stream != Some(stream) {
                            // A new stream (first open, or recreated): its sequences start over.
                            cursor = RetainedCursor { stream: Some(stream), ..Default::default() };
                        }
                        retained = consumers;
                        retry = Duration::from_millis(100);
                        metrics.retained_opens.inc();
                    }
                    Err(e) => {
                        metrics.retained_open_failures.inc();
                        tracing::warn!(error = %e, retry_in = ?retry, "cannot consume retained downlink yet");
                        open_at = tokio::time::Instant::now() + retry;
                        retry = (retry * 2).min(Duration::from_secs(5));
                    }
                }
                continue;
            }
            () = tokio::time::sleep_until(open_at), if retained.is_empty() && opening.is_none() => continue,
            message = retained.next(), if !retained.is_empty() => match message {
                Some(Ok(message)) => {
                    if let (Ok(info), Ok(down)) =
                        (message.info(), Downlink::from_nats_subject(&message.subject))
                    {
                        cursor.delivered.insert(down.kind.as_str(), info.stream_sequence);
                    }
                    (message.subject.clone(), message.payload.clone())
                }
                failed => {
                    if let Some(Err(e)) = failed {
                        tracing::warn!(error = %e, "retained downlink consumer failed; restarting it");
                    }
                    retained = futures::stream::select_all(Vec::new());
                    continue;
                }
            },
            _ = recheck.tick(), if checking.is_none() && !retained.is_empty() => {
                let js = js.clone();
                checking = Some(Box::pin(async move { stream_created(&js).await }));
                continue;
            }
            created = async { checking.as_mut().expect("guarded").await }, if checking.is_some() => {
                checking = None;
                if let (Some(created), Some(reading)) = (created, cursor.stream) {
                    if created != reading && !retained.is_empty() {
                        tracing::warn!("LW_RETAINED was created again: reading it from the start");
                        retained = futures::stream::select_all(Vec::new());
                    }
                }
                continue;
            }
            _ = watch.tick() => {
                let connected = nats.connection_state() == async_nats::connection::State::Connected;
                if connected && !was_connected {
                    tracing::info!("NATS is back: restarting the retained downlink consumers");
                    retained = futures::stream::select_all(Vec::new());
                }
                was_connected = connected;
                continue;
            }
            _ = shutdown.cancelled() => break,
        };
        pkid = pkid.wrapping_add(1).max(1);
        match packet(&subject, payload, pkid, max_payload) {
            Ok((kind, packet)) => {
                if to_broker.send(packet).await.is_err() {
                    break;
                }
                metrics
                    .downlink_messages
                    .get_or_create(&Kind {
                        kind: kind.as_str(),
                    })
                    .inc();
            }
            Err(e) => {
                metrics
                    .downlink_rejects
                    .get_or_create(&Reason { reason: e.reason() })
                    .inc();
                tracing::warn!(subject = %subject, error = %e, "refusing a downlink message");
            }
        }
    }
    Ok(())
}

/// The retained consumers being opened.
type OpeningRetained = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<(RetainedMessages, i128), Box<dyn std::error::Error + Send + Sync>>,
            > + Send,
    >,
>;

type RetainedMessages = futures::stream::SelectAll<jetstream::consumer::pull::Ordered>;

/// How often the retained consumers check that `LW_RETAINED` is still the stream they read.
const STREAM_CHECK: Duration = Duration::from_secs(5);

/// A check of the retained stream's creation time in progress.
type CheckingStream = std::pin::Pin<Box<dyn std::future::Future<Output = Option<i128>> + Send>>;

/// When `LW_RETAINED` was created (nanoseconds), if it can be read within a second.
async fn stream_created(js: &jetstream::Context) -> Option<i128> {
    let read = async {
        let mut stream = js.get_stream(RETAINED_STREAM.name).await.ok()?;
        let info = stream.info().await.ok()?;
        Some(info.created.unix_timestamp_nanos())
    };
    tokio::time::timeout(Duration::from_secs(1), read)
        .await
        .ok()
        .flatten()
}

/// Where the retained consumers are: the stream they read (its creation time, in nanoseconds)
/// and the last stream sequence delivered of each retained kind.
#[derive(Debug, Clone, Default)]
struct RetainedCursor {
    stream: Option<i128>,
    delivered: std::collections::HashMap<&'static str, u64>,
}

/// One ordered consumer per retained kind (a last-per-subject consumer needs a filter inside the
/// stream's subjects): on the stream `from` read, right after what it delivered of the kind;
/// otherwise (first open, a recreated stream) from the last message per subject. Returns them
/// with the stream's creation time.
async fn retained_consumers(
    js: &jetstream::Context,
    from: &RetainedCursor,
) -> Result<(RetainedMessages, i128), Box<dyn std::error::Error + Send + Sync>> {
    let mut stream = js.get_stream(RETAINED_STREAM.name).await?;
    let info = stream.info().await?;
    let created = info.created.unix_timestamp_nanos();
    let last = info.state.last_sequence;
    let mut retained = futures::stream::select_all(Vec::new());
    for kind in DownlinkKind::ALL.iter().filter(|k| k.retained()) {
        let deliver_policy = match from.delivered.get(kind.as_str()) {
            Some(&seen) if from.stream == Some(created) && seen <= last => {
                DeliverPolicy::ByStartSequence {
                    start_sequence: seen + 1,
                }
            }
            _ => DeliverPolicy::LastPerSubject,
        };
        let consumer = stream
            .create_consumer(jetstream::consumer::pull::OrderedConfig {
                deliver_policy,
                filter_subject: downlink_kind_filter(*kind),
                ..Default::default()
            })
            .await?;
        retained.push(consumer.messages().await?);
    }
    Ok((retained, created))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn downlink(body: v1::downlink::Body) -> Bytes {
        v1::Downlink {
            message_id: "m".into(),
            issued_at: None,
            body: Some(body),
        }
        .encode_to_vec()
        .into()
    }

    const MAX: usize = 64 * 1024;

    #[test]
    fn downlink_larger_than_devices_take_is_refused() {
        let payload = downlink(v1::downlink::Body::Command(v1::Command {
            command_id: "c".repeat(2_000),
            ..Default::default()
        }));
        let packet_bytes = 4 + "lw/v1/b1/elev-1/down/command".len() + payload.len();
        assert!(matches!(
            packet("lw.v1.down.b1.elev-1.command", payload.clone(), 1, packet_bytes - 1),
            Err(DownlinkError::TooLarge(n)) if n == packet_bytes
        ));
        assert!(packet("lw.v1.down.b1.elev-1.command", payload, 1, packet_bytes).is_ok());
    }

    #[test]
    fn builds_qos1_packets_retained_by_kind() {
        let payload = downlink(v1::downlink::Body::Watermark(v1::Watermark {
            persisted_seq: 7,
        }));
        let (kind, built) =
            packet("lw.v1.down.b1.elev-1.watermark", payload.clone(), 9, MAX).unwrap();
        assert_eq!(kind, DownlinkKind::Watermark);
        let Packet::Publish(publish, None) = built else {
            panic!("a publish")
        };
        assert_eq!(publish.topic.as_ref(), b"lw/v1/b1/elev-1/down/watermark");
        assert_eq!(publish.payload, payload);
        assert!(publish.retain);
        assert_eq!(publish.serialize()[0] & 0b0110, 0b0010, "QoS 1");

        let command = downlink(v1::downlink::Body::Command(v1::Command::default()));
        let (_, Packet::Publish(publish, _)) =
            packet("lw.v1.down.b1.elev-1.command", command, 1, MAX).unwrap()
        else {
            panic!("a publish")
        };
        assert!(!publish.retain);
    }

    #[test]
    fn large_payloads_encode_their_length() {
        let content = v1::ScreenContent {
            body_text: "x".repeat(70_000),
            ..Default::default()
        };
        let payload = downlink(v1::downlink::Body::ScreenContent(content));
        let (_, Packet::Publish(publish, _)) = packet(
            "lw.v1.down.b1._all.screen-content",
            payload.clone(),
            1,
            1024 * 1024,
        )
        .unwrap() else {
            panic!("a publish")
        };
        assert_eq!(publish.payload, payload);
        assert_eq!(publish.topic.as_ref(), b"lw/v1/b1/_all/down/screen-content");
    }

    #[test]
    fn refuses_foreign_subjects_and_mismatched_payloads() {
        let watermark = downlink(v1::downlink::Body::Watermark(v1::Watermark {
            persisted_seq: 7,
        }));
        assert_eq!(
            packet("lw.v1.down.b1.elev-1.command", watermark.clone(), 1, MAX)
                .unwrap_err()
                .reason(),
            "payload"
        );
        assert_eq!(
            packet("lw.v1.down.b1.*.watermark", watermark.clone(), 1, MAX)
                .unwrap_err()
                .reason(),
            "subject"
        );
        assert_eq!(
            packet("lw.v1.down.b1.elev-1.command", Bytes::new(), 1, MAX)
                .unwrap_err()
                .reason(),
            "payload"
        );
        // An empty retained message clears the retained content.
        assert!(packet("lw.v1.down.b1.elev-1.screen-content", Bytes::new(), 1, MAX).is_ok());
    }
}
