//! Elevator data end to end: simulated elevators' days → JetStream → telemetry → the query
//! endpoints on NATS. The KPI expectations are computed by hand from the scenario timeline (see
//! the comments), not by the code under test.

// Helpers outside #[test] functions panic on purpose: a failed setup fails the test.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::time::Duration;

use async_nats::jetstream;
use chrono::{DateTime, Utc};
use common::sim::{elevator, ingested, publish, simulate, Day, HOUR, MINUTE};
use common::telemetry;
use liftwire_firmware_sim::{Incident, Scenario};
use liftwire_proto::naming::{alert_subject, service_subject, BuildingId, UPLINK_STREAM};
use liftwire_proto::{timestamp_from_unix_ms, v1, Message};
use liftwire_runtime::nats::{ensure_stream, NatsConfig};
use liftwire_testkit::{Nats, Postgres};

const BUILDING: &str = "mc-golden";

/// A request to a telemetry endpoint; `Err` carries the service error code.
async fn call<R: Message + Default>(
    nats: &async_nats::Client,
    endpoint: &str,
    request: &impl Message,
) -> Result<R, u16> {
    let reply = nats
        .request(
            service_subject("telemetry", endpoint).unwrap(),
            request.encode_to_vec().into(),
        )
        .await
        .unwrap();
    if let Some(code) = reply
        .headers
        .as_ref()
        .and_then(|h| h.get(async_nats::service::NATS_SERVICE_ERROR_CODE))
    {
        return Err(code.as_str().parse().unwrap());
    }
    Ok(R::decode(reply.payload.as_ref()).unwrap())
}

fn range(from_ms: i64, to_ms: i64) -> Option<v1::TimeRange> {
    Some(v1::TimeRange {
        from: Some(timestamp_from_unix_ms(from_ms)),
        to: Some(timestamp_from_unix_ms(to_ms)),
    })
}

fn event_time_ms(e: &v1::Envelope) -> i64 {
    let t = e.device_time.unwrap();
    t.seconds * 1000 + i64::from(t.nanos) / 1_000_000
}

/// Trips, door cycles and the p95 |levelling error| (nearest rank) in `[from, to)`, counted
/// straight from what the simulator sent.
fn counted(day: &Day, from_ms: i64, to_ms: i64) -> (u64, u64, Vec<i32>) {
    let (mut trips, mut doors, mut levelling) = (0, 0, Vec::new());
    for e in &day.envelopes {
        let t = event_time_ms(e);
        if t < from_ms || t >= to_ms {
            continue;
        }
        match &e.body {
            Some(v1::envelope::Body::Event(v1::Event {
                kind: Some(v1::event::Kind::TripCompleted(trip)),
            })) => {
                trips += 1;
                levelling.push(trip.levelling_error_mm.abs());
            }
            Some(v1::envelope::Body::Event(v1::Event {
                kind: Some(v1::event::Kind::DoorCycle(_)),
            })) => doors += 1,
            _ => {}
        }
    }
    levelling.sort_unstable();
    (trips, doors, levelling)
}

fn p95(sorted: &[i32]) -> Option<f64> {
    let rank = (sorted.len() as f64 * 0.95).ceil() as usize;
    sorted.get(rank.checked_sub(1)?).map(|v| f64::from(*v))
}

