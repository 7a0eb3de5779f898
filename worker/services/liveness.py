"""Liveness: the replica's row in DMS_WORKER, its heartbeat, and the execution fence.

Every heartbeat writes, from the database clock, the heartbeat time and the instant until
which this replica counts as alive (heartbeat + its own ``DMS_RESCUE_AFTER``): rescuers judge
it by that, whatever their own settings. A successful heartbeat moves the fence (a shared
value the execution processes read): a child whose replica has not confirmed a heartbeat for
``DMS_RESCUE_AFTER - 2 x DMS_HEARTBEAT_INTERVAL`` stops itself, before anyone may rescue its
row. The fence moves to the time the heartbeat was *sent*, never later, so it can only err on
the side of stopping early.

The service runs on a thread of its own (``run_in_thread``) so that nothing the control loop
does (a slow claim, a database call that waits) delays it; and it stops heartbeating when the
loop has made no progress for half the fence, so that a stuck replica is rescued like a dead
one instead of holding its rows for ever.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from .. import retry
from ..drivers.base import Heartbeat, SQLDriver, WorkerInfo

log = logging.getLogger("worker.liveness")


class Liveness:
    def __init__(self, driver: SQLDriver, info: WorkerInfo, interval_s: float, fence: Any, *,
                 running: Callable[[], int] = lambda: 0, on_ok: Callable[[float], None] = lambda now: None,
                 loop_stalled: Callable[[float], bool] = lambda now: False) -> None:
        self.driver, self.info, self.interval_s, self.fence = driver, info, interval_s, fence
        self.running, self.on_ok, self.loop_stalled = running, on_ok, loop_stalled
        self.registered = False
        self.dead = False                   # the cluster declared us dead: waiting for revive()
        self.fresh_since: float | None = None
        self.last_ok: float | None = None
        self._next = 0.0
        self._stall_logged = False

    def tick(self, now: float) -> None:
        if now < self._next:
            return
        self._next = now + self.interval_s
        if self.dead:
            return
        if self.loop_stalled(now):
            if not self._stall_logged:
                log.error("replica %s: the control loop has made no progress; heartbeats stop so that the "
                          "cluster rescues its rows", self.info.worker_id)
                self._stall_logged = True
            return
        self._stall_logged = False
        if not self.registered:
            self.driver.worker_register(self.info)
            self.registered = True
            self._ok(now)
            return
        if self.driver.worker_heartbeat(Heartbeat(self.info.worker_id, self.running(), self.info.rescue_after_s)):
            self._ok(now)
        else:
            log.error("replica %s was declared dead by the cluster (its rows were rescued)", self.info.worker_id)
            self.dead, self.registered, self.fresh_since = True, False, None

    def _ok(self, sent_at: float) -> None:
        self.fence.value = sent_at
        self.last_ok = sent_at
        if self.fresh_since is None:
            self.fresh_since = sent_at
        self.on_ok(sent_at)

    def failed(self) -> None:
        """A heartbeat could not be written: freshness starts over when one is."""
        self.fresh_since = None

    def revive(self) -> None:
        """The replica has let go of everything it ran: register again."""
        self.dead, self._next = False, 0.0

    def next_wake(self) -> float:
        return self._next

    def fresh_for(self, now: float) -> float:
        """How long heartbeats have succeeded without a gap (0 when the last one failed)."""
        return 0.0 if self.fresh_since is None else now - self.fresh_since

    def ready(self, now: float, max_age_s: float) -> tuple[bool, str]:
        if self.last_ok is None or self.fresh_since is None:
            return False, "database unreachable"
        age = now - self.last_ok
        if age > max_age_s:
            return False, f"heartbeat {age:.1f}s old"
        return True, "ready"

    def run_in_thread(self, clock: Callable[[], float], stop: threading.Event,
                      on_error: Callable[[BaseException], None]) -> threading.Thread:
        """Heartbeat on a thread of its own until ``stop`` is set; transient errors back off
        (the one retry policy) and are reported through ``on_error``."""
        def loop() -> None:
            failures = 0
            while not stop.is_set():
                now = clock()
                try:
                    self.tick(now)
                    failures = 0
                    wait = self.next_wake() - clock()
                except Exception as exc:  # noqa: BLE001 - a replica never dies of one heartbeat
                    failures += 1
                    self.failed()
                    on_error(exc)
                    self._next = 0.0
                    wait = retry.db_delay(failures)
                stop.wait(max(0.0, min(wait, self.interval_s)))
        thread = threading.Thread(target=loop, name="dms-liveness", daemon=True)
        thread.start()
        return thread
