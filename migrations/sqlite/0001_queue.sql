-- The queue table: a public interface. Producers only ever run
--     INSERT OR IGNORE INTO queue(video_id) VALUES (?)
-- so every other column has a default, and every default must work on SQLite 3.37+
-- (no unixepoch(), no STRICT). Timestamps are UTC text, 'YYYY-MM-DDTHH:MM:SS.SSSZ', which
-- sorts chronologically and reads well in the sqlite3 shell. Never edit this file once shipped:
-- add a new numbered migration instead.
CREATE TABLE queue (
    video_id         TEXT NOT NULL PRIMARY KEY,
    state            TEXT NOT NULL DEFAULT 'pending'
                     CHECK (state IN ('pending', 'downloading', 'done', 'failed')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    last_error       TEXT,
    http_status      INTEGER,
    path             TEXT,
    sha256           TEXT,
    bytes            INTEGER,
    enqueued_at      TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    first_attempt_at TEXT,
    finished_at      TEXT
);

-- The scheduler's hot queries (claim the earliest due pending rows; when is the next one due)
-- and the counts per state for `hingnetd status` all run on this one index, without a sort.
CREATE INDEX queue_state_due ON queue (state, next_attempt_at);
