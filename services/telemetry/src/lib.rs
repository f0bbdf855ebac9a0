//! The telemetry service turns the device stream into trustworthy elevator data. It owns its
//! PostgreSQL schema; no other service writes it.
//!
//! Ingest reads the `LW_UPLINK` JetStream stream with a durable pull consumer shared by every
//! replica, writes each batch in one transaction (idempotent on `(device_id, seq)`), and only then
//! acknowledges the messages to JetStream. After each commit it publishes every affected device's
//! persisted-sequence watermark downlink, so devices can trim their outbox. The same
//! transaction folds each device's newly contiguous messages into its live state and derives
//! incidents and alerts (see [`state`]). KPIs ([`kpi`]) are computed on request from incidents
//! and the message log. Everything the dashboard needs is served on NATS ([`query`]).

pub mod alerts;
pub mod ingest;
pub mod kpi;
pub mod partitions;
pub mod presence;
pub mod query;
pub mod state;
pub mod store;

use std::sync::Arc;

use std::process::ExitCode;

use liftwire_runtime::database::DatabaseConfig;
use liftwire_runtime::nats::NatsConfig;
use liftwire_runtime::service::{BoxError, BuildContext, Service};
use liftwire_runtime::RuntimeConfig;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

/// Embedded schema migrations (`services/telemetry/migrations`).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Configuration of the telemetry service.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Shared runtime settings.
    pub runtime: RuntimeConfig,
    /// NATS connection.
    pub nats: NatsConfig,
    /// PostgreSQL connection.
    pub database: DatabaseConfig,
    /// Ingest tuning.
    pub ingest: ingest::IngestConfig,
    /// Message partitions and retention.
    pub partitions: partitions::PartitionConfig,
    /// Alert rule thresholds.
    pub alerts: alerts::AlertConfig,
    /// Presence: when a silent gateway's devices are recorded offline.
    pub presence: presence::PresenceConfig,
}

/// The running service.
pub struct Telemetry {
    ingest: ingest::Ingest,
    nats: async_nats::Client,
    pool: sqlx::PgPool,
    partitions: Arc<partitions::Partitions>,
    alerts: alerts::AlertConfig,
    presence: presence::Presence,
    gateways: presence::GatewayWatch,
}

impl Service for Telemetry {
    const NAME: &'static str = "telemetry";
    type Config = Config;

    fn runtime(config: &Config) -> &RuntimeConfig {
        &config.runtime
    }

    async fn build(config: Config, ctx: &BuildContext) -> Result<Self, BoxError> {
        let pool = config.database.pool()?;
        let nats = liftwire_runtime::nats::connect(&config.nats, "liftwire-telemetry").await?;
        let partitions = Arc::new(partitions::Partitions::new(config.partitions));
        let rules = state::FoldRules {
            fault_burst_count: config.alerts.fault_burst_count,
            fault_burst_window: config.alerts.fault_burst_window,
            ..Default::default()
        };
        let ingest = ingest::Ingest::build(
            config.ingest,
            &config.nats,
            nats.clone(),
            pool.clone(),
            partitions.clone(),
            rules,
            ctx,
        )
        .await?;
        let presence =
            presence::Presence::build(nats.clone(), &config.nats, pool.clone(), ctx).await?;
        let gateways =
            presence::GatewayWatch::build(nats.clone(), pool.clone(), &config.presence, ctx)?;
        Ok(Self {
            ingest,
            nats,
            pool,
            partitions,
            alerts: config.alerts,
            presence,
            gateways,
        })
    }

    async fn run(self, shutdown: CancellationToken) -> Result<(), BoxError> {
        let queries = query::Queries {
            pool: self.pool.clone(),
            self_test_every: self.alerts.self_test_every,
            nats: self.nats.clone(),
        };
        let background = async {
            tokio::join!(
                self.partitions.run(self.pool.clone(), shutdown.clone()),
                alerts::run_evaluator(
                    self.pool.clone(),
                    self.nats.clone(),
                    self.alerts.clone(),
                    shutdown.clone()
                ),
            );
            Ok::<(), BoxError>(())
        };
        tokio::try_join!(
            self.ingest.run(shutdown.clone()),
            query::serve(queries, shutdown.clone()),
            self.presence.run(shutdown.clone()),
            self.gateways.run(shutdown.clone()),
            background,
        )?;
        Ok(())
    }
}

/// Applies the migrations to `pool`'s database.
pub async fn migrate(pool: &sqlx::PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    MIGRATOR.run(pool).await
}

/// The `migrate` subcommand: applies the migrations and exits.
pub async fn migrate_command(config: Config) -> ExitCode {
    let pool = match sqlx::PgPool::connect(&config.database.url).await {
        Ok(pool) => pool,
        Err(e) => {
            eprintln!("telemetry migrate: cannot connect to the database: {e}");
            return ExitCode::FAILURE;
        }
    };
    match migrate(&pool).await {
        Ok(()) => {
            eprintln!("telemetry migrate: schema is up to date");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("telemetry migrate: {e}");
            ExitCode::FAILURE
        }
    }
}
