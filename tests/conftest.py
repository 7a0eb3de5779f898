"""Fixtures: a fresh migrated database per test on each backend.

PostgreSQL tests use the local server (127.0.0.1:5432, user postgres, or DMS_TEST_PG_URL). When
it is unreachable they skip, except under CI (the ``CI`` variable set), where they fail.

Oracle tests (the live Oracle suite: driver conformance, replicas, scheduling) run when
DMS_TEST_ORACLE_URL names a database user they may fill and empty; see docs/oracle.md.
"""
from __future__ import annotations

import os
import secrets

import pytest
import sqlalchemy as sa

from tests.support import Replica, probe
from worker.drivers import make_driver
from worker.migrate import migrate

ORACLE_URL = os.environ.get("DMS_TEST_ORACLE_URL", "").strip()
# Modules whose tests make up the live Oracle suite; elsewhere the oracle variant is deselected.
ORACLE_SUITE = ("tests/drivers/test_conformance.py", "tests/drivers/test_leader_conformance.py",
                "tests/test_replicas.py", "tests/test_scheduling.py")
PG_ADMIN_URL = os.environ.get("DMS_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
TABLES = ["dms_prcreq", "dms_jobsch", "dms_prclog", "dms_joblog", "dms_joberr", "dms_job", "dms_worker",
          "dms_leader", "dms_job_state", "dms_test_probe"]


def _pg_admin() -> sa.engine.Engine:
    return sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", pool_pre_ping=True)


@pytest.fixture(scope="session")
def pg_database_url():
    admin = _pg_admin()
    try:
        with admin.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001
        if os.environ.get("CI"):
            pytest.fail(f"PostgreSQL is required under CI but unreachable at {PG_ADMIN_URL}: {exc}")
        pytest.skip(f"PostgreSQL unreachable at {PG_ADMIN_URL}")
    name = f"dms_test_{os.getpid()}_{secrets.token_hex(3)}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.engine.make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    driver = make_driver(url)
    migrate(driver)
    probe.create(driver.engine)
    driver.dispose()
    yield url
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def _reset_pg(url: str) -> None:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY"))
    engine.dispose()


@pytest.fixture
def pg_url(pg_database_url):
    _reset_pg(pg_database_url)
    return pg_database_url


@pytest.fixture
def sqlite_url(tmp_path):
    url = f"sqlite:///{tmp_path / 'dms.db'}"
    driver = make_driver(url)
    migrate(driver)
    probe.create(driver.engine)
    driver.dispose()
    return url


@pytest.fixture(scope="session")
def oracle_database_url():
    if not ORACLE_URL:
        pytest.skip("DMS_TEST_ORACLE_URL not set: no Oracle database for the live suite (docs/oracle.md)")
    driver = make_driver(ORACLE_URL)
    migrate(driver)
    probe.create(driver.engine, checkfirst=True)
    driver.dispose()
    return ORACLE_URL


@pytest.fixture
def oracle_url(oracle_database_url):
    engine = sa.create_engine(oracle_database_url)
    with engine.begin() as conn:
        for table in TABLES:
            conn.execute(sa.text(f"DELETE FROM {table}"))
    engine.dispose()
    return oracle_database_url


@pytest.fixture(params=["sqlite", "postgresql", "oracle"])
def db_url(request):
    """Each test using this runs once per backend (Oracle only with DMS_TEST_ORACLE_URL)."""
    return request.getfixturevalue({"sqlite": "sqlite_url", "postgresql": "pg_url", "oracle": "oracle_url"}[request.param])


def pytest_collection_modifyitems(config, items):
    def on_oracle(item) -> bool:
        return getattr(item, "callspec", None) is not None and item.callspec.params.get("db_url") == "oracle"

    outside = [item for item in items if on_oracle(item) and not item.nodeid.startswith(ORACLE_SUITE)]
    if outside:
        config.hook.pytest_deselected(items=outside)
        items[:] = [item for item in items if item not in outside]


@pytest.fixture
def driver(db_url):
    d = make_driver(db_url)
    yield d
    d.dispose()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Expose each phase's report on the item, so fixtures can print logs after a failure."""
    outcome = yield
    setattr(item, "rep_" + outcome.get_result().when, outcome.get_result())


@pytest.fixture
def replicas(db_url, tmp_path, request):
    """Start real replica processes on the test database: ``replicas(n, **env)``.

    All are stopped (SIGTERM) at teardown; their logs are printed when the test failed.
    """
    started: list[Replica] = []

    def start(n=1, **env):
        new = [Replica(db_url, f"r{len(started) + i}", tmp_path, **env).start() for i in range(n)]
        started.extend(new)
        return new

    yield start
    for r in started:
        r.stop()
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        for r in started:
            print(f"--- {r.name} log ---\n{r.log()[-4000:]}")
