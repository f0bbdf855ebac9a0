//! PostgreSQL connection settings shared by the services that own a database.

use std::time::Duration;

use serde::Deserialize;
use std::str::FromStr;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

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
    /// Longest a statement may run before PostgreSQL cancels it (`0s`: no limit), so a stuck
    /// query (a lock held elsewhere, a runaway plan) fails with an error instead of holding its
    /// connection, and whatever waits on it, for ever.
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "postgres://liftwire@127.0.0.1:5432/liftwire".into(),
            max_connections: 8,
            acquire_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(30),
        }
    }
}

impl DatabaseConfig {
    /// A lazily connecting pool: the service starts while PostgreSQL is still down.
    pub fn pool(&self) -> Result<sqlx::PgPool, sqlx::Error> {
        // PostgreSQL takes whole milliseconds up to i32::MAX (about 24 days); 0 means none.
        let millis = self.statement_timeout.as_millis();
        if !self.statement_timeout.is_zero() && !(1..=i32::MAX as u128).contains(&millis) {
            return Err(sqlx::Error::Configuration(
                format!(
                    "database.statement_timeout must be 0s or from 1ms to 24 days, not {:?}",
                    self.statement_timeout
                )
                .into(),
            ));
        }
        let options = PgConnectOptions::from_str(&self.url)?
            .options([("statement_timeout", millis.to_string())]);
        Ok(PgPoolOptions::new()
            .max_connections(self.max_connections)
            .acquire_timeout(self.acquire_timeout)
            .connect_lazy_with(options))
    }
}
