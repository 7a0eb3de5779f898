"""Plans and timings of the console's queries at scale, for docs/console.md (not a test).

    .venv/bin/python -m tests.console.plan_at_scale --rows 1000000

Creates a scratch PostgreSQL database (DMS_TEST_PG_URL's server, default the local one),
migrates it, fills DMS_PRCREQ and DMS_PRCLOG with ``--rows`` rows each (20 jobs; 1% FAILED,
0.1% NEW, the rest DONE, one request a second), runs ANALYZE, then prints EXPLAIN (ANALYZE,
BUFFERS) of each page's statements and the median of 20 runs. Drops the database at the end.
"""
from __future__ import annotations

import argparse
import os
import secrets
import statistics
import time
from datetime import datetime

import sqlalchemy as sa

from worker.console import data
from worker.drivers import make_driver
from worker.migrate import migrate

ADMIN = os.environ.get("DMS_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def fill(engine, rows: int) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("""
            INSERT INTO dms_prcreq (request_id, mapref, request_type, status, requested_at, completed_at, attempts)
            SELECT 'req-' || lpad(g::text, 8, '0'), 'M' || (g % 20),
                   CASE WHEN g % 10 = 0 THEN 'HISTORY' ELSE 'IMMEDIATE' END,
                   CASE WHEN g % 1000 = 0 THEN 'NEW' WHEN g % 100 = 0 THEN 'FAILED' ELSE 'DONE' END,
                   timestamp '2026-01-01' + g * interval '1 second',
                   CASE WHEN g % 1000 = 0 THEN NULL ELSE timestamp '2026-01-01' + g * interval '1 second' END, 1
            FROM generate_series(1, :n) g"""), {"n": rows})
        conn.execute(sa.text("""
            INSERT INTO dms_prclog (mapref, strtdt, enddt, status, request_id, worker_id, attempt)
            SELECT 'M' || (g % 20), timestamp '2026-01-01' + g * interval '1 second',
                   timestamp '2026-01-01' + g * interval '1 second' + (g % 7) * interval '1 second',
                   CASE WHEN g % 100 = 0 THEN 'FL' ELSE 'PC' END, 'req-' || lpad(g::text, 8, '0'), 'w1', 1
            FROM generate_series(1, :n) g"""), {"n": rows})
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE dms_prcreq"))
        conn.execute(sa.text("VACUUM ANALYZE dms_prclog"))


def sql_of(conn, statement) -> str:
    if isinstance(statement, str):
        return statement
    return str(statement.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))


def show(conn, title: str, statement) -> None:
    sql = sql_of(conn, statement)
    plan = "\n".join(r[0] for r in conn.execute(sa.text("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + sql)))
    times = []
    for _ in range(20):
        start = time.perf_counter()
        conn.execute(sa.text(sql)).all()
        times.append((time.perf_counter() - start) * 1000)
    print(f"\n### {title}: median {statistics.median(times):.2f} ms over 20 runs\n\n```\n{plan}\n```")


V004_LIST_INDEXES = {
    "dms_prcreq_requested_ix": "(requested_at, request_id)",
    "dms_prcreq_finished_ix": "(status, requested_at, request_id) WHERE status IN ('DONE', 'FAILED', 'CANCELLED')",
    "dms_prcreq_mapref_req_ix": "(mapref, requested_at, request_id)",
}


def lifecycle(engine, n: int, tag: str) -> tuple[float, float]:
    """Mean ms and WAL bytes per request for n requests, each through the worker's four
    single-row transactions: insert, claim, start, finish (what every request costs the
    database). WAL volume does not depend on the machine's load; the time does."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        lsn = conn.execute(sa.text("SELECT pg_current_wal_lsn()")).scalar()
        start = time.perf_counter()
        for i in range(n):
            rid = f"{tag}-{i}"
            conn.execute(sa.text("INSERT INTO dms_prcreq (request_id, mapref, request_type) "
                                 "VALUES (:r, 'M1', 'IMMEDIATE')"), {"r": rid})
            conn.execute(sa.text("UPDATE dms_prcreq SET status = 'CLAIMED', claimed_by = 'w', attempts = attempts + 1, "
                                 "claimed_at = timezone('UTC', now()) WHERE request_id = :r"), {"r": rid})
            conn.execute(sa.text("UPDATE dms_prcreq SET status = 'PROCESSING' WHERE request_id = :r"), {"r": rid})
            conn.execute(sa.text("UPDATE dms_prcreq SET status = 'DONE', completed_at = timezone('UTC', now()) "
                                 "WHERE request_id = :r"), {"r": rid})
        ms = (time.perf_counter() - start) * 1000 / n
        wal = conn.execute(sa.text("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), :l)"), {"l": lsn}).scalar()
    return ms, float(wal) / n


def write_cost(engine, n: int, rounds: int) -> None:
    """The price of V004's request-list indexes on DMS_PRCREQ: alternate rounds with and without them."""
    with_ix, without_ix = [], []
    for k in range(rounds):
        with_ix.append(lifecycle(engine, n, f"a{k}"))
        with engine.begin() as conn:
            for name in V004_LIST_INDEXES:
                conn.execute(sa.text(f"DROP INDEX {name}"))
        without_ix.append(lifecycle(engine, n, f"b{k}"))
        with engine.begin() as conn:
            for name, columns in V004_LIST_INDEXES.items():
                conn.execute(sa.text(f"CREATE INDEX {name} ON dms_prcreq {columns}"))
    for label, runs in (("with V004's list indexes", with_ix), ("without them", without_ix)):
        print(f"\nPer request (insert, claim, start, finish; {n} requests x {rounds} rounds, alternating), {label}: "
              f"WAL {statistics.median(w for _, w in runs):,.0f} bytes, time {statistics.median(m for m, _ in runs):.2f} ms "
              f"(runs: {', '.join(f'{m:.2f}' for m, _ in runs)} ms)")


def claim_plan(engine, rows: int) -> None:
    """The replicas' claim (PostgresDriver's statement, under its connection's planner settings)
    with ``rows`` NEW requests queued at three priorities and one paused job: it must walk the
    claim index (priority DESC, not_before, requested_at) and stop after the batch."""
    from worker.drivers.postgresql import _CLAIM_SQL
    with engine.begin() as conn:
        conn.execute(sa.text("""
            INSERT INTO dms_prcreq (request_id, mapref, request_type, priority, requested_at, not_before)
            SELECT 'new-' || lpad(g::text, 8, '0'), 'Q' || (g % 20), 'IMMEDIATE', (g % 3) * 5,
                   timestamp '2026-01-01' + g * interval '1 millisecond', timestamp '2026-01-01'
            FROM generate_series(1, :n) g"""), {"n": rows})
        conn.execute(sa.text("INSERT INTO dms_job (mapref, handler, paused) VALUES ('Q10', 'x:y', 'Y')"))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM ANALYZE dms_prcreq"))
    with engine.connect() as conn:
        with conn.begin() as tx:
            for setting in ("enable_sort = off", "enable_bitmapscan = off", "jit = off"):
                conn.execute(sa.text(f"SET LOCAL {setting}"))
            # The binds PostgresDriver.request_claim gives for four free slots.
            params = {"worker_id": "w-plan", "job_limit": 4, "scan_limit": 3 * 4 + 5, "control_types": ["STOP"],
                      "control_limit": 10}
            plan = "\n".join(r[0] for r in conn.execute(
                sa.text("EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) " + _CLAIM_SQL), params))
            tx.rollback()
    print(f"\n### The claim, {rows:,} NEW requests at priorities 0, 5 and 10, one job paused\n\n```\n{plan}\n```")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--claim", action="store_true", help="also show the claim's plan with --rows NEW requests")
    ap.add_argument("--write-cost", type=int, default=0, metavar="N",
                    help="also time N request lifecycles per round with and without V004's list indexes")
    args = ap.parse_args()
    name = f"dms_plan_{secrets.token_hex(3)}"
    admin = sa.create_engine(ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.engine.make_url(ADMIN).set(database=name).render_as_string(hide_password=False)
    try:
        driver = make_driver(url)
        migrate(driver)
        started = time.perf_counter()
        fill(driver.engine, args.rows)
        print(f"{args.rows:,} requests and executions loaded in {time.perf_counter() - started:.0f} s")
        cursor = data.encode_cursor(datetime(2026, 1, 1) + (datetime(2026, 1, 7) - datetime(2026, 1, 1)),
                                    "req-00518400")
        c = sa.text
        with driver.engine.connect() as conn:
            show(conn, "Request list, first page (newest 50)", data.request_query(data.RequestFilter()))
            show(conn, "Request list, a page deep in the history (keyset cursor)",
                 data.request_query(data.RequestFilter(), cursor=cursor))
            show(conn, "Request list, status = FAILED", data.request_query(data.RequestFilter(status="FAILED")))
            show(conn, "Request list, mapref = M7", data.request_query(data.RequestFilter(mapref="M7")))
            show(conn, "Request list, mapref = M7 and status = DONE, deep page",
                 data.request_query(data.RequestFilter(mapref="M7", status="DONE"), cursor=cursor))
            show(conn, "Request list, one day (since/until)", data.request_query(data.RequestFilter(
                since=datetime(2026, 1, 3), until=datetime(2026, 1, 4))))
            show(conn, "Queue counts (the overview; dms_v_queue_depth)", "SELECT * FROM dms_v_queue_depth")
            show(conn, "Failures of the last day (dms_v_failures_1d)", "SELECT * FROM dms_v_failures_1d")
            show(conn, "One job's last 100 executions (jobs page)", c(
                "SELECT prcid, status, strtdt, enddt FROM dms_prclog WHERE mapref = 'M7' "
                "ORDER BY strtdt DESC, prcid DESC LIMIT 100"))
        if args.claim:
            claim_plan(driver.engine, args.rows)
        if args.write_cost:
            write_cost(driver.engine, args.write_cost, rounds=4)
        driver.dispose()
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    main()
