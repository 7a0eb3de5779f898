"""Built-in CSV handlers: ``export`` (a query's rows to a file) and ``load`` (a file into a table).

Register them like any other handler and give their options as JSON in ``DMS_JOB.params``, the
schedule's ``params`` or the request payload (merged into ``ctx.payload``; the request wins)::

    dms-worker job ATTENDANCE_EXPORT worker.jobs.csv:export
    UPDATE dms_job SET params = '{"query": "SELECT * FROM attendance WHERE day = :as_of",
                                  "path": "/data/out/attendance_{as_of}.csv"}'
     WHERE mapref = 'ATTENDANCE_EXPORT';

In ``path``, ``{as_of}`` becomes the run's as-of date (ISO, e.g. 2026-11-01) and ``{run}`` the
execution id (``prcid``). ``connection`` (both handlers) is a SQLAlchemy URL of another database,
or ``env:NAME`` to read that URL from the replica's environment variable NAME (so that no
password has to sit in DMS_JOB); left out, the handler works on the worker's own database
through ``ctx.connection``, in the execution's transaction.
"""
from __future__ import annotations

import contextlib
import csv
import os
import re
from datetime import date, datetime, time
from typing import Any, Iterator

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from . import state
from .context import JobContext

WATERMARK_KEY = "watermark"
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*$")
_LEADING_COMMENTS = re.compile(r"^(\s+|--[^\n]*(\n|$)|/\*.*?\*/)*", re.S)
_ROW_ERRORS = (sa.exc.IntegrityError, sa.exc.DataError)   # a bad row, not a bad load
_TEMPORAL = (date, datetime, time)


