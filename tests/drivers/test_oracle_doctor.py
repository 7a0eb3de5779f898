"""``dms-worker doctor`` on Oracle, over a simulated session (no Oracle server here).

The real SQLAlchemy Oracle dialect runs over tests/drivers/oracle_session.py, answering the
catalog and clock queries as a server would for the runtime user DMS_WORKER with SCHEMA=DMS,
and failing chosen statements with the errors Oracle gives (PLS-00201, ORA-01031, ORA-00904,
ORA-01435, a dequeue refused). The live suite runs doctor against a real server.
"""
from __future__ import annotations

from datetime import datetime, timezone

import pytest
import sqlglot

from tests.drivers.oracle_session import Session, ora_error, simulated_driver
from tests.drivers.test_oracle_sql import _plsql_parses, oracle_traps
from worker import doctor as doc
from worker.config import Config
from worker.drivers.oracle import lock_id
from worker.migrate import migrations_for

URL = "oracle+oracledb://dms_worker:secret@db.example:1521/?service_name=FREEPDB1"


def pls00201():
    return ora_error("ORA-06550: line 1, column 24:\nPLS-00201: identifier 'DBMS_LOCK' must be declared\n"
                     "ORA-06550: line 1, column 18:\nPL/SQL: Item ignored")


@pytest.fixture
def oracle(monkeypatch):
    """run(session_kwargs, **config) -> (checks by name, the session)."""
    def run(aq_installed: int = 0, file_jobs: tuple[str, ...] = (), schema: str = "DMS", **config):
        checksums = {m.version: m.checksum for m in migrations_for("oracle")}
        session = Session(user="DMS_WORKER")
        owners: list[str] = []

        def answer(sql: str, binds: dict):
            if "'SESSION_USER'" in sql:
                return ["u", "s"], [(session.user, session.current_schema)]
            if sql.startswith("SELECT SYS_EXTRACT_UTC(SYSTIMESTAMP)"):
                return ["now"], [(datetime.now(timezone.utc).replace(tzinfo=None),)]
            if "tables_and_views" in sql:
                owners.append(binds.get("owner"))
                return ["table_name"], [("DMS_SCHEMA_VERSION",)]
            if "FROM dms_schema_version" in sql:
                return ["version", "checksum"], sorted(checksums.items())
            if "all_queues" in sql:
                return ["n"], [(aq_installed,)]
            if "FROM dms_job" in sql and "LIKE" in sql:
                return ["mapref"], [(m,) for m in file_jobs]
            return None

        session.answer = answer
        driver = simulated_driver(session, schema=schema)
        monkeypatch.setattr("worker.drivers.make_driver", lambda *_a, **_k: driver)
        checks = doc.run_checks(Config(database_url=URL, schema=schema, **config))
        session.owners = owners
        return {c.name: c for c in checks}, session, checks
    return run


def test_the_runtime_user_with_every_grant_passes_and_looks_in_the_schema(oracle):
    checks, session, all_checks = oracle()
    assert {c.status for c in all_checks} <= {doc.OK, doc.INFO}, [c for c in all_checks if c.status not in "OK INFO"]
    assert checks["connect"].found.startswith("Oracle Database 23.5.0.24.7 as DMS_WORKER, tables in schema DMS")
    assert set(session.owners) == {"DMS"}, "dms_schema_version is looked up in SCHEMA, not the login user's schema"
    assert checks["leader lock"].found == (f"EXECUTE on SYS.DBMS_LOCK (leader id {lock_id('DMS', 'leader')}, "
                                           f"migration id {lock_id('DMS', 'migration')})")
    assert checks["privileges"].found == "DMS_WORKER: the DML a replica needs on all 10 tables"
    assert checks["wake-up"].status == doc.INFO and "not installed" in checks["wake-up"].found


def test_every_statement_doctor_sends_is_oracle_sql_without_the_traps(oracle):
    _, session, _ = oracle(aq_installed=1)
    sent = {sql for sql, _ in session.executed if not sql.startswith(("DEQUEUE", "ALTER SESSION"))}
    assert any(s.startswith("INSERT INTO dms_prcreq (") and s.endswith("WHERE 1 = 0") for s in sent)
    for sql in sent:
        assert oracle_traps(sql) == [], sql
        if sql.lstrip().upper().startswith(("DECLARE", "BEGIN")):
            assert _plsql_parses(sql) == [], sql
        elif sql.lstrip().lower().startswith(("select", "insert", "update", "delete")) and "dbms_transaction" not in sql:
            sqlglot.parse_one(sql, read="oracle", error_level=sqlglot.ErrorLevel.RAISE)


