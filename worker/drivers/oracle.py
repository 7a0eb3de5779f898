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
- Leadership by ``DBMS_LOCK.REQUEST`` on a dedicated connection, fenced by the lease epoch; the
  lock ids are derived from the tables' schema; without EXECUTE on DBMS_LOCK, the lease row.
- Wake-ups by the optional AQ queue (``sql/oracle/aq_wakeup.sql``); polling when it is absent,
  when python-oracledb is too old for it, and (backing off) after the listener failed.
- Every session starts with one ALTER SESSION (ISO NLS formats, CURRENT_SCHEMA), registered to
  run before SQLAlchemy records the default schema.
- ``sql:`` procedures run through SQLAlchemy (transaction, OUT binds, error text).
- Migrations resume after a half-applied version (DDL commits as it goes).
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import oracledb
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from .. import schema as s
from ..config import ConfigError
from .base import ClaimedRequest, ClaimParams, LeaderLockUnavailable, Listener, SQLDriver, driver_connection
from .oracle_script import split_script

log = logging.getLogger(__name__)

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_$#]*(\.[A-Za-z_][A-Za-z0-9_$#]*){0,2}$")   # [schema.][package.]name
# SCHEMA is one unquoted Oracle user name: ALTER SESSION SET CURRENT_SCHEMA takes no dotted name.
_SCHEMA = re.compile(r"^[A-Za-z][A-Za-z0-9_$#]{0,127}$")
# DBMS_LOCK numeric ids run from 0 to 1073741823 (ALLOCATE_UNIQUE hands out the ids above);
# they need no ALLOCATE_UNIQUE, but they are global to the database: each lock's id is derived
# from the schema that holds the tables (lock_id), so two deployments never share one.
LOCK_ID_MAX = 1073741823
LOCK_PURPOSES = ("migration", "leader")
WAKEUP_QUEUE = "DMS_WAKEUP_Q"
# Thin mode dequeues in bulk (Queue.deqmany) from python-oracledb 3.1 (release notes 3.1.0:
# "Added support for bulk enqueuing and dequeuing"); 3.0 had single messages only.
AQ_MIN_ORACLEDB = (3, 1)

NOW_SQL = "SYS_EXTRACT_UTC(SYSTIMESTAMP)"
NLS_DATE_FORMAT = "YYYY-MM-DD HH24:MI:SS"
NLS_TIMESTAMP_FORMAT = "YYYY-MM-DD HH24:MI:SS.FF6"

# Job lane. Ordered, unlimited, locked row by row as fetched; the caller fetches a few more rows
# than it has slots (at most one per no-overlap mapref can start) and starts what it picks.
CLAIM_JOBS_SQL = f"""SELECT r.request_id, r.mapref, r.request_type FROM dms_prcreq r
WHERE r.status = 'NEW' AND r.not_before <= {NOW_SQL}
  AND r.request_type NOT IN ('STOP', 'REFRESH_SCHEDULE')
  AND NOT EXISTS (SELECT 1 FROM dms_prcreq b WHERE b.excl_key = r.mapref)
  AND NOT EXISTS (SELECT 1 FROM dms_prcreq x WHERE x.status = 'NEW' AND x.request_type = 'STOP'
                                             AND x.mapref = r.mapref)
  AND NOT EXISTS (SELECT 1 FROM dms_job j WHERE j.mapref = r.mapref AND j.paused = 'Y')
ORDER BY r.priority DESC, r.not_before, r.requested_at
FOR UPDATE SKIP LOCKED"""

# Control lane (STOP, REFRESH_SCHEDULE): never waits behind jobs. {types} is a list of binds.
CLAIM_CONTROL_SQL = f"""SELECT r.request_id FROM dms_prcreq r
WHERE r.status = 'NEW' AND r.request_type IN ({{types}}) AND r.not_before <= {NOW_SQL}
ORDER BY r.request_type, r.requested_at
FOR UPDATE SKIP LOCKED"""

LOCK_REQUEST_SQL = ("BEGIN :result := DBMS_LOCK.REQUEST(id => :lock_id, lockmode => DBMS_LOCK.X_MODE, "
                    "timeout => :timeout_s, release_on_commit => FALSE); END;")
LOCK_RELEASE_SQL = "BEGIN :result := DBMS_LOCK.RELEASE(id => :lock_id); END;"
CURRENT_SCHEMA_SQL = "SELECT SYS_CONTEXT('USERENV', 'CURRENT_SCHEMA') FROM dual"
SESSION_ID_SQL = "SELECT SYS_CONTEXT('USERENV', 'SID'), SYS_CONTEXT('USERENV', 'INSTANCE') FROM dual"
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


