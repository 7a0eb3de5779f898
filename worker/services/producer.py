"""Producer: claim work into ready execution slots, start it, stop it, and turn what the
execution processes report into outcomes for the completer.

A claim is one ``request_claim``: at most as many job requests as there are ready slots (and
one per busy no-overlap mapref), which come back already PROCESSING with their DMS_PRCLOG
rows open, plus the control requests (STOP; REFRESH_SCHEDULE while leading). Claims run when
work may be waiting: after a wake-up (NOTIFY, AQ), when the last claim filled every slot, when
an execution of ours ended, at the due time of a retry, and at every poll interval.

What one request asks for is checked here, row by row (``worker.requests``): a request that
cannot run ends FAILED with the reason; nothing about one row can fail the batch it came in.
"""
from __future__ import annotations

import heapq
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from datetime import time as dtime
from typing import Any

from .. import requests as rq
from .. import retry
from .. import schema as s
from ..drivers.base import (
    ClaimedRequest,
    ClaimParams,
    ExecutionAnnotate,
    ExecutionFinish,
    ExecutionOpen,
    JobDef,
    Reject,
    RequestResolve,
    SQLDriver,
    StartRefused,
    StopParams,
    dumps,
)
from ..executor import EXIT_FENCED, Event, Executor, Slot, Task
from ..metrics import Metrics
from .completer import Completer

log = logging.getLogger("worker.producer")

ANNOTATE_AFTER_S = 1.0          # a running execution's params reach DMS_PRCLOG after this long
ORPHAN_CHECK_INTERVAL_S = 60.0


@dataclass
class Flight:
    """A request this replica runs, from its claim to its last outcome."""
    req: ClaimedRequest
    job: JobDef
    work: rq.Work
    days: list[date | None]                 # what is left to run: [None] for IMMEDIATE
    as_of: date | None
    prcid: int | None
    first: bool = True                      # the next run is the request's first (truncate)
    slot: Slot | None = None
    started: float | None = None            # when its current execution started (monotonic)
    sessionid: str | None = None
    annotated: bool = False
    open_next: bool = False                 # a HISTORY day ended: open and start the next one
    stop_reason: str | None = None
    day_results: list[Any] = field(default_factory=list)
    claimed_mono: float = 0.0

    @property
    def day(self) -> date | None:
        return self.days[0] if self.days else None

    @property
    def running(self) -> bool:
        return self.slot is not None and self.slot.task is not None

    def params(self) -> dict[str, Any]:
        return self.work.params_for(self.day, self.first)

    def log_params(self) -> dict[str, str | None]:
        return {k: v for k, v in self.params().items() if k.startswith("param")}


@dataclass(frozen=True)
class ProducerSettings:
    poll_interval_s: float
    stop_check_s: float                     # how often to look for STOP flags on our rows
    stop_grace_s: float
    retry_max_delay_s: float


