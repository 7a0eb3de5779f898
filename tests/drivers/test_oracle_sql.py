"""Every statement the Oracle driver issues, compiled with the Oracle dialect and checked for the
known traps, without an Oracle server.

Each driver verb runs against a recording stand-in for the connection: SQLAlchemy statements are
compiled exactly as the ``oracle+oracledb`` dialect would send them, raw cursor statements are
recorded with the cursor's ``prefetchrows``/``arraysize`` at execute time. The stand-in answers
with plausible rows in three modes (rows found, nothing found, alternating), so both sides of
the verbs' branches run. The recorded SQL must parse as Oracle (sqlglot for SQL, sqlfluff for
PL/SQL blocks) and avoid the traps listed in NOTES.md.
"""
from __future__ import annotations

import itertools
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import pytest
import sqlalchemy as sa
import sqlglot
from sqlalchemy.dialects.oracle.oracledb import OracleDialect_oracledb

from worker import schema as s
from worker.drivers import make_driver
from worker.drivers.base import (
    ClaimParams,
    ExecutionAnnotate,
    ExecutionFinish,
    ExecutionOpen,
    Heartbeat,
    LeaderElect,
    LeaderTerm,
    OccurrenceEnqueue,
    PruneParams,
    Reject,
    RequestResolve,
    RescueParams,
    StopParams,
    WorkerInfo,
)
from worker.drivers.oracle import OracleDriver
from worker.jobs import state
from worker.migrate import migrations_for

ORACLE = OracleDialect_oracledb()
W = "w1:1:aa"
CLOB_COLUMNS = {c.name.upper() for t in s.metadata.tables.values() for c in t.columns if isinstance(c.type, sa.Text)}
T0 = datetime(2026, 1, 1, 12, 0, 0)


# ---------------------------------------------------------------------------------------------
# A recording stand-in for a connection
# ---------------------------------------------------------------------------------------------
@dataclass
class Issued:
    sql: str
    verb: str
    binds: set[str] = field(default_factory=set)
    prefetchrows: int | None = None
    arraysize: int | None = None
    raw: bool = False


_INTS = {"attempts": 1, "max_attempts": 3, "priority": 0, "epoch": 1, "prcid": 7, "jobschid": 1, "pid": 1, "slots": 4, "running": 0,
         "timeout_s": 60, "retry_delay_s": 0, "joblogid": 1, "count_1": 2, "count": 2, "n": 2, "paused": 0, "metrics_port": None}
_TEXT = {"status": s.PROCESSING, "claimed_by": W, "worker_id": W, "allow_overlap": "N", "enabled": "Y", "is_leader": "N",
         "handler": "worker.jobs.builtin:noop", "request_type": s.IMMEDIATE, "mapref": "M", "holder": W,
         "request_id": "r1", "name": "scheduler", "checksum": "c"}


def _value(name: str) -> Any:
    name = name.lower()
    if name in _INTS:
        return _INTS[name]
    if name in _TEXT:
        return _TEXT[name]
    if "systimestamp" in name or name in ("now", "min", "min_1", "due_since", "scheduled_for", "strtdt", "enddt", "strtdt", "prcdt") or name.endswith(("_at", "_dt")):
        return T0
    if name in ("payload", "params", "result_payload", "frqcd", "frqdd", "frqhh", "frqmi", "cronexp", "misfire",
                "dpnd_jobschid", "param1", "sessionid"):
        return None
    return "x"


class Row(tuple):
    def __new__(cls, names: list[str]):
        row = super().__new__(cls, [_value(n) for n in names])
        row._mapping = dict(zip(names, row))
        return row

    def __getattr__(self, name: str) -> Any:
        try:
            return self._mapping[name]
        except KeyError:
            raise AttributeError(name) from None


class Result:
    def __init__(self, names: list[str], found: bool) -> None:
        self.rows = [Row(names)] if found and names else []
        self.rowcount = 1 if found else 0
        self.out_parameters = {"srcrows": 3, "trgrows": 2, "errrows": 1} if found else {}

    def all(self):
        return list(self.rows)

    def first(self):
        return self.rows[0] if self.rows else None

    def one(self):
        return self.rows[0]

    def scalar(self):
        return self.rows[0][0] if self.rows else None

    def scalar_one(self):
        return self.rows[0][0] if self.rows else 1

    def scalars(self):
        return _Scalars([r[0] for r in self.rows])

    def mappings(self):
        return _Scalars([dict(r._mapping) for r in self.rows])

    def __iter__(self):
        return iter(self.rows)


class _Scalars(list):
    def all(self):
        return list(self)

    def first(self):
        return self[0] if self else None

    def one(self):
        return self[0]


