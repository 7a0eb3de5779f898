"""The producer in-process: a real SQLite database, a fake clock, a fake executor."""
from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from tests.services.fakes import FakeExecutor
from worker import client
from worker import schema as s
from worker.drivers.base import RescueParams, WorkerInfo
from worker.executor import EXIT_FENCED, Event
from worker.metrics import Metrics
from worker.services.completer import Completer
from worker.services.producer import Producer, ProducerSettings

W = "w1:1:aa"


@pytest.fixture
def rig(lite):
    lite.worker_register(WorkerInfo(W, "h", 1, "t", 4))
    executor = FakeExecutor(2)
    completer = Completer(lite, window_s=0.0)
    producer = Producer(lite, W, executor, completer, Metrics(W),
                        ProducerSettings(poll_interval_s=15, stop_check_s=1, stop_grace_s=0.5,
                                         retry_max_delay_s=3600))
    completer.on_written = producer.wake

    class Rig:
        driver, ex, comp, prod = lite, executor, completer, producer

        def tick(self, now: float) -> None:
            completer.tick(now)
            producer.tick(now)
            completer.tick(now)

        def status(self, rid):
            return client.request_status(lite.engine, rid)

    return Rig()


def test_claims_only_as_many_as_there_are_ready_slots(rig):
    client.register_job(rig.driver.engine, "J", "worker.jobs.builtin:noop", allow_overlap=True)
    ids = [client.enqueue(rig.driver.engine, "J", param1=str(i)) for i in range(3)]
    rig.ex.slots[1].ready = False                   # still starting
    rig.tick(0.0)
    assert [t.request_id for t in rig.ex.ran] == ids[:1]
    assert [rig.status(r)["status"] for r in ids] == [s.PROCESSING, s.NEW, s.NEW]
    task = rig.ex.ran[0]
    assert task.params["param1"] == "0" and task.finish.request_status == s.DONE and task.finish.prcid == task.prcid
    rig.ex.slots[1].ready = True                    # ready now: the next tick fills it
    rig.tick(0.1)
    assert len(rig.ex.ran) == 2


def test_a_finished_execution_is_written_and_frees_its_mapref_for_the_next(rig):
    client.register_job(rig.driver.engine, "SOLO", "worker.jobs.builtin:noop")
    a, b = (client.enqueue(rig.driver.engine, "SOLO") for _ in range(2))
    rig.tick(0.0)
    assert [t.request_id for t in rig.ex.ran] == [a], "one at a time for a no-overlap job"
    rig.prod.on_event(rig.ex.started(rig.ex.ran[0], 0.1), 0.1)
    rig.prod.on_event(rig.ex.done(rig.ex.ran[0], result={"rows": 3}), 0.2)
    rig.tick(0.2)                                   # the completer writes; the claim takes the next
    assert rig.status(a)["status"] == s.DONE
    assert json.loads(rig.status(a)["result_payload"]) == {"result": {"rows": 3}}
    assert [t.request_id for t in rig.ex.ran] == [a, b]


def test_a_request_that_cannot_run_fails_alone_with_its_reason(rig):
    client.register_job(rig.driver.engine, "J", "worker.jobs.builtin:noop", allow_overlap=True)
    eng = rig.driver.engine
    good = client.enqueue(eng, "J")
    with eng.begin() as conn:
        conn.execute(sa.insert(s.prcreq).values(request_id="deep", mapref="J", request_type="IMMEDIATE",
                                                payload='{"param1": ' + "[" * 50_000 + "]" * 50_000 + "}"))
        conn.execute(sa.insert(s.prcreq).values(request_id="nul", mapref="J", request_type="IMMEDIATE",
                                                payload='{"param1": "a\\u0000"}'))
        conn.execute(sa.insert(s.prcreq).values(request_id="nojob", mapref="NOPE", request_type="IMMEDIATE"))
    rig.ex.slots.append(type(rig.ex.slots[0])(2, ready=True))
    rig.tick(0.0)
    rig.tick(0.1)
    assert [t.request_id for t in rig.ex.ran] == [good]
    for rid, reason in (("deep", "nested too deeply"), ("nul", "NUL"), ("nojob", "unknown mapref")):
        row = rig.status(rid)
        assert row["status"] == s.FAILED and reason in json.loads(row["result_payload"])["error"], row


