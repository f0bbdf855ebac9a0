//! The gateway is where devices enter the backbone: an embedded MQTT broker (`rumqttd`) whose
//! every connection is guarded ([`protocol::Guard`]), bridged to NATS.
//!
//! * Devices authenticate with per-device secrets from the [`registry`] (PostgreSQL, owned here).
//! * What a device publishes on its own uplink topics goes, attributed to its authenticated
//!   identity and validated, into the `LW_UPLINK` JetStream stream ([`uplink`]); anything invalid
//!   into `LW_DLQ` with its reason.
//! * What services publish on downlink subjects reaches exactly the addressed devices through
//!   the broker ([`downlink`]); retained kinds come from `LW_RETAINED`.
//! * Presence changes go to `lw.v1.presence.{building}.{device}`, stored in `LW_PRESENCE`
//!   ([`presence`]).
//!
//! No local state: several replicas serve the same fleet.

pub mod acl;
pub mod control;
pub mod downlink;
pub mod edge;
pub mod metrics;
pub mod presence;
pub mod protocol;
pub mod registry;
pub mod session;
pub mod uplink;
pub mod uploads;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream;
use chrono::Utc;
use liftwire_proto::naming::{DEAD_LETTER_STREAM, PRESENCE_STREAM, RETAINED_STREAM, UPLINK_STREAM};
use liftwire_runtime::admin::ReadinessCheck;
use liftwire_runtime::database::DatabaseConfig;
use liftwire_runtime::nats::{ensure_stream, NatsConfig};
use liftwire_runtime::observability::HeadSampler;
use liftwire_runtime::service::{BoxError, BuildContext, Service};
use liftwire_runtime::RuntimeConfig;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{v4::V4, v5::V5, Disconnect, DisconnectReasonCode, Packet};
use rumqttd::{ConnectionSettings, LinkType, Router, RouterConfig, Server, ServerSettings};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::metrics::{Metrics, Reason};
use crate::protocol::Guard;
use crate::registry::Registry;
use crate::session::Shared;

/// Configuration of the gateway.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Shared runtime settings.
    pub runtime: RuntimeConfig,
    /// NATS connection and stream settings.
    pub nats: NatsConfig,
    /// The device registry's database.
    pub database: DatabaseConfig,
    /// MQTT listeners and limits.
    pub mqtt: MqttConfig,
    /// Where devices upload files (presigned PUT URLs); without it, upload requests are refused.
    pub uploads: Option<uploads::UploadsConfig>,
    /// Name of this replica in presence events, heartbeats and logs: an identifier
    /// (`[A-Za-z0-9_-]`, up to 64 bytes). Defaults to the host name's first label.
    pub gateway_id: String,
    /// How often NATS connectivity is checked for `/readyz`.
    #[serde(with = "humantime_serde")]
    pub readiness_interval: Duration,
    /// How often this gateway tells telemetry it is alive (`lw.v1.gateway.{id}.heartbeat`);
    /// well under telemetry's `presence.gateway_timeout`, after which the devices it reported
    /// online are recorded offline.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            runtime: RuntimeConfig::default(),
            nats: NatsConfig::default(),
            database: DatabaseConfig::default(),
            mqtt: MqttConfig::default(),
            uploads: None,
            gateway_id: std::fs::read_to_string("/etc/hostname")
                .ok()
                .and_then(|h| h.trim().split('.').next().map(str::to_owned))
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "gateway".into()),
            readiness_interval: Duration::from_secs(1),
            heartbeat_interval: Duration::from_secs(5),
        }
    }
}

