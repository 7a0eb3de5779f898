"""The Python client: what a web application and an operator do to the queue, in one place.

The CLI (``dms-worker requests|job|schedule ...``) and the web console call these same
functions, so an action leaves the same rows whichever way it was taken, and a DBA sees
exactly what a plain ``UPDATE`` would have left.

Every function takes a SQLAlchemy ``Connection`` and runs in the caller's transaction: the
change exists when the caller commits, together with the caller's own changes, and not before.
(An ``Engine`` is accepted too; the call then commits on its own.) Inserts write only the
columns given; the database fills in status, times and attempts. Operator actions are single
conditional statements (the status checked in the same ``UPDATE``), so an action on a row that
changed meanwhile does nothing and says why: ``LookupError`` for a row that does not exist,
``ActionRefused`` for one whose state does not allow it.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import json
import uuid
from collections.abc import Iterator
from datetime import date
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from . import schema as s

ACTIVE_STATUSES = (s.NEW, *s.RUNNING_STATUSES)      # a unique key is held while in one of these
RETRYABLE_STATUSES = (s.FAILED, s.CANCELLED)
UNIQUE_KEY_MAX = 200                                  # dms_prcreq.unique_key VARCHAR(200)
_INT32 = 2 ** 31


class ActionRefused(Exception):
    """The row exists but its state does not allow the action (e.g. retry of a DONE request)."""


class DuplicateRequest(ActionRefused):
    """``enqueue(..., unique_key=K, on_duplicate="refuse")`` while a request holding ``K`` waits
    or runs. ``request_id`` is that request's id."""

    def __init__(self, unique_key: str, request_id: str) -> None:
        super().__init__(f"unique key {unique_key!r} is held by request {request_id}, which is waiting or running")
        self.unique_key, self.request_id = unique_key, request_id


@contextlib.contextmanager
def _conn(bind: Connection | Engine) -> Iterator[Connection]:
    if isinstance(bind, Engine):
        with bind.begin() as conn:
            yield conn
    else:
        yield bind


@functools.cache
def _driver_class(dialect: str) -> type:
    from .drivers.oracle import OracleDriver
    from .drivers.postgresql import PostgresDriver
    from .drivers.sqlite import SQLiteDriver
    return {"postgresql": PostgresDriver, "sqlite": SQLiteDriver, "oracle": OracleDriver}[dialect]


def clock(conn: Connection, offset_s: float = 0.0) -> sa.ColumnElement:
    """The database's UTC now (plus an offset) as a SQL expression, exactly as the worker writes
    it (its drivers' ``clock()``), so that times set here compare correctly with the worker's.
    Built on the caller's engine: no new pool."""
    cls = _driver_class(conn.dialect.name)
    return cls(conn.engine.url.render_as_string(hide_password=False), engine=conn.engine).clock(offset_s)


def _dumps(value: Any) -> str:
    return json.dumps(value, default=str, separators=(",", ":"))


