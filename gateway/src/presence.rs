//! Presence changes into the `LW_PRESENCE` stream (`lw.v1.presence.{building}.{device}`).
//!
//! Presence drives the device-offline alert, so a change must not be lost because no telemetry
//! replica was listening or NATS refused it for a moment: it is stored in JetStream, and a change
//! JetStream did not confirm is kept and published again. Only the latest change per device is
//! kept (a device that went offline and came back is online, whatever came between), so a long
//! outage costs one entry per device, and a retried older change can never be stored after a
//! newer one of the same device.

use std::collections::HashMap;
use std::time::{Duration, SystemTime};

use async_nats::jetstream;
use liftwire_proto::naming::presence_subject;
use liftwire_proto::{v1, Message};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::{Kind, Metrics};
use crate::session::PresenceChange;

/// Settings of the presence publisher.
#[derive(Debug, Clone)]
pub struct PresenceSettings {
    /// This gateway's name in presence events.
    pub gateway_id: String,
    /// Changes taken from the queue at once before they are published.
    pub batch: usize,
    /// First pause after JetStream refused a change; it doubles up to `max_backoff`.
    pub first_backoff: Duration,
    /// Longest pause between two attempts.
    pub max_backoff: Duration,
}

impl PresenceSettings {
    /// Defaults for the gateway `gateway_id`.
    pub fn new(gateway_id: String) -> Self {
        Self {
            gateway_id,
            batch: 1_024,
            first_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// A change waiting to be stored: the message, by subject (one per device).
type Waiting = HashMap<String, v1::Presence>;

/// Publishes presence changes into JetStream until `shutdown`, then publishes what is left once.
pub async fn run(
    mut rx: mpsc::Receiver<PresenceChange>,
    js: jetstream::Context,
    metrics: Metrics,
    settings: PresenceSettings,
    shutdown: CancellationToken,
) {
    let mut waiting = Waiting::new();
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut backoff = settings.first_backoff;
    loop {
        tokio::select! {
            change = rx.recv() => match change {
                Some(change) => keep(&mut waiting, change, &settings.gateway_id),
                None => break,
            },
            () = sleep_until(retry_at) => retry_at = None,
            _ = shutdown.cancelled() => break,
        }
        for _ in 1..settings.batch {
            match rx.try_recv() {
                Ok(change) => keep(&mut waiting, change, &settings.gateway_id),
                Err(_) => break,
            }
        }
        if retry_at.is_some() || waiting.is_empty() {
            continue;
        }
        if publish(&js, &mut waiting, &metrics).await {
            backoff = settings.first_backoff;
        } else {
            tracing::warn!(kept = waiting.len(), retry_in = ?backoff, "JetStream did not store presence changes; kept for a retry");
            retry_at = Some(tokio::time::Instant::now() + backoff);
            backoff = (backoff * 2).min(settings.max_backoff);
        }
    }
    // Draining: the changes of the connections just closed, then one last attempt.
    while let Ok(change) = rx.try_recv() {
        keep(&mut waiting, change, &settings.gateway_id);
    }
    if !waiting.is_empty() && !publish(&js, &mut waiting, &metrics).await {
        tracing::error!(
            lost = waiting.len(),
            "presence changes not stored before shutdown"
        );
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Keeps `change` as its device's latest.
fn keep(waiting: &mut Waiting, change: PresenceChange, gateway_id: &str) {
    let message = v1::Presence {
        device_id: change.identity.device.to_string(),
        building_id: change.identity.building.to_string(),
        state: change.state as i32,
        reason: change.reason as i32,
        at: Some(liftwire_proto::timestamp(SystemTime::now())),
        gateway_id: gateway_id.to_owned(),
    };
    let subject = presence_subject(&change.identity.building, &change.identity.device);
    waiting.insert(subject, message);
}

/// Publishes every waiting change and waits for JetStream's answers together; what was not
/// stored stays in `waiting`. True if everything was stored.
async fn publish(js: &jetstream::Context, waiting: &mut Waiting, metrics: &Metrics) -> bool {
    let sent = std::mem::take(waiting)
        .into_iter()
        .map(|(subject, message)| {
            let payload = message.encode_to_vec();
            async move {
                let stored = match js.publish(subject.clone(), payload.into()).await {
                    Ok(ack) => ack.await.map(drop).map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                };
                (subject, message, stored)
            }
        });
    let mut all = true;
    for (subject, message, stored) in futures::future::join_all(sent).await {
        match stored {
            Ok(()) => {
                let state = if message.state == v1::PresenceState::Online as i32 {
                    "online"
                } else {
                    "offline"
                };
                metrics
                    .presence_events
                    .get_or_create(&Kind { kind: state })
                    .inc();
            }
            Err(e) => {
                metrics.presence_failures.inc();
                tracing::debug!(error = %e, device = %message.device_id, "presence change not stored");
                all = false;
                waiting.insert(subject, message);
            }
        }
    }
    all
}
