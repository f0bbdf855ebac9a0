-- Every accepted device message, exactly once per (device, sequence number).
CREATE TABLE device_messages (
    device_id   text        NOT NULL,
    seq         bigint      NOT NULL CHECK (seq > 0),
    building_id text        NOT NULL,
    kind        text        NOT NULL,
    device_time timestamptz,
    received_at timestamptz NOT NULL DEFAULT now(),
    payload     bytea       NOT NULL,
    PRIMARY KEY (device_id, seq)
);

CREATE INDEX device_messages_building_time ON device_messages (building_id, device_time);

-- Per device, the highest sequence number up to which every message is persisted.
-- Published to the device, which trims its outbox up to it and resends anything above.
CREATE TABLE device_watermarks (
    device_id     text   PRIMARY KEY,
    building_id   text   NOT NULL,
    persisted_seq bigint NOT NULL CHECK (persisted_seq >= 0)
);
