-- Least-privilege runtime user for dms-worker on Oracle. Run as a DBA (SQL*Plus/SQLcl),
-- replacing DMS_OWNER with the schema that holds the tables (the SCHEMA setting).
-- The Oracle driver itself arrives with its own issue; these grants are what it will need.
CREATE USER dms_worker IDENTIFIED BY "change-me";
GRANT CREATE SESSION TO dms_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON dms_owner.dms_prcreq TO dms_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON dms_owner.dms_worker TO dms_worker;
GRANT SELECT, INSERT, UPDATE, DELETE ON dms_owner.dms_leader TO dms_worker;
GRANT SELECT, INSERT, UPDATE ON dms_owner.dms_prclog TO dms_worker;
GRANT SELECT, INSERT, UPDATE ON dms_owner.dms_joblog TO dms_worker;
GRANT SELECT, INSERT, UPDATE ON dms_owner.dms_joberr TO dms_worker;
GRANT SELECT, UPDATE ON dms_owner.dms_jobsch TO dms_worker;
GRANT SELECT ON dms_owner.dms_job TO dms_worker;
GRANT SELECT ON dms_owner.dms_schema_version TO dms_worker;
-- The session-lock leader (DBMS_LOCK.REQUEST on a numeric id).
GRANT EXECUTE ON SYS.DBMS_LOCK TO dms_worker;
