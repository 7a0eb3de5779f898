-- V004: monitoring views for DBAs and dashboards (the SQLite counterparts of
-- plsql/dms_views.sql) and the indexes they and the web console need. SQLite has no
-- COMMENT ON: the comments inside each CREATE statement stay in sqlite_master.sql.
--
-- Times in the tables are UTC text 'YYYY-MM-DD HH:MM:SS.ffffff': compare them with
-- strftime('%Y-%m-%d %H:%M:%f', 'now') || '000', never with localtime.

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

CREATE VIEW dms_v_queue_depth AS
-- Unfinished requests (NEW, CLAIMED, PROCESSING) by status and type, with the age of the
-- oldest in seconds. Only unfinished rows are read (an index range scan).
SELECT r.status,
       r.request_type,
       COUNT(*)            AS requests,
       MIN(r.requested_at) AS oldest_requested_at,
       ROUND((julianday('now') - julianday(MIN(r.requested_at))) * 86400.0, 3) AS oldest_age_s
  FROM dms_prcreq r
 WHERE r.status IN ('NEW', 'CLAIMED', 'PROCESSING')
 GROUP BY r.status, r.request_type;

CREATE VIEW dms_v_running AS
-- Executions in progress (DMS_PRCLOG status IP) with their request and replica.
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
       ROUND((julianday('now') - julianday(l.strtdt)) * 86400.0, 3) AS age_s,
       r.stop_requested_at
  FROM dms_prclog l
  LEFT JOIN dms_prcreq r ON r.request_id = l.request_id
  LEFT JOIN dms_worker w ON w.worker_id = l.worker_id
 WHERE l.status = 'IP';

CREATE VIEW dms_v_failures_1d AS
-- Failures of the last 24 hours: FAILED requests (the reason is in result_payload, JSON) and
-- failed executions (DMS_PRCLOG status FL, the reason in msg). One row per failure; source says which.
SELECT 'DMS_PRCREQ'         AS source,
       r.request_id,
       r.mapref,
       r.request_type,
       NULL                 AS prcid,
       r.attempts           AS attempt,
       r.completed_at       AS failed_at,
       r.result_payload     AS detail
  FROM dms_prcreq r
 WHERE r.status = 'FAILED'
   AND r.completed_at >= strftime('%Y-%m-%d %H:%M:%f', 'now', '-1 day') || '000'
UNION ALL
SELECT 'DMS_PRCLOG'         AS source,
       l.request_id,
       l.mapref,
       NULL                 AS request_type,
       l.prcid,
       l.attempt,
       l.enddt              AS failed_at,
       l.msg                AS detail
  FROM dms_prclog l
 WHERE l.status = 'FL'
   AND l.enddt >= strftime('%Y-%m-%d %H:%M:%f', 'now', '-1 day') || '000';

CREATE VIEW dms_v_upcoming AS
-- The next occurrence (UTC) of every current, enabled schedule, as the leader computed it
-- (nxt_run_dt), with the job's pause flag; a row the leader cannot interpret has no next
-- occurrence and says why in invalid_reason. A dependent schedule (dpnd_jobschid) has none
-- either: it runs after its parent's successful occurrence.
SELECT j.jobschid,
       j.mapref,
       j.frqcd,
       j.frqdd,
       j.frqhh,
       j.frqmi,
       j.cronexp,
       j.dpnd_jobschid,
       j.nxt_run_dt        AS next_run_at,
       ROUND((julianday(j.nxt_run_dt) - julianday('now')) * 86400.0, 3) AS due_in_s,
       j.lst_run_dt        AS last_run_at,
       b.enabled           AS job_enabled,
       b.paused            AS job_paused,
       j.invalid_reason
  FROM dms_jobsch j
  LEFT JOIN dms_job b ON b.mapref = j.mapref
 WHERE j.curflg = 'Y'
   AND j.schflg = 'Y';
