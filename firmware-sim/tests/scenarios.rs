//! Each chaos scenario produces the messages it must, in order, and only on the devices it
//! targets.

// Helpers outside #[test] functions panic on purpose: a failed setup fails the test.
#![allow(clippy::unwrap_used)]

use liftwire_firmware_sim::{Fleet, FleetConfig, Scenario};
use liftwire_proto::naming::Uplink;
use liftwire_proto::v1::{self, envelope::Body, event::Kind};

const MINUTE: u64 = 60_000;
type Sent = Vec<(Uplink, v1::Envelope)>;

fn fleet() -> Fleet {
    Fleet::new(&FleetConfig {
        seed: 3,
        buildings: 2,
        elevators_per_building: 2,
        ..Default::default()
    })
    .unwrap()
}

fn events_of<'a>(sent: &'a Sent, device: &'a str) -> impl Iterator<Item = &'a Kind> + 'a {
    sent.iter()
        .filter(move |(u, _)| u.device.as_str() == device)
        .filter_map(|(_, e)| match &e.body {
            Some(Body::Event(v1::Event { kind: Some(kind) })) => Some(kind),
            _ => None,
        })
}

fn telemetry_of<'a>(
    sent: &'a Sent,
    device: &'a str,
) -> impl Iterator<Item = &'a v1::Telemetry> + 'a {
    sent.iter()
        .filter(move |(u, _)| u.device.as_str() == device)
        .filter_map(|(_, e)| match &e.body {
            Some(Body::Telemetry(t)) => Some(t),
            _ => None,
        })
}

const FIRST: &str = "sim-b01-e01";

#[test]
fn entrapment_stops_the_car_until_release() {
    let mut fleet = fleet();
    fleet.advance(10 * MINUTE);
    let started = Scenario::Entrapment.apply(&mut fleet);
    let kinds: Vec<&Kind> = events_of(&started, FIRST).collect();
    assert!(
        matches!(kinds[0], Kind::FaultRaised(f) if f.blocking && f.code() == v1::FaultCode::SafetyChainOpen)
    );
    assert!(matches!(kinds[1], Kind::ModeChanged(m) if m.to() == v1::OperatingMode::OutOfService));
    assert!(matches!(kinds[2], Kind::EntrapmentStarted(_)));
    assert!(matches!(kinds[3], Kind::AlarmButtonPressed(_)));
    assert!(
        started.iter().all(|(u, _)| u.device.as_str() == FIRST),
        "only the first elevator"
    );

    let trapped = fleet.advance(24 * MINUTE);
    assert!(
        !events_of(&trapped, FIRST)
            .any(|k| matches!(k, Kind::TripCompleted(_) | Kind::DoorCycle(_))),
        "no service while trapped"
    );
    assert!(
        telemetry_of(&trapped, FIRST).all(|t| t.mode() == v1::OperatingMode::OutOfService
            && t.direction() == v1::Direction::Stopped
            && t.speed_mm_s == 0)
    );
    assert!(
        events_of(&trapped, "sim-b01-e02").any(|k| matches!(k, Kind::TripCompleted(_))),
        "the other elevator serves"
    );

    let released = fleet.advance(2 * MINUTE);
    let kinds: Vec<&Kind> = events_of(&released, FIRST).collect();
    let release = kinds
        .iter()
        .position(|k| matches!(k, Kind::EntrapmentReleased(_)))
        .expect("released after 25 minutes");
    assert!(matches!(kinds[release + 1], Kind::FaultCleared(_)));
    assert!(
        matches!(kinds[release + 2], Kind::ModeChanged(m) if m.to() == v1::OperatingMode::Normal)
    );
    let after = fleet.advance(30 * MINUTE);
    assert!(
        events_of(&after, FIRST).any(|k| matches!(k, Kind::TripCompleted(_))),
        "back in service"
    );
}

#[test]
fn door_reopen_storm_reopens_the_next_stops() {
    let mut fleet = fleet();
    fleet.advance(MINUTE);
    Scenario::DoorReopenStorm.apply(&mut fleet);
    let sent = fleet.advance(60 * MINUTE);
    let cycles: Vec<u32> = events_of(&sent, FIRST)
        .filter_map(|k| match k {
            Kind::DoorCycle(c) => Some(c.reopens),
            _ => None,
        })
        .collect();
    assert!(cycles.len() > 10);
    assert!(cycles[..10].iter().all(|r| *r >= 3), "{cycles:?}");
}

