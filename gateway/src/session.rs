//! State shared by every MQTT connection of a gateway: who is authenticated, and the channels to
//! the bridge.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use bytes::Bytes;
use liftwire_proto::naming::Uplink;
use liftwire_proto::v1::{DisconnectReason, PresenceState};
use tokio::sync::mpsc;

use crate::acl::Identity;
use crate::metrics::Metrics;

/// An authenticated connection's handle.
#[derive(Debug, Clone)]
pub struct Session {
    /// Who is connected.
    pub identity: Arc<Identity>,
    /// The connection's client id inside the broker (`{device}~{n}`, unique per connection).
    pub broker_id: String,
    /// Set to close the connection (revocation, shutdown).
    pub kicked: Arc<AtomicBool>,
}

/// A device message accepted by the access rules, on its way to JetStream.
#[derive(Debug)]
pub struct Incoming {
    /// The authenticated sender.
    pub identity: Arc<Identity>,
    /// Where it was published (already checked to be the sender's own topic).
    pub uplink: Uplink,
    /// The raw protobuf envelope.
    pub payload: Bytes,
    /// MQTT QoS of the publish.
    pub qos: u8,
    /// When the gateway read it.
    pub received: Instant,
    /// The span started at MQTT ingress; its context travels in NATS headers.
    pub span: tracing::Span,
}

/// A connection came or went.
#[derive(Debug, Clone)]
pub struct PresenceChange {
    /// The device.
    pub identity: Arc<Identity>,
    /// Online or offline.
    pub state: PresenceState,
    /// Why it went offline.
    pub reason: DisconnectReason,
}

/// Everything connections share.
pub struct Shared {
    sessions: Mutex<HashMap<String, Session>>,
    /// To the uplink bridge.
    pub uplink: mpsc::Sender<Incoming>,
    /// To the presence publisher.
    pub presence: mpsc::Sender<PresenceChange>,
    /// Metrics.
    pub metrics: Metrics,
    /// Per-device uplink rate limit (messages per second) and burst.
    pub rate_limit: (f64, f64),
    /// Set when the gateway drains: new publishes are refused so devices resend elsewhere.
    pub draining: AtomicBool,
}

impl Shared {
    /// New shared state.
    pub fn new(
        uplink: mpsc::Sender<Incoming>,
        presence: mpsc::Sender<PresenceChange>,
        metrics: Metrics,
        rate_limit: (f64, f64),
    ) -> Self {
        Self {
            sessions: Mutex::new(HashMap::new()),
            uplink,
            presence,
            metrics,
            rate_limit,
            draining: AtomicBool::new(false),
        }
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a successful authentication of connection `broker_id`; returns the device's
    /// previous session, which the caller must close (a device has one connection at a time).
    pub fn authenticated(&self, identity: Identity, broker_id: String) -> Option<Session> {
        let session = Session {
            identity: Arc::new(identity),
            broker_id,
            kicked: Arc::new(AtomicBool::new(false)),
        };
        let previous = self
            .sessions()
            .insert(session.identity.device.to_string(), session);
        if let Some(previous) = &previous {
            previous.kicked.store(true, Ordering::SeqCst);
        }
        previous
    }

    /// The session of `client_id`, if authenticated.
    pub fn session(&self, client_id: &str) -> Option<Session> {
        self.sessions().get(client_id).cloned()
    }

    /// Marks `client_id`'s connection to be closed; returns its session if it was connected here.
    pub fn kick(&self, client_id: &str) -> Option<Session> {
        let session = self.sessions().remove(client_id)?;
        session.kicked.store(true, Ordering::SeqCst);
        Some(session)
    }

    /// Forgets `session` when its connection ends, unless a newer connection replaced it.
    pub fn closed(&self, client_id: &str, session: &Session) {
        let mut sessions = self.sessions();
        if sessions
            .get(client_id)
            .is_some_and(|s| Arc::ptr_eq(&s.kicked, &session.kicked))
        {
            sessions.remove(client_id);
        }
    }

    /// Client ids connected here.
    pub fn connected(&self) -> Vec<String> {
        self.sessions().keys().cloned().collect()
    }

    /// Reports a presence change (dropped and counted if the publisher is saturated).
    pub fn presence(&self, change: PresenceChange) {
        if self.presence.try_send(change).is_err() {
            self.metrics
                .presence_events
                .get_or_create(&crate::metrics::Kind { kind: "dropped" })
                .inc();
        }
    }
}
