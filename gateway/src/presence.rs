//! Presence changes into the `LW_PRESENCE` stream (`lw.v1.presence.{building}.{device}`).
//!
//! Presence drives the device-offline alert, so a change must not be lost because no telemetry
//! replica was listening or NATS refused it for a moment: it is stored in JetStream, and a change
//! JetStream did not confirm is kept and published again. Connections post their changes on a
//! [`PresenceBoard`] that keeps only the latest change per device (a device that went offline and
//! came back is online, whatever came between): it never overflows, a long outage costs one entry
//! per device, and an older change of a device is never stored after a newer one. Each change
//! carries the time it happened, so telemetry orders changes from several gateways correctly.
//!
//! A gateway that crashes cannot report its devices offline. Every change names the gateway's
//! run (new at every start), and the run sends a heartbeat every few seconds ([`heartbeat`]):
//! when they stop, telemetry records the devices the run left online as offline.

use std::collections::hash_map::{Entry, HashMap};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use async_nats::jetstream;
use futures::StreamExt;
use liftwire_proto::naming::{
    gateway_heartbeat_subject, gateway_refresh_subject, presence_subject, BuildingId, DeviceId,
};
use liftwire_proto::{v1, Message};
use liftwire_runtime::service::BoxError;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::metrics::{Kind, Metrics};
use crate::session::{PresenceChange, Shared};

/// Changes waiting to be stored, the latest per device (by subject).
type Waiting = HashMap<String, v1::Presence>;

/// Where connections post presence changes for the publisher ([`run`]).
#[derive(Debug)]
pub struct PresenceBoard {
    /// This gateway's name in presence events.
    gateway_id: String,
    /// This run of the gateway (random, new at every start).
    gateway_run: String,
    /// Changes not yet handed to the publisher.
    waiting: Mutex<Waiting>,
    /// Wakes the publisher when a change is posted.
    posted: Notify,
}

impl PresenceBoard {
    /// An empty board for a new run of the gateway `gateway_id`.
    pub fn new(gateway_id: String) -> Self {
        Self {
            gateway_id,
            gateway_run: format!("{:016x}", rand::random::<u64>()),
            waiting: Mutex::new(Waiting::new()),
            posted: Notify::new(),
        }
    }

    fn waiting(&self) -> std::sync::MutexGuard<'_, Waiting> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Posts `change`; it replaces any change of the same device still waiting.
    pub fn post(&self, change: &PresenceChange) {
        self.post_message(
            &change.identity.building,
            &change.identity.device,
            (change.state, change.reason),
            change.at,
            false,
        );
    }

    /// Posts an answer to telemetry's [`v1::PresenceRefresh`]: it counts only where telemetry
    /// still records the device lost under this run.
    pub fn post_refresh(
        &self,
        building: &BuildingId,
        device: &DeviceId,
        state: (v1::PresenceState, v1::DisconnectReason),
        at: SystemTime,
    ) {
        self.post_message(building, device, state, at, true);
    }

    fn post_message(
        &self,
        building: &BuildingId,
        device: &DeviceId,
        (state, reason): (v1::PresenceState, v1::DisconnectReason),
        at: SystemTime,
        refresh: bool,
    ) {
        let message = v1::Presence {
            device_id: device.to_string(),
            building_id: building.to_string(),
            state: state as i32,
            reason: reason as i32,
            at: Some(liftwire_proto::timestamp(at)),
            gateway_id: self.gateway_id.clone(),
            gateway_run: self.gateway_run.clone(),
            refresh,
        };
        let subject = presence_subject(building, device);
        let mut waiting = self.waiting();
        if refresh {
            // A change the connections posted says more than an answer to telemetry's question
            // (which may be late), and counts where the answer would.
            waiting.entry(subject).or_insert(message);
        } else {
            waiting.insert(subject, message);
        }
        drop(waiting);
        self.posted.notify_one();
    }

    /// Takes every waiting change.
    fn take(&self) -> Waiting {
        std::mem::take(&mut *self.waiting())
    }

    /// Puts back a change that was not stored, unless a newer one of its device was posted
    /// meanwhile.
    fn put_back(&self, subject: String, message: v1::Presence) {
        if let Entry::Vacant(slot) = self.waiting().entry(subject) {
            slot.insert(message);
        }
    }

    /// This run of the gateway, as named in its changes and heartbeats.
    pub fn gateway_run(&self) -> &str {
        &self.gateway_run
    }

    /// Changes waiting.
    pub fn len(&self) -> usize {
        self.waiting().len()
    }

    /// True when nothing waits.
    pub fn is_empty(&self) -> bool {
        self.waiting().is_empty()
    }
}

