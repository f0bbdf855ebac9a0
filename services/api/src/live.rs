//! `GET /api/v1/buildings/{building}/live`: the live state of every elevator of a building,
//! asked of the telemetry service over NATS.

use std::time::Duration;

use axum::extract::{Path, State};
use axum::Json;
use liftwire_proto::naming::{service_subject, BuildingId};
use liftwire_proto::{v1, Message};
use serde::{Deserialize, Serialize};

use crate::auth::Principal;
use crate::problem::ApiError;
use crate::AppState;

/// How long the telemetry service has to answer.
pub const SERVICE_TIMEOUT: Duration = Duration::from_secs(3);

/// One open fault.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Fault {
    /// Controller-assigned id.
    pub fault_id: String,
    /// Standard fault class, e.g. `FAULT_CODE_DOOR_LOCK`.
    pub code: String,
    /// The vendor's code.
    pub vendor_code: String,
    /// Whether it keeps the elevator out of service.
    pub blocking: bool,
}

/// The live state of one elevator.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Elevator {
    /// Device id of the controller.
    pub device_id: String,
    /// Operating mode, e.g. `OPERATING_MODE_NORMAL`.
    pub mode: String,
    /// Current floor.
    pub floor: i32,
    /// Travel direction.
    pub direction: String,
    /// Door states, front first.
    pub doors: Vec<String>,
    /// Load in percent of rated load.
    pub load_percent: u32,
    /// Serving calls.
    pub in_service: bool,
    /// Passengers trapped now.
    pub entrapment: bool,
    /// Mains power off.
    pub power_lost: bool,
    /// Open faults, oldest first.
    pub open_faults: Vec<Fault>,
    /// Device time of the latest message, RFC 3339.
    pub last_seen: Option<String>,
}

/// The live state of a building.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct BuildingLive {
    /// The building.
    pub building_id: String,
    /// Its elevators, by device id.
    pub elevators: Vec<Elevator>,
}

fn rfc3339(t: Option<liftwire_proto::Timestamp>) -> Option<String> {
    let t = t?;
    chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0))
        .map(|d| d.to_rfc3339())
}

impl From<v1::ElevatorState> for Elevator {
    fn from(s: v1::ElevatorState) -> Self {
        let name = |n: &str| n.to_owned();
        Elevator {
            mode: name(s.mode().as_str_name()),
            direction: name(s.direction().as_str_name()),
            doors: s.doors().map(|d| d.as_str_name().to_owned()).collect(),
            open_faults: s
                .open_faults
                .iter()
                .map(|f| Fault {
                    fault_id: f.fault_id.clone(),
                    code: f.code().as_str_name().to_owned(),
                    vendor_code: f.vendor_code.clone(),
                    blocking: f.blocking,
                })
                .collect(),
            last_seen: rfc3339(s.last_seen),
            device_id: s.device_id,
            floor: s.floor,
            load_percent: s.load_percent,
            in_service: s.in_service,
            entrapment: s.entrapment,
            power_lost: s.power_lost,
        }
    }
}

/// The handler: scope first, then the telemetry service.
pub async fn building_live_state(
    principal: Principal,
    State(state): State<AppState>,
    Path(building): Path<String>,
) -> Result<Json<BuildingLive>, ApiError> {
    let building = BuildingId::new(building)
        .map_err(|e| ApiError::BadRequest(format!("invalid building id: {e}")))?;
    if !principal.may_read(&building) {
        return Err(ApiError::Forbidden);
    }
    let subject = service_subject("telemetry", "live-state").map_err(|_| ApiError::Unavailable)?;
    let request = v1::LiveStateRequest {
        building_id: building.to_string(),
    };
    let mut headers = async_nats::HeaderMap::new();
    liftwire_runtime::observability::inject_trace_context(&tracing::Span::current(), &mut headers);
    let response = tokio::time::timeout(
        SERVICE_TIMEOUT,
        state
            .nats
            .request_with_headers(subject, headers, request.encode_to_vec().into()),
    )
    .await
    .map_err(|_| ApiError::Unavailable)?
    .map_err(|e| {
        tracing::warn!(error = %e, "telemetry live-state request failed");
        ApiError::Unavailable
    })?;
    if let Some(code) = response
        .headers
        .as_ref()
        .and_then(|h| h.get(async_nats::service::NATS_SERVICE_ERROR_CODE))
    {
        tracing::warn!(code = %code, "telemetry refused a live-state request");
        return Err(ApiError::Unavailable);
    }
    let reply =
        v1::LiveStateReply::decode(response.payload.as_ref()).map_err(|_| ApiError::Unavailable)?;
    Ok(Json(BuildingLive {
        building_id: building.to_string(),
        elevators: reply.elevators.into_iter().map(Elevator::from).collect(),
    }))
}

/// `GET /api/v1/buildings/{building}/live/stream`: Server-Sent Events, one `elevator` event
/// (the same JSON as in [`BuildingLive`]) each time an elevator of the building changes, until
/// the token expires.
pub async fn building_live_stream(
    principal: Principal,
    State(state): State<AppState>,
    Path(building): Path<String>,
) -> Result<
    axum::response::sse::Sse<
        impl futures::Stream<Item = Result<axum::response::sse::Event, std::convert::Infallible>>,
    >,
    ApiError,
> {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use futures::StreamExt;

    let building = BuildingId::new(building)
        .map_err(|e| ApiError::BadRequest(format!("invalid building id: {e}")))?;
    if !principal.may_read(&building) {
        return Err(ApiError::Forbidden);
    }
    let changes = state
        .nats
        .subscribe(liftwire_proto::naming::building_state_filter(&building))
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "subscribing to live-state changes failed");
            ApiError::Unavailable
        })?;
    // The subscription is in place on the server before the stream starts: no change is missed.
    state
        .nats
        .flush()
        .await
        .map_err(|_| ApiError::Unavailable)?;
    let events = changes
        .filter_map(|message| async move {
            let elevator =
                Elevator::from(v1::ElevatorState::decode(message.payload.as_ref()).ok()?);
            Event::default()
                .event("elevator")
                .json_data(elevator)
                .ok()
                .map(Ok)
        })
        // The stream is worth no more than the token that opened it.
        .take_until(tokio::time::sleep(principal.remaining()));
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}
