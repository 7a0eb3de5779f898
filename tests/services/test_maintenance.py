"""Maintenance in-process: rescue waits for a fresh heartbeat history; pruning is optional
for the logs; the gauges come from one query."""
from __future__ import annotations

import sqlalchemy as sa

from worker import client
from worker import schema as s
from worker.drivers.base import ClaimParams, ExecutionFinish, WorkerInfo
from worker.metrics import Metrics
from worker.services.maintenance import Maintenance


def make(driver, fresh=100.0, log_days=None):
    return Maintenance(driver, Metrics("w"), rescue_after_s=8, interval_s=1, prune_interval_s=60,
                       retention_days=30, log_retention_days=log_days, fresh_for=lambda now: fresh)


def dead_claim(driver):
    driver.worker_register(WorkerInfo("dead:1:aa", "h", 1, "t", 1))
    client.register_job(driver.engine, "M", "worker.jobs.builtin:noop", max_attempts=2)
    rid = client.enqueue(driver.engine, "M")
    driver.request_claim(ClaimParams("dead:1:aa", job_limit=1))
    with driver.begin() as conn:
        conn.execute(sa.update(s.worker).values(heartbeat_at=driver.clock(-60), expires_at=driver.clock(-50)))
    return rid


def test_rescue_only_after_a_whole_window_of_own_heartbeats(lite):
    rid = dead_claim(lite)
    m = make(lite, fresh=3.0)
    m.tick(0.0)
    assert client.request_status(lite.engine, rid)["status"] == s.PROCESSING
    m.fresh_for = lambda now: 9.0
    m.tick(1.0)
    assert client.request_status(lite.engine, rid)["status"] == s.NEW


def test_logs_are_kept_unless_a_retention_is_set(lite):
    client.register_job(lite.engine, "M", "worker.jobs.builtin:noop")
    client.enqueue(lite.engine, "M")
    (req,) = lite.request_claim(ClaimParams("w", job_limit=1))
    lite.execution_finish_many([ExecutionFinish(req.request_id, "w", req.prcid, "M", "PC", request_status="DONE")])
    with lite.begin() as conn:
        conn.execute(sa.update(s.prclog).values(enddt=lite.clock(-86400 * 10)))
    make(lite).tick(0.0)
    with lite.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(s.prclog)).scalar() == 1
    make(lite, log_days=5).tick(0.0)
    with lite.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(s.prclog)).scalar() == 0
        assert conn.execute(sa.select(sa.func.count()).select_from(s.joblog)).scalar() == 0


def test_queue_gauges_refresh_every_15_seconds(lite):
    m = make(lite)
    client.enqueue(lite.engine, "M")
    m.tick(0.0)
    assert b'dms_queue_requests{request_type="IMMEDIATE",status="NEW"} 1.0' in m.metrics.exposition()
    client.enqueue(lite.engine, "M")
    m.tick(10.0)
    assert b'status="NEW"} 1.0' in m.metrics.exposition()
    m.tick(15.0)
    assert b'status="NEW"} 2.0' in m.metrics.exposition()


def test_a_paused_jobs_requests_are_counted_as_paused_not_as_waiting_too_long(lite):
    client.register_job(lite.engine, "HELD", "worker.jobs.builtin:noop")
    client.register_job(lite.engine, "RUNS", "worker.jobs.builtin:noop")
    client.pause_job(lite.engine, "HELD")
    for mapref in ("HELD", "HELD", "RUNS"):
        client.enqueue(lite.engine, mapref)
    with lite.begin() as conn:    # the paused job's requests waited an hour, the other a minute
        conn.execute(sa.update(s.prcreq).where(s.prcreq.c.mapref == "HELD").values(not_before=lite.clock(-3600)))
        conn.execute(sa.update(s.prcreq).where(s.prcreq.c.mapref == "RUNS").values(not_before=lite.clock(-60)))
    m = make(lite)
    m.tick(0.0)
    text = m.metrics.exposition().decode()
    assert 'dms_queue_requests{request_type="IMMEDIATE",status="NEW"} 3.0' in text
    assert "dms_queue_paused_requests 2.0" in text
    (age,) = [float(line.split()[1]) for line in text.splitlines()
              if line.startswith("dms_queue_oldest_new_age_seconds ")]
    assert 55 <= age < 600, "the oldest NEW is the runnable one, not the deliberately held ones"
