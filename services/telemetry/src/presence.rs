//! Device presence from the gateways (`lw.v1.presence.<building>.<device>`): the `online` flag of
//! the live state, and the device-offline alert, resolved as soon as the device is back.

use chrono::{DateTime, Utc};
use futures::StreamExt;
use liftwire_proto::naming::PRESENCE_FILTER;
use liftwire_proto::{v1, Message};
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

/// Follows presence changes until `shutdown` (replicas share them through a queue group).
pub async fn follow(
    nats: async_nats::Client,
    pool: sqlx::PgPool,
    shutdown: CancellationToken,
) -> Result<(), async_nats::SubscribeError> {
    let mut changes = nats
        .queue_subscribe(PRESENCE_FILTER, "telemetry".into())
        .await?;
    loop {
        let message = tokio::select! {
            message = changes.next() => match message { Some(m) => m, None => break },
            _ = shutdown.cancelled() => break,
        };
        let Ok(presence) = v1::Presence::decode(message.payload.as_ref()) else {
            tracing::warn!(subject = %message.subject, "ignoring an undecodable presence change");
            continue;
        };
        match record(&pool, &presence).await {
            Ok(Some(change)) => alerts::announce(&nats, &change).await,
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(error = %e, device = %presence.device_id, "recording presence failed")
            }
        }
    }
    Ok(())
}
