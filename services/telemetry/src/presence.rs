//! Device presence from the gateways (`lw.v1.presence.<building>.<device>`): the `online` flag of
//! the live state, and the device-offline alert, resolved as soon as the device is back.

use std::collections::hash_map::{Entry, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use liftwire_proto::naming::PRESENCE_FILTER;
use liftwire_proto::{v1, Message};
use liftwire_runtime::service::BuildContext;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use tokio_util::sync::CancellationToken;

use crate::alerts::{self, AlertChange};
use crate::state::{datetime, AlertRule};

/// Records one presence change; returns the alert change it causes, if any. Changes older than
/// the recorded one are ignored (presence from several gateways can arrive out of order).
pub async fn record(
    pool: &sqlx::PgPool,
    presence: &v1::Presence,
) -> Result<Option<AlertChange>, sqlx::Error> {
    let online = presence.state == v1::PresenceState::Online as i32;
    let at: DateTime<Utc> = presence
        .at
        .as_ref()
        .and_then(datetime)
        .unwrap_or_else(Utc::now);
    let mut tx = pool.begin().await?;
    let applied = sqlx::query(
        "INSERT INTO device_presence (device_id, building_id, online, at) VALUES ($1, $2, $3, $4)
         ON CONFLICT (device_id) DO UPDATE SET online = EXCLUDED.online, at = EXCLUDED.at,
             building_id = EXCLUDED.building_id
         WHERE device_presence.at <= EXCLUDED.at",
    )
    .bind(&presence.device_id)
    .bind(&presence.building_id)
    .bind(online)
    .bind(at)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let change = if online && applied > 0 {
        alerts::resolve(
            &mut tx,
            &presence.device_id,
            AlertRule::DeviceOffline,
            "back online",
            at,
        )
        .await?
    } else {
        None
    };
    tx.commit().await?;
    Ok(change)
}

/// Presence counters, registered as `liftwire_telemetry_presence_*`.
#[derive(Clone, Default)]
pub struct PresenceMetrics {
    /// Attempts to record a change that failed (the change is kept and retried).
    failures: Counter,
    /// Changes waiting to be recorded, one per device at most.
    pending: Gauge,
}

impl PresenceMetrics {
    /// New metrics registered in the binary's registry.
    pub fn register(ctx: &BuildContext) -> Self {
        let metrics = Self::default();
        let mut registry = ctx.registry();
        let registry = registry.sub_registry_with_prefix("telemetry_presence");
        registry.register(
            "record_failures",
            "Presence changes that could not be recorded yet (kept and retried)",
            metrics.failures.clone(),
        );
        registry.register(
            "pending",
            "Presence changes waiting to be recorded, at most one per device",
            metrics.pending.clone(),
        );
        metrics
    }
}

/// First pause after presence could not be recorded; it doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(100);
/// Longest pause between two attempts to record pending presence.
const MAX_RETRY: Duration = Duration::from_secs(5);

/// Follows presence changes until `shutdown` (replicas share them through a queue group).
///
/// Presence arrives on core NATS, without redelivery: a change that cannot be recorded (the
/// database is down) is kept, the latest per device, and recorded once the database is back;
/// meanwhile the subscription keeps being read, so a long outage neither loses the changes nor
/// overflows the subscription, and costs one attempt per pause, not one per change.
pub async fn follow(
    nats: async_nats::Client,
    pool: sqlx::PgPool,
    metrics: PresenceMetrics,
    shutdown: CancellationToken,
) -> Result<(), async_nats::SubscribeError> {
    let mut changes = nats
        .queue_subscribe(PRESENCE_FILTER, "telemetry".into())
        .await?;
    let mut pending: HashMap<String, v1::Presence> = HashMap::new();
    let mut retry_at = tokio::time::Instant::now();
    let mut pause = FIRST_RETRY;
    loop {
        if !pending.is_empty() && tokio::time::Instant::now() >= retry_at {
            let mut waiting = std::mem::take(&mut pending).into_iter();
            while let Some((device, presence)) = waiting.next() {
                match record(&pool, &presence).await {
                    Ok(change) => {
                        pause = FIRST_RETRY;
                        if let Some(change) = change {
                            alerts::announce(&nats, &change).await;
                        }
                    }
                    Err(e) => {
                        metrics.failures.inc();
                        tracing::warn!(error = %e, device, retry_in = ?pause, "recording presence failed; kept for a retry");
                        pending.insert(device, presence);
                        pending.extend(waiting);
                        retry_at = tokio::time::Instant::now() + pause;
                        pause = (pause * 2).min(MAX_RETRY);
                        break;
                    }
                }
            }
        }
        metrics.pending.set(pending.len() as i64);
        let message = tokio::select! {
            message = changes.next() => match message { Some(m) => m, None => break },
            () = tokio::time::sleep_until(retry_at), if !pending.is_empty() => continue,
            _ = shutdown.cancelled() => break,
        };
        let Ok(presence) = v1::Presence::decode(message.payload.as_ref()) else {
            tracing::warn!(subject = %message.subject, "ignoring an undecodable presence change");
            continue;
        };
        match pending.entry(presence.device_id.clone()) {
            Entry::Occupied(mut kept) => {
                if moment(&presence) >= moment(kept.get()) {
                    kept.insert(presence);
                }
            }
            Entry::Vacant(slot) => {
                slot.insert(presence);
            }
        }
    }
    Ok(())
}

/// When a presence change happened, for keeping the latest of a device's pending ones.
fn moment(presence: &v1::Presence) -> (i64, i32) {
    presence
        .at
        .as_ref()
        .map_or((0, 0), |t| (t.seconds, t.nanos))
}
