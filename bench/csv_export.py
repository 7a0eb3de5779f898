"""CSV export: throughput, file size and peak memory of ``worker.jobs.csv:export``.

Generates a table of N rows (id, md5 text, integer, numeric, timestamp, a text column that is
NULL every tenth row) in a fresh local PostgreSQL database, then calls the handler in-process
with a JobContext, the way an execution process does, for batch sizes 1,000 and 10,000, on all
N rows and on the first 100,000. Each measurement runs in a fresh Python process so that its
peak is its own:

- rows/s and the peak RSS growth (``resource.getrusage`` ``ru_maxrss`` after the export minus
  before it; the process has imported everything and connected before the baseline), from a
  run without tracing;
- the ``tracemalloc`` peak (Python allocations only; libpq's buffers are not Python objects),
  from a second run with tracing on, which is slower and is timed separately.

A last row, for contrast, reads all N rows with ``fetchall()`` (no server-side cursor): what
the measurement shows when memory does grow with the row count.

    .venv/bin/python bench/csv_export.py [--rows 1000000] [--small 100000]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc

import sqlalchemy as sa
from common import fresh_database, print_table, write_json  # noqa: E402  (sets sys.path)

from worker.jobs import csv as csvjobs
from worker.jobs.context import JobContext

DATABASE = "dms_bench_csv"
QUERY = "SELECT id, name, qty, amount, created, note FROM bench_csv_rows WHERE id <= {n} ORDER BY id"


def maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss      # KiB on Linux


def child(cfg: dict) -> dict:
    """One measurement, in this (fresh) process."""
    os.environ["DMS_FILE_ROOTS"] = cfg["dir"]          # file jobs write only below configured roots
    engine = sa.create_engine(cfg["url"])
    out = os.path.join(cfg["dir"], f"export_{cfg['rows']}_{cfg['batch_size']}.csv")
    with engine.connect() as conn:                      # connect (and load the driver) before the baseline
        conn.execute(sa.text("SELECT 1"))
    ctx = JobContext(request_id="bench", mapref="CSV_BENCH", request_type="IMMEDIATE", prcid=1, attempt=1,
                     params={}, payload={"query": QUERY.format(n=cfg["rows"]), "path": out,
                                         "batch_size": cfg["batch_size"]},
                     as_of=None, logger=logging.getLogger("bench"), _connect=engine.connect)
    if cfg["trace"]:
        tracemalloc.start()
    rss0 = maxrss_kib()
    t0 = time.perf_counter()
    if cfg["mode"] == "fetchall":
        with engine.connect() as conn:
            rows = len(conn.execute(sa.text(QUERY.format(n=cfg["rows"]))).fetchall())
        size = 0
    else:
        try:
            rows = csvjobs.export(ctx)["rows"]
            ctx.connection.commit()
        finally:
            ctx.connection.close()
        size = os.path.getsize(out)
        os.remove(out)
    elapsed = time.perf_counter() - t0
    result = {"rows": rows, "seconds": elapsed, "file_bytes": size, "maxrss_delta_kib": maxrss_kib() - rss0}
    if cfg["trace"]:
        result["tracemalloc_peak_bytes"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    engine.dispose()
    return result


def measure(cfg: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"measurement {cfg} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--small", type=int, default=100_000, help="the smaller row count (memory must not change)")
    ap.add_argument("--batch-sizes", default="1000,10000")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    url = fresh_database(DATABASE)
    engine = sa.create_engine(url)
    t0 = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(sa.text(
            "CREATE TABLE bench_csv_rows AS SELECT i::bigint AS id, md5(i::text) AS name, (i % 1000)::int AS qty,"
            " ((i % 100000) / 100.0)::numeric(12, 2) AS amount,"
            " timestamp '2026-01-01' + i * interval '1 second' AS created,"
            " CASE WHEN i % 10 = 0 THEN NULL ELSE 'note ' || i END AS note"
            " FROM generate_series(1, :n) AS i"), {"n": args.rows})
        conn.execute(sa.text("ALTER TABLE bench_csv_rows ADD PRIMARY KEY (id)"))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE bench_csv_rows"))
        pg_version = conn.execute(sa.text("SHOW server_version")).scalar()
    engine.dispose()
    print(f"generated {args.rows:,} rows in {time.perf_counter() - t0:.1f}s (PostgreSQL {pg_version})")

    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    table, results = [], []
    with tempfile.TemporaryDirectory() as out_dir:
        for rows in sorted({args.small, args.rows}):
            for batch_size in batch_sizes:
                cfg = dict(url=url, dir=out_dir, rows=rows, batch_size=batch_size, mode="export")
                plain = measure(dict(cfg, trace=False))
                traced = measure(dict(cfg, trace=True))
                results.append({**cfg, "plain": plain, "traced": traced})
                table.append({"rows": f"{plain['rows']:,}", "batch_size": f"{batch_size:,}",
                              "seconds": f"{plain['seconds']:.2f}",
                              "rows/s": f"{plain['rows'] / plain['seconds']:,.0f}",
                              "file_MB": f"{plain['file_bytes'] / 1e6:.1f}",
                              "maxrss_delta_MB": f"{plain['maxrss_delta_kib'] / 1024:.1f}",
                              "tracemalloc_peak_MB": f"{traced['tracemalloc_peak_bytes'] / 1e6:.2f}"})
        cfg = dict(url=url, dir=out_dir, rows=args.rows, batch_size=0, mode="fetchall")
        plain, traced = measure(dict(cfg, trace=False)), measure(dict(cfg, trace=True))
        results.append({**cfg, "plain": plain, "traced": traced})
        table.append({"rows": f"{plain['rows']:,}", "batch_size": "fetchall (contrast)",
                      "seconds": f"{plain['seconds']:.2f}", "rows/s": f"{plain['rows'] / plain['seconds']:,.0f}",
                      "file_MB": "-", "maxrss_delta_MB": f"{plain['maxrss_delta_kib'] / 1024:.1f}",
                      "tracemalloc_peak_MB": f"{traced['tracemalloc_peak_bytes'] / 1e6:.2f}"})

    print_table(f"worker.jobs.csv:export on PostgreSQL {pg_version} (rows/s and RSS from untraced runs)", table)
    for r in results:
        r.pop("url"), r.pop("dir")
    path = write_json("csv_export", {"rows": args.rows, "small": args.small, "postgresql": pg_version,
                                     "python": platform.python_version(), "cpus": os.cpu_count(),
                                     "results": results, "table": table})
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
