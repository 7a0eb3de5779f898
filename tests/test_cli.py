"""The ``dms-worker`` command, run as a user runs it: a subprocess, a clean environment, its own cwd.

Help for every command; ``job``/``enqueue``/``status`` against a migrated SQLite database; enqueue
--wait and stop --wait against one real replica; ``run`` on an unmigrated database; and ``demo``,
the newcomer's one command.
"""
from __future__ import annotations

import ast
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.support import Replica, probe, wait_until
from worker import client
from worker import schema as s
from worker.cli import main
from worker.drivers import make_driver
from worker.migrate import migrate

CONSOLE_SCRIPT = Path(sys.executable).with_name("dms-worker")
COMMANDS = ["run", "migrate", "enqueue", "stop", "status", "job", "demo", "schedule", "schedule preview"]


def clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without any dms-worker setting, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DMS_", "DB_", "SCHEDULER_")) and k != "SCHEMA"}
    env.update(extra)
    return env


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker", *args], cwd=cwd, env=clean_env(**(env or {})),
                          capture_output=True, text=True, timeout=timeout)


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    return lines[0]


def status_of(url: str, request_id: str) -> str | None:
    rows = prcreq_rows(url, s.prcreq.c.request_id == request_id)
    return rows[0]["status"] if rows else None


def prcreq_rows(url: str, *where) -> list:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.select(s.prcreq).where(*where)).mappings().all()
    finally:
        engine.dispose()


# -- help ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", COMMANDS)
def test_help_for_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*command.split(), "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: dms-worker {command}")


def test_top_level_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in {c.split()[0] for c in COMMANDS}:
        assert re.search(rf"^\s+{command}\s", out, re.M), command


def test_schedule_preview_help_has_the_spec_flags(capsys):
    with pytest.raises(SystemExit):
        main(["schedule", "preview", "--help"])
    out = capsys.readouterr().out
    for flag in ("--frqcd", "--frqdd", "--frqhh", "--frqmi", "--strtdt", "--enddt", "--tz", "--after", "--count",
                 "--json"):
        assert flag in out


@pytest.mark.parametrize("args", [["--help"], ["schedule", "preview", "--help"]], ids=" ".join)
def test_python_dash_m_worker_is_the_console_script(args, tmp_path):
    assert CONSOLE_SCRIPT.exists(), CONSOLE_SCRIPT
    module = cli(*args, cwd=tmp_path)
    script = subprocess.run([str(CONSOLE_SCRIPT), *args], cwd=tmp_path, env=clean_env(),
                            capture_output=True, text=True, timeout=60)
    assert module.returncode == script.returncode == 0, module.stderr + script.stderr
    assert module.stdout == script.stdout
    assert module.stdout.startswith("usage: dms-worker")


