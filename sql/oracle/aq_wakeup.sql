-- Optional AQ wake-up for dms-worker on Oracle. NOT a versioned migration: run it by hand as the
-- schema owner (SQL*Plus/SQLcl), after `dms-worker migrate`; run it again safely at any time.
-- Remove everything with sql/oracle/aq_wakeup_drop.sql. Background and costs: docs/oracle.md.
--
-- Placeholder: DMS_WORKER below is the runtime user the replicas connect as (sql/roles/oracle.sql);
-- replace it if yours has another name. When no such user exists (the replicas connect as the
-- owner itself, or the runtime user is created later), the grant is skipped with a message;
-- run this script again after creating the user.
--
-- The owner needs EXECUTE ON SYS.DBMS_AQ and EXECUTE ON SYS.DBMS_AQADM granted DIRECTLY (not
-- through a role: the package and triggers below are definer-rights PL/SQL, which ignores roles),
-- and CREATE TABLE, CREATE PROCEDURE, CREATE TRIGGER, CREATE JOB.
--
-- What it creates:
--   DMS_WAKEUP_QT           queue table, RAW payload, single consumer
--   DMS_WAKEUP_Q            the queue, started for enqueue and dequeue
--   DMS_WAKEUP              package: notify (one message now), notify_at (one message when a
--                           not_before time is reached), purge_expired
--   DMS_PRCREQ_WAKEUP_INS   AFTER INSERT ON dms_prcreq, statement level: one message per INSERT
--   DMS_PRCREQ_WAKEUP_REQ   AFTER UPDATE OF status ON dms_prcreq, per row going back to NEW
--                           (retries and rescues), delayed until the row's not_before
--   DMS_WAKEUP_PURGE        scheduler job: hourly purge of expired messages
-- Each message is UTL_RAW.CAST_TO_RAW('dms_prcreq'), expires 60 s after it becomes ready, and is
-- enqueued in the inserting transaction (visibility ON_COMMIT): it is delivered at commit, and a
-- rolled-back INSERT wakes nobody. Replicas dequeue from DMS_WAKEUP_Q (SCHEMA.DMS_WAKEUP_Q when
-- SCHEMA is set) with a waiting dequeue; without the queue they poll.
WHENEVER SQLERROR EXIT FAILURE
SET SERVEROUTPUT ON

DECLARE
  e_queue_table_exists EXCEPTION;
  PRAGMA EXCEPTION_INIT(e_queue_table_exists, -24001);
BEGIN
  DBMS_AQADM.CREATE_QUEUE_TABLE(
    queue_table        => 'DMS_WAKEUP_QT',
    queue_payload_type => 'RAW',
    multiple_consumers => FALSE);
EXCEPTION
  WHEN e_queue_table_exists THEN
    NULL;
END;
/

DECLARE
  e_queue_exists EXCEPTION;
  PRAGMA EXCEPTION_INIT(e_queue_exists, -24006);
BEGIN
  DBMS_AQADM.CREATE_QUEUE(
    queue_name     => 'DMS_WAKEUP_Q',
    queue_table    => 'DMS_WAKEUP_QT',
    retention_time => 0);
EXCEPTION
  WHEN e_queue_exists THEN
    NULL;
END;
/

BEGIN
  DBMS_AQADM.START_QUEUE(queue_name => 'DMS_WAKEUP_Q', enqueue => TRUE, dequeue => TRUE);
END;
/

