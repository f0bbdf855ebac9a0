-- Set when a device was recorded offline because its gateway run went silent (lost_at: when
-- the run was last heard), cleared by the next change recorded for it. `at` keeps the time of
-- the last reported change, so a report through another gateway made before the loss was
-- noticed still wins. If the run turns out to be alive, it is asked where the devices are.
ALTER TABLE device_presence ADD COLUMN lost boolean NOT NULL DEFAULT false;
ALTER TABLE device_presence ADD COLUMN lost_at timestamptz;

CREATE INDEX device_presence_lost_run ON device_presence (gateway_run) WHERE lost;
