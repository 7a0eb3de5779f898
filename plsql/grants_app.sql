-- Roles for the web application and for monitoring users of dms-worker on Oracle. Run as a DBA
-- (SQL*Plus/SQLcl) after plsql/dms_api.pks, dms_api.pkb and dms_views.sql are installed, replacing
--   DMS_OWNER   with the schema that holds the tables and the package (the SCHEMA setting),
--   DMS_APP     with the web application's database user,
--   DMS_MONITOR with the DBA/monitoring user (or drop that line).
-- DMS_API runs with its owner's rights: the application needs no privilege on DMS_PRCREQ itself.
-- Privileges granted through a role are not visible inside the grantee's own definer-rights
-- PL/SQL: if the application calls DMS_API from a stored procedure of its own, grant
-- EXECUTE ON dms_owner.dms_api to that user directly instead.
WHENEVER SQLERROR EXIT FAILURE

-- Monitoring: read the views, nothing else.
CREATE ROLE dms_monitor_role;
GRANT SELECT ON dms_owner.dms_v_queue_depth TO dms_monitor_role;
GRANT SELECT ON dms_owner.dms_v_running TO dms_monitor_role;
GRANT SELECT ON dms_owner.dms_v_failures_1d TO dms_monitor_role;
GRANT SELECT ON dms_owner.dms_v_invalid_schedules TO dms_monitor_role;

-- The web application: enqueue, stop, refresh through DMS_API, and read the views.
CREATE ROLE dms_app_role;
GRANT EXECUTE ON dms_owner.dms_api TO dms_app_role;
GRANT dms_monitor_role TO dms_app_role;

GRANT dms_app_role TO dms_app;
GRANT dms_monitor_role TO dms_monitor;
