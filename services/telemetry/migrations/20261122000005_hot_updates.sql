-- Every batch updates each of its devices' watermark and live-state rows. Room on each page keeps
-- those updates on the same page (HOT: no index maintenance), and vacuuming after a fixed number
-- of dead rows, not a share of these small tables, keeps them from bloating.
ALTER TABLE device_watermarks SET (fillfactor = 50, autovacuum_vacuum_scale_factor = 0,
                                   autovacuum_vacuum_threshold = 2000);
ALTER TABLE elevator_state SET (fillfactor = 50, autovacuum_vacuum_scale_factor = 0,
                                autovacuum_vacuum_threshold = 2000);
