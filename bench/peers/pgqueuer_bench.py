"""PgQueuer on the same local PostgreSQL, mirroring bench/burndown.py and bench/pickup_latency.py.

Run with the peers' environment (bench/peers/setup.sh creates it):

    bench/.venv-peers/bin/python bench/peers/pgqueuer_bench.py --scenario burndown [--jobs 20000]
        [--consumers 4] [--configs 2:4,10:0] [--driver asyncpg|psycopg]
    bench/.venv-peers/bin/python bench/peers/pgqueuer_bench.py --scenario pickup [--samples 200]

Burn-down: a fresh database dms_bench_pgqueuer, the schema installed with PgQueuer's own
``Queries.install()`` (what ``pgq install`` runs; default durability "durable", all tables
logged), N jobs for an async no-op entrypoint enqueued in one batch ``Queries.enqueue`` before
any consumer starts, then C consumer OS processes, each one ``QueueManager`` on its own
connection. Each config BATCH:MAX is ``QueueManager.run(batch_size=BATCH,
max_concurrent_tasks=MAX or None)``; ``2:4`` is the nearest to our 4 execution slots per
replica (PgQueuer requires max_concurrent_tasks >= 2 * batch_size, and the cap is enforced in
the dequeue SQL), ``10:0`` is PgQueuer's default (batch 10, no cap). "Done" is counted in the
database: rows of pgqueuer_log with status 'successful'. jobs/s is measured like ours, from the
first job done to the last; the time from the consumers' start is reported too.

Per job PgQueuer writes: the queue row in ``pgqueuer`` (deleted on completion) and three
``pgqueuer_log`` rows (queued, picked, successful), which a periodic task folds into per-second
counters in ``pgqueuer_statistics`` (the log rows are kept, flagged aggregated).

Pickup: one consumer, idle on LISTEN/NOTIFY (PgQueuer's default wake-up), one job at a time;
latency = the handler's first ``time.time()`` minus ``time.time()`` right after the enqueue
committed (autocommit), same host clock. The handler reports its start on the consumer's stdout.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import queue
import random
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import pgqueuer
from _util import (
    check_alive,
    fresh_database,
    print_table,
    scalar,
    spawn,
    stop,
    summary_ms,
    table_writes,
    tree_cpu_seconds,
    wait_until,
    write_json,
)
from pgqueuer import Queries, QueueManager

DB = "dms_bench_pgqueuer"
NAME = "pgqueuer"


async def _driver(url: str, kind: str):
    if kind == "asyncpg":
        import asyncpg
        from pgqueuer.db import AsyncpgDriver
        return AsyncpgDriver(await asyncpg.connect(url))
    import psycopg
    from pgqueuer.db import PsycopgDriver
    return PsycopgDriver(await psycopg.AsyncConnection.connect(url, autocommit=True))


# ---------------------------------------------------------------- consumer process
async def consume(url: str, kind: str, batch_size: int, max_tasks: int, stamp: bool) -> None:
    qm = QueueManager(Queries(await _driver(url, kind)))

    @qm.entrypoint("noop")
    async def noop(job: pgqueuer.Job) -> None:
        if stamp:
            started = time.time()
            print(f"STARTED {job.payload.decode()} {started:.6f}", flush=True)

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, qm.shutdown.set)
    if stamp:
        print("READY", flush=True)
    await qm.run(batch_size=batch_size, max_concurrent_tasks=max_tasks or None)


# ---------------------------------------------------------------- set-up and helpers
async def _install_and_enqueue(url: str, kind: str, n: int) -> None:
    q = Queries(await _driver(url, kind))
    await q.install()
    if n:
        await q.enqueue(["noop"] * n, [None] * n, [0] * n)


def prepare(kind: str, n: int) -> str:
    url = fresh_database(DB)
    asyncio.run(_install_and_enqueue(url, kind, n))
    return url


def consumer_args(url: str, kind: str, batch: int, max_tasks: int, stamp: bool = False) -> list[str]:
    args = ["--consumer", "--url", url, "--driver", kind, "--batch-size", str(batch),
            "--max-concurrent-tasks", str(max_tasks)]
    return args + (["--stamp"] if stamp else [])


def records(url: str) -> dict[str, object]:
    """What PgQueuer keeps per job, counted after the run."""
    import psycopg
    with psycopg.connect(url, autocommit=True) as conn:
        by_status = dict(conn.execute("SELECT status::text, count(*) FROM pgqueuer_log GROUP BY 1 ORDER BY 1").fetchall())
        return {"queue_rows_left": conn.execute("SELECT count(*) FROM pgqueuer").fetchone()[0],
                "log_rows": sum(by_status.values()), "log_rows_by_status": by_status,
                "statistics_rows": conn.execute("SELECT count(*) FROM pgqueuer_statistics").fetchone()[0]}


# ---------------------------------------------------------------- scenarios
def burndown(args) -> None:
    rows, details = [], []
    for cfg in args.configs.split(","):
        batch, max_tasks = (int(x) for x in cfg.split(":"))
        url = prepare(args.driver, args.jobs)
        procs: list = []

        def done(url: str = url, procs: list = procs) -> int:
            check_alive(procs)
            return scalar(url, "SELECT count(*) FROM pgqueuer_log WHERE status = 'successful'")

        tables = ["pgqueuer", "pgqueuer_log", "pgqueuer_statistics"]
        writes0 = table_writes(lambda sql: scalar(url, sql), tables)
        t0 = time.monotonic()
        procs += [spawn(__file__, *consumer_args(url, args.driver, batch, max_tasks)) for _ in range(args.consumers)]
        try:
            wait_until(done, 120, "the first job")
            t_first = time.monotonic()
            cpu0 = tree_cpu_seconds([p.pid for p in procs])
            wait_until(lambda: done() == args.jobs, 1800, "the burn-down", interval=0.2)
            t_end = time.monotonic()
            cpu = tree_cpu_seconds([p.pid for p in procs]) - cpu0
        finally:
            stop(procs)
        writes = {k: v - writes0[k] for k, v in table_writes(lambda sql: scalar(url, sql), tables).items()}
        rec = records(url)
        rows.append({"system": f"pgqueuer {pgqueuer.__version__}", "config": f"batch_size={batch}, max_concurrent_tasks="
                     f"{max_tasks or 'None'}", "jobs": args.jobs, "consumers": args.consumers,
                     "seconds_from_first_job": round(t_end - t_first, 2),
                     "jobs_per_s": round(args.jobs / (t_end - t_first), 1),
                     "jobs_per_s_from_start": round(args.jobs / (t_end - t0), 1),
                     "startup_s": round(t_first - t0, 2),
                     "worker_cpu_ms_per_job": round(1000 * cpu / max(1, args.jobs - 1), 3),
                     "rows_per_job": "/".join(f"{k} {writes[k] / args.jobs:.2f}" for k in ("ins", "upd", "del")),
                     "log_rows": rec["log_rows"],
                     "statistics_rows": rec["statistics_rows"]})
        details.append({**rows[-1], "batch_size": batch, "max_concurrent_tasks": max_tasks or None, "records": rec})
    print_table(f"Burn-down, async noop, PgQueuer {pgqueuer.__version__} ({args.driver}), "
                f"{args.consumers} consumer processes", rows)
    out = write_json("pgqueuer_burndown", {
        "peer": "pgqueuer", "version": pgqueuer.__version__, "driver": args.driver, "durability": "durable (default)",
        "handler": "async def noop(job): pass", "done_measured_by": "count(pgqueuer_log WHERE status='successful')",
        "records_per_job": "pgqueuer row deleted on completion; 3 pgqueuer_log rows (queued, picked, successful), "
                           "folded periodically into pgqueuer_statistics per-second counters",
        "runs": details})
    print(f"\nresults: {out}")


def pickup(args) -> None:
    url = prepare(args.driver, 0)
    proc = spawn(__file__, *consumer_args(url, args.driver, args.batch_size, 0, stamp=True), stdout=-1)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()

    def started_of(key: str) -> float:
        deadline = time.monotonic() + 60
        while True:
            line = lines.get(timeout=max(0.01, deadline - time.monotonic())).split()
            if line[:2] == ["STARTED", key]:
                return float(line[2])

    async def run() -> list[float]:
        q = Queries(await _driver(url, args.driver))
        latencies = []
        for i in range(-8, args.samples):       # 8 warm-up jobs first, as ours
            if i >= 0:
                await asyncio.sleep(random.uniform(0.02, 0.1))
            await q.enqueue("noop", str(i).encode())
            committed = time.time()
            started = await asyncio.to_thread(started_of, str(i))
            if i >= 0:
                latencies.append(started - committed)
        return latencies

    try:
        if lines.get(timeout=60).strip() != "READY":
            raise RuntimeError("consumer did not start")
        time.sleep(1.0)          # let it reach its LISTEN wait
        latencies = run_async(run())
    finally:
        stop([proc])
    row = {"system": f"pgqueuer {pgqueuer.__version__}", "wake-up": "LISTEN/NOTIFY (default, dequeue_timeout 30 s)",
           **summary_ms(latencies)}
    print_table(f"Pickup latency, commit -> handler start, PgQueuer ({args.driver}), 1 consumer", [row])
    out = write_json("pgqueuer_pickup", {"peer": "pgqueuer", "version": pgqueuer.__version__, "driver": args.driver,
                                         "config": f"batch_size={args.batch_size}, max_concurrent_tasks=None",
                                         "rows": [row]})
    print(f"\nresults: {out}")


def run_async(coro):
    return asyncio.run(coro)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", choices=["burndown", "pickup"], default="burndown")
    ap.add_argument("--jobs", type=int, default=20000)
    ap.add_argument("--consumers", type=int, default=4)
    ap.add_argument("--configs", default="2:4,10:0",
                    help="comma-separated BATCH_SIZE:MAX_CONCURRENT_TASKS (0 = no cap), one burn-down each")
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--driver", choices=["asyncpg", "psycopg"], default="asyncpg",
                    help="PgQueuer's driver (asyncpg is the one its docs recommend for throughput)")
    # internal: the consumer process
    ap.add_argument("--consumer", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--batch-size", type=int, default=10, help=argparse.SUPPRESS)
    ap.add_argument("--max-concurrent-tasks", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--stamp", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.consumer:
        asyncio.run(consume(args.url, args.driver, args.batch_size, args.max_concurrent_tasks, args.stamp))
    elif args.scenario == "burndown":
        burndown(args)
    else:
        pickup(args)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
