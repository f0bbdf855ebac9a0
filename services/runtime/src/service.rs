//! The shape every liftwire binary shares: a serde config → [`Service::build`] →
//! [`Service::run`] until shutdown, with the operator endpoints served alongside.

use std::future::Future;
use std::path::Path;
use std::process::ExitCode;
use std::sync::{Arc, PoisonError, RwLock, RwLockWriteGuard};

use prometheus_client::registry::Registry;
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState, Readiness};
use crate::config::{self, Environment};
use crate::{observability, shutdown, RuntimeConfig};

/// Boxed error returned by services.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a service gets while it is being built: where to register metrics and readiness checks.
#[derive(Clone)]
pub struct BuildContext {
    registry: Arc<RwLock<Registry>>,
    resident_memory: prometheus_client::metrics::gauge::Gauge,
    /// Readiness checks reported by `/readyz`.
    pub readiness: Readiness,
}

impl BuildContext {
    /// A context with an empty `liftwire_`-prefixed registry.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("liftwire");
        let resident_memory = prometheus_client::metrics::gauge::Gauge::default();
        registry.register(
            "process_resident_memory_bytes",
            "Resident memory of the process",
            resident_memory.clone(),
        );
        Self {
            registry: Arc::new(RwLock::new(registry)),
            resident_memory,
            readiness: Readiness::default(),
        }
    }

    /// The metrics registry, to register a component's metrics.
    pub fn registry(&self) -> RwLockWriteGuard<'_, Registry> {
        self.registry
            .write()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// What the admin endpoints serve.
    pub fn admin_state(&self) -> AdminState {
        AdminState {
            registry: self.registry.clone(),
            readiness: self.readiness.clone(),
            resident_memory: self.resident_memory.clone(),
        }
    }
}

impl Default for BuildContext {
    fn default() -> Self {
        Self::new()
    }
}

/// A long-running liftwire binary.
pub trait Service: Sized {
    /// Binary name: used for the config environment prefix, logs and `service.name`.
    const NAME: &'static str;
    /// The binary's configuration (serde, unknown fields denied).
    type Config: DeserializeOwned;

    /// The shared runtime section of the configuration.
    fn runtime(config: &Self::Config) -> &RuntimeConfig;

    /// Connects to dependencies and registers metrics; nothing runs yet.
    fn build(
        config: Self::Config,
        ctx: &BuildContext,
    ) -> impl Future<Output = Result<Self, BoxError>>;

    /// Runs until `shutdown` is cancelled, then drains and returns.
    fn run(self, shutdown: CancellationToken) -> impl Future<Output = Result<(), BoxError>>;
}

/// Loads `S`'s configuration from `config_file` and the process environment, or prints why not.
pub fn load_config<S: Service>(config_file: Option<&Path>) -> Result<S::Config, ExitCode> {
    load_config_from::<S>(config_file, &config::ProcessEnv)
}

fn load_config_from<S: Service>(
    config_file: Option<&Path>,
    env: &dyn Environment,
) -> Result<S::Config, ExitCode> {
    config::load(S::NAME, config_file, env).map_err(|e| {
        eprintln!("{}: {e}", S::NAME);
        ExitCode::from(2)
    })
}

/// Builds a multi-threaded Tokio runtime and runs `f` on it; exit code 1 if it fails.
pub fn block_on<F: Future<Output = ExitCode>>(f: F) -> ExitCode {
    match tokio::runtime::Runtime::new() {
        Ok(rt) => rt.block_on(f),
        Err(e) => {
            eprintln!("cannot start the Tokio runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs service `S` as the process: tracing, admin endpoints, build, run until SIGTERM/SIGINT,
/// drain within the grace period. Returns the process exit code.
pub async fn serve<S: Service>(config: S::Config) -> ExitCode {
    let runtime = S::runtime(&config).clone();
    let rust_log = std::env::var("RUST_LOG").ok();
    let _tracing = match observability::init(S::NAME, &runtime.observability, rust_log.as_deref()) {
        Ok(guard) => guard,
        Err(e) => {
            eprintln!("{}: {e}", S::NAME);
            return ExitCode::from(2);
        }
    };
    match serve_inner::<S>(config, &runtime).await {
        Ok(()) => {
            tracing::info!("stopped");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %e, "exiting");
            ExitCode::FAILURE
        }
    }
}

async fn serve_inner<S: Service>(
    config: S::Config,
    runtime: &RuntimeConfig,
) -> Result<(), BoxError> {
    let ctx = BuildContext::new();
    let listener = TcpListener::bind(runtime.admin_listen).await.map_err(|e| {
        format!(
            "cannot bind the admin address {}: {e}",
            runtime.admin_listen
        )
    })?;
    tracing::info!(
        admin = %listener.local_addr()?,
        "operator endpoints: /metrics /healthz /readyz"
    );
    let admin_stop = CancellationToken::new();
    let admin = tokio::spawn(admin::serve(
        listener,
        ctx.admin_state(),
        admin_stop.clone(),
    ));

    let result = async {
        let service = tokio::select! {
            built = S::build(config, &ctx) => built?,
            signal = shutdown::signal() => {
                tracing::info!(signal, "stopped while starting");
                return Ok(());
            }
        };
        shutdown::supervise(runtime.shutdown_grace, shutdown::signal, |token| {
            service.run(token)
        })
        .await
        .map_err(|e| -> BoxError { e.to_string().into() })
    }
    .await;

    admin_stop.cancel();
    match admin.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "admin endpoint failed"),
        Err(e) => tracing::warn!(error = %e, "admin endpoint task panicked"),
    }
    result
}
