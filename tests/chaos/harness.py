"""The chaos driver: a private PostgreSQL cluster, 4 replicas, a stream of work, and violence.

``PrivateCluster`` runs a throw-away PostgreSQL server (initdb in a temporary directory, run as
the ``postgres`` OS user when we are root, a free port, its socket in that directory, fsync
off) so that restarting it never disturbs the system server others test against.

``ChaosRun`` then, for ``duration_s``:
- keeps ``replicas`` ``dms-worker run`` processes up (a killed or stopped one is restarted
  after a short pause, under a new name), with fast heartbeat/rescue/lease timings;
- feeds them from an injector thread: IMMEDIATE requests of a recording handler (as fast as a
  bounded backlog allows), and on their own clocks HISTORY requests, always-failing requests
  with retries, long requests that a STOP then targets, requests of a job that must not
  overlap, and malformed rows (``checker.MALFORMED``); two CRON schedules with misfire ALL run
  meanwhile: every second (a noop), and every 5 s the non-overlapping job (0.3 s of sleep);
- at random moments sends kill -9 or SIGTERM to a replica, the leader included (the first two
  actions are always a kill -9 and a SIGTERM of the leader), and restarts PostgreSQL once
  (``pg_ctl stop -m immediate`` then start: crash recovery, every connection cut).
Afterwards it stops the injector, disables the schedules, waits (with a deadline) until nothing
is queued or running, stops every replica with SIGTERM, and hands the tables to the checker.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from tests.chaos import checker
from tests.support import Replica, probe
from worker import client
from worker import schema as s
from worker.drivers import make_driver
from worker.migrate import migrate

DB_NAME = "dms_chaos"

# Fast failure detection, so that a short run sees many rescues and leader changes.
REPLICA_ENV = dict(
    DMS_HEARTBEAT_INTERVAL="0.5", DMS_RESCUE_AFTER="3", DMS_LEADER_TTL="3", SCHEDULER_POLL_INTERVAL="0.5",
    SCHEDULER_REFRESH_INTERVAL="2", SCHEDULER_MAX_WORKERS="2", DMS_SHUTDOWN_GRACE="2", DMS_METRICS_PORT="0",
    DMS_LOG_LEVEL="INFO",
)


# Extra options for the private server, to experiment (e.g. "-c jit=off").
PG_OPTIONS = os.environ.get("DMS_CHAOS_PG_OPTIONS", "")


class ClusterError(RuntimeError):
    """The private PostgreSQL cluster could not be created or started."""


def _pg_bindir() -> Path | None:
    explicit = os.environ.get("DMS_CHAOS_PG_BIN")
    if explicit:
        return Path(explicit)
    root = Path("/usr/lib/postgresql")
    if root.is_dir():
        versions = sorted((p for p in root.iterdir() if (p / "bin" / "initdb").exists()),
                          key=lambda p: [int(x) if x.isdigit() else 0 for x in p.name.split(".")])
        if versions:
            return versions[-1] / "bin"
    found = shutil.which("initdb")
    return Path(found).parent if found else None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrivateCluster:
    """A throw-away PostgreSQL server of our own: ``start()`` returns a SQLAlchemy URL."""

    def __init__(self, bindir: Path | None = None) -> None:
        self.bindir = bindir or _pg_bindir()
        self.root: Path | None = None
        self.port: int | None = None
        self.url: str | None = None
        self.restarts: list[float] = []        # seconds each restart took (stop -> accepting again)

    @property
    def datadir(self) -> Path:
        return self.root / "data"

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [str(self.bindir / args[0]), *args[1:]]
        if os.geteuid() == 0:           # initdb and postgres refuse to run as root
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            log = ""
            if self.root is not None and (self.root / "server.log").exists():
                log = (self.root / "server.log").read_text(errors="replace")[-2000:]
            raise ClusterError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}\n{log}")
        return done

    def start(self) -> str:
        if self.bindir is None or not (self.bindir / "initdb").exists():
            raise ClusterError("no PostgreSQL server binaries (initdb) found: install postgresql "
                               "or set DMS_CHAOS_PG_BIN")
        self.root = Path(tempfile.mkdtemp(prefix="dms-chaos-pg-"))
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        self.root.chmod(0o700)
        self._run("initdb", "-D", str(self.datadir), "-U", "postgres", "--auth=trust", "-E", "UTF8",
                  "--no-sync", "--no-instructions")
        last: Exception | None = None
        for _ in range(5):
            self.port = _free_port()
            try:
                self._pg_ctl_start()
                break
            except ClusterError as exc:        # the port was taken between bind and start: try another
                last = exc
        else:
            raise ClusterError(f"could not start the private cluster: {last}")
        admin = sa.create_engine(self._url("postgres"), isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as conn:
                conn.execute(sa.text(f'CREATE DATABASE "{DB_NAME}"'))
        finally:
            admin.dispose()
        self.url = self._url(DB_NAME)
        driver = make_driver(self.url)
        try:
            migrate(driver)
            probe.create(driver.engine)
        finally:
            driver.dispose()
        return self.url

    def _url(self, database: str) -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def _pg_ctl_start(self) -> None:
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.root} "
                   "-c fsync=off -c full_page_writes=off -c max_connections=300 -c shared_buffers=32MB "
                   "-c log_min_messages=warning " + PG_OPTIONS)
        self._run("pg_ctl", "start", "-w", "-t", "60", "-D", str(self.datadir), "-l", str(self.root / "server.log"),
                  "-o", options)

    def restart(self, immediate: bool = True) -> float:
        """Stop (``-m immediate``: no checkpoint, connections cut, crash recovery on start; or
        ``-m fast``) and start again; returns the seconds the server was away."""
        t0 = time.monotonic()
        self._run("pg_ctl", "stop", "-w", "-D", str(self.datadir), "-m", "immediate" if immediate else "fast")
        self._pg_ctl_start()
        took = time.monotonic() - t0
        self.restarts.append(took)
        return took

    def halt(self) -> None:
        """Stop the server, leaving the cluster in place (``resume`` starts it again)."""
        self._run("pg_ctl", "stop", "-w", "-D", str(self.datadir), "-m", "fast")

    def resume(self) -> None:
        self._pg_ctl_start()

    def server_log(self) -> str:
        path = self.root / "server.log" if self.root else None
        return path.read_text(errors="replace") if path and path.exists() else ""

    def stop(self) -> None:
        if self.root is None:
            return
        try:
            if (self.datadir / "postmaster.pid").exists():
                self._run("pg_ctl", "stop", "-w", "-D", str(self.datadir), "-m", "immediate")
        except (ClusterError, subprocess.TimeoutExpired):
            pass
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None


# ---------------------------------------------------------------------------------------------
# Replicas
# ---------------------------------------------------------------------------------------------
class ChaosReplica(Replica):
    def close(self) -> None:
        log = getattr(self, "_log", None)
        if log is not None and not log.closed:
            log.close()


@dataclass
class Slot:
    """One of the N replica positions; its process changes as it is killed and restarted."""
    index: int
    replica: ChaosReplica | None = None
    state: str = "down"                  # running, stopping (SIGTERM sent), down
    restart_at: float = 0.0
    term_sent: float = 0.0
    generation: int = 0
    history: list[ChaosReplica] = field(default_factory=list)


@dataclass
class Stats:
    seed: int | None = None
    kills: int = 0
    kills_of_leader: int = 0
    sigterms: int = 0
    sigterms_of_leader: int = 0
    sigterm_exit_codes: list[int] = field(default_factory=list)
    sigterm_seconds: list[float] = field(default_factory=list)
    sigterm_hung: int = 0
    startup_db_exits: int = 0            # replicas that exited 1 because they started while the database was away
    up_fraction: float = 0.0             # share of the chaos phase the replica processes were up (not killed/stopping)
    replica_starts: int = 0
    replica_restarts: int = 0
    pg_restarts: int = 0
    pg_restart_seconds: list[float] = field(default_factory=list)
    inserted: dict[str, int] = field(default_factory=dict)
    malformed_inserted: int = 0
    insert_errors: int = 0
    injector_paused: int = 0             # quarter seconds the injector waited for the backlog to shrink
    sigterm_during_startup: int = 0      # SIGTERM before the replica installed its handler: killed by it
    actions: list[str] = field(default_factory=list)
    leader_epoch: int | None = None
    settle_seconds: float | None = None
    settled: bool = False
    final_stop_exit_codes: list[int | None] = field(default_factory=list)


@dataclass
class Outcome:
    result: checker.Result
    stats: Stats
    seconds: float
    log_dir: Path
    problems: list[str]                  # driver-side findings (exit codes, hung SIGTERMs, no settle)

    @property
    def ok(self) -> bool:
        return self.result.ok and not self.problems

    def report(self) -> str:
        st = self.stats
        lines = [checker.format_result(self.result),
                 f"kills (kill -9): {st.kills} (of the leader: {st.kills_of_leader})",
                 f"SIGTERMs: {st.sigterms} (of the leader: {st.sigterms_of_leader}; during start-up, before the "
                 f"handler was installed: {st.sigterm_during_startup}); exit codes {st.sigterm_exit_codes}; "
                 f"exit took {[round(x, 1) for x in st.sigterm_seconds]} s",
                 f"replica starts: {st.replica_starts} (restarts after kill/stop: {st.replica_restarts}); "
                 f"replicas that exited 1 because they started while PostgreSQL was away: {st.startup_db_exits}; "
                 f"replica processes up {st.up_fraction:.0%} of the time",
                 f"PostgreSQL restarts: {st.pg_restarts} (took {[round(x, 2) for x in st.pg_restart_seconds]} s)",
                 f"inserted by the driver: {st.inserted}; malformed rows inserted: {st.malformed_inserted}; "
                 f"insert errors (database away): {st.insert_errors}; injector paused for back-pressure: "
                 f"{st.injector_paused * 0.25:.1f} s",
                 f"leader epoch at the end: {st.leader_epoch}",
                 f"settled: {st.settled} after {st.settle_seconds and round(st.settle_seconds, 1)} s; "
                 f"final SIGTERM exit codes {st.final_stop_exit_codes}",
                 f"actions: {', '.join(st.actions)}",
                 f"seed: {st.seed}",
                 f"wall time: {self.seconds:.1f} s; replica logs in {self.log_dir}"]
        if self.problems:
            lines.insert(1, "driver-side problems:\n" + "\n".join(f"  {p}" for p in self.problems))
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
JOBS = [
    # mapref, handler, options
    ("CH_REC", "tests.handlers:record", dict(allow_overlap=True, max_attempts=3, retry_delay_s=1)),
    ("CH_HIST", "tests.handlers:record", dict(allow_overlap=True, max_attempts=3, retry_delay_s=1)),
    ("CH_FLAKY", "worker.jobs.builtin:fail", dict(allow_overlap=True, max_attempts=2, retry_delay_s=1)),
    ("CH_LONG", "tests.handlers:record", dict(allow_overlap=True, max_attempts=3, retry_delay_s=1)),
    ("CH_SOLO", "tests.handlers:record", dict(allow_overlap=False, max_attempts=3, retry_delay_s=1)),
    ("CH_TICK", "worker.jobs.builtin:noop", dict(allow_overlap=True, max_attempts=3, retry_delay_s=1)),
    ("CH_BADHANDLER", "no_such_module:nothing", dict(max_attempts=1)),
    ("CH_DISABLED", "worker.jobs.builtin:noop", dict(enabled=False)),
]


class ChaosRun:
    def __init__(self, url: str, cluster: PrivateCluster, log_dir: Path, *, duration_s: float, replicas: int = 4,
                 seed: int | None = None, settle_timeout_s: float = 60.0,
                 action_every_s: tuple[float, float] = (3.0, 6.0),
                 inject_every_s: float = 0.15, max_backlog: int = 25, verbose: bool = False) -> None:
        self.url, self.cluster, self.log_dir = url, cluster, Path(log_dir)
        self.duration_s, self.n_replicas = duration_s, replicas
        self.seed = seed if seed is not None else random.randrange(1 << 30)
        self.rng = random.Random(self.seed)
        self.settle_timeout_s, self.action_every_s = settle_timeout_s, action_every_s
        self.inject_every_s = inject_every_s
        self.verbose, self.max_backlog = verbose, max_backlog
        self.engine = sa.create_engine(url, pool_pre_ping=True, pool_size=3, max_overflow=2)
        self.slots = [Slot(i) for i in range(replicas)]
        self.stats = Stats(seed=self.seed)
        self.committed: set[str] = set()
        self.problems: list[str] = []
        self._stop_inject = threading.Event()
        self._t0 = time.monotonic()
        self._up_samples = self._up_running = 0

    # -- helpers ---------------------------------------------------------------------------
    def say(self, msg: str) -> None:
        if self.verbose:
            print(f"[chaos {time.monotonic() - self._t0:6.1f}s] {msg}", flush=True)

    def _db(self, fn, default=None):
        """Run ``fn(conn)`` in a transaction; the database may be restarting: give ``default``."""
        try:
            with self.engine.begin() as conn:
                return fn(conn)
        except sa.exc.DBAPIError:
            return default

    def db_now(self) -> datetime | None:
        return self._db(lambda c: c.execute(sa.select(sa.func.timezone("UTC", sa.func.statement_timestamp()))).scalar())

    def leader_name(self) -> str | None:
        holder = self._db(lambda c: c.execute(sa.select(s.worker.c.worker_id).where(s.worker.c.is_leader == "Y")
                                              .order_by(s.worker.c.heartbeat_at.desc())).scalars().first())
        return holder.split(":")[0] if holder else None

    # -- setup -----------------------------------------------------------------------------
    def setup(self) -> None:
        with self.engine.begin() as conn:
            for mapref, handler, opts in JOBS:
                client.register_job(conn, mapref, handler, **opts)
            # strtdt = now: without it a new schedule also fires what fell due in the last minute
            # (the calculus' 60 s grace), a burst of 60 occurrences of an every-second schedule.
            now = conn.execute(sa.select(sa.func.timezone("UTC", sa.func.statement_timestamp()))).scalar()
            sched = dict(frqcd="CRON", misfire="ALL", schflg="Y", curflg="Y", strtdt=now)
            conn.execute(sa.insert(s.jobsch).values(mapref="CH_TICK", cronexp=checker.EVERY_SECOND, **sched))
            # The job that must never overlap: every 5 seconds, 0.3 s each, plus immediate requests.
            conn.execute(sa.insert(s.jobsch).values(mapref="CH_SOLO", cronexp="* * * * * */5",
                                                    params=json.dumps({"seconds": 0.3}), **sched))
            # A schedule that cannot be interpreted (a weekday that is none; an unknown frqcd is
            # refused by the table's CHECK): skipped with the reason on its row, the others fire.
            conn.execute(sa.insert(s.jobsch).values(mapref="CH_TICK", frqcd="WK", frqdd="XYZ", schflg="Y",
                                                    curflg="Y", misfire="LATEST"))

    def _start(self, slot: Slot) -> None:
        slot.generation += 1
        name = f"c{slot.index}g{slot.generation}"
        rep = ChaosReplica(self.url, name, self.log_dir, **REPLICA_ENV).start()
        slot.replica, slot.state = rep, "running"
        slot.history.append(rep)
        self.stats.replica_starts += 1
        if slot.generation > 1:
            self.stats.replica_restarts += 1
        self.say(f"started {name} (pid {rep.pid})")

    # -- the injector ----------------------------------------------------------------------
    def _insert(self, kind: str, mapref: str, request_type: str = s.IMMEDIATE, payload: Any = None,
                request_id: str | None = None) -> str | None:
        rid = request_id or f"{kind}-{uuid.uuid4()}"
        text = payload if isinstance(payload, str) or payload is None else json.dumps(payload)
        try:
            with self.engine.begin() as conn:
                conn.execute(sa.text("INSERT INTO dms_prcreq (request_id, mapref, request_type, payload) "
                                     "VALUES (:i, :m, :t, :p)"), dict(i=rid, m=mapref, t=request_type, p=text))
        except sa.exc.DBAPIError:
            self.stats.insert_errors += 1
            time.sleep(0.3)
            return None
        self.committed.add(rid)
        self.stats.inserted[kind] = self.stats.inserted.get(kind, 0) + 1
        return rid

    def _inject(self) -> None:
        """The stream of work: IMMEDIATE requests as fast as the back-pressure allows, and the
        other kinds on their own clocks (they are few, and malformed rows never execute)."""
        rng = random.Random(self.seed + 1)
        n = 0
        longs: list[str] = []
        kinds = list(checker.MALFORMED)
        start = time.monotonic()
        due = {"hist": 0.5, "flaky": 1.0, "solo": 1.5, "long": 2.0, "stop": 4.0, "malformed": 0.2}
        every = {"hist": 4.0, "flaky": 5.0, "solo": 6.0, "long": 5.0, "stop": 5.0, "malformed": 1.5}
        while not self._stop_inject.is_set():
            now = time.monotonic() - start
            for kind in [k for k, at in due.items() if now >= at]:
                due[kind] = now + every[kind] * rng.uniform(0.7, 1.3)
                if kind == "hist":
                    day = rng.randrange(1, 20)
                    self._insert("hist", "CH_HIST", s.HISTORY, {"start_date": f"2026-02-{day:02d}",
                                                                "end_date": f"2026-02-{day + 2:02d}",
                                                                "truncate_flag": "Y", "seconds": 0.05})
                elif kind == "flaky":
                    self._insert("flaky", "CH_FLAKY")
                elif kind == "solo":
                    self._insert("solo", "CH_SOLO", payload={"seconds": 0.2})
                elif kind == "long":
                    rid = self._insert("long", "CH_LONG", payload={"seconds": 2.5})
                    if rid:
                        longs.append(rid)
                elif kind == "stop" and longs:
                    target = longs.pop(rng.randrange(len(longs)))
                    self._insert("stop", "CH_LONG", s.STOP, {"request_id": target})
                elif kind == "malformed":
                    bad = kinds[self.stats.malformed_inserted % len(kinds)]
                    mapref, rtype, payload, _ = checker.MALFORMED[bad]
                    rid = f"bad-{bad}-{uuid.uuid4().hex[:8]}"
                    if self._insert("malformed", mapref, rtype, payload, request_id=rid):
                        self.stats.malformed_inserted += 1
            # Back-pressure on the main stream: keep the backlog bounded, so that the run tests
            # correctness rather than the host's speed (other work may share these 2 cores), and
            # the queue can drain within the settle deadline afterwards.
            backlog = self._db(lambda c: c.execute(sa.select(sa.func.count()).select_from(s.prcreq).where(
                s.prcreq.c.status == s.NEW)).scalar(), self.max_backlog)
            if backlog >= self.max_backlog:
                self.stats.injector_paused += 1
                self._stop_inject.wait(0.25)
                continue
            n += 1
            self._insert("rec", "CH_REC", payload={"seconds": round(rng.uniform(0, 0.3), 3), "param2": str(n)})
            self._stop_inject.wait(self.inject_every_s)

    # -- chaos -----------------------------------------------------------------------------
    def _plan(self) -> list[tuple[float, str]]:
        """(seconds into the run, action): kill -9 / SIGTERM, of the leader or of any replica."""
        lo, hi = self.action_every_s
        times, t = [], 3.0
        while True:
            t += self.rng.uniform(lo, hi)
            if t > self.duration_s - 3:
                break
            times.append(t)
        actions = ["kill_leader", "term_leader"]
        self.rng.shuffle(actions)
        actions += [self.rng.choice(["kill_leader", "kill_any", "kill_any", "term_leader", "term_any"])
                    for _ in range(max(0, len(times) - 2))]
        return list(zip(times, actions))

    def _act(self, action: str) -> None:
        running = [sl for sl in self.slots if sl.state == "running"]
        if len(running) < max(2, self.n_replicas - 1):
            self.stats.actions.append(f"{action}:skipped(only {len(running)} up)")
            return
        victim = None
        if action.endswith("leader"):
            leader = self.leader_name()
            victim = next((sl for sl in running if sl.replica.name == leader), None)
        if victim is None:
            victim = self.rng.choice(running)
        of_leader = victim.replica.name == self.leader_name()
        name = victim.replica.name
        if action.startswith("kill"):
            victim.replica.kill9()
            victim.replica.close()
            victim.state, victim.restart_at = "down", time.monotonic() + self.rng.uniform(0.5, 2.5)
            self.stats.kills += 1
            self.stats.kills_of_leader += of_leader
        else:
            victim.replica.signal(signal.SIGTERM)
            victim.state, victim.term_sent = "stopping", time.monotonic()
            self.stats.sigterms += 1
            self.stats.sigterms_of_leader += of_leader
        tag = f"{'kill9' if action.startswith('kill') else 'sigterm'}({name}{'*' if of_leader else ''})"
        self.stats.actions.append(tag)
        self.say(tag)

    def _maintain(self, restart: bool = True) -> None:
        now = time.monotonic()
        for sl in self.slots:
            if sl.state == "stopping":
                code = sl.replica.proc.poll()
                if code is not None:
                    self.stats.sigterm_exit_codes.append(code)
                    self.stats.sigterm_seconds.append(now - sl.term_sent)
                    if code == -signal.SIGTERM and " started: " not in sl.replica.log():
                        # Signalled while still importing, before `run` installed its handler: the
                        # default action ends it. It had not registered or claimed anything.
                        self.stats.sigterm_during_startup += 1
                    elif code != 0:
                        self.problems.append(f"{sl.replica.name} exited {code} after SIGTERM (SPEC: exit 0)")
                    sl.replica.close()
                    sl.state, sl.restart_at = "down", now + self.rng.uniform(0.5, 2.0)
                elif now - sl.term_sent > 45:
                    self.stats.sigterm_hung += 1
                    self.problems.append(f"{sl.replica.name} still running 45 s after SIGTERM (grace 2 s): killed")
                    sl.replica.kill9()
                    sl.replica.close()
                    sl.state, sl.restart_at = "down", now
            elif sl.state == "running" and sl.replica.proc.poll() is not None:
                code = sl.replica.proc.returncode
                if code == 1 and "dms-worker: database error" in sl.replica.log()[-2000:]:
                    # Started while PostgreSQL was away: `run` checks the schema once before its
                    # retrying loop and exits 1 (a supervisor restarts it). Noted, not a violation.
                    self.stats.startup_db_exits += 1
                    self.stats.actions.append(f"exit1-db-away({sl.replica.name})")
                else:
                    self.problems.append(f"{sl.replica.name} died on its own with exit code {code}")
                sl.replica.close()
                sl.state, sl.restart_at = "down", now
            if restart and sl.state == "down" and now >= sl.restart_at:
                self._start(sl)

    # -- phases ----------------------------------------------------------------------------
    def run(self) -> Outcome:
        t_start = time.monotonic()
        self.setup()
        for sl in self.slots:
            self._start(sl)
        deadline = time.monotonic() + 60
        while not (self._registered() >= self.n_replicas and self.leader_name()):
            if time.monotonic() > deadline:
                raise AssertionError("replicas did not register and elect a leader within 60 s:\n" + self.tails())
            self._maintain()
            time.sleep(0.2)
        self._t0 = time.monotonic()
        self.say(f"{self.n_replicas} replicas up, leader {self.leader_name()}; chaos for {self.duration_s:.0f} s "
                 f"(seed {self.seed})")
        injector = threading.Thread(target=self._inject, name="chaos-injector", daemon=True)
        injector.start()
        plan = self._plan()
        pg_restart_at = self.duration_s * self.rng.uniform(0.35, 0.55)
        try:
            while (elapsed := time.monotonic() - self._t0) < self.duration_s:
                if plan and elapsed >= plan[0][0]:
                    self._act(plan.pop(0)[1])
                if self.stats.pg_restarts == 0 and elapsed >= pg_restart_at:
                    self.say("restarting PostgreSQL (stop -m immediate, start)")
                    took = self.cluster.restart(immediate=True)
                    self.stats.pg_restarts += 1
                    self.stats.pg_restart_seconds.append(took)
                    self.stats.actions.append(f"pg_restart({took:.1f}s)")
                    self.say(f"PostgreSQL back after {took:.1f} s")
                self._maintain()
                self._up_samples += 1
                self._up_running += sum(sl.state == "running" for sl in self.slots)
                time.sleep(0.1)
            self.stats.up_fraction = self._up_running / max(1, self._up_samples * self.n_replicas)
        finally:
            self._stop_inject.set()
            injector.join(30)
        ticks_until = self._wind_down()
        stats = self.stats
        stats.leader_epoch = self._db(lambda c: c.execute(sa.select(s.leader.c.epoch)).scalar())
        result = checker.check(checker.load(self.engine), ticks_until=ticks_until, committed_ids=self.committed)
        self.engine.dispose()
        return Outcome(result, stats, time.monotonic() - t_start, self.log_dir, self.problems)

    def _registered(self) -> int:
        return self._db(lambda c: c.execute(sa.select(sa.func.count()).select_from(s.worker)).scalar(), 0)

    def _unsettled(self) -> int | None:
        def q(conn):
            busy = conn.execute(sa.select(sa.func.count()).select_from(s.prcreq).where(
                s.prcreq.c.status.in_((s.NEW, *s.RUNNING_STATUSES)))).scalar()
            ip = conn.execute(sa.select(sa.func.count()).select_from(s.prclog).where(
                s.prclog.c.status == s.IN_PROGRESS)).scalar()
            return busy + ip
        return self._db(q)

    def _wind_down(self) -> datetime | None:
        """Bring every slot up, stop the schedules, wait for the queue to drain, stop the replicas."""
        self.say("chaos over: restarting any stopped replica, disabling the schedules")
        deadline = time.monotonic() + 60
        while any(sl.state != "running" for sl in self.slots) and time.monotonic() < deadline:
            for sl in self.slots:
                if sl.state == "down":
                    sl.restart_at = 0.0
            self._maintain()
            time.sleep(0.2)
        # Let a leader catch up with the every-second schedule first (a leader killed in the
        # last seconds leaves a gap its successor fills): the contiguity check then covers the
        # whole run. If no leader catches up within 30 s, the checker reports the gap.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not self._db(lambda c: c.execute(sa.text(
                "SELECT max(r.scheduled_for) >= timezone('UTC', statement_timestamp()) - interval '2 seconds' "
                "FROM dms_prcreq r JOIN dms_jobsch j USING (jobschid) WHERE j.cronexp = :every"),
                {"every": checker.EVERY_SECOND}).scalar()):
            self._maintain()
            time.sleep(0.2)
        ticks_until = None
        for _ in range(50):
            ticks_until = self._db(lambda c: (c.execute(sa.update(s.jobsch).values(schflg="N")),
                                              c.execute(sa.select(sa.func.timezone(
                                                  "UTC", sa.func.statement_timestamp()))).scalar())[1])
            if ticks_until is not None:
                break
            time.sleep(0.2)
        # The leader rereads the schedules now; an occurrence up to a second past the switch may
        # still be enqueued, so the contiguity check only asks for those up to two seconds before.
        self._insert("refresh", "CH_TICK", s.REFRESH_SCHEDULE)
        t0 = time.monotonic()
        while True:
            left = self._unsettled()
            if left == 0:
                self.stats.settled = True
                break
            if time.monotonic() - t0 > self.settle_timeout_s:
                self.problems.append(f"queue did not settle within {self.settle_timeout_s:.0f} s "
                                     f"({left} rows NEW/CLAIMED/PROCESSING or IP)")
                break
            self._maintain()
            time.sleep(0.25)
        self.stats.settle_seconds = time.monotonic() - t0
        self.say(f"settled={self.stats.settled} after {self.stats.settle_seconds:.1f} s; stopping replicas")
        for sl in self.slots:
            if sl.state in ("running", "stopping") and sl.replica.proc.poll() is None:
                sl.replica.signal(signal.SIGTERM)
        for sl in self.slots:
            if sl.replica is None:
                continue
            try:
                code = sl.replica.proc.wait(45)
            except subprocess.TimeoutExpired:
                self.problems.append(f"{sl.replica.name} did not exit within 45 s of the final SIGTERM: killed")
                sl.replica.kill9()
                code = None
            self.stats.final_stop_exit_codes.append(code)
            if code not in (0, None):
                self.problems.append(f"{sl.replica.name} exited {code} after the final SIGTERM")
            sl.replica.close()
            sl.state = "down"
        return ticks_until - _seconds(2) if ticks_until is not None else None

    def kill_all(self) -> None:
        """Teardown after an error: leave no process behind."""
        self._stop_inject.set()
        for sl in self.slots:
            for rep in sl.history:
                if rep.proc is not None and rep.proc.poll() is None:
                    rep.proc.kill()
                    try:
                        rep.proc.wait(10)
                    except subprocess.TimeoutExpired:
                        pass
                rep.close()
        self.engine.dispose()

    def tails(self, chars: int = 2500) -> str:
        out = []
        for sl in self.slots:
            for rep in sl.history[-2:]:
                out.append(f"--- {rep.name} log (tail) ---\n{rep.log()[-chars:]}")
        return "\n".join(out)


def _seconds(n: float):
    from datetime import timedelta
    return timedelta(seconds=n)


def run_chaos(duration_s: float, *, replicas: int = 4, seed: int | None = None, log_dir: Path | None = None,
              settle_timeout_s: float = 60.0, verbose: bool = False, cluster: PrivateCluster | None = None,
              action_every_s: tuple[float, float] = (3.0, 6.0)) -> Outcome:
    """Create the private cluster (or take a started one), run, check, tear the cluster down."""
    if cluster is None:
        cluster = PrivateCluster()
        cluster.start()
    url = cluster.url
    log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="dms-chaos-logs-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    run = ChaosRun(url, cluster, log_dir, duration_s=duration_s, replicas=replicas, seed=seed,
                   settle_timeout_s=settle_timeout_s, verbose=verbose, action_every_s=action_every_s)
    try:
        outcome = run.run()
        if not outcome.ok:
            (log_dir / "server.log").write_text(cluster.server_log())
        return outcome
    finally:
        run.kill_all()
        cluster.stop()
