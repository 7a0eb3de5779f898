"""Real replica processes on real databases: exactly-once, crashes, stops, timeouts, bad input.

Each test starts ``dms-worker run`` processes and judges only by what the tables (and the
probe table the test handlers write through their own connections) say afterwards.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections import Counter
from datetime import datetime

import pytest
import sqlalchemy as sa

from tests.support import Replica, pid_alive, probe, wait_until
from worker import client
from worker import schema as s

pytestmark = pytest.mark.slow

FAST = dict(DMS_HEARTBEAT_INTERVAL="0.5", DMS_RESCUE_AFTER="3", SCHEDULER_POLL_INTERVAL="0.5")


@pytest.fixture
def engine(db_url):
    eng = sa.create_engine(db_url)
    yield eng
    eng.dispose()


def statuses(engine, ids=None):
    q = sa.select(s.prcreq.c.request_id, s.prcreq.c.status)
    if ids is not None:
        q = q.where(s.prcreq.c.request_id.in_(ids))
    with engine.connect() as conn:
        return dict(conn.execute(q).all())


def all_terminal(engine, ids):
    st = statuses(engine, ids)
    return len(st) == len(ids) and all(v in s.TERMINAL_STATUSES for v in st.values())


def row(engine, rid):
    return client.request_status(engine, rid)


def prclogs(engine, rid):
    with engine.connect() as conn:
        return conn.execute(sa.select(s.prclog).where(s.prclog.c.request_id == rid).order_by(s.prclog.c.prcid)).all()


def probes(engine, **where):
    q = sa.select(probe)
    for k, v in where.items():
        q = q.where(probe.c[k] == v)
    with engine.connect() as conn:
        return conn.execute(q.order_by(probe.c.id)).all()


def test_three_replicas_run_1000_requests_exactly_once(engine, replicas):
    client.register_job(engine, "REC", "tests.handlers:record", allow_overlap=True)
    # Default heartbeat and rescue timings: SQLite's writers queue for one lock, and under load a
    # heartbeat can wait longer than the short test timings allow.
    group = replicas(3, SCHEDULER_MAX_WORKERS=4, SCHEDULER_POLL_INTERVAL="0.5")
    for r in group:
        r.wait_registered(engine)
    with engine.begin() as conn:
        ids = [client.enqueue(conn, "REC", param1=str(i)) for i in range(1000)]
    wait_until(lambda: all_terminal(engine, ids), 240, "1000 requests to finish", interval=0.5)
    assert set(statuses(engine, ids).values()) == {s.DONE}
    with engine.connect() as conn:
        runs = Counter(conn.execute(sa.select(probe.c.request_id)).scalars())
        logs = conn.execute(sa.select(s.prclog.c.request_id, s.prclog.c.status, s.prclog.c.worker_id,
                                      s.prclog.c.param1, s.prclog.c.prcid)).all()
        joblogs = Counter(conn.execute(sa.select(s.joblog.c.prcid)).scalars())
        rejects = conn.execute(sa.select(sa.func.count()).select_from(s.joberr)
                               .where(s.joberr.c.errtyp == "RECORD")).scalar()
        srcrows = conn.execute(sa.select(sa.func.sum(s.joblog.c.srcrows))).scalar()
    assert set(runs) == set(ids) and set(runs.values()) == {1}, "every request ran exactly once"
    assert len(logs) == 1000 and {l.status for l in logs} == {s.COMPLETED}
    assert sorted(l.param1 for l in logs) == sorted(str(i) for i in range(1000))
    assert set(joblogs) == {l.prcid for l in logs} and set(joblogs.values()) == {1}
    assert rejects == 1000 and srcrows == 3000
    per_worker = Counter(l.worker_id for l in logs)
    assert len(per_worker) == 3, f"all three replicas took work: {per_worker}"


def test_malformed_requests_fail_with_a_reason_and_the_replica_carries_on(engine, replicas):
    client.register_job(engine, "OK", "worker.jobs.builtin:noop")
    client.register_job(engine, "BADHANDLER", "no_such_module:nothing")
    (r,) = replicas(1, **FAST)
    r.wait_registered(engine)
    bad = {}
    with engine.begin() as conn:
        for key, (mapref, rtype, payload) in {
            "json": ("OK", "IMMEDIATE", "{not json"),
            "notobject": ("OK", "IMMEDIATE", "[1, 2]"),
            "mapref": ("NOPE", "IMMEDIATE", None),
            "type": ("OK", "SOMETHING", None),
            "dates": ("OK", "HISTORY", '{"start_date": "2026-13-01", "end_date": "2026-12-01"}'),
            "order": ("OK", "HISTORY", '{"start_date": "2026-03-02", "end_date": "2026-03-01"}'),
            "nodates": ("OK", "HISTORY", "{}"),
            "stoptarget": ("OK", "STOP", '{"request_id": "does-not-exist"}'),
            "handler": ("BADHANDLER", "IMMEDIATE", None),
        }.items():
            bad[key] = f"bad-{key}"
            conn.execute(sa.text("INSERT INTO dms_prcreq (request_id, mapref, request_type, payload) "
                                 "VALUES (:i, :m, :t, :p)"), dict(i=bad[key], m=mapref, t=rtype, p=payload))
        good = client.enqueue(conn, "OK")
    wait_until(lambda: all_terminal(engine, list(bad.values()) + [good]), 30, "all requests to end")
    assert row(engine, good)["status"] == s.DONE
    expected = {"json": "not valid JSON", "notobject": "JSON object", "mapref": "unknown mapref 'NOPE'",
                "type": "unknown request_type 'SOMETHING'", "dates": "not an ISO date",
                "order": "before start_date", "nodates": "needs start_date", "stoptarget": "no request",
                "handler": "No module named 'no_such_module'"}
    for key, text in expected.items():
        r_ = row(engine, bad[key])
        assert r_["status"] == s.FAILED, key
        assert text in json.loads(r_["result_payload"])["error"], (key, r_["result_payload"])
    r.alive_or_fail()


def test_web_app_insert_wakes_an_idle_replica_through_notify(pg_url, tmp_path):
    engine = sa.create_engine(pg_url)
    client.register_job(engine, "WEB", "worker.jobs.builtin:noop")
    r = Replica(pg_url, "idle", tmp_path, SCHEDULER_POLL_INTERVAL="300").start()
    try:
        r.wait_registered(engine)
        time.sleep(1.0)   # let it finish its start-up claim and go idle on LISTEN
        subprocess.run(["psql", sa.engine.make_url(pg_url).set(drivername="postgresql").render_as_string(False),
                        "-qc", "INSERT INTO dms_prcreq (request_id, mapref, request_type, payload) "
                               "VALUES ('web-1', 'WEB', 'IMMEDIATE', '{\"param1\": \"a\"}')"], check=True)
        t0 = time.monotonic()
        wait_until(lambda: row(engine, "web-1")["status"] == s.DONE, 10, "the web app's row to run")
        assert time.monotonic() - t0 < 5, "picked up by NOTIFY, not by the 300 s poll"
        assert prclogs(engine, "web-1")[0].param1 == "a"
    finally:
        r.stop()
        engine.dispose()


def test_stop_terminates_a_running_job_on_any_replica(engine, replicas):
    client.register_job(engine, "LONG", "tests.handlers:announce")
    a, b = replicas(2, **FAST)
    a.wait_registered(engine)
    b.wait_registered(engine)
    rid = client.enqueue(engine, "LONG", seconds=120)
    started = wait_until(lambda: probes(engine, request_id=rid), 30, "the job to start")[0]
    assert pid_alive(started.pid)
    t0 = time.monotonic()
    stop_id = client.request_stop(engine, request_id=rid)
    wait_until(lambda: row(engine, rid)["status"] == s.CANCELLED, 15, "the job to be stopped")
    elapsed = time.monotonic() - t0
    wait_until(lambda: not pid_alive(started.pid), 5, "the execution process to be gone")
    (log,) = prclogs(engine, rid)
    assert log.status == s.STOPPED and "STOP" in log.msg and log.enddt is not None
    wait_until(lambda: row(engine, stop_id)["status"] == s.DONE, 10, "the STOP request to be resolved")
    assert probes(engine, request_id=rid)[0].ended is None, "the job never got to finish"
    assert elapsed < 10
    # A queued target is cancelled without running.
    with engine.begin() as conn:
        queued = client.enqueue(conn, "LONG", seconds=120)
        conn.execute(sa.update(s.prcreq).where(s.prcreq.c.request_id == queued).values(
            not_before=datetime(2999, 1, 1)))
    client.request_stop(engine, request_id=queued)
    wait_until(lambda: row(engine, queued)["status"] == s.CANCELLED, 15, "the queued job to be cancelled")
    assert prclogs(engine, queued) == []


def test_stop_cancels_the_database_call_of_a_running_job(pg_url, tmp_path):
    engine = sa.create_engine(pg_url)
    client.register_job(engine, "DBSLEEP", "tests.handlers:db_sleep")
    r = Replica(pg_url, "dbstop", tmp_path, **FAST).start()
    try:
        r.wait_registered(engine)
        rid = client.enqueue(engine, "DBSLEEP", seconds=300)

        def sleeping_backends():
            with engine.connect() as conn:
                return conn.execute(sa.text("SELECT pid FROM pg_stat_activity WHERE query LIKE 'SELECT pg_sleep%' "
                                            "AND state = 'active' AND datname = current_database()")).scalars().all()

        (backend,) = wait_until(sleeping_backends, 30, "pg_sleep to run")
        assert prclogs(engine, rid)[0].sessionid == str(backend) or wait_until(
            lambda: prclogs(engine, rid)[0].sessionid == str(backend), 5, "the session id in DMS_PRCLOG")
        client.request_stop(engine, request_id=rid)
        wait_until(lambda: row(engine, rid)["status"] == s.CANCELLED, 15, "the stop")
        wait_until(lambda: not sleeping_backends(), 5, "the server-side statement to be cancelled")
    finally:
        r.stop()
        engine.dispose()


def test_timeout_stops_the_job_and_fails_it(engine, replicas):
    client.register_job(engine, "SLOW", "tests.handlers:announce", timeout_s=3)
    (r,) = replicas(1, **FAST)
    r.wait_registered(engine)
    rid = client.enqueue(engine, "SLOW", seconds=120)
    started = wait_until(lambda: probes(engine, request_id=rid), 30, "the job to start")[0]
    wait_until(lambda: row(engine, rid)["status"] == s.FAILED, 15, "the timeout")
    wait_until(lambda: not pid_alive(started.pid), 5, "the execution process to be gone")
    (log,) = prclogs(engine, rid)
    assert log.status == s.LOG_FAILED and "timeout" in log.msg
    assert "timeout" in json.loads(row(engine, rid)["result_payload"])["error"]
    with engine.connect() as conn:
        assert conn.execute(sa.select(s.joberr.c.errtyp).where(s.joberr.c.prcid == log.prcid)).scalar() == "TIMEOUT"
    assert 3 <= (log.enddt - log.strtdt).total_seconds() < 10


def test_kill9_is_rescued_within_the_default_delay(engine, replicas):
    """Default heartbeat/rescue settings: the SPEC promises rescue within 15 s of a kill -9."""
    client.register_job(engine, "CRASH", "tests.handlers:announce", max_attempts=2)
    victim, = replicas(1)
    victim.wait_registered(engine)
    rid = client.enqueue(engine, "CRASH", seconds=3)
    first = wait_until(lambda: probes(engine, request_id=rid), 30, "the job to start")[0]
    survivor, = replicas(1)
    survivor.wait_registered(engine)
    t_kill = time.monotonic()
    victim.kill9()
    wait_until(lambda: not pid_alive(first.pid), 3, "the orphaned execution process to end itself")
    wait_until(lambda: row(engine, rid)["status"] != s.PROCESSING, 20, "the rescue")
    rescued_after = time.monotonic() - t_kill
    assert rescued_after < 15, f"rescued after {rescued_after:.1f}s"
    wait_until(lambda: row(engine, rid)["status"] == s.DONE, 30, "the retry on the survivor")
    logs = prclogs(engine, rid)
    assert [l.status for l in logs] == [s.LOG_FAILED, s.COMPLETED]
    assert "lost" in logs[0].msg
    runs = probes(engine, request_id=rid)
    assert len(runs) == 2 and runs[0].ended is None and runs[1].ended is not None
    print(f"\nkill -9 -> rescued in {rescued_after:.2f}s ({engine.dialect.name})")


def test_paused_replica_cannot_finish_a_rescued_row_and_its_job_does_not_overlap(engine, replicas):
    """Invariant 8: SIGSTOP a replica past the rescue delay; its execution fences itself."""
    client.register_job(engine, "PAUSE", "tests.handlers:announce", max_attempts=3)
    (paused,) = replicas(1, **FAST)
    paused.wait_registered(engine)
    rid = client.enqueue(engine, "PAUSE", seconds=8)
    first = wait_until(lambda: probes(engine, request_id=rid), 30, "the job to start")[0]
    (other,) = replicas(1, **FAST)
    other.wait_registered(engine)
    paused.signal(signal.SIGSTOP)
    try:
        wait_until(lambda: len(probes(engine, request_id=rid)) >= 2, 30, "the rescued retry to start elsewhere")
        assert not pid_alive(first.pid), "the paused replica's execution fenced itself before the retry"
    finally:
        paused.signal(signal.SIGCONT)
    wait_until(lambda: row(engine, rid)["status"] == s.DONE, 30, "the retry to finish")
    logs = prclogs(engine, rid)
    assert [l.status for l in logs] == [s.LOG_FAILED, s.COMPLETED]
    assert logs[1].worker_id.startswith(other.name)
    time.sleep(2)   # give the resumed replica time to try (and fail) to write its outcome
    assert row(engine, rid)["status"] == s.DONE and len(prclogs(engine, rid)) == 2
    paused.alive_or_fail()


def test_history_runs_each_day_in_order_and_resumes_after_a_failed_day(engine, replicas):
    client.register_job(engine, "HIST", "tests.handlers:record", max_attempts=2, retry_delay_s=1)
    (r,) = replicas(1, **FAST)
    r.wait_registered(engine)
    rid = client.enqueue_history(engine, "HIST", "2026-03-27", "2026-03-31", truncate_flag="Y",
                                 fail_days=["2026-03-29"])
    wait_until(lambda: row(engine, rid)["status"] in s.TERMINAL_STATUSES, 60, "the history to finish")
    assert row(engine, rid)["status"] == s.DONE
    logs = prclogs(engine, rid)
    assert [(l.param1, l.status) for l in logs] == [
        ("2026-03-27", "PC"), ("2026-03-28", "PC"), ("2026-03-29", "FL"),
        ("2026-03-29", "PC"), ("2026-03-30", "PC"), ("2026-03-31", "PC")]
    runs = probes(engine, request_id=rid)
    assert [(p.day, p.truncate_flag) for p in runs] == [
        ("2026-03-27", "Y"), ("2026-03-28", "N"), ("2026-03-29", "N"), ("2026-03-30", "N"), ("2026-03-31", "N")]
    with engine.connect() as conn:
        prcdts = conn.execute(sa.select(s.joblog.c.prcdt).where(s.joblog.c.prcid.in_([l.prcid for l in logs]))
                              .order_by(s.joblog.c.prcid)).scalars().all()
    assert [d.date().isoformat() for d in prcdts] == [l.param1 for l in logs]


def test_history_handed_back_by_a_sigterm_resumes_on_another_replica_without_rerunning_a_day(engine, replicas):
    """Found by the chaos suite (seed 8202): a replica stopped between two days hands its
    HISTORY request back with the attempt refunded; the next replica must not rerun the days done."""
    client.register_job(engine, "HIST_TERM", "tests.handlers:record")
    (first,) = replicas(1, **FAST)
    first.wait_registered(engine)
    rid = client.enqueue_history(engine, "HIST_TERM", "2026-02-16", "2026-02-23", seconds=0.4)
    wait_until(lambda: len(probes(engine, request_id=rid)) >= 2, 30, "two days to be done")
    assert first.terminate() == 0
    (second,) = replicas(1, **FAST)
    wait_until(lambda: row(engine, rid)["status"] in s.TERMINAL_STATUSES, 60, "the history to finish elsewhere")
    assert row(engine, rid)["status"] == s.DONE
    days = [p.day for p in probes(engine, request_id=rid)]
    assert sorted(days) == [f"2026-02-{d}" for d in range(16, 24)], "each day's work exactly once"
    done = [l.param1 for l in prclogs(engine, rid) if l.status == s.COMPLETED]
    assert sorted(done) == sorted(set(done)), "no day completed twice"
    assert any(l.worker_id.startswith(second.name) for l in prclogs(engine, rid)), "resumed by the other replica"


def test_retries_back_off_then_fail(engine, replicas):
    client.register_job(engine, "FLAKY", "worker.jobs.builtin:fail", max_attempts=3, retry_delay_s=1)
    (r,) = replicas(1, **FAST)
    r.wait_registered(engine)
    rid = client.enqueue(engine, "FLAKY")
    wait_until(lambda: row(engine, rid)["status"] == s.FAILED, 30, "the retries to run out")
    logs = prclogs(engine, rid)
    assert [l.status for l in logs] == [s.LOG_FAILED] * 3 and [l.attempt for l in logs] == [1, 2, 3]
    gaps = [(b.strtdt - a.enddt).total_seconds() for a, b in zip(logs, logs[1:])]
    assert gaps[0] >= 0.9 and gaps[1] >= 1.9, f"back-off doubles: {gaps}"
    with engine.connect() as conn:
        errs = conn.execute(sa.select(s.joberr.c.errtyp, s.joberr.c.errmsg).where(
            s.joberr.c.prcid.in_([l.prcid for l in logs]))).all()
    assert len(errs) == 3 and all(e.errtyp == "EXECUTION" and "builtin fail" in e.errmsg for e in errs)
    # The execution process's own log line reached the replica's log through the parent.
    r.stop()
    child_lines = [l for l in r.log().splitlines() if " dms-exec-" in l and "worker.job.FLAKY" in l]
    assert len(child_lines) == 3 and "builtin fail" in child_lines[0]


def test_a_database_error_is_recorded_as_the_databases_own_words_on_one_line(engine, replicas):
    """DMS_PRCLOG.msg, result_payload and DMS_JOBERR get the server's message on one line:
    not SQLAlchemy's appended statement, bound parameters and "Background on this error" link
    (those go to the replica's log only)."""
    client.register_job(engine, "BADQ", "tests.handlers:bad_query")
    (r,) = replicas(1, **FAST)
    rid = client.enqueue(engine, "BADQ")
    wait_until(lambda: row(engine, rid)["status"] == s.FAILED, 30, "the failing query's request to fail")
    (log,) = prclogs(engine, rid)
    with engine.connect() as conn:
        (err,) = conn.execute(sa.select(s.joberr.c.errmsg, s.joberr.c.dberrmsg).where(s.joberr.c.prcid == log.prcid)).all()
    recorded = {"msg": log.msg, "result_payload": row(engine, rid)["result_payload"], "errmsg": err.errmsg,
                "dberrmsg": err.dberrmsg}
    for where, text in recorded.items():
        assert text and "no_such_column" in text, (where, text)
        assert "\n" not in text and "[SQL:" not in text and "Background on this error" not in text, (where, text)
        assert "bound-value-42" not in text and "[parameters:" not in text, (where, text)
    r.stop()
    assert "[SQL: SELECT no_such_column" in r.log(), "the statement is in the replica's log"


def test_a_job_costs_at_most_one_log_record_at_info(engine, replicas):
    """Issue 11.4: the replica and its execution processes log one INFO record per execution
    (its end, with the outcome), not one per step."""
    client.register_job(engine, "QUIET", "worker.jobs.builtin:noop", allow_overlap=True)
    (r,) = replicas(1, DMS_LOG_LEVEL="INFO", **FAST)
    r.wait_registered(engine)
    before = len(r.log().splitlines())
    rids = [client.enqueue(engine, "QUIET") for _ in range(30)]
    wait_until(lambda: all(row(engine, rid)["status"] == s.DONE for rid in rids), 60, "the no-ops to run")
    r.stop()
    lines = r.log().splitlines()[before:]
    per_job = {rid: [line for line in lines if rid in line] for rid in rids}
    assert all(len(found) == 1 and " INFO " in found[0] for found in per_job.values()), per_job
    shutdown = [line for line in lines if not any(rid in line for rid in rids)]
    assert len(shutdown) <= 10, "no INFO record per job without its request id either:\n" + "\n".join(shutdown)


def test_one_execution_per_mapref_across_replicas(engine, replicas):
    client.register_job(engine, "SOLO", "tests.handlers:record")
    client.register_job(engine, "MANY", "tests.handlers:record", allow_overlap=True)
    group = replicas(2, SCHEDULER_MAX_WORKERS=4, **FAST)
    for r in group:
        r.wait_registered(engine)
    with engine.begin() as conn:
        ids = [client.enqueue(conn, m, seconds=0.2) for m in ["SOLO"] * 12 + ["MANY"] * 12]
    wait_until(lambda: all_terminal(engine, ids), 90, "all to finish", interval=0.2)
    assert set(statuses(engine, ids).values()) == {s.DONE}

    def max_overlap(mapref):
        runs = probes(engine, mapref=mapref)
        events = sorted([(p.started, 1) for p in runs] + [(p.ended, -1) for p in runs])
        level = peak = 0
        for _, delta in events:
            level += delta
            peak = max(peak, level)
        return peak

    assert max_overlap("SOLO") == 1
    assert max_overlap("MANY") > 1


def test_sigterm_lets_running_jobs_finish_then_exits_0(engine, replicas):
    client.register_job(engine, "DRAIN", "tests.handlers:record")
    (r,) = replicas(1, **FAST)
    wid = r.wait_registered(engine)
    rid = client.enqueue(engine, "DRAIN", seconds=2)
    wait_until(lambda: row(engine, rid)["status"] == s.PROCESSING, 30, "the job to start")
    assert r.terminate() == 0
    assert row(engine, rid)["status"] == s.DONE
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(s.worker)
                            .where(s.worker.c.worker_id == wid)).scalar() == 0


