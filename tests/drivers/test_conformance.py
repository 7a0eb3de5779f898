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
from worker.drivers.base import (
    ClaimParams,
    ExecutionAnnotate,
    ExecutionFinish,
    ExecutionOpen,
    Heartbeat,
    JobDef,
    PruneParams,
    Reject,
    RequestResolve,
    RescueParams,
    StartRefused,
    StopParams,
    WorkerInfo,
)

W1, W2 = "w1:1:aa", "w2:2:bb"


def _register(driver, *workers, rescue_after_s=8.0):
    for w in workers:
        driver.worker_register(WorkerInfo(worker_id=w, host="h", pid=1, version="t", slots=4,
                                          rescue_after_s=rescue_after_s))


def _job(driver, mapref="M", overlap=False, **kw):
    client.register_job(driver.engine, mapref, "worker.jobs.builtin:noop", allow_overlap=overlap, **kw)


def _enqueue(driver, n, mapref="M", **kw):
    """``n`` requests, requested a millisecond apart (so that queue order is theirs)."""
    ids = []
    with driver.engine.begin() as conn:
        for i in range(n):
            ids.append(client.enqueue(conn, mapref, **kw))
            conn.execute(sa.update(s.prcreq).where(s.prcreq.c.request_id == ids[-1]).values(
                requested_at=driver.clock(-10 + i / 1000), not_before=driver.clock(-10 + i / 1000)))
    return ids


def _row(driver, rid):
    return client.request_status(driver.engine, rid)


def _log(driver, prcid):
    with driver.engine.connect() as conn:
        return conn.execute(sa.select(s.prclog).where(s.prclog.c.prcid == prcid)).one()


def _claim(driver, worker=W1, limit=4, **kw):
    return driver.request_claim(ClaimParams(worker, job_limit=limit, **kw))


def _finish(driver, req, worker=W1, status=s.DONE, log_status=s.COMPLETED, **kw):
    return driver.execution_finish_many([ExecutionFinish(req.request_id, worker, req.prcid, req.mapref, log_status,
                                                         request_status=status, **kw)])[0]


def test_clock_is_utc_now(driver):
    now = driver.now()
    assert now.tzinfo is None
    assert abs((now - datetime.utcnow()).total_seconds()) < 5


def test_claim_starts_runnable_requests_in_one_go(driver):
    _register(driver, W1)
    _job(driver, overlap=True, timeout_s=9)
    ids = _enqueue(driver, 5)
    claimed = _claim(driver, limit=3)
    assert [c.request_id for c in claimed] == ids[:3]            # queue order, never beyond the limit
    for c in claimed:
        row = _row(driver, c.request_id)
        assert (row["status"], row["claimed_by"], row["attempts"], row["excl_key"]) == (s.PROCESSING, W1, 1, None)
        assert c.started and c.job == JobDef("M", "worker.jobs.builtin:noop", 9, 1, 60, True, True)
        log = _log(driver, c.prcid)
        assert (log.status, log.request_id, log.worker_id, log.attempt, log.mapref) == (
            s.IN_PROGRESS, c.request_id, W1, 1, "M")
    assert len(_claim(driver, limit=10)) == 2
    assert _claim(driver, limit=10) == []


def test_concurrent_claims_are_disjoint(driver):
    _job(driver, overlap=True)
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
    with driver.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count(sa.distinct(s.prclog.c.request_id)))).scalar() == 60


def test_control_requests_are_claimed_without_free_slots(driver):
    _job(driver)
    _enqueue(driver, 2)
    stop_id = _enqueue(driver, 1, request_type=s.STOP)[0]
    claimed = _claim(driver, limit=0, control_types=(s.STOP,))
    assert [(c.request_id, c.started) for c in claimed] == [(stop_id, False)]
    assert _row(driver, stop_id)["status"] == s.CLAIMED


def test_refresh_is_claimed_only_by_replicas_that_ask_for_it(driver):
    refresh = _enqueue(driver, 1, request_type=s.REFRESH_SCHEDULE)[0]
    assert _claim(driver, control_types=(s.STOP,)) == []
    claimed = _claim(driver, control_types=s.CONTROL_TYPES)
    assert [c.request_id for c in claimed] == [refresh]


