-- When a device recorded lost was last known connected (its gateway run's last heartbeat):
-- shown and alerted on as its offline time. `at` keeps the time of the last reported change, so
-- a report through another gateway made before the loss was noticed still wins.
ALTER TABLE device_presence ADD COLUMN lost_at timestamptz;
