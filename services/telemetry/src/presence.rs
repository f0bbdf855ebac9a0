//! Device presence from the gateways (`LW_PRESENCE`, `lw.v1.presence.<building>.<device>`): the
//! `online` flag of the live state, and the device-offline alert, resolved as soon as the device
//! is back.
//!
//! A gateway that crashes or is cut off cannot report its devices offline. Each change names
//! the gateway run that observed it, every run sends heartbeats
//! (`lw.v1.gateway.<id>.heartbeat`), and [`GatewayWatch`] records the devices a silent run left
//! online as offline.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, AckKind};
use chrono::{DateTime, Utc};
use futures::StreamExt;
use liftwire_proto::naming::{gateway_refresh_subject, GATEWAY_HEARTBEAT_FILTER, PRESENCE_STREAM};
use liftwire_proto::{v1, Message};
use liftwire_runtime::nats::{ensure_stream, NatsConfig};
use liftwire_runtime::service::{BoxError, BuildContext};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::alerts::{self, AlertChange};
use crate::state::{datetime, AlertRule};

/// `[presence]` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PresenceConfig {
    /// A gateway run not heard from for this long is lost: the devices it reported online are
    /// recorded offline. Several of the gateways' `heartbeat_interval` (5 s by default).
    #[serde(with = "humantime_serde")]
    pub gateway_timeout: Duration,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self {
            gateway_timeout: Duration::from_secs(30),
        }
    }
}

/// Records one presence change; returns the alert change it causes, if any. Changes older than
/// the recorded one are ignored (presence from several gateways can arrive out of order), and so
/// is an offline report from a gateway run that no longer holds the device: it reconnected
/// through another gateway before the first one noticed the old connection was gone.
pub async fn record(
    pool: &sqlx::PgPool,
    presence: &v1::Presence,
) -> Result<Option<AlertChange>, sqlx::Error> {
    let online = presence.state == v1::PresenceState::Online as i32;
    let at: DateTime<Utc> = presence
        .at
        .as_ref()
        .and_then(datetime)
        .unwrap_or_else(Utc::now);
    let mut tx = pool.begin().await?;
    let applied = sqlx::query(
        "INSERT INTO device_presence (device_id, building_id, online, at, gateway_run)
         VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (device_id) DO UPDATE SET online = EXCLUDED.online, at = EXCLUDED.at,
             building_id = EXCLUDED.building_id, gateway_run = EXCLUDED.gateway_run,
             lost = false, lost_at = NULL
         WHERE device_presence.at <= EXCLUDED.at
             AND (EXCLUDED.online OR device_presence.gateway_run IN (EXCLUDED.gateway_run, ''))
             AND (NOT $6
                 OR (device_presence.lost AND device_presence.gateway_run = EXCLUDED.gateway_run))",
    )
    .bind(&presence.device_id)
    .bind(&presence.building_id)
    .bind(online)
    .bind(at)
    .bind(&presence.gateway_run)
    .bind(presence.refresh)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let change = if online && applied > 0 {
        alerts::resolve(
            &mut tx,
            &presence.device_id,
            AlertRule::DeviceOffline,
            "back online",
            at,
        )
        .await?
    } else {
        None
    };
    tx.commit().await?;
    Ok(change)
}

/// Presence counters, registered as `liftwire_telemetry_presence_*`.
#[derive(Clone, Default)]
pub struct PresenceMetrics {
    /// Attempts to record a change that failed (the change is delivered again).
    failures: Counter,
    /// Changes that can never be recorded (their data is refused by PostgreSQL), dropped.
    rejected: Counter,
    /// Changes in `LW_PRESENCE` not yet recorded: waiting for delivery, or delivered and not yet
    /// acknowledged (by any replica).
    pending: Gauge,
}

impl PresenceMetrics {
    /// New metrics registered in the binary's registry.
    pub fn register(ctx: &BuildContext) -> Self {
        let metrics = Self::default();
        let mut registry = ctx.registry();
        let registry = registry.sub_registry_with_prefix("telemetry_presence");
        registry.register(
            "record_failures",
            "Attempts to record a presence change that failed (the change is delivered again)",
            metrics.failures.clone(),
        );
        registry.register(
            "rejected",
            "Presence changes whose data PostgreSQL refuses, dropped",
            metrics.rejected.clone(),
        );
        registry.register(
            "pending",
            "Presence changes in LW_PRESENCE not yet recorded by any replica",
            metrics.pending.clone(),
        );
        metrics
    }
}