def test_claim_respects_not_before(driver):
    _job(driver)
    rid = _enqueue(driver, 1)[0]
    with driver.begin() as conn:
        conn.execute(sa.update(s.prcreq).values(not_before=driver.clock(3600)))
    assert _claim(driver) == []
    with driver.begin() as conn:
        conn.execute(sa.update(s.prcreq).values(not_before=driver.clock(-1)))
    assert [c.request_id for c in _claim(driver)] == [rid]


def test_a_plain_insert_of_four_columns_is_claimable(driver):
    _job(driver)
    with driver.begin() as conn:
        conn.execute(sa.text("INSERT INTO dms_prcreq (request_id, mapref, request_type, payload) "
                             "VALUES ('web-1', 'M', 'IMMEDIATE', '{\"param1\": \"x\"}')"))
    claimed = _claim(driver, limit=1)
    assert [(c.request_id, c.payload, c.started) for c in claimed] == [("web-1", '{"param1": "x"}', True)]
    assert claimed[0].requested_at is not None


def test_requests_that_cannot_run_come_back_claimed_and_unstarted(driver):
    _job(driver, "OFF", enabled=False)
    _job(driver, "ON")
    with driver.begin() as conn:
        nojob = client.enqueue(conn, "NOJOB")
        off = client.enqueue(conn, "OFF")
        bad = client.enqueue(conn, "ON", request_type=s.IMMEDIATE)
        conn.execute(sa.update(s.prcreq).where(s.prcreq.c.request_id == bad).values(request_type="SOMETHING"))
    claimed = {c.request_id: c for c in _claim(driver)}
    assert set(claimed) == {nojob, off, bad}
    assert not any(c.started for c in claimed.values())
    assert claimed[nojob].job is None and claimed[off].job is not None and not claimed[off].job.enabled
    assert {_row(driver, r)["status"] for r in claimed} == {s.CLAIMED}
    with driver.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(s.prclog)).scalar() == 0


def test_one_running_execution_per_mapref_is_enforced_by_the_database(driver):
    _register(driver, W1, W2)
    _job(driver, "EXCL")
    first, second = _enqueue(driver, 2, mapref="EXCL")
    a = _claim(driver, W1, limit=4)
    assert [r.request_id for r in a] == [first], "one per no-overlap mapref, even with slots to spare"
    assert _row(driver, first)["excl_key"] == "EXCL"
    assert _claim(driver, W2, limit=4) == [] and _row(driver, second)["status"] == s.NEW
    with pytest.raises(sa.exc.IntegrityError):         # the unique index itself refuses a second
        with driver.begin() as conn:
            conn.execute(sa.update(s.prcreq).where(s.prcreq.c.request_id == second).values(excl_key="EXCL"))
    assert _finish(driver, a[0])
    b = _claim(driver, W2, limit=4)
    assert [r.request_id for r in b] == [second] and b[0].started


def test_overlapping_executions_when_allowed(driver):
    _job(driver, "OVER", overlap=True)
    _enqueue(driver, 2, mapref="OVER")
    claimed = _claim(driver, limit=2)
    assert len(claimed) == 2 and all(c.started for c in claimed)


def test_claim_takes_higher_priority_first_then_queue_order(driver):
    _register(driver, W1)
    _job(driver, overlap=True)
    low = _enqueue(driver, 2)
    with driver.engine.begin() as conn:
        urgent = client.enqueue(conn, "M")
        conn.execute(sa.update(s.prcreq).where(s.prcreq.c.request_id == urgent).values(priority=5))
    claimed = _claim(driver, limit=2)
    assert [c.request_id for c in claimed] == [urgent, low[0]]


