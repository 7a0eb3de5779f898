"""Leader election and schedules with real replica processes on both backends.

PostgreSQL elects by session advisory lock (the default there), SQLite by the lease row.
"""
from __future__ import annotations

import random
import signal
import time
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa

from tests.support import wait_until
from worker import client
from worker import schema as s

pytestmark = pytest.mark.slow

FAST = dict(DMS_HEARTBEAT_INTERVAL="0.5", DMS_RESCUE_AFTER="3", DMS_LEADER_TTL="3", SCHEDULER_POLL_INTERVAL="0.5",
            SCHEDULER_REFRESH_INTERVAL="2")


@pytest.fixture
def engine(db_url):
    eng = sa.create_engine(db_url)
    yield eng
    eng.dispose()


@pytest.fixture
def cluster(replicas):
    """Replicas with short heartbeat, lease and refresh settings."""
    return lambda n=1, **env: replicas(n, **{**FAST, **env})


def add_schedule(engine, mapref, **cols) -> int:
    values = dict(mapref=mapref, schflg="Y", curflg="Y", misfire="LATEST") | cols
    with engine.begin() as conn:
        return conn.execute(sa.insert(s.jobsch).values(**values).returning(s.jobsch.c.jobschid)).scalar_one()


def occurrences(engine, jobschid):
    with engine.connect() as conn:
        return conn.execute(sa.select(s.prcreq.c.scheduled_for, s.prcreq.c.status, s.prcreq.c.requested_at)
                            .where(s.prcreq.c.jobschid == jobschid).order_by(s.prcreq.c.scheduled_for)).all()


def leader_name(engine) -> str | None:
    with engine.connect() as conn:
        holder = conn.execute(sa.select(s.worker.c.worker_id).where(s.worker.c.is_leader == "Y")).scalar()
    return holder.split(":")[0] if holder else None


def db_now(engine) -> datetime:
    from worker.drivers import make_driver
    d = make_driver(engine.url.render_as_string(hide_password=False))
    try:
        return d.now()
    finally:
        d.dispose()


def test_every_second_for_40_seconds_through_leader_kills_and_a_sigterm(engine, cluster):
    client.register_job(engine, "TICK", "worker.jobs.builtin:noop", allow_overlap=True)
    jid = add_schedule(engine, "TICK", frqcd="CRON", cronexp="* * * * * *", misfire="ALL")
    replicas = {r.name: r for r in cluster(3)}
    for r in replicas.values():
        r.wait_registered(engine)
    wait_until(lambda: leader_name(engine), 30, "a leader")
    wait_until(lambda: len(occurrences(engine, jid)) >= 3, 30, "the schedule to fire")
    start = db_now(engine)
    events = []
    for action in random.sample(["kill", "kill", "term"], 3):
        time.sleep(random.uniform(4, 7))     # a change every few seconds (leader TTL 3 s)
        name = wait_until(lambda: leader_name(engine), 30, "a leader")
        victim = replicas.pop(name)
        t0 = time.monotonic()
        if action == "kill":
            victim.kill9()
        else:
            assert victim.terminate() == 0
        new_leader = wait_until(lambda: (leader_name(engine) not in (None, name)) and leader_name(engine), 30,
                                "a new leader")
        events.append((action, name, new_leader, round(time.monotonic() - t0, 2)))
        (replacement,) = cluster(1)
        replicas[replacement.name] = replacement
        replacement.wait_registered(engine)
    time.sleep(max(3.0, 40 - (db_now(engine) - start).total_seconds()))
    end = db_now(engine) - timedelta(seconds=2)
    fired = [o.scheduled_for for o in occurrences(engine, jid) if start <= o.scheduled_for <= end]
    expected = []
    t = start.replace(microsecond=0) + timedelta(seconds=1)
    while t <= end:
        expected.append(t)
        t += timedelta(seconds=1)
    assert fired == expected, f"missing {sorted(set(expected) - set(fired))[:10]} (events {events})"
    assert len(set(fired)) == len(fired)
    print(f"\nleader changes ({engine.dialect.name}): {events}")
    late = [(o.requested_at - o.scheduled_for).total_seconds() for o in occurrences(engine, jid)]
    assert all(x >= 0 for x in late), "never enqueued before the due time"