def test_sigterm_past_the_grace_hands_the_row_back(engine, replicas):
    client.register_job(engine, "GRACE", "tests.handlers:announce")
    (r,) = replicas(1, DMS_SHUTDOWN_GRACE="1", **FAST)
    r.wait_registered(engine)
    rid = client.enqueue(engine, "GRACE", seconds=120)
    started = wait_until(lambda: probes(engine, request_id=rid), 30, "the job to start")[0]
    t0 = time.monotonic()
    assert r.terminate() == 0
    assert time.monotonic() - t0 < 10
    assert not pid_alive(started.pid)
    back = row(engine, rid)
    assert (back["status"], back["claimed_by"], back["attempts"]) == (s.NEW, None, 0)
    assert prclogs(engine, rid)[0].status == s.STOPPED


def test_second_signal_forces(engine, replicas):
    client.register_job(engine, "FORCE", "tests.handlers:announce")
    (r,) = replicas(1, **FAST)
    r.wait_registered(engine)
    rid = client.enqueue(engine, "FORCE", seconds=120)
    wait_until(lambda: probes(engine, request_id=rid), 30, "the job to start")
    r.signal(signal.SIGTERM)
    time.sleep(0.5)
    assert r.proc.poll() is None, "still draining after the first signal (30 s grace)"
    t0 = time.monotonic()
    assert r.terminate() == 0
    assert time.monotonic() - t0 < 10
    assert row(engine, rid)["status"] == s.NEW


