-- V004: monitoring views for DBAs and dashboards (the PostgreSQL counterparts of
-- plsql/dms_views.sql), the indexes they and the web console need, and COMMENT ON for every
-- table and column, so that \d+ in psql explains the schema.
--
-- Times in the tables are UTC (timestamp without time zone): compare them with
-- timezone('UTC', now()), never with now() or CURRENT_TIMESTAMP, which are in the session's zone.

-- The request list (newest first, keyset-paged) and its filters: by time alone, by finished
-- status, by mapref. Each is walked in (requested_at, request_id) order and stops after a page.
-- The status index holds finished rows only: the replicas' own queries (claims, rescue) look
-- for NEW, CLAIMED and PROCESSING rows and must keep using their own indexes, and a row enters
-- it once, when it ends, not at every step of its life. Unfinished rows are few and recent:
-- their lists walk dms_prcreq_requested_ix.
CREATE INDEX dms_prcreq_requested_ix ON dms_prcreq (requested_at, request_id);
CREATE INDEX dms_prcreq_finished_ix ON dms_prcreq (status, requested_at, request_id)
    WHERE status IN ('DONE', 'FAILED', 'CANCELLED');
CREATE INDEX dms_prcreq_mapref_req_ix ON dms_prcreq (mapref, requested_at, request_id);
-- Failures of the last day, without reading the finished history (partial: only failed rows).
CREATE INDEX dms_prcreq_failed_ix ON dms_prcreq (completed_at) WHERE status = 'FAILED';
CREATE INDEX dms_prclog_failed_ix ON dms_prclog (enddt) WHERE status = 'FL';

-- Unfinished requests by status and type. Only the three unfinished statuses are read, so the
-- query is an index range scan however many finished rows there are.
CREATE VIEW dms_v_queue_depth AS
SELECT r.status,
       r.request_type,
       COUNT(*)            AS requests,
       MIN(r.requested_at) AS oldest_requested_at,
       ROUND(CAST(EXTRACT(EPOCH FROM (timezone('UTC', now()) - MIN(r.requested_at))) AS numeric), 3) AS oldest_age_s
  FROM dms_prcreq r
 WHERE r.status IN ('NEW', 'CLAIMED', 'PROCESSING')
 GROUP BY r.status, r.request_type;

-- Executions in progress (DMS_PRCLOG status IP) with their request and replica.
CREATE VIEW dms_v_running AS
SELECT l.prcid,
       l.mapref,
       l.request_id,
       r.request_type,
       r.status            AS request_status,
       l.worker_id,
       w.host              AS worker_host,
       w.heartbeat_at      AS worker_heartbeat_at,
       l.sessionid,
       l.attempt,
       l.param1,
       l.strtdt,
       ROUND(CAST(EXTRACT(EPOCH FROM (timezone('UTC', now()) - l.strtdt)) AS numeric), 3) AS age_s,
       r.stop_requested_at
  FROM dms_prclog l
  LEFT JOIN dms_prcreq r ON r.request_id = l.request_id
  LEFT JOIN dms_worker w ON w.worker_id = l.worker_id
 WHERE l.status = 'IP';

-- Failures of the last 24 hours: FAILED requests (the reason is in result_payload, JSON) and
-- failed executions (DMS_PRCLOG status FL, the reason in msg). One row per failure; source says which.
CREATE VIEW dms_v_failures_1d AS
SELECT CAST('DMS_PRCREQ' AS VARCHAR(10)) AS source,
       r.request_id,
       r.mapref,
       r.request_type,
       CAST(NULL AS BIGINT)              AS prcid,
       r.attempts                        AS attempt,
       r.completed_at                    AS failed_at,
       r.result_payload                  AS detail
  FROM dms_prcreq r
 WHERE r.status = 'FAILED'
   AND r.completed_at >= timezone('UTC', now()) - INTERVAL '1 day'
UNION ALL
SELECT CAST('DMS_PRCLOG' AS VARCHAR(10)) AS source,
       l.request_id,
       l.mapref,
       CAST(NULL AS VARCHAR(30))         AS request_type,
       l.prcid,
       l.attempt,
       l.enddt                           AS failed_at,
       CAST(l.msg AS TEXT)               AS detail
  FROM dms_prclog l
 WHERE l.status = 'FL'
   AND l.enddt >= timezone('UTC', now()) - INTERVAL '1 day';

