"""Built-in handlers for demos, tests and benchmarks: ``noop``, ``sleep``, ``fail``."""
from __future__ import annotations

import time

from .context import JobContext


def noop(ctx: JobContext) -> None:
    """Does nothing, successfully."""


def sleep(ctx: JobContext) -> dict:
    """Sleeps ``payload.seconds`` (default 1) without looking at cancellation, so that a stop
    or timeout has to terminate the process: that is what it exists to prove."""
    seconds = float(ctx.payload.get("seconds", ctx.params.get("param1") or 1))
    time.sleep(seconds)
    return {"slept": seconds}


sleep.request_keys = ("seconds",)     # a request may set it (worker.requests: the trust boundary)


def fail(ctx: JobContext) -> None:
    """Always raises."""
    raise RuntimeError(f"builtin fail: {ctx.mapref} failed on purpose (payload {ctx.payload!r})")
