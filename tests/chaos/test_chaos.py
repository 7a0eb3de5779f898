"""The chaos suite's short version (~40 s of chaos), and proof that its checker can fail.

The long version: ``python -m tests.chaos --minutes 5``. Both run on a private PostgreSQL
cluster of their own (tests/chaos/harness.py), never on the shared system server, because
they restart it. Under CI (``CI`` set) a cluster that cannot be created fails the test.
"""
from __future__ import annotations

import json
import os
import subprocess
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa

from tests.chaos import checker
from tests.chaos.checker import State, check
from tests.chaos.harness import ClusterError, PrivateCluster, run_chaos
from tests.support import probe
from worker import schema as s

T0 = datetime(2026, 3, 1, 12, 0, 0)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# ---------------------------------------------------------------------------------------------
# The checker on hand-made states
# ---------------------------------------------------------------------------------------------
def req(rid, status="DONE", mapref="REC", rtype="IMMEDIATE", payload=None, attempts=1, jobschid=None,
        scheduled_for=None, result_payload=None, claimed_by=None):
    return dict(request_id=rid, mapref=mapref, request_type=rtype, payload=payload, status=status, attempts=attempts,
                jobschid=jobschid, scheduled_for=scheduled_for, result_payload=result_payload, claimed_by=claimed_by,
                claimed_at=None, requested_at=T0, completed_at=None, not_before=T0, excl_key=None,
                stop_requested_at=None)


def log(prcid, rid, start, end, status="PC", mapref="REC", param1=None, msg=None):
    return dict(prcid=prcid, request_id=rid, mapref=mapref, strtdt=at(start), enddt=None if end is None else at(end),
                status=status, msg=msg, param1=param1, attempt=1, worker_id="w1")


def probe_row(pid, rid, prcid, start, end, mapref="REC"):
    return dict(id=pid, request_id=rid, prcid=prcid, mapref=mapref, day=None, truncate_flag="N", attempt=1, pid=1,
                started=start, ended=end)


def good_state() -> State:
    """A small history that satisfies every rule, with the legitimate repeats in it."""
    hist = json.dumps({"start_date": "2026-01-01", "end_date": "2026-01-02"})
    return State(
        requests=[
            req("a"),                                               # ran once
            req("b", attempts=2),                                   # failed, retried, done
            req("c", status="FAILED", attempts=3, result_payload='{"error": "x"}'),
            req("h", rtype="HISTORY", payload=hist, attempts=2),    # day 2 failed once
            req("q", status="NEW", attempts=0),                     # still queued
            req("o1", mapref="SOLO"), req("o2", mapref="SOLO"),
            req("sch1-1", mapref="TICK", jobschid=1, scheduled_for=at(0)),
            req("sch1-2", mapref="TICK", jobschid=1, scheduled_for=at(1)),
            req("sch1-3", mapref="TICK", jobschid=1, scheduled_for=at(2)),
            req("bad-json-1", status="FAILED", result_payload='{"error": "payload is not valid JSON: x"}'),
            req("bad-mapref-2", status="FAILED", mapref="NOPE",
                result_payload='{"error": "rescued: worker w9 stopped heartbeating; no attempts left"}'),
        ],
        logs=[
            log(1, "a", 0, 1),
            log(2, "b", 0, 1, "FL"), log(3, "b", 2, 3),
            log(4, "c", 0, 1, "FL"), log(5, "c", 1, 2, "FL", msg="worker w lost (heartbeat stale)"),
            log(6, "c", 3, 4, "FL"),
            log(7, "h", 0, 1, param1="2026-01-01"), log(8, "h", 1, 2, "FL", param1="2026-01-02"),
            log(9, "h", 3, 4, param1="2026-01-02"),
            log(10, "o1", 0, 1, mapref="SOLO"), log(11, "o2", 1, 2, mapref="SOLO"),
            log(12, "sch1-1", 0, 0.1, mapref="TICK"), log(13, "sch1-2", 1, 1.1, mapref="TICK"),
            log(14, "sch1-3", 2, 2.1, mapref="TICK"),
        ],
        joblogs=[dict(joblogid=i, prcid=i, mapref="x") for i in (1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12, 13, 14)],
        jobs=[dict(mapref="REC", handler=checker.RECORD_HANDLER, allow_overlap="Y", max_attempts=3),
              dict(mapref="SOLO", handler=checker.RECORD_HANDLER, allow_overlap="N", max_attempts=1),
              dict(mapref="TICK", handler="worker.jobs.builtin:noop", allow_overlap="Y", max_attempts=1)],
        schedules=[dict(jobschid=1, mapref="TICK", frqcd="CRON", cronexp=checker.EVERY_SECOND, misfire="ALL",
                        dpnd_jobschid=None)],
        probes=[probe_row(1, "a", 1, 0.1, 0.9), probe_row(2, "b", 3, 2.1, 2.9),
                dict(probe_row(3, "h", 7, 0.1, 0.9), day="2026-01-01", truncate_flag="Y"),
                dict(probe_row(4, "h", 9, 3.1, 3.9), day="2026-01-02"), probe_row(5, "o1", 10, 0.1, 0.9, "SOLO"),
                probe_row(6, "o2", 11, 1.1, 1.9, "SOLO"),
                probe_row(7, "c", 5, 1.1, 1.5)],   # committed, then the replica died: not PC, allowed
    )


