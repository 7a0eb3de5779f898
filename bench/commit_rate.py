"""The physical limit: the database's own commit rate on this machine, measured with pgbench.

A fresh database dms_bench_pgbench, ``pgbench -i`` (scale 1), then ``pgbench -N`` ("simple
update": per transaction one UPDATE of pgbench_accounts, one SELECT, one INSERT into
pgbench_history, one commit) with 4 clients and 2 threads for 20 s. Prints and saves the TPS
excluding connection time; our burn-down jobs/s is compared against it in bench/plots.py.

    .venv/bin/python bench/commit_rate.py [--clients 4] [--threads 2] [--seconds 20] [--scale 1]
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess

import sqlalchemy as sa
from common import ADMIN_URL, print_table, write_json

DB = "dms_bench_pgbench"


def pgbench_binary() -> str:
    found = shutil.which("pgbench")
    if found:
        return found
    for version in ("17", "16", "15", "14", "13"):
        path = f"/usr/lib/postgresql/{version}/bin/pgbench"
        if os.path.exists(path):
            return path
    raise SystemExit("pgbench not found (apt-get install postgresql-client)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=int, default=20)
    ap.add_argument("--scale", type=int, default=1)
    args = ap.parse_args()

    admin = sa.create_engine(ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{DB}" WITH (FORCE)'))
        conn.execute(sa.text(f'CREATE DATABASE "{DB}"'))
        server = conn.execute(sa.text("SHOW server_version")).scalar()
        settings = {name: conn.execute(sa.text(f"SHOW {name}")).scalar()
                    for name in ("synchronous_commit", "fsync", "wal_sync_method", "shared_buffers")}
    admin.dispose()

    u = sa.engine.make_url(ADMIN_URL)
    conn_args = ["-h", u.host or "127.0.0.1", "-p", str(u.port or 5432), "-U", u.username or "postgres"]
    env = dict(os.environ, **({"PGPASSWORD": u.password} if u.password else {}))
    binary = pgbench_binary()
    subprocess.run([binary, "-i", "-q", "-s", str(args.scale), *conn_args, DB], env=env, check=True,
                   capture_output=True, text=True)
    cmd = [binary, "-N", "-c", str(args.clients), "-j", str(args.threads), "-T", str(args.seconds), *conn_args, DB]
    run = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    out = run.stdout
    tps = re.search(r"tps = ([\d.]+) \((?:without initial connection time|excluding connections establishing)\)", out)
    latency = re.search(r"latency average = ([\d.]+) ms", out)
    txns = re.search(r"number of transactions actually processed: (\d+)", out)
    if not tps:
        raise SystemExit(f"could not parse pgbench output:\n{out}\n{run.stderr}")
    row = {"benchmark": "pgbench -N (simple update)", "clients": args.clients, "threads": args.threads,
           "seconds": args.seconds, "scale": args.scale, "tps": round(float(tps.group(1)), 1),
           "latency_avg_ms": float(latency.group(1)) if latency else None,
           "transactions": int(txns.group(1)) if txns else None}
    print_table(f"Commit rate of the local PostgreSQL {server} (synchronous_commit={settings['synchronous_commit']}, "
                f"fsync={settings['fsync']})", [row])
    path = write_json("commit_rate", {**row, "command": " ".join(cmd), "server_version": server,
                                      "settings": settings, "pgbench_output": out})
    print(f"\nresults: {path}")


if __name__ == "__main__":
    main()