def test_restart_after_downtime_applies_each_misfire_policy(engine, cluster):
    now = db_now(engine)
    if now.minute == 59 and now.second > 50 or now.minute == 0 and now.second < 70:
        wait_until(lambda: db_now(engine).minute == 1 and db_now(engine).second >= 10, 140, "a safe minute")
        now = db_now(engine)
    hour = now.replace(minute=0, second=0, microsecond=0)
    ids = {}
    for policy in ("LATEST", "ALL", "SKIP"):
        client.register_job(engine, f"MIS_{policy}", "worker.jobs.builtin:noop")
        ids[policy] = add_schedule(engine, f"MIS_{policy}", frqcd="CRON", cronexp="0 * * * *", misfire=policy,
                                   lst_run_dt=hour - timedelta(hours=5))
    (r,) = cluster(1)
    r.wait_registered(engine)

    def settled():
        with engine.connect() as conn:
            return all(v == hour for v in conn.execute(sa.select(s.jobsch.c.lst_run_dt)).scalars())

    wait_until(settled, 30, "every schedule to catch up")
    got = {p: [o.scheduled_for for o in occurrences(engine, j)] for p, j in ids.items()}
    assert got["ALL"] == [hour - timedelta(hours=h) for h in (4, 3, 2, 1, 0)]
    assert got["LATEST"] == [hour]
    assert got["SKIP"] == []
    with engine.connect() as conn:
        nxt = set(conn.execute(sa.select(s.jobsch.c.nxt_run_dt)).scalars())
    assert nxt == {hour + timedelta(hours=1)}


def test_an_edited_schedule_takes_effect_and_refresh_is_immediate(engine, cluster):
    client.register_job(engine, "EDIT", "worker.jobs.builtin:noop", allow_overlap=True)
    old = add_schedule(engine, "EDIT", frqcd="CRON", cronexp="* * * * * *", misfire="SKIP")
    (r,) = cluster(1, SCHEDULER_REFRESH_INTERVAL="300")
    r.wait_registered(engine)
    wait_until(lambda: len(occurrences(engine, old)) >= 2, 30, "the first version to fire")
    with engine.begin() as conn:          # what the web application does on an edit
        conn.execute(sa.update(s.jobsch).where(s.jobsch.c.jobschid == old).values(curflg="N"))
    new = add_schedule(engine, "EDIT", frqcd="CRON", cronexp="* * * * * */2", misfire="SKIP")
    refresh = client.enqueue(engine, "EDIT", request_type="REFRESH_SCHEDULE")
    wait_until(lambda: client.request_status(engine, refresh)["status"] == s.DONE, 15, "the refresh")
    switched = db_now(engine)
    wait_until(lambda: len(occurrences(engine, new)) >= 2, 30, "the new version to fire")
    assert all(o.scheduled_for.second % 2 == 0 for o in occurrences(engine, new))
    assert all(o.scheduled_for <= switched + timedelta(seconds=1) for o in occurrences(engine, old))
    # Disabling (schflg) is picked up by the periodic reread too.
    (r2,) = cluster(1, SCHEDULER_REFRESH_INTERVAL="1")
    r.terminate()                          # hand leadership to the replica that rereads every second
    r2.wait_registered(engine)
    wait_until(lambda: leader_name(engine) == r2.name, 30, "the new leader")
    with engine.begin() as conn:
        conn.execute(sa.update(s.jobsch).where(s.jobsch.c.jobschid == new).values(schflg="N"))
    off = db_now(engine) + timedelta(seconds=2)
    time.sleep(6)
    assert all(o.scheduled_for <= off for o in occurrences(engine, new))


