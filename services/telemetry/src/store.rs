//! One batch of device messages → one PostgreSQL transaction.
//!
//! Per device, the `device_watermarks` row is the lock every writer takes first (in device-id
//! order, so replicas cannot deadlock) and the bookkeeping that makes the write idempotent on
//! `(device_id, seq)`: messages at or below `persisted_seq` are already stored; above it, only
//! when `max_seq > persisted_seq` (a gap) can a message be stored already, and only then is the
//! log consulted. So the new messages are known exactly and go in with one binary `COPY` (should
//! it meet a stored row nonetheless, the batch is written again with `INSERT … ON CONFLICT DO
//! NOTHING`). The statements per batch are a constant handful, whatever the number of devices:
//! lock (which reads the live states; rows of new devices are created first), copy, update each
//! device's row (watermark and live state) in one statement; plus one statement per incident or
//! alert change, which are rare.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use liftwire_proto::{v1, Message};

use crate::alerts::{self, AlertChange};
use crate::state::{self, Effect, FoldRules};

/// Typed columns extracted from a message for queries.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Columns {
    /// Event kind (events only).
    pub event: Option<&'static str>,
    /// Event value: levelling error of a trip, 1/0 for a passed/failed self-test.
    pub event_value: Option<i32>,
    /// Telemetry: mode.
    pub mode: Option<i16>,
    /// Telemetry: floor.
    pub floor: Option<i32>,
    /// Telemetry: load.
    pub load_percent: Option<i16>,
    /// Telemetry: speed.
    pub speed_mm_s: Option<i32>,
    /// Telemetry: motor temperature.
    pub motor_temp_decicelsius: Option<i32>,
}

/// One validated message, ready to store.
#[derive(Debug, Clone)]
pub struct Row {
    /// Device id (authenticated by the gateway).
    pub device: String,
    /// Building id.
    pub building: String,
    /// Sequence number (> 0).
    pub seq: i64,
    /// Uplink kind, or `rejected` for a placeholder.
    pub kind: &'static str,
    /// Time the message is filed under (partition key).
    pub at: DateTime<Utc>,
    /// Device clock, as reported.
    pub device_time: Option<DateTime<Utc>>,
    /// When the gateway stored it in JetStream.
    pub received_at: DateTime<Utc>,
    /// The envelope bytes.
    pub payload: Bytes,
    /// Query columns.
    pub columns: Columns,
    /// The decoded envelope (absent for placeholders of rejected messages).
    pub envelope: Option<v1::Envelope>,
}

/// A device whose persisted watermark advanced in a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatermarkAdvance {
    /// The device.
    pub device_id: String,
    /// Its building.
    pub building_id: String,
    /// Every message up to this sequence number is persisted.
    pub persisted_seq: i64,
}

/// An elevator's new live state.
#[derive(Debug, Clone)]
pub struct StateChange {
    /// The state.
    pub state: v1::ElevatorState,
    /// As stored (the protobuf encoding).
    pub encoded: Bytes,
}

/// What a committed batch changed.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Rows newly stored (the rest were duplicates).
    pub inserted: u64,
    /// Watermarks that advanced.
    pub advanced: Vec<WatermarkAdvance>,
    /// Live states that changed.
    pub states: Vec<StateChange>,
    /// Alert changes to announce.
    pub alerts: Vec<AlertChange>,
    /// Messages PostgreSQL refused to store (a value out of its range, a constraint), kept as
    /// placeholders so that they hold up neither their device nor the rest of the batch.
    pub unstorable: u64,
}

impl Outcome {
    fn merge(&mut self, other: Outcome) {
        self.inserted += other.inserted;
        self.advanced.extend(other.advanced);
        self.states.extend(other.states);
        self.alerts.extend(other.alerts);
        self.unstorable += other.unstorable;
    }
}

/// A stored message above a device's watermark (read back when a gap closes).
struct Stored {
    seq: i64,
    at: DateTime<Utc>,
    payload: Option<Vec<u8>>,
}

