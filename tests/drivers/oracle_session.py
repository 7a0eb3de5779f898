"""A simulated python-oracledb session under the real SQLAlchemy Oracle dialect, for tests.

``test_oracle_sql.py`` replaces SQLAlchemy's engine and connection with recorders: it checks
the SQL the driver produces, but not what SQLAlchemy itself does around it (the first-connect
step, autobegin, commit, error wrapping, OUT binds). Here only the DB-API connection is a
stand-in: SQLAlchemy's pool, dialect and ``Connection`` are the real ones, so a test sees what
a replica would do against a server, given the answers this session gives.

The session keeps the state the tests need: its CURRENT_SCHEMA (the login user until an
``ALTER SESSION SET ... CURRENT_SCHEMA = X``), whether a transaction holds uncommitted work
(``committed`` / ``rolled_back`` record what became of it), and answers
``SYS_CONTEXT('USERENV', 'CURRENT_SCHEMA')``. A statement containing ``fail_on`` raises
``error`` (a real ``oracledb.DatabaseError``); ``fail_once`` does so only the first time.

DDL is modelled as far as a migration needs: the session knows which tables, columns,
constraints and indexes exist (``objects``), and a statement whose effect is already there
fails with the error Oracle gives for it (ORA-00955, ORA-01430, ORA-02264, ORA-01418). DDL
takes effect at once, whatever becomes of the transaction, as on Oracle.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import oracledb
from oracledb import errors

from worker.drivers.oracle import OracleDriver

_TEXT = ("X", oracledb.DB_TYPE_VARCHAR, 128, 128, None, None, True)


def ora_error(message: str) -> oracledb.DatabaseError:
    """A python-oracledb error as the driver raises it (``full_code``, ``code``, ``str``)."""
    code = int(re.match(r"ORA-(\d+)", message).group(1))
    error = errors._Error(message, code=code)
    return (oracledb.IntegrityError if code in errors.ERR_INTEGRITY_ERROR_CODES else oracledb.DatabaseError)(error)


@dataclass
class Session:
    user: str = "DMS"
    fail_on: str | None = None
    error: BaseException | None = None
    executed: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    committed: list[list[str]] = field(default_factory=list)
    rolled_back: list[list[str]] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)
    current_schema: str = ""
    fail_once: bool = False
    objects: set[str] = field(default_factory=set)     # TABLE:X, INDEX:X, COLUMN:T.C, CONSTRAINT:X
    ddl: list[str] = field(default_factory=list)        # DDL statements that took effect
    # DML whose bound values include a value this returns a message for fails with that error,
    # as the server refuses a row (e.g. ORA-01722 for text in a NUMBER column).
    refuse: Any = None
    # A query this returns (columns, rows) for gets them: answer(sql, binds) -> tuple | None.
    answer: Any = None
    savepoints: dict[str, int] = field(default_factory=dict)
    failures: dict[str, BaseException] = field(default_factory=dict)   # statement part -> error
    aq_error: BaseException | None = None     # what a dequeue from Connection.queue() raises

    def __post_init__(self) -> None:
        self.current_schema = self.user.upper()


class _Var:
    def __init__(self, *_args: Any, outconverter: Any = None, **_kw: Any) -> None:
        self.value, self.outconverter = None, outconverter

    def getvalue(self, _pos: int = 0) -> Any:
        if self.outconverter is not None and self.value is not None:
            return self.outconverter(self.value)
        return self.value


class _Cursor:
    rowcount = 0
    arraysize = 100
    prefetchrows = 2
    outputtypehandler = None

    def __init__(self, session: Session) -> None:
        self.session, self.description, self._rows = session, None, []

    def var(self, *args: Any, **kw: Any) -> _Var:
        return _Var(*args, **kw)

    def execute(self, sql: str, params: Any = None, **kw: Any) -> _Cursor:
        binds = dict(params or {}, **kw)
        s = self.session
        s.executed.append((sql, binds))
        if s.fail_on and s.fail_on in sql:
            if s.fail_once:
                s.fail_on = None
            raise s.error
        for part, error in s.failures.items():
            if part in sql:
                raise error
        answered = s.answer(sql, binds) if s.answer else None
        if answered is not None:
            columns, rows = answered
            self.description = [(c, oracledb.DB_TYPE_VARCHAR, 128, 128, None, None, True) for c in columns]
            self._rows = list(rows)
            return self
        if _ddl(s, sql):
            s.ddl.append(sql)
            return self
        self._refuse_rows(sql, [binds])
        if m := re.match(r"\s*SAVEPOINT (\w+)", sql):
            s.savepoints[m.group(1)] = len(s.pending)
            return self
        if m := re.match(r"\s*ROLLBACK TO SAVEPOINT (\w+)", sql):
            del s.pending[s.savepoints.get(m.group(1), len(s.pending)):]
            return self
        self.description, self._rows = None, []
        if m := re.search(r"CURRENT_SCHEMA\s*=\s*(\w+)", sql):
            s.current_schema = m.group(1).upper()
        if re.search(r"sys_context\(\s*'userenv',\s*'current_schema'\s*\)", sql, re.IGNORECASE):
            self.description, self._rows = [_TEXT], [(s.current_schema,)]
        elif sql.startswith("SELECT 1.1 FROM DUAL"):        # the dialect's decimal-character probe
            self.description, self._rows = [_TEXT], [("1.1",)]
        elif re.match(r"\s*(BEGIN|INSERT|UPDATE|DELETE|MERGE)\b", sql, re.IGNORECASE) and "dbms_transaction" not in sql:
            s.pending.append(f"{sql} {sorted((k, v) for k, v in binds.items() if not isinstance(v, _Var))}")
            for value in binds.values():                     # a procedure sets its OUT binds
                if isinstance(value, _Var):
                    value.value = "4"
        return self

    def executemany(self, sql: str, seq: Any, **_kw: Any) -> None:
        rows = [dict(b) for b in seq]
        self.session.executed.append((sql, {"many": rows}))
        self._refuse_rows(sql, rows)
        self.session.pending.extend(f"{sql} {sorted(r.items())}" for r in rows)

    def _refuse_rows(self, sql: str, rows: list[dict[str, Any]]) -> None:
        if self.session.refuse is None or not re.match(r"\s*(INSERT|UPDATE)\b", sql, re.IGNORECASE):
            return
        for row in rows:
            for value in row.values():
                message = self.session.refuse(value)
                if message:
                    raise ora_error(message)

    def fetchone(self) -> tuple | None:
        return self._rows.pop(0) if self._rows else None

    def fetchall(self) -> list[tuple]:
        rows, self._rows = self._rows, []
        return rows

    def fetchmany(self, _n: int | None = None) -> list[tuple]:
        return self.fetchall()

    def setinputsizes(self, *_a: Any, **_kw: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> _Cursor:
        return self

    def __exit__(self, *_exc: Any) -> None:
        pass


def _ddl(s: Session, sql: str) -> bool:
    """Apply a DDL statement to the session's objects; False when ``sql`` is not DDL."""
    text = " ".join(sql.split()).upper()
    if m := re.match(r"CREATE TABLE (\w+)", text):
        new = [f"TABLE:{m.group(1)}"]
        error = "ORA-00955: name is already used by an existing object"
    elif m := re.match(r"CREATE (?:UNIQUE )?INDEX (\w+)", text):
        new = [f"INDEX:{m.group(1)}"]
        error = "ORA-00955: name is already used by an existing object"
    elif m := re.match(r"DROP INDEX (\w+)", text):
        if f"INDEX:{m.group(1)}" not in s.objects:
            raise ora_error("ORA-01418: specified index does not exist")
        s.objects.discard(f"INDEX:{m.group(1)}")
        return True
    elif m := re.match(r"ALTER TABLE (\w+) ADD CONSTRAINT (\w+)", text):
        new = [f"CONSTRAINT:{m.group(2)}"]
        error = "ORA-02264: name already used by an existing constraint"
    elif m := re.match(r"ALTER TABLE (\w+) ADD \((\w+)", text):
        new = [f"COLUMN:{m.group(1)}.{m.group(2)}"]
        error = "ORA-01430: column being added already exists in table"
    else:
        return False
    if any(o in s.objects for o in new):
        raise ora_error(error)
    s.objects.update(new)
    return True


