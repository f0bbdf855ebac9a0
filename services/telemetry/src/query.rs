//! Request/reply endpoints on NATS for what the dashboard API needs (`lw.v1.svc.telemetry.*`),
//! served with the NATS service API; replicas share them through the queue group "telemetry".
//! The API never reads this service's tables. Every request names its building and is answered
//! only with that building's data: an elevator or alert of another building is "not found".

use std::time::Duration;

use chrono::{DateTime, Utc};
use liftwire_proto::naming::{service_subject, BuildingId, DeviceId};
use liftwire_proto::{v1, Message};
use liftwire_runtime::endpoints::{self, paginate, EndpointError};
use liftwire_runtime::service::BoxError;
use tokio_util::sync::CancellationToken;

use crate::alerts::{self, AlertRow, TransitionError, ALERT_COLUMNS};
use crate::kpi;
use crate::state::{datetime, timestamp, IncidentKind};

/// Service name in the NATS service API.
pub const SERVICE: &str = "telemetry";
/// Most history buckets (or raw samples) per request.
pub const MAX_BUCKETS: u32 = 10_000;
/// Longest range a request may cover.
pub const MAX_RANGE: Duration = Duration::from_secs(400 * 86_400);

/// The endpoints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// [`v1::LiveStateRequest`] → [`v1::LiveStateReply`].
    LiveState,
    /// [`v1::HistoryRequest`] → [`v1::HistoryReply`].
    History,
    /// [`v1::EventsRequest`] → [`v1::EventsReply`].
    Events,
    /// [`v1::IncidentsRequest`] → [`v1::IncidentsReply`].
    Incidents,
    /// [`v1::KpiRequest`] → [`v1::KpiReply`].
    Kpis,
    /// [`v1::AlertsRequest`] → [`v1::AlertsReply`].
    Alerts,
    /// [`v1::AlertRequest`] → [`v1::AlertReply`].
    Alert,
    /// [`v1::AlertTransitionRequest`] → [`v1::AlertReply`].
    AlertTransition,
    /// [`v1::BuildingsRequest`] → [`v1::BuildingsReply`].
    Buildings,
}

impl Endpoint {
    /// Every endpoint.
    pub const ALL: [Endpoint; 9] = [
        Endpoint::Buildings,
        Endpoint::LiveState,
        Endpoint::History,
        Endpoint::Events,
        Endpoint::Incidents,
        Endpoint::Kpis,
        Endpoint::Alerts,
        Endpoint::Alert,
        Endpoint::AlertTransition,
    ];

    /// Endpoint name (last subject token).
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::LiveState => "live-state",
            Endpoint::History => "history",
            Endpoint::Events => "events",
            Endpoint::Incidents => "incidents",
            Endpoint::Kpis => "kpis",
            Endpoint::Alerts => "alerts",
            Endpoint::Alert => "alert",
            Endpoint::AlertTransition => "alert-transition",
            Endpoint::Buildings => "buildings",
        }
    }

    /// Request subject.
    pub fn subject(self) -> String {
        service_subject(SERVICE, self.name()).unwrap_or_default()
    }
}

/// Why a request failed; maps onto the NATS service error code.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// The request is malformed or out of bounds (400).
    #[error("bad request: {0}")]
    BadRequest(String),
    /// Nothing of that id in this building (404).
    #[error("not found: {0}")]
    NotFound(String),
    /// The change conflicts with the current state (409).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The database failed (503; details are logged, not returned).
    #[error("unavailable")]
    Unavailable(#[source] sqlx::Error),
}

impl QueryError {
    /// NATS service error code.
    pub fn code(&self) -> usize {
        match self {
            QueryError::BadRequest(_) => 400,
            QueryError::NotFound(_) => 404,
            QueryError::Conflict(_) => 409,
            QueryError::Unavailable(_) => 503,
        }
    }
}

impl From<QueryError> for EndpointError {
    fn from(e: QueryError) -> Self {
        match e {
            QueryError::BadRequest(m) => EndpointError::bad_request(m),
            QueryError::NotFound(m) => EndpointError::not_found(m),
            QueryError::Conflict(m) => EndpointError::conflict(m),
            QueryError::Unavailable(source) => EndpointError::unavailable(&source),
        }
    }
}

impl From<sqlx::Error> for QueryError {
    fn from(e: sqlx::Error) -> Self {
        QueryError::Unavailable(e)
    }
}

fn bad(what: impl std::fmt::Display) -> QueryError {
    QueryError::BadRequest(what.to_string())
}

