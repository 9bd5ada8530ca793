-- The pauses in force in the running daemon (every new download waits: a refused token, a 429,
-- an unreachable API, a short disk), so that `hingnetd status` can show them and why. The daemon
-- replaces the whole set when it changes and empties it at start and at a clean stop; a set
-- left by a daemon that died is ignored while no daemon holds the instance lock.
CREATE TABLE daemon_pauses (
    reason TEXT PRIMARY KEY,
    detail TEXT NOT NULL,
    since TEXT NOT NULL,
    until TEXT,
    advice TEXT
);
