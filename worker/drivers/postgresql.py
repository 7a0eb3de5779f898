"""PostgreSQL driver: SKIP LOCKED claims in one statement, LISTEN/NOTIFY wake-ups, advisory locks.

Everything PostgreSQL-specific the worker does is here: the clock expression, the claim, the
listener, session cancel/terminate, ``CALL`` for ``sql:`` handlers and script execution.
"""
from __future__ import annotations

import contextlib
import re
from datetime import timedelta
from typing import Any, Iterator, Sequence

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from sqlalchemy.dialects.postgresql import insert as pg_insert

from .. import schema as s
from .base import ClaimedRequest, ClaimParams, LeaseElector, Listener, SQLDriver

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?$")
MIGRATION_LOCK_ID = 0x646D7301  # 'dms' + 1: serialises concurrent `migrate` runs
LEADER_LOCK_ID = 0x646D7302     # 'dms' + 2: the scheduler leader's session advisory lock

# Both lanes in one round trip. Control requests (STOP) never wait behind jobs; job rows are
# limited to the free slots, skip maprefs already running exclusively, and are locked as they
# are picked so that competing replicas skip them rather than wait.
_CLAIM_SQL = """
WITH ctl AS (
    SELECT request_id FROM dms_prcreq
    WHERE status = 'NEW' AND request_type IN ('STOP', 'REFRESH_SCHEDULE')
      AND request_type = ANY(:control_types) AND not_before <= timezone('UTC', statement_timestamp())
    ORDER BY requested_at
    LIMIT :control_limit
    FOR UPDATE SKIP LOCKED
), jobs AS (
    SELECT r.request_id FROM dms_prcreq r
    WHERE r.status = 'NEW' AND r.not_before <= timezone('UTC', statement_timestamp())
      AND r.request_type NOT IN ('STOP', 'REFRESH_SCHEDULE')
      AND NOT EXISTS (SELECT 1 FROM dms_prcreq b WHERE b.excl_key = r.mapref)
    ORDER BY r.not_before, r.requested_at
    LIMIT :job_limit
    FOR UPDATE OF r SKIP LOCKED
)
UPDATE dms_prcreq q
SET status = 'CLAIMED', claimed_by = :worker_id, claimed_at = timezone('UTC', statement_timestamp()),
    attempts = q.attempts + 1, stop_requested_at = NULL
WHERE q.request_id IN (SELECT request_id FROM ctl UNION ALL SELECT request_id FROM jobs)
RETURNING q.request_id, q.mapref, q.request_type, q.payload, q.attempts, q.requested_at,
          q.jobschid, q.scheduled_for, q.not_before, q.claimed_at
"""


