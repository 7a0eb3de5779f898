-- Least-privilege runtime user for dms-worker on Oracle. Run as a DBA (SQL*Plus/SQLcl),
-- replacing DMS_OWNER with the schema that holds the tables (the SCHEMA setting).
-- The Oracle driver itself arrives with its own issue; these grants are what it will need.
CREATE USER dms_worker IDENTIFIED BY "change-me";
GRANT CREATE SESSION TO dms_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON dms_owner.dms_prcreq TO dms_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON dms_owner.dms_worker TO dms_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON dms_owner.dms_leader TO dms_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON dms_owner.dms_job_state TO dms_worker;
GRANT SELECT, INSERT, UPDATE ON dms_owner.dms_prclog TO dms_worker;
GRANT SELECT, INSERT, UPDATE ON dms_owner.dms_joblog TO dms_worker;
GRANT SELECT, INSERT, UPDATE ON dms_owner.dms_joberr TO dms_worker;
GRANT SELECT, UPDATE ON dms_owner.dms_jobsch TO dms_worker;
GRANT SELECT ON dms_owner.dms_job TO dms_worker;
GRANT SELECT ON dms_owner.dms_schema_version TO dms_worker;
-- The session-lock leader (DBMS_LOCK.REQUEST on a numeric id).
GRANT EXECUTE ON SYS.DBMS_LOCK TO dms_worker;
-- Optional AQ wake-up (sql/oracle/aq_wakeup.sql, run by the schema owner): that script grants
-- DEQUEUE on dms_owner.DMS_WAKEUP_Q to DMS_WORKER with DBMS_AQADM.GRANT_QUEUE_PRIVILEGE; it is
-- not granted here because the queue does not exist until that script has run. Without the
-- queue (or without the privilege) the worker polls. See docs/oracle.md.
