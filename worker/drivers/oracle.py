"""Oracle driver (python-oracledb thin mode): cursor-fetch SKIP LOCKED claims, DBMS_LOCK leader, AQ wake-up.

Everything Oracle-specific the worker does is here. What differs from the portable verbs:

- The claim. Oracle refuses ``FETCH FIRST n`` or an ordered ROWNUM view with ``FOR UPDATE``
  (ORA-02014), and ``ROWNUM <= n ... SKIP LOCKED`` counts before skipping. So the claim opens
  an unlimited ordered ``FOR UPDATE SKIP LOCKED`` cursor and fetches exactly the free slots;
  ``prefetchrows`` and ``arraysize`` are set to that number first, because SKIP LOCKED locks
  every row shipped to the client. The select holds no LOB (a LOB disables prefetch).
- The clock is ``SYS_EXTRACT_UTC(SYSTIMESTAMP)``; timestamp columns are TIMESTAMP in UTC.
- Occurrence inserts treat ORA-00001 as "already there", row by row under a savepoint.
- VARCHAR2 limits count bytes (the default NLS_LENGTH_SEMANTICS), so text is clipped by bytes.
- Leadership by ``DBMS_LOCK.REQUEST`` on a dedicated connection, fenced by the lease epoch.
- Wake-ups by the optional AQ queue (``sql/oracle/aq_wakeup.sql``); polling when it is absent.
"""
from __future__ import annotations

import contextlib
import logging
import re
import socket
import threading
import time
from typing import Any, Iterator, Sequence

import oracledb
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from .. import schema as s
from .base import ClaimedRequest, ClaimParams, Listener, SessionLockElector, SQLDriver
from .oracle_script import split_script

log = logging.getLogger(__name__)

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_$#]*(\.[A-Za-z_][A-Za-z0-9_$#]*){0,2}$")
# DBMS_LOCK numeric ids run from 0 to 1073741823; ALLOCATE_UNIQUE is not needed for them.
MIGRATION_LOCK_ID = 0x3D6D7301
LEADER_LOCK_ID = 0x3D6D7302
WAKEUP_QUEUE = "DMS_WAKEUP_Q"

NOW_SQL = "SYS_EXTRACT_UTC(SYSTIMESTAMP)"

# Job lane. Ordered, unlimited, locked row by row as fetched; the caller fetches job_limit rows.
CLAIM_JOBS_SQL = f"""SELECT r.request_id FROM dms_prcreq r
WHERE r.status = 'NEW' AND r.not_before <= {NOW_SQL}
  AND r.request_type NOT IN ('STOP', 'REFRESH_SCHEDULE')
  AND NOT EXISTS (SELECT 1 FROM dms_prcreq b WHERE b.excl_key = r.mapref)
  AND NOT EXISTS (SELECT 1 FROM dms_job j WHERE j.mapref = r.mapref AND j.paused = 'Y')
ORDER BY r.priority DESC, r.not_before, r.requested_at
FOR UPDATE SKIP LOCKED"""

# Control lane (STOP, REFRESH_SCHEDULE): never waits behind jobs. {types} is a list of binds.
CLAIM_CONTROL_SQL = f"""SELECT r.request_id FROM dms_prcreq r
WHERE r.status = 'NEW' AND r.request_type IN ({{types}}) AND r.not_before <= {NOW_SQL}
ORDER BY r.requested_at
FOR UPDATE SKIP LOCKED"""

LOCK_REQUEST_SQL = ("BEGIN :result := DBMS_LOCK.REQUEST(id => :lock_id, lockmode => DBMS_LOCK.X_MODE, "
                    "timeout => :timeout_s, release_on_commit => FALSE); END;")
LOCK_RELEASE_SQL = "BEGIN :result := DBMS_LOCK.RELEASE(id => :lock_id); END;"
SESSION_ID_SQL = "SELECT SYS_CONTEXT('USERENV', 'SID') FROM dual"
SESSION_SERIAL_SQL = "SELECT serial# FROM v$session WHERE sid = SYS_CONTEXT('USERENV', 'SID')"
AQ_INSTALLED_SQL = ("SELECT COUNT(*) FROM all_queues WHERE name = :queue_name "
                    "AND owner = SYS_CONTEXT('USERENV', 'CURRENT_SCHEMA')")

