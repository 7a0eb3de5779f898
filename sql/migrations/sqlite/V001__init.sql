-- dms-worker schema, SQLite (the embedded default). Timestamps are UTC text 'YYYY-MM-DD HH:MM:SS.ffffff',
-- the format SQLAlchemy reads and writes, so that text comparison is time order.
-- Apply with `dms-worker migrate` or with the sqlite3 shell (.read).

CREATE TABLE dms_prcreq (
    request_id        VARCHAR(64) NOT NULL PRIMARY KEY,
    mapref            VARCHAR(100) NOT NULL,
    request_type      VARCHAR(30)  NOT NULL,
    payload           TEXT,
    status            VARCHAR(20)  NOT NULL DEFAULT 'NEW',
    requested_at      TIMESTAMP    DEFAULT (strftime('%Y-%m-%d %H:%M:%f','now') || '000'),
    claimed_at        TIMESTAMP,
    claimed_by        VARCHAR(64),
    completed_at      TIMESTAMP,
    result_payload    TEXT,
    jobschid          BIGINT,
    scheduled_for     TIMESTAMP,
    attempts          INTEGER      NOT NULL DEFAULT 0,
    not_before        TIMESTAMP    NOT NULL DEFAULT (strftime('%Y-%m-%d %H:%M:%f','now') || '000'),
    excl_key          VARCHAR(100),
    stop_requested_at TIMESTAMP,
    CONSTRAINT dms_prcreq_status_ck CHECK (status IN ('NEW','CLAIMED','PROCESSING','DONE','FAILED','CANCELLED'))
);
-- Each schedule occurrence is enqueued at most once, ever (invariant 2).
CREATE UNIQUE INDEX dms_prcreq_occurrence_uq ON dms_prcreq (jobschid, scheduled_for);
-- At most one running execution per mapref unless the job allows overlap (invariant 3).
CREATE UNIQUE INDEX dms_prcreq_excl_uq ON dms_prcreq (excl_key);
-- The claim: NEW rows in due order, index-driven however long the queue is.
CREATE INDEX dms_prcreq_claim_ix ON dms_prcreq (not_before, requested_at) WHERE status = 'NEW';
CREATE INDEX dms_prcreq_control_ix ON dms_prcreq (request_type, requested_at)
    WHERE status = 'NEW' AND request_type IN ('STOP', 'REFRESH_SCHEDULE');
-- Rescue and stop checks look at running rows only.
CREATE INDEX dms_prcreq_running_ix ON dms_prcreq (claimed_by) WHERE status IN ('CLAIMED', 'PROCESSING');
CREATE INDEX dms_prcreq_mapref_ix ON dms_prcreq (mapref, status);

CREATE TABLE dms_jobsch (
    jobschid      INTEGER PRIMARY KEY AUTOINCREMENT,
    mapref        VARCHAR(100) NOT NULL,
    frqcd         VARCHAR(10),
    frqdd         VARCHAR(10),
    frqhh         INTEGER,
    frqmi         INTEGER,
    strtdt        TIMESTAMP,
    enddt         TIMESTAMP,
    schflg        VARCHAR(1)   NOT NULL DEFAULT 'Y',
    curflg        VARCHAR(1)   NOT NULL DEFAULT 'Y',
    dpnd_jobschid BIGINT,
    lst_run_dt    TIMESTAMP,
    nxt_run_dt    TIMESTAMP,
    misfire       VARCHAR(10)  NOT NULL DEFAULT 'LATEST',
    cronexp       VARCHAR(120)
);
CREATE INDEX dms_jobsch_mapref_ix ON dms_jobsch (mapref, curflg);

CREATE TABLE dms_prclog (
    prcid      INTEGER PRIMARY KEY AUTOINCREMENT,
    mapref     VARCHAR(100) NOT NULL,
    strtdt     TIMESTAMP    NOT NULL,
    enddt      TIMESTAMP,
    status     VARCHAR(2)   NOT NULL,
    msg        VARCHAR(4000),
    sessionid  VARCHAR(64),
    param1     VARCHAR(250),
    param2     VARCHAR(250),
    param3     VARCHAR(250),
    param4     VARCHAR(250),
    param5     VARCHAR(250),
    param6     VARCHAR(250),
    param7     VARCHAR(250),
    param8     VARCHAR(250),
    param9     VARCHAR(250),
    param10    VARCHAR(250),
    request_id VARCHAR(64),
    worker_id  VARCHAR(64),
    attempt    INTEGER,
    CONSTRAINT dms_prclog_status_ck CHECK (status IN ('IP','PC','FL','ST'))
);
CREATE INDEX dms_prclog_request_ix ON dms_prclog (request_id);
CREATE INDEX dms_prclog_ip_ix ON dms_prclog (worker_id) WHERE status = 'IP';
CREATE INDEX dms_prclog_mapref_ix ON dms_prclog (mapref, strtdt);

CREATE TABLE dms_joblog (
    joblogid  INTEGER PRIMARY KEY AUTOINCREMENT,
    prcdt     TIMESTAMP,
    mapref    VARCHAR(100) NOT NULL,
    srcrows   BIGINT,
    trgrows   BIGINT,
    errrows   BIGINT,
    prcid     BIGINT,
    sessionid VARCHAR(64),
    reccrdt   TIMESTAMP DEFAULT (strftime('%Y-%m-%d %H:%M:%f','now') || '000')
);
CREATE INDEX dms_joblog_prcid_ix ON dms_joblog (prcid);

CREATE TABLE dms_joberr (
    errid    INTEGER PRIMARY KEY AUTOINCREMENT,
    joblogid BIGINT,
    prcdt    TIMESTAMP,
    errtyp   VARCHAR(30) NOT NULL,
    errmsg   VARCHAR(4000),
    dberrmsg VARCHAR(4000),
    keyvalue VARCHAR(1000),
    prcid    BIGINT,
    mapref   VARCHAR(100)
);
CREATE INDEX dms_joberr_prcid_ix ON dms_joberr (prcid);

CREATE TABLE dms_job (
    mapref        VARCHAR(100) NOT NULL PRIMARY KEY,
    handler       VARCHAR(200) NOT NULL,
    timeout_s     INTEGER,
    max_attempts  INTEGER      NOT NULL DEFAULT 1,
    retry_delay_s INTEGER      NOT NULL DEFAULT 60,
    allow_overlap VARCHAR(1)   NOT NULL DEFAULT 'N',
    enabled       VARCHAR(1)   NOT NULL DEFAULT 'Y',
    description   VARCHAR(4000),
    CONSTRAINT dms_job_overlap_ck CHECK (allow_overlap IN ('Y','N')),
    CONSTRAINT dms_job_enabled_ck CHECK (enabled IN ('Y','N'))
);

CREATE TABLE dms_worker (
    worker_id    VARCHAR(64) NOT NULL PRIMARY KEY,
    host         VARCHAR(255) NOT NULL,
    pid          INTEGER      NOT NULL,
    started_at   TIMESTAMP    NOT NULL,
    heartbeat_at TIMESTAMP    NOT NULL,
    version      VARCHAR(30),
    is_leader    VARCHAR(1)   NOT NULL DEFAULT 'N',
    slots        INTEGER,
    running      INTEGER,
    metrics_port INTEGER
);

CREATE TABLE dms_leader (
    name        VARCHAR(30) NOT NULL PRIMARY KEY,
    holder      VARCHAR(64),
    epoch       BIGINT      NOT NULL DEFAULT 0,
    acquired_at TIMESTAMP,
    expires_at  TIMESTAMP
);
