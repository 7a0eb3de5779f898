"""The live Oracle suite beyond the driver conformance: runs only with DMS_TEST_ORACLE_URL.

``DMS_TEST_ORACLE_URL`` names the schema owner (the tests migrate it and create their own
procedures and tables there). ``DMS_TEST_ORACLE_RUNTIME_URL`` names the least-privilege user
created by ``sql/roles/oracle.sql``; the tests that need it skip without it. docs/oracle.md gives
the commands for a laptop with Docker.
"""
from __future__ import annotations

import os

import pytest
import sqlalchemy as sa

from worker.drivers.oracle_script import split_script

RUNTIME_URL = os.environ.get("DMS_TEST_ORACLE_RUNTIME_URL", "").strip()
FAST = dict(SCHEDULER_POLL_INTERVAL="0.5", DMS_HEARTBEAT_INTERVAL="0.5", DMS_RESCUE_AFTER="4", DMS_LEADER_TTL="3")


@pytest.fixture
def owner_engine(oracle_url):
    engine = sa.create_engine(oracle_url)
    yield engine
    engine.dispose()


@pytest.fixture
def owner_schema(oracle_url) -> str:
    return sa.engine.make_url(oracle_url).username.upper()


@pytest.fixture
def runtime_url(oracle_url) -> str:
    if not RUNTIME_URL:
        pytest.skip("DMS_TEST_ORACLE_RUNTIME_URL not set: no least-privilege user (sql/roles/oracle.sql, docs/oracle.md)")
    return RUNTIME_URL


def run_sql(engine: sa.Engine, script: str) -> None:
    """SQL*Plus-style script (';' and '/' terminators), one statement at a time."""
    with engine.begin() as conn:
        for statement in split_script(script):
            conn.exec_driver_sql(statement)


def drop(engine: sa.Engine, kind: str, name: str) -> None:
    with engine.begin() as conn:
        exists = conn.execute(sa.text("SELECT COUNT(*) FROM user_objects WHERE object_name = :n AND object_type = :k"),
                              {"n": name.upper(), "k": kind}).scalar()
        if exists:
            conn.exec_driver_sql(f"DROP {kind} {name}")
