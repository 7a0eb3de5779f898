"""Screenshots of the console's main pages for docs/console.md (not a test).

    .venv/bin/python -m tests.console.screenshots --out docs/img

Creates a scratch PostgreSQL database, registers a few jobs and schedules, starts two real
replicas, runs a day's worth of requests (some fail, one keeps running, one job is paused),
starts the console with an operator login and takes each page with Debian's Chromium.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path

import sqlalchemy as sa

from tests.console.test_browser import CHROMIUM, CHROMIUM_ARGS
from tests.support import REPO, Replica, wait_until
from worker import client
from worker import schema as s
from worker.console import hash_password
from worker.drivers import make_driver
from worker.migrate import migrate

ADMIN = os.environ.get("DMS_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
HANDLER = "tests.console.handlers:import_rows"


def populate(engine) -> dict[str, str]:
    client.register_job(engine, "EMPLOYEE_IMPORT", HANDLER, timeout_s=600, max_attempts=2, retry_delay_s=1,
                        description="HR extract into EMPLOYEES")
    client.register_job(engine, "ATTENDANCE_EXPORT", HANDLER, timeout_s=1800)
    client.register_job(engine, "PAYROLL_CHECK", HANDLER, description="nightly payroll consistency check")
    client.register_job(engine, "LEDGER_SYNC", "worker.jobs.builtin:sleep", allow_overlap=True)
    client.register_job(engine, "ARCHIVE", HANDLER)
    with engine.begin() as conn:
        for row in (dict(mapref="EMPLOYEE_IMPORT", frqcd="DL", frqhh=2, frqmi=30),
                    dict(mapref="ATTENDANCE_EXPORT", frqcd="WK", frqdd="MON", frqhh=6, frqmi=0),
                    dict(mapref="PAYROLL_CHECK", frqcd="MN", frqdd="31", frqhh=23, frqmi=0),
                    dict(mapref="LEDGER_SYNC", frqcd="ID", frqmi=15, strtdt=datetime(2026, 1, 1)),
                    dict(mapref="ARCHIVE", frqcd="WK", frqdd="FRIDAY", frqhh=1, frqmi=0, schflg="Y")):
            conn.execute(sa.insert(s.jobsch).values(**{"schflg": "Y", "curflg": "Y", "misfire": "LATEST", **row}))
    rng = random.Random(7)
    ids = {}
    for i in range(40):
        mapref = rng.choice(["EMPLOYEE_IMPORT", "ATTENDANCE_EXPORT", "PAYROLL_CHECK"])
        fail = rng.random() < 0.15
        ids.setdefault("failed" if fail else "ok", client.enqueue(
            engine, mapref, payload={"seconds": round(rng.uniform(0.05, 0.6), 2),
                                     "rejected": rng.choice([0, 0, 0, 2])},
            param1=f"2026-11-{1 + i % 28:02d}", param2="fail" if fail else None, priority=rng.choice([0, 0, 5])))
    ids["detail"] = client.enqueue(engine, "EMPLOYEE_IMPORT", payload={"seconds": 0.3, "rejected": 3},
                                   param1="2026-11-30", truncate_flag="Y")
    client.enqueue_history(engine, "ATTENDANCE_EXPORT", "2026-11-01", "2026-11-05")
    ids["running"] = client.enqueue(engine, "LEDGER_SYNC", payload={"seconds": 900})
    return ids


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/img")
    args = ap.parse_args()
    out = Path(args.out).resolve()
    from playwright.sync_api import sync_playwright
    name = f"dms_shots_{secrets.token_hex(3)}"
    admin = sa.create_engine(ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = sa.engine.make_url(ADMIN).set(database=name).render_as_string(hide_password=False)
    tmp = Path(tempfile.mkdtemp(prefix="dms-shots-"))
    replicas, console = [], None
    try:
        driver = make_driver(url)
        migrate(driver)
        engine = driver.engine
        replicas = [Replica(url, f"app{i}", tmp, SCHEDULER_TIMEZONE="Europe/Berlin").start() for i in (1, 2)]
        for r in replicas:
            r.wait_registered(engine)
        ids = populate(engine)

        def settled() -> bool:
            with engine.connect() as conn:
                waiting = conn.execute(sa.select(sa.func.count()).where(
                    s.prcreq.c.status.in_(("NEW", "CLAIMED")), s.prcreq.c.request_type != "REFRESH_SCHEDULE")).scalar()
            return waiting == 0 and client.request_status(engine, ids["running"])["status"] == "PROCESSING"
        wait_until(settled, 180, "the requests to run", interval=0.5)
        client.pause_job(engine, "ARCHIVE")
        for _ in range(3):
            client.enqueue(engine, "ARCHIVE", param1="2026-10")

        users = tmp / "users"
        users.write_text(f"olga operator {hash_password('screenshots-only')}\n")
        env = dict(os.environ, DMS_DATABASE_URL=url, DMS_CONSOLE_USERS_FILE=str(users), PYTHONPATH=str(REPO),
                   SCHEDULER_TIMEZONE="Europe/Berlin")
        console = subprocess.Popen([sys.executable, "-m", "worker", "console", "--port", "0"], cwd=tmp, env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        base = re.search(r"(http://127\.0\.0\.1:\d+)/", console.stdout.readline()).group(1)
        failed = client.request_status(engine, ids["failed"])
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1360, "height": 860})
            page.goto(base + "/login")
            page.fill("input[name=username]", "olga")
            page.fill("input[name=password]", "screenshots-only")
            page.click("form.login button")
            page.wait_for_load_state()
            for path, file in (("/", "console-cluster.png"), ("/requests", "console-requests.png"),
                               (f"/requests/{ids['detail']}", "console-request.png"),
                               (f"/requests/{failed['request_id']}", "console-request-failed.png"),
                               ("/schedules", "console-schedules.png"), ("/jobs", "console-jobs.png"),
                               ("/jobs/EMPLOYEE_IMPORT", "console-job.png")):
                page.goto(base + path)
                # Long pages: the first screenful says enough and keeps the repository small.
                page.screenshot(path=str(out / file), full_page=file not in ("console-requests.png", "console-job.png"))
                print(out / file)
            browser.close()
        driver.dispose()
    finally:
        if console is not None:
            console.send_signal(signal.SIGTERM)
            console.wait(30)
        for r in replicas:
            r.stop()
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


if __name__ == "__main__":
    main()
