//! Alerts: stored with their lifecycle (open → acknowledged → resolved), at most one unresolved
//! per elevator and rule, and announced on `lw.v1.alerts.<building>` after each transition is
//! committed.
//!
//! Rules that follow from a message (entrapment, fault burst, failed or passed self-test, back in
//! service) are evaluated by the fold, in the ingest transaction. Rules that follow from time
//! passing (out of service too long, no self-test for 3 days, offline too long) are evaluated
//! periodically by every replica; the unique index on unresolved alerts makes that idempotent.

use std::time::Duration;

use chrono::{DateTime, Utc};
use liftwire_proto::naming::{alert_subject, BuildingId};
use liftwire_proto::{v1, Message};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::state::{timestamp, AlertRule};

/// `[alerts]` settings: thresholds of the time-based rules.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AlertConfig {
    /// An elevator out of service longer than this raises an alert.
    #[serde(with = "humantime_serde")]
    pub out_of_service_after: Duration,
    /// A device offline longer than this raises an alert.
    #[serde(with = "humantime_serde")]
    pub offline_after: Duration,
    /// Longest time without a passed alarm self-test (EN 81-28: 3 days).
    #[serde(with = "humantime_serde")]
    pub self_test_every: Duration,
    /// How often the time-based rules are evaluated.
    #[serde(with = "humantime_serde")]
    pub evaluate_every: Duration,
    /// Faults within `fault_burst_window` that raise a fault-burst alert.
    pub fault_burst_count: usize,
    /// Window of a fault burst.
    #[serde(with = "humantime_serde")]
    pub fault_burst_window: Duration,
}

impl Default for AlertConfig {
    fn default() -> Self {
        Self {
            out_of_service_after: Duration::from_secs(30 * 60),
            offline_after: Duration::from_secs(10 * 60),
            self_test_every: Duration::from_secs(3 * 24 * 3600),
            evaluate_every: Duration::from_secs(30),
            fault_burst_count: 3,
            fault_burst_window: Duration::from_secs(10 * 60),
        }
    }
}

/// What to do when the rule's alert is already unresolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repeat {
    /// Count one more occurrence (a new fault burst, a new failed self-test).
    Count,
    /// Nothing: the same condition seen again by a periodic evaluation.
    Ignore,
}

/// A committed alert change, to announce.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertChange {
    /// The alert after the change.
    pub alert: v1::Alert,
    /// The transition, if the state changed.
    pub transition: Option<v1::AlertTransition>,
}

/// Parses a state column.
pub fn state_from_str(s: &str) -> v1::AlertState {
    match s {
        "open" => v1::AlertState::Open,
        "acknowledged" => v1::AlertState::Acknowledged,
        "resolved" => v1::AlertState::Resolved,
        _ => v1::AlertState::Unspecified,
    }
}

/// A state's column value (`None` for unspecified).
pub fn state_str(s: v1::AlertState) -> Option<&'static str> {
    match s {
        v1::AlertState::Open => Some("open"),
        v1::AlertState::Acknowledged => Some("acknowledged"),
        v1::AlertState::Resolved => Some("resolved"),
        v1::AlertState::Unspecified => None,
    }
}

/// Columns of `alerts` in the order [`AlertRow`] reads them.
pub const ALERT_COLUMNS: &str =
    "id, building_id, device_id, rule, state, severity, summary, opened_at, updated_at, occurrences";

/// One `alerts` row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct AlertRow {
    id: i64,
    building_id: String,
    device_id: String,
    rule: String,
    state: String,
    severity: String,
    summary: String,
    opened_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    occurrences: i32,
}

impl AlertRow {
    /// Wire form.
    pub fn to_proto(&self) -> v1::Alert {
        v1::Alert {
            id: self.id,
            building_id: self.building_id.clone(),
            device_id: self.device_id.clone(),
            rule: AlertRule::parse(&self.rule).map_or(v1::AlertRule::Unspecified, |r| r.to_proto())
                as i32,
            state: state_from_str(&self.state) as i32,
            severity: match self.severity.as_str() {
                "critical" => v1::AlertSeverity::Critical,
                "warning" => v1::AlertSeverity::Warning,
                _ => v1::AlertSeverity::Unspecified,
            } as i32,
            summary: self.summary.clone(),
            opened_at: Some(timestamp(self.opened_at)),
            updated_at: Some(timestamp(self.updated_at)),
            occurrences: u32::try_from(self.occurrences).unwrap_or(0),
        }
    }
}

