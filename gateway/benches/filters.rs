//! The router's filter lookup for a published topic, before and after rumqttd patch 7 (a
//! measurement, not a timed test):
//!
//! ```text
//! cargo bench -p liftwire-gateway --bench filters
//! ```
//!
//! A gateway replica knows the downlink filters of every device that ever connected to it
//! and receives every device's downlink, most of it for devices connected
//! elsewhere. Before the patch a topic matching no filter was matched against every filter, and
//! a topic matching some was looked up in a cache of topics (filled on first match). Both ways
//! run side by side here, on the same filters and topics, for growing numbers of devices.

// A measurement binary: a failed assertion aborts it, on purpose.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::hint::black_box;
use std::time::Instant;

use rumqttd::protocol::matches;
use rumqttd::FilterIndex;

/// The lookup as rumqttd 0.20 did it: a cache of the filters of each topic that matched some,
/// else a scan of every filter.
struct Scan {
    filters: HashMap<String, usize>,
    cache: HashMap<String, Vec<usize>>,
}

impl Scan {
    fn matches(&mut self, topic: &str) -> Vec<usize> {
        if let Some(found) = self.cache.get(topic) {
            return found.clone();
        }
        let found: Vec<usize> = self
            .filters
            .iter()
            .filter(|(filter, _)| matches(topic, filter))
            .map(|(_, idx)| *idx)
            .collect();
        if !found.is_empty() {
            self.cache.insert(topic.to_owned(), found.clone());
        }
        found
    }
}

fn device_filters(device: usize) -> [String; 3] {
    let building = device / 10;
    [
        format!("lw/v1/b{building}/elev-{device}/down/+"),
        format!("lw/v1/b{building}/_all/down/+"),
        format!("lw/v1/b{building}/elev-{device}/down/command"),
    ]
}

fn watermark(device: usize) -> String {
    format!("lw/v1/b{}/elev-{device}/down/watermark", device / 10)
}

/// Nanoseconds per lookup of `topics`, round after round for at least 200 ms.
fn time(mut lookup: impl FnMut(&str) -> usize, topics: &[String]) -> f64 {
    let started = Instant::now();
    let mut lookups = 0u64;
    while started.elapsed().as_millis() < 200 {
        for topic in topics {
            black_box(lookup(black_box(topic)));
        }
        lookups += topics.len() as u64;
    }
    started.elapsed().as_nanos() as f64 / lookups as f64
}

fn main() {
    println!("## Router filter lookup, rumqttd 0.20 vs liftwire patch 7\n");
    println!(
        "Filters of the devices the replica knows (each device's `down/+` and `down/command`,"
    );
    println!("each building's `_all/down/+`); topics: watermarks of devices connected elsewhere");
    println!("(no filter matches) and of its own devices (one matches).\n");
    println!("| devices known | filters | no match: scan | no match: index | own device: cache | own device: index |");
    println!("|--:|--:|--:|--:|--:|--:|");
    for devices in [100, 1_000, 10_000] {
        let mut scan = Scan {
            filters: HashMap::new(),
            cache: HashMap::new(),
        };
        let mut index = FilterIndex::default();
        for device in 0..devices {
            for filter in device_filters(device) {
                let idx = scan.filters.len();
                if scan.filters.insert(filter.clone(), idx).is_none() {
                    index.insert(&filter, idx);
                }
            }
        }
        let elsewhere: Vec<String> = (devices..devices + 100).map(watermark).collect();
        let own: Vec<String> = (0..100).map(|d| watermark(d * devices / 100)).collect();
        for topic in elsewhere.iter().chain(&own) {
            let mut expected = scan.matches(topic);
            let mut found = index.matches(topic);
            expected.sort_unstable();
            found.sort_unstable();
            assert_eq!(found, expected, "{topic}");
        }
        let miss_scan = time(|t| scan.matches(t).len(), &elsewhere);
        let miss_index = time(|t| index.matches(t).len(), &elsewhere);
        let hit_cache = time(|t| scan.matches(t).len(), &own);
        let hit_index = time(|t| index.matches(t).len(), &own);
        println!(
            "| {devices} | {} | {miss_scan:.0} ns | {miss_index:.0} ns | {hit_cache:.0} ns | {hit_index:.0} ns |",
            scan.filters.len()
        );
    }
}