# DBMS_LOCK.REQUEST results
_LOCK_OK, _LOCK_TIMEOUT, _LOCK_OWNED = 0, 1, 4
_LOCK_ERRORS = {2: "deadlock", 3: "parameter error", 5: "illegal lock handle"}

# Errors after which a retry (with a fresh connection) is worth it.
_TRANSIENT = {
    "ORA-00028", "ORA-00054", "ORA-00060", "ORA-01012", "ORA-01033", "ORA-01034", "ORA-01089", "ORA-01090",
    "ORA-02396", "ORA-03113", "ORA-03114", "ORA-03135", "ORA-12170", "ORA-12514", "ORA-12528", "ORA-12537",
    "ORA-12541", "ORA-25408", "ORA-30006",
    "DPY-1001", "DPY-4011", "DPY-4024", "DPY-6005",
}


def procedure_sql(name: str, nargs: int, counts: bool) -> str:
    if not _IDENT.match(name):
        raise ValueError(f"invalid procedure name {name!r}")
    binds = [f":a{i}" for i in range(nargs)] + ([":srcrows", ":trgrows", ":errrows"] if counts else [])
    return f"BEGIN {name}({', '.join(binds)}); END;"


def _error_code(exc: BaseException) -> str | None:
    orig = getattr(exc, "orig", exc)
    err = orig.args[0] if getattr(orig, "args", None) else None
    return getattr(err, "full_code", None)


def is_unique_violation(exc: BaseException) -> bool:
    return _error_code(exc) == "ORA-00001"


