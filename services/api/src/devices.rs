//! Device provisioning and commands, forwarded to the gateway (which owns the device registry):
//! `…/devices` (list: readers; register and rotate: admins — a secret is shown once and stored
//! hashed) and `…/elevators/{elevator}/commands` (send: technicians and admins; status:
//! readers).

use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use liftwire_proto::v1;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::auth::{Principal, Role};
use crate::backend::ask;
use crate::dto::{next, short, time, PageQuery};
use crate::extract::{Json, Path, Query};
use crate::problem::{ApiError, Problem};
use crate::routes::{operable, readable};
use crate::AppState;

const GATEWAY: &str = "gateway";

/// A registered device.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Device {
    /// Device id (its MQTT client id).
    pub device_id: String,
    /// `elevator` or `screen`.
    pub kind: String,
    /// Registered at.
    pub created_at: Option<DateTime<Utc>>,
    /// Revoked at (absent while active).
    pub revoked_at: Option<DateTime<Utc>>,
}

impl From<v1::DeviceInfo> for Device {
    fn from(d: v1::DeviceInfo) -> Self {
        Device {
            device_id: d.device_id,
            kind: d.kind,
            created_at: time(d.created_at),
            revoked_at: time(d.revoked_at),
        }
    }
}

/// A page of devices.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DevicePage {
    /// Devices, by id.
    pub items: Vec<Device>,
    /// Cursor of the next page; absent on the last one.
    pub next_cursor: Option<String>,
}

/// A device with its secret, shown this once.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeviceSecret {
    /// The device.
    pub device: Device,
    /// Its MQTT password. Store it on the device now: it cannot be shown again.
    pub secret: String,
}

/// Body of device registration.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewDevice {
    /// Device id: letters, digits, `-` and `_`, at most 64.
    pub device_id: String,
    /// `elevator` or `screen`.
    pub kind: String,
}

fn admin(principal: &Principal) -> Result<(), ApiError> {
    (principal.role == Role::Admin)
        .then_some(())
        .ok_or(ApiError::Forbidden)
}

fn secret(reply: v1::SecretReply) -> Result<DeviceSecret, ApiError> {
    Ok(DeviceSecret {
        device: reply.device.ok_or(ApiError::Unavailable)?.into(),
        secret: reply.secret,
    })
}

/// `GET /api/v1/buildings/{building}/devices`.
#[utoipa::path(get, path = "/api/v1/buildings/{building}/devices",
    params(("building" = String, Path), PageQuery),
    responses((status = 200, body = DevicePage), (status = "4XX", body = Problem)),
    security(("bearer" = [])), tag = "devices")]
pub async fn list(
    principal: Principal,
    State(state): State<AppState>,
    Path(building): Path<String>,
    Query(page): Query<PageQuery>,
) -> Result<axum::Json<DevicePage>, ApiError> {
    let building = readable(&principal, building)?;
    let reply: v1::DevicesReply = ask(
        &state.nats,
        GATEWAY,
        "devices",
        &v1::DevicesRequest {
            building_id: building.to_string(),
            page: page.to_proto(),
        },
    )
    .await?;
    Ok(axum::Json(DevicePage {
        items: reply.devices.into_iter().map(Into::into).collect(),
        next_cursor: next(reply.next_cursor),
    }))
}

/// `POST /api/v1/buildings/{building}/devices` (admins): registers a device.
#[utoipa::path(post, path = "/api/v1/buildings/{building}/devices",
    params(("building" = String, Path)), request_body = NewDevice,
    responses((status = 201, body = DeviceSecret), (status = "4XX", body = Problem)),
    security(("bearer" = [])), tag = "devices")]
pub async fn provision(
    principal: Principal,
    State(state): State<AppState>,
    Path(building): Path<String>,
    Json(body): Json<NewDevice>,
) -> Result<(StatusCode, axum::Json<DeviceSecret>), ApiError> {
    let building = readable(&principal, building)?;
    admin(&principal)?;
    let reply: v1::SecretReply = ask(
        &state.nats,
        GATEWAY,
        "provision",
        &v1::ProvisionRequest {
            building_id: building.to_string(),
            device_id: body.device_id,
            kind: body.kind,
            requested_by: principal.subject,
        },
    )
    .await?;
    Ok((StatusCode::CREATED, axum::Json(secret(reply)?)))
}