/// `[mqtt]` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// MQTT 3.1.1 listener (port 0: a free port, logged at start-up).
    pub listen: SocketAddr,
    /// Optional MQTT 5 listener.
    pub listen_v5: Option<SocketAddr>,
    /// Optional MQTT-over-TLS listener (terminated by the gateway, optionally with mTLS). Keep the
    /// plain listeners on loopback when devices connect over TLS only.
    pub tls: Option<edge::TlsConfig>,
    /// Optional MQTT-over-WebSocket listener (in-cabin screens running in browsers).
    pub listen_ws: Option<SocketAddr>,
    /// Longest a TLS/WebSocket handshake may take; a silent socket is closed after it.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// TLS/WebSocket handshakes in progress at once.
    pub max_pending_handshakes: usize,
    /// Largest accepted packet, and largest envelope bridged.
    pub max_payload_bytes: usize,
    /// Time a new connection has to send CONNECT.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Connections the broker accepts.
    pub max_connections: usize,
    /// Extra delay before a failed login is answered (slows down guessing).
    #[serde(with = "humantime_serde")]
    pub auth_failure_delay: Duration,
    /// How long a registry lookup is trusted (a revoked or rotated device is refused after this).
    #[serde(with = "humantime_serde")]
    pub registry_cache_ttl: Duration,
    /// How often sessions are checked against the registry (revoked devices, and those whose
    /// secret was rotated since they logged in, are disconnected).
    #[serde(with = "humantime_serde")]
    pub revocation_poll: Duration,
    /// Sustained uplink messages per second per device (above zero); a publish over it gets no
    /// PUBACK and closes the connection (counted), the device resending it once reconnected.
    pub rate_limit_per_second: f64,
    /// Uplink burst per device (at least 1).
    pub rate_limit_burst: f64,
    /// Uplink messages queued for the bridge; when full, publishing devices are disconnected
    /// (they keep the message in their outbox) instead of growing memory.
    pub uplink_queue: usize,
    /// JetStream publishes awaiting acknowledgement at once.
    pub max_in_flight: usize,
    /// Router commit-log segment size. The broker keeps the downlink of each subscribed device
    /// in a log of at most `segment_count` segments (a segment goes over by at most one message),
    /// read or not, and drops it when the device leaves: this bounds its memory per connected
    /// device. A device that falls further behind skips the oldest messages (a watermark is
    /// superseded by the next; retained content comes again on reconnect).
    pub segment_bytes: usize,
    /// Router commit-log segments kept per subscribed filter.
    pub segment_count: usize,
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            listen_v5: None,
            tls: None,
            listen_ws: None,
            handshake_timeout: Duration::from_secs(5),
            max_pending_handshakes: 256,
            max_payload_bytes: 64 * 1024,
            connect_timeout: Duration::from_secs(10),
            max_connections: 50_000,
            auth_failure_delay: Duration::from_secs(1),
            registry_cache_ttl: Duration::from_secs(5),
            revocation_poll: Duration::from_secs(1),
            rate_limit_per_second: 50.0,
            rate_limit_burst: 500.0,
            uplink_queue: 20_000,
            max_in_flight: 2_048,
            segment_bytes: 128 * 1024,
            segment_count: 4,
        }
    }
}

/// A broker listener on `addr`, started when the gateway runs.
fn start_later<P: rumqttd::protocol::Protocol + Clone + Send + Sync + 'static>(
    addr: SocketAddr,
    what: &'static str,
    mut server: Server<P>,
) -> Listener {
    let start = move || {
        tokio::spawn(async move {
            if let Err(e) = server.start(LinkType::Remote).await {
                tracing::error!(error = %e, what, "broker listener failed");
            }
        })
    };
    (addr, Box::new(start))
}

/// A broker listener bound on `addr` now (port 0: a free port), handed to rumqttd (patch 8). Bound
/// here and not by rumqttd when it starts, so no other process can take a port picked free in
/// between; the backlog is tokio's own (1,024), for connect storms.
fn broker_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// The running gateway.
pub struct Gateway {
    config: Config,
    nats: async_nats::Client,
    js: jetstream::Context,
    registry: Arc<Registry>,
    shared: Arc<Shared>,
    metrics: Metrics,
    uplink_rx: mpsc::Receiver<session::Incoming>,
    presence: Arc<presence::PresenceBoard>,
    subscribed_rx: mpsc::Receiver<(
        liftwire_proto::naming::BuildingId,
        liftwire_proto::naming::DeviceId,
    )>,
    uploads: Option<uploads::Uploads>,
    links: LinkFactory,
    servers: Vec<Listener>,
    mqtt_addr: SocketAddr,
    mqtt_v5_addr: Option<SocketAddr>,
    tls: Option<(TcpListener, Arc<rustls::ServerConfig>)>,
    websocket: Option<TcpListener>,
    nats_ready: ReadinessCheck,
    mqtt_ready: ReadinessCheck,
}

/// Opens an in-process link into the broker under a client id (blocking until the router
/// answers). A closure because rumqttd's router sender type cannot be named outside the crate.
type LinkFactory = Arc<dyn Fn(&str) -> Result<(LinkTx, LinkRx), String> + Send + Sync>;

/// A listener address and how to start it.
type Listener = (
    SocketAddr,
    Box<dyn FnOnce() -> tokio::task::JoinHandle<()> + Send>,
);

