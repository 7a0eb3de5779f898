"""Maintenance: the leader's housekeeping. Rescue the rows of dead replicas, prune finished
history in batches, and refresh the queue gauges from one query.

Only a replica that has itself been heartbeating for a whole rescue window may rescue: after
an outage everyone's heartbeat is old, and everyone is alive.
"""
from __future__ import annotations

import logging
from collections.abc import Callable

from ..drivers.base import PruneParams, RescueParams, SQLDriver
from ..metrics import Metrics

log = logging.getLogger("worker.maintenance")

PRUNE_BATCH, PRUNE_BATCHES_PER_TICK = 1000, 10
QUEUE_GAUGES_INTERVAL_S = 15.0      # the leader's one queue-depth query, whatever the scrape rate
RESCUE_BATCH = 500


class Maintenance:
    def __init__(self, driver: SQLDriver, metrics: Metrics, *, rescue_after_s: float, interval_s: float,
                 prune_interval_s: float, retention_days: float, log_retention_days: float | None,
                 fresh_for: Callable[[float], float]) -> None:
        self.driver, self.metrics = driver, metrics
        self.rescue_after_s, self.interval_s, self.prune_interval_s = rescue_after_s, interval_s, prune_interval_s
        self.retention_days, self.log_retention_days = retention_days, log_retention_days
        self.fresh_for = fresh_for
        self.reset()

    def reset(self) -> None:
        """A new term as leader: everything is due at once."""
        self._next_rescue = self._next_prune = self._next_gauges = 0.0

    def tick(self, now: float) -> None:
        if now >= self._next_rescue:
            self._next_rescue = now + self.interval_s
            if self.fresh_for(now) >= self.rescue_after_s:
                self.rescue()
        if now >= self._next_gauges:
            self._next_gauges = now + QUEUE_GAUGES_INTERVAL_S
            self.metrics.set_queue(*self.driver.queue_depth())
        if now >= self._next_prune:
            self._next_prune = now + self.prune_interval_s
            self.prune()

    def rescue(self) -> None:
        while True:
            result = self.driver.request_rescue(RescueParams(self.rescue_after_s, RESCUE_BATCH))
            if result.requeued or result.failed:
                self.metrics.rescued(len(result.requeued) + len(result.failed))
            for rid in result.requeued:
                log.warning("rescued request %s: back to NEW", rid)
            for rid in result.failed:
                log.warning("rescued request %s: FAILED, no attempts left", rid)
            if result.workers_removed:
                log.warning("removed dead replica(s): %s", ", ".join(result.workers_removed))
            if len(result.requeued) + len(result.failed) < RESCUE_BATCH:
                return

    def prune(self) -> None:
        for prune, days in ((self.driver.request_prune, self.retention_days),
                            (self.driver.execution_prune, self.log_retention_days)):
            if days is None:
                continue            # kept for ever (the default for the logs DBAs rely on)
            for _ in range(PRUNE_BATCHES_PER_TICK):
                if prune(PruneParams(days * 86400, PRUNE_BATCH)) < PRUNE_BATCH:
                    break

    def next_wake(self) -> float:
        return min(self._next_rescue, self._next_gauges, self._next_prune)
