//! JSON shapes of the API (the OpenAPI schemas), converted from the services' protobuf replies.
//! Enumerations are short lowercase names (`downtime`, `open`, `critical`); times are RFC 3339.

use chrono::{DateTime, Utc};
use liftwire_proto::v1;
use serde::{Deserialize, Serialize};
use serde_json::json;
use utoipa::{IntoParams, ToSchema};

pub use liftwire_proto::timestamp_from_datetime as timestamp;

/// Converts an optional protobuf timestamp.
pub fn time(t: Option<liftwire_proto::Timestamp>) -> Option<DateTime<Utc>> {
    t.as_ref().and_then(liftwire_proto::datetime)
}

/// `FAULT_CODE_DOOR_LOCK` with prefix `FAULT_CODE_` → `door_lock`.
pub fn short(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix)
        .unwrap_or(name)
        .to_ascii_lowercase()
}

/// A half-open time range `[from, to)`.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RangeQuery {
    /// Start (RFC 3339), included.
    pub from: DateTime<Utc>,
    /// End (RFC 3339), excluded.
    pub to: DateTime<Utc>,
}

impl RangeQuery {
    /// Wire form.
    pub fn to_proto(&self) -> Option<v1::TimeRange> {
        Some(v1::TimeRange {
            from: Some(timestamp(self.from)),
            to: Some(timestamp(self.to)),
        })
    }
}

/// Keyset pagination.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct PageQuery {
    /// Items per page (default 100, at most 1000).
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

impl PageQuery {
    /// Wire form.
    pub fn to_proto(&self) -> Option<v1::Page> {
        Some(v1::Page {
            limit: self.limit.unwrap_or(0),
            cursor: self.cursor.clone().unwrap_or_default(),
        })
    }
}

/// A building the caller may see.
#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq, Eq)]
pub struct Building {
    /// Building id.
    pub building_id: String,
    /// Elevators reporting.
    pub elevators: u32,
    /// Elevators in service now.
    pub in_service: u32,
    /// Elevators connected now.
    pub online: u32,
    /// Alerts open or acknowledged.
    pub unresolved_alerts: u32,
}

impl From<v1::BuildingSummary> for Building {
    fn from(b: v1::BuildingSummary) -> Self {
        Building {
            building_id: b.building_id,
            elevators: b.elevators,
            in_service: b.in_service,
            online: b.online,
            unresolved_alerts: b.unresolved_alerts,
        }
    }
}

/// A page of buildings.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct BuildingPage {
    /// Buildings, by id.
    pub items: Vec<Building>,
    /// Cursor of the next page; absent on the last one.
    pub next_cursor: Option<String>,
}

/// One bucket of telemetry (one sample when not downsampled).
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct HistoryBucket {
    /// Bucket start.
    pub start: Option<DateTime<Utc>>,
    /// Samples in the bucket.
    pub samples: u32,
    /// Mode of the last sample, e.g. `normal`.
    pub mode: String,
    /// Floor of the last sample.
    pub floor: i32,
    /// Mean load, % of rated load.
    pub avg_load_percent: f64,
    /// Highest load.
    pub max_load_percent: u32,
    /// Highest speed.
    pub max_speed_mm_s: u32,
    /// Mean motor temperature.
    pub avg_motor_temp_celsius: f64,
    /// Highest motor temperature.
    pub max_motor_temp_celsius: f64,
}

/// Telemetry history of an elevator.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct History {
    /// Buckets, oldest first.
    pub buckets: Vec<HistoryBucket>,
    /// More buckets exist in the range than `limit` allowed.
    pub truncated: bool,
}

