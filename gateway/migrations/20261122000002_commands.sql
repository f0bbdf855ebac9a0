-- Commands sent to devices and what they answered (from their command-result uplink).
CREATE TABLE device_commands (
    command_id   text        PRIMARY KEY,
    building_id  text        NOT NULL,
    device_id    text        NOT NULL,
    kind         text        NOT NULL,
    -- liftwire.v1.CommandStatus number; 0 until the device answers.
    status       integer     NOT NULL DEFAULT 0,
    detail       text        NOT NULL DEFAULT '',
    requested_by text        NOT NULL,
    requested_at timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    -- liftwire.v1.ObjectRef of the output file, if any.
    output       bytea
);

CREATE INDEX device_commands_device ON device_commands (device_id, requested_at);