CREATE OR REPLACE PACKAGE dms_wakeup AUTHID DEFINER AS
  -- Enqueue one wake-up message in the caller's transaction (delivered at its commit).
  -- Best effort: an AQ error is swallowed so that it never fails the caller's DML; the replicas
  -- still find the rows by polling.
  PROCEDURE notify;
  -- The same, but the message becomes ready only at p_due (a UTC TIMESTAMP, e.g. a row's
  -- not_before); now if p_due is NULL or past.
  PROCEDURE notify_at(p_due IN TIMESTAMP);
  -- Delete the expired messages (AQ moves them to the queue table's exception queue).
  PROCEDURE purge_expired;
END dms_wakeup;
/

CREATE OR REPLACE PACKAGE BODY dms_wakeup AS

  c_queue      CONSTANT VARCHAR2(30) := 'DMS_WAKEUP_Q';
  c_expiration CONSTANT PLS_INTEGER  := 60;

  PROCEDURE enqueue(p_delay_s IN PLS_INTEGER) IS
    l_enqueue_options    DBMS_AQ.ENQUEUE_OPTIONS_T;
    l_message_properties DBMS_AQ.MESSAGE_PROPERTIES_T;
    l_msgid              RAW(16);
  BEGIN
    l_enqueue_options.visibility := DBMS_AQ.ON_COMMIT;
    l_message_properties.delay := p_delay_s;
    l_message_properties.expiration := c_expiration;
    DBMS_AQ.ENQUEUE(
      queue_name         => c_queue,
      enqueue_options    => l_enqueue_options,
      message_properties => l_message_properties,
      payload            => UTL_RAW.CAST_TO_RAW('dms_prcreq'),
      msgid              => l_msgid);
  EXCEPTION
    WHEN OTHERS THEN
      NULL;  -- best effort by design: polling is the fallback (see the package specification)
  END enqueue;

  PROCEDURE notify IS
  BEGIN
    enqueue(DBMS_AQ.NO_DELAY);
  END notify;

  PROCEDURE notify_at(p_due IN TIMESTAMP) IS
    l_wait  INTERVAL DAY(9) TO SECOND(6);
    l_delay PLS_INTEGER := DBMS_AQ.NO_DELAY;
  BEGIN
    IF p_due IS NOT NULL THEN
      l_wait := p_due - SYS_EXTRACT_UTC(SYSTIMESTAMP);
      IF l_wait > INTERVAL '0' SECOND THEN
        l_delay := CEIL(EXTRACT(DAY FROM l_wait) * 86400 + EXTRACT(HOUR FROM l_wait) * 3600
                        + EXTRACT(MINUTE FROM l_wait) * 60 + EXTRACT(SECOND FROM l_wait));
      END IF;
    END IF;
    enqueue(l_delay);
  END notify_at;

  PROCEDURE purge_expired IS
    -- The type is DBMS_AQADM.AQ$_PURGE_OPTIONS_T; quoted (same name, upper case) because
    -- sqlfluff, which checks this file, does not parse '$' in an unquoted type name.
    l_purge_options DBMS_AQADM."AQ$_PURGE_OPTIONS_T";
  BEGIN
    l_purge_options.block := FALSE;
    DBMS_AQADM.PURGE_QUEUE_TABLE(
      queue_table     => 'DMS_WAKEUP_QT',
      purge_condition => 'qtview.msg_state = ''EXPIRED''',
      purge_options   => l_purge_options);
  END purge_expired;

END dms_wakeup;
/

-- One message per INSERT statement, however many rows it inserts (no FOR EACH ROW).
CREATE OR REPLACE TRIGGER dms_prcreq_wakeup_ins
AFTER INSERT ON dms_prcreq
BEGIN
  dms_wakeup.notify;
END;
/

-- A retry or a rescue puts a row back to NEW with a not_before time: wake a replica then.
CREATE OR REPLACE TRIGGER dms_prcreq_wakeup_req
AFTER UPDATE OF status ON dms_prcreq
FOR EACH ROW
WHEN (new.status = 'NEW' AND old.status <> 'NEW')
BEGIN
  dms_wakeup.notify_at(:new.not_before);
END;
/

-- A unit that compiles with errors is only a warning in SQL*Plus, and a trigger calling an
-- invalid package would fail every INSERT into DMS_PRCREQ: drop the triggers and stop instead.
DECLARE
  l_errors PLS_INTEGER;
BEGIN
  SELECT COUNT(*) INTO l_errors FROM user_errors
   WHERE (name = 'DMS_WAKEUP' AND type IN ('PACKAGE', 'PACKAGE BODY'))
      OR (name IN ('DMS_PRCREQ_WAKEUP_INS', 'DMS_PRCREQ_WAKEUP_REQ') AND type = 'TRIGGER');
  IF l_errors > 0 THEN
    FOR t IN (SELECT trigger_name FROM user_triggers
               WHERE trigger_name IN ('DMS_PRCREQ_WAKEUP_INS', 'DMS_PRCREQ_WAKEUP_REQ')) LOOP
      EXECUTE IMMEDIATE 'DROP TRIGGER ' || t.trigger_name;
    END LOOP;
    raise_application_error(-20000, 'dms_wakeup has compilation errors (SHOW ERRORS PACKAGE BODY dms_wakeup): '
      || 'its triggers were dropped, so inserts into DMS_PRCREQ go on and replicas poll');
  END IF;
END;
/

DECLARE
  c_grantee CONSTANT VARCHAR2(128) := 'DMS_WORKER';
  l_users   PLS_INTEGER;
BEGIN
  SELECT COUNT(*) INTO l_users FROM all_users WHERE username = c_grantee;
  IF l_users = 0 THEN
    DBMS_OUTPUT.PUT_LINE('User ' || c_grantee || ' does not exist: DEQUEUE not granted. '
      || 'Run this script again after creating it (sql/roles/oracle.sql).');
  ELSE
    DBMS_AQADM.GRANT_QUEUE_PRIVILEGE(
      privilege    => 'DEQUEUE',
      queue_name   => 'DMS_WAKEUP_Q',
      grantee      => c_grantee,
      grant_option => FALSE);
  END IF;
END;
/

DECLARE
  e_job_exists EXCEPTION;
  PRAGMA EXCEPTION_INIT(e_job_exists, -27477);
BEGIN
  DBMS_SCHEDULER.CREATE_JOB(
    job_name        => 'DMS_WAKEUP_PURGE',
    job_type        => 'STORED_PROCEDURE',
    job_action      => 'DMS_WAKEUP.PURGE_EXPIRED',
    repeat_interval => 'FREQ=HOURLY',
    enabled         => TRUE,
    comments        => 'dms-worker: purge expired wake-up messages (sql/oracle/aq_wakeup.sql)');
EXCEPTION
  WHEN e_job_exists THEN
    NULL;
END;
/