def _restart_postgres():
    version = os.listdir("/etc/postgresql")[0]
    subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", "restart", "-m", "fast"],
                   check=True, capture_output=True)


@pytest.mark.skipif(not os.path.isdir("/etc/postgresql"), reason="needs a local pg_ctlcluster-managed server")
def test_database_restart_while_jobs_run(pg_url, tmp_path):
    engine = sa.create_engine(pg_url, pool_pre_ping=True)
    client.register_job(engine, "SURVIVE", "tests.handlers:record", allow_overlap=True, max_attempts=5,
                        retry_delay_s=1)
    group = [Replica(pg_url, f"rs{i}", tmp_path, **FAST).start() for i in range(2)]
    try:
        for r in group:
            r.wait_registered(engine)
        with engine.begin() as conn:
            ids = [client.enqueue(conn, "SURVIVE", seconds=0.05) for _ in range(300)]
        wait_until(lambda: sum(v == s.DONE for v in statuses(engine, ids).values()) >= 50, 60, "some progress")
        _restart_postgres()
        wait_until(lambda: all_terminal(engine, ids), 180, "every request to finish after the restart", interval=0.5)
        assert set(statuses(engine, ids).values()) == {s.DONE}
        with engine.connect() as conn:
            runs = Counter(conn.execute(sa.select(probe.c.request_id)).scalars())
            open_logs = conn.execute(sa.select(sa.func.count()).select_from(s.prclog)
                                     .where(s.prclog.c.status == s.IN_PROGRESS)).scalar()
        twice = {rid: n for rid, n in runs.items() if n > 1}
        never = set(ids) - set(runs)
        detail = {rid: [(l.status, l.worker_id, l.msg) for l in prclogs(engine, rid)] for rid in list(twice)[:3] + list(never)[:3]}
        assert not twice and not never, f"ran twice: {twice}; never ran: {len(never)}; logs: {detail}"
        assert open_logs == 0
        for r in group:
            r.alive_or_fail()
            assert "database unavailable" in r.log()
    finally:
        for r in group:
            r.stop()
        engine.dispose()


