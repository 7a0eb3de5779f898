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
