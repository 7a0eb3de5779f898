"""sql: handlers on a real Oracle (issue 12, item 1): the work commits, counts are recorded, an
error reaches DMS_JOBERR.dberrmsg, and STOP and a timeout end the call on the server."""
from __future__ import annotations

import pytest
import sqlalchemy as sa

from tests.oracle_live.conftest import FAST, drop, run_sql
from tests.support import Replica, wait_until
from worker import client
from worker import schema as s

PARAMS = ",\n".join(f"  p{i} IN VARCHAR2" for i in range(1, 11))
PROCEDURES = f"""
CREATE OR REPLACE PROCEDURE dms_live_beat(p_prcid IN NUMBER) AS
  PRAGMA AUTONOMOUS_TRANSACTION;
BEGIN
  INSERT INTO dms_test_probe (prcid, mapref) VALUES (p_prcid, 'BEAT');
  COMMIT;
END;
/
CREATE OR REPLACE PROCEDURE dms_live_etl(
  p_prcid IN NUMBER,
{PARAMS},
  p_src IN OUT NUMBER,
  p_trg IN OUT NUMBER,
  p_err IN OUT NUMBER
) AS
BEGIN
  IF p1 = 'fail' THEN
    raise_application_error(-20001, 'dms live: asked to fail');
  END IF;
  IF p1 = 'slow' THEN
    FOR i IN 1 .. 600 LOOP
      dms_live_beat(p_prcid);
      DBMS_SESSION.SLEEP(0.5);
    END LOOP;
  END IF;
  INSERT INTO dms_test_probe (prcid, mapref, day) VALUES (p_prcid, 'ETL', p1);
  p_src := 10;
  p_trg := 9;
  p_err := 1;
END;
/
"""


@pytest.fixture
def etl(owner_engine, oracle_url, tmp_path):
    run_sql(owner_engine, PROCEDURES)
    client.register_job(owner_engine, "LIVE_ETL", "sql:dms_live_etl", params={"counts": True})
    client.register_job(owner_engine, "LIVE_ETL_SLOW", "sql:dms_live_etl", params={"counts": True}, timeout_s=4)
    replica = Replica(oracle_url, "live-etl", tmp_path, **FAST).start()
    replica.wait_registered(owner_engine, timeout=60)
    yield owner_engine
    replica.stop()
    drop(owner_engine, "PROCEDURE", "dms_live_etl")
    drop(owner_engine, "PROCEDURE", "dms_live_beat")


def finished(engine, rid: str, timeout: float = 60) -> dict:
    return wait_until(lambda: (r := client.request_status(engine, rid)) and r["status"] in s.TERMINAL_STATUSES and r,
                      timeout, f"request {rid} to finish")


def probe_rows(engine, mapref: str, prcid: int | None = None) -> int:
    with engine.connect() as conn:
        q = sa.text("SELECT COUNT(*) FROM dms_test_probe WHERE mapref = :m" + (" AND prcid = :p" if prcid else ""))
        return conn.execute(q, {"m": mapref, "p": prcid}).scalar()


def prclog(engine, rid: str):
    with engine.connect() as conn:
        return conn.execute(sa.select(s.prclog).where(s.prclog.c.request_id == rid)).mappings().one()


def test_the_procedures_work_commits_and_its_counts_are_recorded(etl):
    rid = client.enqueue(etl, "LIVE_ETL", param1="2026-01-01")
    assert finished(etl, rid)["status"] == s.DONE
    log = prclog(etl, rid)
    assert probe_rows(etl, "ETL", log["prcid"]) == 1, "the procedure's INSERT was committed with the execution"
    with etl.connect() as conn:
        counts = conn.execute(sa.select(s.joblog.c.srcrows, s.joblog.c.trgrows, s.joblog.c.errrows)
                              .where(s.joblog.c.prcid == log["prcid"])).one()
    assert tuple(counts) == (10, 9, 1)


def test_a_procedures_error_reaches_dberrmsg(etl):
    rid = client.enqueue(etl, "LIVE_ETL", param1="fail")
    assert finished(etl, rid)["status"] == s.FAILED
    with etl.connect() as conn:
        dberrmsg = conn.execute(sa.select(s.joberr.c.dberrmsg).where(
            s.joberr.c.prcid == prclog(etl, rid)["prcid"], s.joberr.c.errtyp != "RECORD")).scalar_one()
    assert dberrmsg and dberrmsg.startswith("ORA-20001: dms live: asked to fail")


def _beats_stop(engine, prcid: int) -> bool:
    before = probe_rows(engine, "BEAT", prcid)
    # One beat every 0.5 s while the call runs: none within 2 s means the server ended it.
    try:
        wait_until(lambda: probe_rows(engine, "BEAT", prcid) > before, 2, "another beat")
    except AssertionError:
        return True
    return False


@pytest.mark.parametrize("how", ["stop", "timeout"])
def test_stop_and_timeout_end_the_call_on_the_server(etl, how):
    mapref = "LIVE_ETL" if how == "stop" else "LIVE_ETL_SLOW"
    rid = client.enqueue(etl, mapref, param1="slow")
    wait_until(lambda: client.request_status(etl, rid)["status"] == s.PROCESSING, 60, "the call to start")
    prcid = prclog(etl, rid)["prcid"]
    wait_until(lambda: probe_rows(etl, "BEAT", prcid) >= 2, 30, "the procedure to beat")
    if how == "stop":
        client.request_stop(etl, request_id=rid)
    final = finished(etl, rid, timeout=30)
    assert final["status"] == (s.CANCELLED if how == "stop" else s.FAILED)
    assert prclog(etl, rid)["status"] == (s.STOPPED if how == "stop" else s.LOG_FAILED)
    wait_until(lambda: _beats_stop(etl, prcid), 30, "the server-side call to end")
    assert probe_rows(etl, "ETL", prcid) == 0, "the call never reached its end"
