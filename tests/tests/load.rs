//! The simulator's load mode against a real gateway: everything sent arrives on NATS, once.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{gateway, registry_database};
use liftwire_firmware_sim::load::{device_id, run, LoadConfig};
use liftwire_gateway::acl::DeviceKind;
use liftwire_proto::naming::{BuildingId, DeviceId};
use liftwire_testkit::{Nats, Postgres};

#[tokio::test(flavor = "multi_thread")]
async fn load_mode_counts_every_message_end_to_end() {
    let nats = Nats::start().unwrap();
    let pg = Postgres::start().await.unwrap();
    let gw = gateway(
        &nats,
        &registry_database(&pg).await,
        "127.0.0.1:0".parse().unwrap(),
    )
    .await;
    let (addr, registry) = (gw.addr, gw.registry.clone());
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
    gw.running.stop().await;
}
