-- KPI queries read counted events and passed self-tests of a building's elevators over a range;
-- these partial indexes let them use index-only scans instead of reading every message in the
-- range (they only grow with those events, a small share of the stream).
CREATE INDEX device_messages_counted_events ON device_messages (device_id, at)
    INCLUDE (event, event_value) WHERE event IN ('trip_completed', 'door_cycle');
CREATE INDEX device_messages_passed_self_tests ON device_messages (device_id, at)
    WHERE event = 'alarm_self_test' AND event_value = 1;