class OracleDriver(SQLDriver):
    name = "oracle"
    supports_procedures = True
    default_leader_mode = "lock"
    aq_recheck_s = 60.0

    def __init__(self, url: str, *, schema: str | None = None, engine: Engine | None = None,
                 pre_ping: bool = False) -> None:
        if schema is not None and not _IDENT.match(schema):
            raise ValueError(f"invalid schema name {schema!r}")
        super().__init__(url, schema=schema, engine=engine, pre_ping=pre_ping)
        self._aq_checked_at: float | None = None

    def _create_engine(self, url: str) -> Engine:
        u = sa.engine.make_url(url)
        if u.drivername == "oracle":
            u = u.set(drivername="oracle+oracledb")
        engine = sa.create_engine(u, pool_pre_ping=self.pre_ping, pool_size=4, max_overflow=4)
        sa.event.listen(engine, "connect", lambda dbapi_conn, _rec: self._on_connect(dbapi_conn))
        return engine

    def _on_connect(self, dbapi_conn: Any) -> None:
        if self.schema:
            with dbapi_conn.cursor() as cur:
                cur.execute(f"ALTER SESSION SET CURRENT_SCHEMA = {self.schema}")

    def connect_dedicated(self) -> Any:
        """A python-oracledb connection outside the pool, for session locks and waiting dequeues."""
        args, kwargs = self.engine.dialect.create_connect_args(self.engine.url)
        conn = oracledb.connect(*args, **kwargs)
        self._on_connect(conn)
        return conn

    # -- dialect hooks ---------------------------------------------------------------------
    def clock(self, offset_s: float = 0.0) -> sa.ColumnElement:
        now = sa.literal_column(NOW_SQL, s.Timestamp)
        if not offset_s:
            return now
        return sa.type_coerce(now + sa.func.numtodsinterval(sa.literal(float(offset_s), sa.Float()),
                                                           sa.literal("SECOND")), s.Timestamp)

    def _fit(self, text: str | None, limit: int) -> str | None:
        if text is None:
            return None
        data = text.encode("utf-8")
        return text if len(data) <= limit else data[:limit].decode("utf-8", errors="ignore")

    def request_claim(self, p: ClaimParams) -> list[ClaimedRequest]:
        c = s.prcreq.c
        with self.begin() as conn:
            ids: list[str] = []
            if p.control_types and p.control_limit > 0:
                binds = {f"t{i}": t for i, t in enumerate(p.control_types)}
                sql = CLAIM_CONTROL_SQL.format(types=", ".join(f":{k}" for k in binds))
                ids += self._fetch_locked(conn, sql, binds, p.control_limit)
            if p.job_limit > 0:
                ids += self._fetch_locked(conn, CLAIM_JOBS_SQL, {}, p.job_limit)
            if not ids:
                return []
            conn.execute(sa.update(s.prcreq).where(c.request_id.in_(ids), c.status == s.NEW).values(
                status=s.CLAIMED, claimed_by=p.worker_id, claimed_at=self.clock(),
                attempts=c.attempts + 1, stop_requested_at=None))
            rows = conn.execute(sa.select(*(c[name] for name in self._CLAIM_COLUMNS)).where(
                c.request_id.in_(ids), c.claimed_by == p.worker_id, c.status == s.CLAIMED)).all()
        return self._claimed(rows)

    @staticmethod
    def _fetch_locked(conn: Connection, sql: str, binds: dict[str, Any], n: int) -> list[str]:
        """Fetch and lock at most ``n`` rows of a SKIP LOCKED cursor: every row the server ships
        is locked, so the first round trip (prefetch) and any later one (arraysize) carry n."""
        cursor = conn.connection.driver_connection.cursor()
        try:
            cursor.prefetchrows = n
            cursor.arraysize = n
            cursor.execute(sql, binds)
            return [row[0] for row in cursor.fetchmany(n)]
        finally:
            cursor.close()

    def _insert_occurrences(self, conn: Connection, rows: list[dict[str, Any]]) -> int:
        inserted = 0
        for row in rows:
            try:
                with conn.begin_nested():
                    conn.execute(sa.insert(s.prcreq).values(**row))
                inserted += 1
            except sa.exc.IntegrityError as exc:
                if not is_unique_violation(exc):    # ORA-00001: the occurrence is already there
                    raise
        return inserted

    # -- leader and wake-ups ---------------------------------------------------------------
    def leader_elector(self, mode: str, ttl_s: float):
        if mode in ("auto", "lock"):
            return OracleLockElector(self, ttl_s)
        return super().leader_elector(mode, ttl_s)

    def listener(self) -> "AqListener | None":
        now = time.monotonic()
        if self._aq_checked_at is not None and now - self._aq_checked_at < self.aq_recheck_s:
            return None
        with self.engine.connect() as conn:
            installed = conn.execute(sa.text(AQ_INSTALLED_SQL), {"queue_name": WAKEUP_QUEUE}).scalar()
        if not installed:
            if self._aq_checked_at is None:
                log.info("AQ wake-up queue %s not installed; polling (see docs/oracle.md)", WAKEUP_QUEUE)
            self._aq_checked_at = now
            return None
        self._aq_checked_at = None
        name = f"{self.schema}.{WAKEUP_QUEUE}" if self.schema else WAKEUP_QUEUE
        return AqListener(self.connect_dedicated, name)

    # -- sessions, procedures, scripts -----------------------------------------------------
    def session_id(self, dbapi_conn: Any) -> str | None:
        with dbapi_conn.cursor() as cur:
            sid = cur.execute(SESSION_ID_SQL).fetchone()[0]
            try:
                serial = cur.execute(SESSION_SERIAL_SQL).fetchone()[0]
            except oracledb.DatabaseError:
                return str(sid)               # no SELECT on V$SESSION: id only, terminate is skipped
        return f"{sid},{serial}"

    def session_cancel(self, dbapi_conn: Any) -> None:
        dbapi_conn.cancel()

    def session_terminate(self, session_id: str) -> None:
        """Needs ALTER SYSTEM, which the least-privilege role does not have: then the server
        ends the session when it notices the killed client's socket closed."""
        if not re.fullmatch(r"\d+,\d+", session_id):
            return
        with self.engine.connect() as conn:
            conn.exec_driver_sql(f"ALTER SYSTEM KILL SESSION '{session_id}' IMMEDIATE")

    def procedure_call(self, conn: Connection, name: str, args: Sequence[Any],
                       counts: bool = False) -> tuple[int | None, int | None, int | None] | None:
        sql = procedure_sql(name, len(args), counts)
        cursor = conn.connection.driver_connection.cursor()
        try:
            binds: dict[str, Any] = {f"a{i}": v for i, v in enumerate(args)}
            outs = {}
            if counts:
                outs = {k: cursor.var(int) for k in ("srcrows", "trgrows", "errrows")}
                binds.update(outs)
            cursor.execute(sql, binds)
            return tuple(v.getvalue() for v in outs.values()) if counts else None
        finally:
            cursor.close()

    def run_script(self, conn: Connection, script: str) -> None:
        # DDL commits implicitly on Oracle: a failed script leaves its earlier statements applied.
        for statement in split_script(script):
            conn.exec_driver_sql(statement)

    @contextlib.contextmanager
    def migration_lock(self, conn: Connection) -> Iterator[None]:
        """A session lock, not a transaction one: DDL commits and would release the latter."""
        cursor = conn.connection.driver_connection.cursor()
        _lock_request(cursor, MIGRATION_LOCK_ID, timeout_s=600)
        try:
            yield
        finally:
            result = cursor.var(int)
            cursor.execute(LOCK_RELEASE_SQL, result=result, lock_id=MIGRATION_LOCK_ID)
            cursor.close()

    def is_transient(self, exc: BaseException) -> bool:
        code = _error_code(exc)
        # Refused logins that no retry can fix: invalid username/password (ORA-01017), no
        # CREATE SESSION (ORA-01045), account locked (ORA-28000), password expired (ORA-28001),
        # null password (ORA-01005); thin mode's "no credentials" (DPY-4001).
        if code in ("ORA-01017", "ORA-01045", "ORA-28000", "ORA-28001", "ORA-01005", "DPY-4001"):
            return False
        if code in _TRANSIENT:
            return True
        orig = getattr(exc, "orig", exc)
        err = orig.args[0] if getattr(orig, "args", None) else None
        if getattr(err, "isrecoverable", False):
            return True
        return super().is_transient(exc)


