//! The building-scoped routes. Each handler checks the token's scope for the building in the
//! path first, then validates, then forwards to the owning service, which only ever answers with
//! that building's data (so ids of another building are "not found", never leaked).

use axum::extract::State;
use axum::http::StatusCode;
use liftwire_proto::naming::BuildingId;
use liftwire_proto::v1;
use serde::Deserialize;
use utoipa::IntoParams;

use crate::auth::{Principal, Role};
use crate::backend::ask;
use crate::dto::{self, next, PageQuery, RangeQuery};
use crate::extract::{Json, Path, Query};
use crate::problem::{ApiError, Problem};
use crate::AppState;

const TELEMETRY: &str = "telemetry";
/// Longest note on an alert transition.
pub const MAX_NOTE: usize = 1_000;

/// Parses the building in the path and checks the caller may read it.
pub fn readable(principal: &Principal, building: String) -> Result<BuildingId, ApiError> {
    let building = BuildingId::new(building)
        .map_err(|e| ApiError::BadRequest(format!("invalid building id: {e}")))?;
    if !principal.may_read(&building) {
        return Err(ApiError::Forbidden);
    }
    Ok(building)
}

/// Parses the building in the path and checks the caller may act on it.
pub fn operable(principal: &Principal, building: String) -> Result<BuildingId, ApiError> {
    let building = readable(principal, building)?;
    if !principal.may_operate(&building) {
        return Err(ApiError::Forbidden);
    }
    Ok(building)
}

/// `GET /api/v1/buildings`: the buildings in the caller's scope.
#[utoipa::path(get, path = "/api/v1/buildings", params(PageQuery),
    responses((status = 200, body = dto::BuildingPage), (status = "4XX", body = Problem)),
    security(("bearer" = [])), tag = "buildings")]
pub async fn buildings(
    principal: Principal,
    State(state): State<AppState>,
    Query(page): Query<PageQuery>,
) -> Result<axum::Json<dto::BuildingPage>, ApiError> {
    let building_ids = match principal.role {
        Role::Admin => Vec::new(),
        _ if principal.buildings.is_empty() => {
            return Ok(axum::Json(dto::BuildingPage {
                items: Vec::new(),
                next_cursor: None,
            }))
        }
        _ => principal
            .buildings
            .iter()
            .map(ToString::to_string)
            .collect(),
    };
    let reply: v1::BuildingsReply = ask(
        &state.nats,
        TELEMETRY,
        "buildings",
        &v1::BuildingsRequest {
            building_ids,
            page: page.to_proto(),
        },
    )
    .await?;
    Ok(axum::Json(dto::BuildingPage {
        items: reply.buildings.into_iter().map(Into::into).collect(),
        next_cursor: next(reply.next_cursor),
    }))
}

/// Query of the history route.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct HistoryQuery {
    /// Start (RFC 3339), included.
    pub from: chrono::DateTime<chrono::Utc>,
    /// End (RFC 3339), excluded.
    pub to: chrono::DateTime<chrono::Utc>,
    /// Bucket length in seconds (absent or 0: raw samples).
    pub bucket_seconds: Option<u32>,
    /// Most buckets (default 1000, at most 10000).
    pub limit: Option<u32>,
}

/// `GET /api/v1/buildings/{building}/elevators/{elevator}/history`.
#[utoipa::path(get, path = "/api/v1/buildings/{building}/elevators/{elevator}/history",
    params(("building" = String, Path), ("elevator" = String, Path), HistoryQuery),
    responses((status = 200, body = dto::History), (status = "4XX", body = Problem)),
    security(("bearer" = [])), tag = "elevators")]
