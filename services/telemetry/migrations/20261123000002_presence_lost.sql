-- Set when a device was recorded offline because its gateway run went silent, cleared by the
-- next change reported for it: if the run turns out to be alive, it is asked to report its
-- devices again.
ALTER TABLE device_presence ADD COLUMN lost boolean NOT NULL DEFAULT false;

CREATE INDEX device_presence_lost_run ON device_presence (gateway_run) WHERE lost;
