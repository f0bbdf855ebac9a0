//! Protobuf envelopes through a real JetStream: the contract's stream, de-duplication on the
//! device sequence, and trace context in headers.

// Helpers outside #[test] functions panic on purpose: a failed setup fails the test.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use liftwire_proto::naming::{
    uplink_msg_id, BuildingId, DeviceId, Uplink, UplinkKind, DEAD_LETTER_STREAM, PRESENCE_STREAM,
    RETAINED_STREAM, UPLINK_STREAM,
};
use liftwire_proto::{v1, Message, Timestamp, SCHEMA_VERSION};
use liftwire_runtime::nats::{ensure_stream, NatsConfig, NatsError, StreamStorage};
use liftwire_testkit::Nats;

fn telemetry(device: &str, seq: u64) -> v1::Envelope {
    v1::Envelope {
        schema_version: SCHEMA_VERSION,
        device_id: device.into(),
        seq,
        device_time: Some(Timestamp {
            seconds: 1_795_000_000 + seq as i64,
            nanos: 0,
        }),
        body: Some(v1::envelope::Body::Telemetry(v1::Telemetry {
            mode: v1::OperatingMode::Normal as i32,
            floor: 3,
            position_mm: 9_100,
            direction: v1::Direction::Up as i32,
            doors: vec![v1::DoorState::Closed as i32],
            load_percent: 40,
            speed_mm_s: 1_000,
            motor_temp_decicelsius: 415,
            counters: Some(v1::Counters {
                trips: 10,
                door_cycles: 22,
                run_seconds: 3_600,
                starts: 11,
            }),
        })),
    }
}

#[tokio::test]
async fn envelope_round_trips_through_jetstream_once_per_device_sequence() {
    let nats = Nats::start().expect("nats-server starts");
    let client = nats.client().await.expect("connects");
    let js = jetstream::new(client);
    let config = NatsConfig {
        url: nats.url(),
        stream_storage: StreamStorage::File,
        ..Default::default()
    };
    let stream = ensure_stream(&js, &UPLINK_STREAM, &config)
        .await
        .expect("stream declared");
    // Declaring again is idempotent.
    ensure_stream(&js, &UPLINK_STREAM, &config)
        .await
        .expect("stream re-declared");

    let up = Uplink {
        building: BuildingId::new("mc-larvotto").unwrap(),
        device: DeviceId::new("elev-7").unwrap(),
        kind: UplinkKind::Telemetry,
    };
    let sent = telemetry("elev-7", 1);
    for _ in 0..2 {
        // The second publish is a device resend of the same sequence number.
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            uplink_msg_id(&up.device, sent.seq).as_str(),
        );
        let ack = js
            .publish_with_headers(up.nats_subject(), headers, sent.encode_to_vec().into())
            .await
            .expect("publish")
            .await
            .expect("stored");
        assert_eq!(ack.stream, UPLINK_STREAM.name);
    }
    let mut info = stream.clone();
    assert_eq!(
        info.info().await.expect("info").state.messages,
        1,
        "resend was de-duplicated"
    );

    let consumer = stream
        .create_consumer(pull::Config {
            durable_name: Some("test".into()),
            ..Default::default()
        })
        .await
        .expect("consumer");
    let mut messages = consumer
        .fetch()
        .max_messages(10)
        .expires(Duration::from_secs(2))
        .messages()
        .await
        .expect("fetch");
    let message = messages.next().await.expect("one message").expect("ok");
    assert_eq!(Uplink::from_nats_subject(&message.subject).unwrap(), up);
    let received = v1::Envelope::decode(message.payload.as_ref()).expect("decodes");
    assert_eq!(received, sent);
    message.ack().await.expect("ack");
    assert!(messages.next().await.is_none(), "no second copy");
}

