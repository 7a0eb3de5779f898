"""What SQLAlchemy does around the Oracle driver's statements, on a simulated session.

The real SQLAlchemy engine, pool and Oracle dialect run over a stand-in DB-API session
(``oracle_session.py``): its first-connect step, autobegin, commit, error wrapping and OUT
binds behave as they would against a server. Issue 12 items 1 and 2 live exactly there.
"""
from __future__ import annotations

import pytest
import sqlalchemy as sa

from tests.drivers.oracle_session import Session, ora_error, simulated_driver


def run_like_the_executor(driver, body):
    """The execution process's handling of ``ctx.connection`` (worker/executor.py): commit what
    is left in a transaction when the handler returns, close the connection either way."""
    conn = driver.engine.connect()
    try:
        outcome = body(conn)
        if conn.in_transaction():
            conn.commit()
        return outcome
    finally:
        conn.close()


# -- 12.1: sql: handlers -------------------------------------------------------------------------
def test_a_procedures_work_is_committed_with_the_execution():
    session = Session()
    driver = simulated_driver(session)
    counts = run_like_the_executor(driver, lambda conn: driver.procedure_call(
        conn, "etl.load_day", [7, "2026-01-01"] + [None] * 9, counts=True))
    calls = [stmt for stmt in sum(session.committed, []) if stmt.startswith("BEGIN etl.load_day(")]
    assert len(calls) == 1, f"the call was not committed (rolled back: {session.rolled_back})"
    assert not any("etl.load_day" in stmt for stmt in sum(session.rolled_back, []))
    assert counts == (4, 4, 4), "the OUT binds come back as the row counts, as integers"
    driver.dispose()


def test_a_procedures_error_carries_the_database_text_for_dberrmsg():
    session = Session(fail_on="BEGIN etl.load_day(",
                      error=ora_error("ORA-20001: no sales for 2026-01-01\nORA-06512: at \"DMS.ETL\", line 12"))
    driver = simulated_driver(session)
    with pytest.raises(sa.exc.DatabaseError) as info:
        run_like_the_executor(driver, lambda conn: driver.procedure_call(conn, "etl.load_day", [7] + [None] * 10))
    # The executor fills DMS_JOBERR.dberrmsg from the exception's .orig.
    orig = getattr(info.value, "orig", None)
    assert orig is not None and str(orig).startswith("ORA-20001: no sales for 2026-01-01")
    driver.dispose()


def test_the_truncate_flag_is_one_more_argument_only_for_jobs_that_ask():
    session = Session()
    driver = simulated_driver(session)
    run_like_the_executor(driver, lambda conn: driver.procedure_call(
        conn, "etl.load_day", [7] + [None] * 10, truncate_flag="Y"))
    sql, binds = next((sql, b) for sql, b in session.executed if sql.startswith("BEGIN etl.load_day("))
    assert sql == "BEGIN etl.load_day(:a0, :a1, :a2, :a3, :a4, :a5, :a6, :a7, :a8, :a9, :a10, :a11); END;"
    assert binds["a11"] == "Y" and binds["a0"] == 7
    driver.dispose()


# -- 12.2: SCHEMA for the least-privilege user ---------------------------------------------------
@pytest.mark.parametrize("schema, expected", [(None, "dms_worker"), ("DMS", "dms")])
def test_the_schema_setting_is_the_dialects_default_schema(schema, expected):
    """SQLAlchemy reads the default schema (has_table, reflection) on the first connection: the
    ALTER SESSION must run before that, or the login user's schema is recorded."""
    session = Session(user="DMS_WORKER")
    driver = simulated_driver(session, schema=schema)
    with driver.engine.connect() as conn:
        assert driver.engine.dialect.default_schema_name == expected
        assert sa.inspect(conn).default_schema_name == expected
    first = session.executed[0][0]
    assert first.startswith("ALTER SESSION SET NLS_DATE_FORMAT"), "the session is set up before anything else"
    driver.dispose()


