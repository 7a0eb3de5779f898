"""The least-privilege role script: a replica running as that role does its whole job."""
from __future__ import annotations

import subprocess

import pytest
import sqlalchemy as sa

from tests.support import REPO, Replica, wait_until
from worker import client
from worker import schema as s

pytestmark = pytest.mark.slow


def test_a_replica_runs_as_the_least_privilege_postgresql_role(pg_url, tmp_path):
    owner = sa.create_engine(pg_url, isolation_level="AUTOCOMMIT")
    libpq = sa.engine.make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with owner.connect() as conn:
        if conn.execute(sa.text("SELECT 1 FROM pg_roles WHERE rolname = 'dms_worker'")).scalar():
            conn.execute(sa.text("DROP OWNED BY dms_worker"))
            conn.execute(sa.text("DROP ROLE dms_worker"))
    subprocess.run(["psql", libpq, "-v", "ON_ERROR_STOP=1", "-v", "password='pw'", "-qf",
                    str(REPO / "sql" / "roles" / "postgresql.sql")], check=True, capture_output=True)
    role_url = sa.engine.make_url(pg_url).set(username="dms_worker", password="pw").render_as_string(hide_password=False)
    client.register_job(owner, "ROLE_JOB", "worker.jobs.builtin:noop")
    with owner.begin() as conn:
        conn.execute(sa.insert(s.jobsch).values(mapref="ROLE_JOB", frqcd="CRON", cronexp="* * * * * *", misfire="SKIP",
                                                schflg="Y", curflg="Y"))
    r = Replica(role_url, "role", tmp_path, SCHEDULER_POLL_INTERVAL="0.5").start()
    as_role = sa.create_engine(role_url)
    try:
        r.wait_registered(owner)
        rid = client.enqueue(as_role, "ROLE_JOB")            # what a web app with these grants can do
        wait_until(lambda: client.request_status(owner, rid)["status"] == "DONE", 30, "the request to run")

        def scheduled_done():
            with owner.connect() as conn:
                return conn.execute(sa.text("SELECT count(*) FROM dms_prcreq WHERE jobschid IS NOT NULL "
                                            "AND status = 'DONE'")).scalar() >= 2
        wait_until(scheduled_done, 30, "scheduled occurrences to run")
        with as_role.begin() as conn:          # an incremental export's watermark (worker.jobs.state)
            from worker.jobs import state
            state.put(conn, "ROLE_JOB", "watermark", "2026-01-01")
            assert state.get(conn, "ROLE_JOB", "watermark") == "2026-01-01"
        with pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
            with as_role.begin() as conn:
                conn.execute(sa.text("CREATE TABLE dms_sneaky (x int)"))
        with pytest.raises(sa.exc.ProgrammingError, match="permission denied"):
            with as_role.begin() as conn:
                conn.execute(sa.text("DELETE FROM dms_job"))
        r.alive_or_fail()
        r.stop()
        assert "started" in r.log() and ":pw@" not in r.log(), "the password never reaches the log"
    finally:
        r.stop()
        as_role.dispose()
        with owner.connect() as conn:
            conn.execute(sa.text("DROP OWNED BY dms_worker"))
            conn.execute(sa.text("DROP ROLE dms_worker"))
        owner.dispose()
