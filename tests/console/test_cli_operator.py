"""The operator's CLI: `requests list/show/retry/cancel/stop`, `schedule list/enable/disable`,
`job set/pause/resume`, and `console` itself (serving, refusing, hashing a password).
Real `python -m worker` processes against a migrated SQLite database.
"""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.test_cli import cli
from worker import client
from worker import schema as s
from worker.console.auth import load_users


@pytest.fixture
def db(sqlite_url):
    engine = sa.create_engine(sqlite_url)
    yield sqlite_url, engine
    engine.dispose()


def run(db_url: str, tmp_path: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return cli(*args, cwd=tmp_path, env={"DMS_DATABASE_URL": db_url, **(env or {})})


def job_row(engine, mapref):
    with engine.connect() as conn:
        return dict(conn.execute(sa.select(s.job).where(s.job.c.mapref == mapref)).mappings().one())


def test_job_changes_only_the_fields_given_and_takes_params(db, tmp_path):
    url, engine = db
    proc = run(url, tmp_path, "job", "EXPORT", "worker.jobs.csv:export", "--max-attempts", "3",
               "--params", '{"query": "SELECT 1", "path": "out.csv"}')
    assert proc.returncode == 0, proc.stderr
    assert "created" in proc.stdout and proc.stderr == ""
    proc = run(url, tmp_path, "job", "EXPORT", "--timeout", "7200")           # issue 14, item 1
    assert proc.returncode == 0, proc.stderr
    row = job_row(engine, "EXPORT")
    assert (row["timeout_s"], row["max_attempts"], json.loads(row["params"])) == (
        7200, 3, {"query": "SELECT 1", "path": "out.csv"})
    run(url, tmp_path, "job", "set", "EXPORT", "--params", "null", "--allow-overlap", "--disabled")
    row = job_row(engine, "EXPORT")
    assert (row["params"], row["allow_overlap"], row["enabled"], row["timeout_s"]) == (None, "Y", "N", 7200)
    for args, words in ((["NEWJOB", "--timeout", "5"], "give a handler to create it"),
                        (["EXPORT", "--params", "{not json"], "--params is not valid JSON"),
                        (["EXPORT", "--params", "[1]"], "--params must be a JSON object")):
        proc = run(url, tmp_path, "job", *args)
        assert proc.returncode != 0 and words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_job_warns_when_the_handler_cannot_be_imported(db, tmp_path):
    url, engine = db
    proc = run(url, tmp_path, "job", "TYPO", "worker.jobs.builtin:nooop")
    assert proc.returncode == 0                                   # registered all the same: the replicas may differ
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("warning: handler worker.jobs.builtin:nooop cannot be imported here")
    assert "no callable 'nooop'" in line and "PYTHONPATH" in line
    assert job_row(engine, "TYPO")["handler"] == "worker.jobs.builtin:nooop"
    assert run(url, tmp_path, "job", "FINE", "worker.jobs.builtin:noop").stderr == ""


def test_job_pause_and_resume(db, tmp_path):
    url, engine = db
    run(url, tmp_path, "job", "P", "worker.jobs.builtin:noop")
    assert run(url, tmp_path, "job", "pause", "P").returncode == 0
    assert job_row(engine, "P")["paused"] == "Y"
    assert run(url, tmp_path, "job", "resume", "P").returncode == 0
    assert job_row(engine, "P")["paused"] == "N"
    proc = run(url, tmp_path, "job", "pause", "NOPE")
    assert proc.returncode == 1 and proc.stderr.strip() == "dms-worker: no job 'NOPE'"


def test_requests_list_show_retry_cancel(db, tmp_path):
    url, engine = db
    failed = client.enqueue(engine, "CLI_R", param1="<x>")
    waiting = client.enqueue(engine, "CLI_R", priority=4)
    with engine.begin() as conn:
        conn.execute(sa.update(s.prcreq).where(s.prcreq.c.request_id == failed).values(
            status=s.FAILED, result_payload='{"error": "boom"}'))
    listed = run(url, tmp_path, "requests", "list", "--status", "FAILED")
    assert listed.returncode == 0 and failed in listed.stdout and waiting not in listed.stdout
    as_json = json.loads(run(url, tmp_path, "requests", "list", "--json").stdout)
    assert [r["request_id"] for r in as_json["requests"]] == [waiting, failed]
    shown = run(url, tmp_path, "requests", "show", failed)
    assert re.search(r"^status\s+FAILED$", shown.stdout, re.M) and '{"error": "boom"}' in shown.stdout
    assert run(url, tmp_path, "requests", "retry", failed).returncode == 0
    assert client.request_status(engine, failed)["status"] == s.NEW
    assert "cli " in json.loads(client.request_status(engine, failed)["result_payload"])["retried"]["by"]
    assert run(url, tmp_path, "requests", "cancel", waiting).returncode == 0
    assert client.request_status(engine, waiting)["status"] == s.CANCELLED
    refused = run(url, tmp_path, "requests", "cancel", waiting)
    assert refused.returncode == 1
    assert refused.stderr.strip() == f"dms-worker: request {waiting} has already ended (CANCELLED): nothing to cancel"
    stop = run(url, tmp_path, "requests", "stop", failed)
    assert stop.returncode == 1 and "cancel it instead" in stop.stderr
    bad = run(url, tmp_path, "requests", "list", "--since", "last week")
    assert bad.returncode == 2 and "since 'last week' is not an ISO date" in bad.stderr


def test_requests_list_pages_with_the_printed_cursor(db, tmp_path):
    url, engine = db
    ids = [client.enqueue(engine, "PAGED") for _ in range(5)]
    first = run(url, tmp_path, "requests", "list", "--limit", "3")
    cursor = re.search(r"^more: --cursor '(.+)'$", first.stdout, re.M).group(1)
    second = run(url, tmp_path, "requests", "list", "--limit", "3", "--cursor", cursor)
    seen = re.findall(r"^(\S{36}) ", first.stdout + second.stdout, re.M)
    assert sorted(seen) == sorted(ids) and "more:" not in second.stdout


def test_schedule_list_in_local_time_and_enable_disable(db, tmp_path):
    url, engine = db
    with engine.begin() as conn:
        jobschid = conn.execute(sa.insert(s.jobsch).values(
            mapref="NIGHTLY", frqcd="WK", frqdd="MON", frqhh=2, frqmi=30, schflg="Y", curflg="Y", misfire="LATEST")
            .returning(s.jobsch.c.jobschid)).scalar_one()
    proc = run(url, tmp_path, "schedule", "list", env={"SCHEDULER_TIMEZONE": "America/New_York"})
    assert proc.returncode == 0, proc.stderr
    assert "times in America/New_York" in proc.stdout and "every Monday at 02:30" in proc.stdout
    nexts = re.search(r"next: (.+)$", proc.stdout, re.M).group(1).split(", ")
    assert len(nexts) == 5 and all(re.fullmatch(r"\d{4}-\d\d-\d\d 02:30:00-0[45]:00", t) for t in nexts), nexts
    assert run(url, tmp_path, "schedule", "disable", str(jobschid)).returncode == 0
    assert "disabled" in run(url, tmp_path, "schedule", "list").stdout
    assert run(url, tmp_path, "schedule", "enable", str(jobschid)).returncode == 0
    with engine.connect() as conn:
        assert conn.execute(sa.select(s.jobsch.c.schflg)).scalar_one() == "Y"
    missing = run(url, tmp_path, "schedule", "enable", "999")
    assert missing.returncode == 1 and "no current schedule 999" in missing.stderr


def test_enqueue_with_priority_and_a_unique_key(db, tmp_path):
    url, engine = db
    first = run(url, tmp_path, "enqueue", "U", "--unique-key", "click", "--priority", "9").stdout.strip()
    assert run(url, tmp_path, "enqueue", "U", "--unique-key", "click").stdout.strip() == first
    refused = run(url, tmp_path, "enqueue", "U", "--unique-key", "click", "--refuse-duplicate")
    assert refused.returncode == 1 and f"held by request {first}" in refused.stderr
    assert client.request_status(engine, first)["priority"] == 9


def test_console_serves_on_a_free_port_and_exits_0_on_sigterm(db, tmp_path):
    url, _ = db
    proc = subprocess.Popen([sys.executable, "-m", "worker", "console", "--port", "0"], cwd=tmp_path,
                            env={"PATH": "/usr/bin:/bin", "DMS_DATABASE_URL": url}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        base = re.search(r"(http://127\.0\.0\.1:\d+/)", line).group(1)
        with urllib.request.urlopen(base + "requests?format=json", timeout=10) as response:
            assert json.load(response)["requests"] == []
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, proc.stderr.read()


def test_console_hash_password_reads_stdin_and_the_hash_logs_in(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "worker", "console", "--hash-password"], input="s3cret-pass\n",
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    hashed = proc.stdout.strip()
    assert "s3cret-pass" not in hashed
    users = tmp_path / "users"
    users.write_text(f"ann operator {hashed}\n")
    assert load_users(users)["ann"].password_hash == hashed
    short = subprocess.run([sys.executable, "-m", "worker", "console", "--hash-password"], input="short\n",
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert short.returncode == 1 and "at least 8 characters" in short.stderr


@pytest.mark.parametrize("command", ["console", "requests", "requests list", "requests show", "requests retry",
                                     "requests cancel", "requests stop", "job", "job set", "job pause",
                                     "job resume", "schedule list", "schedule enable", "schedule disable"])
def test_help_for_every_operator_command(command, capsys):
    from worker.cli import main
    with pytest.raises(SystemExit) as exit_:
        main([*command.split(), "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: dms-worker {command}")
