"""Execution processes: one execution at a time each, so that any can be stopped hard.

A replica keeps ``SCHEDULER_MAX_WORKERS`` long-lived children. They come from a fork server
that has imported the package once (``forkserver`` start method; ``spawn`` where there is no
fork, i.e. Windows), so a child is ready within milliseconds and holds none of the replica's
connections or threads. A child says "ready" once it can take work; the replica hands work
only to ready children, and an execution's timeout counts from the child's "started".

Nothing here blocks the replica's control loop: stopping an execution (STOP, timeout,
shutdown) sends "cancel" (the child cancels its database call and exits) and sets a deadline;
``tick`` kills what is still alive past it and starts a fresh child once the old one is gone.

A child also ends itself when its replica dies (its pipe closes) or when the replica has not
confirmed its heartbeat for ``fence_s`` (the replica may be frozen or cut off, and its rows
about to be rescued): an execution never outlives its replica's claim.

When the handler used ``ctx.connection``, the child records the execution's outcome in that
same transaction, conditional on the replica still owning the request (River's
JobCompleteTx): the handler's database work commits exactly once, with its outcome, or not at
all. A handler that never touches the database costs no transaction here at all.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import queue
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import date, datetime
from typing import Any

import sqlalchemy as sa

from . import logs
from . import requests as rq
from .config import CONNECTION_PREFIX
from .drivers.base import ExecutionFinish, Reject, dumps

log = logging.getLogger(__name__)

EXIT_CANCELLED, EXIT_FENCED, EXIT_ORPHANED = 3, 4, 5


@dataclass(frozen=True)
class Task:
    prcid: int
    request_id: str
    mapref: str
    request_type: str
    handler: str
    attempt: int
    params: dict[str, Any]
    payload: dict[str, Any]
    as_of: date | None
    scheduled_for: datetime | None = None
    unvetted: tuple[str, ...] = ()      # payload keys only the handler's own request_keys may allow
    # The outcome to record in the handler's transaction on success (None: report only).
    finish: ExecutionFinish | None = None
    days_total: int = 0                 # HISTORY: how many days the request has
    day_results: tuple[Any, ...] = ()   # HISTORY: what the earlier days returned
    exclusive: bool = False             # the job does not allow overlap


@dataclass(frozen=True)
class ChildConfig:
    database_url: str
    schema: str | None
    log_level: str
    fence_s: float
    stop_grace: float = 0.5
    # What the replica resolved for the handlers (DMS_FILE_ROOTS, DMS_CONN_*), from its own
    # environment and --env-file: a child's working directory need not hold that file.
    job_environment: Mapping[str, str] = field(default_factory=dict, repr=False)


@dataclass
class Slot:
    index: int
    process: Any = None
    conn: Any = None
    ready: bool = False                 # the child said it can take work
    task: Task | None = None
    session_id: str | None = None
    started: float | None = None        # when the handler started (the child said so)
    deadline: float | None = None
    kill_at: float | None = None        # stopping: killed at this time if still alive
    timeout_s: float | None = None

    @property
    def idle(self) -> bool:
        return self.ready and self.task is None and self.kill_at is None


@dataclass(frozen=True)
class Event:
    slot: Slot
    task: Task
    kind: str                    # "started", "session", "done" or "died"
    data: dict[str, Any] = field(default_factory=dict)


class Executor:
    def __init__(self, size: int, config: ChildConfig, fence: Any, preload: tuple[str, ...] = ()) -> None:
        self.config = config
        self.fence = fence               # shared double: monotonic time of the last good heartbeat
        self.ctx = logs.CONTEXT
        if preload and self.ctx.get_start_method() == "forkserver":
            self.ctx.set_forkserver_preload(["worker.executor", *preload])
        self.slots = [Slot(i) for i in range(size)]

    def start(self) -> None:
        for slot in self.slots:
            self._spawn(slot)

    def _spawn(self, slot: Slot) -> None:
        parent_end, child_end = self.ctx.Pipe()
        slot.process = self.ctx.Process(
            target=child_main, name=f"dms-exec-{slot.index}", daemon=True,
            args=(child_end, self.config, self.fence, logs.child_queue()))
        slot.process.start()
        child_end.close()
        slot.conn, slot.ready, slot.task, slot.session_id = parent_end, False, None, None
        slot.started = slot.deadline = slot.kill_at = None

    # -- what the producer asks ----------------------------------------------------------------
    def idle_slots(self) -> list[Slot]:
        return [s for s in self.slots if s.idle]

    def busy(self) -> list[Slot]:
        return [s for s in self.slots if s.task is not None]

    def run(self, slot: Slot, task: Task, timeout_s: float | None) -> None:
        slot.task, slot.session_id, slot.timeout_s = task, None, timeout_s
        slot.started = slot.deadline = None
        slot.conn.send(("run", task))

    def cancel(self, slot: Slot, now: float, grace_s: float) -> str | None:
        """Ask the slot's execution to end; it is killed at ``now + grace_s`` if still alive.
        Returns the database session it was using, if any. Never waits."""
        session_id = slot.session_id
        try:
            slot.conn.send(("cancel", None))
        except (OSError, ValueError):
            pass
        slot.task, slot.deadline, slot.kill_at = None, None, now + grace_s
        return session_id

    def deadlines(self) -> list[float]:
        """Times ``tick`` must run at: execution timeouts and kills of stopping children."""
        return [t for s in self.slots for t in (s.deadline, s.kill_at) if t is not None]

    def waitables(self) -> list[Any]:
        """Pipes to read, and the sentinels of children on their way out."""
        return [s.conn for s in self.slots if s.kill_at is None] + \
               [s.process.sentinel for s in self.slots if s.kill_at is not None]

    # -- the loop's side -------------------------------------------------------------------------
    def receive(self, ready: Any, now: float) -> list[Event]:
        """Events from a pipe that ``wait`` found readable."""
        slot = next((s for s in self.slots if s.conn is ready), None)
        if slot is None:
            return []
        events = []
        try:
            while slot.conn.poll():
                kind, data = slot.conn.recv()
                if kind == "ready":
                    slot.ready = True
                    continue
                task = slot.task
                if task is None:
                    continue
                if kind == "started":
                    slot.started = now
                    slot.deadline = now + slot.timeout_s if slot.timeout_s else None
                elif kind == "session":
                    slot.session_id = data["session_id"]
                elif kind == "done":
                    slot.task, slot.deadline = None, None
                events.append(Event(slot, task, kind, data))
        except (EOFError, OSError):
            task = slot.task
            code = self._reap(slot)
            if task is not None:
                events.append(Event(slot, task, "died", {"exitcode": code}))
            self._spawn(slot)
        return events

    def tick(self, now: float) -> None:
        """Kill children past their stop deadline; replace children that are gone."""
        for slot in self.slots:
            if slot.kill_at is None:
                continue
            if slot.process.is_alive() and now >= slot.kill_at:
                slot.process.kill()
            if not slot.process.is_alive():
                self._reap(slot)
                self._spawn(slot)

    def _reap(self, slot: Slot) -> int | None:
        if slot.process.is_alive():
            slot.process.kill()
        slot.process.join(1)
        slot.conn.close()
        return slot.process.exitcode

    def close(self, grace_s: float = 2.0) -> None:
        for slot in self.slots:
            try:
                slot.conn.send(("exit", None))
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + grace_s
        for slot in self.slots:
            slot.process.join(max(0.0, deadline - time.monotonic()))
            if slot.process.is_alive():
                slot.process.kill()
                slot.process.join(2)


# ---------------------------------------------------------------------------------------------
# The child process
# ---------------------------------------------------------------------------------------------
class _ChildState:
    def __init__(self) -> None:
        self.cancel = threading.Event()
        self.idle = threading.Event()
        self.idle.set()
        self.busy = False
        self.dbapi_conn: Any = None
        self.lock = threading.Lock()


def child_main(conn: Any, config: ChildConfig, fence: Any, log_queue: Any) -> None:
    # The parent decides when executions end; a Ctrl-C or group SIGTERM must not cut them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logs.setup_child(log_queue, config.log_level)
    for name in [n for n in os.environ if n.startswith(CONNECTION_PREFIX)]:
        del os.environ[name]       # only the connections the replica itself knows
    os.environ.update(config.job_environment)
    from .drivers import make_driver
    driver = make_driver(config.database_url, schema=config.schema, pre_ping=True)
    state = _ChildState()
    inbox: queue.Queue = queue.Queue()

    def cancel_and_exit(code: int) -> None:
        state.cancel.set()
        with state.lock:
            if state.dbapi_conn is not None:
                try:
                    driver.session_cancel(state.dbapi_conn)
                except Exception:  # noqa: BLE001 - we are exiting either way
                    pass
        # The cancelled call makes the handler raise: let it clean up (temporary files) for a
        # moment, and its log records reach the pipe, less than the parent waits to kill us.
        state.idle.wait(max(0.0, config.stop_grace - 0.25))
        logs.flush_child(0.15)
        os._exit(code)

    def reader() -> None:
        while True:
            try:
                kind, data = conn.recv()
            except (EOFError, OSError):
                cancel_and_exit(EXIT_ORPHANED)     # the replica is gone
            if kind == "run":
                inbox.put(data)
            elif kind == "cancel":
                cancel_and_exit(EXIT_CANCELLED)
            elif kind == "exit":
                inbox.put(None)

    def watchdog() -> None:
        while True:
            time.sleep(0.1)
            if state.busy and time.monotonic() - fence.value > config.fence_s:
                cancel_and_exit(EXIT_FENCED)

    threading.Thread(target=reader, daemon=True, name="reader").start()
    threading.Thread(target=watchdog, daemon=True, name="watchdog").start()
    conn.send(("ready", None))
    while True:
        task = inbox.get()
        if task is None:
            break
        state.busy = True
        state.idle.clear()
        conn.send(("started", None))
        result = _execute(task, driver, state, config, lambda sid: conn.send(("session", {"session_id": sid})))
        state.idle.set()
        state.busy = False
        conn.send(("done", result))
    driver.dispose()


_handlers: dict[str, Callable[..., Any]] = {}


def resolve_handler(spec: str) -> Callable[..., Any]:
    """``package.module:function``; imported, never exec'd. Raises ValueError for a bad spec."""
    if spec in _handlers:
        return _handlers[spec]
    module_name, sep, func_name = spec.partition(":")
    if not sep or not module_name or not func_name:
        raise ValueError(f"handler {spec!r} is not 'package.module:function' or 'sql:NAME'")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())     # `dms-worker run` in a folder of handler modules, as `supervise`
    func = getattr(importlib.import_module(module_name), func_name, None)
    if not callable(func):
        raise ValueError(f"handler {spec!r}: {module_name} has no callable {func_name!r}")
    _handlers[spec] = func
    return func