impl From<v1::HistoryReply> for History {
    fn from(r: v1::HistoryReply) -> Self {
        History {
            truncated: r.truncated,
            buckets: r
                .buckets
                .into_iter()
                .map(|b| HistoryBucket {
                    start: time(b.start),
                    samples: b.samples,
                    mode: short(b.mode().as_str_name(), "OPERATING_MODE_"),
                    floor: b.floor,
                    avg_load_percent: b.avg_load_percent,
                    max_load_percent: b.max_load_percent,
                    max_speed_mm_s: b.max_speed_mm_s,
                    avg_motor_temp_celsius: b.avg_motor_temp_celsius,
                    max_motor_temp_celsius: b.max_motor_temp_celsius,
                })
                .collect(),
        }
    }
}

/// One elevator event.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Event {
    /// Elevator.
    pub device_id: String,
    /// Its sequence number.
    pub seq: u64,
    /// When it happened.
    pub at: Option<DateTime<Utc>>,
    /// Event kind, e.g. `trip_completed`, `fault_raised`, `entrapment_started`.
    pub kind: String,
    /// The event's fields.
    #[schema(value_type = Object)]
    pub detail: serde_json::Value,
}

fn event_json(event: Option<v1::Event>) -> (String, serde_json::Value) {
    use v1::event::Kind;
    let Some(kind) = event.and_then(|e| e.kind) else {
        return ("unknown".into(), json!({}));
    };
    let (name, detail) = match kind {
        Kind::TripCompleted(t) => (
            "trip_completed",
            json!({"from_floor": t.from_floor, "to_floor": t.to_floor, "duration_ms": t.duration_ms,
                   "distance_mm": t.distance_mm, "levelling_error_mm": t.levelling_error_mm,
                   "door_reopens": t.door_reopens}),
        ),
        Kind::DoorCycle(d) => (
            "door_cycle",
            json!({"door": d.door, "floor": d.floor, "cycle_ms": d.cycle_ms, "reopens": d.reopens}),
        ),
        Kind::FaultRaised(f) => (
            "fault_raised",
            json!({"fault_id": f.fault_id, "code": short(f.code().as_str_name(), "FAULT_CODE_"),
                   "vendor_code": f.vendor_code, "description": f.description, "blocking": f.blocking}),
        ),
        Kind::FaultCleared(f) => (
            "fault_cleared",
            json!({"fault_id": f.fault_id, "code": short(f.code().as_str_name(), "FAULT_CODE_"),
                   "vendor_code": f.vendor_code}),
        ),
        Kind::AlarmButtonPressed(_) => ("alarm_button_pressed", json!({})),
        Kind::AlarmSelfTest(t) => (
            "alarm_self_test",
            json!({"passed": t.passed, "detail": t.detail}),
        ),
        Kind::EntrapmentStarted(e) => (
            "entrapment_started",
            json!({"entrapment_id": e.entrapment_id, "floor": e.floor}),
        ),
        Kind::EntrapmentReleased(e) => (
            "entrapment_released",
            json!({"entrapment_id": e.entrapment_id}),
        ),
        Kind::ModeChanged(m) => (
            "mode_changed",
            json!({"from": short(m.from().as_str_name(), "OPERATING_MODE_"),
                   "to": short(m.to().as_str_name(), "OPERATING_MODE_")}),
        ),
        Kind::PowerLost(_) => ("power_lost", json!({})),
        Kind::PowerRestored(p) => ("power_restored", json!({"lost_at": time(p.lost_at)})),
        Kind::MaintenanceVisitStarted(v) => (
            "maintenance_visit_started",
            json!({"visit_id": v.visit_id, "planned": v.planned, "technician": v.technician}),
        ),
        Kind::MaintenanceVisitEnded(v) => (
            "maintenance_visit_ended",
            json!({"visit_id": v.visit_id, "notes": v.notes}),
        ),
    };
    (name.into(), detail)
}

impl From<v1::EventRecord> for Event {
    fn from(r: v1::EventRecord) -> Self {
        let (kind, detail) = event_json(r.event);
        Event {
            device_id: r.device_id,
            seq: r.seq,
            at: time(r.at),
            kind,
            detail,
        }
    }
}

/// A page of events, newest first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct EventPage {
    /// Events.
    pub items: Vec<Event>,
    /// Cursor of the next page; absent on the last one.
    pub next_cursor: Option<String>,
}