/// What the handlers need.
#[derive(Debug, Clone)]
pub struct Queries {
    /// The service's database.
    pub pool: sqlx::PgPool,
    /// Self-test period of the compliance KPI.
    pub self_test_every: Duration,
    /// To announce alert changes made through `alert-transition`.
    pub nats: async_nats::Client,
}

fn building(id: &str) -> Result<BuildingId, QueryError> {
    BuildingId::new(id).map_err(|e| bad(format!("building_id: {e}")))
}

fn range(range: &Option<v1::TimeRange>) -> Result<(DateTime<Utc>, DateTime<Utc>), QueryError> {
    let range = range.as_ref().ok_or_else(|| bad("range is required"))?;
    let from = range.from.as_ref().and_then(datetime);
    let to = range.to.as_ref().and_then(datetime);
    let (Some(from), Some(to)) = (from, to) else {
        return Err(bad("range needs both from and to"));
    };
    if from >= to {
        return Err(bad("range is empty: from must be before to"));
    }
    if (to - from).to_std().unwrap_or(Duration::MAX) > MAX_RANGE {
        return Err(bad(format!(
            "range is longer than {} days",
            MAX_RANGE.as_secs() / 86_400
        )));
    }
    Ok((from, to))
}

fn page_limit(page: &Option<v1::Page>) -> Result<i64, QueryError> {
    endpoints::page_limit(page.as_ref().map(|p| p.limit)).map_err(bad)
}

fn cursor(page: &Option<v1::Page>) -> &str {
    page.as_ref().map_or("", |p| p.cursor.as_str())
}

/// Checks that `device` is an elevator of `building`; an empty id means "every elevator".
async fn elevators(
    pool: &sqlx::PgPool,
    building: &BuildingId,
    device: &str,
) -> Result<Vec<String>, QueryError> {
    if !device.is_empty() {
        DeviceId::new(device).map_err(|e| bad(format!("device_id: {e}")))?;
    }
    let ids: Vec<(String,)> = sqlx::query_as(
        "SELECT device_id FROM elevator_state
         WHERE building_id = $1 AND ($2 = '' OR device_id = $2) ORDER BY device_id",
    )
    .bind(building.as_str())
    .bind(device)
    .fetch_all(pool)
    .await?;
    if !device.is_empty() && ids.is_empty() {
        return Err(QueryError::NotFound(format!(
            "no elevator {device} in building {building}"
        )));
    }
    Ok(ids.into_iter().map(|(d,)| d).collect())
}

/// Every elevator of `building`, by device id, with its presence.
pub async fn live_state(
    pool: &sqlx::PgPool,
    building: &BuildingId,
) -> Result<Vec<v1::ElevatorState>, sqlx::Error> {
    type StateRow = (Vec<u8>, Option<bool>, Option<DateTime<Utc>>);
    let rows: Vec<StateRow> = sqlx::query_as(
        "SELECT s.state, p.online, CASE WHEN p.lost THEN p.lost_at ELSE p.at END
         FROM elevator_state s
         LEFT JOIN device_presence p ON p.device_id = s.device_id
         WHERE s.building_id = $1 ORDER BY s.device_id",
    )
    .bind(building.as_str())
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(bytes, online, at)| {
            let mut state = v1::ElevatorState::decode(bytes.as_slice()).ok()?;
            state.online = online.unwrap_or(false);
            state.presence_at = at.map(timestamp);
            Some(state)
        })
        .collect())
}

