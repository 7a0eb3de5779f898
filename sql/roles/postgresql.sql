-- Least-privilege runtime role for dms-worker on PostgreSQL.
-- Run as the owner of the dms tables (the role that applied sql/migrations/postgresql), e.g.
--   psql -v password="'...'" -f sql/roles/postgresql.sql DBNAME
-- The runtime role can read and write the queue and log tables and nothing else: no DDL, no
-- other tables. Migrations stay with the owner (`dms-worker migrate` run as the owner).
CREATE ROLE dms_worker LOGIN PASSWORD :password;
SELECT format('GRANT CONNECT ON DATABASE %I TO dms_worker', current_database()) \gexec
GRANT USAGE ON SCHEMA public TO dms_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON dms_prcreq, dms_worker, dms_leader, dms_job_state TO dms_worker;
GRANT SELECT, INSERT, UPDATE ON dms_prclog, dms_joblog, dms_joberr TO dms_worker;
GRANT SELECT, UPDATE (lst_run_dt, nxt_run_dt, invalid_reason) ON dms_jobsch TO dms_worker;
GRANT SELECT ON dms_job, dms_schema_version TO dms_worker;
GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO dms_worker;
-- pg_terminate_backend on the sessions of stopped executions (same role: allowed without this);
-- session advisory locks and LISTEN need no grant.
-- The web application that enqueues needs only:
--   GRANT SELECT, INSERT ON dms_prcreq TO webapp;  (and SELECT on dms_prclog for display)