class Recorder:
    def __init__(self) -> None:
        self.issued: list[Issued] = []
        self.verb = "?"
        self.found = itertools.cycle([True])
        self.cursor_rows: list[tuple] = [("r1", "M", "IMMEDIATE"), ("r2", "M", "IMMEDIATE")]
        self.var_value = 0
        self.current_schema = "DMS"
        self.lock_ids: list[int] = []
        self.raise_on: str | None = None      # raw statements containing this raise self.error
        self.error: BaseException | None = None

    def mode(self, name: str) -> None:
        self.found = itertools.cycle({"found": [True], "empty": [False], "alternate": [False, True]}[name])

    def sa(self, stmt: Any, params: Any = None) -> Result:
        if isinstance(stmt, str):
            return self.raw(stmt, params)
        keys = list(params[0] if isinstance(params, list) else params or {}) or None
        compiled = stmt.compile(dialect=ORACLE, column_keys=keys, compile_kwargs={"render_postcompile": True})
        columns = stmt.selected_columns if isinstance(stmt, sa.Select) else getattr(stmt, "_returning", ())
        names = [getattr(c, "key", None) or getattr(c, "name", None) or f"col{n}" for n, c in enumerate(columns)]
        self.issued.append(Issued(str(compiled), self.verb, set(compiled.binds)))
        return Result(names or ["value"], next(self.found))

    def raw(self, sql: str, binds: Any = None, cursor: Cursor | None = None) -> Result:
        self.issued.append(Issued(sql, self.verb, set(binds or {}), getattr(cursor, "prefetchrows", None),
                                  getattr(cursor, "arraysize", None), raw=True))
        return Result(["value"], next(self.found))


class Var:
    def __init__(self, value: Any) -> None:
        self.value = value

    def getvalue(self) -> Any:
        return self.value


class Cursor:
    def __init__(self, rec: Recorder) -> None:
        self.rec, self.prefetchrows, self.arraysize, self._rows = rec, 2, 100, []

    def execute(self, sql: str, binds: Any = None, **kw: Any) -> Cursor:
        self.rec.raw(sql, dict(binds or {}, **kw), self)
        if "DBMS_LOCK." in sql:
            self.rec.lock_ids.append(dict(binds or {}, **kw)["lock_id"])
        if self.rec.raise_on and self.rec.raise_on in sql:
            raise self.rec.error
        if "FOR UPDATE" in sql:
            self._rows = list(self.rec.cursor_rows)
        elif "'CURRENT_SCHEMA'" in sql:
            self._rows = [(self.rec.current_schema,)]
        elif "'INSTANCE'" in sql:
            self._rows = [(12, 2)]
        else:
            self._rows = [(5,)]
        return self

    def fetchmany(self, n: int) -> list[tuple]:
        return self._rows[:n]

    def fetchone(self) -> tuple | None:
        return self._rows[0] if self._rows else None

    def var(self, _type: Any) -> Var:
        return Var(self.rec.var_value)

    def close(self) -> None:
        pass

    def __enter__(self) -> Cursor:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


class Queue:
    """AQ stand-in: hands out queued messages, else waits (as a dequeue with wait does)."""

    def __init__(self, name: str) -> None:
        import queue
        import types
        self.name, self.messages, self.cancelled, self.sizes = name, queue.Queue(), False, []
        self.deqoptions = types.SimpleNamespace(wait=None, visibility=None)

    def deqmany(self, n: int) -> list[Any]:
        import queue
        self.sizes.append(n)
        if self.cancelled:
            raise RuntimeError("DPY-4011: cancelled")
        try:
            item = self.messages.get(timeout=0.05)
        except queue.Empty:
            return []
        if isinstance(item, Exception):
            raise item
        return [item]


class DBAPIConn:
    def __init__(self, rec: Recorder) -> None:
        self.rec = rec
        self.queues: dict[str, Queue] = {}

    def queue(self, name: str) -> Queue:
        return self.queues.setdefault(name, Queue(name))

    def cancel(self) -> None:
        for q in self.queues.values():
            q.cancelled = True

    def cursor(self) -> Cursor:
        return Cursor(self.rec)

    def ping(self) -> None:
        pass

    def close(self) -> None:
        pass


class Conn:
    def __init__(self, rec: Recorder) -> None:
        self.rec, self.dialect = rec, ORACLE
        self.connection = type("Proxy", (), {"driver_connection": DBAPIConn(rec), "dbapi_connection": DBAPIConn(rec)})()

    def execute(self, stmt: Any, params: Any = None) -> Result:
        return self.rec.sa(stmt, params)

    def exec_driver_sql(self, sql: str, params: Any = None) -> Result:
        return self.rec.raw(sql, params)

    def begin_nested(self) -> Conn:
        return self

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


class Engine:
    def __init__(self, rec: Recorder, real: sa.Engine) -> None:
        self.rec, self.dialect, self.url = rec, ORACLE, real.url

    def connect(self) -> Conn:
        return Conn(self.rec)

    begin = connect

    def dispose(self) -> None:
        pass


@pytest.fixture
def rec() -> Recorder:
    return Recorder()


@pytest.fixture
def odriver(rec) -> OracleDriver:
    driver = make_driver("oracle+oracledb://dms:secret@db.example:1521/?service_name=FREEPDB1")
    assert isinstance(driver, OracleDriver)
    real = driver.engine
    driver.engine = Engine(rec, real)
    driver.connect_dedicated = lambda: DBAPIConn(rec)
    yield driver
    real.dispose()