/// Most lost devices named in one question to a gateway run (about 64 bytes each, well under
/// NATS's default 1 MiB message); more are asked about a timeout later.
const MAX_ASKED: i64 = 10_000;

/// Name of the durable consumer every replica shares.
pub const CONSUMER: &str = "telemetry-presence";
/// First pause after presence could not be recorded or pulled; it doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(100);
/// Longest pause between two attempts to record or pull presence.
const MAX_RETRY: Duration = Duration::from_secs(5);
/// How long a delivered change may stay unacknowledged before it is delivered again (a replica
/// that died holding it).
const ACK_WAIT: Duration = Duration::from_secs(30);
/// Idle heartbeat of the pull subscription, so a lost NATS connection is noticed.
const PULL_HEARTBEAT: Duration = Duration::from_secs(5);
/// Changes a replica holds at once: few, since each waits for the one before it, and a change
/// held longer than [`ACK_WAIT`] (during a database outage) is delivered again.
const PULL_BATCH: usize = 10;
/// How often the pending gauge is refreshed from the consumer.
const CENSUS_EVERY: Duration = Duration::from_secs(1);

/// Records presence changes from `LW_PRESENCE`.
pub struct Presence {
    nats: async_nats::Client,
    js: jetstream::Context,
    nats_config: NatsConfig,
    consumer: jetstream::consumer::Consumer<pull::Config>,
    pool: sqlx::PgPool,
    metrics: PresenceMetrics,
}

impl Presence {
    /// Declares the stream and the durable consumer, and registers metrics.
    pub async fn build(
        nats: async_nats::Client,
        nats_config: &NatsConfig,
        pool: sqlx::PgPool,
        ctx: &BuildContext,
    ) -> Result<Self, BoxError> {
        let js = jetstream::new(nats.clone());
        let consumer = declare(&js, nats_config).await?;
        Ok(Self {
            nats,
            js,
            nats_config: nats_config.clone(),
            consumer,
            pool,
            metrics: PresenceMetrics::register(ctx),
        })
    }

    /// Records presence changes until `shutdown`.
    ///
    /// A change is acknowledged once recorded. One that cannot be recorded (the database is
    /// down) is handed back to JetStream to be delivered again after a pause, and the next one
    /// waits for that pause too: a long outage costs one attempt per pause, not one per change,
    /// and loses nothing, whichever replica records it in the end. A change whose data
    /// PostgreSQL refuses is dropped and counted. Changes are applied by their time, so one
    /// delivered late never overwrites a newer one. When pulling fails, the stream and the
    /// consumer are declared again (they may have been deleted) after a pause.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), BoxError> {
        let mut pause = FIRST_RETRY;
        let mut pulling: Option<pull::Stream> = None;
        let mut broken = false;
        let mut census = tokio::time::interval(CENSUS_EVERY);
        census.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !shutdown.is_cancelled() {
            let messages = match pulling.as_mut() {
                Some(messages) => messages,
                None => {
                    let opened = tokio::select! {
                        opened = self.open(broken) => opened,
                        _ = shutdown.cancelled() => break,
                    };
                    match opened {
                        Ok(messages) => pulling.insert(messages),
                        Err(e) => {
                            tracing::warn!(error = %e, retry_in = ?pause, "pulling presence from JetStream failed");
                            broken = true;
                            wait(&mut pause, &shutdown).await;
                            continue;
                        }
                    }
                }
            };
            // The census first: during an outage a redelivered change is ready at every turn,
            // and a fair choice could put the gauge off for many seconds.
            let message = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = census.tick() => {
                    self.count_pending().await;
                    continue;
                }
                message = messages.next() => message,
            };
            let message = match message {
                Some(Ok(message)) => message,
                Some(Err(e)) => {
                    tracing::warn!(error = %e, retry_in = ?pause, "pulling presence from JetStream failed");
                    pulling = None;
                    broken = true;
                    wait(&mut pause, &shutdown).await;
                    continue;
                }
                None => {
                    pulling = None;
                    continue;
                }
            };
            broken = false;
            let Ok(presence) = v1::Presence::decode(message.payload.as_ref()) else {
                self.metrics.rejected.inc();
                tracing::warn!(subject = %message.subject, "dropping an undecodable presence change");
                acknowledge(&message, AckKind::Term).await;
                continue;
            };
            match record(&self.pool, &presence).await {
                Ok(change) => {
                    pause = FIRST_RETRY;
                    if let Some(change) = change {
                        alerts::announce(&self.nats, &change).await;
                    }
                    acknowledge(&message, AckKind::Ack).await;
                }
                Err(e) if refused_data(&e) => {
                    self.metrics.rejected.inc();
                    tracing::warn!(error = %e, device = presence.device_id, "dropping a presence change PostgreSQL refuses");
                    acknowledge(&message, AckKind::Term).await;
                }
                Err(e) => {
                    self.metrics.failures.inc();
                    tracing::warn!(error = %e, device = presence.device_id, retry_in = ?pause, "recording presence failed; delivered again later");
                    acknowledge(&message, AckKind::Nak(Some(pause))).await;
                    wait(&mut pause, &shutdown).await;
                }
            }
        }
        Ok(())
    }

    /// Opens the pull subscription, declaring the stream and the consumer first when the last
    /// pull failed.
    async fn open(&mut self, declare_first: bool) -> Result<pull::Stream, BoxError> {
        if declare_first {
            self.consumer = declare(&self.js, &self.nats_config).await?;
        }
        Ok(self
            .consumer
            .stream()
            .max_messages_per_batch(PULL_BATCH)
            .heartbeat(PULL_HEARTBEAT)
            .messages()
            .await?)
    }

    /// Refreshes the pending gauge from the consumer's state on the server.
    async fn count_pending(&self) {
        match self.consumer.get_info().await {
            Ok(info) => {
                let pending = info.num_pending.saturating_add(info.num_ack_pending as u64);
                self.metrics
                    .pending
                    .set(i64::try_from(pending).unwrap_or(i64::MAX));
            }
            Err(e) => tracing::debug!(error = %e, "reading the presence consumer failed"),
        }
    }
}