# -- against a migrated SQLite database, no replica ----------------------------------------------------
def test_job_registers_a_row(sqlite_url, tmp_path):
    proc = cli("job", "CLI_JOB", "worker.jobs.builtin:sleep", "--timeout", "30", "--max-attempts", "3",
               "--allow-overlap", "--description", "from the CLI", "--database-url", sqlite_url, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    engine = sa.create_engine(sqlite_url)
    with engine.connect() as conn:
        (row,) = conn.execute(sa.select(s.job)).mappings().all()
    engine.dispose()
    assert dict(row) == dict(mapref="CLI_JOB", handler="worker.jobs.builtin:sleep", timeout_s=30, max_attempts=3,
                             retry_delay_s=60, allow_overlap="Y", enabled="Y", description="from the CLI", params=None,
                             paused="N")


def test_enqueue_with_param_prints_the_request_id(sqlite_url, tmp_path):
    # The URL from the environment this time (the flag is exercised everywhere else).
    proc = cli("enqueue", "MAPREF", "--param", "param1=X", cwd=tmp_path, env={"DMS_DATABASE_URL": sqlite_url})
    assert proc.returncode == 0, proc.stderr
    rid = one_line(proc.stdout)
    (row,) = prcreq_rows(sqlite_url)
    assert row["request_id"] == rid
    assert (row["mapref"], row["request_type"], row["status"]) == ("MAPREF", s.IMMEDIATE, s.NEW)
    assert json.loads(row["payload"]) == {"param1": "X"}


def test_enqueue_wait_says_when_the_request_was_deleted_while_waiting(sqlite_url, tmp_path):
    # No replica: the request waits NEW until a DBA deletes it; --wait must say so, not crash.
    proc = subprocess.Popen([sys.executable, "-m", "worker", "enqueue", "MAPREF", "--wait", "60",
                             "--database-url", sqlite_url], cwd=tmp_path, env=clean_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: prcreq_rows(sqlite_url), 30, "the request row")
        engine = sa.create_engine(sqlite_url)
        with engine.begin() as conn:
            conn.execute(sa.delete(s.prcreq))
        engine.dispose()
        out, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 1, err
    assert "Traceback" not in err
    assert one_line(err) == f"dms-worker: request {out.split()[0]} is gone (deleted while waiting)"


@pytest.mark.parametrize("args, words", [
    (["--payload", "[1]"], ["--payload", "JSON object"]),
    (["--payload", "{bad"], ["--payload", "JSON"]),
    (["--param", "no-equals-sign"], ["--param", "NAME=VALUE"]),
], ids=["array", "not-json", "param-without-equals"])
def test_enqueue_rejects_a_bad_payload_with_one_line(args, words, sqlite_url, tmp_path):
    proc = cli("enqueue", "MAPREF", *args, "--database-url", sqlite_url, cwd=tmp_path)
    assert proc.returncode != 0
    line = one_line(proc.stderr)
    assert "Traceback" not in proc.stderr
    for word in words:
        assert word in line
    assert proc.stdout == ""
    assert prcreq_rows(sqlite_url) == []


def test_run_on_an_unmigrated_database_says_run_migrate(tmp_path):
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    proc = cli("run", "--database-url", url, cwd=tmp_path, env={"DMS_METRICS_PORT": "0"}, timeout=30)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert any("dms-worker migrate" in line for line in proc.stderr.splitlines()), proc.stderr
    # It did not quietly create the schema either.
    engine = sa.create_engine(url)
    assert sa.inspect(engine).get_table_names() == []
    engine.dispose()


@pytest.mark.parametrize("command", [["status"], ["enqueue", "MAPREF"]], ids=" ".join)
def test_other_commands_on_an_unmigrated_database_say_run_migrate(command, tmp_path):
    proc = cli(*command, "--database-url", f"sqlite:///{tmp_path / 'empty.db'}", cwd=tmp_path)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-500:]
    assert "dms-worker migrate" in one_line(proc.stderr)


def test_status_never_prints_the_password(pg_url, tmp_path):
    url = sa.engine.make_url(pg_url).set(password="s3cret").render_as_string(hide_password=False)
    assert "s3cret" in url
    engine = sa.create_engine(pg_url)
    client.enqueue(engine, "MAPREF")
    engine.dispose()
    text = cli("status", "--database-url", url, cwd=tmp_path)
    as_json = cli("status", "--json", cwd=tmp_path, env={"DMS_DATABASE_URL": url})
    for proc in (text, as_json):
        assert proc.returncode == 0, proc.stderr        # trust auth: it connected with the password given
        assert "s3cret" not in proc.stdout + proc.stderr
    (database_line,) = [line for line in text.stdout.splitlines() if line.startswith("database:")]
    assert "***" in database_line and "127.0.0.1" in database_line
    status = json.loads(as_json.stdout)
    assert "***" in status["database"]
    assert {"status": "NEW", "request_type": "IMMEDIATE", "count": 1} in status["queue"]


