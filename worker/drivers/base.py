"""The driver interface: every statement the worker issues, as noun-first verbs.

Modelled on River's driver: each verb takes one small params value, every state change of a
claimed row is conditional on the caller still owning it (status and ``claimed_by`` in the same
statement), and the ``*_many`` verbs let the services batch. ``SQLDriver`` implements the verbs
whose SQL is portable with SQLAlchemy Core; a database's driver subclasses it and supplies what
differs (clock, the claim, batched finishes, wake-ups, locks, sessions, scripts, and the bounds
on every wait). Core logic talks to this interface only and never asks which database it is on.

The hot path is two verbs: ``request_claim`` claims a batch and starts it (rows straight to
PROCESSING, their DMS_PRCLOG rows opened, the per-mapref exclusivity taken) and
``execution_finish_many`` closes a batch of executions. ``execution_complete_tx`` closes one
inside the execution's own transaction, so that a handler's database work commits together
with its request's outcome, and only while the request is still owned (River's JobCompleteTx).
"""
from __future__ import annotations

import contextlib
import enum
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from .. import schema as s


# ---------------------------------------------------------------------------------------------
# Values passed in and out of drivers
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClaimParams:
    worker_id: str
    job_limit: int                      # ready execution slots: never start more job rows
    control_types: tuple[str, ...] = (s.STOP,)
    control_limit: int = 10


@dataclass(frozen=True)
class JobDef:
    mapref: str
    handler: str
    timeout_s: int | None
    max_attempts: int
    retry_delay_s: int
    allow_overlap: bool
    enabled: bool
    params: str | None = None           # DMS_JOB.params: JSON object of handler defaults
    paused: bool = False


@dataclass(frozen=True)
class ClaimedRequest:
    request_id: str
    mapref: str
    request_type: str
    payload: str | None
    attempts: int
    requested_at: datetime | None
    jobschid: int | None = None
    scheduled_for: datetime | None = None
    not_before: datetime | None = None     # when it became due (requested_at, scheduled_for or a retry time)
    claimed_at: datetime | None = None     # the database clock at the claim
    priority: int = 0
    prcid: int | None = None               # started: PROCESSING with this DMS_PRCLOG row open
    job: JobDef | None = None

    @property
    def started(self) -> bool:
        return self.prcid is not None


class StartRefused(enum.Enum):
    BUSY = "busy"    # another execution of this mapref is running
    LOST = "lost"    # the row is no longer ours (rescued, cancelled)


@dataclass(frozen=True)
class ExecutionOpen:
    """The next DMS_PRCLOG row of a request we run (a HISTORY request's next day)."""
    request_id: str
    worker_id: str
    mapref: str
    attempt: int
    params: dict[str, str | None] = field(default_factory=dict)   # param1..param10


@dataclass(frozen=True)
class ExecutionAnnotate:
    """What a running execution's DMS_PRCLOG row should show: its params, its session."""
    prcid: int
    params: dict[str, str | None] | None = None
    sessionid: str | None = None


@dataclass(frozen=True)
class Reject:
    keyvalue: str | None
    errmsg: str
    dberrmsg: str | None = None


@dataclass(frozen=True)
class ExecutionFinish:
    """The end of one execution (one DMS_PRCLOG row) and, optionally, of its request."""
    request_id: str
    worker_id: str
    prcid: int
    mapref: str
    log_status: str                     # PC, FL or ST
    msg: str | None = None
    prcdt: datetime | None = None
    sessionid: str | None = None
    srcrows: int | None = None
    trgrows: int | None = None
    errrows: int | None = None
    rejects: tuple[Reject, ...] = ()
    error: tuple[str, str, str | None] | None = None   # (errtyp, errmsg, dberrmsg)
    request_status: str | None = None   # None: the request goes on (next HISTORY day)
    result_payload: str | None = None
    retry_delay_s: float = 0.0
    refund_attempt: bool = False        # hand-back: the attempt was not the job's fault
    jobschid: int | None = None         # a scheduled occurrence: on DONE, its dependents are enqueued
    scheduled_for: datetime | None = None
    params: dict[str, str | None] | None = None     # DMS_PRCLOG.param1..10, when not yet written


@dataclass(frozen=True)
class RequestResolve:
    """End (or hand back) a claimed request that has no open execution."""
    request_id: str
    worker_id: str
    status: str                         # DONE, FAILED, CANCELLED or NEW
    result_payload: str | None = None
    refund_attempt: bool = False
    retry_delay_s: float = 0.0


@dataclass(frozen=True)
class WorkerInfo:
    worker_id: str
    host: str
    pid: int
    version: str
    slots: int
    metrics_port: int | None = None
    rescue_after_s: float = 8.0         # this replica's own rescue window (it fences itself within it)


@dataclass(frozen=True)
class Heartbeat:
    worker_id: str
    running: int
    rescue_after_s: float


@dataclass(frozen=True)
class RescueParams:
    stale_after_s: float                # for replicas that recorded no expiry of their own
    limit: int = 500


@dataclass(frozen=True)
class RescueResult:
    requeued: tuple[str, ...] = ()
    failed: tuple[str, ...] = ()
    logs_closed: int = 0
    workers_removed: tuple[str, ...] = ()


@dataclass(frozen=True)
class StopParams:
    by: str                             # the STOP request's id
    mapref: str
    target_request_id: str | None = None


@dataclass(frozen=True)
class StopResult:
    cancelled: tuple[str, ...] = ()     # were NEW, now CANCELLED
    signalled: tuple[str, ...] = ()     # running: their owner will stop them
    reason: str | None = None           # why nothing matched


@dataclass(frozen=True)
class PruneParams:
    older_than_s: float
    limit: int = 1000


@dataclass(frozen=True)
class LeaderElect:
    worker_id: str
    ttl_s: float
    mode: str                           # lock or lease: recorded on the row for status
    force: bool = False                 # we hold the session lock: the row is ours whatever it says


@dataclass(frozen=True)
class LeaderTerm:
    worker_id: str
    epoch: int
    ttl_s: float = 0.0


@dataclass(frozen=True)
class LeaderResult:
    epoch: int | None                   # ours, or None: someone else leads
    expires_in: float | None = None     # seconds until the holder's lease expires (database clock)


@dataclass(frozen=True)
class ScheduleRow:
    jobschid: int
    mapref: str
    frqcd: str | None
    frqdd: str | None
    frqhh: Any
    frqmi: Any
    strtdt: datetime | None
    enddt: datetime | None
    misfire: str | None
    cronexp: str | None
    dpnd_jobschid: int | None
    lst_run_dt: datetime | None         # UTC; for a new version without one, its predecessor's
    nxt_run_dt: datetime | None
    params: str | None = None           # JSON overrides, copied into each occurrence's payload


