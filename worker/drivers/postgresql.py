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
from .base import (ClaimedRequest, ClaimParams, ExecutionFinish, ExecutionStart, Listener, SessionLockElector,
                   SQLDriver, StartRefused)

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
    ORDER BY request_type, requested_at
    LIMIT :control_limit
    FOR UPDATE SKIP LOCKED
), jobs AS (
    SELECT r.request_id FROM dms_prcreq r
    WHERE r.status = 'NEW' AND r.not_before <= timezone('UTC', statement_timestamp())
      AND r.request_type NOT IN ('STOP', 'REFRESH_SCHEDULE')
      AND NOT EXISTS (SELECT 1 FROM dms_prcreq b WHERE b.excl_key = r.mapref)
      AND NOT EXISTS (SELECT 1 FROM dms_job j WHERE j.mapref = r.mapref AND j.paused = 'Y')
    ORDER BY r.priority DESC, r.not_before, r.requested_at
    LIMIT :job_limit
    FOR UPDATE OF r SKIP LOCKED
)
UPDATE dms_prcreq q
SET status = 'CLAIMED', claimed_by = :worker_id, claimed_at = timezone('UTC', statement_timestamp()),
    attempts = q.attempts + 1, stop_requested_at = NULL
WHERE q.request_id IN (SELECT request_id FROM ctl UNION ALL SELECT request_id FROM jobs)
RETURNING q.request_id, q.mapref, q.request_type, q.payload, q.attempts, q.requested_at,
          q.jobschid, q.scheduled_for, q.not_before, q.claimed_at, q.priority