pub async fn history(
    principal: Principal,
    State(state): State<AppState>,
    Path((building, elevator)): Path<(String, String)>,
    Query(q): Query<HistoryQuery>,
) -> Result<axum::Json<dto::History>, ApiError> {
    let building = readable(&principal, building)?;
    let reply: v1::HistoryReply = ask(
        &state.nats,
        TELEMETRY,
        "history",
        &v1::HistoryRequest {
            building_id: building.to_string(),
            device_id: elevator,
            range: RangeQuery {
                from: q.from,
                to: q.to,
            }
            .to_proto(),
            bucket_seconds: q.bucket_seconds.unwrap_or(0),
            limit: q.limit.unwrap_or(0),
        },
    )
    .await?;
    Ok(axum::Json(reply.into()))
}

/// Query of the events route.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventsQuery {
    /// Start (RFC 3339), included.
    pub from: chrono::DateTime<chrono::Utc>,
    /// End (RFC 3339), excluded.
    pub to: chrono::DateTime<chrono::Utc>,
    /// Only this elevator.
    pub elevator: Option<String>,
    /// Items per page (default 100, at most 1000).
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// `GET /api/v1/buildings/{building}/events`.
#[utoipa::path(get, path = "/api/v1/buildings/{building}/events",
    params(("building" = String, Path), EventsQuery),
    responses((status = 200, body = dto::EventPage), (status = "4XX", body = Problem)),
    security(("bearer" = [])), tag = "elevators")]
pub async fn events(
    principal: Principal,
    State(state): State<AppState>,
    Path(building): Path<String>,
    Query(q): Query<EventsQuery>,
) -> Result<axum::Json<dto::EventPage>, ApiError> {
    let building = readable(&principal, building)?;
    let reply: v1::EventsReply = ask(
        &state.nats,
        TELEMETRY,
        "events",
        &v1::EventsRequest {
            building_id: building.to_string(),
            device_id: q.elevator.unwrap_or_default(),
            range: RangeQuery {
                from: q.from,
                to: q.to,
            }
            .to_proto(),
            page: PageQuery {
                limit: q.limit,
                cursor: q.cursor,
            }
            .to_proto(),
        },
    )
    .await?;
    Ok(axum::Json(dto::EventPage {
        items: reply.events.into_iter().map(Into::into).collect(),
        next_cursor: next(reply.next_cursor),
    }))
}

/// Query of the incidents route.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct IncidentsQuery {
    /// Start (RFC 3339): incidents still going on after it.
    pub from: chrono::DateTime<chrono::Utc>,
    /// End (RFC 3339): incidents started before it.
    pub to: chrono::DateTime<chrono::Utc>,
    /// Only this elevator.
    pub elevator: Option<String>,
    /// Only this kind: `downtime`, `fault`, `entrapment`, `maintenance`, `power_loss`.
    pub kind: Option<String>,
    /// Only incidents still open.
    pub open: Option<bool>,
    /// Items per page (default 100, at most 1000).
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

/// `GET /api/v1/buildings/{building}/incidents`.
#[utoipa::path(get, path = "/api/v1/buildings/{building}/incidents",
    params(("building" = String, Path), IncidentsQuery),
    responses((status = 200, body = dto::IncidentPage), (status = "4XX", body = Problem)),
    security(("bearer" = [])), tag = "elevators")]
pub async fn incidents(
    principal: Principal,
    State(state): State<AppState>,
    Path(building): Path<String>,
    Query(q): Query<IncidentsQuery>,
) -> Result<axum::Json<dto::IncidentPage>, ApiError> {
    let building = readable(&principal, building)?;
    let kind = match q.kind.as_deref() {
        None => v1::IncidentKind::Unspecified,
        Some(kind) => {
            v1::IncidentKind::from_str_name(&format!("INCIDENT_KIND_{}", kind.to_uppercase()))
                .filter(|k| *k != v1::IncidentKind::Unspecified)
                .ok_or_else(|| ApiError::BadRequest(format!("unknown incident kind {kind:?}")))?
        }
    };
    let reply: v1::IncidentsReply = ask(
        &state.nats,
        TELEMETRY,
        "incidents",
        &v1::IncidentsRequest {
            building_id: building.to_string(),
            device_id: q.elevator.unwrap_or_default(),
            range: RangeQuery {
                from: q.from,
                to: q.to,
            }
            .to_proto(),
            kind: kind as i32,
            open_only: q.open.unwrap_or(false),
            page: PageQuery {
                limit: q.limit,
                cursor: q.cursor,
            }
            .to_proto(),
        },
    )
    .await?;
    Ok(axum::Json(dto::IncidentPage {
        items: reply.incidents.into_iter().map(Into::into).collect(),
        next_cursor: next(reply.next_cursor),
    }))
}