def test_claim_leaves_a_paused_jobs_requests_waiting(driver):
    _register(driver, W1)
    _job(driver, "HELD")
    _job(driver, "FREE")
    held = _enqueue(driver, 1, mapref="HELD")
    free = _enqueue(driver, 1, mapref="FREE")
    with driver.engine.begin() as conn:
        conn.execute(sa.update(s.job).where(s.job.c.mapref == "HELD").values(paused="Y"))
    assert [c.request_id for c in _claim(driver, limit=5)] == free
    assert {_row(driver, r)["status"] for r in held} == {s.NEW}
    with driver.engine.begin() as conn:
        conn.execute(sa.update(s.job).where(s.job.c.mapref == "HELD").values(paused="N"))
    assert [c.request_id for c in _claim(driver, limit=5)] == held


def test_a_waiting_stop_holds_back_its_maprefs_new_requests(driver):
    """A STOP claimed together with its still-NEW target cancels it instead of racing it."""
    _job(driver, "T")
    target = _enqueue(driver, 1, mapref="T")[0]
    stop = client.request_stop(driver.engine, request_id=target)
    claimed = _claim(driver, limit=4)
    assert [c.request_id for c in claimed] == [stop]
    assert driver.request_stop(StopParams(by=stop, mapref="T", target_request_id=target)).cancelled == (target,)
    assert _row(driver, target)["status"] == s.CANCELLED


def test_finish_writes_logs_atomically_and_only_for_the_owner(driver):
    _register(driver, W1)
    _job(driver, "F")
    _enqueue(driver, 1, mapref="F")
    req = _claim(driver, limit=1)[0]
    assert not _finish(driver, req, worker=W2)              # not the owner: nothing written
    with driver.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(s.joblog)).scalar() == 0
    assert _log(driver, req.prcid).status == s.IN_PROGRESS
    assert _finish(driver, req, status=s.FAILED, log_status=s.LOG_FAILED, srcrows=10, trgrows=8,
                   rejects=(Reject("k1", "bad", "ORA-1"), Reject("k2", "worse")),
                   error=("EXECUTION", "boom", None), result_payload='{"error":"boom"}',
                   params={"param1": "a", "param10": "z" * 300})
    row = _row(driver, req.request_id)
    assert (row["status"], row["excl_key"], row["result_payload"]) == (s.FAILED, None, '{"error":"boom"}')
    assert row["completed_at"] is not None
    log = _log(driver, req.prcid)
    with driver.engine.connect() as conn:
        jl = conn.execute(sa.select(s.joblog).where(s.joblog.c.prcid == req.prcid)).one()
        errs = conn.execute(sa.select(s.joberr).where(s.joberr.c.prcid == req.prcid).order_by(s.joberr.c.errid)).all()
    assert log.status == s.LOG_FAILED and log.enddt is not None and (log.param1, log.param10) == ("a", "z" * 250)
    assert (jl.srcrows, jl.trgrows, jl.errrows) == (10, 8, 2)
    assert sorted((e.errtyp, e.keyvalue, e.joblogid) for e in errs) == sorted([
        ("RECORD", "k1", jl.joblogid), ("RECORD", "k2", jl.joblogid), ("EXECUTION", None, jl.joblogid)])
    assert not _finish(driver, req)                   # already finished: a replay writes nothing


