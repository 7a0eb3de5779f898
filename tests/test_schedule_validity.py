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


@pytest.mark.parametrize("cols", [dict(schflg="X"), dict(curflg="y"), dict(misfire="SOMETIMES"), dict(frqcd="XX")],
                         ids=["schflg", "curflg", "misfire", "frqcd"])
def test_the_table_refuses_flags_and_codes_it_would_misread(driver, cols):
    """V003's CHECKs (triggers on SQLite), on INSERT and on UPDATE."""
    with pytest.raises(sa.exc.IntegrityError):
        add(driver, "M", **cols)
    jid = add(driver, "M")
    with pytest.raises(sa.exc.IntegrityError), driver.begin() as conn:
        conn.execute(sa.update(s.jobsch).where(s.jobsch.c.jobschid == jid).values(**cols))


def _legacy_flag_row(driver, mapref: str, **flags) -> int:
    """A row written before V003's CHECKs existed (they do not check existing rows)."""
    jid = add(driver, mapref)
    assignments = ", ".join(f"{k} = '{v}'" for k, v in flags.items())
    with driver.begin() as conn:
        if driver.engine.dialect.name == "sqlite":
            conn.exec_driver_sql("PRAGMA ignore_check_constraints = ON")
            trigger = conn.exec_driver_sql("SELECT sql FROM sqlite_master WHERE name = 'dms_jobsch_check_update'").scalar()
            conn.exec_driver_sql("DROP TRIGGER dms_jobsch_check_update")
            conn.exec_driver_sql(f"UPDATE dms_jobsch SET {assignments} WHERE jobschid = {jid}")
            conn.exec_driver_sql(trigger)
        else:
            names = [f"dms_jobsch_{k}_ck" for k in flags]
            for name in names:
                conn.exec_driver_sql(f"ALTER TABLE dms_jobsch DROP CONSTRAINT {name}")
            conn.exec_driver_sql(f"UPDATE dms_jobsch SET {assignments} WHERE jobschid = {jid}")
            for k, name in zip(flags, names):
                unchecked = "ENABLE NOVALIDATE" if driver.engine.dialect.name == "oracle" else "NOT VALID"
                conn.exec_driver_sql(f"ALTER TABLE dms_jobsch ADD CONSTRAINT {name} CHECK ({k} IN ('Y', 'N')) {unchecked}")
    return jid


def _status_reasons(driver, cwd) -> dict[int, str]:
    """What `dms-worker status --json` lists as invalid schedules, with their reasons."""
    import json

    from tests.test_cli import cli
    url = driver.engine.url.render_as_string(hide_password=False)
    proc = cli("status", "--json", "--database-url", url, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return {r["jobschid"]: r["invalid_reason"] for r in json.loads(proc.stdout)["invalid_schedules"]}


def test_a_flag_left_from_before_the_checks_is_reported_not_read_as_disabled(driver, caplog, tmp_path):
    """Such a row cannot even be updated while the CHECK stands (PostgreSQL and Oracle check
    every UPDATE of it): the leader says why in its log, its counter and `status`, and goes on
    recording the other rows' reasons."""
    lead(driver)
    client.register_job(driver.engine, "LEGACY", "worker.jobs.builtin:noop")
    odd_sch = _legacy_flag_row(driver, "LEGACY", schflg="X")
    odd_cur = _legacy_flag_row(driver, "LEGACY", curflg="y")
    off = add(driver, "LEGACY", schflg="N")
    nojob = add(driver, "NOJOB")
    counted: list[str] = []
    sched = Scheduler(driver, "UTC", refresh_interval=60, on_invalid=counted.append)
    with caplog.at_level("WARNING", logger="worker.scheduler"):
        sched.tick("me", 1, mono_now=0.0)
    assert row_reason(driver, nojob).startswith("no DMS_JOB row"), "the other rows' reasons are still written"
    assert row_reason(driver, off) is None, "a disabled row is a pause, not an error"
    assert counted.count("bad_field") == 2
    logged = caplog.text
    assert f"schedule {odd_sch} (LEGACY) skipped: schflg = 'X' is neither 'Y' nor 'N'" in logged
    assert f"schedule {odd_cur} (LEGACY) skipped: curflg = 'y' is neither 'Y' nor 'N'" in logged
    shown = _status_reasons(driver, tmp_path)
    assert "schflg = 'X'" in shown[odd_sch] and "curflg = 'y'" in shown[odd_cur] and nojob in shown
    with driver.begin() as conn:               # the DBA's fix: the row leaves status at once
        conn.execute(sa.update(s.jobsch).where(s.jobsch.c.jobschid == odd_sch).values(schflg="N"))
    assert odd_sch not in _status_reasons(driver, tmp_path)


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