/// Declares `LW_PRESENCE` and the durable consumer.
async fn declare(
    js: &jetstream::Context,
    nats_config: &NatsConfig,
) -> Result<jetstream::consumer::Consumer<pull::Config>, BoxError> {
    let stream = ensure_stream(js, &PRESENCE_STREAM, nats_config).await?;
    Ok(stream
        .get_or_create_consumer(
            CONSUMER,
            pull::Config {
                durable_name: Some(CONSUMER.into()),
                description: Some("telemetry service presence (shared by every replica)".into()),
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                ack_wait: ACK_WAIT,
                ..Default::default()
            },
        )
        .await?)
}

/// True when PostgreSQL refuses the change's data itself (data exception or integrity
/// violation): recording it again can never succeed.
fn refused_data(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Database(e) => e
            .code()
            .is_some_and(|code| code.starts_with("22") || code.starts_with("23")),
        _ => false,
    }
}

/// Answers JetStream for `message`; a lost answer only means the change is delivered again.
async fn acknowledge(message: &jetstream::Message, kind: AckKind) {
    if let Err(e) = message.ack_with(kind).await {
        tracing::debug!(error = %e, "acknowledging a presence change failed; it comes again");
    }
}

/// Sleeps `pause` (or until `shutdown`), then doubles it up to [`MAX_RETRY`].
async fn wait(pause: &mut Duration, shutdown: &CancellationToken) {
    tokio::select! {
        () = tokio::time::sleep(*pause) => {}
        _ = shutdown.cancelled() => {}
    }
    *pause = (*pause * 2).min(MAX_RETRY);
}

/// Counters of [`GatewayWatch`], registered as `liftwire_telemetry_presence_*`.
#[derive(Clone, Default)]
struct WatchMetrics {
    /// Gateway runs declared lost.
    runs_lost: Counter,
    /// Devices recorded offline because the run holding them was lost.
    devices_lost: Counter,
    /// Lost runs found alive and asked to report their devices again.
    refreshes: Counter,
    /// Heartbeats that do not decode or name no run.
    bad_heartbeats: Counter,
}

/// When a gateway run was last heard from.
struct Heard {
    /// The heartbeat's own time (gateway clock, as presence changes are stamped).
    at: DateTime<Utc>,
    /// When it arrived here.
    received: Instant,
    /// Its devices were recorded offline since (no heartbeat came after).
    swept: bool,
    /// It may have devices recorded lost (swept, flagged by a listing, or first heard here):
    /// checked at its next heartbeat, and asked where they are if so.
    check_lost: bool,
    /// When it was last asked where its lost devices are (once per timeout at most: the
    /// answers take a moment to be recorded).
    asked: Option<Instant>,
}