# -- enqueue ---------------------------------------------------------------------------------------
def enqueue(bind: Connection | Engine, mapref: str, *, request_type: str = s.IMMEDIATE,
            payload: dict[str, Any] | None = None, request_id: str | None = None,
            priority: int | None = None, unique_key: str | None = None, on_duplicate: str = "merge",
            **params: Any) -> str:
    """Queue a request; ``params`` (param1=..., truncate_flag=...) go into the JSON payload.

    ``priority``: higher is claimed first (default 0; any 32-bit integer). ``unique_key``: at most
    one request with this key waits or runs at a time, enforced by a unique index. A second
    enqueue with the key of a waiting or running request is *merged* by default: nothing is
    inserted and the existing request's id is returned (what a double click in a web form
    wants). ``on_duplicate="refuse"`` raises ``DuplicateRequest`` instead. Once the holder has
    ended (DONE, FAILED, CANCELLED), the key is free again.
    """
    if request_type not in s.REQUEST_TYPES:
        raise ValueError(f"unknown request_type {request_type!r}")
    if on_duplicate not in ("merge", "refuse"):
        raise ValueError(f"on_duplicate must be 'merge' or 'refuse', not {on_duplicate!r}")
    values: dict[str, Any] = dict(request_id=request_id or str(uuid.uuid4()), mapref=mapref, request_type=request_type)
    body = dict(payload or {}, **params)
    values["payload"] = _dumps(body) if body else None
    if priority is not None:
        if isinstance(priority, bool) or not isinstance(priority, int) or not -_INT32 <= priority < _INT32:
            raise ValueError(f"priority must be an integer between {-_INT32} and {_INT32 - 1}, not {priority!r}")
        values["priority"] = priority
    if unique_key is not None:
        if not isinstance(unique_key, str) or not unique_key.strip() or len(unique_key) > UNIQUE_KEY_MAX:
            raise ValueError(f"unique_key must be a non-empty string of at most {UNIQUE_KEY_MAX} characters")
        values["unique_key"] = unique_key
    with _conn(bind) as conn:
        if unique_key is None:
            conn.execute(sa.insert(s.prcreq).values(**values))
            return values["request_id"]
        return _insert_unique(conn, values, on_duplicate)


def _insert_unique(conn: Connection, values: dict[str, Any], on_duplicate: str) -> str:
    key = values["unique_key"]
    c = s.prcreq.c
    for _ in range(3):
        refused = _try_insert(conn, values)
        if refused is None:
            return values["request_id"]
        holder = conn.execute(sa.select(c.request_id).where(
            c.unique_key == key, c.status.in_(ACTIVE_STATUSES))).scalar()
        if holder is not None:
            if on_duplicate == "refuse":
                raise DuplicateRequest(key, holder)
            return holder
        if isinstance(refused, BaseException):
            raise refused        # not the unique key after all (a duplicate request_id, say)
        # The holder ended between our insert and the lookup: the key is free, try again.
    raise ActionRefused(f"unique key {key!r} is contended; try again")


_UPSERT_DIALECTS = {"postgresql", "sqlite"}


def _try_insert(conn: Connection, values: dict[str, Any]) -> bool | BaseException | None:
    """Insert unless an active request holds the unique key: None when inserted, True when
    the unique-key index refused it, or the IntegrityError when some constraint did.

    The caller's transaction must survive a refusal. PostgreSQL aborts a transaction on any
    error, so there (and on SQLite) the insert says ``ON CONFLICT DO NOTHING`` for that one
    partial index, which also waits for a concurrent inserter of the same key and so is
    race-free. Elsewhere (Oracle: ORA-00001 arrives as IntegrityError) a savepoint contains the
    failure. (SQLite would not do with a savepoint: pysqlite starts no transaction before a
    SAVEPOINT, so releasing it would commit the caller's work.)"""
    dialect = conn.dialect.name
    if dialect in _UPSERT_DIALECTS:
        from sqlalchemy.dialects.postgresql import insert as pg_insert
        from sqlalchemy.dialects.sqlite import insert as sqlite_insert
        insert = (pg_insert if dialect == "postgresql" else sqlite_insert)(s.prcreq).values(**values)
        stmt = insert.on_conflict_do_nothing(
            index_elements=["unique_key"],
            # Literals, as in the index's own predicate: the database matches it to the index.
            index_where=s.prcreq.c.status.in_([sa.literal_column(f"'{st}'") for st in ACTIVE_STATUSES]),
        ).returning(s.prcreq.c.request_id)
        return None if conn.execute(stmt).first() is not None else True
    try:
        with conn.begin_nested():
            conn.execute(sa.insert(s.prcreq).values(**values))
        return None
    except sa.exc.IntegrityError as exc:
        return exc


def enqueue_history(bind: Connection | Engine, mapref: str, start_date: date | str, end_date: date | str,
                    **params: Any) -> str:
    """One run per day from ``start_date`` to ``end_date``, in order (param1 = the day).
    Keyword arguments are those of ``enqueue`` (priority, unique_key, ...) or payload params."""
    return enqueue(bind, mapref, request_type=s.HISTORY,
                   payload={"start_date": str(start_date), "end_date": str(end_date)}, **params)


