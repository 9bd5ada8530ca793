-- What the API says about a video. `expires_at`: when its file expires (the status object's
-- `expires_at`); a producer may insert it too, in the format of every other timestamp
-- ('YYYY-MM-DDTHH:MM:SS.SSSZ', UTC). `metadata`: the status object (JSON text, URL query strings
-- removed), kept once the video is archived.
ALTER TABLE queue ADD COLUMN expires_at TEXT;
ALTER TABLE queue ADD COLUMN metadata TEXT;
-- Claims take due rows earliest expiry first, rows without an expiry after them (by when they
-- fell due), reading this index in order instead of sorting; only pending rows are in it.
CREATE INDEX queue_pending_expiry ON queue
    (coalesce(expires_at, '9999-12-31T23:59:59.999Z'), next_attempt_at) WHERE state = 'pending';
