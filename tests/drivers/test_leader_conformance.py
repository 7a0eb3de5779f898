"""Conformance of the leader and schedule verbs, on every driver and every leader mode it offers."""
from __future__ import annotations

import threading
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa

from tests.support import wait_until
from worker import client
from worker import schema as s
from worker.drivers import make_driver
from worker.drivers.base import (
    ClaimParams,
    ExecutionFinish,
    LeaderElect,
    LeaderTerm,
    OccurrenceEnqueue,
    PruneParams,
    WorkerInfo,
    occurrence_request_id,
)
from worker.services.leadership import Leadership

W1, W2 = "w1:1:aa", "w2:2:bb"


class Candidate:
    """A would-be leader: its own driver (so its own lock session) and the Leadership service,
    ticked by hand on a clock of its own."""

    def __init__(self, url: str, worker: str, mode: str, ttl_s: float = 30) -> None:
        self.driver = make_driver(url)
        self.worker = worker
        self.lead = Leadership(self.driver, worker, mode, ttl_s, interval_s=1.0)
        self.now = 0.0

    def tick(self) -> int | None:
        self.now += 5.0                 # past the next wake: every call acts
        self.lead.tick(self.now)
        return self.lead.epoch

    def close(self) -> None:
        self.lead.step_down()
        self.driver.dispose()


@pytest.fixture(params=["lease", "lock"])
def candidates(request, driver):
    if request.param == "lock" and not driver.supports_leader_lock:
        pytest.skip(f"{driver.name} has no session-lock leader")
    for w in (W1, W2):
        driver.worker_register(WorkerInfo(worker_id=w, host="h", pid=1, version="t", slots=1))
    made = [Candidate(driver.url, W1, request.param), Candidate(driver.url, W2, request.param)]
    yield made
    for c in made:
        c.close()


def _leader_row(driver):
    with driver.engine.connect() as conn:
        return conn.execute(sa.select(s.leader)).one()


def test_one_leader_at_a_time_and_the_epoch_goes_up(driver, candidates):
    a, b = candidates
    epoch = a.tick()
    assert epoch is not None
    assert b.tick() is None
    row = _leader_row(driver)
    assert (row.holder, row.epoch, row.mode) == (W1, epoch, a.lead.mode)
    with driver.engine.connect() as conn:
        assert dict(conn.execute(sa.select(s.worker.c.worker_id, s.worker.c.is_leader)).all()) == {W1: "Y", W2: "N"}
    assert a.tick() == epoch and a.lead.leading(a.now)       # renewed
    a.lead.resign()
    epoch2 = b.tick()
    assert epoch2 is not None and epoch2 > epoch
    assert not driver.leader_lease_renew(LeaderTerm(W1, epoch, 30))


def test_concurrent_elections_elect_exactly_one(driver, candidates):
    barrier = threading.Barrier(2)
    results = {}

    def run(c):
        barrier.wait()
        results[c.worker] = c.tick()

    threads = [threading.Thread(target=run, args=(c,)) for c in candidates]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sum(v is not None for v in results.values()) == 1


def test_an_expired_lease_is_taken_over_and_fences_the_old_leader(driver):
    old = driver.leader_lease_take(LeaderElect(W1, 30, "lease")).epoch
    with driver.begin() as conn:
        conn.execute(sa.update(s.leader).values(expires_at=driver.clock(-1)))
    new = driver.leader_lease_take(LeaderElect(W2, 30, "lease")).epoch
    assert new == old + 1
    assert not driver.leader_lease_renew(LeaderTerm(W1, old, 30))
    with driver.begin() as conn:
        jid = conn.execute(sa.insert(s.jobsch).values(mapref="M", frqcd="DL", schflg="Y", curflg="Y",
                                                      misfire="LATEST").returning(s.jobsch.c.jobschid)).scalar_one()
    t = datetime(2026, 1, 1, 2, 0)
    assert driver.occurrence_enqueue(OccurrenceEnqueue(W1, old, jid, "M", (t,), t, None)) is None
    assert driver.occurrence_enqueue(OccurrenceEnqueue(W2, new, jid, "M", (t,), t, None)) == 1


def test_a_follower_learns_when_the_lease_expires(driver, candidates):
    a, b = candidates
    assert a.tick() is not None
    refused = driver.leader_lease_take(LeaderElect(W2, 30, "lease"))
    assert refused.epoch is None and 25 < refused.expires_in <= 30, "by the database clock"
    with driver.begin() as conn:
        conn.execute(sa.update(s.leader).values(expires_at=driver.clock(0.5)))
    assert b.tick() is None
    assert 0 < b.lead.next_wake() - b.now <= 0.52, "the follower asks again the moment it expires"
    wait_until(lambda: b.tick(), 5, "the follower to take the expired lease", interval=0.1)


