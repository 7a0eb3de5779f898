"""worker.jobs.state: the per-job values handlers keep across runs (DMS_JOB_STATE)."""
from __future__ import annotations

import sqlalchemy as sa

from worker import schema as s
from worker.drivers import make_driver
from worker.jobs import state


def test_updated_at_is_utc_from_the_database_clock_whatever_the_session_zone(db_url):
    driver = make_driver(db_url)
    try:
        with driver.engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                # A session far from UTC: CURRENT_TIMESTAMP would be stored 14 hours off.
                conn.exec_driver_sql("SET TIME ZONE 'Pacific/Kiritimati'")
            state.put(conn, "M", "watermark", "w1")
            state.put(conn, "M", "watermark", "w2")                 # the update path
            state.put(conn, "M", "other", "x")                      # the insert path
            conn.commit()
        now = driver.now()
        with driver.engine.connect() as conn:
            rows = conn.execute(sa.select(s.job_state.c.state_key, s.job_state.c.updated_at)).all()
        assert {k for k, _ in rows} == {"watermark", "other"}
        for key, updated_at in rows:
            assert abs((now - updated_at).total_seconds()) < 60, (key, updated_at, now)
    finally:
        driver.dispose()


def test_an_empty_value_reads_back_as_none_on_every_database(db_url):
    """Oracle stores '' as NULL; the other databases now do the same, so handlers see one rule."""
    driver = make_driver(db_url)
    try:
        with driver.engine.begin() as conn:
            state.put(conn, "M", "watermark", "")
            assert state.get(conn, "M", "watermark") is None
            assert conn.execute(sa.select(s.job_state.c.state_value)).scalar_one() is None
            assert state.get(conn, "M", "missing") is None
    finally:
        driver.dispose()
