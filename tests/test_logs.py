"""Replica logging: JSON lines and size-based rotation, through multiprocessing-logging."""
from __future__ import annotations

import json
import logging

from worker import logs
from tests.support import wait_until


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
