-- V004: the indexes the web console's request list and the failure views need (the
-- PostgreSQL and SQLite V004 create the same, partial where they can). The Oracle monitoring
-- views themselves stay in plsql/dms_views.sql. Oracle has no partial indexes: the failure
-- indexes lead with the status instead. Times are TIMESTAMP in UTC.

-- The request list (newest first, keyset-paged) and its filters: by time alone and by mapref,
-- each walked in (requested_at, request_id) order, stopping after a page. No index leads with
-- the status and the time here: without partial indexes it would also hold NEW rows, where it
-- could draw the replicas' claim away from dms_prcreq_claim_ix. A status filter reads
-- dms_prcreq_failed_ix below (that status's rows, sorted) or walks the time index.
CREATE INDEX dms_prcreq_requested_ix ON dms_prcreq (requested_at, request_id);
CREATE INDEX dms_prcreq_mapref_req_ix ON dms_prcreq (mapref, requested_at, request_id);
-- Failures of the last day (DMS_V_FAILURES_1D), without reading the finished history.
CREATE INDEX dms_prcreq_failed_ix ON dms_prcreq (status, completed_at);
CREATE INDEX dms_prclog_failed_ix ON dms_prclog (status, enddt);
