"""Plumbing shared by the peer benchmarks (run with bench/.venv-peers/bin/python).

bench/common.py cannot be imported here: it imports SQLAlchemy and dms-worker itself, neither of
which is in the peers' environment. The figures and results files come from bench/report.py
(standard library only), the same module ours use, so the peers' p50/p99 are computed as ours.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))
from report import RESULTS, percentile, print_table, summary_ms, table_writes, tree_cpu_seconds, write_json  # noqa: E402,F401  (re-exported)

# Same variable as bench/common.py (an SQLAlchemy URL); the driver suffix is dropped for libpq.
ADMIN_URL = os.environ.get("DMS_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def libpq_url(database: str | None = None) -> str:
    _scheme, rest = ADMIN_URL.split("://", 1)
    url = "postgresql://" + rest
    if database is not None:
        base, _, _db = url.rpartition("/")
        url = f"{base}/{database}"
    return url


def fresh_database(name: str) -> str:
    """Drop (if present) and create database ``name``; return its libpq URL. Only dms_bench_* names."""
    assert name.startswith("dms_bench_"), name
    with psycopg.connect(libpq_url(), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return libpq_url(name)


def scalar(url: str, sql: str, *params: Any) -> Any:
    with psycopg.connect(url, autocommit=True) as conn:
        return conn.execute(sql, params or None).fetchone()[0]


def wait_until(predicate: Callable[[], Any], timeout: float, message: str = "condition",
               interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def spawn(script: str, *args: str, stdout: Any = None) -> subprocess.Popen:
    """Start ``script`` as a separate OS process with this interpreter (the peers' venv)."""
    return subprocess.Popen([sys.executable, script, *args], stdout=stdout, text=True, bufsize=1)


def check_alive(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is not None:
            raise RuntimeError(f"consumer {p.args} exited with {p.returncode}")


def stop(procs: list[subprocess.Popen], timeout: float = 20) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
