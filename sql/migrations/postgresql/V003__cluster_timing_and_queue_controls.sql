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
-- Values the worker would otherwise read as "disabled" or "invalid" without saying so.
-- NOT VALID: existing rows are not checked (the leader reports them), new ones are.
ALTER TABLE dms_jobsch ADD CONSTRAINT dms_jobsch_schflg_ck CHECK (schflg IN ('Y', 'N')) NOT VALID;
ALTER TABLE dms_jobsch ADD CONSTRAINT dms_jobsch_curflg_ck CHECK (curflg IN ('Y', 'N')) NOT VALID;
ALTER TABLE dms_jobsch ADD CONSTRAINT dms_jobsch_misfire_ck
    CHECK (UPPER(TRIM(misfire)) IN ('LATEST', 'ALL', 'SKIP')) NOT VALID;
ALTER TABLE dms_jobsch ADD CONSTRAINT dms_jobsch_frqcd_ck
    CHECK (UPPER(TRIM(frqcd)) IN ('DL', 'WK', 'FN', 'MN', 'HY', 'YR', 'ID', 'CRON')) NOT VALID;

-- Pause: a paused job's requests wait NEW (nothing fails) until it is resumed.
ALTER TABLE dms_job ADD COLUMN paused VARCHAR(1) NOT NULL DEFAULT 'N';
ALTER TABLE dms_job ADD CONSTRAINT dms_job_paused_ck CHECK (paused IN ('Y', 'N'));

-- Priority: higher first, then due order. Unique key: at most one waiting or running request
-- per key (a second insert with the same key is refused by the database).
ALTER TABLE dms_prcreq ADD COLUMN priority INTEGER NOT NULL DEFAULT 0;
ALTER TABLE dms_prcreq ADD COLUMN unique_key VARCHAR(200);
CREATE UNIQUE INDEX dms_prcreq_unique_uq ON dms_prcreq (unique_key)
    WHERE status IN ('NEW', 'CLAIMED', 'PROCESSING');
DROP INDEX dms_prcreq_claim_ix;
CREATE INDEX dms_prcreq_claim_ix ON dms_prcreq (priority DESC, not_before, requested_at) WHERE status = 'NEW';

-- Wake idle replicas when a held-back request becomes runnable: a no-overlap job's execution
-- ended (its running slot was released), or a paused job was resumed.
CREATE TRIGGER dms_prcreq_release_notify AFTER UPDATE OF excl_key ON dms_prcreq
    FOR EACH ROW WHEN (OLD.excl_key IS NOT NULL AND NEW.excl_key IS NULL)
    EXECUTE FUNCTION dms_prcreq_notify();
CREATE TRIGGER dms_job_resume_notify AFTER UPDATE OF paused ON dms_job
    FOR EACH ROW WHEN (OLD.paused = 'Y' AND NEW.paused = 'N')
    EXECUTE FUNCTION dms_prcreq_notify();

-- A request handed back for a retry later (not_before in the future) says when, so that idle
-- replicas wake up then instead of at their next poll.
CREATE FUNCTION dms_prcreq_due_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('dms_prcreq', CASE WHEN NEW.not_before > timezone('UTC', statement_timestamp())
                                         THEN extract(epoch FROM NEW.not_before)::text ELSE '' END);
    RETURN NULL;
END
$$;
DROP TRIGGER dms_prcreq_requeue_notify ON dms_prcreq;
CREATE TRIGGER dms_prcreq_requeue_notify AFTER UPDATE OF status ON dms_prcreq
    FOR EACH ROW WHEN (NEW.status = 'NEW' AND OLD.status <> 'NEW') EXECUTE FUNCTION dms_prcreq_due_notify();
