-- `hingnetd status` sums the bytes of every done row (the archive's size). With this index the
-- sum reads the index alone instead of visiting every row: on 1,000,000 rows that was most of
-- status's 477 ms.
CREATE INDEX queue_state_bytes ON queue (state, bytes);
