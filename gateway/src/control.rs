//! The gateway's control endpoints (`lw.v1.svc.gateway.*`): the device registry (list,
//! provision, rotate) and device commands (send, status). A command goes to the device on its
//! `command` downlink; the device's `command-result` uplink, read from JetStream by a durable
//! consumer shared by the replicas, records the outcome. Every request names its building, and
//! only that building's devices are found.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use liftwire_proto::naming::{
    Audience, BuildingId, DeviceId, Downlink, DownlinkKind, Uplink, UplinkKind, UPLINK_STREAM,
};
use liftwire_proto::text::nul_in_text;
use liftwire_proto::{v1, Message};
use liftwire_runtime::endpoints::{self, paginate, EndpointError};
use liftwire_runtime::service::BoxError;
use tokio_util::sync::CancellationToken;

use crate::acl::DeviceKind;
use crate::registry::{Registry, RegistryError};

/// Endpoint names.
pub const ENDPOINTS: [&str; 5] = ["devices", "provision", "rotate", "command", "commands"];
/// Durable consumer of command results.
pub const RESULTS_CONSUMER: &str = "gateway-command-results";
/// How long a device may take to act on a command unless the request says.
const DEFAULT_COMMAND_TTL: Duration = Duration::from_secs(15 * 60);

/// What the endpoints need.
#[derive(Clone)]
pub struct Control {
    /// The registry (and through it the gateway's database).
    pub registry: std::sync::Arc<Registry>,
    /// To send commands.
    pub nats: async_nats::Client,
}

fn building(id: &str) -> Result<BuildingId, EndpointError> {
    BuildingId::new(id).map_err(|e| EndpointError::bad_request(format!("building_id: {e}")))
}

fn device(id: &str) -> Result<DeviceId, EndpointError> {
    DeviceId::new(id).map_err(|e| EndpointError::bad_request(format!("device_id: {e}")))
}

fn ts(t: Option<DateTime<Utc>>) -> Option<liftwire_proto::Timestamp> {
    t.map(liftwire_proto::timestamp_from_datetime)
}

fn limit(page: &Option<v1::Page>) -> Result<i64, EndpointError> {
    endpoints::page_limit(page.as_ref().map(|p| p.limit)).map_err(EndpointError::bad_request)
}

type DeviceRow = (String, String, String, DateTime<Utc>, Option<DateTime<Utc>>);

fn device_info((device_id, building_id, kind, created, revoked): DeviceRow) -> v1::DeviceInfo {
    v1::DeviceInfo {
        device_id,
        building_id,
        kind,
        created_at: ts(Some(created)),
        revoked_at: ts(revoked),
    }
}

/// The device, if it belongs to `building`.
async fn device_in(
    pool: &sqlx::PgPool,
    building: &BuildingId,
    device: &DeviceId,
) -> Result<v1::DeviceInfo, EndpointError> {
    let row: Option<DeviceRow> = sqlx::query_as(
        "SELECT device_id, building_id, kind, created_at, revoked_at FROM devices
         WHERE device_id = $1 AND building_id = $2",
    )
    .bind(device.as_str())
    .bind(building.as_str())
    .fetch_optional(pool)
    .await
    .map_err(|e| EndpointError::unavailable(&e))?;
    row.map(device_info).ok_or_else(|| {
        EndpointError::not_found(format!("no device {device} in building {building}"))
    })
}

async fn devices(c: &Control, r: v1::DevicesRequest) -> Result<v1::DevicesReply, EndpointError> {
    let building = building(&r.building_id)?;
    let limit = limit(&r.page)?;
    let after = r.page.map(|p| p.cursor).unwrap_or_default();
    let rows: Vec<DeviceRow> = sqlx::query_as(
        "SELECT device_id, building_id, kind, created_at, revoked_at FROM devices
         WHERE building_id = $1 AND device_id > $2 ORDER BY device_id LIMIT $3",
    )
    .bind(building.as_str())
    .bind(&after)
    .bind(limit + 1)
    .fetch_all(c.registry.pool())
    .await
    .map_err(|e| EndpointError::unavailable(&e))?;
    let devices = rows.into_iter().map(device_info).collect();
    let (devices, next_cursor) = paginate(devices, limit, |d| d.device_id.clone());
    Ok(v1::DevicesReply {
        devices,
        next_cursor,
    })
}

