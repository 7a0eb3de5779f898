"""Logging set-up: console or rotating file, optional JSON lines, and child processes logging
through the parent with multiprocessing-logging.

Children come from a fork server (or are spawned where there is no fork): never forked from
the replica itself, so the parent's ``MultiProcessingHandler`` gets a queue of that same
context, handed to each child when it starts.
"""
from __future__ import annotations

import json
import logging
import logging.handlers
import multiprocessing
import sys
import threading
from typing import Any

from multiprocessing_logging import MultiProcessingHandler

# The start method of every process the replica starts: a fork server where the platform
# forks (children ready in milliseconds, clean of the replica's threads and connections),
# spawn elsewhere (Windows). Two literal calls, so that the type is a context with .Process.
CONTEXT = (multiprocessing.get_context("forkserver") if "forkserver" in multiprocessing.get_all_start_methods()
           else multiprocessing.get_context("spawn"))
TEXT_FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname, "logger": record.name, "process": record.processName,
            "msg": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class SpawnMultiProcessingHandler(MultiProcessingHandler):
    """multiprocessing-logging's handler, with a queue that the children can share."""

    def __init__(self, name: str, sub_handler: logging.Handler) -> None:
        super().__init__(name, sub_handler=sub_handler)
        # The receiving thread reads ``self.queue`` afresh on every loop.
        self.queue = CONTEXT.Queue(-1)
        # Never let the replica's exit wait on this queue's feeder thread: if a killed child
        # left the pipe's lock taken, that wait would never end (close() drains what it can).
        self.queue.cancel_join_thread()


_installed: SpawnMultiProcessingHandler | None = None


def setup(level: str = "INFO", log_file: str | None = None, json_lines: bool = False,
          max_bytes: int = 10 * 1024 * 1024, backups: int = 5) -> None:
    """Configure the root logger of a replica; safe to call more than once."""
    global _installed
    root = logging.getLogger()
    if _installed is not None:
        root.removeHandler(_installed)
        _installed.close()
    if log_file:
        handler: logging.Handler = logging.handlers.RotatingFileHandler(
            log_file, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_lines else logging.Formatter(TEXT_FORMAT))
    _installed = SpawnMultiProcessingHandler("dms-log-receiver", handler)
    root.addHandler(_installed)
    root.setLevel(level)


def close() -> None:
    """Write out every record still on its way (children's included), then stop receiving."""
    global _installed
    if _installed is not None:
        logging.getLogger().removeHandler(_installed)
        _installed.close()
        _installed = None


def child_queue() -> Any:
    """The queue children log into, or None when the replica's logging is not ours."""
    return _installed.queue if _installed is not None else None


def setup_child(queue: Any, level: str) -> None:
    root = logging.getLogger()
    root.handlers[:] = [logging.handlers.QueueHandler(queue)] if queue is not None else [logging.StreamHandler()]
    root.setLevel(level)


def flush_child(timeout: float) -> None:
    """Push a child's buffered records into the pipe before it ends itself with ``os._exit``.

    Children share one queue whose writers take a lock across processes; a child that exits
    while its feeder thread is mid-write leaves that lock taken and the stream cut, and every
    other writer, the replica's own logging included, then blocks for good.
    """
    for handler in logging.getLogger().handlers:
        q = getattr(handler, "queue", None)
        if q is None or not hasattr(q, "join_thread"):
            continue
        flusher = threading.Thread(target=lambda q=q: (q.close(), q.join_thread()), daemon=True)
        flusher.start()
        flusher.join(timeout)
