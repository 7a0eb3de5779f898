"""Replica logging: JSON lines and size-based rotation, through multiprocessing-logging."""
from __future__ import annotations

import json
import logging
import re

from tests.support import wait_until
from worker import logs


def test_json_lines_and_rotation(tmp_path):
    path = tmp_path / "replica.log"
    logs.setup("INFO", str(path), json_lines=True, max_bytes=2000, backups=2)
    try:
        log = logging.getLogger("worker.test")
        for i in range(60):
            log.info("end request=%s outcome=PC", f"req-{i}")
        # Records reach the file through the handler's queue thread.
        wait_until(lambda: (tmp_path / "replica.log.1").exists(), 10, "a rotation")
        wait_until(lambda: "req-59" in path.read_text(), 10, "the last record")
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        assert lines[-1]["msg"] == "end request=req-59 outcome=PC"
        assert {"ts", "level", "logger", "process"} <= set(lines[-1])
        assert not (tmp_path / "replica.log.3").exists(), "at most 2 backups kept"
    finally:
        logs.setup("WARNING")     # back to stderr for the rest of the session


def test_a_stopped_execution_that_logs_on_its_way_out_does_not_silence_the_replica(sqlite_url, tmp_path):
    """Children log through one shared queue; one that ended itself while its record was still
    being written would leave the queue's lock taken: the replica's own logging, and its exit,
    would then block for good."""
    import signal
    import time

    import sqlalchemy as sa

    from tests.support import Replica
    from worker import client

    engine = sa.create_engine(sqlite_url)
    client.register_job(engine, "LOUD", "tests.handlers:loud_when_stopped")
    client.register_job(engine, "QUIET", "worker.jobs.builtin:noop")
    r = Replica(sqlite_url, "loud", tmp_path, SCHEDULER_POLL_INTERVAL="0.2").start()
    try:
        r.wait_registered(engine)
        flag = tmp_path / "running"
        loud = client.enqueue(engine, "LOUD", running_flag=str(flag))
        wait_until(flag.exists, 30, "the job to run")
        client.request_stop(engine, request_id=loud)
        wait_until(lambda: client.request_status(engine, loud)["status"] == "CANCELLED", 30, "the stop")
        quiet = client.enqueue(engine, "QUIET")
        wait_until(lambda: client.request_status(engine, quiet)["status"] == "DONE", 30, "the next job")
        wait_until(lambda: f"end request={quiet}" in r.log(), 10, "the replica's log line for the next job")
        started = time.monotonic()
        r.proc.send_signal(signal.SIGTERM)
        assert r.proc.wait(20) == 0
        assert time.monotonic() - started < 10, "SIGTERM exits promptly"
        assert "stopped after all this" in r.log()
        assert re.search(r"replica loud:\w+ stopped$", r.log().rstrip()), "the exit's own last record is written"
    finally:
        r.stop()
        engine.dispose()
