"""sql: procedures and truncate_flag (issue 14, item 6), on PostgreSQL for real.

A procedure that takes exactly (prcid, param1..param10) must keep working; a job that opts in
(``"truncate_arg": true`` in DMS_JOB.params, wired by the executor) gets 'Y'/'N' as one more
argument after param10, before the optional row counts.
"""
from __future__ import annotations

import pytest
import sqlalchemy as sa

from worker.drivers import make_driver

ARGS = ", ".join(f"p{i} varchar" for i in range(1, 11))


@pytest.fixture
def pg(pg_url):
    driver = make_driver(pg_url)
    with driver.engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS dms_test_calls (prcid bigint, p1 varchar, truncate_flag varchar)")
        conn.exec_driver_sql("TRUNCATE dms_test_calls")
        conn.exec_driver_sql(f"""CREATE OR REPLACE PROCEDURE dms_test_plain(p_prcid bigint, {ARGS})
            LANGUAGE plpgsql AS $$ BEGIN INSERT INTO dms_test_calls VALUES (p_prcid, p1, NULL); END $$""")
        conn.exec_driver_sql(f"""CREATE OR REPLACE PROCEDURE dms_test_trunc(p_prcid bigint, {ARGS}, p_truncate varchar,
            INOUT src bigint, INOUT trg bigint, INOUT err bigint)
            LANGUAGE plpgsql AS $$ BEGIN INSERT INTO dms_test_calls VALUES (p_prcid, p1, p_truncate);
            src := 3; trg := 2; err := 1; END $$""")
    yield driver
    with driver.engine.begin() as conn:
        conn.exec_driver_sql("DROP PROCEDURE IF EXISTS dms_test_plain, dms_test_trunc")
        conn.exec_driver_sql("DROP TABLE IF EXISTS dms_test_calls")
    driver.dispose()


def test_a_procedure_that_opted_in_receives_the_truncate_flag_and_others_are_unchanged(pg):
    with pg.engine.begin() as conn:
        assert pg.procedure_call(conn, "dms_test_plain", [1, "2026-01-01"] + [None] * 9) is None
        assert pg.procedure_call(conn, "dms_test_trunc", [2, "2026-01-01"] + [None] * 9, counts=True,
                                 truncate_flag="Y") == (3, 2, 1)
        assert pg.procedure_call(conn, "dms_test_trunc", [3, "2026-01-02"] + [None] * 9, counts=True,
                                 truncate_flag="N") == (3, 2, 1)
    with pg.engine.connect() as conn:
        calls = conn.execute(sa.text("SELECT prcid, p1, truncate_flag FROM dms_test_calls ORDER BY prcid")).all()
    assert [tuple(c) for c in calls] == [(1, "2026-01-01", None), (2, "2026-01-01", "Y"), (3, "2026-01-02", "N")]


@pytest.mark.slow
def test_a_history_request_truncates_only_on_its_first_day_through_a_replica(pg, pg_url, tmp_path):
    from tests.support import Replica, wait_until
    from worker import client
    client.register_job(pg.engine, "TRUNC", "sql:dms_test_trunc", params={"counts": True, "truncate_arg": True})
    r = Replica(pg_url, "trunc", tmp_path, SCHEDULER_POLL_INTERVAL="0.5").start()
    try:
        rid = client.enqueue_history(pg.engine, "TRUNC", "2026-01-01", "2026-01-03", truncate_flag="Y")
        wait_until(lambda: client.request_status(pg.engine, rid)["status"] in ("DONE", "FAILED"), 30, "the days")
        assert client.request_status(pg.engine, rid)["status"] == "DONE", client.request_status(pg.engine, rid)
        with pg.engine.connect() as conn:
            calls = conn.execute(sa.text("SELECT p1, truncate_flag FROM dms_test_calls ORDER BY p1")).all()
        assert [tuple(c) for c in calls] == [("2026-01-01", "Y"), ("2026-01-02", "N"), ("2026-01-03", "N")]
    finally:
        r.stop()
