"""One conformance suite, run against every driver (the ``driver`` fixture is parametrised).

Each test states a property of a driver verb that the core logic relies on.
"""
from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa

from worker import client
from worker import schema as s
from worker.drivers.base import (ClaimParams, ExecutionFinish, ExecutionStart, JobDef, Reject, RequestResolve,
                                 StartRefused, WorkerInfo)

W1, W2 = "w1:1:aa", "w2:2:bb"


def _register(driver, *workers):
    for w in workers:
        driver.worker_register(WorkerInfo(worker_id=w, host="h", pid=1, version="t", slots=4))


def _enqueue(driver, n, mapref="M", **kw):
    with driver.engine.begin() as conn:
        return [client.enqueue(conn, mapref, **kw) for _ in range(n)]


def _row(driver, rid):
    return client.request_status(driver.engine, rid)


def _start(driver, req, worker=W1, exclusive=True, param1=None):
    return driver.execution_start_many([ExecutionStart(req.request_id, worker, req.mapref, exclusive,
                                                       req.attempts, {"param1": param1})])[0]


def _finish(driver, req, prcid, worker=W1, status=s.DONE, log_status=s.COMPLETED, **kw):
    return driver.execution_finish_many([ExecutionFinish(req.request_id, worker, prcid, req.mapref, log_status,
                                                         request_status=status, **kw)])[0]


def test_clock_is_utc_now(driver):
    now = driver.now()
    assert now.tzinfo is None
    assert abs((now - datetime.utcnow()).total_seconds()) < 5


def test_claim_never_exceeds_the_job_limit_and_marks_rows(driver):
    _register(driver, W1)
    ids = _enqueue(driver, 5)
    claimed = driver.request_claim(ClaimParams(W1, job_limit=3))
    assert len(claimed) == 3
    assert [c.request_id for c in claimed] == ids[:3]            # queue order
    for c in claimed:
        row = _row(driver, c.request_id)
        assert (row["status"], row["claimed_by"], row["attempts"]) == (s.CLAIMED, W1, 1)
        assert row["claimed_at"] is not None
    assert len(driver.request_claim(ClaimParams(W1, job_limit=10))) == 2
    assert driver.request_claim(ClaimParams(W1, job_limit=10)) == []