/// A period from start to end.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Incident {
    /// Id.
    pub id: i64,
    /// Elevator.
    pub device_id: String,
    /// `downtime`, `fault`, `entrapment`, `maintenance` or `power_loss`.
    pub kind: String,
    /// Planned maintenance (for downtime: began during a planned visit).
    pub planned: bool,
    /// Downtime cause or fault description.
    pub cause: String,
    /// Controller id (fault, entrapment or visit).
    pub ref_id: String,
    /// Start.
    pub started_at: Option<DateTime<Utc>>,
    /// End; absent while ongoing.
    pub ended_at: Option<DateTime<Utc>>,
    /// Fault class (faults only), e.g. `door_lock`.
    pub code: String,
    /// Vendor fault code (faults only).
    pub vendor_code: String,
}

impl From<v1::Incident> for Incident {
    fn from(i: v1::Incident) -> Self {
        Incident {
            kind: short(i.kind().as_str_name(), "INCIDENT_KIND_"),
            code: short(i.code().as_str_name(), "FAULT_CODE_"),
            id: i.id,
            device_id: i.device_id,
            planned: i.planned,
            cause: i.cause,
            ref_id: i.ref_id,
            started_at: time(i.started_at),
            ended_at: time(i.ended_at),
            vendor_code: i.vendor_code,
        }
    }
}

/// A page of incidents, newest first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct IncidentPage {
    /// Incidents.
    pub items: Vec<Incident>,
    /// Cursor of the next page; absent on the last one.
    pub next_cursor: Option<String>,
}

/// Elevator KPIs over a period (formulas in the README).
#[derive(Debug, Serialize, Deserialize, ToSchema, PartialEq)]
pub struct Kpis {
    /// Elevators counted.
    pub units: u32,
    /// Period, summed over elevators (s).
    pub period_seconds: f64,
    /// Planned maintenance (s).
    pub planned_maintenance_seconds: f64,
    /// Out of service outside planned maintenance (s).
    pub unplanned_downtime_seconds: f64,
    /// 1 − unplanned downtime / (period − planned maintenance).
    pub availability: Option<f64>,
    /// Trips.
    pub trips: u64,
    /// Trips per day.
    pub trips_per_day: f64,
    /// Door cycles.
    pub door_cycles: u64,
    /// Door cycles per day.
    pub door_cycles_per_day: f64,
    /// Out-of-service periods starting outside planned maintenance.
    pub failures: u32,
    /// Mean time between failures (s).
    pub mtbf_seconds: Option<f64>,
    /// Mean time to repair (s).
    pub mttr_seconds: Option<f64>,
    /// Unplanned maintenance visits.
    pub callbacks: u32,
    /// Callbacks per unit per year.
    pub callbacks_per_unit_year: f64,
    /// Entrapments.
    pub entrapments: u32,
    /// Entrapments over the 1-hour limit.
    pub entrapments_over_limit: u32,
    /// Mean release time (s).
    pub mean_release_seconds: Option<f64>,
    /// Longest release time (s).
    pub max_release_seconds: Option<f64>,
    /// Share of the period covered by a passed self-test at most 3 days old.
    pub self_test_compliance: f64,
    /// 95th percentile of the absolute levelling error (mm).
    pub levelling_p95_mm: Option<f64>,
}

impl From<v1::Kpis> for Kpis {
    fn from(k: v1::Kpis) -> Self {
        Kpis {
            units: k.units,
            period_seconds: k.period_seconds,
            planned_maintenance_seconds: k.planned_maintenance_seconds,
            unplanned_downtime_seconds: k.unplanned_downtime_seconds,
            availability: k.availability,
            trips: k.trips,
            trips_per_day: k.trips_per_day,
            door_cycles: k.door_cycles,
            door_cycles_per_day: k.door_cycles_per_day,
            failures: k.failures,
            mtbf_seconds: k.mtbf_seconds,
            mttr_seconds: k.mttr_seconds,
            callbacks: k.callbacks,
            callbacks_per_unit_year: k.callbacks_per_unit_year,
            entrapments: k.entrapments,
            entrapments_over_limit: k.entrapments_over_limit,
            mean_release_seconds: k.mean_release_seconds,
            max_release_seconds: k.max_release_seconds,
            self_test_compliance: k.self_test_compliance,
            levelling_p95_mm: k.levelling_p95_mm,
        }
    }
}

