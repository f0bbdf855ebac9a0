-- A building's events, newest first, in the order the events list pages them: each page reads an
-- index range from its cursor instead of sorting every message of the building in the range.
-- Built in the migration's transaction: on a large existing log, inserts wait for it (run the
-- upgrade in a quiet hour, or build it per partition CONCURRENTLY beforehand).
CREATE INDEX device_messages_building_events
    ON device_messages (building_id, at DESC, device_id DESC, seq DESC) WHERE kind = 'event';