-- The next occurrence of every current, enabled schedule, as the leader computed it
-- (nxt_run_dt), with the job's pause flag; a row the leader cannot interpret has no next
-- occurrence and says why in invalid_reason. A dependent schedule (dpnd_jobschid) has none
-- either: it runs after its parent's successful occurrence.
CREATE VIEW dms_v_upcoming AS
SELECT j.jobschid,
       j.mapref,
       j.frqcd,
       j.frqdd,
       j.frqhh,
       j.frqmi,
       j.cronexp,
       j.dpnd_jobschid,
       j.nxt_run_dt        AS next_run_at,
       ROUND(CAST(EXTRACT(EPOCH FROM (j.nxt_run_dt - timezone('UTC', now()))) AS numeric), 3) AS due_in_s,
       j.lst_run_dt        AS last_run_at,
       b.enabled           AS job_enabled,
       b.paused            AS job_paused,
       j.invalid_reason
  FROM dms_jobsch j
  LEFT JOIN dms_job b ON b.mapref = j.mapref
 WHERE j.curflg = 'Y'
   AND j.schflg = 'Y';

COMMENT ON VIEW dms_v_queue_depth IS 'Unfinished requests (NEW, CLAIMED, PROCESSING) by status and type, with the age of the oldest';
COMMENT ON VIEW dms_v_running IS 'Executions in progress (DMS_PRCLOG status IP) with their request and replica';
COMMENT ON VIEW dms_v_failures_1d IS 'FAILED requests and failed executions (FL) of the last 24 hours';
COMMENT ON VIEW dms_v_upcoming IS 'Next occurrence (UTC) of every current, enabled schedule; invalid_reason when the leader skips it';

COMMENT ON TABLE dms_prcreq IS 'The queue: one row per request; clients insert request_id, mapref, request_type, payload';
COMMENT ON COLUMN dms_prcreq.request_id IS 'Primary key chosen by the client (a UUID string); sch<jobschid>-<time>Z for schedule occurrences';
COMMENT ON COLUMN dms_prcreq.mapref IS 'The job to run (DMS_JOB.mapref)';
COMMENT ON COLUMN dms_prcreq.request_type IS 'IMMEDIATE, HISTORY, STOP or REFRESH_SCHEDULE';
COMMENT ON COLUMN dms_prcreq.payload IS 'JSON object: param1..param10, truncate_flag; HISTORY start_date, end_date; STOP request_id';
COMMENT ON COLUMN dms_prcreq.status IS 'NEW, CLAIMED, PROCESSING, DONE, FAILED or CANCELLED';
COMMENT ON COLUMN dms_prcreq.requested_at IS 'When the request was inserted (UTC, database clock)';
COMMENT ON COLUMN dms_prcreq.claimed_at IS 'When a replica claimed it (UTC)';
COMMENT ON COLUMN dms_prcreq.claimed_by IS 'The claiming replica (DMS_WORKER.worker_id) while CLAIMED or PROCESSING';
COMMENT ON COLUMN dms_prcreq.completed_at IS 'When it ended DONE, FAILED or CANCELLED (UTC)';
COMMENT ON COLUMN dms_prcreq.result_payload IS 'JSON: the handler''s result under "result", or the reason of a failure, cancellation or retry';
COMMENT ON COLUMN dms_prcreq.jobschid IS 'The schedule (DMS_JOBSCH) of an occurrence; NULL for requests from clients';
COMMENT ON COLUMN dms_prcreq.scheduled_for IS 'The occurrence''s due time (UTC); unique with jobschid';
COMMENT ON COLUMN dms_prcreq.attempts IS 'Claims so far; compared with DMS_JOB.max_attempts; reset to 0 by an operator''s retry';
COMMENT ON COLUMN dms_prcreq.not_before IS 'Not claimed before this time (UTC): the retry back-off';
COMMENT ON COLUMN dms_prcreq.excl_key IS 'The mapref while a no-overlap job''s execution runs (unique: one at a time)';
COMMENT ON COLUMN dms_prcreq.stop_requested_at IS 'When a STOP asked the owning replica to stop this running request (UTC)';
COMMENT ON COLUMN dms_prcreq.priority IS 'Higher is claimed first (default 0), then not_before, then requested_at';
COMMENT ON COLUMN dms_prcreq.unique_key IS 'At most one NEW, CLAIMED or PROCESSING request per key (partial unique index)';

