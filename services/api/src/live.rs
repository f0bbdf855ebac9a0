//! `GET /api/v1/buildings/{building}/live`: the live state of every elevator of a building,
//! asked of the telemetry service over NATS.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use axum::extract::State;
use axum::Json;
use liftwire_proto::naming::BuildingId;
use liftwire_proto::{v1, Message};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::Principal;
use crate::backend::ask;
use crate::dto::PageQuery;
use crate::extract::{Path, Query};
use crate::problem::{ApiError, Problem};
use crate::routes::readable;
use crate::AppState;

/// One open fault.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
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
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
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
    /// Connected to a gateway now.
    pub online: bool,
    /// Out of service since, RFC 3339.
    pub out_of_service_since: Option<String>,
}

/// The live state of a building.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct BuildingLive {
    /// The building.
    pub building_id: String,
    /// Its elevators, by device id.
    pub elevators: Vec<Elevator>,
}

fn rfc3339(t: Option<liftwire_proto::Timestamp>) -> Option<String> {
    crate::dto::time(t).map(|d| d.to_rfc3339())
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
            online: s.online,
            out_of_service_since: rfc3339(s.out_of_service_since),
            device_id: s.device_id,
            floor: s.floor,
            load_percent: s.load_percent,
            in_service: s.in_service,
            entrapment: s.entrapment,
            power_lost: s.power_lost,
        }
    }
}

async fn live_state(state: &AppState, building: &BuildingId) -> Result<Vec<Elevator>, ApiError> {
    let reply: v1::LiveStateReply = ask(
        &state.nats,
        "telemetry",
        "live-state",
        &v1::LiveStateRequest {
            building_id: building.to_string(),
        },
    )
    .await?;
    Ok(reply.elevators.into_iter().map(Elevator::from).collect())
}

/// `GET /api/v1/buildings/{building}/live`: scope first, then the telemetry service.
#[utoipa::path(get, path = "/api/v1/buildings/{building}/live",
    params(("building" = String, Path)),
    responses((status = 200, body = BuildingLive), (status = "4XX", body = Problem)),
    security(("bearer" = [])), tag = "elevators")]
pub async fn building_live_state(
    principal: Principal,
    State(state): State<AppState>,
    Path(building): Path<String>,
) -> Result<Json<BuildingLive>, ApiError> {
    let building = readable(&principal, building)?;
    Ok(Json(BuildingLive {
        elevators: live_state(&state, &building).await?,
        building_id: building.to_string(),
    }))
}

/// A page of elevators.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ElevatorPage {
    /// Elevators, by device id.
    pub items: Vec<Elevator>,
    /// Cursor of the next page; absent on the last one.
    pub next_cursor: Option<String>,
}

/// `GET /api/v1/buildings/{building}/elevators`: the building's elevators with their live state,
/// paginated by device id.
#[utoipa::path(get, path = "/api/v1/buildings/{building}/elevators",
    params(("building" = String, Path), PageQuery),
    responses((status = 200, body = ElevatorPage), (status = "4XX", body = Problem)),
    security(("bearer" = [])), tag = "elevators")]
pub async fn elevators(
    principal: Principal,
    State(state): State<AppState>,
    Path(building): Path<String>,
    Query(page): Query<PageQuery>,
) -> Result<Json<ElevatorPage>, ApiError> {
    let building = readable(&principal, building)?;
    let limit =
        liftwire_runtime::endpoints::page_limit(page.limit).map_err(ApiError::BadRequest)?;
    let after = page.cursor.unwrap_or_default();
    let items: Vec<Elevator> = live_state(&state, &building)
        .await?
        .into_iter()
        .filter(|e| e.device_id > after)
        .take(usize::try_from(limit + 1).unwrap_or(usize::MAX))
        .collect();
    let (items, next_cursor) =
        liftwire_runtime::endpoints::paginate(items, limit, |e| e.device_id.clone());
    let next_cursor = crate::dto::next(next_cursor);
    Ok(Json(ElevatorPage { items, next_cursor }))
}

/// `GET /api/v1/buildings/{building}/live/stream`: Server-Sent Events, one `elevator` event
/// (the same JSON as in [`BuildingLive`]) each time an elevator of the building changes, until
/// the token expires.
#[utoipa::path(get, path = "/api/v1/buildings/{building}/live/stream",
    params(("building" = String, Path)),
    responses((status = 200, description = "`text/event-stream` of `elevator` events (JSON `Elevator`)"),
        (status = "4XX", body = Problem)),
    security(("bearer" = [])), tag = "elevators")]
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

    let building = readable(&principal, building)?;
    let open = state.streams.open(&principal.subject)?;
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
        .take_until(tokio::time::sleep(principal.remaining()))
        // It counts as open until it is dropped (ended, or its client gone).
        .inspect(move |_| {
            let _ = &open;
        });
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

/// Caps on open live-state streams: each holds a NATS subscription and a connection for as
/// long as its token lives (hours), so without a cap one token could open them without end.
#[derive(Debug)]
pub struct StreamLimits {
    total: Arc<tokio::sync::Semaphore>,
    per_user: usize,
    users: Arc<Mutex<HashMap<String, usize>>>,
}

/// An open stream's place; released when dropped.
#[derive(Debug)]
pub struct OpenStream {
    _total: tokio::sync::OwnedSemaphorePermit,
    user: String,
    users: Arc<Mutex<HashMap<String, usize>>>,
}

impl StreamLimits {
    /// At most `total` streams at once, `per_user` of them for one user.
    pub fn new(total: usize, per_user: usize) -> Self {
        Self {
            total: Arc::new(tokio::sync::Semaphore::new(total)),
            per_user,
            users: Arc::default(),
        }
    }

    /// A place for a stream of `user`: 429 when the user holds their share, 503 when the
    /// replica is full.
    pub fn open(&self, user: &str) -> Result<OpenStream, ApiError> {
        let mut users = self.users.lock().unwrap_or_else(PoisonError::into_inner);
        let held = users.get(user).copied().unwrap_or(0);
        if held >= self.per_user {
            return Err(ApiError::TooManyRequests(STREAM_RETRY_SECONDS));
        }
        let total = self
            .total
            .clone()
            .try_acquire_owned()
            .map_err(|_| ApiError::Unavailable)?;
        users.insert(user.to_owned(), held + 1);
        Ok(OpenStream {
            _total: total,
            user: user.to_owned(),
            users: self.users.clone(),
        })
    }
}

/// Retry-After of a stream refused for the user's share.
const STREAM_RETRY_SECONDS: u64 = 30;

impl Drop for OpenStream {
    fn drop(&mut self) {
        let mut users = self.users.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(held) = users.get_mut(&self.user) {
            *held -= 1;
            if *held == 0 {
                users.remove(&self.user);
            }
        }
    }
}
