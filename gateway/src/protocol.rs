//! The guard around rumqttd's MQTT codec. rumqttd clones the protocol once per connection, so
//! this wrapper sees every packet of exactly one client and closes the gaps rumqttd leaves:
//!
//! * access rules: a device publishes only on its own uplink topics and subscribes only to its
//!   own (and its building's broadcast) downlink topics; a violation closes the connection;
//! * attribution: an accepted uplink publish is handed to the bridge with the authenticated
//!   identity, and rewritten to a `$`-topic that marks it handled: the connection acknowledges
//!   it itself (QoS 1) and it never reaches the router, so the broker neither stores nor forwards
//!   device data (its memory holds downlink only) and no uplink message crosses its thread;
//! * v5 → v4: publish properties are never written to a v4 client (rumqttd's v4 writer panics on
//!   them);
//! * presence: CONNACK marks the device online, the end of the connection offline;
//! * per-device rate limit, revocation kicks and drain refusal.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use liftwire_proto::naming::{Audience, Downlink, DownlinkKind};
use liftwire_proto::v1::{DisconnectReason, PresenceState};
use rumqttd::protocol::{ConnectReturnCode, Error, Packet, Protocol};
use tokio::sync::mpsc::error::TrySendError;

use crate::acl;
use crate::metrics::Reason;
use crate::session::{Incoming, PresenceChange, RateBucket, Session, Shared};

/// The topic accepted uplink publishes are rewritten to once the bridge has them: the connection
/// acknowledges them itself and does not pass them to the router ([`Protocol::handled`] of the
/// patched rumqttd). Were one to reach the router anyway, no subscription can match a `$` topic.
pub const BRIDGED_TOPIC: &[u8] = b"$liftwire/bridged";

/// Separates a device id from the connection number in broker client ids. Device ids cannot
/// contain it, so a client cannot forge a broker id.
pub const BROKER_ID_SEPARATOR: char = '~';

static CONNECTIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// The device id inside a broker client id (`{device}~{n}`).
pub fn device_of(broker_id: &str) -> &str {
    broker_id
        .rsplit_once(BROKER_ID_SEPARATOR)
        .map_or(broker_id, |(device, _)| device)
}

#[derive(Debug)]
struct Connection {
    client_id: Option<String>,
    /// The connection's client id inside the broker (`{device}~{n}`): the session it
    /// authenticated is the one with this id, not a newer connection's of the same device.
    broker_id: Option<String>,
    session: Option<Session>,
    online: bool,
    graceful: bool,
    /// The device's rate-limit bucket (once authenticated), shared with its other connections.
    bucket: Option<Arc<Mutex<RateBucket>>>,
    commands: Commands,
}

/// Where a connection is in getting the pending commands of its device sent again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Commands {
    /// Not subscribed to its commands yet.
    NotSubscribed,
    /// Subscribed with this SUBSCRIBE packet id; its SUBACK is not out yet.
    Subscribing(u16),
    /// The resend was asked for (once per connection).
    Asked,
}

/// The per-connection guard; `P` is rumqttd's v4 or v5 codec.
pub struct Guard<P> {
    inner: P,
    shared: Arc<Shared>,
    /// Whether the client speaks MQTT 3.1.1 (its writer must never see properties).
    v4: bool,
    conn: Mutex<Connection>,
}

impl<P> Guard<P> {
    /// A guard prototype for a listener; rumqttd clones it for each connection.
    pub fn new(inner: P, shared: Arc<Shared>, v4: bool) -> Self {
        Self {
            inner,
            shared,
            v4,
            conn: Mutex::new(Connection {
                client_id: None,
                broker_id: None,
                session: None,
                online: false,
                graceful: false,
                commands: Commands::NotSubscribed,
                bucket: None,
            }),
        }
    }