def test_concurrent_claims_are_disjoint(driver):
    _enqueue(driver, 60)
    got: dict[str, list[str]] = {}
    barrier = threading.Barrier(3)

    def claim(worker):
        barrier.wait()
        mine = []
        while batch := driver.request_claim(ClaimParams(worker, job_limit=4)):
            mine += [c.request_id for c in batch]
        got[worker] = mine

    threads = [threading.Thread(target=claim, args=(f"w{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    all_ids = [rid for ids in got.values() for rid in ids]
    assert len(all_ids) == 60 and len(set(all_ids)) == 60


def test_control_requests_are_claimed_without_free_slots(driver):
    _enqueue(driver, 2)
    stop_id = _enqueue(driver, 1, request_type=s.STOP)[0]
    claimed = driver.request_claim(ClaimParams(W1, job_limit=0, control_types=(s.STOP,)))
    assert [c.request_id for c in claimed] == [stop_id]


def test_refresh_is_claimed_only_by_replicas_that_ask_for_it(driver):
    refresh = _enqueue(driver, 1, request_type=s.REFRESH_SCHEDULE)[0]
    assert driver.request_claim(ClaimParams(W1, job_limit=4, control_types=(s.STOP,))) == []
    claimed = driver.request_claim(ClaimParams(W1, job_limit=4, control_types=s.CONTROL_TYPES))
    assert [c.request_id for c in claimed] == [refresh]


def test_claim_respects_not_before(driver):
    rid = _enqueue(driver, 1)[0]
    with driver.begin() as conn:
        conn.execute(sa.update(s.prcreq).values(not_before=driver.clock(3600)))
    assert driver.request_claim(ClaimParams(W1, job_limit=4)) == []
    with driver.begin() as conn:
        conn.execute(sa.update(s.prcreq).values(not_before=driver.clock(-1)))
    assert [c.request_id for c in driver.request_claim(ClaimParams(W1, job_limit=4))] == [rid]


def test_a_plain_insert_of_four_columns_is_claimable(driver):
    with driver.begin() as conn:
        conn.execute(sa.text("INSERT INTO dms_prcreq (request_id, mapref, request_type, payload) "
                             "VALUES ('web-1', 'M', 'IMMEDIATE', '{\"param1\": \"x\"}')"))
    claimed = driver.request_claim(ClaimParams(W1, job_limit=1))
    assert [(c.request_id, c.payload) for c in claimed] == [("web-1", '{"param1": "x"}')]
    assert claimed[0].requested_at is not None


def test_one_running_execution_per_mapref_is_enforced_by_the_database(driver):
    _register(driver, W1, W2)
    _enqueue(driver, 2, mapref="EXCL")
    a = driver.request_claim(ClaimParams(W1, job_limit=1))[0]
    b = driver.request_claim(ClaimParams(W2, job_limit=1))[0]
    assert isinstance(_start(driver, a, W1), int)
    assert _start(driver, b, W2) is StartRefused.BUSY
    # Bypass the check the driver makes first: the unique index itself refuses.
    with pytest.raises(sa.exc.IntegrityError):
        with driver.begin() as conn:
            conn.execute(sa.update(s.prcreq).where(s.prcreq.c.request_id == b.request_id).values(excl_key="EXCL"))
    # While it runs, claims skip that mapref; once it ends, the other can run.
    driver.request_resolve_many([RequestResolve(b.request_id, W2, s.NEW, refund_attempt=True)])
    assert driver.request_claim(ClaimParams(W2, job_limit=4)) == []
    prcid = _start(driver, a, W1)
    assert _finish(driver, a, prcid)
    b2 = driver.request_claim(ClaimParams(W2, job_limit=4))
    assert [r.request_id for r in b2] == [b.request_id] and b2[0].attempts == 1
    assert isinstance(_start(driver, b2[0], W2), int)


def test_overlapping_executions_when_allowed(driver):
    _enqueue(driver, 2, mapref="OVER")
    a, b = driver.request_claim(ClaimParams(W1, job_limit=2))
    assert isinstance(_start(driver, a, exclusive=False), int)
    assert isinstance(_start(driver, b, exclusive=False), int)


def test_start_is_idempotent_and_refuses_lost_rows(driver):
    _enqueue(driver, 1)
    req = driver.request_claim(ClaimParams(W1, job_limit=1))[0]
    first = _start(driver, req)
    assert _start(driver, req) == first                      # replay after a lost acknowledgement
    assert _start(driver, req, worker=W2) is StartRefused.LOST


def test_finish_writes_logs_atomically_and_only_for_the_owner(driver):
    _register(driver, W1)
    _enqueue(driver, 1, mapref="F")
    req = driver.request_claim(ClaimParams(W1, job_limit=1))[0]
    prcid = _start(driver, req)
    assert not _finish(driver, req, prcid, worker=W2)       # not the owner: nothing written
    with driver.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(s.joblog)).scalar() == 0
        assert conn.execute(sa.select(s.prclog.c.status).where(s.prclog.c.prcid == prcid)).scalar() == s.IN_PROGRESS
    assert _finish(driver, req, prcid, status=s.FAILED, log_status=s.LOG_FAILED, srcrows=10, trgrows=8,
                   rejects=(Reject("k1", "bad", "ORA-1"), Reject("k2", "worse")),
                   error=("EXECUTION", "boom", None), result_payload='{"error":"boom"}')
    row = _row(driver, req.request_id)
    assert (row["status"], row["excl_key"], row["result_payload"]) == (s.FAILED, None, '{"error":"boom"}')
    assert row["completed_at"] is not None
    with driver.engine.connect() as conn:
        log = conn.execute(sa.select(s.prclog).where(s.prclog.c.prcid == prcid)).one()
        jl = conn.execute(sa.select(s.joblog).where(s.joblog.c.prcid == prcid)).one()
        errs = conn.execute(sa.select(s.joberr).where(s.joberr.c.prcid == prcid).order_by(s.joberr.c.errid)).all()
    assert log.status == s.LOG_FAILED and log.enddt is not None and log.request_id == req.request_id
    assert (jl.srcrows, jl.trgrows, jl.errrows) == (10, 8, 2)
    assert [(e.errtyp, e.keyvalue, e.joblogid) for e in errs] == [
        ("RECORD", "k1", jl.joblogid), ("RECORD", "k2", jl.joblogid), ("EXECUTION", None, jl.joblogid)]
    assert not _finish(driver, req, prcid)                   # already finished: a replay writes nothing


def test_batched_starts_take_fresh_claims_and_sort_out_the_rest(driver):
    _register(driver, W1, W2)
    ids = _enqueue(driver, 4, mapref="BATCH")
    a, b, c, d = driver.request_claim(ClaimParams(W1, job_limit=4))
    first = _start(driver, a)                              # a: already started (a replay follows)
    starts = [ExecutionStart(r.request_id, W1, r.mapref, False, r.attempts, {"param1": f"p{i}", "param10": "z" * 300})
              for i, r in enumerate((a, b, c, d))]
    starts[0] = ExecutionStart(a.request_id, W1, a.mapref, True, a.attempts, {"param1": None})  # the replay
    starts[3] = ExecutionStart(d.request_id, W2, d.mapref, False, d.attempts, {})   # not W2's row
    results = driver.execution_start_many(starts)
    assert results[0] == first
    assert isinstance(results[1], int) and isinstance(results[2], int) and results[1] != results[2]
    assert results[3] is StartRefused.LOST
    with driver.engine.connect() as conn:
        logs = {r.request_id: r for r in conn.execute(sa.select(s.prclog)).all()}
    assert set(logs) == {a.request_id, b.request_id, c.request_id}
    assert (logs[b.request_id].prcid, logs[b.request_id].param1, logs[b.request_id].worker_id) == (results[1], "p1", W1)
    assert logs[c.request_id].param10 == "z" * 250 and logs[c.request_id].status == s.IN_PROGRESS
    assert [_row(driver, r)["status"] for r in ids] == [s.PROCESSING] * 3 + [s.CLAIMED]


def test_batched_exclusive_starts_of_one_mapref_run_one(driver):
    ids = _enqueue(driver, 3, mapref="SOLO")
    claimed = driver.request_claim(ClaimParams(W1, job_limit=3))
    assert len(claimed) == 3
    results = driver.execution_start_many([ExecutionStart(r.request_id, W1, r.mapref, True, 1, {}) for r in claimed])
    assert sum(isinstance(r, int) for r in results) == 1
    assert results.count(StartRefused.BUSY) == 2
    assert sorted(_row(driver, r)["status"] for r in ids) == [s.CLAIMED, s.CLAIMED, s.PROCESSING]


def test_batched_finishes_mix_plain_endings_retries_errors_and_strangers(driver):
    _register(driver, W1)
    ids = _enqueue(driver, 5, mapref="MIX")
    reqs = driver.request_claim(ClaimParams(W1, job_limit=5))
    prcids = driver.execution_start_many([ExecutionStart(r.request_id, W1, r.mapref, False, 1, {}) for r in reqs])
    f = [ExecutionFinish(r.request_id, W1, p, r.mapref, s.COMPLETED, request_status=s.DONE, msg="ok", srcrows=i,
                         sessionid="sess") for i, (r, p) in enumerate(zip(reqs, prcids))]
    f[1] = ExecutionFinish(reqs[1].request_id, W1, prcids[1], "MIX", s.LOG_FAILED, request_status=s.NEW, retry_delay_s=60)
    f[2] = ExecutionFinish(reqs[2].request_id, W1, prcids[2], "MIX", s.LOG_FAILED, request_status=s.FAILED,
                           error=("EXECUTION", "boom", None), result_payload='{"error":"boom"}')
    f[3] = ExecutionFinish(reqs[3].request_id, W2, prcids[3], "MIX", s.COMPLETED, request_status=s.DONE)  # not W2's
    assert driver.execution_finish_many(f) == [True, True, True, False, True]
    assert [_row(driver, r)["status"] for r in ids] == [s.DONE, s.NEW, s.FAILED, s.PROCESSING, s.DONE]
    with driver.engine.connect() as conn:
        logs = dict(conn.execute(sa.select(s.prclog.c.prcid, s.prclog.c.status)).all())
        joblogs = {r.prcid: r for r in conn.execute(sa.select(s.joblog)).all()}
        errors = conn.execute(sa.select(s.joberr.c.prcid, s.joberr.c.errmsg)).all()
    assert [logs[p] for p in prcids] == [s.COMPLETED, s.LOG_FAILED, s.LOG_FAILED, s.IN_PROGRESS, s.COMPLETED]
    assert sorted(joblogs) == sorted([prcids[0], prcids[1], prcids[2], prcids[4]])
    assert (joblogs[prcids[4]].srcrows, joblogs[prcids[4]].sessionid, joblogs[prcids[4]].mapref) == (4, "sess", "MIX")
    assert errors == [(prcids[2], "boom")]
    assert driver.execution_finish_many([f[0], f[4]]) == [False, False], "a replay writes nothing"
    with driver.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(s.joblog)).scalar() == 4


def test_retry_returns_to_new_with_a_not_before(driver):
    _enqueue(driver, 1)
    req = driver.request_claim(ClaimParams(W1, job_limit=1))[0]
    prcid = _start(driver, req)
    assert _finish(driver, req, prcid, status=s.NEW, log_status=s.LOG_FAILED, retry_delay_s=30)
    row = _row(driver, req.request_id)
    assert (row["status"], row["claimed_by"], row["attempts"]) == (s.NEW, None, 1)
    assert row["not_before"] > driver.now() + timedelta(seconds=20)
    assert driver.request_claim(ClaimParams(W1, job_limit=1)) == []


def test_rescue_requeues_stale_claims_and_closes_their_logs(driver):
    _register(driver, W1, W2)
    with driver.begin() as conn:
        client.register_job(conn, "R", "worker.jobs.builtin:noop", max_attempts=2)
    _enqueue(driver, 2, mapref="R")
    a = driver.request_claim(ClaimParams(W1, job_limit=1))[0]
    b = driver.request_claim(ClaimParams(W2, job_limit=1))[0]
    prcid = _start(driver, a, W1, exclusive=False)
    assert isinstance(_start(driver, b, W2, exclusive=False), int)
    # W1 stops heartbeating; W2 keeps going.
    with driver.begin() as conn:
        conn.execute(sa.update(s.worker).where(s.worker.c.worker_id == W1).values(heartbeat_at=driver.clock(-60)))
    result = driver.request_rescue(stale_after_s=10)
    assert result.requeued == (a.request_id,) and result.failed == () and result.workers_removed == (W1,)
    row = _row(driver, a.request_id)
    assert (row["status"], row["claimed_by"], row["excl_key"]) == (s.NEW, None, None)
    assert _row(driver, b.request_id)["status"] == s.PROCESSING
    with driver.engine.connect() as conn:
        assert conn.execute(sa.select(s.prclog.c.status).where(s.prclog.c.prcid == prcid)).scalar() == s.LOG_FAILED
        assert conn.execute(sa.select(s.joberr.c.errtyp).where(s.joberr.c.prcid == prcid)).scalar() == "RESCUE"
    assert not driver.worker_heartbeat(W1, 0)                # W1 learns it was declared dead
    assert not _finish(driver, a, prcid, worker=W1)          # and cannot complete the row any more
    # Second claim, second loss: out of attempts -> FAILED with the reason.
    a2 = driver.request_claim(ClaimParams(W2, job_limit=1))[0]
    assert a2.request_id == a.request_id and a2.attempts == 2
    with driver.begin() as conn:
        conn.execute(sa.update(s.worker).values(heartbeat_at=driver.clock(-60)))
    assert driver.request_rescue(stale_after_s=10).failed == (a.request_id,)
    assert "no attempts left" in _row(driver, a.request_id)["result_payload"]


def test_release_orphans_hands_back_unknown_claims(driver):
    _enqueue(driver, 3)
    claimed = driver.request_claim(ClaimParams(W1, job_limit=3))
    known = claimed[0].request_id
    released = driver.request_release_orphans(W1, [known])
    assert sorted(released) == sorted(c.request_id for c in claimed[1:])
    assert _row(driver, claimed[1].request_id)["attempts"] == 0
    assert _row(driver, known)["status"] == s.CLAIMED


def test_stop_cancels_new_and_flags_running(driver):
    queued, running = _enqueue(driver, 2, mapref="S")
    with driver.begin() as conn:
        conn.execute(sa.update(s.prcreq).where(s.prcreq.c.request_id == queued).values(not_before=driver.clock(600)))
    req = driver.request_claim(ClaimParams(W1, job_limit=1))[0]
    assert req.request_id == running
    _start(driver, req)
    assert driver.request_stop(target_request_id=queued, mapref="S", by="x").cancelled == (queued,)
    assert _row(driver, queued)["status"] == s.CANCELLED
    assert driver.requests_to_stop(W1) == []
    assert driver.request_stop(target_request_id=None, mapref="S", by="x").signalled == (running,)
    assert driver.requests_to_stop(W1) == [running]
    assert "already CANCELLED" in driver.request_stop(target_request_id=queued, mapref="S", by="x").reason
    assert "no request" in driver.request_stop(target_request_id="nope", mapref="S", by="x").reason
    assert "no running" in driver.request_stop(target_request_id=None, mapref="OTHER", by="x").reason


def test_history_days_done(driver):
    _enqueue(driver, 1, mapref="H")
    req = driver.request_claim(ClaimParams(W1, job_limit=1))[0]
    p1 = _start(driver, req, param1="2026-01-01")
    assert driver.execution_finish_many([ExecutionFinish(req.request_id, W1, p1, "H", s.COMPLETED)]) == [True]
    _start(driver, req, param1="2026-01-02")
    assert driver.history_days_done(req.request_id) == {"2026-01-01"}


def test_jobs_are_read_with_defaults(driver):
    with driver.begin() as conn:
        client.register_job(conn, "J", "worker.jobs.builtin:noop", timeout_s=5, allow_overlap=True)
        conn.execute(sa.text("INSERT INTO dms_job (mapref, handler) VALUES ('J2', 'sql:proc')"))
    jobs = driver.job_get_many(["J", "J2", "nope"])
    assert jobs["J"] == JobDef("J", "worker.jobs.builtin:noop", 5, 1, 60, True, True)
    assert jobs["J2"] == JobDef("J2", "sql:proc", None, 1, 60, False, True)
    assert "nope" not in jobs


def test_heartbeat_moves_with_the_database_clock(driver):
    _register(driver, W1)
    with driver.engine.connect() as conn:
        before = conn.execute(sa.select(s.worker.c.heartbeat_at)).scalar()
    time.sleep(0.01)
    assert driver.worker_heartbeat(W1, 2)
    with driver.engine.connect() as conn:
        after, running = conn.execute(sa.select(s.worker.c.heartbeat_at, s.worker.c.running)).one()
    assert after > before and running == 2
    driver.worker_unregister(W1)
    assert not driver.worker_heartbeat(W1, 0)


def test_listener_wakes_on_a_committed_insert(driver):
    listener = driver.listener()
    if listener is None:
        pytest.skip(f"{driver.name} has no wake-up channel; it polls")
    from multiprocessing.connection import wait
    try:
        listener.drain()
        with driver.engine.begin() as conn:
            conn.execute(sa.text("INSERT INTO dms_prcreq (request_id, mapref, request_type) VALUES ('n1','M','IMMEDIATE')"))
        assert wait([listener], 5), "no notification within 5 s"
        assert "dms_prcreq" in listener.drain()
    finally:
        listener.close()


def test_postgresql_schema_setting_reaches_every_connection(pg_url):
    """SCHEMA puts the tables in their own schema: pooled, claim and execution connections all
    find them through search_path."""
    from worker.drivers import make_driver
    from worker.migrate import migrate

    admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text('DROP SCHEMA IF EXISTS "dms alt" CASCADE'))
        conn.execute(sa.text('CREATE SCHEMA "dms alt"'))
    d = make_driver(pg_url, schema="dms alt")
    try:
        migrate(d)
        _register(d, W1)
        ids = _enqueue(d, 2, mapref="ALT")
        assert [r.request_id for r in d.request_claim(ClaimParams(W1, job_limit=2))] == ids
        with admin.connect() as conn:
            assert conn.execute(sa.text('SELECT count(*) FROM "dms alt".dms_prcreq WHERE status = \'CLAIMED\'')).scalar() == 2
            assert conn.execute(sa.text("SELECT count(*) FROM public.dms_prcreq")).scalar() == 0
    finally:
        d.dispose()
        with admin.connect() as conn:
            conn.execute(sa.text('DROP SCHEMA "dms alt" CASCADE'))
        admin.dispose()


