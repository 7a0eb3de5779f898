"""``dms-worker doctor``: checks everything a replica needs from its database, with a fix for each gap.

Run with the replicas' own configuration (the same environment, ``.env`` and user), it answers
"will a replica work here, and if not, what exactly do I do?": the Python driver, connectivity
and server version, the clocks, the migrations and the columns of the latest one (V003), the
runtime user's privileges on every table (probed with statements that touch no row, then rolled
back), the leader's lock (``EXECUTE ON SYS.DBMS_LOCK`` on Oracle), the wake-up channel (the AQ
queue and its DEQUEUE privilege on Oracle) and the directories of the file jobs.

Each check is one row: OK, WARN (works, but not as configured or as well as it could), FAIL
(something required is missing: the exit status is 1) or INFO. A check that cannot run says
why instead of stopping the others. Nothing here changes the database.
"""
from __future__ import annotations

import functools
import getpass
import json
import os
import re
import sqlite3
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa

from . import schema as s
from .config import CONNECTION_PREFIX, FILE_ROOTS_VAR, Config, ConfigError

OK, WARN, FAIL, INFO = "OK", "WARN", "FAIL", "INFO"

# What the replicas do to each table (sql/roles/*.sql grant exactly this).
RUNTIME_PRIVILEGES: dict[str, tuple[str, ...]] = {
    "dms_prcreq": ("SELECT", "INSERT", "UPDATE", "DELETE"),
    "dms_worker": ("SELECT", "INSERT", "UPDATE", "DELETE"),
    "dms_leader": ("SELECT", "INSERT", "UPDATE", "DELETE"),
    "dms_job_state": ("SELECT", "INSERT", "UPDATE", "DELETE"),
    "dms_prclog": ("SELECT", "INSERT", "UPDATE"),
    "dms_joblog": ("SELECT", "INSERT", "UPDATE"),
    "dms_joberr": ("SELECT", "INSERT", "UPDATE"),
    "dms_jobsch": ("SELECT", "UPDATE"),
    "dms_job": ("SELECT",),
    "dms_schema_version": ("SELECT",),
}
# Columns a replica updates, where the grant may be per column (the leader's on schedules).
UPDATED_COLUMNS = {"dms_jobsch": ("lst_run_dt", "nxt_run_dt", "invalid_reason")}
# The latest migration's columns: a replica of this version reads and writes all of them.
V003_COLUMNS = (("dms_worker", "expires_at"), ("dms_leader", "mode"), ("dms_jobsch", "invalid_reason"),
                ("dms_job", "paused"), ("dms_prcreq", "priority"), ("dms_prcreq", "unique_key"))

MIN_ORACLE = (12, 2)          # identity columns, JSON_OBJECT_T (DMS_API)
MIN_POSTGRESQL = 110000       # procedures (CALL, INOUT) and EXECUTE FUNCTION in triggers
MIN_SQLITE = (3, 35, 0)       # RETURNING
CLOCK_WARN_S = 30.0
NO_SCHEMA = "no dms_schema_version table"


@dataclass
class Check:
    name: str
    status: str
    found: str
    fix: str = ""


@dataclass
class _Context:
    cfg: Config
    driver: Any
    dialect: str
    user: str = ""            # the login user / role
    owner: str = ""           # where the tables are (Oracle CURRENT_SCHEMA, PostgreSQL current_schema)


def one_line(exc: BaseException) -> str:
    """The database's message on one line, without python-oracledb's Help: link or SQLAlchemy's
    statement, parameters and background link."""
    text = str(getattr(exc, "orig", None) or exc)
    noise = ("Help: ", "[SQL: ", "[parameters: ", "(Background on this error")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith(noise)]
    return " ".join(lines)[:300] or type(exc).__name__