# -- stop, cancel, retry -----------------------------------------------------------------------------
def request_stop(bind: Connection | Engine, *, request_id: str | None = None, mapref: str | None = None) -> str:
    """Stop one request (queued: cancelled; running: stopped), or the running executions of a mapref.

    Inserts a STOP request, which a replica applies: it terminates the execution wherever it
    runs. Returns the STOP request's id."""
    if request_id is None and mapref is None:
        raise ValueError("give request_id or mapref")
    if mapref is None:
        with _conn(bind) as conn:
            mapref = conn.execute(sa.select(s.prcreq.c.mapref).where(s.prcreq.c.request_id == request_id)).scalar()
        if mapref is None:
            raise LookupError(f"no request {request_id!r}")
    return enqueue(bind, mapref, request_type=s.STOP, payload={"request_id": request_id} if request_id else None)


def _status(conn: Connection, request_id: str) -> str:
    status = conn.execute(sa.select(s.prcreq.c.status).where(s.prcreq.c.request_id == request_id)).scalar()
    if status is None:
        raise LookupError(f"no request {request_id!r}")
    return status


def stop(bind: Connection | Engine, request_id: str) -> str:
    """Stop a running request (CLAIMED or PROCESSING) through a STOP request; returns its id.

    A waiting request is refused (cancel it instead), as is one that has ended."""
    with _conn(bind) as conn:
        status = _status(conn, request_id)
        if status == s.NEW:
            raise ActionRefused(f"request {request_id} is waiting (NEW), not running: cancel it instead")
        if status not in s.RUNNING_STATUSES:
            raise ActionRefused(f"request {request_id} has already ended ({status}): nothing to stop")
        return request_stop(conn, request_id=request_id)


def cancel(bind: Connection | Engine, request_id: str, *, by: str = "client") -> None:
    """A waiting (NEW) request becomes CANCELLED at once, without running; ``by`` is recorded in
    ``result_payload`` (``{"cancelled": "cancelled by ..."}``, as a STOP leaves it)."""
    c = s.prcreq.c
    with _conn(bind) as conn:
        done = conn.execute(sa.update(s.prcreq).where(c.request_id == request_id, c.status == s.NEW).values(
            status=s.CANCELLED, completed_at=clock(conn),
            result_payload=_dumps({"cancelled": f"cancelled by {by}"}))).rowcount
        if done:
            return
        status = _status(conn, request_id)
        if status in s.RUNNING_STATUSES:
            raise ActionRefused(f"request {request_id} is running ({status}): stop it instead")
        raise ActionRefused(f"request {request_id} has already ended ({status}): nothing to cancel")


def retry(bind: Connection | Engine, request_id: str, *, by: str = "client") -> None:
    """Run a FAILED or CANCELLED request again: back to NEW, due now, with its attempts reset
    (it gets the job's ``max_attempts`` afresh). A HISTORY request resumes at its first day not
    done. The trace: ``result_payload`` becomes ``{"retried": {"by", "previous_status",
    "previous_result"}}`` until the new outcome replaces it, and the earlier executions stay in
    DMS_PRCLOG. Refused for any other status, for STOP and REFRESH_SCHEDULE requests, and while
    another request holding the same unique key waits or runs."""
    c = s.prcreq.c
    other = s.prcreq.alias("other")
    with _conn(bind) as conn:
        row = conn.execute(sa.select(c.status, c.request_type, c.result_payload, c.unique_key)
                           .where(c.request_id == request_id)).first()
        if row is None:
            raise LookupError(f"no request {request_id!r}")
        if row.request_type in s.CONTROL_TYPES:
            raise ActionRefused(f"request {request_id} is a {row.request_type} request: enqueue a new one instead")
        if row.status not in RETRYABLE_STATUSES:
            raise ActionRefused(f"request {request_id} is {row.status}: only FAILED or CANCELLED requests can be retried")
        try:
            previous = json.loads(row.result_payload) if row.result_payload else None
        except ValueError:
            previous = row.result_payload
        trace = _dumps({"retried": {"by": by, "previous_status": row.status, "previous_result": previous}})
        free_key = ~sa.exists().where(other.c.unique_key == c.unique_key, other.c.request_id != c.request_id,
                                      other.c.status.in_(ACTIVE_STATUSES))
        done = conn.execute(sa.update(s.prcreq).where(
            c.request_id == request_id, c.status == row.status, sa.or_(c.unique_key.is_(None), free_key),
        ).values(status=s.NEW, attempts=0, not_before=clock(conn), claimed_by=None, claimed_at=None,
                 completed_at=None, excl_key=None, stop_requested_at=None, result_payload=trace)).rowcount
        if done:
            return
        status = _status(conn, request_id)
        if status != row.status:
            raise ActionRefused(f"request {request_id} changed meanwhile (now {status}); nothing done")
        holder = conn.execute(sa.select(c.request_id).where(c.unique_key == row.unique_key,
                                                             c.status.in_(ACTIVE_STATUSES))).scalar()
        raise ActionRefused(f"unique key {row.unique_key!r} is held by request {holder}, which is waiting or "
                            "running: retry after it ends")


