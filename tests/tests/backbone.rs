//! The backbone end to end: simulated elevator firmware → MQTT → gateway → JetStream →
//! telemetry → PostgreSQL, across a gateway restart and a simulator restart. Nothing a device
//! produced is lost, nothing is stored twice.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use liftwire_firmware_sim::device::RunSettings;
use liftwire_firmware_sim::run::run_fleet;
use liftwire_firmware_sim::{FleetConfig, TrafficProfile};
use liftwire_gateway::{Config as GatewayConfig, Gateway, MqttConfig};
use liftwire_runtime::database::DatabaseConfig;
use liftwire_runtime::nats::NatsConfig;
use liftwire_runtime::service::{BuildContext, Service};
use liftwire_telemetry::ingest::{Ingest, IngestConfig};
use liftwire_testkit::{Nats, Postgres};
use tokio_util::sync::CancellationToken;

struct Running {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap();
    }
}

async fn gateway(nats: &Nats, registry_url: &str, listen: SocketAddr) -> (SocketAddr, Running) {
    let config = GatewayConfig {
        nats: NatsConfig {
            url: nats.url(),
            ..Default::default()
        },
        database: DatabaseConfig {
            url: registry_url.into(),
            ..Default::default()
        },
        mqtt: MqttConfig {
            listen,
            ..Default::default()
        },
        gateway_id: "gw".into(),
        ..Default::default()
    };
    let ctx = BuildContext::new();
    let gateway = Gateway::build(config, &ctx).await.unwrap();
    let addr = gateway.mqtt_addr();
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { gateway.run(stop).await.unwrap() }
    });
    while !ctx.readiness.not_ready().is_empty() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (addr, Running { stop, task })
}

async fn telemetry(nats: &Nats, url: &str) -> Running {
    let pool = DatabaseConfig {
        url: url.into(),
        ..Default::default()
    }
    .pool()
    .unwrap();
    liftwire_telemetry::migrate(&pool).await.unwrap();
    let nats_config = NatsConfig {
        url: nats.url(),
        ..Default::default()
    };
    let config = IngestConfig {
        batch_wait: Duration::from_millis(20),
        ..Default::default()
    };
    let ingest = Ingest::build(
        config,
        &nats_config,
        nats.client().await.unwrap(),
        pool,
        &BuildContext::new(),
    )
    .await
    .unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { ingest.run(stop).await.unwrap() }
    });
    Running { stop, task }
}

