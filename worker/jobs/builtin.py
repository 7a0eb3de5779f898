"""Built-in handlers for demos, tests and benchmarks: ``noop``, ``sleep``, ``fail``."""
from __future__ import annotations

import time
from typing import Any, cast

from .context import JobContext


def noop(ctx: JobContext) -> None:
    """Does nothing, successfully."""


def sleep(ctx: JobContext) -> dict:
    """Sleeps ``payload.seconds`` (default 1) without looking at cancellation, so that a stop
    or timeout has to terminate the process: that is what it exists to prove."""
    seconds = float(ctx.payload.get("seconds", ctx.params.get("param1") or 1))
    time.sleep(seconds)
    return {"slept": seconds}


# A request may set it (worker.requests: the trust boundary). An attribute of the function, which the
# executor reads with getattr: Any, as a function type has no such attribute.
cast(Any, sleep).request_keys = ("seconds",)


def fail(ctx: JobContext) -> None:
    """Always raises."""
    raise RuntimeError(f"builtin fail: {ctx.mapref} failed on purpose (payload {ctx.payload!r})")
