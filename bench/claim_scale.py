"""Scale: claim latency with 1,000 and with 1,000,000 NEW rows queued in DMS_PRCREQ.

For each queue size, on a fresh local PostgreSQL database: the queue is bulk-loaded in SQL
(INSERT ... SELECT generate_series, oldest first, then ANALYZE), then N claims of up to 4 rows
each are timed through our driver, ``make_driver(url).request_claim(ClaimParams(worker_id,
job_limit=4))`` (one statement: the STOP lane and the job lane, FOR UPDATE SKIP LOCKED,
UPDATE ... RETURNING), after a few untimed warm-up claims. After each timed claim, untimed, the
claimed rows are put back at the tail of the queue (NEW, not_before = now), so that the queue
holds exactly its size throughout (300 claims of 4 would otherwise drain the 1,000-row queue).

At the largest size the claim statement (_CLAIM_SQL of worker/drivers/postgresql.py) is run under
EXPLAIN (ANALYZE, BUFFERS) with the same parameters, in a rolled-back transaction, twice: with
the parameters as literals (custom plan) and as a prepared statement under
plan_cache_mode=force_generic_plan (the plan a long-lived connection may end up using). Both are
saved to the JSON; nothing is asserted, but the plans' scan and sort nodes are summarised.

    .venv/bin/python bench/claim_scale.py [--sizes 1000,1000000] [--claims 300]
"""
from __future__ import annotations

import argparse
import re
import time

import sqlalchemy as sa
from common import fresh_database, print_table, summary_ms, write_json

from worker import schema as s
from worker.drivers import make_driver
from worker.drivers.base import ClaimParams
from worker.drivers.postgresql import _CLAIM_SQL

DB = "dms_bench_claim_scale"
WORKER = "claim-scale:bench"

LOAD_SQL = """
INSERT INTO dms_prcreq (request_id, mapref, request_type, status, requested_at, not_before, attempts)
SELECT 'cs-' || g, 'NOOP', 'IMMEDIATE', 'NEW', t, t, 0
FROM generate_series(1, :n) AS g,
     LATERAL (SELECT timezone('UTC', now()) - interval '1 hour' - (:n - g) * interval '1 millisecond' AS t) AS ts
"""

# Put the claimed rows back at the tail of the queue (untimed).
REQUEUE_SQL = """
UPDATE dms_prcreq SET status = 'NEW', claimed_by = NULL, claimed_at = NULL, excl_key = NULL,
       requested_at = timezone('UTC', clock_timestamp()), not_before = timezone('UTC', clock_timestamp())
WHERE request_id = ANY(:ids)
"""


def load(engine: sa.Engine, n: int) -> float:
    t0 = time.monotonic()
    with engine.begin() as conn:
        conn.execute(sa.text("TRUNCATE dms_prcreq"))
        conn.execute(sa.text(LOAD_SQL), {"n": n})
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("ANALYZE dms_prcreq"))
    return time.monotonic() - t0


def claim_params(p: ClaimParams) -> dict:
    # Exactly what PostgresDriver.request_claim binds.
    return dict(worker_id=p.worker_id, job_limit=max(0, p.job_limit), scan_limit=max(0, 3 * p.job_limit + 5),
                control_types=list(p.control_types) or [""], control_limit=p.control_limit if p.control_types else 0)


SETTINGS = ("enable_sort", "enable_bitmapscan", "enable_seqscan", "jit", "jit_above_cost", "plan_cache_mode",
            "random_page_cost", "work_mem")


def claim_connection(driver, engine: sa.Engine):
    """The connection the driver claims on, when it keeps one of its own (its session settings
    shape the plan), else an ordinary one."""
    opener = getattr(driver, "_claim_connection", None)
    return opener() if opener else engine.connect()


def explain(driver, engine: sa.Engine, p: ClaimParams) -> tuple[dict[str, str], dict[str, str]]:
    """EXPLAIN (ANALYZE, BUFFERS) of the claim, custom and generic plan, on the driver's own claim
    connection; in an explicit transaction that is rolled back (the connection may be autocommit)."""
    params = claim_params(p)
    plans = {}
    with claim_connection(driver, engine) as conn:
        # Explicit BEGIN/ROLLBACK below: the driver's claim connection may be autocommit anyway.
        conn.execution_options(isolation_level="AUTOCOMMIT")
        settings = {name: conn.exec_driver_sql(f"SHOW {name}").scalar() for name in SETTINGS}
        conn.exec_driver_sql("BEGIN")
        try:
            rows = conn.execute(sa.text("EXPLAIN (ANALYZE, BUFFERS) " + _CLAIM_SQL), params).all()
            plans["custom"] = "\n".join(r[0] for r in rows)
        finally:
            conn.exec_driver_sql("ROLLBACK")
        # The generic plan: the statement prepared with typed $n parameters, as psycopg's
        # server-side prepared statements send it after a few executions.
        numbered = _CLAIM_SQL
        for i, name in enumerate(["worker_id", "job_limit", "scan_limit", "control_types", "control_limit"], 1):
            numbered = numbered.replace(f":{name}", f"${i}")
        conn.exec_driver_sql("BEGIN")
        try:
            conn.exec_driver_sql("SET LOCAL plan_cache_mode = force_generic_plan")
            conn.exec_driver_sql(f"PREPARE dms_claim_generic(varchar, int, int, varchar[], int) AS {numbered}")
            # EXECUTE under EXPLAIN takes no bind parameters: literals (ours, quoted by the server).
            lit = conn.execute(sa.text("SELECT quote_literal(:w), quote_literal(CAST(:c AS varchar[]))"),
                               dict(w=params["worker_id"], c=params["control_types"])).one()
            rows = conn.exec_driver_sql(
                f"EXPLAIN (ANALYZE, BUFFERS) EXECUTE dms_claim_generic({lit[0]}, {int(params['job_limit'])}, "
                f"{int(params['scan_limit'])}, {lit[1]}, {int(params['control_limit'])})").all()
            plans["generic"] = "\n".join(r[0] for r in rows)
        finally:
            conn.exec_driver_sql("ROLLBACK")
            conn.exec_driver_sql("DEALLOCATE ALL")
    return plans, settings