def test_payload_keys_the_job_does_not_declare_go_to_the_handler_for_vetting(rig):
    client.register_job(rig.driver.engine, "CSV", "worker.jobs.csv:export", allow_overlap=True,
                        params={"path": "/data/out.csv", "overridable": ["region"]})
    client.enqueue(rig.driver.engine, "CSV", payload={"path": "/etc/evil", "region": "x", "param1": "p"})
    rig.tick(0.0)
    (task,) = rig.ex.ran
    assert task.unvetted == ("path",)


def test_a_failure_is_retried_after_its_delay_and_wakes_the_producer_then(rig):
    client.register_job(rig.driver.engine, "FLAKY", "worker.jobs.builtin:fail", max_attempts=2, retry_delay_s=1)
    rid = client.enqueue(rig.driver.engine, "FLAKY")
    rig.tick(0.0)
    rig.prod.on_event(rig.ex.done(rig.ex.ran[0], ok=False, error="RuntimeError: boom"), 0.1)
    rig.tick(0.1)
    row = rig.status(rid)
    assert (row["status"], row["attempts"]) == (s.NEW, 1)
    assert 1.15 <= rig.prod.next_wake() <= 1.3, "wakes when the retry is due, not at the next poll"


def test_a_timeout_stops_the_execution_and_fails_it(rig):
    client.register_job(rig.driver.engine, "SLOW", "worker.jobs.builtin:sleep", timeout_s=3)
    rid = client.enqueue(rig.driver.engine, "SLOW")
    rig.tick(0.0)
    (task,) = rig.ex.ran
    rig.prod.on_event(rig.ex.started(task, 1.0), 1.0)      # the timeout counts from the handler's start
    rig.tick(3.5)
    assert rig.ex.cancelled == []
    assert rig.prod.next_wake() == pytest.approx(4.0)
    rig.tick(4.0)
    assert rig.ex.cancelled == [task]
    row = rig.status(rid)
    assert row["status"] == s.FAILED and "timeout" in row["result_payload"]


def test_a_stop_cancels_its_running_target(rig):
    client.register_job(rig.driver.engine, "LONG", "worker.jobs.builtin:sleep", allow_overlap=True)
    running = client.enqueue(rig.driver.engine, "LONG")
    rig.tick(0.0)
    client.request_stop(rig.driver.engine, request_id=running)
    rig.prod.notify("dms_prcreq")                   # what the STOP's insert NOTIFY does
    rig.tick(0.5)
    assert [t.request_id for t in rig.ex.cancelled] == [running]
    assert rig.status(running)["status"] == s.CANCELLED


def test_history_days_run_one_after_another(rig):
    client.register_job(rig.driver.engine, "H", "worker.jobs.builtin:noop")
    rid = client.enqueue_history(rig.driver.engine, "H", "2026-01-01", "2026-01-02", truncate_flag="Y")
    rig.tick(0.0)
    first = rig.ex.ran[0]
    assert (first.params["param1"], first.params["truncate_flag"], first.finish.request_status) == (
        "2026-01-01", True, None)
    rig.prod.on_event(rig.ex.done(first, result=1), 0.1)
    rig.tick(0.1)
    second = rig.ex.ran[1]
    assert (second.params["param1"], second.params["truncate_flag"], second.finish.request_status) == (
        "2026-01-02", False, s.DONE)
    rig.prod.on_event(rig.ex.done(second, result=2), 0.2)
    rig.tick(0.2)
    row = rig.status(rid)
    assert row["status"] == s.DONE
    assert json.loads(row["result_payload"]) == {"days": 2, "results": [{"day": "2026-01-01", "result": 1},
                                                                        {"day": "2026-01-02", "result": 2}]}


