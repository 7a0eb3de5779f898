"""Execution processes for real (fork server children), driven without a replica: readiness,
stopping without waiting, the handler's own vetting of payload keys, and a handler's database
work committing with its request's outcome only while the request is ours."""
from __future__ import annotations

import os
import time
from multiprocessing.connection import wait

import pytest
import sqlalchemy as sa

from tests.support import probe, wait_until
from worker import client, logs
from worker import schema as s
from worker.drivers import make_driver
from worker.drivers.base import ClaimParams, ExecutionFinish, WorkerInfo
from worker.executor import ChildConfig, Executor, Task

W = "w1:1:aa"


@pytest.fixture
def rig(sqlite_url):
    driver = make_driver(sqlite_url)
    driver.worker_register(WorkerInfo(W, "h", 1, "t", 2))
    fence = logs.CONTEXT.Value("d", time.monotonic() + 3600, lock=False)
    executor = Executor(2, ChildConfig(sqlite_url, None, "INFO", fence_s=60, stop_grace=10), fence,
                        preload=("worker.drivers.sqlite",))
    executor.start()
    yield driver, executor
    executor.close()
    driver.dispose()


def pump(executor, until, timeout=30.0):
    """Run the executor's side of the loop until ``until(events)`` is true."""
    seen = []
    deadline = time.monotonic() + timeout
    while not until(seen):
        assert time.monotonic() < deadline, f"timed out; events so far: {[e.kind for e in seen]}"
        now = time.monotonic()
        executor.tick(now)
        for ready in wait(executor.waitables(), 0.05):
            seen += executor.receive(ready, time.monotonic())
    return seen


def claimed_task(driver, mapref, handler, payload=None, unvetted=()):
    client.register_job(driver.engine, mapref, handler, allow_overlap=True)
    client.enqueue(driver.engine, mapref, payload=payload)
    (req,) = driver.request_claim(ClaimParams(W, job_limit=1))
    finish = ExecutionFinish(req.request_id, W, req.prcid, mapref, s.COMPLETED, msg="completed", request_status=s.DONE)
    return req, Task(prcid=req.prcid, request_id=req.request_id, mapref=mapref, request_type=s.IMMEDIATE,
                     handler=handler, attempt=1, params={}, payload=payload or {}, as_of=None, unvetted=unvetted,
                     finish=finish)


def test_children_say_when_they_are_ready_and_a_stop_never_waits_for_one(rig):
    driver, ex = rig
    pump(ex, lambda _: len(ex.idle_slots()) == 2)
    _, task = claimed_task(driver, "SLEEP", "worker.jobs.builtin:sleep", {"seconds": 120}, ("seconds",))
    slot = ex.idle_slots()[0]
    pid = slot.process.pid
    ex.run(slot, task, None)
    pump(ex, lambda events: any(e.kind == "started" for e in events))
    t0 = time.monotonic()
    ex.cancel(slot, t0, grace_s=10)          # the sleep ignores cancellation: it must be killed
    assert time.monotonic() - t0 < 0.5, "cancel returns at once, whatever the grace"
    assert not slot.idle and slot.process.pid == pid
    ex.tick(t0 + 10)                          # the grace is over: killed, and a new child started
    wait_until(lambda: (ex.tick(time.monotonic()), slot.process.pid != pid)[1], 10, "the replacement child")
    pump(ex, lambda _: slot.idle)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


@pytest.mark.parametrize("handler, accepted", [("worker.jobs.builtin:noop", False), ("worker.jobs.builtin:sleep", True)])
def test_payload_keys_the_job_did_not_allow_need_the_handlers_own_consent(rig, handler, accepted):
    driver, ex = rig
    pump(ex, lambda _: ex.idle_slots())
    _, task = claimed_task(driver, "KEYS", handler, {"seconds": 0.01}, ("seconds",))
    ex.run(ex.idle_slots()[0], task, None)
    (done,) = [e for e in pump(ex, lambda ev: any(e.kind == "done" for e in ev)) if e.kind == "done"]
    if accepted:
        assert done.data["ok"], done.data
    else:
        assert done.data.get("bad_request") and "'seconds' may not be set by a request" in done.data["error"]


