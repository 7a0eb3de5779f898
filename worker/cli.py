"""The ``dms-worker`` command (also ``python -m worker``): run, migrate, enqueue, stop, status,
job, supervise, demo and schedule preview. Parsing and printing only; the work is done elsewhere.

Importing this module is cheap on purpose (the standard library only; SQLAlchemy and the rest
are imported by the commands): ``run`` installs its SIGTERM handler before anything slow
happens, so a replica stopped during start-up exits 0 like one stopped later.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from datetime import date, datetime, timezone
from typing import Any, Callable, Sequence

from . import __version__

EXIT_USAGE = 2
EXIT_SIGPIPE = 128 + 13      # what a shell reports for a process killed by SIGPIPE
REQUEST_TYPES = ("IMMEDIATE", "HISTORY", "STOP", "REFRESH_SCHEDULE")
REFRESH_MAPREF = "REFRESH_SCHEDULE"      # the mapref DMS_API.refresh_schedules uses too


class _Terminated(BaseException):
    """SIGTERM arrived before the replica installed its own (draining) handler."""


def _config(args: argparse.Namespace, *, warn: bool = True, **overrides: Any):
    from .config import Config
    cfg = Config.from_env(dotenv_path=args.env_file, database_url=args.database_url, **overrides)
    if warn:
        for line in cfg.unknown_variable_warnings():
            print(f"dms-worker: warning: {line}", file=sys.stderr)
    return cfg


def _driver(cfg):
    from .drivers import make_driver
    return make_driver(cfg.database_url, schema=cfg.schema)


def _require_schema(driver) -> None:
    from .migrate import pending
    missing = pending(driver)
    if missing:
        raise SystemExit(f"dms-worker: the database needs migrations ({', '.join(f'V{m.version:03d}' for m in missing)}):"
                         f" run `dms-worker migrate` (or `run --migrate`)")


def _utc(value: Any) -> Any:
    """Worker timestamps are naive UTC: say so wherever one is shown."""
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=timezone.utc)).isoformat()
    if isinstance(value, date):
        return value.isoformat()
    return str(value)


def _ts(value: datetime | None) -> str:
    return "-" if value is None else f"{value:%Y-%m-%d %H:%M:%S} UTC"


# -- commands ------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    import logging

    from . import logs
    from .config import ConfigError
    os.umask(0o027)   # log files and the SQLite database: not world-readable or -writable
    cfg = _config(args, warn=False, max_workers=args.max_workers, poll_interval=args.poll_interval,
                  log_level=args.log_level, log_file=args.log_file, log_json=args.log_json or None,
                  worker_name=args.name, metrics_port=args.metrics_port, metrics_addr=args.metrics_addr)
    try:
        logs.setup(cfg.log_level, cfg.log_file, cfg.log_json)
    except OSError as exc:
        where = os.path.dirname(os.path.abspath(cfg.log_file))
        hint = f"; directory {where} does not exist" if not os.path.isdir(where) else ""
        raise ConfigError(f"DMS_LOG_FILE={cfg.log_file!r}: cannot open the log file ({exc.strerror}){hint}") from None
    try:
        for line in cfg.unknown_variable_warnings():
            logging.getLogger("worker.cli").warning("%s", line)
        from .drivers import make_driver
        from .service import SchedulerService
        # Migrations take as long as they take; then every statement of the replica's own is
        # bounded (it must never wait past its fence).
        setup = _driver(cfg)
        _wait_for_database(setup, lambda: _prepare(setup, args.migrate))
        setup.dispose()
        driver = make_driver(cfg.database_url, schema=cfg.schema, statement_timeout_s=cfg.statement_timeout_s)
        return SchedulerService(cfg, driver).run()
    finally:
        logs.close()      # deliver the last records (the exit's own) before the process ends


def _prepare(driver, migrate_first: bool) -> None:
    if migrate_first:
        from .migrate import migrate
        migrate(driver)
    _require_schema(driver)


def _wait_for_database(driver, step) -> None:
    """Run ``step`` once the database answers: a replica started during an outage waits (and
    says so) instead of exiting, which a supervisor would soon count as a failed start. A
    refusal that waiting cannot fix (wrong password, unknown database: not ``is_transient``)
    is raised at once, so the command says it once and exits non-zero."""
    import logging

    import tenacity

    log = logging.getLogger("worker.cli")

    def waiting(state: tenacity.RetryCallState) -> None:
        log.warning("database unreachable (%s); retrying in %.0f s",
                    " ".join(str(state.outcome.exception()).split())[:200], state.next_action.sleep)

    tenacity.Retrying(retry=tenacity.retry_if_exception(driver.is_transient), reraise=True,
                      wait=tenacity.wait_exponential(multiplier=0.5, max=10), before_sleep=waiting)(step)


def cmd_migrate(args: argparse.Namespace) -> int:
    from .migrate import migrate
    cfg = _config(args)
    applied = migrate(_driver(cfg))
    print(f"{cfg.safe_url}: " + (", ".join(f"applied V{m.version:03d} {m.description}" for m in applied)
                                 or "schema up to date"))
    return 0


def _parse_params(pairs: Sequence[str]) -> dict[str, str]:
    params = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"dms-worker: --param expects NAME=VALUE, got {pair!r}")
        params[key] = value
    return params


def _wait_terminal(driver, request_id: str, timeout: float) -> dict[str, Any] | None:
    from . import schema as s
    from .client import request_status
    deadline = time.monotonic() + timeout
    while True:
        row = request_status(driver.engine, request_id)
        if row is None or row["status"] in s.TERMINAL_STATUSES or time.monotonic() >= deadline:
            return row
        time.sleep(0.2)


def cmd_enqueue(args: argparse.Namespace) -> int:
    from . import schema as s
    from .client import enqueue
    try:
        payload = json.loads(args.payload) if args.payload else {}
    except ValueError as exc:
        raise SystemExit(f"dms-worker: --payload is not valid JSON: {exc}")
    if not isinstance(payload, dict):
        raise SystemExit("dms-worker: --payload must be a JSON object")
    payload.update(_parse_params(args.param))
    request_type = args.type
    if args.start_date or args.end_date:
        request_type = s.HISTORY
        payload.update(start_date=args.start_date, end_date=args.end_date)
    mapref = args.mapref
    if mapref is None:
        if request_type != s.REFRESH_SCHEDULE:
            raise SystemExit(f"dms-worker: enqueue needs a MAPREF (the job to run) for --type {request_type}")
        mapref = REFRESH_MAPREF
    driver = _driver(_config(args))
    _require_schema(driver)
    rid = enqueue(driver.engine, mapref, request_type=request_type, payload=payload, request_id=args.request_id)
    print(rid, flush=True)     # at once: a reader (`| head -1`) need not wait for --wait
    if args.wait:
        row = _wait_terminal(driver, rid, args.wait)
        print(f"{row['status']} {row['result_payload'] or ''}".rstrip())
        return 0 if row["status"] == s.DONE else 1
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    """Queue a STOP only when there is something to stop, and say what will happen to what."""
    import sqlalchemy as sa

    from . import schema as s
    from .client import request_stop
    if not args.request_id and not args.mapref:
        raise SystemExit("dms-worker: stop needs --request-id or --mapref")
    driver = _driver(_config(args))
    _require_schema(driver)
    c = s.prcreq.c
    with driver.engine.connect() as conn:
        if args.request_id:
            target = conn.execute(sa.select(c.status, c.mapref, c.request_type, c.claimed_by)
                                  .where(c.request_id == args.request_id)).first()
            if target is None:
                return _nothing_to_stop(f"there is no request {args.request_id!r}")
            if target.status in s.TERMINAL_STATUSES:
                return _nothing_to_stop(f"request {args.request_id} already ended {target.status}")
            if target.request_type in s.CONTROL_TYPES:
                return _nothing_to_stop(f"request {args.request_id} is a {target.request_type} request, not a job")
            what = (f"request {args.request_id} ({target.mapref}) is NEW: it will be cancelled before it runs"
                    if target.status == s.NEW else
                    f"request {args.request_id} ({target.mapref}) is {target.status} on {target.claimed_by}:"
                    f" it will be stopped")
        else:
            running = conn.execute(sa.select(sa.func.count()).where(
                c.mapref == args.mapref, c.status.in_(s.RUNNING_STATUSES),
                c.request_type.notin_(s.CONTROL_TYPES))).scalar_one()
            if not running:
                queued = conn.execute(sa.select(sa.func.count()).where(
                    c.mapref == args.mapref, c.status == s.NEW, c.request_type.notin_(s.CONTROL_TYPES))).scalar_one()
                return _nothing_to_stop(f"no execution of {args.mapref!r} is running"
                                        + (f" ({queued} NEW request(s) of it wait; stop one with --request-id)"
                                           if queued else ""))
            what = f"{running} running execution(s) of {args.mapref} will be stopped"
    try:
        rid = request_stop(driver.engine, request_id=args.request_id, mapref=args.mapref)
    except LookupError as exc:
        raise SystemExit(f"dms-worker: {exc}")
    print(f"STOP request {rid} queued: {what}", flush=True)
    if not args.wait:
        return 0
    deadline = time.monotonic() + args.wait
    row = _wait_terminal(driver, rid, args.wait)
    if row is None or row["status"] not in s.TERMINAL_STATUSES:
        print(f"STOP request {rid} not applied within {args.wait:g}s (is any replica running?)")
        return 1
    result = json.loads(row["result_payload"] or "{}")
    if row["status"] != s.DONE:
        print(f"STOP request {rid} {row['status']}: {result.get('error', row['result_payload'])}")
        return 1
    targets = list(result.get("cancelled", [])) + list(result.get("stopping", []))
    late = False
    for target_id in targets:
        end = _wait_terminal(driver, target_id, max(0.0, deadline - time.monotonic()))
        status = end["status"] if end else "gone"
        late = late or status not in (*s.TERMINAL_STATUSES, "gone")
        print(f"request {target_id}: {status}")
    return 1 if late or not targets else 0


def _nothing_to_stop(why: str) -> int:
    print(f"dms-worker: nothing to stop: {why}", file=sys.stderr)
    return 1


def cmd_job(args: argparse.Namespace) -> int:
    from .client import register_job
    driver = _driver(_config(args))
    _require_schema(driver)
    register_job(driver.engine, args.mapref, args.handler, timeout_s=args.timeout, max_attempts=args.max_attempts,
                 retry_delay_s=args.retry_delay, allow_overlap=args.allow_overlap, enabled=not args.disabled,
                 description=args.description)
    print(f"job {args.mapref} -> {args.handler}")
    return 0


WAIT_EXPLAINED = {
    "control": "control requests (STOP, REFRESH_SCHEDULE) not yet taken",
    "not_due": "not due yet (a retry delay or a future not_before)",
    "no_job": "no DMS_JOB row for their mapref: they will fail when claimed",
    "disabled": "their job is disabled (DMS_JOB.enabled = 'N'): they will fail when claimed",
    "paused": "their job is paused (DMS_JOB.paused = 'Y'): they wait until it is resumed",
    "mapref_busy": "held back: an execution of the same job runs and the job does not allow overlap",
    "ready": "ready: waiting for a free execution slot",
}


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _config(args)
    driver = _driver(cfg)
    _require_schema(driver)
    mode = cfg.leader_mode if cfg.leader_mode != "auto" else driver.default_leader_mode
    status = driver.cluster_status(rescue_after_s=cfg.rescue_after, leader_mode=mode)
    status["database"] = cfg.safe_url
    if args.json:
        print(json.dumps(status, default=_utc, indent=2))
        return 0
    print(f"database: {cfg.safe_url}    database time: {_ts(status['now'])}")
    mode_text = {"lock": "session lock + lease row", "lease": "lease row"}.get(status["leader_mode"],
                                                                           status["leader_mode"])
    lead, last = status["leader"], status["last_leader"]
    if lead:
        dead = "" if lead["holder_alive"] else "; its replica is dead: a follower takes over when the lease expires"
        print(f"leader: {lead['holder']} (mode {status['leader_mode']}: {mode_text}; epoch {lead['epoch']};"
              f" lease valid {lead['expires_in_s']:.1f}s more{dead})")
    elif last:
        print(f"leader: NONE (mode {status['leader_mode']}: {mode_text}; the lease of {last['holder']}, epoch"
              f" {last['epoch']}, expired {-last['expires_in_s']:.1f}s ago: schedules are not enqueued)")
    else:
        print(f"leader: NONE (mode {status['leader_mode']}: {mode_text}; no replica leads)")
    workers = status["workers"]
    alive = sum(1 for w in workers if w["alive"])
    print(f"\nreplicas ({alive} alive, {len(workers) - alive} dead):")
    for w in workers:
        if w["alive"]:
            role = "leader" if lead and lead["holder"] == w["worker_id"] else "follower"
            state = f"{role:<8} heartbeat {w['heartbeat_age_s']:.1f}s ago  running {w['running'] or 0}/{w['slots']}"
        else:
            state = (f"DEAD     heartbeat {w['heartbeat_age_s']:.1f}s ago (dead for {w['dead_for_s']:.1f}s;"
                     f" the next rescue removes it)")
        print(f"  {w['worker_id']:<40} host={w['host']} pid={w['pid']} {state}")
    print("\nqueue:")
    for q in sorted(status["queue"], key=lambda q: (q["status"], q["request_type"])):
        print(f"  {q['status']:<11} {q['request_type']:<17} {q['count']}")
    waiting: dict[str, list[tuple[str, int]]] = {}
    for wt in status["waiting"]:
        waiting.setdefault(wt["reason"], []).append((wt["mapref"], wt["count"]))
    if waiting:
        print("\nwhy NEW requests wait:")
        for reason in driver.WAIT_REASONS:
            if reason in waiting:
                items = sorted(waiting[reason], key=lambda x: -x[1])
                maprefs = ", ".join(f"{m} {n}" for m, n in items[:5]) + (", ..." if len(items) > 5 else "")
                print(f"  {sum(n for _, n in items):>6}  {WAIT_EXPLAINED.get(reason, reason)}  [{maprefs}]")
        if not alive:
            print("          no replica is alive: nothing claims them")
    print(f"\nrunning executions ({len(status['running'])}):")
    for r in status["running"]:
        orphan = "  ORPHANED: its replica is dead; the rescue closes it" if r["orphaned"] else ""
        print(f"  prcid={r['prcid']} {r['mapref']} request={r['request_id']} on {r['worker_id']}"
              f" since {_ts(r['strtdt'])} ({r['age_s']:.1f}s){orphan}")
    if status["invalid_schedules"]:
        print(f"\ninvalid schedules, skipped by the leader ({len(status['invalid_schedules'])}):")
        for sch in status["invalid_schedules"]:
            print(f"  jobschid={sch['jobschid']} {sch['mapref']}: {sch['invalid_reason']}")
    print(f"\nrecent failures ({len(status['recent_failures'])}):")
    for f in status["recent_failures"]:
        print(f"  {_ts(f['completed_at'])} {f['mapref']} {f['request_type']} {f['request_id']}: {f['result_payload']}")
    return 0


def cmd_supervise(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .supervise import supervise, supervisorctl
    workdir = Path(args.workdir)
    if args.ctl is not None:
        return supervisorctl(workdir, *args.ctl)
    cfg = _config(args)
    _require_schema(_driver(cfg))
    return supervise(args.replicas, workdir, cfg.database_url, foreground=not args.daemon, base_port=args.base_port)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    return run_demo(_config(args), replicas=args.replicas, requests=args.requests)


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import main as doctor
    return doctor(_config(args), as_json=args.json)


def cmd_schedule_preview(args: argparse.Namespace) -> int:
    from .schedule import preview
    return preview.run(args, now=datetime.now(timezone.utc))


# -- parser --------------------------------------------------------------------------------------
class _HelpFormatter(argparse.HelpFormatter):
    """Shows an option's default when it has a meaningful one and its help does not say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (action.option_strings and "default" not in text.lower() and default not in (None, False, [])
                and default is not argparse.SUPPRESS):
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--database-url", help="SQLAlchemy URL (default: DMS_DATABASE_URL, DB_* or the SQLite file)")
    common.add_argument("--env-file", default=".env", help="dotenv file to read")

    parser = argparse.ArgumentParser(prog="dms-worker", description="Database-centric scheduler and queue worker.",
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"dms-worker {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help_: str, **kw) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_, description=help_, formatter_class=_HelpFormatter,
                           **kw)
        p.set_defaults(func=func)
        return p

    p = add("run", cmd_run, "Run one replica in the foreground (for supervisord/systemd).")
    p.add_argument("--max-workers", type=int, help="concurrent executions (SCHEDULER_MAX_WORKERS, default 4)")
    p.add_argument("--poll-interval", type=float, help="seconds between polls (SCHEDULER_POLL_INTERVAL, default 15)")
    p.add_argument("--metrics-port", type=int,
                   help="port of /metrics, /healthz, /readyz; 0 turns them off (DMS_METRICS_PORT, default 9410)")
    p.add_argument("--metrics-addr", help="address they listen on (DMS_METRICS_ADDR, default 127.0.0.1)")
    p.add_argument("--name", help="replica name prefix (DMS_WORKER_NAME, default host:pid)")
    p.add_argument("--migrate", action="store_true", help="apply pending migrations first")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR (DMS_LOG_LEVEL, default INFO)")
    p.add_argument("--log-file", help="write logs to this file, rotated by size (DMS_LOG_FILE, default stderr)")
    p.add_argument("--log-json", action="store_true", help="JSON lines instead of text (DMS_LOG_JSON)")

    add("migrate", cmd_migrate, "Apply pending schema migrations (idempotent).")

    p = add("enqueue", cmd_enqueue, "Queue a request for a mapref.")
    p.add_argument("mapref", nargs="?", metavar="MAPREF",
                   help="the job (DMS_JOB.mapref) to run; not needed with --type REFRESH_SCHEDULE")
    p.add_argument("--type", default="IMMEDIATE", type=str.upper, choices=REQUEST_TYPES,
                   help="request type")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="payload entry, e.g. param1=X (repeatable)")
    p.add_argument("--payload", help="payload as a JSON object")
    p.add_argument("--start-date", help="HISTORY: first day (ISO date)")
    p.add_argument("--end-date", help="HISTORY: last day (ISO date)")
    p.add_argument("--request-id", help="request id (default: a new UUID)")
    p.add_argument("--wait", type=float, metavar="SECONDS", help="wait for the outcome; exit 0 only if DONE")

    p = add("stop", cmd_stop, "Stop a request (cancel if queued, terminate if running) or a mapref's running "
                              "executions. Exits 1 when there is nothing to stop.")
    p.add_argument("--request-id", help="the request to stop")
    p.add_argument("--mapref", help="stop every running execution of this job")
    p.add_argument("--wait", type=float, metavar="SECONDS",
                   help="wait for the STOP to be applied and its targets to end; exit 0 only if they did")

    p = add("status", cmd_status, "The cluster as the database sees it: leader, replicas (alive or dead), queue and"
                                  " why requests wait, running executions, invalid schedules, failures.")
    p.add_argument("--json", action="store_true", help="machine-readable output (times ISO 8601 with offset)")

    p = add("job", cmd_job, "Create or update a DMS_JOB row.")
    p.add_argument("mapref", help="the job's name (DMS_JOB.mapref), what requests and schedules refer to")
    p.add_argument("handler", help="package.module:function or sql:PROCEDURE")
    p.add_argument("--timeout", type=int, help="timeout_s: seconds before an execution is stopped (default: none)")
    p.add_argument("--max-attempts", type=int, default=1, help="attempts before the request ends FAILED")
    p.add_argument("--retry-delay", type=int, default=60, help="retry_delay_s, seconds (doubles per attempt)")
    p.add_argument("--allow-overlap", action="store_true",
                   help="let executions of this job run at the same time (default: one at a time)")
    p.add_argument("--disabled", action="store_true", help="register it disabled: its requests fail")
    p.add_argument("--description", help="free text")

    p = add("supervise", cmd_supervise, "Run N local replicas under supervisord (one host), or control them.")
    p.add_argument("--replicas", type=int, default=3, help="number of replica processes")
    p.add_argument("--workdir", default="dms-supervise",
                   help="where the config, socket and logs go (the same one for --ctl)")
    p.add_argument("--base-port", type=int, default=9400, help="replica n serves metrics on base-port + n")
    p.add_argument("--daemon", action="store_true", help="return once supervisord runs in the background")
    p.add_argument("--ctl", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="run supervisorctl on that supervisord instead, e.g. --ctl status")

    p = add("demo", cmd_demo, "Show it working: migrate, start replicas, run requests, print the logs.")
    p.add_argument("--replicas", type=int, default=2, help="replica processes to start")
    p.add_argument("--requests", type=int, default=30,
                   help="demo requests to enqueue (some deliberately bad), besides the CSV jobs")

    p = add("doctor", cmd_doctor, "Check everything a replica needs from the configured database (connectivity, "
            "migrations, privileges, locks, wake-up, file roots); exit 1 if something required is missing.")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    sched = sub.add_parser("schedule", help="Schedule tools.", description="Schedule tools.",
                           formatter_class=_HelpFormatter)
    sched_sub = sched.add_subparsers(dest="schedule_command", required=True, metavar="COMMAND",
                                     help="preview: upcoming occurrences of a schedule")
    p = sched_sub.add_parser("preview", help="Print upcoming occurrences of a schedule.",
                             description="Print upcoming occurrences of a schedule.", formatter_class=_HelpFormatter)
    from .schedule import preview
    preview.add_arguments(p)
    p.set_defaults(func=cmd_schedule_preview)
    return parser


def _on_sigterm_before_start(_signum, _frame) -> None:
    raise _Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `run` must exit 0 on SIGTERM whenever it comes (a supervisor stopping a replica that is
    # still starting, or waiting for the database): take the signal before anything slow.
    # The replica replaces this handler with its draining one once it runs.
    previous = None
    if argv[:1] == ["run"] and threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm_before_start)
    try:
        return _main(argv)
    except _Terminated:
        print("dms-worker: SIGTERM during start-up: exiting before the replica started", file=sys.stderr)
        return 0
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    import sqlalchemy as sa

    from .config import ConfigError
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"dms-worker: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`| head -1`): stop quietly, as a tool killed by SIGPIPE would.
        # Point stdout at /dev/null so that the interpreter's final flush does not complain.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_SIGPIPE
    except sa.exc.OperationalError as exc:
        # Unreachable database, wrong credentials, unknown database: one line; the driver's
        # message names host and database, never the password.
        print(f"dms-worker: database error: {' '.join(str(exc.orig or exc).split())[:300]}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
