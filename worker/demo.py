"""``dms-worker demo``: from nothing to a working system in one command.

Migrates the configured database (the SQLite file by default), registers a few demo jobs,
starts several replicas as separate processes, enqueues a mix of requests (including bad
ones), waits until every request has an outcome, stops the replicas with SIGTERM and prints
what DMS_PRCREQ, DMS_PRCLOG, DMS_JOBLOG and DMS_JOBERR recorded.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from datetime import date, timedelta
from pathlib import Path

import sqlalchemy as sa

from . import client
from . import schema as s
from .config import Config
from .drivers import make_driver
from .migrate import migrate

EMPLOYEES_CSV = """emp_no,full_name,hired_on
1001,Ada Lovelace,2024-01-15
1002,Alan Turing,2024-02-01
1003,,2024-03-01
1004,Grace Hopper,2024-04-01,extra
1002,Alan Turing again,2024-05-01
1005,Edsger Dijkstra,2024-06-01
"""


# The demo's own table, created with SQLAlchemy: CREATE TABLE IF NOT EXISTS is not Oracle
# before 23ai, and checkfirst works on every database.
DEMO_EMPLOYEE = sa.Table(
    "demo_employee", sa.MetaData(),
    sa.Column("emp_no", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("full_name", sa.String(100), nullable=False),
    sa.Column("hired_on", sa.Date),
)


def _csv_jobs(eng: sa.engine.Engine, folder: Path) -> None:
    """An import with bad rows and an export of what was loaded: the built-in CSV handlers."""
    folder.mkdir(exist_ok=True)
    (folder / "employees.csv").write_text(EMPLOYEES_CSV)
    with eng.begin() as conn:
        DEMO_EMPLOYEE.create(conn, checkfirst=True)
        conn.execute(sa.delete(DEMO_EMPLOYEE))
    client.register_job(eng, "DEMO_IMPORT", "worker.jobs.csv:load", description="employees.csv -> demo_employee",
                        params={"path": str(folder / "employees.csv"), "table": "demo_employee",
                                "key": ["emp_no"], "max_rejects": 5})
    client.register_job(eng, "DEMO_EXPORT", "worker.jobs.csv:export", description="demo_employee -> CSV",
                        params={"query": "SELECT emp_no, full_name, hired_on FROM demo_employee ORDER BY emp_no",
                                "path": str(folder / "employees_export_{as_of}.csv")})


def run_demo(cfg: Config, replicas: int = 2, requests: int = 30) -> int:
    driver = make_driver(cfg.database_url, schema=cfg.schema)
    migrate(driver)
    eng = driver.engine
    csv_folder = Path("dms-demo-files").resolve()
    _csv_jobs(eng, csv_folder)
    client.register_job(eng, "DEMO_NOOP", "worker.jobs.builtin:noop", allow_overlap=True,
                        description="does nothing, successfully")
    client.register_job(eng, "DEMO_SLEEP", "worker.jobs.builtin:sleep", allow_overlap=True, timeout_s=30,
                        description="sleeps payload.seconds")
    client.register_job(eng, "DEMO_FAIL", "worker.jobs.builtin:fail", max_attempts=2, retry_delay_s=1,
                        description="always fails; retried once after 1 s")
    print(f"database: {cfg.safe_url}; starting {replicas} replicas")
    # DMS_FILE_ROOTS: file jobs may use only the demo's folder (they are refused until it is set).
    env = dict(os.environ, DMS_DATABASE_URL=cfg.database_url, DMS_METRICS_PORT="0",
               SCHEDULER_MAX_WORKERS="2", DMS_LOG_LEVEL="WARNING", DMS_FILE_ROOTS=str(csv_folder))
    procs = [subprocess.Popen([sys.executable, "-m", "worker", "run", "--name", f"demo{i}"], env=env)
             for i in range(replicas)]
    ids: list[str] = []
    try:
        with eng.begin() as conn:
            for i in range(requests):
                if i % 3 == 0:
                    ids.append(client.enqueue(conn, "DEMO_SLEEP", seconds=0.3))
                else:
                    ids.append(client.enqueue(conn, "DEMO_NOOP", param1=f"item-{i}"))
            start = date.today() - timedelta(days=3)
            ids.append(client.enqueue_history(conn, "DEMO_NOOP", start, start + timedelta(days=2)))
            ids.append(client.enqueue(conn, "DEMO_FAIL"))
            ids.append(client.enqueue(conn, "NO_SUCH_JOB"))
            ids.append(client.enqueue(conn, "DEMO_NOOP", request_type="HISTORY",
                                      payload={"start_date": "2026-02-30", "end_date": "2026-03-01"}))
            ids.append(client.enqueue(conn, "DEMO_IMPORT"))
        print(f"enqueued {len(ids)} requests (including an unknown mapref, bad dates and a failing job)")
        deadline = time.monotonic() + 120
        pending = _wait_for(eng, ids, procs, deadline)
        if not pending:       # the export runs on what the import loaded
            ids.append(client.enqueue(eng, "DEMO_EXPORT"))
            pending = _wait_for(eng, ids, procs, deadline)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(60)
    _summary(eng, ids)
    _csv_summary(eng, ids, csv_folder)
    return 0 if not pending else 1


def _wait_for(eng: sa.engine.Engine, ids: list[str], procs: list[subprocess.Popen], deadline: float) -> list[str]:
    """Wait until every request has an outcome; returns those still pending at the deadline."""
    pending = ids
    while time.monotonic() < deadline:
        with eng.connect() as conn:
            statuses = dict(conn.execute(sa.select(s.prcreq.c.request_id, s.prcreq.c.status)
                                         .where(s.prcreq.c.request_id.in_(ids))).all())
        pending = [r for r in ids if statuses.get(r) not in s.TERMINAL_STATUSES]
        if not pending:
            break
        if any(p.poll() is not None for p in procs):
            print("a replica exited unexpectedly", file=sys.stderr)
            break
        time.sleep(0.3)
    return pending


def _csv_summary(eng: sa.engine.Engine, ids: list[str], folder: Path) -> None:
    r, p, j, e = s.prcreq.c, s.prclog.c, s.joblog.c, s.joberr.c
    with eng.connect() as conn:
        runs = conn.execute(sa.select(r.mapref, r.status, r.result_payload, j.srcrows, j.trgrows, j.errrows, p.prcid)
                            .join(s.prclog, p.request_id == r.request_id).join(s.joblog, j.prcid == p.prcid)
                            .where(r.request_id.in_(ids), r.mapref.in_(["DEMO_IMPORT", "DEMO_EXPORT"]))).all()
        rejects = conn.execute(sa.select(e.keyvalue, e.errmsg, e.dberrmsg).where(
            e.prcid.in_([x.prcid for x in runs]), e.errtyp == "RECORD").order_by(e.errid)).all()
    print("\nCSV jobs (worker.jobs.csv, parameters in DMS_JOB.params):")
    for run in runs:
        print(f"  {run.mapref:<11} {run.status:<5} DMS_JOBLOG src={run.srcrows} trg={run.trgrows} err={run.errrows}"
              f"  result={json.loads(run.result_payload or '{}').get('result', '')}")
    for rej in rejects:
        print(f"  rejected key={rej.keyvalue}: {rej.errmsg}")
    print(f"  files in {folder}: {', '.join(sorted(f.name for f in folder.glob('*.csv')))}")
    print("\nTry: dms-worker status    |    dms-worker --help    |    docs/jobs.md")


def _summary(eng: sa.engine.Engine, ids: list[str]) -> None:
    r, p, j, e = s.prcreq.c, s.prclog.c, s.joblog.c, s.joberr.c
    with eng.connect() as conn:
        reqs = conn.execute(sa.select(r.request_id, r.mapref, r.request_type, r.status, r.result_payload)
                            .where(r.request_id.in_(ids))).all()
        logs = conn.execute(sa.select(p.prcid, p.mapref, p.status, p.worker_id, p.param1, p.msg)
                            .where(p.request_id.in_(ids)).order_by(p.prcid)).all()
        prcids = [row.prcid for row in logs]
        joblogs = conn.execute(sa.select(sa.func.count()).where(j.prcid.in_(prcids))).scalar_one()
        errs = conn.execute(sa.select(e.errtyp, e.mapref, e.errmsg).where(e.prcid.in_(prcids))).all()
    print("\nDMS_PRCREQ outcomes:", dict(Counter(row.status for row in reqs)))
    for row in reqs:
        if row.status != s.DONE:
            print(f"  {row.status:<9} {row.request_type:<9} {row.mapref:<11} {row.result_payload}")
    print(f"\nDMS_PRCLOG: {len(logs)} executions by status {dict(Counter(row.status for row in logs))}")
    print("  executions per replica process:", dict(Counter(row.worker_id for row in logs)))
    for execution in [x for x in logs if x.param1 and x.param1[:2] == "20"][:3]:
        print(f"  HISTORY day: prcid={execution.prcid} {execution.mapref} {execution.status} param1={execution.param1}")
    print(f"\nDMS_JOBLOG: {joblogs} rows (one per execution)")
    print(f"DMS_JOBERR: {len(errs)} rows")
    for err in errs[:4]:
        print(f"  {err.errtyp} {err.mapref}: {err.errmsg}")