# -- jobs ------------------------------------------------------------------------------------------
class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()


def register_job(bind: Connection | Engine, mapref: str, handler: str, *, timeout_s: int | None = None,
                 max_attempts: int = 1, retry_delay_s: int = 60, allow_overlap: bool = False,
                 enabled: bool = True, description: str | None = None, params: dict[str, Any] | None = None) -> None:
    """Create or replace a DMS_JOB row (what a DBA would do with an INSERT or MERGE): every
    column is set, to its default when not given. To change only some, use ``update_job``.
    A pause (``paused``) is an operator's and is left as it is.

    ``params``: the handler's default parameters, overridable per schedule and per request."""
    values = dict(handler=handler, timeout_s=timeout_s, max_attempts=max_attempts, retry_delay_s=retry_delay_s,
                  allow_overlap="Y" if allow_overlap else "N", enabled="Y" if enabled else "N",
                  description=description, params=json.dumps(params, default=str) if params else None)
    with _conn(bind) as conn:
        if not conn.execute(sa.update(s.job).where(s.job.c.mapref == mapref).values(**values)).rowcount:
            conn.execute(sa.insert(s.job).values(mapref=mapref, **values))


def update_job(bind: Connection | Engine, mapref: str, *, handler: str = UNSET, timeout_s: int | None = UNSET,
               max_attempts: int = UNSET, retry_delay_s: int = UNSET, allow_overlap: bool = UNSET,
               enabled: bool = UNSET, description: str | None = UNSET,
               params: dict[str, Any] | None = UNSET) -> bool:
    """Change only the fields given; create the job (``handler`` then required, the rest the
    table's defaults) when it does not exist. ``params=None`` clears the parameters. Returns
    True when the job was created."""
    values: dict[str, Any] = {}
    if handler is not UNSET:
        if not isinstance(handler, str) or not handler.strip():
            raise ValueError("handler must be 'package.module:function' or 'sql:NAME'")
        values["handler"] = handler
    for name, value, low in (("timeout_s", timeout_s, 1), ("max_attempts", max_attempts, 1),
                             ("retry_delay_s", retry_delay_s, 0)):
        if value is UNSET:
            continue
        if value is None and name == "timeout_s":
            values[name] = None
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value < _INT32:
            raise ValueError(f"{name} must be an integer >= {low}, not {value!r}")
        values[name] = value
    for name, value in (("allow_overlap", allow_overlap), ("enabled", enabled)):
        if value is not UNSET:
            values[name] = "Y" if value else "N"
    if description is not UNSET:
        values["description"] = description
    if params is not UNSET:
        if params is not None and not isinstance(params, dict):
            raise ValueError("params must be a JSON object (a dict) or None")
        values["params"] = json.dumps(params, default=str) if params else None
    with _conn(bind) as conn:
        if values and conn.execute(sa.update(s.job).where(s.job.c.mapref == mapref).values(**values)).rowcount:
            return False
        exists = conn.execute(sa.select(s.job.c.mapref).where(s.job.c.mapref == mapref)).first() is not None
        if exists:
            return False
        if "handler" not in values:
            raise LookupError(f"no job {mapref!r}: give a handler to create it")
        conn.execute(sa.insert(s.job).values(mapref=mapref, **values))
        return True