def one_line(exc: BaseException) -> tuple[str, str | None]:
    """(message, database message) for DMS_PRCLOG.msg, result_payload and DMS_JOBERR: the
    database's own words on one line, never the statement SQLAlchemy appends (that is logged)."""
    orig = getattr(exc, "orig", None)
    if orig is not None:
        db = " ".join(str(orig).split())
        return f"{type(orig).__name__}: {db}"[:4000], db[:4000]
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:4000], None


def _execute(task: Task, driver: Any, state: _ChildState, config: ChildConfig,
             report_session: Callable[[str], None]) -> dict[str, Any]:
    from .jobs.context import JobCancelled, JobContext
    logger = logging.getLogger(f"worker.job.{task.mapref}")

    lock_timeout_s = max(0.2, config.fence_s / 3)     # waits while committing: well inside the fence
    verified = threading.Event()

    def owned(connection: Any) -> None:
        """Before any commit of ``ctx.connection`` (the handler's own, as it goes, or ours at the
        end): in that same transaction, the request must still be ours; else nothing commits."""
        if verified.is_set() or task.finish is None:
            return
        if not driver.request_owned_tx(connection, task.request_id, task.finish.worker_id, lock_timeout_s):
            # SQLAlchemy forgets the transaction when this raises; the database must forget it too.
            connection.connection.driver_connection.rollback()
            raise LostOwnership(f"request {task.request_id} is no longer ours (rescued?): its work is rolled back")

    def connect() -> Any:
        connection = driver.engine.connect()
        sa.event.listen(connection, "commit", owned)
        dbapi = connection.connection.driver_connection
        with state.lock:
            state.dbapi_conn = dbapi
        sid = driver.session_id(dbapi)
        if sid:
            report_session(sid)
        return connection

    ctx = JobContext(request_id=task.request_id, mapref=task.mapref, request_type=task.request_type,
                     prcid=task.prcid, attempt=task.attempt, params=task.params, payload=task.payload,
                     as_of=task.as_of, scheduled_for=task.scheduled_for, logger=logger, _cancel=state.cancel,
                     _connect=connect)
    outcome: dict[str, Any] = {"ok": True}
    locked: list[Any] = []
    try:
        if task.handler.startswith("sql:"):
            refusal = rq.refused_keys(task.unvetted, ())
            if refusal is not None:
                raise refusal
            if task.exclusive:
                # A stopped run's server session may still be in its call: wait for it here.
                if not driver.execution_lock(ctx.connection, task.mapref, timeout_s=MAPREF_LOCK_WAIT_S):
                    raise MaprefBusy(f"an earlier run of {task.mapref} is still running on the database server")
                locked.append(ctx._connection)
            args = [task.prcid] + [task.params.get(f"param{i}") for i in range(1, 11)]
            # A procedure gets truncate_flag only when its job opts in (DMS_JOB.params.truncate_arg):
            # procedures written for (prcid, param1..param10) keep working.
            truncate = ("Y" if task.params.get("truncate_flag") else "N") if task.payload.get("truncate_arg") else None
            counts = driver.procedure_call(ctx.connection, task.handler[4:], args,
                                           counts=bool(task.payload.get("counts")), truncate_flag=truncate)
            if counts is not None:
                src, trg, err = counts
                ctx.report(src=src, trg=trg, err=err)
            result = None
        else:
            func = resolve_handler(task.handler)
            refusal = rq.refused_keys(task.unvetted, getattr(func, "request_keys", ()))
            if refusal is not None:
                raise refusal
            result = func(ctx)
        outcome["result"] = None if result is None else json.loads(dumps(result))
        connection = ctx._connection
        if connection is not None and connection.in_transaction():
            outcome.update(_complete_in_transaction(task, driver, ctx, connection, outcome["result"], lock_timeout_s,
                                                    verified))
    except LostOwnership as exc:
        outcome = {"ok": False, "lost": True, "error": str(exc)}
    except MaprefBusy as exc:
        outcome = {"ok": False, "busy": True, "error": str(exc)}
    except JobCancelled as exc:
        outcome = {"ok": False, "cancelled": True, "error": str(exc)}
    except rq.BadRequest as exc:
        outcome = {"ok": False, "bad_request": True, "error": str(exc)}
    except BaseException as exc:  # noqa: BLE001 - a handler's failure is data, not our crash
        message, db_message = one_line(exc)
        outcome = {"ok": False, "error": message, "dberror": db_message}
        # The log gets everything (the statement, the traceback); the tables the one line.
        logger.warning("execution %s of %s failed: %s", task.prcid, task.mapref, message, exc_info=True)
    finally:
        for connection in locked:
            try:
                connection.rollback()       # whatever is left: the lock is a session's, not a transaction's
                driver.execution_unlock(connection, task.mapref)
            except Exception:  # noqa: BLE001 - closing the session below releases it too
                pass
        if ctx._connection is not None:
            try:
                ctx._connection.close()
            except Exception:  # noqa: BLE001
                pass
        with state.lock:
            state.dbapi_conn = None
    outcome.update(srcrows=ctx.srcrows, trgrows=ctx.trgrows, errrows=ctx.errrows,
                   rejects=ctx.rejects, rejects_dropped=ctx.rejects_dropped)
    return outcome


