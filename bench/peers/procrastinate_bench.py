"""Procrastinate on the same local PostgreSQL, mirroring bench/burndown.py and bench/pickup_latency.py.

Run with the peers' environment (bench/peers/setup.sh creates it):

    bench/.venv-peers/bin/python bench/peers/procrastinate_bench.py --scenario burndown [--jobs 20000]
        [--consumers 4] [--concurrency 4]
    bench/.venv-peers/bin/python bench/peers/procrastinate_bench.py --scenario pickup [--samples 200]

Burn-down: a fresh database dms_bench_procrastinate, the schema installed with Procrastinate's
own ``app.schema_manager.apply_schema_async()`` (what ``procrastinate schema --apply`` runs), N
jobs of an async no-op task deferred in one ``Task.batch_defer_async`` before any worker starts,
then C worker OS processes, each ``App.run_worker_async(concurrency=4)`` (Procrastinate's
closest equivalent of our 4 execution slots per replica: 4 jobs in flight per worker, each
fetched with its own ``procrastinate_fetch_job_v2`` call), default ``delete_jobs="never"``,
LISTEN/NOTIFY on (default). "Done" is counted in the database: procrastinate_jobs rows with
status 'succeeded'. jobs/s is measured like ours, from the first job done to the last; the time
from the workers' start is reported too.

Per job Procrastinate keeps: its ``procrastinate_jobs`` row (status 'succeeded', kept with the
default delete_jobs="never") and three ``procrastinate_events`` rows written by triggers
(deferred, started, succeeded).

Pickup: one worker, idle on LISTEN/NOTIFY (default; polling fallback every 5 s), one job at a
time; latency = the task's first ``time.time()`` minus ``time.time()`` right after
``defer_async`` returned (committed), same host clock. The task reports its start on stdout.
"""
from __future__ import annotations

import argparse
import asyncio
import queue
import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import procrastinate
from _util import (
    check_alive,
    fresh_database,
    print_table,
    scalar,
    spawn,
    stop,
    summary_ms,
    wait_until,
    write_json,
)
from procrastinate_app import make_app

DB = "dms_bench_procrastinate"
VERSION = procrastinate.__version__


# ---------------------------------------------------------------- worker process
async def work(url: str, concurrency: int, stamp: bool) -> None:
    app = make_app(url, stamp)
    async with app.open_async():
        if stamp:
            print("READY", flush=True)
        # install_signal_handlers (default True): SIGTERM/SIGINT stop the worker gracefully.
        await app.run_worker_async(concurrency=concurrency, wait=True, listen_notify=True)


# ---------------------------------------------------------------- set-up and helpers
async def _install_and_defer(url: str, n: int) -> None:
    app = make_app(url)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()
        if n:
            await app.tasks["noop"].batch_defer_async(*({} for _ in range(n)))


def prepare(n: int) -> str:
    url = fresh_database(DB)
    asyncio.run(_install_and_defer(url, n))
    return url


def records(url: str) -> dict[str, object]:
    """What Procrastinate keeps per job, counted after the run."""
    import psycopg
    with psycopg.connect(url, autocommit=True) as conn:
        jobs = dict(conn.execute("SELECT status::text, count(*) FROM procrastinate_jobs GROUP BY 1 ORDER BY 1").fetchall())
        events = dict(conn.execute("SELECT type::text, count(*) FROM procrastinate_events GROUP BY 1 ORDER BY 1").fetchall())
        return {"job_rows": sum(jobs.values()), "job_rows_by_status": jobs,
                "event_rows": sum(events.values()), "event_rows_by_type": events,
                "worker_rows": conn.execute("SELECT count(*) FROM procrastinate_workers").fetchone()[0]}


