//! Running a fleet against a gateway: provisioning through the gateway's device registry, one
//! task per device, a progress line every few seconds.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use liftwire_gateway::acl::DeviceKind;
use liftwire_gateway::registry::{Registry, RegistryError};
use liftwire_proto::naming::{BuildingId, DeviceId};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::device::{self, ChaosCommand, Firmware, RunSettings, Stats};
use crate::outbox::Outbox;
use crate::screen::Screen;
use crate::{Fleet, FleetConfig};

/// Errors of a fleet run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// An invalid generated id.
    #[error("invalid fleet id: {0}")]
    Id(#[from] liftwire_proto::naming::IdError),
    /// The registry refused or failed.
    #[error("provisioning {device}: {source}")]
    Provision {
        /// The device.
        device: String,
        /// Why.
        #[source]
        source: RegistryError,
    },
    /// No secret on disk and no registry to provision from.
    #[error(
        "no secret for {0} in the data directory; give a registry database URL to provision it"
    )]
    NoSecret(String),
    /// Reading or writing the data directory failed.
    #[error("data directory: {0}")]
    Io(#[from] std::io::Error),
    /// The registry database is unreachable.
    #[error("registry database: {0}")]
    Database(#[from] sqlx::Error),
}

/// Returns the secret of `device`: from the data directory, else provisioned (or rotated, if the
/// registry knows the device but the secret was lost) through `registry`, then saved.
pub async fn secret_for(
    data_dir: &Path,
    registry: Option<&Registry>,
    building: &BuildingId,
    device: &DeviceId,
    kind: DeviceKind,
) -> Result<String, RunError> {
    let path = data_dir.join("secrets").join(device.as_str());
    if let Ok(secret) = std::fs::read_to_string(&path) {
        return Ok(secret.trim().to_owned());
    }
    let registry = registry.ok_or_else(|| RunError::NoSecret(device.to_string()))?;
    let secret = match registry.provision(building, device, kind).await {
        Err(RegistryError::Exists(_)) => registry.rotate(device).await,
        other => other,
    }
    .map_err(|source| RunError::Provision {
        device: device.to_string(),
        source,
    })?;
    std::fs::create_dir_all(data_dir.join("secrets"))?;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, &secret)?;
    std::fs::rename(&tmp, &path)?;
    Ok(secret)
}

/// Runs the fleet until `shutdown`; returns every device's outbox (what is still unconfirmed).
pub async fn run_fleet(
    fleet: &FleetConfig,
    settings: RunSettings,
    registry_url: Option<&str>,
    shutdown: CancellationToken,
) -> Result<Vec<Outbox>, RunError> {
    let (_chaos, chaos_rx) = tokio::sync::broadcast::channel(16);
    run_fleet_with_chaos(fleet, settings, registry_url, chaos_rx, shutdown).await
}

/// Like [`run_fleet`], with network chaos commands arriving on `chaos`.
pub async fn run_fleet_with_chaos(
    fleet: &FleetConfig,
    settings: RunSettings,
    registry_url: Option<&str>,
    chaos: tokio::sync::broadcast::Receiver<ChaosCommand>,
    shutdown: CancellationToken,
) -> Result<Vec<Outbox>, RunError> {
    let elevators = Fleet::new(fleet)?.into_elevators();
    let registry = match registry_url {
        Some(url) => Some(Registry::new(
            sqlx::postgres::PgPoolOptions::new().connect_lazy(url)?,
            Duration::from_secs(5),
        )),
        None => None,
    };
    let settings = Arc::new(settings);
    let stats = Arc::new(Stats::default());
    let mut devices = JoinSet::new();
    let mut firmware = Vec::new();
    for (building, elevator) in elevators {
        if fleet.screens {
            let screen = DeviceId::new(format!("{}-s", elevator.device()))?;
            firmware.push((
                building.clone(),
                DeviceKind::Screen,
                Firmware::Screen(Screen::new(screen)),
            ));
        }
        firmware.push((
            building,
            DeviceKind::Elevator,
            Firmware::Elevator(Box::new(elevator)),
        ));
    }
    for (i, (building, kind, firmware)) in firmware.into_iter().enumerate() {
        let device = match &firmware {
            Firmware::Elevator(e) => e.device().clone(),
            Firmware::Screen(s) => s.device().clone(),
        };
        let secret = secret_for(
            &settings.data_dir,
            registry.as_ref(),
            &building,
            &device,
            kind,
        )
        .await?;
        let seed = fleet.seed.wrapping_add(i as u64);
        let wiring = device::Wiring {
            settings: settings.clone(),
            stats: stats.clone(),
            chaos: chaos.resubscribe(),
            shutdown: shutdown.clone(),
        };
        devices.spawn(device::run(building, firmware, secret, seed, wiring));
    }
    tracing::info!(devices = devices.len(), gateway = %format!("{}:{}", settings.host, settings.port), speed = settings.speed, "fleet running");
    let mut progress = tokio::time::interval(Duration::from_secs(10));
    progress.tick().await;
    loop {
        tokio::select! {
            _ = progress.tick() => tracing::info!(
                connected = stats.connected.load(Ordering::Relaxed),
                produced = stats.produced.load(Ordering::Relaxed),
                sent = stats.sent.load(Ordering::Relaxed),
                confirmed = stats.confirmed.load(Ordering::Relaxed),
                disconnects = stats.disconnects.load(Ordering::Relaxed),
                "fleet progress"
            ),
            _ = shutdown.cancelled() => break,
        }
    }
    let mut outboxes = Vec::new();
    while let Some(done) = devices.join_next().await {
        match done {
            Ok(Ok(outbox)) => outboxes.push(outbox),
            Ok(Err(e)) => return Err(e.into()),
            Err(e) => return Err(std::io::Error::other(e.to_string()).into()),
        }
    }
    Ok(outboxes)
}