/// How a batch stores its new messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Insert {
    /// Binary `COPY`: the fast path. The bookkeeping under the device locks already excluded
    /// every stored message, so nothing can conflict.
    Copy,
    /// `INSERT … ON CONFLICT DO NOTHING`: the fallback when a `COPY` met a row the bookkeeping
    /// did not account for (it never should), so that such a row cannot block the stream.
    SkipConflicts,
}

/// Writes `rows` in one transaction. The days of the rows' `at` must have partitions.
pub async fn write_batch(
    pool: &sqlx::PgPool,
    rows: Vec<Row>,
    rules: &FoldRules,
) -> Result<Outcome, WriteError> {
    // Sorted by reference: a row is a few hundred bytes.
    let mut rows: Vec<&Row> = rows.iter().collect();
    rows.sort_by(|a, b| (&a.device, a.seq).cmp(&(&b.device, b.seq)));
    rows.dedup_by(|a, b| a.device == b.device && a.seq == b.seq);
    match write_rows(pool, &rows, rules).await {
        Err(e) if is_refused_value(&e) => {
            tracing::warn!(error = %e, "PostgreSQL refused a value of the batch; writing it device by device");
            isolate(pool, &rows, rules).await
        }
        written => Ok(written?),
    }
}

/// A batch that failed, with what part of it was committed before (when it was written device
/// by device): that part must still be announced, its messages being duplicates when the batch
/// is delivered again.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct WriteError {
    /// Why the rest failed.
    #[source]
    pub error: sqlx::Error,
    /// What was committed before it failed.
    pub committed: Outcome,
}

impl From<sqlx::Error> for WriteError {
    fn from(error: sqlx::Error) -> Self {
        Self {
            error,
            committed: Outcome::default(),
        }
    }
}

/// Writes sorted `rows` in one transaction.
async fn write_rows(
    pool: &sqlx::PgPool,
    rows: &[&Row],
    rules: &FoldRules,
) -> Result<Outcome, sqlx::Error> {
    match write_sorted(pool, rows, rules, Insert::Copy).await {
        Err(e) if is_unique_violation(&e) => {
            tracing::warn!(error = %e, "a stored message was above its device's bookkeeping; writing the batch again, skipping stored messages");
            write_sorted(pool, rows, rules, Insert::SkipConflicts).await
        }
        written => written,
    }
}

/// Writes sorted `rows`, one of which holds a value PostgreSQL refuses, so that it holds up
/// nothing else: each device in its own transaction, and a refused device message by message,
/// the refused ones as placeholders (payload kept, nothing folded). Otherwise the batch would
/// fail again at every redelivery, with every device that shares it.
async fn isolate(
    pool: &sqlx::PgPool,
    rows: &[&Row],
    rules: &FoldRules,
) -> Result<Outcome, WriteError> {
    let mut outcome = Outcome::default();
    match isolate_into(pool, rows, rules, &mut outcome).await {
        Ok(()) => Ok(outcome),
        Err(error) => Err(WriteError {
            error,
            committed: outcome,
        }),
    }
}

/// [`isolate`], adding each commit's outcome to `outcome` as it is made.
async fn isolate_into(
    pool: &sqlx::PgPool,
    rows: &[&Row],
    rules: &FoldRules,
    outcome: &mut Outcome,
) -> Result<(), sqlx::Error> {
    for device in rows.chunk_by(|a, b| a.device == b.device) {
        match write_rows(pool, device, rules).await {
            Err(e) if is_refused_value(&e) => {
                for row in device {
                    match write_rows(pool, &[*row], rules).await {
                        Err(e) if is_refused_value(&e) => {
                            tracing::warn!(error = %e, device = %row.device, seq = row.seq, "PostgreSQL refuses this message; stored as a placeholder");
                            let placeholder = Row {
                                kind: "rejected",
                                at: row.received_at,
                                device_time: None,
                                columns: Columns::default(),
                                envelope: None,
                                ..(*row).clone()
                            };
                            outcome.merge(write_rows(pool, &[&placeholder], rules).await?);
                            outcome.unstorable += 1;
                        }
                        written => outcome.merge(written?),
                    }
                }
            }
            written => outcome.merge(written?),
        }
    }
    Ok(())
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db) if db.code().as_deref() == Some("23505"))
}

