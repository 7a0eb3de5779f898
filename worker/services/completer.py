"""Completer: the outcomes of executions, buffered and written in batches.

Outcomes from any slot that arrive within ``window_s`` of the first one pending (or once
``batch_max`` are pending) go to the database together: one ``execution_finish_many`` (one
statement on PostgreSQL) for finished executions, one ``request_resolve_many`` for claimed
requests that never got an execution, one ``execution_annotate_many`` for what running
executions should show. Every row is still conditional on this replica owning its request.

An outcome stays buffered until it is written: a transient error (the database is away)
leaves everything for the next attempt. A batch the database refuses for another reason is
split until the one outcome it refuses is alone; that one is written in a simpler form (the
request FAILED with the reason), so one bad row never holds up the others.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TypeVar

from ..drivers.base import ExecutionAnnotate, ExecutionFinish, RequestResolve, SQLDriver, dumps
from . import NEVER

log = logging.getLogger("worker.completer")
T = TypeVar("T", ExecutionFinish, RequestResolve)


class Completer:
    def __init__(self, driver: SQLDriver, *, window_s: float = 0.002, batch_max: int = 500,
                 on_lost: Callable[[str], object] = lambda request_id: None,   # its result is ignored
                 on_written: Callable[[], None] = lambda: None) -> None:
        self.driver, self.window_s, self.batch_max, self.on_lost = driver, window_s, batch_max, on_lost
        # Called after requests were ended or handed back: a no-overlap mapref they held is free.
        self.on_written = on_written
        self.finishes: list[ExecutionFinish] = []
        self.resolves: list[RequestResolve] = []
        self.annotations: list[ExecutionAnnotate] = []
        self._due: float | None = None

    # -- what the producer hands over -------------------------------------------------------------
    def finish(self, f: ExecutionFinish, now: float) -> None:
        self.finishes.append(f)
        self._arm(now)

    def resolve(self, r: RequestResolve, now: float) -> None:
        self.resolves.append(r)
        self._arm(now)

    def annotate(self, a: ExecutionAnnotate, now: float) -> None:
        self.annotations.append(a)
        self._arm(now)

    def _arm(self, now: float) -> None:
        if self._due is None:
            self._due = now + self.window_s

    def pending(self) -> bool:
        return bool(self.finishes or self.resolves or self.annotations)

    def pending_ids(self) -> set[str]:
        return {f.request_id for f in self.finishes} | {r.request_id for r in self.resolves}

    def drop_all(self) -> None:
        """Forget everything buffered (the cluster took our rows: none of it can be written)."""
        self.finishes.clear()
        self.resolves.clear()
        self.annotations.clear()
        self._due = None

    # -- the service ------------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        if self._due is not None and (now >= self._due or self._size() >= self.batch_max):
            self.flush()

    def next_wake(self) -> float:
        return NEVER if self._due is None else self._due

    def _size(self) -> int:
        return len(self.finishes) + len(self.resolves) + len(self.annotations)

    def flush(self) -> None:
        """Write everything buffered. Raises on a transient error, keeping what is unwritten."""
        ended_any = False
        while self.finishes:
            batch = _distinct(self.finishes[:self.batch_max])
            owned = self._isolated(self.driver.execution_finish_many, batch, self._fallback_finish)
            del self.finishes[:len(batch)]
            ended_any = ended_any or any(f.request_status is not None for f in batch)
            for f, ok in zip(batch, owned):
                if not ok:
                    log.warning("request %s was no longer ours when it finished (rescued?); outcome dropped",
                                f.request_id)
                    self.on_lost(f.request_id)
        ended = False
        while self.resolves:
            resolves = _distinct(self.resolves[:self.batch_max])
            self._isolated(self.driver.request_resolve_many, resolves, self._fallback_resolve)
            del self.resolves[:len(resolves)]
            ended = True
        if self.annotations:
            notes = self.annotations[:]
            self.driver.execution_annotate_many(notes)
            del self.annotations[:len(notes)]
        self._due = None
        if ended or ended_any:
            self.on_written()

    def _isolated(self, write: Callable[[Sequence[T]], list[bool]], batch: list[T],
                  fallback: Callable[[T, BaseException], T | None]) -> list[bool]:
        """``write(batch)``; if the database refuses the batch for a reason that retrying will
        not cure, write its halves apart, down to the one outcome it refuses, and write that
        one through ``fallback`` (or give it up, logged, if even that is refused)."""
        try:
            return write(batch)
        except Exception as exc:
            if self.driver.is_transient(exc):
                raise
            if len(batch) > 1:
                half = len(batch) // 2
                return (self._isolated(write, batch[:half], fallback)
                        + self._isolated(write, batch[half:], fallback))
            log.error("the database refused the outcome of request %s: %s", batch[0].request_id,
                      " ".join(str(exc).split())[:500])
            simpler = fallback(batch[0], exc)
            if simpler is not None:
                try:
                    return write([simpler])
                except Exception as again:  # noqa: BLE001
                    if self.driver.is_transient(again):
                        raise
            log.error("request %s: outcome given up; the row stays ours until the orphan check hands it back",
                      batch[0].request_id)
            return [True]

    @staticmethod
    def _fallback_finish(f: ExecutionFinish, exc: BaseException) -> ExecutionFinish | None:
        reason = _unrecorded(exc)
        return replace(f, log_status="FL", msg=reason, rejects=(), error=("RECORD_OUTCOME", reason, None), params=None,
                       request_status="FAILED", result_payload=dumps({"error": reason}), sessionid=None,
                       jobschid=None, scheduled_for=None)

    @staticmethod
    def _fallback_resolve(r: RequestResolve, exc: BaseException) -> RequestResolve | None:
        return replace(r, status="FAILED", result_payload=dumps({"error": _unrecorded(exc)}))


def _unrecorded(exc: BaseException) -> str:
    return f"the outcome could not be recorded: {' '.join(str(getattr(exc, 'orig', exc)).split())[:300]}"


def _distinct(items: list[T]) -> list[T]:
    """The longest prefix with one outcome per request: a statement must not update one row
    twice (the second update would silently lose to the first)."""
    seen: set[str] = set()
    for i, item in enumerate(items):
        if item.request_id in seen:
            return items[:i]
        seen.add(item.request_id)
    return items