def plan_summary(plan: str) -> dict:
    nodes = re.findall(r"(?:->\s+|^)((?:Parallel )?(?:Seq Scan|Index Scan|Index Only Scan|Bitmap Heap Scan|"
                       r"Bitmap Index Scan|Sort|Incremental Sort|Hash Anti Join|Nested Loop Anti Join|Hash Join|"
                       r"Merge Anti Join|LockRows|Limit)[^(]*)", plan, re.MULTILINE)
    nodes = [n.strip() for n in nodes]
    seq = [n for n in nodes if n.startswith(("Seq Scan", "Parallel Seq Scan"))]
    # Only the queue grows with the backlog; a scan of the small job registry (dms_job) is cheap.
    seq_queue = [n for n in seq if "dms_prcreq" in n]
    sorts = [n for n in nodes if re.match(r"(Incremental )?Sort\b", n)]
    sort_methods = re.findall(r"Sort Method: .*", plan)
    exec_ms = re.search(r"Execution Time: ([\d.]+) ms", plan)
    jit = re.search(r"JIT:\n\s+Functions: (\d+)\n\s+Options: (.*)\n\s+Timing: .*Total ([\d.]+) ms", plan)
    total_cost = re.match(r".*?cost=[\d.]+\.\.([\d.]+)", plan)
    return {"total_cost": float(total_cost.group(1)) if total_cost else None,
            "jit": {"functions": int(jit.group(1)), "options": jit.group(2), "total_ms": float(jit.group(3))} if jit else None,
            "scan_and_sort_nodes": nodes, "seq_scans": seq, "sorts": sorts, "sort_methods": sort_methods,
            "execution_ms": float(exec_ms.group(1)) if exec_ms else None,
            "seq_scans_of_queue": seq_queue,
            "index_driven": not seq_queue and not any("external" in m for m in sort_methods)}


def measure(driver, engine: sa.Engine, claims: int, warmup: int = 10) -> list[float]:
    p = ClaimParams(WORKER, job_limit=4)
    latencies = []
    for i in range(warmup + claims):
        t0 = time.perf_counter()
        claimed = driver.request_claim(p)
        elapsed = time.perf_counter() - t0
        if len(claimed) != 4:
            raise RuntimeError(f"claim {i} returned {len(claimed)} rows, expected 4")
        if i >= warmup:
            latencies.append(elapsed)
        with engine.begin() as conn:
            conn.execute(sa.text(REQUEUE_SQL), {"ids": [r.request_id for r in claimed]})
    return latencies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,1000000", help="comma-separated queue sizes (NEW rows)")
    ap.add_argument("--claims", type=int, default=300)
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    url = fresh_database(DB)
    engine = sa.create_engine(url)
    driver = make_driver(url)
    # A job that allows overlap: each claim starts its 4 rows (PROCESSING, DMS_PRCLOG rows opened).
    with engine.begin() as conn:
        conn.execute(sa.text("INSERT INTO dms_job (mapref, handler, allow_overlap) VALUES ('NOOP', "
                             "'worker.jobs.builtin:noop', 'Y')"))
    rows, plans, settings = [], {}, {}
    try:
        for n in sizes:
            load_s = load(engine, n)
            latencies = measure(driver, engine, args.claims)
            with engine.connect() as conn:
                new = conn.execute(sa.select(sa.func.count()).select_from(s.prcreq).where(s.prcreq.c.status == "NEW")).scalar()
                rel = conn.execute(sa.text("SELECT pg_size_pretty(pg_total_relation_size('dms_prcreq'))")).scalar()
            rows.append({"queued_new": n, "new_after": new, "claims": args.claims, "rows_each": 4,
                         **summary_ms(latencies), "load_s": round(load_s, 1), "table_size": rel})
            if n == max(sizes):
                plans, settings = explain(driver, engine, ClaimParams(WORKER, job_limit=4))
    finally:
        driver.dispose()
    ratio = None
    if len(rows) >= 2 and rows[0]["p50_ms"]:
        ratio = round(rows[-1]["p50_ms"] / rows[0]["p50_ms"], 2)
    print_table("Claim latency, request_claim(job_limit=4) by queue size (PostgreSQL)", rows)
    summaries = {k: plan_summary(v) for k, v in plans.items()}
    if ratio is not None:
        print(f"\np50 ratio {rows[-1]['queued_new']:,} / {rows[0]['queued_new']:,} rows: {ratio}x")
    for kind, summary in summaries.items():
        print(f"\nclaim plan at {max(sizes):,} rows ({kind}): index-driven={summary['index_driven']}, "
              f"execution {summary['execution_ms']} ms, total cost {summary['total_cost']}, JIT {summary['jit']}")
        print("  nodes: " + "; ".join(summary["scan_and_sort_nodes"]))
        if summary["seq_scans"] or summary["sort_methods"]:
            print(f"  seq scans: {summary['seq_scans']}  sorts: {summary['sort_methods']}")
    print(f"\nclaim session settings: {settings}")
    if "custom" in plans:
        print(f"\nEXPLAIN (ANALYZE, BUFFERS), custom plan:\n{plans['custom']}")
    path = write_json("claim_scale", {"rows": rows, "p50_ratio_largest_to_smallest": ratio,
                                      "plan_rows": max(sizes), "claim_session_settings": settings, "plans": plans, "plan_summaries": summaries})
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
