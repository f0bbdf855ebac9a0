//! A gateway on real servers, and MQTT devices to talk to it.

#![allow(clippy::unwrap_used, dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use liftwire_gateway::acl::DeviceKind;
use liftwire_gateway::registry::Registry;
use liftwire_gateway::{Config, Gateway, MqttConfig};
use liftwire_proto::naming::{BuildingId, DeviceId};
use liftwire_proto::{mqtt, v1, Message, Timestamp, SCHEMA_VERSION};
use liftwire_runtime::database::DatabaseConfig;
use liftwire_runtime::nats::NatsConfig;
use liftwire_runtime::service::{BuildContext, Service};
use liftwire_testkit::{Nats, Postgres};
use rumqttc::{AsyncClient, ConnectionError, Event, MqttOptions, Packet, QoS};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub const WAIT: Duration = Duration::from_secs(15);

/// Provisions `device` of `building` in the replica's registry; returns its secret.
pub async fn provision(
    replica: &Replica,
    building: &str,
    device: &str,
    kind: DeviceKind,
) -> String {
    replica
        .registry
        .provision(
            &BuildingId::new(building).unwrap(),
            &DeviceId::new(device).unwrap(),
            kind,
        )
        .await
        .unwrap()
}

/// A running gateway replica.
pub struct Replica {
    pub addr: SocketAddr,
    pub addr_v5: SocketAddr,
    pub tls_addr: Option<SocketAddr>,
    pub ws_addr: Option<SocketAddr>,
    pub ctx: BuildContext,
    pub stop: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
    pub registry: Arc<Registry>,
}

impl Replica {
    pub async fn start(nats: &Nats, pg: &Postgres, name: &str) -> Self {
        Self::start_with(nats, pg, name, |_| {}).await
    }

    /// Starts a replica after `tune` adjusted its MQTT settings.
    pub async fn start_with(
        nats: &Nats,
        pg: &Postgres,
        name: &str,
        tune: impl FnOnce(&mut MqttConfig),
    ) -> Self {
        Self::start_with_config(nats, pg, name, |config| tune(&mut config.mqtt)).await
    }

    /// Starts a replica after `tune` adjusted its configuration.
    pub async fn start_with_config(
        nats: &Nats,
        pg: &Postgres,
        name: &str,
        tune: impl FnOnce(&mut Config),
    ) -> Self {
        let mut config = Config {
            nats: NatsConfig {
                url: nats.url(),
                ..Default::default()
            },
            database: DatabaseConfig {
                url: pg.url(),
                ..Default::default()
            },
            mqtt: MqttConfig {
                listen: "127.0.0.1:0".parse().unwrap(),
                listen_v5: Some("127.0.0.1:0".parse().unwrap()),
                auth_failure_delay: Duration::from_millis(20),
                registry_cache_ttl: Duration::from_millis(500),
                revocation_poll: Duration::from_millis(100),
                ..Default::default()
            },
            gateway_id: name.into(),
            readiness_interval: Duration::from_millis(20),
            ..Default::default()
        };
        tune(&mut config);
        let ctx = BuildContext::new();
        let gateway = Gateway::build(config, &ctx).await.expect("gateway builds");
        let addr = gateway.mqtt_addr();
        let addr_v5 = gateway.mqtt_v5_addr().expect("v5 listener configured");
        let tls_addr = gateway.tls_addr();
        let ws_addr = gateway.websocket_addr();
        let registry = gateway.registry();
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move { gateway.run(stop).await.expect("gateway runs") }
        });
        let deadline = tokio::time::Instant::now() + WAIT;
        while !ctx.readiness.not_ready().is_empty() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "gateway never ready: {:?}",
                ctx.readiness.not_ready()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Replica {
            addr,
            addr_v5,
            tls_addr,
            ws_addr,
            ctx,
            stop,
            task,
            registry,
        }
    }

    /// The replica's metrics in Prometheus text format.
    pub fn metrics(&self) -> String {
        self.ctx.admin_state().metrics_text().unwrap()
    }

    pub async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap();
    }
}

/// Servers plus a migrated registry.
pub async fn servers() -> (Nats, Postgres) {
    let nats = Nats::start().expect("nats");
    let pg = Postgres::start().await.expect("postgres");
    let pool = pg.pool().await.unwrap();
    liftwire_gateway::registry::migrate(&pool)
        .await
        .expect("registry migrates");
    pool.close().await;
    (nats, pg)
}

/// What a test device observed.
#[derive(Debug)]
pub enum Seen {
    Connected,
    Message {
        topic: String,
        payload: Vec<u8>,
        retain: bool,
    },
    Closed(String),
    /// A SUBACK.
    Subscribed,
}

/// An MQTT device (rumqttc) whose event loop runs in the background.
pub struct Device {
    pub client: AsyncClient,
    pub seen: mpsc::UnboundedReceiver<Seen>,
    /// Observations made while waiting for something else (a SUBACK), in order.
    early: std::collections::VecDeque<Seen>,
    task: tokio::task::JoinHandle<()>,
}