#[test]
fn fault_burst_hits_every_elevator_of_one_building() {
    let mut fleet = fleet();
    fleet.advance(MINUTE);
    let raised = Scenario::FaultBurst.apply(&mut fleet);
    let faulted: Vec<&str> = raised
        .iter()
        .filter(|(_, e)| {
            matches!(
                &e.body,
                Some(Body::Event(v1::Event {
                    kind: Some(Kind::FaultRaised(_))
                }))
            )
        })
        .map(|(u, _)| u.device.as_str())
        .collect();
    assert_eq!(faulted, ["sim-b01-e01", "sim-b01-e02"]);
    let later = fleet.advance(16 * MINUTE);
    for device in ["sim-b01-e01", "sim-b01-e02"] {
        assert_eq!(
            events_of(&later, device)
                .filter(|k| matches!(k, Kind::FaultCleared(_)))
                .count(),
            1,
            "{device}"
        );
    }
    assert!(!later.iter().any(|(u, e)| u.building.as_str() == "sim-b02"
        && matches!(
            &e.body,
            Some(Body::Event(v1::Event {
                kind: Some(Kind::FaultRaised(_))
            }))
        )));
}

#[test]
fn power_loss_silences_a_building_then_reports_the_outage() {
    let mut fleet = fleet();
    fleet.advance(5 * MINUTE);
    let lost = Scenario::PowerLoss.apply(&mut fleet);
    assert_eq!(lost.len(), 2);
    assert!(lost.iter().all(|(_, e)| matches!(
        &e.body,
        Some(Body::Event(v1::Event {
            kind: Some(Kind::PowerLost(_))
        }))
    )));
    let lost_at = lost[0].1.device_time.unwrap();
    let dark = fleet.advance(19 * MINUTE);
    assert!(
        dark.iter().all(|(u, _)| u.building.as_str() == "sim-b02"),
        "the building is silent"
    );
    let back = fleet.advance(2 * MINUTE);
    for device in ["sim-b01-e01", "sim-b01-e02"] {
        let restored = events_of(&back, device).find_map(|k| match k {
            Kind::PowerRestored(r) => r.lost_at,
            _ => None,
        });
        assert_eq!(
            restored,
            Some(lost_at),
            "{device} reports when power was lost"
        );
    }
}

#[test]
fn clock_skew_moves_one_device_clock() {
    let mut fleet = fleet();
    let before = fleet.advance(MINUTE);
    Scenario::ClockSkew.apply(&mut fleet);
    let after = fleet.advance(MINUTE);
    let last = |sent: &Sent, device: &str| {
        sent.iter()
            .rev()
            .find(|(u, _)| u.device.as_str() == device)
            .unwrap()
            .1
            .device_time
            .unwrap()
            .seconds
    };
    assert!(last(&after, FIRST) - last(&before, FIRST) >= 2 * 3600);
    assert!(last(&after, "sim-b01-e02") - last(&before, "sim-b01-e02") <= 120);
}

#[test]
fn maintenance_visit_puts_the_elevator_in_inspection() {
    let mut fleet = fleet();
    fleet.advance(MINUTE);
    let started = Scenario::Maintenance.apply(&mut fleet);
    let kinds: Vec<&Kind> = events_of(&started, FIRST).collect();
    assert!(matches!(kinds[0], Kind::MaintenanceVisitStarted(v) if v.planned));
    assert!(matches!(kinds[1], Kind::ModeChanged(m) if m.to() == v1::OperatingMode::Inspection));
    let during = fleet.advance(44 * MINUTE);
    assert!(telemetry_of(&during, FIRST).all(|t| t.mode() == v1::OperatingMode::Inspection));
    let ended = fleet.advance(2 * MINUTE);
    let kinds: Vec<&Kind> = events_of(&ended, FIRST).collect();
    assert!(kinds
        .iter()
        .any(|k| matches!(k, Kind::MaintenanceVisitEnded(_))));
    assert!(kinds
        .iter()
        .any(|k| matches!(k, Kind::ModeChanged(m) if m.to() == v1::OperatingMode::Normal)));
}
