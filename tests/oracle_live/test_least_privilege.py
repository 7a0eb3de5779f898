"""The least-privilege runtime user with SCHEMA (issue 12, items 2 and 3), and doctor, on a real
Oracle: migrate as the owner, run as the runtime user."""
from __future__ import annotations

import os
import subprocess
import sys

import sqlalchemy as sa

from tests.oracle_live.conftest import FAST
from tests.support import REPO, Replica, wait_until
from worker import client
from worker import schema as s


def doctor(url: str, cwd, **env) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("DMS_", "DB_", "SCHEDULER_", "SCHEMA"))}
    environ.update(PYTHONPATH=str(REPO), DMS_DATABASE_URL=url, **env)
    return subprocess.run([sys.executable, "-m", "worker", "doctor"], cwd=cwd, env=environ, capture_output=True,
                          text=True, timeout=120)


def test_doctor_passes_for_the_owner(oracle_url, tmp_path):
    proc = doctor(oracle_url, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "OK    leader lock" in proc.stdout


def test_doctor_passes_for_the_runtime_user_with_schema(runtime_url, owner_schema, tmp_path):
    proc = doctor(runtime_url, tmp_path, SCHEMA=owner_schema)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"tables in schema {owner_schema}" in proc.stdout


def test_a_replica_runs_as_the_runtime_user_and_leads_with_dbms_lock(runtime_url, owner_schema, owner_engine, tmp_path):
    client.register_job(owner_engine, "LIVE_NOOP", "worker.jobs.builtin:noop")
    replica = Replica(runtime_url, "live-runtime", tmp_path, SCHEMA=owner_schema, **FAST).start()
    try:
        worker_id = replica.wait_registered(owner_engine, timeout=60)
        rid = client.enqueue(owner_engine, "LIVE_NOOP", param1="x")
        wait_until(lambda: client.request_status(owner_engine, rid)["status"] == s.DONE, 60, "the request to run")
        with owner_engine.connect() as conn:
            holder = conn.execute(sa.select(s.leader.c.holder)).scalar()
        assert holder == worker_id
        assert "may not execute SYS.DBMS_LOCK" not in replica.log(), "the runtime user has EXECUTE on DBMS_LOCK"
    finally:
        replica.stop()
