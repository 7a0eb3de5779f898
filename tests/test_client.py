"""The Python client a web application uses: it works inside the caller's transaction and writes the
same rows a plain INSERT would, leaving status, times and attempts to the database. Both backends.
"""
from __future__ import annotations

import json
from datetime import date, datetime, timedelta

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


# -- queue controls: priority and unique keys ------------------------------------------------------
def test_enqueue_writes_priority_and_unique_key_only_when_given(driver):
    rid = client.enqueue(driver.engine, "M_PRIO", priority=7, unique_key="order-1")
    (row,) = rows(driver.engine, s.prcreq.c.request_id == rid)
    assert (row["priority"], row["unique_key"]) == (7, "order-1")
    plain = client.enqueue(driver.engine, "M_PRIO")
    (row,) = rows(driver.engine, s.prcreq.c.request_id == plain)
    assert (row["priority"], row["unique_key"]) == (0, None)     # the database's default
    for bad in (True, 1.5, "3", 2 ** 31):
        with pytest.raises(ValueError, match="priority"):
            client.enqueue(driver.engine, "M_PRIO", priority=bad)
    for bad in ("", "  ", "k" * 201):
        with pytest.raises(ValueError, match="unique_key"):
            client.enqueue(driver.engine, "M_PRIO", unique_key=bad)
    assert count(driver.engine) == 2


def test_a_second_request_with_a_held_unique_key_is_merged_or_refused(driver):
    engine = driver.engine
    first = client.enqueue(engine, "M_UNIQUE", unique_key="click-42", param1="A")
    assert client.enqueue(engine, "M_UNIQUE", unique_key="click-42", param1="B") == first     # merged
    with pytest.raises(client.DuplicateRequest) as refused:
        client.enqueue(engine, "M_UNIQUE", unique_key="click-42", on_duplicate="refuse")
    assert refused.value.request_id == first and "click-42" in str(refused.value)
    assert count(engine) == 1
    # Held while running, too.
    with engine.begin() as conn:
        conn.execute(sa.update(s.prcreq).values(status=s.PROCESSING, claimed_by="w"))
    assert client.enqueue(engine, "M_UNIQUE", unique_key="click-42") == first
    # Free again once the holder has ended.
    with engine.begin() as conn:
        conn.execute(sa.update(s.prcreq).values(status=s.DONE, claimed_by=None))
    second = client.enqueue(engine, "M_UNIQUE", unique_key="click-42")
    assert second != first and count(engine) == 2
    # A duplicate request_id is still the caller's error, not a merge.
    with pytest.raises(sa.exc.IntegrityError):
        client.enqueue(engine, "M_UNIQUE", unique_key="other", request_id=second)


def test_the_database_refuses_a_second_holder_of_a_unique_key_whoever_inserts(driver):
    """The guarantee is the partial unique index, not the client: a plain INSERT is refused."""
    client.enqueue(driver.engine, "M_UNIQUE", unique_key="k")
    with pytest.raises(sa.exc.IntegrityError):
        with driver.engine.begin() as conn:
            conn.execute(sa.insert(s.prcreq).values(request_id="plain", mapref="M_UNIQUE", request_type=s.IMMEDIATE,
                                                    unique_key="k"))


def test_a_merged_enqueue_leaves_the_callers_transaction_usable(driver):
    """On PostgreSQL any error aborts the transaction: the merge must not raise one inside it."""
    client.enqueue(driver.engine, "M_UNIQUE", unique_key="k")
    with driver.engine.connect() as conn:
        with conn.begin():
            merged = client.enqueue(conn, "M_UNIQUE", unique_key="k")
            mine = client.enqueue(conn, "M_AFTER")           # the caller's transaction goes on
        assert merged != mine
    assert {r["mapref"] for r in rows(driver.engine)} == {"M_UNIQUE", "M_AFTER"}


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_unique_key_conflicts_through_a_savepoint_as_on_oracle(driver, monkeypatch):
    """Where there is no ON CONFLICT (Oracle: ORA-00001 arrives as IntegrityError), a savepoint
    contains the violation. Exercised on PostgreSQL, which aborts a transaction on any error."""
    monkeypatch.setattr(client, "_UPSERT_DIALECTS", set())
    first = client.enqueue(driver.engine, "M_SP", unique_key="k")
    with driver.engine.connect() as conn:
        with conn.begin():
            assert client.enqueue(conn, "M_SP", unique_key="k") == first
            with pytest.raises(client.DuplicateRequest):
                client.enqueue(conn, "M_SP", unique_key="k", on_duplicate="refuse")
            client.enqueue(conn, "M_SP_AFTER")             # still usable
        with pytest.raises(sa.exc.IntegrityError):        # not a unique-key conflict: raised as it is
            with conn.begin():
                client.enqueue(conn, "M_SP", unique_key="other", request_id=first)
    assert count(driver.engine) == 2