def handler_problem(handler: str) -> str | None:
    """Why ``handler`` cannot be imported here (None if it can, or if it is ``sql:``).

    Imports the module, as a replica would; a job whose handler does not import fails every
    request, so ``dms-worker job`` warns at registration rather than at the first run."""
    if handler.startswith("sql:"):
        return None if handler[4:].strip() else "sql: handler has no procedure name"
    module_name, sep, func_name = handler.partition(":")
    if not sep or not module_name or not func_name:
        return f"{handler!r} is not 'package.module:function' or 'sql:NAME'"
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - any import failure is the answer
        return f"cannot import {module_name}: {type(exc).__name__}: {exc}"
    if not callable(getattr(module, func_name, None)):
        return f"{module_name} has no callable {func_name!r}"
    return None


def _set_paused(bind: Connection | Engine, mapref: str, paused: bool) -> None:
    with _conn(bind) as conn:
        if not conn.execute(sa.update(s.job).where(s.job.c.mapref == mapref)
                            .values(paused="Y" if paused else "N")).rowcount:
            raise LookupError(f"no job {mapref!r}")


def pause_job(bind: Connection | Engine, mapref: str) -> None:
    """Its requests wait NEW (nothing is failed or lost; running executions finish) until resumed."""
    _set_paused(bind, mapref, True)


def resume_job(bind: Connection | Engine, mapref: str) -> None:
    """Its waiting requests become claimable again (on PostgreSQL a trigger wakes the replicas)."""
    _set_paused(bind, mapref, False)


# -- schedules -------------------------------------------------------------------------------------
def set_schedule_enabled(bind: Connection | Engine, jobschid: int, enabled: bool) -> None:
    """Enable (``schflg = 'Y'``) or disable (``'N'``) a current schedule row, and ask the leader
    to reread schedules now (a REFRESH_SCHEDULE request in the same transaction).

    Enabling also moves ``lst_run_dt`` up to now: occurrences that fell while the schedule was
    disabled are not owed, so the misfire policy does not replay one of them the moment it is
    enabled. (A DBA who flips ``schflg`` by hand gets the misfire policy instead.)"""
    j = s.jobsch.c
    with _conn(bind) as conn:
        mapref = conn.execute(sa.select(j.mapref).where(j.jobschid == jobschid, j.curflg == "Y")).scalar()
        if mapref is None:
            raise LookupError(f"no current schedule {jobschid!r}")
        values: dict[str, Any] = {"schflg": "Y" if enabled else "N"}
        if enabled:
            now = clock(conn)
            values["lst_run_dt"] = sa.case((sa.or_(j.lst_run_dt.is_(None), j.lst_run_dt < now), now),
                                           else_=j.lst_run_dt)
        conn.execute(sa.update(s.jobsch).where(j.jobschid == jobschid, j.curflg == "Y").values(**values))
        enqueue(conn, mapref, request_type=s.REFRESH_SCHEDULE)


def enable_schedule(bind: Connection | Engine, jobschid: int) -> None:
    set_schedule_enabled(bind, jobschid, True)


def disable_schedule(bind: Connection | Engine, jobschid: int) -> None:
    set_schedule_enabled(bind, jobschid, False)


def request_status(bind: Connection | Engine, request_id: str) -> dict[str, Any] | None:
    """The request's row as a dict (status, result_payload, ...), or None."""
    with _conn(bind) as conn:
        row = conn.execute(sa.select(s.prcreq).where(s.prcreq.c.request_id == request_id)).mappings().first()
    return dict(row) if row else None