"""

_NOW = "timezone('UTC', statement_timestamp())"
_PARAMS = ", ".join(f"param{i}" for i in range(1, 11))

# A batch of fresh claims started in one statement: requests to PROCESSING (taking the
# mapref's running slot when exclusive) and their DMS_PRCLOG rows opened. Rows that are not
# fresh claims (a replay, a lost row) are not returned and go the row-by-row way.
_START_SQL = f"""
WITH input AS (
    SELECT * FROM unnest(CAST(:request_ids AS text[]), CAST(:worker_ids AS text[]), CAST(:maprefs AS text[]),
                         CAST(:exclusive AS boolean[]), CAST(:attempts AS integer[]),
                         {", ".join(f"CAST(:param{i} AS text[])" for i in range(1, 11))})
        WITH ORDINALITY AS i(request_id, worker_id, mapref, exclusive, attempt, {_PARAMS}, ord)
), started AS (
    UPDATE dms_prcreq q
    SET status = 'PROCESSING', excl_key = CASE WHEN i.exclusive THEN i.mapref END
    FROM input i
    WHERE q.request_id = i.request_id AND q.claimed_by = i.worker_id AND q.status = 'CLAIMED'
    RETURNING q.request_id
)
INSERT INTO dms_prclog (mapref, strtdt, status, request_id, worker_id, attempt, {_PARAMS})
SELECT i.mapref, {_NOW}, 'IP', i.request_id, i.worker_id, i.attempt, {", ".join(f"i.param{i}" for i in range(1, 11))}
FROM input i JOIN started USING (request_id)
ORDER BY i.ord
RETURNING request_id, prcid
"""

# A batch of plain endings (DONE, FAILED or CANCELLED; no rejected records, no error row, no
# dependents to enqueue) in one statement: request, DMS_PRCLOG and DMS_JOBLOG together, each
# only where the request is still ours and PROCESSING.
_FINISH_SQL = f"""
WITH input AS (
    SELECT * FROM unnest(CAST(:request_ids AS text[]), CAST(:worker_ids AS text[]), CAST(:prcids AS bigint[]),
                         CAST(:maprefs AS text[]), CAST(:log_statuses AS text[]), CAST(:msgs AS text[]),
                         CAST(:prcdts AS timestamp[]), CAST(:sessionids AS text[]), CAST(:srcrows AS bigint[]),
                         CAST(:trgrows AS bigint[]), CAST(:errrows AS bigint[]), CAST(:statuses AS text[]),
                         CAST(:results AS text[]))
        AS i(request_id, worker_id, prcid, mapref, log_status, msg, prcdt, sessionid, srcrows, trgrows, errrows,
             status, result_payload)
), req AS (
    UPDATE dms_prcreq q
    SET status = i.status, completed_at = {_NOW}, excl_key = NULL, result_payload = i.result_payload
    FROM input i
    WHERE q.request_id = i.request_id AND q.claimed_by = i.worker_id AND q.status = 'PROCESSING'
    RETURNING q.request_id
), log AS (
    UPDATE dms_prclog p
    SET status = i.log_status, enddt = {_NOW}, msg = i.msg, sessionid = COALESCE(i.sessionid, p.sessionid)
    FROM input i JOIN req USING (request_id)
    WHERE p.prcid = i.prcid
), joblog AS (
    INSERT INTO dms_joblog (prcdt, mapref, srcrows, trgrows, errrows, prcid, sessionid, reccrdt)
    SELECT i.prcdt, i.mapref, i.srcrows, i.trgrows, i.errrows, i.prcid, i.sessionid, {_NOW}
    FROM input i JOIN req USING (request_id)
)
SELECT request_id FROM req
"""
_PLAIN_ENDINGS = (s.DONE, s.FAILED, s.CANCELLED)


class PostgresDriver(SQLDriver):
    name = "postgresql"
    supports_procedures = True

    def _create_engine(self, url: str) -> Engine:
        u = sa.engine.make_url(url)
        if u.drivername == "postgresql":
            u = u.set(drivername="postgresql+psycopg")
        # No pre-ping in the control loop: it would double the round trips of every transaction.
        # A connection that died with the server fails its first statement instead, SQLAlchemy
        # then discards the pool, and the loop's retry (tenacity) runs on a fresh connection.
        engine = sa.create_engine(u, pool_size=4, max_overflow=4, pool_pre_ping=self.pre_ping)
        if self.schema:
            @sa.event.listens_for(engine, "connect")
            def _search_path(dbapi_conn, _record):  # noqa: ANN001
                self._set_session(dbapi_conn)
        return engine

    def _set_session(self, dbapi_conn: Any, *settings: str) -> None:
        """Session settings for a new connection: the given ones and the schema's search_path."""
        for setting in settings + ((f"SET search_path TO {_quote_ident(self.schema)}",) if self.schema else ()):
            dbapi_conn.execute(setting)
        dbapi_conn.commit()

    _claim_engine: Engine | None = None

    def _claim_connection(self) -> Connection:
        """Claims run on connections of their own whose planner must walk the claim index in
        queue order. Left to statistics, a table that was never analysed, or has just taken a
        burst of rows, is estimated to hold a handful of NEW rows: the planner then reads and
        sorts every NEW row on each claim (40 ms at 20,000 rows, growing with the queue)
        instead of stopping after the first few (0.1 ms). Both lanes' ORDER BY match their
        partial indexes, so neither needs a sort."""
        if self._claim_engine is None:
            engine = sa.create_engine(self.engine.url, pool_size=1, max_overflow=2,
                                      isolation_level="AUTOCOMMIT")

            @sa.event.listens_for(engine, "connect")
            def _planner(dbapi_conn, _record):  # noqa: ANN001
                # The first two add a large constant to the costs of the paths they rule out;
                # without the third the planner would think the claim worth compiling with JIT.
                self._set_session(dbapi_conn, "SET enable_sort = off", "SET enable_bitmapscan = off", "SET jit = off")

            self._claim_engine = engine
        return self._claim_engine.connect()

    def dispose(self) -> None:
        if self._claim_engine is not None:
            self._claim_engine.dispose()
        super().dispose()

    @contextlib.contextmanager
    def _single_statement(self) -> Iterator[Connection]:
        """For one statement that is its own transaction: no BEGIN and COMMIT round trips."""
        with self.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            yield conn

    @property
    def libpq_url(self) -> str:
        return self.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)

    def clock(self, offset_s: float = 0.0) -> sa.ColumnElement:
        now = sa.func.timezone("UTC", sa.func.statement_timestamp())
        return now + sa.literal(timedelta(seconds=offset_s), sa.Interval()) if offset_s else now

    def request_claim(self, p: ClaimParams) -> list[ClaimedRequest]:
        if p.job_limit <= 0 and (not p.control_types or p.control_limit <= 0):
            return []
        with self._claim_connection() as conn:
            rows = conn.execute(sa.text(_CLAIM_SQL), dict(
                worker_id=p.worker_id, job_limit=max(0, p.job_limit),
                control_types=list(p.control_types) or [""],
                control_limit=p.control_limit if p.control_types else 0)).all()
        return self._claimed(rows)

    def execution_start_many(self, starts: Sequence[ExecutionStart]) -> list[int | StartRefused]:
        if not starts:
            return []
        binds: dict[str, list[Any]] = {
            "request_ids": [st.request_id for st in starts], "worker_ids": [st.worker_id for st in starts],
            "maprefs": [st.mapref for st in starts], "exclusive": [st.exclusive for st in starts],
            "attempts": [st.attempt for st in starts]}
        for i in range(1, 11):
            binds[f"param{i}"] = [self._fit(st.params.get(f"param{i}"), 250) for st in starts]
        try:
            with self._single_statement() as conn:
                opened = dict(conn.execute(sa.text(_START_SQL), binds).all())
        except sa.exc.IntegrityError:
            # Two starts of one exclusive mapref met in the batch: the database refused both.
            return super().execution_start_many(starts)
        rest = [st for st in starts if st.request_id not in opened]
        if rest:
            opened.update((st.request_id, r) for st, r in zip(rest, super().execution_start_many(rest)))
        return [opened[st.request_id] for st in starts]

    def execution_finish_many(self, finishes: Sequence[ExecutionFinish]) -> list[bool]:
        plain = [f for f in finishes if f.request_status in _PLAIN_ENDINGS and not f.rejects and not f.error
                 and not (f.request_status == s.DONE and f.jobschid is not None)]
        if not plain:
            return super().execution_finish_many(finishes)
        binds = {
            "request_ids": [f.request_id for f in plain], "worker_ids": [f.worker_id for f in plain],
            "prcids": [f.prcid for f in plain], "maprefs": [f.mapref for f in plain],
            "log_statuses": [f.log_status for f in plain], "msgs": [self._fit(f.msg, 4000) for f in plain],
            "prcdts": [f.prcdt for f in plain], "sessionids": [self._fit(f.sessionid, 64) for f in plain],
            "srcrows": [f.srcrows for f in plain], "trgrows": [f.trgrows for f in plain],
            "errrows": [f.errrows for f in plain], "statuses": [f.request_status for f in plain],
            "results": [f.result_payload for f in plain]}
        plain_ids = {f.request_id for f in plain}
        with (self._single_statement() if len(plain) == len(finishes) else self.begin()) as conn:
            owned = set(conn.execute(sa.text(_FINISH_SQL), binds).scalars())
            other = {f.request_id: self._finish_one(conn, f) for f in finishes if f.request_id not in plain_ids}
        return [f.request_id in owned if f.request_id in plain_ids else other[f.request_id] for f in finishes]

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
        # Refusals that no retry can fix: a wrong password (28P01), an unknown role or no
        # pg_hba.conf entry (28000), an unknown database (3D000). libpq reports refusals at
        # connect time without a SQLSTATE, so their (English) server messages count too.
        if sqlstate in ("28P01", "28000", "3D000"):
            return False
        text = str(orig).lower()
        if any(m in text for m in ("password authentication failed", "authentication failed for user",
                                   "no password supplied", "no pg_hba.conf entry", "is not permitted to log in")):
            return False
        if "does not exist" in text and ('database "' in text or 'role "' in text):
            return False
        # 08: connection exceptions; 57P: operator intervention (shutdown); 40: serialization/deadlock
        if sqlstate.startswith(("08", "57P", "40")):
            return True
        if isinstance(orig, psycopg.OperationalError):   # e.g. the elector's own connection was lost
            return True
        return super().is_transient(exc)


class PgLockElector(SessionLockElector):
    """Leadership by ``pg_try_advisory_lock`` held on a dedicated autocommit connection."""

    def _connect(self) -> psycopg.Connection:
        return psycopg.connect(self.driver.libpq_url, autocommit=True)

    def _try_lock(self) -> bool:
        return self.conn.execute("SELECT pg_try_advisory_lock(%s)", [LEADER_LOCK_ID]).fetchone()[0]

    def _ping(self) -> None:
        self.conn.execute("SELECT 1")

    def _unlock(self) -> None:
        self.conn.execute("SELECT pg_advisory_unlock(%s)", [LEADER_LOCK_ID])


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
