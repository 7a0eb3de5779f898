"""Handlers for the console's browser tests; they run in the replicas' execution processes."""
from __future__ import annotations

import sqlalchemy as sa


def fails_while_broken(ctx) -> dict:
    """Fails while DMS_JOB_STATE holds (mapref, 'broken') = 'Y': an upstream problem an operator
    fixes before retrying, without touching the job's definition."""
    broken = ctx.connection.execute(sa.text(
        "SELECT state_value FROM dms_job_state WHERE mapref = :m AND state_key = 'broken'"), {"m": ctx.mapref}).scalar()
    if broken == "Y":
        raise RuntimeError(f"{ctx.mapref}: the upstream file is missing")
    return {"ok": True}


def import_rows(ctx) -> dict:
    """For the documentation's screenshots: takes ``payload.seconds``, reports row counts and
    rejects a few records, and fails when ``param2`` is 'fail'."""
    import time
    time.sleep(float(ctx.payload.get("seconds", 0.2)))
    if ctx.params.get("param2") == "fail":
        raise RuntimeError(f"{ctx.mapref}: target table locked by another session (ORA-00054)")
    rejected = int(ctx.payload.get("rejected", 0))
    for line in range(rejected):
        ctx.reject(f"line {17 + line * 9}", "hire_date is not a date", "invalid input syntax for type date: \"31/02/2026\"")
    ctx.report(src=1200 + rejected, trg=1200)
    return {"rows": 1200}


import_rows.request_keys = ("seconds", "rejected")     # a request may set these (the trust boundary)