/// `POST /api/v1/buildings/{building}/devices/{device}/rotate` (admins): a new secret.
#[utoipa::path(post, path = "/api/v1/buildings/{building}/devices/{device}/rotate",
    params(("building" = String, Path), ("device" = String, Path)),
    responses((status = 200, body = DeviceSecret), (status = "4XX", body = Problem)),
    security(("bearer" = [])), tag = "devices")]
pub async fn rotate(
    principal: Principal,
    State(state): State<AppState>,
    Path((building, device)): Path<(String, String)>,
) -> Result<axum::Json<DeviceSecret>, ApiError> {
    let building = readable(&principal, building)?;
    admin(&principal)?;
    let reply: v1::SecretReply = ask(
        &state.nats,
        GATEWAY,
        "rotate",
        &v1::RotateRequest {
            building_id: building.to_string(),
            device_id: device,
            requested_by: principal.subject,
        },
    )
    .await?;
    Ok(axum::Json(secret(reply)?))
}

/// A command and its outcome.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Command {
    /// Id.
    pub command_id: String,
    /// Elevator.
    pub device_id: String,
    /// `request_diagnostics`, `set_telemetry_interval` or `reboot`.
    pub kind: String,
    /// `pending` until the device answers, then `accepted`, `succeeded`, `failed` or `rejected`.
    pub status: String,
    /// The device's detail.
    pub detail: String,
    /// Who sent it.
    pub requested_by: String,
    /// Sent at.
    pub requested_at: Option<DateTime<Utc>>,
    /// The device rejects it after this.
    pub expires_at: Option<DateTime<Utc>>,
    /// Last change.
    pub updated_at: Option<DateTime<Utc>>,
    /// Object key of the output the device uploaded, if any.
    pub output_key: Option<String>,
}

impl From<v1::CommandRecord> for Command {
    fn from(c: v1::CommandRecord) -> Self {
        let status = match c.status() {
            v1::CommandStatus::Unspecified => "pending".to_string(),
            s => short(s.as_str_name(), "COMMAND_STATUS_"),
        };
        Command {
            status,
            command_id: c.command_id,
            device_id: c.device_id,
            kind: c.kind,
            detail: c.detail,
            requested_by: c.requested_by,
            requested_at: time(c.requested_at),
            expires_at: time(c.expires_at),
            updated_at: time(c.updated_at),
            output_key: c.output.map(|o| o.key),
        }
    }
}

/// Body of a command.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewCommand {
    /// `request_diagnostics`, `set_telemetry_interval` or `reboot`.
    pub kind: String,
    /// For `set_telemetry_interval`: the new period (1 to 3600 s).
    pub seconds: Option<u32>,
    /// How long the device may take to act (default 15 min, at most 1 day).
    pub expires_in_seconds: Option<u32>,
}

/// A page of commands, newest first.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct CommandPage {
    /// Commands.
    pub items: Vec<Command>,
    /// Cursor of the next page; absent on the last one.
    pub next_cursor: Option<String>,
}

fn to_command(body: &NewCommand) -> Result<v1::Command, ApiError> {
    use v1::command::Kind;
    let kind = match (body.kind.as_str(), body.seconds) {
        ("request_diagnostics", None) => Kind::RequestDiagnostics(v1::RequestDiagnostics {}),
        ("reboot", None) => Kind::Reboot(v1::Reboot {}),
        ("set_telemetry_interval", Some(seconds)) => {
            Kind::SetTelemetryInterval(v1::SetTelemetryInterval { seconds })
        }
        ("set_telemetry_interval", None) => {
            return Err(ApiError::BadRequest(
                "set_telemetry_interval needs seconds".into(),
            ))
        }
        ("request_diagnostics" | "reboot", Some(_)) => {
            return Err(ApiError::BadRequest(format!(
                "{} takes no seconds",
                body.kind
            )))
        }
        (other, _) => {
            return Err(ApiError::BadRequest(format!(
                "unknown command kind {other:?}"
            )))
        }
    };
    let ttl = body.expires_in_seconds.unwrap_or(900);
    if !(1..=86_400).contains(&ttl) {
        return Err(ApiError::BadRequest(
            "expires_in_seconds must be 1 to 86400".into(),
        ));
    }
    let expires = Utc::now() + chrono::Duration::seconds(i64::from(ttl));
    Ok(v1::Command {
        command_id: String::new(),
        expires_at: Some(crate::dto::timestamp(expires)),
        kind: Some(kind),
    })
}

