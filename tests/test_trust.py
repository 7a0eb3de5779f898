"""Issue 10, "Trust under attack": each test injects the fault for real (real replicas, real
PostgreSQL, SIGSTOP of process groups, a TCP proxy that stops forwarding) and judges only by the
tables and by what handlers wrote through their own connections (the probe table).
"""
from __future__ import annotations

import json
import signal
import time
from collections import Counter

import pytest
import sqlalchemy as sa

from tests.support import Replica, StallingProxy, probe, wait_until
from worker import client
from worker import schema as s

pytestmark = pytest.mark.slow

FAST = dict(DMS_HEARTBEAT_INTERVAL="0.5", DMS_RESCUE_AFTER="3", DMS_LEADER_TTL="3", SCHEDULER_POLL_INTERVAL="0.5")


@pytest.fixture
def engine(pg_url):
    eng = sa.create_engine(pg_url)
    yield eng
    eng.dispose()


@pytest.fixture
def start(pg_url, tmp_path, request):
    """Start replicas on the test database; stopped at teardown, logs printed on failure."""
    started: list[Replica] = []

    def run(name: str, url: str | None = None, **env) -> Replica:
        # Teardown drains: a short grace, or a replica cut off from its database or running a
        # long job keeps the test waiting for the default 30 s.
        r = Replica(url or pg_url, name, tmp_path, **{"DMS_SHUTDOWN_GRACE": "2", **env}).start()
        started.append(r)
        return r

    yield run
    for r in started:
        try:
            r.signal_group(signal.SIGCONT)
        except (ProcessLookupError, PermissionError):
            pass
        r.stop()
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        for r in started:
            print(f"--- {r.name} log ---\n{r.log()[-6000:]}")


def statuses(engine, ids):
    with engine.connect() as conn:
        return dict(conn.execute(sa.select(s.prcreq.c.request_id, s.prcreq.c.status)
                                 .where(s.prcreq.c.request_id.in_(ids))).all())


def all_terminal(engine, ids):
    st = statuses(engine, ids)
    return len(st) == len(ids) and all(v in s.TERMINAL_STATUSES for v in st.values())


def row(engine, rid):
    return client.request_status(engine, rid)


def prclogs(engine, rid=None, mapref=None):
    q = sa.select(s.prclog).order_by(s.prclog.c.prcid)
    if rid is not None:
        q = q.where(s.prclog.c.request_id == rid)
    if mapref is not None:
        q = q.where(s.prclog.c.mapref == mapref)
    with engine.connect() as conn:
        return conn.execute(q).all()


def probe_counts(engine) -> Counter:
    with engine.connect() as conn:
        return Counter(conn.execute(sa.select(probe.c.request_id)).scalars())


def insert_raw(engine, rid, mapref, rtype, payload, **extra):
    with engine.begin() as conn:
        conn.execute(sa.insert(s.prcreq).values(request_id=rid, mapref=mapref, request_type=rtype, payload=payload,
                                                **extra))


def overlaps(intervals) -> list:
    """Pairs of (start, end) intervals that overlap in time."""
    ordered = sorted(intervals)
    return [(a, b) for a, b in zip(ordered, ordered[1:]) if b[0] < a[1]]


# ---------------------------------------------------------------------------------------------
# 1. What a request may set
# ---------------------------------------------------------------------------------------------
def test_a_request_cannot_redirect_a_job_through_its_payload(engine, start, tmp_path):
    """Item 1: a web app that may only INSERT requests cannot change where a job writes or what
    it runs; it may set param1..param10, truncate_flag and the keys the job declares."""
    out = tmp_path / "out"
    client.register_job(engine, "EXPORT", "tests.handlers:echo",
                        params={"path": str(out / "a.csv"), "query": "SELECT 1", "overridable": ["region"]})
    r = start("guard", **FAST)
    r.wait_registered(engine)
    evil = client.enqueue(engine, "EXPORT", payload={"path": str(tmp_path / ".." / "evil.csv"), "param1": "x"})
    sql = client.enqueue(engine, "EXPORT", payload={"query": "SELECT password FROM secrets"})
    fine = client.enqueue(engine, "EXPORT", payload={"param2": "p2", "region": "north", "truncate_flag": "Y"})
    wait_until(lambda: all_terminal(engine, [evil, sql, fine]), 30, "the requests to end")
    for rid, key in ((evil, "path"), (sql, "query")):
        got = row(engine, rid)
        assert got["status"] == s.FAILED
        assert f"'{key}'" in json.loads(got["result_payload"])["error"]
        assert "may not be set by a request" in json.loads(got["result_payload"])["error"]
    got = row(engine, fine)
    assert got["status"] == s.DONE, got["result_payload"]
    result = json.loads(got["result_payload"])["result"]
    echoed = result if isinstance(result, dict) else json.loads(result)
    assert echoed["payload"]["path"] == str(out / "a.csv") and echoed["payload"]["region"] == "north"
    assert echoed["param2"] == "p2"


