"""A running replica's /metrics, /healthz and /readyz, scraped while requests run."""
from __future__ import annotations

import re
import socket
import urllib.error
import urllib.request

import pytest
import sqlalchemy as sa

from tests.support import wait_until
from worker import client

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(port: int, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def sample(text: str, name: str, **labels) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
            if all(found.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return None


def test_metrics_move_as_requests_run(db_url, replicas):
    engine = sa.create_engine(db_url)
    client.register_job(engine, "OBS", "worker.jobs.builtin:noop")
    client.register_job(engine, "OBSFAIL", "worker.jobs.builtin:fail")
    port = free_port()
    (r,) = replicas(1, DMS_METRICS_PORT=port, SCHEDULER_POLL_INTERVAL="0.5", DMS_HEARTBEAT_INTERVAL="0.5",
                    DMS_RESCUE_AFTER="3")
    r.wait_registered(engine)
    assert scrape(port, "/healthz")[0] == 200
    wait_until(lambda: scrape(port, "/readyz")[0] == 200, 10, "/readyz to turn ready")
    assert scrape(port, "/nope")[0] == 404
    before = scrape(port)[1]
    assert sample(before, "dms_executions_finished_total", mapref="OBS", outcome="completed") in (None, 0.0)
    with engine.begin() as conn:
        ids = [client.enqueue(conn, "OBS") for _ in range(5)] + [client.enqueue(conn, "OBSFAIL")]
    wait_until(lambda: all(client.request_status(engine, i)["status"] in ("DONE", "FAILED") for i in ids), 30, "the requests")
    text = wait_until(lambda: (t := scrape(port)[1]) and sample(
        t, "dms_executions_finished_total", mapref="OBSFAIL", outcome="failed") == 1.0 and t, 10, "the counters")
    assert sample(text, "dms_executions_finished_total", mapref="OBS", outcome="completed") == 5.0
    assert sample(text, "dms_executions_started_total", mapref="OBS") == 5.0
    assert sample(text, "dms_pickup_latency_seconds_count") >= 6
    assert sample(text, "dms_execution_duration_seconds_count", mapref="OBS") == 5.0
    assert sample(text, "dms_requests_claimed_total") >= 6
    assert sample(text, "dms_leader") == 1.0, "a lone replica leads"
    assert 0 <= sample(text, "dms_heartbeat_age_seconds") < 3
    # Queue gauges: the leader's snapshot from one query every 15 s (so possibly older than the runs).
    assert sample(text, "dms_queue_snapshot_age_seconds") < 20
    assert "dms_queue_requests" in text
    engine.dispose()
