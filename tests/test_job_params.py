"""Handler parameters: DMS_JOB.params, overridden per schedule, overridden per request; and
stored procedures (`sql:` handlers) reporting row counts, stopped and timed out mid-call."""
from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from tests.support import Replica, wait_until
from worker import client
from worker import schema as s

pytestmark = pytest.mark.slow
FAST = dict(SCHEDULER_POLL_INTERVAL="0.5", DMS_HEARTBEAT_INTERVAL="0.5", DMS_RESCUE_AFTER="3",
            SCHEDULER_REFRESH_INTERVAL="1")


def result(engine, rid):
    row = client.request_status(engine, rid)
    return json.loads(row["result_payload"])["result"]


def test_request_overrides_schedule_overrides_job(db_url, replicas):
    engine = sa.create_engine(db_url)
    client.register_job(engine, "ECHO", "tests.handlers:echo", allow_overlap=True,
                        params={"param2": "job", "param3": "job", "path": "/data/{as_of}.csv"})
    (r,) = replicas(1, **FAST)
    r.wait_registered(engine)
    rid = client.enqueue(engine, "ECHO", param3="request")
    wait_until(lambda: client.request_status(engine, rid)["status"] == "DONE", 30, "the request")
    got = result(engine, rid)
    assert (got["param2"], got["param3"]) == ("job", "request")
    assert got["payload"]["path"] == "/data/{as_of}.csv"
    with engine.begin() as conn:
        jid = conn.execute(sa.insert(s.jobsch).values(
            mapref="ECHO", frqcd="CRON", cronexp="* * * * * *", misfire="SKIP", schflg="Y", curflg="Y",
            params=json.dumps({"param3": "schedule"})).returning(s.jobsch.c.jobschid)).scalar_one()

    def occurrence_done():
        with engine.connect() as conn:
            return conn.execute(sa.select(s.prcreq.c.request_id).where(
                s.prcreq.c.jobschid == jid, s.prcreq.c.status == "DONE")).scalar()

    occ = wait_until(occurrence_done, 30, "a scheduled occurrence")
    got = result(engine, occ)
    assert (got["param2"], got["param3"]) == ("job", "schedule")
    # Bad JSON in DMS_JOB.params fails the request with the reason; the replica carries on.
    client.register_job(engine, "ECHO_BAD", "tests.handlers:echo")
    with engine.begin() as conn:
        conn.execute(sa.update(s.job).where(s.job.c.mapref == "ECHO_BAD").values(params="{oops"))
    bad = client.enqueue(engine, "ECHO_BAD")
    wait_until(lambda: client.request_status(engine, bad)["status"] == "FAILED", 30, "the failure")
    assert "DMS_JOB.params of 'ECHO_BAD'" in client.request_status(engine, bad)["result_payload"]
    engine.dispose()


PROC = """
CREATE OR REPLACE PROCEDURE dms_test_etl(p_prcid bigint, p1 varchar, p2 varchar, p3 varchar, p4 varchar,
    p5 varchar, p6 varchar, p7 varchar, p8 varchar, p9 varchar, p10 varchar,
    INOUT src bigint, INOUT trg bigint, INOUT err bigint)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_sleep(coalesce(p1, '0')::float);
    src := 100; trg := 97; err := 3;
END $$"""


@pytest.fixture
def etl(pg_url, tmp_path):
    engine = sa.create_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(sa.text(PROC))
    client.register_job(engine, "ETL", "sql:dms_test_etl", params={"counts": True})
    client.register_job(engine, "ETL_SLOW", "sql:dms_test_etl", params={"counts": True}, timeout_s=2)
    r = Replica(pg_url, "etl", tmp_path, **FAST).start()
    r.wait_registered(engine)
    yield engine
    r.stop()
    engine.dispose()


def _running_calls(engine):
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'CALL dms_test_etl%' "
                                    "AND state = 'active' AND datname = current_database()")).scalar()


def test_a_procedure_reports_its_row_counts(etl):
    rid = client.enqueue(etl, "ETL", param1="0")
    wait_until(lambda: client.request_status(etl, rid)["status"] in ("DONE", "FAILED"), 30, "the call")
    assert client.request_status(etl, rid)["status"] == "DONE"
    with etl.connect() as conn:
        jl = conn.execute(sa.select(s.joblog).join(s.prclog, s.prclog.c.prcid == s.joblog.c.prcid)
                          .where(s.prclog.c.request_id == rid)).one()
    assert (jl.srcrows, jl.trgrows, jl.errrows) == (100, 97, 3)


