//! Elevator KPIs over a period `[from, to)`, per elevator and per building.
//!
//! The period ends at `now` if `to` is later. With P the period (summed over elevators for a
//! building), PM the planned-maintenance time (union of planned visits), UD the unplanned downtime
//! (out-of-service time outside planned visits), and a *failure* an out-of-service period that
//! starts in the period outside a planned visit:
//!
//! - availability = 1 − UD / (P − PM)
//! - MTBF = (P − PM − UD) / failures, MTTR = UD / failures
//! - trips per day and door cycles per day = count / days of the period (for a building, the
//!   building's total per day)
//! - callbacks (unplanned maintenance visits) per unit per year = callbacks / (P / 365 days)
//! - entrapments started in the period; over the limit when released after more than 1 hour or
//!   still trapped 1 hour after the start; release time = release − start (alarm)
//! - self-test compliance = share of P during which a passed alarm self-test was at most 3 days
//!   old (EN 81-28)
//! - levelling p95 = 95th percentile (nearest rank) of |levelling error| over the trips.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use liftwire_proto::v1;

const DAY_S: f64 = 86_400.0;
const YEAR_S: f64 = 365.0 * DAY_S;
/// Longest acceptable entrapment.
pub const ENTRAPMENT_LIMIT: Duration = Duration::from_secs(3600);

/// A period; `end` unset while it is still going on.
pub type Period = (DateTime<Utc>, Option<DateTime<Utc>>);

/// What the KPIs of one elevator are computed from.
#[derive(Debug, Clone, Default)]
pub struct ElevatorFacts {
    /// Out-of-service periods overlapping the range.
    pub downtime: Vec<Period>,
    /// Planned maintenance visits overlapping the range.
    pub planned_maintenance: Vec<Period>,
    /// Unplanned visits (callbacks) started in the range.
    pub callbacks: u32,
    /// Entrapments started in the range.
    pub entrapments: Vec<Period>,
    /// Passed alarm self-tests from `self_test_every` before the range to its end.
    pub passed_self_tests: Vec<DateTime<Utc>>,
    /// Trips completed in the range.
    pub trips: u64,
    /// Door cycles in the range.
    pub door_cycles: u64,
    /// 95th percentile of |levelling error| of the trips, in mm.
    pub levelling_p95_mm: Option<f64>,
}

/// Additive totals behind the KPIs (an elevator's, or a building's sum).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Totals {
    /// Elevators.
    pub units: u32,
    /// Days of the period (not summed over elevators).
    pub days: f64,
    /// Period, summed over elevators (seconds).
    pub period_s: f64,
    /// Planned maintenance (seconds).
    pub planned_s: f64,
    /// Unplanned downtime (seconds).
    pub unplanned_s: f64,
    /// Failures.
    pub failures: u32,
    /// Trips.
    pub trips: u64,
    /// Door cycles.
    pub door_cycles: u64,
    /// Callbacks.
    pub callbacks: u32,
    /// Entrapments.
    pub entrapments: u32,
    /// Entrapments over the 1-hour limit.
    pub entrapments_over_limit: u32,
    /// Sum of release times of released entrapments (seconds).
    pub release_sum_s: f64,
    /// Released entrapments.
    pub released: u32,
    /// Longest release time (seconds).
    pub release_max_s: Option<f64>,
    /// Time covered by a recent passed self-test (seconds).
    pub self_test_covered_s: f64,
    /// Levelling p95 (set by the caller: percentiles do not add up).
    pub levelling_p95_mm: Option<f64>,
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

/// Clips periods to `[from, to)` (open ones end at `to`), as millisecond pairs.
fn clip(periods: &[Period], from: i64, to: i64) -> Vec<(i64, i64)> {
    periods
        .iter()
        .map(|(s, e)| (ms(*s).max(from), e.map_or(to, ms).min(to)))
        .filter(|(s, e)| s < e)
        .collect()
}

