"""Pickup latency: commit of one DMS_PRCREQ row to its handler starting, one row at a time.

Runs one replica on a fresh local PostgreSQL database, first woken by LISTEN/NOTIFY, then by
polling only (DMS_WAKEUP=poll) at the given poll interval, and prints p50/p99 for each.

    .venv/bin/python bench/pickup_latency.py [--samples 200] [--poll-interval 1]
"""
from __future__ import annotations

import argparse
import random
import time
import uuid

import sqlalchemy as sa
from common import REPO, fresh_database, print_table, summary_ms, write_json  # noqa: E402  (sets sys.path)

from bench.handlers import stamps
from tests.support import Replica, wait_until
from worker import client


def measure(url: str, samples: int, max_gap: float, **env) -> list[float]:
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.delete(stamps))
    replica = Replica(url, f"lat{uuid.uuid4().hex[:4]}", REPO / "bench" / "results", SCHEDULER_MAX_WORKERS=4,
                      DMS_LOG_LEVEL="WARNING", **env).start()
    latencies = []
    try:
        replica.wait_registered(engine)
        # Warm up: the first execution in each child imports the handler and connects.
        for _ in range(8):
            rid = client.enqueue(engine, "STAMP")
            wait_until(lambda: _started(engine, rid), 60, "warm-up")
        for _ in range(samples):
            # Idle for a random while, so that inserts do not line up with the poll timer.
            time.sleep(random.uniform(0.02, max_gap))
            with engine.begin() as conn:
                rid = client.enqueue(conn, "STAMP")
            committed = time.time()
            started = wait_until(lambda: _started(engine, rid), 60, "the handler to start", interval=0.002)
            latencies.append(started - committed)
    finally:
        replica.stop()
        engine.dispose()
    return latencies


def _started(engine, rid):
    with engine.connect() as conn:
        return conn.execute(sa.select(stamps.c.started).where(stamps.c.request_id == rid)).scalar()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--poll-interval", type=float, default=1.0)
    args = ap.parse_args()
    (REPO / "bench" / "results").mkdir(parents=True, exist_ok=True)
    url = fresh_database("dms_bench_latency", stamps)
    client.register_job(sa.create_engine(url), "STAMP", "bench.handlers:stamp", allow_overlap=True)
    rows = []
    for label, gap, env in [
            ("LISTEN/NOTIFY (poll 15 s as fallback)", 0.1, dict(SCHEDULER_POLL_INTERVAL="15")),
            (f"polling only, every {args.poll_interval:g} s", args.poll_interval,
             dict(DMS_WAKEUP="poll", SCHEDULER_POLL_INTERVAL=str(args.poll_interval)))]:
        rows.append({"wake-up": label, **summary_ms(measure(url, args.samples, gap, **env))})
    print_table("Pickup latency, commit -> handler start (PostgreSQL, 1 replica, 4 slots)", rows)
    print(f"\nresults: {write_json('pickup_latency', rows)}")


if __name__ == "__main__":
    main()
