-- The queue on PostgreSQL: the same columns and state words as the SQLite queue (timestamps as
-- timestamptz, every one of them set from the server's clock, never a host's), plus what a fleet
-- of daemons needs. A public interface: producers, from any host, only ever run
--     INSERT INTO queue(video_id) VALUES ($1) ON CONFLICT DO NOTHING
-- so every other column has a default. Never edit this file once shipped: add a new numbered
-- migration instead.
CREATE TABLE queue (
    video_id         text NOT NULL PRIMARY KEY,
    state            text NOT NULL DEFAULT 'pending'
                     CHECK (state IN ('pending', 'downloading', 'done', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    last_error       text,
    http_status      integer,
    path             text,
    sha256           text,
    bytes            bigint,
    enqueued_at      timestamptz NOT NULL DEFAULT now(),
    first_attempt_at timestamptz,
    finished_at      timestamptz,
    -- The current claim's token: only its holder records an outcome (the fence).
    claimed_by       text,
    -- When the file expires (a producer may insert it too).
    expires_at       timestamptz,
    -- The status object (JSON text, URL query strings removed), kept once archived.
    metadata         text,
    -- Insertion order, for `list` (newest first) and for `verify` to page through.
    seq              bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    -- A claim lives until then unless its holder's heartbeat renews it; past it, any daemon
    -- takes the row back.
    lease_expires_at timestamptz,
    -- The instance (`queue.instance`) holding the claim, for `hingnetd status`.
    claimed_on       text,
    -- The instance whose local archive holds the file.
    archived_on      text,
    -- 'infinity' sorts and compares, but is no time to download at or expire by: refused at the
    -- insert, with an error naming the constraint, rather than stalling every claim later.
    CONSTRAINT queue_times_finite CHECK (
        isfinite(next_attempt_at) AND isfinite(enqueued_at)
        AND (expires_at IS NULL OR isfinite(expires_at))
        AND (first_attempt_at IS NULL OR isfinite(first_attempt_at))
        AND (finished_at IS NULL OR isfinite(finished_at)))
);

-- Claims take due rows earliest expiry first, rows without an expiry after them; the planner
-- picks this index or the next (due rows, then sorted) by how many rows are due.
CREATE INDEX queue_pending_expiry ON queue
    (coalesce(expires_at, 'infinity'::timestamptz), next_attempt_at) WHERE state = 'pending';
CREATE INDEX queue_pending_due ON queue (next_attempt_at) WHERE state = 'pending';
-- Taking back claims whose lease passed, without walking the other rows.
CREATE INDEX queue_lease ON queue (lease_expires_at) WHERE state = 'downloading';
-- Counts per state and the archived bytes for `hingnetd status`, from the index alone.
CREATE INDEX queue_state_bytes ON queue (state, bytes);
CREATE INDEX queue_failed_finished ON queue (finished_at) WHERE state = 'failed';

-- Rows are never deleted (a done row is the archive's record) and every claim and finish
-- updates an indexed column: vacuum this table sooner than the default 20% of dead rows.
ALTER TABLE queue SET (autovacuum_vacuum_scale_factor = 0.02, autovacuum_analyze_scale_factor = 0.02);

-- The history behind `hingnetd show`: one row per decided attempt (the newest 20 per video are
-- kept), written in the same statement as the queue row's update.
CREATE TABLE attempt_log (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    video_id    text NOT NULL,
    at          timestamptz NOT NULL DEFAULT now(),
    attempt     integer NOT NULL,
    -- done | retry | failed | released
    outcome     text NOT NULL,
    http_status integer,
    bytes       bigint,
    elapsed_ms  bigint,
    detail      text,
    -- The instance that made the attempt.
    instance    text
);
CREATE INDEX attempt_log_video ON attempt_log (video_id, id);

-- The pauses in force in each running daemon, for `hingnetd status` on its host. Ignored while
-- that instance's daemon is not running (its advisory lock is not held).
CREATE TABLE daemon_pauses (
    instance text NOT NULL,
    reason   text NOT NULL,
    detail   text NOT NULL,
    since    timestamptz NOT NULL,
    until    timestamptz,
    advice   text,
    PRIMARY KEY (instance, reason)
);

-- A wake-up hint for the daemons' LISTEN, never a promise (they poll as well). Row-level, so a
-- duplicate INSERT ... ON CONFLICT DO NOTHING notifies nobody; one transaction's notifications
-- are folded into one.
CREATE FUNCTION hingnetd_queue_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('hingnetd_queue', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER queue_insert_notify AFTER INSERT ON queue
    FOR EACH ROW EXECUTE FUNCTION hingnetd_queue_notify();