def run_checks(cfg: Config) -> list[Check]:
    from .drivers import make_driver

    checks: list[Check] = []
    try:
        driver = make_driver(cfg.database_url, schema=cfg.schema)
    except (ConfigError, ValueError) as exc:
        return [Check("configuration", FAIL, str(exc), "fix the setting named above")]
    ctx = _Context(cfg, driver, driver.name)
    try:
        checks.append(_guard("python driver", lambda: _driver_check(ctx)))
        connected = _guard("connect", lambda: _connect_check(ctx))
        checks.append(connected)
        if connected.status == FAIL:
            return checks
        checks.append(_guard("clock", lambda: _clock_check(ctx)))
        migrations = _guard("migrations", lambda: _migrations_check(ctx))
        checks.append(migrations)
        if migrations.found.startswith(NO_SCHEMA):
            checks.append(Check("the rest", INFO, "tables, privileges, locks, wake-up and file jobs are checked once "
                                "the schema exists"))
            return checks
        checks.append(_guard("V003 columns", lambda: _v003_check(ctx)))
        checks.extend(_privilege_checks(ctx))
        for name, check in (("leader lock", _lock_check), ("wake-up", _wakeup_check), ("file jobs", _files_check)):
            checks.append(_guard(name, functools.partial(check, ctx)))
        if ctx.dialect == "oracle":
            checks.append(_guard("stop a stuck call", lambda: _oracle_kill_check(ctx)))
    finally:
        driver.dispose()
    return checks


def _guard(name: str, check: Callable[[], Check]) -> Check:
    try:
        return check()
    except Exception as exc:  # noqa: BLE001 - one check's surprise must not hide the others
        return Check(name, FAIL, f"the check itself failed: {one_line(exc)}", "see the message; rerun with the owner")


# -- the checks -----------------------------------------------------------------------------------
def _driver_check(ctx: _Context) -> Check:
    if ctx.dialect == "oracle":
        import oracledb

        from .drivers.oracle import AQ_MIN_ORACLEDB, aq_supported
        mode = "thin" if oracledb.is_thin_mode() else "thick"
        found = f"python-oracledb {oracledb.__version__} ({mode} mode)"
        if not aq_supported():
            return Check("python driver", WARN, found, f"pip install 'oracledb>={AQ_MIN_ORACLEDB[0]}.{AQ_MIN_ORACLEDB[1]}'"
                         " (the AQ wake-up needs bulk dequeue in thin mode; without it replicas poll)")
        return Check("python driver", OK, found)
    if ctx.dialect == "postgresql":
        import psycopg
        return Check("python driver", OK, f"psycopg {psycopg.__version__} (libpq {psycopg.pq.version()})")
    version = tuple(int(p) for p in sqlite3.sqlite_version.split("."))
    if version < MIN_SQLITE:
        return Check("python driver", FAIL, f"SQLite library {sqlite3.sqlite_version}",
                     f"use a Python built with SQLite >= {'.'.join(map(str, MIN_SQLITE))} (RETURNING)")
    return Check("python driver", OK, f"sqlite3, SQLite library {sqlite3.sqlite_version}")


