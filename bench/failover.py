"""Leader failover and scheduling lateness, on a fresh local PostgreSQL database.

Three replicas with default settings and a schedule firing every second (misfire ALL).
Lateness: due time (scheduled_for) to the row's insert (requested_at, database clock), for
occurrences enqueued on time. Failover: kill -9 of the leader to (a) the next leader elected
and (b) the next occurrence enqueued by it; each trial kills the current leader and starts a
replacement replica. Run for the session-lock leader and for the lease row (default TTL).

    .venv/bin/python bench/failover.py [--trials 5] [--modes lock,lease]
"""
from __future__ import annotations

import argparse
import random
import time

import sqlalchemy as sa
from common import REPO, fresh_database, print_table, summary_ms, write_json  # noqa: E402  (sets sys.path)

from tests.support import Replica, wait_until
from worker import client
from worker import schema as s
from worker.drivers import make_driver


def leader(engine):
    with engine.connect() as conn:
        row = conn.execute(sa.select(s.leader.c.holder, s.leader.c.epoch)).first()
    return row if row and row.holder else None


def run_mode(mode: str, trials: int) -> dict:
    url = fresh_database(f"dms_bench_failover_{mode}")
    engine, driver = sa.create_engine(url), make_driver(url)
    client.register_job(engine, "TICK", "worker.jobs.builtin:noop", allow_overlap=True)
    with engine.begin() as conn:
        jid = conn.execute(sa.insert(s.jobsch).values(mapref="TICK", frqcd="CRON", cronexp="* * * * * *", misfire="ALL",
                                                      schflg="Y", curflg="Y").returning(s.jobsch.c.jobschid)).scalar_one()
    logs = REPO / "bench" / "results"
    env = dict(DMS_LEADER_MODE=mode, DMS_LOG_LEVEL="WARNING")
    replicas = {f"f{i}": Replica(url, f"f{i}", logs, **env).start() for i in range(3)}
    elected, enqueued = [], []
    try:
        for r in replicas.values():
            r.wait_registered(engine)
        wait_until(lambda: leader(engine), 60, "a leader")
        time.sleep(20)          # on-time operation, for lateness (the first minute's catch-up excluded)
        window_start = driver.now()
        time.sleep(20)
        with engine.connect() as conn:
            rows = conn.execute(sa.select(s.prcreq.c.scheduled_for, s.prcreq.c.requested_at).where(
                s.prcreq.c.jobschid == jid, s.prcreq.c.scheduled_for >= window_start)).all()
        lateness = [(r.requested_at - r.scheduled_for).total_seconds() for r in rows]
        for i in range(trials):
            time.sleep(random.uniform(2, 4))
            holder, epoch = leader(engine)
            victim = replicas.pop(holder.split(":")[0])
            killed_at = driver.now()
            t0 = time.monotonic()
            victim.kill9()
            wait_until(lambda: (l := leader(engine)) is not None and l.epoch > epoch, 120, "a new leader", interval=0.01)
            elected.append(time.monotonic() - t0)

            def first_after():
                with engine.connect() as conn:
                    return conn.execute(sa.select(sa.func.min(s.prcreq.c.requested_at)).where(
                        s.prcreq.c.jobschid == jid, s.prcreq.c.requested_at > killed_at)).scalar()

            enqueued.append((wait_until(first_after, 60, "an occurrence", interval=0.01) - killed_at).total_seconds())
            name = f"f{3 + i}"
            replicas[name] = Replica(url, name, logs, **env).start()
            replicas[name].wait_registered(engine)
    finally:
        for r in replicas.values():
            r.stop()
        driver.dispose()
    return {"mode": mode, "lateness": summary_ms(lateness), "elected": summary_ms(elected),
            "next_enqueued": summary_ms(enqueued)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--modes", default="lock,lease")
    args = ap.parse_args()
    results = [run_mode(m, args.trials) for m in args.modes.split(",")]
    print_table("Scheduling lateness, due -> enqueued (every-second schedule, 3 replicas, PostgreSQL)",
                [{"leader": r["mode"], **r["lateness"]} for r in results])
    print_table("Failover after kill -9 of the leader",
                [{"leader": r["mode"], "what": what, **r[key]} for r in results
                 for what, key in (("new leader elected", "elected"), ("next occurrence enqueued", "next_enqueued"))])
    print(f"\nresults: {write_json('failover', results)}")


if __name__ == "__main__":
    main()
