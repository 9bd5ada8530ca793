-- The history behind `hingnetd show`: one row per decided attempt (the newest 20 per video are
-- kept). Written in the same transaction as the queue row's update, so the two never disagree.
CREATE TABLE attempt_log (
    id              INTEGER PRIMARY KEY,
    video_id        TEXT NOT NULL,
    at              TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    attempt         INTEGER NOT NULL,
    -- done | retry | failed | released
    outcome         TEXT NOT NULL,
    http_status     INTEGER,
    bytes           INTEGER,
    elapsed_ms      INTEGER,
    -- What happened and, for a retry, why the next attempt is when it is.
    detail          TEXT
);
CREATE INDEX attempt_log_video ON attempt_log (video_id, id);
