//! PostgreSQL connection settings shared by the services that own a database.

use std::time::Duration;

use serde::Deserialize;
use sqlx::postgres::PgPoolOptions;

/// `[database]` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// PostgreSQL URL, e.g. `postgres://liftwire@127.0.0.1:5432/liftwire`.
    pub url: String,
    /// Connections in the pool.
    pub max_connections: u32,
    /// How long to wait for a pooled connection.
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "postgres://liftwire@127.0.0.1:5432/liftwire".into(),
            max_connections: 8,
            acquire_timeout: Duration::from_secs(5),
        }
    }
}

impl DatabaseConfig {
    /// A lazily connecting pool: the service starts while PostgreSQL is still down.
    pub fn pool(&self) -> Result<sqlx::PgPool, sqlx::Error> {
        PgPoolOptions::new()
            .max_connections(self.max_connections)
            .acquire_timeout(self.acquire_timeout)
            .connect_lazy(&self.url)
    }
}