fn registry_error(e: RegistryError) -> EndpointError {
    match e {
        RegistryError::Exists(d) => EndpointError::conflict(format!("device {d} already exists")),
        RegistryError::NotFound(d) => EndpointError::not_found(format!("device {d}")),
        RegistryError::Database(e) => EndpointError::unavailable(&e),
    }
}

async fn provision(c: &Control, r: v1::ProvisionRequest) -> Result<v1::SecretReply, EndpointError> {
    let building = building(&r.building_id)?;
    let device = device(&r.device_id)?;
    let kind = DeviceKind::parse(&r.kind)
        .ok_or_else(|| EndpointError::bad_request("kind must be elevator or screen"))?;
    let secret = c
        .registry
        .provision(&building, &device, kind)
        .await
        .map_err(registry_error)?;
    tracing::info!(%device, %building, by = %r.requested_by, "device provisioned");
    Ok(v1::SecretReply {
        device: Some(device_in(c.registry.pool(), &building, &device).await?),
        secret,
    })
}

async fn rotate(c: &Control, r: v1::RotateRequest) -> Result<v1::SecretReply, EndpointError> {
    let building = building(&r.building_id)?;
    let device = device(&r.device_id)?;
    let info = device_in(c.registry.pool(), &building, &device).await?;
    let secret = c.registry.rotate(&device).await.map_err(registry_error)?;
    tracing::info!(%device, %building, by = %r.requested_by, "device secret rotated");
    Ok(v1::SecretReply {
        device: Some(info),
        secret,
    })
}

fn command_kind(command: &v1::Command) -> Option<&'static str> {
    use v1::command::Kind;
    Some(match command.kind.as_ref()? {
        Kind::RequestDiagnostics(_) => "request_diagnostics",
        Kind::SetTelemetryInterval(_) => "set_telemetry_interval",
        Kind::Reboot(_) => "reboot",
    })
}

type CommandRow = (
    String,
    String,
    String,
    String,
    i32,
    String,
    String,
    DateTime<Utc>,
    DateTime<Utc>,
    DateTime<Utc>,
    Option<Vec<u8>>,
);

const COMMAND_COLUMNS: &str = "command_id, building_id, device_id, kind, status, detail,
    requested_by, requested_at, expires_at, updated_at, output";

fn command_record(row: CommandRow) -> v1::CommandRecord {
    let (id, building_id, device_id, kind, status, detail, by, requested, expires, updated, out) =
        row;
    v1::CommandRecord {
        command_id: id,
        building_id,
        device_id,
        kind,
        status,
        detail,
        requested_by: by,
        requested_at: ts(Some(requested)),
        expires_at: ts(Some(expires)),
        updated_at: ts(Some(updated)),
        output: out.and_then(|o| v1::ObjectRef::decode(o.as_slice()).ok()),
    }
}

