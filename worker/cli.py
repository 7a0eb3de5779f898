"""The ``dms-worker`` command (also ``python -m worker``): run, migrate, enqueue, stop, status,
job, demo and schedule preview. Parsing and printing only; the work is done elsewhere.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from typing import Any, Callable, Sequence

import sqlalchemy as sa

from . import __version__
from . import schema as s
from .config import Config, ConfigError

EXIT_USAGE = 2


def _config(args: argparse.Namespace, **overrides: Any) -> Config:
    return Config.from_env(dotenv_path=args.env_file, database_url=args.database_url, **overrides)


def _driver(cfg: Config):
    from .drivers import make_driver
    return make_driver(cfg.database_url, schema=cfg.schema)


def _require_schema(driver) -> None:
    from .migrate import pending
    missing = pending(driver)
    if missing:
        raise SystemExit(f"dms-worker: the database needs migrations ({', '.join(f'V{m.version:03d}' for m in missing)}):"
                         f" run `dms-worker migrate` (or `run --migrate`)")


# -- commands ------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    import os

    from . import logs
    os.umask(0o027)   # log files and the SQLite database: not world-readable or -writable
    from .service import SchedulerService
    cfg = _config(args, max_workers=args.max_workers, poll_interval=args.poll_interval,
                  log_level=args.log_level, log_file=args.log_file, log_json=args.log_json or None,
                  worker_name=args.name)
    logs.setup(cfg.log_level, cfg.log_file, cfg.log_json)
    from .drivers import make_driver
    try:
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
    says so) instead of exiting, which a supervisor would soon count as a failed start."""
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
    from .client import request_status
    deadline = time.monotonic() + timeout
    while True:
        row = request_status(driver.engine, request_id)
        if row is None or row["status"] in s.TERMINAL_STATUSES or time.monotonic() >= deadline:
            return row
        time.sleep(0.2)


def cmd_enqueue(args: argparse.Namespace) -> int:
    from .client import enqueue
    try:
        payload = json.loads(args.payload) if args.payload else {}
    except ValueError as exc:
        raise SystemExit(f"dms-worker: --payload is not valid JSON: {exc}")
    if not isinstance(payload, dict):
        raise SystemExit("dms-worker: --payload must be a JSON object")
    payload.update(_parse_params(args.param))
    request_type = args.type.upper()
    if args.start_date or args.end_date:
        request_type = s.HISTORY
        payload.update(start_date=args.start_date, end_date=args.end_date)
    driver = _driver(_config(args))
    _require_schema(driver)
    rid = enqueue(driver.engine, args.mapref, request_type=request_type, payload=payload, request_id=args.request_id)
    print(rid)
    if args.wait:
        row = _wait_terminal(driver, rid, args.wait)
        print(f"{row['status']} {row['result_payload'] or ''}".rstrip())
        return 0 if row["status"] == s.DONE else 1
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    from .client import request_stop
    if not args.request_id and not args.mapref:
        raise SystemExit("dms-worker: stop needs --request-id or --mapref")
    driver = _driver(_config(args))
    _require_schema(driver)
    try:
        rid = request_stop(driver.engine, request_id=args.request_id, mapref=args.mapref)
    except LookupError as exc:
        raise SystemExit(f"dms-worker: {exc}")
    print(rid)
    if args.wait:
        row = _wait_terminal(driver, rid, args.wait)
        print(f"{row['status']} {row['result_payload'] or ''}".rstrip())
        return 0 if row["status"] == s.DONE else 1
    return 0