def test_batched_finishes_mix_endings_retries_errors_and_strangers(driver):
    _register(driver, W1)
    _job(driver, "MIX", overlap=True)
    ids = _enqueue(driver, 5, mapref="MIX")
    reqs = _claim(driver, limit=5)
    f = [ExecutionFinish(r.request_id, W1, r.prcid, r.mapref, s.COMPLETED, request_status=s.DONE, msg="ok", srcrows=i,
                         sessionid="sess") for i, r in enumerate(reqs)]
    f[1] = ExecutionFinish(reqs[1].request_id, W1, reqs[1].prcid, "MIX", s.LOG_FAILED, request_status=s.NEW,
                           retry_delay_s=60, msg="bad \x00 and \ud800 text")
    f[2] = ExecutionFinish(reqs[2].request_id, W1, reqs[2].prcid, "MIX", s.LOG_FAILED, request_status=s.FAILED,
                           error=("EXECUTION", "boom", None), result_payload='{"error":"boom"}')
    f[3] = ExecutionFinish(reqs[3].request_id, W2, reqs[3].prcid, "MIX", s.COMPLETED, request_status=s.DONE)  # not W2's
    assert driver.execution_finish_many(f) == [True, True, True, False, True]
    assert [_row(driver, r)["status"] for r in ids] == [s.DONE, s.NEW, s.FAILED, s.PROCESSING, s.DONE]
    with driver.engine.connect() as conn:
        logs = {r.prcid: r for r in conn.execute(sa.select(s.prclog)).all()}
        joblogs = {r.prcid: r for r in conn.execute(sa.select(s.joblog)).all()}
        errors = conn.execute(sa.select(s.joberr.c.prcid, s.joberr.c.errmsg)).all()
    assert [logs[r.prcid].status for r in reqs] == [s.COMPLETED, s.LOG_FAILED, s.LOG_FAILED, s.IN_PROGRESS,
                                                    s.COMPLETED]
    assert logs[reqs[1].prcid].msg == "bad \ufffd and \ufffd text", "unstorable characters replaced, batch kept"
    assert sorted(joblogs) == sorted([reqs[0].prcid, reqs[1].prcid, reqs[2].prcid, reqs[4].prcid])
    assert (joblogs[reqs[4].prcid].srcrows, joblogs[reqs[4].prcid].sessionid) == (4, "sess")
    assert errors == [(reqs[2].prcid, "boom")]
    assert driver.execution_finish_many([f[0], f[4]]) == [False, False], "a replay writes nothing"


def test_a_history_request_goes_on_day_after_day(driver):
    _register(driver, W1)
    _job(driver, "H")
    _enqueue(driver, 1, mapref="H")
    req = _claim(driver, limit=1)[0]
    assert _finish(driver, req, status=None, params={"param1": "2026-01-01"})
    row = _row(driver, req.request_id)
    assert (row["status"], row["excl_key"]) == (s.PROCESSING, "H"), "still ours, still exclusive"
    nxt = driver.execution_open(ExecutionOpen(req.request_id, W1, "H", req.attempts, {"param1": "2026-01-02"}))
    assert isinstance(nxt, int) and _log(driver, nxt).param1 == "2026-01-02"
    assert driver.history_days_done(req.request_id) == {"2026-01-01"}
    assert driver.execution_open(ExecutionOpen(req.request_id, W2, "H", 1, {})) is StartRefused.LOST
    assert driver.execution_finish_many([ExecutionFinish(req.request_id, W1, nxt, "H", s.COMPLETED,
                                                         request_status=s.DONE)]) == [True]
    assert _row(driver, req.request_id)["status"] == s.DONE


def test_completing_in_the_handlers_transaction_commits_with_its_work_only_while_owned(driver):
    _register(driver, W1)
    _job(driver, "TX", overlap=True)
    _enqueue(driver, 2, mapref="TX")
    mine, taken = _claim(driver, limit=2)
    with driver.begin() as conn:                       # someone rescued the second meanwhile
        conn.execute(sa.update(s.prcreq).where(s.prcreq.c.request_id == taken.request_id).values(
            status=s.NEW, claimed_by=None))
    for req, owned in ((mine, True), (taken, False)):
        with driver.engine.connect() as conn:
            conn.execute(sa.insert(s.job_state).values(mapref="TX", state_key=req.request_id, state_value="work"))
            ok = driver.execution_complete_tx(conn, ExecutionFinish(req.request_id, W1, req.prcid, "TX", s.COMPLETED,
                                                                    request_status=s.DONE), lock_timeout_s=2)
            assert ok is owned
            conn.commit() if ok else conn.rollback()
    with driver.engine.connect() as conn:
        work = set(conn.execute(sa.select(s.job_state.c.state_key)).scalars())
    assert work == {mine.request_id}, "the work of the request we no longer owned was rolled back"
    assert _row(driver, mine.request_id)["status"] == s.DONE and _row(driver, taken.request_id)["status"] == s.NEW


