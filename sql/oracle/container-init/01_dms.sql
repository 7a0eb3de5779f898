-- First-start initialisation for the gvenzl/oracle-free image: mount this directory at
-- /container-entrypoint-initdb.d (see docs/oracle.md). The image runs *.sql files here once, on
-- the first start, as SYS connected to the CDB root, AFTER it has created APP_USER in FREEPDB1.
-- Start the container with APP_USER=dms: the schema owner is the user DMS. (With another
-- APP_USER name, replace dms below.)
--
-- The image gives APP_USER QUOTA UNLIMITED ON USERS and the role DB_DEVELOPER_ROLE (23ai), whose
-- system privileges cover the DDL. They are granted again here directly, which is harmless, so
-- that nothing depends on that role's contents; and package EXECUTE rights must be direct anyway,
-- because definer-rights PL/SQL (the AQ wake-up package and triggers) ignores roles.
-- ALTER SYSTEM is deliberately NOT granted: dms-worker never needs it.
WHENEVER SQLERROR EXIT FAILURE
ALTER SESSION SET CONTAINER = FREEPDB1;

-- Tables, views, the DMS_API package, the AQ wake-up package, triggers and purge job.
GRANT CREATE SESSION, CREATE TABLE, CREATE VIEW, CREATE PROCEDURE, CREATE TRIGGER, CREATE SEQUENCE, CREATE JOB TO dms;

-- The session-lock leader (DBMS_LOCK.REQUEST) when replicas connect as DMS.
GRANT EXECUTE ON SYS.DBMS_LOCK TO dms;

-- The optional AQ wake-up (sql/oracle/aq_wakeup.sql): create and use queues in its own schema.
GRANT EXECUTE ON SYS.DBMS_AQ TO dms;
GRANT EXECUTE ON SYS.DBMS_AQADM TO dms;
