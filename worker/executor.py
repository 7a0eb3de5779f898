"""Runs executions in spawned child processes, one at a time each, so any can be stopped hard.

A replica keeps ``SCHEDULER_MAX_WORKERS`` long-lived children (spawned once, so a ``noop``
costs a pipe round trip, not a process start). Stopping an execution (STOP, timeout,
shutdown) asks the child to cancel its database call and exit, then kills it if it has not,
and starts a fresh child in its place. A child also ends itself when its parent dies or when
the parent has not confirmed its heartbeat for ``fence_s`` (the parent may be paused or cut off
and its rows about to be rescued): an execution never outlives its replica's claim.
"""
from __future__ import annotations

import importlib
import logging
import os
import queue
import signal
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any, Callable

import sqlalchemy as sa

from . import logs
from .drivers import make_driver
from .drivers.base import dumps
from .jobs.context import JobCancelled, JobContext

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


@dataclass(frozen=True)
class ChildConfig:
    database_url: str
    schema: str | None
    log_level: str
    fence_s: float
    parent_pid: int
    stop_grace: float = 0.5


@dataclass
class Slot:
    index: int
    process: Any = None
    conn: Any = None
    task: Task | None = None
    session_id: str | None = None
    started: float = 0.0
    deadline: float | None = None


@dataclass(frozen=True)
class Event:
    slot: Slot
    task: Task
    kind: str                    # "session", "done" or "died"
    data: dict[str, Any] = field(default_factory=dict)


class Executor:
    def __init__(self, size: int, config: ChildConfig, lease: Any) -> None:
        self.config = config
        self.lease = lease               # shared double: monotonic time of the last good heartbeat
        self.slots = [Slot(i) for i in range(size)]

    def start(self) -> None:
        for slot in self.slots:
            self._spawn(slot)

    def _spawn(self, slot: Slot) -> None:
        parent_end, child_end = logs.SPAWN.Pipe()
        slot.process = logs.SPAWN.Process(
            target=child_main, name=f"dms-exec-{slot.index}", daemon=True,
            args=(child_end, self.config, self.lease, logs.child_queue()))
        slot.process.start()
        child_end.close()
        slot.conn, slot.task, slot.session_id, slot.deadline = parent_end, None, None, None

    def idle_slot(self) -> Slot | None:
        return next((s for s in self.slots if s.task is None), None)

    def busy(self) -> list[Slot]:
        return [s for s in self.slots if s.task is not None]

    def run(self, slot: Slot, task: Task, timeout_s: float | None) -> None:
        slot.task, slot.session_id = task, None
        slot.started = time.monotonic()
        slot.deadline = slot.started + timeout_s if timeout_s else None
        slot.conn.send(("run", task))

    def connections(self) -> list[Any]:
        return [s.conn for s in self.slots]

    def receive(self, conn: Any) -> list[Event]:
        slot = next(s for s in self.slots if s.conn is conn)
        events = []
        try:
            while conn.poll():
                kind, data = conn.recv()
                if slot.task is None:
                    continue
                if kind == "session":
                    slot.session_id = data["session_id"]
                events.append(Event(slot, slot.task, kind, data))
                if kind == "done":
                    slot.task, slot.deadline = None, None
        except (EOFError, OSError):
            task = slot.task
            code = self._reap(slot)
            if task is not None:
                events.append(Event(slot, task, "died", {"exitcode": code}))
            self._spawn(slot)
        return events

    def kill(self, slot: Slot, grace_s: float) -> str | None:
        """End the slot's execution now; returns the database session it was using, if any."""
        session_id = slot.session_id
        try:
            slot.conn.send(("cancel", None))
        except (OSError, ValueError):
            pass
        slot.process.join(grace_s)
        self._reap(slot)
        self._spawn(slot)
        return session_id

    def _reap(self, slot: Slot) -> int | None:
        if slot.process.is_alive():
            slot.process.kill()
        slot.process.join(5)
        slot.conn.close()
        return slot.process.exitcode

    def close(self) -> None:
        for slot in self.slots:
            try:
                slot.conn.send(("exit", None))
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + 2
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


