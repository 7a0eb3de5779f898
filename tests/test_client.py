"""The Python client a web application uses: it works inside the caller's transaction and writes the
same rows a plain INSERT would, leaving status, times and attempts to the database. Both backends.
"""
from __future__ import annotations

import json
from datetime import date, timedelta

import pytest
import sqlalchemy as sa

from worker import client
from worker import schema as s


@pytest.fixture
def observer(driver):
    """Another client's engine. (Not the driver's: on SQLite that one starts every transaction,
    reads included, with BEGIN IMMEDIATE and would wait for the caller's open transaction.)"""
    engine = sa.create_engine(driver.url)
    yield engine
    engine.dispose()


def rows(engine, *where):
    with engine.connect() as conn:
        return conn.execute(sa.select(s.prcreq).where(*where)).mappings().all()


def count(engine, table=s.prcreq):
    with engine.connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(table)).scalar_one()


def test_enqueue_in_a_rolled_back_transaction_leaves_no_row(driver, observer):
    engine = driver.engine
    with engine.connect() as conn:
        trans = conn.begin()
        rid = client.enqueue(conn, "M_ROLLBACK", param1="X")
        # Written in the caller's transaction: visible there, invisible elsewhere until commit.
        assert conn.execute(sa.select(s.prcreq.c.mapref).where(s.prcreq.c.request_id == rid)).scalar() == "M_ROLLBACK"
        assert rows(observer, s.prcreq.c.request_id == rid) == []
        trans.rollback()
    assert rows(engine, s.prcreq.c.request_id == rid) == []
    assert count(engine) == 0


def test_enqueue_committed_row_gets_its_defaults_from_the_database(driver):
    engine = driver.engine
    statements: list[str] = []

    def capture(conn, cursor, statement, parameters, context, executemany):  # noqa: ANN001
        if statement.lstrip().upper().startswith("INSERT"):
            statements.append(statement)

    before = driver.now()
    sa.event.listen(engine, "before_cursor_execute", capture)
    try:
        with engine.connect() as conn:
            with conn.begin():
                rid = client.enqueue(conn, "M_COMMIT", param1="X", truncate_flag="Y")
            assert rows(engine, s.prcreq.c.request_id == rid), "committed by the caller: visible to others"
    finally:
        sa.event.remove(engine, "before_cursor_execute", capture)
    after = driver.now()

    # The insert is what any other client would write: the four SPEC columns and nothing else.
    assert len(statements) == 1
    inserted = statements[0].split("(", 1)[1].split(")", 1)[0]
    assert {c.strip().strip('"') for c in inserted.split(",")} == {"request_id", "mapref", "request_type", "payload"}

    (row,) = rows(engine, s.prcreq.c.request_id == rid)
    assert row["status"] == s.NEW
    assert row["attempts"] == 0
    assert row["request_type"] == s.IMMEDIATE
    assert json.loads(row["payload"]) == {"param1": "X", "truncate_flag": "Y"}
    assert row["claimed_by"] is None and row["claimed_at"] is None and row["completed_at"] is None
    # Set by the database clock (UTC), between two readings of that clock.
    slack = timedelta(milliseconds=2)      # SQLite keeps milliseconds
    for col in ("requested_at", "not_before"):
        assert row[col] is not None, col
        assert before - slack <= row[col] <= after + slack, (col, before, row[col], after)


def test_enqueue_without_params_stores_a_null_payload_and_rejects_unknown_types(driver):
    rid = client.enqueue(driver.engine, "M_EMPTY")
    assert rows(driver.engine, s.prcreq.c.request_id == rid)[0]["payload"] is None
    with pytest.raises(ValueError, match="request_type"):
        client.enqueue(driver.engine, "M_EMPTY", request_type="WHENEVER")
    assert count(driver.engine) == 1


def test_enqueue_history_writes_start_and_end_dates(driver):
    rid = client.enqueue_history(driver.engine, "M_HIST", date(2026, 1, 30), "2026-02-02", truncate_flag="Y")
    (row,) = rows(driver.engine, s.prcreq.c.request_id == rid)
    assert row["request_type"] == s.HISTORY
    assert json.loads(row["payload"]) == {"start_date": "2026-01-30", "end_date": "2026-02-02", "truncate_flag": "Y"}