# -- operator actions --------------------------------------------------------------------------------
def set_row(engine, request_id, **values):
    with engine.begin() as conn:
        conn.execute(sa.update(s.prcreq).where(s.prcreq.c.request_id == request_id).values(**values))


def test_retry_returns_a_failed_request_to_new_with_attempts_reset_and_a_trace(driver):
    engine = driver.engine
    rid = client.enqueue(engine, "M_RETRY", param1="X")
    set_row(engine, rid, status=s.FAILED, attempts=3, claimed_by="w1", completed_at=driver.now(),
            result_payload='{"error": "boom"}')
    before = driver.now()
    client.retry(engine, rid, by="alice")
    (row,) = rows(engine, s.prcreq.c.request_id == rid)
    assert row["status"] == s.NEW and row["attempts"] == 0
    assert row["claimed_by"] is None and row["completed_at"] is None
    assert row["not_before"] >= before - timedelta(milliseconds=2)       # due now, by the database clock
    assert json.loads(row["result_payload"]) == {"retried": {"by": "alice", "previous_status": "FAILED",
                                                             "previous_result": {"error": "boom"}}}
    assert json.loads(row["payload"]) == {"param1": "X"}                  # what it runs is unchanged


@pytest.mark.parametrize("status", [s.NEW, s.CLAIMED, s.PROCESSING, s.DONE])
def test_retry_is_refused_unless_failed_or_cancelled(driver, status):
    rid = client.enqueue(driver.engine, "M_RETRY")
    set_row(driver.engine, rid, status=status)
    with pytest.raises(client.ActionRefused, match=status):
        client.retry(driver.engine, rid)
    assert rows(driver.engine, s.prcreq.c.request_id == rid)[0]["status"] == status
    with pytest.raises(LookupError):
        client.retry(driver.engine, "missing")


def test_retry_of_a_stop_request_or_while_its_unique_key_is_held_is_refused(driver):
    engine = driver.engine
    stop = client.request_stop(engine, mapref="M")
    set_row(engine, stop, status=s.FAILED)
    with pytest.raises(client.ActionRefused, match="STOP"):
        client.retry(engine, stop)
    old = client.enqueue(engine, "M_KEY", unique_key="k")
    client.cancel(engine, old)
    holder = client.enqueue(engine, "M_KEY", unique_key="k")
    with pytest.raises(client.ActionRefused, match=holder):
        client.retry(engine, old)
    client.cancel(engine, holder)
    client.retry(engine, old)
    assert rows(engine, s.prcreq.c.request_id == old)[0]["status"] == s.NEW


def test_cancel_ends_a_waiting_request_only(driver):
    engine = driver.engine
    rid = client.enqueue(engine, "M_CANCEL")
    client.cancel(engine, rid, by="bob")
    (row,) = rows(engine, s.prcreq.c.request_id == rid)
    assert row["status"] == s.CANCELLED and row["completed_at"] is not None
    assert json.loads(row["result_payload"]) == {"cancelled": "cancelled by bob"}
    with pytest.raises(client.ActionRefused, match="already ended"):
        client.cancel(engine, rid)
    running = client.enqueue(engine, "M_CANCEL")
    set_row(engine, running, status=s.PROCESSING, claimed_by="w1")
    with pytest.raises(client.ActionRefused, match="stop it instead"):
        client.cancel(engine, running)
    with pytest.raises(LookupError):
        client.cancel(engine, "missing")


def test_stop_asks_for_a_stop_of_a_running_request_only(driver):
    engine = driver.engine
    rid = client.enqueue(engine, "M_STOP")
    with pytest.raises(client.ActionRefused, match="cancel it instead"):
        client.stop(engine, rid)
    set_row(engine, rid, status=s.PROCESSING, claimed_by="w1")
    stop_id = client.stop(engine, rid)
    (row,) = rows(engine, s.prcreq.c.request_id == stop_id)
    assert (row["request_type"], row["mapref"], json.loads(row["payload"])) == (s.STOP, "M_STOP", {"request_id": rid})
    set_row(engine, rid, status=s.DONE)
    with pytest.raises(client.ActionRefused, match="already ended"):
        client.stop(engine, rid)


