//! A device's flawed messages keep their place in its sequence, end to end: an unset clock, a
//! body of the wrong kind and a NUL in a text field pass the gateway, telemetry stores or
//! dead-letters each with a placeholder, and the device's watermark passes them all. Refused at
//! the gateway, they would stop the watermark for good and the device would resend them for ever.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{eventually, mqtt_elevator, stack, Stack};
use liftwire_proto::{v1, Message, Timestamp, SCHEMA_VERSION};

fn envelope(seq: u64, device_time: Option<i64>, kind: v1::event::Kind) -> Vec<u8> {
    v1::Envelope {
        schema_version: SCHEMA_VERSION,
        device_id: "elev-1".into(),
        seq,
        device_time: device_time.map(|seconds| Timestamp { seconds, nanos: 0 }),
        body: Some(v1::envelope::Body::Event(v1::Event { kind: Some(kind) })),
    }
    .encode_to_vec()
}

#[tokio::test(flavor = "multi_thread")]
async fn flawed_messages_keep_their_place_and_the_watermark_passes_them() {
    let Stack {
        nats: _nats,
        pg: _pg,
        pool,
        ingest,
        gw,
        ..
    } = stack().await;
    let (client, mqtt) = mqtt_elevator(&gw, "b1", "elev-1").await;

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let alarm = || v1::event::Kind::AlarmButtonPressed(v1::AlarmButtonPressed {});
    let messages = [
        ("event", envelope(1, Some(now), alarm())),
        // The clock battery died: the controller believes it is 1970.
        ("event", envelope(2, Some(0), alarm())),
        // An event body on the telemetry topic.
        ("telemetry", envelope(3, Some(now), alarm())),
        (
            "event",
            envelope(
                4,
                Some(now),
                v1::event::Kind::FaultRaised(v1::FaultRaised {
                    fault_id: "f-1".into(),
                    description: "door\0jammed".into(),
                    ..Default::default()
                }),
            ),
        ),
        ("event", envelope(5, None, alarm())),
    ];
    for (kind, payload) in messages {
        client
            .publish(
                format!("lw/v1/b1/elev-1/up/{kind}"),
                rumqttc::QoS::AtLeastOnce,
                false,
                payload,
            )
            .await
            .unwrap();
    }

    eventually(
        "the watermark passed every message",
        Duration::from_secs(20),
        || {
            let pool = pool.clone();
            async move {
                sqlx::query_scalar::<_, i64>(
                    "SELECT persisted_seq FROM device_watermarks WHERE device_id = 'elev-1'",
                )
                .fetch_optional(&pool)
                .await
                .unwrap()
                    == Some(5)
            }
        },
    )
    .await;
    let rows: Vec<(i64, String, bool)> = sqlx::query_as(
        "SELECT seq, kind, abs(extract(epoch FROM at - received_at)) < 60
         FROM device_messages WHERE device_id = 'elev-1' ORDER BY seq",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        [
            (1, "event".to_owned(), true),
            // Kept, under its arrival time.
            (2, "event".to_owned(), true),
            (3, "rejected".to_owned(), true),
            (4, "rejected".to_owned(), true),
            (5, "event".to_owned(), true),
        ]
    );
    assert!(gw
        .metrics()
        .contains("liftwire_gateway_uplink_flaws_total{reason=\"timestamp\"} 2"));

    client.disconnect().await.unwrap();
    mqtt.await.unwrap();
    gw.running.stop().await;
    ingest.stop().await;
}
