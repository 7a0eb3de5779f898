"""SQLite driver: the embedded default. One host, several processes, claims under BEGIN IMMEDIATE.

Every transaction starts with ``BEGIN IMMEDIATE`` so the writer lock is taken up front: two
replicas can never read the same NEW rows and both claim them, and no transaction has to
upgrade a read lock (which SQLite resolves by failing one side). WAL lets readers go on.
Timestamps are stored as UTC text in SQLAlchemy's format, so text order is time order.
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


class SQLiteDriver(SQLDriver):
    name = "sqlite"

    def _create_engine(self, url: str) -> Engine:
        engine = sa.create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record):  # noqa: ANN001
            dbapi_conn.isolation_level = None     # we issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=60000")
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
        c = s.prcreq.c
        other = s.prcreq.alias("other")
        with self.begin() as conn:
            ids: list[str] = []
            if p.control_types and p.control_limit > 0:
                ids += conn.execute(sa.select(c.request_id).where(
                    c.status == s.NEW, c.request_type.in_(p.control_types), c.not_before <= self.clock())
                    .order_by(c.requested_at).limit(p.control_limit)).scalars().all()
            if p.job_limit > 0:
                ids += conn.execute(sa.select(c.request_id).where(
                    c.status == s.NEW, c.not_before <= self.clock(), c.request_type.notin_(s.CONTROL_TYPES),
                    ~sa.exists().where(other.c.excl_key == c.mapref),
                    ~sa.exists().where(s.job.c.mapref == c.mapref, s.job.c.paused == "Y"))
                    .order_by(c.priority.desc(), c.not_before, c.requested_at).limit(p.job_limit)).scalars().all()
            if not ids:
                return []
            rows = conn.execute(self._claim_update(p.worker_id).where(c.request_id.in_(ids))).all()
        return self._claimed(rows)

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
