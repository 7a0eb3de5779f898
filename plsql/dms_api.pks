-- DMS_API: the PL/SQL API of dms-worker for web applications and DBAs (package specification).
-- Install as the schema owner, after the migrations: @plsql/dms_api.pks then @plsql/dms_api.pkb
-- (SQL*Plus/SQLcl; each unit ends with a line holding only '/'). Grants: plsql/grants_app.sql.
-- SQL*Plus reports compilation errors only as a warning and carries on; the block after the
-- package stops the script on them (and WHENEVER SQLERROR on any other error).
WHENEVER SQLERROR EXIT FAILURE
CREATE OR REPLACE PACKAGE dms_api AUTHID DEFINER AS
  -- Every function inserts one DMS_PRCREQ row and returns its request_id. The row gets status
  -- 'NEW', requested_at, attempts and not_before from the column defaults, exactly as a plain
  -- INSERT by any other client would.
  --
  -- TRANSACTIONS: nothing here COMMITs or ROLLBACKs. The request belongs to the caller's
  -- transaction: it becomes visible to the workers when the caller commits, together with the
  -- caller's own changes, and disappears if the caller rolls back. Call COMMIT yourself.
  --
  -- The package runs with its owner's rights (AUTHID DEFINER): a caller needs only EXECUTE on
  -- DMS_API, no INSERT privilege on DMS_PRCREQ.
  --
  -- Errors (raise_application_error):
  c_err_unknown_mapref  CONSTANT PLS_INTEGER := -20001;  -- mapref null or not in DMS_JOB
  c_err_bad_dates       CONSTANT PLS_INTEGER := -20002;  -- a date missing, or start after end
  c_err_bad_payload     CONSTANT PLS_INTEGER := -20003;  -- payload not a strict JSON object
  c_err_unknown_request CONSTANT PLS_INTEGER := -20004;  -- STOP for a request_id not in DMS_PRCREQ
  c_err_duplicate_id    CONSTANT PLS_INTEGER := -20005;  -- p_request_id already used
  c_err_bad_request_id  CONSTANT PLS_INTEGER := -20006;  -- p_request_id longer than 64 bytes
  c_err_duplicate_key   CONSTANT PLS_INTEGER := -20007;  -- p_unique_key held by a waiting or running request

  -- Run p_mapref now (request_type IMMEDIATE). p_payload: a JSON object or NULL, e.g.
  -- '{"param1": "2026-11-01", "truncate_flag": "Y"}', in strict JSON syntax (quoted names, as
  -- the workers parse it). p_request_id: your own id (at most 64 bytes, e.g. a UUID), or NULL for
  -- a generated one (32 lower-case hex digits from SYS_GUID). p_priority: higher is claimed
  -- first (default 0). p_unique_key: at most one waiting or running request per key (at most
  -- 200 bytes); c_err_duplicate_key when one already holds it.
  FUNCTION enqueue_immediate(
    p_mapref     IN VARCHAR2,
    p_payload    IN CLOB        DEFAULT NULL,
    p_request_id IN VARCHAR2    DEFAULT NULL,
    p_priority   IN PLS_INTEGER DEFAULT 0,
    p_unique_key IN VARCHAR2    DEFAULT NULL
  ) RETURN VARCHAR2;

  -- Run p_mapref once per day from p_start_date to p_end_date, in order (request_type HISTORY).
  -- The payload is p_payload (a JSON object or NULL) with "start_date" and "end_date" set to the
  -- days as 'YYYY-MM-DD' (they override keys of the same name in p_payload). The time of day of
  -- the dates is ignored. p_priority and p_unique_key as for enqueue_immediate.
  FUNCTION enqueue_history(
    p_mapref     IN VARCHAR2,
    p_start_date IN DATE,
    p_end_date   IN DATE,
    p_payload    IN CLOB        DEFAULT NULL,
    p_request_id IN VARCHAR2    DEFAULT NULL,
    p_priority   IN PLS_INTEGER DEFAULT 0,
    p_unique_key IN VARCHAR2    DEFAULT NULL
  ) RETURN VARCHAR2;

  -- Stop one request: if still queued it becomes CANCELLED; if running, the execution is
  -- terminated on whatever replica runs it. Inserts a STOP request with the target's mapref and
  -- payload {"request_id": p_request_id}. Raises c_err_unknown_request for an unknown id.
  FUNCTION request_stop(
    p_request_id IN VARCHAR2
  ) RETURN VARCHAR2;

  -- Stop the running execution(s) of p_mapref: a STOP request with no payload.
  FUNCTION request_stop_mapref(
    p_mapref IN VARCHAR2
  ) RETURN VARCHAR2;

  -- Make the leader reread DMS_JOBSCH now (request_type REFRESH_SCHEDULE), e.g. after editing
  -- a schedule. p_mapref is informational (the schedule you edited); the whole table is reread.
  FUNCTION refresh_schedules(
    p_mapref IN VARCHAR2 DEFAULT 'REFRESH_SCHEDULE'
  ) RETURN VARCHAR2;
END dms_api;
/

DECLARE
  l_errors PLS_INTEGER;
BEGIN
  SELECT COUNT(*) INTO l_errors FROM user_errors WHERE name = 'DMS_API' AND type = 'PACKAGE';
  IF l_errors > 0 THEN
    raise_application_error(-20000, 'DMS_API specification has compilation errors: SHOW ERRORS PACKAGE dms_api');
  END IF;
END;
/