/// Follows the gateways' heartbeats and records the devices a silent gateway run left online
/// as offline, at the time of the run's last heartbeat, so that the device's
/// online report through another gateway, made after that, still wins.
///
/// A run is judged only by a replica that has been connected to NATS for the whole
/// `gateway_timeout`: one that just started, or just got its connection back, has not yet had
/// the chance to hear the runs that are alive. Every replica sweeps; the updates are idempotent.
pub struct GatewayWatch {
    nats: async_nats::Client,
    pool: sqlx::PgPool,
    timeout: Duration,
    metrics: WatchMetrics,
}

impl GatewayWatch {
    /// Registers the metrics; nothing runs yet.
    pub fn build(
        nats: async_nats::Client,
        pool: sqlx::PgPool,
        config: &PresenceConfig,
        ctx: &BuildContext,
    ) -> Result<Self, BoxError> {
        if config.gateway_timeout.is_zero() {
            return Err("presence.gateway_timeout must be above zero".into());
        }
        let metrics = WatchMetrics::default();
        let mut registry = ctx.registry();
        let registry = registry.sub_registry_with_prefix("telemetry_presence");
        registry.register(
            "gateway_runs_lost",
            "Gateway runs whose heartbeats stopped while they held online devices",
            metrics.runs_lost.clone(),
        );
        registry.register(
            "devices_lost",
            "Devices recorded offline because the gateway run holding them was lost",
            metrics.devices_lost.clone(),
        );
        registry.register(
            "gateway_refreshes",
            "Gateway runs recorded lost then heard again, asked to report their devices again",
            metrics.refreshes.clone(),
        );
        registry.register(
            "bad_heartbeats",
            "Gateway heartbeats that do not decode or name no run, ignored",
            metrics.bad_heartbeats.clone(),
        );
        Ok(Self {
            nats,
            pool,
            timeout: config.gateway_timeout,
            metrics,
        })
    }

