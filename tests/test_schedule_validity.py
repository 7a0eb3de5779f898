"""The leader's verdict on schedule rows (worker/scheduler.py), driven tick by tick on each backend.

The real-process counterpart is tests/test_scheduling.py; here the Scheduler runs in the test
so that what it writes, counts and refuses can be checked between two ticks.
"""
from __future__ import annotations

import pytest
import sqlalchemy as sa

from worker import client
from worker import schema as s
from worker.drivers.base import LEADER_NAME, ScheduleRow
from worker.schedule import InvalidSchedule
from worker.scheduler import LeadershipLost, Scheduler, dependency_problems


def lead(driver, holder: str = "me", epoch: int = 1) -> None:
    with driver.begin() as conn:
        conn.execute(sa.delete(s.leader))
        conn.execute(sa.insert(s.leader).values(name=LEADER_NAME, holder=holder, epoch=epoch,
                                                acquired_at=driver.clock(), expires_at=driver.clock(600)))


def add(driver, mapref: str, **cols) -> int:
    values = dict(mapref=mapref, schflg="Y", curflg="Y", misfire="LATEST", frqcd="DL") | cols
    with driver.begin() as conn:
        return conn.execute(sa.insert(s.jobsch).values(**values).returning(s.jobsch.c.jobschid)).scalar_one()


def row_reason(driver, jobschid: int) -> str | None:
    with driver.engine.connect() as conn:
        return conn.execute(sa.select(s.jobsch.c.invalid_reason).where(s.jobsch.c.jobschid == jobschid)).scalar()


def test_reasons_are_written_counted_at_every_reread_and_cleared(driver):
    lead(driver)
    client.register_job(driver.engine, "OK", "worker.jobs.builtin:noop")
    ok = add(driver, "OK")
    nojob = add(driver, "NOJOB")
    counted: list[str] = []
    sched = Scheduler(driver, "UTC", refresh_interval=60, on_invalid=counted.append)
    sched.tick("me", 1, mono_now=0.0)
    assert row_reason(driver, nojob).startswith("no DMS_JOB row for mapref 'NOJOB'")
    assert row_reason(driver, ok) is None
    assert counted == ["no_job"]
    sched.tick("me", 1, mono_now=61.0)            # the next reread counts it again: the alert's basis
    assert counted == ["no_job", "no_job"]

    # Disabled: a different reason replaces the first.
    client.register_job(driver.engine, "NOJOB", "worker.jobs.builtin:noop", enabled=False)
    sched.refresh_now()
    sched.tick("me", 1, mono_now=62.0)
    assert "job 'NOJOB' is disabled" in row_reason(driver, nojob)
    assert counted[-1] == "job_disabled"

    # Enabled: cleared, and the row is scheduled again (nxt_run_dt set).
    client.register_job(driver.engine, "NOJOB", "worker.jobs.builtin:noop", enabled=True)
    sched.refresh_now()
    sched.tick("me", 1, mono_now=63.0)
    assert row_reason(driver, nojob) is None
    with driver.engine.connect() as conn:
        assert conn.execute(sa.select(s.jobsch.c.nxt_run_dt).where(s.jobsch.c.jobschid == nojob)).scalar() is not None
    assert len(counted) == 3


def test_a_row_that_is_disabled_or_replaced_loses_its_reason(driver):
    lead(driver)
    jid = add(driver, "NOJOB")
    sched = Scheduler(driver, "UTC", refresh_interval=60)
    sched.tick("me", 1, mono_now=0.0)
    assert row_reason(driver, jid)
    with driver.begin() as conn:          # the web application's edit: old version off, new one in
        conn.execute(sa.update(s.jobsch).where(s.jobsch.c.jobschid == jid).values(curflg="N"))
    sched.tick("me", 1, mono_now=61.0)
    assert row_reason(driver, jid) is None, "an old version is not 'invalid': it is not run at all"


def test_a_deposed_leader_writes_no_reason(driver):
    lead(driver, holder="someone-else", epoch=5)
    jid = add(driver, "NOJOB")
    sched = Scheduler(driver, "UTC", refresh_interval=60)
    with pytest.raises(LeadershipLost):
        sched.tick("me", 1, mono_now=0.0)
    assert row_reason(driver, jid) is None


def _row(jobschid: int, parent: int | None = None) -> ScheduleRow:
    return ScheduleRow(jobschid=jobschid, mapref=f"M{jobschid}", frqcd="DL", frqdd=None, frqhh=0, frqmi=0,
                       strtdt=None, enddt=None, misfire=None, cronexp=None, dpnd_jobschid=parent, lst_run_dt=None,
                       nxt_run_dt=None)


def test_dependency_verdicts():
    rows = [_row(1), _row(2, 2), _row(3, 99), _row(4, 5), _row(5, 4), _row(6, 4), _row(7, 8), _row(8, 1),
            _row(9, 10), _row(11, 1), _row(13, 14)]
    states = {r.jobschid: {"mapref": r.mapref, "curflg": "Y", "schflg": "Y"} for r in rows}
    states[10] = {"mapref": "M11", "curflg": "N", "schflg": "Y"}       # an old version of M11
    states[14] = {"mapref": "M14", "curflg": "Y", "schflg": "N"}       # a paused parent
    got = {k: v.reason for k, v in dependency_problems(rows, states, {1: InvalidSchedule("bad code", "frqcd")}).items()}
    assert got == {
        2: "dpnd_jobschid 2 is the schedule itself: it can never run",
        3: "dpnd_jobschid 99: no such schedule, so this one never runs",
        4: "dpnd_jobschid forms a cycle (4 -> 5 -> 4): none of these schedules can ever run",
        5: "dpnd_jobschid forms a cycle (5 -> 4 -> 5): none of these schedules can ever run",
        6: "depends on schedule 4, which leads into a dependency cycle (4 -> 5 -> 4) and never runs",
        7: "depends on schedule 1 (through 8), which is invalid and never runs (bad code)",
        8: "depends on schedule 1, which is invalid and never runs (bad code)",
        9: "dpnd_jobschid 10 is an old version (curflg = 'N') that never runs: point it at the parent's current"
           " row (11)",
        11: "depends on schedule 1, which is invalid and never runs (bad code)",
    }
    assert 13 not in got, "a paused parent pauses its dependents; it is no error"
