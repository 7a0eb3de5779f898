"""How soon a replica runs work: from start to the first job finished with 16 slots, and how
soon a slot is ready again after its execution was stopped.

    .venv/bin/python bench/startup.py [--slots 16] [--trials 5]

Start: a fresh database with 16 queued ``noop`` requests; ``dms-worker run`` is started and
the clock runs until the first request is DONE (database polled every 10 ms). Replacement: an
executor of one slot runs ``sleep``; after ``cancel`` (a stop or a timeout) the time until the
slot's new execution process says it is ready.
"""
from __future__ import annotations

import argparse
import os
import time
import uuid
from multiprocessing.connection import wait

import sqlalchemy as sa
from common import REPO, fresh_database, print_table, write_json  # noqa: E402  (sets sys.path)
from report import summary_ms  # noqa: E402

from tests.support import Replica, wait_until
from worker import client, logs
from worker import schema as s
from worker.executor import ChildConfig, Executor, Task


def first_job(slots: int, trial: int) -> float:
    url = fresh_database("dms_bench_startup")
    engine = sa.create_engine(url)
    client.register_job(engine, "NOOP", "worker.jobs.builtin:noop", allow_overlap=True)
    with engine.begin() as conn:
        conn.execute(sa.insert(s.prcreq), [dict(request_id=str(uuid.uuid4()), mapref="NOOP", request_type="IMMEDIATE")
                                           for _ in range(slots)])
    t0 = time.monotonic()
    r = Replica(url, f"start{trial}", REPO / "bench" / "results", SCHEDULER_MAX_WORKERS=slots,
                DMS_LOG_LEVEL="WARNING").start()
    try:
        def done() -> bool:
            with engine.connect() as conn:
                return bool(conn.execute(sa.text("SELECT count(*) FROM dms_prcreq WHERE status = 'DONE'")).scalar())
        wait_until(done, 120, "the first job", interval=0.01)
        return time.monotonic() - t0
    finally:
        r.stop()
        engine.dispose()


def replacement(trials: int) -> list[float]:
    fence = logs.CONTEXT.Value("d", time.monotonic() + 3600, lock=False)
    ex = Executor(1, ChildConfig("sqlite:///:memory:", None, "WARNING", fence_s=3600, stop_grace=0.5), fence,
                  preload=("worker.drivers.sqlite",))
    ex.start()
    slot, took = ex.slots[0], []

    def until_idle() -> None:
        while not slot.idle:
            ex.tick(time.monotonic())
            for ready in wait(ex.waitables(), 0.005):
                ex.receive(ready, time.monotonic())

    try:
        until_idle()
        for i in range(trials):
            task = Task(prcid=i, request_id=f"r{i}", mapref="M", request_type="IMMEDIATE",
                        handler="worker.jobs.builtin:sleep", attempt=1, params={}, payload={"seconds": 60},
                        as_of=None)
            ex.run(slot, task, None)
            time.sleep(0.05)
            t0 = time.monotonic()
            ex.cancel(slot, t0, grace_s=0.0)      # a hard stop: killed at once
            until_idle()
            took.append(time.monotonic() - t0)
    finally:
        ex.close()
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slots", type=int, default=16)
    ap.add_argument("--trials", type=int, default=5)
    args = ap.parse_args()
    starts = [first_job(args.slots, i) for i in range(args.trials)]
    replaced = replacement(20)
    row = {"slots": args.slots, "trials": args.trials, **{f"start_to_first_job_{k}": v
                                                           for k, v in summary_ms(starts).items() if k != "n"},
           **{f"slot_ready_after_stop_{k}": v for k, v in summary_ms(replaced).items() if k != "n"}}
    print_table("Replica start to first job, and a slot's replacement after a stop", [row])
    print(f"\nresults: {write_json('startup', {'row': row, 'pid': os.getpid()})}")


if __name__ == "__main__":
    main()
