-- Removes everything sql/oracle/aq_wakeup.sql created. Run as the schema owner (SQL*Plus/SQLcl).
-- Triggers first, so that no INSERT into DMS_PRCREQ calls the package or the queue while they go.
-- Safe to run when some or all of the objects are already gone. The replicas fall back to polling.
WHENEVER SQLERROR EXIT FAILURE

DECLARE
  e_no_trigger EXCEPTION;
  PRAGMA EXCEPTION_INIT(e_no_trigger, -4080);
BEGIN
  EXECUTE IMMEDIATE 'DROP TRIGGER dms_prcreq_wakeup_ins';
EXCEPTION
  WHEN e_no_trigger THEN
    NULL;
END;
/

DECLARE
  e_no_trigger EXCEPTION;
  PRAGMA EXCEPTION_INIT(e_no_trigger, -4080);
BEGIN
  EXECUTE IMMEDIATE 'DROP TRIGGER dms_prcreq_wakeup_req';
EXCEPTION
  WHEN e_no_trigger THEN
    NULL;
END;
/

DECLARE
  e_no_job EXCEPTION;
  PRAGMA EXCEPTION_INIT(e_no_job, -27475);
BEGIN
  DBMS_SCHEDULER.DROP_JOB('DMS_WAKEUP_PURGE', TRUE);  -- (job_name, force)
EXCEPTION
  WHEN e_no_job THEN
    NULL;
END;
/

DECLARE
  e_no_package EXCEPTION;
  PRAGMA EXCEPTION_INIT(e_no_package, -4043);
BEGIN
  EXECUTE IMMEDIATE 'DROP PACKAGE dms_wakeup';
EXCEPTION
  WHEN e_no_package THEN
    NULL;
END;
/

-- force (the TRUE) stops and drops the queue together with its queue table. Positional
-- arguments here and above: sqlfluff, which checks this file, does not parse 'force =>'.
DECLARE
  e_no_queue_table EXCEPTION;
  PRAGMA EXCEPTION_INIT(e_no_queue_table, -24002);
BEGIN
  DBMS_AQADM.DROP_QUEUE_TABLE('DMS_WAKEUP_QT', TRUE);  -- (queue_table, force)
EXCEPTION
  WHEN e_no_queue_table THEN
    NULL;
END;
/