def test_a_resumed_history_request_says_how_many_days_ran_before_it(rig):
    client.register_job(rig.driver.engine, "H", "worker.jobs.builtin:noop", max_attempts=2)
    rid = client.enqueue_history(rig.driver.engine, "H", "2026-01-01", "2026-01-03")
    rig.tick(0.0)
    rig.prod.on_event(rig.ex.done(rig.ex.ran[0], result=1), 0.1)
    rig.tick(0.1)
    second = rig.ex.ran[1]
    # Its replica is lost during day 2 (here: its claim erased) and the rescue hands the request back.
    rig.ex.slot_of(second).task = None
    rig.prod.flights.clear()
    with rig.driver.begin() as conn:
        conn.execute(sa.update(s.prcreq).values(claimed_by=None))
    rig.driver.request_rescue(RescueParams(stale_after_s=60))
    assert rig.status(rid)["status"] == s.NEW
    rig.prod.wake()
    rig.tick(1.0)
    resumed = rig.ex.ran[2:]
    assert [t.params["param1"] for t in resumed] == ["2026-01-02"], "day 1 is not run again"
    rig.prod.on_event(rig.ex.done(resumed[0], result=2), 1.1)
    rig.tick(1.1)
    rig.prod.on_event(rig.ex.done(rig.ex.ran[3], result=3), 1.2)
    rig.tick(1.2)
    row = rig.status(rid)
    assert row["status"] == s.DONE
    assert json.loads(row["result_payload"]) == {"days": 3, "days_before_resume": 1,
                                                 "results": [{"day": "2026-01-02", "result": 2},
                                                             {"day": "2026-01-03", "result": 3}]}


def test_a_history_request_handed_back_between_days_resumes_where_it_stopped(rig):
    """Found by the chaos suite (seed 8202): a SIGTERM between two days hands the request back
    with its attempt refunded, and the next claim (attempt 1 again) reran the days already done."""
    client.register_job(rig.driver.engine, "H", "worker.jobs.builtin:noop")
    rid = client.enqueue_history(rig.driver.engine, "H", "2026-02-19", "2026-02-21")
    rig.tick(0.0)
    rig.prod.draining = True                        # SIGTERM while day 1 runs
    rig.prod.on_event(rig.ex.done(rig.ex.ran[0], result=1), 0.1)
    rig.tick(0.1)
    assert rig.status(rid)["status"] == s.NEW and rig.status(rid)["attempts"] == 0, "handed back, not counted"
    rig.prod.draining = False                       # the next replica
    rig.prod.wake()
    rig.tick(1.0)
    assert [t.params["param1"] for t in rig.ex.ran[1:]] == ["2026-02-20"], "day 1 is done: not run again"


def test_a_fenced_execution_hands_its_request_back(rig):
    client.register_job(rig.driver.engine, "J", "worker.jobs.builtin:noop")
    rid = client.enqueue(rig.driver.engine, "J")
    rig.tick(0.0)
    (task,) = rig.ex.ran
    slot = rig.ex.slot_of(task)
    slot.task = None
    rig.prod.on_event(Event(slot, task, "died", {"exitcode": EXIT_FENCED}), 0.1)
    rig.comp.flush()
    row = rig.status(rid)
    assert (row["status"], row["attempts"], row["claimed_by"]) == (s.NEW, 0, None), "the attempt is not counted"


def test_draining_claims_nothing_and_hands_back_what_runs(rig):
    client.register_job(rig.driver.engine, "J", "worker.jobs.builtin:sleep")
    rid = client.enqueue(rig.driver.engine, "J")
    rig.tick(0.0)
    rig.prod.draining = True
    other = client.enqueue(rig.driver.engine, "J2")
    rig.tick(1.0)
    assert rig.status(other)["status"] == s.NEW
    rig.prod.hand_back_all(2.0)
    rig.comp.flush()
    assert rig.status(rid)["status"] == s.NEW and rig.prod.idle()
