//! Live state end to end: a device's messages → gateway → JetStream → telemetry (state folded
//! in sequence order) → NATS request/reply → dashboard API, scoped per building.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{eventually, stack, Stack};
use liftwire_api::auth::{mint, AuthConfig, Authenticator, Role};
use liftwire_api::live::BuildingLive;
use liftwire_api::{serve_http, AppState};
use liftwire_gateway::acl::DeviceKind;
use liftwire_proto::naming::{BuildingId, DeviceId};
use liftwire_proto::{v1, Message, Timestamp, SCHEMA_VERSION};
use tokio_util::sync::CancellationToken;

fn envelope(seq: u64, body: v1::envelope::Body) -> Vec<u8> {
    v1::Envelope {
        schema_version: SCHEMA_VERSION,
        device_id: "elev-1".into(),
        seq,
        device_time: Some(Timestamp {
            seconds: 1_795_000_000 + seq as i64,
            nanos: 0,
        }),
        body: Some(body),
    }
    .encode_to_vec()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_manager_sees_the_live_state_of_their_building_only() {
    let Stack {
        nats,
        pg: _pg,
        pool: _pool,
        ingest,
        gw,
        ..
    } = stack().await;
    let stop = CancellationToken::new();
    let secret = gw
        .registry
        .provision(
            &BuildingId::new("mc-larvotto").unwrap(),
            &DeviceId::new("elev-1").unwrap(),
            DeviceKind::Elevator,
        )
        .await
        .unwrap();

    let auth = AuthConfig {
        hs256_secret: Some("live-test-secret-live-test-secret-0001".into()),
        ..Default::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let api = tokio::spawn(serve_http(
        listener,
        AppState::new(
            Authenticator::new(&auth).unwrap(),
            nats.client().await.unwrap(),
            0.0,
            1,
        ),
        64 * 1024,
        stop.clone(),
    ));

    let mut options = rumqttc::MqttOptions::new("elev-1", gw.addr.ip().to_string(), gw.addr.port());
    options.set_credentials("elev-1", secret);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 16);
    let mqtt = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    let telemetry_body = v1::envelope::Body::Telemetry(v1::Telemetry {
        mode: v1::OperatingMode::Normal as i32,
        floor: 4,
        direction: v1::Direction::Stopped as i32,
        doors: vec![v1::DoorState::Closed as i32],
        ..Default::default()
    });
    let fault = v1::envelope::Body::Event(v1::Event {
        kind: Some(v1::event::Kind::FaultRaised(v1::FaultRaised {
            fault_id: "f-1".into(),
            code: v1::FaultCode::SafetyChainOpen as i32,
            vendor_code: "SC".into(),
            blocking: true,
            description: String::new(),
        })),
    });
    let trapped = v1::envelope::Body::Event(v1::Event {
        kind: Some(v1::event::Kind::EntrapmentStarted(v1::EntrapmentStarted {
            entrapment_id: "t-1".into(),
            floor: 4,
        })),
    });
    // Sent out of order (3 before 2): the state still folds them in sequence order.
    for (seq, body, topic) in [
        (1, telemetry_body, "telemetry"),
        (3, trapped, "event"),
        (2, fault, "event"),
    ] {
        client
            .publish(
                format!("lw/v1/mc-larvotto/elev-1/up/{topic}"),
                rumqttc::QoS::AtLeastOnce,
                false,
                envelope(seq, body),
            )
            .await
            .unwrap();
    }

    let http = reqwest::Client::new();
    let get = |token: String| {
        let request = http
            .get(format!("{base}/api/v1/buildings/mc-larvotto/live"))
            .bearer_auth(token);
        async move { request.send().await.unwrap() }
    };
    let manager = mint(
        &auth,
        "alice",
        Role::Manager,
        &["mc-larvotto".into()],
        Duration::from_secs(60),
    )
    .unwrap();
    eventually(
        "the entrapment shows in the live state",
        Duration::from_secs(20),
        || {
            let response = get(manager.clone());
            async move {
                let live: BuildingLive = response.await.json().await.unwrap();
                live.elevators.first().is_some_and(|e| e.entrapment)
            }
        },
    )
    .await;
    let live: BuildingLive = get(manager.clone()).await.json().await.unwrap();
    let elevator = &live.elevators[0];
    assert_eq!(
        (
            elevator.device_id.as_str(),
            elevator.floor,
            elevator.in_service
        ),
        ("elev-1", 4, false)
    );
    assert_eq!(elevator.open_faults.len(), 1);
    assert_eq!(elevator.open_faults[0].code, "FAULT_CODE_SAFETY_CHAIN_OPEN");

    // The live stream: a change made by the device reaches the open stream.
    let mut stream = http
        .get(format!("{base}/api/v1/buildings/mc-larvotto/live/stream"))
        .bearer_auth(manager.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 200);
    assert_eq!(stream.headers()["content-type"], "text/event-stream");
    let moved = v1::envelope::Body::Telemetry(v1::Telemetry {
        mode: v1::OperatingMode::Normal as i32,
        floor: 7,
        ..Default::default()
    });
    client
        .publish(
            "lw/v1/mc-larvotto/elev-1/up/telemetry",
            rumqttc::QoS::AtLeastOnce,
            false,
            envelope(4, moved),
        )
        .await
        .unwrap();
    let mut received = String::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !received.contains("\"floor\":7") {
        let chunk = tokio::time::timeout_at(deadline, stream.chunk())
            .await
            .expect("a live event in time")
            .unwrap()
            .expect("stream open");
        received.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(received.contains("event: elevator"), "{received}");
    assert!(received.contains("\"device_id\":\"elev-1\""), "{received}");
    drop(stream);

    // A manager of another building gets nothing, whatever id they try.
    let other = mint(
        &auth,
        "bob",
        Role::Manager,
        &["mc-fontvieille".into()],
        Duration::from_secs(60),
    )
    .unwrap();
    assert_eq!(get(other.clone()).await.status(), 403);
    let stream = http
        .get(format!("{base}/api/v1/buildings/mc-larvotto/live/stream"))
        .bearer_auth(other.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), 403, "nor a stream of it");
    let bad = http
        .get(format!("{base}/api/v1/buildings/mc.larvotto/live"))
        .bearer_auth(other)
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let admin = mint(&auth, "root", Role::Admin, &[], Duration::from_secs(60)).unwrap();
    assert_eq!(get(admin).await.status(), 200);

    stop.cancel();
    api.await.unwrap().unwrap();
    gw.running.stop().await;
    ingest.stop().await;
    mqtt.abort();
}