# ---------------------------------------------------------------------------------------------
# 3. One row must never stop the cluster
# ---------------------------------------------------------------------------------------------
DEEP = "[" * 100_000 + "]" * 100_000


def test_poison_payloads_fail_only_their_own_rows(engine, start):
    client.register_job(engine, "GOOD", "tests.handlers:record", allow_overlap=True)
    client.register_job(engine, "DEEPJOB", "worker.jobs.builtin:noop")
    with engine.begin() as conn:   # a DBA's broken DMS_JOB.params
        conn.execute(sa.update(s.job).where(s.job.c.mapref == "DEEPJOB").values(params='{"a": ' + DEEP + "}"))
    group = [start(f"p{i}", **FAST) for i in range(3)]
    for r in group:
        r.wait_registered(engine)
    poison = {
        "nul": ("GOOD", '{"param1": "a\\u0000b"}'),
        "surrogate": ("GOOD", '{"param1": "\\ud800"}'),
        "nul-key": ("GOOD", '{"param2\\u0000": 1, "param3": "\\udfff\\u0000"}'),
        "deep": ("GOOD", '{"param1": ' + DEEP + "}"),
        "deep-job": ("DEEPJOB", None),
    }
    good = []
    with engine.begin() as conn:
        for i in range(60):
            good.append(client.enqueue(conn, "GOOD", param1=str(i)))
            if i % 12 == 0:
                for key, (mapref, payload) in poison.items():
                    conn.execute(sa.insert(s.prcreq).values(request_id=f"poison-{key}-{i}", mapref=mapref,
                                                            request_type="IMMEDIATE", payload=payload))
    bad = [f"poison-{k}-{i}" for k in poison for i in range(0, 60, 12)]
    wait_until(lambda: all_terminal(engine, good + bad), 90, "every request to end", interval=0.3)
    st = statuses(engine, good + bad)
    assert {st[g] for g in good} == {s.DONE}
    runs = probe_counts(engine)
    assert all(runs[g] == 1 for g in good)
    reasons = {"nul": "NUL", "surrogate": "surrogate", "nul-key": "param3", "deep": "nested too deeply",
               "deep-job": "nested too deeply"}
    for rid in bad:
        got = row(engine, rid)
        key = rid[len("poison-"):].rsplit("-", 1)[0]
        assert got["status"] == s.FAILED, got
        assert reasons[key] in json.loads(got["result_payload"])["error"], got
    for r in group:
        r.alive_or_fail()
        assert "declared dead" not in r.log()
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(s.worker)).scalar() == 3


def test_rows_a_dba_left_running_with_no_owner_are_rescued_and_run(engine, start):
    """Item 4: claimed_by NULL (and an owner that never existed) is rescued like a dead replica."""
    client.register_job(engine, "ORPHAN", "tests.handlers:record", allow_overlap=True, max_attempts=3)
    insert_raw(engine, "orphan-processing", "ORPHAN", "IMMEDIATE", None, status="PROCESSING", attempts=1)
    insert_raw(engine, "orphan-claimed", "ORPHAN", "IMMEDIATE", None, status="CLAIMED", attempts=1)
    insert_raw(engine, "orphan-ghost", "ORPHAN", "IMMEDIATE", None, status="PROCESSING", attempts=1,
               claimed_by="ghost:1:00000000")
    r = start("rescuer", **FAST)
    r.wait_registered(engine)
    ids = ["orphan-processing", "orphan-claimed", "orphan-ghost"]
    wait_until(lambda: all_terminal(engine, ids), 30, "the orphans to be rescued and run")
    assert set(statuses(engine, ids).values()) == {s.DONE}
    assert all(probe_counts(engine)[i] == 1 for i in ids)


