"""Handlers used by the tests; they run in the replicas' execution processes."""
from __future__ import annotations

import os
import time

import sqlalchemy as sa

from tests.support import probe


def record(ctx) -> dict:
    """Sleep ``payload.seconds``, then write one probe row (committed with the execution).

    ``payload.fail_days``: fail on these days (HISTORY) while ``ctx.attempt`` is below
    ``payload.fail_until_attempt`` (default 2); ``payload.fail``: always fail.
    """
    started = time.time()
    time.sleep(float(ctx.payload.get("seconds", 0)))
    day = ctx.params.get("param1") if ctx.request_type == "HISTORY" else None
    if ctx.payload.get("fail") or (day in ctx.payload.get("fail_days", [])
                                   and ctx.attempt < int(ctx.payload.get("fail_until_attempt", 2))):
        raise RuntimeError(f"failing on purpose on {day or 'this run'}")
    ctx.connection.execute(sa.insert(probe).values(
        request_id=ctx.request_id, prcid=ctx.prcid, mapref=ctx.mapref, day=day,
        truncate_flag="Y" if ctx.params.get("truncate_flag") else "N", attempt=ctx.attempt,
        pid=os.getpid(), started=started, ended=time.time()))
    ctx.report(src=3, trg=2)
    ctx.reject("key-1", "bad record for the test")
    return {"pid": os.getpid()}


# Payload keys a request may set for these handlers (worker.requests: the trust boundary).
record.request_keys = ("seconds", "fail", "fail_days", "fail_until_attempt")


def announce(ctx) -> None:
    """Write a probe row with our pid and commit it at once, then sleep ``payload.seconds``
    without looking at cancellation: only a hard stop ends it early."""
    ctx.connection.execute(sa.insert(probe).values(request_id=ctx.request_id, prcid=ctx.prcid, mapref=ctx.mapref,
                                                   attempt=ctx.attempt, pid=os.getpid(), started=time.time()))
    ctx.connection.commit()
    time.sleep(float(ctx.payload.get("seconds", 60)))
    ctx.connection.execute(sa.update(probe).where(probe.c.prcid == ctx.prcid).values(ended=time.time()))


announce.request_keys = ("seconds",)


def db_sleep(ctx) -> None:
    """A long database call (pg_sleep): stopping it must cancel the statement on the server."""
    ctx.connection.execute(sa.text("SELECT pg_sleep(:s)"), {"s": float(ctx.payload.get("seconds", 60))})


db_sleep.request_keys = ("seconds",)


def odd_seconds_fail(ctx) -> None:
    """Fails for occurrences scheduled at an odd second: half of a per-second schedule fails."""
    if ctx.scheduled_for is not None and ctx.scheduled_for.second % 2:
        raise RuntimeError(f"odd second {ctx.scheduled_for.isoformat()}")


def echo(ctx) -> dict:
    """Returns what the handler was given, so a test can read it back from result_payload."""
    return {"payload": ctx.payload, "param2": ctx.params.get("param2"), "param3": ctx.params.get("param3")}


def loud_when_stopped(ctx) -> None:
    """Runs until stopped, then logs a very large record on its way out (as a traceback can be)."""
    open(ctx.payload["running_flag"], "w").close()
    while not ctx.cancelled():
        time.sleep(0.01)
    ctx.logger.warning("stopped after all this: %s", "x" * 300_000)
    ctx.check_cancelled()


loud_when_stopped.request_keys = ("running_flag",)


def work_then_sleep(ctx) -> None:
    """Write a probe row through ctx.connection (uncommitted), then sleep ``payload.seconds``:
    the work commits when the handler returns, so a process frozen during the sleep goes
    straight to its commit when it is resumed."""
    ctx.connection.execute(sa.insert(probe).values(request_id=ctx.request_id, prcid=ctx.prcid, mapref=ctx.mapref,
                                                   attempt=ctx.attempt, pid=os.getpid(), started=time.time()))
    time.sleep(float(ctx.payload.get("seconds", 1)))


work_then_sleep.request_keys = ("seconds",)


def work_sleep_commit(ctx) -> None:
    """As work_then_sleep, but the handler commits its work itself after the sleep (commit as you
    go): that commit, too, must happen only while the request is still ours."""
    work_then_sleep(ctx)
    ctx.connection.commit()


work_sleep_commit.request_keys = ("seconds",)


def bad_query(ctx) -> None:
    """A query the database refuses, with a bound value that must not reach the tables."""
    ctx.connection.execute(sa.text("SELECT no_such_column FROM dms_job WHERE mapref = :m"), {"m": "bound-value-42"})
