//! Network chaos from the simulator against the real chain (gateway → JetStream → telemetry →
//! PostgreSQL): a partitioned device replays its backlog, a misbehaving device is dead-lettered
//! without hurting the others, a connect storm loses nothing.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use liftwire_firmware_sim::device::{Chaos, RunSettings, Target};
use liftwire_firmware_sim::run::run_fleet_with_chaos;
use liftwire_firmware_sim::{FleetConfig, Scenario, TrafficProfile};
use liftwire_gateway::{Config as GatewayConfig, Gateway, MqttConfig};
use liftwire_proto::naming::{DeviceId, DEAD_LETTER_STREAM};
use liftwire_proto::{v1, Message};
use liftwire_runtime::database::DatabaseConfig;
use liftwire_runtime::nats::NatsConfig;
use liftwire_runtime::service::{BuildContext, Service};
use liftwire_telemetry::ingest::{Ingest, IngestConfig};
use liftwire_testkit::{Nats, Postgres};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread")]
async fn partition_misbehaviour_and_connect_storm_lose_nothing() {
    let nats = Nats::start().unwrap();
    let pg = Postgres::start().await.unwrap();
    let registry_url = pg.create_database("registry").await.unwrap();
    liftwire_gateway::registry::migrate(&sqlx::PgPool::connect(&registry_url).await.unwrap())
        .await
        .unwrap();
    let pool = DatabaseConfig {
        url: pg.url(),
        ..Default::default()
    }
    .pool()
    .unwrap();
    liftwire_telemetry::migrate(&pool).await.unwrap();
    let nats_config = NatsConfig {
        url: nats.url(),
        ..Default::default()
    };
    let stop = CancellationToken::new();
    let ingest = Ingest::build(
        IngestConfig {
            batch_wait: Duration::from_millis(20),
            ..Default::default()
        },
        &nats_config,
        nats.client().await.unwrap(),
        pool.clone(),
        &BuildContext::new(),
    )
    .await
    .unwrap();
    let ingest = tokio::spawn(ingest.run(stop.clone()));
    let config = GatewayConfig {
        nats: nats_config,
        database: DatabaseConfig {
            url: registry_url.clone(),
            ..Default::default()
        },
        mqtt: MqttConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            ..Default::default()
        },
        ..Default::default()
    };
    let ctx = BuildContext::new();
    let gateway = Gateway::build(config, &ctx).await.unwrap();
    let addr = gateway.mqtt_addr();
    let gateway = tokio::spawn(gateway.run(stop.clone()));
    while !ctx.readiness.not_ready().is_empty() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let client = nats.client().await.unwrap();
    let mut presence = client
        .subscribe("lw.v1.presence.sim-b01.sim-b01-e01")
        .await
        .unwrap();
    client.flush().await.unwrap();

    let data_dir = tempfile::tempdir().unwrap();
    let fleet = FleetConfig {
        seed: 21,
        buildings: 1,
        elevators_per_building: 3,
        profile: TrafficProfile::OfficeMorningPeak,
        screens: false,
        ..Default::default()
    };
    let settings = RunSettings {
        host: addr.ip().to_string(),
        port: addr.port(),
        keep_alive: Duration::from_secs(5),
        data_dir: data_dir.path().to_owned(),
        speed: 60.0,
        resend_per_second: 40,
        min_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(400),
    };
    let (chaos, chaos_rx) = tokio::sync::broadcast::channel(16);
    let fleet_stop = CancellationToken::new();
    let run = |fleet: FleetConfig, settings: RunSettings, chaos_rx, stop: CancellationToken| {
        let url = registry_url.clone();
        tokio::spawn(async move {
            run_fleet_with_chaos(&fleet, settings, Some(&url), chaos_rx, stop)
                .await
                .unwrap()
        })
    };
    let fleet_run = run(
        fleet.clone(),
        settings.clone(),
        chaos_rx,
        fleet_stop.clone(),
    );
    let online = |p: &async_nats::Message| v1::Presence::decode(p.payload.as_ref()).unwrap();
    let first = online(
        &tokio::time::timeout(Duration::from_secs(20), presence.next())
            .await
            .unwrap()
            .unwrap(),
    );
    assert_eq!(first.state(), v1::PresenceState::Online);
    tokio::time::sleep(Duration::from_secs(1)).await;

    let e01 = DeviceId::new("sim-b01-e01").unwrap();
    let e02 = DeviceId::new("sim-b01-e02").unwrap();
    chaos
        .send((
            Target::Device(e01),
            Chaos::Partition(Duration::from_millis(1500)),
        ))
        .unwrap();
    let lost = online(
        &tokio::time::timeout(Duration::from_secs(20), presence.next())
            .await
            .unwrap()
            .unwrap(),
    );
    assert_eq!(
        (lost.state(), lost.reason()),
        (
            v1::PresenceState::Offline,
            v1::DisconnectReason::ConnectionLost
        )
    );
    let back = online(
        &tokio::time::timeout(Duration::from_secs(20), presence.next())
            .await
            .unwrap()
            .unwrap(),
    );
    assert_eq!(
        back.state(),
        v1::PresenceState::Online,
        "reconnected after the partition"
    );

    chaos.send((Target::Device(e02), Chaos::Misbehave)).unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    chaos.send((Target::All, Chaos::Reconnect)).unwrap();
    // A model scenario injected into the running fleet (what `run --scenario` does).
    for command in Scenario::Entrapment.commands(&fleet).unwrap() {
        chaos.send(command).unwrap();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Freeze time and let every outbox drain: the database must hold 1..=N for every device.
    fleet_stop.cancel();
    let outboxes = fleet_run.await.unwrap();
    let produced: i64 = outboxes.iter().map(|o| o.next_seq() as i64 - 1).sum();
    let (_chaos, chaos_rx) = tokio::sync::broadcast::channel(1);
    let fleet_stop = CancellationToken::new();
    let fleet_run = run(
        fleet,
        RunSettings {
            speed: 0.0,
            ..settings
        },
        chaos_rx,
        fleet_stop.clone(),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM device_messages")
            .fetch_one(&pool)
            .await
            .unwrap();
        if stored == produced {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{stored} of {produced} stored"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    fleet_stop.cancel();
    fleet_run.await.unwrap();
    let per_device: Vec<(String, i64, i64, i64)> = sqlx::query_as("SELECT device_id, min(seq), max(seq), count(*) FROM device_messages GROUP BY device_id ORDER BY device_id").fetch_all(&pool).await.unwrap();
    assert_eq!(per_device.len(), 3, "{per_device:?}");
    for (device, min, max, count) in per_device {
        assert_eq!((min, count), (1, max), "{device}: 1..={max} exactly once");
    }

    // The entrapment reached the database.
    let payloads: Vec<Vec<u8>> = sqlx::query_scalar(
        "SELECT payload FROM device_messages WHERE device_id = 'sim-b01-e01' AND kind = 'event'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    let trapped = payloads.iter().any(|p| {
        matches!(
            v1::Envelope::decode(p.as_slice()).unwrap().body,
            Some(v1::envelope::Body::Event(v1::Event {
                kind: Some(v1::event::Kind::EntrapmentStarted(_))
            }))
        )
    });
    assert!(trapped, "the entrapment was stored");

    // The misbehaving device's garbage is in the dead-letter stream with reasons.
    let js = jetstream::new(client);
    let dlq = js.get_stream(DEAD_LETTER_STREAM.name).await.unwrap();
    let consumer = dlq
        .create_consumer(jetstream::consumer::pull::Config::default())
        .await
        .unwrap();
    let mut letters = consumer
        .fetch()
        .max_messages(20)
        .expires(Duration::from_secs(1))
        .messages()
        .await
        .unwrap();
    let mut reasons = Vec::new();
    while let Some(letter) = letters.next().await {
        let letter = v1::DeadLetter::decode(letter.unwrap().payload.as_ref()).unwrap();
        assert_eq!(letter.device_id, "sim-b01-e02");
        reasons.push(letter.reason);
    }
    reasons.sort();
    assert_eq!(reasons, ["decode", "device_mismatch"]);

    stop.cancel();
    gateway.await.unwrap().unwrap();
    ingest.await.unwrap().unwrap();
}