def test_sql_handler_calls_a_stored_procedure_with_the_execution_id_and_params(pg_url, tmp_path):
    engine = sa.create_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(sa.text("""
            CREATE OR REPLACE PROCEDURE dms_test_proc(p_prcid bigint, p1 varchar, p2 varchar, p3 varchar,
                p4 varchar, p5 varchar, p6 varchar, p7 varchar, p8 varchar, p9 varchar, p10 varchar)
            LANGUAGE plpgsql AS $$
            BEGIN
                INSERT INTO dms_test_probe (prcid, mapref, day, pid) VALUES (p_prcid, 'PROC', p1, pg_backend_pid());
            END $$"""))
    client.register_job(engine, "PROC", "sql:dms_test_proc")
    r = Replica(pg_url, "proc", tmp_path, **FAST).start()
    try:
        r.wait_registered(engine)
        rid = client.enqueue(engine, "PROC", param1="hello")
        wait_until(lambda: row(engine, rid)["status"] in s.TERMINAL_STATUSES, 30, "the procedure to run")
        assert row(engine, rid)["status"] == s.DONE, row(engine, rid)["result_payload"]
        (log,) = prclogs(engine, rid)
        (run,) = probes(engine, prcid=log.prcid)
        assert run.day == "hello" and log.sessionid == str(run.pid)
    finally:
        r.stop()
        engine.dispose()
