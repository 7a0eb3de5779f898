"""N local replicas under supervisord, for one host without a hand-written configuration.

This module owns rendering a complete supervisord configuration into a work directory (the
control socket, supervisord's pid and log files, one log per replica) and running supervisord
and supervisorctl on it. The replicas themselves are ordinary ``dms-worker run`` processes.

The rendered program settings are those of the shipped ``supervisor/dms-worker.conf`` (which
is not part of the installed package, so it is not read as a template): TERM drains, KILL
only after the drain had its time, restart limits, rotated logs. One difference: that file
uses ``numprocs`` and pastes the metrics port together (``94%(process_num)02d``), which only
works for a base port that is a multiple of 100; here every replica gets its own program
section, grouped under ``dms-worker``, so any base port works and the names supervisorctl
shows (``dms-worker:dms-worker-0`` ...) are the same.

The database URL is handed to supervisord through its environment, never written into the
configuration file, so a password does not land on disk. The control socket gets a random
user and password of its own (in the file, mode 0600), which also keeps supervisord from
logging a CRIT line about an unauthenticated socket at every start.
"""
from __future__ import annotations

import os
import secrets
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

from .config import Config

PROGRAM = "dms-worker"
DEFAULT_BASE_PORT = 9400
CONF_NAME = "supervisord.conf"
# Margin on top of DMS_SHUTDOWN_GRACE for stopping the executions and leaving DMS_WORKER.
STOP_MARGIN_S = 15
START_SECS = 5
START_RETRIES = 5
LOG_MAX_BYTES = "10MB"
LOG_BACKUPS = 5
# sun_path is 108 bytes on Linux (104 on BSDs); keep some room.
MAX_SOCKET_PATH = 100


def paths(workdir: Path) -> dict[str, Path]:
    workdir = Path(workdir).resolve()
    return {
        "conf": workdir / CONF_NAME,
        "run": workdir / "run",
        "socket": workdir / "run" / "supervisor.sock",
        "pidfile": workdir / "run" / "supervisord.pid",
        "logs": workdir / "logs",
    }


def replica_log(workdir: Path, n: int) -> Path:
    return paths(workdir)["logs"] / f"{PROGRAM}-{n}.log"