/// A value PostgreSQL refuses whenever it is written (class 22, data exception; class 23,
/// a constraint, but a unique violation, which [`write_rows`] handles), as opposed to an outage.
/// A row without its day's partition is not one: the partition is made again and the batch
/// retried ([`is_missing_partition`]).
fn is_refused_value(e: &sqlx::Error) -> bool {
    let sqlx::Error::Database(db) = e else {
        return false;
    };
    db.code()
        .is_some_and(|code| code.starts_with("22") || (code.starts_with("23") && code != "23505"))
        && !is_missing_partition(e)
}

/// A row whose day has no partition (dropped since this replica last looked): a check violation
/// that, unlike a CHECK constraint's, names no constraint (the message text is translated).
pub fn is_missing_partition(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db)
        if db.code().as_deref() == Some("23514") && db.constraint().is_none())
}

/// A device's bookkeeping row, locked: device, persisted watermark, highest stored sequence
/// number, live state.
type MarkRow = (String, i64, i64, Option<Vec<u8>>);

/// Locks the watermark rows of `device_ids` (sorted) in device order and returns them.
async fn lock_devices(
    tx: &mut sqlx::PgConnection,
    device_ids: &[&str],
) -> Result<Vec<MarkRow>, sqlx::Error> {
    // A join rather than `device_id = ANY($1)`: when a row was updated meanwhile, PostgreSQL
    // rechecks just that row, instead of rescanning with the whole (re-sorted) array each time,
    // which made writers contending for the same devices burn CPU. The rows come from the
    // locked table only, so they are its latest versions.
    sqlx::query_as(
        "SELECT w.device_id, w.persisted_seq, w.max_seq, w.state
         FROM UNNEST($1::text[]) AS d(id) JOIN device_watermarks w ON w.device_id = d.id
         ORDER BY w.device_id FOR UPDATE OF w",
    )
    .bind(device_ids)
    .fetch_all(&mut *tx)
    .await
}

