//! Request/reply endpoints on NATS for what the dashboard API needs; replicas share them through
//! a queue group. The API never reads this service's tables.

use futures::StreamExt;
use liftwire_proto::naming::{service_subject, BuildingId};
use liftwire_proto::{v1, Message};
use liftwire_runtime::observability::adopt_trace_context;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// Subject of the live-state endpoint.
pub fn live_state_subject() -> String {
    service_subject("telemetry", "live-state").unwrap_or_default()
}

/// Every elevator of `building`, by device id.
pub async fn live_state(
    pool: &sqlx::PgPool,
    building: &BuildingId,
) -> Result<Vec<v1::ElevatorState>, sqlx::Error> {
    let rows: Vec<(Vec<u8>,)> = sqlx::query_as(
        "SELECT state FROM elevator_state WHERE building_id = $1 ORDER BY device_id",
    )
    .bind(building.as_str())
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(bytes,)| v1::ElevatorState::decode(bytes.as_slice()).ok())
        .collect())
}

/// Serves the endpoints until `shutdown`.
pub async fn serve(
    nats: async_nats::Client,
    pool: sqlx::PgPool,
    shutdown: CancellationToken,
) -> Result<(), async_nats::SubscribeError> {
    let mut requests = nats
        .queue_subscribe(live_state_subject(), "telemetry".into())
        .await?;
    loop {
        let request = tokio::select! {
            request = requests.next() => match request { Some(r) => r, None => break },
            _ = shutdown.cancelled() => break,
        };
        let Some(reply_to) = request.reply.clone() else {
            continue;
        };
        let span = tracing::info_span!("live_state");
        if let Some(headers) = &request.headers {
            adopt_trace_context(&span, headers);
        }
        let reply = async {
            let building = v1::LiveStateRequest::decode(request.payload.as_ref())
                .map_err(|e| e.to_string())
                .and_then(|r| BuildingId::new(r.building_id).map_err(|e| e.to_string()));
            match building {
                Ok(building) => match live_state(&pool, &building).await {
                    Ok(elevators) => v1::LiveStateReply {
                        elevators,
                        error: String::new(),
                    },
                    Err(e) => {
                        tracing::warn!(error = %e, "live-state query failed");
                        v1::LiveStateReply {
                            elevators: vec![],
                            error: "unavailable".into(),
                        }
                    }
                },
                Err(e) => v1::LiveStateReply {
                    elevators: vec![],
                    error: format!("bad request: {e}"),
                },
            }
        }
        .instrument(span)
        .await;
        if let Err(e) = nats.publish(reply_to, reply.encode_to_vec().into()).await {
            tracing::warn!(error = %e, "replying to a live-state request failed");
        }
    }
    Ok(())
}