_COUNT_BINDS = ("srcrows", "trgrows", "errrows")


def procedure_sql(name: str, nargs: int, counts: bool) -> str:
    if not _IDENT.match(name):
        raise ValueError(f"invalid procedure name {name!r}")
    binds = [f":a{i}" for i in range(nargs)] + ([f":{k}" for k in _COUNT_BINDS] if counts else [])
    return f"BEGIN {name}({', '.join(binds)}); END;"


def lock_id(schema: str, purpose: str) -> int:
    """The DBMS_LOCK id of ``purpose`` ('leader', 'migration', or 'mapref:NAME') for the tables
    in ``schema``.

    Stable across processes and versions (SHA-256, not Python's salted hash); a DBA finds it
    in V$LOCK (type UL, ID1) and ``dms-worker doctor`` prints it."""
    if purpose not in LOCK_PURPOSES and not purpose.startswith("mapref:"):
        raise ValueError(f"unknown lock purpose {purpose!r}")
    digest = hashlib.sha256(f"dms-worker:{purpose}:{schema.upper()}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % (LOCK_ID_MAX + 1)


def current_schema(cursor: Any) -> str:
    """The session's CURRENT_SCHEMA: the SCHEMA setting (set on connect), else the login user."""
    cursor.execute(CURRENT_SCHEMA_SQL)
    return str(cursor.fetchone()[0])


def missing_dbms_lock(exc: BaseException) -> bool:
    """PLS-00201 (inside ORA-06550): the user may not execute SYS.DBMS_LOCK. Not transient:
    only a grant by SYS fixes it."""
    orig = getattr(exc, "orig", exc)
    return _error_code(exc) == "ORA-06550" and "DBMS_LOCK" in str(orig).upper() and "PLS-00201" in str(orig)


def db_message(exc: BaseException) -> str:
    """The database's own message on one line: without python-oracledb's "Help:" link line."""
    lines = [line.strip() for line in str(getattr(exc, "orig", None) or exc).splitlines()]
    return " ".join(line for line in lines if line and not line.startswith("Help: "))[:1000]


DBMS_LOCK_FIX = "as SYS in the PDB: GRANT EXECUTE ON SYS.DBMS_LOCK TO {user}"


def aq_supported(version: str | None = None, thin: bool | None = None) -> bool:
    """Whether this python-oracledb can run the AQ listener (``deqmany``)."""
    parts = re.findall(r"\d+", version or oracledb.__version__)[:2]
    found = tuple(int(p) for p in parts) + (0,) * (2 - len(parts))
    thin = oracledb.is_thin_mode() if thin is None else thin
    return not thin or found >= AQ_MIN_ORACLEDB


# (statement kind, errors meaning "this statement's effect is already there")
_ALREADY_APPLIED = (
    (re.compile(r"ALTER\s+TABLE\s+\S+\s+ADD\s+CONSTRAINT\b", re.I), {"ORA-02264", "ORA-02261", "ORA-02275"}),
    (re.compile(r"ALTER\s+TABLE\s+\S+\s+ADD\b", re.I), {"ORA-01430"}),
    (re.compile(r"ALTER\s+TABLE\s+\S+\s+MODIFY\b", re.I), {"ORA-01442", "ORA-01451"}),
    (re.compile(r"CREATE\s+(UNIQUE\s+)?INDEX\b", re.I), {"ORA-00955", "ORA-01408"}),
    (re.compile(r"DROP\s+INDEX\b", re.I), {"ORA-01418"}),
)


def already_applied(statement: str, exc: BaseException) -> bool:
    """Whether ``exc`` says that ``statement`` (a migration step) had been applied before."""
    code = _error_code(exc)
    for kind, codes in _ALREADY_APPLIED:
        if kind.match(statement.lstrip()):
            return code in codes
    return False


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
                 pre_ping: bool = False, statement_timeout_s: float | None = None) -> None:
        if schema is not None and not _SCHEMA.match(schema):
            raise ConfigError(f"SCHEMA={schema!r}: must be one Oracle schema (user) name: a letter, then letters, "
                              "digits, _, $ or #; not a dotted or quoted name")
        super().__init__(url, schema=schema, engine=engine, pre_ping=pre_ping, statement_timeout_s=statement_timeout_s)
        self._aq_next_try = 0.0          # monotonic time before which listener() answers None
        self._aq_failures = 0
        self._aq_absent_logged = False

    def _create_engine(self, url: str) -> Engine:
        u = sa.engine.make_url(url)
        if u.drivername == "oracle":
            u = u.set(drivername="oracle+oracledb")
        engine = sa.create_engine(u, pool_pre_ping=self.pre_ping, pool_size=4, max_overflow=4)
        # insert=True: before SQLAlchemy's first-connect step, which records the session's
        # CURRENT_SCHEMA as the dialect's default schema (used by has_table and reflection).
        # Registered after it, the login user's schema was recorded and `migrate`, `run` and
        # the CSV load looked for the tables in the wrong schema.
        sa.event.listen(engine, "connect", lambda dbapi_conn, _rec: self._on_connect(dbapi_conn), insert=True)
        return engine

    def session_setup_sql(self) -> str:
        """One ALTER SESSION for every connection the worker opens.

        Thin mode ignores NLS_LANG and every NLS_* variable, so a session converts text with
        the database's default formats (often DD-MON-RR): ISO formats here, so that text
        bound into DATE/TIMESTAMP (a procedure's param1 day, a DBA's literal) means the same
        on every database. The worker itself binds datetimes, never text.
        """
        sql = f"ALTER SESSION SET NLS_DATE_FORMAT = '{NLS_DATE_FORMAT}' NLS_TIMESTAMP_FORMAT = '{NLS_TIMESTAMP_FORMAT}'"
        return sql + (f" CURRENT_SCHEMA = {self.schema}" if self.schema else "")

    def _on_connect(self, dbapi_conn: Any) -> None:
        if self.statement_timeout_s:
            # The replica's own round trips: none waits (a lock, a cut-off network) past this.
            dbapi_conn.call_timeout = int(self.statement_timeout_s * 1000)
        with dbapi_conn.cursor() as cur:
            cur.execute(self.session_setup_sql())

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
        # Oracle stores '' as NULL: say so, so that a comparison with it becomes IS NULL (the
        # replay lookup of an execution by param1 = '' never matched and opened a second log row).
        if text is None or text == "":
            return None
        data = text.encode("utf-8")
        return text if len(data) <= limit else data[:limit].decode("utf-8", errors="ignore")

    def history_days_done(self, request_id: str) -> set[str]:
        # '' reads back as NULL here: a day is never empty, so a NULL param1 is no day.
        return {day for day in super().history_days_done(request_id) if day}

    def request_claim(self, p: ClaimParams) -> list[ClaimedRequest]:
        with self.begin() as conn:
            control_ids: list[str] = []
            if p.control_types and p.control_limit > 0:
                binds = {f"t{i}": t for i, t in enumerate(p.control_types)}
                sql = CLAIM_CONTROL_SQL.format(types=", ".join(f":{k}" for k in binds))
                control_ids = [row[0] for row in self._fetch_locked(conn, sql, binds, p.control_limit)]
            picked = []
            if p.job_limit > 0:
                rows = self._fetch_locked(conn, CLAIM_JOBS_SQL, {}, 3 * p.job_limit + 5)
                # DMS_JOB.params is a CLOB: read the jobs apart from the locking cursor (a LOB
                # there would turn off prefetch and lock rows we never fetch).
                jobs = self._jobs(conn, {row[1] for row in rows})
                picked = self._pick(((rid, mapref, rtype, jobs.get(mapref)) for rid, mapref, rtype in rows), p.job_limit)
            return self._start_picked(conn, p.worker_id, picked, control_ids)

    @staticmethod
    def _fetch_locked(conn: Connection, sql: str, binds: dict[str, Any], n: int) -> list[tuple]:
        """Fetch and lock at most ``n`` rows of a SKIP LOCKED cursor: every row the server ships
        is locked, so the first round trip (prefetch) and any later one (arraysize) carry n."""
        cursor = driver_connection(conn).cursor()
        try:
            cursor.prefetchrows = n
            cursor.arraysize = n
            cursor.execute(sql, binds)
            return [tuple(row) for row in cursor.fetchmany(n)]
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
    supports_leader_lock = True
    _lock_id: int | None = None

    def leader_lock_try(self) -> bool:
        """``DBMS_LOCK.REQUEST`` (exclusive, timeout 0, kept across commits) on a dedicated
        session outside the pool, on the id derived from the tables' schema; 0 is success, 4
        means the lock is already ours. Without EXECUTE on SYS.DBMS_LOCK (PLS-00201) every
        attempt would fail alike: that says so once, with the grant that fixes it."""
        if self._lock_conn is None:
            self._lock_conn = self.connect_dedicated()
        try:
            with self._lock_conn.cursor() as cur:
                if self._lock_id is None:
                    self._lock_id = lock_id(current_schema(cur), "leader")
                return _lock_request(cur, self._lock_id, timeout_s=0) != _LOCK_TIMEOUT
        except Exception as exc:
            self.leader_lock_release()              # a lost session: the next attempt reconnects
            if missing_dbms_lock(exc):
                user = self.engine.url.username or "<user>"
                raise LeaderLockUnavailable(f"{user} may not execute SYS.DBMS_LOCK ({db_message(exc)}). Fix: "
                                            f"{DBMS_LOCK_FIX.format(user=user)} (or set DMS_LEADER_MODE=lease)") from exc
            raise

    def _lock_ping(self, conn: Any) -> None:
        conn.ping()

    def _lock_unlock(self, conn: Any) -> None:
        with conn.cursor() as cur:
            cur.execute(LOCK_RELEASE_SQL, result=cur.var(int), lock_id=self._lock_id)

    def listener(self) -> AqListener | None:
        """The AQ wake-up when it can work, else None (the replica polls).

        Called by the control loop whenever it has no listener, i.e. on every tick after a
        failure: so the catalog is asked at most every ``aq_recheck_s`` when the queue is
        absent, and after a listener failed the next one waits 2, 4, ... up to
        ``aq_recheck_s`` seconds, instead of a catalog query, a session and a thread per tick.
        """
        now = time.monotonic()
        if now < self._aq_next_try:
            return None
        if not aq_supported():
            log.warning("AQ wake-up needs python-oracledb >= %d.%d in thin mode (bulk dequeue), found %s; polling",
                        *AQ_MIN_ORACLEDB, oracledb.__version__)
            self._aq_next_try = float("inf")
            return None
        with self.engine.connect() as conn:
            installed = conn.execute(sa.text(AQ_INSTALLED_SQL), {"queue_name": WAKEUP_QUEUE}).scalar()
        if not installed:
            if not self._aq_absent_logged:
                log.info("AQ wake-up queue %s not installed; polling (see docs/oracle.md)", WAKEUP_QUEUE)
                self._aq_absent_logged = True
            self._aq_next_try = now + self.aq_recheck_s
            return None
        name = f"{self.schema}.{WAKEUP_QUEUE}" if self.schema else WAKEUP_QUEUE
        try:
            return AqListener(self.connect_dedicated, name, on_error=self._aq_failed)
        except Exception as exc:
            self._aq_failed(exc, lived_s=0.0)
            raise

    def _aq_failed(self, exc: BaseException, lived_s: float) -> None:
        """A listener could not start or died (from its thread): back off before the next."""
        self._aq_failures = 1 if lived_s > self.aq_recheck_s else self._aq_failures + 1
        delay = min(self.aq_recheck_s, 2.0 ** self._aq_failures)
        self._aq_next_try = time.monotonic() + delay
        log.warning("AQ wake-up failed (%s); polling, next try in %.0f s", db_message(exc), delay)

    # -- sessions, procedures, scripts -----------------------------------------------------
    def session_id(self, dbapi_conn: Any) -> str | None:
        """``SID,SERIAL#,@INST_ID``: the instance, because on RAC a SID is only unique per instance
        and ``KILL SESSION`` runs on any instance of the cluster."""
        with dbapi_conn.cursor() as cur:
            sid, instance = cur.execute(SESSION_ID_SQL).fetchone()
            try:
                serial = cur.execute(SESSION_SERIAL_SQL).fetchone()[0]
            except oracledb.DatabaseError:
                return str(sid)               # no SELECT on V$SESSION: id only, terminate is skipped
        return f"{sid},{serial},@{instance}" if instance else f"{sid},{serial}"

    def session_cancel(self, dbapi_conn: Any) -> None:
        dbapi_conn.cancel()

    def session_terminate(self, session_id: str) -> None:
        """Needs ALTER SYSTEM, which the least-privilege role does not have: then the server
        ends the session when it notices the killed client's socket closed."""
        if not re.fullmatch(r"\d+,\d+(,@\d+)?", session_id):
            return
        with self.engine.connect() as conn:
            conn.exec_driver_sql(f"ALTER SYSTEM KILL SESSION '{session_id}' IMMEDIATE")

    def procedure_call(self, conn: Connection, name: str, args: Sequence[Any],
                       counts: bool = False, *, truncate_flag: str | None = None,
                       ) -> tuple[int | None, int | None, int | None] | None:
        """``BEGIN name(:a0 .. :aN[, :truncate_flag][, :srcrows, :trgrows, :errrows]); END;``

        Through SQLAlchemy's ``execute``, not a raw cursor: a raw cursor does not begin
        SQLAlchemy's transaction, so the executor saw ``in_transaction()`` false, skipped its
        commit, and the pool's reset rolled the procedure's work back while the request ended
        DONE. ``execute`` also wraps a database error with ``.orig`` (the ORA- text that goes to
        DMS_JOBERR.dberrmsg) and notices a lost connection. The counts are OUT binds
        (``sa.outparam``); ``truncate_flag`` ('Y'/'N'), when given, is one more IN argument
        after param10 (jobs opt in: docs/jobs.md).
        """
        values = list(args) + ([truncate_flag] if truncate_flag is not None else [])
        stmt = sa.text(procedure_sql(name, len(values), counts))
        if counts:
            stmt = stmt.bindparams(*(sa.outparam(k, sa.Integer()) for k in _COUNT_BINDS))
        result = conn.execute(stmt, {f"a{i}": v for i, v in enumerate(values)})
        if not counts:
            return None
        # Documented (sa.outparam) and set at run time by the dialect, but not declared on CursorResult.
        out: dict[str, Any] = result.out_parameters  # type: ignore[attr-defined]
        srcrows, trgrows, errrows = (None if out.get(k) is None else int(out[k]) for k in _COUNT_BINDS)
        return srcrows, trgrows, errrows

    _execution_lock_missing = False

    def execution_lock(self, conn: Connection, mapref: str, timeout_s: float) -> bool:
        """``DBMS_LOCK.REQUEST`` in the execution's own session on the mapref's id, kept across
        commits: held until released, or until the server has really ended that session's call.

        Without EXECUTE on SYS.DBMS_LOCK (which doctor reports as a warning, since the leader
        then leads by the lease row) the run goes on, exclusive by its request row only, as
        before this lock existed: failing every ``sql:`` run of a no-overlap job would be worse.
        That is said once per process, with the grant that restores the server-side guard."""
        if self._execution_lock_missing:
            return True
        cursor = driver_connection(conn).cursor()
        try:
            ident = lock_id(current_schema(cursor), f"mapref:{mapref}")
            return _lock_request(cursor, ident, timeout_s=max(0, int(round(timeout_s))), quiet=True) != _LOCK_TIMEOUT
        except Exception as exc:
            if not missing_dbms_lock(exc):
                raise
            self._execution_lock_missing = True
            user = self.engine.url.username or "<user>"
            log.warning("%s may not execute SYS.DBMS_LOCK (%s): a stopped sql: call that goes on on the "
                        "server is not waited for by the next run of its mapref. Fix: %s", user,
                        db_message(exc), DBMS_LOCK_FIX.format(user=user))
            return True
        finally:
            cursor.close()

    def execution_unlock(self, conn: Connection, mapref: str) -> None:
        if self._execution_lock_missing:
            return
        cursor = driver_connection(conn).cursor()
        try:
            ident = lock_id(current_schema(cursor), f"mapref:{mapref}")
            cursor.execute(LOCK_RELEASE_SQL, result=cursor.var(int), lock_id=ident)
        finally:
            cursor.close()

    def run_script(self, conn: Connection, script: str) -> None:
        """Run a migration statement by statement, resuming one that stopped half-way.

        Oracle DDL commits as it goes, so a version that failed after some statements keeps
        them, and is not recorded: the next ``migrate`` runs it again from the top. A statement
        whose effect is already there fails with the error that says so (column, constraint or
        index already exists; index already dropped): that is skipped, with a warning, and the
        rest applies. ``CREATE TABLE`` is never skipped: an existing table of that name may be
        someone else's (the seed application's), and adopting it silently would be worse.
        """
        for statement in split_script(script):
            try:
                conn.exec_driver_sql(statement)
            except sa.exc.DatabaseError as exc:
                if not already_applied(statement, exc):
                    raise
                log.warning("migration step already applied (an earlier run stopped after it), skipped: %s (%s)",
                            " ".join(statement.split())[:100], _error_code(exc))

    @contextlib.contextmanager
    def migration_lock(self, conn: Connection) -> Iterator[None]:
        """A session lock, not a transaction one: DDL commits and would release the latter."""
        cursor = driver_connection(conn).cursor()
        ident = lock_id(current_schema(cursor), "migration")
        try:
            _lock_request(cursor, ident, timeout_s=600)
        except oracledb.DatabaseError as exc:
            cursor.close()
            if missing_dbms_lock(exc):
                raise RuntimeError("migrate serialises itself with DBMS_LOCK, which this user may not execute: "
                                   + DBMS_LOCK_FIX.format(user=self.engine.url.username or "<user>")) from None
            raise
        try:
            yield
        finally:
            result = cursor.var(int)
            cursor.execute(LOCK_RELEASE_SQL, result=result, lock_id=ident)
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


