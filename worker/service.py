"""One replica: claims DMS_PRCREQ rows, runs them in its executor, records what happened.

A single control thread does everything that touches the database, in ``_tick``: flush
outcomes, heartbeat, apply stops, rescue stale claims, claim work and start it. Between ticks
it waits on the executor's pipes, the database's wake-up channel and a self-pipe (signals,
``stop()``), never longer than the poll interval. A tick that hits a lost connection is retried
with tenacity's back-off; outcomes stay buffered in memory until they can be written, and every
write is conditional on this replica still owning the row.
"""
from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import date, datetime, time as dtime
from multiprocessing.connection import wait as wait_any
from typing import Any

import tenacity

from . import __version__
from . import logs
from . import requests as rq
from . import schema as s
from .config import Config, ConfigError
from .drivers import make_driver
from .drivers.base import (ClaimedRequest, ClaimParams, ExecutionFinish, ExecutionStart, JobDef, Reject,
                           RequestResolve, SQLDriver, StartRefused, WorkerInfo, dumps)
from .executor import EXIT_FENCED, ChildConfig, Executor, Slot, Task
from .metrics import Metrics, serve
from .scheduler import LeadershipLost, Scheduler

log = logging.getLogger("worker.service")

JOB_CACHE_TTL_S = 5.0
PRUNE_BATCH, PRUNE_BATCHES_PER_TICK = 1000, 10
QUEUE_GAUGES_INTERVAL_S = 15.0      # the leader's one queue-depth query, whatever the scrape rate


@dataclass
class Inflight:
    """A claimed job request this replica owns, from claim to its final outcome."""
    req: ClaimedRequest
    job: JobDef
    work: rq.Work
    days: list[date | None]                 # what is left to run: [None] for IMMEDIATE
    as_of: date | None = None
    first: bool = True                      # the next run is the request's first (truncate)
    prcid: int | None = None
    slot: Slot | None = None
    started_mono: float = 0.0
    stop_reason: str | None = None
    result: str | None = None               # the handler's last return value (JSON)
    claimed_mono: float = field(default_factory=time.monotonic)

    @property
    def day(self) -> date | None:
        return self.days[0] if self.days else None

    @property
    def running(self) -> bool:
        return self.slot is not None and self.slot.task is not None


