"""Per-job state kept across runs in DMS_JOB_STATE (e.g. an incremental export's watermark).

Written through the handler's own connection, so a state change commits with the run's work
and is rolled back with it. ``updated_at`` is UTC from the database clock, like every
timestamp the worker writes. An empty value is stored as NULL on every database (Oracle cannot
tell them apart), so ``get`` returns None for it everywhere.
"""
from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.ext.compiler import compiles

from .. import schema as s


class utc_now(sa.sql.expression.FunctionElement):
    """The database's current time in UTC, as the drivers' ``clock()`` writes it.

    ``CURRENT_TIMESTAMP`` is in the session's time zone on Oracle and PostgreSQL; stored in a
    plain TIMESTAMP column it loses the zone, so a session not on UTC wrote local time into a
    UTC column."""

    type = s.Timestamp
    inherit_cache = True
    name = "utc_now"


@compiles(utc_now)
def _utc_now_default(_element, _compiler, **_kw) -> str:
    # SQLite: 'now' is UTC; the same text format as the SQLite driver's clock.
    return "(strftime('%Y-%m-%d %H:%M:%f', 'now') || '000')"


@compiles(utc_now, "oracle")
def _utc_now_oracle(_element, _compiler, **_kw) -> str:
    return "SYS_EXTRACT_UTC(SYSTIMESTAMP)"


@compiles(utc_now, "postgresql")
def _utc_now_postgresql(_element, _compiler, **_kw) -> str:
    return "timezone('UTC', statement_timestamp())"


def get(conn: Connection, mapref: str, key: str) -> str | None:
    t = s.job_state.c
    return conn.execute(sa.select(t.state_value).where(t.mapref == mapref, t.state_key == key)).scalar() or None


def put(conn: Connection, mapref: str, key: str, value: str | None) -> None:
    t = s.job_state.c
    values = dict(state_value=value or None, updated_at=utc_now())
    if not conn.execute(sa.update(s.job_state).where(t.mapref == mapref, t.state_key == key).values(**values)).rowcount:
        conn.execute(sa.insert(s.job_state).values(mapref=mapref, state_key=key, **values))