# ---------------------------------------------------------------------------------------------
# 5. A frozen replica must not commit twice
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("handler", ["work_then_sleep", "work_sleep_commit"])
def test_a_frozen_replica_group_cannot_commit_after_its_rows_were_rescued(engine, start, handler):
    """Item 5: SIGSTOP of a replica with its execution processes (Ctrl-Z, docker pause), past
    the rescue delay; after SIGCONT their handlers' work must not commit, whether the worker
    commits it when the handler returns or the handler commits it itself."""
    client.register_job(engine, "FROZEN", f"tests.handlers:{handler}", allow_overlap=True, max_attempts=3)
    healthy = start("healthy", SCHEDULER_MAX_WORKERS="1", **FAST)
    healthy.wait_registered(engine)
    wait_until(lambda: _holder(engine) is not None, 30, "a leader")
    # The healthy replica's one slot is busy, so the victim takes the four requests.
    blocker = client.enqueue(engine, "FROZEN", seconds=8)
    wait_until(lambda: row(engine, blocker)["status"] == s.PROCESSING, 30, "the healthy replica to be busy")
    victim = start("victim", SCHEDULER_MAX_WORKERS="4", **FAST)
    victim.wait_registered(engine)
    with engine.begin() as conn:
        ids = [client.enqueue(conn, "FROZEN", seconds=1.5) for _ in range(4)]
    wait_until(lambda: set(statuses(engine, ids).values()) == {s.PROCESSING}, 30, "all four to start")
    # Frozen mid-sleep, their work written but not committed: the sleeps end while frozen, so on
    # SIGCONT each goes straight on to commit, racing its own watchdog.
    victim.signal_group(signal.SIGSTOP)
    try:
        wait_until(lambda: all_terminal(engine, ids), 60, "the rescued requests to run elsewhere")
    finally:
        victim.signal_group(signal.SIGCONT)
    # Let the resumed handlers finish their sleep and try to commit (a negative check needs a window).
    time.sleep(5)
    assert set(statuses(engine, ids).values()) == {s.DONE}
    runs = probe_counts(engine)
    assert {rid: runs[rid] for rid in ids} == {rid: 1 for rid in ids}, "each request's work committed once"
    healthy.alive_or_fail()


def test_a_frozen_replica_whose_executions_finish_records_their_work_once(engine, start):
    """Item 5: SIGSTOP of the replica alone: its execution processes finish, and the work they
    committed through ctx.connection commits with the request's outcome, so it is not rerun."""
    client.register_job(engine, "ALONE", "tests.handlers:record", allow_overlap=True, max_attempts=3)
    victim = start("alone", SCHEDULER_MAX_WORKERS="4", **FAST)
    victim.wait_registered(engine)
    with engine.begin() as conn:
        ids = [client.enqueue(conn, "ALONE", seconds=1) for _ in range(4)]
    wait_until(lambda: set(statuses(engine, ids).values()) == {s.PROCESSING}, 30, "all four to start")
    healthy = start("other", SCHEDULER_MAX_WORKERS="4", **FAST)
    healthy.wait_registered(engine)
    victim.signal(signal.SIGSTOP)
    try:
        wait_until(lambda: all_terminal(engine, ids), 60, "the requests to end")
        time.sleep(4)   # past the rescue delay: a rescue would now rerun them on the healthy replica
    finally:
        victim.signal(signal.SIGCONT)
    wait_until(lambda: all_terminal(engine, ids), 30, "the requests to end")
    assert set(statuses(engine, ids).values()) == {s.DONE}
    runs = probe_counts(engine)
    assert {rid: runs[rid] for rid in ids} == {rid: 1 for rid in ids}
    for rid in ids:
        assert [l.status for l in prclogs(engine, rid)] == [s.COMPLETED]