/// [`write_batch`] of rows sorted by device and sequence number, without duplicates.
async fn write_sorted(
    pool: &sqlx::PgPool,
    rows: &[&Row],
    rules: &FoldRules,
    insert: Insert,
) -> Result<Outcome, sqlx::Error> {
    let devices: BTreeMap<&str, &str> = rows
        .iter()
        .map(|r| (r.device.as_str(), r.building.as_str()))
        .collect();
    let device_ids: Vec<&str> = devices.keys().copied().collect();

    let mut tx = pool.begin().await?;
    // Locking returns each device's latest row, live state included. Usually every device has
    // its row already, and this is the batch's first statement.
    let mut locked = lock_devices(&mut tx, &device_ids).await?;
    if locked.len() < device_ids.len() {
        // New devices: release the locks, create the missing rows (no new row version for rows
        // another writer created meanwhile), then lock them all again in device order, so that
        // writers always lock in the same order and cannot deadlock.
        tx.rollback().await?;
        tx = pool.begin().await?;
        let building_ids: Vec<&str> = devices.values().copied().collect();
        sqlx::query(
            "INSERT INTO device_watermarks (device_id, building_id, persisted_seq, max_seq)
             SELECT d, b, 0, 0 FROM UNNEST($1::text[], $2::text[]) AS t(d, b)
             ON CONFLICT (device_id) DO NOTHING",
        )
        .bind(&device_ids)
        .bind(&building_ids)
        .execute(&mut *tx)
        .await?;
        locked = lock_devices(&mut tx, &device_ids).await?;
    }
    let mut marks: HashMap<String, (i64, i64)> = HashMap::with_capacity(locked.len());
    // Live states, decoded and as stored (to tell whether a batch changed them).
    let mut states: HashMap<String, (v1::ElevatorState, Vec<u8>)> = HashMap::new();
    for (device, persisted, max, stored) in locked {
        if let Some(stored) = stored {
            if let Ok(state) = v1::ElevatorState::decode(stored.as_slice()) {
                states.insert(device.clone(), (state, stored));
            }
        }
        marks.insert(device, (persisted, max));
    }

    // Devices with messages stored above their watermark: read those back.
    let gapped: Vec<(&str, i64)> = marks
        .iter()
        .filter(|(_, (persisted, max))| max > persisted)
        .map(|(d, (persisted, _))| (d.as_str(), *persisted))
        .collect();
    let mut above: HashMap<String, BTreeMap<i64, Stored>> = HashMap::new();
    if !gapped.is_empty() {
        let (ids, floors): (Vec<&str>, Vec<i64>) = gapped.into_iter().unzip();
        type StoredRow = (String, i64, DateTime<Utc>, Option<Vec<u8>>);
        let stored: Vec<StoredRow> = sqlx::query_as(
            "SELECT m.device_id, m.seq, m.at,
                    CASE WHEN m.kind IN ('telemetry', 'event') THEN m.payload END
             FROM UNNEST($1::text[], $2::int8[]) AS t(d, w)
             JOIN device_messages m ON m.device_id = t.d AND m.seq > t.w",
        )
        .bind(&ids)
        .bind(&floors)
        .fetch_all(&mut *tx)
        .await?;
        for (device, seq, at, payload) in stored {
            above
                .entry(device)
                .or_default()
                .insert(seq, Stored { seq, at, payload });
        }
    }

    // Keep only new messages.
    let rows: Vec<&Row> = rows
        .iter()
        .copied()
        .filter(|r| {
            let (persisted, _) = marks.get(&r.device).copied().unwrap_or((0, 0));
            r.seq > persisted
                && !above
                    .get(&r.device)
                    .is_some_and(|stored| stored.contains_key(&r.seq))
        })
        .collect();
    let inserted = match insert {
        Insert::Copy => copy_rows(&mut tx, &rows).await?,
        Insert::SkipConflicts => insert_rows(&mut tx, &rows).await?,
    };

    // Each device's new rows, in sequence order.
    let mut new_rows: HashMap<&str, &[&Row]> = rows
        .chunk_by(|a, b| a.device == b.device)
        .map(|rows| (rows[0].device.as_str(), rows))
        .collect();

    let mut outcome = Outcome {
        inserted,
        ..Default::default()
    };
    let mut mark_updates: Vec<(&str, i64, i64)> = Vec::new();
    let mut state_updates: Vec<StateUpdate<'_>> = Vec::new();
    let mut effects: Vec<(&str, &str, i64, Effect)> = Vec::new();
    for (&device, &building) in &devices {
        let (persisted, max) = marks.get(device).copied().unwrap_or((0, 0));
        let fresh = new_rows.remove(device).unwrap_or_default();
        let stored = above.remove(device).unwrap_or_default();
        let new_max = max.max(fresh.last().map_or(0, |r| r.seq));
        // The contiguous run above the watermark, from new and earlier stored messages.
        let mut watermark = persisted;
        let mut run: Vec<(i64, DateTime<Utc>, Option<Cow<'_, v1::Envelope>>)> = Vec::new();
        loop {
            let next = watermark + 1;
            if let Ok(i) = fresh.binary_search_by_key(&next, |r| r.seq) {
                let row = fresh[i];
                run.push((next, row.at, row.envelope.as_ref().map(Cow::Borrowed)));
            } else if let Some(s) = stored.get(&next) {
                let envelope = s
                    .payload
                    .as_deref()
                    .and_then(|p| v1::Envelope::decode(p).ok())
                    .map(Cow::Owned);
                run.push((s.seq, s.at, envelope));
            } else {
                break;
            }
            watermark = next;
        }
        if watermark == persisted && new_max == max {
            continue;
        }
        mark_updates.push((device, watermark, new_max));
        if watermark > persisted {
            outcome.advanced.push(WatermarkAdvance {
                device_id: device.into(),
                building_id: building.into(),
                persisted_seq: watermark,
            });
        }
        let elevator_messages = run.iter().any(|(_, _, e)| {
            matches!(
                e.as_ref().and_then(|e| e.body.as_ref()),
                Some(v1::envelope::Body::Telemetry(_) | v1::envelope::Body::Event(_))
            )
        });
        let known = states.contains_key(device);
        if !elevator_messages && !known {
            // Not an elevator (e.g. a screen): no state to keep.
            continue;
        }
        let (mut state, before) = states.remove(device).unwrap_or_else(|| {
            let state = v1::ElevatorState {
                device_id: device.into(),
                building_id: building.into(),
                ..Default::default()
            };
            (state, Vec::new())
        });
        let first_at = (!known)
            .then(|| run.first().map(|(_, at, _)| *at))
            .flatten();
        for (seq, at, envelope) in &run {
            let seq = u64::try_from(*seq).unwrap_or(0);
            match envelope {
                Some(envelope) => {
                    let mut produced = Vec::new();
                    state::apply(&mut state, seq, *at, envelope, rules, &mut produced);
                    effects.extend(
                        produced
                            .into_iter()
                            .map(|e| (device, building, i64::try_from(seq).unwrap_or(0), e)),
                    );
                }
                None => state::skip(&mut state, seq),
            }
        }
        // Stored and announced only when it changed.
        let encoded = state.encode_to_vec();
        if encoded != before {
            state_updates.push(StateUpdate {
                device,
                state,
                encoded: encoded.into(),
                first_at,
            });
        }
    }

    if !mark_updates.is_empty() {
        update_devices(&mut tx, &mark_updates, &state_updates).await?;
    }
    for (device, building, seq, effect) in effects {
        if let Some(change) = apply_effect(&mut tx, device, building, seq, effect).await? {
            outcome.alerts.push(change);
        }
    }
    tx.commit().await?;
    outcome.states = state_updates
        .into_iter()
        .map(|u| StateChange {
            state: u.state,
            encoded: u.encoded,
        })
        .collect();
    Ok(outcome)
}

/// Columns of `device_messages` a batch writes, in the order of [`copy_rows`]' tuples.
const MESSAGE_COLUMNS: &str = "device_id, seq, building_id, kind, at, device_time, received_at, \
    payload, event, event_value, mode, floor, load_percent, speed_mm_s, motor_temp_decicelsius";

/// Stores `rows` (none of them stored yet) with one binary `COPY`; returns the rows written.
pub async fn copy_rows(tx: &mut sqlx::PgConnection, rows: &[&Row]) -> Result<u64, sqlx::Error> {
    if rows.is_empty() {
        return Ok(0);
    }
    let mut buf = CopyBuf::with_capacity(
        32 + rows
            .iter()
            .map(|r| 160 + r.device.len() + r.building.len() + r.payload.len())
            .sum::<usize>(),
    );
    for row in rows {
        buf.row(row);
    }
    let mut copy = tx
        .copy_in_raw(&format!(
            "COPY device_messages ({MESSAGE_COLUMNS}) FROM STDIN (FORMAT binary)"
        ))
        .await?;
    copy.send(buf.finish()).await?;
    copy.finish().await
}

/// PostgreSQL's binary `COPY` format: a header, then per row a field count and each field as a
/// length (-1 for NULL) and its binary representation, then a trailer.
struct CopyBuf(Vec<u8>);

impl CopyBuf {
    /// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
    const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

    fn with_capacity(capacity: usize) -> Self {
        let mut b = Vec::with_capacity(capacity);
        b.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
        b.extend_from_slice(&0i32.to_be_bytes()); // flags
        b.extend_from_slice(&0i32.to_be_bytes()); // header extension length
        Self(b)
    }

    fn bytes(&mut self, v: &[u8]) {
        // Fields are far below 2 GiB: a message is at most the NATS payload limit.
        let len = i32::try_from(v.len()).unwrap_or(i32::MAX);
        self.0.extend_from_slice(&len.to_be_bytes());
        self.0.extend_from_slice(v);
    }

    fn opt<T>(&mut self, v: Option<T>, f: impl FnOnce(&mut Self, T)) {
        match v {
            Some(v) => f(self, v),
            None => self.0.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }

    fn i16(&mut self, v: i16) {
        self.bytes(&v.to_be_bytes());
    }

    fn i32(&mut self, v: i32) {
        self.bytes(&v.to_be_bytes());
    }

    fn i64(&mut self, v: i64) {
        self.bytes(&v.to_be_bytes());
    }

    fn time(&mut self, t: DateTime<Utc>) {
        self.i64(t.timestamp_micros() - Self::PG_EPOCH_MICROS);
    }

    /// One row, its fields in the order of [`MESSAGE_COLUMNS`].
    fn row(&mut self, r: &Row) {
        self.0.extend_from_slice(&15i16.to_be_bytes());
        self.bytes(r.device.as_bytes());
        self.i64(r.seq);
        self.bytes(r.building.as_bytes());
        self.bytes(r.kind.as_bytes());
        self.time(r.at);
        self.opt(r.device_time, Self::time);
        self.time(r.received_at);
        self.bytes(&r.payload);
        self.opt(r.columns.event, |b, e| b.bytes(e.as_bytes()));
        self.opt(r.columns.event_value, Self::i32);
        self.opt(r.columns.mode, Self::i16);
        self.opt(r.columns.floor, Self::i32);
        self.opt(r.columns.load_percent, Self::i16);
        self.opt(r.columns.speed_mm_s, Self::i32);
        self.opt(r.columns.motor_temp_decicelsius, Self::i32);
    }

    fn finish(mut self) -> Vec<u8> {
        self.0.extend_from_slice(&(-1i16).to_be_bytes());
        self.0
    }
}

/// Stores the `rows` not stored yet with one `INSERT`.
async fn insert_rows(tx: &mut sqlx::PgConnection, rows: &[&Row]) -> Result<u64, sqlx::Error> {
    if rows.is_empty() {
        return Ok(0);
    }
    let col = |f: fn(&&Row) -> Option<i32>| rows.iter().map(f).collect::<Vec<_>>();
    Ok(sqlx::query(&format!(
        "INSERT INTO device_messages ({MESSAGE_COLUMNS})
         SELECT * FROM UNNEST($1::text[], $2::int8[], $3::text[], $4::text[], $5::timestamptz[],
             $6::timestamptz[], $7::timestamptz[], $8::bytea[], $9::text[], $10::int4[],
             $11::int2[], $12::int4[], $13::int2[], $14::int4[], $15::int4[])
         ON CONFLICT DO NOTHING"
    ))
    .bind(rows.iter().map(|r| r.device.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.seq).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.building.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.kind).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.at).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.device_time).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.received_at).collect::<Vec<_>>())
    .bind(
        rows.iter()
            .map(|r| r.payload.as_ref())
            .collect::<Vec<&[u8]>>(),
    )
    .bind(rows.iter().map(|r| r.columns.event).collect::<Vec<_>>())
    .bind(col(|r| r.columns.event_value))
    .bind(rows.iter().map(|r| r.columns.mode).collect::<Vec<_>>())
    .bind(col(|r| r.columns.floor))
    .bind(
        rows.iter()
            .map(|r| r.columns.load_percent)
            .collect::<Vec<_>>(),
    )
    .bind(col(|r| r.columns.speed_mm_s))
    .bind(col(|r| r.columns.motor_temp_decicelsius))
    .execute(&mut *tx)
    .await?
    .rows_affected())
}

