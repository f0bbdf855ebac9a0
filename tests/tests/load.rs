//! The simulator's load mode against a real gateway: everything sent arrives on NATS, once.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{gateway, registry_database};
use liftwire_firmware_sim::load::{device_id, run, LoadConfig, Observe, Observer, Publisher};
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
    // One building per QoS: the second run's sequence numbers start at 1 again, and JetStream
    // would rightly drop them as duplicates of the first run's.
    let mut secrets = HashMap::new();
    for building in ["load0", "load1"] {
        for d in 1..=20 {
            let id = device_id(building, d);
            let secret = registry
                .provision(
                    &BuildingId::new(building).unwrap(),
                    &DeviceId::new(id.clone()).unwrap(),
                    DeviceKind::Elevator,
                )
                .await
                .unwrap();
            secrets.insert(id, secret);
        }
    }
    for qos in [0, 1] {
        let building = format!("load{qos}");
        let report = run(
            LoadConfig {
                publisher: Publisher::Mqtt {
                    host: addr.ip().to_string(),
                    port: addr.port(),
                    secrets: Some(secrets.clone()),
                },
                observers: vec![
                    Observer::gateway_subjects(&nats.url(), &building),
                    Observer {
                        name: "jetstream".into(),
                        at: Observe::JetStream {
                            url: nats.url(),
                            stream: "LW_UPLINK".into(),
                            subject: format!("lw.v1.up.{building}.*.telemetry"),
                        },
                    },
                ],
                devices: 20,
                rate: 400,
                qos,
                payload_bytes: 200,
                duration: Duration::from_secs(2),
                warmup: Duration::from_millis(500),
                building: building.clone(),
                connect_timeout: Duration::from_secs(10),
                drain: Duration::from_secs(5),
                seq_base: 0,
            },
            |_| {},
        )
        .await
        .unwrap();
        // 400/s for 2 s, evenly spread: 800 messages, each seen once on NATS and in JetStream.
        assert_eq!(report.sent, 800, "{report:?}");
        assert_eq!(report.tiers.len(), 2);
        for tier in &report.tiers {
            assert_eq!(
                (tier.received, tier.lost, tier.duplicates),
                (800, 0, 0),
                "{report:?}"
            );
            assert!(tier.latency.p50_ms > 0.0 && tier.latency.p99_ms >= tier.latency.p50_ms);
        }
        if qos == 1 {
            assert_eq!(report.acked, report.sent, "{report:?}");
            let acks = report.ack_latency.unwrap();
            assert!(
                acks.p50_ms > 0.0 && acks.p99_ms >= acks.p50_ms,
                "{report:?}"
            );
        } else {
            assert!(report.ack_latency.is_none());
        }
        assert!(report
            .table()
            .contains(&format!("| 20 | 400 | {qos} | 200 | 800 |")));
    }
    gw.running.stop().await;
}