    fn conn(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn violation(&self, violation: acl::Violation) -> Error {
        let client = self.conn().client_id.clone().unwrap_or_default();
        self.shared
            .metrics
            .acl_violations
            .get_or_create(&Reason {
                reason: violation.reason(),
            })
            .inc();
        tracing::warn!(device = %client, reason = violation.reason(), error = %violation, "closing connection: access rule broken");
        Error::InvalidProtocol
    }

    /// Counts and logs a packet the codec refused; the connection closes on the returned error.
    fn refused(&self, error: Error) -> Error {
        let reason = match error {
            Error::PayloadSizeLimitExceeded(_) => "too_large",
            _ => "malformed",
        };
        self.shared
            .metrics
            .packet_errors
            .get_or_create(&Reason { reason })
            .inc();
        let client = self.conn().client_id.clone().unwrap_or_default();
        tracing::warn!(device = %client, reason, error = %error, "closing connection: packet refused");
        error
    }

    /// The session this connection authenticated, if it is still the device's current one.
    fn own_session(&self, conn: &Connection) -> Option<Session> {
        let session = self.shared.session(conn.client_id.as_deref()?)?;
        (conn.broker_id.as_deref() == Some(session.broker_id.as_str())).then_some(session)
    }

    /// Makes `session` the connection's, with what its device has left of its rate limit (the
    /// limit outlives connections: reconnecting buys no fresh burst).
    fn attach(&self, conn: &mut Connection, session: Session) {
        conn.bucket = Some(self.shared.rate_bucket(session.identity.device.as_str()));
        conn.session = Some(session);
    }

    fn drop_uplink(&self, reason: &'static str) {
        self.shared
            .metrics
            .uplink_dropped
            .get_or_create(&Reason { reason })
            .inc();
    }
}

impl<P: Clone> Clone for Guard<P> {
    /// A fresh guard for a new connection (no state is shared between connections).
    fn clone(&self) -> Self {
        Guard::new(self.inner.clone(), self.shared.clone(), self.v4)
    }
}

impl<P> Drop for Guard<P> {
    fn drop(&mut self) {
        let conn = self.conn.get_mut().unwrap_or_else(PoisonError::into_inner);
        let (Some(client_id), Some(session)) = (conn.client_id.as_deref(), conn.session.as_ref())
        else {
            return;
        };
        if let Some(bucket) = conn.bucket.take() {
            self.shared
                .release_rate_bucket(session.identity.device.as_str(), bucket);
        }
        // Replaced by a newer connection of the same device: it is not going offline.
        let replaced = self
            .shared
            .session(client_id)
            .is_some_and(|s| !Arc::ptr_eq(&s.kicked, &session.kicked));
        self.shared.closed(client_id, session);
        if conn.online {
            self.shared.metrics.connections.dec();
            if replaced {
                return;
            }
            let reason = if self.shared.draining.load(Ordering::SeqCst) {
                DisconnectReason::GatewayShutdown
            } else if session.kicked.load(Ordering::SeqCst) {
                DisconnectReason::Kicked
            } else if conn.graceful {
                DisconnectReason::Graceful
            } else {
                DisconnectReason::ConnectionLost
            };
            self.shared.presence(PresenceChange {
                identity: session.identity.clone(),
                state: PresenceState::Offline,
                reason,
                at: SystemTime::now(),
            });
        }
    }
}

impl<P: Protocol> Protocol for Guard<P> {
    fn read_mut(&mut self, stream: &mut BytesMut, max_size: usize) -> Result<Packet, Error> {
        let header = stream.first().copied();
        let packet = match self.inner.read_mut(stream, max_size) {
            Ok(packet) => packet,
            // Not an error: the rest of the packet has not arrived yet.
            Err(Error::InsufficientBytes(required)) => {
                return Err(Error::InsufficientBytes(required))
            }
            Err(e) => return Err(self.refused(e)),
        };
        let session = {
            let mut conn = self.conn();
            if conn.session.is_none() {
                if let Some(session) = self.own_session(&conn) {
                    self.attach(&mut conn, session);
                }
            }
            conn.session.clone()
        };
        if session
            .as_ref()
            .is_some_and(|s| s.kicked.load(Ordering::SeqCst))
        {
            return Err(Error::InvalidProtocol);
        }
        match packet {
            Packet::Connect(mut connect, properties, will, _, login) => {
                if self.conn().client_id.is_some() {
                    // A second CONNECT is a protocol violation (MQTT 3.1.1 §3.1.0-2): it would
                    // otherwise rename the connection the guard speaks for.
                    return Err(self.refused(Error::InvalidProtocol));
                }
                if let Some(will) = will {
                    // Presence is reported by the gateway itself; a will could only publish
                    // unchecked data through the router.
                    tracing::debug!(topic = ?will.topic, "last will ignored: the gateway reports presence");
                }
                self.conn().client_id = Some(connect.client_id.clone());
                // A broker client id unique to this connection. rumqttd keeps per-client-id state
                // across connections (its will handlers) that a quick reconnect can corrupt,
                // panicking while holding a lock every later CONNECT needs; with unique ids that
                // state never spans two connections. The gateway itself makes a reconnect replace
                // the previous connection (see the auth handler), and sessions are always clean:
                // the outbox and the retained downlink carry what a persistent session would.
                let n = CONNECTIONS.fetch_add(1, Ordering::Relaxed);
                connect.client_id = format!("{}{BROKER_ID_SEPARATOR}{n}", connect.client_id);
                self.conn().broker_id = Some(connect.client_id.clone());
                connect.clean_session = true;
                Ok(Packet::Connect(connect, properties, None, None, login))
            }
            Packet::Publish(mut publish, _properties) => {
                let Some(session) = session else {
                    return Err(Error::InvalidProtocol);
                };
                let topic = std::str::from_utf8(&publish.topic).map_err(|_| Error::TopicNotUtf8)?;
                let uplink =
                    acl::check_publish(&session.identity, topic).map_err(|v| self.violation(v))?;
                let qos = header.map_or(0, |h| (h >> 1) & 0b11);
                let (rate, burst) = self.shared.rate_limit;
                if self.shared.draining.load(Ordering::SeqCst) {
                    // Close: the device resends from its outbox to another replica.
                    self.drop_uplink("draining");
                    return Err(Error::InvalidProtocol);
                }
                let allowed = self.conn().bucket.as_ref().is_some_and(|bucket| {
                    bucket
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .take(rate, burst)
                });
                if !allowed {
                    // No PUBACK and the connection closes, as for a full queue: the device keeps
                    // the message and resends it once reconnected, paced by its backoff. A
                    // message dropped but acknowledged would leave a gap that stops the
                    // device's watermark, and its live state, until some later reconnect.
                    self.drop_uplink("rate_limited");
                    return Err(Error::InvalidProtocol);
                }
                // Every device message starts its own trace (not a child of the
                // connection's span, which would put a connection's messages in one trace
                // and make them share one sampling decision). Head sampling: a message left
                // out of tracing costs no span at all.
                let span = if self.shared.trace_sampler.sample() {
                    tracing::info_span!(parent: None, "mqtt_ingress", device = %session.identity.device, kind = uplink.kind.as_str(), sampling.priority = 1)
                } else {
                    tracing::Span::none()
                };
                let incoming = Incoming {
                    identity: session.identity.clone(),
                    uplink,
                    payload: std::mem::take(&mut publish.payload),
                    qos,
                    received: Instant::now(),
                    span,
                };
                match self.shared.uplink.try_send(incoming) {
                    Ok(()) => {
                        self.shared.metrics.uplink_queue_depth.inc();
                    }
                    Err(TrySendError::Full(_)) => {
                        // Backpressure: no PUBACK, the connection closes, the device keeps
                        // the message in its outbox and resends after reconnecting.
                        self.drop_uplink("queue_full");
                        return Err(Error::InvalidProtocol);
                    }
                    Err(TrySendError::Closed(_)) => {
                        self.drop_uplink("bridge_stopped");
                        return Err(Error::InvalidProtocol);
                    }
                }
                publish.topic = Bytes::from_static(BRIDGED_TOPIC);
                publish.retain = false;
                Ok(Packet::Publish(publish, None))
            }
            Packet::Subscribe(subscribe, properties) => {
                let Some(session) = session else {
                    return Err(Error::InvalidProtocol);
                };
                for filter in &subscribe.filters {
                    acl::check_subscribe(&session.identity, &filter.path)
                        .map_err(|v| self.violation(v))?;
                }
                let commands = Downlink {
                    building: session.identity.building.clone(),
                    audience: Audience::Device(session.identity.device.clone()),
                    kind: DownlinkKind::Command,
                }
                .mqtt_topic();
                if subscribe
                    .filters
                    .iter()
                    .any(|f| rumqttd::protocol::matches(&commands, &f.path))
                {
                    // Asked for once its SUBACK goes out: the router has the subscription by
                    // then, so what is sent again reaches the device.
                    let mut conn = self.conn();
                    if conn.commands == Commands::NotSubscribed {
                        conn.commands = Commands::Subscribing(subscribe.pkid);
                    }
                }
                Ok(Packet::Subscribe(subscribe, properties))
            }
            Packet::Disconnect(disconnect, properties) => {
                self.conn().graceful = true;
                Ok(Packet::Disconnect(disconnect, properties))
            }
            other => Ok(other),
        }
    }

