"""The leader's scheduling duty: turn due DMS_JOBSCH occurrences into DMS_PRCREQ rows.

Reads current, enabled schedules every ``SCHEDULER_REFRESH_INTERVAL`` (or at once after
REFRESH_SCHEDULE), asks the pure calculus (``worker.schedule``) what is due by the database
clock, and writes it through the driver: idempotent inserts, fenced by the leader's epoch,
together with ``lst_run_dt``/``nxt_run_dt`` (UTC). Between due times it does nothing: the
service wakes it at the next due instant. Dependent schedules never run on their own clock;
the finish of a successful parent occurrence enqueues them (see the driver).

It also owns the verdict on each row: a row that cannot be interpreted, whose job is missing or
disabled, or whose dependency can never fire (itself, a cycle, a missing or old parent, an
invalid parent) is skipped, and the reason is written to ``DMS_JOBSCH.invalid_reason`` (and
cleared once the row is valid again), so a DBA sees it with plain SQL and ``status`` shows it.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import overload

from .drivers.base import JobDef, OccurrenceEnqueue, ScheduleRow, SQLDriver
from .schedule import (
    InvalidSchedule,
    Misfire,
    Schedule,
    flag_problem,
    last_at_or_before,
    parse_misfire,
    parse_schedule,
    plan_due,
)

log = logging.getLogger("worker.scheduler")
UTC = timezone.utc


class LeadershipLost(RuntimeError):
    """A write was fenced off: another replica holds the lease now."""


@dataclass
class _Entry:
    row: ScheduleRow
    schedule: Schedule | None = None
    misfire: Misfire = Misfire.LATEST
    error: str | None = None


@overload
def _utc(value: datetime) -> datetime: ...
@overload
def _utc(value: datetime | None) -> datetime | None: ...
def _utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.replace(tzinfo=UTC)


@overload
def _naive_utc(value: datetime) -> datetime: ...
@overload
def _naive_utc(value: datetime | None) -> datetime | None: ...
def _naive_utc(value: datetime | None) -> datetime | None:
    return None if value is None else value.astimezone(UTC).replace(tzinfo=None)


def invalid_reason_code(exc: InvalidSchedule) -> str:
    """A bounded label for metrics, from the field the calculus blamed."""
    field = getattr(exc, "field", None) or ""
    return {"frqcd": "bad_code", "cronexp": "bad_cron", "strtdt": "bad_window", "enddt": "bad_window",
            "mapref": "no_job", "enabled": "job_disabled", "dpnd_jobschid": "bad_dependency"}.get(
        field, "bad_field" if field else "other")


def job_problem(mapref: str, job: JobDef | None) -> InvalidSchedule | None:
    """A schedule of a job that is missing or disabled would only enqueue requests that fail."""
    if job is None:
        return InvalidSchedule(f"no DMS_JOB row for mapref {mapref!r}: register the job, or disable the schedule",
                               "mapref")
    if not job.enabled:
        return InvalidSchedule(f"job {mapref!r} is disabled (DMS_JOB.enabled = 'N'): its occurrences would fail;"
                               f" enable the job, or disable the schedule", "enabled")
    return None


def dependency_problems(rows: list[ScheduleRow], states: dict[int, dict],
                        invalid: dict[int, InvalidSchedule]) -> dict[int, InvalidSchedule]:
    """Dependent rows (``dpnd_jobschid`` set) that can never fire, with the reason.

    ``rows`` are the current, enabled rows; ``states`` every row (``SQLDriver.schedule_states``);
    ``invalid`` what is already known to be wrong with rows. A dependent fires only after a
    success of its parent's occurrence, so it never fires when it depends on itself, on a
    cycle, on a row that does not exist or is not the current version, or on an invalid row.
    A disabled parent (schflg = 'N') is a pause, not an error: its dependents wait with it.
    """
    current = {r.jobschid: r for r in rows}
    found: dict[int, InvalidSchedule] = {}

    def bad(jobschid: int, reason: str) -> None:
        found[jobschid] = InvalidSchedule(reason, "dpnd_jobschid")

    for row in rows:
        parent = row.dpnd_jobschid
        if parent is None:
            continue
        if parent == row.jobschid:
            bad(row.jobschid, f"dpnd_jobschid {parent} is the schedule itself: it can never run")
        elif parent not in states:
            bad(row.jobschid, f"dpnd_jobschid {parent}: no such schedule, so this one never runs")
        elif (states[parent].get("curflg") or "").upper() != "Y":
            newer = sorted(k for k, v in states.items() if v.get("mapref") == states[parent].get("mapref")
                           and (v.get("curflg") or "").upper() == "Y")
            bad(row.jobschid, f"dpnd_jobschid {parent} is an old version (curflg = 'N') that never runs: point it"
                              f" at the parent's current row" + (f" ({newer[-1]})" if newer else ""))
    # Cycles, and ancestors that never fire: follow each chain of current, enabled rows.
    known_bad = {**invalid, **found}
    for row in rows:
        if row.dpnd_jobschid is None or row.jobschid in known_bad:
            continue
        chain = [row.jobschid]
        nxt: int | None = row.dpnd_jobschid
        while nxt is not None and nxt in current and nxt not in chain:
            chain.append(nxt)
            nxt = current[nxt].dpnd_jobschid
        if nxt in chain:
            loop = chain[chain.index(nxt):] + [nxt]
            if row.jobschid in loop:
                bad(row.jobschid, "dpnd_jobschid forms a cycle (" + " -> ".join(map(str, loop))
                    + "): none of these schedules can ever run")
            else:
                bad(row.jobschid, f"depends on schedule {chain[1]}, which leads into a dependency cycle"
                                  f" ({' -> '.join(map(str, loop))}) and never runs")
            continue
        ancestor = next((a for a in chain[1:] if a in known_bad), None)
        if ancestor is not None:
            via = chain[1:chain.index(ancestor)]
            bad(row.jobschid, f"depends on schedule {ancestor}" + (f" (through {' -> '.join(map(str, via))})"
                                                                   if via else "")
                + f", which is invalid and never runs ({known_bad[ancestor].reason})")
    return found


class Scheduler:
    def __init__(self, driver: SQLDriver, timezone_name: str, refresh_interval: float, *,
                 max_catch_up: int = 100,
                 on_invalid: Callable[[str], None] = lambda code: None,
                 on_enqueued: Callable[[int, list[float]], None] = lambda n, lateness: None) -> None:
        self.driver, self.tz, self.refresh_interval = driver, timezone_name, refresh_interval
        self.max_catch_up = max_catch_up
        self.on_invalid, self.on_enqueued = on_invalid, on_enqueued
        self._entries: list[_Entry] = []
        self._reported: set[tuple[int, str]] = set()
        self._next_load = 0.0
        self._next_due: float | None = None

    def reset(self) -> None:
        """Forget timing state: reread schedules and recompute on the next tick (new leader)."""
        self._next_load, self._next_due = 0.0, None

    refresh_now = reset

    def next_wake(self) -> float:
        """Monotonic time the leader must tick next."""
        return min(self._next_load, self._next_due if self._next_due is not None else math.inf)

    def tick(self, worker_id: str, epoch: int, mono_now: float) -> int:
        """Enqueue what is due; returns how many new rows. Raises LeadershipLost when fenced."""
        reloaded = mono_now >= self._next_load
        if reloaded:
            self._load(worker_id, epoch)
            self._next_load = mono_now + self.refresh_interval
        if not reloaded and (self._next_due is None or mono_now < self._next_due):
            return 0            # nothing due before the next reload (or nothing scheduled at all)
        db_now = _utc(self.driver.now())
        total, soonest = 0, None
        for entry in self._entries:
            if entry.schedule is None or entry.row.dpnd_jobschid is not None:
                continue
            total += self._materialise(entry, worker_id, epoch, db_now)
            nxt = _utc(entry.row.nxt_run_dt)
            if nxt is not None and (soonest is None or nxt < soonest):
                soonest = nxt
        self._next_due = None if soonest is None else mono_now + max(0.0, (soonest - db_now).total_seconds())
        return total

    def _materialise(self, entry: _Entry, worker_id: str, epoch: int, db_now: datetime) -> int:
        row, sched = entry.row, entry.schedule
        assert sched is not None        # tick() materialises only entries with a schedule
        last_done = _utc(row.lst_run_dt)
        plan = plan_due(sched, last_done=last_done, now=db_now, misfire=entry.misfire,
                        max_catch_up=self.max_catch_up)
        due_any = bool(plan.to_enqueue) or plan.skipped > 0
        lst = _naive_utc(last_at_or_before(sched, db_now)) if due_any else row.lst_run_dt
        nxt = _naive_utc(plan.next_due)
        if not due_any and nxt == row.nxt_run_dt:
            return 0
        times = tuple(_naive_utc(t) for t in plan.to_enqueue)
        inserted = self.driver.occurrence_enqueue(OccurrenceEnqueue(
            worker_id=worker_id, epoch=epoch, jobschid=row.jobschid, mapref=row.mapref,
            scheduled_for=times, lst_run_dt=lst, nxt_run_dt=nxt, payload=row.params))
        if inserted is None:
            raise LeadershipLost(f"schedule {row.jobschid}: the lease is no longer ours (epoch {epoch})")
        entry.row = dataclasses.replace(row, lst_run_dt=lst, nxt_run_dt=nxt)
        if times:
            lateness = [(db_now - t).total_seconds() for t in plan.to_enqueue]
            self.on_enqueued(inserted, lateness)
            log.info("schedule %s (%s): enqueued %d occurrence(s) up to %s%s", row.jobschid, row.mapref, inserted,
                     times[-1].isoformat(), f", skipped {plan.skipped} missed ({entry.misfire.value})"
                     if plan.skipped else "")
        elif plan.skipped:
            log.info("schedule %s (%s): skipped %d missed occurrence(s) (misfire %s)", row.jobschid, row.mapref,
                     plan.skipped, entry.misfire.value)
        return inserted

    def _load(self, worker_id: str, epoch: int) -> None:
        rows = self.driver.schedule_list()
        states = self.driver.schedule_states()
        jobs = self.driver.job_get_many({r.mapref for r in rows})
        entries: list[_Entry] = []
        invalid: dict[int, InvalidSchedule] = {}
        for row in rows:
            entry = _Entry(row)
            problem = job_problem(row.mapref, jobs.get(row.mapref))
            if row.dpnd_jobschid is None:      # dependents have no clock of their own
                try:
                    entry.schedule = parse_schedule(frqcd=row.frqcd, frqdd=row.frqdd, frqhh=row.frqhh,
                                                    frqmi=row.frqmi, strtdt=row.strtdt, enddt=row.enddt,
                                                    cronexp=row.cronexp, tz=self.tz)
                    entry.misfire = parse_misfire(row.misfire)
                except InvalidSchedule as exc:
                    problem = exc
            if problem is not None:
                invalid[row.jobschid] = problem
            entries.append(entry)
        invalid.update(dependency_problems(rows, states, invalid))
        for entry in entries:
            problem = invalid.get(entry.row.jobschid)
            if problem is not None:
                entry.schedule, entry.error = None, str(problem)
                self._report(entry.row.jobschid, entry.row.mapref, problem)
        # Rows schedule_list never returns, with flags the V003 CHECKs refuse: logged and counted,
        # and shown by `status`, but not written: the CHECK refuses any UPDATE of such a row.
        flags = {j: p for j, st in states.items() if (p := flag_problem(st.get("schflg"), st.get("curflg")))}
        for jobschid, problem in flags.items():
            self._report(jobschid, str(states[jobschid].get("mapref")), problem)
        self._record_reasons(worker_id, epoch, {j: st for j, st in states.items() if j not in flags},
                             {j: str(e) for j, e in invalid.items()})
        self._entries = [e for e in entries if e.error is None]

    def _record_reasons(self, worker_id: str, epoch: int, states: dict[int, dict], reasons: dict[int, str]) -> None:
        """Make DMS_JOBSCH.invalid_reason say what this leader decided: the reason on invalid
        rows, NULL on every other row (valid, disabled or old versions alike)."""
        changes = {jid: reasons.get(jid) for jid, st in states.items()
                   if st.get("invalid_reason") != reasons.get(jid)}
        changes.update({jid: r for jid, r in reasons.items() if jid not in states})   # inserted since
        if changes and not self.driver.schedule_set_invalid(worker_id, epoch, changes):
            raise LeadershipLost(f"recording invalid schedules: the lease is no longer ours (epoch {epoch})")

    def _report(self, jobschid: int, mapref: str, exc: InvalidSchedule) -> None:
        # Counted at every reread (dms_schedule_invalid_total keeps rising while a row stays
        # invalid, which the alert relies on); logged once per row and reason per leader.
        self.on_invalid(invalid_reason_code(exc))
        key = (jobschid, str(exc))
        if key in self._reported:
            return
        self._reported.add(key)
        log.warning("schedule %s (%s) skipped: %s", jobschid, mapref, exc)