class RejectLimitExceeded(RuntimeError):
    """More rows were rejected than ``max_rejects`` allows; the load is rolled back."""


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------
def export(ctx: JobContext) -> dict[str, Any]:
    """Write the rows of ``query`` to the CSV file ``path``.

    Options (``ctx.payload``):

    - ``query`` (required): a SELECT (or WITH ... SELECT). It may use the bind parameters
      ``:as_of`` (the run's as-of date; text ``YYYY-MM-DD`` on SQLite) and ``:watermark`` (text,
      written into the statement as an escaped SQL literal, so that it takes the type of what it
      is compared with, also on PostgreSQL).
    - ``path`` (required): the output file; ``{as_of}`` and ``{run}`` are replaced. Its
      directory is created if missing.
    - ``connection``: SQLAlchemy URL (or ``env:NAME``) of the source database; default the
      worker's database.
    - ``batch_size`` (5000): rows fetched per round trip (a server-side cursor on PostgreSQL),
      so memory stays flat whatever the row count.
    - ``delimiter`` (``,``), ``header`` (true: a first line with the result's column names),
      ``encoding`` (utf-8).
    - ``incremental``: the name of a column of the query's result. The stored watermark (the
      largest value of that column exported so far, kept in DMS_JOB_STATE under this mapref) is
      bound as ``:watermark`` -- ``None`` on the first run, so the query must handle NULL, e.g.
      ``WHERE :watermark IS NULL OR updated_at > :watermark``. The handler itself does not
      filter. On success the largest value exported becomes the new watermark (ISO text for
      dates and datetimes, ``str()`` otherwise, i.e. SQLite's own text); a run that exports
      no rows keeps the old one. The watermark commits with the execution, so a run that fails
      after writing its file exports the same rows again next time (at least once).

    The file is written as ``.<name>.<prcid>.tmp`` in the target's directory, flushed to disk,
    and renamed onto ``path`` only after the last row: readers never see half a file, and on
    an error or a stop the temporary file is removed and an existing ``path`` is untouched.
    Values: NULL is an empty field, dates/times/datetimes ISO 8601, anything else ``str()``;
    lines end with CRLF (RFC 4180), fields are quoted only when needed.

    Reports ``src`` = rows read, ``trg`` = rows written (once the file is in place); returns
    ``{"path", "rows", "watermark"}``.
    """
    p = ctx.payload
    query = _text_option(p, "query", required=True)
    path = _path_option(ctx)
    url = _text_option(p, "connection")
    batch_size = _int_option(p, "batch_size", 5000, minimum=1)
    delimiter = _char_option(p, "delimiter", ",")
    header = _flag_option(p, "header", True)
    encoding = _text_option(p, "encoding") or "utf-8"
    incremental = _text_option(p, "incremental")
    if not _LEADING_COMMENTS.sub("", query, count=1)[:6].lower().startswith(("select", "with", "values")):
        raise ValueError(f"export to {path}: 'query' must be a SELECT, got {query[:60]!r}")

    old_watermark = state.get(ctx.connection, ctx.mapref, WATERMARK_KEY) if incremental else None
    directory, name = os.path.split(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{name}.{ctx.prcid}.tmp")
    rows, top = 0, None
    try:
        with _database(ctx, url) as conn, open(tmp, "w", newline="", encoding=encoding) as f:
            writer = csv.writer(f, delimiter=delimiter)
            as_of = ctx.as_of.isoformat() if ctx.as_of is not None and conn.dialect.name == "sqlite" else ctx.as_of
            stmt = _with_watermark(sa.text(query), old_watermark)
            stmt = stmt.execution_options(stream_results=True, yield_per=batch_size)
            with conn.execute(stmt, {"as_of": as_of}) as result:
                if not result.returns_rows:
                    raise ValueError(f"export to {path}: the query returns no rows")
                columns = list(result.keys())
                wm_index = _column_index(columns, incremental, path) if incremental else None
                if header:
                    writer.writerow(columns)
                for batch in result.partitions(batch_size):
                    # csv writes None as an empty field; only dates and times need converting.
                    writer.writerows([v.isoformat() if isinstance(v, _TEMPORAL) else v for v in row] for row in batch)
                    if wm_index is not None:
                        for row in batch:
                            v = row[wm_index]
                            if v is not None and (top is None or v > top):
                                top = v
                    rows += len(batch)
                    ctx.report(src=len(batch))
                    ctx.check_cancelled()
            f.flush()
            os.fsync(f.fileno())
        watermark = old_watermark
        if incremental and top is not None:
            watermark = top.isoformat() if isinstance(top, _TEMPORAL) else str(top)
            state.put(ctx.connection, ctx.mapref, WATERMARK_KEY, watermark)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    ctx.report(trg=rows)
    ctx.logger.info("exported %d rows to %s", rows, path)
    return {"path": path, "rows": rows, "watermark": watermark}


def _with_watermark(stmt: sa.TextClause, watermark: str | None) -> sa.TextClause:
    """Bind ``:watermark`` as an SQL literal (text, escaped by SQLAlchemy; NULL when there is none).

    Not a server-side parameter: PostgreSQL types a parameter at its first use, and in the usual
    ``:watermark IS NULL OR updated_at > :watermark`` that use gives it no type ("type of
    parameter 1 does not match that when preparing the plan"). An untyped literal takes the type
    of the column it is compared with, on every database.
    """
    try:
        return stmt.bindparams(sa.bindparam("watermark", watermark, type_=sa.String(), literal_execute=True))
    except sa.exc.ArgumentError:          # the query does not use :watermark
        return stmt


def _column_index(columns: list[str], wanted: str, path: str) -> int:
    if wanted in columns:
        return columns.index(wanted)
    folded = [i for i, c in enumerate(columns) if c.lower() == wanted.lower()]
    if len(folded) == 1:
        return folded[0]
    raise ValueError(f"export to {path}: incremental column {wanted!r} is not in the query's result "
                     f"({', '.join(columns)})")


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------
def load(ctx: JobContext) -> dict[str, Any]:
    """Load the CSV file ``path`` into ``table``, rejecting bad rows one by one.

    Options (``ctx.payload``):

    - ``path`` (required; ``{as_of}``/``{run}`` replaced), ``table`` (required; ``name`` or
      ``schema.name``).
    - ``columns``: mapping CSV header -> target column; only the mapped CSV columns are loaded,
      others are ignored. Default: every header name is a target column.
    - ``key``: target column(s) (list, or a comma-separated string) identifying a row; a
      reject's key value is these fields joined by ``|`` (without ``key``: the line number).
      Required for ``mode`` upsert.
    - ``mode``: ``insert`` (default) or ``upsert`` (update the row with the same key, insert it
      if there is none; the key needs no unique constraint).
    - ``batch_size`` (1000), ``max_rejects`` (0), ``connection`` (URL or ``env:NAME``; default
      the worker's database), ``delimiter`` (``,``), ``encoding`` (utf-8-sig: a BOM is skipped).

    The file is read as a stream. Header names are stripped of spaces and matched to the
    table's columns ignoring case. A missing or empty file, or a header that lacks a mapped
    column or names a column the table does not have, raises ValueError before anything is
    loaded. Blank lines are skipped. Empty fields become NULL; other values are passed as text
    and converted by the database.

    Each batch is inserted with one executemany inside a SAVEPOINT; if the database refuses it
    (a constraint or a bad value), its rows are redone one by one, each in its own savepoint,
    and each refused row becomes a reject (``line N: <first line of the database message>``,
    the full message as dberrmsg). A row with the wrong number of fields is a reject too
    (``line N: expected X fields, got Y``). N is the line the record starts on (the header is
    line 1). Everything loads in one transaction: once the rejects exceed ``max_rejects`` the
    handler raises at once and the load is rolled back (the rejects still reach DMS_JOBERR).

    Reports ``src`` = data lines read, ``trg`` = rows inserted or updated (on success), ``err``
    = rejects; returns ``{"rows", "rejected"}``.
    """
    p = ctx.payload
    path = _path_option(ctx)
    table = _text_option(p, "table", required=True)
    schema, _, name = table.rpartition(".")
    if not _IDENTIFIER.match(name) or (schema and not _IDENTIFIER.match(schema)):
        raise ValueError(f"load of {path}: table {table!r} is not a valid [schema.]name identifier")
    mapping = p.get("columns")
    if mapping is not None and (not isinstance(mapping, dict) or not mapping
                                or not all(isinstance(k, str) and isinstance(v, str) for k, v in mapping.items())):
        raise ValueError(f"load of {path}: 'columns' must be a non-empty object of CSV header -> column name")
    key = p.get("key") or []
    if isinstance(key, str):
        key = [k.strip() for k in key.split(",") if k.strip()]
    if not isinstance(key, list) or not all(isinstance(k, str) for k in key):
        raise ValueError(f"load of {path}: 'key' must be a list of column names")
    mode = (_text_option(p, "mode") or "insert").lower()
    if mode not in ("insert", "upsert"):
        raise ValueError(f"load of {path}: mode must be 'insert' or 'upsert', got {mode!r}")
    if mode == "upsert" and not key:
        raise ValueError(f"load of {path}: mode upsert needs 'key' (the columns identifying a row)")
    batch_size = _int_option(p, "batch_size", 1000, minimum=1)
    max_rejects = _int_option(p, "max_rejects", 0, minimum=0)
    delimiter = _char_option(p, "delimiter", ",")
    encoding = _text_option(p, "encoding") or "utf-8-sig"
    url = _text_option(p, "connection")
    if not os.path.isfile(path):
        raise ValueError(f"load of {path}: file not found")

    with _database(ctx, url) as conn, open(path, newline="", encoding=encoding) as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader, None)
        except (csv.Error, UnicodeDecodeError) as exc:
            raise ValueError(f"load of {path}: line 1: cannot read the header: {exc}") from None
        if header is None:
            raise ValueError(f"load of {path}: the file is empty (no header line)")
        if not header:
            raise ValueError(f"load of {path}: line 1 is blank (expected the header line)")
        table_columns = _reflect(conn, schema or None, name, path, table)
        plan = _plan([h.strip() for h in header], mapping, table_columns, path, table)
        targets = [c for _, c in plan]
        key_cols = [_resolve(k, targets, f"load of {path}: key column {k!r} is not among the loaded columns "
                                             f"({', '.join(targets)})") for k in key]
        loader = _Loader(ctx, conn, sa.table(name, *[sa.column(c) for c in targets], schema=schema or None),
                         key_cols, mode, max_rejects, f"{path} into {table}")
        key_fields = [next(i for i, c in plan if c == k) for k in key_cols]
        nfields, batch, line = len(header), [], reader.line_num + 1
        try:
            for fields in reader:
                start, line = line, reader.line_num + 1
                if not fields:
                    continue                                # a blank line
                ctx.report(src=1)
                keyvalue = ("|".join(fields[i] for i in key_fields)
                            if key_fields and max(key_fields) < len(fields) else str(start))
                if len(fields) != nfields:
                    loader.reject(keyvalue, start, f"expected {nfields} fields, got {len(fields)}")
                    continue
                batch.append((start, keyvalue, {col: fields[i] or None for i, col in plan}))
                if len(batch) >= batch_size:
                    loader.flush(batch)
                    batch = []
        except (csv.Error, UnicodeDecodeError) as exc:
            raise ValueError(f"load of {path}: line {line}: {exc}") from None
        loader.flush(batch)
        if url:
            conn.commit()
    ctx.report(trg=loader.loaded)
    ctx.logger.info("loaded %d rows from %s into %s (%d rejected)", loader.loaded, path, table, loader.rejected)
    return {"rows": loader.loaded, "rejected": loader.rejected}