#[tokio::test]
async fn the_duplicate_window_is_the_configured_one_and_redeclaring_updates_it() {
    let nats = Nats::start().expect("nats-server starts");
    let js = jetstream::new(nats.client().await.expect("connects"));
    let mut config = NatsConfig {
        url: nats.url(),
        duplicate_window: Duration::from_secs(30),
        ..Default::default()
    };
    let mut stream = ensure_stream(&js, &UPLINK_STREAM, &config).await.unwrap();
    assert_eq!(
        stream.info().await.unwrap().config.duplicate_window,
        Duration::from_secs(30)
    );
    // An operator changes the setting: the next start applies it to the existing stream.
    config.duplicate_window = Duration::from_secs(5 * 60);
    let mut stream = ensure_stream(&js, &UPLINK_STREAM, &config).await.unwrap();
    assert_eq!(
        stream.info().await.unwrap().config.duplicate_window,
        Duration::from_secs(5 * 60)
    );
}

#[tokio::test]
async fn each_stream_keeps_messages_for_its_configured_age_and_redeclaring_updates_it() {
    let nats = Nats::start().expect("nats-server starts");
    let js = jetstream::new(nats.client().await.expect("connects"));
    let hour = Duration::from_secs(3600);
    let mut config = NatsConfig {
        url: nats.url(),
        uplink_max_age: hour,
        dead_letter_max_age: 2 * hour,
        ..Default::default()
    };
    let max_age = |spec| {
        let (js, config) = (js.clone(), config.clone());
        async move {
            let mut stream = ensure_stream(&js, spec, &config).await.unwrap();
            stream.info().await.unwrap().config.max_age
        }
    };
    assert_eq!(max_age(&UPLINK_STREAM).await, hour);
    assert_eq!(max_age(&DEAD_LETTER_STREAM).await, 2 * hour);
    // The latest screen content and watermark of a device stay however old they are.
    assert_eq!(max_age(&RETAINED_STREAM).await, Duration::ZERO);
    assert_eq!(
        max_age(&PRESENCE_STREAM).await,
        hour,
        "presence lasts as uplink"
    );

    config.uplink_max_age = 3 * hour;
    let mut stream = ensure_stream(&js, &UPLINK_STREAM, &config).await.unwrap();
    assert_eq!(stream.info().await.unwrap().config.max_age, 3 * hour);
}

#[tokio::test]
async fn a_max_age_below_the_duplicate_window_is_refused_before_touching_the_stream() {
    let nats = Nats::start().expect("nats-server starts");
    let js = jetstream::new(nats.client().await.expect("connects"));
    let config = NatsConfig {
        url: nats.url(),
        uplink_max_age: Duration::from_secs(30),
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    };
    let err = ensure_stream(&js, &UPLINK_STREAM, &config)
        .await
        .expect_err("refused");
    assert!(
        matches!(
            err,
            NatsError::MaxAgeBelowDuplicateWindow {
                stream: "LW_UPLINK",
                ..
            }
        ),
        "{err}"
    );
    assert!(
        js.get_stream(UPLINK_STREAM.name).await.is_err(),
        "not created"
    );
    // Zero is "for ever", never below the window.
    let forever = NatsConfig {
        uplink_max_age: Duration::ZERO,
        ..config
    };
    let mut stream = ensure_stream(&js, &UPLINK_STREAM, &forever).await.unwrap();
    assert_eq!(stream.info().await.unwrap().config.max_age, Duration::ZERO);
}

#[tokio::test]
async fn jetstream_data_survives_a_server_restart() {
    let mut nats = Nats::start().expect("nats-server starts");
    let config = NatsConfig {
        url: nats.url(),
        ..Default::default()
    };
    {
        let js = jetstream::new(nats.client().await.unwrap());
        ensure_stream(&js, &UPLINK_STREAM, &config).await.unwrap();
        let up = Uplink::from_mqtt_topic("lw/v1/b1/elev-1/up/telemetry").unwrap();
        js.publish(
            up.nats_subject(),
            telemetry("elev-1", 1).encode_to_vec().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    nats.restart().expect("restarts");
    let js = jetstream::new(nats.client().await.unwrap());
    let mut stream = js
        .get_stream(UPLINK_STREAM.name)
        .await
        .expect("stream kept");
    assert_eq!(stream.info().await.unwrap().state.messages, 1);
}
