//! State shared by every MQTT connection of a gateway: who is authenticated, and the channels to
//! the bridge.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use liftwire_proto::naming::{BuildingId, DeviceId, Uplink};
use liftwire_proto::v1::{DisconnectReason, PresenceState};
use liftwire_runtime::observability::HeadSampler;
use tokio::sync::mpsc;

use crate::acl::Identity;
use crate::metrics::Metrics;
use crate::presence::PresenceBoard;
use crate::registry::Login;
use chrono::{DateTime, Utc};

/// An authenticated connection's handle.
#[derive(Debug, Clone)]
pub struct Session {
    /// Who is connected.
    pub identity: Arc<Identity>,
    /// The connection's client id inside the broker (`{device}~{n}`, unique per connection).
    pub broker_id: String,
    /// Set to close the connection (revocation, shutdown).
    pub kicked: Arc<AtomicBool>,
    /// Version of the credentials the device logged in with ([`crate::registry::Login`]).
    pub credentials: DateTime<Utc>,
    /// When its CONNACK went out and it was reported online; unset before (a connection that
    /// dies before is never reported offline either).
    pub online: Arc<OnceLock<SystemTime>>,
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
    /// The span started at MQTT ingress, its context travels in NATS headers; `Span::none()` for
    /// a message head sampling left out of tracing.
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
    /// When it happened (not when it is published: telemetry orders changes by this time).
    pub at: SystemTime,
}

/// A newer connection of the same device is already authenticated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a newer connection of this device is already in place")]
pub struct Superseded;

/// The connection number in a broker id (`{device}~{n}`); 0 if absent.
fn connection_number(broker_id: &str) -> u64 {
    broker_id
        .rsplit_once(crate::protocol::BROKER_ID_SEPARATOR)
        .and_then(|(_, n)| n.parse().ok())
        .unwrap_or(0)
}

/// Everything connections share.
pub struct Shared {
    sessions: Mutex<HashMap<String, Session>>,
    /// To the uplink bridge.
    pub uplink: mpsc::Sender<Incoming>,
    /// To the presence publisher.
    pub presence: Arc<PresenceBoard>,
    /// Devices that just subscribed to their commands (pending ones are sent again).
    pub subscribed: mpsc::Sender<(BuildingId, DeviceId)>,
    /// Metrics.
    pub metrics: Metrics,
    /// Per-device uplink rate limit (messages per second) and burst.
    pub rate_limit: (f64, f64),
    /// Set when the gateway drains: new publishes are refused so devices resend elsewhere.
    pub draining: AtomicBool,
    /// Which device messages start a recorded trace (`trace_sample_ratio`); the others get no
    /// span, only a `traceparent` saying they are not sampled.
    pub trace_sampler: HeadSampler,
    /// Each device's rate-limit bucket, shared by all its connections (a takeover's new
    /// connection attaches before the old one is gone) and kept after the last closes until
    /// it is full again: reconnecting buys no fresh burst.
    rate_buckets: Mutex<RateBuckets>,
}

/// The devices' rate-limit buckets.
#[derive(Debug, Default)]
struct RateBuckets {
    by_device: HashMap<String, Arc<Mutex<RateBucket>>>,
    /// Size at which the idle, full-again buckets are next looked for and forgotten: twice the
    /// size left by the last look (at least [`MIN_PRUNE_AT`]), so the scans cost O(1) per new
    /// bucket however many devices are connected.
    prune_at: usize,
}

/// Buckets kept before the first look for forgettable ones.
const MIN_PRUNE_AT: usize = 10_000;

/// A token bucket: `rate` tokens per second, at most `burst`.
#[derive(Debug)]
pub struct RateBucket {
    tokens: f64,
    last: Instant,
}

impl RateBucket {
    /// Takes a token if there is one.
    pub fn take(&mut self, rate: f64, burst: f64) -> bool {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * rate).min(burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Whether it has refilled to `burst` by `now`: then it is like a fresh one.
    fn full_by(&self, now: Instant, rate: f64, burst: f64) -> bool {
        rate <= 0.0
            || self.tokens + now.saturating_duration_since(self.last).as_secs_f64() * rate >= burst
    }
}

impl Shared {
    /// New shared state.
    pub fn new(
        uplink: mpsc::Sender<Incoming>,
        presence: Arc<PresenceBoard>,
        subscribed: mpsc::Sender<(BuildingId, DeviceId)>,
        metrics: Metrics,
        rate_limit: (f64, f64),
        trace_sampler: HeadSampler,
    ) -> Self {
        Self {
            sessions: Mutex::new(HashMap::new()),
            uplink,
            presence,
            subscribed,
            metrics,
            rate_limit,
            draining: AtomicBool::new(false),
            trace_sampler,
            rate_buckets: Mutex::new(RateBuckets::default()),
        }
    }

