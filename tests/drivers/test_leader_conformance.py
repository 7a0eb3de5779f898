"""Conformance of the leader and schedule verbs, on every driver and every leader mode it offers."""
from __future__ import annotations

import threading
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa

from worker import client
from worker import schema as s
from tests.support import wait_until
from worker.drivers.base import ClaimParams, ExecutionFinish, ExecutionStart, OccurrenceEnqueue, WorkerInfo

W1, W2 = "w1:1:aa", "w2:2:bb"


@pytest.fixture(params=["lease", "lock"])
def electors(request, driver):
    try:
        made = [driver.leader_elector(request.param, ttl_s=30), driver.leader_elector(request.param, ttl_s=30)]
    except ValueError:
        pytest.skip(f"{driver.name} has no {request.param} leader")
    for w in (W1, W2):
        driver.worker_register(WorkerInfo(worker_id=w, host="h", pid=1, version="t", slots=1))
    yield made
    for e in made:
        e.close()


def _leader_row(driver):
    with driver.engine.connect() as conn:
        return conn.execute(sa.select(s.leader)).one()


def test_one_leader_at_a_time_and_the_epoch_goes_up(driver, electors):
    a, b = electors
    epoch = a.attempt(W1)
    assert epoch is not None
    assert b.attempt(W2) is None
    row = _leader_row(driver)
    assert (row.holder, row.epoch) == (W1, epoch)
    with driver.engine.connect() as conn:
        assert dict(conn.execute(sa.select(s.worker.c.worker_id, s.worker.c.is_leader)).all()) == {W1: "Y", W2: "N"}
    assert a.renew(W1, epoch)
    a.resign(W1, epoch)
    epoch2 = b.attempt(W2)
    assert epoch2 is not None and epoch2 > epoch
    assert not a.renew(W1, epoch)


