-- V003: timing the cluster agrees on, why a schedule is skipped, and the queue controls
-- (pause per job, priority, unique requests).

-- Each replica writes, with every heartbeat, the instant after which it has stopped its own
-- executions (its heartbeat plus its own DMS_RESCUE_AFTER). Rescuers judge it by this, not by
-- their own setting, so replicas with different settings never rescue a live one.
ALTER TABLE dms_worker ADD COLUMN expires_at TIMESTAMP;
-- How the leader leads: 'lock' (session lock plus this row) or 'lease' (this row only).
ALTER TABLE dms_leader ADD COLUMN mode VARCHAR(10);

-- Why the leader skips a schedule row (NULL while the row is valid); written by the leader.
ALTER TABLE dms_jobsch ADD COLUMN invalid_reason VARCHAR(1000);
-- SQLite cannot add a CHECK constraint to an existing table: triggers refuse the same values.
CREATE TRIGGER dms_jobsch_check_insert BEFORE INSERT ON dms_jobsch
WHEN NEW.schflg NOT IN ('Y', 'N') OR NEW.curflg NOT IN ('Y', 'N')
  OR UPPER(TRIM(NEW.misfire)) NOT IN ('LATEST', 'ALL', 'SKIP')
  OR UPPER(TRIM(NEW.frqcd)) NOT IN ('DL', 'WK', 'FN', 'MN', 'HY', 'YR', 'ID', 'CRON')
BEGIN
    SELECT RAISE(ABORT, 'dms_jobsch: schflg and curflg must be Y or N, misfire LATEST, ALL or SKIP, frqcd DL, WK, FN, MN, HY, YR, ID or CRON');
END;
CREATE TRIGGER dms_jobsch_check_update BEFORE UPDATE OF schflg, curflg, misfire, frqcd ON dms_jobsch
WHEN NEW.schflg NOT IN ('Y', 'N') OR NEW.curflg NOT IN ('Y', 'N')
  OR UPPER(TRIM(NEW.misfire)) NOT IN ('LATEST', 'ALL', 'SKIP')
  OR UPPER(TRIM(NEW.frqcd)) NOT IN ('DL', 'WK', 'FN', 'MN', 'HY', 'YR', 'ID', 'CRON')
BEGIN
    SELECT RAISE(ABORT, 'dms_jobsch: schflg and curflg must be Y or N, misfire LATEST, ALL or SKIP, frqcd DL, WK, FN, MN, HY, YR, ID or CRON');
END;

-- Pause: a paused job's requests wait NEW (nothing fails) until it is resumed.
ALTER TABLE dms_job ADD COLUMN paused VARCHAR(1) NOT NULL DEFAULT 'N' CONSTRAINT dms_job_paused_ck CHECK (paused IN ('Y', 'N'));

-- Priority: higher first, then due order. Unique key: at most one waiting or running request
-- per key (a second insert with the same key is refused by the database).
ALTER TABLE dms_prcreq ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
ALTER TABLE dms_prcreq ADD COLUMN unique_key VARCHAR(200);
CREATE UNIQUE INDEX dms_prcreq_unique_uq ON dms_prcreq (unique_key)
    WHERE status IN ('NEW', 'CLAIMED', 'PROCESSING');
DROP INDEX dms_prcreq_claim_ix;
CREATE INDEX dms_prcreq_claim_ix ON dms_prcreq (priority DESC, not_before, requested_at) WHERE status = 'NEW';