def _reflect(conn: sa.Connection, schema: str | None, name: str, path: str, table: str) -> list[str]:
    try:
        columns = [c["name"] for c in sa.inspect(conn).get_columns(name, schema=schema)]
    except sa.exc.NoSuchTableError:
        columns = []
    if not columns:
        raise ValueError(f"load of {path}: table {table} does not exist")
    return columns


def _resolve(wanted: str, columns: list[str], message: str) -> str:
    """``wanted`` as spelled in ``columns``: exactly, else ignoring case if that is unambiguous."""
    if wanted in columns:
        return wanted
    folded = [c for c in columns if c.lower() == wanted.lower()]
    if len(folded) != 1:
        raise ValueError(message)
    return folded[0]


def _plan(header: list[str], mapping: dict[str, str] | None, table_columns: list[str], path: str,
          table: str) -> list[tuple[int, str]]:
    """[(field index, target column)] for the loaded columns."""
    where = f"load of {path}"
    if mapping is None:
        if any(not h for h in header):
            raise ValueError(f"{where}: the header has an empty column name")
        unknown = [h for h in header if not any(c.lower() == h.lower() for c in table_columns)]
        if unknown:
            raise ValueError(f"{where}: header column(s) {', '.join(unknown)} not in table {table} "
                             f"(its columns: {', '.join(table_columns)})")
        pairs = list(enumerate(header))
    else:
        missing = [src for src in mapping if src not in header]
        if missing:
            raise ValueError(f"{where}: the header lacks mapped column(s) {', '.join(missing)} "
                             f"(header: {', '.join(header)})")
        twice = [src for src in mapping if header.count(src) > 1]
        if twice:
            raise ValueError(f"{where}: mapped column(s) {', '.join(twice)} appear more than once in the header")
        pairs = [(header.index(src), tgt) for src, tgt in mapping.items()]
    plan = [(i, _resolve(t, table_columns, f"{where}: column {t!r} is not in table {table} "
                                           f"(its columns: {', '.join(table_columns)})")) for i, t in pairs]
    targets = [c for _, c in plan]
    if len(set(targets)) != len(targets):
        raise ValueError(f"{where}: column(s) {', '.join(sorted({c for c in targets if targets.count(c) > 1}))} "
                         "loaded more than once")
    return plan


