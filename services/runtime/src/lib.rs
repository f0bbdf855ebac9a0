//! Mechanisms shared by every liftwire binary, written once:
//!
//! * [`config`]: layered configuration (defaults ← TOML file ← environment) with clear errors,
//!   read through the [`config::Environment`] trait so tests never touch the process environment;
//! * [`observability`]: `tracing` logs plus OpenTelemetry spans, and W3C trace-context
//!   propagation through NATS headers;
//! * [`admin`]: the operator endpoints `/metrics` (Prometheus), `/healthz` and `/readyz`;
//! * [`shutdown`]: SIGTERM/SIGINT → cancel → drain within a bounded grace period;
//! * [`database`]: PostgreSQL pool settings;
//! * [`nats`]: connecting to NATS and declaring the contract's JetStream streams;
//! * [`service`]: the config → build → run shape every binary's `main` delegates to.

pub mod admin;
pub mod config;
pub mod database;
pub mod endpoints;
pub mod nats;
pub mod observability;
pub mod service;
pub mod shutdown;

use std::net::SocketAddr;
use std::time::Duration;

use serde::Deserialize;

/// Settings every binary has, embedded in its own configuration as `[runtime]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Address of the operator endpoints (`/metrics`, `/healthz`, `/readyz`).
    pub admin_listen: SocketAddr,
    /// How long to drain in-flight work after SIGTERM before giving up.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Logging and tracing.
    pub observability: observability::ObservabilityConfig,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            shutdown_grace: Duration::from_secs(20),
            observability: observability::ObservabilityConfig::default(),
        }
    }
}