def test_stop_and_timeout_cancel_a_long_procedure_call(etl):
    rid = client.enqueue(etl, "ETL", param1="300")
    wait_until(lambda: _running_calls(etl) == 1, 30, "the procedure to run")
    client.request_stop(etl, request_id=rid)
    wait_until(lambda: client.request_status(etl, rid)["status"] == "CANCELLED", 15, "the stop")
    wait_until(lambda: _running_calls(etl) == 0, 5, "the server-side call to end")
    slow = client.enqueue(etl, "ETL_SLOW", param1="300")
    wait_until(lambda: client.request_status(etl, slow)["status"] == "FAILED", 30, "the timeout")
    assert "timeout" in client.request_status(etl, slow)["result_payload"]
    wait_until(lambda: _running_calls(etl) == 0, 5, "the server-side call to end")


@pytest.mark.parametrize("how", ["stop", "timeout"])
def test_stop_and_timeout_during_a_long_export(pg_url, tmp_path, how):
    engine = sa.create_engine(pg_url)
    target = tmp_path / "out" / "slow.csv"
    client.register_job(engine, "SLOW_EXPORT", "worker.jobs.csv:export", timeout_s=3 if how == "timeout" else None,
                        params={"query": "SELECT g, pg_sleep(0.005) AS s FROM generate_series(1, 100000) g",
                                "path": str(target), "batch_size": 50})
    r = Replica(pg_url, f"exp{how}", tmp_path, DMS_FILE_ROOTS=str(tmp_path), **FAST).start()
    try:
        r.wait_registered(engine)
        rid = client.enqueue(engine, "SLOW_EXPORT")

        def session():
            with engine.connect() as conn:
                return conn.execute(sa.select(s.prclog.c.sessionid).where(s.prclog.c.request_id == rid)).scalar()

        def alive(pid):
            with engine.connect() as conn:
                return conn.execute(sa.text("SELECT count(*) FROM pg_stat_activity WHERE pid = :p"), {"p": pid}).scalar()

        pid = int(wait_until(session, 30, "the export's database session"))
        wait_until(lambda: list(target.parent.glob(".*.tmp")), 30, "the export to be writing")
        if how == "stop":
            client.request_stop(engine, request_id=rid)
        final = "CANCELLED" if how == "stop" else "FAILED"
        wait_until(lambda: client.request_status(engine, rid)["status"] == final, 20, f"the {how}")
        wait_until(lambda: not alive(pid), 5, "the export's database session to end")
        assert not target.exists(), "no half-written file under the target name"
        wait_until(lambda: not list(target.parent.glob(".*.tmp")), 5, "the temporary file to be removed")
    finally:
        r.stop()
        engine.dispose()


def test_a_run_waits_while_an_earlier_runs_call_still_holds_its_mapref_on_the_server(etl):
    """Issue 12.6: a stopped run's server session may go on with its call; the next run of the
    mapref waits for that session's lock, handed back without using an attempt meanwhile."""
    from worker.drivers import make_driver
    driver = make_driver(etl.url.render_as_string(hide_password=False))
    held = driver.engine.connect()
    try:
        assert driver.execution_lock(held, "ETL", timeout_s=0)     # the earlier call, still on the server
        rid = client.enqueue(etl, "ETL", param1="0")
        wait_until(lambda: "still running on the database server" in (_prclog_msgs(etl, rid) or ""), 30,
                   "the run to find the mapref busy")
        row = client.request_status(etl, rid)
        assert row["status"] in ("NEW", "PROCESSING") and row["attempts"] <= 1
        driver.execution_unlock(held, "ETL")
        wait_until(lambda: client.request_status(etl, rid)["status"] == "DONE", 30, "the run once the call ended")
    finally:
        held.close()
        driver.dispose()


def _prclog_msgs(engine, rid):
    with engine.connect() as conn:
        return " ".join(m or "" for m in conn.execute(sa.select(s.prclog.c.msg).where(s.prclog.c.request_id == rid)).scalars())