def child_main(conn: Any, config: ChildConfig, lease: Any, log_queue: Any) -> None:
    # The parent decides when executions end; a Ctrl-C or group SIGTERM must not cut them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logs.setup_child(log_queue, config.log_level)
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
                os._exit(0)
            if kind == "run":
                inbox.put(data)
            elif kind == "cancel":
                cancel_and_exit(EXIT_CANCELLED)
            elif kind == "exit":
                inbox.put(None)

    def watchdog() -> None:
        while True:
            time.sleep(0.2)
            if os.getppid() != config.parent_pid:
                cancel_and_exit(EXIT_ORPHANED)
            if state.busy and time.monotonic() - lease.value > config.fence_s:
                cancel_and_exit(EXIT_FENCED)

    threading.Thread(target=reader, daemon=True, name="reader").start()
    threading.Thread(target=watchdog, daemon=True, name="watchdog").start()
    while True:
        task = inbox.get()
        if task is None:
            break
        state.busy = True
        state.idle.clear()
        result = _execute(task, driver, state, lambda sid: conn.send(("session", {"session_id": sid})))
        state.idle.set()
        state.busy = False
        conn.send(("done", result))
    driver.dispose()


_handlers: dict[str, Callable[[JobContext], Any]] = {}


def resolve_handler(spec: str) -> Callable[[JobContext], Any]:
    """``package.module:function``; imported, never exec'd. Raises ValueError for a bad spec."""
    if spec in _handlers:
        return _handlers[spec]
    module_name, sep, func_name = spec.partition(":")
    if not sep or not module_name or not func_name:
        raise ValueError(f"handler {spec!r} is not 'package.module:function' or 'sql:NAME'")
    func = getattr(importlib.import_module(module_name), func_name, None)
    if not callable(func):
        raise ValueError(f"handler {spec!r}: {module_name} has no callable {func_name!r}")
    _handlers[spec] = func
    return func


def _execute(task: Task, driver: Any, state: _ChildState, report_session: Callable[[str], None]) -> dict[str, Any]:
    logger = logging.getLogger(f"worker.job.{task.mapref}")
    def connect() -> sa.engine.Connection:
        connection = driver.engine.connect()
        dbapi = connection.connection.driver_connection
        with state.lock:
            state.dbapi_conn = dbapi
        sid = driver.session_id(dbapi)
        if sid:
            report_session(sid)
        return connection

    ctx = JobContext(request_id=task.request_id, mapref=task.mapref, request_type=task.request_type,
                     prcid=task.prcid, attempt=task.attempt, params=task.params, payload=task.payload,
                     as_of=task.as_of, scheduled_for=task.scheduled_for, logger=logger, _cancel=state.cancel, _connect=connect)
    outcome: dict[str, Any] = {"ok": True}
    try:
        if task.handler.startswith("sql:"):
            args = [task.prcid] + [task.params.get(f"param{i}") for i in range(1, 11)]
            counts = driver.procedure_call(ctx.connection, task.handler[4:], args,
                                           counts=bool(task.payload.get("counts")))
            if counts is not None:
                src, trg, err = counts
                ctx.report(src=src, trg=trg, err=err)
            result = None
        else:
            result = resolve_handler(task.handler)(ctx)
        if ctx._connection is not None and ctx._connection.in_transaction():
            ctx._connection.commit()
        outcome["result"] = None if result is None else dumps(result)
    except JobCancelled as exc:
        outcome = {"ok": False, "cancelled": True, "error": str(exc)}
    except BaseException as exc:  # noqa: BLE001 - a handler's failure is data, not our crash
        orig = getattr(exc, "orig", None)
        outcome = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:4000],
                   "dberror": str(orig)[:4000] if orig is not None else None,
                   "traceback": traceback.format_exc()[-4000:]}
        logger.warning("execution %s of %s failed: %s", task.prcid, task.mapref, outcome["error"])
    finally:
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