class PostgresDriver(SQLDriver):
    name = "postgresql"
    supports_procedures = True

    def _create_engine(self, url: str) -> Engine:
        u = sa.engine.make_url(url)
        if u.drivername == "postgresql":
            u = u.set(drivername="postgresql+psycopg")
        engine = sa.create_engine(u, pool_pre_ping=True, pool_size=4, max_overflow=4)
        if self.schema:
            schema = self.schema

            @sa.event.listens_for(engine, "connect")
            def _search_path(dbapi_conn, _record):  # noqa: ANN001
                with dbapi_conn.cursor() as cur:
                    cur.execute(sa.text("SET search_path TO {}").text.format(_quote_ident(schema)))
                dbapi_conn.commit()
        return engine

    @property
    def libpq_url(self) -> str:
        return self.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)

    def clock(self, offset_s: float = 0.0) -> sa.ColumnElement:
        now = sa.func.timezone("UTC", sa.func.statement_timestamp())
        return now + sa.literal(timedelta(seconds=offset_s), sa.Interval()) if offset_s else now

    def request_claim(self, p: ClaimParams) -> list[ClaimedRequest]:
        if p.job_limit <= 0 and (not p.control_types or p.control_limit <= 0):
            return []
        with self.engine.begin() as conn:
            rows = conn.execute(sa.text(_CLAIM_SQL), dict(
                worker_id=p.worker_id, job_limit=max(0, p.job_limit),
                control_types=list(p.control_types) or [""],
                control_limit=p.control_limit if p.control_types else 0)).all()
        return self._claimed(rows)

    default_leader_mode = "lock"

    def leader_elector(self, mode: str, ttl_s: float):
        if mode in ("auto", "lock"):
            return PgLockElector(self, ttl_s)
        return super().leader_elector(mode, ttl_s)

    def _insert_occurrences(self, conn: Connection, rows: list[dict[str, Any]]) -> int:
        stmt = pg_insert(s.prcreq).values(rows).on_conflict_do_nothing().returning(s.prcreq.c.request_id)
        return len(conn.execute(stmt).all())

    def listener(self) -> "PgListener":
        return PgListener(self.libpq_url)

    def session_id(self, dbapi_conn: Any) -> str | None:
        return str(dbapi_conn.info.backend_pid)

    def session_cancel(self, dbapi_conn: Any) -> None:
        dbapi_conn.cancel_safe(timeout=2.0)

    def session_terminate(self, session_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": int(session_id)})

    def procedure_call(self, conn: Connection, name: str, args: Sequence[Any],
                       counts: bool = False) -> tuple[int | None, int | None, int | None] | None:
        if not _IDENT.match(name):
            raise ValueError(f"invalid procedure name {name!r}")
        binds = ", ".join(f":a{i}" for i in range(len(args)))
        # INOUT parameters come back as the CALL's result row.
        extra = ", NULL::bigint, NULL::bigint, NULL::bigint" if counts else ""
        result = conn.execute(sa.text(f"CALL {name}({binds}{extra})"), {f"a{i}": v for i, v in enumerate(args)})
        if not counts:
            return None
        row = result.first()
        return tuple(row[-3:]) if row is not None else (None, None, None)

    def run_script(self, conn: Connection, script: str) -> None:
        # Without parameters psycopg sends the text as one simple query: several statements,
        # dollar-quoted function bodies and all, exactly as psql would run them.
        conn.connection.driver_connection.execute(script)

    @contextlib.contextmanager
    def migration_lock(self, conn: Connection) -> Iterator[None]:
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID})
        yield

    def is_transient(self, exc: BaseException) -> bool:
        orig = getattr(exc, "orig", exc)
        sqlstate = getattr(orig, "sqlstate", None) or ""
        # 08: connection exceptions; 57P: operator intervention (shutdown); 40: serialization/deadlock
        if sqlstate.startswith(("08", "57P", "40")):
            return True
        return super().is_transient(exc)


class PgLockElector(LeaseElector):
    """Leadership by ``pg_try_advisory_lock`` held on a dedicated connection.

    The server releases the lock the moment the holder's session ends (a killed leader's
    socket closes), so a follower takes over on its next attempt. The DMS_LEADER row is still
    written, for display and for epoch fencing of leader actions.
    """

    mode = "lock"

    def __init__(self, driver: PostgresDriver, ttl_s: float) -> None:
        super().__init__(driver, ttl_s)
        self.conn: psycopg.Connection | None = None

    def attempt(self, worker_id: str) -> int | None:
        if self.conn is None or self.conn.closed:
            self.conn = psycopg.connect(self.driver.libpq_url, autocommit=True)
        if not self.conn.execute("SELECT pg_try_advisory_lock(%s)", [LEADER_LOCK_ID]).fetchone()[0]:
            # A hung but connected leader keeps the lock and stops renewing: once its lease
            # has expired, take over by the lease alone; the epoch fences it if it wakes up.
            return self._take(worker_id, force=False)
        try:
            return self._take(worker_id, force=True)   # the lock is ours: its last holder's session is gone
        except Exception:
            self.close()                             # never keep the lock without the row
            raise

    def renew(self, worker_id: str, epoch: int) -> bool:
        try:
            self.conn.execute("SELECT 1")
        except Exception:  # noqa: BLE001 - the session (and so the lock) is gone
            self.close()
            return False
        return super().renew(worker_id, epoch)

    def resign(self, worker_id: str, epoch: int) -> None:
        try:
            super().resign(worker_id, epoch)
            if self.conn is not None and not self.conn.closed:
                # Unlock explicitly: closing the session releases it too, but only once the
                # server has noticed, and a successor may be asking right now.
                self.conn.execute("SELECT pg_advisory_unlock(%s)", [LEADER_LOCK_ID])
        finally:
            self.close()

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()     # ends the session: the server releases the lock
            self.conn = None


class PgListener(Listener):
    """A dedicated autocommit connection LISTENing on the queue and stop channels."""

    CHANNELS = ("dms_prcreq", "dms_stop")

    def __init__(self, conninfo: str) -> None:
        self.conn = psycopg.connect(conninfo, autocommit=True)
        for channel in self.CHANNELS:
            self.conn.execute(f"LISTEN {channel}")

    def fileno(self) -> int:
        return self.conn.fileno()

    def drain(self) -> set[str]:
        return {n.channel for n in self.conn.notifies(timeout=0)}

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
