"""Per-job state kept across runs in DMS_JOB_STATE (e.g. an incremental export's watermark).

Written through the handler's own connection, so a state change commits with the run's work
and is rolled back with it.
"""
from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .. import schema as s


def get(conn: Connection, mapref: str, key: str) -> str | None:
    t = s.job_state.c
    return conn.execute(sa.select(t.state_value).where(t.mapref == mapref, t.state_key == key)).scalar()


def put(conn: Connection, mapref: str, key: str, value: str | None) -> None:
    t = s.job_state.c
    values = dict(state_value=value, updated_at=sa.func.current_timestamp())
    if not conn.execute(sa.update(s.job_state).where(t.mapref == mapref, t.state_key == key).values(**values)).rowcount:
        conn.execute(sa.insert(s.job_state).values(mapref=mapref, state_key=key, **values))