@dataclass(frozen=True)
class OccurrenceEnqueue:
    """Due occurrences of one schedule, written by the leader holding lease ``epoch``."""
    worker_id: str
    epoch: int
    jobschid: int
    mapref: str
    scheduled_for: tuple[datetime, ...]     # UTC, naive
    lst_run_dt: datetime | None
    nxt_run_dt: datetime | None
    payload: str | None = None          # the schedule's params


LEADER_NAME = "scheduler"


class LeaderLockUnavailable(RuntimeError):
    """The session lock can never be had here (a missing grant): lead by the lease row."""


def occurrence_request_id(jobschid: int, scheduled_for: datetime) -> str:
    """Deterministic, so that a replayed insert is recognisably the same occurrence."""
    stamp = scheduled_for.strftime("%Y%m%dT%H%M%S") + (f".{scheduled_for.microsecond:06d}" if scheduled_for.microsecond else "")
    return f"sch{jobschid}-{stamp}Z"


def dumps(value: Any) -> str:
    """JSON text for a result column: ASCII only, so that no character the database cannot
    store (a NUL, half a surrogate pair) ever reaches it."""
    return json.dumps(value, default=str, separators=(",", ":"))


_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """Text every database here can store: NUL and lone surrogates become U+FFFD.

    Handlers raise with messages of their own making; one unstorable character in one message
    must not fail the batch that records it.
    """
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = _SURROGATE.sub("\ufffd", text)
    return text


def driver_connection(conn: Connection) -> Any:
    """The DBAPI driver's own connection (psycopg's, oracledb's) under ``conn``."""
    raw = conn.connection.driver_connection
    assert raw is not None      # Connection.connection revalidates: it never hands out a closed one
    return raw


