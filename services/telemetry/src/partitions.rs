//! Day partitions of `device_messages` and their retention.
//!
//! A partition `device_messages_YYYYMMDD` covers one UTC day of `at`. The ingest creates the
//! partition a batch needs on demand; the maintenance pass, run by every replica under an
//! advisory lock, creates the next days ahead of time and drops whole partitions once they are
//! entirely older than the retention (never row deletes).

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

/// Advisory lock key that serializes partition DDL across replicas.
const DDL_LOCK: i64 = 0x6c77_7061_7274; // "lwpart"

/// Longest partition DDL waits for its lock on `device_messages`. Creating or dropping a
/// partition needs an exclusive lock on the parent: waiting behind a long query, it would hold
/// up every insert queued behind it (the ingest of every replica). Given up, it is retried (the
/// ingest's batch with backoff, maintenance at its next pass).
const DDL_LOCK_TIMEOUT: &str = "SET LOCAL lock_timeout = '2s'";

/// Takes the partition DDL lock in `tx` and bounds the wait of what follows.
async fn lock_ddl(tx: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(DDL_LOCK)
        .execute(&mut *tx)
        .await?;
    sqlx::query(DDL_LOCK_TIMEOUT).execute(&mut *tx).await?;
    Ok(())
}

/// `[partitions]` settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PartitionConfig {
    /// Days of messages kept; older day partitions are dropped.
    pub retention_days: u32,
    /// Days ahead for which partitions are created in advance.
    pub premake_days: u32,
    /// How often the maintenance pass runs.
    #[serde(with = "humantime_serde")]
    pub maintain_every: Duration,
}

impl Default for PartitionConfig {
    fn default() -> Self {
        Self {
            retention_days: 400,
            premake_days: 3,
            maintain_every: Duration::from_secs(3600),
        }
    }
}

/// What a maintenance pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Maintenance {
    /// Days whose partition was created.
    pub created: Vec<NaiveDate>,
    /// Days whose partition was dropped.
    pub dropped: Vec<NaiveDate>,
}

/// The partitions this replica knows exist.
#[derive(Debug)]
pub struct Partitions {
    config: PartitionConfig,
    known: Mutex<BTreeSet<NaiveDate>>,
}

/// Name of the partition of `day`.
pub fn partition_name(day: NaiveDate) -> String {
    format!("device_messages_{}", day.format("%Y%m%d"))
}

fn parse_partition_name(name: &str) -> Option<NaiveDate> {
    let digits = name.strip_prefix("device_messages_")?;
    NaiveDate::parse_from_str(digits, "%Y%m%d").ok()
}

impl Partitions {
    /// Partitions managed with `config`.
    pub fn new(config: PartitionConfig) -> Self {
        Self {
            config,
            known: Mutex::new(BTreeSet::new()),
        }
    }

    /// The oldest day kept at `now`: messages filed before it are beyond the retention.
    pub fn oldest_day(&self, now: DateTime<Utc>) -> NaiveDate {
        now.date_naive() - chrono::Days::new(u64::from(self.config.retention_days))
    }

    fn missing(&self, days: &BTreeSet<NaiveDate>) -> Vec<NaiveDate> {
        let known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        days.iter()
            .filter(|d| !known.contains(d))
            .copied()
            .collect()
    }

