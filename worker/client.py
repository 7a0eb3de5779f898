"""The small Python client a web application uses to enqueue and stop work.

Every function takes a SQLAlchemy ``Connection`` and runs in the caller's transaction: the
request exists when the caller commits, together with the caller's own changes, and not
before. (An ``Engine`` is accepted too; the call then commits on its own.) The rows written
are exactly what a plain ``INSERT`` by another client would write; the database fills in
status, times and attempts.
"""
from __future__ import annotations

import contextlib
import json
import uuid
from datetime import date
from typing import Any, Iterator

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from . import schema as s


@contextlib.contextmanager
def _conn(bind: Connection | Engine) -> Iterator[Connection]:
    if isinstance(bind, Engine):
        with bind.begin() as conn:
            yield conn
    else:
        yield bind


def enqueue(bind: Connection | Engine, mapref: str, *, request_type: str = s.IMMEDIATE,
            payload: dict[str, Any] | None = None, request_id: str | None = None, **params: Any) -> str:
    """Queue a request; ``params`` (param1=..., truncate_flag=...) go into the JSON payload."""
    if request_type not in s.REQUEST_TYPES:
        raise ValueError(f"unknown request_type {request_type!r}")
    body = dict(payload or {}, **params)
    request_id = request_id or str(uuid.uuid4())
    with _conn(bind) as conn:
        conn.execute(sa.insert(s.prcreq).values(
            request_id=request_id, mapref=mapref, request_type=request_type,
            payload=json.dumps(body, default=str) if body else None))
    return request_id


def enqueue_history(bind: Connection | Engine, mapref: str, start_date: date | str, end_date: date | str,
                    **params: Any) -> str:
    """One run per day from ``start_date`` to ``end_date``, in order (param1 = the day)."""
    return enqueue(bind, mapref, request_type=s.HISTORY,
                   payload={"start_date": str(start_date), "end_date": str(end_date)}, **params)


def request_stop(bind: Connection | Engine, *, request_id: str | None = None, mapref: str | None = None) -> str:
    """Stop one request (queued: cancelled; running: stopped), or the running executions of a mapref."""
    if request_id is None and mapref is None:
        raise ValueError("give request_id or mapref")
    if mapref is None:
        with _conn(bind) as conn:
            mapref = conn.execute(sa.select(s.prcreq.c.mapref).where(s.prcreq.c.request_id == request_id)).scalar()
        if mapref is None:
            raise LookupError(f"no request {request_id!r}")
    return enqueue(bind, mapref, request_type=s.STOP, payload={"request_id": request_id} if request_id else None)


def register_job(bind: Connection | Engine, mapref: str, handler: str, *, timeout_s: int | None = None,
                 max_attempts: int = 1, retry_delay_s: int = 60, allow_overlap: bool = False,
                 enabled: bool = True, description: str | None = None, params: dict[str, Any] | None = None) -> None:
    """Create or replace a DMS_JOB row (what a DBA would do with an INSERT or MERGE).

    ``params``: the handler's default parameters, overridable per schedule and per request."""
    values = dict(handler=handler, timeout_s=timeout_s, max_attempts=max_attempts, retry_delay_s=retry_delay_s,
                  allow_overlap="Y" if allow_overlap else "N", enabled="Y" if enabled else "N",
                  description=description, params=json.dumps(params, default=str) if params else None)
    with _conn(bind) as conn:
        if not conn.execute(sa.update(s.job).where(s.job.c.mapref == mapref).values(**values)).rowcount:
            conn.execute(sa.insert(s.job).values(mapref=mapref, **values))


def request_status(bind: Connection | Engine, request_id: str) -> dict[str, Any] | None:
    """The request's row as a dict (status, result_payload, ...), or None."""
    with _conn(bind) as conn:
        row = conn.execute(sa.select(s.prcreq).where(s.prcreq.c.request_id == request_id)).mappings().first()
    return dict(row) if row else None