def test_the_checker_accepts_a_legitimate_history():
    result = check(good_state(), committed_ids=["a", "b", "q"])
    assert result.ok, [str(v) for v in result.violations]
    assert result.counts["requests_by_status"] == {"DONE": 8, "FAILED": 3, "NEW": 1}
    assert result.counts["malformed"] == 2 and result.counts["malformed_failed_by_rescue"] == 1


def _violations(mutate, **kwargs) -> dict[str, list[str]]:
    st = good_state()
    mutate(st)
    found: dict[str, list[str]] = {}
    for v in check(st, **kwargs).violations:
        found.setdefault(v.invariant, []).append(v.detail)
    return found


def _replace(rows, key, value, **changes):
    for row in rows:
        if row[key] == value:
            row.update(changes)
            return
    raise KeyError(value)


@pytest.mark.parametrize("invariant, mutate, needle", [
    ("running", lambda st: _replace(st.requests, "request_id", "q", status="PROCESSING", claimed_by="w7"),
     "left PROCESSING"),
    ("running", lambda st: _replace(st.requests, "request_id", "q", status="CLAIMED"), "left CLAIMED"),
    ("log_in_progress", lambda st: st.logs.append(log(20, "q", 5, None, "IP")), "left IP"),
    # Two executions of one request at the same time (a retry that started before the first ended).
    ("concurrent", lambda st: _replace(st.logs, "prcid", 3, strtdt=at(0.5)), "executions (DMS_PRCLOG) 2 and 3 overlap"),
    ("concurrent", lambda st: st.probes.append(probe_row(9, "a", 1, 0.5, 0.6)), "handler runs"),
    # Finished twice: two PC rows for one IMMEDIATE request.
    ("finished_twice", lambda st: st.logs.append(log(21, "a", 5, 6)), "2 PC executions"),
    # Two PC rows for one HISTORY day.
    ("finished_twice", lambda st: st.logs.append(log(22, "h", 5, 6, param1="2026-01-01")), "day 2026-01-01: 2 PC"),
    # Ran again after it had completed.
    ("finished_twice", lambda st: st.logs.append(log(23, "a", 5, 6, "FL")), "started after the completed one"),
    ("finished_twice", lambda st: _replace(st.requests, "request_id", "c", status="DONE"), "DONE with 0 PC"),
    ("finished_twice", lambda st: _replace(st.requests, "request_id", "a", status="FAILED"), "FAILED but has 1 PC"),
    ("finished_twice", lambda st: _replace(st.logs, "prcid", 9, status="FL"), "have no PC execution"),
    ("finished_twice", lambda st: st.joblogs.append(dict(joblogid=99, prcid=1, mapref="REC")), "2 DMS_JOBLOG rows"),
    ("finished_twice", lambda st: st.probes.remove(st.probes[0]), "0 probe rows"),
    ("finished_twice", lambda st: st.probes.append(probe_row(10, "a", 1, 0.2, 0.3)), "2 probe rows"),
    ("history", lambda st: _replace(st.logs, "prcid", 7, status="FL"), "are not the first 1 day(s)"),
    ("history", lambda st: _replace(st.logs, "prcid", 9, strtdt=at(0.5)),
     "day 2026-01-02 started before day 2026-01-01"),
    ("history", lambda st: st.probes.append(dict(probe_row(13, "h", 9, 3.2, 3.3), day="2026-01-02", truncate_flag="Y")),
     "truncate_flag on day 2026-01-02"),
    ("occurrence_duplicate", lambda st: st.requests.append(
        req("dup", mapref="TICK", jobschid=1, scheduled_for=at(1))), "enqueued 2 times"),
    ("occurrence_missing", lambda st: st.requests.remove(next(r for r in st.requests if r["request_id"] == "sch1-2")),
     "1 occurrence(s) never enqueued"),
    ("overlap", lambda st: _replace(st.logs, "prcid", 11, strtdt=at(0.5)),
     "SOLO (allow_overlap='N'): executions 10 and 11"),
    ("overlap", lambda st: st.probes.append(probe_row(11, "o2", 11, 0.5, 0.7, "SOLO")), "handler runs (probe rows)"),
    ("malformed", lambda st: _replace(st.requests, "request_id", "bad-json-1", status="DONE"), "is DONE, not FAILED"),
    ("malformed", lambda st: _replace(st.requests, "request_id", "bad-json-1", result_payload=None),
     "without a reason"),
    ("malformed", lambda st: _replace(st.requests, "request_id", "bad-json-1", result_payload='{"error": "oops"}'),
     "does not say 'not valid JSON'"),
    ("attempts", lambda st: _replace(st.requests, "request_id", "o1", attempts=2), "attempts 2 > max_attempts 1"),
    ("attempts", lambda st: st.logs.append(log(24, "c", 5, 6, "FL")), "4 FL executions > max_attempts 3"),
    ("lost_row", lambda st: st.probes.append(probe_row(12, "ghost", 77, 9.0, 9.1)), "missing from DMS_PRCREQ"),
])
def test_the_checker_reports_each_violation(invariant, mutate, needle):
    found = _violations(mutate)
    assert invariant in found, found
    assert any(needle in d for d in found[invariant]), found[invariant]