class _Connection:
    max_identifier_length = 128
    version = "23.5.0.24.7"
    autocommit = False
    outputtypehandler = None
    stmtcachesize = 20

    def __init__(self, session: Session) -> None:
        self.session = session

    def cursor(self) -> _Cursor:
        return _Cursor(self.session)

    def commit(self) -> None:
        if self.session.pending:
            self.session.committed.append(self.session.pending)
        self.session.pending = []

    def rollback(self) -> None:
        if self.session.pending:
            self.session.rolled_back.append(self.session.pending)
        self.session.pending = []

    def cancel(self) -> None:
        pass

    def queue(self, name: str) -> _Queue:
        return _Queue(self.session, name)

    def ping(self) -> None:
        pass

    def close(self) -> None:
        self.rollback()


class _Queue:
    def __init__(self, session: Session, name: str) -> None:
        import types
        self.session, self.name = session, name
        self.deqoptions = types.SimpleNamespace(mode=None, wait=None, visibility=None)

    def deqone(self) -> None:
        self.session.executed.append((f"DEQUEUE {self.name} mode={self.deqoptions.mode}", {}))
        if self.session.aq_error is not None:
            raise self.session.aq_error
        return None


def simulated_driver(session: Session, schema: str | None = None) -> OracleDriver:
    """An OracleDriver whose pool opens simulated sessions (all sharing ``session``'s state)."""
    driver = OracleDriver(f"oracle+oracledb://{session.user.lower()}:secret@db.example:1521/?service_name=FREEPDB1",
                          schema=schema)
    driver.engine.pool._creator = lambda *_a: _Connection(session)
    driver.connect_dedicated = lambda: _Connection(session)
    return driver
