"""PostgreSQL driver: claim-and-start and finish in one statement each, LISTEN/NOTIFY wake-ups,
advisory locks, and bounded waits.

Everything PostgreSQL-specific the worker does is here: the clock expression, the claim, the
batched finish, the listener, the leader's session lock, session cancel/terminate, ``CALL`` for
``sql:`` handlers, script execution, and the settings that bound every wait of the replica's own
sessions (``statement_timeout``, ``lock_timeout``, ``idle_in_transaction_session_timeout``, TCP
keepalives and ``tcp_user_timeout``), so that a frozen or cut-off peer holding a lock cannot hold
the cluster for longer than that.
"""
from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Iterator, Sequence
from datetime import timedelta
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.engine import Connection, Engine

from .. import schema as s
from .base import ClaimedRequest, ClaimParams, ExecutionFinish, Listener, SQLDriver, driver_connection

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?$")
MIGRATION_LOCK_ID = 0x646D7301  # 'dms' + 1: serialises concurrent `migrate` runs
LEADER_LOCK_ID = 0x646D7302     # 'dms' + 2: the scheduler leader's session advisory lock

_NOW = "timezone('UTC', statement_timestamp())"
_PARAMS = ", ".join(f"param{i}" for i in range(1, 11))
_JOB_COLUMNS = "j.handler, j.timeout_s, j.max_attempts, j.retry_delay_s, j.allow_overlap, j.enabled, j.params"

# Claim and start, in one statement. Control requests (STOP, REFRESH_SCHEDULE) never wait behind
# jobs. Job candidates are locked as they are picked (competing replicas skip them), in queue
# order, skipping maprefs that run exclusively, paused jobs and maprefs with a STOP waiting (the
# STOP is applied first, so its NEW target is cancelled rather than started). Of the candidates
# at most one per no-overlap mapref is taken; the runnable ones go straight to PROCESSING with
# the mapref's exclusivity (a unique index refuses a second) and their DMS_PRCLOG rows.
_CLAIM_SQL = f"""
WITH ctl AS (
    SELECT request_id FROM dms_prcreq
    WHERE status = 'NEW' AND request_type IN ('STOP', 'REFRESH_SCHEDULE')
      AND request_type = ANY(:control_types) AND not_before <= {_NOW}
    ORDER BY request_type, requested_at
    LIMIT :control_limit
    FOR UPDATE SKIP LOCKED
), cand AS (
    SELECT r.request_id, r.mapref, r.priority, r.not_before, r.requested_at,
           (j.mapref IS NOT NULL AND j.enabled = 'Y' AND r.request_type IN ('IMMEDIATE', 'HISTORY')) AS runnable,
           (j.allow_overlap = 'Y') AS overlap
    FROM dms_prcreq r LEFT JOIN dms_job j ON j.mapref = r.mapref
    WHERE r.status = 'NEW' AND r.not_before <= {_NOW}
      AND r.request_type NOT IN ('STOP', 'REFRESH_SCHEDULE')
      AND NOT EXISTS (SELECT 1 FROM dms_prcreq b WHERE b.excl_key = r.mapref)
      AND NOT EXISTS (SELECT 1 FROM dms_prcreq x WHERE x.status = 'NEW' AND x.request_type = 'STOP'
                                                   AND x.mapref = r.mapref)
      AND (j.paused IS NULL OR j.paused <> 'Y')
    ORDER BY r.priority DESC, r.not_before, r.requested_at
    LIMIT :scan_limit
    FOR UPDATE OF r SKIP LOCKED
), chosen AS (
    SELECT request_id, runnable, overlap FROM (
        SELECT c.*, row_number() OVER (
            PARTITION BY CASE WHEN c.runnable AND NOT c.overlap THEN c.mapref ELSE c.request_id END
            ORDER BY c.priority DESC, c.not_before, c.requested_at) AS nth
        FROM cand c) ranked
    WHERE nth = 1
    ORDER BY priority DESC, not_before, requested_at
    LIMIT :job_limit
), picked AS (
    SELECT request_id, runnable, overlap FROM chosen
    UNION ALL
    SELECT request_id, false, true FROM ctl
), claimed AS (
    UPDATE dms_prcreq q
    SET status = CASE WHEN p.runnable THEN 'PROCESSING' ELSE 'CLAIMED' END,
        claimed_by = :worker_id, claimed_at = {_NOW}, attempts = q.attempts + 1, stop_requested_at = NULL,
        excl_key = CASE WHEN p.runnable AND NOT p.overlap THEN q.mapref END
    FROM picked p
    WHERE q.request_id = p.request_id
    RETURNING q.request_id, q.mapref, q.request_type, q.payload, q.attempts, q.requested_at, q.jobschid,
              q.scheduled_for, q.not_before, q.claimed_at, q.priority, q.status
), opened AS (
    INSERT INTO dms_prclog (mapref, strtdt, status, request_id, worker_id, attempt)
    SELECT mapref, {_NOW}, 'IP', request_id, :worker_id, attempts FROM claimed WHERE status = 'PROCESSING'
    RETURNING request_id, prcid
)
SELECT c.*, o.prcid, j.mapref AS job_mapref, {_JOB_COLUMNS}
FROM claimed c LEFT JOIN opened o USING (request_id) LEFT JOIN dms_job j ON j.mapref = c.mapref
"""

