"""What a handler receives: its request, params, as-of date, a database connection, a
cancellation check, a logger, and a way to report row counts and rejected records.

Counts and rejects travel back to the replica with the result and are written to
DMS_JOBLOG / DMS_JOBERR in the same transaction that closes the execution.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

MAX_REJECTS_KEPT = 10_000


class JobCancelled(Exception):
    """Raised by ``check_cancelled()`` once a stop or timeout was requested."""


@dataclass
class JobContext:
    request_id: str
    mapref: str
    request_type: str
    prcid: int
    attempt: int
    params: dict[str, Any]
    payload: dict[str, Any]
    as_of: date | None
    logger: logging.Logger
    scheduled_for: datetime | None = None       # UTC: the schedule occurrence this run is for
    _cancel: threading.Event = field(default_factory=threading.Event, repr=False)
    _connect: Callable[[], Any] | None = field(default=None, repr=False)
    _connection: Any = field(default=None, repr=False)
    srcrows: int | None = None
    trgrows: int | None = None
    errrows: int | None = None
    rejects: list[tuple[str | None, str, str | None]] = field(default_factory=list, repr=False)
    rejects_dropped: int = 0

    @property
    def connection(self):
        """A SQLAlchemy connection to the worker's database, opened on first use.

        Commit as you go if you like; what is left uncommitted is committed when the handler
        returns and rolled back when it raises or is stopped.
        """
        if self._connection is None:
            if self._connect is None:
                raise RuntimeError("no database configured for this execution")
            self._connection = self._connect()
        return self._connection

    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def check_cancelled(self) -> None:
        if self._cancel.is_set():
            raise JobCancelled(f"execution {self.prcid} was asked to stop")

    def report(self, *, src: int | None = None, trg: int | None = None, err: int | None = None) -> None:
        """Add to the source/target/error row counts recorded in DMS_JOBLOG."""
        if src is not None:
            self.srcrows = (self.srcrows or 0) + src
        if trg is not None:
            self.trgrows = (self.trgrows or 0) + trg
        if err is not None:
            self.errrows = (self.errrows or 0) + err

    def reject(self, keyvalue: Any, errmsg: str, dberrmsg: str | None = None) -> None:
        """Record one rejected record (a DMS_JOBERR row) and count it as an error row."""
        self.report(err=1)
        if len(self.rejects) < MAX_REJECTS_KEPT:
            self.rejects.append((None if keyvalue is None else str(keyvalue), str(errmsg), dberrmsg))
        else:
            self.rejects_dropped += 1