# ---------------------------------------------------------------------------------------------
# Driving every verb
# ---------------------------------------------------------------------------------------------
def _scenarios(d: OracleDriver, rec: Recorder) -> dict[str, Any]:
    finish = ExecutionFinish("r1", W, 7, "M", s.COMPLETED, msg="ok é" * 10, sessionid="12,34", srcrows=3, trgrows=3,
                             rejects=(Reject("k1", "bad", "ORA-01722"),), error=("JOB", "boom", None),
                             request_status=s.DONE, jobschid=1, scheduled_for=T0, params={"param1": "2026-01-01"})

    def lease():
        d.leader_lease_take(LeaderElect(W, 10, "lease"))
        d.leader_lease_take(LeaderElect(W, 10, "lock", force=True))
        d.leader_lease_renew(LeaderTerm(W, 1, 10))
        d.leader_lease_resign(LeaderTerm(W, 1))

    def lock(result: int):
        def run():
            rec.var_value = result
            d.leader_lock_try()
            d.leader_lock_held()
            d.leader_lock_release()
        return run

    def complete_tx():
        with d.engine.connect() as conn:
            d.execution_complete_tx(conn, finish, lock_timeout_s=1.0)
            d.request_owned_tx(conn, "r1", W, lock_timeout_s=1.0)

    def mapref_lock():
        with d.engine.connect() as conn:
            d.execution_lock(conn, "M", timeout_s=5)
            d.execution_unlock(conn, "M")

    def scripts():
        rec.var_value = 0
        with d.engine.connect() as conn:
            for m in migrations_for("oracle"):
                d.run_script(conn, m.sql)
            with d.migration_lock(conn):
                pass
            d.procedure_call(conn, "dms_etl.load_day", [7] + [None] * 10, counts=True)
            d.procedure_call(conn, "load_day", [7, "a"], counts=False)
            d.procedure_call(conn, "load_day", [7] + [None] * 10, counts=True, truncate_flag="Y")

    def job_state():
        with d.engine.connect() as conn:
            state.put(conn, "M", "watermark", "2026-01-01T00:00:00")
            state.get(conn, "M", "watermark")

    return {
        "now": d.now,
        "job_get_many": lambda: d.job_get_many(["M", "N"]),
        "request_claim": lambda: d.request_claim(ClaimParams(W, job_limit=3, control_types=s.CONTROL_TYPES)),
        "request_claim_jobs_only": lambda: d.request_claim(ClaimParams(W, job_limit=1, control_types=())),
        "execution_open": lambda: d.execution_open(ExecutionOpen("r1", W, "M", 1, {"param1": "2026-01-02"})),
        "execution_annotate_many": lambda: d.execution_annotate_many([ExecutionAnnotate(7, {"param1": "x"}, "12,34")]),
        "execution_finish_many": lambda: d.execution_finish_many([finish]),
        "execution_complete_tx": complete_tx,
        "execution_lock": mapref_lock,
        "request_resolve_many": lambda: d.request_resolve_many([
            RequestResolve("r1", W, s.NEW, refund_attempt=True, retry_delay_s=30), RequestResolve("r2", W, s.FAILED, "{}")]),
        "history_days_done": lambda: d.history_days_done("r1"),
        "request_stop": lambda: (d.request_stop(StopParams("s1", "M", "r1")), d.request_stop(StopParams("s2", "M"))),
        "request_stop_flags": lambda: d.request_stop_flags(W),
        "worker": lambda: (d.worker_register(WorkerInfo(W, "host", 1, "v", 4, 9410)),
                           d.worker_heartbeat(Heartbeat(W, 2, 8.0)), d.worker_unregister(W)),
        "request_rescue": lambda: d.request_rescue(RescueParams(8.0, limit=100)),
        "request_release_orphans": lambda: d.request_release_orphans(W, []),
        "schedule_list": d.schedule_list,
        "occurrence_enqueue": lambda: d.occurrence_enqueue(OccurrenceEnqueue(W, 1, 1, "M", (T0, T0.replace(minute=1)),
                                                                             T0, T0, '{"a": 1}')),
        "request_prune": lambda: d.request_prune(PruneParams(86400.0, limit=1000)),
        "execution_prune": lambda: d.execution_prune(PruneParams(86400.0, limit=1000)),
        "queue_depth": d.queue_depth,
        "cluster_status": d.cluster_status,
        "schedule_states": d.schedule_states,
        "schedule_set_invalid": lambda: d.schedule_set_invalid(W, 1, {1: "no DMS_JOB row é" * 100, 2: None}),
        "leader_lease": lease,
        "leader_lock_free": lock(0),
        "leader_lock_held": lock(1),
        "listener": lambda: (lambda listener: listener and listener.close())(d.listener()),
        "sessions": lambda: (d.session_id(DBAPIConn(rec)), d.session_terminate("12,34,@2")),
        "session_setup": lambda: d._on_connect(DBAPIConn(rec)),
        "job_state": job_state,
        "scripts": scripts,
    }


@pytest.fixture
def issued(odriver, rec) -> list[Issued]:
    for mode in ("found", "empty", "alternate"):
        for verb, run in _scenarios(odriver, rec).items():
            rec.verb, odriver._aq_next_try = verb, 0.0
            rec.mode(mode)
            try:
                run()
            except Exception as exc:  # noqa: BLE001 - a canned answer may not fit every branch
                if mode == "found" or not isinstance(exc, (AttributeError, TypeError, StopIteration)):
                    raise
    return rec.issued


# ---------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------
def _strip_literals(sql: str) -> str:
    return re.sub(r"'(?:[^']|'')*'", "''", sql)