    /// `device`'s rate-limit bucket, shared with its other connections: what it has left, or a
    /// full burst.
    pub fn rate_bucket(&self, device: &str) -> Arc<Mutex<RateBucket>> {
        let (rate, burst) = self.rate_limit;
        let now = Instant::now();
        let mut buckets = self
            .rate_buckets
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if buckets.by_device.len() >= buckets.prune_at.max(MIN_PRUNE_AT) {
            // Forget the idle ones that are full again (no different from fresh ones).
            buckets.by_device.retain(|_, bucket| {
                Arc::strong_count(bucket) > 1
                    || !bucket
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .full_by(now, rate, burst)
            });
            buckets.prune_at = buckets.by_device.len() * 2;
        }
        buckets
            .by_device
            .entry(device.to_owned())
            .or_insert_with(|| {
                Arc::new(Mutex::new(RateBucket {
                    tokens: burst,
                    last: now,
                }))
            })
            .clone()
    }

    /// A connection of `device` is done with `bucket`: forgotten if it was the last one and the
    /// bucket is full again, kept otherwise.
    pub fn release_rate_bucket(&self, device: &str, bucket: Arc<Mutex<RateBucket>>) {
        let (rate, burst) = self.rate_limit;
        let mut buckets = self
            .rate_buckets
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        drop(bucket);
        let forget = buckets.by_device.get(device).is_some_and(|kept| {
            Arc::strong_count(kept) == 1
                && kept.lock().unwrap_or_else(PoisonError::into_inner).full_by(
                    Instant::now(),
                    rate,
                    burst,
                )
        });
        if forget {
            buckets.by_device.remove(device);
        }
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, HashMap<String, Session>> {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records a successful authentication of connection `broker_id`. A device has one connection
    /// at a time and the newest one wins, by connection order (not by which login finished
    /// first): returns `Ok(previous)` with the older session the caller must close, or an error
    /// when a newer connection of the device is already in place and this one must be refused.
    pub fn authenticated(
        &self,
        login: Login,
        broker_id: String,
    ) -> Result<Option<Session>, Superseded> {
        let Login {
            identity,
            credentials,
        } = login;
        let mut sessions = self.sessions();
        let device = identity.device.to_string();
        if let Some(current) = sessions.get(&device) {
            if connection_number(&current.broker_id) > connection_number(&broker_id) {
                return Err(Superseded);
            }
        }
        let session = Session {
            identity: Arc::new(identity),
            broker_id,
            kicked: Arc::new(AtomicBool::new(false)),
            credentials,
            online: Arc::new(OnceLock::new()),
        };
        let previous = sessions.insert(device, session);
        if let Some(previous) = &previous {
            previous.kicked.store(true, Ordering::SeqCst);
        }
        Ok(previous)
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

    /// Answers telemetry's question where `devices` are (it recorded them lost with this run):
    /// online for each one connected here and reported online, offline (now) for the others.
    /// Returns how many are online.
    ///
    /// An online answer carries the time its connection was accepted, not now: if the device
    /// connected to another gateway since (this connection is a leftover the keep-alive has not
    /// closed yet), that gateway's report is newer and wins, in whatever order telemetry gets
    /// the two. Posted under the sessions' lock, so a connection that ends meanwhile is reported
    /// offline after this, and stays offline.
    pub fn refresh(&self, devices: &[(BuildingId, DeviceId)]) -> usize {
        let sessions = self.sessions();
        let now = SystemTime::now();
        let mut online = 0;
        for (building, device) in devices {
            let accepted = sessions
                .get(device.as_str())
                .filter(|s| s.identity.building == *building && !s.kicked.load(Ordering::SeqCst))
                .and_then(|s| s.online.get().copied());
            let (state, at) = match accepted {
                Some(at) => {
                    online += 1;
                    ((PresenceState::Online, DisconnectReason::Unspecified), at)
                }
                None => (
                    (PresenceState::Offline, DisconnectReason::ConnectionLost),
                    now,
                ),
            };
            self.presence.post_refresh(building, device, state, at);
        }
        online
    }

    /// Client ids connected here.
    pub fn connected(&self) -> Vec<String> {
        self.sessions().keys().cloned().collect()
    }

    /// Devices connected here, with the version of the credentials each logged in with.
    pub fn credentials(&self) -> Vec<(String, DateTime<Utc>)> {
        self.sessions()
            .iter()
            .map(|(device, session)| (device.clone(), session.credentials))
            .collect()
    }

    /// Like [`Shared::kick`], if `client_id` is still connected with the `credentials` version
    /// (not since replaced by a login with newer ones).
    pub fn kick_stale(&self, client_id: &str, credentials: DateTime<Utc>) -> Option<Session> {
        let mut sessions = self.sessions();
        if sessions.get(client_id)?.credentials != credentials {
            return None;
        }
        let session = sessions.remove(client_id)?;
        session.kicked.store(true, Ordering::SeqCst);
        Some(session)
    }

    /// Reports a presence change to the presence publisher.
    pub fn presence(&self, change: PresenceChange) {
        self.presence.post(&change);
    }

    /// Reports that `identity` subscribed to its commands. Best effort: when the resender is
    /// saturated (a reconnect storm), the report is dropped and counted; the device gets its
    /// pending commands at its next subscription.
    pub fn subscribed_to_commands(&self, identity: &Identity) {
        let device = (identity.building.clone(), identity.device.clone());
        if self.subscribed.try_send(device).is_err() {
            self.metrics
                .downlink_rejects
                .get_or_create(&crate::metrics::Reason {
                    reason: "resend_queue_full",
                })
                .inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::acl::DeviceKind;
    use liftwire_proto::naming::{BuildingId, DeviceId};

    fn shared() -> Shared {
        shared_with_rate_limit((1.0, 1.0))
    }

    fn shared_with_rate_limit(rate_limit: (f64, f64)) -> Shared {
        let (uplink, _) = mpsc::channel(1);
        let (subscribed, _) = mpsc::channel(1);
        Shared::new(
            uplink,
            Arc::new(PresenceBoard::new("gw-test".into())),
            subscribed,
            Metrics::register(&mut prometheus_client::registry::Registry::default()),
            rate_limit,
            HeadSampler::new(1.0),
        )
    }

    #[test]
    fn a_devices_connections_share_one_bucket_kept_until_full_again() {
        // One token, and a refill no test run waits for.
        let shared = shared_with_rate_limit((0.001, 1.0));
        let take = |bucket: &Arc<Mutex<RateBucket>>| bucket.lock().unwrap().take(0.001, 1.0);
        let kept = |device: &str| {
            shared
                .rate_buckets
                .lock()
                .unwrap()
                .by_device
                .contains_key(device)
        };
        let old = shared.rate_bucket("d");
        let new = shared.rate_bucket("d");
        assert!(
            Arc::ptr_eq(&old, &new),
            "a takeover shares the old connection's"
        );
        assert!(take(&old));
        assert!(
            !take(&new),
            "the burst is the device's, not each connection's"
        );
        shared.release_rate_bucket("d", old);
        shared.release_rate_bucket("d", new);
        assert!(kept("d"), "not full again: kept for the next connection");
        assert!(
            !take(&shared.rate_bucket("d")),
            "reconnecting buys no fresh burst"
        );
        // A bucket full again is like a fresh one: forgotten with its last connection.
        let idle = shared.rate_bucket("e");
        shared.release_rate_bucket("e", idle);
        assert!(!kept("e"));
    }

    fn login() -> Login {
        Login {
            identity: identity(),
            credentials: DateTime::UNIX_EPOCH,
        }
    }

    fn identity() -> Identity {
        Identity {
            device: DeviceId::new("elev-1").unwrap(),
            building: BuildingId::new("b1").unwrap(),
            kind: DeviceKind::Elevator,
        }
    }

    #[test]
    fn the_newest_connection_wins_whatever_order_logins_finish_in() {
        let shared = shared();
        assert!(shared
            .authenticated(login(), "elev-1~15".into())
            .unwrap()
            .is_none());
        // The older connection's login finished last: it is refused, the newer one stays.
        assert_eq!(
            shared
                .authenticated(login(), "elev-1~14".into())
                .unwrap_err(),
            Superseded
        );
        assert_eq!(shared.session("elev-1").unwrap().broker_id, "elev-1~15");
        // A newer connection replaces the current one, which is marked to close.
        let previous = shared
            .authenticated(login(), "elev-1~16".into())
            .unwrap()
            .unwrap();
        assert_eq!(previous.broker_id, "elev-1~15");
        assert!(previous.kicked.load(Ordering::SeqCst));
    }
}
