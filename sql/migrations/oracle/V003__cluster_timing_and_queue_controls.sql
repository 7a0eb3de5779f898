-- V003: timing the cluster agrees on, why a schedule is skipped, and the queue controls
-- (pause per job, priority, unique requests).

-- Each replica writes, with every heartbeat, the instant after which it has stopped its own
-- executions (its heartbeat plus its own DMS_RESCUE_AFTER). Rescuers judge it by this, not by
-- their own setting, so replicas with different settings never rescue a live one.
ALTER TABLE dms_worker ADD (expires_at TIMESTAMP);
-- How the leader leads: 'lock' (DBMS_LOCK plus this row) or 'lease' (this row only).
ALTER TABLE dms_leader ADD (mode VARCHAR2(10));

-- Why the leader skips a schedule row (NULL while the row is valid); written by the leader.
ALTER TABLE dms_jobsch ADD (invalid_reason VARCHAR2(1000));
-- Values the worker would otherwise read as "disabled" or "invalid" without saying so.
-- NOVALIDATE: existing rows are not checked (the leader reports them), new ones are.
ALTER TABLE dms_jobsch ADD CONSTRAINT dms_jobsch_schflg_ck CHECK (schflg IN ('Y', 'N')) ENABLE NOVALIDATE;
ALTER TABLE dms_jobsch ADD CONSTRAINT dms_jobsch_curflg_ck CHECK (curflg IN ('Y', 'N')) ENABLE NOVALIDATE;
ALTER TABLE dms_jobsch ADD CONSTRAINT dms_jobsch_misfire_ck
    CHECK (UPPER(TRIM(misfire)) IN ('LATEST', 'ALL', 'SKIP')) ENABLE NOVALIDATE;
ALTER TABLE dms_jobsch ADD CONSTRAINT dms_jobsch_frqcd_ck
    CHECK (UPPER(TRIM(frqcd)) IN ('DL', 'WK', 'FN', 'MN', 'HY', 'YR', 'ID', 'CRON')) ENABLE NOVALIDATE;

-- Pause: a paused job's requests wait NEW (nothing fails) until it is resumed.
ALTER TABLE dms_job ADD (paused VARCHAR2(1) DEFAULT 'N' NOT NULL);
ALTER TABLE dms_job ADD CONSTRAINT dms_job_paused_ck CHECK (paused IN ('Y', 'N'));

-- Priority: higher first, then due order. Unique key: at most one waiting or running request
-- per key (a second insert with the same key is refused by the database); the index holds
-- only waiting and running rows (an all-NULL key is not indexed).
ALTER TABLE dms_prcreq ADD (priority NUMBER(10) DEFAULT 0 NOT NULL);
ALTER TABLE dms_prcreq ADD (unique_key VARCHAR2(200));
CREATE UNIQUE INDEX dms_prcreq_unique_uq ON dms_prcreq
    (CASE WHEN status IN ('NEW', 'CLAIMED', 'PROCESSING') THEN unique_key END);
DROP INDEX dms_prcreq_claim_ix;
CREATE INDEX dms_prcreq_claim_ix ON dms_prcreq (status, priority DESC, not_before, requested_at);