def oracle_traps(sql: str, *, claim: bool = False) -> list[str]:
    """Known ways a statement that looks fine fails, or misbehaves, on Oracle."""
    problems = []
    text = _strip_literals(sql)
    upper = " ".join(text.upper().split())
    if "FOR UPDATE" in upper:
        if "FETCH FIRST" in upper or "FETCH NEXT" in upper or re.search(r"\bROWNUM\b", upper) or " OFFSET " in upper:
            problems.append("row limit combined with FOR UPDATE (ORA-02014, or ROWNUM counted before SKIP LOCKED)")
        depth, pos = 0, upper.index("FOR UPDATE")
        for ch in upper[:pos]:
            depth += {"(": 1, ")": -1}.get(ch, 0)
        if depth != 0 or upper.count("FOR UPDATE") > 1:
            problems.append("FOR UPDATE inside a subquery (dropped or refused)")
    if re.search(r"\b(SYSDATE|CURRENT_TIMESTAMP|LOCALTIMESTAMP)\b", upper) or re.search(
            r"(?<!SYS_EXTRACT_UTC\()\bSYSTIMESTAMP\b", upper):
        problems.append("a clock other than SYS_EXTRACT_UTC(SYSTIMESTAMP) (timestamps are UTC)")
    if upper.startswith(("SELECT", "UPDATE", "DELETE", "INSERT", "WITH")):
        tree = sqlglot.parse_one(text, read="oracle", error_level=sqlglot.ErrorLevel.RAISE)
        for where in tree.find_all(sqlglot.exp.Where):
            clobs = {col.name.upper() for col in where.find_all(sqlglot.exp.Column)} & CLOB_COLUMNS
            if clobs:
                problems.append(f"CLOB column(s) {sorted(clobs)} compared in WHERE")
        if claim:
            selected = {col.name.upper() for e in tree.expressions for col in e.find_all(sqlglot.exp.Column)}
            if selected & CLOB_COLUMNS or "*" in upper.split("FROM", 1)[0]:
                problems.append("a LOB in the claim select (disables prefetch)")
    m = re.search(r"\bRETURNING\b(.*)\bINTO\b(.*)$", text, re.IGNORECASE | re.DOTALL)
    if m:
        before = set(re.findall(r":(\w+)", text[:m.start()]))
        into = set(re.findall(r":(\w+)", m.group(2)))
        if before & into:
            problems.append(f"bind name(s) {sorted(before & into)} reused around RETURNING")
    return problems


def _plsql_parses(sql: str) -> list[str]:
    from sqlfluff.core import FluffConfig, Linter
    cfg = FluffConfig(overrides={"dialect": "oracle"})
    parsed = Linter(config=cfg).parse_string(sql.rstrip() + "\n/\n" if not sql.rstrip().endswith("/") else sql)
    problems = [str(v) for v in parsed.violations]
    if parsed.tree is not None:
        problems += [seg.raw[:60] for seg in parsed.tree.recursive_crawl("unparsable")]
    return problems


def test_every_verb_of_the_interface_is_driven(odriver, rec, issued):
    verbs = {v for v in _scenarios(odriver, rec)}
    assert verbs <= {i.verb for i in issued} | {"listener"}, "a scenario issued nothing"
    public = {n for n in dir(OracleDriver) if not n.startswith("_") and callable(getattr(OracleDriver, n))}
    covered = {"now", "job_get_many", "request_claim", "execution_open", "execution_annotate_many",
               "execution_finish_many", "execution_complete_tx", "request_owned_tx", "execution_lock",
               "execution_unlock", "request_resolve_many", "history_days_done",
               "request_stop", "request_stop_flags", "worker_register", "worker_heartbeat", "worker_unregister",
               "request_rescue", "request_release_orphans", "schedule_list", "occurrence_enqueue", "request_prune",
               "execution_prune", "queue_depth", "cluster_status", "leader_lease_take", "leader_lease_renew",
               "leader_lease_resign", "leader_lock_try", "leader_lock_held", "leader_lock_release",
               "listener", "session_id", "session_terminate", "session_cancel",
               "procedure_call", "run_script", "migration_lock", "is_transient", "clock", "begin", "dispose",
               "connect_dedicated", "session_setup_sql", "schedule_states", "schedule_set_invalid"}
    assert public - covered == set(), "a new driver verb: add it to the scenarios above"


def test_every_issued_statement_avoids_the_oracle_traps(issued):
    assert len({i.sql for i in issued}) > 60
    failures = []
    for i in issued:
        claim = "SKIP LOCKED" in i.sql
        for problem in oracle_traps(i.sql, claim=claim):
            failures.append(f"[{i.verb}] {problem}:\n{i.sql}")
    assert not failures, "\n\n".join(failures)


def test_every_issued_sql_statement_parses_as_oracle(issued):
    for i in issued:
        head = i.sql.lstrip().upper()
        if head.startswith(("BEGIN", "DECLARE", "CREATE OR REPLACE", "CREATE TRIGGER", "CREATE PACKAGE")):
            continue
        sqlglot.parse_one(_strip_literals(i.sql) if head.startswith("ALTER SYSTEM") else i.sql, read="oracle",
                          error_level=sqlglot.ErrorLevel.RAISE)