/// Merges overlapping intervals.
fn union(mut intervals: Vec<(i64, i64)>) -> Vec<(i64, i64)> {
    intervals.sort_unstable();
    let mut merged: Vec<(i64, i64)> = Vec::with_capacity(intervals.len());
    for (s, e) in intervals {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    merged
}

fn length(intervals: &[(i64, i64)]) -> i64 {
    intervals.iter().map(|(s, e)| e - s).sum()
}

/// `a` minus `b`, both merged.
fn subtract(a: &[(i64, i64)], b: &[(i64, i64)]) -> Vec<(i64, i64)> {
    let mut out = Vec::new();
    for &(mut s, e) in a {
        for &(bs, be) in b {
            if be <= s || bs >= e {
                continue;
            }
            if bs > s {
                out.push((s, bs));
            }
            s = s.max(be);
            if s >= e {
                break;
            }
        }
        if s < e {
            out.push((s, e));
        }
    }
    out
}

fn inside(t: i64, intervals: &[(i64, i64)]) -> bool {
    intervals.iter().any(|(s, e)| *s <= t && t < *e)
}

/// An elevator's totals over `[from, to)` as of `now`.
pub fn elevator_totals(
    facts: &ElevatorFacts,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    now: DateTime<Utc>,
    self_test_every: Duration,
) -> Totals {
    let (from_ms, end_ms) = (ms(from), ms(to.min(now)));
    let period = (end_ms - from_ms).max(0);
    let planned = union(clip(&facts.planned_maintenance, from_ms, end_ms));
    let down = union(clip(&facts.downtime, from_ms, end_ms));
    let unplanned = subtract(&down, &planned);
    let failures = facts
        .downtime
        .iter()
        .map(|(s, _)| ms(*s))
        .filter(|s| (from_ms..end_ms).contains(s) && !inside(*s, &planned))
        .count();
    let limit = i64::try_from(ENTRAPMENT_LIMIT.as_millis()).unwrap_or(i64::MAX);
    let mut totals = Totals {
        units: 1,
        days: period as f64 / 1000.0 / DAY_S,
        period_s: period as f64 / 1000.0,
        planned_s: length(&planned) as f64 / 1000.0,
        unplanned_s: length(&unplanned) as f64 / 1000.0,
        failures: u32::try_from(failures).unwrap_or(u32::MAX),
        trips: facts.trips,
        door_cycles: facts.door_cycles,
        callbacks: facts.callbacks,
        entrapments: u32::try_from(facts.entrapments.len()).unwrap_or(u32::MAX),
        levelling_p95_mm: facts.levelling_p95_mm,
        ..Default::default()
    };
    for (start, end) in &facts.entrapments {
        match end {
            Some(end) => {
                let release = ms(*end) - ms(*start);
                totals.released += 1;
                totals.release_sum_s += release as f64 / 1000.0;
                totals.release_max_s = Some(
                    totals
                        .release_max_s
                        .unwrap_or(0.0)
                        .max(release as f64 / 1000.0),
                );
                if release > limit {
                    totals.entrapments_over_limit += 1;
                }
            }
            None if ms(now) - ms(*start) > limit => totals.entrapments_over_limit += 1,
            None => {}
        }
    }
    let every = i64::try_from(self_test_every.as_millis()).unwrap_or(i64::MAX);
    let covered: Vec<(i64, i64)> = facts
        .passed_self_tests
        .iter()
        .map(|t| {
            (
                ms(*t).max(from_ms),
                (ms(*t).saturating_add(every)).min(end_ms),
            )
        })
        .filter(|(s, e)| s < e)
        .collect();
    totals.self_test_covered_s = length(&union(covered)) as f64 / 1000.0;
    totals
}

impl Totals {
    /// Adds another elevator's totals (same period).
    pub fn add(&mut self, other: &Totals) {
        self.units += other.units;
        self.days = self.days.max(other.days);
        self.period_s += other.period_s;
        self.planned_s += other.planned_s;
        self.unplanned_s += other.unplanned_s;
        self.failures += other.failures;
        self.trips += other.trips;
        self.door_cycles += other.door_cycles;
        self.callbacks += other.callbacks;
        self.entrapments += other.entrapments;
        self.entrapments_over_limit += other.entrapments_over_limit;
        self.release_sum_s += other.release_sum_s;
        self.released += other.released;
        self.release_max_s = match (self.release_max_s, other.release_max_s) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        self.self_test_covered_s += other.self_test_covered_s;
    }

    /// The KPIs (formulas in the module documentation).
    pub fn kpis(&self) -> v1::Kpis {
        let available = self.period_s - self.planned_s;
        let per_day = |n: u64| {
            if self.days > 0.0 {
                n as f64 / self.days
            } else {
                0.0
            }
        };
        let per_failure = |x: f64| (self.failures > 0).then(|| x / f64::from(self.failures));
        v1::Kpis {
            units: self.units,
            period_seconds: self.period_s,
            planned_maintenance_seconds: self.planned_s,
            unplanned_downtime_seconds: self.unplanned_s,
            availability: (available > 0.0).then(|| 1.0 - self.unplanned_s / available),
            trips: self.trips,
            trips_per_day: per_day(self.trips),
            door_cycles: self.door_cycles,
            door_cycles_per_day: per_day(self.door_cycles),
            failures: self.failures,
            mtbf_seconds: per_failure(available - self.unplanned_s),
            mttr_seconds: per_failure(self.unplanned_s),
            callbacks: self.callbacks,
            callbacks_per_unit_year: if self.period_s > 0.0 {
                f64::from(self.callbacks) / (self.period_s / YEAR_S)
            } else {
                0.0
            },
            entrapments: self.entrapments,
            entrapments_over_limit: self.entrapments_over_limit,
            mean_release_seconds: (self.released > 0)
                .then(|| self.release_sum_s / f64::from(self.released)),
            max_release_seconds: self.release_max_s,
            self_test_compliance: if self.period_s > 0.0 {
                self.self_test_covered_s / self.period_s
            } else {
                0.0
            },
            levelling_p95_mm: self.levelling_p95_mm,
        }
    }
}

/// Loads the facts of `devices` over `[from, to)`.
pub async fn load_facts(
    pool: &sqlx::PgPool,
    devices: &[String],
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    self_test_every: Duration,
) -> Result<(HashMap<String, ElevatorFacts>, Option<f64>), sqlx::Error> {
    let mut facts: HashMap<String, ElevatorFacts> = devices
        .iter()
        .map(|d| (d.clone(), ElevatorFacts::default()))
        .collect();
    type IncidentRow = (String, String, bool, DateTime<Utc>, Option<DateTime<Utc>>);
    type CountRow = (Option<String>, i64, i64, Option<i64>);
    let lookback = from - chrono::Duration::from_std(self_test_every).unwrap_or_default();
    // Independent reads, run at once on separate connections.
    let (incidents, counts, tests) = tokio::try_join!(
        sqlx::query_as::<_, IncidentRow>(
            "SELECT device_id, kind, planned, started_at, ended_at FROM incidents
             WHERE device_id = ANY($1) AND kind IN ('downtime', 'maintenance', 'entrapment')
               AND started_at < $3 AND (ended_at IS NULL OR ended_at > $2)",
        )
        .bind(devices)
        .bind(from)
        .bind(to)
        .fetch_all(pool),
        sqlx::query_as::<_, CountRow>(
            "SELECT device_id,
                    count(*) FILTER (WHERE event = 'trip_completed'),
                    count(*) FILTER (WHERE event = 'door_cycle'),
                    percentile_disc(0.95) WITHIN GROUP (ORDER BY abs(event_value::int8))
                        FILTER (WHERE event = 'trip_completed')
             FROM device_messages
             WHERE device_id = ANY($1) AND at >= $2 AND at < $3
               AND event IN ('trip_completed', 'door_cycle')
             GROUP BY GROUPING SETS ((device_id), ())",
        )
        .bind(devices)
        .bind(from)
        .bind(to)
        .fetch_all(pool),
        sqlx::query_as::<_, (String, DateTime<Utc>)>(
            "SELECT device_id, at FROM device_messages
             WHERE device_id = ANY($1) AND at >= $2 AND at < $3
               AND event = 'alarm_self_test' AND event_value = 1",
        )
        .bind(devices)
        .bind(lookback)
        .bind(to)
        .fetch_all(pool),
    )?;
    for (device, kind, planned, start, end) in incidents {
        let Some(f) = facts.get_mut(&device) else {
            continue;
        };
        let started_in_range = start >= from && start < to;
        match kind.as_str() {
            "downtime" => f.downtime.push((start, end)),
            "maintenance" if planned => f.planned_maintenance.push((start, end)),
            "maintenance" if started_in_range => f.callbacks += 1,
            "entrapment" if started_in_range => f.entrapments.push((start, end)),
            _ => {}
        }
    }
    let mut overall_p95 = None;
    for (device, trips, doors, p95) in counts {
        match device {
            Some(device) => {
                if let Some(f) = facts.get_mut(&device) {
                    f.trips = u64::try_from(trips).unwrap_or(0);
                    f.door_cycles = u64::try_from(doors).unwrap_or(0);
                    f.levelling_p95_mm = p95.map(|mm| mm as f64);
                }
            }
            None => overall_p95 = p95.map(|mm| mm as f64),
        }
    }
    for (device, at) in tests {
        if let Some(f) = facts.get_mut(&device) {
            f.passed_self_tests.push(at);
        }
    }
    Ok((facts, overall_p95))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(minutes: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_795_000_000 + minutes * 60, 0).unwrap()
    }

    const THREE_DAYS: Duration = Duration::from_secs(3 * 86_400);

    #[test]
    fn interval_algebra() {
        assert_eq!(
            union(vec![(5, 8), (0, 3), (2, 4), (8, 9)]),
            [(0, 4), (5, 9)]
        );
        assert_eq!(subtract(&[(0, 10)], &[(2, 3), (5, 12)]), [(0, 2), (3, 5)]);
        assert_eq!(subtract(&[(0, 10)], &[]), [(0, 10)]);
        assert_eq!(subtract(&[(4, 6)], &[(0, 10)]), []);
    }

    /// A day with a 25-minute entrapment, a 10-minute fault, 45 minutes of planned maintenance
    /// during which the elevator is also out of service, and a downtime still open at the end.
    #[test]
    fn a_day_computed_by_hand() {
        let facts = ElevatorFacts {
            downtime: vec![
                (t(120), Some(t(145))),
                (t(360), Some(t(370))),
                (t(600), Some(t(645))),
                (t(1_430), None),
            ],
            planned_maintenance: vec![(t(600), Some(t(645)))],
            callbacks: 1,
            entrapments: vec![(t(120), Some(t(145)))],
            passed_self_tests: vec![t(-2 * 1_440), t(720)],
            trips: 300,
            door_cycles: 320,
            levelling_p95_mm: Some(5.0),
        };
        let totals = elevator_totals(&facts, t(0), t(1_440), t(5_000), THREE_DAYS);
        let k = totals.kpis();
        assert_eq!(k.period_seconds, 86_400.0);
        assert_eq!(k.planned_maintenance_seconds, 2_700.0);
        // 25 + 10 + 10 (the open downtime, cut at the end of the period) minutes.
        assert_eq!(k.unplanned_downtime_seconds, 2_700.0);
        assert_eq!(k.failures, 3);
        assert_eq!(k.availability, Some(1.0 - 2_700.0 / 83_700.0));
        assert_eq!(k.mtbf_seconds, Some((83_700.0 - 2_700.0) / 3.0));
        assert_eq!(k.mttr_seconds, Some(900.0));
        assert_eq!((k.trips_per_day, k.door_cycles_per_day), (300.0, 320.0));
        assert_eq!(k.callbacks_per_unit_year, 365.0);
        assert_eq!((k.entrapments, k.entrapments_over_limit), (1, 0));
        assert_eq!(k.mean_release_seconds, Some(1_500.0));
        // The self-test two days before covers the first day entirely.
        assert_eq!(k.self_test_compliance, 1.0);
    }

    #[test]
    fn long_entrapments_missing_self_tests_and_buildings() {
        let a = ElevatorFacts {
            downtime: vec![(t(60), Some(t(135)))],
            entrapments: vec![(t(60), Some(t(135))), (t(1_000), None)],
            passed_self_tests: vec![t(360)],
            ..Default::default()
        };
        let now = t(1_200);
        let ta = elevator_totals(&a, t(0), t(1_440), now, THREE_DAYS);
        // The period ends now (20 hours); the self-test covers it from hour 6.
        assert_eq!(ta.period_s, 72_000.0);
        assert_eq!(ta.self_test_covered_s, 72_000.0 - 21_600.0);
        // Released after 75 minutes, and one still trapped for 200 minutes.
        assert_eq!(ta.entrapments_over_limit, 2);
        assert_eq!(ta.release_max_s, Some(4_500.0));
        let b = ElevatorFacts::default();
        let tb = elevator_totals(&b, t(0), t(1_440), now, THREE_DAYS);
        assert_eq!(tb.kpis().mtbf_seconds, None, "no failure, no MTBF");
        assert_eq!(tb.kpis().availability, Some(1.0));
        let mut building = ta.clone();
        building.add(&tb);
        let k = building.kpis();
        assert_eq!(k.units, 2);
        assert_eq!(k.availability, Some(1.0 - 4_500.0 / 144_000.0));
        assert_eq!(k.entrapments, 2);
    }
}