def render(replicas: int, workdir: Path, database_url: str | None = None, base_port: int = DEFAULT_BASE_PORT,
           directory: Path | None = None, foreground: bool = True, environ: Mapping[str, str] | None = None) -> Path:
    """Write ``workdir/supervisord.conf`` for ``replicas`` replicas; return its path.

    Replica ``n`` (0-based) serves metrics on ``base_port + n``, unless DMS_METRICS_PORT=0 is
    set (endpoints off for all). ``directory`` is the replicas' working directory, where they
    read ``.env`` and where the default SQLite file lives (default: the current directory, as
    if ``dms-worker run`` had been typed here N times). ``environ`` is the environment supervisord,
    and so every replica, will get (default: this process's).

    The configuration the replicas will read is validated first (``Config.from_env``): a bad
    variable stops here with its one-line message, instead of N replicas crash-looping.
    """
    if replicas < 1:
        raise ValueError("replicas must be >= 1")
    p = paths(workdir)
    directory = Path(directory or os.getcwd()).resolve()
    if len(str(p["socket"])) > MAX_SOCKET_PATH:
        raise ValueError(f"work directory path too long for a unix socket ({p['socket']}): choose a shorter one")
    environ = os.environ if environ is None else environ
    cfg = Config.from_env(environ, dotenv_path=directory / ".env", database_url=database_url)
    metrics_off = environ.get("DMS_METRICS_PORT", "").strip() == "0"
    if not metrics_off and not (0 < base_port and base_port + replicas - 1 <= 65535):
        raise ValueError(f"metrics ports {base_port}..{base_port + replicas - 1} are not all valid ports")

    p["conf"].parent.mkdir(parents=True, exist_ok=True)
    # The socket's directory is private: supervisorctl can stop and start processes.
    p["run"].mkdir(mode=0o700, exist_ok=True)
    os.chmod(p["run"], 0o700)
    p["logs"].mkdir(mode=0o750, exist_ok=True)

    stopwaitsecs = int(cfg.shutdown_grace + 0.999) + STOP_MARGIN_S
    command = " ".join(shlex.quote(a) for a in (sys.executable, "-m", "worker", "run", "--name"))
    names = [f"{PROGRAM}-{n}" for n in range(replicas)]
    # The socket is private already (0700 in a 0700 directory); the credentials are what
    # supervisord wants to see before it stops warning about an unauthenticated socket.
    user, password = "dms", secrets.token_hex(16)
    lines = [
        "; Rendered by worker.supervise: do not edit, it is rewritten at every start.",
        "[unix_http_server]",
        f"file={_esc(p['socket'])}",
        "chmod=0700",
        f"username={user}",
        f"password={password}",
        "",
        "[supervisord]",
        f"logfile={_esc(p['logs'] / 'supervisord.log')}",
        f"logfile_maxbytes={LOG_MAX_BYTES}",
        f"logfile_backups={LOG_BACKUPS}",
        f"pidfile={_esc(p['pidfile'])}",
        f"childlogdir={_esc(p['logs'])}",
        f"directory={_esc(directory)}",
        "umask=027",
        f"nodaemon={'true' if foreground else 'false'}",
        "",
        "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
        "",
        "[supervisorctl]",
        f"serverurl=unix://{_esc(p['socket'])}",
        f"username={user}",
        f"password={password}",
        "",
        f"[group:{PROGRAM}]",
        f"programs={','.join(names)}",
    ]
    for n, name in enumerate(names):
        port = 0 if metrics_off else base_port + n
        lines += [
            "",
            f"[program:{name}]",
            # The interpreter running this, not a PATH lookup: supervisord's PATH may differ.
            f"command={_esc(command)} %(host_node_name)s-{n}",
            f"directory={_esc(directory)}",
            # Logs to stderr, captured below: replicas must never share one rotating log file.
            f'environment=DMS_METRICS_PORT="{port}",DMS_LOG_FILE="",PYTHONUNBUFFERED="1"',
            "stopsignal=TERM",
            f"stopwaitsecs={stopwaitsecs}",
            # TERM to the replica only (it drains its own executions); the final KILL, if the
            # drain overruns, to the whole group so no execution outlives its replica.
            "stopasgroup=false",
            "killasgroup=true",
            "autostart=true",
            "autorestart=true",
            f"startsecs={START_SECS}",
            f"startretries={START_RETRIES}",
            "redirect_stderr=true",
            f"stdout_logfile={_esc(replica_log(workdir, n))}",
            f"stdout_logfile_maxbytes={LOG_MAX_BYTES}",
            f"stdout_logfile_backups={LOG_BACKUPS}",
        ]
    # Mode 0600 from the start: it holds the control socket's password.
    fd = os.open(p["conf"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return p["conf"]


def supervisord_command(workdir: Path, foreground: bool = True) -> list[str]:
    cmd = [sys.executable, "-m", "supervisor.supervisord", "-c", str(paths(workdir)["conf"])]
    return cmd + ["-n"] if foreground else cmd


def supervisorctl_command(workdir: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "supervisor.supervisorctl", "-c", str(paths(workdir)["conf"]), *args]


def supervisord_env(database_url: str | None, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """supervisord's environment, which every replica inherits."""
    env = dict(os.environ if environ is None else environ)
    if database_url:
        env["DMS_DATABASE_URL"] = database_url
    return env


def start(replicas: int, workdir: Path, database_url: str | None = None, base_port: int = DEFAULT_BASE_PORT,
          directory: Path | None = None, environ: Mapping[str, str] | None = None, **popen) -> subprocess.Popen:
    """Render the configuration and start supervisord in the foreground as a child process.

    supervisord gets its own session: a Ctrl-C in the terminal then reaches only the caller,
    which forwards one SIGTERM. Were supervisord in the terminal's process group, the replicas
    would get SIGINT from the terminal *and* TERM from supervisord, and a second signal makes a
    replica stop at once instead of draining.
    """
    _prepare_start(Path(workdir))
    render(replicas, workdir, database_url, base_port, directory, foreground=True, environ=environ)
    # supervisord applies its own `umask` setting only when it daemonizes; in the foreground
    # the log files it creates get the umask it inherits, so set that here.
    return subprocess.Popen(supervisord_command(workdir, foreground=True), env=supervisord_env(database_url, environ),
                            start_new_session=True, umask=0o027, **popen)


def is_running(workdir: Path) -> bool:
    """Whether a supervisord answers on ``workdir``'s control socket."""
    p = paths(workdir)
    if not p["conf"].exists() or not p["socket"].exists():
        return False
    return subprocess.call(supervisorctl_command(workdir, "pid"), stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL) == 0


class AlreadyRunning(RuntimeError):
    """A supervisord already runs on this work directory."""


def _prepare_start(workdir: Path) -> None:
    """Refuse a second supervisord on one work directory; remove a dead one's socket.

    supervisord would print "Unlinking stale socket" itself, and a second one would rewrite
    the configuration (and the socket's password) under the running one.
    """
    if is_running(workdir):
        raise AlreadyRunning(f"a supervisord already runs in {paths(workdir)['conf'].parent}: use"
                             f" `dms-worker supervise --workdir {workdir} --ctl status` (or --ctl shutdown first)")
    sock = paths(workdir)["socket"]
    if sock.exists() or sock.is_symlink():
        sock.unlink()


def supervise(replicas: int, workdir: Path, database_url: str | None, foreground: bool = True,
              base_port: int = DEFAULT_BASE_PORT) -> int:
    """Run ``replicas`` replicas under supervisord; return supervisord's exit code.

    Foreground: until SIGTERM/SIGINT, forwarded to supervisord as one SIGTERM (every replica
    drains; supervisord exits when they have). Otherwise supervisord daemonizes itself and
    this returns 0 once its control socket answers, saying where things are (1 if it does not
    answer within 15 s); stop it with ``supervisorctl(workdir, "shutdown")``.
    """
    workdir = Path(workdir)
    try:
        _prepare_start(workdir)
    except AlreadyRunning as exc:
        print(f"dms-worker: {exc}", file=sys.stderr)
        return 1
    if not foreground:
        render(replicas, workdir, database_url, base_port, foreground=False)
        # umask: supervisord opens its own log before it daemonizes and applies `umask=027`.
        code = subprocess.call(supervisord_command(workdir, foreground=False), env=supervisord_env(database_url),
                               umask=0o027)
        if code != 0:
            return code
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            pid = subprocess.run(supervisorctl_command(workdir, "pid"), capture_output=True, text=True)
            if pid.returncode == 0:
                p = paths(workdir)
                print(f"supervisord runs in the background (pid {pid.stdout.strip()}) with {replicas} replica(s);"
                      f" logs in {p['logs']}\n"
                      f"  status:  dms-worker supervise --workdir {workdir} --ctl status\n"
                      f"  stop:    dms-worker supervise --workdir {workdir} --ctl shutdown")
                return 0
            time.sleep(0.2)
        print(f"dms-worker: supervisord did not answer within 15 s; see {paths(workdir)['logs'] / 'supervisord.log'}",
              file=sys.stderr)
        return 1

    proc = start(replicas, workdir, database_url, base_port)

    def forward(_signum, _frame) -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    # Signal handlers can only be installed from the main thread; elsewhere the caller stops
    # supervisord itself (supervisorctl shutdown, or a signal to it).
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return proc.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def supervisorctl(workdir: Path, *args: str) -> int:
    """Run ``supervisorctl`` against the supervisord of ``workdir``; its output goes to ours.

    Without a configuration there (another directory, another --workdir) or without a
    supervisord running on it, say so in one line rather than let supervisorctl complain
    about a config file or a socket it cannot find.
    """
    p = paths(workdir)
    if not p["conf"].exists():
        print(f"dms-worker: no supervisord configuration in {p['conf'].parent} (--workdir {workdir}, relative to"
              f" {os.getcwd()}): pass the --workdir that `dms-worker supervise` was started with", file=sys.stderr)
        return 1
    if not is_running(workdir):
        print(f"dms-worker: supervisord is not running in {p['conf'].parent}: start it with"
              f" `dms-worker supervise --workdir {workdir}`", file=sys.stderr)
        return 1
    return subprocess.call(supervisorctl_command(workdir, *args))


def _esc(value: object) -> str:
    # supervisord expands %(name)s in values: a literal % must be doubled.
    return str(value).replace("%", "%%")
