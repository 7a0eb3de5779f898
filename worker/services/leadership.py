"""Leadership: become the scheduler leader, keep it, give it up.

``lock`` mode (PostgreSQL advisory lock, Oracle DBMS_LOCK): a replica that gets the session
lock takes the DMS_LEADER row whatever it says (its last holder's session is gone); one that
does not only takes a row whose lease has expired (a holder that hangs keeps its session, and
so its lock). ``lease`` mode: the row alone. Either way the row's epoch fences every leader
write, and the leader stops acting two heartbeats before its lease could expire.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

from ..drivers.base import LeaderElect, LeaderLockUnavailable, LeaderTerm, SQLDriver

log = logging.getLogger("worker.leadership")


class Leadership:
    def __init__(self, driver: SQLDriver, worker_id: str, mode: str, ttl_s: float, interval_s: float, *,
                 on_change: Callable[[bool], None] = lambda leading: None) -> None:
        if mode == "auto":
            mode = driver.default_leader_mode
        if mode == "lock" and not driver.supports_leader_lock:
            raise ValueError(f"leader mode 'lock' is not available on {driver.name} (use lease)")
        self.driver, self.worker_id, self.mode = driver, worker_id, mode
        self.ttl_s, self.interval_s, self.on_change = ttl_s, interval_s, on_change
        self.epoch: int | None = None
        self.lease_until = 0.0
        self._next = 0.0

    def leading(self, now: float) -> bool:
        """Leader, and the lease surely still ours."""
        return self.epoch is not None and now < self.lease_until

    def tick(self, now: float) -> None:
        if now < self._next:
            return
        self._next = now + self.interval_s
        valid_for = self.ttl_s - 2 * self.interval_s    # renewals come this often; keep two in hand
        if self.epoch is not None:
            alive = (self.mode != "lock" or self.driver.leader_lock_held()) and \
                self.driver.leader_lease_renew(LeaderTerm(self.worker_id, self.epoch, self.ttl_s))
            if alive:
                self.lease_until = now + valid_for
            else:
                log.warning("replica %s lost the leadership (epoch %s)", self.worker_id, self.epoch)
                self.step_down()
            return
        try:
            force = self.mode == "lock" and self.driver.leader_lock_try()
        except LeaderLockUnavailable as exc:
            # Every attempt would fail alike: say so once and lead by the lease row, which the
            # same epoch fences.
            log.error("leader election: %s; leading by the lease row until restarted", exc)
            self.mode, force = "lease", False
        try:
            result = self.driver.leader_lease_take(LeaderElect(self.worker_id, self.ttl_s, self.mode, force))
        except Exception:
            if force:
                self.driver.leader_lock_release()       # never keep the lock without the row
            raise
        if result.epoch is None:
            if force:
                self.driver.leader_lock_release()
            if result.expires_in is not None and 0 <= result.expires_in < self.interval_s:
                self._next = now + result.expires_in + 0.01     # ask again the moment it expires
            return
        self.epoch, self.lease_until = result.epoch, now + valid_for
        log.warning("replica %s is now the leader (epoch %s, %s)", self.worker_id, self.epoch, self.mode)
        self.on_change(True)

    def step_down(self) -> None:
        """Stop acting as leader now (fenced off, lease lost, declared dead)."""
        was = self.epoch is not None
        self.epoch = None
        self.driver.leader_lock_release()
        if was:
            self.on_change(False)

    def resign(self) -> None:
        """Give the lease up so that another replica takes over at once (shutdown)."""
        if self.epoch is None:
            return
        epoch = self.epoch
        try:
            self.driver.leader_lease_resign(LeaderTerm(self.worker_id, epoch))
            log.warning("replica %s resigned the leadership (epoch %s)", self.worker_id, epoch)
        finally:
            self.step_down()

    def next_wake(self) -> float:
        return self._next