class _Loader:
    """Writes batches of rows, isolating and rejecting the rows the database refuses."""

    def __init__(self, ctx: JobContext, conn: sa.Connection, table: sa.TableClause, key: list[str], mode: str,
                 max_rejects: int, what: str) -> None:
        self.ctx, self.conn, self.key, self.mode = ctx, conn, key, mode
        self.max_rejects, self.what = max_rejects, what
        self.loaded = self.rejected = 0
        self.insert = sa.insert(table)
        if mode == "upsert":
            others = [c.name for c in table.columns if c.name not in key] or list(key)
            self.binds = {c: f"dmsv_{i}" for i, c in enumerate(others)}
            self.update = (sa.update(table)
                           .where(*[table.c[k] == sa.bindparam(f"dmsk_{i}") for i, k in enumerate(key)])
                           .values({c: sa.bindparam(b) for c, b in self.binds.items()}))

    def flush(self, batch: list[tuple[int, str, dict[str, Any]]]) -> None:
        self.ctx.check_cancelled()
        if not batch:
            return
        try:
            with self.conn.begin_nested():
                n = self._write([row for _, _, row in batch])
            self.loaded += n
            return
        except _ROW_ERRORS:
            pass
        for line, keyvalue, row in batch:             # isolate the bad rows
            try:
                with self.conn.begin_nested():
                    n = self._write([row])
                self.loaded += n
            except _ROW_ERRORS as exc:
                message = str(getattr(exc, "orig", None) or exc).strip()
                self.reject(keyvalue, line, message.splitlines()[0][:300] if message else type(exc).__name__,
                            message)

    def reject(self, keyvalue: str, line: int, short: str, dbmessage: str | None = None) -> None:
        self.rejected += 1
        self.ctx.reject(keyvalue, f"line {line}: {short}", dbmessage)
        if self.rejected > self.max_rejects:
            raise RejectLimitExceeded(f"{self.rejected} rejected rows exceed max_rejects={self.max_rejects} "
                                      f"(loading {self.what}; stopped at line {line}; the load is rolled back)")

    def _write(self, rows: list[dict[str, Any]]) -> int:
        if self.mode == "insert":
            self.conn.execute(self.insert, rows)
            return len(rows)
        # Upsert: update each row by its key; insert those that matched nothing with one
        # executemany. A key seen twice in the batch flushes the pending inserts first, so the
        # later row updates the earlier one (last one wins, as if loaded one at a time).
        done, pending, pending_keys = 0, [], set()
        for row in rows:
            k = tuple(row[c] for c in self.key)
            if k in pending_keys:
                self.conn.execute(self.insert, pending)
                done, pending, pending_keys = done + len(pending), [], set()
            params = {f"dmsk_{i}": row[c] for i, c in enumerate(self.key)}
            params.update({b: row[c] for c, b in self.binds.items()})
            if self.conn.execute(self.update, params).rowcount:
                done += 1
            else:
                pending.append(row)
                pending_keys.add(k)
        if pending:
            self.conn.execute(self.insert, pending)
            done += len(pending)
        return done