# ---------------------------------------------------------------- scenarios
def burndown(args) -> None:
    url = prepare(args.jobs)
    procs: list = []

    def done() -> int:
        check_alive(procs)
        return scalar(url, "SELECT count(*) FROM procrastinate_jobs WHERE status = 'succeeded'")

    t0 = time.monotonic()
    procs += [spawn(__file__, "--worker", "--url", url, "--concurrency", str(args.concurrency))
              for _ in range(args.consumers)]
    try:
        wait_until(done, 120, "the first job")
        t_first = time.monotonic()
        wait_until(lambda: done() == args.jobs, 3600, "the burn-down", interval=0.2)
        t_end = time.monotonic()
    finally:
        stop(procs)
    rec = records(url)
    row = {"system": f"procrastinate {VERSION}", "config": f"concurrency={args.concurrency}", "jobs": args.jobs,
           "consumers": args.consumers, "seconds_from_first_job": round(t_end - t_first, 2),
           "jobs_per_s": round(args.jobs / (t_end - t_first), 1),
           "jobs_per_s_from_start": round(args.jobs / (t_end - t0), 1), "startup_s": round(t_first - t0, 2),
           "job_rows": rec["job_rows"], "event_rows": rec["event_rows"]}
    print_table(f"Burn-down, async noop, Procrastinate {VERSION}, {args.consumers} worker processes", [row])
    out = write_json("procrastinate_burndown", {
        "peer": "procrastinate", "version": VERSION, "driver": "psycopg (PsycopgConnector)",
        "handler": "async def noop(): pass", "delete_jobs": "never (default)",
        "done_measured_by": "count(procrastinate_jobs WHERE status='succeeded')",
        "records_per_job": "procrastinate_jobs row kept (status succeeded); 3 procrastinate_events rows "
                           "(deferred, started, succeeded) written by triggers",
        "runs": [{**row, "concurrency": args.concurrency, "records": rec}]})
    print(f"\nresults: {out}")


def pickup(args) -> None:
    url = prepare(0)
    proc = spawn(__file__, "--worker", "--url", url, "--concurrency", str(args.concurrency), "--stamp", stdout=-1)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()

    def started_of(key: str) -> float:
        deadline = time.monotonic() + 60
        while True:
            line = lines.get(timeout=max(0.01, deadline - time.monotonic())).split()
            if line[:2] == ["STARTED", key]:
                return float(line[2])

    async def run() -> list[float]:
        app = make_app(url)
        latencies = []
        async with app.open_async():
            task = app.tasks["noop"]
            for i in range(-8, args.samples):       # 8 warm-up jobs first, as ours
                if i >= 0:
                    await asyncio.sleep(random.uniform(0.02, 0.1))
                await task.defer_async(n=i)
                committed = time.time()
                started = await asyncio.to_thread(started_of, str(i))
                if i >= 0:
                    latencies.append(started - committed)
        return latencies

    try:
        if lines.get(timeout=60).strip() != "READY":
            raise RuntimeError("worker did not start")
        time.sleep(1.0)          # let it reach its LISTEN wait
        latencies = asyncio.run(run())
    finally:
        stop([proc])
    row = {"system": f"procrastinate {VERSION}", "wake-up": "LISTEN/NOTIFY (default, polling fallback 5 s)",
           **summary_ms(latencies)}
    print_table("Pickup latency, commit -> task start, Procrastinate, 1 worker", [row])
    out = write_json("procrastinate_pickup", {"peer": "procrastinate", "version": VERSION,
                                              "config": f"concurrency={args.concurrency}", "rows": [row]})
    print(f"\nresults: {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", choices=["burndown", "pickup"], default="burndown")
    ap.add_argument("--jobs", type=int, default=20000)
    ap.add_argument("--consumers", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=4, help="run_worker_async(concurrency=...) per worker")
    ap.add_argument("--samples", type=int, default=200)
    # internal: the worker process
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--stamp", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        asyncio.run(work(args.url, args.concurrency, args.stamp))
    elif args.scenario == "burndown":
        burndown(args)
    else:
        pickup(args)


if __name__ == "__main__":
    main()