def test_a_handlers_work_commits_with_its_outcome_only_while_the_request_is_ours(rig):
    driver, ex = rig
    probe.create(driver.engine, checkfirst=True)
    pump(ex, lambda _: len(ex.idle_slots()) == 2)
    req, task = claimed_task(driver, "TX", "tests.handlers:record", {"seconds": 0.01})
    ex.run(ex.idle_slots()[0], task, None)
    (done,) = [e for e in pump(ex, lambda ev: any(e.kind == "done" for e in ev)) if e.kind == "done"]
    assert done.data.get("recorded"), done.data
    assert client.request_status(driver.engine, req.request_id)["status"] == s.DONE
    # The same again, but the request is taken from us while the handler runs.
    req, task = claimed_task(driver, "TX2", "tests.handlers:record", {"seconds": 1.0})
    ex.run(ex.idle_slots()[0], task, None)
    pump(ex, lambda ev: any(e.kind == "started" for e in ev))
    with driver.begin() as conn:
        conn.execute(sa.update(s.prcreq).where(s.prcreq.c.request_id == req.request_id).values(
            status=s.NEW, claimed_by=None))
    (done,) = [e for e in pump(ex, lambda ev: any(e.kind == "done" for e in ev)) if e.kind == "done"]
    assert done.data.get("lost"), done.data
    with driver.engine.connect() as conn:
        rows = conn.execute(sa.select(probe.c.mapref)).scalars().all()
    assert rows == ["TX"], "the second handler's work was rolled back"


def test_a_handler_that_never_touches_the_database_opens_no_connection(sqlite_url):
    """The no-op path costs the execution process no connection and no transaction: with a
    database the child cannot reach, a no-op still succeeds (its outcome goes to the replica's
    completer), while a handler that uses ctx.connection fails on the unreachable server."""
    driver = make_driver(sqlite_url)
    driver.worker_register(WorkerInfo(W, "h", 1, "t", 2))
    fence = logs.CONTEXT.Value("d", time.monotonic() + 3600, lock=False)
    nowhere = "postgresql+psycopg://dms@127.0.0.1:9/unreachable?connect_timeout=2"
    ex = Executor(1, ChildConfig(nowhere, None, "INFO", fence_s=60, stop_grace=10), fence,
                  preload=("worker.drivers.postgresql",))
    ex.start()
    try:
        outcomes = []
        for mapref, handler in (("NOOP", "worker.jobs.builtin:noop"), ("USES_DB", "tests.handlers:record")):
            pump(ex, lambda _: ex.idle_slots())
            _, task = claimed_task(driver, mapref, handler, {"seconds": 0.01})
            ex.run(ex.idle_slots()[0], task, None)
            (done,) = [e for e in pump(ex, lambda ev: any(e.kind == "done" for e in ev)) if e.kind == "done"]
            outcomes.append(done.data)
        noop, uses_db = outcomes
        assert noop["ok"] and not noop.get("committed"), noop
        assert not uses_db["ok"] and "127.0.0.1" in uses_db["error"] + str(uses_db.get("dberror")), uses_db
    finally:
        ex.close()
        driver.dispose()


def test_the_working_directory_is_searched_for_handlers_last(tmp_path, monkeypatch):
    """`dms-worker run` finds a handler module in its working directory, but a file there named
    like an installed module does not shadow it, with `python -m worker` (what `supervise`
    runs) as with the console script."""
    import subprocess
    import sys

    from worker.executor import resolve_handler

    (tmp_path / "dms_cwd_probe.py").write_text("def hello(ctx):\n    return 'from cwd'\n")
    (tmp_path / "argparse.py").write_text("raise SystemExit('the working directory shadowed argparse')\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert resolve_handler("dms_cwd_probe:hello")(None) == "from cwd"
    assert sys.path[-1] == str(tmp_path)

    done = subprocess.run([sys.executable, "-m", "worker", "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "shadowed" not in done.stderr