/// Query of the KPI route.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct KpiQuery {
    /// Start (RFC 3339), included.
    pub from: chrono::DateTime<chrono::Utc>,
    /// End (RFC 3339), excluded.
    pub to: chrono::DateTime<chrono::Utc>,
    /// Only this elevator.
    pub elevator: Option<String>,
}

/// `GET /api/v1/buildings/{building}/kpis`.
#[utoipa::path(get, path = "/api/v1/buildings/{building}/kpis",
    params(("building" = String, Path), KpiQuery),
    responses((status = 200, body = dto::KpiReport), (status = "4XX", body = Problem)),
    security(("bearer" = [])), tag = "elevators")]
pub async fn kpis(
    principal: Principal,
    State(state): State<AppState>,
    Path(building): Path<String>,
    Query(q): Query<KpiQuery>,
) -> Result<axum::Json<dto::KpiReport>, ApiError> {
    let building = readable(&principal, building)?;
    let reply: v1::KpiReply = ask(
        &state.nats,
        TELEMETRY,
        "kpis",
        &v1::KpiRequest {
            building_id: building.to_string(),
            device_id: q.elevator.unwrap_or_default(),
            range: RangeQuery {
                from: q.from,
                to: q.to,
            }
            .to_proto(),
        },
    )
    .await?;
    Ok(axum::Json(dto::KpiReport {
        from: q.from,
        to: q.to,
        total: reply.total.ok_or(ApiError::Unavailable)?.into(),
        elevators: reply
            .elevators
            .into_iter()
            .map(|e| dto::ElevatorKpis {
                device_id: e.device_id,
                kpis: e.kpis.unwrap_or_default().into(),
            })
            .collect(),
    }))
}

/// Query of the alert list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct AlertsQuery {
    /// Comma-separated states: `open`, `acknowledged`, `resolved` (absent: all).
    pub state: Option<String>,
    /// Only this elevator.
    pub elevator: Option<String>,
    /// Items per page (default 100, at most 1000).
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

fn alert_state(name: &str) -> Result<v1::AlertState, ApiError> {
    v1::AlertState::from_str_name(&format!("ALERT_STATE_{}", name.trim().to_uppercase()))
        .filter(|s| *s != v1::AlertState::Unspecified)
        .ok_or_else(|| ApiError::BadRequest(format!("unknown alert state {name:?}")))
}

/// `GET /api/v1/buildings/{building}/alerts`.
#[utoipa::path(get, path = "/api/v1/buildings/{building}/alerts",
    params(("building" = String, Path), AlertsQuery),
    responses((status = 200, body = dto::AlertPage), (status = "4XX", body = Problem)),
    security(("bearer" = [])), tag = "alerts")]
pub async fn alerts(
    principal: Principal,
    State(state): State<AppState>,
    Path(building): Path<String>,
    Query(q): Query<AlertsQuery>,
) -> Result<axum::Json<dto::AlertPage>, ApiError> {
    let building = readable(&principal, building)?;
    let states = match q.state.as_deref() {
        None | Some("") => Vec::new(),
        Some(list) => list
            .split(',')
            .map(|s| alert_state(s).map(|s| s as i32))
            .collect::<Result<_, _>>()?,
    };
    let reply: v1::AlertsReply = ask(
        &state.nats,
        TELEMETRY,
        "alerts",
        &v1::AlertsRequest {
            building_id: building.to_string(),
            device_id: q.elevator.unwrap_or_default(),
            states,
            page: PageQuery {
                limit: q.limit,
                cursor: q.cursor,
            }
            .to_proto(),
        },
    )
    .await?;
    Ok(axum::Json(dto::AlertPage {
        items: reply.alerts.into_iter().map(Into::into).collect(),
        next_cursor: next(reply.next_cursor),
    }))
}