    fn handled(&self, packet: &Packet) -> bool {
        matches!(packet, Packet::Publish(publish, _) if publish.topic == BRIDGED_TOPIC)
    }

    fn write(&self, packet: Packet, write: &mut BytesMut) -> Result<usize, Error> {
        let packet = match packet {
            Packet::ConnAck(ack, properties) => {
                if ack.code == ConnectReturnCode::Success {
                    let mut conn = self.conn();
                    if !conn.online {
                        if let Some(session) = self.own_session(&conn) {
                            conn.online = true;
                            let at = SystemTime::now();
                            let _ = session.online.set(at);
                            self.shared.metrics.connections.inc();
                            self.shared.presence(PresenceChange {
                                identity: session.identity.clone(),
                                state: PresenceState::Online,
                                reason: DisconnectReason::Unspecified,
                                at,
                            });
                            self.attach(&mut conn, session);
                        }
                    }
                }
                Packet::ConnAck(ack, properties)
            }
            Packet::SubAck(ack, properties) => {
                let mut conn = self.conn();
                if conn.commands == Commands::Subscribing(ack.pkid) {
                    conn.commands = Commands::Asked;
                    if let Some(session) = &conn.session {
                        self.shared.subscribed_to_commands(&session.identity);
                    }
                }
                Packet::SubAck(ack, properties)
            }
            // rumqttd's v4 writer panics on properties; a v4 client never gets any.
            Packet::Publish(publish, _) if self.v4 => Packet::Publish(publish, None),
            other => other,
        };
        self.inner.write(packet, write)
    }
}