def test_retry_returns_to_new_with_a_not_before(driver):
    _job(driver)
    _enqueue(driver, 1)
    req = _claim(driver, limit=1)[0]
    assert _finish(driver, req, status=s.NEW, log_status=s.LOG_FAILED, retry_delay_s=30)
    row = _row(driver, req.request_id)
    assert (row["status"], row["claimed_by"], row["attempts"], row["excl_key"]) == (s.NEW, None, 1, None)
    assert row["not_before"] > driver.now() + timedelta(seconds=20)
    assert _claim(driver, limit=1) == []


def test_rescue_goes_by_each_replicas_own_expiry(driver):
    """A replica with a long rescue window of its own is not rescued by one with a short one."""
    _register(driver, W1)
    _register(driver, W2, rescue_after_s=60)
    _job(driver, "R", overlap=True, max_attempts=2)
    _enqueue(driver, 2, mapref="R")
    (a,), (b,) = _claim(driver, W1, limit=1), _claim(driver, W2, limit=1)
    with driver.begin() as conn:     # both silent for 30 s: W1 (8 s window) is dead, W2 (60 s) is not
        conn.execute(sa.update(s.worker).values(heartbeat_at=driver.clock(-30)))
        conn.execute(sa.update(s.worker).where(s.worker.c.worker_id == W1).values(expires_at=driver.clock(-22)))
    result = driver.request_rescue(RescueParams(stale_after_s=5))
    assert result.requeued == (a.request_id,) and result.failed == () and result.workers_removed == (W1,)
    row = _row(driver, a.request_id)
    assert (row["status"], row["claimed_by"], row["excl_key"]) == (s.NEW, None, None)
    assert _row(driver, b.request_id)["status"] == s.PROCESSING
    assert _log(driver, a.prcid).status == s.LOG_FAILED
    with driver.engine.connect() as conn:
        assert conn.execute(sa.select(s.joberr.c.errtyp).where(s.joberr.c.prcid == a.prcid)).scalar() == "RESCUE"
    assert not driver.worker_heartbeat(Heartbeat(W1, 0, 8))     # W1 learns it was declared dead
    assert not _finish(driver, a, worker=W1)                    # and cannot complete the row any more
    (a2,) = _claim(driver, W2, limit=1)
    assert a2.request_id == a.request_id and a2.attempts == 2
    with driver.begin() as conn:
        conn.execute(sa.update(s.worker).values(heartbeat_at=driver.clock(-90), expires_at=driver.clock(-1)))
    assert set(driver.request_rescue(RescueParams(5)).failed) == {a.request_id}
    assert "no attempts left" in _row(driver, a.request_id)["result_payload"]


def test_rescue_takes_rows_with_no_owner_or_an_owner_that_never_was(driver):
    _register(driver, W1)
    _job(driver, "O", overlap=True, max_attempts=3)
    with driver.begin() as conn:
        for rid, status, owner in (("nobody", s.PROCESSING, None), ("nobody2", s.CLAIMED, None),
                                   ("ghost", s.PROCESSING, "ghost:1:00")):
            conn.execute(sa.insert(s.prcreq).values(request_id=rid, mapref="O", request_type="IMMEDIATE",
                                                    status=status, claimed_by=owner, attempts=1))
    result = driver.request_rescue(RescueParams(stale_after_s=5))
    assert set(result.requeued) == {"nobody", "nobody2", "ghost"}
    assert {_row(driver, r)["status"] for r in result.requeued} == {s.NEW}


def test_release_orphans_hands_back_unknown_claims(driver):
    _job(driver, overlap=True)
    _enqueue(driver, 3)
    claimed = _claim(driver, limit=3)
    known = claimed[0].request_id
    released = driver.request_release_orphans(W1, [known])
    assert sorted(released) == sorted(c.request_id for c in claimed[1:])
    assert _row(driver, claimed[1].request_id)["attempts"] == 0 and _log(driver, claimed[1].prcid).status == s.STOPPED
    assert _row(driver, known)["status"] == s.PROCESSING


