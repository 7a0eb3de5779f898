-- DMS_API package body. See dms_api.pks for the contract. Nothing here commits.
-- Lengths are checked in bytes (LENGTHB): VARCHAR2(n) counts bytes under the default
-- NLS_LENGTH_SEMANTICS, so 64 characters of a multi-byte id may not fit in VARCHAR2(64).
WHENEVER SQLERROR EXIT FAILURE
CREATE OR REPLACE PACKAGE BODY dms_api AS

  c_max_id_length     CONSTANT PLS_INTEGER := 64;
  c_max_mapref_length CONSTANT PLS_INTEGER := 100;
  c_max_key_length    CONSTANT PLS_INTEGER := 200;

  FUNCTION new_request_id RETURN VARCHAR2 IS
  BEGIN
    RETURN LOWER(RAWTOHEX(SYS_GUID()));
  END new_request_id;

  PROCEDURE check_mapref(p_mapref IN VARCHAR2) IS
    l_found PLS_INTEGER;
  BEGIN
    IF p_mapref IS NULL THEN
      raise_application_error(c_err_unknown_mapref, 'DMS_API: mapref must not be null');
    END IF;
    IF LENGTHB(p_mapref) > c_max_mapref_length THEN
      raise_application_error(c_err_unknown_mapref, 'DMS_API: mapref is longer than 100 bytes');
    END IF;
    SELECT COUNT(*) INTO l_found FROM dms_job WHERE mapref = p_mapref;
    IF l_found = 0 THEN
      raise_application_error(c_err_unknown_mapref,
        'DMS_API: unknown mapref ' || p_mapref || ' (no row in DMS_JOB)');
    END IF;
  END check_mapref;

  -- p_payload as a JSON object: an empty object for NULL, an error for anything else.
  -- Oracle parses lax JSON by default (unquoted names, single quotes), which the workers'
  -- strict parser then refuses, failing the request later: check strict syntax here. IS JSON
  -- is a SQL condition (not a PL/SQL expression before 23ai), hence the query.
  FUNCTION payload_object(p_payload IN CLOB) RETURN JSON_OBJECT_T IS
    l_element JSON_ELEMENT_T;
    l_strict  PLS_INTEGER;
  BEGIN
    IF p_payload IS NULL OR DBMS_LOB.GETLENGTH(p_payload) = 0 THEN
      RETURN JSON_OBJECT_T();
    END IF;
    EXECUTE IMMEDIATE 'SELECT COUNT(*) FROM dual WHERE :p IS JSON STRICT' INTO l_strict USING p_payload;
    IF l_strict = 0 THEN
      raise_application_error(c_err_bad_payload,
        'DMS_API: payload is not valid JSON (strict syntax: names and strings in double quotes)');
    END IF;
    BEGIN
      l_element := JSON_ELEMENT_T.parse(p_payload);
    EXCEPTION
      WHEN OTHERS THEN
        raise_application_error(c_err_bad_payload,
          'DMS_API: payload is not valid JSON: ' || SQLERRM);
    END;
    IF NOT l_element.is_object THEN
      raise_application_error(c_err_bad_payload,
        'DMS_API: payload must be a JSON object, e.g. {"param1": "X"}');
    END IF;
    RETURN TREAT(l_element AS JSON_OBJECT_T);
  END payload_object;

  FUNCTION insert_request(
    p_request_id   IN VARCHAR2,
    p_mapref       IN VARCHAR2,
    p_request_type IN VARCHAR2,
    p_payload      IN CLOB,
    p_priority     IN PLS_INTEGER DEFAULT 0,
    p_unique_key   IN VARCHAR2    DEFAULT NULL
  ) RETURN VARCHAR2 IS
    l_request_id VARCHAR2(64);
    l_holders    PLS_INTEGER;
  BEGIN
    IF p_request_id IS NULL THEN
      l_request_id := new_request_id;
    ELSIF LENGTHB(p_request_id) > c_max_id_length THEN
      raise_application_error(c_err_bad_request_id,
        'DMS_API: request_id is longer than 64 bytes');
    ELSE
      l_request_id := p_request_id;
    END IF;
    IF LENGTHB(p_unique_key) > c_max_key_length THEN
      raise_application_error(c_err_duplicate_key,
        'DMS_API: unique_key is longer than 200 bytes');
    END IF;
    -- status, requested_at, attempts and not_before come from the column defaults.
    INSERT INTO dms_prcreq (request_id, mapref, request_type, payload, priority, unique_key)
    VALUES (l_request_id, p_mapref, p_request_type, p_payload, NVL(p_priority, 0), p_unique_key);
    RETURN l_request_id;
  EXCEPTION
    WHEN DUP_VAL_ON_INDEX THEN
      -- Two unique indexes can refuse the row: the primary key, or the unique key of the
      -- waiting and running requests.
      SELECT COUNT(*) INTO l_holders FROM dms_prcreq
       WHERE p_unique_key IS NOT NULL AND unique_key = p_unique_key
         AND status IN ('NEW', 'CLAIMED', 'PROCESSING') AND request_id <> l_request_id;
      IF l_holders > 0 THEN
        raise_application_error(c_err_duplicate_key,
          'DMS_API: unique_key ' || p_unique_key || ' is held by a waiting or running request');
      END IF;
      raise_application_error(c_err_duplicate_id,
        'DMS_API: request_id ' || l_request_id || ' already exists in DMS_PRCREQ');
  END insert_request;

  FUNCTION enqueue_immediate(
    p_mapref     IN VARCHAR2,
    p_payload    IN CLOB        DEFAULT NULL,
    p_request_id IN VARCHAR2    DEFAULT NULL,
    p_priority   IN PLS_INTEGER DEFAULT 0,
    p_unique_key IN VARCHAR2    DEFAULT NULL
  ) RETURN VARCHAR2 IS
    l_checked JSON_OBJECT_T;
  BEGIN
    check_mapref(p_mapref);
    l_checked := payload_object(p_payload);  -- validation only: the payload is stored as given
    RETURN insert_request(p_request_id, p_mapref, 'IMMEDIATE', p_payload, p_priority, p_unique_key);
  END enqueue_immediate;

  FUNCTION enqueue_history(
    p_mapref     IN VARCHAR2,
    p_start_date IN DATE,
    p_end_date   IN DATE,
    p_payload    IN CLOB        DEFAULT NULL,
    p_request_id IN VARCHAR2    DEFAULT NULL,
    p_priority   IN PLS_INTEGER DEFAULT 0,
    p_unique_key IN VARCHAR2    DEFAULT NULL
  ) RETURN VARCHAR2 IS
    l_start DATE := TRUNC(p_start_date);
    l_end   DATE := TRUNC(p_end_date);
    l_body  JSON_OBJECT_T;
  BEGIN
    check_mapref(p_mapref);
    IF l_start IS NULL OR l_end IS NULL THEN
      raise_application_error(c_err_bad_dates,
        'DMS_API: enqueue_history needs both a start date and an end date');
    END IF;
    IF l_start > l_end THEN
      raise_application_error(c_err_bad_dates,
        'DMS_API: start date ' || TO_CHAR(l_start, 'YYYY-MM-DD')
        || ' is after end date ' || TO_CHAR(l_end, 'YYYY-MM-DD'));
    END IF;
    l_body := payload_object(p_payload);
    l_body.put('start_date', TO_CHAR(l_start, 'YYYY-MM-DD'));
    l_body.put('end_date', TO_CHAR(l_end, 'YYYY-MM-DD'));
    RETURN insert_request(p_request_id, p_mapref, 'HISTORY', l_body.to_clob, p_priority, p_unique_key);
  END enqueue_history;

  FUNCTION request_stop(
    p_request_id IN VARCHAR2
  ) RETURN VARCHAR2 IS
    l_mapref VARCHAR2(100);
    l_body   JSON_OBJECT_T := JSON_OBJECT_T();
  BEGIN
    BEGIN
      SELECT mapref INTO l_mapref FROM dms_prcreq WHERE request_id = p_request_id;
    EXCEPTION
      WHEN NO_DATA_FOUND THEN
        raise_application_error(c_err_unknown_request,
          'DMS_API: no request ' || NVL(p_request_id, '(null)') || ' in DMS_PRCREQ');
    END;
    l_body.put('request_id', p_request_id);
    RETURN insert_request(NULL, l_mapref, 'STOP', l_body.to_clob);
  END request_stop;

  FUNCTION request_stop_mapref(
    p_mapref IN VARCHAR2
  ) RETURN VARCHAR2 IS
  BEGIN
    IF p_mapref IS NULL OR LENGTHB(p_mapref) > c_max_mapref_length THEN
      raise_application_error(c_err_unknown_mapref, 'DMS_API: mapref must be given, at most 100 bytes');
    END IF;
    RETURN insert_request(NULL, p_mapref, 'STOP', NULL);
  END request_stop_mapref;

  FUNCTION refresh_schedules(
    p_mapref IN VARCHAR2 DEFAULT 'REFRESH_SCHEDULE'
  ) RETURN VARCHAR2 IS
  BEGIN
    RETURN insert_request(NULL, NVL(p_mapref, 'REFRESH_SCHEDULE'), 'REFRESH_SCHEDULE', NULL);
  END refresh_schedules;

END dms_api;
/

DECLARE
  l_errors PLS_INTEGER;
BEGIN
  SELECT COUNT(*) INTO l_errors FROM user_errors WHERE name = 'DMS_API' AND type = 'PACKAGE BODY';
  IF l_errors > 0 THEN
    raise_application_error(-20000, 'DMS_API body has compilation errors: SHOW ERRORS PACKAGE BODY dms_api');
  END IF;
END;
/