/// Settings of the presence publisher.
#[derive(Debug, Clone, Copy)]
pub struct PresenceSettings {
    /// First pause after JetStream refused a change; it doubles up to `max_backoff`.
    pub first_backoff: Duration,
    /// Longest pause between two attempts.
    pub max_backoff: Duration,
    /// Longest the last attempt at shutdown may take.
    pub final_attempt: Duration,
}

impl Default for PresenceSettings {
    fn default() -> Self {
        Self {
            first_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
            final_attempt: Duration::from_secs(3),
        }
    }
}

/// Publishes the changes posted on `board` into JetStream until `shutdown`, then makes one last
/// attempt (bounded by `final_attempt`) at what is left.
pub async fn run(
    board: std::sync::Arc<PresenceBoard>,
    js: jetstream::Context,
    metrics: Metrics,
    settings: PresenceSettings,
    shutdown: CancellationToken,
) {
    let mut retry_at: Option<tokio::time::Instant> = None;
    let mut backoff = settings.first_backoff;
    loop {
        tokio::select! {
            () = board.posted.notified() => {}
            () = sleep_until(retry_at) => retry_at = None,
            _ = shutdown.cancelled() => break,
        }
        if retry_at.is_some() {
            continue;
        }
        let batch = board.take();
        if batch.is_empty() {
            continue;
        }
        if publish(&js, batch, &board, &metrics).await {
            backoff = settings.first_backoff;
        } else {
            tracing::warn!(kept = board.len(), retry_in = ?backoff, "JetStream did not store presence changes; kept for a retry");
            retry_at = Some(tokio::time::Instant::now() + backoff);
            backoff = (backoff * 2).min(settings.max_backoff);
        }
    }
    let last = board.take();
    if last.is_empty() {
        return;
    }
    let stored =
        tokio::time::timeout(settings.final_attempt, publish(&js, last, &board, &metrics)).await;
    if !matches!(stored, Ok(true)) {
        tracing::error!("presence changes not stored before shutdown");
    }
}

