-- The liftwire.v1.Downlink of each command as published: sent again whenever its device
-- subscribes while the command is pending (no result yet) and unexpired, so a command published
-- while the device was away still reaches it (at least once; the device ignores a command_id it
-- has already run). NULL for commands recorded before this column existed.
ALTER TABLE device_commands ADD COLUMN downlink bytea;
