//! The simulator's load mode against a real gateway: everything sent arrives on NATS, once.

#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::time::Duration;

use liftwire_firmware_sim::load::{device_id, run, LoadConfig};
use liftwire_gateway::acl::DeviceKind;
use liftwire_gateway::{Config as GatewayConfig, Gateway, MqttConfig};
use liftwire_proto::naming::{BuildingId, DeviceId};
use liftwire_runtime::database::DatabaseConfig;
use liftwire_runtime::nats::NatsConfig;
use liftwire_runtime::service::{BuildContext, Service};
use liftwire_testkit::{Nats, Postgres};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread")]
async fn load_mode_counts_every_message_end_to_end() {
    let nats = Nats::start().unwrap();
    let pg = Postgres::start().await.unwrap();
    liftwire_gateway::registry::migrate(&pg.pool().await.unwrap())
        .await
        .unwrap();
    let config = GatewayConfig {
        nats: NatsConfig {
            url: nats.url(),
            ..Default::default()
        },
        database: DatabaseConfig {
            url: pg.url(),
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
    let registry = gateway.registry();
    let stop = CancellationToken::new();
    let gateway = tokio::spawn(gateway.run(stop.clone()));
    while !ctx.readiness.not_ready().is_empty() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut secrets = HashMap::new();
    for d in 1..=20 {
        let id = device_id("load", d);
        let secret = registry
            .provision(
                &BuildingId::new("load").unwrap(),
                &DeviceId::new(id.clone()).unwrap(),
                DeviceKind::Elevator,
            )
            .await
            .unwrap();
        secrets.insert(id, secret);
    }
    for qos in [0, 1] {
        let report = run(
            LoadConfig {
                host: addr.ip().to_string(),
                port: addr.port(),
                nats_url: nats.url(),
                devices: 20,
                rate: 400,
                qos,
                payload_bytes: 200,
                duration: Duration::from_secs(2),
                ramp_up: Duration::from_millis(500),
                building: "load".into(),
                secrets: Some(secrets.clone()),
                drain: Duration::from_secs(2),
            },
            |_| {},
        )
        .await
        .unwrap();
        assert!(report.sent >= 400, "{report:?}");
        assert_eq!(
            (report.received, report.lost, report.duplicates),
            (report.sent, 0, 0),
            "{report:?}"
        );
        if qos == 1 {
            assert_eq!(report.acked, report.sent, "{report:?}");
        }
        assert!(report.p50_ms > 0.0 && report.p99_ms >= report.p50_ms);
        assert!(report
            .table()
            .contains(&format!("| 20 | 400 | {qos} | 200 |")));
    }
    stop.cancel();
    gateway.await.unwrap().unwrap();
}