/// Sends this run's heartbeat on core NATS every `interval` until `shutdown`, and answers
/// presence refresh requests. A lost heartbeat costs nothing (the next one follows); telemetry
/// declares the run lost only after hearing nothing for its `presence.gateway_timeout`, and if
/// the run was only stalled or cut off, asks it to report its devices online again.
pub async fn heartbeat(
    nats: async_nats::Client,
    shared: std::sync::Arc<Shared>,
    interval: Duration,
    shutdown: CancellationToken,
) -> Result<(), BoxError> {
    let board = shared.presence.clone();
    let subject = gateway_heartbeat_subject(&board.gateway_id)?;
    let mut refreshes = nats
        .subscribe(gateway_refresh_subject(&board.gateway_id)?)
        .await?;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            Some(request) = refreshes.next() => {
                match v1::PresenceRefresh::decode(request.payload.as_ref()) {
                    Ok(refresh) if refresh.gateway_run == board.gateway_run => {
                        let devices: Vec<(BuildingId, DeviceId)> = refresh
                            .devices
                            .iter()
                            .filter_map(|d| Some((BuildingId::new(d.building_id.as_str()).ok()?, DeviceId::new(d.device_id.as_str()).ok()?)))
                            .collect();
                        let online = shared.refresh(&devices);
                        tracing::warn!(asked = devices.len(), online, "telemetry recorded devices of this gateway lost while it was silent; told it where they are");
                    }
                    Ok(_) => {}
                    Err(e) => tracing::debug!(error = %e, "ignoring a malformed presence refresh"),
                }
                continue;
            }
            _ = shutdown.cancelled() => return Ok(()),
        }
        let beat = v1::GatewayHeartbeat {
            gateway_id: board.gateway_id.clone(),
            gateway_run: board.gateway_run.clone(),
            at: Some(liftwire_proto::timestamp(SystemTime::now())),
        };
        // Bounded, and given up at shutdown: with NATS away the client's queue may be full.
        let payload = beat.encode_to_vec().into();
        tokio::select! {
            sent = tokio::time::timeout(interval, nats.publish(subject.clone(), payload)) => match sent {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "gateway heartbeat not sent"),
                Err(_) => tracing::warn!("gateway heartbeat not sent in time"),
            },
            _ = shutdown.cancelled() => return Ok(()),
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Publishes `batch` and waits for JetStream's answers together; what was not stored goes back
/// on the board. True if everything was stored.
async fn publish(
    js: &jetstream::Context,
    batch: Waiting,
    board: &PresenceBoard,
    metrics: &Metrics,
) -> bool {
    let sent = batch.into_iter().map(|(subject, message)| {
        let payload = message.encode_to_vec();
        async move {
            let stored = match js.publish(subject.clone(), payload.into()).await {
                Ok(ack) => ack.await.map(drop).map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            (subject, message, stored)
        }
    });
    let mut all = true;
    for (subject, message, stored) in futures::future::join_all(sent).await {
        match stored {
            Ok(()) => {
                let state = if message.state == v1::PresenceState::Online as i32 {
                    "online"
                } else {
                    "offline"
                };
                metrics
                    .presence_events
                    .get_or_create(&Kind { kind: state })
                    .inc();
            }
            Err(e) => {
                metrics.presence_failures.inc();
                tracing::debug!(error = %e, device = %message.device_id, "presence change not stored");
                all = false;
                board.put_back(subject, message);
            }
        }
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acl::{DeviceKind, Identity};
    use liftwire_proto::naming::{BuildingId, DeviceId};
    use liftwire_proto::v1::{DisconnectReason, PresenceState};
    use std::sync::Arc;
    use std::time::SystemTime;

    fn change(device: &str, state: PresenceState, at: u64) -> PresenceChange {
        PresenceChange {
            identity: Arc::new(Identity {
                device: DeviceId::new(device).unwrap(),
                building: BuildingId::new("b1").unwrap(),
                kind: DeviceKind::Elevator,
            }),
            state,
            reason: DisconnectReason::Unspecified,
            at: SystemTime::UNIX_EPOCH + Duration::from_secs(at),
        }
    }

    #[test]
    fn an_answer_to_telemetry_never_replaces_a_change_the_connections_posted() {
        let board = PresenceBoard::new("gw-1".into());
        let (b1, elev1) = (
            BuildingId::new("b1").unwrap(),
            DeviceId::new("elev-1").unwrap(),
        );
        let answer = (PresenceState::Online, DisconnectReason::Unspecified);
        board.post(&change("elev-1", PresenceState::Offline, 10));
        board.post_refresh(
            &b1,
            &elev1,
            answer,
            SystemTime::UNIX_EPOCH + Duration::from_secs(11),
        );
        let taken = board.take();
        let kept = &taken["lw.v1.presence.b1.elev-1"];
        assert_eq!(
            (kept.state(), kept.refresh),
            (PresenceState::Offline, false)
        );

        board.post_refresh(
            &b1,
            &elev1,
            answer,
            SystemTime::UNIX_EPOCH + Duration::from_secs(12),
        );
        board.post(&change("elev-1", PresenceState::Offline, 13));
        let taken = board.take();
        let kept = &taken["lw.v1.presence.b1.elev-1"];
        assert_eq!(
            (kept.state(), kept.refresh),
            (PresenceState::Offline, false)
        );
    }

    #[test]
    fn the_board_keeps_each_devices_latest_change_and_never_puts_back_over_a_newer_one() {
        let board = PresenceBoard::new("gw-1".into());
        board.post(&change("elev-1", PresenceState::Online, 10));
        board.post(&change("elev-1", PresenceState::Offline, 11));
        board.post(&change("elev-2", PresenceState::Online, 12));
        let mut taken = board.take();
        assert!(board.is_empty());
        assert_eq!(taken.len(), 2);
        let elev1 = taken.remove("lw.v1.presence.b1.elev-1").unwrap();
        assert_eq!(
            (
                elev1.state(),
                elev1.at.unwrap().seconds,
                elev1.gateway_id.as_str()
            ),
            (PresenceState::Offline, 11, "gw-1"),
            "the latest change, stamped when it happened"
        );
        assert_eq!(elev1.gateway_run, board.gateway_run());
        assert_eq!(board.gateway_run().len(), 16);
        assert_ne!(
            PresenceBoard::new("gw-1".into()).gateway_run(),
            board.gateway_run(),
            "every start is a new run"
        );

        // elev-1 came back while its offline was being published, and the publish failed.
        board.post(&change("elev-1", PresenceState::Online, 13));
        board.put_back("lw.v1.presence.b1.elev-1".into(), elev1);
        let elev2 = taken.remove("lw.v1.presence.b1.elev-2").unwrap();
        board.put_back("lw.v1.presence.b1.elev-2".into(), elev2);
        let again = board.take();
        assert_eq!(again.len(), 2);
        assert_eq!(
            again["lw.v1.presence.b1.elev-1"].state(),
            PresenceState::Online,
            "the newer change stays"
        );
        assert_eq!(
            again["lw.v1.presence.b1.elev-2"].state(),
            PresenceState::Online,
            "a failed change with nothing newer is kept"
        );
    }
}
