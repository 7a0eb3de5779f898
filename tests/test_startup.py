"""`dms-worker run` from its first instant to its first heartbeat: signals, refusals, settings.

Real processes throughout. A replica stopped while it starts or waits for the database exits
0 like one stopped later (supervisors read anything else as a crash); a database that refuses
the login or does not exist is said once and ends start-up with a non-zero code, instead of
being retried for ever as if it were down; settings that cannot work are one line each.
"""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.support import REPO, wait_until
from tests.test_cli import clean_env
from worker.drivers import make_driver


def start(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "worker", "run", *args], cwd=cwd,
                            env=clean_env(DMS_METRICS_PORT="0", PYTHONPATH=str(REPO), **env),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, timeout: float = 30) -> tuple[int, str]:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"still running after {timeout}s:\n{out[-3000:]}") from None
    return proc.returncode, out


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def maps(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return ""


# -- SIGTERM before the replica runs -------------------------------------------------------------
def test_sigterm_in_the_first_moments_of_start_up_exits_0(sqlite_url, tmp_path):
    """The signal lands while the command is still importing its libraries (SQLAlchemy's
    compiled modules are being mapped), long before the replica's own handler exists."""
    proc = start("--database-url", sqlite_url, cwd=tmp_path, env={})
    wait_until(lambda: "sqlalchemy/" in maps(proc.pid) or proc.poll() is not None, 10,
               "the process to be importing SQLAlchemy", interval=0.001)
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc)
    assert code == 0, out
    assert "Traceback" not in out


def test_sigterm_while_waiting_for_the_database_exits_0(tmp_path):
    url = f"postgresql+psycopg://postgres@127.0.0.1:{closed_port()}/postgres"
    proc = start("--database-url", url, cwd=tmp_path, env={})
    lines: list[str] = []

    def waiting() -> bool:
        lines.append(proc.stdout.readline())
        return "database unreachable" in lines[-1] or proc.poll() is not None
    wait_until(waiting, 30, "the replica to wait for the database")
    assert proc.poll() is None, "".join(lines)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc)
    assert code == 0, "".join(lines) + out
    assert time.monotonic() - started < 5, "not after the back-off"
    assert "SIGTERM during start-up" in out and "Traceback" not in out


# -- refusals that waiting cannot fix ---------------------------------------------------------------
@pytest.mark.parametrize("what, change", [
    ("database", {"database": "dms_no_such_database"}),
    ("role", {"username": "dms_no_such_role"}),
])
def test_an_unknown_database_or_role_is_said_once_and_ends_start_up(what, change, pg_url, tmp_path):
    url = sa.engine.make_url(pg_url).set(**change).render_as_string(hide_password=False)
    proc = start("--database-url", url, cwd=tmp_path, env={})
    code, out = finish(proc, timeout=60)
    assert code == 1, out
    assert "retrying" not in out and "Traceback" not in out, out
    mentions = [line for line in out.splitlines() if f'{what} "dms_no_such_' in line]
    assert len(mentions) == 1, out
    assert mentions[0].startswith("dms-worker: database error:") and "does not exist" in mentions[0]


def test_a_sqlite_file_in_a_missing_directory_ends_start_up(tmp_path):
    proc = start("--database-url", f"sqlite:///{tmp_path}/missing/dms.db", cwd=tmp_path, env={})
    code, out = finish(proc)
    assert code == 1 and "unable to open database file" in out and "Traceback" not in out, out