impl Gateway {
    /// Address of the MQTT 3.1.1 listener.
    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt_addr
    }

    /// Address of the MQTT 5 listener, if configured.
    pub fn mqtt_v5_addr(&self) -> Option<SocketAddr> {
        self.mqtt_v5_addr
    }

    /// Address of the MQTT-over-TLS listener, if configured.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// Address of the MQTT-over-WebSocket listener, if configured.
    pub fn websocket_addr(&self) -> Option<SocketAddr> {
        self.websocket.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// The device registry.
    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }
}

fn server_settings(
    name: &str,
    listen: SocketAddr,
    mqtt: &MqttConfig,
    registry: Arc<Registry>,
    shared: Arc<Shared>,
    links: LinkFactory,
) -> ServerSettings {
    let mut settings = ServerSettings {
        name: name.into(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: ConnectionSettings {
            connection_timeout_ms: u16::try_from(mqtt.connect_timeout.as_millis())
                .unwrap_or(u16::MAX),
            max_payload_size: mqtt.max_payload_bytes,
            max_inflight_count: 100,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let delay = mqtt.auth_failure_delay;
    settings.set_auth_handler(move |broker_id: String, username: String, password: String| {
        let registry = registry.clone();
        let shared = shared.clone();
        let links = links.clone();
        async move {
            let client_id = protocol::device_of(&broker_id).to_owned();
            match registry.authenticate(&client_id, &username, &password).await {
                Ok(login) => match shared.authenticated(login, broker_id) {
                    Ok(previous) => {
                        if let Some(previous) = previous {
                            // One connection per device: the new one replaces the old at once.
                            takeover(&links, previous.broker_id).await;
                        }
                        true
                    }
                    Err(session::Superseded) => {
                        // A newer connection of this device logged in first: this one is stale.
                        shared.metrics.auth_failures.get_or_create(&Reason { reason: "superseded" }).inc();
                        false
                    }
                },
                Err(failure) => {
                    shared.metrics.auth_failures.get_or_create(&Reason { reason: failure.reason() }).inc();
                    tracing::warn!(client_id = %client_id.chars().take(64).collect::<String>(), reason = failure.reason(), "login refused");
                    tokio::time::sleep(delay).await;
                    false
                }
            }
        }
    });
    settings
}

impl Service for Gateway {
    const NAME: &'static str = "gateway";
    type Config = Config;

    fn runtime(config: &Config) -> &RuntimeConfig {
        &config.runtime
    }

    async fn build(config: Config, ctx: &BuildContext) -> Result<Self, BoxError> {
        // It names a NATS subject (heartbeats) and the NATS connection.
        liftwire_proto::naming::gateway_heartbeat_subject(&config.gateway_id)?;
        if config.heartbeat_interval.is_zero() {
            return Err("heartbeat_interval must be above zero".into());
        }
        let (rate, burst) = (
            config.mqtt.rate_limit_per_second,
            config.mqtt.rate_limit_burst,
        );
        if !(rate.is_finite() && rate > 0.0 && burst.is_finite() && burst >= 1.0) {
            return Err(format!(
                "mqtt.rate_limit_per_second ({rate}) must be above zero and mqtt.rate_limit_burst \
                 ({burst}) at least 1"
            )
            .into());
        }
        let nats_ready = ctx.readiness.register("nats");
        let mqtt_ready = ctx.readiness.register("mqtt");
        let metrics = Metrics::register(&mut ctx.registry());
        let registry = Arc::new(Registry::new(
            config.database.pool()?,
            config.mqtt.registry_cache_ttl,
        ));
        let nats = liftwire_runtime::nats::connect(
            &config.nats,
            &format!("liftwire-gateway-{}", config.gateway_id),
        )
        .await?;
        let js = jetstream::new(nats.clone());
        for spec in [
            &UPLINK_STREAM,
            &DEAD_LETTER_STREAM,
            &RETAINED_STREAM,
            &PRESENCE_STREAM,
        ] {
            ensure_stream(&js, spec, &config.nats).await?;
        }
        // Connected now (the streams were declared), so the server's limit is known.
        check_payload_limit(
            config.mqtt.max_payload_bytes,
            nats.server_info().max_payload,
        )?;

        let (uplink_tx, uplink_rx) = mpsc::channel(config.mqtt.uplink_queue);
        let uploads = config
            .uploads
            .clone()
            .map(uploads::Uploads::new)
            .transpose()?;
        let presence = Arc::new(presence::PresenceBoard::new(config.gateway_id.clone()));
        let (subscribed_tx, subscribed_rx) = mpsc::channel(4_096);
        let shared = Arc::new(Shared::new(
            uplink_tx,
            presence.clone(),
            subscribed_tx,
            metrics.clone(),
            (
                config.mqtt.rate_limit_per_second,
                config.mqtt.rate_limit_burst,
            ),
            HeadSampler::new(config.runtime.observability.trace_sample_ratio),
        ));

        let router = RouterConfig {
            max_connections: config.mqtt.max_connections,
            max_outgoing_packet_count: 200,
            max_segment_size: config.mqtt.segment_bytes.max(1024),
            max_segment_count: config.mqtt.segment_count.max(1),
            ..Default::default()
        };
        let router_sender = Router::new(0, router).spawn();
        let links = router_sender.clone();
        let links: LinkFactory = Arc::new(move |client_id: &str| {
            rumqttd::local::LinkBuilder::new(client_id, links.clone())
                .clean_session(true)
                .build()
                .map(|(tx, rx, _)| (tx, rx))
                .map_err(|e| e.to_string())
        });

        let v4_listener = broker_listener(config.mqtt.listen)?;
        let mqtt_addr = v4_listener.local_addr()?;
        let settings = |name: &str, addr| {
            server_settings(
                name,
                addr,
                &config.mqtt,
                registry.clone(),
                shared.clone(),
                links.clone(),
            )
        };
        let v4 = Server::new(
            settings("v4", mqtt_addr),
            router_sender.clone(),
            Guard::new(V4, shared.clone(), true),
        )
        .with_listener(v4_listener);
        let mut servers = vec![start_later(mqtt_addr, "MQTT 3.1.1", v4)];
        let mut mqtt_v5_addr = None;
        if let Some(listen) = config.mqtt.listen_v5 {
            let listener = broker_listener(listen)?;
            let addr = listener.local_addr()?;
            mqtt_v5_addr = Some(addr);
            let v5 = Server::new(
                settings("v5", addr),
                router_sender.clone(),
                Guard::new(V5, shared.clone(), false),
            )
            .with_listener(listener);
            servers.push(start_later(addr, "MQTT 5", v5));
        }
        let tls = match &config.mqtt.tls {
            Some(tls) => Some((
                TcpListener::bind(tls.listen).await?,
                edge::server_config(tls)?,
            )),
            None => None,
        };
        let websocket = match config.mqtt.listen_ws {
            Some(addr) => Some(TcpListener::bind(addr).await?),
            None => None,
        };
        Ok(Self {
            tls,
            websocket,
            config,
            nats,
            js,
            registry,
            shared,
            metrics,
            uplink_rx,
            presence,
            subscribed_rx,
            uploads,
            links,
            servers,
            mqtt_addr,
            mqtt_v5_addr,
            nats_ready,
            mqtt_ready,
        })
    }

    async fn run(self, shutdown: CancellationToken) -> Result<(), BoxError> {
        let Gateway {
            config,
            nats,
            js,
            registry,
            shared,
            metrics,
            uplink_rx,
            presence,
            subscribed_rx,
            uploads,
            links,
            servers,
            mqtt_addr,
            nats_ready,
            mqtt_ready,
            mqtt_v5_addr,
            tls,
            websocket,
        } = self;
        let tasks = CancellationToken::new();

        // The bridge's own link into the broker, for downlink.
        let link = links.clone();
        let (link_tx, link_rx) =
            tokio::task::spawn_blocking(move || link(downlink::BRIDGE_CLIENT_ID)).await??;
        let (to_broker, writer) = downlink::spawn_link_writer(link_tx)?;

        let bridge = tokio::spawn(uplink::run(
            uplink_rx,
            js.clone(),
            metrics.clone(),
            uplink::BridgeSettings {
                max_payload: config.mqtt.max_payload_bytes,
                max_in_flight: config.mqtt.max_in_flight,
                retry_backoff: Duration::from_millis(100),
                gateway_id: config.gateway_id.clone(),
                uploads,
                nats: nats.clone(),
            },
            tasks.child_token(),
        ));
        let heartbeat = tokio::spawn(presence::heartbeat(
            nats.clone(),
            shared.clone(),
            config.heartbeat_interval,
            tasks.child_token(),
        ));
        let presence = tokio::spawn(presence::run(
            presence,
            js.clone(),
            metrics.clone(),
            presence::PresenceSettings::default(),
            tasks.child_token(),
        ));
        let drain = tokio::spawn(downlink::drain_link(link_rx, tasks.child_token()));
        let down = tokio::spawn({
            let run = downlink::run(
                nats.clone(),
                js.clone(),
                to_broker,
                metrics.clone(),
                config.mqtt.max_payload_bytes,
                tasks.child_token(),
            );
            async move {
                if let Err(e) = run.await {
                    tracing::error!(error = %e, "downlink bridge failed");
                }
            }
        });
        let control = tokio::spawn({
            let serve = control::serve(
                control::Control {
                    registry: registry.clone(),
                    nats: nats.clone(),
                },
                tasks.child_token(),
            );
            async move {
                if let Err(e) = serve.await {
                    tracing::error!(error = %e, "control endpoints failed");
                }
            }
        });
        let results = tokio::spawn({
            let follow =
                control::follow_results(js.clone(), registry.pool().clone(), tasks.child_token());
            async move {
                if let Err(e) = follow.await {
                    tracing::error!(error = %e, "following command results failed");
                }
            }
        });
        let resend = tokio::spawn(control::resend_on_subscribe(
            subscribed_rx,
            registry.pool().clone(),
            nats.clone(),
            tasks.child_token(),
        ));
        let revocations = tokio::spawn(watch_revocations(
            registry,
            shared.clone(),
            links,
            config.mqtt.revocation_poll,
            tasks.child_token(),
        ));

        let mut listeners = Vec::new();
        for (addr, start) in servers {
            listeners.push(start());
            wait_listening(addr).await?;
            tracing::info!(%addr, "MQTT listener ready");
        }
        let upstream = edge::Upstream {
            v4: mqtt_addr,
            v5: mqtt_v5_addr,
        };
        let limits = edge::EdgeLimits {
            handshake_timeout: config.mqtt.handshake_timeout,
            max_pending_handshakes: config.mqtt.max_pending_handshakes,
            max_websocket_message_bytes: edge::EdgeLimits::websocket_message_bytes(
                config.mqtt.max_payload_bytes,
            ),
        };
        let mut edges = Vec::new();
        if let Some((listener, tls)) = tls {
            tracing::info!(addr = %listener.local_addr()?, "MQTT over TLS listener ready");
            edges.push(tokio::spawn(edge::serve_tls(
                listener,
                tls,
                upstream,
                limits,
                metrics.clone(),
                tasks.child_token(),
            )));
        }
        if let Some(listener) = websocket {
            tracing::info!(addr = %listener.local_addr()?, "MQTT over WebSocket listener ready");
            edges.push(tokio::spawn(edge::serve_websocket(
                listener,
                upstream,
                limits,
                metrics.clone(),
                tasks.child_token(),
            )));
        }
        mqtt_ready.set(true);
        tracing::info!(gateway_id = %config.gateway_id, mqtt = %mqtt_addr, "gateway running");

        let mut tick = tokio::time::interval(config.readiness_interval);
        loop {
            tokio::select! {
                _ = tick.tick() => nats_ready.set(nats.connection_state() == State::Connected),
                _ = shutdown.cancelled() => break,
            }
        }

        // Drain: stop accepting, refuse new publishes (devices resend elsewhere from their
        // outbox), flush what was accepted into JetStream, then stop.
        mqtt_ready.set(false);
        nats_ready.set(false);
        for listener in listeners.iter().chain(&edges) {
            listener.abort();
        }
        shared.draining.store(true, Ordering::SeqCst);
        // A kicked connection closes at its next read, perhaps a keep-alive later: its device
        // is reported offline now, while the presence publisher still runs.
        for client_id in shared.connected() {
            // A connection not yet accepted (no CONNACK) was never reported online.
            if let Some(session) = shared.kick(&client_id).filter(|s| s.online.get().is_some()) {
                shared.presence(session::PresenceChange {
                    identity: session.identity,
                    state: liftwire_proto::v1::PresenceState::Offline,
                    reason: liftwire_proto::v1::DisconnectReason::GatewayShutdown,
                    at: std::time::SystemTime::now(),
                });
            }
        }
        tasks.cancel();
        // A task that panicked fails the shutdown loudly instead of vanishing.
        for (name, task) in [
            ("uplink bridge", bridge),
            ("presence", presence),
            ("broker link", drain),
            ("downlink", down),
            ("revocations", revocations),
            ("control endpoints", control),
            ("command results", results),
            ("command resends", resend),
        ] {
            task.await.map_err(|e| format!("{name} task failed: {e}"))?;
        }
        heartbeat
            .await
            .map_err(|e| format!("heartbeat task failed: {e}"))?
            .map_err(|e| format!("heartbeat task failed: {e}"))?;
        drop(shared);
        let _ = tokio::task::spawn_blocking(move || writer.join()).await;
        // Bounded: with NATS gone, flushing would wait for a reconnect forever.
        match tokio::time::timeout(Duration::from_secs(5), nats.flush()).await {
            Ok(flushed) => flushed?,
            Err(_) => tracing::warn!(
                "NATS unreachable at shutdown; unflushed publishes are resent by devices"
            ),
        }
        Ok(())
    }
}

/// Closes the broker connection `broker_id` at once: a link that takes over its client id makes
/// the router drop the connection, then disconnects itself.
async fn takeover(links: &LinkFactory, broker_id: String) {
    let link = links.clone();
    let taken = tokio::task::spawn_blocking(move || -> Result<(), String> {
        let (mut tx, _rx) = link(&broker_id)?;
        let disconnect = Disconnect {
            reason_code: DisconnectReasonCode::AdministrativeAction,
        };
        futures::executor::block_on(tx.send(Packet::Disconnect(disconnect, None)))
            .map(drop)
            .map_err(|e| e.to_string())
    })
    .await;
    if let Ok(Err(e)) = taken {
        tracing::warn!(error = %e, "closing a replaced or revoked connection failed");
    }
}

async fn wait_listening(addr: SocketAddr) -> Result<(), BoxError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            return Err(format!("MQTT listener {addr} did not start").into());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Keeps the sessions honest against the registry until `shutdown`. Every `every`: forgets the
/// cached lookups of devices changed recently (so a rotated secret stops working here too), then
/// disconnects every device whose session is stale: revoked, removed, or logged in with
/// credentials since rotated (by taking over its client id in the broker).
async fn watch_revocations(
    registry: Arc<Registry>,
    shared: Arc<Shared>,
    links: LinkFactory,
    every: Duration,
    shutdown: CancellationToken,
) {
    // Changes are read again for a while: one committed late can carry an earlier time.
    const OVERLAP: chrono::Duration = chrono::Duration::seconds(60);
    let mut since = Utc::now() - OVERLAP;
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.cancelled() => break,
        }
        match registry.changes_since(since - OVERLAP).await {
            Ok(changes) => {
                for change in changes {
                    since = since.max(change.updated_at);
                    registry.forget(&change.device_id);
                }
            }
            Err(e) => tracing::warn!(error = %e, "polling the device registry failed"),
        }
        let sessions = shared.credentials();
        if sessions.is_empty() {
            continue;
        }
        let stale = match registry.stale_sessions(&sessions).await {
            Ok(stale) => stale,
            Err(e) => {
                tracing::warn!(error = %e, "checking sessions against the device registry failed");
                continue;
            }
        };
        for (device, credentials) in stale {
            registry.forget(&device);
            if let Some(session) = shared.kick_stale(&device, credentials) {
                tracing::warn!(%device, "device revoked or its secret rotated: disconnecting it");
                takeover(&links, session.broker_id).await;
            }
        }
    }
}

/// Room for the headers the bridge adds to a device message (`Nats-Msg-Id`, `traceparent`).
const HEADER_ROOM: usize = 1024;

/// Refuses to start when an accepted device message could exceed what nats-server takes: such a
/// message would fail its publish at every retry, and hold up the bridge for every device.
fn check_payload_limit(max_payload_bytes: usize, server_max: usize) -> Result<(), String> {
    if max_payload_bytes + HEADER_ROOM > server_max {
        return Err(format!(
            "mqtt.max_payload_bytes ({max_payload_bytes}) plus {HEADER_ROOM} bytes of headers \
             exceeds nats-server's max_payload ({server_max}): lower it, or raise the server's"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_payload_limit_nats_server_cannot_take_is_refused_at_start() {
        // nats-server's default max_payload is 1 MiB.
        assert!(super::check_payload_limit(64 * 1024, 1024 * 1024).is_ok());
        let refused = super::check_payload_limit(1024 * 1024, 1024 * 1024).unwrap_err();
        assert!(refused.contains("max_payload (1048576)"), "{refused}");
    }
}