    /// Forgets which partitions exist: the next [`Partitions::ensure`] looks again (after a row
    /// found its day's partition gone).
    pub fn forget(&self) {
        self.known.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    fn remember(&self, days: impl IntoIterator<Item = NaiveDate>) {
        self.known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend(days);
    }

    /// Makes sure the partitions of `days` exist.
    pub async fn ensure(
        &self,
        pool: &sqlx::PgPool,
        days: &BTreeSet<NaiveDate>,
    ) -> Result<Vec<NaiveDate>, sqlx::Error> {
        let missing = self.missing(days);
        if missing.is_empty() {
            return Ok(Vec::new());
        }
        let mut tx = pool.begin().await?;
        lock_ddl(&mut tx).await?;
        let existing = existing(&mut tx).await?;
        let mut created = Vec::new();
        for day in &missing {
            if existing.contains(day) {
                continue;
            }
            let start = day.and_hms_opt(0, 0, 0).map(|t| t.and_utc());
            let end = day
                .succ_opt()
                .and_then(|d| d.and_hms_opt(0, 0, 0))
                .map(|t| t.and_utc());
            let (Some(start), Some(end)) = (start, end) else {
                continue;
            };
            sqlx::query(&format!(
                "CREATE TABLE IF NOT EXISTS {} PARTITION OF device_messages FOR VALUES FROM ('{}') TO ('{}')",
                partition_name(*day),
                start.to_rfc3339(),
                end.to_rfc3339()
            ))
            .execute(&mut *tx)
            .await?;
            created.push(*day);
        }
        tx.commit().await?;
        self.remember(existing.into_iter().chain(missing));
        if !created.is_empty() {
            tracing::info!(days = ?created, "created message partitions");
        }
        Ok(created)
    }

    /// Creates the partitions of today and the next `premake_days`, and drops those entirely
    /// older than the retention.
    pub async fn maintain(
        &self,
        pool: &sqlx::PgPool,
        now: DateTime<Utc>,
    ) -> Result<Maintenance, sqlx::Error> {
        let today = now.date_naive();
        let ahead: BTreeSet<NaiveDate> = (0..=u64::from(self.config.premake_days))
            .filter_map(|n| today.checked_add_days(chrono::Days::new(n)))
            .collect();
        let created = self.ensure(pool, &ahead).await?;
        let oldest = self.oldest_day(now);
        let mut tx = pool.begin().await?;
        lock_ddl(&mut tx).await?;
        let expired: Vec<NaiveDate> = existing(&mut tx)
            .await?
            .into_iter()
            .filter(|day| *day < oldest)
            .collect();
        for day in &expired {
            sqlx::query(&format!("DROP TABLE IF EXISTS {}", partition_name(*day)))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        {
            let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
            for day in &expired {
                known.remove(day);
            }
        }
        if !expired.is_empty() {
            tracing::info!(days = ?expired, "dropped message partitions past the retention");
        }
        Ok(Maintenance {
            created,
            dropped: expired,
        })
    }

    /// Runs [`Partitions::maintain`] every `maintain_every` until `shutdown`.
    pub async fn run(&self, pool: sqlx::PgPool, shutdown: CancellationToken) {
        let mut every = tokio::time::interval(self.config.maintain_every);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => {}
                _ = shutdown.cancelled() => return,
            }
            if let Err(e) = self.maintain(&pool, Utc::now()).await {
                tracing::warn!(error = %e, "partition maintenance failed; retrying later");
            }
        }
    }
}

/// Days that have a partition.
async fn existing(tx: &mut sqlx::PgConnection) -> Result<BTreeSet<NaiveDate>, sqlx::Error> {
    let names: Vec<(String,)> = sqlx::query_as(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'device_messages'::regclass",
    )
    .fetch_all(&mut *tx)
    .await?;
    Ok(names
        .into_iter()
        .filter_map(|(n,)| parse_partition_name(&n))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_the_oldest_day_follows_the_retention() {
        let day = NaiveDate::from_ymd_opt(2026, 11, 22).unwrap();
        assert_eq!(partition_name(day), "device_messages_20261122");
        assert_eq!(parse_partition_name(&partition_name(day)), Some(day));
        assert_eq!(parse_partition_name("device_messages_v0"), None);
        let partitions = Partitions::new(PartitionConfig {
            retention_days: 30,
            ..Default::default()
        });
        let now = day.and_hms_opt(13, 0, 0).unwrap().and_utc();
        assert_eq!(
            partitions.oldest_day(now),
            NaiveDate::from_ymd_opt(2026, 10, 23).unwrap()
        );
    }
}