COMMENT ON TABLE dms_jobsch IS 'Schedules: current version curflg = Y; schflg = Y enabled; the leader enqueues occurrences';
COMMENT ON COLUMN dms_jobsch.jobschid IS 'Primary key, generated when an insert leaves it out';
COMMENT ON COLUMN dms_jobsch.mapref IS 'The job each occurrence runs';
COMMENT ON COLUMN dms_jobsch.frqcd IS 'DL, WK, FN, MN, HY, YR, ID or CRON';
COMMENT ON COLUMN dms_jobsch.frqdd IS 'Weekday MON..SUN (WK, FN) or day of month 1..31 (MN, HY, YR)';
COMMENT ON COLUMN dms_jobsch.frqhh IS 'Hour 0..23 (NULL means 0; ID: NULL for every frqmi minutes)';
COMMENT ON COLUMN dms_jobsch.frqmi IS 'Minute 0..59 (NULL means 0; ID without frqhh: the interval in minutes)';
COMMENT ON COLUMN dms_jobsch.strtdt IS 'First instant an occurrence may fall on (SCHEDULER_TIMEZONE wall time)';
COMMENT ON COLUMN dms_jobsch.enddt IS 'Last instant (a date covers that whole day)';
COMMENT ON COLUMN dms_jobsch.schflg IS 'Y: enabled; N: disabled';
COMMENT ON COLUMN dms_jobsch.curflg IS 'Y: the current version; an edit sets the old row N and inserts a new one';
COMMENT ON COLUMN dms_jobsch.dpnd_jobschid IS 'Run once after each successful occurrence of this schedule, instead of on a clock';
COMMENT ON COLUMN dms_jobsch.lst_run_dt IS 'The last occurrence handled (enqueued or skipped by the misfire policy), UTC';
COMMENT ON COLUMN dms_jobsch.nxt_run_dt IS 'The next occurrence, UTC, kept by the leader';
COMMENT ON COLUMN dms_jobsch.misfire IS 'Occurrences missed while no leader ran: LATEST (run one), ALL (run all, at most 100) or SKIP';
COMMENT ON COLUMN dms_jobsch.cronexp IS 'Cron expression for frqcd CRON (5 fields, or 6 with trailing seconds)';
COMMENT ON COLUMN dms_jobsch.params IS 'JSON object of handler parameters copied into each occurrence''s payload';
COMMENT ON COLUMN dms_jobsch.invalid_reason IS 'Why the leader skips this row; NULL while it is valid';

COMMENT ON TABLE dms_prclog IS 'One row per execution (a HISTORY request has one per day)';
COMMENT ON COLUMN dms_prclog.prcid IS 'Execution id';
COMMENT ON COLUMN dms_prclog.mapref IS 'The job executed';
COMMENT ON COLUMN dms_prclog.strtdt IS 'Start (UTC)';
COMMENT ON COLUMN dms_prclog.enddt IS 'End (UTC); NULL while in progress';
COMMENT ON COLUMN dms_prclog.status IS 'IP in progress, PC completed, FL failed, ST stopped';
COMMENT ON COLUMN dms_prclog.msg IS 'Outcome message: the error on FL, the reason on ST';
COMMENT ON COLUMN dms_prclog.sessionid IS 'Database session of the execution (cancelled on stop)';
COMMENT ON COLUMN dms_prclog.param1 IS 'param1 of the execution (a HISTORY day)';
COMMENT ON COLUMN dms_prclog.param2 IS 'param2 of the execution';
COMMENT ON COLUMN dms_prclog.param3 IS 'param3 of the execution';
COMMENT ON COLUMN dms_prclog.param4 IS 'param4 of the execution';
COMMENT ON COLUMN dms_prclog.param5 IS 'param5 of the execution';
COMMENT ON COLUMN dms_prclog.param6 IS 'param6 of the execution';
COMMENT ON COLUMN dms_prclog.param7 IS 'param7 of the execution';
COMMENT ON COLUMN dms_prclog.param8 IS 'param8 of the execution';
COMMENT ON COLUMN dms_prclog.param9 IS 'param9 of the execution';
COMMENT ON COLUMN dms_prclog.param10 IS 'param10 of the execution';
COMMENT ON COLUMN dms_prclog.request_id IS 'The request executed (DMS_PRCREQ.request_id)';
COMMENT ON COLUMN dms_prclog.worker_id IS 'The replica that ran it';
COMMENT ON COLUMN dms_prclog.attempt IS 'The request''s attempt number';

COMMENT ON TABLE dms_joblog IS 'Row counts an execution reported (one row per execution)';
COMMENT ON COLUMN dms_joblog.joblogid IS 'Primary key';
COMMENT ON COLUMN dms_joblog.prcdt IS 'The as-of date of the execution';
COMMENT ON COLUMN dms_joblog.mapref IS 'The job';
COMMENT ON COLUMN dms_joblog.srcrows IS 'Source rows read';
COMMENT ON COLUMN dms_joblog.trgrows IS 'Target rows written';
COMMENT ON COLUMN dms_joblog.errrows IS 'Rows rejected (see DMS_JOBERR)';
COMMENT ON COLUMN dms_joblog.prcid IS 'The execution (DMS_PRCLOG.prcid)';
COMMENT ON COLUMN dms_joblog.sessionid IS 'Database session of the execution';
COMMENT ON COLUMN dms_joblog.reccrdt IS 'When this row was written (UTC)';