def test_the_checker_reports_lost_rows_and_late_stopping_schedules():
    found = _violations(lambda st: None, committed_ids=["a", "never-arrived"], ticks_until=at(5))
    assert any("never-arrived" in d for d in found["lost_row"])
    assert any("3 occurrence(s) never enqueued" in d for d in found["occurrence_missing"]), found


def test_the_checker_reads_violations_from_real_tables(sqlite_url):
    """The same rules through ``load``: rows written with plain INSERTs into a migrated database
    (the occurrence unique index dropped, which is what a duplicate would need)."""
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP INDEX dms_prcreq_occurrence_uq"))
        conn.execute(sa.insert(s.job), [
            dict(mapref="REC", handler=checker.RECORD_HANDLER, max_attempts=1, retry_delay_s=1, allow_overlap="Y",
                 enabled="Y"),
            dict(mapref="SOLO", handler=checker.RECORD_HANDLER, max_attempts=1, retry_delay_s=1, allow_overlap="N",
                 enabled="Y")])
        conn.execute(sa.insert(s.jobsch).values(jobschid=1, mapref="REC", frqcd="CRON", cronexp=checker.EVERY_SECOND,
                                                misfire="ALL", schflg="Y", curflg="Y"))
        base = dict(request_type="IMMEDIATE", attempts=1, not_before=T0, requested_at=T0)
        for row in [   # one by one: an executemany takes its columns from the first row
            dict(request_id="twice", mapref="REC", status="DONE", **base),
            dict(request_id="stuck", mapref="REC", status="PROCESSING", claimed_by="w1", **base),
            dict(request_id="s1", mapref="SOLO", status="DONE", **base),
            dict(request_id="s2", mapref="SOLO", status="DONE", **base),
            dict(request_id="occ1", mapref="REC", status="DONE", jobschid=1, scheduled_for=at(0), **base),
            dict(request_id="occ2", mapref="REC", status="DONE", jobschid=1, scheduled_for=at(0), **base),
            dict(request_id="occ3", mapref="REC", status="DONE", jobschid=1, scheduled_for=at(3), **base),
            dict(request_id="bad-json-1", mapref="REC", status="DONE", **base),
        ]:
            conn.execute(sa.insert(s.prcreq).values(**row))
        logs = [("twice", "REC", 0, 1, "PC"), ("twice", "REC", 0.5, 2, "PC"), ("stuck", "REC", 0, None, "IP"),
                ("s1", "SOLO", 0, 2, "PC"), ("s2", "SOLO", 1, 3, "PC")]
        for i, (rid, mapref, a, b, st_) in enumerate(logs, start=1):
            conn.execute(sa.insert(s.prclog).values(prcid=i, request_id=rid, mapref=mapref, strtdt=at(a),
                                                    enddt=None if b is None else at(b), status=st_))
            if st_ == "PC":
                conn.execute(sa.insert(s.joblog).values(prcid=i, mapref=mapref))
                conn.execute(sa.insert(probe).values(request_id=rid, prcid=i, mapref=mapref,
                                                     started=a + 0.1, ended=(b or a) - 0.1))
    result = check(checker.load(engine))
    engine.dispose()
    found = result.by_invariant()
    for invariant in ("running", "log_in_progress", "concurrent", "finished_twice", "occurrence_duplicate",
                      "occurrence_missing", "overlap", "malformed"):
        assert found[invariant] >= 1, (invariant, [str(v) for v in result.violations])
    text = "\n".join(map(str, result.violations))
    assert "request twice: 2 PC executions" in text and "occurrence 2026-03-01 12:00:00 enqueued 2 times" in text
    assert "SOLO (allow_overlap='N'): executions 4 and 5 overlap" in text