def _seed_dead_cluster(url: str) -> None:
    """What the tables hold after every replica was killed: a lease that expired, replica rows
    that stopped heartbeating (one without V003's expires_at), an execution left IP, and NEW
    rows that wait for different reasons."""
    driver = make_driver(url)
    try:
        client.register_job(driver.engine, "EXCL", "worker.jobs.builtin:sleep")            # no overlap
        client.register_job(driver.engine, "OFF", "worker.jobs.builtin:noop", enabled=False)
        with driver.begin() as conn:
            conn.execute(sa.insert(s.worker).values(
                worker_id="h:1:dead", host="h", pid=1, started_at=driver.clock(-600), heartbeat_at=driver.clock(-166),
                expires_at=driver.clock(-158), is_leader="Y", slots=4, running=1))
            conn.execute(sa.insert(s.worker).values(
                worker_id="h:2:dead", host="h", pid=2, started_at=driver.clock(-600), heartbeat_at=driver.clock(-166),
                is_leader="N", slots=4, running=0))
            conn.execute(sa.insert(s.leader).values(name="scheduler", holder="h:1:dead", epoch=7,
                                                    acquired_at=driver.clock(-600), expires_at=driver.clock(-166)))
            conn.execute(sa.insert(s.prcreq).values(
                request_id="running-1", mapref="EXCL", request_type=s.IMMEDIATE, status=s.PROCESSING, attempts=1,
                claimed_by="h:1:dead", claimed_at=driver.clock(-300), not_before=driver.clock(-300),
                excl_key="EXCL"))
            conn.execute(sa.insert(s.prclog).values(mapref="EXCL", strtdt=driver.clock(-300), status=s.IN_PROGRESS,
                                                    request_id="running-1", worker_id="h:1:dead", attempt=1))
            for rid, mapref, due in (("behind-1", "EXCL", -60), ("behind-2", "EXCL", -60), ("off-1", "OFF", -60),
                                     ("later-1", "EXCL", 3600)):
                conn.execute(sa.insert(s.prcreq).values(request_id=rid, mapref=mapref, request_type=s.IMMEDIATE,
                                                        status=s.NEW, attempts=0, not_before=driver.clock(due)))
    finally:
        driver.dispose()