def test_claim_takes_higher_priority_first_then_queue_order(driver):
    _register(driver, W1)
    low = _enqueue(driver, 2)
    with driver.engine.begin() as conn:
        urgent = client.enqueue(conn, "M")
        conn.execute(sa.update(s.prcreq).where(s.prcreq.c.request_id == urgent).values(priority=5))
    claimed = driver.request_claim(ClaimParams(W1, job_limit=2))
    assert [c.request_id for c in claimed] == [urgent, low[0]]


def test_claim_leaves_a_paused_jobs_requests_waiting(driver):
    _register(driver, W1)
    client.register_job(driver.engine, "HELD", "worker.jobs.builtin:noop")
    held = _enqueue(driver, 2, mapref="HELD")
    free = _enqueue(driver, 1, mapref="FREE")
    with driver.engine.begin() as conn:
        conn.execute(sa.update(s.job).where(s.job.c.mapref == "HELD").values(paused="Y"))
    assert [c.request_id for c in driver.request_claim(ClaimParams(W1, job_limit=5))] == free
    assert {_row(driver, r)["status"] for r in held} == {s.NEW}
    with driver.engine.begin() as conn:
        conn.execute(sa.update(s.job).where(s.job.c.mapref == "HELD").values(paused="N"))
    assert [c.request_id for c in driver.request_claim(ClaimParams(W1, job_limit=5))] == held