# ---------------------------------------------------------------------------------------------
# The short chaos run
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def private_cluster():
    """A started private PostgreSQL cluster (run_chaos stops and removes it). Under CI one that
    cannot be created fails the test; elsewhere it is skipped."""
    cluster = PrivateCluster()
    try:
        cluster.start()
    except (ClusterError, OSError, subprocess.SubprocessError) as exc:
        cluster.stop()
        if os.environ.get("CI"):
            pytest.fail(f"the chaos suite needs a private PostgreSQL cluster under CI and could not create one: {exc}")
        pytest.skip(f"cannot create a private PostgreSQL cluster: {exc}")
    yield cluster
    cluster.stop()


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_chaos_short(private_cluster, tmp_path):
    seconds = float(os.environ.get("DMS_CHAOS_SECONDS", "40"))
    seed = int(os.environ["DMS_CHAOS_SEED"]) if os.environ.get("DMS_CHAOS_SEED") else None
    outcome = run_chaos(seconds, replicas=4, seed=seed, log_dir=tmp_path / "logs", settle_timeout_s=90,
                        cluster=private_cluster)
    report = outcome.report()
    print("\n" + report)
    assert outcome.result.ok, report
    assert not outcome.problems, report
    st, counts = outcome.stats, outcome.result.counts
    # The run did what it claims: violence of each kind, and work of each kind got through it.
    assert st.kills >= 1 and st.sigterms >= 1 and st.kills_of_leader + st.sigterms_of_leader >= 1, report
    assert st.pg_restarts == 1, report
    assert st.malformed_inserted >= 5 and counts["malformed"] == st.malformed_inserted, report
    assert counts["requests_by_status"].get("DONE", 0) >= 20, report
    assert counts["occurrences"] >= seconds, report
    # Exit codes: a SIGTERM'd replica must exit 0 (else it is in outcome.problems), unless the
    # signal came before `run` installed its handler (counted apart: it had claimed nothing).
    assert len(st.sigterm_exit_codes) == st.sigterms or st.sigterm_hung, report
    assert st.final_stop_exit_codes == [0] * 4, report


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_the_first_job_after_a_database_restart_gets_a_live_connection(private_cluster, tmp_path):
    """Handlers get a pooled connection and no retry: a connection left dead by the restart
    must not reach them (a one-attempt job would fail for nothing)."""
    from tests.chaos.harness import REPLICA_ENV, ChaosReplica
    from tests.support import wait_until
    from worker import client

    url = private_cluster.url
    engine = sa.create_engine(url, pool_pre_ping=True)
    client.register_job(engine, "ONCE", "tests.handlers:record", allow_overlap=True, max_attempts=1)
    r = ChaosReplica(url, "restart", tmp_path, **dict(REPLICA_ENV, SCHEDULER_MAX_WORKERS="1")).start()
    try:
        r.wait_registered(engine, 60)
        warm = client.enqueue(engine, "ONCE")          # the execution process now holds a connection
        wait_until(lambda: client.request_status(engine, warm)["status"] == "DONE", 60, "the warm-up job")
        private_cluster.restart(immediate=False)
        wait_until(lambda: "database reachable again" in r.log(), 60, "the replica to reconnect")
        after = client.enqueue(engine, "ONCE")
        wait_until(lambda: client.request_status(engine, after)["status"] in ("DONE", "FAILED"), 60, "the job")
        assert client.request_status(engine, after)["status"] == "DONE", client.request_status(engine, after)
    finally:
        r.stop()
        engine.dispose()


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_a_replica_started_during_an_outage_waits_for_the_database(private_cluster, tmp_path):
    """Under supervisord a replica that exits at once on a refused connection is soon FATAL."""
    from tests.chaos.harness import REPLICA_ENV, ChaosReplica
    from tests.support import wait_until

    private_cluster.halt()
    r = ChaosReplica(private_cluster.url, "early", tmp_path, **REPLICA_ENV).start()
    try:
        wait_until(lambda: "database unreachable" in r.log(), 30, "the replica to say it waits")
        assert r.proc.poll() is None, r.log()
        private_cluster.resume()
        engine = sa.create_engine(private_cluster.url)
        try:
            r.wait_registered(engine, 60)
        finally:
            engine.dispose()
        r.alive_or_fail()
    finally:
        r.stop()