def test_request_stop_by_request_id_names_the_target_and_uses_its_mapref(driver):
    engine = driver.engine
    target = client.enqueue(engine, "M_TARGET")
    stop = client.request_stop(engine, request_id=target)
    assert stop != target
    (row,) = rows(engine, s.prcreq.c.request_id == stop)
    assert row["request_type"] == s.STOP
    assert row["mapref"] == "M_TARGET"
    assert json.loads(row["payload"]) == {"request_id": target}
    assert row["status"] == s.NEW
    # The target itself is untouched: the worker applies the STOP.
    assert rows(engine, s.prcreq.c.request_id == target)[0]["status"] == s.NEW


def test_request_stop_by_mapref_and_in_the_callers_transaction(driver):
    with driver.engine.connect() as conn:
        trans = conn.begin()
        target = client.enqueue(conn, "M_SAME_TX")
        stop = client.request_stop(conn, request_id=target)    # sees the uncommitted target
        by_mapref = client.request_stop(conn, mapref="M_OTHER")
        trans.rollback()
    assert rows(driver.engine, s.prcreq.c.request_id.in_([target, stop, by_mapref])) == []
    rid = client.request_stop(driver.engine, mapref="M_OTHER")
    (row,) = rows(driver.engine, s.prcreq.c.request_id == rid)
    assert (row["request_type"], row["mapref"], row["payload"]) == (s.STOP, "M_OTHER", None)


def test_request_stop_for_an_unknown_request_raises_lookup_error_and_writes_nothing(driver):
    with pytest.raises(LookupError, match="no-such-request"):
        client.request_stop(driver.engine, request_id="no-such-request")
    with pytest.raises(ValueError):
        client.request_stop(driver.engine)
    assert count(driver.engine) == 0


def test_register_job_twice_updates_rather_than_duplicates(driver):
    engine = driver.engine
    client.register_job(engine, "M_JOB", "worker.jobs.builtin:noop", description="first")
    client.register_job(engine, "M_JOB", "worker.jobs.builtin:noop", description="first")   # identical: still one
    client.register_job(engine, "M_JOB", "worker.jobs.builtin:sleep", timeout_s=30, max_attempts=3,
                        retry_delay_s=5, allow_overlap=True, enabled=False, description="second")
    with engine.connect() as conn:
        jobs = conn.execute(sa.select(s.job).where(s.job.c.mapref == "M_JOB")).mappings().all()
    assert len(jobs) == 1 and count(engine, s.job) == 1
    assert dict(jobs[0]) == dict(mapref="M_JOB", handler="worker.jobs.builtin:sleep", timeout_s=30, max_attempts=3,
                                 retry_delay_s=5, allow_overlap="Y", enabled="N", description="second", params=None,
                                 paused="N")
    # And the job definition the worker reads back agrees.
    job = driver.job_get_many(["M_JOB"])["M_JOB"]
    assert (job.handler, job.allow_overlap, job.enabled, job.max_attempts) == (
        "worker.jobs.builtin:sleep", True, False, 3)


def test_an_engine_argument_commits_by_itself(driver):
    engine = driver.engine
    rid = client.enqueue(engine, "M_ENGINE")
    client.register_job(engine, "M_ENGINE", "worker.jobs.builtin:noop")
    # A brand-new engine (other connections, other pool) sees both at once.
    other = sa.create_engine(driver.url)
    try:
        with other.connect() as conn:
            assert conn.execute(sa.select(s.prcreq.c.status).where(s.prcreq.c.request_id == rid)).scalar() == s.NEW
            assert conn.execute(sa.select(s.job.c.handler).where(s.job.c.mapref == "M_ENGINE")).scalar() == \
                "worker.jobs.builtin:noop"
    finally:
        other.dispose()
    assert client.request_status(engine, rid)["mapref"] == "M_ENGINE"
    assert client.request_status(engine, "missing") is None