# ---------------------------------------------------------------------------------------------
# 6. Mixed settings across replicas
# ---------------------------------------------------------------------------------------------
def test_replicas_with_different_timings_never_run_a_request_twice(engine, start):
    client.register_job(engine, "MIX", "tests.handlers:record", allow_overlap=True)
    for i in range(4):
        client.register_job(engine, f"SOLO{i}", "tests.handlers:record")
    # Replicas on the defaults lead (and so rescue); beside them one that heartbeats every 9 s,
    # which the defaults (rescue after 8 s) would judge dead for a second of every nine.
    others = [start(f"default{i}", SCHEDULER_POLL_INTERVAL="0.5") for i in range(2)]
    for r in others:
        r.wait_registered(engine)
    wait_until(lambda: _holder(engine) is not None, 30, "a leader")
    slow = start("slowbeat", DMS_HEARTBEAT_INTERVAL="9", DMS_RESCUE_AFTER="60", DMS_LEADER_TTL="60",
                 SCHEDULER_POLL_INTERVAL="0.5")
    slow.wait_registered(engine)
    with engine.begin() as conn:     # about 30 s of work, so that rescues would have their chance
        ids = [client.enqueue(conn, "MIX", seconds=3) for _ in range(60)]
        ids += [client.enqueue(conn, f"SOLO{i % 4}", seconds=1) for i in range(80)]
    wait_until(lambda: all_terminal(engine, ids), 240, "every request to end", interval=0.5)
    assert set(statuses(engine, ids).values()) == {s.DONE}
    runs = probe_counts(engine)
    assert {rid: runs[rid] for rid in ids} == {rid: 1 for rid in ids}
    for i in range(4):
        logs = prclogs(engine, mapref=f"SOLO{i}")
        assert not overlaps([(l.strtdt, l.enddt) for l in logs]), f"SOLO{i} overlapped"
    assert sum(l.worker_id.startswith("slowbeat") for l in prclogs(engine)) > 0, "the slow replica took work"


# ---------------------------------------------------------------------------------------------
# 7. A partition at the wrong instant must not stall the cluster
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cut_after", [b"UPDATE dms_jobsch", b"UPDATE dms_worker"])
def test_a_leader_cut_off_mid_transaction_is_replaced(engine, start, pg_url, cut_after):
    client.register_job(engine, "TICK", "worker.jobs.builtin:noop", allow_overlap=True)
    client.register_job(engine, "LONG", "worker.jobs.builtin:sleep", max_attempts=2)
    proxy = StallingProxy(sa.engine.make_url(pg_url).host or "127.0.0.1", sa.engine.make_url(pg_url).port or 5432)
    try:
        via_proxy = sa.engine.make_url(pg_url).set(host="127.0.0.1", port=proxy.port).render_as_string(False)
        leader = start("cutoff", url=via_proxy, DMS_LEADER_MODE="lease", **FAST)
        wid = leader.wait_registered(engine)
        wait_until(lambda: _holder(engine) == wid, 30, "the first replica to lead")
        # A run of the victim's that is under way when the cut comes: it must be rescued and rerun.
        long = client.enqueue(engine, "LONG", seconds=60)
        wait_until(lambda: row(engine, long)["claimed_by"] == wid and row(engine, long)["status"] == s.PROCESSING,
                   30, "the victim to be running the long request")
        follower = start("follower", DMS_LEADER_MODE="lease", **FAST)
        fid = follower.wait_registered(engine)
        with engine.begin() as conn:
            conn.execute(sa.insert(s.jobsch).values(mapref="TICK", frqcd="CRON", cronexp="* * * * * *",
                                                    misfire="SKIP", schflg="Y", curflg="Y"))
        client.enqueue(engine, "TICK", request_type="REFRESH_SCHEDULE")
        proxy.stall_after(cut_after)
        wait_until(lambda: proxy.stalled, 30, f"the leader to send {cut_after!r} and be cut off")
        t_cut = time.monotonic()
        wait_until(lambda: _holder(engine) == fid, 30, "the follower to take the lead")
        took = time.monotonic() - t_cut

        def fresh_occurrences():
            with engine.connect() as conn:
                return conn.execute(sa.select(sa.func.count()).select_from(s.prcreq).where(
                    s.prcreq.c.jobschid.is_not(None), s.prcreq.c.status == s.DONE,
                    s.prcreq.c.claimed_by == fid)).scalar() >= 3
        wait_until(fresh_occurrences, 30, "the new leader to schedule and run occurrences")
        assert took < 20, f"leadership moved {took:.1f}s after the cut"
        wait_until(lambda: row(engine, long)["claimed_by"] == fid, 30, "the victim's run to be rescued and rerun")
        first = prclogs(engine, long)[0]
        assert first.worker_id == wid and first.status == s.LOG_FAILED, first
        assert "declared dead" not in follower.log(), "the healthy replica was never fenced off"
        follower.alive_or_fail()
        leader.signal_group(signal.SIGKILL)   # the victim's own exit is not what this test is about (~8 s)
        leader.proc.wait(10)
    finally:
        proxy.close()