def test_every_issued_plsql_block_parses_as_oracle(issued):
    blocks = {i.sql for i in issued if i.sql.lstrip().upper().startswith(("BEGIN", "DECLARE"))}
    assert any("DBMS_LOCK.REQUEST" in b for b in blocks) and any("DBMS_LOCK.RELEASE" in b for b in blocks)
    assert any(b.startswith("BEGIN dms_etl.load_day(") for b in blocks)
    for block in blocks:
        assert _plsql_parses(block) == [], block


def test_the_claim_fetches_exactly_the_free_slots_from_an_ordered_skip_locked_cursor(odriver, rec):
    rec.verb = "claim"
    rec.cursor_rows = [(f"r{i}", f"M{i}", "IMMEDIATE") for i in range(40)]
    claimed = odriver.request_claim(ClaimParams(W, job_limit=3, control_types=(s.STOP,), control_limit=10))
    cursors = [i for i in rec.issued if "SKIP LOCKED" in i.sql]
    # The job lane fetches (and so locks) a few candidates more than it has slots: at most one
    # of several rows of one no-overlap mapref could start.
    assert [(c.prefetchrows, c.arraysize) for c in cursors] == [(10, 10), (14, 14)]
    for c in cursors:
        assert c.raw and "ORDER BY" in c.sql.upper() and c.sql.rstrip().upper().endswith("FOR UPDATE SKIP LOCKED")
        assert oracle_traps(c.sql, claim=True) == []
    updates = [i for i in rec.issued if i.sql.startswith("UPDATE dms_prcreq SET status")]
    marked = sum(len(re.findall(r":request_id_\d+_\d+", u.sql)) for u in updates)
    assert marked == 13     # 10 control + 3 job rows, no more
    assert len(claimed) == 1      # the stand-in returns one row for the re-read


def test_no_claim_statement_runs_without_free_slots(odriver, rec):
    assert odriver.request_claim(ClaimParams(W, job_limit=0, control_types=())) == []
    assert not [i for i in rec.issued if "SKIP LOCKED" in i.sql]


def test_the_checker_catches_the_obvious_sqlalchemy_claim():
    c = s.prcreq.c
    naive = sa.select(c.request_id, c.payload).where(c.status == s.NEW).order_by(c.requested_at).limit(3) \
        .with_for_update(skip_locked=True)
    sql = str(naive.compile(dialect=ORACLE, compile_kwargs={"render_postcompile": True}))
    problems = oracle_traps(sql, claim=True)
    assert any("row limit" in p for p in problems) and any("LOB" in p for p in problems)
    inner = sa.select(c.request_id).where(c.request_id.in_(
        sa.select(c.request_id).where(c.status == s.NEW).with_for_update(skip_locked=True)))
    assert "FOR UPDATE" not in str(inner.compile(dialect=ORACLE)), "SQLAlchemy drops it inside a subquery"
    assert oracle_traps("SELECT a FROM t WHERE a IN (SELECT a FROM t FOR UPDATE SKIP LOCKED)")
    assert oracle_traps("SELECT request_id FROM dms_prcreq WHERE payload = 'x'")
    assert oracle_traps("UPDATE t SET a = :a RETURNING b INTO :a")
    assert oracle_traps("UPDATE t SET a = SYSTIMESTAMP")
    assert _plsql_parses("BEGIN :r := DBMS_LOCK.REQUEST(id => 1; END;")


def test_occurrences_already_there_are_skipped_but_other_errors_raise(odriver):
    import oracledb

    from worker.drivers.oracle import is_unique_violation

    def integrity(code: str):
        err = oracledb.IntegrityError(type("E", (), {"full_code": code, "message": code})())
        return sa.exc.IntegrityError("INSERT", {}, err)

    assert is_unique_violation(integrity("ORA-00001"))
    assert not is_unique_violation(integrity("ORA-01400"))
    calls = []

    class Conn:
        def begin_nested(self):
            return self

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def execute(self, stmt):
            calls.append(stmt)
            if len(calls) == 2:
                raise integrity("ORA-00001")
            if len(calls) == 4:
                raise integrity("ORA-01400")

    rows = [dict(request_id=f"r{i}", mapref="M", request_type=s.IMMEDIATE, status=s.NEW, attempts=0) for i in range(4)]
    with pytest.raises(sa.exc.IntegrityError):
        odriver._insert_occurrences(Conn(), rows)
    calls.clear()
    assert odriver._insert_occurrences(Conn(), rows[:3]) == 2


def test_text_is_clipped_to_bytes_not_characters(odriver):
    clipped = odriver._fit("é" * 3000, 4000)
    assert len(clipped.encode("utf-8")) <= 4000 and clipped == "é" * 2000
    assert odriver._fit("abc", 4000) == "abc" and odriver._fit(None, 10) is None


def test_transient_errors_are_recognised(odriver):
    import oracledb

    def err(code: str, recoverable: bool = False):
        e = oracledb.DatabaseError(type("E", (), {"full_code": code, "isrecoverable": recoverable})())
        return sa.exc.DatabaseError("SELECT 1", {}, e)

    assert odriver.is_transient(err("ORA-03113"))
    assert odriver.is_transient(err("DPY-4011"))
    assert odriver.is_transient(err("ORA-99999", recoverable=True))
    assert not odriver.is_transient(err("ORA-00942"))