# -- a half-applied migration -------------------------------------------------------------------
V001_OBJECTS = {"TABLE:DMS_PRCREQ", "TABLE:DMS_JOBSCH", "TABLE:DMS_JOB", "TABLE:DMS_WORKER", "TABLE:DMS_LEADER",
                "INDEX:DMS_PRCREQ_CLAIM_IX"}


def _v003():
    from worker.migrate import migrations_for
    return next(m for m in migrations_for("oracle") if m.version == 3)


@pytest.mark.parametrize("stop_at", ["ALTER TABLE dms_jobsch ADD CONSTRAINT dms_jobsch_misfire_ck",
                                     "CREATE INDEX dms_prcreq_claim_ix", "DROP INDEX dms_prcreq_claim_ix"])
def test_v003_stopped_half_way_applies_the_rest_when_run_again(stop_at):
    """Oracle DDL commits as it goes: the first run keeps what it did before the failure."""
    session = Session(objects=set(V001_OBJECTS), fail_on=stop_at, fail_once=True,
                      error=ora_error("ORA-01652: unable to extend temp segment by 128 in tablespace TEMP"))
    driver = simulated_driver(session)
    script = _v003().sql
    with driver.engine.connect() as conn:
        with pytest.raises(sa.exc.DatabaseError, match="ORA-01652"):
            driver.run_script(conn, script)
        first = list(session.ddl)
        assert first, "the first run applied its first steps before it failed"
        driver.run_script(conn, script)
    expected = {"COLUMN:DMS_WORKER.EXPIRES_AT", "COLUMN:DMS_LEADER.MODE", "COLUMN:DMS_JOBSCH.INVALID_REASON",
                "CONSTRAINT:DMS_JOBSCH_SCHFLG_CK", "CONSTRAINT:DMS_JOBSCH_CURFLG_CK", "CONSTRAINT:DMS_JOBSCH_MISFIRE_CK",
                "CONSTRAINT:DMS_JOBSCH_FRQCD_CK", "COLUMN:DMS_JOB.PAUSED", "CONSTRAINT:DMS_JOB_PAUSED_CK",
                "COLUMN:DMS_PRCREQ.PRIORITY", "COLUMN:DMS_PRCREQ.UNIQUE_KEY", "INDEX:DMS_PRCREQ_UNIQUE_UQ",
                "INDEX:DMS_PRCREQ_CLAIM_IX"}
    assert expected <= session.objects
    driver.dispose()


def test_a_rerun_never_adopts_an_existing_table_or_hides_other_errors():
    session = Session(objects={"TABLE:DMS_PRCREQ"})
    driver = simulated_driver(session)
    with driver.engine.connect() as conn:
        with pytest.raises(sa.exc.DatabaseError, match="ORA-00955"):
            driver.run_script(conn, "CREATE TABLE dms_prcreq (request_id VARCHAR2(64));")
        session.fail_on, session.error = "ADD (priority", ora_error("ORA-00904: \"X\": invalid identifier")
        with pytest.raises(sa.exc.DatabaseError, match="ORA-00904"):
            driver.run_script(conn, "ALTER TABLE dms_prcreq ADD (priority NUMBER(10) DEFAULT 0 NOT NULL);")
    driver.dispose()


def test_migrate_and_run_look_for_the_schema_version_in_the_schema_setting():
    """What `migrate`, `run` (pending migrations) and doctor ask: is dms_schema_version there?"""
    from worker.migrate import applied_versions
    owners = []

    def answer(sql, binds):
        if "tables_and_views" in sql:
            owners.append(binds.get("owner"))
            return ["table_name"], []
        return None

    session = Session(user="DMS_WORKER", answer=answer)
    driver = simulated_driver(session, schema="DMS")
    assert applied_versions(driver) == {}
    assert owners == ["DMS"], "looked in the login user's schema"
    driver.dispose()