def _connect_check(ctx: _Context) -> Check:
    d = ctx.driver
    if ctx.dialect == "sqlite":
        path = d.engine.url.database or ""
        if path not in ("", ":memory:") and not os.path.exists(path):
            # Connecting would create an empty file: say what is missing instead.
            return Check("connect", FAIL, f"no SQLite database at {os.path.abspath(path)}",
                         "run `dms-worker migrate` here (it creates the file), or point DMS_DATABASE_URL at it")
    try:
        with d.engine.connect() as conn:
            if ctx.dialect == "oracle":
                ctx.user, ctx.owner = conn.exec_driver_sql(
                    "SELECT SYS_CONTEXT('USERENV', 'SESSION_USER'), SYS_CONTEXT('USERENV', 'CURRENT_SCHEMA') "
                    "FROM dual").one()
                version = str(conn.connection.driver_connection.version)
                numbers = tuple(int(p) for p in re.findall(r"\d+", version)[:2])
                found = f"Oracle Database {version} as {ctx.user}, tables in schema {ctx.owner}"
                if numbers < MIN_ORACLE:
                    return Check("connect", FAIL, found, "dms-worker needs Oracle Database 12.2 or later")
                return Check("connect", OK, found)
            if ctx.dialect == "postgresql":
                ctx.user, ctx.owner, version_num, version = conn.exec_driver_sql(
                    "SELECT current_user, current_schema(), current_setting('server_version_num')::int, "
                    "current_setting('server_version')").one()
                found = f"PostgreSQL {version} as {ctx.user}, tables in schema {ctx.owner}"
                if version_num < MIN_POSTGRESQL:
                    return Check("connect", FAIL, found, "dms-worker needs PostgreSQL 11 or later")
                return Check("connect", OK, found)
            conn.exec_driver_sql("SELECT 1")
            ctx.user, ctx.owner = getpass.getuser(), "main"
            return Check("connect", OK, f"SQLite file {os.path.abspath(d.engine.url.database or '')}")
    except Exception as exc:  # noqa: BLE001 - the answer is the row
        message = one_line(exc)
        if "ORA-01435" in message and ctx.driver.schema:
            fix = f"SCHEMA={ctx.driver.schema}: no such user; set SCHEMA to the owner of the tables"
        elif ctx.dialect == "oracle":
            fix = ("check DMS_DATABASE_URL (or DB_HOST, DB_PORT, DB_SID = the service name, DB_USER, DB_PASSWORD) "
                   "and that the listener answers: sqlplus user@//host:port/service")
        elif ctx.dialect == "postgresql":
            fix = "check DMS_DATABASE_URL (host, port, database, user, password) and pg_hba.conf: psql \"$URL\""
        else:
            fix = "check that the file's directory exists and is writable by this user"
        return Check("connect", FAIL, message, fix)


def _clock_check(ctx: _Context) -> Check:
    db_now = ctx.driver.now()
    host_now = datetime.now(timezone.utc).replace(tzinfo=None)
    skew = (db_now - host_now).total_seconds()
    found = (f"database UTC {db_now:%Y-%m-%d %H:%M:%S}; this host's clock is "
             + (f"{skew:.1f} s behind" if skew >= 0 else f"{-skew:.1f} s ahead"))
    if abs(skew) > CLOCK_WARN_S:
        return Check("clock", WARN, found, "synchronise the clocks (NTP); leases, heartbeats and due times use "
                     "the database clock, but logs and `schedule preview` use this host's")
    return Check("clock", OK, found)


def _migrations_check(ctx: _Context) -> Check:
    from .migrate import applied_versions, migrations_for
    applied = applied_versions(ctx.driver)
    files = migrations_for(ctx.dialect)
    pending = [m for m in files if m.version not in applied]
    newer = sorted(set(applied) - {m.version for m in files})
    edited = [m for m in files if m.version in applied and applied[m.version] != m.checksum]
    if not applied:
        return Check("migrations", FAIL, f"{NO_SCHEMA} here: the schema is not created, or is elsewhere",
                     "run `dms-worker migrate` as the schema owner"
                     + (f" (SCHEMA={ctx.driver.schema} is where the replicas look)" if ctx.driver.schema else ""))
    found = f"applied {', '.join(f'V{v:03d}' for v in sorted(applied))}"
    if pending:
        return Check("migrations", FAIL, f"{found}; pending {', '.join(f'V{m.version:03d}' for m in pending)}",
                     "run `dms-worker migrate` as the schema owner (a half-applied version resumes)")
    if newer:
        return Check("migrations", WARN, f"{found}; V{newer[-1]:03d} is newer than this dms-worker",
                     "upgrade dms-worker on this host to the version that migrated the database")
    if edited:
        return Check("migrations", WARN, f"{found}; V{edited[0].version:03d} differs from the applied file",
                     "compare the file with what was applied; the checksum is in dms_schema_version")
    return Check("migrations", OK, found)


