-- Monitoring views of dms-worker for DBAs and dashboards. Run as the schema owner after the
-- migrations (SQL*Plus/SQLcl; each statement ends with ';'). Grants: plsql/grants_app.sql.
-- Timestamps in the tables are TIMESTAMP in UTC: ages are measured from SYS_EXTRACT_UTC(SYSTIMESTAMP).
WHENEVER SQLERROR EXIT FAILURE

-- Unfinished requests by status and type. Only the three unfinished statuses are read, so the
-- query is an index range scan on DMS_PRCREQ(status, ...) however many finished rows there are.
CREATE OR REPLACE VIEW dms_v_queue_depth AS
SELECT r.status,
       r.request_type,
       COUNT(*)            AS requests,
       MIN(r.requested_at) AS oldest_requested_at,
       ROUND(EXTRACT(DAY FROM (SYS_EXTRACT_UTC(SYSTIMESTAMP) - MIN(r.requested_at))) * 86400
           + EXTRACT(HOUR FROM (SYS_EXTRACT_UTC(SYSTIMESTAMP) - MIN(r.requested_at))) * 3600
           + EXTRACT(MINUTE FROM (SYS_EXTRACT_UTC(SYSTIMESTAMP) - MIN(r.requested_at))) * 60
           + EXTRACT(SECOND FROM (SYS_EXTRACT_UTC(SYSTIMESTAMP) - MIN(r.requested_at))), 3) AS oldest_age_s
  FROM dms_prcreq r
 WHERE r.status IN ('NEW', 'CLAIMED', 'PROCESSING')
 GROUP BY r.status, r.request_type;

-- Executions in progress (DMS_PRCLOG status IP) with their request and replica.
CREATE OR REPLACE VIEW dms_v_running AS
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
       ROUND(EXTRACT(DAY FROM (SYS_EXTRACT_UTC(SYSTIMESTAMP) - l.strtdt)) * 86400
           + EXTRACT(HOUR FROM (SYS_EXTRACT_UTC(SYSTIMESTAMP) - l.strtdt)) * 3600
           + EXTRACT(MINUTE FROM (SYS_EXTRACT_UTC(SYSTIMESTAMP) - l.strtdt)) * 60
           + EXTRACT(SECOND FROM (SYS_EXTRACT_UTC(SYSTIMESTAMP) - l.strtdt)), 3) AS age_s,
       r.stop_requested_at
  FROM dms_prclog l
  LEFT JOIN dms_prcreq r ON r.request_id = l.request_id
  LEFT JOIN dms_worker w ON w.worker_id = l.worker_id
 WHERE l.status = 'IP';

-- Failures of the last 24 hours: FAILED requests (the reason is in result_payload, JSON) and
-- failed executions (DMS_PRCLOG status FL, the reason in msg). One row per failure; source says which.
CREATE OR REPLACE VIEW dms_v_failures_1d AS
SELECT CAST('DMS_PRCREQ' AS VARCHAR2(10))  AS source,
       r.request_id,
       r.mapref,
       r.request_type,
       CAST(NULL AS NUMBER(19))            AS prcid,
       r.attempts                          AS attempt,
       r.completed_at                      AS failed_at,
       r.result_payload                    AS detail
  FROM dms_prcreq r
 WHERE r.status = 'FAILED'
   AND r.completed_at >= SYS_EXTRACT_UTC(SYSTIMESTAMP) - INTERVAL '1' DAY
UNION ALL
SELECT CAST('DMS_PRCLOG' AS VARCHAR2(10))  AS source,
       l.request_id,
       l.mapref,
       CAST(NULL AS VARCHAR2(30))          AS request_type,
       l.prcid,
       l.attempt,
       l.enddt                             AS failed_at,
       TO_CLOB(l.msg)                      AS detail
  FROM dms_prclog l
 WHERE l.status = 'FL'
   AND l.enddt >= SYS_EXTRACT_UTC(SYSTIMESTAMP) - INTERVAL '1' DAY;

-- Current schedule rows the leader skips, and why (DMS_JOBSCH.invalid_reason, V003): written by
-- the leader, cleared when the row becomes valid.
CREATE OR REPLACE VIEW dms_v_invalid_schedules AS
SELECT s.jobschid,
       s.mapref,
       s.frqcd,
       s.frqdd,
       s.frqhh,
       s.frqmi,
       s.cronexp,
       s.schflg,
       s.invalid_reason
  FROM dms_jobsch s
 WHERE s.curflg = 'Y'
   AND s.invalid_reason IS NOT NULL;