# The id of a dependent occurrence, as worker.drivers.base.occurrence_request_id spells it.
_OCCURRENCE_ID = ("'sch' || c.jobschid || '-' || to_char(i.scheduled_for, 'YYYYMMDD\"T\"HH24MISS') || "
                  "CASE WHEN to_char(i.scheduled_for, 'US') <> '000000' THEN '.' || to_char(i.scheduled_for, 'US') "
                  "ELSE '' END || 'Z'")

# A batch of finishes in one statement: each request (only while still ours and PROCESSING),
# its DMS_PRCLOG row, a DMS_JOBLOG row, DMS_JOBERR rows (rejected records, the error), and on a
# scheduled occurrence's success its dependent schedules' occurrences.
_FINISH_SQL = f"""
WITH input AS (
    SELECT * FROM unnest(CAST(:request_ids AS text[]), CAST(:worker_ids AS text[]), CAST(:prcids AS bigint[]),
                         CAST(:maprefs AS text[]), CAST(:log_statuses AS text[]), CAST(:msgs AS text[]),
                         CAST(:prcdts AS timestamp[]), CAST(:sessionids AS text[]), CAST(:srcrows AS bigint[]),
                         CAST(:trgrows AS bigint[]), CAST(:errrows AS bigint[]), CAST(:statuses AS text[]),
                         CAST(:results AS text[]), CAST(:delays AS float8[]), CAST(:refunds AS boolean[]),
                         CAST(:jobschids AS bigint[]), CAST(:scheduled AS timestamp[]), CAST(:has_params AS boolean[]),
                         {", ".join(f"CAST(:param{i} AS text[])" for i in range(1, 11))})
        AS i(request_id, worker_id, prcid, mapref, log_status, msg, prcdt, sessionid, srcrows, trgrows, errrows,
             status, result_payload, delay, refund, jobschid, scheduled_for, has_params, {_PARAMS})
), req AS (
    UPDATE dms_prcreq q SET
        status = COALESCE(i.status, q.status),
        completed_at = CASE WHEN i.status IN ('DONE', 'FAILED', 'CANCELLED') THEN {_NOW} ELSE q.completed_at END,
        excl_key = CASE WHEN i.status IS NULL THEN q.excl_key END,
        claimed_by = CASE WHEN i.status = 'NEW' THEN NULL ELSE q.claimed_by END,
        claimed_at = CASE WHEN i.status = 'NEW' THEN NULL ELSE q.claimed_at END,
        stop_requested_at = CASE WHEN i.status = 'NEW' THEN NULL ELSE q.stop_requested_at END,
        not_before = CASE WHEN i.status = 'NEW' THEN {_NOW} + make_interval(secs => i.delay) ELSE q.not_before END,
        attempts = CASE WHEN i.status = 'NEW' AND i.refund THEN q.attempts - 1 ELSE q.attempts END,
        result_payload = CASE WHEN i.status IS NULL THEN q.result_payload ELSE i.result_payload END
    FROM input i
    WHERE q.request_id = i.request_id AND q.claimed_by = i.worker_id AND q.status = 'PROCESSING'
    RETURNING q.request_id
), log AS (
    UPDATE dms_prclog p
    SET status = i.log_status, enddt = {_NOW}, msg = i.msg, sessionid = COALESCE(i.sessionid, p.sessionid),
        {", ".join(f"param{n} = CASE WHEN i.has_params THEN i.param{n} ELSE p.param{n} END" for n in range(1, 11))}
    FROM input i JOIN req USING (request_id)
    WHERE p.prcid = i.prcid
), joblog AS (
    INSERT INTO dms_joblog (prcdt, mapref, srcrows, trgrows, errrows, prcid, sessionid, reccrdt)
    SELECT i.prcdt, i.mapref, i.srcrows, i.trgrows, i.errrows, i.prcid, i.sessionid, {_NOW}
    FROM input i JOIN req USING (request_id)
    RETURNING joblogid, prcid, prcdt, mapref
), joberr AS (
    INSERT INTO dms_joberr (joblogid, prcdt, errtyp, errmsg, dberrmsg, keyvalue, prcid, mapref)
    SELECT l.joblogid, l.prcdt, e.errtyp, e.errmsg, e.dberrmsg, e.keyvalue, l.prcid, l.mapref
    FROM unnest(CAST(:err_prcids AS bigint[]), CAST(:err_types AS text[]), CAST(:err_msgs AS text[]),
                CAST(:err_dbmsgs AS text[]), CAST(:err_keys AS text[])) AS e(prcid, errtyp, errmsg, dberrmsg, keyvalue)
    JOIN joblog l ON l.prcid = e.prcid
), deps AS (
    INSERT INTO dms_prcreq (request_id, mapref, request_type, payload, status, attempts, jobschid, scheduled_for,
                            requested_at, not_before)
    SELECT {_OCCURRENCE_ID}, c.mapref, 'IMMEDIATE', c.params, 'NEW', 0, c.jobschid, i.scheduled_for, {_NOW}, {_NOW}
    FROM input i JOIN req USING (request_id)
    JOIN dms_jobsch c ON c.dpnd_jobschid = i.jobschid AND c.curflg = 'Y' AND c.schflg = 'Y' AND c.invalid_reason IS NULL
    WHERE i.status = 'DONE' AND i.scheduled_for IS NOT NULL
    ON CONFLICT DO NOTHING
    RETURNING jobschid, scheduled_for
), depsch AS (
    UPDATE dms_jobsch c SET lst_run_dt = d.last
    FROM (SELECT jobschid, max(scheduled_for) AS last FROM deps GROUP BY jobschid) d
    WHERE c.jobschid = d.jobschid
)
SELECT request_id FROM req
"""