def test_stop_cancels_new_and_flags_running(driver):
    _job(driver, "S", overlap=True)
    queued, running = _enqueue(driver, 2, mapref="S")
    with driver.begin() as conn:
        conn.execute(sa.update(s.prcreq).where(s.prcreq.c.request_id == queued).values(not_before=driver.clock(600)))
    req = _claim(driver, limit=1)[0]
    assert req.request_id == running
    assert driver.request_stop(StopParams("x", "S", queued)).cancelled == (queued,)
    assert _row(driver, queued)["status"] == s.CANCELLED
    assert driver.request_stop_flags(W1) == []
    assert driver.request_stop(StopParams("x", "S")).signalled == (running,)
    assert driver.request_stop_flags(W1) == [running]
    assert "already CANCELLED" in driver.request_stop(StopParams("x", "S", queued)).reason
    assert "no request" in driver.request_stop(StopParams("x", "S", "nope")).reason
    assert "no running" in driver.request_stop(StopParams("x", "OTHER")).reason


def test_resolve_ends_claimed_requests_that_never_ran(driver):
    with driver.begin() as conn:
        rid = client.enqueue(conn, "NOJOB")
    (req,) = _claim(driver)
    assert driver.request_resolve_many([RequestResolve(rid, W2, s.FAILED, '{"error":"x"}'),
                                        RequestResolve(rid, W1, s.FAILED, '{"error":"no job"}')]) == [False, True]
    assert (_row(driver, rid)["status"], _row(driver, rid)["result_payload"]) == (s.FAILED, '{"error":"no job"}')


def test_annotations_show_on_running_executions_only(driver):
    _job(driver, overlap=True)
    _enqueue(driver, 2)
    a, b = _claim(driver, limit=2)
    assert _finish(driver, b)
    driver.execution_annotate_many([ExecutionAnnotate(a.prcid, {"param1": "p1"}, "sid-1"),
                                    ExecutionAnnotate(b.prcid, {"param1": "late"}, "sid-2")])
    assert (_log(driver, a.prcid).param1, _log(driver, a.prcid).sessionid) == ("p1", "sid-1")
    assert _log(driver, b.prcid).param1 is None


def test_jobs_are_read_with_defaults(driver):
    with driver.begin() as conn:
        client.register_job(conn, "J", "worker.jobs.builtin:noop", timeout_s=5, allow_overlap=True)
        conn.execute(sa.text("INSERT INTO dms_job (mapref, handler) VALUES ('J2', 'sql:proc')"))
    jobs = driver.job_get_many(["J", "J2", "nope"])
    assert jobs["J"] == JobDef("J", "worker.jobs.builtin:noop", 5, 1, 60, True, True)
    assert jobs["J2"] == JobDef("J2", "sql:proc", None, 1, 60, False, True)
    assert "nope" not in jobs


def test_heartbeat_moves_with_the_database_clock_and_says_until_when(driver):
    _register(driver, W1)
    with driver.engine.connect() as conn:
        before = conn.execute(sa.select(s.worker.c.heartbeat_at)).scalar()
    time.sleep(0.01)
    assert driver.worker_heartbeat(Heartbeat(W1, 2, 30))
    with driver.engine.connect() as conn:
        after, expires, running = conn.execute(sa.select(s.worker.c.heartbeat_at, s.worker.c.expires_at,
                                                         s.worker.c.running)).one()
    assert after > before and running == 2
    assert 29 <= (expires - after).total_seconds() <= 31
    driver.worker_unregister(W1)
    assert not driver.worker_heartbeat(Heartbeat(W1, 0, 30))


def test_prune_deletes_old_executions_with_their_logs(driver):
    _job(driver, overlap=True)
    _enqueue(driver, 3)
    reqs = _claim(driver, limit=3)
    for r in reqs[:2]:
        assert _finish(driver, r, rejects=(Reject("k", "bad"),))
    with driver.begin() as conn:
        conn.execute(sa.update(s.prclog).where(s.prclog.c.prcid == reqs[0].prcid).values(enddt=driver.clock(-90000)))
    assert driver.execution_prune(PruneParams(86400, limit=10)) == 1
    with driver.engine.connect() as conn:
        assert set(conn.execute(sa.select(s.prclog.c.prcid)).scalars()) == {reqs[1].prcid, reqs[2].prcid}
        assert set(conn.execute(sa.select(s.joblog.c.prcid)).scalars()) == {reqs[1].prcid}
        assert set(conn.execute(sa.select(s.joberr.c.prcid)).scalars()) == {reqs[1].prcid}


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
        assert "dms_prcreq" in [channel for channel, _ in listener.drain()]
    finally:
        listener.close()