# ---------------------------------------------------------------------------------------------
# options and connections
# ---------------------------------------------------------------------------------------------
def _text_option(p: dict[str, Any], name: str, required: bool = False) -> str | None:
    value = p.get(name)
    if value is None or value == "":
        if required:
            raise ValueError(f"option {name!r} is required (in DMS_JOB.params, the schedule's params or the payload)")
        return None
    if not isinstance(value, str):
        raise ValueError(f"option {name!r} must be a string, got {type(value).__name__}")
    return value


def _int_option(p: dict[str, Any], name: str, default: int, minimum: int) -> int:
    value = p.get(name)
    if value is None or value == "":
        return default
    try:
        number = int(value)
        if isinstance(value, float) and number != value or isinstance(value, bool):
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"option {name!r} must be an integer, got {value!r}") from None
    if number < minimum:
        raise ValueError(f"option {name!r} must be at least {minimum}, got {number}")
    return number


def _flag_option(p: dict[str, Any], name: str, default: bool) -> bool:
    value = p.get(name)
    if value is None or value == "":
        return default
    if isinstance(value, str):
        return value.strip().upper() in ("Y", "YES", "TRUE", "1")
    return bool(value)


def _char_option(p: dict[str, Any], name: str, default: str) -> str:
    value = p.get(name)
    if value is None or value == "":
        return default
    if value == "\\t":
        return "\t"
    if not isinstance(value, str) or len(value) != 1:
        raise ValueError(f"option {name!r} must be one character, got {value!r}")
    return value


def _path_option(ctx: JobContext) -> str:
    path = _text_option(ctx.payload, "path", required=True)
    if "{as_of}" in path:
        if ctx.as_of is None:
            raise ValueError(f"path {path!r} uses {{as_of}} but this run has no as-of date")
        path = path.replace("{as_of}", ctx.as_of.isoformat())
    return path.replace("{run}", str(ctx.prcid))


def _engine(url: str) -> sa.Engine:
    if url.startswith("env:"):
        var = url[4:]
        if not os.environ.get(var):
            raise ValueError(f"option 'connection': environment variable {var} is not set")
        url = os.environ[var]
    engine = sa.create_engine(url, poolclass=NullPool)
    if engine.dialect.name == "sqlite":
        # pysqlite's own transaction handling breaks SAVEPOINT; let SQLAlchemy issue BEGIN.
        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn, _record):  # noqa: ANN001
            dbapi_conn.isolation_level = None

        @sa.event.listens_for(engine, "begin")
        def _on_begin(conn):  # noqa: ANN001
            conn.exec_driver_sql("BEGIN")
    return engine


@contextlib.contextmanager
def _database(ctx: JobContext, url: str | None) -> Iterator[sa.Connection]:
    """The worker's connection (in the execution's transaction), or one to ``url`` that is
    closed (and so rolled back unless committed) on the way out."""
    if not url:
        yield ctx.connection
        return
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            yield conn
    finally:
        engine.dispose()