async fn command(c: &Control, r: v1::CommandRequest) -> Result<v1::CommandRecord, EndpointError> {
    let building = building(&r.building_id)?;
    let device = device(&r.device_id)?;
    let info = device_in(c.registry.pool(), &building, &device).await?;
    if info.kind != DeviceKind::Elevator.as_str() || info.revoked_at.is_some() {
        return Err(EndpointError::conflict(
            "commands go to active elevator controllers only",
        ));
    }
    let mut command = r
        .command
        .ok_or_else(|| EndpointError::bad_request("command is required"))?;
    let kind =
        command_kind(&command).ok_or_else(|| EndpointError::bad_request("command has no kind"))?;
    if let Some(v1::command::Kind::SetTelemetryInterval(s)) = &command.kind {
        if !(1..=3_600).contains(&s.seconds) {
            return Err(EndpointError::bad_request(
                "telemetry interval must be 1 to 3600 seconds",
            ));
        }
    }
    let now = Utc::now();
    let expires = command
        .expires_at
        .as_ref()
        .and_then(|t| DateTime::from_timestamp(t.seconds, 0))
        .unwrap_or(now + chrono::Duration::from_std(DEFAULT_COMMAND_TTL).unwrap_or_default());
    if expires <= now {
        return Err(EndpointError::bad_request("command expires in the past"));
    }
    command.command_id = uuid::Uuid::new_v4().to_string();
    command.expires_at = ts(Some(expires));
    let command_id = command.command_id.clone();
    let downlink = v1::Downlink {
        message_id: command.command_id.clone(),
        issued_at: ts(Some(now)),
        body: Some(v1::downlink::Body::Command(command)),
    }
    .encode_to_vec();
    let row: CommandRow = sqlx::query_as(&format!(
        "INSERT INTO device_commands (command_id, building_id, device_id, kind, requested_by, expires_at, downlink)
         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {COMMAND_COLUMNS}"
    ))
    .bind(&command_id)
    .bind(building.as_str())
    .bind(device.as_str())
    .bind(kind)
    .bind(&r.requested_by)
    .bind(expires)
    .bind(&downlink)
    .fetch_one(c.registry.pool())
    .await
    .map_err(|e| EndpointError::unavailable(&e))?;
    let subject = Downlink {
        building,
        audience: Audience::Device(device),
        kind: DownlinkKind::Command,
    }
    .nats_subject();
    // Core NATS: if the device is away now, the command is sent again when it subscribes
    // ([`resend_pending`]).
    c.nats
        .publish(subject, downlink.into())
        .await
        .map_err(|e| EndpointError::unavailable(&e))?;
    Ok(command_record(row))
}

async fn commands(c: &Control, r: v1::CommandsRequest) -> Result<v1::CommandsReply, EndpointError> {
    let building = building(&r.building_id)?;
    let device = device(&r.device_id)?;
    device_in(c.registry.pool(), &building, &device).await?;
    let limit = limit(&r.page)?;
    let before = r.page.map(|p| p.cursor).unwrap_or_default();
    // A cursor is the last command id of the previous page: one of this device's commands.
    if !before.is_empty() {
        let known: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM device_commands
                            WHERE command_id = $1 AND device_id = $2 AND building_id = $3)",
        )
        .bind(&before)
        .bind(device.as_str())
        .bind(building.as_str())
        .fetch_one(c.registry.pool())
        .await
        .map_err(|e| EndpointError::unavailable(&e))?;
        if !known {
            return Err(EndpointError::bad_request("invalid cursor"));
        }
    }
    let rows: Vec<CommandRow> = sqlx::query_as(&format!(
        "SELECT {COMMAND_COLUMNS} FROM device_commands
         WHERE device_id = $1 AND building_id = $2 AND ($3 = '' OR command_id = $3)
           AND ($4 = '' OR (requested_at, command_id) <
                (SELECT requested_at, command_id FROM device_commands
                 WHERE command_id = $4 AND device_id = $1 AND building_id = $2))
         ORDER BY requested_at DESC, command_id DESC LIMIT $5"
    ))
    .bind(device.as_str())
    .bind(building.as_str())
    .bind(&r.command_id)
    .bind(&before)
    .bind(limit + 1)
    .fetch_all(c.registry.pool())
    .await
    .map_err(|e| EndpointError::unavailable(&e))?;
    if !r.command_id.is_empty() && rows.is_empty() {
        return Err(EndpointError::not_found(format!(
            "no command {} for {device}",
            r.command_id
        )));
    }
    let commands = rows.into_iter().map(command_record).collect();
    let (commands, next_cursor) = paginate(commands, limit, |c| c.command_id.clone());
    Ok(v1::CommandsReply {
        commands,
        next_cursor,
    })
}

