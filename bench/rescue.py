"""Rescue time: kill -9 of the replica running a job, to that job's row leaving PROCESSING.

Default heartbeat and rescue settings (DMS_HEARTBEAT_INTERVAL=1, DMS_RESCUE_AFTER=8), a
survivor replica that has been up for longer than the rescue window, on a fresh local
PostgreSQL database (or --sqlite for the embedded default).

    .venv/bin/python bench/rescue.py [--trials 5] [--sqlite]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import sqlalchemy as sa
from common import REPO, fresh_database, print_table, summary_ms, write_json  # noqa: E402  (sets sys.path)

from tests.support import Replica, probe, wait_until
from worker import client
from worker.drivers import make_driver
from worker.migrate import migrate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--sqlite", action="store_true")
    args = ap.parse_args()
    logs = REPO / "bench" / "results"
    logs.mkdir(parents=True, exist_ok=True)
    if args.sqlite:
        url = f"sqlite:///{tempfile.mkdtemp()}/rescue.db"
        d = make_driver(url)
        migrate(d)
        probe.create(d.engine)
    else:
        url = fresh_database("dms_bench_rescue", probe)
    engine = sa.create_engine(url)
    client.register_job(engine, "CRASH", "tests.handlers:announce", max_attempts=100, allow_overlap=True)
    survivor = Replica(url, "survivor", logs, DMS_LOG_LEVEL="WARNING").start()
    times = []
    try:
        survivor.wait_registered(engine)
        time.sleep(8.5)   # the survivor must have been heartbeating for a whole rescue window
        for i in range(args.trials):
            victim = Replica(url, f"victim{i}", logs, DMS_LOG_LEVEL="WARNING", SCHEDULER_MAX_WORKERS=1).start()
            victim.wait_registered(engine)
            # Let the survivor's slots fill with other work so the victim's row goes to the victim.
            rid = None
            while rid is None:
                candidate = client.enqueue(engine, "CRASH", seconds=120)
                owner = wait_until(lambda: client.request_status(engine, candidate)["claimed_by"], 30, "a claim")
                if owner.startswith(f"victim{i}:"):
                    rid = candidate
            wait_until(lambda: client.request_status(engine, rid)["status"] == "PROCESSING", 30, "processing")
            t0 = time.monotonic()
            victim.kill9()
            wait_until(lambda: not (client.request_status(engine, rid)["claimed_by"] or "").startswith("victim"),
                       60, "the rescue")
            times.append(time.monotonic() - t0)
            client.request_stop(engine, mapref="CRASH")
    finally:
        survivor.stop()
    rows = [{"backend": engine.dialect.name, "trials": len(times), **{k: v for k, v in summary_ms(times).items() if k != "n"}}]
    print_table("kill -9 -> rescued (default heartbeat 1 s, rescue after 8 s)", rows)
    print(f"\nresults: {write_json('rescue_' + engine.dialect.name, {'seconds': times, 'summary': rows})}")


if __name__ == "__main__":
    main()