def _lock_request(cursor: Any, lock_id: int, timeout_s: int) -> int:
    result = cursor.var(int)
    cursor.execute(LOCK_REQUEST_SQL, result=result, lock_id=lock_id, timeout_s=timeout_s)
    code = result.getvalue()
    if code in _LOCK_ERRORS:
        raise RuntimeError(f"DBMS_LOCK.REQUEST({lock_id}) failed: {_LOCK_ERRORS[code]} ({code})")
    if code == _LOCK_TIMEOUT and timeout_s > 0:
        raise RuntimeError(f"DBMS_LOCK.REQUEST({lock_id}) timed out after {timeout_s}s")
    return code


class OracleLockElector(SessionLockElector):
    """Leadership by ``DBMS_LOCK.REQUEST`` (exclusive, timeout 0, kept across commits) held by a
    dedicated session outside the pool."""

    def _connect(self) -> Any:
        return self.driver.connect_dedicated()

    def _try_lock(self) -> bool:
        with self.conn.cursor() as cur:
            return _lock_request(cur, LEADER_LOCK_ID, timeout_s=0) != _LOCK_TIMEOUT   # 0, or 4: already ours

    def _ping(self) -> None:
        self.conn.ping()

    def _unlock(self) -> None:
        with self.conn.cursor() as cur:
            cur.execute(LOCK_RELEASE_SQL, result=cur.var(int), lock_id=LEADER_LOCK_ID)


class AqListener(Listener):
    """Waits on the AQ wake-up queue in a thread with its own connection (a waiting dequeue
    blocks its connection) and signals the control loop through a socket pair, so it can sit
    in the same ``select`` as everything else."""

    wait_s = 5

    def __init__(self, connect: Any, queue_name: str) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self.conn = connect()
        queue = self.conn.queue(queue_name)
        queue.deqoptions.wait = self.wait_s
        queue.deqoptions.visibility = oracledb.DEQ_IMMEDIATE
        self.queue = queue
        self._thread = threading.Thread(target=self._run, name="dms-aq-listener", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                messages = self.queue.deqmany(100)
            except Exception as exc:  # noqa: BLE001 - reported through drain()
                if not self._stop.is_set():
                    self._error = exc
                    self._signal(b"!")
                return
            if messages:
                self._signal(b"x")

    def _signal(self, byte: bytes) -> None:
        with contextlib.suppress(OSError):
            self._w.send(byte)

    def fileno(self) -> int:
        return self._r.fileno()

    def drain(self) -> set[str]:
        data = b""
        with contextlib.suppress(BlockingIOError, OSError):
            while chunk := self._r.recv(256):
                data += chunk
        if self._error is not None:
            raise self._error
        return {"dms_prcreq"} if data else set()

    def close(self) -> None:
        self._stop.set()
        with contextlib.suppress(Exception):
            self.conn.cancel()                      # interrupts a waiting dequeue
        self._thread.join(timeout=self.wait_s + 1)
        with contextlib.suppress(Exception):
            self.conn.close()
        self._r.close()
        self._w.close()
