"""Shared benchmark plumbing: a fresh PostgreSQL database, replicas, result tables and JSON."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import sqlalchemy as sa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from report import RESULTS, percentile, print_table, summary_ms, write_json  # noqa: E402,F401  (re-exported)

from worker.drivers import make_driver  # noqa: E402
from worker.migrate import migrate  # noqa: E402

ADMIN_URL = os.environ.get("DMS_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def fresh_database(name: str, *extra_tables: sa.Table) -> str:
    admin = sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    url = sa.engine.make_url(ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    driver = make_driver(url)
    migrate(driver)
    for table in extra_tables:
        table.create(driver.engine)
    driver.dispose()
    return url