fn decode<M: Message + Default>(payload: &[u8]) -> Result<M, EndpointError> {
    M::decode(payload).map_err(|e| EndpointError::bad_request(format!("payload: {e}")))
}

async fn handle(c: &Control, endpoint: &str, payload: &[u8]) -> Result<Vec<u8>, EndpointError> {
    Ok(match endpoint {
        "devices" => devices(c, decode(payload)?).await?.encode_to_vec(),
        "provision" => provision(c, decode(payload)?).await?.encode_to_vec(),
        "rotate" => rotate(c, decode(payload)?).await?.encode_to_vec(),
        "command" => command(c, decode(payload)?).await?.encode_to_vec(),
        "commands" => commands(c, decode(payload)?).await?.encode_to_vec(),
        other => return Err(EndpointError::not_found(other)),
    })
}

/// Serves the control endpoints until `shutdown`.
pub async fn serve(control: Control, shutdown: CancellationToken) -> Result<(), BoxError> {
    let nats = control.nats.clone();
    let handler = move |endpoint: String, payload: bytes::Bytes| -> endpoints::Answer {
        let control = control.clone();
        Box::pin(async move { handle(&control, &endpoint, &payload).await })
    };
    endpoints::serve(
        nats,
        "gateway",
        "liftwire gateway: device registry and commands",
        &ENDPOINTS,
        handler,
        shutdown,
    )
    .await
}

/// Publishes again, on each device's command subject, the commands still pending (no result
/// yet) and unexpired of `devices` (devices that just subscribed to their commands). Returns how
/// many were sent.
pub async fn resend_pending(
    pool: &sqlx::PgPool,
    nats: &async_nats::Client,
    devices: &[(BuildingId, DeviceId)],
) -> Result<usize, BoxError> {
    let ids: Vec<&str> = devices.iter().map(|(_, d)| d.as_str()).collect();
    let pending: Vec<(String, String, Vec<u8>)> = sqlx::query_as(
        "SELECT building_id, device_id, downlink FROM device_commands
          WHERE device_id = ANY($1) AND status = 0 AND expires_at > now() AND downlink IS NOT NULL
          ORDER BY requested_at, command_id",
    )
    .bind(&ids)
    .fetch_all(pool)
    .await?;
    let mut sent = 0;
    for (building, device, downlink) in pending {
        // The device's building now: a command for a device that moved stays with the old one.
        let Some((building, device)) = devices
            .iter()
            .find(|(b, d)| b.as_str() == building && d.as_str() == device)
        else {
            continue;
        };
        let subject = Downlink {
            building: building.clone(),
            audience: Audience::Device(device.clone()),
            kind: DownlinkKind::Command,
        }
        .nats_subject();
        nats.publish(subject, downlink.into()).await?;
        sent += 1;
    }
    Ok(sent)
}

/// Sends pending commands again to the devices that subscribe to them, as the guard reports them
/// on `subscribed`, until `shutdown`. Devices reported together are looked up in one query.
pub async fn resend_on_subscribe(
    mut subscribed: tokio::sync::mpsc::Receiver<(BuildingId, DeviceId)>,
    pool: sqlx::PgPool,
    nats: async_nats::Client,
    shutdown: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            first = subscribed.recv() => first,
            _ = shutdown.cancelled() => break,
        };
        let Some(first) = first else { break };
        let mut devices = vec![first];
        while devices.len() < 1_024 {
            match subscribed.try_recv() {
                Ok(device) if !devices.contains(&device) => devices.push(device),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        match resend_pending(&pool, &nats, &devices).await {
            Ok(0) => {}
            Ok(sent) => tracing::info!(
                sent,
                "pending commands sent again to devices that came back"
            ),
            Err(e) => {
                tracing::warn!(error = %e, devices = devices.len(), "sending pending commands again failed; they go at the next subscription")
            }
        }
    }
}