def _lock_request(cursor: Any, lock_id: int, timeout_s: int, quiet: bool = False) -> int:
    """DBMS_LOCK.REQUEST's result; a timeout with ``timeout_s`` > 0 raises unless ``quiet``."""
    result = cursor.var(int)
    cursor.execute(LOCK_REQUEST_SQL, result=result, lock_id=lock_id, timeout_s=timeout_s)
    code = result.getvalue()
    if code in _LOCK_ERRORS:
        raise RuntimeError(f"DBMS_LOCK.REQUEST({lock_id}) failed: {_LOCK_ERRORS[code]} ({code})")
    if code == _LOCK_TIMEOUT and timeout_s > 0 and not quiet:
        raise RuntimeError(f"DBMS_LOCK.REQUEST({lock_id}) timed out after {timeout_s}s")
    return code


class AqListener(Listener):
    """Waits on the AQ wake-up queue in a thread with its own connection (a waiting dequeue
    blocks its connection) and signals the control loop through a socket pair, so it can sit
    in the same ``select`` as everything else.

    The queue has one consumer: each wake-up message goes to one listener. A replica with no
    free slot stops dequeuing (``demand``), and one with free slots takes at most that many, so
    the wake-ups reach the replicas that can act on them.
    """

    wait_s = 5

    def __init__(self, connect: Any, queue_name: str,
                 on_error: Callable[[BaseException, float], None] | None = None) -> None:
        self._r, self._w = socket.socketpair()
        self._r.setblocking(False)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._on_error = on_error
        self._started = time.monotonic()
        self._free = 1
        self._wanted = threading.Event()
        self._wanted.set()
        self.conn = connect()
        try:
            queue = self.conn.queue(queue_name)
            queue.deqoptions.wait = self.wait_s
            queue.deqoptions.visibility = oracledb.DEQ_IMMEDIATE
        except Exception:
            self.conn.close()
            self._r.close()
            self._w.close()
            raise
        self.queue = queue
        self._thread = threading.Thread(target=self._run, name="dms-aq-listener", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._wanted.wait(0.5):
                continue                            # no free slot: leave the wake-ups to others
            try:
                messages = self.queue.deqmany(max(1, min(self._free, 100)))
            except Exception as exc:  # noqa: BLE001 - reported through drain()
                if not self._stop.is_set():
                    self._error = exc
                    if self._on_error is not None:
                        with contextlib.suppress(Exception):
                            self._on_error(exc, time.monotonic() - self._started)
                    self._signal(b"!")
                return
            if messages:
                self._signal(b"x")

    def demand(self, free_slots: int) -> None:
        self._free = free_slots
        if free_slots > 0:
            self._wanted.set()
        else:
            self._wanted.clear()

    def _signal(self, byte: bytes) -> None:
        with contextlib.suppress(OSError):
            self._w.send(byte)

    def fileno(self) -> int:
        return self._r.fileno()

    def drain(self) -> list[tuple[str, str]]:
        data = b""
        with contextlib.suppress(BlockingIOError, OSError):
            while chunk := self._r.recv(256):
                data += chunk
        if self._error is not None:
            raise self._error
        return [("dms_prcreq", "")] if data else []

    def close(self) -> None:
        self._stop.set()
        self._wanted.set()
        with contextlib.suppress(Exception):
            self.conn.cancel()                      # interrupts a waiting dequeue
        self._thread.join(timeout=self.wait_s + 1)
        with contextlib.suppress(Exception):
            self.conn.close()
        self._r.close()
        self._w.close()
