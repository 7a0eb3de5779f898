"""`SchedulerService(config=...).start()` (README "Embedding", the seeds' way): a replica in a
background thread of the host process runs requests and drains on `stop()`."""
from __future__ import annotations

import time

from tests.support import wait_until
from worker import Config, SchedulerService, client
from worker import schema as s


def test_an_embedded_replica_runs_requests_and_stops_when_asked(sqlite_url):
    config = Config.from_env(environ={"DMS_DATABASE_URL": sqlite_url, "DMS_METRICS_PORT": "0",
                                      "SCHEDULER_POLL_INTERVAL": "0.2"}, dotenv_path=None, max_workers=2)
    service = SchedulerService(config=config).start()
    try:
        engine = service.driver.engine
        client.register_job(engine, "EMBEDDED", "worker.jobs.builtin:noop", allow_overlap=True)
        rids = [client.enqueue(engine, "EMBEDDED") for _ in range(5)]
        wait_until(lambda: all(client.request_status(engine, r)["status"] == s.DONE for r in rids), 60,
                   "the embedded replica to run every request")
    finally:
        t0 = time.monotonic()
        service.stop(timeout=30)
    assert service._thread is not None and not service._thread.is_alive(), "stop() waits for the replica"
    assert time.monotonic() - t0 < 30
