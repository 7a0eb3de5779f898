-- Handler parameters: defaults on the job, overrides per schedule (copied into each occurrence's
-- payload) and per request (its payload). JSON objects.
ALTER TABLE dms_job ADD COLUMN params TEXT;
ALTER TABLE dms_jobsch ADD COLUMN params TEXT;

-- State a job keeps across runs, e.g. the watermark of an incremental export.
CREATE TABLE dms_job_state (
    mapref      VARCHAR(100)  NOT NULL,
    state_key   VARCHAR(100)  NOT NULL,
    state_value VARCHAR(4000),
    updated_at  TIMESTAMP     DEFAULT (strftime('%Y-%m-%d %H:%M:%f','now') || '000'),
    PRIMARY KEY (mapref, state_key)
);