impl Device {
    /// Connects; the event loop stops at the first connection error (no reconnect).
    pub fn connect(addr: SocketAddr, client_id: &str, username: &str, password: &str) -> Self {
        let mut options = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
        options.set_credentials(username, password);
        options.set_keep_alive(Duration::from_secs(5));
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let (tx, seen) = mpsc::unbounded_channel();
        let task = tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        let _ = tx.send(Seen::Connected);
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        let _ = tx.send(Seen::Subscribed);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let _ = tx.send(Seen::Message {
                            topic: p.topic.clone(),
                            payload: p.payload.to_vec(),
                            retain: p.retain,
                        });
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = tx.send(Seen::Closed(describe(&e)));
                        break;
                    }
                }
            }
        });
        Device {
            client,
            seen,
            early: std::collections::VecDeque::new(),
            task,
        }
    }

    /// Waits for the next observation.
    pub async fn next(&mut self) -> Seen {
        if let Some(seen) = self.early.pop_front() {
            return seen;
        }
        tokio::time::timeout(WAIT, self.seen.recv())
            .await
            .expect("an MQTT event in time")
            .expect("event loop alive")
    }

    /// Waits until connected, panicking if the connection is refused.
    pub async fn connected(mut self) -> Self {
        match self.next().await {
            Seen::Connected => self,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    /// Waits for the connection to close; returns why.
    pub async fn closed(&mut self) -> String {
        loop {
            if let Seen::Closed(why) = self.next().await {
                return why;
            }
        }
    }

    /// Waits for the next message.
    pub async fn message(&mut self) -> (String, Vec<u8>, bool) {
        loop {
            match self.next().await {
                Seen::Message {
                    topic,
                    payload,
                    retain,
                } => return (topic, payload, retain),
                Seen::Closed(why) => panic!("closed while waiting for a message: {why}"),
                Seen::Connected | Seen::Subscribed => {}
            }
        }
    }

    /// Whether the device stays connected and gets no message within `within`.
    pub async fn quiet_for(&mut self, within: Duration) -> bool {
        if self
            .early
            .iter()
            .any(|seen| matches!(seen, Seen::Message { .. } | Seen::Closed(_)))
        {
            return false;
        }
        loop {
            match tokio::time::timeout(within, self.seen.recv()).await {
                Err(_) => return true,
                // A message, or the connection gone: not a quiet, connected device.
                Ok(Some(Seen::Message { .. } | Seen::Closed(_))) | Ok(None) => return false,
                Ok(Some(_)) => {}
            }
        }
    }

    pub async fn publish(&self, topic: &str, payload: Vec<u8>) {
        self.client
            .publish(topic, QoS::AtLeastOnce, false, payload)
            .await
            .unwrap();
    }

    /// Subscribes and waits for the SUBACK (or the connection closing, on a refused filter), so
    /// that what is published afterwards reaches the device.
    pub async fn subscribe(&mut self, filter: &str) {
        self.client
            .subscribe(filter, QoS::AtLeastOnce)
            .await
            .unwrap();
        loop {
            let seen = tokio::time::timeout(WAIT, self.seen.recv())
                .await
                .expect("a SUBACK in time")
                .expect("event loop alive");
            match seen {
                Seen::Subscribed => return,
                closed @ Seen::Closed(_) => {
                    self.early.push_back(closed);
                    return;
                }
                other => self.early.push_back(other),
            }
        }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn describe(e: &ConnectionError) -> String {
    e.to_string()
}

/// A valid envelope from `device` with sequence number `seq`.
pub fn envelope(device: &str, seq: u64) -> Vec<u8> {
    v1::Envelope {
        schema_version: SCHEMA_VERSION,
        device_id: device.into(),
        seq,
        device_time: Some(Timestamp {
            seconds: 1_795_000_000,
            nanos: 0,
        }),
        body: Some(v1::envelope::Body::Event(v1::Event {
            kind: Some(v1::event::Kind::AlarmButtonPressed(
                v1::AlarmButtonPressed {},
            )),
        })),
    }
    .encode_to_vec()
}

/// Installs the binaries' real tracing setup once per test process, so spans carry OpenTelemetry
/// context (and `traceparent` headers) as they do in production.
pub fn tracing_with_opentelemetry() {
    static INIT: std::sync::Once = std::sync::Once::new();
    INIT.call_once(|| {
        let config = liftwire_runtime::observability::ObservabilityConfig {
            log_filter: "off".into(),
            ..Default::default()
        };
        let guard = liftwire_runtime::observability::init("gateway-test", &config, None)
            .expect("tracing installs");
        // Kept for the whole test process.
        std::mem::forget(guard);
    });
}

/// A raw MQTT 3.1.1 CONNECT (clean session, keep-alive 30 s) with the client id as user name.
pub fn connect_packet(client_id: &str, password: &str) -> Vec<u8> {
    mqtt::connect(client_id, Some((client_id, password)), 30)
}

/// Logs `device` in on a raw `stream` and checks that the gateway accepts it.
pub async fn login<S>(stream: &mut S, device: &str, secret: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    login_with_keep_alive(stream, device, secret, 30).await;
}

/// [`login`] with a keep-alive of `keep_alive` seconds.
pub async fn login_with_keep_alive<S>(stream: &mut S, device: &str, secret: &str, keep_alive: u16)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(&mqtt::connect(device, Some((device, secret)), keep_alive))
        .await
        .unwrap();
    let mut connack = [0u8; 4];
    tokio::time::timeout(WAIT, stream.read_exact(&mut connack))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(connack, mqtt::CONNACK_ACCEPTED);
}