/// Records one command result from its uplink subject and payload; `Ok(false)` when it matches
/// no command of that device, or would move its status backwards (ignored).
///
/// A command's status only moves forward (pending → accepted → succeeded, failed or rejected;
/// a final status is final): results can be recorded out of order (replicas record them in
/// parallel, a failed one is redelivered later, a device resends an old one), and a late
/// "accepted" must not hide the outcome.
pub async fn record_result(
    pool: &sqlx::PgPool,
    subject: &str,
    payload: &[u8],
) -> Result<bool, sqlx::Error> {
    let Ok(uplink) = Uplink::from_nats_subject(subject) else {
        return Ok(false);
    };
    // A NUL character cannot be stored in `text` and would be redelivered for ever: such a
    // result (bridged for telemetry to keep its place in the sequence) is not recorded.
    let Some(v1::envelope::Body::CommandResult(result)) = v1::Envelope::decode(payload)
        .ok()
        .filter(|e| e.device_id == uplink.device.as_str() && nul_in_text(e).is_none())
        .and_then(|e| e.body)
    else {
        return Ok(false);
    };
    let updated = sqlx::query(
        "UPDATE device_commands SET status = $3, detail = $4, output = $5, updated_at = now()
         WHERE command_id = $1 AND device_id = $2 AND status < $3 AND status <= $6",
    )
    .bind(&result.command_id)
    .bind(uplink.device.as_str())
    .bind(result.status)
    .bind(&result.detail)
    .bind(result.output.map(|o| o.encode_to_vec()))
    .bind(v1::CommandStatus::Accepted as i32)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(updated > 0)
}

/// Follows devices' command results in `LW_UPLINK` until `shutdown`; a result is acknowledged
/// once recorded (a database failure leaves it for redelivery). When the consumer cannot be
/// declared or read (NATS away, the stream or the consumer deleted), it is declared again after
/// a pause that doubles up to 5 s: the follower never stops before `shutdown`.
pub async fn follow_results(
    js: jetstream::Context,
    pool: sqlx::PgPool,
    shutdown: CancellationToken,
) -> Result<(), BoxError> {
    const FIRST_PAUSE: Duration = Duration::from_millis(100);
    let mut pause = FIRST_PAUSE;
    while !shutdown.is_cancelled() {
        let opened = tokio::select! {
            opened = open_results(&js) => opened,
            _ = shutdown.cancelled() => break,
        };
        match opened {
            Ok(mut messages) => loop {
                let message = tokio::select! {
                    message = messages.next() => message,
                    _ = shutdown.cancelled() => return Ok(()),
                };
                let message = match message {
                    Some(Ok(message)) => message,
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "reading command results failed; reopening");
                        break;
                    }
                    None => break,
                };
                pause = FIRST_PAUSE;
                match record_result(&pool, &message.subject, &message.payload).await {
                    Ok(_) => {
                        if let Err(e) = message.ack().await {
                            tracing::warn!(error = %e, "acknowledging a command result failed");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "recording a command result failed; redelivered later");
                        let _ = message
                            .ack_with(jetstream::AckKind::Nak(Some(Duration::from_secs(1))))
                            .await;
                    }
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?pause, "cannot follow command results")
            }
        }
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            _ = shutdown.cancelled() => break,
        }
        pause = (pause * 2).min(Duration::from_secs(5));
    }
    Ok(())
}

/// Declares the shared command-results consumer and opens its message stream.
async fn open_results(js: &jetstream::Context) -> Result<pull::Stream, BoxError> {
    let stream = js.get_stream(UPLINK_STREAM.name).await?;
    let consumer = stream
        .get_or_create_consumer(
            RESULTS_CONSUMER,
            pull::Config {
                durable_name: Some(RESULTS_CONSUMER.into()),
                description: Some("gateway: device command results (shared by replicas)".into()),
                filter_subject: format!("lw.v1.up.*.*.{}", UplinkKind::CommandResult),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ..Default::default()
            },
        )
        .await?;
    Ok(consumer.messages().await?)
}