/// `GET /api/v1/buildings/{building}/alerts/{alert}`.
#[utoipa::path(get, path = "/api/v1/buildings/{building}/alerts/{alert}",
    params(("building" = String, Path), ("alert" = i64, Path)),
    responses((status = 200, body = dto::AlertDetail), (status = "4XX", body = Problem)),
    security(("bearer" = [])), tag = "alerts")]
pub async fn alert(
    principal: Principal,
    State(state): State<AppState>,
    Path((building, alert)): Path<(String, i64)>,
) -> Result<axum::Json<dto::AlertDetail>, ApiError> {
    let building = readable(&principal, building)?;
    let reply: v1::AlertReply = ask(
        &state.nats,
        TELEMETRY,
        "alert",
        &v1::AlertRequest {
            building_id: building.to_string(),
            alert_id: alert,
        },
    )
    .await?;
    Ok(axum::Json(reply.try_into()?))
}

async fn transition(
    principal: Principal,
    state: AppState,
    building: String,
    alert: i64,
    to: v1::AlertState,
    action: dto::AlertAction,
) -> Result<(StatusCode, axum::Json<dto::AlertDetail>), ApiError> {
    let building = operable(&principal, building)?;
    if action.note.chars().count() > MAX_NOTE {
        return Err(ApiError::BadRequest(format!(
            "note is longer than {MAX_NOTE} characters"
        )));
    }
    let reply: v1::AlertReply = ask(
        &state.nats,
        TELEMETRY,
        "alert-transition",
        &v1::AlertTransitionRequest {
            building_id: building.to_string(),
            alert_id: alert,
            to: to as i32,
            by: principal.subject,
            note: action.note,
        },
    )
    .await?;
    Ok((StatusCode::OK, axum::Json(reply.try_into()?)))
}

/// `POST /api/v1/buildings/{building}/alerts/{alert}/acknowledge` (technicians and admins).
#[utoipa::path(post, path = "/api/v1/buildings/{building}/alerts/{alert}/acknowledge",
    params(("building" = String, Path), ("alert" = i64, Path)), request_body = dto::AlertAction,
    responses((status = 200, body = dto::AlertDetail), (status = "4XX", body = Problem)),
    security(("bearer" = [])), tag = "alerts")]
pub async fn acknowledge(
    principal: Principal,
    State(state): State<AppState>,
    Path((building, alert)): Path<(String, i64)>,
    Json(action): Json<dto::AlertAction>,
) -> Result<(StatusCode, axum::Json<dto::AlertDetail>), ApiError> {
    transition(
        principal,
        state,
        building,
        alert,
        v1::AlertState::Acknowledged,
        action,
    )
    .await
}

/// `POST /api/v1/buildings/{building}/alerts/{alert}/resolve` (technicians and admins).
#[utoipa::path(post, path = "/api/v1/buildings/{building}/alerts/{alert}/resolve",
    params(("building" = String, Path), ("alert" = i64, Path)), request_body = dto::AlertAction,
    responses((status = 200, body = dto::AlertDetail), (status = "4XX", body = Problem)),
    security(("bearer" = [])), tag = "alerts")]
pub async fn resolve(
    principal: Principal,
    State(state): State<AppState>,
    Path((building, alert)): Path<(String, i64)>,
    Json(action): Json<dto::AlertAction>,
) -> Result<(StatusCode, axum::Json<dto::AlertDetail>), ApiError> {
    transition(
        principal,
        state,
        building,
        alert,
        v1::AlertState::Resolved,
        action,
    )
    .await
}
