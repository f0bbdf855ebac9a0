//! Gateway metrics (Prometheus, under `liftwire_gateway_`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// A stable reason label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct Reason {
    /// Why.
    pub reason: &'static str,
}

/// A message kind label.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct Kind {
    /// Which kind.
    pub kind: &'static str,
}

/// Every gateway metric.
#[derive(Clone)]
pub struct Metrics {
    /// Devices connected and authenticated now.
    pub connections: Gauge,
    /// Refused logins.
    pub auth_failures: Family<Reason, Counter>,
    /// Connections closed for breaking the access rules.
    pub acl_violations: Family<Reason, Counter>,
    /// TLS or WebSocket connections refused before reaching the broker (handshake failed or timed
    /// out, certificate not the device's, CONNECT too large): scanners and health checks too.
    pub edge_refusals: Family<Reason, Counter>,
    /// Connections closed for a packet the MQTT codec refused (malformed or over the size limit).
    pub packet_errors: Family<Reason, Counter>,
    /// Uplink messages stored in JetStream.
    pub uplink_messages: Family<Kind, Counter>,
    /// Uplink messages dead-lettered.
    pub uplink_rejects: Family<Reason, Counter>,
    /// Uplink messages bridged with flawed content, for their consumers to judge.
    pub uplink_flaws: Family<Reason, Counter>,
    /// Uplink messages JetStream already had (a device's resend within the duplicate window).
    pub uplink_duplicates: Counter,
    /// Dead letters that could not be stored (their rejection is still counted).
    pub dead_letter_failures: Counter,
    /// Uplink messages dropped before the bridge (rate limit, full queue, draining).
    pub uplink_dropped: Family<Reason, Counter>,
    /// Uplink messages waiting for the bridge.
    pub uplink_queue_depth: Gauge,
    /// JetStream publish-to-ack latency.
    pub jetstream_publish_seconds: Histogram,
    /// JetStream publishes retried after an error or timeout.
    pub jetstream_retries: Counter,
    /// Downlink messages handed to the broker.
    pub downlink_messages: Family<Kind, Counter>,
    /// Downlink messages refused (bad subject or payload).
    pub downlink_rejects: Family<Reason, Counter>,
    /// Attempts to open the retained downlink consumers (`LW_RETAINED`) that failed.
    pub retained_open_failures: Counter,
    /// Times the retained downlink consumers were opened (at start, then after NATS restarts).
    pub retained_opens: Counter,
    /// Presence changes stored in `LW_PRESENCE`, by state.
    pub presence_events: Family<Kind, Counter>,
    /// Attempts to store a presence change that JetStream refused or did not answer (the change
    /// is kept and published again).
    pub presence_failures: Counter,
}

impl Metrics {
    /// New metrics registered in `registry`.
    pub fn register(registry: &mut Registry) -> Self {
        let m = Metrics {
            connections: Gauge::default(),
            auth_failures: Family::default(),
            acl_violations: Family::default(),
            edge_refusals: Family::default(),
            packet_errors: Family::default(),
            uplink_messages: Family::default(),
            uplink_rejects: Family::default(),
            uplink_flaws: Family::default(),
            uplink_duplicates: Counter::default(),
            dead_letter_failures: Counter::default(),
            uplink_dropped: Family::default(),
            uplink_queue_depth: Gauge::default(),
            jetstream_publish_seconds: Histogram::new(exponential_buckets(0.000_25, 2.0, 16)),
            jetstream_retries: Counter::default(),
            downlink_messages: Family::default(),
            downlink_rejects: Family::default(),
            retained_open_failures: Counter::default(),
            retained_opens: Counter::default(),
            presence_events: Family::default(),
            presence_failures: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("gateway");
        r.register(
            "connections",
            "Devices connected and authenticated now",
            m.connections.clone(),
        );
        r.register(
            "auth_failures",
            "Refused logins, by reason",
            m.auth_failures.clone(),
        );
        r.register(
            "acl_violations",
            "Connections closed for breaking the access rules, by reason",
            m.acl_violations.clone(),
        );
        r.register(
            "edge_refusals",
            "TLS/WebSocket connections refused before the broker, by reason",
            m.edge_refusals.clone(),
        );
        r.register(
            "packet_errors",
            "Connections closed for a packet the MQTT codec refused, by reason",
            m.packet_errors.clone(),
        );
        r.register(
            "uplink_messages",
            "Uplink messages stored in JetStream, by kind",
            m.uplink_messages.clone(),
        );
        r.register(
            "uplink_rejects",
            "Uplink messages dead-lettered, by reason",
            m.uplink_rejects.clone(),
        );
        r.register(
            "uplink_flaws",
            "Uplink messages bridged with flawed content (kind mismatch, implausible clock, NUL in text), by reason",
            m.uplink_flaws.clone(),
        );
        r.register(
            "uplink_duplicates",
            "Uplink messages JetStream already had (resends within the duplicate window)",
            m.uplink_duplicates.clone(),
        );
        r.register(
            "dead_letter_failures",
            "Dead letters that could not be stored in JetStream",
            m.dead_letter_failures.clone(),
        );
        r.register(
            "uplink_dropped",
            "Uplink messages dropped before the bridge, by reason",
            m.uplink_dropped.clone(),
        );
        r.register(
            "uplink_queue_depth",
            "Uplink messages waiting for the bridge",
            m.uplink_queue_depth.clone(),
        );
        r.register(
            "jetstream_publish_seconds",
            "JetStream publish-to-ack latency",
            m.jetstream_publish_seconds.clone(),
        );
        r.register(
            "jetstream_retries",
            "JetStream publishes retried",
            m.jetstream_retries.clone(),
        );
        r.register(
            "downlink_messages",
            "Downlink messages handed to the broker, by kind",
            m.downlink_messages.clone(),
        );
        r.register(
            "downlink_rejects",
            "Downlink messages refused, by reason",
            m.downlink_rejects.clone(),
        );
        r.register(
            "retained_open_failures",
            "Attempts to open the retained downlink consumers that failed (retried with a backoff)",
            m.retained_open_failures.clone(),
        );
        r.register(
            "retained_opens",
            "Times the retained downlink consumers were opened (at start, then after NATS restarts)",
            m.retained_opens.clone(),
        );
        r.register(
            "presence_events",
            "Presence events stored in LW_PRESENCE, by state",
            m.presence_events.clone(),
        );
        r.register(
            "presence_failures",
            "Attempts to store a presence change that failed (the change is kept and published again)",
            m.presence_failures.clone(),
        );
        m
    }
}