def test_concurrent_elections_elect_exactly_one(driver, electors):
    barrier = threading.Barrier(2)
    results = {}

    def run(elector, worker):
        barrier.wait()
        results[worker] = elector.attempt(worker)

    threads = [threading.Thread(target=run, args=(e, w)) for e, w in zip(electors, (W1, W2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sum(v is not None for v in results.values()) == 1


def test_an_expired_lease_is_taken_over_and_fences_the_old_leader(driver):
    a, b = driver.leader_elector("lease", 30), driver.leader_elector("lease", 30)
    old = a.attempt(W1)
    with driver.begin() as conn:
        conn.execute(sa.update(s.leader).values(expires_at=driver.clock(-1)))
    new = b.attempt(W2)
    assert new == old + 1
    assert not a.renew(W1, old)
    with driver.begin() as conn:
        jid = conn.execute(sa.insert(s.jobsch).values(mapref="M", frqcd="DL", schflg="Y", curflg="Y",
                                                      misfire="LATEST").returning(s.jobsch.c.jobschid)).scalar_one()
    t = datetime(2026, 1, 1, 2, 0)
    assert driver.occurrence_enqueue(OccurrenceEnqueue(W1, old, jid, "M", (t,), t, None)) is None
    assert driver.occurrence_enqueue(OccurrenceEnqueue(W2, new, jid, "M", (t,), t, None)) == 1


def test_a_follower_learns_when_the_lease_expires(driver, electors):
    a, b = electors
    assert a.attempt(W1) is not None
    assert b.attempt(W2) is None
    assert 25 < b.expires_in <= 30, "the holder's lease runs for its TTL, by the database clock"
    with driver.begin() as conn:
        conn.execute(sa.update(s.leader).values(expires_at=driver.clock(0.5)))
    assert b.attempt(W2) is None and 0 < b.expires_in <= 0.5
    wait_until(lambda: b.attempt(W2), 5, "the follower to take the expired lease", interval=max(b.expires_in, 0.05))


def test_a_killed_lock_holder_releases_leadership_at_once(driver):
    try:
        a, b = driver.leader_elector("lock", 30), driver.leader_elector("lock", 30)
    except ValueError:
        pytest.skip(f"{driver.name} has no session-lock leader")
    assert a.attempt(W1) is not None
    assert b.attempt(W2) is None
    a.conn.close()                                  # the session dies, as with kill -9
    a.conn = None
    # The server releases the lock once it notices; a follower asks again every heartbeat.
    assert wait_until(lambda: b.attempt(W2), 5, "the lock to be released") is not None
    b.close()


def test_a_lock_holder_whose_session_was_lost_reconnects(driver):
    try:
        a = driver.leader_elector("lock", 30)
    except ValueError:
        pytest.skip(f"{driver.name} has no session-lock leader")
    first = a.attempt(W1)
    assert first is not None
    a.conn.close()                                  # lost under it, as in a server restart
    with pytest.raises(Exception):
        a.attempt(W1)                               # reported (the control loop retries) ...
    assert a.attempt(W1) == first + 1               # ... and the next attempt runs on a new session
    a.close()


def test_a_hung_lock_holder_is_replaced_once_its_lease_expires(driver):
    try:
        a, b = driver.leader_elector("lock", 30), driver.leader_elector("lock", 30)
    except ValueError:
        pytest.skip(f"{driver.name} has no session-lock leader")
    old = a.attempt(W1)
    assert b.attempt(W2) is None                    # lock held, lease valid
    with driver.begin() as conn:                    # the holder stopped renewing (paused), still connected
        conn.execute(sa.update(s.leader).values(expires_at=driver.clock(-1)))
    new = b.attempt(W2)
    assert new == old + 1
    assert not a.renew(W1, old), "the woken holder learns it was replaced"
    a.close()
    b.close()


def test_occurrences_are_enqueued_once_and_move_the_schedule(driver):
    e = driver.leader_elector("lease", 30)
    epoch = e.attempt(W1)
    with driver.begin() as conn:
        jid = conn.execute(sa.insert(s.jobsch).values(mapref="M", frqcd="DL", schflg="Y", curflg="Y",
                                                      misfire="LATEST").returning(s.jobsch.c.jobschid)).scalar_one()
    times = tuple(datetime(2026, 1, d, 2, 0) for d in (1, 2, 3))
    nxt = datetime(2026, 1, 4, 2, 0)
    assert driver.occurrence_enqueue(OccurrenceEnqueue(W1, epoch, jid, "M", times, times[-1], nxt)) == 3
    assert driver.occurrence_enqueue(OccurrenceEnqueue(W1, epoch, jid, "M", times, times[-1], nxt)) == 0
    with driver.engine.connect() as conn:
        rows = conn.execute(sa.select(s.prcreq.c.scheduled_for, s.prcreq.c.not_before, s.prcreq.c.request_type)
                            .where(s.prcreq.c.jobschid == jid).order_by(s.prcreq.c.scheduled_for)).all()
        sch = conn.execute(sa.select(s.jobsch.c.lst_run_dt, s.jobsch.c.nxt_run_dt)).one()
    assert [r.scheduled_for for r in rows] == list(times) and all(r.not_before == r.scheduled_for for r in rows)
    assert (sch.lst_run_dt, sch.nxt_run_dt) == (times[-1], nxt)
    # The unique (jobschid, scheduled_for) holds against any other writer, too.
    with pytest.raises(sa.exc.IntegrityError):
        with driver.begin() as conn:
            conn.execute(sa.insert(s.prcreq).values(request_id="other", mapref="M", request_type="IMMEDIATE",
                                                    status="NEW", attempts=0, jobschid=jid, scheduled_for=times[0],
                                                    not_before=times[0]))


def test_schedule_list_inherits_the_last_run_of_the_previous_version(driver):
    with driver.begin() as conn:
        conn.execute(sa.insert(s.jobsch).values(mapref="M", frqcd="DL", frqhh=2, schflg="Y", curflg="N",
                                                misfire="LATEST", lst_run_dt=datetime(2026, 1, 1, 2)))
        conn.execute(sa.insert(s.jobsch).values(mapref="M", frqcd="DL", frqhh=3, schflg="Y", curflg="Y",
                                                misfire="ALL"))
        conn.execute(sa.insert(s.jobsch).values(mapref="X", frqcd="DL", schflg="N", curflg="Y", misfire="LATEST"))
    (row,) = driver.schedule_list()
    assert (row.mapref, row.frqhh, row.misfire, row.lst_run_dt) == ("M", 3, "ALL", datetime(2026, 1, 1, 2))


def test_success_of_a_parent_occurrence_enqueues_its_dependents_once(driver):
    driver.worker_register(WorkerInfo(worker_id=W1, host="h", pid=1, version="t", slots=1))
    with driver.begin() as conn:
        parent = conn.execute(sa.insert(s.jobsch).values(mapref="P", frqcd="DL", schflg="Y", curflg="Y",
                                                         misfire="LATEST").returning(s.jobsch.c.jobschid)).scalar_one()
        child = conn.execute(sa.insert(s.jobsch).values(mapref="C", frqcd="DL", schflg="Y", curflg="Y", misfire="LATEST",
                                                        dpnd_jobschid=parent).returning(s.jobsch.c.jobschid)).scalar_one()
    e = driver.leader_elector("lease", 30)
    epoch = e.attempt(W1)
    t = datetime(2026, 1, 1, 2, 0)
    driver.occurrence_enqueue(OccurrenceEnqueue(W1, epoch, parent, "P", (t, t + timedelta(days=1)), None, None))
    claimed = driver.request_claim(ClaimParams(W1, job_limit=2))
    for req, status in zip(sorted(claimed, key=lambda r: r.scheduled_for), (s.DONE, s.FAILED)):
        prcid = driver.execution_start_many([ExecutionStart(req.request_id, W1, "P", False, 1)])[0]
        assert driver.execution_finish_many([ExecutionFinish(req.request_id, W1, prcid, "P", "PC", request_status=status,
                                                             jobschid=req.jobschid, scheduled_for=req.scheduled_for)])
    with driver.engine.connect() as conn:
        kids = conn.execute(sa.select(s.prcreq.c.mapref, s.prcreq.c.scheduled_for)
                            .where(s.prcreq.c.jobschid == child)).all()
    assert [(k.mapref, k.scheduled_for) for k in kids] == [("C", t)], "only the successful occurrence triggers"


def test_prune_deletes_old_finished_requests_in_batches(driver):
    ids = [client.enqueue(driver.engine, "M") for _ in range(5)]
    with driver.begin() as conn:
        conn.execute(sa.update(s.prcreq).where(s.prcreq.c.request_id.in_(ids[:4])).values(
            status=s.DONE, completed_at=driver.clock(-90000)))
        conn.execute(sa.update(s.prcreq).where(s.prcreq.c.request_id == ids[3]).values(completed_at=driver.clock()))
    assert driver.request_prune(86400, limit=2) == 2
    assert driver.request_prune(86400, limit=2) == 1
    assert driver.request_prune(86400, limit=2) == 0
    with driver.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(s.prcreq)).scalar() == 2