class SchedulerService:
    """A replica. ``run()`` in the foreground (signals handled), or ``start()``/``stop()`` embedded."""

    def __init__(self, config: Config | None = None, driver: SQLDriver | None = None) -> None:
        self.config = config or Config.from_env()
        self.driver = driver or make_driver(self.config.database_url, schema=self.config.schema)
        self.worker_id = (self.config.worker_name or f"{socket.gethostname()}:{os.getpid()}")[:55] \
            + ":" + secrets.token_hex(4)
        self.inflight: dict[str, Inflight] = {}
        self._to_start: list[str] = []
        self._finishes: list[ExecutionFinish] = []
        self._resolves: list[RequestResolve] = []
        self._session_updates: list[tuple[int, str]] = []
        self._jobs: dict[str, tuple[float, JobDef | None]] = {}
        self._draining = False
        self._forced = False
        self._drain_deadline: float | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._listener = None
        self._maybe_work = True
        self._next_poll = 0.0
        self._next_heartbeat = 0.0
        self._next_rescue = 0.0
        self._fresh_since: float | None = None
        self._needs_reconcile = False
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._lease = logs.SPAWN.Value("d", time.monotonic(), lock=False)
        self.executor = Executor(self.config.max_workers, ChildConfig(
            database_url=self.config.database_url, schema=self.config.schema, log_level=self.config.log_level,
            fence_s=self.config.rescue_after - 2 * self.config.heartbeat_interval, parent_pid=os.getpid(),
            stop_grace=self.config.stop_grace),
            self._lease)
        try:
            self._elector = self.driver.leader_elector(self.config.leader_mode, self.config.leader_ttl)
        except ValueError as exc:
            raise ConfigError(f"DMS_LEADER_MODE: {exc}") from None
        self._epoch: int | None = None
        self._lease_until = 0.0
        self._next_lead = 0.0
        self._next_prune = 0.0
        self.metrics = Metrics(self.worker_id)
        self.metrics.set_slots(0, self.config.max_workers)
        self._metrics_server = None
        self._db_down = False
        self._next_queue_gauges = 0.0
        self.scheduler = Scheduler(self.driver, self.config.timezone, self.config.refresh_interval,
                                   on_invalid=self.metrics.schedule_invalid,
                                   on_enqueued=self.metrics.occurrences_enqueued)

    # -- lifecycle -------------------------------------------------------------------------
    def run(self) -> int:
        """Run in the foreground until SIGTERM/SIGINT (a second one forces). Returns 0."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.request_shutdown())
        self._start_http()
        self._serve()
        return 0

    def start(self) -> "SchedulerService":
        """Run in a background thread (for embedding); returns at once."""
        self._start_http()
        self._thread = threading.Thread(target=self._serve, name="dms-worker", daemon=True)
        self._thread.start()
        return self

    def _start_http(self) -> None:
        try:
            self._metrics_server = serve(self.metrics, self.config.metrics_addr, self.config.metrics_port, self.ready)
        except OSError as exc:
            raise ConfigError(f"DMS_METRICS_PORT: cannot listen on {self.config.metrics_addr}:"
                              f"{self.config.metrics_port} ({exc.strerror}); give each replica its own port") from None

    def ready(self) -> tuple[bool, str]:
        """For /readyz: the database answered our last heartbeat, recently enough."""
        age = time.monotonic() - self._lease.value
        if self._fresh_since is None:
            return False, "database unreachable"
        if age > self.config.rescue_after / 2:
            return False, f"heartbeat {age:.1f}s old"
        return True, "ready"

    def stop(self, timeout: float | None = None) -> None:
        """Graceful stop: as SIGTERM. Waits for the replica to finish, up to ``timeout``."""
        self.request_shutdown()
        self._stopped.wait(timeout)

    def request_shutdown(self, force: bool | None = None) -> None:
        """First call drains, a second call (or ``force=True``) stops executions at once."""
        if force or (force is None and self._draining):
            self._forced = True
        if not self._draining:
            self._draining = True
            self._drain_deadline = time.monotonic() + self.config.shutdown_grace
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    # -- the loop --------------------------------------------------------------------------
    def _serve(self) -> None:
        try:
            self.executor.start()
            self._retrying(self._register)
            log.info("replica %s started: %d slots, database %s", self.worker_id, self.config.max_workers,
                     self.config.safe_url)
            while not self._finished():
                self._retrying(self._tick)
                self._wait()
            self._shutdown()
        finally:
            self._stopped.set()

    def _retrying(self, fn) -> None:
        """Run ``fn``; on a transient database error back off (tenacity) and try again."""
        def before_sleep(state: tenacity.RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.warning("database unavailable (%s); retrying in %.1fs", _one_line(exc), state.upcoming_sleep)
            self.metrics.db_error()
            self._db_down = True
            self._needs_reconcile = True
            self._fresh_since = None
            self._close_listener()

        retry = tenacity.Retrying(
            retry=tenacity.retry_if_exception(self.driver.is_transient),
            wait=tenacity.wait_exponential_jitter(initial=0.2, max=10),
            stop=tenacity.stop_any(lambda _s: self._forced),
            sleep=self._sleep_interruptibly, before_sleep=before_sleep, reraise=True)
        try:
            retry(fn)
            if self._db_down:
                self._db_down = False
                self.metrics.reconnected()
                log.warning("database reachable again")
        except Exception as exc:  # noqa: BLE001 - a replica never dies of one bad tick
            if self._forced:
                return
            log.exception("unexpected error in the control loop: %s", _one_line(exc))
            self._sleep_interruptibly(1.0)

    def _sleep_interruptibly(self, seconds: float) -> None:
        # Executions still run (and report) while the database is away: keep collecting them.
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0 and not self._forced:
            self._wait(min(left, 0.5), poll_db=False)
            self._check_deadlines()

    def _finished(self) -> bool:
        if self._forced:
            return True
        return self._draining and not self.inflight and not self._pending_writes()

    def _pending_writes(self) -> bool:
        return bool(self._finishes or self._resolves or self._to_start)

    def _wait(self, timeout: float | None = None, poll_db: bool = True) -> None:
        now = time.monotonic()
        if timeout is None:
            if self._pending_writes() or (self._maybe_work and self._free_slots() > 0 and not self._draining):
                timeout = 0.0
            else:
                wake_at = [self._next_poll, self._next_heartbeat, self._next_lead]
                if self._leading():
                    wake_at.append(self.scheduler.next_wake())
                wake_at += [sl.deadline for sl in self.executor.busy() if sl.deadline]
                if self._drain_deadline and self._draining:
                    wake_at.append(self._drain_deadline)
                timeout = max(0.0, min(wake_at) - now)
        waitables: list[Any] = [self._wake_r, *self.executor.connections()]
        if poll_db and self._listener is not None:
            waitables.append(self._listener)
        for ready in wait_any(waitables, timeout):
            if ready is self._wake_r:
                try:
                    while self._wake_r.recv(64):
                        pass
                except (BlockingIOError, OSError):
                    pass
            elif ready is self._listener:
                try:
                    channels = self._listener.drain()
                except Exception:  # noqa: BLE001 - reopened by the next tick
                    self._close_listener()
                    continue
                if "dms_prcreq" in channels:
                    self._maybe_work = True
                if "dms_stop" in channels:
                    self._next_heartbeat = 0.0      # look for stop flags now
            else:
                for event in self.executor.receive(ready):
                    self._on_event(event)

    def _tick(self) -> None:
        now = time.monotonic()
        self._check_deadlines()
        self._flush()
        if self._needs_reconcile:
            # Rows we hold but do not know of: a claim whose commit went through while its
            # acknowledgement was lost. Anything we still mean to write about is known.
            known = set(self.inflight) | {f.request_id for f in self._finishes} | {r.request_id for r in self._resolves}
            released = self.driver.request_release_orphans(self.worker_id, known)
            if released:
                log.warning("handed back %d request(s) claimed during a lost connection", len(released))
            self._needs_reconcile = False
        if now >= self._next_heartbeat:
            self._heartbeat(now)
        if now >= self._next_lead:
            self._lead(now)
        if self._leading():
            self._leader_duties(now)
        if self._listener is None and not self._draining and self.config.wakeup == "auto":
            self._open_listener()
        if now >= self._next_poll:
            self._maybe_work = True
            self._next_poll = now + self.config.poll_interval
        if self._maybe_work and not self._draining:
            self._claim()
            self._flush()

    # -- database steps --------------------------------------------------------------------
    def _register(self) -> None:
        self.driver.worker_register(WorkerInfo(
            worker_id=self.worker_id, host=socket.gethostname(), pid=os.getpid(), version=__version__,
            slots=self.config.max_workers, metrics_port=self.config.metrics_port or None))
        self._mark_fresh(time.monotonic())

    def _mark_fresh(self, now: float) -> None:
        self._lease.value = now
        self.metrics.heartbeat_ok(now)
        if self._fresh_since is None:
            self._fresh_since = now

    def _heartbeat(self, now: float) -> None:
        self._next_heartbeat = now + self.config.heartbeat_interval
        if not self.driver.worker_heartbeat(self.worker_id, len(self.inflight)):
            self._declared_dead()
            return
        self._mark_fresh(now)
        if any(f.stop_reason is None for f in self.inflight.values()):
            for rid in self.driver.requests_to_stop(self.worker_id):
                if rid in self.inflight:
                    self._stop(self.inflight[rid], "stopped by STOP request", s.STOPPED)

    def _declared_dead(self) -> None:
        """The cluster rescued our rows while we could not heartbeat: they are not ours now."""
        log.error("replica %s was declared dead by the cluster; abandoning %d execution(s)",
                  self.worker_id, len(self.inflight))
        for flight in list(self.inflight.values()):
            if flight.running:
                self.executor.kill(flight.slot, self.config.stop_grace)
        self.inflight.clear()
        self._to_start.clear()
        self._finishes.clear()
        self._resolves.clear()
        self._fresh_since = None
        self._step_down()
        self._register()

    # -- leadership ------------------------------------------------------------------------
    def _leading(self) -> bool:
        """Leader, and the lease surely still ours: stop acting before it can expire."""
        return self._epoch is not None and time.monotonic() < self._lease_until

    def _lead(self, now: float) -> None:
        self._next_lead = now + self.config.heartbeat_interval
        if self._draining:
            self._resign()
            return
        # Keep a margin of two heartbeats below the TTL: renewals are that often.
        valid_for = self.config.leader_ttl - 2 * self.config.heartbeat_interval
        if self._epoch is not None:
            if self._elector.renew(self.worker_id, self._epoch):
                self._lease_until = now + valid_for
            else:
                log.warning("replica %s lost the leadership (epoch %s)", self.worker_id, self._epoch)
                self._step_down()
            return
        epoch = self._elector.attempt(self.worker_id)
        expires_in = self._elector.expires_in
        if epoch is None and expires_in is not None and 0 <= expires_in < self.config.heartbeat_interval:
            self._next_lead = now + expires_in + 0.01     # ask again the moment the lease expires
        if epoch is not None:
            self._epoch, self._lease_until = epoch, now + valid_for
            self.metrics.set_leader(True)
            self.scheduler.reset()
            self._next_rescue = self._next_prune = self._next_queue_gauges = 0.0
            log.warning("replica %s is now the leader (epoch %s, %s)", self.worker_id, epoch, self._elector.mode)

    def _step_down(self) -> None:
        self._epoch = None
        self.metrics.set_leader(False)
        self._elector.close()

    def _resign(self) -> None:
        if self._epoch is None:
            return
        epoch, self._epoch = self._epoch, None
        self.metrics.set_leader(False)
        try:
            self._elector.resign(self.worker_id, epoch)
            log.warning("replica %s resigned the leadership (epoch %s)", self.worker_id, epoch)
        finally:
            self._elector.close()

    def _leader_duties(self, now: float) -> None:
        try:
            self.scheduler.tick(self.worker_id, self._epoch, now)
        except LeadershipLost as exc:
            log.warning("%s; stepping down", exc)
            self._step_down()
            return
        if now >= self._next_rescue:
            self._rescue(now)
        if now >= self._next_queue_gauges:
            self._next_queue_gauges = now + QUEUE_GAUGES_INTERVAL_S
            self.metrics.set_queue(*self.driver.queue_depth())
        if now >= self._next_prune:
            self._next_prune = now + self.config.refresh_interval
            for _ in range(PRUNE_BATCHES_PER_TICK):
                if self.driver.request_prune(self.config.retention_days * 86400, PRUNE_BATCH) < PRUNE_BATCH:
                    break

    def _rescue(self, now: float) -> None:
        self._next_rescue = now + self.config.heartbeat_interval
        # Only a replica that has itself been heartbeating for a whole rescue window may judge
        # others stale: after an outage everyone's heartbeat is old, and everyone is alive.
        if self._fresh_since is None or now - self._fresh_since < self.config.rescue_after:
            return
        while True:
            result = self.driver.request_rescue(self.config.rescue_after)
            if result.requeued or result.failed:
                self.metrics.rescued(len(result.requeued) + len(result.failed))
            for rid in result.requeued:
                log.warning("rescued request %s: back to NEW", rid)
            for rid in result.failed:
                log.warning("rescued request %s: FAILED, no attempts left", rid)
            if result.workers_removed:
                log.warning("removed dead replica(s): %s", ", ".join(result.workers_removed))
            if len(result.requeued) + len(result.failed) < 500:
                return

    def _claim(self) -> None:
        limit = self._free_slots()
        # REFRESH_SCHEDULE is the leader's: a follower leaves it for the leader to claim.
        control_types = s.CONTROL_TYPES if self._leading() else (s.STOP,)
        claimed = self.driver.request_claim(ClaimParams(
            worker_id=self.worker_id, job_limit=limit, control_types=control_types))
        jobs = [r for r in claimed if r.request_type not in s.CONTROL_TYPES]
        if claimed:
            self.metrics.claimed(len(claimed))
        # With no free slot we only looked for STOPs: jobs may still be waiting.
        self._maybe_work = limit == 0 or len(jobs) >= limit
        for req in claimed:
            if req.request_type in s.CONTROL_TYPES:
                self._control(req)
        defs = self._job_defs({r.mapref for r in jobs})
        for req in jobs:
            self._admit(req, defs.get(req.mapref))

    def _job_defs(self, maprefs: set[str]) -> dict[str, JobDef | None]:
        now = time.monotonic()
        stale = {m for m in maprefs if m not in self._jobs or self._jobs[m][0] < now}
        if stale:
            found = self.driver.job_get_many(stale)
            for m in stale:
                self._jobs[m] = (now + JOB_CACHE_TTL_S, found.get(m))
        return {m: self._jobs[m][1] for m in maprefs}

    def _admit(self, req: ClaimedRequest, job: JobDef | None) -> None:
        def fail(reason: str) -> None:
            log.warning("request %s (%s %s) FAILED: %s", req.request_id, req.request_type, req.mapref, reason)
            self._resolves.append(RequestResolve(req.request_id, self.worker_id, s.FAILED, dumps({"error": reason})))

        if job is None and req.request_type in (s.IMMEDIATE, s.HISTORY):
            return fail(f"unknown mapref {req.mapref!r}: no row in DMS_JOB")
        try:
            defaults = rq.job_params(job.params, job.mapref) if job is not None else {}
            work = rq.plan(req.request_type, req.payload, defaults)
            as_of = rq.as_of_date(work.payload, req.scheduled_for, req.requested_at)
        except rq.BadRequest as exc:
            return fail(str(exc))
        if job is None:
            return fail(f"unknown mapref {req.mapref!r}: no row in DMS_JOB")
        if not job.enabled:
            return fail(f"job {req.mapref!r} is disabled (DMS_JOB.enabled = 'N')")
        days: list[date | None] = [None]
        first = True
        if work.days:
            done = self.driver.history_days_done(req.request_id)
            days = [d for d in work.days if d.isoformat() not in done]
            first = len(days) == len(work.days)
            if not days:
                self._resolves.append(RequestResolve(req.request_id, self.worker_id, s.DONE,
                                                     dumps({"days": len(work.days), "resumed": True})))
                return
        self.inflight[req.request_id] = Inflight(req, job, work, days, as_of, first)
        self._to_start.append(req.request_id)

    def _control(self, req: ClaimedRequest) -> None:
        try:
            if req.request_type == s.REFRESH_SCHEDULE:
                self.scheduler.refresh_now()
                self._resolves.append(RequestResolve(req.request_id, self.worker_id, s.DONE,
                                                     dumps({"refreshed_by": self.worker_id})))
                return
            target = rq.stop_target(req.payload)
        except rq.BadRequest as exc:
            self._resolves.append(RequestResolve(req.request_id, self.worker_id, s.FAILED, dumps({"error": str(exc)})))
            return
        result = self.driver.request_stop(target_request_id=target, mapref=req.mapref, by=req.request_id)
        for rid in result.signalled:
            if rid in self.inflight:          # ours: no need to wait for the next heartbeat
                self._stop(self.inflight[rid], f"stopped by STOP request {req.request_id}", s.STOPPED)
        if result.reason:
            self._resolves.append(RequestResolve(req.request_id, self.worker_id, s.FAILED,
                                                 dumps({"error": result.reason})))
        else:
            log.info("STOP %s: cancelled %s, stopping %s", req.request_id, list(result.cancelled),
                     list(result.signalled))
            self._resolves.append(RequestResolve(req.request_id, self.worker_id, s.DONE, dumps(
                {"cancelled": list(result.cancelled), "stopping": list(result.signalled)})))

    def _flush(self) -> None:
        """Write buffered outcomes, then start what is waiting to start."""
        if self._finishes:
            batch = self._finishes[:]
            owned = self.driver.execution_finish_many(batch)
            del self._finishes[:len(batch)]
            for f, ok in zip(batch, owned):
                if not ok:
                    log.warning("request %s was no longer ours when it finished (rescued?); outcome dropped",
                                f.request_id)
                    self.inflight.pop(f.request_id, None)
        if self._resolves:
            batch = self._resolves[:]
            self.driver.request_resolve_many(batch)
            del self._resolves[:len(batch)]
        if self._session_updates:
            for prcid, sid in self._session_updates:
                self.driver.execution_set_session(prcid, sid)
            self._session_updates.clear()
        if self._to_start:
            self._start_pending()

    def _start_pending(self) -> None:
        ids = [rid for rid in self._to_start if rid in self.inflight]
        flights = [self.inflight[rid] for rid in ids]
        starts = [ExecutionStart(
            request_id=f.req.request_id, worker_id=self.worker_id, mapref=f.req.mapref,
            exclusive=not f.job.allow_overlap, attempt=f.req.attempts,
            params={k: v for k, v in f.work.params_for(f.day, f.first).items() if k.startswith("param")})
            for f in flights]
        if self._draining:
            # Shutting down between HISTORY days: hand back; the next claim resumes the day.
            self._to_start.clear()
            for f in flights:
                self.inflight.pop(f.req.request_id, None)
                self._resolves.append(RequestResolve(f.req.request_id, self.worker_id, s.NEW, refund_attempt=True))
            return
        results = self.driver.execution_start_many(starts)   # idempotent: safe to replay after an error
        self._to_start.clear()
        for flight, result in zip(flights, results):
            rid = flight.req.request_id
            if result is StartRefused.LOST:
                log.warning("request %s was taken from us before it started", rid)
                self.inflight.pop(rid, None)
            elif result is StartRefused.BUSY:
                # Another execution of this mapref runs: hand the row back untouched.
                self.inflight.pop(rid, None)
                self._resolves.append(RequestResolve(rid, self.worker_id, s.NEW, refund_attempt=True))
            else:
                self._launch(flight, result)

    def _launch(self, flight: Inflight, prcid: int) -> None:
        req, day = flight.req, flight.day
        slot = self.executor.idle_slot()
        if slot is None:  # cannot happen: we never claim beyond free slots
            raise RuntimeError("no idle execution slot")
        flight.prcid, flight.slot, flight.started_mono = prcid, slot, time.monotonic()
        task = Task(prcid=prcid, request_id=req.request_id, mapref=req.mapref, request_type=req.request_type,
                    handler=flight.job.handler, attempt=req.attempts, params=flight.work.params_for(day, flight.first),
                    payload=flight.work.payload, as_of=day or flight.as_of,
                    scheduled_for=req.scheduled_for)
        self.executor.run(slot, task, flight.job.timeout_s)
        pickup = None
        if flight.first and req.claimed_at is not None and req.not_before is not None:
            # Due (database clock) -> claimed (database clock), plus the time since the claim.
            pickup = (req.claimed_at - req.not_before).total_seconds() + (time.monotonic() - flight.claimed_mono)
        self.metrics.execution_started(req.mapref, pickup)
        self.metrics.set_slots(len(self.executor.busy()), self.config.max_workers)
        log.info("start request=%s mapref=%s attempt=%d prcid=%s%s", req.request_id, req.mapref, req.attempts,
                 prcid, f" day={day}" if day else "")

    # -- outcomes --------------------------------------------------------------------------
    def _on_event(self, event) -> None:
        flight = self.inflight.get(event.task.request_id)
        if flight is None or flight.prcid != event.task.prcid:
            return
        if event.kind == "session":
            self._session_updates.append((flight.prcid, event.data["session_id"]))
        elif event.kind == "done":
            flight.slot = None
            data = event.data
            if data.get("ok"):
                self._succeeded(flight, data)
            else:
                self._failed(flight, data.get("error") or "failed", data.get("dberror"), data)
        elif event.kind == "died":
            flight.slot = None
            code = event.data.get("exitcode")
            if code == EXIT_FENCED:
                self._hand_back(flight, "stopped: replica lost its database lease")
            else:
                self._failed(flight, f"execution process died (exit code {code})", None, {})

    def _finish(self, flight: Inflight, log_status: str, msg: str | None, data: dict[str, Any],
                request_status: str | None, error: tuple[str, str, str | None] | None = None,
                result_payload: str | None = None, retry_delay_s: float = 0.0, refund: bool = False) -> None:
        req = flight.req
        rejects = tuple(Reject(*r) for r in data.get("rejects") or ())
        as_of = flight.day or flight.as_of
        self._finishes.append(ExecutionFinish(
            request_id=req.request_id, worker_id=self.worker_id, prcid=flight.prcid, mapref=req.mapref,
            log_status=log_status, msg=msg, prcdt=datetime.combine(as_of, dtime()) if as_of else None,
            srcrows=data.get("srcrows"), trgrows=data.get("trgrows"), errrows=data.get("errrows"),
            rejects=rejects, error=error, request_status=request_status, result_payload=result_payload,
            retry_delay_s=retry_delay_s, refund_attempt=refund, jobschid=req.jobschid,
            scheduled_for=req.scheduled_for))
        duration = time.monotonic() - flight.started_mono
        if log_status == s.COMPLETED:
            outcome = "completed"
        elif log_status == s.STOPPED:
            outcome = "handed_back" if request_status == s.NEW else "stopped"
        else:
            outcome = "timeout" if error and error[0] == "TIMEOUT" else "failed"
        self.metrics.execution_finished(req.mapref, outcome, duration)
        self.metrics.set_slots(len(self.executor.busy()), self.config.max_workers)
        log.info("end request=%s mapref=%s attempt=%d prcid=%s duration=%.3fs outcome=%s%s", req.request_id,
                 req.mapref, req.attempts, flight.prcid, duration, log_status,
                 f" msg={msg!r}" if log_status != s.COMPLETED and msg else "")
        if request_status is not None:
            self.inflight.pop(req.request_id, None)

    def _succeeded(self, flight: Inflight, data: dict[str, Any]) -> None:
        if data.get("result") is not None:
            flight.result = data["result"]
        if len(flight.days) > 1 and flight.stop_reason is None:
            self._finish(flight, s.COMPLETED, "completed", data, None)
            flight.days.pop(0)
            flight.first = False
            self._to_start.append(flight.req.request_id)
            return
        total = len(flight.work.days)
        payload = {"days": total} if total else {}
        if flight.result is not None and not total:
            payload["result"] = flight.result
        self._finish(flight, s.COMPLETED, "completed", data, s.DONE,
                     result_payload=dumps(payload) if payload else None)

    def _failed(self, flight: Inflight, error: str, dberror: str | None, data: dict[str, Any],
                errtyp: str = "EXECUTION") -> None:
        job, req = flight.job, flight.req
        if req.attempts < job.max_attempts:
            delay = job.retry_delay_s * (2 ** (req.attempts - 1))
            self.metrics.retried()
            msg = f"{error} (attempt {req.attempts}/{job.max_attempts}; retry in {delay}s)"
            self._finish(flight, s.LOG_FAILED, msg, data, s.NEW, (errtyp, error, dberror),
                         dumps({"error": error, "attempt": req.attempts}), retry_delay_s=delay)
        else:
            self._finish(flight, s.LOG_FAILED, error, data, s.FAILED, (errtyp, error, dberror),
                         dumps({"error": error, "attempts": req.attempts,
                                **({"day": flight.day.isoformat()} if flight.day else {})}))

    def _stop(self, flight: Inflight, reason: str, log_status: str) -> None:
        """Stop an execution of ours now (STOP); the request ends CANCELLED."""
        if flight.stop_reason is not None:
            return
        flight.stop_reason = reason
        self.metrics.stop_applied()
        if flight.running:
            self._kill(flight)
            self._finish(flight, log_status, reason, {}, s.CANCELLED, result_payload=dumps({"stopped": reason}))
        else:   # between HISTORY days, or not started yet
            self.inflight.pop(flight.req.request_id)
            self._resolves.append(RequestResolve(flight.req.request_id, self.worker_id, s.CANCELLED,
                                                 dumps({"stopped": reason})))

    def _kill(self, flight: Inflight) -> None:
        slot = flight.slot
        session_id = self.executor.kill(slot, self.config.stop_grace)
        flight.slot = None
        if session_id:
            try:
                self.driver.session_terminate(session_id)
            except Exception as exc:  # noqa: BLE001 - best effort: the cancel already went out
                log.debug("could not terminate session %s: %s", session_id, _one_line(exc))

    def _hand_back(self, flight: Inflight, reason: str) -> None:
        if flight.running:
            self._kill(flight)
        self._finish(flight, s.STOPPED, reason, {}, s.NEW, refund=True)

    def _check_deadlines(self) -> None:
        now = time.monotonic()
        for flight in list(self.inflight.values()):
            slot = flight.slot
            if flight.running and slot.deadline is not None and now >= slot.deadline:
                timeout = flight.job.timeout_s
                self._kill(flight)
                self.metrics.timed_out()
                log.warning("request %s (%s) timed out after %ss", flight.req.request_id, flight.req.mapref, timeout)
                self._failed(flight, f"timeout: execution exceeded timeout_s={timeout}", None, {}, errtyp="TIMEOUT")
        if self._draining and not self._forced and self._drain_deadline and now >= self._drain_deadline:
            self._forced = True

    def _free_slots(self) -> int:
        return self.config.max_workers - len(self.inflight)

    def _shutdown(self) -> None:
        """Forced or drained: stop what still runs, hand rows back, leave the cluster."""
        for flight in list(self.inflight.values()):
            if flight.running:
                log.warning("shutdown: stopping request %s (%s) and handing it back", flight.req.request_id,
                            flight.req.mapref)
                self._hand_back(flight, "stopped by replica shutdown; request handed back")
        for rid in self._to_start:
            if rid in self.inflight:
                self._resolves.append(RequestResolve(rid, self.worker_id, s.NEW, refund_attempt=True))
        self._to_start.clear()
        self._forced = False
        for _ in range(3):
            try:
                self._resign()
                self._flush()
                self.driver.worker_unregister(self.worker_id)
                break
            except Exception as exc:  # noqa: BLE001 - rescue will clean up after us
                log.warning("shutdown: could not write to the database (%s)", _one_line(exc))
                time.sleep(1)
        self._close_listener()
        self._elector.close()
        if self._metrics_server is not None:
            self._metrics_server.close()
        self.executor.close()
        self.driver.dispose()
        log.info("replica %s stopped", self.worker_id)

    # -- wake-ups --------------------------------------------------------------------------
    def _open_listener(self) -> None:
        try:
            self._listener = self.driver.listener()
        except Exception as exc:  # noqa: BLE001 - polling still works
            log.warning("wake-up channel unavailable (%s); polling every %ss", _one_line(exc),
                        self.config.poll_interval)
            self._listener = None

    def _close_listener(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None


def _one_line(exc: BaseException | None) -> str:
    return " ".join(str(exc).split())[:300] if exc else ""
