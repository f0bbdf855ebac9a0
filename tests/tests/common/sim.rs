//! Simulated elevator days, published into JetStream as the gateway would.

use async_nats::jetstream;
use liftwire_firmware_sim::{Elevator, ElevatorSpec, Incident, TrafficProfile};
use liftwire_proto::naming::{uplink_msg_id, BuildingId, DeviceId, Uplink};
use liftwire_proto::{v1, Message};

/// A simulated minute, in milliseconds.
pub const MINUTE: u64 = 60_000;
/// A simulated hour, in milliseconds.
pub const HOUR: u64 = 60 * MINUTE;

/// What an elevator sent during the simulated day.
pub struct Day {
    /// The elevator.
    pub device: DeviceId,
    /// Its messages, in order.
    pub envelopes: Vec<v1::Envelope>,
}

/// Runs `elevator` from midnight, injecting each incident at its time of day, up to `until`.
pub fn simulate(mut elevator: Elevator, incidents: Vec<(u64, Incident)>, until: u64) -> Day {
    let device = elevator.device().clone();
    let mut envelopes = Vec::new();
    for (at, incident) in incidents {
        envelopes.extend(elevator.advance(at - elevator.now_ms()));
        envelopes.extend(elevator.inject(incident));
    }
    envelopes.extend(elevator.advance(until - elevator.now_ms()));
    Day { device, envelopes }
}

/// A night-traffic elevator with telemetry every minute and its self-test at `first_self_test`.
pub fn elevator(device: &str, first_self_test: u64, epoch_ms: i64) -> Elevator {
    let spec = ElevatorSpec {
        telemetry_interval_ms: MINUTE,
        ..Default::default()
    };
    // The seed sets the time of the daily alarm self-test (seed mod 24 h).
    Elevator::new(
        DeviceId::new(device).unwrap(),
        spec,
        TrafficProfile::Night,
        first_self_test,
        epoch_ms,
    )
}

/// Publishes a day into `LW_UPLINK` as the gateway would, for `building`.
pub async fn publish(js: &jetstream::Context, building: &str, day: &Day) {
    let building = BuildingId::new(building).unwrap();
    let mut acks = Vec::new();
    for envelope in &day.envelopes {
        let up = Uplink {
            building: building.clone(),
            device: day.device.clone(),
            kind: envelope.kind().unwrap(),
        };
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            uplink_msg_id(&day.device, envelope.seq).as_str(),
        );
        acks.push(
            js.publish_with_headers(up.nats_subject(), headers, envelope.encode_to_vec().into())
                .await
                .unwrap(),
        );
    }
    for ack in acks {
        ack.await.unwrap();
    }
}

/// Waits until telemetry has persisted every message of `days` (each elevator's watermark at
/// its last sequence number).
pub async fn ingested(pool: &sqlx::PgPool, days: &[&Day]) {
    let expected: std::collections::BTreeMap<String, i64> = days
        .iter()
        .map(|d| {
            let last = d.envelopes.last().map_or(0, |e| e.seq);
            (d.device.to_string(), i64::try_from(last).unwrap())
        })
        .collect();
    super::eventually(
        "the days ingested",
        std::time::Duration::from_secs(60),
        || {
            let (pool, expected) = (pool.clone(), expected.clone());
            async move {
                let marks: Vec<(String, i64)> =
                    sqlx::query_as("SELECT device_id, persisted_seq FROM device_watermarks")
                        .fetch_all(&pool)
                        .await
                        .unwrap();
                expected
                    .iter()
                    .all(|(device, seq)| marks.contains(&(device.clone(), *seq)))
            }
        },
    )
    .await;
}