def _v003_check(ctx: _Context) -> Check:
    missing = [f"{t}.{c}" for t, c in V003_COLUMNS if not _probe(ctx, f"SELECT {c} FROM {t} WHERE 1 = 0")[0]]
    listed = ", ".join(f"{t}.{c}" for t, c in V003_COLUMNS)
    if missing:
        return Check("V003 columns", FAIL, f"missing or not readable: {', '.join(missing)}",
                     "run `dms-worker migrate` as the schema owner (V003 resumes where it stopped); "
                     "if they exist, grant SELECT on their tables (see privileges)")
    return Check("V003 columns", OK, listed)


def _privilege_checks(ctx: _Context) -> list[Check]:
    problems: list[Check] = []
    for table, privileges in RUNTIME_PRIVILEGES.items():
        columns = [c.name for c in s.metadata.tables[table].columns]
        probes = {
            "SELECT": f"SELECT {', '.join(columns)} FROM {table} WHERE 1 = 0",
            "INSERT": f"INSERT INTO {table} ({', '.join(columns)}) SELECT {', '.join(columns)} FROM {table} WHERE 1 = 0",
            "UPDATE": f"UPDATE {table} SET " + ", ".join(f"{c} = {c}" for c in UPDATED_COLUMNS.get(table, columns[1:2]))
                      + " WHERE 1 = 0",
            "DELETE": f"DELETE FROM {table} WHERE 1 = 0",
        }
        results = {p: _probe(ctx, probes[p]) for p in privileges}
        failed = [(p, error) for p, (ok, error) in results.items() if not ok]
        if failed:
            privs = ", ".join(p if p != "UPDATE" or table not in UPDATED_COLUMNS
                              else f"UPDATE ({', '.join(UPDATED_COLUMNS[table])})" for p, _ in failed)
            problems.append(Check(f"privileges {table}", FAIL,
                                  f"{' '.join(p for p, _ in failed)} refused: {failed[0][1]}",
                                  _grant_fix(ctx, table, privs)))
    if problems:
        return problems
    if ctx.dialect == "sqlite":
        path = ctx.driver.engine.url.database or ""
        folder = os.path.dirname(os.path.abspath(path))
        if not (os.access(path, os.W_OK) and os.access(folder, os.W_OK)):
            return [Check("privileges", FAIL, f"{path} or its directory is not writable by this user",
                          f"chmod/chown {path} and {folder} (SQLite writes its WAL file beside the database)")]
    return [Check("privileges", OK, f"{ctx.user}: the DML a replica needs on all {len(RUNTIME_PRIVILEGES)} tables")]


def _grant_fix(ctx: _Context, table: str, privileges: str) -> str:
    if ctx.dialect == "oracle":
        return (f"as {ctx.owner} (or a DBA): GRANT {privileges} ON {ctx.owner}.{table} TO {ctx.user}"
                " -- sql/roles/oracle.sql grants them all")
    if ctx.dialect == "postgresql":
        return (f"as the owner of the tables: GRANT {privileges} ON {table} TO {ctx.user}"
                " -- sql/roles/postgresql.sql grants them all")
    return "make the SQLite file and its directory writable by this user"


def _probe(ctx: _Context, sql: str) -> tuple[bool, str]:
    """Run ``sql`` (which touches no row) in a transaction that is rolled back."""
    with ctx.driver.engine.connect() as conn:
        trans = conn.begin()
        try:
            conn.exec_driver_sql(sql)
            return True, ""
        except sa.exc.DBAPIError as exc:
            return False, one_line(exc)
        finally:
            trans.rollback()