def _holder(engine):
    with engine.connect() as conn:
        return conn.execute(sa.select(s.leader.c.holder).where(s.leader.c.name == "scheduler")).scalar()


# ---------------------------------------------------------------------------------------------
# 8, 9. Nothing in the control loop waits on a child; claims go only to ready slots
# ---------------------------------------------------------------------------------------------
def test_stopping_a_job_that_ignores_cancellation_does_not_block_the_replica(engine, start):
    client.register_job(engine, "STUBBORN", "worker.jobs.builtin:sleep")
    client.register_job(engine, "NEIGHBOUR", "tests.handlers:record", max_attempts=3)
    client.register_job(engine, "BUSY", "worker.jobs.builtin:sleep")
    # The rescuer leads (it is first), and its one slot is busy: the other replica runs both jobs.
    b = start("rescuer", SCHEDULER_POLL_INTERVAL="0.5", SCHEDULER_MAX_WORKERS="1")
    b.wait_registered(engine)
    wait_until(lambda: _holder(engine) is not None, 30, "a leader")
    busy = client.enqueue(engine, "BUSY", seconds=60)
    wait_until(lambda: row(engine, busy)["status"] == s.PROCESSING, 30, "the rescuer to be busy")
    a = start("blocked", DMS_STOP_GRACE="10", SCHEDULER_POLL_INTERVAL="0.5")
    a.wait_registered(engine)
    stubborn = client.enqueue(engine, "STUBBORN", seconds=120)
    neighbour = client.enqueue(engine, "NEIGHBOUR", seconds=14)
    wait_until(lambda: set(statuses(engine, [stubborn, neighbour]).values()) == {s.PROCESSING}, 30, "both to start")
    client.request_stop(engine, request_id=stubborn)
    wait_until(lambda: row(engine, stubborn)["status"] == s.CANCELLED, 30, "the stop")
    wait_until(lambda: row(engine, neighbour)["status"] == s.DONE, 60, "the neighbour to finish")
    assert probe_counts(engine)[neighbour] == 1
    assert [l.status for l in prclogs(engine, neighbour)] == [s.COMPLETED], "never killed and rerun"
    assert "declared dead" not in a.log()


def test_a_starting_replica_claims_only_into_ready_slots_and_times_from_the_handler_start(engine, start):
    client.register_job(engine, "QUICK", "worker.jobs.builtin:noop", timeout_s=1, allow_overlap=True)
    with engine.begin() as conn:
        ids = [client.enqueue(conn, "QUICK") for _ in range(16)]
    r = start("cold", SCHEDULER_MAX_WORKERS="16", SCHEDULER_POLL_INTERVAL="0.5")
    wait_until(lambda: all_terminal(engine, ids), 60, "the requests to end")
    st = statuses(engine, ids)
    assert set(st.values()) == {s.DONE}, {rid: row(engine, rid)["result_payload"] for rid in ids
                                           if st[rid] != s.DONE}
    r.alive_or_fail()


# ---------------------------------------------------------------------------------------------
# 10, 11. Promises about timing and STOP
# ---------------------------------------------------------------------------------------------
def test_retry_delays_are_honoured_below_the_poll_interval(engine, start):
    client.register_job(engine, "FLAKY", "worker.jobs.builtin:fail", max_attempts=3, retry_delay_s=1)
    r = start("retrier", SCHEDULER_POLL_INTERVAL="15")
    r.wait_registered(engine)
    rid = client.enqueue(engine, "FLAKY")
    wait_until(lambda: row(engine, rid)["status"] == s.FAILED, 30, "the retries to run out")
    logs = prclogs(engine, rid)
    gaps = [(b.strtdt - a.enddt).total_seconds() for a, b in zip(logs, logs[1:])]
    assert len(gaps) == 2 and 0.9 <= gaps[0] < 2.5 and 1.9 <= gaps[1] < 4, f"retries about 1 s then 2 s: {gaps}"