fn severity_str(rule: AlertRule) -> &'static str {
    match rule.severity() {
        v1::AlertSeverity::Critical => "critical",
        _ => "warning",
    }
}

async fn record_transition(
    tx: &mut sqlx::PgConnection,
    alert: &AlertRow,
    from: Option<&str>,
    by: &str,
    note: &str,
    at: DateTime<Utc>,
) -> Result<v1::AlertTransition, sqlx::Error> {
    sqlx::query(
        "INSERT INTO alert_transitions (alert_id, from_state, to_state, at, by_whom, note)
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(alert.id)
    .bind(from)
    .bind(&alert.state)
    .bind(at)
    .bind(by)
    .bind(note)
    .execute(&mut *tx)
    .await?;
    Ok(v1::AlertTransition {
        alert_id: alert.id,
        from: from.map_or(v1::AlertState::Unspecified, state_from_str) as i32,
        to: state_from_str(&alert.state) as i32,
        at: Some(timestamp(at)),
        by: by.into(),
        note: note.into(),
    })
}

/// Opens the rule's alert for a device, or handles a repeat as `repeat` says.
pub async fn raise(
    tx: &mut sqlx::PgConnection,
    building: &str,
    device: &str,
    rule: AlertRule,
    summary: &str,
    at: DateTime<Utc>,
    repeat: Repeat,
) -> Result<Option<AlertChange>, sqlx::Error> {
    let inserted: Option<AlertRow> = sqlx::query_as(&format!(
        "INSERT INTO alerts (building_id, device_id, rule, state, severity, summary, opened_at, updated_at)
         VALUES ($1, $2, $3, 'open', $4, $5, $6, $6)
         ON CONFLICT (device_id, rule) WHERE state <> 'resolved' DO NOTHING
         RETURNING {ALERT_COLUMNS}"
    ))
    .bind(building)
    .bind(device)
    .bind(rule.as_str())
    .bind(severity_str(rule))
    .bind(summary)
    .bind(at)
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(alert) = inserted {
        let transition = record_transition(tx, &alert, None, "system", summary, at).await?;
        return Ok(Some(AlertChange {
            alert: alert.to_proto(),
            transition: Some(transition),
        }));
    }
    if repeat == Repeat::Ignore {
        return Ok(None);
    }
    let updated: Option<AlertRow> = sqlx::query_as(&format!(
        "UPDATE alerts SET occurrences = occurrences + 1, summary = $3,
             updated_at = greatest(updated_at, $4)
         WHERE device_id = $1 AND rule = $2 AND state <> 'resolved'
         RETURNING {ALERT_COLUMNS}"
    ))
    .bind(device)
    .bind(rule.as_str())
    .bind(summary)
    .bind(at)
    .fetch_optional(&mut *tx)
    .await?;
    Ok(updated.map(|alert| AlertChange {
        alert: alert.to_proto(),
        transition: None,
    }))
}

/// Resolves the device's unresolved alert of `rule`, if any (by the system).
pub async fn resolve(
    tx: &mut sqlx::PgConnection,
    device: &str,
    rule: AlertRule,
    note: &str,
    at: DateTime<Utc>,
) -> Result<Option<AlertChange>, sqlx::Error> {
    let before: Option<(i64, String)> = sqlx::query_as(
        "SELECT id, state FROM alerts WHERE device_id = $1 AND rule = $2 AND state <> 'resolved' FOR UPDATE",
    )
    .bind(device)
    .bind(rule.as_str())
    .fetch_optional(&mut *tx)
    .await?;
    let Some((id, from)) = before else {
        return Ok(None);
    };
    let alert: AlertRow = sqlx::query_as(&format!(
        "UPDATE alerts SET state = 'resolved', updated_at = greatest(updated_at, $2) WHERE id = $1
         RETURNING {ALERT_COLUMNS}"
    ))
    .bind(id)
    .bind(at)
    .fetch_one(&mut *tx)
    .await?;
    let transition = record_transition(tx, &alert, Some(&from), "system", note, at).await?;
    Ok(Some(AlertChange {
        alert: alert.to_proto(),
        transition: Some(transition),
    }))
}

/// Why a requested transition was refused.
#[derive(Debug, thiserror::Error)]
pub enum TransitionError {
    /// No such alert in this building.
    #[error("no alert {0} in this building")]
    NotFound(i64),
    /// The target state is not acknowledged or resolved.
    #[error("an alert can only be acknowledged or resolved")]
    BadTarget,
    /// A resolved alert cannot be reopened or acknowledged.
    #[error("alert {0} is already resolved")]
    AlreadyResolved(i64),
    /// The database failed.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// A person acknowledges or resolves an alert of `building`. Repeating the current state is a
/// no-op that returns the alert unchanged.
pub async fn transition(
    pool: &sqlx::PgPool,
    building: &str,
    id: i64,
    to: v1::AlertState,
    by: &str,
    note: &str,
) -> Result<AlertChange, TransitionError> {
    let to = match to {
        v1::AlertState::Acknowledged => "acknowledged",
        v1::AlertState::Resolved => "resolved",
        _ => return Err(TransitionError::BadTarget),
    };
    let mut tx = pool.begin().await?;
    let current: Option<AlertRow> = sqlx::query_as(&format!(
        "SELECT {ALERT_COLUMNS} FROM alerts WHERE id = $1 AND building_id = $2 FOR UPDATE"
    ))
    .bind(id)
    .bind(building)
    .fetch_optional(&mut *tx)
    .await?;
    let current = current.ok_or(TransitionError::NotFound(id))?;
    if current.state == to {
        return Ok(AlertChange {
            alert: current.to_proto(),
            transition: None,
        });
    }
    if current.state == "resolved" {
        return Err(TransitionError::AlreadyResolved(id));
    }
    let now = Utc::now();
    let alert: AlertRow = sqlx::query_as(&format!(
        "UPDATE alerts SET state = $2, updated_at = greatest(updated_at, $3) WHERE id = $1
         RETURNING {ALERT_COLUMNS}"
    ))
    .bind(id)
    .bind(to)
    .bind(now)
    .fetch_one(&mut *tx)
    .await?;
    let transition =
        record_transition(&mut tx, &alert, Some(&current.state), by, note, now).await?;
    tx.commit().await?;
    Ok(AlertChange {
        alert: alert.to_proto(),
        transition: Some(transition),
    })
}

/// Announces a committed change (best effort: the alert itself is stored).
pub async fn announce(nats: &async_nats::Client, change: &AlertChange) {
    let Ok(building) = BuildingId::new(change.alert.building_id.as_str()) else {
        return;
    };
    let event = v1::AlertEvent {
        alert: Some(change.alert.clone()),
        transition: change.transition.clone(),
    };
    if let Err(e) = nats
        .publish(alert_subject(&building), event.encode_to_vec().into())
        .await
    {
        tracing::warn!(error = %e, alert = change.alert.id, "announcing an alert change failed");
    }
}

/// One pass of the time-based rules; returns the changes made. Each alert is raised in its own
/// short transaction, so a pass never holds locks that the ingest waits for.
pub async fn evaluate(
    pool: &sqlx::PgPool,
    config: &AlertConfig,
) -> Result<Vec<AlertChange>, sqlx::Error> {
    let now = Utc::now();
    let ago = |d: Duration| now - chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
    let mut candidates: Vec<Candidate> = Vec::new();

    let down: Vec<(String, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT device_id, building_id, out_of_service_since FROM elevator_state
         WHERE out_of_service_since < $1",
    )
    .bind(ago(config.out_of_service_after))
    .fetch_all(pool)
    .await?;
    for (device, building, since) in down {
        let summary = format!("out of service since {}", since.to_rfc3339());
        candidates.push(Candidate {
            device,
            building,
            rule: AlertRule::OutOfService,
            summary,
            before: ago(config.out_of_service_after),
            recheck: STILL_OUT_OF_SERVICE,
        });
    }

    let untested: Vec<(String, String, Option<DateTime<Utc>>)> = sqlx::query_as(
        "SELECT device_id, building_id, last_passed_self_test_at FROM elevator_state
         WHERE coalesce(last_passed_self_test_at, tracked_since) < $1",
    )
    .bind(ago(config.self_test_every))
    .fetch_all(pool)
    .await?;
    for (device, building, last) in untested {
        let summary = match last {
            Some(last) => format!("no passed alarm self-test since {}", last.to_rfc3339()),
            None => "no passed alarm self-test on record".to_string(),
        };
        candidates.push(Candidate {
            device,
            building,
            rule: AlertRule::SelfTestMissed,
            summary,
            before: ago(config.self_test_every),
            recheck: STILL_UNTESTED,
        });
    }

    let offline: Vec<(String, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT device_id, building_id, since FROM (
             SELECT device_id, building_id, CASE WHEN lost THEN lost_at ELSE at END AS since
             FROM device_presence WHERE NOT online
         ) offline WHERE since < $1",
    )
    .bind(ago(config.offline_after))
    .fetch_all(pool)
    .await?;
    for (device, building, since) in offline {
        let summary = format!("offline since {}", since.to_rfc3339());
        candidates.push(Candidate {
            device,
            building,
            rule: AlertRule::DeviceOffline,
            summary,
            before: ago(config.offline_after),
            recheck: STILL_OFFLINE,
        });
    }

    let mut changes = Vec::new();
    for candidate in candidates {
        let mut tx = pool.begin().await?;
        // Read without locks, the condition may have ended since (an ingest committing the
        // fault's clear, the device coming back): raised now, the alert would stay open until
        // the condition came and went again.
        if !candidate.still_holds(&mut tx).await? {
            continue;
        }
        let change = raise(
            &mut tx,
            &candidate.building,
            &candidate.device,
            candidate.rule,
            &candidate.summary,
            now,
            Repeat::Ignore,
        )
        .await?;
        tx.commit().await?;
        changes.extend(change);
    }
    Ok(changes)
}

/// A device a time-based rule matched in the pass's unlocked read.
struct Candidate {
    device: String,
    building: String,
    rule: AlertRule,
    summary: String,
    /// The rule's threshold: its condition began before this.
    before: DateTime<Utc>,
    /// The rule's condition, checked again before raising.
    recheck: &'static str,
}

impl Candidate {
    /// Whether the rule still holds, read under a share lock of the device's row: a commit in
    /// progress on that row (an ingest batch, a presence change) is waited for, then seen.
    async fn still_holds(&self, tx: &mut sqlx::PgConnection) -> Result<bool, sqlx::Error> {
        Ok(sqlx::query_scalar::<_, String>(self.recheck)
            .bind(&self.device)
            .bind(self.before)
            .fetch_optional(&mut *tx)
            .await?
            .is_some())
    }
}

/// The time-based rules' conditions for one device (`$1`) and threshold (`$2`), locking its row.
const STILL_OUT_OF_SERVICE: &str = "SELECT device_id FROM device_watermarks
     WHERE device_id = $1 AND state IS NOT NULL AND out_of_service_since < $2 FOR SHARE";
const STILL_UNTESTED: &str = "SELECT device_id FROM device_watermarks
     WHERE device_id = $1 AND state IS NOT NULL
       AND coalesce(last_passed_self_test_at, tracked_since) < $2 FOR SHARE";
const STILL_OFFLINE: &str = "SELECT device_id FROM device_presence
     WHERE device_id = $1 AND NOT online AND CASE WHEN lost THEN lost_at ELSE at END < $2
     FOR SHARE";

/// Evaluates the time-based rules every `evaluate_every` until `shutdown`.
pub async fn run_evaluator(
    pool: sqlx::PgPool,
    nats: async_nats::Client,
    config: AlertConfig,
    shutdown: CancellationToken,
) {
    let mut every = tokio::time::interval(config.evaluate_every);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            _ = shutdown.cancelled() => return,
        }
        match evaluate(&pool, &config).await {
            Ok(changes) => {
                for change in &changes {
                    announce(&nats, change).await;
                }
            }
            Err(e) => tracing::warn!(error = %e, "evaluating alert rules failed; retrying later"),
        }
    }
}