def cmd_job(args: argparse.Namespace) -> int:
    from .client import register_job
    driver = _driver(_config(args))
    _require_schema(driver)
    register_job(driver.engine, args.mapref, args.handler, timeout_s=args.timeout, max_attempts=args.max_attempts,
                 retry_delay_s=args.retry_delay, allow_overlap=args.allow_overlap, enabled=not args.disabled,
                 description=args.description)
    print(f"job {args.mapref} -> {args.handler}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    cfg = _config(args)
    driver = _driver(cfg)
    _require_schema(driver)
    status = driver.cluster_status()
    status["database"] = cfg.safe_url
    if args.json:
        print(json.dumps(status, default=str, indent=2))
        return 0
    print(f"database: {cfg.safe_url}    database time (UTC): {status['now']:%Y-%m-%d %H:%M:%S}")
    lead = status["leader"]
    print("leader: " + (f"{lead['holder']} (epoch {lead['epoch']}, lease renewed until {lead['expires_in_s']:.1f}s from now)"
                        if lead else "none"))
    print(f"\nreplicas ({len(status['workers'])}):")
    for w in status["workers"]:
        role = "leader" if w["is_leader"] == "Y" else "follower"
        print(f"  {w['worker_id']:<40} host={w['host']} pid={w['pid']} {role:<8} "
              f"heartbeat {w['heartbeat_age_s']:.1f}s ago  running {w['running'] or 0}/{w['slots']}")
    print("\nqueue:")
    for q in sorted(status["queue"], key=lambda q: (q["status"], q["request_type"])):
        print(f"  {q['status']:<11} {q['request_type']:<17} {q['count']}")
    print(f"\nrunning executions ({len(status['running'])}):")
    for r in status["running"]:
        print(f"  prcid={r['prcid']} {r['mapref']} request={r['request_id']} on {r['worker_id']} for {r['age_s']:.1f}s")
    print(f"\nrecent failures ({len(status['recent_failures'])}):")
    for f in status["recent_failures"]:
        print(f"  {f['completed_at']} {f['mapref']} {f['request_type']} {f['request_id']}: {f['result_payload']}")
    return 0


def cmd_supervise(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .supervise import supervise, supervisorctl
    workdir = Path(args.workdir)
    if args.ctl:
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
def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--database-url", help="SQLAlchemy URL (default: DMS_DATABASE_URL, DB_* or the SQLite file)")
    common.add_argument("--env-file", default=".env", help="dotenv file to read (default: .env)")

    parser = argparse.ArgumentParser(prog="dms-worker", description="Database-centric scheduler and queue worker.")
    parser.add_argument("--version", action="version", version=f"dms-worker {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Callable[[argparse.Namespace], int], help_: str, **kw) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_, description=help_, **kw)
        p.set_defaults(func=func)
        return p

    p = add("run", cmd_run, "Run one replica in the foreground (for supervisord/systemd).")
    p.add_argument("--max-workers", type=int, help="concurrent executions (SCHEDULER_MAX_WORKERS)")
    p.add_argument("--poll-interval", type=float, help="seconds between polls (SCHEDULER_POLL_INTERVAL)")
    p.add_argument("--name", help="replica name prefix (default host:pid)")
    p.add_argument("--migrate", action="store_true", help="apply pending migrations first")
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING, ERROR (DMS_LOG_LEVEL)")
    p.add_argument("--log-file", help="write logs to this file, rotated by size (DMS_LOG_FILE)")
    p.add_argument("--log-json", action="store_true", help="JSON lines instead of text (DMS_LOG_JSON)")

    add("migrate", cmd_migrate, "Apply pending schema migrations (idempotent).")

    p = add("enqueue", cmd_enqueue, "Queue a request for a mapref.")
    p.add_argument("mapref")
    p.add_argument("--type", default=s.IMMEDIATE, help="IMMEDIATE (default), HISTORY, STOP, REFRESH_SCHEDULE")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="payload entry, e.g. param1=X")
    p.add_argument("--payload", help="payload as a JSON object")
    p.add_argument("--start-date", help="HISTORY: first day (ISO date)")
    p.add_argument("--end-date", help="HISTORY: last day (ISO date)")
    p.add_argument("--request-id", help="request id (default: a new UUID)")
    p.add_argument("--wait", type=float, metavar="SECONDS", help="wait for the outcome; exit 0 only if DONE")

    p = add("stop", cmd_stop, "Stop a request (cancel if queued, terminate if running) or a mapref's running execution.")
    p.add_argument("--request-id")
    p.add_argument("--mapref")
    p.add_argument("--wait", type=float, metavar="SECONDS", help="wait for the STOP to be applied")

    p = add("status", cmd_status, "The cluster as the database sees it: replicas, queue, running, failures.")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = add("job", cmd_job, "Create or update a DMS_JOB row.")
    p.add_argument("mapref")
    p.add_argument("handler", help="package.module:function or sql:PROCEDURE")
    p.add_argument("--timeout", type=int, help="timeout_s")
    p.add_argument("--max-attempts", type=int, default=1)
    p.add_argument("--retry-delay", type=int, default=60, help="retry_delay_s (doubles per attempt)")
    p.add_argument("--allow-overlap", action="store_true")
    p.add_argument("--disabled", action="store_true")
    p.add_argument("--description")

    p = add("supervise", cmd_supervise, "Run N local replicas under supervisord (one host), or control them.")
    p.add_argument("--replicas", type=int, default=3)
    p.add_argument("--workdir", default="dms-supervise", help="where the config, socket and logs go")
    p.add_argument("--base-port", type=int, default=9400, help="replica n serves metrics on base-port + n")
    p.add_argument("--daemon", action="store_true", help="return once supervisord runs in the background")
    p.add_argument("--ctl", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="run supervisorctl on that supervisord instead, e.g. --ctl status")

    p = add("demo", cmd_demo, "Show it working: migrate, start replicas, run requests, print the logs.")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--requests", type=int, default=30)

    p = add("doctor", cmd_doctor, "Check everything a replica needs from the configured database (connectivity, "
            "migrations, privileges, locks, wake-up, file roots); exit 1 if something required is missing.")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    sched = sub.add_parser("schedule", help="Schedule tools.", description="Schedule tools.")
    sched_sub = sched.add_subparsers(dest="schedule_command", required=True, metavar="COMMAND")
    p = sched_sub.add_parser("preview", help="Print upcoming occurrences of a schedule.",
                             description="Print upcoming occurrences of a schedule.")
    from .schedule import preview
    preview.add_arguments(p)
    p.set_defaults(func=cmd_schedule_preview)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"dms-worker: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except sa.exc.OperationalError as exc:
        # Unreachable database, wrong credentials: one line; URLs in it are already masked.
        print(f"dms-worker: database error: {' '.join(str(exc.orig or exc).split())[:300]}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
