"""Handlers for the benchmarks; they run in the replicas' execution processes."""
from __future__ import annotations

import time

import sqlalchemy as sa

stamps = sa.Table("dms_bench_stamp", sa.MetaData(),
                  sa.Column("request_id", sa.String(64), primary_key=True),
                  sa.Column("started", sa.Float, nullable=False))


def stamp(ctx) -> None:
    """Record when the handler started (host clock, the same host as the benchmark)."""
    started = time.time()
    ctx.connection.execute(sa.insert(stamps).values(request_id=ctx.request_id, started=started))
