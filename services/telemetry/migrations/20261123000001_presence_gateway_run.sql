-- The gateway run (one start of a gateway replica) that reported each device's latest presence
-- change. A run whose heartbeats stop leaves its online devices to be recorded offline; an
-- offline report from a run that no longer holds the device is ignored. '' for changes from
-- gateways that name no run: never swept.
ALTER TABLE device_presence ADD COLUMN gateway_run text NOT NULL DEFAULT '';

CREATE INDEX device_presence_online_run ON device_presence (gateway_run) WHERE online;
