//! Network chaos from the simulator against the real chain (gateway → JetStream → telemetry →
//! PostgreSQL): a partitioned device replays its backlog, a misbehaving device is dead-lettered
//! without hurting the others, a connect storm loses nothing.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use async_nats::jetstream;
use common::{assert_every_sequence_once, eventually, sim_settings, stack, stored, Stack};
use futures::StreamExt;
use liftwire_firmware_sim::device::{Chaos, RunSettings, Target};
use liftwire_firmware_sim::run::run_fleet_with_chaos;
use liftwire_firmware_sim::{FleetConfig, Scenario, TrafficProfile};
use liftwire_proto::naming::{DeviceId, DEAD_LETTER_STREAM};
use liftwire_proto::{v1, Message};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread")]
async fn partition_misbehaviour_and_connect_storm_lose_nothing() {
    let Stack {
        nats,
        pg: _pg,
        registry_url,
        pool,
        ingest,
        gw,
    } = stack().await;
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
    let settings = sim_settings(gw.addr, data_dir.path(), 60.0);
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
    // Reported lost (not gracefully gone), then back once the partition heals.
    let mut states = Vec::new();
    while !states.contains(&(v1::PresenceState::Online, true)) {
        let p = online(
            &tokio::time::timeout(Duration::from_secs(20), presence.next())
                .await
                .expect("presence after the partition")
                .unwrap(),
        );
        let lost_before = states.iter().any(|(s, _)| *s == v1::PresenceState::Offline);
        if p.state() == v1::PresenceState::Offline {
            assert_eq!(
                p.reason(),
                v1::DisconnectReason::ConnectionLost,
                "a partition is not a graceful disconnect"
            );
        }
        states.push((p.state(), lost_before));
    }
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
    eventually(
        "everything produced is stored",
        Duration::from_secs(60),
        || async { stored(&pool).await == produced },
    )
    .await;
    fleet_stop.cancel();
    fleet_run.await.unwrap();
    assert_every_sequence_once(&pool, 3).await;

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
    let metrics = gw.metrics();
    assert_eq!(reasons, ["decode", "device_mismatch"], "{metrics}");
    // The oversized publish and the foreign topic each cost it a connection, counted once.
    for counted in [
        "liftwire_gateway_packet_errors_total{reason=\"too_large\"} 1",
        "liftwire_gateway_acl_violations_total{reason=\"foreign_topic\"} 1",
    ] {
        assert!(metrics.contains(counted), "{counted} in\n{metrics}");
    }

    gw.running.stop().await;
    ingest.stop().await;
}