fn fleet_task(
    fleet: FleetConfig,
    settings: RunSettings,
    registry: Option<String>,
) -> (
    CancellationToken,
    tokio::task::JoinHandle<Vec<liftwire_firmware_sim::outbox::Outbox>>,
) {
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

#[tokio::test(flavor = "multi_thread")]
async fn simulated_devices_lose_nothing_across_gateway_and_simulator_restarts() {
    let nats = Nats::start().unwrap();
    let pg = Postgres::start().await.unwrap();
    let registry_url = pg.create_database("registry").await.unwrap();
    let registry_pool = sqlx::PgPool::connect(&registry_url).await.unwrap();
    liftwire_gateway::registry::migrate(&registry_pool)
        .await
        .unwrap();
    let ingest = telemetry(&nats, &pg.url()).await;
    let (addr, gw) = gateway(&nats, &registry_url, "127.0.0.1:0".parse().unwrap()).await;

    let data_dir = tempfile::tempdir().unwrap();
    let fleet = FleetConfig {
        seed: 11,
        buildings: 1,
        elevators_per_building: 3,
        profile: TrafficProfile::OfficeMorningPeak,
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
    let (stop_fleet, fleet_run) =
        fleet_task(fleet.clone(), settings.clone(), Some(registry_url.clone()));

    let db = pg.pool().await.unwrap();
    let rows = |db: sqlx::PgPool| async move {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM device_messages")
            .fetch_one(&db)
            .await
            .unwrap()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while rows(db.clone()).await < 30 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "messages never reached telemetry"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The gateway goes away while devices keep producing into their outboxes, then comes back
    // on the same address.
    gw.stop().await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    let (_, gw) = gateway(&nats, &registry_url, addr).await;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // The simulator stops (its outboxes stay on disk), then restarts with time frozen: it only
    // resends what is unconfirmed.
    stop_fleet.cancel();
    let outboxes = fleet_run.await.unwrap();
    let produced: u64 = outboxes.iter().map(|o| o.next_seq() - 1).sum();
    assert!(produced > 60, "the fleet produced {produced} messages");
    let (stop_fleet, fleet_run) = fleet_task(
        fleet,
        RunSettings {
            speed: 0.0,
            ..settings
        },
        None,
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while rows(db.clone()).await < produced as i64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {produced} messages stored",
            rows(db.clone()).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Give the last watermarks time to arrive, then check the outboxes are drained.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let watermarks: i64 = sqlx::query_scalar(
            "SELECT coalesce(sum(persisted_seq), 0)::int8 FROM device_watermarks",
        )
        .fetch_one(&db)
        .await
        .unwrap();
        if watermarks == produced as i64 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "watermarks stuck at {watermarks} of {produced}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_fleet.cancel();
    let outboxes = fleet_run.await.unwrap();
    assert!(
        outboxes.iter().all(|o| o.is_empty()),
        "every outbox confirmed: {:?}",
        outboxes.iter().map(|o| o.len()).collect::<Vec<_>>()
    );

    // Exactly 1..=N for every device: no gap, and the primary key rules out duplicates.
    let per_device: Vec<(String, i64, i64, i64)> = sqlx::query_as("SELECT device_id, min(seq), max(seq), count(*) FROM device_messages GROUP BY device_id ORDER BY device_id").fetch_all(&db).await.unwrap();
    assert_eq!(per_device.len(), 3);
    for (device, min, max, count) in per_device {
        assert_eq!(
            (min, count),
            (1, max),
            "{device}: sequence numbers 1..={max} stored exactly once"
        );
    }
    gw.stop().await;
    ingest.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_nats_restart_loses_nothing_from_qos1_devices() {
    let mut nats = Nats::start().unwrap();
    let pg = Postgres::start().await.unwrap();
    let registry_url = pg.create_database("registry").await.unwrap();
    let registry_pool = sqlx::PgPool::connect(&registry_url).await.unwrap();
    liftwire_gateway::registry::migrate(&registry_pool)
        .await
        .unwrap();
    let ingest = telemetry(&nats, &pg.url()).await;
    let (addr, gw) = gateway(&nats, &registry_url, "127.0.0.1:0".parse().unwrap()).await;

    let data_dir = tempfile::tempdir().unwrap();
    let fleet = FleetConfig {
        seed: 5,
        buildings: 1,
        elevators_per_building: 2,
        profile: TrafficProfile::OfficeMorningPeak,
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
    let (stop_fleet, fleet_run) =
        fleet_task(fleet.clone(), settings.clone(), Some(registry_url.clone()));
    let db = pg.pool().await.unwrap();
    let rows = |db: sqlx::PgPool| async move {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM device_messages")
            .fetch_one(&db)
            .await
            .unwrap()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while rows(db.clone()).await < 20 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "messages never reached telemetry"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // NATS goes down while devices publish; the gateway keeps accepting into its bounded queue
    // and retries with the same message ids; devices keep everything in their outboxes.
    nats.stop();
    tokio::time::sleep(Duration::from_secs(1)).await;
    nats.restart().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;

    stop_fleet.cancel();
    let outboxes = fleet_run.await.unwrap();
    let produced: u64 = outboxes.iter().map(|o| o.next_seq() - 1).sum();
    let (stop_fleet, fleet_run) = fleet_task(
        fleet,
        RunSettings {
            speed: 0.0,
            ..settings
        },
        None,
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    while rows(db.clone()).await < produced as i64 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {produced} messages stored",
            rows(db.clone()).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop_fleet.cancel();
    fleet_run.await.unwrap();
    let per_device: Vec<(String, i64, i64, i64)> = sqlx::query_as("SELECT device_id, min(seq), max(seq), count(*) FROM device_messages GROUP BY device_id ORDER BY device_id").fetch_all(&db).await.unwrap();
    assert_eq!(per_device.len(), 2);
    for (device, min, max, count) in per_device {
        assert_eq!(
            (min, count),
            (1, max),
            "{device}: sequence numbers 1..={max} stored exactly once"
        );
    }
    gw.stop().await;
    ingest.stop().await;
}
