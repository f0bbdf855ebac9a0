//! The embedded broker's router (patched rumqttd) against its memory: what it keeps for a
//! subscription filter lives only as long as somebody subscribes to it.

#![allow(clippy::unwrap_used)]

use std::time::Duration;

use rumqttd::local::LinkBuilder;
use rumqttd::meters::MetersLink;
use rumqttd::{Event, Meter, Router, RouterConfig};

const FILTER: &str = "lw/v1/b1/elev-1/down/+";
const TOPIC: &str = "lw/v1/b1/elev-1/down/watermark";

/// How many messages the router appended to [`FILTER`]'s log since the last report (None:
/// none); `report` asks the router for its meters.
async fn appended(report: &dyn Fn(), meters: &MetersLink) -> Option<usize> {
    report();
    // Meters are sent only when something happened; every step below publishes, so a report
    // always comes (the router counts the publishes).
    let reported = tokio::time::timeout(Duration::from_secs(5), meters.next())
        .await
        .expect("a meter report")
        .unwrap();
    reported.into_iter().find_map(|meter| match meter {
        Meter::Subscription(filter, meter) if filter == FILTER => Some(meter.count),
        _ => None,
    })
}

#[tokio::test]
async fn downlink_for_a_device_that_left_is_not_kept_by_the_router() {
    let config = RouterConfig {
        max_connections: 10,
        max_outgoing_packet_count: 200,
        max_segment_size: 1024 * 1024,
        max_segment_count: 2,
        ..Default::default()
    };
    let router_tx = Router::new(0, config).spawn();
    let meters = MetersLink::new(router_tx.clone()).unwrap();
    let report = || router_tx.send((0, Event::SendMeters)).unwrap();
    let (mut device_tx, device_rx, _) = LinkBuilder::new("elev-1", router_tx.clone())
        .build()
        .unwrap();
    device_tx.subscribe(FILTER).unwrap();
    let (mut bridge_tx, _bridge_rx, _) = LinkBuilder::new("bridge", router_tx.clone())
        .build()
        .unwrap();

    for _ in 0..3 {
        bridge_tx.publish(TOPIC, vec![1u8; 16]).unwrap();
    }
    assert_eq!(
        appended(&report, &meters).await,
        Some(3),
        "kept for the subscriber"
    );

    // The device goes away; downlink for it keeps coming (every replica gets all of it).
    router_tx.send((device_rx.id(), Event::Disconnect)).unwrap();
    for _ in 0..3 {
        bridge_tx.publish(TOPIC, vec![2u8; 16]).unwrap();
    }
    assert_eq!(appended(&report, &meters).await, None, "kept for nobody");
}
