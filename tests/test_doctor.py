"""``dms-worker doctor`` on SQLite and PostgreSQL (Oracle: tests/drivers/test_oracle_doctor.py).

The PostgreSQL tests create a login role with a unique name for the test's own database and
drop it afterwards (roles are cluster-wide: never the shared name ``dms_worker``).
"""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.support import REPO
from worker import client
from worker.config import Config
from worker.doctor import FAIL, INFO, OK, run_checks


def doctor(url: str, cwd: Path, *extra: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("DMS_", "DB_", "SCHEDULER_", "SCHEMA"))}
    environ.update(PYTHONPATH=str(REPO), **env)
    return subprocess.run([sys.executable, "-m", "worker", "doctor", "--database-url", url, *extra], cwd=cwd,
                          env=environ, capture_output=True, text=True, timeout=120)


def by_name(checks):
    return {c.name: c for c in checks}


def test_a_fresh_sqlite_directory_fails_with_the_one_step_that_fixes_it(tmp_path):
    url = f"sqlite:///{tmp_path / 'none.db'}"
    proc = doctor(url, tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL  connect" in proc.stdout and "fix: run `dms-worker migrate` here" in proc.stdout
    assert not (tmp_path / "none.db").exists(), "doctor creates nothing"


def test_a_migrated_sqlite_database_passes_and_json_says_the_same(sqlite_url, tmp_path):
    proc = doctor(sqlite_url, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Everything a replica needs is in place." in proc.stdout
    for line in ("OK    migrations", "OK    V003 columns", "OK    privileges", "OK    leader lock"):
        assert line in proc.stdout, proc.stdout
    assert "dms_worker.expires_at, dms_leader.mode, dms_jobsch.invalid_reason, dms_job.paused, dms_prcreq.priority, " \
           "dms_prcreq.unique_key" in proc.stdout
    report = json.loads(doctor(sqlite_url, tmp_path, "--json").stdout)
    assert {c["status"] for c in report["checks"]} <= {OK, INFO}


def test_a_half_applied_schema_names_the_missing_v003_columns(sqlite_url):
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE dms_worker DROP COLUMN expires_at")
        conn.exec_driver_sql("DELETE FROM dms_schema_version WHERE version = 3")
    engine.dispose()
    checks = by_name(run_checks(Config(database_url=sqlite_url)))
    assert checks["migrations"].status == FAIL and "pending V003" in checks["migrations"].found
    assert checks["V003 columns"].status == FAIL
    assert checks["V003 columns"].found == "missing or not readable: dms_worker.expires_at"


def test_file_jobs_without_roots_fail_and_roots_must_exist(sqlite_url, tmp_path):
    engine = sa.create_engine(sqlite_url)
    client.register_job(engine, "NIGHTLY_IMPORT", "worker.jobs.csv:load", params={"path": "/data/in/x.csv", "table": "t"})
    engine.dispose()
    check = by_name(run_checks(Config(database_url=sqlite_url)))["file jobs"]
    assert check.status == FAIL and "NIGHTLY_IMPORT" in check.found and "DMS_FILE_ROOTS is not set" in check.found
    assert "DMS_FILE_ROOTS=/data/in" in check.fix
    check = by_name(run_checks(Config(database_url=sqlite_url, file_roots=(str(tmp_path / "missing"),))))["file jobs"]
    assert check.status == FAIL and "missing or not writable" in check.found
    check = by_name(run_checks(Config(database_url=sqlite_url, file_roots=(str(tmp_path),))))["file jobs"]
    assert check.status == OK


# -- PostgreSQL: the runtime role ------------------------------------------------------------------
@pytest.fixture
def runtime_role(pg_url):
    """A login role on the test database, granted what sql/roles/postgresql.sql grants, minus
    what a test takes away; dropped afterwards."""
    name = f"dms_doctor_{secrets.token_hex(4)}"
    admin = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        database = conn.exec_driver_sql("SELECT current_database()").scalar()
        conn.exec_driver_sql(f"CREATE ROLE {name} LOGIN")
        conn.exec_driver_sql(f'GRANT CONNECT ON DATABASE "{database}" TO {name}')
        conn.exec_driver_sql(f"GRANT USAGE ON SCHEMA public TO {name}")
        conn.exec_driver_sql(f"GRANT SELECT, INSERT, UPDATE, DELETE ON dms_prcreq, dms_worker, dms_leader, dms_job_state TO {name}")
        conn.exec_driver_sql(f"GRANT SELECT, INSERT, UPDATE ON dms_prclog, dms_joblog, dms_joberr TO {name}")
        conn.exec_driver_sql(f"GRANT SELECT, UPDATE (lst_run_dt, nxt_run_dt, invalid_reason) ON dms_jobsch TO {name}")
        conn.exec_driver_sql(f"GRANT SELECT ON dms_job, dms_schema_version TO {name}")
        conn.exec_driver_sql(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {name}")
    url = sa.engine.make_url(pg_url).set(username=name, password=None).render_as_string(hide_password=False)

    def revoke(sql: str) -> None:
        with admin.connect() as conn:
            conn.exec_driver_sql(sql.format(role=name))

    yield name, url, revoke
    with admin.connect() as conn:
        conn.exec_driver_sql(f"DROP OWNED BY {name}")
        conn.exec_driver_sql(f"DROP ROLE {name}")
    admin.dispose()


def test_the_least_privilege_role_passes(runtime_role, tmp_path):
    name, url, _ = runtime_role
    proc = doctor(url, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"OK    privileges     {name}: the DML a replica needs on all 10 tables" in proc.stdout
    assert "OK    leader lock" in proc.stdout and "OK    wake-up" in proc.stdout


def test_a_missing_grant_fails_with_the_grant_that_fixes_it(runtime_role, tmp_path):
    name, url, revoke = runtime_role
    revoke("REVOKE UPDATE ON dms_worker FROM {role}")
    revoke("REVOKE UPDATE (invalid_reason) ON dms_jobsch FROM {role}")
    proc = doctor(url, tmp_path)
    assert proc.returncode == 1, proc.stdout
    lines = proc.stdout.splitlines()
    worker = next(i for i, line in enumerate(lines) if "FAIL  privileges dms_worker" in line)
    assert "UPDATE refused: permission denied for table dms_worker" in lines[worker]
    assert lines[worker + 1].strip() == (f"fix: as the owner of the tables: GRANT UPDATE ON dms_worker TO {name} "
                                         "-- sql/roles/postgresql.sql grants them all")
    jobsch = next(i for i, line in enumerate(lines) if "FAIL  privileges dms_jobsch" in line)
    assert f"GRANT UPDATE (lst_run_dt, nxt_run_dt, invalid_reason) ON dms_jobsch TO {name}" in lines[jobsch + 1]
    assert "privileges dms_prcreq" not in proc.stdout, "only what is missing is listed"


def test_an_unreachable_database_fails_at_connect_without_printing_the_password(tmp_path):
    url = "postgresql+psycopg://dms:s3cret-pw@127.0.0.1:1/dms"
    proc = doctor(url, tmp_path)
    assert proc.returncode == 1
    assert "FAIL  connect" in proc.stdout and "check DMS_DATABASE_URL" in proc.stdout
    assert "s3cret-pw" not in proc.stdout + proc.stderr
