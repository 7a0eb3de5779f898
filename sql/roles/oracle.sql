-- Least-privilege runtime user DMS_WORKER for the dms-worker replicas on Oracle.
--
-- Run as SYS in the pluggable database (SQL*Plus/SQLcl), after `dms-worker migrate` created the
-- tables, replacing DMS_OWNER with the schema that holds them (the SCHEMA setting) and the
-- password. SYS, not SYSTEM: only SYS can grant EXECUTE on SYS.DBMS_LOCK (SYSTEM's ANY
-- privileges do not reach SYS's objects; the grant fails with ORA-01031 and the replicas then
-- fail every lock request with PLS-00201). A DBA who works as SYSTEM may run everything else
-- here and ask SYS for that one grant. docs/oracle.md gives the exact commands.
--
-- The replicas then connect as DMS_WORKER with SCHEMA=DMS_OWNER. `dms-worker doctor`, run with
-- that configuration, checks every grant below.
WHENEVER SQLERROR EXIT FAILURE
CREATE USER dms_worker IDENTIFIED BY "change-me";
GRANT CREATE SESSION TO dms_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON dms_owner.dms_prcreq TO dms_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON dms_owner.dms_worker TO dms_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON dms_owner.dms_leader TO dms_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON dms_owner.dms_job_state TO dms_worker;
GRANT SELECT, INSERT, UPDATE ON dms_owner.dms_prclog TO dms_worker;
GRANT SELECT, INSERT, UPDATE ON dms_owner.dms_joblog TO dms_worker;
GRANT SELECT, INSERT, UPDATE ON dms_owner.dms_joberr TO dms_worker;
-- The leader writes only these columns of the schedules (V003 added invalid_reason).
GRANT SELECT, UPDATE (lst_run_dt, nxt_run_dt, invalid_reason) ON dms_owner.dms_jobsch TO dms_worker;
GRANT SELECT ON dms_owner.dms_job TO dms_worker;
GRANT SELECT ON dms_owner.dms_schema_version TO dms_worker;
-- The session-lock leader (DBMS_LOCK.REQUEST on a numeric id). Without it the replicas lead by
-- the lease row alone and log the grant that is missing.
GRANT EXECUTE ON SYS.DBMS_LOCK TO dms_worker;
-- Optional AQ wake-up (sql/oracle/aq_wakeup.sql, run by the schema owner): that script grants
-- DEQUEUE on dms_owner.DMS_WAKEUP_Q to DMS_WORKER with DBMS_AQADM.GRANT_QUEUE_PRIVILEGE; it is
-- not granted here because the queue does not exist until that script has run. Without the
-- queue (or without the privilege) the worker polls. See docs/oracle.md.