async fn history(q: &Queries, r: v1::HistoryRequest) -> Result<v1::HistoryReply, QueryError> {
    let building = building(&r.building_id)?;
    if r.device_id.is_empty() {
        return Err(bad("device_id is required"));
    }
    let device = elevators(&q.pool, &building, &r.device_id).await?;
    let (from, to) = range(&r.range)?;
    if r.limit > MAX_BUCKETS {
        return Err(bad(format!("limit is at most {MAX_BUCKETS}")));
    }
    let limit = i64::from(if r.limit == 0 { 1_000 } else { r.limit });
    // Buckets are aggregated over the whole range before the limit applies: a range of more
    // buckets than can ever be returned is refused rather than computed and cut.
    let span = (to - from).num_seconds();
    if r.bucket_seconds > 0 && span / i64::from(r.bucket_seconds) > i64::from(MAX_BUCKETS) {
        return Err(bad(format!(
            "range holds more than {MAX_BUCKETS} buckets of {} s: widen the buckets or narrow the range",
            r.bucket_seconds
        )));
    }
    type Bucket = (
        DateTime<Utc>,
        i64,
        Option<i16>,
        Option<i32>,
        Option<f64>,
        Option<i16>,
        Option<i32>,
        Option<f64>,
        Option<f64>,
    );
    // Raw samples read the device's index in time order and stop at the limit.
    let query = if r.bucket_seconds == 0 {
        "SELECT at, 1::int8, mode, floor, load_percent::float8, load_percent, speed_mm_s,
                motor_temp_decicelsius::float8 / 10, motor_temp_decicelsius::float8 / 10
         FROM device_messages
         WHERE device_id = $1 AND kind = 'telemetry' AND at >= $2 AND at < $3 AND $4 = 0
         ORDER BY at, seq
         LIMIT $5"
    } else {
        "SELECT date_bin(make_interval(secs => $4), at, TIMESTAMPTZ 'epoch') AS bucket,
                count(*),
                (array_agg(mode ORDER BY at DESC))[1],
                (array_agg(floor ORDER BY at DESC))[1],
                avg(load_percent)::float8,
                max(load_percent),
                max(speed_mm_s),
                avg(motor_temp_decicelsius)::float8 / 10,
                max(motor_temp_decicelsius)::float8 / 10
         FROM device_messages
         WHERE device_id = $1 AND kind = 'telemetry' AND at >= $2 AND at < $3
         GROUP BY bucket
         ORDER BY bucket
         LIMIT $5"
    };
    let rows: Vec<Bucket> = sqlx::query_as(query)
        .bind(&device[0])
        .bind(from)
        .bind(to)
        .bind(f64::from(r.bucket_seconds))
        .bind(limit + 1)
        .fetch_all(&q.pool)
        .await?;
    let truncated = rows.len() as i64 > limit;
    let buckets = rows
        .into_iter()
        .take(usize::try_from(limit).unwrap_or(usize::MAX))
        .map(
            |(start, samples, mode, floor, avg_load, max_load, max_speed, avg_temp, max_temp)| {
                v1::HistoryBucket {
                    start: Some(timestamp(start)),
                    samples: u32::try_from(samples).unwrap_or(u32::MAX),
                    mode: mode.map_or(0, i32::from),
                    floor: floor.unwrap_or(0),
                    avg_load_percent: avg_load.unwrap_or(0.0),
                    max_load_percent: max_load.map_or(0, |l| u32::try_from(l).unwrap_or(0)),
                    max_speed_mm_s: max_speed.map_or(0, |s| u32::try_from(s).unwrap_or(0)),
                    avg_motor_temp_celsius: avg_temp.unwrap_or(0.0),
                    max_motor_temp_celsius: max_temp.unwrap_or(0.0),
                }
            },
        )
        .collect();
    Ok(v1::HistoryReply { buckets, truncated })
}

/// Cursor of the events list: the last item's (time in µs, device, seq).
fn parse_event_cursor(cursor: &str) -> Result<Option<(DateTime<Utc>, String, i64)>, QueryError> {
    if cursor.is_empty() {
        return Ok(None);
    }
    let invalid = || bad("invalid cursor");
    let mut parts = cursor.splitn(3, '.');
    let micros: i64 = parts
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(invalid)?;
    let device = parts.next().ok_or_else(invalid)?.to_string();
    let seq: i64 = parts
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(invalid)?;
    let at = DateTime::from_timestamp_micros(micros).ok_or_else(invalid)?;
    Ok(Some((at, device, seq)))
}