def test_status_after_every_replica_died_tells_the_truth(sqlite_url, tmp_path):
    _seed_dead_cluster(sqlite_url)
    proc = cli("status", "--database-url", sqlite_url, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    lead = next(line for line in out.splitlines() if line.startswith("leader:"))
    assert lead.startswith("leader: NONE") and "h:1:dead" in lead and "expired 166" in lead, lead
    assert "mode lease" in lead, "SQLite leads by the lease row"
    assert "renewed until -" not in out
    assert "replicas (0 alive, 2 dead):" in out
    for wid in ("h:1:dead", "h:2:dead"):
        line = next(line for line in out.splitlines() if wid in line and "host=" in line)
        assert "DEAD" in line and "leader" not in line and "follower" not in line, line
    running = next(line for line in out.splitlines() if "prcid=" in line)
    assert "ORPHANED" in running and "running-1" in running, running
    assert re.search(r"^\s+2\s+held back: an execution of the same job runs.*\[EXCL 2\]", out, re.M), out
    assert re.search(r"^\s+1\s+their job is disabled.*will fail.*\[OFF 1\]", out, re.M), out
    assert re.search(r"^\s+1\s+not due yet.*\[EXCL 1\]", out, re.M), out
    assert "no replica is alive: nothing claims them" in out
    assert re.search(r"database time: \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", out), out
    assert re.search(r"since \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", running), running

    status = json.loads(cli("status", "--json", "--database-url", sqlite_url, cwd=tmp_path).stdout)
    assert status["leader"] is None
    assert status["last_leader"]["holder"] == "h:1:dead" and status["last_leader"]["expires_in_s"] < -160
    assert status["leader_mode"] == "lease"
    assert [w["alive"] for w in status["workers"]] == [False, False]
    assert status["running"][0]["orphaned"] is True
    waiting = {(w["reason"], w["mapref"]): w["count"] for w in status["waiting"]}
    assert waiting == {("mapref_busy", "EXCL"): 2, ("disabled", "OFF"): 1, ("not_due", "EXCL"): 1}
    # Times carry their zone.
    assert status["now"].endswith("+00:00") and status["running"][0]["strtdt"].endswith("+00:00")


def test_status_says_a_paused_jobs_requests_wait_for_the_resume(sqlite_url, tmp_path):
    engine = sa.create_engine(sqlite_url)
    try:
        client.register_job(engine, "HOLD", "worker.jobs.builtin:noop")
        client.register_job(engine, "GO", "worker.jobs.builtin:noop")
        with engine.begin() as conn:
            client.pause_job(conn, "HOLD")
        for mapref in ("HOLD", "HOLD", "GO"):
            client.enqueue(engine, mapref)
    finally:
        engine.dispose()
    out = cli("status", "--database-url", sqlite_url, cwd=tmp_path).stdout
    assert re.search(r"^\s+2\s+their job is paused \(DMS_JOB.paused = 'Y'\): they wait until it is resumed\s+\[HOLD 2\]",
                     out, re.M), out
    assert re.search(r"^\s+1\s+ready: waiting for a free execution slot\s+\[GO 1\]", out, re.M), out
    status = json.loads(cli("status", "--json", "--database-url", sqlite_url, cwd=tmp_path).stdout)
    assert {(w["reason"], w["mapref"]): w["count"] for w in status["waiting"]} == {("paused", "HOLD"): 2,
                                                                                  ("ready", "GO"): 1}


def test_status_names_the_leader_mode(pg_url, tmp_path):
    driver = make_driver(pg_url)
    with driver.begin() as conn:
        conn.execute(sa.insert(s.worker).values(worker_id="h:1:live", host="h", pid=1, started_at=driver.clock(),
                                                heartbeat_at=driver.clock(), expires_at=driver.clock(8),
                                                is_leader="Y", slots=4, running=0))
        conn.execute(sa.insert(s.leader).values(name="scheduler", holder="h:1:live", epoch=3,
                                                acquired_at=driver.clock(), expires_at=driver.clock(10)))
    # The row does not say (mode NULL): PostgreSQL's default is the session lock.
    lead = next(line for line in cli("status", "--database-url", pg_url, cwd=tmp_path).stdout.splitlines()
                if line.startswith("leader:"))
    assert lead.startswith("leader: h:1:live (mode lock: session lock + lease row; epoch 3; lease valid"), lead
    # The configured mode when the row does not say ...
    lead = next(line for line in cli("status", "--database-url", pg_url, cwd=tmp_path,
                                     env={"DMS_LEADER_MODE": "lease"}).stdout.splitlines() if line.startswith("leader:"))
    assert "(mode lease: lease row;" in lead, lead
    # ... and what the leader recorded when it does.
    with driver.begin() as conn:
        conn.execute(sa.update(s.leader).values(mode="lease"))
    lead = next(line for line in cli("status", "--database-url", pg_url, cwd=tmp_path).stdout.splitlines()
                if line.startswith("leader:"))
    assert "(mode lease: lease row;" in lead, lead
    driver.dispose()


def test_status_shows_invalid_schedules(sqlite_url, tmp_path):
    driver = make_driver(sqlite_url)
    with driver.begin() as conn:
        conn.execute(sa.insert(s.jobsch).values(mapref="NOJOB", frqcd="DL", schflg="Y", curflg="Y", misfire="LATEST",
                                                invalid_reason="no DMS_JOB row for mapref 'NOJOB'"))
    driver.dispose()
    out = cli("status", "--database-url", sqlite_url, cwd=tmp_path).stdout
    assert "invalid schedules, skipped by the leader (1):" in out
    assert "jobschid=1 NOJOB: no DMS_JOB row for mapref 'NOJOB'" in out
    status = json.loads(cli("status", "--json", "--database-url", sqlite_url, cwd=tmp_path).stdout)
    assert status["invalid_schedules"][0]["invalid_reason"] == "no DMS_JOB row for mapref 'NOJOB'"


def test_unknown_variables_are_warned_about(sqlite_url, tmp_path):
    proc = cli("status", "--database-url", sqlite_url, cwd=tmp_path, env={"DMS_MAX_WORKERS": "8"})
    assert proc.returncode == 0, proc.stderr
    assert one_line(proc.stderr) == ("dms-worker: warning: unknown variable DMS_MAX_WORKERS is ignored; did you mean"
                                     " SCHEDULER_MAX_WORKERS? (the variables are listed in README.md)")


# -- with one real replica -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live(tmp_path_factory):
    """A migrated SQLite database with jobs registered and one replica running."""
    base = tmp_path_factory.mktemp("live")
    url = f"sqlite:///{base / 'live.db'}"
    driver = make_driver(url)
    migrate(driver)
    probe.create(driver.engine)
    client.register_job(driver.engine, "DEMO", "worker.jobs.builtin:noop")
    client.register_job(driver.engine, "CLI_SLEEP", "worker.jobs.builtin:sleep", timeout_s=300)
    replica = Replica(url, "cli0", base, SCHEDULER_POLL_INTERVAL="0.5").start()
    try:
        replica.wait_registered(driver.engine, timeout=30)
        yield url, driver, replica, base
    finally:
        replica.stop()
        driver.dispose()


def _queue_depth(driver) -> list[tuple[str, str, int]]:
    c = s.prcreq.c
    with driver.engine.connect() as conn:
        return sorted(tuple(r) for r in conn.execute(
            sa.select(c.status, c.request_type, sa.func.count()).group_by(c.status, c.request_type)))


def test_status_shows_queue_depth_and_the_live_replica(live):
    url, driver, replica, base = live
    # Rows the replica cannot touch: NEW but not due for an hour, and finished ones.
    with driver.begin() as conn:
        for i in range(3):
            conn.execute(sa.insert(s.prcreq).values(request_id=f"later-{i}", mapref="DEMO", request_type=s.IMMEDIATE,
                                                    status=s.NEW, attempts=0, not_before=driver.clock(3600)))
        for i in range(2):
            conn.execute(sa.insert(s.prcreq).values(
                request_id=f"failed-{i}", mapref="DEMO", request_type=s.HISTORY, status=s.FAILED, attempts=1,
                not_before=driver.clock(), completed_at=driver.clock(), result_payload='{"error": "bad date"}'))
    expected = _queue_depth(driver)
    assert ("NEW", "IMMEDIATE", 3) in expected and ("FAILED", "HISTORY", 2) in expected
    def leading_worker():
        with driver.engine.connect() as conn:
            row = conn.execute(sa.select(s.worker)).mappings().one()
        return row if row["is_leader"] == "Y" else None

    # The lone replica takes the lead soon after registering; wait for it so the
    # role cannot change between the two status calls below.
    worker = wait_until(leading_worker, 30, "the replica to lead")

    text = cli("status", "--database-url", url, cwd=base)
    as_json = cli("status", "--json", "--database-url", url, cwd=base)
    assert text.returncode == 0 and as_json.returncode == 0, text.stderr + as_json.stderr
    assert _queue_depth(driver) == expected, "the queue changed while status ran"

    status = json.loads(as_json.stdout)
    assert sorted((q["status"], q["request_type"], q["count"]) for q in status["queue"]) == expected
    (w,) = status["workers"]
    assert w["worker_id"] == worker["worker_id"] == replica.worker_id(driver.engine)
    assert (w["host"], w["pid"]) == (socket.gethostname(), replica.pid)
    assert 0 <= w["heartbeat_age_s"] < 10
    assert w["is_leader"] == "Y"
    assert {f["request_id"] for f in status["recent_failures"]} == {"failed-0", "failed-1"}

    out = text.stdout
    assert out.startswith(f"database: {url}")
    queue = out.split("\nqueue:\n", 1)[1].split("\n\n", 1)[0]
    assert sorted((st, t, int(n)) for st, t, n in (line.split() for line in queue.splitlines())) == expected
    (line,) = [ln for ln in out.splitlines() if worker["worker_id"] in ln and "host=" in ln]
    assert f"host={socket.gethostname()}" in line and f"pid={replica.pid}" in line
    assert re.search(r"\bleader\b", line)
    age = float(re.search(r"heartbeat (\d+(?:\.\d+)?)s ago", line).group(1))
    assert 0 <= age < 10


def test_enqueue_wait_on_a_noop_job_prints_done(live):
    url, driver, replica, base = live
    started = time.monotonic()
    proc = cli("enqueue", "DEMO", "--param", "param1=hello", "--wait", "30", "--database-url", url, cwd=base, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr + replica.log()[-2000:]
    rid, outcome = proc.stdout.strip().splitlines()
    assert outcome.split()[0] == "DONE"
    assert time.monotonic() - started < 30
    (row,) = prcreq_rows(url, s.prcreq.c.request_id == rid)
    assert row["status"] == s.DONE and row["claimed_by"] == replica.worker_id(driver.engine)


def test_stop_wait_cancels_a_running_sleep(live):
    url, driver, replica, base = live
    proc = cli("enqueue", "CLI_SLEEP", "--payload", '{"seconds": 60}', "--database-url", url, cwd=base)
    assert proc.returncode == 0, proc.stderr
    target = one_line(proc.stdout)
    wait_until(lambda: replica.alive_or_fail() and status_of(url, target) == s.PROCESSING,
               30, "the sleep job to be running")

    started = time.monotonic()
    proc = cli("stop", "--request-id", target, "--wait", "30", "--database-url", url, cwd=base, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr + replica.log()[-2000:]
    queued, ended = proc.stdout.strip().splitlines()
    # It says what it queued and what will happen, then what did.
    assert re.fullmatch(rf"STOP request \S+ queued: request {target} \(CLI_SLEEP\) is PROCESSING on \S+: it will be"
                        rf" stopped", queued), queued
    assert ended == f"request {target}: CANCELLED"
    wait_until(lambda: status_of(url, target) == s.CANCELLED, 30, "the target to end CANCELLED")
    assert time.monotonic() - started < 30, "stopped by the STOP, not by the 60 s sleep ending"
    (row,) = prcreq_rows(url, s.prcreq.c.request_id == target)
    assert "stopped" in json.loads(row["result_payload"])
    with driver.engine.connect() as conn:
        logs = conn.execute(sa.select(s.prclog.c.status).where(s.prclog.c.request_id == target)).scalars().all()
    assert logs == [s.STOPPED]


def _stop_rows(url: str) -> list:
    return prcreq_rows(url, s.prcreq.c.request_type == s.STOP)


def test_stop_of_a_request_that_already_ended_says_so_and_exits_1(live):
    url, driver, replica, base = live
    proc = cli("enqueue", "DEMO", "--wait", "30", "--database-url", url, cwd=base, timeout=60)
    done = proc.stdout.split()[0]
    assert status_of(url, done) == s.DONE, proc.stdout + proc.stderr
    before = len(_stop_rows(url))
    proc = cli("stop", "--request-id", done, "--database-url", url, cwd=base)
    assert proc.returncode == 1
    assert one_line(proc.stderr) == f"dms-worker: nothing to stop: request {done} already ended DONE"
    assert proc.stdout == ""
    assert len(_stop_rows(url)) == before, "no STOP row (it would only end FAILED in 'recent failures')"

    proc = cli("stop", "--request-id", "no-such-request", "--database-url", url, cwd=base)
    assert proc.returncode == 1 and "there is no request 'no-such-request'" in one_line(proc.stderr)
    assert len(_stop_rows(url)) == before


def test_stop_of_a_mapref_with_nothing_running_says_so_and_exits_1(live):
    url, driver, replica, base = live
    before = len(_stop_rows(url))
    proc = cli("stop", "--mapref", "CLI_SLEEP", "--database-url", url, cwd=base)
    assert proc.returncode == 1
    assert one_line(proc.stderr) == "dms-worker: nothing to stop: no execution of 'CLI_SLEEP' is running"
    assert len(_stop_rows(url)) == before


def test_stop_of_a_queued_request_says_it_will_be_cancelled(live):
    url, driver, replica, base = live
    with driver.begin() as conn:      # not due for an hour: it stays NEW
        conn.execute(sa.insert(s.prcreq).values(request_id="queued-later", mapref="DEMO", request_type=s.IMMEDIATE,
                                                status=s.NEW, attempts=0, not_before=driver.clock(3600)))
    proc = cli("stop", "--request-id", "queued-later", "--wait", "30", "--database-url", url, cwd=base, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    queued, ended = proc.stdout.strip().splitlines()
    assert queued.endswith("queued: request queued-later (DEMO) is NEW: it will be cancelled before it runs"), queued
    assert ended == "request queued-later: CANCELLED"


def test_enqueue_refresh_schedule_needs_no_mapref(sqlite_url, tmp_path):
    proc = cli("enqueue", "--type", "refresh_schedule", "--database-url", sqlite_url, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (row,) = prcreq_rows(sqlite_url)
    assert (row["request_id"], row["request_type"], row["mapref"]) == (one_line(proc.stdout), s.REFRESH_SCHEDULE,
                                                                      "REFRESH_SCHEDULE")
    # Every other type still needs one, and says so.
    proc = cli("enqueue", "--database-url", sqlite_url, cwd=tmp_path)
    assert proc.returncode != 0 and "MAPREF" in one_line(proc.stderr)


@pytest.mark.parametrize("unbuffered", ["", "1"], ids=["buffered", "PYTHONUNBUFFERED"])
def test_enqueue_wait_piped_into_head_stops_quietly(unbuffered, live):
    """`| head -1` takes the request id and goes away: no BrokenPipeError traceback, and the id
    arrives at once rather than when the wait is over."""
    url, driver, replica, base = live
    env = clean_env(DMS_DATABASE_URL=url, **({"PYTHONUNBUFFERED": unbuffered} if unbuffered else {}))
    started = time.monotonic()
    proc = subprocess.run(["bash", "-c", f"{sys.executable} -m worker enqueue CLI_SLEEP --payload '{{\"seconds\": 2}}'"
                                         f" --wait 30 2>err.txt | (head -1; echo \"at $SECONDS\" >&2);"
                                         " echo rc=${PIPESTATUS[0]}"],
                          cwd=base, env=env, capture_output=True, text=True, timeout=90)
    err = (base / "err.txt").read_text()
    assert "Traceback" not in err and "BrokenPipe" not in err, err
    rid, rc = proc.stdout.strip().splitlines()
    wait_until(lambda: status_of(url, rid) == s.DONE, 30, "the request to run")
    assert rc == f"rc={128 + 13}", "like a tool killed by SIGPIPE"
    assert int(proc.stderr.split("at ")[-1]) < 2, "head got the id before the 2 s job ended"
    assert time.monotonic() - started < 60


# -- help ------------------------------------------------------------------------------------------
def _all_subparsers():
    import argparse

    from worker.cli import build_parser
    found = {}

    def walk(parser, prefix):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    found[f"{prefix}{name}"] = sub
                    walk(sub, f"{prefix}{name} ")
    walk(build_parser(), "")
    return found


def test_every_option_of_every_command_has_help():
    import argparse
    missing = [f"{name} {'/'.join(a.option_strings) or a.dest}" for name, sub in _all_subparsers().items()
               for a in sub._actions if not a.help and a.help is not argparse.SUPPRESS]
    assert not missing, missing


@pytest.mark.parametrize("command, expected", [
    ("supervise", ["--replicas", "(default: 3)"]),
    ("demo", ["--replicas", "(default: 2)", "--requests", "(default: 30)"]),
    ("job", ["--max-attempts", "(default: 1)", "--allow-overlap", "one at a time"]),
    ("run", ["--metrics-port", "DMS_METRICS_PORT", "--max-workers"]),
], ids=lambda v: v if isinstance(v, str) else None)
def test_help_shows_defaults(command, expected, capsys):
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in expected:
        assert text in out, (text, out)


# -- the newcomer's command ----------------------------------------------------------------------------
def test_demo_from_nothing_to_a_working_system(tmp_path):
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    proc = cli("demo", "--database-url", url, "--replicas", "2", "--requests", "12", cwd=tmp_path, timeout=180)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr[-3000:]

    outcomes = ast.literal_eval(re.search(r"^DMS_PRCREQ outcomes: (\{.*\})$", out, re.M).group(1))
    assert outcomes.get("DONE", 0) >= 12 and set(outcomes) <= {"DONE", "FAILED"}
    per_replica = ast.literal_eval(re.search(r"executions per replica process: (\{.*\})$", out, re.M).group(1))
    assert len(per_replica) == 2 and all(n > 0 for n in per_replica.values()), per_replica
    assert {w.split(":")[0] for w in per_replica} == {"demo0", "demo1"}
    executions = int(re.search(r"^DMS_PRCLOG: (\d+) executions", out, re.M).group(1))
    assert executions == sum(per_replica.values()) and executions >= 12
    joblog = int(re.search(r"^DMS_JOBLOG: (\d+) rows", out, re.M).group(1))
    assert joblog == executions
    failed = [line for line in out.splitlines() if line.strip().startswith("FAILED")]
    assert any("unknown mapref" in line and "NO_SUCH_JOB" in line for line in failed), out
    assert any("2026-02-30" in line and "not an ISO date" in line for line in failed), out
    # The built-in CSV jobs: the import keeps its three bad rows, the export writes what loaded.
    assert re.search(r"DEMO_IMPORT DONE +DMS_JOBLOG src=6 trg=3 err=3", out), out
    assert re.search(r"DEMO_EXPORT DONE +DMS_JOBLOG src=3 trg=3", out), out
    assert sorted(re.findall(r"rejected key=(\d+): line (\d+)", out)) == [("1002", "6"), ("1003", "4"), ("1004", "5")]
    exported = next((tmp_path / "dms-demo-files").glob("employees_export_*.csv")).read_text().splitlines()
    assert exported[0] == "emp_no,full_name,hired_on" and len(exported) == 4

    # What it printed is what the database holds.
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(s.prclog)).scalar_one() == executions
        assert conn.execute(sa.select(sa.func.count()).select_from(s.prcreq).where(
            s.prcreq.c.status.notin_(s.TERMINAL_STATUSES))).scalar_one() == 0
        assert conn.execute(sa.select(sa.func.count()).select_from(s.worker)).scalar_one() == 0   # SIGTERM: gone
    engine.dispose()
