"""SQLite driver: the embedded default. One host, several processes, claims under BEGIN IMMEDIATE.

Every transaction starts with ``BEGIN IMMEDIATE`` so the writer lock is taken up front: two
replicas can never read the same NEW rows and both claim them, and no transaction has to
upgrade a read lock (which SQLite resolves by failing one side). WAL lets readers go on.
Timestamps are stored as UTC text in SQLAlchemy's format, so text order is time order.

The replica's own connections wait for the writer lock at most ``statement_timeout_s``
(``busy_timeout``): a process frozen while it holds that lock stalls every writer on the host,
which SQLite cannot prevent, but no replica's control loop waits past its fence for it.
"""
from __future__ import annotations

import os
import sqlite3
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection, Engine

from .. import schema as s
from .base import ClaimedRequest, ClaimParams, SQLDriver

_TS_FORMAT = "%Y-%m-%d %H:%M:%f"


def _text(data: bytes) -> str:
    # SQLite stores whatever bytes a client wrote as TEXT; one row of invalid UTF-8 must not
    # make every read of its table fail.
    return data.decode("utf-8", "replace")


class SQLiteDriver(SQLDriver):
    name = "sqlite"

    def _create_engine(self, url: str) -> Engine:
        busy_s = self.statement_timeout_s or 60.0
        engine = sa.create_engine(url, connect_args={"timeout": busy_s, "check_same_thread": False})

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record):  # noqa: ANN001
            dbapi_conn.isolation_level = None     # we issue BEGIN ourselves
            dbapi_conn.text_factory = _text
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute(f"PRAGMA busy_timeout={int(busy_s * 1000)}")
            cur.close()

        @sa.event.listens_for(engine, "begin")
        def _on_begin(conn):  # noqa: ANN001
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine

    def clock(self, offset_s: float = 0.0) -> sa.ColumnElement:
        args = [sa.literal(_TS_FORMAT), sa.literal("now")]
        if offset_s:
            args.append(sa.literal(f"{offset_s:+.6f} seconds"))
        # %f gives milliseconds; pad to SQLAlchemy's microsecond format so values compare as text.
        return sa.type_coerce(sa.func.strftime(*args).concat("000"), s.Timestamp)

    def request_claim(self, p: ClaimParams) -> list[ClaimedRequest]:
        c, j = s.prcreq.c, s.job.c
        other, stop = s.prcreq.alias("other"), s.prcreq.alias("stop")
        with self.begin() as conn:
            control_ids: list[str] = []
            if p.control_types and p.control_limit > 0:
                control_ids = list(conn.execute(sa.select(c.request_id).where(
                    c.status == s.NEW, c.request_type.in_(p.control_types), c.not_before <= self.clock())
                    .order_by(c.request_type, c.requested_at).limit(p.control_limit)).scalars())
            picked = []
            if p.job_limit > 0:
                rows = conn.execute(
                    sa.select(c.request_id, c.mapref, c.request_type, j.mapref.label("job_mapref"), j.handler,
                              j.timeout_s, j.max_attempts, j.retry_delay_s, j.allow_overlap, j.enabled, j.params)
                    .select_from(s.prcreq.outerjoin(s.job, j.mapref == c.mapref))
                    .where(c.status == s.NEW, c.not_before <= self.clock(), c.request_type.notin_(s.CONTROL_TYPES),
                           ~sa.exists().where(other.c.excl_key == c.mapref),
                           ~sa.exists().where(stop.c.status == s.NEW, stop.c.request_type == s.STOP,
                                              stop.c.mapref == c.mapref),
                           sa.or_(j.paused.is_(None), j.paused != "Y"))
                    .order_by(c.priority.desc(), c.not_before, c.requested_at).limit(3 * p.job_limit + 5)).all()
                picked = self._pick(((r.request_id, r.mapref, r.request_type,
                                      self._job(r) if r.job_mapref is not None else None) for r in rows), p.job_limit)
            return self._start_picked(conn, p.worker_id, picked, control_ids)

    def _insert_occurrences(self, conn: Connection, rows: list[dict[str, Any]]) -> int:
        stmt = sqlite_insert(s.prcreq).values(rows).on_conflict_do_nothing().returning(s.prcreq.c.request_id)
        return len(conn.execute(stmt).all())

    def is_transient(self, exc: BaseException) -> bool:
        """A file has no outages: only a lock held by another process is worth waiting for;
        "unable to open database file" or "no such table" will not go away by retrying."""
        text = str(getattr(exc, "orig", exc)).lower()
        return "locked" in text or "busy" in text

    def session_id(self, dbapi_conn: Any) -> str | None:
        return f"sqlite:{os.getpid()}"

    def session_cancel(self, dbapi_conn: Any) -> None:
        dbapi_conn.interrupt()

    def run_script(self, conn: Connection, script: str) -> None:
        # sqlite3.complete_statement knows where a statement ends (trigger bodies included).
        buffer = ""
        for line in script.splitlines(keepends=True):
            buffer += line
            if sqlite3.complete_statement(buffer):
                conn.exec_driver_sql(buffer)
                buffer = ""
        if buffer.strip() and not all(l.strip().startswith("--") or not l.strip() for l in buffer.splitlines()):
            raise ValueError(f"incomplete SQL statement at end of script: {buffer.strip()[:80]!r}")
