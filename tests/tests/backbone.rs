//! The backbone end to end: simulated elevator firmware → MQTT → gateway → JetStream →
//! telemetry → PostgreSQL, across gateway, simulator and NATS restarts. Nothing a device
//! produced is lost, nothing is stored twice.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::{assert_every_sequence_once, eventually, gateway, sim_settings, stack, stored, Stack};
use liftwire_firmware_sim::device::RunSettings;
use liftwire_firmware_sim::outbox::Outbox;
use liftwire_firmware_sim::run::run_fleet;
use liftwire_firmware_sim::{FleetConfig, TrafficProfile};
use tokio_util::sync::CancellationToken;

fn fleet_task(
    fleet: FleetConfig,
    settings: RunSettings,
    registry: Option<String>,
) -> (CancellationToken, tokio::task::JoinHandle<Vec<Outbox>>) {
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move {
            run_fleet(&fleet, settings, registry.as_deref(), stop)
                .await
                .unwrap()
        }
    });
    (stop, task)
}

/// Starts `fleet` and waits (at most `within`) until telemetry has stored `at_least` messages.
async fn fleet_storing(
    fleet: FleetConfig,
    settings: &RunSettings,
    registry_url: &str,
    pool: &sqlx::PgPool,
    at_least: i64,
    within: Duration,
) -> (CancellationToken, tokio::task::JoinHandle<Vec<Outbox>>) {
    let running = fleet_task(fleet, settings.clone(), Some(registry_url.to_owned()));
    eventually(&format!("{at_least} messages stored"), within, || async {
        stored(pool).await >= at_least
    })
    .await;
    running
}

/// Stops the fleet, restarts it with time frozen (it only resends what is unconfirmed), and
/// waits until everything it produced is stored and confirmed.
async fn drain(
    fleet: FleetConfig,
    settings: RunSettings,
    stop: CancellationToken,
    run: tokio::task::JoinHandle<Vec<Outbox>>,
    pool: &sqlx::PgPool,
) {
    stop.cancel();
    let produced: i64 = run
        .await
        .unwrap()
        .iter()
        .map(|o| o.next_seq() as i64 - 1)
        .sum();
    assert!(produced > 40, "the fleet produced {produced} messages");
    let (stop, run) = fleet_task(
        fleet,
        RunSettings {
            speed: 0.0,
            ..settings
        },
        None,
    );
    eventually(
        "everything produced is stored",
        Duration::from_secs(90),
        || async { stored(pool).await == produced },
    )
    .await;
    eventually(
        "every watermark is final",
        Duration::from_secs(30),
        || async {
            let watermarks: i64 = sqlx::query_scalar(
                "SELECT coalesce(sum(persisted_seq), 0)::int8 FROM device_watermarks",
            )
            .fetch_one(pool)
            .await
            .unwrap();
            watermarks == produced
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    let outboxes = run.await.unwrap();
    assert!(
        outboxes.iter().all(Outbox::is_empty),
        "every outbox confirmed: {:?}",
        outboxes.iter().map(Outbox::len).collect::<Vec<_>>()
    );
}

fn fleet(seed: u64, elevators: u32) -> FleetConfig {
    FleetConfig {
        seed,
        buildings: 1,
        elevators_per_building: elevators,
        profile: TrafficProfile::OfficeMorningPeak,
        screens: false,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn simulated_devices_lose_nothing_across_gateway_and_simulator_restarts() {
    let Stack {
        nats,
        pg: _pg,
        registry_url,
        pool,
        ingest,
        gw,
    } = stack().await;
    let addr = gw.addr;

    let data_dir = tempfile::tempdir().unwrap();
    let settings = sim_settings(addr, data_dir.path(), 60.0);
    let (stop, run) = fleet_storing(
        fleet(11, 3),
        &settings,
        &registry_url,
        &pool,
        30,
        Duration::from_secs(30),
    )
    .await;

    // The gateway goes away while devices keep producing into their outboxes, then comes back
    // on the same address.
    gw.running.stop().await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let gw = gateway(&nats, &registry_url, addr).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    drain(fleet(11, 3), settings, stop, run, &pool).await;
    assert_every_sequence_once(&pool, 3).await;
    gw.running.stop().await;
    ingest.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_device_whose_numbering_restarts_continues_above_its_watermark() {
    // A controller board replaced, or its flash wiped: the device numbers from 1 again while
    // the backend holds its earlier numbers. Its new messages must not be taken for duplicates.
    let Stack {
        nats: _nats,
        pg: _pg,
        registry_url,
        pool,
        ingest,
        gw,
    } = stack().await;
    let data_dir = tempfile::tempdir().unwrap();
    let settings = sim_settings(gw.addr, data_dir.path(), 60.0);
    let (stop, run) = fleet_storing(
        fleet(12, 1),
        &settings,
        &registry_url,
        &pool,
        45,
        Duration::from_secs(60),
    )
    .await;
    drain(fleet(12, 1), settings.clone(), stop, run, &pool).await;
    let before = stored(&pool).await;

    std::fs::remove_dir_all(data_dir.path().join("outbox")).unwrap();
    let (stop, run) = fleet_storing(
        fleet(12, 1),
        &settings,
        &registry_url,
        &pool,
        before + 20,
        Duration::from_secs(60),
    )
    .await;
    drain(fleet(12, 1), settings, stop, run, &pool).await;
    assert_every_sequence_once(&pool, 1).await;
    gw.running.stop().await;
    ingest.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_nats_restart_loses_nothing_from_qos1_devices() {
    let Stack {
        mut nats,
        pg: _pg,
        registry_url,
        pool,
        ingest,
        gw,
    } = stack().await;

    let data_dir = tempfile::tempdir().unwrap();
    let settings = sim_settings(gw.addr, data_dir.path(), 60.0);
    let (stop, run) = fleet_storing(
        fleet(5, 2),
        &settings,
        &registry_url,
        &pool,
        20,
        Duration::from_secs(30),
    )
    .await;

    // NATS goes down while devices publish; the gateway keeps accepting into its bounded queue
    // and retries with the same message ids; devices keep everything in their outboxes.
    nats.stop();
    tokio::time::sleep(Duration::from_secs(1)).await;
    nats.restart().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;

    drain(fleet(5, 2), settings, stop, run, &pool).await;
    assert_every_sequence_once(&pool, 2).await;
    gw.running.stop().await;
    ingest.stop().await;
}