COMMENT ON TABLE dms_joberr IS 'Rejected records (errtyp RECORD) and the error of a failed execution';
COMMENT ON COLUMN dms_joberr.errid IS 'Primary key';
COMMENT ON COLUMN dms_joberr.joblogid IS 'The DMS_JOBLOG row of the execution';
COMMENT ON COLUMN dms_joberr.prcdt IS 'The as-of date of the execution';
COMMENT ON COLUMN dms_joberr.errtyp IS 'RECORD (a rejected record), the error class of a failed execution, or RESCUE';
COMMENT ON COLUMN dms_joberr.errmsg IS 'What went wrong';
COMMENT ON COLUMN dms_joberr.dberrmsg IS 'The database''s message, when a statement failed';
COMMENT ON COLUMN dms_joberr.keyvalue IS 'Key of the rejected record (e.g. a CSV line number and key)';
COMMENT ON COLUMN dms_joberr.prcid IS 'The execution (DMS_PRCLOG.prcid)';
COMMENT ON COLUMN dms_joberr.mapref IS 'The job';

COMMENT ON TABLE dms_job IS 'The job registry, maintained by operators: what a mapref runs and how';
COMMENT ON COLUMN dms_job.mapref IS 'Job name, referenced by requests and schedules';
COMMENT ON COLUMN dms_job.handler IS 'package.module:function (imported, never exec''d) or sql:PROCEDURE';
COMMENT ON COLUMN dms_job.timeout_s IS 'An execution running longer is stopped (FL, timeout); NULL: no limit';
COMMENT ON COLUMN dms_job.max_attempts IS 'Attempts before a failing request ends FAILED';
COMMENT ON COLUMN dms_job.retry_delay_s IS 'Seconds before the first retry, doubled on each further one';
COMMENT ON COLUMN dms_job.allow_overlap IS 'Y: executions of this mapref may run at the same time';
COMMENT ON COLUMN dms_job.enabled IS 'N: requests for the job fail at once';
COMMENT ON COLUMN dms_job.description IS 'Free text for people';
COMMENT ON COLUMN dms_job.params IS 'JSON object of handler parameters (defaults, overridable per schedule and request)';
COMMENT ON COLUMN dms_job.paused IS 'Y: the job''s requests wait NEW, unclaimed, until it is resumed (N)';

COMMENT ON TABLE dms_job_state IS 'Small state a job keeps across runs (e.g. an incremental export''s watermark)';
COMMENT ON COLUMN dms_job_state.mapref IS 'The job';
COMMENT ON COLUMN dms_job_state.state_key IS 'Name of the value';
COMMENT ON COLUMN dms_job_state.state_value IS 'The value';
COMMENT ON COLUMN dms_job_state.updated_at IS 'Last change (UTC)';

COMMENT ON TABLE dms_worker IS 'One row per live replica, heartbeating from the database clock';
COMMENT ON COLUMN dms_worker.worker_id IS 'Replica id: name or host:pid, plus a suffix';
COMMENT ON COLUMN dms_worker.host IS 'Host name';
COMMENT ON COLUMN dms_worker.pid IS 'Process id on that host';
COMMENT ON COLUMN dms_worker.started_at IS 'Start (UTC)';
COMMENT ON COLUMN dms_worker.heartbeat_at IS 'Last heartbeat (UTC)';
COMMENT ON COLUMN dms_worker.version IS 'dms-worker version';
COMMENT ON COLUMN dms_worker.is_leader IS 'Y while this replica leads (enqueues schedule occurrences)';
COMMENT ON COLUMN dms_worker.slots IS 'Concurrent executions it may run (SCHEDULER_MAX_WORKERS)';
COMMENT ON COLUMN dms_worker.running IS 'Executions running at its last heartbeat';
COMMENT ON COLUMN dms_worker.metrics_port IS 'Port of its /metrics endpoint';
COMMENT ON COLUMN dms_worker.expires_at IS 'Dead after this instant (UTC) unless it heartbeats again; rescuers go by it';

COMMENT ON TABLE dms_leader IS 'The scheduler leader''s lease';
COMMENT ON COLUMN dms_leader.name IS 'Lease name (scheduler)';
COMMENT ON COLUMN dms_leader.holder IS 'The leading replica; NULL when resigned';
COMMENT ON COLUMN dms_leader.epoch IS 'Raised on every change of leader; fences a deposed leader''s writes';
COMMENT ON COLUMN dms_leader.acquired_at IS 'When the holder took the lease (UTC)';
COMMENT ON COLUMN dms_leader.expires_at IS 'The lease ends then unless renewed (UTC)';
COMMENT ON COLUMN dms_leader.mode IS 'lock (session lock plus this row) or lease (this row only)';
