//! The device registry (PostgreSQL, owned by the gateway): provisioning, secrets, authentication
//! with a short-lived cache, and revocation.
//!
//! Secrets are 256-bit random tokens shown once at provisioning; only their SHA-256 is stored. A
//! fast hash is enough for high-entropy secrets and keeps a connect storm cheap (a slow password
//! hash would cap it at a few hundred connects per second per core).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use liftwire_proto::naming::{BuildingId, DeviceId};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::acl::{DeviceKind, Identity};

/// Prefix of device secrets, so a leaked one is recognisable (e.g. by secret scanners).
pub const SECRET_PREFIX: &str = "lwd_";

/// Why authentication failed: a stable label for metrics and logs (never sent to the device).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    /// The client id is not a valid device id (or a reserved one).
    #[error("invalid client id")]
    InvalidClientId,
    /// The username is not the client id.
    #[error("username differs from the client id")]
    UsernameMismatch,
    /// No such device.
    #[error("unknown device")]
    UnknownDevice,
    /// The device was revoked.
    #[error("revoked device")]
    Revoked,
    /// Wrong secret.
    #[error("wrong secret")]
    BadSecret,
    /// The registry could not be read.
    #[error("registry unavailable")]
    Unavailable,
}

impl AuthFailure {
    /// Metric label.
    pub fn reason(self) -> &'static str {
        match self {
            AuthFailure::InvalidClientId => "invalid_client_id",
            AuthFailure::UsernameMismatch => "username_mismatch",
            AuthFailure::UnknownDevice => "unknown_device",
            AuthFailure::Revoked => "revoked",
            AuthFailure::BadSecret => "bad_secret",
            AuthFailure::Unavailable => "registry_unavailable",
        }
    }
}

/// Errors of provisioning commands.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The device id is already registered.
    #[error("device {0} already exists")]
    Exists(String),
    /// No such device.
    #[error("device {0} does not exist")]
    NotFound(String),
    /// Database error.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

#[derive(Debug, Clone)]
struct Entry {
    identity: Identity,
    secret_sha256: [u8; 32],
    revoked: bool,
    credentials: DateTime<Utc>,
}

/// A device row as the lookup reads it: building, kind, secret digest, revoked, credentials
/// version.
type DeviceRow = (String, String, Vec<u8>, bool, DateTime<Utc>);

/// A successful login.
#[derive(Debug, Clone)]
pub struct Login {
    /// Who logged in.
    pub identity: Identity,
    /// Version of the credentials it logged in with (the device row's `updated_at`, set by the
    /// database on every provision, rotation and revocation): a session whose version is no
    /// longer the registry's is closed ([`Registry::stale_sessions`]).
    pub credentials: DateTime<Utc>,
}

#[derive(Debug, Clone)]
struct Cached {
    /// `None`: the device does not exist (cached briefly against storms of unknown ids).
    entry: Option<Entry>,
    fetched: Instant,
}

/// A registry change seen by [`Registry::changes_since`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The device.
    pub device_id: String,
    /// When it changed.
    pub updated_at: DateTime<Utc>,
}

/// The registry with its lookup cache.
pub struct Registry {
    pool: sqlx::PgPool,
    cache: Mutex<HashMap<String, Cached>>,
    ttl: Duration,
    negative_ttl: Duration,
}

/// Generates a new device secret.
pub fn new_secret() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{SECRET_PREFIX}{}", hex::encode(bytes))
}

fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Compares two digests in time independent of where they differ.
fn same_digest(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Registry {
    /// A registry over `pool`; lookups are cached for `ttl` (unknown devices for a fifth of it).
    pub fn new(pool: sqlx::PgPool, ttl: Duration) -> Self {
        Self {
            pool,
            cache: Mutex::new(HashMap::new()),
            ttl,
            negative_ttl: ttl / 5,
        }
    }

    /// Registers a device and returns its secret (shown once, stored hashed).
    pub async fn provision(
        &self,
        building: &BuildingId,
        device: &DeviceId,
        kind: DeviceKind,
    ) -> Result<String, RegistryError> {
        let secret = new_secret();
        let inserted = sqlx::query(
            "INSERT INTO devices (device_id, building_id, kind, secret_sha256) VALUES ($1, $2, $3, $4)
             ON CONFLICT (device_id) DO NOTHING",
        )
        .bind(device.as_str())
        .bind(building.as_str())
        .bind(kind.as_str())
        .bind(digest(&secret).as_slice())
        .execute(&self.pool)
        .await?
        .rows_affected();
        if inserted == 0 {
            return Err(RegistryError::Exists(device.to_string()));
        }
        self.forget(device.as_str());
        Ok(secret)
    }

    /// Replaces a device's secret and returns the new one; the old one stops working within the
    /// cache lifetime.
    pub async fn rotate(&self, device: &DeviceId) -> Result<String, RegistryError> {
        let secret = new_secret();
        let updated = sqlx::query("UPDATE devices SET secret_sha256 = $2, updated_at = now() WHERE device_id = $1 AND revoked_at IS NULL")
            .bind(device.as_str())
            .bind(digest(&secret).as_slice())
            .execute(&self.pool)
            .await?
            .rows_affected();
        if updated == 0 {
            return Err(RegistryError::NotFound(device.to_string()));
        }
        self.forget(device.as_str());
        Ok(secret)
    }

    /// Revokes a device: it can no longer connect, and running gateways disconnect it.
    pub async fn revoke(&self, device: &DeviceId) -> Result<(), RegistryError> {
        let updated = sqlx::query("UPDATE devices SET revoked_at = now(), updated_at = now() WHERE device_id = $1 AND revoked_at IS NULL")
            .bind(device.as_str())
            .execute(&self.pool)
            .await?
            .rows_affected();
        if updated == 0 {
            return Err(RegistryError::NotFound(device.to_string()));
        }
        self.forget(device.as_str());
        Ok(())
    }

    /// The registry's database (the gateway's own).
    pub fn pool(&self) -> &sqlx::PgPool {
        &self.pool
    }

    /// Devices changed (rotated or revoked) after `since`, oldest first.
    pub async fn changes_since(&self, since: DateTime<Utc>) -> Result<Vec<Change>, sqlx::Error> {
        let rows: Vec<(String, DateTime<Utc>)> = sqlx::query_as(
            "SELECT device_id, updated_at FROM devices WHERE updated_at > $1 ORDER BY updated_at",
        )
        .bind(since)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(device_id, updated_at)| Change {
                device_id,
                updated_at,
            })
            .collect())
    }

    /// Drops a device from the lookup cache.
    pub fn forget(&self, device_id: &str) {
        self.cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(device_id);
    }

    /// Checks an MQTT CONNECT: the client id must be a registered, unrevoked device id, the
    /// username must equal it, and the password must be its secret.
    pub async fn authenticate(
        &self,
        client_id: &str,
        username: &str,
        password: &str,
    ) -> Result<Login, AuthFailure> {
        DeviceId::new(client_id).map_err(|_| AuthFailure::InvalidClientId)?;
        if username != client_id {
            return Err(AuthFailure::UsernameMismatch);
        }
        let entry = self
            .lookup(client_id)
            .await?
            .ok_or(AuthFailure::UnknownDevice)?;
        if entry.revoked {
            return Err(AuthFailure::Revoked);
        }
        if !same_digest(&digest(password), &entry.secret_sha256) {
            return Err(AuthFailure::BadSecret);
        }
        Ok(Login {
            identity: entry.identity,
            credentials: entry.credentials,
        })
    }

    /// Of `sessions` (device id, credentials version at login), the devices whose session must
    /// end: revoked, gone from the registry, or with other credentials than they logged in with
    /// (rotated since). A state check rather than a change feed, so a change committed late, or
    /// a login that read the registry just before a change, is caught at the next check.
    pub async fn stale_sessions(
        &self,
        sessions: &[(String, DateTime<Utc>)],
    ) -> Result<Vec<(String, DateTime<Utc>)>, sqlx::Error> {
        let (devices, versions): (Vec<&str>, Vec<DateTime<Utc>>) = sessions
            .iter()
            .map(|(device, version)| (device.as_str(), *version))
            .unzip();
        sqlx::query_as(
            "SELECT s.device_id, s.credentials
               FROM UNNEST($1::text[], $2::timestamptz[]) AS s(device_id, credentials)
               LEFT JOIN devices d ON d.device_id = s.device_id
              WHERE d.device_id IS NULL OR d.revoked_at IS NOT NULL
                 OR d.updated_at <> s.credentials",
        )
        .bind(devices)
        .bind(versions)
        .fetch_all(&self.pool)
        .await
    }

    async fn lookup(&self, device_id: &str) -> Result<Option<Entry>, AuthFailure> {
        {
            let cache = self
                .cache
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(cached) = cache.get(device_id) {
                let ttl = if cached.entry.is_some() {
                    self.ttl
                } else {
                    self.negative_ttl
                };
                if cached.fetched.elapsed() < ttl {
                    return Ok(cached.entry.clone());
                }
            }
        }
        let row: Option<DeviceRow> = sqlx::query_as(
            "SELECT building_id, kind, secret_sha256, revoked_at IS NOT NULL, updated_at FROM devices WHERE device_id = $1",
        )
        .bind(device_id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "device registry lookup failed");
            AuthFailure::Unavailable
        })?;
        let entry = match row {
            None => None,
            Some((building, kind, secret, revoked, credentials)) => {
                let identity = Identity {
                    device: DeviceId::new(device_id).map_err(|_| AuthFailure::InvalidClientId)?,
                    building: BuildingId::new(building).map_err(|_| AuthFailure::Unavailable)?,
                    kind: DeviceKind::parse(&kind).ok_or(AuthFailure::Unavailable)?,
                };
                let secret_sha256 = <[u8; 32]>::try_from(secret.as_slice())
                    .map_err(|_| AuthFailure::Unavailable)?;
                Some(Entry {
                    identity,
                    secret_sha256,
                    revoked,
                    credentials,
                })
            }
        };
        let mut cache = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Bounded: a storm of random client ids must not grow the cache without limit.
        if cache.len() > 100_000 {
            cache.retain(|_, c| c.entry.is_some() && c.fetched.elapsed() < self.ttl);
        }
        cache.insert(
            device_id.to_owned(),
            Cached {
                entry: entry.clone(),
                fetched: Instant::now(),
            },
        );
        Ok(entry)
    }
}

/// Applies the registry migrations.
pub async fn migrate(pool: &sqlx::PgPool) -> Result<(), sqlx::migrate::MigrateError> {
    sqlx::migrate!("./migrations").run(pool).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_long_random_and_prefixed() {
        let a = new_secret();
        let b = new_secret();
        assert_ne!(a, b);
        assert!(a.starts_with(SECRET_PREFIX));
        assert_eq!(a.len(), SECRET_PREFIX.len() + 64);
        assert!(same_digest(&digest(&a), &digest(&a)));
        assert!(!same_digest(&digest(&a), &digest(&b)));
    }
}