def test_a_killed_lock_holder_releases_leadership_at_once(driver):
    if not driver.supports_leader_lock:
        pytest.skip(f"{driver.name} has no session-lock leader")
    a, b = Candidate(driver.url, W1, "lock"), Candidate(driver.url, W2, "lock")
    try:
        assert a.tick() is not None
        assert b.tick() is None
        a.driver._lock_conn.close()           # the session dies, as with kill -9
        a.driver._lock_conn = None
        with driver.begin() as conn:          # and its lease is old news
            conn.execute(sa.update(s.leader).values(expires_at=driver.clock(20)))
        # The server releases the lock once it notices; the follower takes the row by force.
        assert wait_until(lambda: b.tick(), 5, "the lock to be released") is not None
    finally:
        a.close()
        b.close()


def test_a_lock_holder_whose_session_was_lost_elects_itself_again(driver):
    if not driver.supports_leader_lock:
        pytest.skip(f"{driver.name} has no session-lock leader")
    a = Candidate(driver.url, W1, "lock")
    try:
        first = a.tick()
        assert first is not None
        a.driver._lock_conn.close()           # lost under it, as in a server restart
        assert a.tick() is None               # the renewal notices and steps down ...
        assert a.tick() == first + 1          # ... and the next attempt runs on a new session
    finally:
        a.close()


def test_a_hung_lock_holder_is_replaced_once_its_lease_expires(driver):
    if not driver.supports_leader_lock:
        pytest.skip(f"{driver.name} has no session-lock leader")
    a, b = Candidate(driver.url, W1, "lock"), Candidate(driver.url, W2, "lock")
    try:
        old = a.tick()
        assert b.tick() is None                     # lock held, lease valid
        with driver.begin() as conn:                # the holder stopped renewing (paused), still connected
            conn.execute(sa.update(s.leader).values(expires_at=driver.clock(-1)))
        assert b.tick() == old + 1
        assert a.tick() is None, "the woken holder learns it was replaced"
    finally:
        a.close()
        b.close()


def test_occurrences_are_enqueued_once_and_move_the_schedule(driver):
    epoch = driver.leader_lease_take(LeaderElect(W1, 30, "lease")).epoch
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
    epoch = driver.leader_lease_take(LeaderElect(W1, 30, "lease")).epoch
    client.register_job(driver.engine, "P", "worker.jobs.builtin:noop", allow_overlap=True)
    t = datetime(2026, 1, 1, 2, 0, 0, 250000)
    driver.occurrence_enqueue(OccurrenceEnqueue(W1, epoch, parent, "P", (t, t + timedelta(days=1)), None, None))
    claimed = driver.request_claim(ClaimParams(W1, job_limit=2))
    finishes = [ExecutionFinish(req.request_id, W1, req.prcid, "P", "PC", request_status=status, jobschid=req.jobschid,
                                scheduled_for=req.scheduled_for)
                for req, status in zip(sorted(claimed, key=lambda r: r.scheduled_for), (s.DONE, s.FAILED))]
    assert driver.execution_finish_many(finishes) == [True, True]
    assert driver.execution_finish_many(finishes[:1]) == [False]
    with driver.engine.connect() as conn:
        kids = conn.execute(sa.select(s.prcreq.c.mapref, s.prcreq.c.scheduled_for)
                            .where(s.prcreq.c.jobschid == child)).all()
    assert [(k.mapref, k.scheduled_for) for k in kids] == [("C", t)], "only the successful occurrence triggers"
    with driver.engine.connect() as conn:
        kid_id = conn.execute(sa.select(s.prcreq.c.request_id).where(s.prcreq.c.jobschid == child)).scalar()
        assert conn.execute(sa.select(s.jobsch.c.lst_run_dt).where(s.jobsch.c.jobschid == child)).scalar() == t
    assert kid_id == occurrence_request_id(child, t)


def test_prune_deletes_old_finished_requests_in_batches(driver):
    ids = [client.enqueue(driver.engine, "M") for _ in range(5)]
    with driver.begin() as conn:
        conn.execute(sa.update(s.prcreq).where(s.prcreq.c.request_id.in_(ids[:4])).values(
            status=s.DONE, completed_at=driver.clock(-90000)))
        conn.execute(sa.update(s.prcreq).where(s.prcreq.c.request_id == ids[3]).values(completed_at=driver.clock()))
    assert driver.request_prune(PruneParams(86400, limit=2)) == 2
    assert driver.request_prune(PruneParams(86400, limit=2)) == 1
    assert driver.request_prune(PruneParams(86400, limit=2)) == 0
    with driver.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(s.prcreq)).scalar() == 2
