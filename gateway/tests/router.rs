//! The embedded broker's router (patched rumqttd) against its memory: what it keeps for a
//! subscription filter lives only as long as somebody subscribes to it. And its filter index
//! against MQTT's matching rules.

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

mod filter_index {
    use proptest::prelude::*;
    use rumqttd::protocol::matches;
    use rumqttd::FilterIndex;

    /// A topic level: plain, empty, `$`-led, or a `#` (which topics may not hold, but the rules
    /// say what happens then).
    fn topic_level() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => prop::sample::select(vec!["lw", "v1", "b1", "elev-1", "down", "watermark"]),
            1 => Just(""),
            1 => Just("$sys"),
            1 => Just("#"),
        ]
        .prop_map(str::to_owned)
    }

    /// A valid filter: plain levels and `+`, and possibly a `#` as the last level.
    fn filter() -> impl Strategy<Value = String> {
        let level = prop_oneof![
            3 => topic_level().prop_filter("no # inside", |l| l != "#"),
            2 => Just("+".to_owned()),
        ];
        (prop::collection::vec(level, 1..6), any::<bool>()).prop_map(|(mut levels, hash)| {
            if hash {
                levels.push("#".to_owned());
            }
            levels.join("/")
        })
    }

    fn topic() -> impl Strategy<Value = String> {
        prop::collection::vec(topic_level(), 1..7).prop_map(|levels| levels.join("/"))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        #[test]
        fn finds_exactly_the_filters_a_topic_matches(
            filters in prop::collection::hash_set(filter(), 0..40),
            topics in prop::collection::vec(topic(), 1..20),
        ) {
            let filters: Vec<String> = filters.into_iter().collect();
            let mut index = FilterIndex::default();
            for (idx, filter) in filters.iter().enumerate() {
                index.insert(filter, idx);
            }
            for topic in &topics {
                let mut found = index.matches(topic);
                found.sort_unstable();
                let expected: Vec<usize> = filters
                    .iter()
                    .enumerate()
                    .filter(|(_, filter)| matches(topic, filter))
                    .map(|(idx, _)| idx)
                    .collect();
                prop_assert_eq!(found, expected, "topic {:?}", topic);
            }
        }
    }
}