def test_procedure_names_are_validated_and_counts_are_out_binds():
    from worker.drivers.oracle import procedure_sql
    assert procedure_sql("pkg.proc", 2, True) == "BEGIN pkg.proc(:a0, :a1, :srcrows, :trgrows, :errrows); END;"
    with pytest.raises(ValueError):
        procedure_sql("x; DROP TABLE dms_job", 1, False)


def test_schema_setting_switches_the_current_schema_sets_iso_formats_and_is_validated(rec):
    from worker.config import ConfigError
    driver = OracleDriver("oracle+oracledb://u:p@h:1521/?service_name=S", schema="DMS_OWNER")
    cur = Cursor(rec)
    driver._on_connect(type("C", (), {"cursor": lambda self: cur})())
    sql = rec.issued[-1].sql
    assert sql.startswith("ALTER SESSION SET NLS_DATE_FORMAT = 'YYYY-MM-DD HH24:MI:SS' ")
    assert "NLS_TIMESTAMP_FORMAT = 'YYYY-MM-DD HH24:MI:SS.FF6'" in sql and sql.endswith(" CURRENT_SCHEMA = DMS_OWNER")
    from tests.test_oracle_sources import sqlfluff_problems
    assert sqlfluff_problems(sql) == []
    driver.dispose()
    for bad in ("x; drop user y", "DMS.OTHER", '"dms"', "1DMS", ""):
        with pytest.raises(ConfigError, match="SCHEMA="):
            OracleDriver("oracle+oracledb://u:p@h:1521/?service_name=S", schema=bad)


def test_lock_ids_are_derived_from_the_schema_and_stay_in_the_user_range():
    from worker.drivers.oracle import LOCK_ID_MAX, lock_id
    ids = {(schema, purpose): lock_id(schema, purpose) for schema in ("DMS", "DMS_TEST", "APP2")
           for purpose in ("leader", "migration")}
    assert len(set(ids.values())) == len(ids), "each schema and purpose has its own lock"
    assert all(0 <= i <= LOCK_ID_MAX for i in ids.values())
    assert lock_id("dms", "leader") == ids[("DMS", "leader")], "Oracle names are upper case"
    assert lock_id("DMS", "leader") == 626290050, "stable across processes and releases"


def test_the_leader_and_migration_locks_use_the_schemas_ids(odriver, rec):
    from worker.drivers.oracle import lock_id
    rec.mode("found")
    for schema in ("DMS", "OTHER"):
        rec.current_schema = schema
        rec.issued.clear()
        odriver._lock_id = None               # a driver works for one schema; this test, for two
        odriver.leader_lock_try()
        odriver.leader_lock_release()
        with odriver.engine.connect() as conn, odriver.migration_lock(conn):
            pass
        requested = [i for i in rec.issued if "DBMS_LOCK.REQUEST" in i.sql]
        released = [i for i in rec.issued if "DBMS_LOCK.RELEASE" in i.sql]
        assert len(requested) == 2 and len(released) == 2
        assert rec.lock_ids == [lock_id(schema, "leader"), lock_id(schema, "leader"),
                                lock_id(schema, "migration"), lock_id(schema, "migration")]
        rec.lock_ids.clear()


def _pls00201():
    import oracledb
    from oracledb import errors
    return oracledb.DatabaseError(errors._Error(
        "ORA-06550: line 1, column 17:\nPLS-00201: identifier 'DBMS_LOCK' must be declared\n"
        "ORA-06550: line 1, column 7:\nPL/SQL: Statement ignored", code=6550))


def test_without_execute_on_dbms_lock_the_elector_says_why_once_and_leads_by_the_lease(odriver, rec, caplog):
    from worker.services.leadership import Leadership
    rec.mode("found")
    rec.raise_on, rec.error = "DBMS_LOCK.REQUEST", _pls00201()
    lead = Leadership(odriver, W, "lock", ttl_s=10, interval_s=1)
    with caplog.at_level("ERROR", logger="worker.leadership"):
        lead.tick(0.0)
        assert lead.epoch == 1 and lead.mode == "lease"
        lead.tick(1.0)
        assert lead.leading(1.5), "renewed by the lease row, not by a lock session"
        lead.step_down()
        lead.tick(2.0)
    requests = [i for i in rec.issued if "DBMS_LOCK.REQUEST" in i.sql]
    assert len(requests) == 1, "asked once, not on every heartbeat"
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and "GRANT EXECUTE ON SYS.DBMS_LOCK TO dms" in errors[0] and "as SYS" in errors[0]
    assert "PLS-00201" in errors[0] and "Help:" not in errors[0]
    assert not odriver.is_transient(sa.exc.DatabaseError("BEGIN", {}, _pls00201()))


def test_migrate_without_execute_on_dbms_lock_names_the_grant(odriver, rec):
    rec.raise_on, rec.error = "DBMS_LOCK.REQUEST", _pls00201()
    with pytest.raises(RuntimeError, match=r"as SYS in the PDB: GRANT EXECUTE ON SYS\.DBMS_LOCK TO dms"):
        with odriver.engine.connect() as conn, odriver.migration_lock(conn):
            pass


