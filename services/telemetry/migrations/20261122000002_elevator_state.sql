-- Live state per elevator, derived from each device's contiguous prefix of messages (so every
-- message is applied exactly once and in sequence order). `state` is a liftwire.v1.ElevatorState.
CREATE TABLE elevator_state (
    device_id   text   PRIMARY KEY,
    building_id text   NOT NULL,
    applied_seq bigint NOT NULL,
    state       bytea  NOT NULL
);

CREATE INDEX elevator_state_building ON elevator_state (building_id);
