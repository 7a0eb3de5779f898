"""Test helpers: waiting on conditions with a deadline, real replica processes, a probe table."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa

REPO = Path(__file__).resolve().parents[1]

# Executions of tests.handlers write here, from the handler's own connection, so that "ran
# exactly once" is proved by something other than the worker's own bookkeeping.
probe = sa.Table(
    "dms_test_probe", sa.MetaData(),
    sa.Column("id", sa.Integer, sa.Identity(), primary_key=True),
    sa.Column("request_id", sa.String(64)),
    sa.Column("prcid", sa.BigInteger),
    sa.Column("mapref", sa.String(100)),
    sa.Column("day", sa.String(20)),
    sa.Column("truncate_flag", sa.String(1)),
    sa.Column("attempt", sa.Integer),
    sa.Column("pid", sa.Integer),
    sa.Column("started", sa.Float),
    sa.Column("ended", sa.Float),
)


def wait_until(predicate: Callable[[], Any], timeout: float, message: str = "condition", interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); it is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


class Replica:
    """One ``dms-worker run`` process against a test database."""

    def __init__(self, url: str, name: str, log_dir: Path, *, run_args: tuple[str, ...] = (), **env: Any) -> None:
        self.url, self.name, self.run_args = url, name, run_args
        self.log_path = log_dir / f"{name}.log"
        self.env = dict(os.environ, DMS_DATABASE_URL=url, DMS_METRICS_PORT="0", PYTHONPATH=str(REPO),
                        SCHEDULER_POLL_INTERVAL="1", DMS_LOG_LEVEL="INFO")
        self.env.pop("DMS_LOG_FILE", None)
        self.env.update({k: str(v) for k, v in env.items()})
        self.proc: subprocess.Popen | None = None

    def start(self) -> Replica:
        self._log = open(self.log_path, "ab")
        # A session (and process group) of its own, so that a test can freeze or kill the
        # replica together with its execution processes, as Ctrl-Z or a VM pause does.
        self.proc = subprocess.Popen([sys.executable, "-m", "worker", "run", "--name", self.name, *self.run_args],
                                     env=self.env, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        return self

    @property
    def pid(self) -> int:
        return self.proc.pid

    def worker_id(self, engine: sa.engine.Engine) -> str | None:
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT worker_id FROM dms_worker WHERE worker_id LIKE :p"),
                                {"p": f"{self.name}:%"}).scalar()

    def wait_registered(self, engine: sa.engine.Engine, timeout: float = 30) -> str:
        return wait_until(lambda: self.alive_or_fail() and self.worker_id(engine), timeout, f"{self.name} to register")

    def alive_or_fail(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
        return True

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def signal_group(self, sig: int) -> None:
        """Signal the replica and every process it started (its execution processes)."""
        os.killpg(self.proc.pid, sig)

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc:
            self._log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class StallingProxy:
    """A TCP proxy to the database that can stop forwarding, as a network partition does: the
    sockets stay open, bytes just stop flowing in both directions.

    ``stall_after(pattern)`` forwards the next client packet that contains ``pattern`` (say the
    start of a statement) and then stalls every connection, so the server has run the statement
    and waits, holding its locks, for a client that will never answer.
    """

    def __init__(self, host: str, port: int) -> None:
        import socket
        import threading
        self._target = (host, port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._pattern: bytes | None = None
        self.stalled = False
        self._closed = False
        self._sockets: list = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def stall_after(self, pattern: bytes) -> None:
        self._pattern = pattern

    def _accept(self) -> None:
        import socket
        import threading
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.create_connection(self._target)
            with self._lock:
                self._sockets += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, src, dst, upstream: bool) -> None:
        import select
        while not self._closed:
            if self.stalled:
                time.sleep(0.05)        # partitioned: nothing is read, nothing is sent
                continue
            try:
                ready, _, _ = select.select([src], [], [], 0.05)
                if not ready:
                    continue
                data = src.recv(65536)
                if not data:
                    break
                if self.stalled:
                    continue             # lost in the partition
                dst.sendall(data)
                if upstream and self._pattern is not None and self._pattern in data:
                    self.stalled = True
            except OSError:
                break

    def close(self) -> None:
        self._closed = True
        with self._lock:
            for sock in [self._listener, *self._sockets]:
                try:
                    sock.close()
                except OSError:
                    pass
