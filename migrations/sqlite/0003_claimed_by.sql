-- Who holds a `downloading` row: the daemon or a `hingnetd fetch`, as a token made at each claim.
-- An outcome is recorded only by the holder of the current token, so a stalled or killed
-- downloader whose row was recovered and claimed again can never overwrite the new outcome.
ALTER TABLE queue ADD COLUMN claimed_by TEXT;