MAPREF_LOCK_WAIT_S = 5.0


class MaprefBusy(RuntimeError):
    """The mapref's server-side exclusivity is still held by an earlier run's session."""


class LostOwnership(RuntimeError):
    """The request was taken from this execution (rescued, stopped) before its work committed."""


def _complete_in_transaction(task: Task, driver: Any, ctx: Any, connection: Any, result: Any,
                             lock_timeout_s: float, verified: threading.Event) -> dict[str, Any]:
    """Record the outcome in the handler's transaction and commit both, if the request is still
    ours; roll both back if it is not (rescued while we ran). Returns what to tell the replica."""
    if task.finish is None:
        connection.commit()
        return {}
    finish = replace(
        task.finish, srcrows=ctx.srcrows, trgrows=ctx.trgrows, errrows=ctx.errrows,
        rejects=tuple(Reject(*r) for r in ctx.rejects),
        result_payload=rq.success_payload(result, task.days_total, task.day_results, task.finish.params)
        if task.finish.request_status is not None else None)
    # Waits here (a rescuer's lock, a frozen process) are bounded well inside the fence.
    if not driver.execution_complete_tx(connection, finish, lock_timeout_s=lock_timeout_s):
        connection.rollback()
        return {"ok": False, "lost": True, "error": "the request was no longer ours when the execution ended "
                                                     "(rescued?); its work was rolled back"}
    verified.set()             # the row is ours and locked until this commit
    connection.commit()
    return {"recorded": True}