def test_pause_and_resume_set_the_flag_and_name_a_missing_job(driver):
    engine = driver.engine
    client.register_job(engine, "M_PAUSE", "worker.jobs.builtin:noop")
    client.pause_job(engine, "M_PAUSE")
    with engine.connect() as conn:
        assert conn.execute(sa.select(s.job.c.paused)).scalar_one() == "Y"
    client.register_job(engine, "M_PAUSE", "worker.jobs.builtin:noop", description="edited")
    with engine.connect() as conn:
        assert conn.execute(sa.select(s.job.c.paused)).scalar_one() == "Y", "a re-registration keeps the pause"
    client.resume_job(engine, "M_PAUSE")
    with engine.connect() as conn:
        assert conn.execute(sa.select(s.job.c.paused)).scalar_one() == "N"
    with pytest.raises(LookupError, match="NOPE"):
        client.pause_job(engine, "NOPE")


def test_update_job_changes_only_the_fields_given(driver):
    engine = driver.engine
    with pytest.raises(LookupError, match="handler"):
        client.update_job(engine, "M_UPD", timeout_s=5)
    assert client.update_job(engine, "M_UPD", handler="worker.jobs.csv:export", params={"path": "out.csv"},
                             max_attempts=3, retry_delay_s=9) is True
    assert client.update_job(engine, "M_UPD", timeout_s=7200) is False
    with engine.connect() as conn:
        job = dict(conn.execute(sa.select(s.job)).mappings().one())
    assert job == dict(mapref="M_UPD", handler="worker.jobs.csv:export", timeout_s=7200, max_attempts=3,
                       retry_delay_s=9, allow_overlap="N", enabled="Y", description=None,
                       params='{"path": "out.csv"}', paused="N")
    client.update_job(engine, "M_UPD", params=None, allow_overlap=True, timeout_s=None)
    with engine.connect() as conn:
        job = dict(conn.execute(sa.select(s.job)).mappings().one())
    assert (job["params"], job["allow_overlap"], job["timeout_s"], job["max_attempts"]) == (None, "Y", None, 3)
    with pytest.raises(ValueError, match="max_attempts"):
        client.update_job(engine, "M_UPD", max_attempts=0)
    with pytest.raises(ValueError, match="params"):
        client.update_job(engine, "M_UPD", params=["not", "an", "object"])


def test_handler_problem_names_what_cannot_be_imported():
    assert client.handler_problem("worker.jobs.builtin:noop") is None
    assert client.handler_problem("sql:MY_PROC") is None
    assert "No module named 'no_such_module'" in client.handler_problem("no_such_module:f")
    assert "no callable 'nothing'" in client.handler_problem("worker.jobs.builtin:nothing")
    assert "not 'package.module:function'" in client.handler_problem("just_a_name")


def test_schedule_enable_and_disable_flip_schflg_and_ask_the_leader_to_reread(driver):
    engine = driver.engine
    with engine.begin() as conn:
        jobschid = conn.execute(sa.insert(s.jobsch).values(
            mapref="M_SCH", frqcd="DL", frqhh=2, frqmi=0, schflg="Y", curflg="Y", misfire="LATEST",
            lst_run_dt=datetime(2020, 1, 1)).returning(s.jobsch.c.jobschid)).scalar_one()
    client.disable_schedule(engine, jobschid)
    refresh = rows(engine, s.prcreq.c.request_type == s.REFRESH_SCHEDULE)
    assert len(refresh) == 1 and refresh[0]["mapref"] == "M_SCH"
    with engine.connect() as conn:
        row = conn.execute(sa.select(s.jobsch)).mappings().one()
    assert row["schflg"] == "N" and row["lst_run_dt"] == datetime(2020, 1, 1)
    before = driver.now()
    client.enable_schedule(engine, jobschid)
    with engine.connect() as conn:
        row = conn.execute(sa.select(s.jobsch)).mappings().one()
    # Occurrences that fell while it was disabled are not owed: no catch-up run on enabling.
    assert row["schflg"] == "Y" and row["lst_run_dt"] >= before - timedelta(milliseconds=2)
    assert len(rows(engine, s.prcreq.c.request_type == s.REFRESH_SCHEDULE)) == 2
    with pytest.raises(LookupError):
        client.enable_schedule(engine, 999999)