/// One elevator's KPIs.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ElevatorKpis {
    /// Elevator.
    pub device_id: String,
    /// Its KPIs.
    pub kpis: Kpis,
}

/// KPIs of a building and its elevators.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct KpiReport {
    /// Start.
    pub from: DateTime<Utc>,
    /// End (excluded).
    pub to: DateTime<Utc>,
    /// Every elevator counted together.
    pub total: Kpis,
    /// Each elevator.
    pub elevators: Vec<ElevatorKpis>,
}

/// An alert.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Alert {
    /// Id.
    pub id: i64,
    /// Elevator.
    pub device_id: String,
    /// `entrapment`, `out_of_service`, `self_test_missed`, `fault_burst`, `device_offline`.
    pub rule: String,
    /// `open`, `acknowledged` or `resolved`.
    pub state: String,
    /// `warning` or `critical`.
    pub severity: String,
    /// What happened.
    pub summary: String,
    /// Opened at.
    pub opened_at: Option<DateTime<Utc>>,
    /// Last change.
    pub updated_at: Option<DateTime<Utc>>,
    /// Times the condition occurred while unresolved.
    pub occurrences: u32,
}

impl From<v1::Alert> for Alert {
    fn from(a: v1::Alert) -> Self {
        Alert {
            rule: short(a.rule().as_str_name(), "ALERT_RULE_"),
            state: short(a.state().as_str_name(), "ALERT_STATE_"),
            severity: short(a.severity().as_str_name(), "ALERT_SEVERITY_"),
            id: a.id,
            device_id: a.device_id,
            summary: a.summary,
            opened_at: time(a.opened_at),
            updated_at: time(a.updated_at),
            occurrences: a.occurrences,
        }
    }
}

/// One step of an alert's lifecycle.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AlertTransition {
    /// Previous state (absent when opened).
    pub from: Option<String>,
    /// New state.
    pub to: String,
    /// When.
    pub at: Option<DateTime<Utc>>,
    /// `system` or the user who acted.
    pub by: String,
    /// Note.
    pub note: String,
}

/// An alert with its history.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AlertDetail {
    /// The alert.
    pub alert: Alert,
    /// Its transitions, oldest first.
    pub transitions: Vec<AlertTransition>,
}

impl TryFrom<v1::AlertReply> for AlertDetail {
    type Error = crate::problem::ApiError;

    fn try_from(r: v1::AlertReply) -> Result<Self, Self::Error> {
        Ok(AlertDetail {
            alert: r.alert.ok_or(crate::problem::ApiError::Unavailable)?.into(),
            transitions: r
                .transitions
                .into_iter()
                .map(|t| AlertTransition {
                    from: (t.from != 0).then(|| short(t.from().as_str_name(), "ALERT_STATE_")),
                    to: short(t.to().as_str_name(), "ALERT_STATE_"),
                    at: time(t.at),
                    by: t.by,
                    note: t.note,
                })
                .collect(),
        })
    }
}

/// A page of alerts, newest first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct AlertPage {
    /// Alerts.
    pub items: Vec<Alert>,
    /// Cursor of the next page; absent on the last one.
    pub next_cursor: Option<String>,
}

/// Body of acknowledge and resolve.
#[derive(Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AlertAction {
    /// Free-form note kept with the transition (at most 1000 characters).
    #[serde(default)]
    pub note: String,
}

/// `None` for an empty cursor.
pub fn next(cursor: String) -> Option<String> {
    (!cursor.is_empty()).then_some(cursor)
}