def test_a_dependent_schedule_runs_once_per_parent_success(engine, cluster):
    client.register_job(engine, "PARENT", "tests.handlers:odd_seconds_fail", allow_overlap=True)
    client.register_job(engine, "CHILD", "worker.jobs.builtin:noop", allow_overlap=True)
    parent = add_schedule(engine, "PARENT", frqcd="CRON", cronexp="* * * * * *", misfire="SKIP")
    # The child has a clock of its own that must be ignored.
    child = add_schedule(engine, "CHILD", frqcd="CRON", cronexp="* * * * * *", dpnd_jobschid=parent)
    cluster(2)
    wait_until(lambda: sum(o.status == s.DONE for o in occurrences(engine, parent)) >= 6, 60, "parent successes")
    time.sleep(1)
    parents = {o.scheduled_for: o.status for o in occurrences(engine, parent) if o.status in s.TERMINAL_STATUSES}
    children = [o.scheduled_for for o in occurrences(engine, child)]
    assert len(children) == len(set(children))
    done = {t for t, st in parents.items() if st == s.DONE}
    assert done and all(t.second % 2 == 0 for t in done)
    assert set(children) - set(parents) == set(), "the child never runs on its own clock"
    assert {t for t in children if t in parents} == done, "one child run per parent success, none per failure"


def reasons(engine) -> dict[int, str | None]:
    with engine.connect() as conn:
        return dict(conn.execute(sa.select(s.jobsch.c.jobschid, s.jobsch.c.invalid_reason)).all())


def test_invalid_schedules_are_skipped_and_the_others_fire(engine, cluster):
    client.register_job(engine, "GOOD", "worker.jobs.builtin:noop", allow_overlap=True)
    client.register_job(engine, "BAD", "worker.jobs.builtin:noop", allow_overlap=True)
    # An unknown frqcd is refused by the table's CHECK constraint (V003) before any leader sees it.
    with pytest.raises(sa.exc.IntegrityError):
        add_schedule(engine, "BAD", frqcd="XX")
    bad = [add_schedule(engine, "BAD", frqcd="WK", frqdd="XYZ"), add_schedule(engine, "BAD", frqcd="MN", frqdd="32"),
           add_schedule(engine, "BAD", frqcd="DL", frqhh=24), add_schedule(engine, "BAD", frqcd="CRON", cronexp="nope")]
    good = add_schedule(engine, "GOOD", frqcd="CRON", cronexp="* * * * * *")
    (r,) = cluster(1)
    wait_until(lambda: len(occurrences(engine, good)) >= 2, 30, "the good schedule to fire")
    assert all(occurrences(engine, b) == [] for b in bad)
    # Log records travel through multiprocessing-logging's queue: wait for them.
    lines = wait_until(lambda: (found := [next((l for l in r.log().splitlines() if f"schedule {jid} (BAD) skipped" in l),
                                               None) for jid in bad]) and all(found) and found, 10, "the skip reasons")
    for line, word in zip(lines, ["frqdd", "frqdd", "frqhh", "cron"]):
        assert word in line.lower(), line
    # ... and the same reasons on the rows, where a DBA looks.
    got = wait_until(lambda: all((g := reasons(engine))[b] for b in bad) and g, 10, "the reasons on the rows")
    for jid, word in zip(bad, ["frqdd", "frqdd", "frqhh", "cron"]):
        assert word in got[jid].lower(), got[jid]
    assert got[good] is None