def test_a_no_overlap_queue_runs_back_to_back(engine, start):
    client.register_job(engine, "SERIAL", "worker.jobs.builtin:noop")
    a = start("serial-a", SCHEDULER_POLL_INTERVAL="15")
    b = start("serial-b", SCHEDULER_POLL_INTERVAL="15")
    a.wait_registered(engine)
    b.wait_registered(engine)
    updates = _row_updates(engine)
    with engine.begin() as conn:
        ids = [client.enqueue(conn, "SERIAL") for _ in range(40)]
    wait_until(lambda: all_terminal(engine, ids), 60, "the queue to drain")
    a.stop()
    b.stop()                          # their sessions end: the statistics are flushed
    logs = prclogs(engine, mapref="SERIAL")
    assert not overlaps([(l.strtdt, l.enddt) for l in logs])
    gaps = sorted((b.strtdt - a.enddt).total_seconds() for a, b in zip(logs, logs[1:]))
    assert gaps[int(len(gaps) * 0.9)] < 1.0, f"the next run starts promptly: {gaps}"
    per_job = (_row_updates(engine) - updates) / len(ids)
    assert per_job <= 4, f"{per_job:.1f} DMS_PRCREQ row updates per request: claims churn"


def _row_updates(engine) -> int:
    """Rows of DMS_PRCREQ updated so far (the statistics of ended sessions are flushed)."""
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT pg_stat_clear_snapshot()"))
        return conn.execute(sa.text("SELECT n_tup_upd FROM pg_stat_user_tables WHERE relname = 'dms_prcreq'")).scalar()


def test_a_stop_claimed_with_its_target_cancels_it_without_running_it(engine, start):
    client.register_job(engine, "TARGET", "tests.handlers:record")
    target = client.enqueue(engine, "TARGET", seconds=5)
    stop = client.request_stop(engine, request_id=target)
    itself = "stop-myself"
    insert_raw(engine, itself, "TARGET", "STOP", json.dumps({"request_id": itself}))
    r = start("both", **FAST)
    wait_until(lambda: all_terminal(engine, [target, stop, itself]), 30, "the requests to end")
    assert row(engine, target)["status"] == s.CANCELLED
    assert prclogs(engine, target) == [], "the target never started"
    assert row(engine, stop)["status"] == s.DONE
    assert row(engine, itself)["status"] == s.FAILED
    assert "itself" in json.loads(row(engine, itself)["result_payload"])["error"]
    r.alive_or_fail()


def test_a_replica_cut_off_from_its_database_waits_rather_than_spins(engine, start, pg_url):
    """While the database cannot be reached every service backs off: the control loop must not
    turn into a busy loop (seen: a replica cut off for minutes at 70 % of a core)."""
    proxy = StallingProxy(sa.engine.make_url(pg_url).host or "127.0.0.1", sa.engine.make_url(pg_url).port or 5432)
    try:
        via_proxy = sa.engine.make_url(pg_url).set(host="127.0.0.1", port=proxy.port).render_as_string(False)
        client.register_job(engine, "J", "worker.jobs.builtin:sleep", allow_overlap=True)
        r = start("cut", url=via_proxy, **FAST)
        r.wait_registered(engine)
        rid = client.enqueue(engine, "J", seconds=1)
        wait_until(lambda: row(engine, rid)["status"] == s.PROCESSING, 30, "the job to start")
        proxy.stall_after(b"")                     # the next packet, whatever it is: cut off
        wait_until(lambda: proxy.stalled, 10, "the cut")
        # The job ends while the database is out of reach: its outcome waits, with the retries.
        proxy.close()                              # and now every new connection is refused at once
        wid = r.worker_id(engine)

        def silent_for(seconds: float) -> bool:
            with engine.connect() as conn:
                return bool(conn.execute(sa.text(
                    "SELECT count(*) FROM dms_worker WHERE worker_id = :w AND heartbeat_at < "
                    "(now() AT TIME ZONE 'UTC') - make_interval(secs => :s)"), {"w": wid, "s": seconds}).scalar())
        wait_until(lambda: silent_for(2), 30, "the replica's heartbeats to stop arriving")
        used = _cpu_seconds(r.pid)
        time.sleep(5)                               # a window to measure, not a wait for an event
        share = (_cpu_seconds(r.pid) - used) / 5
        assert share < 0.3, f"the cut-off replica used {share:.0%} of a core"
        r.alive_or_fail()
    finally:
        proxy.close()


def _cpu_seconds(pid: int) -> float:
    import os
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