class _FakePgError(Exception):
    def __init__(self, message: str, sqlstate: str | None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


@pytest.mark.parametrize("message, sqlstate, transient", [
    # The server's refusals at connect time reach psycopg without a SQLSTATE: by message.
    ('connection failed: connection to server at "db", port 5432 failed: FATAL:  password authentication failed'
     ' for user "dms"', None, False),
    ('FATAL:  database "dms" does not exist', None, False),
    ('FATAL:  role "dms" does not exist', None, False),
    ('FATAL:  no pg_hba.conf entry for host "10.0.0.5", user "dms", database "dms"', None, False),
    ("fe_sendauth: no password supplied", None, False),
    ("password authentication failed", "28P01", False),
    ("invalid authorization", "28000", False),
    ("no such database", "3D000", False),
    # Outages stay transient.
    ('connection to server at "db", port 5432 failed: Connection refused', None, True),
    ("FATAL:  the database system is starting up", None, True),
    ("terminating connection due to administrator command", "57P01", True),
])
def test_postgresql_refusals_are_not_transient(message, sqlstate, transient):
    import psycopg
    driver = make_driver("postgresql+psycopg://u@127.0.0.1:1/x")
    try:
        orig = type("E", (psycopg.OperationalError,), {"sqlstate": sqlstate})(message)
        exc = sa.exc.OperationalError("SELECT 1", {}, orig)
        assert driver.is_transient(exc) is transient
    finally:
        driver.dispose()


@pytest.mark.parametrize("code, transient", [
    ("ORA-01017", False),    # invalid username/password
    ("ORA-01045", False),    # no CREATE SESSION
    ("ORA-28000", False),    # account locked
    ("ORA-28001", False),    # password expired
    ("ORA-03113", True),     # end-of-file on communication channel: an outage
    ("ORA-12541", True),     # no listener
])
def test_oracle_refusals_are_not_transient(code, transient):
    import oracledb
    driver = make_driver("oracle+oracledb://dms:pw@db.example:1521/?service_name=FREEPDB1")
    try:
        orig = oracledb.DatabaseError(type("E", (), {"full_code": code, "isrecoverable": False})())
        assert driver.is_transient(sa.exc.OperationalError("SELECT 1", {}, orig)) is transient
    finally:
        driver.dispose()


# -- settings ------------------------------------------------------------------------------------
def test_a_log_file_in_a_missing_directory_is_one_line(sqlite_url, tmp_path):
    proc = start("--database-url", sqlite_url, cwd=tmp_path, env={"DMS_LOG_FILE": str(tmp_path / "no" / "dms.log")})
    code, out = finish(proc)
    assert code == 2, out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out, out
    assert lines[0].startswith("dms-worker: configuration error: DMS_LOG_FILE=")
    assert f"directory {tmp_path / 'no'} does not exist" in lines[0]


def test_run_metrics_port_flag_and_unknown_variable_warning(sqlite_url, tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    proc = start("--database-url", sqlite_url, "--metrics-port", str(port), cwd=tmp_path,
                 env={"DMS_MAX_WORKERS": "8"})

    def healthy() -> bool:
        if proc.poll() is not None:
            return True
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as resp:
                return resp.status == 200
        except OSError:
            return False
    try:
        wait_until(healthy, 30, "/healthz on the --metrics-port")
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        code, out = finish(proc)
    assert code == 0, out
    warning = [line for line in out.splitlines() if "DMS_MAX_WORKERS" in line]
    assert len(warning) == 1 and "WARNING" in warning[0] and "did you mean SCHEDULER_MAX_WORKERS?" in warning[0], out


def test_a_password_in_the_url_query_never_shows(pg_url, tmp_path):
    """psycopg takes `?password=`; the start-up line, `status` and `migrate` printed it."""
    url = pg_url + ("&" if "?" in pg_url else "?") + "password=s3cr3t-in-query"
    proc = start("--database-url", url, cwd=tmp_path, env={})
    lines: list[str] = []

    def started() -> bool:
        lines.append(proc.stdout.readline())
        return " started: " in lines[-1] or proc.poll() is not None
    try:
        wait_until(started, 30, "the start-up line")
    finally:
        proc.send_signal(signal.SIGTERM)
        code, out = finish(proc)
    text = "".join(lines) + out
    assert code == 0, text
    assert "password=***" in "".join(lines)
    for command in (["status"], ["status", "--json"], ["migrate"]):
        done = subprocess.run([sys.executable, "-m", "worker", *command, "--database-url", url], cwd=tmp_path,
                              env=clean_env(), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        text += done.stdout + done.stderr
        assert "password=***" in done.stdout, command
    assert "s3cr3t-in-query" not in text


def test_a_password_with_an_unencoded_at_is_refused_without_its_tail(tmp_path):
    """`user:p@ss-tail@host`: SQLAlchemy takes `ss-tail@host` for the host, which the
    connection error then printed; now nothing is tried and nothing of it is shown."""
    url = "postgresql+psycopg://postgres:p@ss-tail@127.0.0.1:5432/postgres"
    for command in (["status"], ["migrate"], ["run"]):
        proc = subprocess.run([sys.executable, "-m", "worker", *command, "--database-url", url], cwd=tmp_path,
                              env=clean_env(DMS_METRICS_PORT="0"), capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, proc.stdout + proc.stderr
        (line,) = proc.stderr.strip().splitlines()
        assert line.startswith("dms-worker: configuration error: DMS_DATABASE_URL:") and "%40" in line
        assert "ss-tail" not in proc.stdout + proc.stderr and "p@ss" not in proc.stdout + proc.stderr