# ---------------------------------------------------------------------------------------------
# The portable implementation
# ---------------------------------------------------------------------------------------------
class SQLDriver:
    """Verbs whose SQL is the same on every database; subclasses fill in the rest."""

    name = "abstract"
    supports_procedures = False
    supports_leader_lock = False        # a session lock (``leader_lock_*``) besides the lease row
    default_leader_mode = "lease"

    def __init__(self, url: str, *, schema: str | None = None, engine: Engine | None = None,
                 pre_ping: bool = False, statement_timeout_s: float | None = None) -> None:
        self.url = url
        self.schema = schema
        # The control loop retries (tenacity) and so needs no ping before each checkout;
        # handlers get a connection and no retry, so execution processes ask for one.
        self.pre_ping = pre_ping
        # How long one statement of the replica's own may take or wait (locks, a cut-off
        # network): bounded so that nothing holds the control loop past its fence. None for
        # execution processes, whose handlers' statements take as long as the job needs.
        self.statement_timeout_s = statement_timeout_s
        self.engine = engine or self._create_engine(url)

    # -- dialect hooks ---------------------------------------------------------------------
    def _create_engine(self, url: str) -> Engine:
        raise NotImplementedError

    def clock(self, offset_s: float = 0.0) -> sa.ColumnElement:
        """The database's current UTC time (plus an offset) as a SQL expression."""
        raise NotImplementedError

    def request_claim(self, p: ClaimParams) -> list[ClaimedRequest]:
        """Claim up to ``p.control_limit`` control requests (CLAIMED) and up to ``p.job_limit``
        job requests, and start the runnable ones: PROCESSING, attempts + 1, the mapref's
        exclusivity taken unless the job allows overlap, a DMS_PRCLOG row opened. At most one
        request per no-overlap mapref, none of a paused job, none of a mapref with a STOP
        waiting. Job requests that cannot run (no or a disabled DMS_JOB row, an unknown type)
        come back CLAIMED and unstarted for the caller to fail. Control requests first, then in
        queue order."""
        raise NotImplementedError

    def listener(self) -> Listener | None:
        """A wake-up channel (PostgreSQL LISTEN, Oracle AQ), or None to rely on polling."""
        return None

    def session_id(self, dbapi_conn: Any) -> str | None:
        return None

    def session_cancel(self, dbapi_conn: Any) -> None:
        """Cancel the statement running on ``dbapi_conn`` (called from another thread)."""

    def session_terminate(self, session_id: str) -> None:
        """Best effort: end a database session by id (after its process was killed)."""

    def procedure_call(self, conn: Connection, name: str, args: Sequence[Any], counts: bool = False, *,
                       truncate_flag: str | None = None) -> tuple[int | None, int | None, int | None] | None:
        """Call a stored procedure with (prcid, param1..param10), then ``truncate_flag`` ('Y' or
        'N') when given; with ``counts`` it also takes three INOUT row counts (source, target,
        error) and returns what it set them to."""
        raise NotImplementedError(f"sql: handlers are not supported on {self.name}")

    def execution_lock(self, conn: Connection, mapref: str, timeout_s: float) -> bool:
        """Take ``mapref``'s exclusivity in ``conn``'s own session (held across commits until
        ``execution_unlock`` or the session's end); False if still held after ``timeout_s``.

        For calls that run on the server (``sql:`` handlers): a stopped execution's process is
        gone at once, but its server session may go on with the call (a procedure that swallows
        the cancel, a server busy elsewhere) and commit. The next run of the mapref waits for
        that session here, not just for the request row's ``excl_key``."""
        return True

    def execution_unlock(self, conn: Connection, mapref: str) -> None:
        """Release what ``execution_lock`` took (before the connection goes back to the pool)."""

    def run_script(self, conn: Connection, script: str) -> None:
        raise NotImplementedError

    @contextlib.contextmanager
    def migration_lock(self, conn: Connection) -> Iterator[None]:
        """Serialise concurrent ``migrate`` runs; ``conn`` is held for the whole run."""
        yield

    def _bound_transaction(self, conn: Connection, timeout_s: float) -> None:
        """Make the rest of ``conn``'s transaction wait at most ``timeout_s`` on a lock, and let
        the server end it if the client stops talking in the middle (frozen, cut off)."""

    def is_transient(self, exc: BaseException) -> bool:
        """True for errors worth retrying after a back-off: lost connections, lock timeouts."""
        if isinstance(exc, sa.exc.DBAPIError) and exc.connection_invalidated:
            return True
        return isinstance(exc, (sa.exc.OperationalError, sa.exc.InterfaceError,
                                sa.exc.DisconnectionError, sa.exc.TimeoutError))

    def dispose(self) -> None:
        with contextlib.suppress(Exception):
            self.leader_lock_release()
        self.engine.dispose()

    def _fit(self, text: str | None, limit: int) -> str | None:
        """Storable text clipped to a column declared ``limit`` long (characters here)."""
        return None if text is None else clean_text(text)[:limit]

    # -- helpers ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def begin(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    @staticmethod
    def _owned(worker_id: str, *statuses: str) -> sa.ColumnElement:
        return sa.and_(s.prcreq.c.claimed_by == worker_id, s.prcreq.c.status.in_(statuses))

    _CLAIM_COLUMNS = ("request_id", "mapref", "request_type", "payload", "attempts", "requested_at",
                      "jobschid", "scheduled_for", "not_before", "claimed_at", "priority")

    @staticmethod
    def _job(row: Any) -> JobDef:
        return JobDef(mapref=row.mapref, handler=row.handler, timeout_s=row.timeout_s,
                      max_attempts=max(1, row.max_attempts or 1), retry_delay_s=max(0, row.retry_delay_s or 0),
                      allow_overlap=(row.allow_overlap or "N").upper() == "Y",
                      enabled=(row.enabled or "Y").upper() == "Y", params=row.params,
                      paused=(getattr(row, "paused", None) or "N").upper() == "Y")

    @classmethod
    def _claimed(cls, rows: Iterable[Any], prcids: dict[str, int], jobs: dict[str, JobDef],
                 order: Sequence[str] = ()) -> list[ClaimedRequest]:
        """Claimed rows as values: control requests first, then in queue order (``order``, the
        claim's own, breaks ties among rows requested in the same instant)."""
        rank = {rid: i for i, rid in enumerate(order)}
        claimed = [ClaimedRequest(**{c: row._mapping[c] for c in cls._CLAIM_COLUMNS},
                                  prcid=prcids.get(row._mapping["request_id"]), job=jobs.get(row._mapping["mapref"]))
                   for row in rows]
        claimed.sort(key=lambda r: (r.request_type not in s.CONTROL_TYPES, -(r.priority or 0),
                                    r.not_before or datetime.min, r.requested_at or datetime.min,
                                    rank.get(r.request_id, 0)))
        return claimed

    @staticmethod
    def _runnable(request_type: str, job: JobDef | None) -> bool:
        return job is not None and job.enabled and request_type in (s.IMMEDIATE, s.HISTORY)

    def _start_picked(self, conn: Connection, worker_id: str, picked: list[tuple[str, JobDef | None, str]],
                      control_ids: list[str]) -> list[ClaimedRequest]:
        """The portable second half of a claim, in the caller's transaction: mark what was
        picked (locked candidates, at most one per no-overlap mapref) and start the runnable.

        ``picked``: (request_id, job, request_type) of job rows, in queue order."""
        c, p = s.prcreq.c, s.prclog.c
        claim = dict(claimed_by=worker_id, claimed_at=self.clock(), attempts=c.attempts + 1, stop_requested_at=None)
        groups: dict[tuple[str, bool], list[str]] = {(s.CLAIMED, False): list(control_ids)}
        for rid, job, rtype in picked:
            runnable = self._runnable(rtype, job)
            groups.setdefault((s.PROCESSING if runnable else s.CLAIMED,
                               runnable and job is not None and not job.allow_overlap), []).append(rid)
        for (status, exclusive), group in groups.items():     # at most three statements
            if group:
                conn.execute(sa.update(s.prcreq).where(c.request_id.in_(group)).values(
                    status=status, excl_key=c.mapref if exclusive else None, **claim))
        ids = control_ids + [rid for rid, _, _ in picked]
        if not ids:
            return []
        mine = sa.and_(c.request_id.in_(ids), c.claimed_by == worker_id)
        conn.execute(sa.insert(s.prclog).from_select(
            ["mapref", "strtdt", "status", "request_id", "worker_id", "attempt"],
            sa.select(c.mapref, self.clock(), sa.literal(s.IN_PROGRESS), c.request_id, sa.literal(worker_id),
                      c.attempts).where(mine, c.status == s.PROCESSING)))
        opened = (sa.select(p.request_id, sa.func.max(p.prcid).label("prcid"))
                  .where(p.request_id.in_(ids), p.worker_id == worker_id, p.status == s.IN_PROGRESS)
                  .group_by(p.request_id).subquery())
        rows = conn.execute(sa.select(*(c[name] for name in self._CLAIM_COLUMNS), opened.c.prcid)
                            .select_from(s.prcreq.outerjoin(opened, opened.c.request_id == c.request_id))
                            .where(mine)).all()
        prcids = {row.request_id: int(row.prcid) for row in rows if row.prcid is not None}
        return self._claimed(rows, prcids, {job.mapref: job for _, job, _ in picked if job is not None}, ids)

    @staticmethod
    def _pick(candidates: Iterable[tuple[str, str, str, JobDef | None]], limit: int) -> list[tuple[str, JobDef | None, str]]:
        """From (request_id, mapref, request_type, job) in queue order: at most ``limit``, and
        at most one per no-overlap mapref (only one of them could start)."""
        picked: list[tuple[str, JobDef | None, str]] = []
        busy: set[str] = set()
        for rid, mapref, rtype, job in candidates:
            if len(picked) >= limit:
                break
            if SQLDriver._runnable(rtype, job) and job is not None and not job.allow_overlap:
                if mapref in busy:
                    continue
                busy.add(mapref)
            picked.append((rid, job, rtype))
        return picked

    # -- clock -----------------------------------------------------------------------------
    def now(self) -> datetime:
        with self.engine.connect() as conn:
            return conn.execute(sa.select(self.clock())).scalar_one()

    # -- jobs ------------------------------------------------------------------------------
    def job_get_many(self, maprefs: Iterable[str]) -> dict[str, JobDef]:
        with self.engine.connect() as conn:
            return self._jobs(conn, maprefs)

    def _jobs(self, conn: Connection, maprefs: Iterable[str]) -> dict[str, JobDef]:
        wanted = sorted(set(maprefs))
        if not wanted:
            return {}
        rows = conn.execute(sa.select(s.job).where(s.job.c.mapref.in_(wanted))).all()
        return {r.mapref: self._job(r) for r in rows}

    # -- executions ------------------------------------------------------------------------
    def execution_open(self, p: ExecutionOpen) -> int | Literal[StartRefused.LOST]:
        """Open the next DMS_PRCLOG row of a request we run (a HISTORY request's next day)."""
        c = s.prcreq.c
        with self.begin() as conn:
            owned = conn.execute(sa.update(s.prcreq).where(
                c.request_id == p.request_id, self._owned(p.worker_id, s.PROCESSING)).values(status=c.status)).rowcount
            if owned != 1:
                return StartRefused.LOST
            return int(conn.execute(sa.insert(s.prclog).values(
                mapref=p.mapref, strtdt=self.clock(), status=s.IN_PROGRESS, request_id=p.request_id,
                worker_id=p.worker_id, attempt=p.attempt,
                **self._param_columns(p.params),
            ).returning(s.prclog.c.prcid)).scalar_one())

    def execution_annotate_many(self, notes: Sequence[ExecutionAnnotate]) -> None:
        """Fill in the params and session of running executions (only while they run)."""
        with self.begin() as conn:
            for n in notes:
                values: dict[str, Any] = {}
                if n.params is not None:
                    values.update(self._param_columns(n.params))
                if n.sessionid is not None:
                    values["sessionid"] = self._fit(n.sessionid, 64)
                if values:
                    conn.execute(sa.update(s.prclog).where(s.prclog.c.prcid == n.prcid,
                                                           s.prclog.c.status == s.IN_PROGRESS).values(**values))

    def execution_finish_many(self, finishes: Sequence[ExecutionFinish]) -> list[bool]:
        """Close executions (PRCLOG, JOBLOG, JOBERR), their requests and dependents, in one
        transaction. Returns, per finish, whether we still owned the request; nothing is
        written for a request that is no longer ours (a rescuer already closed its log row).
        The caller never puts two finishes of one request in a batch."""
        with self.begin() as conn:
            return [self._finish_one(conn, f) for f in finishes]

    def execution_complete_tx(self, conn: Connection, f: ExecutionFinish, lock_timeout_s: float) -> bool:
        """Close one execution in ``conn``'s transaction, where the handler did its work: the
        caller commits both together if this returns True (still ours) and rolls both back
        otherwise. The ownership check locks the request row, so a rescuer waits for this
        transaction and cannot take the row while it commits."""
        self._bound_transaction(conn, lock_timeout_s)
        return self._finish_one(conn, f)

    def request_owned_tx(self, conn: Connection, request_id: str, worker_id: str, lock_timeout_s: float) -> bool:
        """In ``conn``'s transaction: is the request still ours and running? Locks its row, so
        that it stays ours until this transaction ends (a handler commits its work behind it)."""
        self._bound_transaction(conn, lock_timeout_s)
        return self._request_transition(conn, request_id, worker_id, None, (s.PROCESSING,))

    def _request_transition(self, conn: Connection, request_id: str, worker_id: str, status: str | None,
                            from_statuses: tuple[str, ...], result_payload: str | None = None,
                            retry_delay_s: float = 0.0, refund_attempt: bool = False) -> bool:
        c = s.prcreq.c
        stmt = sa.update(s.prcreq).where(c.request_id == request_id, self._owned(worker_id, *from_statuses))
        if status is None:
            stmt = stmt.values(status=c.status)      # ownership check, and a row lock
        elif status == s.NEW:
            stmt = stmt.values(status=s.NEW, claimed_by=None, claimed_at=None, excl_key=None,
                               stop_requested_at=None, not_before=self.clock(retry_delay_s),
                               attempts=c.attempts - 1 if refund_attempt else c.attempts,
                               result_payload=result_payload)
        else:
            stmt = stmt.values(status=status, completed_at=self.clock(), excl_key=None,
                               result_payload=result_payload)
        return conn.execute(stmt).rowcount == 1

    def _param_columns(self, params: dict[str, str | None]) -> dict[str, str | None]:
        """DMS_PRCLOG.param1..10 from a run's params, storable and clipped to their columns."""
        return {k: self._fit(params.get(k), 250) for k in s.PARAM_COLUMNS}

    def _finish_one(self, conn: Connection, f: ExecutionFinish) -> bool:
        if not self._request_transition(conn, f.request_id, f.worker_id, f.request_status, (s.PROCESSING,),
                                        f.result_payload, f.retry_delay_s, f.refund_attempt):
            return False
        params = self._param_columns(f.params) if f.params is not None else {}
        conn.execute(sa.update(s.prclog).where(s.prclog.c.prcid == f.prcid).values(
            status=f.log_status, enddt=self.clock(), msg=self._fit(f.msg, 4000), **params,
            **({"sessionid": self._fit(f.sessionid, 64)} if f.sessionid else {})))
        joblogid = conn.execute(sa.insert(s.joblog).values(
            prcdt=f.prcdt, mapref=f.mapref, srcrows=f.srcrows, trgrows=f.trgrows,
            errrows=f.errrows if f.errrows is not None else (len(f.rejects) or None),
            prcid=f.prcid, sessionid=self._fit(f.sessionid, 64), reccrdt=self.clock(),
        ).returning(s.joblog.c.joblogid)).scalar_one()
        errors = self._error_rows(f)
        if errors:
            conn.execute(sa.insert(s.joberr).values(joblogid=joblogid, prcdt=f.prcdt, prcid=f.prcid,
                                                    mapref=f.mapref), errors)
        if f.request_status == s.DONE and f.jobschid is not None and f.scheduled_for is not None:
            self._enqueue_dependents(conn, f.jobschid, f.scheduled_for)
        return True

    def _error_rows(self, f: ExecutionFinish) -> list[dict[str, Any]]:
        errors = [dict(errtyp="RECORD", errmsg=self._fit(r.errmsg, 4000), dberrmsg=self._fit(r.dberrmsg, 4000),
                       keyvalue=self._fit(r.keyvalue, 1000)) for r in f.rejects]
        if f.error:
            errtyp, errmsg, dberrmsg = f.error
            errors.append(dict(errtyp=errtyp, errmsg=self._fit(errmsg, 4000), dberrmsg=self._fit(dberrmsg, 4000),
                               keyvalue=None))
        return errors

    def _enqueue_dependents(self, conn: Connection, parent: int, scheduled_for: datetime) -> None:
        """Dependent schedules run once per successful parent occurrence, in the same transaction."""
        j = s.jobsch.c
        children = conn.execute(sa.select(j.jobschid, j.mapref, j.params).where(
            j.dpnd_jobschid == parent, j.curflg == "Y", j.schflg == "Y", j.invalid_reason.is_(None))).all()
        if not children:
            return
        self._insert_occurrences(conn, [
            dict(request_id=occurrence_request_id(c.jobschid, scheduled_for), mapref=c.mapref,
                 request_type=s.IMMEDIATE, payload=c.params, status=s.NEW, attempts=0, jobschid=c.jobschid,
                 scheduled_for=scheduled_for, requested_at=self.clock(), not_before=self.clock())
            for c in children])
        conn.execute(sa.update(s.jobsch).where(j.jobschid.in_([c.jobschid for c in children]))
                     .values(lst_run_dt=scheduled_for))

    def request_resolve_many(self, resolves: Sequence[RequestResolve]) -> list[bool]:
        with self.begin() as conn:
            return [self._request_transition(conn, r.request_id, r.worker_id, r.status, s.RUNNING_STATUSES,
                                             r.result_payload, r.retry_delay_s, r.refund_attempt)
                    for r in resolves]

    def history_days_done(self, request_id: str) -> set[str]:
        p = s.prclog.c
        with self.engine.connect() as conn:
            return set(conn.execute(sa.select(p.param1).where(
                p.request_id == request_id, p.status == s.COMPLETED)).scalars())

    # -- stop ------------------------------------------------------------------------------
    def request_stop(self, p: StopParams) -> StopResult:
        """Apply a STOP: cancel a NEW target, or flag running ones for their owner."""
        c = s.prcreq.c
        reason = f"stopped by STOP request {p.by}"
        with self.begin() as conn:
            if p.target_request_id is not None:
                cancelled = conn.execute(sa.update(s.prcreq).where(
                    c.request_id == p.target_request_id, c.status == s.NEW).values(
                    status=s.CANCELLED, completed_at=self.clock(),
                    result_payload=dumps({"cancelled": reason}))).rowcount
                if cancelled:
                    return StopResult(cancelled=(p.target_request_id,))
                target = c.request_id == p.target_request_id
            else:
                target = sa.and_(c.mapref == p.mapref, c.request_type.notin_(s.CONTROL_TYPES))
            running = conn.execute(sa.select(c.request_id).where(
                target, c.status.in_(s.RUNNING_STATUSES))).scalars().all()
            if running:
                conn.execute(sa.update(s.prcreq).where(c.request_id.in_(running),
                                                       c.status.in_(s.RUNNING_STATUSES),
                                                       c.stop_requested_at.is_(None))
                             .values(stop_requested_at=self.clock()))
                return StopResult(signalled=tuple(running))
            if p.target_request_id is None:
                return StopResult(reason=f"no running execution of mapref {p.mapref!r}")
            status = conn.execute(sa.select(c.status).where(c.request_id == p.target_request_id)).scalar()
            if status is None:
                return StopResult(reason=f"no request {p.target_request_id!r}")
            return StopResult(reason=f"request {p.target_request_id!r} already {status}")

    def request_stop_flags(self, worker_id: str) -> list[str]:
        """Requests of ours that a STOP asked to end."""
        c = s.prcreq.c
        with self.engine.connect() as conn:
            return list(conn.execute(sa.select(c.request_id).where(
                self._owned(worker_id, *s.RUNNING_STATUSES), c.stop_requested_at.is_not(None))).scalars())

    # -- replicas --------------------------------------------------------------------------
    def worker_register(self, info: WorkerInfo) -> None:
        with self.begin() as conn:
            conn.execute(sa.delete(s.worker).where(s.worker.c.worker_id == info.worker_id))
            conn.execute(sa.insert(s.worker).values(
                worker_id=info.worker_id, host=info.host[:255], pid=info.pid, version=info.version,
                slots=info.slots, running=0, metrics_port=info.metrics_port, is_leader="N",
                started_at=self.clock(), heartbeat_at=self.clock(), expires_at=self.clock(info.rescue_after_s)))

    def worker_heartbeat(self, p: Heartbeat) -> bool:
        """Refresh our heartbeat and the instant until which we count as alive (heartbeat plus
        our own rescue window); False means the cluster declared us dead (row removed)."""
        with self.begin() as conn:
            return conn.execute(sa.update(s.worker).where(s.worker.c.worker_id == p.worker_id).values(
                heartbeat_at=self.clock(), expires_at=self.clock(p.rescue_after_s), running=p.running)).rowcount == 1

    def worker_unregister(self, worker_id: str) -> None:
        with self.begin() as conn:
            conn.execute(sa.delete(s.worker).where(s.worker.c.worker_id == worker_id))

    def _live_workers(self, stale_after_s: float) -> sa.Select:
        """Replicas still alive by their own word (expires_at), or by a heartbeat newer than
        ``stale_after_s`` for those that recorded no expiry."""
        w = s.worker.c
        return sa.select(w.worker_id).where(sa.or_(
            w.expires_at >= self.clock(),
            sa.and_(w.expires_at.is_(None), w.heartbeat_at >= self.clock(-stale_after_s))))

    def request_rescue(self, p: RescueParams) -> RescueResult:
        """Return rows of dead replicas, and rows with no live owner at all (a DBA's NULL
        claimed_by, an owner that never existed), to NEW, or FAILED when out of attempts.

        Also closes their ``IP`` log rows with a DMS_JOBERR entry and removes the dead
        replicas' DMS_WORKER rows. Bounded per call; the caller repeats while work remains.
        """
        c, w, p_ = s.prcreq.c, s.worker.c, s.prclog.c
        live = self._live_workers(p.stale_after_s)
        max_attempts = sa.func.coalesce(
            sa.select(s.job.c.max_attempts).where(s.job.c.mapref == c.mapref).scalar_subquery(), 1)
        with self.begin() as conn:
            dead_workers = tuple(conn.execute(sa.select(w.worker_id).where(w.worker_id.notin_(live))).scalars())
            rows = conn.execute(sa.select(c.request_id, c.claimed_by, c.attempts, max_attempts.label("max_attempts"))
                                .where(c.status.in_(s.RUNNING_STATUSES),
                                       sa.or_(c.claimed_by.is_(None), c.claimed_by.notin_(live)))
                                .order_by(c.claimed_at).limit(p.limit)).all()
            requeued: list[str] = []
            failed: list[str] = []
            for r in rows:
                owner = c.claimed_by.is_(None) if r.claimed_by is None else c.claimed_by == r.claimed_by
                reason = (f"rescued: worker {r.claimed_by} stopped heartbeating" if r.claimed_by
                          else "rescued: it was running with no owner (claimed_by empty)")
                out_of_attempts = r.attempts >= r.max_attempts
                stmt = sa.update(s.prcreq).where(c.request_id == r.request_id, owner, c.status.in_(s.RUNNING_STATUSES))
                if out_of_attempts:
                    stmt = stmt.values(status=s.FAILED, completed_at=self.clock(), excl_key=None,
                                       result_payload=dumps({"error": f"{reason}; no attempts left"}))
                else:
                    stmt = stmt.values(status=s.NEW, claimed_by=None, claimed_at=None, excl_key=None,
                                       stop_requested_at=None, not_before=self.clock(),
                                       result_payload=dumps({"rescued": reason}))
                if conn.execute(stmt).rowcount == 1:
                    (failed if out_of_attempts else requeued).append(r.request_id)
            orphan_logs = conn.execute(sa.select(p_.prcid, p_.mapref, p_.worker_id).where(
                p_.status == s.IN_PROGRESS, sa.or_(p_.worker_id.is_(None), p_.worker_id.notin_(live))).limit(p.limit)).all()
            for log in orphan_logs:
                msg = f"worker {log.worker_id} lost (heartbeat stale); execution abandoned"
                conn.execute(sa.update(s.prclog).where(p_.prcid == log.prcid, p_.status == s.IN_PROGRESS)
                             .values(status=s.LOG_FAILED, enddt=self.clock(), msg=msg))
                conn.execute(sa.insert(s.joberr).values(errtyp="RESCUE", errmsg=msg, prcid=log.prcid,
                                                        mapref=log.mapref, prcdt=None))
            if dead_workers:
                conn.execute(sa.delete(s.worker).where(w.worker_id.in_(dead_workers), w.worker_id.notin_(live)))
        return RescueResult(tuple(requeued), tuple(failed), len(orphan_logs), dead_workers)

    def request_release_orphans(self, worker_id: str, known: Iterable[str]) -> list[str]:
        """Hand back rows claimed under our id that we do not know about.

        Happens when a claim committed but its acknowledgement was lost with the connection,
        or when a DBA set our id on a row by hand.
        """
        c = s.prcreq.c
        known = set(known)
        with self.begin() as conn:
            mine = conn.execute(sa.select(c.request_id).where(self._owned(worker_id, *s.RUNNING_STATUSES))).scalars()
            orphans = [rid for rid in mine if rid not in known]
            for rid in orphans:
                self._request_transition(conn, rid, worker_id, s.NEW, s.RUNNING_STATUSES,
                                         refund_attempt=True)
            if orphans:
                conn.execute(sa.update(s.prclog).where(
                    s.prclog.c.request_id.in_(orphans), s.prclog.c.worker_id == worker_id,
                    s.prclog.c.status == s.IN_PROGRESS).values(
                    status=s.STOPPED, enddt=self.clock(), msg="handed back after a lost connection"))
        return orphans

    # -- schedules (leader) ----------------------------------------------------------------
    def schedule_list(self) -> list[ScheduleRow]:
        """Current, enabled schedules. A new version with no lst_run_dt inherits the one of the
        newest earlier version of the same mapref, so that an edit does not replay or repeat."""
        j = s.jobsch.c
        prev = s.jobsch.alias("prev")
        inherited = (sa.select(sa.func.max(prev.c.lst_run_dt)).where(
            prev.c.mapref == j.mapref, prev.c.jobschid < j.jobschid, prev.c.curflg != "Y").scalar_subquery())
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(
                j.jobschid, j.mapref, j.frqcd, j.frqdd, j.frqhh, j.frqmi, j.strtdt, j.enddt, j.misfire, j.cronexp,
                j.dpnd_jobschid, sa.func.coalesce(j.lst_run_dt, inherited).label("lst_run_dt"), j.nxt_run_dt,
                j.params,
            ).where(j.curflg == "Y", j.schflg == "Y").order_by(j.jobschid)).all()
        return [ScheduleRow(**r._mapping) for r in rows]

    def _lease_valid(self, worker_id: str, epoch: int) -> sa.ColumnElement:
        l_ = s.leader.c
        return sa.exists().where(l_.name == LEADER_NAME, l_.holder == worker_id, l_.epoch == epoch,
                                 l_.expires_at > self.clock())

    def occurrence_enqueue(self, p: OccurrenceEnqueue) -> int | None:
        """Insert due occurrences (an occurrence already there is not an error) and move the
        schedule's lst/nxt_run_dt, only while ``p.epoch`` still holds the lease (fencing).
        Returns how many rows were new, or None when fenced off."""
        with self.begin() as conn:
            fenced = conn.execute(sa.update(s.jobsch).where(
                s.jobsch.c.jobschid == p.jobschid, self._lease_valid(p.worker_id, p.epoch),
            ).values(lst_run_dt=p.lst_run_dt, nxt_run_dt=p.nxt_run_dt)).rowcount == 0
            if fenced:
                return None
            if not p.scheduled_for:
                return 0
            return self._insert_occurrences(conn, [
                dict(request_id=occurrence_request_id(p.jobschid, t), mapref=p.mapref, request_type=s.IMMEDIATE,
                     payload=p.payload, status=s.NEW, attempts=0, jobschid=p.jobschid, scheduled_for=t,
                     requested_at=self.clock(), not_before=t) for t in p.scheduled_for])

    def _insert_occurrences(self, conn: Connection, rows: list[dict[str, Any]]) -> int:
        """Insert request rows, skipping those that already exist (by key or by occurrence);
        returns how many were inserted. Dialect-specific: INSERT ... ON CONFLICT DO NOTHING, or
        per-row inserts that treat a unique violation as "already there" (Oracle's ORA-00001)."""
        raise NotImplementedError

    def request_prune(self, p: PruneParams) -> int:
        """Delete finished requests completed more than ``p.older_than_s`` ago, at most ``p.limit``."""
        c = s.prcreq.c
        with self.begin() as conn:
            ids = conn.execute(sa.select(c.request_id).where(
                c.status.in_(s.TERMINAL_STATUSES), c.completed_at < self.clock(-p.older_than_s))
                .limit(p.limit)).scalars().all()
            if ids:
                conn.execute(sa.delete(s.prcreq).where(c.request_id.in_(ids), c.status.in_(s.TERMINAL_STATUSES)))
        return len(ids)

    def execution_prune(self, p: PruneParams) -> int:
        """Delete ended executions (DMS_PRCLOG) older than ``p.older_than_s``, at most
        ``p.limit``, together with their DMS_JOBLOG and DMS_JOBERR rows."""
        c = s.prclog.c
        with self.begin() as conn:
            ids = conn.execute(sa.select(c.prcid).where(c.status != s.IN_PROGRESS, c.enddt < self.clock(-p.older_than_s))
                               .limit(p.limit)).scalars().all()
            if ids:
                conn.execute(sa.delete(s.joberr).where(s.joberr.c.prcid.in_(ids)))
                conn.execute(sa.delete(s.joblog).where(s.joblog.c.prcid.in_(ids)))
                conn.execute(sa.delete(s.prclog).where(c.prcid.in_(ids)))
        return len(ids)

    # -- leader ----------------------------------------------------------------------------
    def leader_lease_take(self, p: LeaderElect) -> LeaderResult:
        """Take the lease row when it is free, expired or already ours (or whatever it says,
        with ``force``); the epoch goes up with every new term."""
        l_ = s.leader.c
        with self.begin() as conn:
            free = sa.or_(l_.holder.is_(None), l_.expires_at <= self.clock(), l_.holder == p.worker_id)
            taken = conn.execute(sa.update(s.leader).where(l_.name == LEADER_NAME, *(() if p.force else (free,)))
                                 .values(holder=p.worker_id, epoch=l_.epoch + 1, acquired_at=self.clock(),
                                         expires_at=self.clock(p.ttl_s), mode=p.mode)).rowcount
            if not taken:
                held = conn.execute(sa.select(l_.expires_at, self.clock()).where(l_.name == LEADER_NAME)).first()
                if held is not None:
                    expires_in = (held[0] - held[1]).total_seconds() if held[0] is not None else None
                    return LeaderResult(None, expires_in)
                try:
                    with conn.begin_nested():
                        conn.execute(sa.insert(s.leader).values(name=LEADER_NAME, holder=p.worker_id, epoch=1,
                                                                acquired_at=self.clock(), mode=p.mode,
                                                                expires_at=self.clock(p.ttl_s)))
                except sa.exc.IntegrityError:
                    return LeaderResult(None)      # another replica created it first
            epoch = conn.execute(sa.select(l_.epoch).where(l_.name == LEADER_NAME, l_.holder == p.worker_id)).scalar_one()
            w = s.worker.c
            conn.execute(sa.update(s.worker).where(w.is_leader == "Y", w.worker_id != p.worker_id).values(is_leader="N"))
            conn.execute(sa.update(s.worker).where(w.worker_id == p.worker_id).values(is_leader="Y"))
            return LeaderResult(int(epoch))

    def leader_lease_renew(self, p: LeaderTerm) -> bool:
        l_ = s.leader.c
        with self.begin() as conn:
            return conn.execute(sa.update(s.leader).where(l_.name == LEADER_NAME, l_.holder == p.worker_id,
                                                          l_.epoch == p.epoch)
                                .values(expires_at=self.clock(p.ttl_s))).rowcount == 1

    def leader_lease_resign(self, p: LeaderTerm) -> None:
        l_ = s.leader.c
        with self.begin() as conn:
            conn.execute(sa.update(s.leader).where(l_.name == LEADER_NAME, l_.holder == p.worker_id, l_.epoch == p.epoch)
                         .values(holder=None, expires_at=self.clock()))
            conn.execute(sa.update(s.worker).where(s.worker.c.worker_id == p.worker_id).values(is_leader="N"))

    def leader_lock_try(self) -> bool:
        """Try to take the leader's session lock (held by a dedicated session until released or
        until that session ends); True if we hold it now."""
        raise NotImplementedError(f"no session lock on {self.name}")

    _lock_conn: Any = None      # the dedicated session holding the leader's lock (drivers with one)

    def leader_lock_held(self) -> bool:
        """Whether the session that holds our lock is still there (a round trip on it)."""
        if self._lock_conn is None:
            return False
        try:
            self._lock_ping(self._lock_conn)
            return True
        except Exception:  # noqa: BLE001 - the session, and so the lock, is gone
            self.leader_lock_release()
            return False

    def leader_lock_release(self) -> None:
        """Release the lock and close its session (idempotent). Unlocked explicitly: closing
        the session releases it too, but only once the server has noticed, and a successor
        may be asking right now."""
        conn, self._lock_conn = self._lock_conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                self._lock_unlock(conn)
            with contextlib.suppress(Exception):
                conn.close()

    def _lock_ping(self, conn: Any) -> None:
        raise NotImplementedError

    def _lock_unlock(self, conn: Any) -> None:
        raise NotImplementedError

    # -- the queue as the leader's gauges see it -------------------------------------------
    def queue_depth(self) -> tuple[list[tuple[str, str, int]], float | None, int, int]:
        """Unfinished requests by status and type, age of the oldest NEW, executions running,
        and NEW requests held back by a paused job.

        One query over unfinished rows only (index-driven), for the leader's gauges: finished
        history is never counted, however large the table grows. A paused job's requests are
        not "waiting too long": an operator chose to hold them, so they count as paused and
        not towards the oldest NEW age (which pages).
        """
        c, j = s.prcreq.c, s.job.c
        # Waiting since it became due: a retry waiting out its delay is not an old request.
        due_since = sa.case((c.not_before <= self.clock(), c.not_before))
        # Literals, not binds: a server-side-bound driver sees two different $n in the SELECT and
        # the GROUP BY and refuses the grouping.
        paused = sa.case((j.paused == sa.literal_column("'Y'"), sa.literal_column("1")),
                         else_=sa.literal_column("0")).label("paused")
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(c.status, c.request_type, paused, sa.func.count().label("n"),
                                          sa.func.min(due_since).label("due_since"), self.clock().label("now"))
                                .select_from(s.prcreq.outerjoin(s.job, j.mapref == c.mapref))
                                .where(c.status.in_((s.NEW, *s.RUNNING_STATUSES)))
                                .group_by(c.status, c.request_type, paused)).all()
        counts: dict[tuple[str, str], int] = {}
        for r in rows:              # paused and not paused, summed back into one count per label set
            counts[(r.status, r.request_type)] = counts.get((r.status, r.request_type), 0) + int(r.n)
        depth = [(st, rt, n) for (st, rt), n in counts.items()]
        waiting = [r for r in rows if r.status == s.NEW]
        oldest = [(r.now - r.due_since).total_seconds() for r in waiting if not r.paused and r.due_since is not None]
        held = sum(int(r.n) for r in waiting if r.paused)
        running = sum(n for st, _, n in depth if st == s.PROCESSING)
        return depth, max(oldest) if oldest else None, running, held

    # -- the cluster as the database sees it -----------------------------------------------
    def cluster_status(self, recent_failures: int = 10, *, rescue_after_s: float = 8.0,
                       leader_mode: str | None = None) -> dict[str, Any]:
        """What ``dms-worker status`` shows, judged by the database clock (times: naive UTC).

        A replica is dead once its ``expires_at`` (its heartbeat plus its own rescue window,
        V003) has passed; for a row without one, once its heartbeat is older than
        ``rescue_after_s``. The lease is expired once ``expires_at`` has passed, whoever the
        row still names. ``leader_mode`` is shown when the lease row does not record its mode.
        NEW requests are counted by why they wait; executions whose replica is dead are
        marked orphaned (the rescue closes them).
        """
        c, w, p, j = s.prcreq.c, s.worker.c, s.prclog.c, s.jobsch.c
        with self.engine.connect() as conn:
            now = conn.execute(sa.select(self.clock())).scalar_one()
            workers = conn.execute(sa.select(s.worker).order_by(w.started_at)).mappings().all()
            lease = conn.execute(sa.select(s.leader).where(s.leader.c.name == LEADER_NAME)).mappings().first()
            depth = conn.execute(sa.select(c.status, c.request_type, sa.func.count()).group_by(
                c.status, c.request_type)).all()
            waiting = conn.execute(self._waiting_reasons()).all()
            running = conn.execute(sa.select(p.prcid, p.mapref, p.request_id, p.worker_id, p.strtdt, p.param1)
                                   .where(p.status == s.IN_PROGRESS).order_by(p.strtdt)).mappings().all()
            failures = conn.execute(sa.select(c.request_id, c.mapref, c.request_type, c.completed_at,
                                              c.result_payload).where(c.status == s.FAILED)
                                    .order_by(c.completed_at.desc()).limit(recent_failures)).mappings().all()
            flags = ("Y", "N")
            invalid = conn.execute(sa.select(j.jobschid, j.mapref, j.frqcd, j.dpnd_jobschid, j.invalid_reason,
                                             j.schflg, j.curflg)
                                   .where(sa.or_(sa.and_(j.invalid_reason.is_not(None), j.curflg == "Y"),
                                                 j.schflg.not_in(flags), j.curflg.not_in(flags)))
                                   .order_by(j.jobschid)).mappings().all()

        def seconds(later: datetime | None, earlier: datetime | None) -> float | None:
            return None if later is None or earlier is None else (later - earlier).total_seconds()

        replicas = []
        for r in workers:
            expires = r.get("expires_at")
            if expires is None:     # a replica that does not record its own window
                expires = r["heartbeat_at"] + timedelta(seconds=rescue_after_s)
            replicas.append(dict(r, heartbeat_age_s=seconds(now, r["heartbeat_at"]), alive=expires >= now,
                                 dead_for_s=None if expires >= now else seconds(now, expires)))
        alive = {r["worker_id"] for r in replicas if r["alive"]}
        mode = (lease.get("mode") if lease else None) or leader_mode or self.default_leader_mode
        leader = None
        last_leader = None
        if lease is not None and lease["holder"] is not None:
            info = dict(lease, mode=mode, expires_in_s=seconds(lease["expires_at"], now),
                        holder_alive=lease["holder"] in alive)
            if lease["expires_at"] is not None and lease["expires_at"] > now:
                leader = info
            else:
                last_leader = info
        return {
            "now": now,
            "timezone": "UTC",
            "leader_mode": mode,
            "workers": replicas,
            "leader": leader,
            "last_leader": last_leader,
            "queue": [{"status": st, "request_type": t, "count": n} for st, t, n in depth],
            "waiting": [{"reason": reason, "mapref": mapref, "count": int(n)} for reason, mapref, n in waiting],
            "running": [dict(r, age_s=seconds(now, r["strtdt"]), orphaned=r["worker_id"] not in alive)
                        for r in running],
            "invalid_schedules": [dict(r) for r in invalid],
            "recent_failures": [dict(r) for r in failures],
        }

    # Why a NEW request waits, in the order the claim would find the first obstacle.
    WAIT_REASONS = ("control", "not_due", "no_job", "disabled", "paused", "mapref_busy", "ready")

    def _waiting_reasons(self) -> sa.Select:
        c, jb = s.prcreq.c, s.job.c
        other = s.prcreq.alias("other")
        reason = sa.case(
            (c.request_type.in_(s.CONTROL_TYPES), sa.literal("control")),
            (c.not_before > self.clock(), sa.literal("not_due")),
            (jb.mapref.is_(None), sa.literal("no_job")),
            (jb.enabled != "Y", sa.literal("disabled")),
            (jb.paused == "Y", sa.literal("paused")),
            (sa.and_(jb.allow_overlap != "Y", sa.exists().where(other.c.excl_key == c.mapref)),
             sa.literal("mapref_busy")),
            else_=sa.literal("ready")).label("reason")
        rows = (sa.select(reason, c.mapref).select_from(s.prcreq.outerjoin(s.job, jb.mapref == c.mapref))
                .where(c.status == s.NEW).subquery())
        # Grouped outside: Oracle refuses a GROUP BY whose CASE carries other bind names.
        return sa.select(rows.c.reason, rows.c.mapref, sa.func.count()).group_by(rows.c.reason, rows.c.mapref)

    # -- schedule validity (leader) --------------------------------------------------------
    def schedule_states(self) -> dict[int, dict[str, Any]]:
        """Every DMS_JOBSCH row's identity and flags, current or not, for the leader's checks
        of dependencies (a missing or old parent, a cycle) and of ``invalid_reason``."""
        j = s.jobsch.c
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(j.jobschid, j.mapref, j.curflg, j.schflg, j.dpnd_jobschid,
                                          j.invalid_reason)).mappings().all()
        return {int(r["jobschid"]): dict(r) for r in rows}

    def schedule_set_invalid(self, worker_id: str, epoch: int, reasons: dict[int, str | None]) -> bool:
        """Write (or clear, with None) ``invalid_reason`` of the given rows, fenced by the
        leader's epoch; False when the lease is no longer ours. An invalid row never fires, so
        its ``nxt_run_dt`` is cleared with it; the scheduler sets it again once it is valid."""
        j = s.jobsch.c
        with self.begin() as conn:
            if conn.execute(sa.select(sa.literal(1)).where(self._lease_valid(worker_id, epoch))).first() is None:
                return False
            for jobschid, reason in sorted(reasons.items()):
                values: dict[str, Any] = {"invalid_reason": self._fit(reason, 1000)}
                if reason is not None:
                    values["nxt_run_dt"] = None
                conn.execute(sa.update(s.jobsch).where(j.jobschid == jobschid).values(**values))
        return True


class Listener:
    """A wake-up channel: readable ``fileno()``; ``drain()`` returns what fired, as
    (channel, payload) pairs (channels: ``dms_prcreq`` work may be waiting, ``dms_stop`` a
    running request was asked to stop; a ``dms_prcreq`` payload may name, as epoch seconds of
    the database clock, when a row that is not due yet becomes due)."""

    def fileno(self) -> int:
        raise NotImplementedError

    def drain(self) -> list[tuple[str, str]]:
        raise NotImplementedError

    def demand(self, free_slots: int) -> None:
        """How many requests this replica could start now (a channel whose wake-ups are taken
        one per listener, like an AQ queue, leaves them to idle replicas while this is 0)."""

    def close(self) -> None:
        pass