# Parsed once: a TextClause finds its bind parameters when it is built (a claim costs ~0.1 ms less).
_CLAIM, _FINISH = sa.text(_CLAIM_SQL), sa.text(_FINISH_SQL)


class PostgresDriver(SQLDriver):
    name = "postgresql"
    supports_procedures = True
    supports_leader_lock = True
    default_leader_mode = "lock"

    _claim_engine: Engine | None = None

    def _create_engine(self, url: str) -> Engine:
        u = sa.engine.make_url(url)
        if u.drivername == "postgresql":
            u = u.set(drivername="postgresql+psycopg")
        # No pre-ping in the control loop: it would double the round trips of every transaction.
        # A connection that died with the server fails its first statement instead, SQLAlchemy
        # then discards the pool, and the loop's retry (tenacity) runs on a fresh connection.
        engine = sa.create_engine(u, pool_size=4, max_overflow=4, pool_pre_ping=self.pre_ping,
                                  connect_args=self._connect_args())
        sa.event.listen(engine, "connect", lambda dbapi_conn, _rec: self._set_session(dbapi_conn))
        return engine

    def _connect_args(self) -> dict[str, Any]:
        """libpq's own bounds: notice a dead peer or a cut-off network within seconds, not when
        the kernel gives up on TCP (minutes to hours)."""
        bound = self.statement_timeout_s or 5.0
        return dict(keepalives=1, keepalives_idle=max(1, int(bound)), keepalives_interval=1, keepalives_count=3,
                    tcp_user_timeout=int(max(1.0, 2 * bound) * 1000), connect_timeout=max(2, int(2 * bound)))

    def _session_settings(self) -> tuple[str, ...]:
        settings: tuple[str, ...] = (f"SET search_path TO {_quote_ident(self.schema)}",) if self.schema else ()
        if self.statement_timeout_s:
            ms = int(self.statement_timeout_s * 1000)
            # The replica's own statements: none runs, waits for a lock, or leaves a transaction
            # open (the process frozen mid-way) for longer than this.
            settings += (f"SET statement_timeout = {ms}", f"SET lock_timeout = {ms}",
                         f"SET idle_in_transaction_session_timeout = {2 * ms}")
        return settings

    def _set_session(self, dbapi_conn: Any, *extra: str) -> None:
        settings = self._session_settings() + extra
        if settings:
            for setting in settings:
                dbapi_conn.execute(setting)
            dbapi_conn.commit()

    def _bound_transaction(self, conn: Connection, timeout_s: float) -> None:
        ms = max(1, int(timeout_s * 1000))
        conn.exec_driver_sql(f"SET LOCAL lock_timeout = {ms}")
        conn.exec_driver_sql(f"SET LOCAL idle_in_transaction_session_timeout = {ms}")

    def _claim_connection(self) -> Connection:
        """Claims and finishes, one statement each, run on autocommit connections of their own
        (no BEGIN, no COMMIT, nothing to reset on return), whose planner must walk the claim
        index in queue order. Left to statistics, a table that was never analysed, or has just taken a
        burst of rows, is estimated to hold a handful of NEW rows: the planner then reads and
        sorts every NEW row on each claim (40 ms at 20,000 rows, growing with the queue)
        instead of stopping after the first few (0.1 ms). The candidates' ORDER BY matches the
        partial claim index, so it needs no sort."""
        if self._claim_engine is None:
            engine = sa.create_engine(self.engine.url, pool_size=1, max_overflow=2, isolation_level="AUTOCOMMIT",
                                      pool_reset_on_return=None, connect_args=self._connect_args())

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

    @property
    def libpq_url(self) -> str:
        return self.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)

    def clock(self, offset_s: float = 0.0) -> sa.ColumnElement:
        now = sa.func.timezone("UTC", sa.func.statement_timestamp())
        return now + sa.literal(timedelta(seconds=offset_s), sa.Interval()) if offset_s else now

    # -- the hot path ------------------------------------------------------------------------
    def request_claim(self, p: ClaimParams) -> list[ClaimedRequest]:
        control_limit = p.control_limit if p.control_types else 0
        if p.job_limit <= 0 and control_limit <= 0:
            return []
        binds = dict(worker_id=p.worker_id, job_limit=max(0, p.job_limit), scan_limit=max(0, 3 * p.job_limit + 5)
                     if p.job_limit > 0 else 0, control_types=list(p.control_types) or [""], control_limit=control_limit)
        for attempt in (1, 2):
            try:
                with self._claim_connection() as conn:
                    rows = conn.execute(_CLAIM, binds).all()
                break
            except sa.exc.IntegrityError:
                # Two replicas started one no-overlap mapref at the same instant: the unique
                # index refused this whole statement (nothing was claimed). Again at once: the
                # winner has committed, and its mapref is now skipped.
                if attempt == 2:
                    return []
        jobs = {r.mapref: self._job(r) for r in rows if r.job_mapref is not None}
        return self._claimed(rows, {r.request_id: int(r.prcid) for r in rows if r.prcid is not None}, jobs)

    def execution_finish_many(self, finishes: Sequence[ExecutionFinish]) -> list[bool]:
        if not finishes:
            return []
        binds: dict[str, list[Any]] = {
            "request_ids": [f.request_id for f in finishes], "worker_ids": [f.worker_id for f in finishes],
            "prcids": [f.prcid for f in finishes], "maprefs": [f.mapref for f in finishes],
            "log_statuses": [f.log_status for f in finishes], "msgs": [self._fit(f.msg, 4000) for f in finishes],
            "prcdts": [f.prcdt for f in finishes], "sessionids": [self._fit(f.sessionid, 64) for f in finishes],
            "srcrows": [f.srcrows for f in finishes], "trgrows": [f.trgrows for f in finishes],
            "errrows": [f.errrows if f.errrows is not None else (len(f.rejects) or None) for f in finishes],
            "statuses": [f.request_status for f in finishes], "results": [f.result_payload for f in finishes],
            "delays": [float(f.retry_delay_s) for f in finishes], "refunds": [f.refund_attempt for f in finishes],
            "jobschids": [f.jobschid for f in finishes],
            "scheduled": [f.scheduled_for if f.jobschid is not None else None for f in finishes],
            "has_params": [f.params is not None for f in finishes]}
        for n in range(1, 11):
            binds[f"param{n}"] = [self._fit((f.params or {}).get(f"param{n}"), 250) for f in finishes]
        errors = [(f.prcid, e) for f in finishes for e in self._error_rows(f)]
        binds.update(err_prcids=[pid for pid, _ in errors], err_types=[e["errtyp"] for _, e in errors],
                     err_msgs=[e["errmsg"] for _, e in errors], err_dbmsgs=[e["dberrmsg"] for _, e in errors],
                     err_keys=[e["keyvalue"] for _, e in errors])
        with self._claim_connection() as conn:     # one statement, its own transaction (autocommit)
            owned = set(conn.execute(_FINISH, binds).scalars())
        return [f.request_id in owned for f in finishes]

    def _insert_occurrences(self, conn: Connection, rows: list[dict[str, Any]]) -> int:
        stmt = pg_insert(s.prcreq).values(rows).on_conflict_do_nothing().returning(s.prcreq.c.request_id)
        return len(conn.execute(stmt).all())

    # -- leader ------------------------------------------------------------------------------
    def leader_lock_try(self) -> bool:
        if self._lock_conn is None:
            self._lock_conn = psycopg.connect(self.libpq_url, autocommit=True, **self._connect_args())
        try:
            return bool(self._lock_conn.execute("SELECT pg_try_advisory_lock(%s)", [LEADER_LOCK_ID]).fetchone()[0])
        except Exception:
            self.leader_lock_release()          # a lost session: the next attempt reconnects
            raise

    def _lock_ping(self, conn: Any) -> None:
        conn.execute("SELECT 1")

    def _lock_unlock(self, conn: Any) -> None:
        conn.execute("SELECT pg_advisory_unlock(%s)", [LEADER_LOCK_ID])

    # -- wake-ups, sessions, procedures, scripts ------------------------------------------------
    def listener(self) -> PgListener:
        return PgListener(self.libpq_url, self._connect_args())

    def session_id(self, dbapi_conn: Any) -> str | None:
        return str(dbapi_conn.info.backend_pid)

    def session_cancel(self, dbapi_conn: Any) -> None:
        dbapi_conn.cancel_safe(timeout=2.0)

    def session_terminate(self, session_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": int(session_id)})

    def procedure_call(self, conn: Connection, name: str, args: Sequence[Any],
                       counts: bool = False, *, truncate_flag: str | None = None,
                       ) -> tuple[int | None, int | None, int | None] | None:
        """``CALL name(prcid, param1..param10[, truncate_flag][, NULL, NULL, NULL])``.

        ``truncate_flag`` ('Y'/'N'), when given, is one more argument after param10: only jobs
        that opt in get it (docs/jobs.md), so procedures taking exactly prcid and ten params
        keep working."""
        if not _IDENT.match(name):
            raise ValueError(f"invalid procedure name {name!r}")
        values = list(args) + ([truncate_flag] if truncate_flag is not None else [])
        binds = ", ".join(f":a{i}" for i in range(len(values)))
        # INOUT parameters come back as the CALL's result row.
        extra = ", NULL::bigint, NULL::bigint, NULL::bigint" if counts else ""
        result = conn.execute(sa.text(f"CALL {name}({binds}{extra})"), {f"a{i}": v for i, v in enumerate(values)})
        if not counts:
            return None
        row = result.first()
        return tuple(row[-3:]) if row is not None else (None, None, None)

    def execution_lock(self, conn: Connection, mapref: str, timeout_s: float) -> bool:
        key = sa.func.hashtextextended(sa.literal("dms-worker:mapref:") + sa.func.current_schema() + ":" + mapref, 0)
        deadline = time.monotonic() + timeout_s
        while True:
            if conn.execute(sa.select(sa.func.pg_try_advisory_lock(key))).scalar():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def execution_unlock(self, conn: Connection, mapref: str) -> None:
        key = sa.func.hashtextextended(sa.literal("dms-worker:mapref:") + sa.func.current_schema() + ":" + mapref, 0)
        conn.execute(sa.select(sa.func.pg_advisory_unlock(key)))

    def run_script(self, conn: Connection, script: str) -> None:
        # Without parameters psycopg sends the text as one simple query: several statements,
        # dollar-quoted function bodies and all, exactly as psql would run them.
        driver_connection(conn).execute(script)

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
        # 08: connection exceptions; 57P: operator intervention (shutdown); 40: serialization/deadlock;
        # 55P03: lock_not_available (lock_timeout); 57014: query_canceled (statement_timeout);
        # 25P03: idle_in_transaction_session_timeout
        if sqlstate.startswith(("08", "57P", "40")) or sqlstate in ("55P03", "57014", "25P03"):
            return True
        if isinstance(orig, psycopg.OperationalError):   # e.g. the elector's own connection was lost
            return True
        return super().is_transient(exc)


class PgListener(Listener):
    """A dedicated autocommit connection LISTENing on the queue and stop channels."""

    CHANNELS = ("dms_prcreq", "dms_stop")

    def __init__(self, conninfo: str, connect_args: dict[str, Any]) -> None:
        self.conn = psycopg.connect(conninfo, autocommit=True, **connect_args)
        for channel in self.CHANNELS:
            self.conn.execute(f"LISTEN {channel}")

    def fileno(self) -> int:
        return self.conn.fileno()

    def drain(self) -> list[tuple[str, str]]:
        return [(n.channel, n.payload) for n in self.conn.notifies(timeout=0)]

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.conn.close()


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