/// A device's new live state, and when it was first seen if this batch is its first.
struct StateUpdate<'a> {
    device: &'a str,
    state: v1::ElevatorState,
    encoded: Bytes,
    first_at: Option<DateTime<Utc>>,
}

/// One statement for every device of the batch: watermark, highest sequence number and, for
/// elevators whose messages were folded, the live state and the columns the alert rules scan.
async fn update_devices(
    tx: &mut sqlx::PgConnection,
    marks: &[(&str, i64, i64)],
    states: &[StateUpdate<'_>],
) -> Result<(), sqlx::Error> {
    let ts = |t: &Option<liftwire_proto::Timestamp>| t.as_ref().and_then(state::datetime);
    let by_device: HashMap<&str, &StateUpdate<'_>> = states.iter().map(|u| (u.device, u)).collect();
    let state_of = |device: &str| by_device.get(device).map(|u| &u.state);
    sqlx::query(
        "UPDATE device_watermarks w SET persisted_seq = t.p, max_seq = t.m,
             applied_seq = coalesce(t.a, w.applied_seq),
             state = coalesce(t.s, w.state),
             tracked_since = coalesce(w.tracked_since, t.since),
             out_of_service_since = CASE WHEN t.s IS NULL THEN w.out_of_service_since ELSE t.oos END,
             last_passed_self_test_at =
                 CASE WHEN t.s IS NULL THEN w.last_passed_self_test_at ELSE t.passed END
         FROM UNNEST($1::text[], $2::int8[], $3::int8[], $4::int8[], $5::bytea[],
                     $6::timestamptz[], $7::timestamptz[], $8::timestamptz[])
             AS t(d, p, m, a, s, since, oos, passed)
         WHERE w.device_id = t.d",
    )
    .bind(marks.iter().map(|m| m.0).collect::<Vec<_>>())
    .bind(marks.iter().map(|m| m.1).collect::<Vec<_>>())
    .bind(marks.iter().map(|m| m.2).collect::<Vec<_>>())
    .bind(
        marks
            .iter()
            .map(|m| state_of(m.0).map(|s| i64::try_from(s.applied_seq).unwrap_or(i64::MAX)))
            .collect::<Vec<_>>(),
    )
    .bind(
        marks
            .iter()
            .map(|m| by_device.get(m.0).map(|u| u.encoded.as_ref()))
            .collect::<Vec<_>>(),
    )
    .bind(
        marks
            .iter()
            .map(|m| by_device.get(m.0).and_then(|u| u.first_at))
            .collect::<Vec<_>>(),
    )
    .bind(
        marks
            .iter()
            .map(|m| state_of(m.0).and_then(|s| ts(&s.out_of_service_since)))
            .collect::<Vec<_>>(),
    )
    .bind(
        marks
            .iter()
            .map(|m| {
                state_of(m.0)
                    .filter(|s| s.last_self_test_passed)
                    .and_then(|s| ts(&s.last_self_test_at))
            })
            .collect::<Vec<_>>(),
    )
    .execute(&mut *tx)
    .await?;
    Ok(())
}

/// Writes one effect; returns the alert change to announce, if any.
async fn apply_effect(
    tx: &mut sqlx::PgConnection,
    device: &str,
    building: &str,
    seq: i64,
    effect: Effect,
) -> Result<Option<AlertChange>, sqlx::Error> {
    match effect {
        Effect::Open(open) => {
            sqlx::query(
                "INSERT INTO incidents (device_id, building_id, kind, planned, cause, ref_id, code,
                     vendor_code, started_at, started_seq)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
                 ON CONFLICT (device_id, kind, ref_id) WHERE ended_at IS NULL DO NOTHING",
            )
            .bind(device)
            .bind(building)
            .bind(open.kind.as_str())
            .bind(open.planned)
            .bind(&open.cause)
            .bind(&open.ref_id)
            .bind(open.code)
            .bind(&open.vendor_code)
            .bind(open.at)
            .bind(seq)
            .execute(&mut *tx)
            .await?;
            Ok(None)
        }
        Effect::Close { kind, ref_id, at } => {
            // A device clock that went backwards cannot end an incident before it began.
            sqlx::query(
                "UPDATE incidents SET ended_at = greatest($4, started_at), ended_seq = $5
                 WHERE device_id = $1 AND kind = $2 AND ref_id = $3 AND ended_at IS NULL",
            )
            .bind(device)
            .bind(kind.as_str())
            .bind(&ref_id)
            .bind(at)
            .bind(seq)
            .execute(&mut *tx)
            .await?;
            Ok(None)
        }
        Effect::Raise { rule, summary, at } => {
            alerts::raise(
                tx,
                building,
                device,
                rule,
                &summary,
                at,
                alerts::Repeat::Count,
            )
            .await
        }
        Effect::Resolve { rule, note, at } => alerts::resolve(tx, device, rule, &note, at).await,
    }
}

/// Day partitions a set of rows needs.
pub fn days(rows: &[Row]) -> BTreeSet<chrono::NaiveDate> {
    // The arrival day too: a row PostgreSQL refuses is stored as a placeholder filed under it.
    rows.iter()
        .flat_map(|r| [r.at.date_naive(), r.received_at.date_naive()])
        .collect()
}