class Producer:
    def __init__(self, driver: SQLDriver, worker_id: str, executor: Executor, completer: Completer,
                 metrics: Metrics, settings: ProducerSettings, *,
                 leading: Callable[[], bool] = lambda: False, on_refresh: Callable[[], None] = lambda: None) -> None:
        self.driver, self.worker_id, self.executor = driver, worker_id, executor
        self.completer, self.metrics, self.settings = completer, metrics, settings
        self.leading, self.on_refresh = leading, on_refresh
        self.flights: dict[str, Flight] = {}
        self.draining = False
        self.maybe_work = True
        self.needs_reconcile = False
        self._next_poll = 0.0
        self._next_stop_check = 0.0
        self._stop_flagged = False
        self._next_orphan_check = ORPHAN_CHECK_INTERVAL_S
        self._due: list[float] = []            # monotonic times a delayed request becomes due
        self._terminate: list[str] = []         # database sessions of killed executions
        self._db_offset: float | None = None    # database clock (epoch s) minus monotonic, at the last claim

    # -- signals from outside ---------------------------------------------------------------------
    def notify(self, channel: str, payload: str = "") -> None:
        """A wake-up channel fired: work may be waiting, or was delayed until ``payload``."""
        if channel == "dms_stop":
            self._stop_flagged = True
            return
        due = _epoch(payload)
        if due is not None and self._db_offset is not None:
            self.wake_at(due - self._db_offset)
        else:
            self.maybe_work = True

    def wake(self) -> None:
        """Claim at the next tick (a slot or a no-overlap mapref was freed)."""
        self.maybe_work = True

    def wake_at(self, when: float) -> None:
        heapq.heappush(self._due, when)

    # -- the service ------------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        self._check_deadlines(now)
        if self._terminate:
            self._terminate_sessions()
        if self.flights and (self._stop_flagged or now >= self._next_stop_check):
            self._apply_stop_flags(now)
        self._annotate(now)
        if self.needs_reconcile or now >= self._next_orphan_check:
            self._release_orphans(now)
        self._open_next_days(now)
        if self.draining:
            return
        while self._due and self._due[0] <= now:
            heapq.heappop(self._due)
            self.maybe_work = True
        if now >= self._next_poll:
            self.maybe_work = True
            self._next_poll = now + self.settings.poll_interval_s
        if self.maybe_work:
            self._claim(now)

    def next_wake(self) -> float:
        times = [self._next_poll, self._next_orphan_check, *self.executor.deadlines()]
        if self._due:
            times.append(self._due[0])
        if self.flights:
            times.append(self._next_stop_check)
            times += [f.started + ANNOTATE_AFTER_S for f in self.flights.values()
                      if f.started is not None and not f.annotated]
        if self._terminate or self._stop_flagged or any(f.open_next for f in self.flights.values()):
            return 0.0
        if self.maybe_work and not self.draining and self.ready_slots() > 0:
            return 0.0
        return min(times)

    def idle(self) -> bool:
        return not self.flights

    def ready_slots(self) -> int:
        waiting = sum(f.open_next for f in self.flights.values())
        return max(0, len(self.executor.idle_slots()) - waiting)

    # -- claims -------------------------------------------------------------------------------------
    def _claim(self, now: float) -> None:
        limit = self.ready_slots()
        control_types = s.CONTROL_TYPES if self.leading() else (s.STOP,)
        # With no ready slot only control requests are claimed: job rows may still wait.
        self.maybe_work = limit == 0
        try:
            claimed = self.driver.request_claim(ClaimParams(self.worker_id, job_limit=limit,
                                                            control_types=control_types))
        except Exception:
            # The claim may have committed while its answer was lost: rows of ours we do not
            # know about are handed back before the next claim.
            self.needs_reconcile = True
            self.maybe_work = True
            raise
        if not claimed:
            return
        self.metrics.claimed(len(claimed))
        jobs = [r for r in claimed if r.request_type not in s.CONTROL_TYPES]
        self.maybe_work = len(jobs) >= limit        # the slots filled (or there were none): more may wait
        if claimed[0].claimed_at is not None:      # to turn due times (database clock) into ours
            self._db_offset = claimed[0].claimed_at.replace(tzinfo=timezone.utc).timestamp() - now
        for req in claimed:
            try:
                if req.request_type in s.CONTROL_TYPES:
                    self._control(req, now)
                elif not req.started:
                    self._refuse(req, now)
                else:
                    self._admit(req, now)
            except Exception:
                self.needs_reconcile = True         # a row of the batch we may no longer track
                raise

    def _refuse(self, req: ClaimedRequest, now: float) -> None:
        """A claimed job request that cannot run: it ends FAILED with the reason."""
        if req.request_type not in s.REQUEST_TYPES:
            reason = f"unknown request_type {req.request_type!r} (expected one of {', '.join(s.REQUEST_TYPES)})"
        elif req.job is None:
            reason = f"unknown mapref {req.mapref!r}: no row in DMS_JOB"
        else:
            reason = f"job {req.mapref!r} is disabled (DMS_JOB.enabled = 'N')"
        log.warning("request %s (%s %s) FAILED: %s", req.request_id, req.request_type, req.mapref, reason)
        self.completer.resolve(RequestResolve(req.request_id, self.worker_id, s.FAILED, dumps({"error": reason})), now)

    def _admit(self, req: ClaimedRequest, now: float) -> None:
        job = req.job
        assert job is not None and req.prcid is not None
        try:
            defaults = rq.job_params(job.params, job.mapref)
            work = rq.plan(req.request_type, req.payload, defaults)
            as_of = rq.as_of_date(work.payload, req.scheduled_for, req.requested_at)
        except rq.BadRequest as exc:
            reason = str(exc)
            log.warning("request %s (%s %s) FAILED: %s", req.request_id, req.request_type, req.mapref, reason)
            self.completer.finish(ExecutionFinish(
                req.request_id, self.worker_id, req.prcid, req.mapref, s.LOG_FAILED, msg=reason,
                error=("REQUEST", reason, None), request_status=s.FAILED,
                result_payload=dumps({"error": reason})), now)
            return
        days: list[date | None] = [None]
        first = True
        if work.days:
            # Always asked, not only on a later attempt: a request handed back between two days
            # (shutdown) has its attempt refunded, so "attempt 1" does not mean "nothing ran".
            done = self.driver.history_days_done(req.request_id)
            days = [d for d in work.days if d.isoformat() not in done]
            first = len(days) == len(work.days)
            if not days:        # every day already ran: nothing left but to say so
                self.completer.finish(ExecutionFinish(
                    req.request_id, self.worker_id, req.prcid, req.mapref, s.STOPPED,
                    msg="nothing left to run: every day already completed", request_status=s.DONE,
                    result_payload=dumps({"days": len(work.days), "resumed": True})), now)
                return
        flight = Flight(req, job, work, days, as_of, req.prcid, first, claimed_mono=now)
        self.flights[req.request_id] = flight
        self._launch(flight, now)

    def _launch(self, flight: Flight, now: float) -> None:
        slot = self.executor.idle_slots()[0]        # claims never exceed the ready slots
        req, day = flight.req, flight.day
        params = flight.params()
        last = len(flight.days) == 1
        total = len(flight.work.days)
        finish = ExecutionFinish(
            req.request_id, self.worker_id, flight.prcid or 0, req.mapref, s.COMPLETED, msg="completed",
            prcdt=self._prcdt(flight), request_status=s.DONE if last else None, jobschid=req.jobschid,
            scheduled_for=req.scheduled_for, params=flight.log_params())
        task = Task(prcid=flight.prcid or 0, request_id=req.request_id, mapref=req.mapref,
                    request_type=req.request_type, handler=flight.job.handler, attempt=req.attempts, params=params,
                    payload=flight.work.payload, as_of=day or flight.as_of, scheduled_for=req.scheduled_for,
                    unvetted=flight.work.unvetted, finish=finish, days_total=total,
                    day_results=tuple(flight.day_results), exclusive=not flight.job.allow_overlap)
        flight.slot, flight.started, flight.annotated, flight.sessionid = slot, now, False, None
        self.executor.run(slot, task, flight.job.timeout_s)
        pickup = None
        if flight.first and req.claimed_at is not None and req.not_before is not None:
            # Due (database clock) -> claimed (database clock), plus the time since the claim.
            pickup = (req.claimed_at - req.not_before).total_seconds() + (now - flight.claimed_mono)
        self.metrics.execution_started(req.mapref, pickup)
        self.metrics.set_slots(len(self.executor.busy()), len(self.executor.slots))
        log.debug("start request=%s mapref=%s attempt=%d prcid=%s%s", req.request_id, req.mapref, req.attempts,
                  flight.prcid, f" day={day}" if day else "")

    @staticmethod
    def _prcdt(flight: Flight) -> datetime | None:
        as_of = flight.day or flight.as_of
        return datetime.combine(as_of, dtime()) if as_of else None

    def _open_next_days(self, now: float) -> None:
        """HISTORY: the next day of each request whose previous day just ended, or hand it back
        when draining (the next claim resumes from that day)."""
        for flight in [f for f in self.flights.values() if f.open_next]:
            rid = flight.req.request_id
            if self.draining:
                self.flights.pop(rid)
                self.completer.resolve(RequestResolve(rid, self.worker_id, s.NEW, refund_attempt=True), now)
                continue
            if not self.executor.idle_slots():
                return
            flight.open_next = False
            opened = self.driver.execution_open(ExecutionOpen(rid, self.worker_id, flight.req.mapref,
                                                              flight.req.attempts, flight.log_params()))
            if opened is StartRefused.LOST:
                log.warning("request %s was taken from us between two of its days", rid)
                self.flights.pop(rid)
                continue
            flight.prcid = int(opened)
            self._launch(flight, now)

    # -- control requests -----------------------------------------------------------------------
    def _control(self, req: ClaimedRequest, now: float) -> None:
        def resolve(status: str, payload: dict[str, Any]) -> None:
            self.completer.resolve(RequestResolve(req.request_id, self.worker_id, status, dumps(payload)), now)

        if req.request_type == s.REFRESH_SCHEDULE:
            self.on_refresh()
            return resolve(s.DONE, {"refreshed_by": self.worker_id})
        try:
            target = rq.stop_target(req.payload, req.request_id)
        except rq.BadRequest as exc:
            return resolve(s.FAILED, {"error": str(exc)})
        result = self.driver.request_stop(StopParams(by=req.request_id, mapref=req.mapref, target_request_id=target))
        for rid in result.signalled:
            if rid in self.flights:          # ours: no need to wait for the next stop check
                self._stop(self.flights[rid], f"stopped by STOP request {req.request_id}", now)
        if result.reason:
            return resolve(s.FAILED, {"error": result.reason})
        log.info("STOP %s: cancelled %s, stopping %s", req.request_id, list(result.cancelled), list(result.signalled))
        resolve(s.DONE, {"cancelled": list(result.cancelled), "stopping": list(result.signalled)})

    def _apply_stop_flags(self, now: float) -> None:
        self._stop_flagged = False
        self._next_stop_check = now + self.settings.stop_check_s
        for rid in self.driver.request_stop_flags(self.worker_id):
            if rid in self.flights:
                self._stop(self.flights[rid], "stopped by STOP request", now)

    def _stop(self, flight: Flight, reason: str, now: float) -> None:
        """Stop an execution of ours now (STOP); the request ends CANCELLED."""
        if flight.stop_reason is not None:
            return
        flight.stop_reason = reason
        self.metrics.stop_applied()
        rid = flight.req.request_id
        self.flights.pop(rid, None)
        if flight.running:
            self._kill(flight, now)
            self._record(flight, s.STOPPED, reason, {}, s.CANCELLED, now, result_payload=dumps({"stopped": reason}))
        else:   # between HISTORY days
            self.completer.resolve(RequestResolve(rid, self.worker_id, s.CANCELLED, dumps({"stopped": reason})), now)

    def _kill(self, flight: Flight, now: float) -> None:
        assert flight.slot is not None
        session_id = self.executor.cancel(flight.slot, now, self.settings.stop_grace_s)
        flight.slot = None
        if session_id:
            self._terminate.append(session_id)

    def _terminate_sessions(self) -> None:
        """Best effort: end the database sessions of killed executions (their calls are already
        cancelled; this frees the server side at once rather than when it notices)."""
        sessions, self._terminate = self._terminate, []
        for sid in sessions:
            try:
                self.driver.session_terminate(sid)
            except Exception as exc:  # noqa: BLE001 - the cancel already went out
                log.debug("could not terminate session %s: %s", sid, " ".join(str(exc).split())[:200])

    def _check_deadlines(self, now: float) -> None:
        for flight in list(self.flights.values()):
            slot = flight.slot
            if flight.running and slot is not None and slot.deadline is not None and now >= slot.deadline:
                timeout = flight.job.timeout_s
                self._kill(flight, now)
                self.metrics.timed_out()
                log.warning("request %s (%s) timed out after %ss", flight.req.request_id, flight.req.mapref, timeout)
                self._failed(flight, f"timeout: execution exceeded timeout_s={timeout}", None, {}, now,
                             errtyp="TIMEOUT")

    def _annotate(self, now: float) -> None:
        for flight in self.flights.values():
            if flight.started is not None and not flight.annotated and flight.prcid is not None and \
                    (flight.sessionid is not None or now - flight.started >= ANNOTATE_AFTER_S):
                flight.annotated = True
                self.completer.annotate(ExecutionAnnotate(flight.prcid, flight.log_params(), flight.sessionid), now)

    def _release_orphans(self, now: float) -> None:
        self._next_orphan_check = now + ORPHAN_CHECK_INTERVAL_S
        known = set(self.flights) | self.completer.pending_ids()
        released = self.driver.request_release_orphans(self.worker_id, known)
        self.needs_reconcile = False
        if released:
            log.warning("handed back %d request(s) claimed under our name that we were not running", len(released))

    # -- what the execution processes report ----------------------------------------------------
    def on_event(self, event: Event, now: float) -> None:
        flight = self.flights.get(event.task.request_id)
        if flight is None or flight.prcid != event.task.prcid:
            return
        if event.kind == "started":
            flight.started = now
        elif event.kind == "session":
            flight.sessionid, flight.annotated = event.data["session_id"], False
        elif event.kind == "done":
            flight.slot = None
            self.maybe_work = True            # a slot is free again (and maybe a mapref)
            self._done(flight, event.data, now)
        elif event.kind == "died":
            flight.slot = None
            self.maybe_work = True
            code = event.data.get("exitcode")
            if code == EXIT_FENCED:
                self._hand_back(flight, "stopped: replica lost its database lease", now)
            else:
                self._failed(flight, f"execution process died (exit code {code})", None, {}, now)

    def _done(self, flight: Flight, data: dict[str, Any], now: float) -> None:
        rid = flight.req.request_id
        if data.get("recorded"):                # committed with the handler's own work
            self._ended(flight, now, "completed", data.get("result"))
        elif data.get("busy"):
            # An earlier run's server session still holds the mapref: try again in a moment,
            # without counting an attempt.
            log.warning("request %s: %s; handed back", rid, data.get("error"))
            self._hand_back(flight, data.get("error") or "mapref busy", now, retry_delay_s=5.0)
            self.wake_at(now + 5.1)
        elif data.get("lost"):
            log.warning("request %s was no longer ours when it ended (rescued?); its work was rolled back", rid)
            self.flights.pop(rid, None)
            self._count(flight, "handed_back", now)
        elif data.get("ok"):
            self._succeeded(flight, data, now)
        elif data.get("bad_request"):
            self._failed(flight, data.get("error") or "bad request", None, data, now, errtyp="REQUEST", retryable=False)
        else:
            self._failed(flight, data.get("error") or "failed", data.get("dberror"), data, now)

    def _ended(self, flight: Flight, now: float, outcome: str, result: Any) -> None:
        """An execution ended and its outcome is written (or on its way): next day, or done."""
        self._count(flight, outcome, now)
        if len(flight.days) > 1 and flight.stop_reason is None:
            flight.day_results.append({"day": flight.day.isoformat() if flight.day else None, "result": result})
            flight.days.pop(0)
            flight.first, flight.open_next, flight.prcid = False, True, None
        else:
            self.flights.pop(flight.req.request_id, None)

    def _succeeded(self, flight: Flight, data: dict[str, Any], now: float) -> None:
        last = len(flight.days) <= 1
        result = data.get("result")
        payload = rq.success_payload(result, len(flight.work.days), flight.day_results, flight.log_params()) \
            if last else None
        self._record(flight, s.COMPLETED, "completed", data, s.DONE if last else None, now, result_payload=payload,
                     count=False)
        self._ended(flight, now, "completed", result)

    def _failed(self, flight: Flight, error: str, dberror: str | None, data: dict[str, Any], now: float,
                errtyp: str = "EXECUTION", retryable: bool = True) -> None:
        job, req = flight.job, flight.req
        self.flights.pop(req.request_id, None)
        day = {"day": flight.day.isoformat()} if flight.day else {}
        outcome = "timeout" if errtyp == "TIMEOUT" else "failed"
        if retryable and req.attempts < job.max_attempts:
            delay = retry.job_retry_delay(job.retry_delay_s, req.attempts, self.settings.retry_max_delay_s)
            self.metrics.retried()
            # The row's not_before is set when the completer writes it, a moment after now.
            self.wake_at(now + delay + 0.05)
            self.wake_at(now + delay + 0.5)
            msg = f"{error} (attempt {req.attempts}/{job.max_attempts}; retry in {delay:.1f}s)"
            self._record(flight, s.LOG_FAILED, msg, data, s.NEW, now, error=(errtyp, error, dberror),
                         result_payload=dumps({"error": error, "attempt": req.attempts, **day}), retry_delay_s=delay,
                         outcome=outcome)
        else:
            self._record(flight, s.LOG_FAILED, error, data, s.FAILED, now, error=(errtyp, error, dberror),
                         result_payload=dumps({"error": error, "attempts": req.attempts, **day}), outcome=outcome)

    def _hand_back(self, flight: Flight, reason: str, now: float, retry_delay_s: float = 0.0) -> None:
        self.flights.pop(flight.req.request_id, None)
        if flight.running:
            self._kill(flight, now)
        self._record(flight, s.STOPPED, reason, {}, s.NEW, now, refund=True, outcome="handed_back",
                     retry_delay_s=retry_delay_s)

    def _record(self, flight: Flight, log_status: str, msg: str | None, data: dict[str, Any],
                request_status: str | None, now: float, *, error: tuple[str, str, str | None] | None = None,
                result_payload: str | None = None, retry_delay_s: float = 0.0, refund: bool = False,
                outcome: str | None = None, count: bool = True) -> None:
        req = flight.req
        self.completer.finish(ExecutionFinish(
            request_id=req.request_id, worker_id=self.worker_id, prcid=flight.prcid or 0, mapref=req.mapref,
            log_status=log_status, msg=msg, prcdt=self._prcdt(flight), sessionid=flight.sessionid,
            srcrows=data.get("srcrows"), trgrows=data.get("trgrows"), errrows=data.get("errrows"),
            rejects=tuple(Reject(*r) for r in data.get("rejects") or ()), error=error,
            request_status=request_status, result_payload=result_payload, retry_delay_s=retry_delay_s,
            refund_attempt=refund, jobschid=req.jobschid, scheduled_for=req.scheduled_for,
            params=flight.log_params()), now)
        if count:
            self._count(flight, outcome or ("stopped" if log_status == s.STOPPED else "completed"), now,
                        msg if log_status != s.COMPLETED else None)

    def _count(self, flight: Flight, outcome: str, now: float, msg: str | None = None) -> None:
        """The one log record per execution, and its metrics."""
        req = flight.req
        duration = now - flight.started if flight.started is not None else 0.0
        self.metrics.execution_finished(req.mapref, outcome, duration)
        self.metrics.set_slots(len(self.executor.busy()), len(self.executor.slots))
        log.info("end request=%s mapref=%s attempt=%d prcid=%s duration=%.3fs outcome=%s%s%s", req.request_id,
                 req.mapref, req.attempts, flight.prcid, duration, outcome,
                 f" day={flight.day}" if flight.day else "", f" msg={msg!r}" if msg else "")

    # -- the end of a replica -------------------------------------------------------------------
    def hand_back_all(self, now: float) -> None:
        """Shutdown past its grace: stop what still runs and hand every request back."""
        for flight in list(self.flights.values()):
            if flight.running:
                log.warning("shutdown: stopping request %s (%s) and handing it back", flight.req.request_id,
                            flight.req.mapref)
                self._hand_back(flight, "stopped by replica shutdown; request handed back", now)
            else:
                self.flights.pop(flight.req.request_id)
                self.completer.resolve(RequestResolve(flight.req.request_id, self.worker_id, s.NEW,
                                                      refund_attempt=True), now)

    def abandon(self, now: float) -> None:
        """The cluster declared us dead and rescued our rows: stop everything, forget it all."""
        for flight in self.flights.values():
            if flight.running and flight.slot is not None:
                self.executor.cancel(flight.slot, now, self.settings.stop_grace_s)
        self.flights.clear()
        self._terminate.clear()
        self.maybe_work = True


def _epoch(payload: str) -> float | None:
    """A wake-up payload that names when a delayed row becomes due (epoch seconds), or None."""
    try:
        return float(payload) if payload else None
    except ValueError:
        return None
