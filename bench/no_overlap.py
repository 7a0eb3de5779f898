"""Many queued requests of one no-overlap job, on two replicas: how many DMS_PRCREQ row updates
each request costs, and the gap between one run's end and the next one's start.

    .venv/bin/python bench/no_overlap.py [--requests 100] [--replicas 2]

A fresh database; the job (``allow_overlap = 'N'``, the default, handler ``noop``) gets N
requests in one insert; the replicas start (the default 15 s poll: only wake-ups and their own
claims move the queue). Updates are pg_stat_user_tables.n_tup_upd of dms_prcreq, read after the
replicas stopped (their sessions' statistics are flushed then). Gaps come from DMS_PRCLOG:
strtdt of each run minus enddt of the run before it (database clock).
"""
from __future__ import annotations

import argparse
import time
import uuid

import sqlalchemy as sa
from common import REPO, fresh_database, print_table, write_json  # noqa: E402  (sets sys.path)
from report import percentile, table_writes  # noqa: E402

from tests.support import Replica, wait_until
from worker import client
from worker import schema as s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--replicas", type=int, default=2)
    args = ap.parse_args()
    url = fresh_database("dms_bench_no_overlap")
    engine = sa.create_engine(url)
    client.register_job(engine, "SERIAL", "worker.jobs.builtin:noop")
    logs = REPO / "bench" / "results"
    replicas = [Replica(url, f"s{i}", logs, DMS_LOG_LEVEL="WARNING", SCHEDULER_POLL_INTERVAL="15").start()
                for i in range(args.replicas)]

    def scalar(sql: str):
        with engine.connect() as conn:
            return conn.execute(sa.text(sql)).scalar()

    try:
        for r in replicas:
            r.wait_registered(engine)
        before = table_writes(scalar, ["dms_prcreq"])
        with engine.begin() as conn:
            conn.execute(sa.insert(s.prcreq), [dict(request_id=str(uuid.uuid4()), mapref="SERIAL",
                                                    request_type="IMMEDIATE") for _ in range(args.requests)])
        t0 = time.monotonic()

        def done() -> bool:
            return scalar("SELECT count(*) FROM dms_prcreq WHERE status = 'DONE'") == args.requests
        wait_until(done, 600, "the queue to drain", interval=0.1)
        wall = time.monotonic() - t0
    finally:
        for r in replicas:
            r.stop()
    updates = table_writes(scalar, ["dms_prcreq"])["upd"] - before["upd"]
    with engine.connect() as conn:
        runs = conn.execute(sa.select(s.prclog.c.strtdt, s.prclog.c.enddt).order_by(s.prclog.c.strtdt)).all()
    gaps = [(b.strtdt - a.enddt).total_seconds() * 1000 for a, b in zip(runs, runs[1:])]
    row = {"requests": args.requests, "replicas": args.replicas, "wall_s": round(wall, 2),
           "prcreq_updates_per_request": round(updates / args.requests, 2),
           "gap_p50_ms": round(percentile(gaps, 50), 2), "gap_p90_ms": round(percentile(gaps, 90), 2),
           "gap_max_ms": round(max(gaps), 2)}
    print_table("One no-overlap job, many queued requests (PostgreSQL)", [row])
    print(f"\nresults: {write_json('no_overlap', row)}")


if __name__ == "__main__":
    main()
