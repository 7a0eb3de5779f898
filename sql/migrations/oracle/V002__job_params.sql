-- Handler parameters: defaults on the job, overrides per schedule (copied into each occurrence's
-- payload) and per request (its payload). JSON objects.
ALTER TABLE dms_job ADD (params CLOB);
ALTER TABLE dms_jobsch ADD (params CLOB);

-- State a job keeps across runs, e.g. the watermark of an incremental export.
CREATE TABLE dms_job_state (
    mapref      VARCHAR2(100)  NOT NULL,
    state_key   VARCHAR2(100)  NOT NULL,
    state_value VARCHAR2(4000),
    updated_at  TIMESTAMP      DEFAULT SYS_EXTRACT_UTC(SYSTIMESTAMP),
    PRIMARY KEY (mapref, state_key)
);