def test_sessions_are_recorded_with_their_instance_for_rac(odriver, rec):
    assert odriver.session_id(DBAPIConn(rec)) == "12,5,@2"
    odriver.session_terminate("12,5,@2")
    assert rec.issued[-1].sql == "ALTER SYSTEM KILL SESSION '12,5,@2' IMMEDIATE"
    count = len(rec.issued)
    odriver.session_terminate("12,5,@2' IMMEDIATE; --")
    assert len(rec.issued) == count, "only SID,SERIAL#[,@INST_ID] reaches the statement"


def test_an_empty_param_is_stored_as_null(odriver):
    """Oracle stores '' as NULL: the driver says so itself rather than pretend otherwise."""
    assert odriver._fit("", 250) is None


def test_the_job_state_clock_is_utc(odriver, rec):
    with odriver.engine.connect() as conn:
        state.put(conn, "M", "k", "v")
    writes = [i.sql for i in rec.issued if i.sql.startswith(("UPDATE dms_job_state", "INSERT INTO dms_job_state"))]
    assert writes and all("SYS_EXTRACT_UTC(SYSTIMESTAMP)" in w and "CURRENT_TIMESTAMP" not in w for w in writes)


def test_a_procedure_runs_through_sqlalchemy_with_out_binds_and_an_opt_in_truncate_flag(odriver, rec):
    with odriver.engine.connect() as conn:
        assert odriver.procedure_call(conn, "etl.load", [7, "2026-01-01"] + [None] * 9, counts=True,
                                      truncate_flag="Y") == (3, 2, 1)
        assert odriver.procedure_call(conn, "etl.load", [7] + [None] * 10) is None
    calls = [i for i in rec.issued if i.sql.startswith("BEGIN etl.load(")]
    assert [c.raw for c in calls] == [False, False], "not on a raw cursor: SQLAlchemy begins the transaction"
    assert calls[0].sql == ("BEGIN etl.load(:a0, :a1, :a2, :a3, :a4, :a5, :a6, :a7, :a8, :a9, :a10, :a11, "
                            ":srcrows, :trgrows, :errrows); END;")
    assert calls[1].sql == "BEGIN etl.load(:a0, :a1, :a2, :a3, :a4, :a5, :a6, :a7, :a8, :a9, :a10); END;"


def test_the_aq_listener_wakes_the_select_loop_and_reports_a_lost_connection(rec):
    from multiprocessing.connection import wait

    from worker.drivers.oracle import AqListener

    conn = DBAPIConn(rec)
    listener = AqListener(lambda: conn, "DMS_OWNER.DMS_WAKEUP_Q")
    try:
        queue = conn.queues["DMS_OWNER.DMS_WAKEUP_Q"]
        assert queue.deqoptions.wait == AqListener.wait_s and queue.deqoptions.visibility is not None
        assert wait([listener], 0.3) == [] and listener.drain() == []
        queue.messages.put(b"dms_prcreq")
        assert wait([listener], 5) == [listener], "a dequeued message makes the listener readable"
        assert listener.drain() == [("dms_prcreq", "")]
        queue.messages.put(RuntimeError("DPY-4011: the database closed the connection"))
        assert wait([listener], 5) == [listener]
        with pytest.raises(RuntimeError, match="DPY-4011"):
            listener.drain()
    finally:
        listener.close()
    assert not listener._thread.is_alive()


def test_without_the_aq_queue_the_driver_polls_and_asks_again_only_after_a_while(odriver, rec):
    rec.mode("empty")                               # all_queues has no DMS_WAKEUP_Q
    assert odriver.listener() is None
    asked = len(rec.issued)
    assert odriver.listener() is None and len(rec.issued) == asked, "no query per control-loop tick"
    odriver._aq_next_try -= odriver.aq_recheck_s
    rec.mode("found")
    listener = odriver.listener()
    try:
        assert listener is not None and len(rec.issued) == asked + 1
    finally:
        listener.close()


def test_after_a_listener_failure_the_next_one_waits_instead_of_one_per_tick(odriver, rec, monkeypatch):
    """Issue 12.5: the control loop asks for a listener on every tick while it has none."""
    import time as _time
    from multiprocessing.connection import wait

    from worker.drivers import oracle as mod
    sessions = []

    def connect():
        sessions.append(DBAPIConn(rec))
        return sessions[-1]

    monkeypatch.setattr(odriver, "connect_dedicated", connect)
    rec.mode("found")
    listener = odriver.listener()
    assert listener is not None and len(sessions) == 1
    listener.queue.messages.put(RuntimeError("DPY-4011: the database or network closed the connection"))
    assert wait([listener], 5) == [listener]
    with pytest.raises(RuntimeError):
        listener.drain()
    listener.close()                              # what the control loop does, then asks again each tick
    catalog = len([i for i in rec.issued if "all_queues" in i.sql])
    for _ in range(50):
        assert odriver.listener() is None
    assert len(sessions) == 1, "no new session per tick"
    assert len([i for i in rec.issued if "all_queues" in i.sql]) == catalog, "no catalog query per tick"
    assert 1.5 < odriver._aq_next_try - _time.monotonic() <= 2.0, "the first retry after 2 s"
    odriver._aq_next_try = 0.0
    listener = odriver.listener()
    assert listener is not None and len(sessions) == 2
    listener.close()
    odriver._aq_failed(RuntimeError("again"), lived_s=1.0)
    assert 3.5 < odriver._aq_next_try - _time.monotonic() <= 4.0, "doubling while it keeps failing"
    for _ in range(10):
        odriver._aq_failed(RuntimeError("again"), lived_s=1.0)
    assert odriver._aq_next_try - _time.monotonic() <= odriver.aq_recheck_s
    odriver._aq_failed(RuntimeError("once"), lived_s=odriver.aq_recheck_s + 1)
    assert odriver._aq_next_try - _time.monotonic() <= 2.0, "a listener that ran a while starts over"
    monkeypatch.setattr(mod, "aq_supported", lambda: False)
    odriver._aq_next_try = 0.0
    assert odriver.listener() is None and len(sessions) == 2, "python-oracledb < 3.1 in thin mode: poll"


