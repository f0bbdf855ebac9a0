//! The gateway is where devices enter the backbone. It owns the JetStream streams that hold what
//! devices send (`LW_UPLINK`) and what gets rejected (`LW_DLQ`): it declares them at start-up with
//! the settings of the naming contract, and reports NATS connectivity on `/readyz`.
//!
//! The MQTT side (embedded broker, device authentication, ACLs, the uplink/downlink bridge) is
//! built on this skeleton; see `ARCHITECTURE.md` for the topic ↔ subject contract it implements.

use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream;
use liftwire_proto::naming::{DEAD_LETTER_STREAM, UPLINK_STREAM};
use liftwire_runtime::admin::ReadinessCheck;
use liftwire_runtime::nats::{ensure_stream, NatsConfig};
use liftwire_runtime::service::{BoxError, BuildContext, Service};
use liftwire_runtime::RuntimeConfig;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

/// Configuration of the gateway.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Shared runtime settings.
    pub runtime: RuntimeConfig,
    /// NATS connection and stream settings.
    pub nats: NatsConfig,
    /// Name of this replica in presence events and logs (defaults to the host name).
    pub gateway_id: String,
    /// How often NATS connectivity is checked for `/readyz`.
    #[serde(with = "humantime_serde")]
    pub readiness_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            runtime: RuntimeConfig::default(),
            nats: NatsConfig::default(),
            gateway_id: std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "gateway".into()),
            readiness_interval: Duration::from_secs(1),
        }
    }
}

/// The running gateway.
pub struct Gateway {
    config: Config,
    nats: async_nats::Client,
    nats_ready: ReadinessCheck,
}

impl Service for Gateway {
    const NAME: &'static str = "gateway";
    type Config = Config;

    fn runtime(config: &Config) -> &RuntimeConfig {
        &config.runtime
    }

    async fn build(config: Config, ctx: &BuildContext) -> Result<Self, BoxError> {
        let nats_ready = ctx.readiness.register("nats");
        let nats = liftwire_runtime::nats::connect(
            &config.nats,
            &format!("liftwire-gateway-{}", config.gateway_id),
        )
        .await?;
        let js = jetstream::new(nats.clone());
        for spec in [&UPLINK_STREAM, &DEAD_LETTER_STREAM] {
            ensure_stream(&js, spec, &config.nats).await?;
            tracing::info!(stream = spec.name, subjects = ?spec.subjects, "stream declared");
        }
        Ok(Self {
            config,
            nats,
            nats_ready,
        })
    }

    async fn run(self, shutdown: CancellationToken) -> Result<(), BoxError> {
        tracing::info!(gateway_id = %self.config.gateway_id, "gateway running");
        let mut tick = tokio::time::interval(self.config.readiness_interval);
        loop {
            tokio::select! {
                _ = tick.tick() => self.nats_ready.set(self.nats.connection_state() == State::Connected),
                _ = shutdown.cancelled() => break,
            }
        }
        self.nats_ready.set(false);
        self.nats.flush().await?;
        Ok(())
    }
}
