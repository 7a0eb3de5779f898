"""Replicas under supervisord (worker/supervise.py) and the shipped service files in supervisor/.

The scenario tests run real supervisord and `dms-worker run` processes on a SQLite database in
tmp_path, with metrics ports picked free; they judge by supervisorctl and the DMS_WORKER table.
"""
from __future__ import annotations

import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.support import REPO, pid_alive, wait_until
from worker import supervise as sv

FAST = dict(DMS_HEARTBEAT_INTERVAL="0.5", DMS_RESCUE_AFTER="3", SCHEDULER_POLL_INTERVAL="0.5",
            DMS_LOG_LEVEL="INFO")
REPLICAS = 3


# -- helpers ---------------------------------------------------------------------------------------
def free_base_port(n: int) -> int:
    """A port p such that p .. p+n-1 are all free on 127.0.0.1 right now."""
    for _ in range(100):
        base = random.randrange(20000, 60000)
        socks = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no run of free ports found")


class Cluster:
    """supervisord (a child of the test, in the foreground) running REPLICAS replicas."""

    def __init__(self, url: str, tmp_path: Path) -> None:
        self.url = url
        self.workdir = tmp_path / "sv"
        self.base_port = free_base_port(REPLICAS)
        self.engine = sa.create_engine(url)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DMS_", "SCHEDULER_"))}
        env.update(FAST)
        self.out = open(tmp_path / "supervisord.out", "wb")
        self.proc = sv.start(REPLICAS, self.workdir, url, self.base_port, directory=tmp_path, environ=env,
                             stdout=self.out, stderr=subprocess.STDOUT)

    def ctl(self, *args: str) -> str:
        result = subprocess.run(sv.supervisorctl_command(self.workdir, *args), capture_output=True, text=True,
                                timeout=30)
        return result.stdout

    def status(self) -> dict[str, tuple[str, int | None]]:
        """process name -> (state, pid)."""
        out = {}
        for line in self.ctl("status").splitlines():
            m = re.match(r"(\S+)\s+(\S+)(?:\s+pid (\d+))?", line)
            if m and m.group(1).startswith(f"{sv.PROGRAM}:"):
                out[m.group(1)] = (m.group(2), int(m.group(3)) if m.group(3) else None)
        return out

    def running(self) -> dict[str, int] | None:
        st = self.status()
        if len(st) == REPLICAS and all(state == "RUNNING" for state, _ in st.values()):
            return {name: pid for name, (_, pid) in st.items()}
        return None

    def workers(self) -> list[str]:
        with self.engine.connect() as conn:
            return sorted(conn.execute(sa.text("SELECT worker_id FROM dms_worker")).scalars())

    def alive_or_fail(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"supervisord exited with {self.proc.returncode}:\n{self.logs()}")
        return True

    def logs(self) -> str:
        parts = []
        for path in [self.out.name, *sorted((self.workdir / "logs").glob("*.log"))]:
            text = Path(path).read_text(errors="replace") if Path(path).exists() else ""
            parts.append(f"--- {Path(path).name} ---\n{text[-3000:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.out.close()
        self.engine.dispose()


@pytest.fixture
def cluster(sqlite_url, tmp_path, request):
    c = Cluster(sqlite_url, tmp_path)
    yield c
    failed = getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed
    if failed:
        print(c.logs())
    # Replicas left behind (supervisord killed) would keep running: stop them by pid.
    pids = [pid for _, pid in c.status().values() if pid] if c.proc.poll() is None else []
    c.stop()
    for pid in pids:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def wait_registered(c: Cluster, timeout: float = 60) -> list[str]:
    host = os.uname().nodename
    return wait_until(lambda: c.alive_or_fail() and len(ws := c.workers()) == REPLICAS
                      and sorted(w.split(":")[0] for w in ws) == [f"{host}-{n}" for n in range(REPLICAS)] and ws,
                      timeout, f"{REPLICAS} replicas to register")


# -- scenarios -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_supervisord_runs_restarts_and_drains_replicas(cluster):
    c = cluster
    first = wait_registered(c)
    pids = wait_until(lambda: c.alive_or_fail() and c.running(), 60, "3 replicas RUNNING under supervisord")
    assert len(set(pids.values())) == REPLICAS
    # The socket is private to its owner: supervisorctl can stop and start processes.
    assert (sv.paths(c.workdir)["run"].stat().st_mode & 0o777) == 0o700

    # kill -9 one replica: supervisord starts a new one, which registers under a new id, and
    # the survivors rescue the dead one's row.
    victim = f"{sv.PROGRAM}:{sv.PROGRAM}-1"
    old_pid = int(c.ctl("pid", victim).strip())
    assert old_pid == pids[victim]
    host = os.uname().nodename
    old_id = next(w for w in first if w.startswith(f"{host}-1:"))
    os.kill(old_pid, signal.SIGKILL)

    def restarted():
        st = c.status().get(victim)
        return st and st[0] == "RUNNING" and st[1] not in (None, old_pid) and st[1]
    new_pid = wait_until(lambda: c.alive_or_fail() and restarted(), 60, "supervisord to restart the killed replica")
    assert pid_alive(new_pid) and not pid_alive(old_pid)
    new_id = wait_until(lambda: next((w for w in c.workers() if w.startswith(f"{host}-1:") and w != old_id), None),
                        30, "the restarted replica to register")
    wait_until(lambda: old_id not in c.workers(), 30, "the killed replica's row to be rescued")
    assert sorted(c.workers()) == sorted([w for w in first if w != old_id] + [new_id])
    others = {name: pid for name, pid in pids.items() if name != victim}
    assert all(c.status()[name] == ("RUNNING", pid) for name, pid in others.items()), "others were not restarted"

    # SIGTERM to supervisord: every replica drains and leaves DMS_WORKER, supervisord exits 0.
    replica_pids = [pid for _, pid in c.status().values()]
    c.proc.send_signal(signal.SIGTERM)
    assert c.proc.wait(60) == 0
    assert c.workers() == []
    assert not any(pid_alive(pid) for pid in replica_pids)
    log = (c.workdir / "logs" / "supervisord.log").read_text()
    assert log.count("(exit status 0)") >= REPLICAS, log


@pytest.mark.slow
def test_each_replica_serves_metrics_on_its_own_port(cluster):
    c = cluster
    ids = wait_registered(c)
    host = os.uname().nodename

    def page(n: int) -> str | None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{c.base_port + n}/metrics", timeout=2) as resp:
                return resp.read().decode()
        except OSError:
            return None

    pages = wait_until(lambda: all(p := [page(n) for n in range(REPLICAS)]) and p, 10,
                       "every replica's /metrics to answer")
    for n, text in enumerate(pages):
        assert "dms_worker_info{" in text
        mine = next(w for w in ids if w.startswith(f"{host}-{n}:"))
        assert f'worker_id="{mine}"' in text, f"port {c.base_port + n} is not replica {n}"


def _cli(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.slow
def test_supervise_daemon_says_where_it_is_and_ctl_works_from_elsewhere(sqlite_url, tmp_path):
    """--daemon printed only "Unlinking stale socket", supervisord logged a CRIT line about an
    unauthenticated socket at every start, and --ctl from another directory printed
    supervisorctl's own "could not find config file"."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DMS_", "SCHEDULER_"))}
    env.update(FAST, DMS_METRICS_PORT="0", DMS_DATABASE_URL=sqlite_url)
    home = tmp_path / "home"
    home.mkdir()
    workdir = home / "sv"
    # A socket file left by a supervisord that was killed.
    sv.paths(workdir)["run"].mkdir(parents=True, mode=0o700)
    sv.paths(workdir)["socket"].write_text("")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = _cli("supervise", "--replicas", "1", "--daemon", "--workdir", "sv", cwd=home, env=env)
    try:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "stale" not in (proc.stdout + proc.stderr).lower()
        first = proc.stdout.splitlines()[0]
        assert re.fullmatch(r"supervisord runs in the background \(pid \d+\) with 1 replica\(s\); logs in .*/sv/logs",
                            first), proc.stdout
        assert "--workdir sv --ctl status" in proc.stdout and "--workdir sv --ctl shutdown" in proc.stdout

        # A second start on the same directory is refused: it would rewrite the running one's file.
        again = _cli("supervise", "--replicas", "1", "--daemon", "--workdir", "sv", cwd=home, env=env)
        assert again.returncode == 1 and "already runs" in again.stderr, again.stdout + again.stderr

        # From another directory: the default --workdir is not there; one clear line.
        lost = _cli("supervise", "--ctl", "status", cwd=elsewhere, env=env)
        assert lost.returncode == 1
        (line,) = lost.stderr.strip().splitlines()
        assert "no supervisord configuration in" in line and "--workdir" in line, line
        assert "could not find config file" not in lost.stdout + lost.stderr
        # With the right --workdir it works from anywhere.
        found = wait_until(lambda: "RUNNING" in (r := _cli("supervise", "--workdir", str(workdir), "--ctl", "status",
                                                          cwd=elsewhere, env=env)).stdout and r, 30,
                           "the replica to be RUNNING")
        assert found.returncode == 0, found.stdout + found.stderr

        conf = sv.paths(workdir)["conf"]
        assert conf.stat().st_mode & 0o777 == 0o600, "it holds the control socket's password"
        log = (workdir / "logs" / "supervisord.log").read_text()
        assert "without any HTTP authentication" not in log, log
    finally:
        _cli("supervise", "--workdir", str(workdir), "--ctl", "shutdown", cwd=elsewhere, env=env)
        wait_until(lambda: not sv.is_running(workdir), 60, "supervisord to shut down")
    stopped = _cli("supervise", "--workdir", str(workdir), "--ctl", "status", cwd=elsewhere, env=env)
    assert stopped.returncode == 1 and "is not running" in stopped.stderr, stopped.stdout + stopped.stderr


# -- the shipped files -----------------------------------------------------------------------------
def test_rendered_config_parses_and_each_replica_has_its_port(tmp_path):
    env = {"PATH": os.environ.get("PATH", ""), "DMS_SHUTDOWN_GRACE": "60"}
    conf = sv.render(3, tmp_path / "w", "sqlite:///x.db", 19400, directory=tmp_path, environ=env)
    programs = read_supervisor_config(conf)
    assert sorted(programs) == ["dms-worker-0", "dms-worker-1", "dms-worker-2"]
    for n in range(3):
        p = programs[f"dms-worker-{n}"]
        assert p.environment["DMS_METRICS_PORT"] == str(19400 + n)
        assert p.environment["DMS_LOG_FILE"] == ""
        assert p.command.endswith(f"-m worker run --name {os.uname().nodename}-{n}")
        assert p.stopwaitsecs == 60 + sv.STOP_MARGIN_S     # follows DMS_SHUTDOWN_GRACE
    assert "x.db" not in conf.read_text(), "the database URL must not be written to disk"
    # The control socket has credentials (supervisord stops logging CRIT about it), and the
    # file holding them is private.
    from supervisor.options import ServerOptions
    options = ServerOptions()
    options.configfile = str(conf)
    options.read_config(str(conf))
    server = options.configroot.supervisord.server_configs[0]
    assert server["username"] == "dms" and len(server["password"]) == 32
    text = conf.read_text()
    assert text.count(f"password={server['password']}") == 2, "supervisorctl must log in with the same"
    assert conf.stat().st_mode & 0o777 == 0o600

    off = sv.render(2, tmp_path / "w2", None, 19400, directory=tmp_path, environ={"DMS_METRICS_PORT": "0"})
    assert {p.environment["DMS_METRICS_PORT"] for p in read_supervisor_config(off).values()} == {"0"}

    from worker.config import ConfigError
    with pytest.raises(ConfigError, match="DMS_SHUTDOWN_GRACE"):
        sv.render(1, tmp_path / "w3", None, 19400, directory=tmp_path, environ={"DMS_SHUTDOWN_GRACE": "-1"})


def test_shipped_supervisor_config_matches_the_rendered_one(tmp_path, monkeypatch):
    """supervisor/supervisord.conf + dms-worker.conf load in supervisord, and the settings that
    matter are the ones worker.supervise renders."""
    # Point the absolute paths of the shipped files into tmp_path, and run as whoever we are.
    for d in ("log", "run", "lib"):
        (tmp_path / d).mkdir()
    me = pwd.getpwuid(os.getuid()).pw_name
    for name in ("supervisord.conf", "dms-worker.conf"):
        text = (REPO / "supervisor" / name).read_text()
        text = (text.replace("/var/log/dms-worker", str(tmp_path / "log")).replace("/run/dms-worker", str(tmp_path / "run"))
                .replace("/var/lib/dms-worker", str(tmp_path / "lib")).replace("user=dms", f"user={me}"))
        (tmp_path / name).write_text(text)
    monkeypatch.setenv("DMS_VENV", "/opt/dms-venv")
    shipped = read_supervisor_config(tmp_path / "supervisord.conf")
    assert sorted(shipped) == ["dms-worker-0", "dms-worker-1", "dms-worker-2"]
    for n in range(3):
        p = shipped[f"dms-worker-{n}"]
        assert p.environment["DMS_METRICS_PORT"] == f"94{n:02d}"
        assert p.command == f"/opt/dms-venv/bin/dms-worker run --name {os.uname().nodename}-{n}"
        assert p.stopwaitsecs > 30                      # DMS_SHUTDOWN_GRACE + margin
        assert p.umask == 0o027

    rendered = read_supervisor_config(sv.render(3, tmp_path / "w", None, 9400, directory=tmp_path, environ={}))
    same = ("stopsignal", "stopwaitsecs", "stopasgroup", "killasgroup", "autostart", "autorestart", "startsecs",
            "startretries", "redirect_stderr")
    for n in range(3):
        a, b = shipped[f"dms-worker-{n}"], rendered[f"dms-worker-{n}"]
        for key in same:
            assert getattr(a, key) == getattr(b, key), key
        assert a.stdout_logfile_maxbytes == b.stdout_logfile_maxbytes == 10 * 1024 * 1024
        assert a.stdout_logfile_backups == b.stdout_logfile_backups == 5
        assert a.environment["DMS_METRICS_PORT"] == b.environment["DMS_METRICS_PORT"]
        assert a.stopsignal == signal.SIGTERM and a.killasgroup and not a.stopasgroup


def read_supervisor_config(path: Path) -> dict:
    """program name -> supervisor's ProcessConfig, as supervisord itself parses the file."""
    from supervisor.options import ServerOptions
    options = ServerOptions()
    options.configfile = str(path)
    options.here = str(Path(path).parent)
    options.read_config(str(path))
    groups = options.configroot.supervisord.process_group_configs
    return {p.name: p for g in groups for p in g.process_configs}


def test_systemd_unit_verifies(tmp_path):
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze not installed")
    unit = (REPO / "supervisor" / "dms-worker@.service").read_text()
    assert "KillMode=mixed" in unit and "Environment=DMS_METRICS_PORT=94%i" in unit
    # ExecStart must name an executable that exists for verify to pass: use ours.
    exe = Path(os.sys.executable).parent / "dms-worker"
    unit = unit.replace("/opt/dms-worker/venv/bin/dms-worker", str(exe))
    (tmp_path / "dms-worker@01.service").write_text(unit)
    result = subprocess.run([tool, "verify", "--man=no", str(tmp_path / "dms-worker@01.service")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stderr.strip(), result.stdout + result.stderr