@pytest.mark.parametrize("mode, status", [("auto", doc.WARN), ("lock", doc.FAIL)])
def test_no_execute_on_dbms_lock_names_the_grant_only_sys_can_give(oracle, monkeypatch, mode, status):
    monkeypatch.setattr(Session, "__post_init__", lambda self: (setattr(self, "current_schema", self.user),
                                                                self.failures.update({"DBMS_LOCK.X_MODE": pls00201()})))
    checks, _, _ = oracle(leader_mode=mode)
    lock = checks["leader lock"]
    assert lock.status == status and "PLS-00201" in lock.found
    assert lock.fix.startswith("as SYS in the PDB: GRANT EXECUTE ON SYS.DBMS_LOCK TO DMS_WORKER (SYSTEM cannot grant it)")


def test_a_missing_column_grant_on_the_schedules_names_the_exact_grant(oracle, monkeypatch):
    refused = ora_error("ORA-01031: insufficient privileges")
    monkeypatch.setattr(Session, "__post_init__", lambda self: (setattr(self, "current_schema", self.user),
                                                                self.failures.update({"UPDATE dms_jobsch": refused})))
    checks, _, all_checks = oracle()
    row = checks["privileges dms_jobsch"]
    assert row.status == doc.FAIL and row.found == "UPDATE refused: ORA-01031: insufficient privileges"
    assert row.fix == ("as DMS (or a DBA): GRANT UPDATE (lst_run_dt, nxt_run_dt, invalid_reason) ON DMS.dms_jobsch "
                       "TO DMS_WORKER -- sql/roles/oracle.sql grants them all")
    assert [c.name for c in all_checks if c.status == doc.FAIL] == ["privileges dms_jobsch"]


def test_a_half_applied_v003_is_named_column_by_column(oracle, monkeypatch):
    missing = ora_error('ORA-00904: "EXPIRES_AT": invalid identifier')
    monkeypatch.setattr(Session, "__post_init__", lambda self: (setattr(self, "current_schema", self.user),
                                                                self.failures.update({"SELECT expires_at FROM": missing})))
    checks, _, _ = oracle()
    assert checks["V003 columns"].status == doc.FAIL
    assert checks["V003 columns"].found == "missing or not readable: dms_worker.expires_at"


def test_an_installed_queue_the_user_cannot_dequeue_from_fails_with_the_grant(oracle, monkeypatch):
    refused = ora_error("ORA-24033: no recipients for message")      # what the server says is up to it
    monkeypatch.setattr(Session, "__post_init__", lambda self: (setattr(self, "current_schema", self.user),
                                                                setattr(self, "aq_error", refused)))
    checks, session, _ = oracle(aq_installed=1)
    wake = checks["wake-up"]
    assert wake.status == doc.FAIL and "DMS_WORKER cannot dequeue" in wake.found
    assert "DBMS_AQADM.GRANT_QUEUE_PRIVILEGE('DEQUEUE', 'DMS.DMS_WAKEUP_Q', 'DMS_WORKER')" in wake.fix
    import oracledb
    assert f"DEQUEUE DMS.DMS_WAKEUP_Q mode={oracledb.DEQ_BROWSE}" in [sql for sql, _ in session.executed], \
        "browsed: nothing is taken off the queue"


def test_an_installed_queue_the_user_can_browse_passes(oracle):
    checks, _, _ = oracle(aq_installed=1)
    assert checks["wake-up"].status == doc.OK and checks["wake-up"].found == "AQ queue DMS.DMS_WAKEUP_Q, DEQUEUE allowed"


def test_a_schema_that_does_not_exist_is_named(oracle, monkeypatch):
    gone = ora_error("ORA-01435: user does not exist")
    monkeypatch.setattr(Session, "__post_init__", lambda self: (setattr(self, "current_schema", self.user),
                                                                self.failures.update({"CURRENT_SCHEMA = NOPE": gone})))
    checks, _, all_checks = oracle(schema="NOPE")
    assert checks["connect"].status == doc.FAIL and "ORA-01435" in checks["connect"].found
    assert checks["connect"].fix == "SCHEMA=NOPE: no such user; set SCHEMA to the owner of the tables"
    assert [c.name for c in all_checks] == ["python driver", "connect"]