def test_schedules_that_can_never_fire_say_why_on_the_row_until_fixed(engine, cluster):
    """A missing or disabled job (each occurrence would only end FAILED), a dependency on
    itself, on a cycle, on a missing schedule or on an old version: skipped, the reason on
    the row, nothing enqueued; fixed, the reason goes and the row fires."""
    for mapref in ("PARENT", "SELF", "CYC", "ORPHAN", "STALE"):
        client.register_job(engine, mapref, "worker.jobs.builtin:noop", allow_overlap=True)
    client.register_job(engine, "OFF", "worker.jobs.builtin:noop", allow_overlap=True, enabled=False)
    every_second = dict(frqcd="CRON", cronexp="* * * * * *", misfire="SKIP")
    nojob = add_schedule(engine, "NOJOB", **every_second)
    off = add_schedule(engine, "OFF", **every_second)
    parent = add_schedule(engine, "PARENT", **every_second)
    old_parent = add_schedule(engine, "PARENT", curflg="N", **every_second)
    selfdep = add_schedule(engine, "SELF", frqcd="DL")
    with engine.begin() as conn:
        conn.execute(sa.update(s.jobsch).where(s.jobsch.c.jobschid == selfdep).values(dpnd_jobschid=selfdep))
    cyc_a = add_schedule(engine, "CYC", frqcd="DL")
    cyc_b = add_schedule(engine, "CYC", frqcd="DL", dpnd_jobschid=cyc_a)
    with engine.begin() as conn:
        conn.execute(sa.update(s.jobsch).where(s.jobsch.c.jobschid == cyc_a).values(dpnd_jobschid=cyc_b))
    orphan = add_schedule(engine, "ORPHAN", frqcd="DL", dpnd_jobschid=987654)
    stale = add_schedule(engine, "STALE", frqcd="DL", dpnd_jobschid=old_parent)
    (r,) = cluster(1)
    expected = {nojob: "no DMS_JOB row for mapref 'NOJOB'", off: "job 'OFF' is disabled",
                selfdep: f"dpnd_jobschid {selfdep} is the schedule itself",
                cyc_a: f"forms a cycle ({cyc_a} -> {cyc_b} -> {cyc_a})",
                cyc_b: f"forms a cycle ({cyc_b} -> {cyc_a} -> {cyc_b})",
                orphan: "dpnd_jobschid 987654: no such schedule",
                stale: f"dpnd_jobschid {old_parent} is an old version (curflg = 'N')"}
    got = wait_until(lambda: all((g := reasons(engine))[j] for j in expected) and g, 30, "every reason on its row")
    for jid, text in expected.items():
        assert text in got[jid], (jid, got[jid])
    assert got[parent] is None and got[old_parent] is None
    wait_until(lambda: len(occurrences(engine, parent)) >= 2, 30, "the valid schedule to fire")
    with engine.connect() as conn:
        assert conn.execute(sa.select(s.jobsch.c.nxt_run_dt).where(s.jobsch.c.jobschid == nojob)).scalar() is None
        assert conn.execute(sa.select(sa.func.count()).select_from(s.prcreq).where(
            s.prcreq.c.mapref.in_(["NOJOB", "OFF"]))).scalar_one() == 0, "no request was enqueued only to fail"

    # Fix three of them; a REFRESH_SCHEDULE makes the leader look at once.
    client.register_job(engine, "NOJOB", "worker.jobs.builtin:noop", allow_overlap=True)
    client.register_job(engine, "OFF", "worker.jobs.builtin:noop", allow_overlap=True, enabled=True)
    with engine.begin() as conn:
        conn.execute(sa.update(s.jobsch).where(s.jobsch.c.jobschid == stale).values(dpnd_jobschid=parent))
    refresh = client.enqueue(engine, "REFRESH_SCHEDULE", request_type="REFRESH_SCHEDULE")
    wait_until(lambda: client.request_status(engine, refresh)["status"] == s.DONE, 15, "the refresh")
    got = wait_until(lambda: not any((g := reasons(engine))[j] for j in (nojob, off, stale)) and g, 15,
                     "the fixed rows' reasons to be cleared")
    assert all(got[j] for j in (selfdep, cyc_a, cyc_b, orphan)), got
    wait_until(lambda: len(occurrences(engine, nojob)) >= 1 and len(occurrences(engine, off)) >= 1, 30,
               "the fixed schedules to fire")


def test_sigterm_hands_leadership_over_at_once(engine, cluster):
    a, b = cluster(2)
    wait_until(lambda: leader_name(engine), 30, "a leader")
    first = {a.name: a, b.name: b}[leader_name(engine)]
    other = b if first is a else a
    t0 = time.monotonic()
    first.signal(signal.SIGTERM)
    wait_until(lambda: leader_name(engine) == other.name, 10, "the other replica to lead")
    assert time.monotonic() - t0 < 5
    with engine.connect() as conn:
        row = conn.execute(sa.select(s.leader)).one()
    assert row.holder.startswith(other.name)
