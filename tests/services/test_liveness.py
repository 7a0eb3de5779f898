"""Liveness in-process: a real SQLite database, a fake clock."""
from __future__ import annotations

import threading
import time
import types

import sqlalchemy as sa

from worker import schema as s
from worker.drivers.base import WorkerInfo
from worker.services.liveness import Liveness

W = "w1:1:aa"


def make(driver, stalled=lambda now: False):
    fence = types.SimpleNamespace(value=-1.0)
    return Liveness(driver, WorkerInfo(W, "h", 1, "t", 4, rescue_after_s=8), 1.0, fence, loop_stalled=stalled), fence


def expires_in(driver):
    with driver.engine.connect() as conn:
        row = conn.execute(sa.select(s.worker.c.expires_at, s.worker.c.heartbeat_at)).one()
    return (row.expires_at - row.heartbeat_at).total_seconds()


def test_registers_then_heartbeats_and_moves_the_fence_to_the_send_time(lite):
    live, fence = make(lite)
    live.tick(10.0)
    assert live.registered and fence.value == 10.0 and live.next_wake() == 11.0
    live.tick(10.5)                           # not due: no statement, no change
    assert fence.value == 10.0
    live.tick(11.0)
    assert fence.value == 11.0 and live.fresh_for(12.0) == 2.0
    assert 7.9 <= expires_in(lite) <= 8.1, "alive by its own word for its own rescue window"


def test_a_replica_declared_dead_stops_heartbeating_until_it_lets_go(lite):
    live, fence = make(lite)
    live.tick(0.0)
    lite.worker_unregister(W)                 # a rescuer removed us
    live.tick(1.0)
    assert live.dead and not live.registered and fence.value == 0.0 and live.fresh_for(1.0) == 0.0
    live.tick(2.0)
    assert fence.value == 0.0, "no heartbeat while the replica still holds executions"
    live.revive()
    live.tick(2.5)
    assert live.registered and not live.dead and fence.value == 2.5


def test_a_stalled_control_loop_stops_the_heartbeat(lite):
    stalled = {"now": False}
    live, fence = make(lite, stalled=lambda now: stalled["now"])
    live.tick(0.0)
    stalled["now"] = True
    live.tick(1.0)
    live.tick(2.0)
    assert fence.value == 0.0, "the executions fence themselves and the rows get rescued"
    stalled["now"] = False
    live.tick(3.0)
    assert fence.value == 3.0


def test_readiness_follows_the_last_heartbeat(lite):
    live, _ = make(lite)
    assert live.ready(0.0, 4.0) == (False, "database unreachable")
    live.tick(0.0)
    assert live.ready(3.0, 4.0) == (True, "ready")
    ok, reason = live.ready(5.0, 4.0)
    assert not ok and "5.0s old" in reason


def test_the_heartbeat_thread_backs_off_on_errors_and_reports_them(lite):
    live, fence = make(lite)
    errors = []
    stop = threading.Event()
    real = lite.worker_heartbeat
    lite.worker_heartbeat = lambda p: (_ for _ in ()).throw(sa.exc.OperationalError("x", {}, Exception("down")))
    thread = live.run_in_thread(time.monotonic, stop, errors.append)
    try:
        deadline = time.monotonic() + 5
        while len(errors) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(errors) >= 2 and live.fresh_since is None
        lite.worker_heartbeat = real
        deadline = time.monotonic() + 15
        while live.fresh_since is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert live.fresh_since is not None, "heartbeats resume once the database answers"
    finally:
        stop.set()
        thread.join(5)