def test_aq_needs_python_oracledb_3_1_in_thin_mode():
    from worker.drivers.oracle import aq_supported
    assert not aq_supported("3.0.1", thin=True) and not aq_supported("2.5.1", thin=True)
    assert aq_supported("3.1.0", thin=True) and aq_supported("26.1.0", thin=True)
    assert aq_supported("2.5.1", thin=False), "thick mode has had bulk dequeue all along"


def test_history_days_done_never_counts_a_null_day(odriver, rec):
    """'' is NULL on Oracle: a log row without a day is no day done."""
    rec.mode("found")                                   # the stand-in answers param1 = NULL
    assert odriver.history_days_done("r1") == set()


def test_a_server_side_call_holds_its_maprefs_lock_in_its_own_session(odriver, rec):
    """Issue 12.6: the id is the mapref's, derived from the schema like the leader's, requested
    with a timeout on the execution's session (not the pool's) and kept across commits."""
    from worker.drivers.oracle import lock_id
    rec.mode("found")
    rec.current_schema = "DMS"
    rec.var_value = 1                       # DBMS_LOCK.REQUEST: 1 = timeout (an earlier call holds it)
    with odriver.engine.connect() as conn:
        assert odriver.execution_lock(conn, "NIGHTLY", timeout_s=5) is False
        rec.var_value = 0
        assert odriver.execution_lock(conn, "NIGHTLY", timeout_s=5) is True
        odriver.execution_unlock(conn, "NIGHTLY")
    requests = [i for i in rec.issued if "DBMS_LOCK.REQUEST" in i.sql]
    assert requests and all("release_on_commit => FALSE" in i.sql for i in requests)
    assert rec.lock_ids[:2] == [lock_id("DMS", "mapref:NIGHTLY")] * 2
    assert lock_id("DMS", "mapref:NIGHTLY") not in (lock_id("DMS", "leader"), lock_id("OTHER", "mapref:NIGHTLY"))


def test_without_execute_on_dbms_lock_a_server_side_call_still_runs_and_says_why_once(odriver, rec, caplog):
    """A runtime user without the grant (doctor's warning) must not fail every sql: run of a
    no-overlap job: the run goes on, exclusive by its request row, and the log names the grant."""
    rec.mode("found")
    rec.raise_on, rec.error = "DBMS_LOCK.REQUEST", _pls00201()
    with caplog.at_level("WARNING", logger="worker.drivers.oracle"), odriver.engine.connect() as conn:
        assert odriver.execution_lock(conn, "NIGHTLY", timeout_s=5) is True
        odriver.execution_unlock(conn, "NIGHTLY")
        assert odriver.execution_lock(conn, "NIGHTLY", timeout_s=5) is True
    assert len([i for i in rec.issued if "DBMS_LOCK.REQUEST" in i.sql]) == 1, "asked once per process"
    assert not [i for i in rec.issued if "DBMS_LOCK.RELEASE" in i.sql]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "GRANT EXECUTE ON SYS.DBMS_LOCK TO dms" in warnings[0]
    rec.error = sa.exc.OperationalError("BEGIN", {}, Exception("ORA-03113: end-of-file on communication channel"))
    odriver._execution_lock_missing = False
    with pytest.raises(Exception, match="ORA-03113"), odriver.engine.connect() as conn:
        odriver.execution_lock(conn, "NIGHTLY", timeout_s=5)


def test_the_aq_listener_takes_wake_ups_only_for_the_slots_it_has(rec):
    """Issue 12.7: a replica with no free slot leaves the single-consumer wake-ups to others."""
    from multiprocessing.connection import wait

    from worker.drivers.oracle import AqListener

    conn = DBAPIConn(rec)
    listener = AqListener(lambda: conn, "DMS_OWNER.DMS_WAKEUP_Q")
    try:
        queue = conn.queues["DMS_OWNER.DMS_WAKEUP_Q"]
        listener.demand(0)
        time.sleep(0.1)
        queue.messages.put(b"dms_prcreq")
        assert wait([listener], 1.0) == [], "no free slot: the message stays for another replica"
        assert queue.messages.qsize() == 1
        listener.demand(3)
        assert wait([listener], 5) == [listener]
        assert queue.sizes[-1] == 3, "asks for as many wake-ups as it has free slots"
    finally:
        listener.close()