fn close(actual: Option<f64>, expected: f64) {
    let actual = actual.expect("a value");
    assert!(
        (actual - expected).abs() < 1e-9,
        "expected {expected}, got {actual}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn kpis_incidents_alerts_and_history_of_two_simulated_days() {
    let nats = Nats::start().unwrap();
    let pg = Postgres::start().await.unwrap();
    let (pool, service) = telemetry(&nats, &pg).await;
    let client = nats.client().await.unwrap();
    let js = jetstream::new(client.clone());
    ensure_stream(
        &js,
        &UPLINK_STREAM,
        &NatsConfig {
            url: nats.url(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let mut alert_events = client
        .subscribe(alert_subject(&BuildingId::new(BUILDING).unwrap()))
        .await
        .unwrap();

    // Midnight UTC two days ago: inside the retention, entirely in the past.
    let today = Utc::now().date_naive();
    let epoch: DateTime<Utc> = (today - chrono::Days::new(2))
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc();
    let epoch_ms = epoch.timestamp_millis();
    let day_end_ms = epoch_ms + 24 * HOUR as i64;

    // Elevator A, self-test daily at 01:00:
    //   02:00 entrapment, 25 min (a blocking safety-chain fault: out of service meanwhile)
    //   06:00 blocking drive fault, 10 min
    //   09:00 mains power loss, 20 min
    //   12:00 planned maintenance, 45 min (inspection mode: planned downtime)
    //   15:00 unplanned callback, 30 min
    let a = simulate(
        elevator("elev-a", HOUR, epoch_ms),
        vec![
            (2 * HOUR, Scenario::Entrapment.incident(0, true).unwrap()),
            (6 * HOUR, Scenario::FaultBurst.incident(1, true).unwrap()),
            (9 * HOUR, Scenario::PowerLoss.incident(0, true).unwrap()),
            (12 * HOUR, Scenario::Maintenance.incident(0, true).unwrap()),
            (
                15 * HOUR,
                Incident::Maintenance {
                    planned: false,
                    duration_ms: 30 * MINUTE,
                },
            ),
        ],
        25 * HOUR,
    );
    // Elevator B, self-test daily at 02:00:
    //   08:00 entrapment, 75 min (over the 1-hour limit)
    //   24:30 (the next day) an entrapment still going on at the end of the run
    let b = simulate(
        elevator("elev-b", 2 * HOUR, epoch_ms),
        vec![
            (
                8 * HOUR,
                Incident::Entrapment {
                    duration_ms: 75 * MINUTE,
                },
            ),
            (
                24 * HOUR + 30 * MINUTE,
                Incident::Entrapment {
                    duration_ms: 10 * HOUR,
                },
            ),
        ],
        25 * HOUR,
    );
    publish(&js, BUILDING, &a).await;
    publish(&js, BUILDING, &b).await;
    ingested(&pool, &[&a, &b]).await;

    // --- KPIs over the first day --------------------------------------------------------
    let reply: v1::KpiReply = call(
        &client,
        "kpis",
        &v1::KpiRequest {
            building_id: BUILDING.into(),
            device_id: String::new(),
            range: range(epoch_ms, day_end_ms),
        },
    )
    .await
    .unwrap();
    let ka = reply.elevators[0].kpis.unwrap();
    let kb = reply.elevators[1].kpis.unwrap();
    let total = reply.total.unwrap();
    assert_eq!(reply.elevators[0].device_id, "elev-a");

    // A: period 86,400 s; planned maintenance 45 min = 2,700 s; unplanned downtime
    // 25 + 10 + 20 + 30 = 85 min = 5,100 s over 4 failures (the planned visit is no failure).
    assert_eq!(ka.period_seconds, 86_400.0);
    assert_eq!(ka.planned_maintenance_seconds, 2_700.0);
    assert_eq!(ka.unplanned_downtime_seconds, 5_100.0);
    assert_eq!(ka.failures, 4);
    close(ka.availability, 1.0 - 5_100.0 / 83_700.0);
    close(ka.mtbf_seconds, (83_700.0 - 5_100.0) / 4.0);
    close(ka.mttr_seconds, 1_275.0);
    assert_eq!(ka.callbacks, 1);
    close(Some(ka.callbacks_per_unit_year), 365.0);
    assert_eq!((ka.entrapments, ka.entrapments_over_limit), (1, 0));
    close(ka.mean_release_seconds, 1_500.0);
    // First self-test at 01:00, valid 3 days: 23 of 24 hours covered.
    close(Some(ka.self_test_compliance), 23.0 / 24.0);

    // B: one 75-minute entrapment: 4,500 s unplanned, one failure, over the limit.
    assert_eq!(kb.unplanned_downtime_seconds, 4_500.0);
    assert_eq!(kb.failures, 1);
    assert_eq!((kb.entrapments, kb.entrapments_over_limit), (1, 1));
    close(kb.max_release_seconds, 4_500.0);
    close(Some(kb.self_test_compliance), 22.0 / 24.0);

    // The building: both elevators together.
    assert_eq!(total.units, 2);
    assert_eq!(total.period_seconds, 172_800.0);
    close(total.availability, 1.0 - 9_600.0 / 170_100.0);
    close(total.mtbf_seconds, (170_100.0 - 9_600.0) / 5.0);
    close(total.mttr_seconds, 1_920.0);
    close(total.mean_release_seconds, 3_000.0);
    close(Some(total.callbacks_per_unit_year), 182.5);
    close(Some(total.self_test_compliance), 45.0 / 48.0);

    // Counts as the simulator produced them.
    let (trips_a, doors_a, lev_a) = counted(&a, epoch_ms, day_end_ms);
    let (trips_b, doors_b, lev_b) = counted(&b, epoch_ms, day_end_ms);
    assert!(trips_a > 50, "a night's traffic still moves the car");
    assert_eq!((ka.trips, ka.door_cycles), (trips_a, doors_a));
    close(Some(ka.trips_per_day), trips_a as f64);
    assert_eq!(ka.levelling_p95_mm, p95(&lev_a));
    assert_eq!(total.trips, trips_a + trips_b);
    assert_eq!(total.door_cycles, doors_a + doors_b);
    let mut both: Vec<i32> = lev_a.iter().chain(&lev_b).copied().collect();
    both.sort_unstable();
    assert_eq!(total.levelling_p95_mm, p95(&both));

    // --- Incidents -------------------------------------------------------------------------
    let mut seen = Vec::new();
    let mut cursor = String::new();
    loop {
        let page: v1::IncidentsReply = call(
            &client,
            "incidents",
            &v1::IncidentsRequest {
                building_id: BUILDING.into(),
                device_id: "elev-a".into(),
                range: range(epoch_ms, day_end_ms),
                page: Some(v1::Page {
                    limit: 3,
                    cursor: cursor.clone(),
                }),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        assert!(page.incidents.len() <= 3);
        seen.extend(page.incidents);
        if page.next_cursor.is_empty() {
            break;
        }
        cursor = page.next_cursor;
    }
    let count = |kind: v1::IncidentKind, planned: bool| {
        seen.iter()
            .filter(|i| i.kind == kind as i32 && i.planned == planned)
            .count()
    };
    // Downtime: entrapment, fault, power, callback unplanned; the planned visit planned.
    assert_eq!(count(v1::IncidentKind::Downtime, false), 4);
    assert_eq!(count(v1::IncidentKind::Downtime, true), 1);
    assert_eq!(count(v1::IncidentKind::Fault, false), 2);
    assert_eq!(count(v1::IncidentKind::Entrapment, false), 1);
    assert_eq!(count(v1::IncidentKind::PowerLoss, false), 1);
    assert_eq!(count(v1::IncidentKind::Maintenance, true), 1);
    assert_eq!(count(v1::IncidentKind::Maintenance, false), 1);
    assert_eq!(seen.len(), 11, "no incident twice across pages");
    assert!(seen.iter().all(|i| i.ended_at.is_some()));

    // --- Events, paginated, newest first ----------------------------------------------------
    let mut events = Vec::new();
    let mut cursor = String::new();
    loop {
        let page: v1::EventsReply = call(
            &client,
            "events",
            &v1::EventsRequest {
                building_id: BUILDING.into(),
                device_id: String::new(),
                range: range(epoch_ms, day_end_ms),
                page: Some(v1::Page {
                    limit: 250,
                    cursor: cursor.clone(),
                }),
            },
        )
        .await
        .unwrap();
        events.extend(page.events);
        if page.next_cursor.is_empty() {
            break;
        }
        cursor = page.next_cursor;
    }
    let sent: usize = [&a, &b]
        .iter()
        .flat_map(|d| &d.envelopes)
        .filter(|e| {
            matches!(e.body, Some(v1::envelope::Body::Event(_)))
                && (epoch_ms..day_end_ms).contains(&event_time_ms(e))
        })
        .count();
    assert_eq!(events.len(), sent);
    let unique: HashSet<(String, u64)> = events
        .iter()
        .map(|e| (e.device_id.clone(), e.seq))
        .collect();
    assert_eq!(unique.len(), sent, "pages neither overlap nor skip");
    assert!(events
        .windows(2)
        .all(|w| (w[0].at.unwrap().seconds, w[0].at.unwrap().nanos)
            >= (w[1].at.unwrap().seconds, w[1].at.unwrap().nanos)));

    // --- History, hourly ------------------------------------------------------------------
    let history: v1::HistoryReply = call(
        &client,
        "history",
        &v1::HistoryRequest {
            building_id: BUILDING.into(),
            device_id: "elev-a".into(),
            range: range(epoch_ms, day_end_ms),
            bucket_seconds: 3_600,
            limit: 0,
        },
    )
    .await
    .unwrap();
    assert_eq!(history.buckets.len(), 24);
    let samples: u32 = history.buckets.iter().map(|b| b.samples).sum();
    let telemetry_sent = a
        .envelopes
        .iter()
        .filter(|e| {
            matches!(e.body, Some(v1::envelope::Body::Telemetry(_)))
                && (epoch_ms..day_end_ms).contains(&event_time_ms(e))
        })
        .count();
    assert_eq!(samples as usize, telemetry_sent);
    // The car was without power for 20 minutes between 09:00 and 10:00: fewer samples.
    assert!(history.buckets[9].samples < history.buckets[8].samples);

    // --- History, raw: the day's first samples in time order, cut at the limit --------------
    let history_of = |bucket_seconds: u32, limit: u32| v1::HistoryRequest {
        building_id: BUILDING.into(),
        device_id: "elev-a".into(),
        range: range(epoch_ms, day_end_ms),
        bucket_seconds,
        limit,
    };
    let raw: v1::HistoryReply = call(&client, "history", &history_of(0, 5)).await.unwrap();
    let mut first: Vec<i64> = a
        .envelopes
        .iter()
        .filter(|e| {
            matches!(e.body, Some(v1::envelope::Body::Telemetry(_)))
                && (epoch_ms..day_end_ms).contains(&event_time_ms(e))
        })
        .map(event_time_ms)
        .collect();
    first.sort_unstable();
    first.truncate(5);
    let got: Vec<i64> = raw
        .buckets
        .iter()
        .map(|b| {
            let t = b.start.unwrap();
            t.seconds * 1000 + i64::from(t.nanos) / 1_000_000
        })
        .collect();
    assert_eq!(got, first);
    assert!(raw.truncated && raw.buckets.iter().all(|b| b.samples == 1));
    // More buckets in the range than can ever be returned: refused, not computed and cut.
    assert_eq!(
        call::<v1::HistoryReply>(&client, "history", &history_of(1, 0))
            .await
            .err(),
        Some(400)
    );

    // --- Alerts: lifecycle, de-duplication, announcements ----------------------------------
    let alerts: v1::AlertsReply = call(
        &client,
        "alerts",
        &v1::AlertsRequest {
            building_id: BUILDING.into(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let entrapments: Vec<&v1::Alert> = alerts
        .alerts
        .iter()
        .filter(|a| a.rule == v1::AlertRule::Entrapment as i32)
        .collect();
    assert_eq!(entrapments.len(), 3, "one per entrapment");
    let open = entrapments
        .iter()
        .find(|a| a.state == v1::AlertState::Open as i32)
        .expect("B's ongoing entrapment");
    assert_eq!(open.device_id, "elev-b");
    assert_eq!(open.severity, v1::AlertSeverity::Critical as i32);
    assert_eq!(
        entrapments
            .iter()
            .filter(|a| a.state == v1::AlertState::Resolved as i32)
            .count(),
        2,
        "released entrapments resolve their alerts"
    );

    let transition = |to: v1::AlertState, building: &str| v1::AlertTransitionRequest {
        building_id: building.into(),
        alert_id: open.id,
        to: to as i32,
        by: "ann@example.com".into(),
        note: "technician on the way".into(),
    };
    // Another building cannot even see it.
    assert_eq!(
        call::<v1::AlertReply>(
            &client,
            "alert-transition",
            &transition(v1::AlertState::Acknowledged, "mc-other")
        )
        .await
        .unwrap_err(),
        404
    );
    let acked: v1::AlertReply = call(
        &client,
        "alert-transition",
        &transition(v1::AlertState::Acknowledged, BUILDING),
    )
    .await
    .unwrap();
    assert_eq!(
        acked.alert.unwrap().state,
        v1::AlertState::Acknowledged as i32
    );
    let resolved: v1::AlertReply = call(
        &client,
        "alert-transition",
        &transition(v1::AlertState::Resolved, BUILDING),
    )
    .await
    .unwrap();
    let states: Vec<(i32, i32, String)> = resolved
        .transitions
        .iter()
        .map(|t| (t.from, t.to, t.by.clone()))
        .collect();
    assert_eq!(
        states,
        [
            (0, v1::AlertState::Open as i32, "system".to_string()),
            (
                v1::AlertState::Open as i32,
                v1::AlertState::Acknowledged as i32,
                "ann@example.com".to_string()
            ),
            (
                v1::AlertState::Acknowledged as i32,
                v1::AlertState::Resolved as i32,
                "ann@example.com".to_string()
            ),
        ]
    );
    // Resolving again changes nothing; acknowledging a resolved alert is a conflict.
    let again: v1::AlertReply = call(
        &client,
        "alert-transition",
        &transition(v1::AlertState::Resolved, BUILDING),
    )
    .await
    .unwrap();
    assert_eq!(again.transitions.len(), 3);
    assert_eq!(
        call::<v1::AlertReply>(
            &client,
            "alert-transition",
            &transition(v1::AlertState::Acknowledged, BUILDING)
        )
        .await
        .unwrap_err(),
        409
    );
    // Each stored transition was announced on the building's alert subject.
    let mut announced = 0;
    while let Ok(Some(message)) = tokio::time::timeout(
        Duration::from_millis(500),
        futures::StreamExt::next(&mut alert_events),
    )
    .await
    {
        let event = v1::AlertEvent::decode(message.payload.as_ref()).unwrap();
        if event.alert.unwrap().id == open.id && event.transition.is_some() {
            announced += 1;
        }
    }
    assert_eq!(announced, 3);

    // --- Scope and validation -------------------------------------------------------------
    let other_building = v1::KpiRequest {
        building_id: "mc-other".into(),
        device_id: "elev-a".into(),
        range: range(epoch_ms, day_end_ms),
    };
    assert_eq!(
        call::<v1::KpiReply>(&client, "kpis", &other_building)
            .await
            .unwrap_err(),
        404,
        "an elevator of another building is not found"
    );
    let backwards = v1::KpiRequest {
        building_id: BUILDING.into(),
        device_id: String::new(),
        range: range(day_end_ms, epoch_ms),
    };
    assert_eq!(
        call::<v1::KpiReply>(&client, "kpis", &backwards)
            .await
            .unwrap_err(),
        400
    );
    let live: v1::LiveStateReply = call(
        &client,
        "live-state",
        &v1::LiveStateRequest {
            building_id: BUILDING.into(),
        },
    )
    .await
    .unwrap();
    let b_state = &live.elevators[1];
    assert!(b_state.entrapment && !b_state.in_service);
    assert!(b_state.out_of_service_since.is_some());

    service.stop().await;
}
