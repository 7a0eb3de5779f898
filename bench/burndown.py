"""Burn-down: N noop requests inserted first, then processed by R replicas; jobs per second.

Full bookkeeping: every job gets its DMS_PRCLOG and DMS_JOBLOG rows and its request row moves
NEW -> CLAIMED -> PROCESSING -> DONE. Fresh local PostgreSQL database; the clock runs from the
replicas' start to the last request DONE (replica start-up included, reported separately).

    .venv/bin/python bench/burndown.py [--jobs 20000] [--replicas 4] [--slots 4]
"""
from __future__ import annotations

import argparse
import time
import uuid

import sqlalchemy as sa
from common import REPO, fresh_database, print_table, write_json  # noqa: E402  (sets sys.path)
from report import table_writes, tree_cpu_seconds  # noqa: E402

from tests.support import Replica, wait_until
from worker import client
from worker import schema as s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=20000)
    ap.add_argument("--replicas", type=int, default=4)
    ap.add_argument("--slots", type=int, default=4)
    args = ap.parse_args()
    url = fresh_database("dms_bench_burndown")
    engine = sa.create_engine(url)
    client.register_job(engine, "NOOP", "worker.jobs.builtin:noop", allow_overlap=True)
    with engine.begin() as conn:
        conn.execute(sa.insert(s.prcreq), [dict(request_id=str(uuid.uuid4()), mapref="NOOP", request_type="IMMEDIATE")
                                           for _ in range(args.jobs)])
    logs = REPO / "bench" / "results"
    logs.mkdir(parents=True, exist_ok=True)

    def done() -> int:
        with engine.connect() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(s.prcreq).where(s.prcreq.c.status == "DONE")).scalar()

    def scalar(sql: str):
        with engine.connect() as conn:
            return conn.execute(sa.text(sql)).scalar()

    tables = ["dms_prcreq", "dms_prclog", "dms_joblog", "dms_joberr"]
    # The enqueue's inserts must be in the baseline: its session's statistics reach
    # pg_stat_user_tables only once that session ends (else one run reads 3 inserts per job).
    engine.dispose()
    writes0 = wait_until(lambda: (w := table_writes(scalar, tables))["ins"] >= args.jobs and w, 30,
                         "the enqueue's statistics")
    t0 = time.monotonic()
    replicas = [Replica(url, f"b{i}", logs, SCHEDULER_MAX_WORKERS=args.slots, DMS_LOG_LEVEL="WARNING",
                        SCHEDULER_POLL_INTERVAL="1").start() for i in range(args.replicas)]
    try:
        wait_until(lambda: done() > 0, 120, "the first job")
        t_first = time.monotonic()
        cpu0 = tree_cpu_seconds([r.pid for r in replicas])
        wait_until(lambda: done() == args.jobs, 1800, "the burn-down", interval=0.2)
        t_end = time.monotonic()
        cpu = tree_cpu_seconds([r.pid for r in replicas]) - cpu0
    finally:
        for r in replicas:
            r.stop()
    writes = {k: v - writes0[k] for k, v in table_writes(scalar, tables).items()}
    with engine.connect() as conn:
        logs_n = conn.execute(sa.select(sa.func.count()).select_from(s.prclog)).scalar()
        joblogs = conn.execute(sa.select(sa.func.count()).select_from(s.joblog)).scalar()
    row = {"jobs": args.jobs, "replicas": args.replicas, "slots_each": args.slots,
           "seconds_from_first_job": round(t_end - t_first, 2), "jobs_per_s": round(args.jobs / (t_end - t_first), 1),
           "startup_s": round(t_first - t0, 2),
           "worker_cpu_ms_per_job": round(1000 * cpu / max(1, args.jobs - 1), 3),
           "rows_per_job": "/".join(f"{k} {writes[k] / args.jobs:.2f}" for k in ("ins", "upd", "del")),
           "prclog_rows": logs_n, "joblog_rows": joblogs}
    print_table("Burn-down, noop with full bookkeeping (PostgreSQL)", [row])
    name = "burndown" if (args.replicas, args.slots) == (4, 4) else f"burndown_{args.replicas}x{args.slots}"
    print(f"\nresults: {write_json(name, row)}")


if __name__ == "__main__":
    main()
