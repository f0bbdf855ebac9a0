//! Invariants of the elevator model over long seeded runs.

use liftwire_firmware_sim::elevator::SELF_TEST_PERIOD_MS;
use liftwire_firmware_sim::{Fleet, FleetConfig, TrafficProfile};
use liftwire_proto::v1::{self, envelope::Body, event::Kind};
use liftwire_proto::Message;

const SIX_HOURS_MS: u64 = 6 * 3600 * 1000;

fn run(
    profile: TrafficProfile,
    seed: u64,
    duration_ms: u64,
) -> Vec<(liftwire_proto::naming::Uplink, v1::Envelope)> {
    let config = FleetConfig {
        seed,
        buildings: 2,
        elevators_per_building: 2,
        profile,
        ..Default::default()
    };
    Fleet::new(&config).expect("valid ids").advance(duration_ms)
}

#[test]
fn same_seed_same_bytes_other_seed_other_run() {
    let a: Vec<Vec<u8>> = run(TrafficProfile::OfficeMorningPeak, 7, 600_000)
        .iter()
        .map(|(_, e)| e.encode_to_vec())
        .collect();
    let b: Vec<Vec<u8>> = run(TrafficProfile::OfficeMorningPeak, 7, 600_000)
        .iter()
        .map(|(_, e)| e.encode_to_vec())
        .collect();
    let c: Vec<Vec<u8>> = run(TrafficProfile::OfficeMorningPeak, 8, 600_000)
        .iter()
        .map(|(_, e)| e.encode_to_vec())
        .collect();
    assert!(!a.is_empty());
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn invariants_hold_for_every_profile() {
    for profile in [
        TrafficProfile::OfficeMorningPeak,
        TrafficProfile::ResidentialEvening,
        TrafficProfile::Night,
    ] {
        let messages = run(profile, 42, SIX_HOURS_MS);
        let mut per_device: std::collections::BTreeMap<String, Vec<v1::Envelope>> =
            Default::default();
        for (uplink, envelope) in messages {
            assert_eq!(
                uplink.device.as_str(),
                envelope.device_id,
                "topic names the sender"
            );
            assert_eq!(Some(uplink.kind), envelope.kind());
            per_device
                .entry(envelope.device_id.clone())
                .or_default()
                .push(envelope);
        }
        assert_eq!(per_device.len(), 4);
        for (device, envelopes) in per_device {
            check_device(&device, &envelopes, profile);
        }
    }
}

fn check_device(device: &str, envelopes: &[v1::Envelope], profile: TrafficProfile) {
    let mut last_counters = v1::Counters::default();
    let mut last_time = None;
    let mut last_trip_to: Option<i32> = None;
    let mut trips = 0u64;
    let mut self_tests = Vec::new();
    for (i, envelope) in envelopes.iter().enumerate() {
        assert_eq!(
            envelope.seq,
            i as u64 + 1,
            "{device}: sequence numbers are consecutive from 1"
        );
        let time = envelope.device_time.expect("timestamped");
        let ms = time.seconds * 1000 + i64::from(time.nanos / 1_000_000);
        assert!(
            last_time.is_none_or(|t| ms >= t),
            "{device}: device time never goes back"
        );
        last_time = Some(ms);
        match envelope.body.as_ref().expect("body") {
            Body::Telemetry(t) => {
                let doors_closed = t.doors.iter().all(|d| *d == v1::DoorState::Closed as i32);
                if t.direction != v1::Direction::Stopped as i32 {
                    assert!(
                        doors_closed,
                        "{device}: travelling with doors not closed: {t:?}"
                    );
                    assert!(t.speed_mm_s > 0);
                }
                let c = t.counters.expect("counters");
                for (now, before, name) in [
                    (c.trips, last_counters.trips, "trips"),
                    (c.door_cycles, last_counters.door_cycles, "door cycles"),
                    (c.run_seconds, last_counters.run_seconds, "run seconds"),
                    (c.starts, last_counters.starts, "starts"),
                ] {
                    assert!(
                        now >= before,
                        "{device}: {name} went back from {before} to {now}"
                    );
                }
                assert!(
                    c.trips >= trips,
                    "{device}: telemetry counts every completed trip"
                );
                last_counters = c;
            }
            Body::Event(v1::Event {
                kind: Some(Kind::TripCompleted(trip)),
            }) => {
                trips += 1;
                assert_ne!(trip.from_floor, trip.to_floor, "{device}: a trip moves");
                if let Some(previous_to) = last_trip_to {
                    assert_eq!(
                        trip.from_floor, previous_to,
                        "{device}: a trip starts where the last one ended"
                    );
                }
                assert_eq!(
                    trip.distance_mm,
                    (trip.from_floor - trip.to_floor).unsigned_abs() * 3_000
                );
                assert!(trip.levelling_error_mm.abs() <= 6);
                last_trip_to = Some(trip.to_floor);
            }
            Body::Event(v1::Event {
                kind: Some(Kind::AlarmSelfTest(_)),
            }) => self_tests.push(ms),
            Body::Event(_) => {}
            other => panic!("{device}: elevators send telemetry and events only, got {other:?}"),
        }
    }
    if profile != TrafficProfile::Night {
        assert!(
            trips > 10,
            "{device}: {profile:?} traffic moves the car ({trips} trips)"
        );
    }
    assert!(!self_tests.is_empty() || SIX_HOURS_MS < SELF_TEST_PERIOD_MS);
    for pair in self_tests.windows(2) {
        assert!(
            pair[1] - pair[0] <= 3 * 24 * 3600 * 1000,
            "{device}: self-test at least every 3 days"
        );
    }
}