/// `POST /api/v1/buildings/{building}/elevators/{elevator}/commands` (technicians and admins).
#[utoipa::path(post, path = "/api/v1/buildings/{building}/elevators/{elevator}/commands",
    params(("building" = String, Path), ("elevator" = String, Path)), request_body = NewCommand,
    responses((status = 202, body = Command), (status = "4XX", body = Problem)),
    security(("bearer" = [])), tag = "devices")]
pub async fn send(
    principal: Principal,
    State(state): State<AppState>,
    Path((building, elevator)): Path<(String, String)>,
    Json(body): Json<NewCommand>,
) -> Result<(StatusCode, axum::Json<Command>), ApiError> {
    let building = operable(&principal, building)?;
    let command = to_command(&body)?;
    let reply: v1::CommandRecord = ask(
        &state.nats,
        GATEWAY,
        "command",
        &v1::CommandRequest {
            building_id: building.to_string(),
            device_id: elevator,
            command: Some(command),
            requested_by: principal.subject,
        },
    )
    .await?;
    Ok((StatusCode::ACCEPTED, axum::Json(reply.into())))
}

async fn find(
    state: &AppState,
    building: String,
    elevator: String,
    command_id: String,
    page: PageQuery,
) -> Result<v1::CommandsReply, ApiError> {
    ask(
        &state.nats,
        GATEWAY,
        "commands",
        &v1::CommandsRequest {
            building_id: building,
            device_id: elevator,
            command_id,
            page: page.to_proto(),
        },
    )
    .await
}

/// `GET /api/v1/buildings/{building}/elevators/{elevator}/commands`.
#[utoipa::path(get, path = "/api/v1/buildings/{building}/elevators/{elevator}/commands",
    params(("building" = String, Path), ("elevator" = String, Path), PageQuery),
    responses((status = 200, body = CommandPage), (status = "4XX", body = Problem)),
    security(("bearer" = [])), tag = "devices")]
pub async fn list_commands(
    principal: Principal,
    State(state): State<AppState>,
    Path((building, elevator)): Path<(String, String)>,
    Query(page): Query<PageQuery>,
) -> Result<axum::Json<CommandPage>, ApiError> {
    let building = readable(&principal, building)?;
    let reply = find(&state, building.to_string(), elevator, String::new(), page).await?;
    Ok(axum::Json(CommandPage {
        items: reply.commands.into_iter().map(Into::into).collect(),
        next_cursor: next(reply.next_cursor),
    }))
}

/// `GET /api/v1/buildings/{building}/elevators/{elevator}/commands/{command}`.
#[utoipa::path(get, path = "/api/v1/buildings/{building}/elevators/{elevator}/commands/{command}",
    params(("building" = String, Path), ("elevator" = String, Path), ("command" = String, Path)),
    responses((status = 200, body = Command), (status = "4XX", body = Problem)),
    security(("bearer" = [])), tag = "devices")]
pub async fn command(
    principal: Principal,
    State(state): State<AppState>,
    Path((building, elevator, command)): Path<(String, String, String)>,
) -> Result<axum::Json<Command>, ApiError> {
    let building = readable(&principal, building)?;
    let reply = find(
        &state,
        building.to_string(),
        elevator,
        command,
        PageQuery::default(),
    )
    .await?;
    let record = reply
        .commands
        .into_iter()
        .next()
        .ok_or(ApiError::NotFound)?;
    Ok(axum::Json(record.into()))
}