async fn events(q: &Queries, r: v1::EventsRequest) -> Result<v1::EventsReply, QueryError> {
    let building = building(&r.building_id)?;
    let devices = elevators(&q.pool, &building, &r.device_id).await?;
    let (from, to) = range(&r.range)?;
    let limit = page_limit(&r.page)?;
    let after = parse_event_cursor(cursor(&r.page))?;
    // The first page starts below (to, '', 0), which every row in the range is (`at < to`):
    // one bound for every page, so that even a generic plan reads the index from the cursor.
    let (c_at, c_device, c_seq) = after.unwrap_or((to, String::new(), 0));
    let rows: Vec<(String, i64, DateTime<Utc>, Vec<u8>)> = sqlx::query_as(
        "SELECT device_id, seq, at, payload FROM device_messages
         WHERE building_id = $8 AND kind = 'event' AND device_id = ANY($1)
           AND at >= $2 AND at < $3
           AND (at, device_id, seq) < ($5, $4, $6)
         ORDER BY at DESC, device_id DESC, seq DESC
         LIMIT $7",
    )
    .bind(&devices)
    .bind(from)
    .bind(to)
    .bind(&c_device)
    .bind(c_at)
    .bind(c_seq)
    .bind(limit + 1)
    .bind(building.as_str())
    .fetch_all(&q.pool)
    .await?;
    let (rows, next_cursor) = paginate(rows, limit, |(device, seq, at, _)| {
        format!("{}.{device}.{seq}", at.timestamp_micros())
    });
    let events = rows
        .into_iter()
        .map(|(device_id, seq, at, payload)| v1::EventRecord {
            device_id,
            seq: u64::try_from(seq).unwrap_or(0),
            at: Some(timestamp(at)),
            event: v1::Envelope::decode(payload.as_slice())
                .ok()
                .and_then(|e| match e.body {
                    Some(v1::envelope::Body::Event(event)) => Some(event),
                    _ => None,
                }),
        })
        .collect();
    Ok(v1::EventsReply {
        events,
        next_cursor,
    })
}

fn id_cursor(cursor: &str) -> Result<i64, QueryError> {
    if cursor.is_empty() {
        return Ok(i64::MAX);
    }
    cursor.parse().map_err(|_| bad("invalid cursor"))
}

type IncidentRow = (
    i64,
    String,
    String,
    String,
    bool,
    String,
    String,
    DateTime<Utc>,
    Option<DateTime<Utc>>,
    i32,
    String,
);

async fn incidents(q: &Queries, r: v1::IncidentsRequest) -> Result<v1::IncidentsReply, QueryError> {
    let building = building(&r.building_id)?;
    let devices = elevators(&q.pool, &building, &r.device_id).await?;
    let (from, to) = range(&r.range)?;
    let limit = page_limit(&r.page)?;
    let before = id_cursor(cursor(&r.page))?;
    let kind = match v1::IncidentKind::try_from(r.kind) {
        Ok(v1::IncidentKind::Unspecified) => "",
        Ok(v1::IncidentKind::Downtime) => IncidentKind::Downtime.as_str(),
        Ok(v1::IncidentKind::Fault) => IncidentKind::Fault.as_str(),
        Ok(v1::IncidentKind::Entrapment) => IncidentKind::Entrapment.as_str(),
        Ok(v1::IncidentKind::Maintenance) => IncidentKind::Maintenance.as_str(),
        Ok(v1::IncidentKind::PowerLoss) => IncidentKind::PowerLoss.as_str(),
        Err(_) => return Err(bad("unknown incident kind")),
    };
    let rows: Vec<IncidentRow> = sqlx::query_as(
        "SELECT id, device_id, building_id, kind, planned, cause, ref_id, started_at, ended_at,
                code, vendor_code
         FROM incidents
         WHERE device_id = ANY($1) AND started_at < $3 AND (ended_at IS NULL OR ended_at > $2)
           AND ($4 = '' OR kind = $4) AND (NOT $5 OR ended_at IS NULL) AND id < $6
         ORDER BY id DESC LIMIT $7",
    )
    .bind(&devices)
    .bind(from)
    .bind(to)
    .bind(kind)
    .bind(r.open_only)
    .bind(before)
    .bind(limit + 1)
    .fetch_all(&q.pool)
    .await?;
    let incidents: Vec<v1::Incident> = rows
        .into_iter()
        .map(
            |(
                id,
                device_id,
                building_id,
                kind,
                planned,
                cause,
                ref_id,
                start,
                end,
                code,
                vendor,
            )| {
                v1::Incident {
                    id,
                    device_id,
                    building_id,
                    kind: IncidentKind::parse(&kind)
                        .map_or(v1::IncidentKind::Unspecified, |k| k.to_proto())
                        as i32,
                    planned,
                    cause,
                    ref_id,
                    started_at: Some(timestamp(start)),
                    ended_at: end.map(timestamp),
                    code,
                    vendor_code: vendor,
                }
            },
        )
        .collect();
    let (incidents, next_cursor) = paginate(incidents, limit, |i| i.id.to_string());
    Ok(v1::IncidentsReply {
        incidents,
        next_cursor,
    })
}

