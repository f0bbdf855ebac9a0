//! Pieces of the backbone started in-process for cross-component tests.

#![allow(clippy::unwrap_used, dead_code)]

pub mod sim;

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use liftwire_firmware_sim::device::RunSettings;
use liftwire_gateway::{Config as GatewayConfig, Gateway, MqttConfig};
use liftwire_runtime::database::DatabaseConfig;
use liftwire_runtime::nats::NatsConfig;
use liftwire_runtime::service::{BuildContext, Service};
use liftwire_telemetry::ingest::IngestConfig;
use liftwire_testkit::{Nats, Postgres};
use tokio_util::sync::CancellationToken;

/// A component running in a task, stopped by its token.
pub struct Running {
    pub stop: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
}

impl Running {
    pub async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap();
    }
}

/// A gateway on `listen` (port 0: a free one) with its registry in `registry_url`.
pub struct RunningGateway {
    pub addr: SocketAddr,
    pub ctx: BuildContext,
    pub registry: std::sync::Arc<liftwire_gateway::registry::Registry>,
    pub running: Running,
}

impl RunningGateway {
    /// The gateway's metrics in Prometheus text format.
    pub fn metrics(&self) -> String {
        self.ctx.admin_state().metrics_text().unwrap()
    }
}

pub async fn gateway(nats: &Nats, registry_url: &str, listen: SocketAddr) -> RunningGateway {
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
    let registry = gateway.registry();
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { gateway.run(stop).await.unwrap() }
    });
    let readiness = ctx.readiness.clone();
    eventually("the gateway is ready", Duration::from_secs(20), || {
        let readiness = readiness.clone();
        async move { readiness.not_ready().is_empty() }
    })
    .await;
    RunningGateway {
        addr,
        ctx,
        registry,
        running: Running { stop, task },
    }
}

/// The backbone's servers (nats-server, PostgreSQL) with the telemetry service and a gateway on
/// a free port. Keep `nats` and `pg` bound (`nats: _nats`, not `..`): dropped, they stop.
pub struct Stack {
    pub nats: Nats,
    pub pg: Postgres,
    pub registry_url: String,
    /// Telemetry's database.
    pub pool: sqlx::PgPool,
    /// The telemetry service.
    pub ingest: Running,
    pub gw: RunningGateway,
}

pub async fn stack() -> Stack {
    let nats = Nats::start().unwrap();
    let pg = Postgres::start().await.unwrap();
    let registry_url = registry_database(&pg).await;
    let (pool, ingest) = telemetry(&nats, &pg).await;
    let gw = gateway(&nats, &registry_url, "127.0.0.1:0".parse().unwrap()).await;
    Stack {
        nats,
        pg,
        registry_url,
        pool,
        ingest,
        gw,
    }
}

/// Provisions elevator `device` of `building` and connects it to `gw` with rumqttc; returns the
/// client and its event loop's task (it ends with the connection).
pub async fn mqtt_elevator(
    gw: &RunningGateway,
    building: &str,
    device: &str,
) -> (rumqttc::AsyncClient, tokio::task::JoinHandle<()>) {
    let secret = gw
        .registry
        .provision(
            &liftwire_proto::naming::BuildingId::new(building).unwrap(),
            &liftwire_proto::naming::DeviceId::new(device).unwrap(),
            liftwire_gateway::acl::DeviceKind::Elevator,
        )
        .await
        .unwrap();
    let mut options = rumqttc::MqttOptions::new(device, gw.addr.ip().to_string(), gw.addr.port());
    options.set_credentials(device, secret);
    let (client, mut eventloop) = rumqttc::AsyncClient::new(options, 8);
    let task = tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    (client, task)
}

/// A migrated registry database on `pg`; returns its URL.
pub async fn registry_database(pg: &Postgres) -> String {
    let url = pg.create_database("registry").await.unwrap();
    liftwire_gateway::registry::migrate(&sqlx::PgPool::connect(&url).await.unwrap())
        .await
        .unwrap();
    url
}

/// The telemetry service (ingest, queries, presence, alert rules) on `pg`'s main database
/// (migrated here).
pub async fn telemetry(nats: &Nats, pg: &Postgres) -> (sqlx::PgPool, Running) {
    let database = DatabaseConfig {
        url: pg.url(),
        ..Default::default()
    };
    let pool = database.pool().unwrap();
    liftwire_telemetry::migrate(&pool).await.unwrap();
    let config = liftwire_telemetry::Config {
        nats: NatsConfig {
            url: nats.url(),
            ..Default::default()
        },
        database,
        ingest: IngestConfig {
            batch_wait: Duration::from_millis(20),
            ..Default::default()
        },
        ..Default::default()
    };
    let service = liftwire_telemetry::Telemetry::build(config, &BuildContext::new())
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { service.run(stop).await.unwrap() }
    });
    (pool, Running { stop, task })
}

/// Simulator settings for a gateway at `addr`, with fast reconnects.
pub fn sim_settings(addr: SocketAddr, data_dir: &Path, speed: f64) -> RunSettings {
    RunSettings {
        host: addr.ip().to_string(),
        port: addr.port(),
        keep_alive: Duration::from_secs(5),
        data_dir: data_dir.to_owned(),
        speed,
        resend_per_second: 40,
        min_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(400),
    }
}

/// Polls `check` until it holds, failing the test after `limit`.
pub async fn eventually<F, Fut>(what: &str, limit: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Stored messages.
pub async fn stored(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM device_messages")
        .fetch_one(pool)
        .await
        .unwrap()
}

/// Asserts that each of `devices` devices stored exactly its sequence numbers 1..=N.
pub async fn assert_every_sequence_once(pool: &sqlx::PgPool, devices: usize) {
    let per_device: Vec<(String, i64, i64, i64)> = sqlx::query_as("SELECT device_id, min(seq), max(seq), count(*) FROM device_messages GROUP BY device_id ORDER BY device_id")
        .fetch_all(pool)
        .await
        .unwrap();
    assert_eq!(per_device.len(), devices, "{per_device:?}");
    for (device, min, max, count) in per_device {
        assert_eq!(
            (min, count),
            (1, max),
            "{device}: sequence numbers 1..={max} stored exactly once"
        );
    }
}