    /// Follows heartbeats and sweeps until `shutdown`.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), BoxError> {
        let mut heartbeats = self.nats.subscribe(GATEWAY_HEARTBEAT_FILTER).await?;
        let mut heard: HashMap<String, Heard> = HashMap::new();
        let mut watching_since = Instant::now();
        // When the database was last asked which runs hold online devices.
        let mut listed: Option<Instant> = None;
        let mut sweep = tokio::time::interval((self.timeout / 4).min(Duration::from_secs(1)));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Heartbeats before sweeps: after a slow turn, those that queued meanwhile must
            // count before any run is judged silent.
            let worked = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return Ok(()),
                beat = heartbeats.next() => {
                    let started = Instant::now();
                    let Some(beat) = beat else {
                        return Err("the gateway heartbeat subscription ended".into());
                    };
                    match v1::GatewayHeartbeat::decode(beat.payload.as_ref()) {
                        Ok(beat) if !beat.gateway_run.is_empty() => {
                            let at = beat.at.as_ref().and_then(datetime).unwrap_or_else(Utc::now);
                            let previous = heard.get(&beat.gateway_run);
                            let mut check_lost = previous.is_none_or(|h| h.check_lost);
                            let mut asked = previous.and_then(|h| h.asked);
                            if check_lost && asked.is_none_or(|at| at.elapsed() >= self.timeout) {
                                match self.ask_where_lost_devices_are(&beat).await {
                                    Ok(true) => asked = Some(Instant::now()),
                                    Ok(false) => check_lost = false,
                                    Err(e) => tracing::warn!(error = %e, "checking a gateway run for lost devices failed; its next heartbeat retries"),
                                }
                            }
                            heard.insert(beat.gateway_run, Heard { at, received: Instant::now(), swept: false, check_lost, asked });
                        }
                        _ => {
                            self.metrics.bad_heartbeats.inc();
                            tracing::debug!(subject = %beat.subject, "ignoring a malformed gateway heartbeat");
                        }
                    }
                    started.elapsed()
                }
                _ = sweep.tick() => {
                    let started = Instant::now();
                    if self.nats.connection_state() != async_nats::connection::State::Connected {
                        watching_since = Instant::now();
                        continue;
                    }
                    if watching_since.elapsed() < self.timeout {
                        continue;
                    }
                    let list = listed.is_none_or(|at| at.elapsed() >= self.timeout);
                    match self.sweep(&mut heard, list).await {
                        Ok(()) if list => listed = Some(Instant::now()),
                        Ok(()) => {}
                        Err(e) => tracing::warn!(error = %e, "checking gateway runs failed; next sweep retries"),
                    }
                    // Runs silent for long are gone for good (or their devices are offline).
                    heard.retain(|_, h| h.received.elapsed() < self.timeout * 10);
                    started.elapsed()
                }
            };
            // Work that waited long on the database (a failover) left heartbeats unread: this
            // replica's view of the runs is stale until it has listened for a whole timeout.
            if worked >= self.timeout / 4 {
                watching_since = Instant::now();
            }
        }
    }

    /// If the run `beat` names has devices recorded lost, asks it where they are; returns
    /// whether it was asked (its next heartbeats check again, until the answers are recorded).
    async fn ask_where_lost_devices_are(
        &self,
        beat: &v1::GatewayHeartbeat,
    ) -> Result<bool, BoxError> {
        let lost: Vec<(String, String)> = sqlx::query_as(
            "SELECT device_id, building_id FROM device_presence
             WHERE lost AND gateway_run = $1 LIMIT $2",
        )
        .bind(&beat.gateway_run)
        .bind(MAX_ASKED)
        .fetch_all(&self.pool)
        .await?;
        if lost.is_empty() {
            return Ok(false);
        }
        let subject = gateway_refresh_subject(&beat.gateway_id)?;
        let refresh = v1::PresenceRefresh {
            gateway_run: beat.gateway_run.clone(),
            devices: lost
                .into_iter()
                .map(
                    |(device_id, building_id)| v1::presence_refresh::LostDevice {
                        device_id,
                        building_id,
                    },
                )
                .collect(),
        };
        let asked = refresh.devices.len();
        self.nats
            .publish(subject, refresh.encode_to_vec().into())
            .await?;
        self.metrics.refreshes.inc();
        tracing::info!(gateway_run = %beat.gateway_run, devices = asked, "a gateway run recorded lost is alive; asked where its devices are");
        Ok(true)
    }

    /// Records offline the devices of the runs silent for longer than the timeout: the runs
    /// this replica heard go silent, at once; with `list`, also the runs the database says hold
    /// online devices (runs this replica never heard, and online reports that arrived late from
    /// a run already swept).
    async fn sweep(
        &self,
        heard: &mut HashMap<String, Heard>,
        list: bool,
    ) -> Result<(), sqlx::Error> {
        let silent = |h: &Heard| h.received.elapsed() >= self.timeout;
        let mut runs: Vec<String> = heard
            .iter()
            .filter(|(_, h)| silent(h) && !h.swept)
            .map(|(run, _)| run.clone())
            .collect();
        if list {
            // Runs with devices recorded lost, perhaps by another replica that stopped hearing
            // them: if this replica still hears them, they are asked at their next heartbeat.
            let lost: Vec<String> =
                sqlx::query_scalar("SELECT DISTINCT gateway_run FROM device_presence WHERE lost")
                    .fetch_all(&self.pool)
                    .await?;
            for run in lost {
                if let Some(h) = heard.get_mut(&run) {
                    h.check_lost = true;
                }
            }
            let holding: Vec<String> = sqlx::query_scalar(
                "SELECT DISTINCT gateway_run FROM device_presence WHERE online AND gateway_run <> ''",
            )
            .fetch_all(&self.pool)
            .await?;
            runs.extend(
                holding
                    .into_iter()
                    .filter(|run| heard.get(run).is_none_or(|h| silent(h) && h.swept)),
            );
        }
        for run in runs {
            // A run never heard was silent for the whole timeout this replica watched.
            let lost_at = heard
                .get(&run)
                .map_or_else(|| Utc::now() - self.timeout, |h| h.at);
            let lost = sqlx::query(
                "UPDATE device_presence SET online = false, lost = true, lost_at = GREATEST(at, $2)
                 WHERE online AND gateway_run = $1",
            )
            .bind(&run)
            .bind(lost_at)
            .execute(&self.pool)
            .await?
            .rows_affected();
            if let Some(h) = heard.get_mut(&run) {
                // Asked where its devices are, should it be heard again.
                h.swept = true;
                h.check_lost = true;
            }
            if lost > 0 {
                self.metrics.runs_lost.inc();
                self.metrics.devices_lost.inc_by(lost);
                tracing::warn!(gateway_run = %run, devices = lost, last_heard = %lost_at, "gateway run lost; its devices are recorded offline");
            }
        }
        Ok(())
    }
}
