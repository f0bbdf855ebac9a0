-- The message log becomes partitioned by day on `at`, the message's time (the device clock
-- unless implausible, then the time the gateway received it), so retention drops whole
-- partitions. Partitions are named device_messages_YYYYMMDD and cover one UTC day; the service
-- creates them ahead of time and drops them past the retention (see src/partitions.rs).
-- Idempotency stays on (device_id, seq): the ingest holds the device's watermark row lock while it
-- writes, and checks for rows above the watermark, so the primary key only has to include `at`
-- because PostgreSQL requires the partition key in unique constraints.
ALTER TABLE device_messages RENAME TO device_messages_v0;
ALTER TABLE device_messages_v0 RENAME CONSTRAINT device_messages_pkey TO device_messages_v0_pkey;
ALTER INDEX device_messages_building_time RENAME TO device_messages_v0_building_time;

CREATE TABLE device_messages (
    device_id    text        NOT NULL,
    seq          bigint      NOT NULL CHECK (seq > 0),
    building_id  text        NOT NULL,
    -- telemetry, event, screen_ack, command_result, upload_request; `rejected` keeps the place of
    -- a message whose content was refused (it went to the dead-letter stream), so that the
    -- device's watermark can pass it.
    kind         text        NOT NULL,
    at           timestamptz NOT NULL,
    device_time  timestamptz,
    received_at  timestamptz NOT NULL,
    payload      bytea       NOT NULL,
    -- Events: the event kind (trip_completed, door_cycle, fault_raised, alarm_self_test, ...).
    event        text,
    -- Events: trip_completed → levelling error in mm (signed); alarm_self_test → 1 passed, 0 failed.
    event_value  integer,
    -- Telemetry: the numbers history queries aggregate.
    mode         smallint,
    floor        integer,
    load_percent smallint,
    speed_mm_s   integer,
    motor_temp_decicelsius integer,
    PRIMARY KEY (device_id, seq, at)
) PARTITION BY RANGE (at);

CREATE INDEX device_messages_device_at ON device_messages (device_id, at);

-- Move any rows of the unpartitioned log into day partitions.
DO $$
DECLARE
    day date;
BEGIN
    FOR day IN
        SELECT DISTINCT (coalesce(device_time, received_at) AT TIME ZONE 'UTC')::date FROM device_messages_v0
    LOOP
        EXECUTE format(
            'CREATE TABLE IF NOT EXISTS %I PARTITION OF device_messages FOR VALUES FROM (%L) TO (%L)',
            'device_messages_' || to_char(day, 'YYYYMMDD'),
            day::timestamp AT TIME ZONE 'UTC',
            (day + 1)::timestamp AT TIME ZONE 'UTC');
    END LOOP;
END $$;

INSERT INTO device_messages (device_id, seq, building_id, kind, at, device_time, received_at, payload)
SELECT device_id, seq, building_id, kind, coalesce(device_time, received_at), device_time, received_at, payload
FROM device_messages_v0;

DROP TABLE device_messages_v0;

-- The highest sequence number stored: when it equals persisted_seq (the usual case) nothing sits
-- above the watermark and a batch needs no lookup to tell new messages from resends.
ALTER TABLE device_watermarks ADD COLUMN max_seq bigint NOT NULL DEFAULT 0;
UPDATE device_watermarks w
SET max_seq = coalesce((SELECT max(seq) FROM device_messages m WHERE m.device_id = w.device_id), 0);

-- Columns the periodic alert rules scan (the rest of the state stays in the protobuf).
ALTER TABLE elevator_state
    ADD COLUMN tracked_since timestamptz,
    ADD COLUMN out_of_service_since timestamptz,
    ADD COLUMN last_passed_self_test_at timestamptz;

-- Connection state reported by the gateways.
CREATE TABLE device_presence (
    device_id   text        PRIMARY KEY,
    building_id text        NOT NULL,
    online      boolean     NOT NULL,
    at          timestamptz NOT NULL
);

CREATE INDEX device_presence_offline ON device_presence (at) WHERE NOT online;

-- Periods derived from each elevator's messages in sequence order (each message applied once).
CREATE TABLE incidents (
    id          bigserial   PRIMARY KEY,
    device_id   text        NOT NULL,
    building_id text        NOT NULL,
    kind        text        NOT NULL CHECK (kind IN ('downtime', 'fault', 'entrapment', 'maintenance', 'power_loss')),
    planned     boolean     NOT NULL DEFAULT false,
    cause       text        NOT NULL DEFAULT '',
    ref_id      text        NOT NULL DEFAULT '',
    code        integer     NOT NULL DEFAULT 0,
    vendor_code text        NOT NULL DEFAULT '',
    started_at  timestamptz NOT NULL,
    ended_at    timestamptz CHECK (ended_at >= started_at),
    started_seq bigint      NOT NULL,
    ended_seq   bigint
);

CREATE UNIQUE INDEX incidents_open ON incidents (device_id, kind, ref_id) WHERE ended_at IS NULL;
CREATE INDEX incidents_device_started ON incidents (device_id, started_at);
CREATE INDEX incidents_building_started ON incidents (building_id, started_at);

-- Alerts: at most one unresolved alert per elevator and rule; repeats count as occurrences.
CREATE TABLE alerts (
    id          bigserial   PRIMARY KEY,
    building_id text        NOT NULL,
    device_id   text        NOT NULL,
    rule        text        NOT NULL,
    state       text        NOT NULL CHECK (state IN ('open', 'acknowledged', 'resolved')),
    severity    text        NOT NULL,
    summary     text        NOT NULL,
    opened_at   timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL,
    occurrences integer     NOT NULL DEFAULT 1
);

CREATE UNIQUE INDEX alerts_unresolved ON alerts (device_id, rule) WHERE state <> 'resolved';
CREATE INDEX alerts_building ON alerts (building_id, id);

CREATE TABLE alert_transitions (
    alert_id   bigint      NOT NULL REFERENCES alerts (id),
    from_state text,
    to_state   text        NOT NULL,
    at         timestamptz NOT NULL,
    by_whom    text        NOT NULL,
    note       text        NOT NULL DEFAULT ''
);

CREATE INDEX alert_transitions_alert ON alert_transitions (alert_id, at);