async fn kpis(q: &Queries, r: v1::KpiRequest) -> Result<v1::KpiReply, QueryError> {
    let building = building(&r.building_id)?;
    let devices = elevators(&q.pool, &building, &r.device_id).await?;
    let (from, to) = range(&r.range)?;
    let (facts, overall_p95) =
        kpi::load_facts(&q.pool, &devices, from, to, q.self_test_every).await?;
    let now = Utc::now();
    let mut total = kpi::Totals::default();
    let mut elevators = Vec::with_capacity(devices.len());
    for device in &devices {
        let facts = facts.get(device).cloned().unwrap_or_default();
        let totals = kpi::elevator_totals(&facts, from, to, now, q.self_test_every);
        total.add(&totals);
        elevators.push(v1::ElevatorKpis {
            device_id: device.clone(),
            kpis: Some(totals.kpis()),
        });
    }
    total.levelling_p95_mm = overall_p95;
    Ok(v1::KpiReply {
        total: Some(total.kpis()),
        elevators,
    })
}

async fn alert_list(q: &Queries, r: v1::AlertsRequest) -> Result<v1::AlertsReply, QueryError> {
    let building = building(&r.building_id)?;
    if !r.device_id.is_empty() {
        elevators(&q.pool, &building, &r.device_id).await?;
    }
    let limit = page_limit(&r.page)?;
    let before = id_cursor(cursor(&r.page))?;
    let states = r
        .states
        .iter()
        .map(|s| {
            v1::AlertState::try_from(*s)
                .ok()
                .and_then(alerts::state_str)
                .ok_or_else(|| bad("unknown alert state"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let rows: Vec<AlertRow> = sqlx::query_as(&format!(
        "SELECT {ALERT_COLUMNS} FROM alerts
         WHERE building_id = $1 AND ($2 = '' OR device_id = $2)
           AND (cardinality($3::text[]) = 0 OR state = ANY($3)) AND id < $4
         ORDER BY id DESC LIMIT $5"
    ))
    .bind(building.as_str())
    .bind(&r.device_id)
    .bind(&states)
    .bind(before)
    .bind(limit + 1)
    .fetch_all(&q.pool)
    .await?;
    let alerts: Vec<v1::Alert> = rows.iter().map(AlertRow::to_proto).collect();
    let (alerts, next_cursor) = paginate(alerts, limit, |a| a.id.to_string());
    Ok(v1::AlertsReply {
        alerts,
        next_cursor,
    })
}

async fn alert_with_transitions(
    pool: &sqlx::PgPool,
    building: &BuildingId,
    id: i64,
) -> Result<v1::AlertReply, QueryError> {
    let alert: Option<AlertRow> = sqlx::query_as(&format!(
        "SELECT {ALERT_COLUMNS} FROM alerts WHERE id = $1 AND building_id = $2"
    ))
    .bind(id)
    .bind(building.as_str())
    .fetch_optional(pool)
    .await?;
    let alert = alert
        .ok_or_else(|| QueryError::NotFound(format!("no alert {id} in building {building}")))?;
    type TransitionRow = (Option<String>, String, DateTime<Utc>, String, String);
    let transitions: Vec<TransitionRow> = sqlx::query_as(
        "SELECT from_state, to_state, at, by_whom, note FROM alert_transitions
             WHERE alert_id = $1 ORDER BY at, to_state",
    )
    .bind(id)
    .fetch_all(pool)
    .await?;
    Ok(v1::AlertReply {
        alert: Some(alert.to_proto()),
        transitions: transitions
            .into_iter()
            .map(|(from, to, at, by, note)| v1::AlertTransition {
                alert_id: id,
                from: from.map_or(v1::AlertState::Unspecified, |f| alerts::state_from_str(&f))
                    as i32,
                to: alerts::state_from_str(&to) as i32,
                at: Some(timestamp(at)),
                by,
                note,
            })
            .collect(),
    })
}

async fn alert_transition(
    q: &Queries,
    r: v1::AlertTransitionRequest,
) -> Result<v1::AlertReply, QueryError> {
    let building = building(&r.building_id)?;
    if r.by.is_empty() {
        return Err(bad("by (who acts) is required"));
    }
    let to = v1::AlertState::try_from(r.to).map_err(|_| bad("unknown alert state"))?;
    let change = alerts::transition(&q.pool, building.as_str(), r.alert_id, to, &r.by, &r.note)
        .await
        .map_err(|e| match e {
            TransitionError::NotFound(_) => QueryError::NotFound(e.to_string()),
            TransitionError::BadTarget => bad(e),
            TransitionError::AlreadyResolved(_) => QueryError::Conflict(e.to_string()),
            TransitionError::Database(e) => QueryError::Unavailable(e),
        })?;
    if change.transition.is_some() {
        alerts::announce(&q.nats, &change).await;
    }
    alert_with_transitions(&q.pool, &building, r.alert_id).await
}

async fn buildings(q: &Queries, r: v1::BuildingsRequest) -> Result<v1::BuildingsReply, QueryError> {
    for id in &r.building_ids {
        building(id)?;
    }
    let limit = page_limit(&r.page)?;
    type SummaryRow = (String, i64, i64, i64, i64);
    let rows: Vec<SummaryRow> = sqlx::query_as(
        "SELECT s.building_id, count(*),
                count(*) FILTER (WHERE s.out_of_service_since IS NULL),
                count(*) FILTER (WHERE p.online),
                (SELECT count(*) FROM alerts a
                 WHERE a.building_id = s.building_id AND a.state <> 'resolved')
         FROM elevator_state s LEFT JOIN device_presence p ON p.device_id = s.device_id
         WHERE (cardinality($1::text[]) = 0 OR s.building_id = ANY($1)) AND s.building_id > $2
         GROUP BY s.building_id ORDER BY s.building_id LIMIT $3",
    )
    .bind(&r.building_ids)
    .bind(cursor(&r.page))
    .bind(limit + 1)
    .fetch_all(&q.pool)
    .await?;
    let count = |n: i64| u32::try_from(n).unwrap_or(u32::MAX);
    let buildings: Vec<v1::BuildingSummary> = rows
        .into_iter()
        .map(
            |(building_id, elevators, in_service, online, alerts)| v1::BuildingSummary {
                building_id,
                elevators: count(elevators),
                in_service: count(in_service),
                online: count(online),
                unresolved_alerts: count(alerts),
            },
        )
        .collect();
    let (buildings, next_cursor) = paginate(buildings, limit, |b| b.building_id.clone());
    Ok(v1::BuildingsReply {
        buildings,
        next_cursor,
    })
}

fn decode<M: Message + Default>(payload: &[u8]) -> Result<M, QueryError> {
    M::decode(payload).map_err(|e| bad(format!("payload: {e}")))
}

/// Answers one request.
pub async fn handle(
    q: &Queries,
    endpoint: Endpoint,
    payload: &[u8],
) -> Result<Vec<u8>, QueryError> {
    Ok(match endpoint {
        Endpoint::LiveState => {
            let r: v1::LiveStateRequest = decode(payload)?;
            let building = building(&r.building_id)?;
            v1::LiveStateReply {
                elevators: live_state(&q.pool, &building).await?,
            }
            .encode_to_vec()
        }
        Endpoint::History => history(q, decode(payload)?).await?.encode_to_vec(),
        Endpoint::Events => events(q, decode(payload)?).await?.encode_to_vec(),
        Endpoint::Incidents => incidents(q, decode(payload)?).await?.encode_to_vec(),
        Endpoint::Kpis => kpis(q, decode(payload)?).await?.encode_to_vec(),
        Endpoint::Alerts => alert_list(q, decode(payload)?).await?.encode_to_vec(),
        Endpoint::Alert => {
            let r: v1::AlertRequest = decode(payload)?;
            let building = building(&r.building_id)?;
            alert_with_transitions(&q.pool, &building, r.alert_id)
                .await?
                .encode_to_vec()
        }
        Endpoint::AlertTransition => alert_transition(q, decode(payload)?).await?.encode_to_vec(),
        Endpoint::Buildings => buildings(q, decode(payload)?).await?.encode_to_vec(),
    })
}

/// Serves the endpoints until `shutdown`; requests in progress are answered before returning.
pub async fn serve(q: Queries, shutdown: CancellationToken) -> Result<(), BoxError> {
    let names: Vec<&'static str> = Endpoint::ALL.iter().map(|e| e.name()).collect();
    let nats = q.nats.clone();
    let handler = move |name: String, payload: bytes::Bytes| -> endpoints::Answer {
        let q = q.clone();
        Box::pin(async move {
            let endpoint = Endpoint::ALL
                .into_iter()
                .find(|e| e.name() == name)
                .ok_or_else(|| EndpointError::not_found(name.as_str()))?;
            handle(&q, endpoint, &payload).await.map_err(Into::into)
        })
    };
    endpoints::serve(
        nats,
        SERVICE,
        "liftwire telemetry: live state, history, events, incidents, KPIs, alerts",
        &names,
        handler,
        shutdown,
    )
    .await
}
