"""The worked examples of README.md and docs/jobs.md run as written, copy-pasted in order.

- Every ```sql block of both files, in document order, against one migrated PostgreSQL database
  (a mapref registered twice, a `SELECT ...` placeholder, a table the example never creates
  would fail here).
- Every complete ```python block (no `...` placeholder) in a directory where `dms-worker migrate`
  created the default SQLite database, as a user following the README would run it.
- README step 3: the handler it writes, registered as it says, run by a real replica with the
  PYTHONPATH it says, with the result it says.
"""
from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.support import REPO, Replica, wait_until
from tests.test_cli import clean_env
from worker import schema as s

DOCS = [REPO / "README.md", REPO / "docs" / "jobs.md"]


def blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", path.read_text(), re.M | re.S)


@pytest.fixture
def own_pg_database(pg_database_url):
    """A migrated PostgreSQL database of this test's own: the examples create tables (sales,
    sales_mart) and a procedure that must not leak into the session's shared test database."""
    from worker.drivers import make_driver
    from worker.migrate import migrate
    admin = sa.create_engine(sa.engine.make_url(pg_database_url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    name = f"dms_docs_{os.getpid()}_{secrets.token_hex(3)}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.engine.make_url(pg_database_url).set(database=name).render_as_string(hide_password=False)
    try:
        driver = make_driver(url)
        migrate(driver)
        driver.dispose()
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def test_every_sql_example_runs_in_order_on_postgresql(own_pg_database):
    import psycopg
    libpq = sa.engine.make_url(own_pg_database).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(libpq, autocommit=True) as conn:
        ran = 0
        for path in DOCS:
            for sql in blocks(path, "sql"):
                try:
                    conn.execute(sql)
                except psycopg.Error as exc:
                    pytest.fail(f"{path.name}: {exc}\n{sql}")
                ran += 1
        assert ran >= 10
        # What the examples built is what they say: the procedure ran nowhere yet, the
        # schedule edit left one current version, and no job was registered twice.
        current = conn.execute("SELECT frqhh, frqmi FROM dms_jobsch WHERE mapref = 'EMPLOYEE_IMPORT'"
                               " AND curflg = 'Y'").fetchall()
        assert current == [(2, 30)]


def test_every_python_example_runs_in_a_fresh_directory(tmp_path):
    migrated = subprocess.run([sys.executable, "-m", "worker", "migrate"], cwd=tmp_path, env=clean_env(),
                              capture_output=True, text=True, timeout=60)
    assert migrated.returncode == 0, migrated.stderr
    ran = []
    for path in DOCS:
        for code in blocks(path, "python"):
            if re.search(r"^\s*\.\.\.\s*$", code, re.M):
                continue        # a fragment (the embedding sketch), not a runnable example
            proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=clean_env(),
                                  capture_output=True, text=True, timeout=60)
            assert proc.returncode == 0, f"{path.name}:\n{code}\n{proc.stderr}"
            ran.append(code)
    assert len(ran) >= 3
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'dms-worker.db'}")
    with engine.connect() as conn:
        requests = conn.execute(sa.select(s.prcreq.c.mapref, s.prcreq.c.request_type, s.prcreq.c.status)).all()
        uploads = conn.execute(sa.text("SELECT path, request_id FROM app_upload")).all()
    engine.dispose()
    assert {("HELLO", "IMMEDIATE", "NEW"), ("HELLO", "STOP", "NEW")} <= set(requests)   # no replica runs here
    assert ("HELLO", "HISTORY", "NEW") in requests
    assert ("REFRESH_SCHEDULE", "REFRESH_SCHEDULE", "NEW") in requests
    # The ORM example: the upload row and its request committed together.
    ((path, rid),) = uploads
    assert path == "/data/in/employees.csv" and rid
    assert ("EMPLOYEE_IMPORT", "IMMEDIATE", "NEW") in requests


def test_readme_step_3_handler_runs_as_written(tmp_path):
    readme = REPO / "README.md"
    (write,) = [b for b in blocks(readme, "bash") if "hello.py" in b]
    (register,) = [b for b in blocks(readme, "bash") if b.startswith("dms-worker job HELLO")]
    bin_dir = str(Path(sys.executable).parent)
    env = clean_env(PATH=f"{bin_dir}:{clean_env().get('PATH', '')}")
    for step in ("dms-worker migrate", write + "\necho PYTHONPATH=$PYTHONPATH > pythonpath.txt", register):
        proc = subprocess.run(["bash", "-ec", step], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, step + proc.stdout + proc.stderr
    pythonpath = (tmp_path / "pythonpath.txt").read_text().strip().split("=", 1)[1]
    assert pythonpath == str(tmp_path / "dms-jobs")
    url = f"sqlite:///{tmp_path / 'dms-worker.db'}"
    replica = Replica(url, "docs0", tmp_path, PYTHONPATH=pythonpath)
    replica.proc = subprocess.Popen([str(Path(bin_dir) / "dms-worker"), "run", "--name", "docs0"], cwd=tmp_path,
                                    env={**replica.env, "PYTHONPATH": pythonpath},
                                    stdout=open(replica.log_path, "ab"), stderr=subprocess.STDOUT)
    replica._log = open(replica.log_path, "ab")
    try:
        proc = subprocess.run([str(Path(bin_dir) / "dms-worker"), "enqueue", "HELLO", "--param", "param1=docs",
                               "--wait", "60"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90)
        assert proc.returncode == 0, proc.stdout + proc.stderr + replica.log()[-3000:]
        rid, outcome = proc.stdout.strip().splitlines()
        assert outcome.startswith("DONE")
        wait_until(lambda: "hello, docs" in replica.log(), 10, "the handler's log line")
    finally:
        replica.stop()
    engine = sa.create_engine(url)
    with engine.connect() as conn:
        payload = conn.execute(sa.select(s.prcreq.c.result_payload).where(s.prcreq.c.request_id == rid)).scalar()
        joblog = conn.execute(sa.select(s.joblog.c.srcrows, s.joblog.c.trgrows)).all()
    engine.dispose()
    assert "greeted" in payload and "docs" in payload, payload
    assert json.loads(payload)
    assert joblog == [(1, 1)]
