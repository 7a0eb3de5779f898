"""The ``dms-worker`` command (also ``python -m worker``): run, migrate, enqueue, stop, status,
job, requests, console, supervise, demo and schedule preview/list/enable/disable. Parsing and printing only; the work is done elsewhere.

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
from collections.abc import Callable, Sequence
from datetime import date, datetime, timezone
from typing import Any

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
        # tenacity calls before_sleep after a failed attempt (outcome) and once it chose the sleep (next_action).
        assert state.outcome is not None and state.next_action is not None
        log.warning("database unreachable (%s); retrying in %.0f s",
                    " ".join(str(state.outcome.exception()).split())[:200], state.next_action.sleep)

    from .retry import db_retrying
    db_retrying(driver.is_transient, before_sleep=waiting)(step)


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
        raise SystemExit(f"dms-worker: --payload is not valid JSON: {exc}") from None
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
    from .client import DuplicateRequest
    try:
        rid = enqueue(driver.engine, mapref, request_type=request_type, payload=payload,
                      request_id=args.request_id, priority=args.priority, unique_key=args.unique_key,
                      on_duplicate="refuse" if args.refuse_duplicate else "merge")
    except (DuplicateRequest, ValueError) as exc:
        raise SystemExit(f"dms-worker: {exc}") from None
    print(rid, flush=True)     # at once: a reader (`| head -1`) need not wait for --wait
    if args.wait:
        row = _wait_terminal(driver, rid, args.wait)
        if row is None:    # pruned or deleted by a DBA while we waited: say so, do not guess
            print(f"dms-worker: request {rid} is gone (deleted while waiting)", file=sys.stderr)
            return 1
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
        raise SystemExit(f"dms-worker: {exc}") from None
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


# -- job, requests, schedule list/enable/disable, console: the operator's commands ------------------
# Each is a thin shell over worker.client (actions) or worker.console.data (reads): the web
# console calls the same functions, so both leave and show the same rows.
def _operator_driver(args: argparse.Namespace):
    driver = _driver(_config(args))
    _require_schema(driver)
    return driver


def _act(action: Callable[[], Any]) -> Any:
    """Run a client action; a refused one or a missing row is one line on stderr and exit 1."""
    from .client import ActionRefused
    try:
        return action()
    except (ActionRefused, LookupError, ValueError) as exc:
        raise SystemExit(f"dms-worker: {exc.args[0] if exc.args else exc}") from None


def cmd_job(args: argparse.Namespace) -> int:
    """Create a job, or change only the fields given."""
    from .client import UNSET, handler_problem, update_job
    fields: dict[str, Any] = {}
    if args.handler is not None:
        fields["handler"] = args.handler
    if args.no_timeout:
        fields["timeout_s"] = None
    elif args.timeout is not None:
        fields["timeout_s"] = args.timeout
    for name in ("max_attempts", "retry_delay", "allow_overlap", "enabled", "description"):
        value = getattr(args, name)
        if value is not None:
            fields["retry_delay_s" if name == "retry_delay" else name] = value
    if args.params is not None:
        try:
            params = json.loads(args.params)
        except ValueError as exc:
            raise SystemExit(f"dms-worker: --params is not valid JSON: {exc}") from None
        if params is not None and not isinstance(params, dict):
            raise SystemExit("dms-worker: --params must be a JSON object (or null to clear)")
        fields["params"] = params
    import sqlalchemy as sa

    from . import schema as s
    driver = _operator_driver(args)
    created = _act(lambda: update_job(driver.engine, args.mapref, **fields))
    with driver.engine.connect() as conn:
        handler = conn.execute(sa.select(s.job.c.handler).where(s.job.c.mapref == args.mapref)).scalar_one()
    shown = ", ".join(f"{k}={v!r}" for k, v in fields.items() if v is not UNSET) or "nothing to change"
    print(f"job {args.mapref} {'created' if created else 'updated'}: {shown}")
    problem = handler_problem(handler)
    if problem:
        print(f"warning: handler {handler} cannot be imported here ({problem}); requests for {args.mapref} "
              "will fail unless the replicas can import it (install the module, or set PYTHONPATH)",
              file=sys.stderr)
    return 0


def cmd_job_pause(args: argparse.Namespace) -> int:
    from .client import pause_job
    driver = _operator_driver(args)
    _act(lambda: pause_job(driver.engine, args.mapref))
    print(f"job {args.mapref} paused: its requests wait NEW until `dms-worker job resume {args.mapref}`")
    return 0


def cmd_job_resume(args: argparse.Namespace) -> int:
    from .client import resume_job
    driver = _operator_driver(args)
    _act(lambda: resume_job(driver.engine, args.mapref))
    print(f"job {args.mapref} resumed")
    return 0


def _when(value: Any) -> str:
    if value is None:
        return "-"
    return value.isoformat(sep=" ", timespec="seconds") if value.tzinfo else f"{value:%Y-%m-%d %H:%M:%S}Z"


def cmd_requests_list(args: argparse.Namespace) -> int:
    from .console import data
    try:
        f = data.RequestFilter.parse(vars(args))
        driver = _operator_driver(args)
        with driver.engine.connect() as conn:
            page = data.request_page(conn, f, limit=args.limit, cursor=args.cursor)
    except data.BadFilter as exc:
        print(f"dms-worker: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.json:
        print(json.dumps(data.jsonable(page), indent=2))
        return 0
    print(f"{'request':<38} {'mapref':<24} {'type':<10} {'status':<16} {'prio':>4} {'att':>3}  requested (UTC)")
    for r in page["requests"]:
        status = r["status"] + (" (paused)" if r["paused"] else "")
        print(f"{r['request_id']:<38} {r['mapref']:<24} {r['request_type']:<10} {status:<16} {r['priority']:>4} "
              f"{r['attempts']:>3}  {_when(r['requested_at'])}")
    if not page["requests"]:
        print("(no request matches)")
    if page["next_cursor"]:
        print(f"more: --cursor '{page['next_cursor']}'")
    return 0


def cmd_requests_show(args: argparse.Namespace) -> int:
    from .console import data
    driver = _operator_driver(args)
    with driver.engine.connect() as conn:
        detail = data.request_detail(conn, args.request_id)
    if detail is None:
        raise SystemExit(f"dms-worker: no request {args.request_id!r}")
    r = detail["request"]
    if args.json:
        out = dict(detail, request={k: v for k, v in r.items() if k not in ("payload_value", "result_value")})
        print(json.dumps(data.jsonable(out), indent=2))
        return 0
    for key in ("request_id", "mapref", "request_type", "status", "priority", "unique_key", "attempts",
                "requested_at", "not_before", "claimed_at", "claimed_by", "completed_at", "jobschid", "scheduled_for"):
        value = r[key]
        print(f"{key:<14} {_when(value) if hasattr(value, 'isoformat') else ('-' if value is None else value)}")
    if detail["waiting"]:
        print(f"{'waiting':<14} {detail['waiting']}")
    print(f"{'payload':<14} {r['payload'] or '-'}")
    print(f"{'result':<14} {r['result_payload'] or '-'}")
    print(f"\nexecutions ({len(detail['executions'])}):")
    for e in detail["executions"]:
        counts = e["counts"] or {}
        print(f"  prcid={e['prcid']} {e['status']} attempt {e['attempt']} {_when(e['strtdt'])} -> {_when(e['enddt'])}"
              f" on {e['worker_id']}" + (f" param1={e['param1']}" if e["param1"] else "")
              + (" rows " + " ".join(f"{k}={'-' if counts[v] is None else counts[v]}" for k, v in
                                     (("src", "srcrows"), ("trg", "trgrows"), ("err", "errrows")))
                 if any(v is not None for v in counts.values()) else ""))
        if e["msg"]:
            print(f"    {e['msg']}")
        for x in e["errors"]:
            print(f"    {x['errtyp']} {x['keyvalue'] or ''}: {x['errmsg'] or ''} {x['dberrmsg'] or ''}".rstrip())
        if e["errors_total"] > len(e["errors"]):
            print(f"    ... {e['errors_total'] - len(e['errors'])} more rows in DMS_JOBERR")
    return 0


def _by() -> str:
    import getpass
    import socket
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no login name in a container: the host says enough
        user = "?"
    return f"cli {user}@{socket.gethostname()}"


def cmd_requests_retry(args: argparse.Namespace) -> int:
    from .client import retry
    driver = _operator_driver(args)
    _act(lambda: retry(driver.engine, args.request_id, by=_by()))
    print(f"request {args.request_id} retried: back to NEW with its attempts reset")
    return 0


def cmd_requests_cancel(args: argparse.Namespace) -> int:
    from .client import cancel
    driver = _operator_driver(args)
    _act(lambda: cancel(driver.engine, args.request_id, by=_by()))
    print(f"request {args.request_id} cancelled")
    return 0


def cmd_requests_stop(args: argparse.Namespace) -> int:
    from .client import stop
    driver = _operator_driver(args)
    stop_id = _act(lambda: stop(driver.engine, args.request_id))
    print(f"stop of {args.request_id} requested (STOP request {stop_id})")
    return 0


def cmd_schedule_list(args: argparse.Namespace) -> int:
    from .console import data
    cfg = _config(args)
    driver = _driver(cfg)
    _require_schema(driver)
    with driver.engine.connect() as conn:
        rows = data.schedules(conn, cfg.timezone, upcoming=args.count)
    if args.json:
        print(json.dumps(data.jsonable({"timezone": cfg.timezone, "schedules": rows}), indent=2))
        return 0
    print(f"schedules (current versions; times in {cfg.timezone}):")
    for sc in rows:
        state = "enabled" if sc["enabled"] else "disabled"
        print(f"\n  {sc['jobschid']}  {sc['mapref']}  [{state}, misfire {sc['misfire']}]")
        print(f"      {sc['words'] or sc['frqcd']}")
        if sc["invalid"]:
            print(f"      SKIPPED: {sc['invalid']}")
        print(f"      last run: {_when(sc['lst_run_local'])}")
        if sc["next"]:
            print("      next: " + ", ".join(_when(t) for t in sc["next"]))
    if not rows:
        print("  (none: DMS_JOBSCH has no row with curflg = 'Y')")
    return 0


def _schedule_enabled(args: argparse.Namespace, enabled: bool) -> int:
    from .client import set_schedule_enabled
    driver = _operator_driver(args)
    _act(lambda: set_schedule_enabled(driver.engine, args.jobschid, enabled))
    print(f"schedule {args.jobschid} {'enabled' if enabled else 'disabled'}; the leader rereads schedules now")
    return 0


def cmd_schedule_enable(args: argparse.Namespace) -> int:
    return _schedule_enabled(args, True)


def cmd_schedule_disable(args: argparse.Namespace) -> int:
    return _schedule_enabled(args, False)


def cmd_console(args: argparse.Namespace) -> int:
    import os

    from dotenv import dotenv_values

    from .console import AuthConfigError, ConsoleAuth, check_bind, create_app, hash_password, serve
    if args.hash_password:
        import getpass
        password = getpass.getpass("password: ") if sys.stdin.isatty() else sys.stdin.readline().rstrip("\n")
        try:
            print(hash_password(password))
        except AuthConfigError as exc:
            raise SystemExit(f"dms-worker: {exc}") from None
        return 0
    cfg = _config(args)
    env = {k: v for k, v in (dotenv_values(args.env_file) if args.env_file and os.path.isfile(args.env_file)
                             else {}).items() if v is not None}
    env.update(os.environ)
    try:
        auth = ConsoleAuth.from_env(env)
        check_bind(args.host, auth)
    except AuthConfigError as exc:
        raise SystemExit(f"dms-worker: {exc}") from None
    if not auth.configured:
        auth.anonymous_role = "operator"     # loopback only (checked above): like a shell on the host
    _require_schema(_driver(cfg))
    app = create_app(cfg.database_url, auth=auth, timezone_name=cfg.timezone, schema=cfg.schema,
                     prefix=args.prefix, secret_key=env.get("DMS_CONSOLE_SECRET_KEY") or None,
                     secure_cookie=env.get("DMS_CONSOLE_SECURE_COOKIE", "").lower() in ("1", "true", "yes", "on"))
    return serve(app, args.host, args.port)


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
    from .schedule.calculus import flag_problem
    for sch in status["invalid_schedules"]:
        # Flags the CHECKs refuse: the leader cannot write its reason on such a row (the CHECK
        # refuses the UPDATE), so the same words it logs are given here.
        problem = flag_problem(sch.pop("schflg"), sch.pop("curflg"))
        if problem is not None:
            sch["invalid_reason"] = str(problem)
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
    p.add_argument("--priority", type=int, help="higher is claimed first (default 0)")
    p.add_argument("--unique-key", help="at most one waiting or running request per key: a second one is merged "
                                        "(its id printed) unless --refuse-duplicate")
    p.add_argument("--refuse-duplicate", action="store_true", help="with --unique-key: fail instead of merging")
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

    _add_job_parsers(sub, common)
    _add_requests_parsers(sub, common)
    p = add("console", cmd_console, "Serve the web console (loopback by default; docs/console.md).")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; any other needs DMS_CONSOLE_TOKEN or "
                        "DMS_CONSOLE_USERS_FILE)")
    p.add_argument("--port", type=int, default=9480, help="port (default 9480; 0 picks a free one and prints it)")
    p.add_argument("--prefix", default="", help="URL prefix, e.g. /dms (default: none)")
    p.add_argument("--hash-password", action="store_true",
                   help="read a password (prompt, or one line on stdin) and print its hash for DMS_CONSOLE_USERS_FILE")

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
                                     help="preview: upcoming occurrences of a schedule; list, enable, disable")
    p = sched_sub.add_parser("preview", help="Print upcoming occurrences of a schedule.",
                             description="Print upcoming occurrences of a schedule.", formatter_class=_HelpFormatter)
    from .schedule import preview
    preview.add_arguments(p)
    p.set_defaults(func=cmd_schedule_preview)
    _add_schedule_parsers(sched_sub, common)
    return parser


def _add_job_parsers(sub, common: argparse.ArgumentParser) -> None:
    job = sub.add_parser("job", formatter_class=_HelpFormatter, help="Create or change a job (DMS_JOB); pause or resume one.",
                         description="Create or change a job (DMS_JOB); pause or resume one. "
                                     "`dms-worker job MAPREF [HANDLER] ...` is short for `job set`.")
    job_sub = job.add_subparsers(dest="job_command", required=True, metavar="COMMAND",
                                 help="set (also without the word: job MAPREF ...), pause, resume")
    p = job_sub.add_parser("set", formatter_class=_HelpFormatter, parents=[common], help="Create a job, or change only the fields given.",
                           description="Create a job (HANDLER required), or change only the fields given. "
                                       "`dms-worker job pause|resume MAPREF` pauses or resumes one.")
    p.add_argument("mapref", help="the job's name (DMS_JOB.mapref), what requests and schedules refer to")
    p.add_argument("handler", nargs="?", help="package.module:function or sql:PROCEDURE (required to create)")
    p.add_argument("--timeout", type=int, help="timeout_s: seconds before an execution is stopped")
    p.add_argument("--no-timeout", action="store_true", help="no timeout (timeout_s NULL)")
    p.add_argument("--max-attempts", type=int,
                   help="attempts before a request ends FAILED; unchanged if not given, on creation (default: 1)")
    p.add_argument("--retry-delay", type=int,
                   help="retry_delay_s, seconds, doubled per attempt; on creation (default: 60)")
    p.add_argument("--allow-overlap", action=argparse.BooleanOptionalAction, default=None,
                   help="let executions of this job overlap (default: one at a time)")
    p.add_argument("--enabled", action=argparse.BooleanOptionalAction, default=None,
                   help="--no-enabled disables the job: its requests fail (default on create: enabled)")
    p.add_argument("--disabled", dest="enabled", action="store_false", help="same as --no-enabled")
    p.add_argument("--description", help="free text")
    p.add_argument("--params", metavar="JSON", help="handler parameters, a JSON object; null clears them")
    p.set_defaults(func=cmd_job)
    for name, func, text in (("pause", cmd_job_pause, "Pause a job: its requests wait NEW until resumed."),
                             ("resume", cmd_job_resume, "Resume a paused job.")):
        p = job_sub.add_parser(name, formatter_class=_HelpFormatter, parents=[common], help=text, description=text)
        p.add_argument("mapref", help="the job (DMS_JOB.mapref)")
        p.set_defaults(func=func)


def _add_requests_parsers(sub, common: argparse.ArgumentParser) -> None:
    PAGE_DEFAULT = 50      # worker.console.data.PAGE_DEFAULT; not imported: parsing stays cheap
    req = sub.add_parser("requests", formatter_class=_HelpFormatter, help="List, show, retry, cancel or stop requests (DMS_PRCREQ).",
                         description="List, show, retry, cancel or stop requests (DMS_PRCREQ).")
    req_sub = req.add_subparsers(dest="requests_command", required=True, metavar="COMMAND",
                                 help="list, show, retry, cancel, stop")
    p = req_sub.add_parser("list", formatter_class=_HelpFormatter, parents=[common], help="Requests, newest first, filtered and paged.",
                           description="Requests, newest first, filtered and paged (keyset: --cursor from the "
                                       "previous page).")
    p.add_argument("--status", help="NEW, CLAIMED, PROCESSING, DONE, FAILED or CANCELLED")
    p.add_argument("--mapref", help="this job's requests only")
    p.add_argument("--type", help="IMMEDIATE, HISTORY, STOP or REFRESH_SCHEDULE")
    p.add_argument("--since", help="requested at or after (ISO date or timestamp; UTC unless it has an offset)")
    p.add_argument("--until", help="requested at or before (same format)")
    p.add_argument("--request-id", dest="request_id", help="this request only")
    p.add_argument("--limit", type=int, default=PAGE_DEFAULT, help=f"rows per page (default {PAGE_DEFAULT})")
    p.add_argument("--cursor", help="the next page, as printed after the previous one")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_requests_list)
    p = req_sub.add_parser("show", formatter_class=_HelpFormatter, parents=[common], help="One request with its executions, counts and errors.",
                           description="One request: payload, result, every execution (DMS_PRCLOG) with its "
                                       "DMS_JOBLOG counts and DMS_JOBERR rows.")
    p.add_argument("request_id", help="the request (DMS_PRCREQ.request_id)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_requests_show)
    for name, func, text in (
            ("retry", cmd_requests_retry, "Run a FAILED or CANCELLED request again (attempts reset)."),
            ("cancel", cmd_requests_cancel, "Cancel a waiting (NEW) request."),
            ("stop", cmd_requests_stop, "Stop a running request (through a STOP request).")):
        p = req_sub.add_parser(name, formatter_class=_HelpFormatter, parents=[common], help=text, description=text)
        p.add_argument("request_id", help="the request (DMS_PRCREQ.request_id)")
        p.set_defaults(func=func)


def _add_schedule_parsers(sched_sub, common: argparse.ArgumentParser) -> None:
    p = sched_sub.add_parser("list", formatter_class=_HelpFormatter, parents=[common], help="Current schedules, in words, with their next runs.",
                             description="Current schedules (DMS_JOBSCH, curflg = 'Y') in words, with their next "
                                         "runs in SCHEDULER_TIMEZONE and why a row is skipped.")
    p.add_argument("--count", type=int, default=5, help="upcoming occurrences per schedule (default 5)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_schedule_list)
    for name, func, text in (("enable", cmd_schedule_enable, "Enable a schedule (schflg = 'Y')."),
                             ("disable", cmd_schedule_disable, "Disable a schedule (schflg = 'N').")):
        p = sched_sub.add_parser(name, formatter_class=_HelpFormatter, parents=[common], help=text,
                                 description=text + " The leader rereads schedules at once.")
        p.add_argument("jobschid", type=int, help="the schedule (DMS_JOBSCH.jobschid of a current row)")
        p.set_defaults(func=func)


_JOB_COMMANDS = {"set", "pause", "resume"}


def _job_shorthand(argv: Sequence[str]) -> list[str]:
    """`dms-worker job MAPREF HANDLER ...` (the documented form) means `job set MAPREF HANDLER ...`,
    and `job --help` shows `job set`'s options (what people look for there; it names pause and
    resume too)."""
    argv = list(argv)
    if len(argv) >= 2 and argv[0] == "job" and argv[1] not in _JOB_COMMANDS:
        argv.insert(1, "set")
    return argv




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
    args = parser.parse_args(_job_shorthand(argv))
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