def _lock_check(ctx: _Context) -> Check:
    mode = ctx.cfg.leader_mode
    if ctx.dialect == "oracle":
        from .drivers.oracle import lock_id
        ids = f"leader id {lock_id(ctx.owner, 'leader')}, migration id {lock_id(ctx.owner, 'migration')}"
        if mode == "lease":
            return Check("leader lock", OK, f"DMS_LEADER_MODE=lease: the lease row only ({ids} unused)")
        ok, error = _probe(ctx, "DECLARE l_mode INTEGER := DBMS_LOCK.X_MODE; BEGIN NULL; END;")
        if ok:
            return Check("leader lock", OK, f"EXECUTE on SYS.DBMS_LOCK ({ids})")
        fix = f"as SYS in the PDB: GRANT EXECUTE ON SYS.DBMS_LOCK TO {ctx.user} (SYSTEM cannot grant it)"
        if mode == "lock":
            return Check("leader lock", FAIL, f"DMS_LEADER_MODE=lock but {error}", fix)
        return Check("leader lock", WARN, f"no EXECUTE on SYS.DBMS_LOCK: replicas will lead by the lease row only "
                     f"({error})", fix + ", or set DMS_LEADER_MODE=lease to say so")
    if ctx.dialect == "postgresql":
        if mode == "lease":
            return Check("leader lock", OK, "DMS_LEADER_MODE=lease: the lease row only (right behind PgBouncer in "
                         "transaction mode)")
        return Check("leader lock", OK, "session advisory lock (no grant needed; behind a transaction-mode pooler "
                     "set DMS_LEADER_MODE=lease)")
    return Check("leader lock", OK, "the lease row (SQLite)")


def _wakeup_check(ctx: _Context) -> Check:
    poll = f"polling every {ctx.cfg.poll_interval:g} s"
    if ctx.cfg.wakeup == "poll":
        return Check("wake-up", OK, f"DMS_WAKEUP=poll: {poll}")
    if ctx.dialect == "postgresql":
        return Check("wake-up", OK, "LISTEN/NOTIFY (no grant needed), and polling as the fallback")
    if ctx.dialect == "sqlite":
        return Check("wake-up", INFO, poll)
    from .drivers.oracle import AQ_INSTALLED_SQL, WAKEUP_QUEUE, aq_supported
    with ctx.driver.engine.connect() as conn:
        installed = conn.execute(sa.text(AQ_INSTALLED_SQL), {"queue_name": WAKEUP_QUEUE}).scalar()
    if not installed:
        return Check("wake-up", INFO, f"AQ queue {ctx.owner}.{WAKEUP_QUEUE} not installed (or not visible to "
                     f"{ctx.user}): {poll}", "optional: sql/oracle/aq_wakeup.sql as the owner (docs/oracle.md)")
    if not aq_supported():
        return Check("wake-up", WARN, f"AQ queue installed, but this python-oracledb cannot dequeue in bulk: {poll}",
                     "pip install 'oracledb>=3.1'")
    error = _aq_browse(ctx, f"{ctx.owner}.{WAKEUP_QUEUE}")
    if error:
        return Check("wake-up", FAIL, f"AQ queue {ctx.owner}.{WAKEUP_QUEUE} installed, but {ctx.user} cannot dequeue "
                     f"({error}): replicas will only poll",
                     f"as {ctx.owner}: run sql/oracle/aq_wakeup.sql again (it grants DEQUEUE to an existing "
                     f"DMS_WORKER), or BEGIN DBMS_AQADM.GRANT_QUEUE_PRIVILEGE('DEQUEUE', '{ctx.owner}.{WAKEUP_QUEUE}', "
                     f"'{ctx.user}'); END;")
    return Check("wake-up", OK, f"AQ queue {ctx.owner}.{WAKEUP_QUEUE}, DEQUEUE allowed")