def test_a_delayed_retry_tells_listeners_when_it_becomes_due(pg_url):
    from multiprocessing.connection import wait

    from worker.drivers import make_driver
    d = make_driver(pg_url)
    listener = d.listener()
    try:
        _job(d)
        _enqueue(d, 1)
        (req,) = _claim(d, limit=1)
        listener.drain()
        assert _finish(d, req, status=s.NEW, log_status=s.LOG_FAILED, retry_delay_s=30)
        assert wait([listener], 5)
        (payload,) = [p for channel, p in listener.drain() if channel == "dms_prcreq" and p]
        due = _row(d, req.request_id)["not_before"]
        assert abs(float(payload) - (due - datetime(1970, 1, 1)).total_seconds()) < 0.01
    finally:
        listener.close()
        d.dispose()


def test_postgresql_schema_setting_reaches_every_connection(pg_url):
    """SCHEMA puts the tables in their own schema: pooled, claim and execution connections all
    find them through search_path."""
    from worker.drivers import make_driver
    from worker.migrate import migrate

    admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text('DROP SCHEMA IF EXISTS "dms alt" CASCADE'))
        conn.execute(sa.text('CREATE SCHEMA "dms alt"'))
    d = make_driver(pg_url, schema="dms alt", statement_timeout_s=5)
    try:
        migrate(d)
        _register(d, W1)
        _job(d, "ALT", overlap=True)
        ids = _enqueue(d, 2, mapref="ALT")
        assert [r.request_id for r in _claim(d, limit=2)] == ids
        with admin.connect() as conn:
            assert conn.execute(sa.text('SELECT count(*) FROM "dms alt".dms_prcreq WHERE status = \'PROCESSING\'')).scalar() == 2
            assert conn.execute(sa.text("SELECT count(*) FROM public.dms_prcreq")).scalar() == 0
    finally:
        d.dispose()
        with admin.connect() as conn:
            conn.execute(sa.text('DROP SCHEMA "dms alt" CASCADE'))
        admin.dispose()


def test_the_replicas_own_statements_wait_no_longer_than_their_bound(pg_url):
    """A lock held by a frozen or cut-off session makes a bounded statement fail, retryably."""
    from worker.drivers import make_driver
    d = make_driver(pg_url, statement_timeout_s=0.5)
    blocker = sa.create_engine(pg_url).connect()
    try:
        _register(d, W1)
        blocker.execute(sa.text("SELECT * FROM dms_worker FOR UPDATE"))
        t0 = time.monotonic()
        with pytest.raises(sa.exc.DBAPIError) as caught:
            d.worker_heartbeat(Heartbeat(W1, 0, 8))
        assert time.monotonic() - t0 < 3 and d.is_transient(caught.value)
    finally:
        blocker.rollback()
        blocker.close()
        d.dispose()


def test_a_maprefs_server_side_lock_is_held_by_one_session_at_a_time(pg_url):
    """Issue 12.6 on PostgreSQL: the lock a sql: handler's session takes for a no-overlap mapref
    keeps the next run out for as long as that session is in its call, across commits."""
    from worker.drivers import make_driver
    d = make_driver(pg_url)
    try:
        with d.engine.connect() as first, d.engine.connect() as second:
            assert d.execution_lock(first, "NIGHTLY", timeout_s=0)
            first.commit()                              # a procedure that commits as it goes
            t0 = time.monotonic()
            assert not d.execution_lock(second, "NIGHTLY", timeout_s=0.3)
            assert time.monotonic() - t0 >= 0.3
            assert d.execution_lock(second, "OTHER", timeout_s=0)
            d.execution_unlock(first, "NIGHTLY")
            assert d.execution_lock(second, "NIGHTLY", timeout_s=1)
            d.execution_unlock(second, "NIGHTLY")
            d.execution_unlock(second, "OTHER")
    finally:
        d.dispose()