def _aq_browse(ctx: _Context, queue_name: str) -> str:
    """Browse the queue without waiting: needs the DEQUEUE privilege, removes nothing."""
    import oracledb
    conn = ctx.driver.connect_dedicated()
    try:
        queue = conn.queue(queue_name)
        queue.deqoptions.mode = oracledb.DEQ_BROWSE
        queue.deqoptions.wait = oracledb.DEQ_NO_WAIT
        queue.deqone()
        return ""
    except oracledb.Error as exc:
        return one_line(exc)
    finally:
        conn.close()


def _files_check(ctx: _Context) -> Check:
    roots = ctx.cfg.file_roots
    with ctx.driver.engine.connect() as conn:
        j = s.job.c
        file_jobs = conn.execute(sa.select(j.mapref).where(j.handler.like("worker.jobs.csv:%"), j.enabled == "Y")
                                 .order_by(j.mapref)).scalars().all()
    jobs = f"{len(file_jobs)} enabled file job(s)" + (f" ({', '.join(file_jobs[:5])}{', ...' if len(file_jobs) > 5 else ''})"
                                                     if file_jobs else "")
    if not roots:
        if file_jobs:
            return Check("file jobs", FAIL, f"{jobs}, but {FILE_ROOTS_VAR} is not set: they are refused",
                         f"set {FILE_ROOTS_VAR} to the directories they read and write, e.g. "
                         f"{FILE_ROOTS_VAR}=/data/in{os.pathsep}/data/out (docs/jobs.md)")
        return Check("file jobs", OK, f"none registered; {FILE_ROOTS_VAR} not set, so file jobs are refused")
    bad = [r for r in roots if not (os.path.isdir(r) and os.access(r, os.R_OK | os.W_OK | os.X_OK))]
    if bad:
        return Check("file jobs", FAIL, f"{FILE_ROOTS_VAR}: {', '.join(bad)} missing or not writable by this user",
                     f"create them and give them to the replicas' user, or correct {FILE_ROOTS_VAR}")
    conns = sorted(ctx.cfg.connections)
    return Check("file jobs", OK, f"{jobs}; {FILE_ROOTS_VAR}: {', '.join(roots)}"
                 + (f"; {', '.join(conns)} set" if conns else f"; no {CONNECTION_PREFIX}* connections"))


def _oracle_kill_check(ctx: _Context) -> Check:
    ok, _ = _probe(ctx, "SELECT serial# FROM v$session WHERE sid = SYS_CONTEXT('USERENV', 'SID')")
    if ok:
        return Check("stop a stuck call", INFO, "SELECT on V$SESSION: a stuck execution's session can be named for "
                     "ALTER SYSTEM KILL SESSION (if also granted)")
    return Check("stop a stuck call", INFO, "no SELECT on V$SESSION (the least-privilege default): STOP cancels the "
                 "call; a killed execution's session ends when the server notices its closed socket",
                 "optional: SQLNET.EXPIRE_TIME on the server bounds how long that takes")


# -- output ---------------------------------------------------------------------------------------
def render(cfg: Config, checks: Iterable[Check]) -> str:
    checks = list(checks)
    width = max(len(c.name) for c in checks)
    lines = [f"dms-worker doctor: {cfg.safe_url}" + (f" (SCHEMA={cfg.schema})" if cfg.schema else ""), ""]
    for c in checks:
        lines.append(f"  {c.status:<4}  {c.name:<{width}}  {c.found}")
        if c.fix and c.status != OK:
            lines.append(f"        {'':<{width}}  fix: {c.fix}")
    failed = [c for c in checks if c.status == FAIL]
    lines.append("")
    lines.append(f"{len(failed)} required check(s) failed: replicas will not work until they are fixed."
                 if failed else "Everything a replica needs is in place.")
    return "\n".join(lines)


def main(cfg: Config, as_json: bool = False) -> int:
    checks = run_checks(cfg)
    if as_json:
        print(json.dumps({"database": cfg.safe_url, "checks": [asdict(c) for c in checks]}, indent=2))
    else:
        print(render(cfg, checks))
    return 1 if any(c.status == FAIL for c in checks) else 0
