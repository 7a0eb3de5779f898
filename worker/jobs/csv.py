"""Built-in CSV handlers: ``export`` (a query's rows to a file) and ``load`` (a file into a table).

Register them like any other handler and give their options as JSON in ``DMS_JOB.params``, the
schedule's ``params`` or the request payload (merged into ``ctx.payload``; the request wins)::

    dms-worker job ATTENDANCE_EXPORT worker.jobs.csv:export
    UPDATE dms_job SET params = '{"query": "SELECT * FROM attendance WHERE day = :as_of",
                                  "path": "/data/out/attendance_{as_of}.csv"}'
     WHERE mapref = 'ATTENDANCE_EXPORT';

In ``path``, ``{as_of}`` becomes the run's as-of date (ISO, e.g. 2026-11-01) and ``{run}`` the
execution id (``prcid``). ``connection`` (both handlers) is a SQLAlchemy URL of another database,
or ``env:DMS_CONN_NAME`` to read that URL from the replica's environment (so that no password
has to sit in DMS_JOB); left out, the handler works on the worker's own database through
``ctx.connection``, in the execution's transaction.

Trust boundary (docs/jobs.md): whoever can insert a request must not be able to read or write
files, or learn secrets, through these handlers. So:

- every file (the CSV, the export's temporary file, a SQLite database named by ``connection``)
  is resolved fully (``..`` and symlinks) and must lie below one of the directories in
  ``DMS_FILE_ROOTS``; with no roots configured, file jobs are refused;
- ``env:`` reads only variables named ``DMS_CONN_*``, never DMS_DATABASE_URL, DB_PASSWORD or
  anything else in the replica's environment;
- no file content reaches result_payload, DMS_JOBERR or the logs: a header is quoted only
  where it is an identifier, and the database's messages about rejected rows and failed
  queries keep their first line with quoted values replaced by "…" (identifiers stay).
  A rejected row's key value (the ``key`` columns the job configures) is recorded by design.
"""
from __future__ import annotations

import contextlib
import csv
import os
import re
from collections.abc import Iterator
from datetime import date, datetime, time, timezone
from decimal import Decimal
from typing import Any, Literal, overload

import sqlalchemy as sa
from sqlalchemy.pool import NullPool

from ..config import CONNECTION_PREFIX, FILE_ROOTS_VAR, Config, ConfigError
from . import state
from .context import JobContext

WATERMARK_KEY = "watermark"
WATERMARK_TYPE_KEY = "watermark_type"
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*$")
_LEADING_COMMENTS = re.compile(r"^(\s+|--[^\n]*(\n|$)|/\*.*?\*/)*", re.S)
_ROW_ERRORS = (sa.exc.IntegrityError, sa.exc.DataError)   # a bad row, not a bad load
# python-oracledb raises these row-level errors as plain DatabaseError (only constraint
# violations are IntegrityError there): invalid number, value too large for the column,
# numeric overflow, and the date conversion errors.
_ORACLE_ROW_ERRORS = {"ORA-01722", "ORA-12899", "ORA-01401", "ORA-01438", "ORA-01426", "ORA-01400", "ORA-06502",
                      "ORA-01843", "ORA-01861", "ORA-01858", "ORA-01840", "ORA-01841", "ORA-01847", "ORA-01830",
                      "ORA-01839", "ORA-01850", "ORA-01851", "ORA-01852", "ORA-01878"}
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
      ``:as_of`` (the run's as-of date; text ``YYYY-MM-DD`` on SQLite) and ``:watermark``
      (written into the statement as a literal of the watermark's type, so that it compares
      with its column on every database: text, a number, or a date/timestamp).
    - ``path`` (required): the output file below a ``DMS_FILE_ROOTS`` directory; ``{as_of}``
      and ``{run}`` are replaced. Its directory is created if missing.
    - ``connection``: SQLAlchemy URL (or ``env:DMS_CONN_NAME``) of the source database;
      default the worker's database.
    - ``batch_size`` (5000): rows fetched per round trip (a server-side cursor on PostgreSQL),
      so memory stays flat whatever the row count.
    - ``delimiter`` (``,``), ``header`` (true: a first line with the result's column names),
      ``encoding`` (utf-8).
    - ``incremental``: the name of a column of the query's result. The stored watermark (the
      largest value of that column exported so far, kept in DMS_JOB_STATE under this mapref) is
      bound as ``:watermark`` -- ``None`` on the first run, so the query must handle NULL, e.g.
      ``WHERE :watermark IS NULL OR updated_at > :watermark``. The handler itself does not
      filter. On success the largest value exported becomes the new watermark (ISO text for
      dates and datetimes, ``str()`` otherwise, with its type kept beside it); a run that
      exports no rows keeps the old one. The watermark commits with the execution, so a run
      that fails after writing its file exports the same rows again next time (at least once).
    - ``empty_file`` (false): what an incremental run with no new rows does. By default it
      writes no file (an existing one is left alone) and records 0 rows; true writes a file
      with only the header, as a full export with no rows always does.

    The file is written as ``.<name>.<prcid>.tmp`` in the target's directory (created anew,
    never through a symlink), flushed to disk, and renamed onto ``path`` only after the last
    row: readers never see half a file, and on an error or a stop the temporary file is
    removed and an existing ``path`` is untouched.
    Values: NULL is an empty field, dates/times/datetimes ISO 8601, anything else ``str()``;
    lines end with CRLF (RFC 4180), fields are quoted only when needed.

    Reports ``src`` = rows read, ``trg`` = rows written (once the file is in place); returns
    ``{"path", "rows", "watermark"}`` (``path`` None when no file was written).
    """
    p = ctx.payload
    query = _text_option(p, "query", required=True)
    roots = _file_roots()
    path = _path_option(ctx)
    url = _text_option(p, "connection")
    batch_size = _int_option(p, "batch_size", 5000, minimum=1)
    delimiter = _char_option(p, "delimiter", ",")
    header = _flag_option(p, "header", True)
    encoding = _text_option(p, "encoding") or "utf-8"
    incremental = _text_option(p, "incremental")
    empty_file = _flag_option(p, "empty_file", False)
    if not _LEADING_COMMENTS.sub("", query, count=1)[:6].lower().startswith(("select", "with", "values")):
        raise ValueError(f"export to {path}: 'query' must be a SELECT, got {query[:60]!r}")

    target = _confined(path, roots, f"export to {path}")
    old_watermark = _stored_watermark(ctx) if incremental else None
    directory, name = os.path.split(target)
    os.makedirs(directory, exist_ok=True)
    tmp = _confined(os.path.join(directory, f".{name}.{ctx.prcid}.tmp"), roots, f"export to {path}",
                    follow_last=False)
    rows, top = 0, None
    try:
        with _database(ctx, url, roots) as conn, _create_new(tmp, encoding) as f:
            writer = csv.writer(f, delimiter=delimiter)
            as_of = ctx.as_of.isoformat() if ctx.as_of is not None and conn.dialect.name == "sqlite" else ctx.as_of
            stmt = _with_watermark(sa.text(query), old_watermark)
            stmt = stmt.execution_options(stream_results=True, yield_per=batch_size)
            with _reported(f"export to {path}: the query failed"), conn.execute(stmt, {"as_of": as_of}) as result:
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
            watermark = top
            _store_watermark(ctx, top)
        if incremental and rows == 0 and not empty_file:
            os.remove(tmp)
            ctx.report(src=0, trg=0)
            ctx.logger.info("no new rows since watermark %s: no file written", _watermark_text(watermark))
            return {"path": None, "rows": 0, "watermark": _watermark_text(watermark)}
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    ctx.report(src=0, trg=rows)
    ctx.logger.info("exported %d rows to %s", rows, target)
    return {"path": target, "rows": rows, "watermark": _watermark_text(watermark)}


def _create_new(path: str, encoding: str):
    """Open ``path`` for writing as a new regular file: never through a symlink someone left
    there (O_NOFOLLOW), never appending to an old file (O_EXCL after removing a stale one)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o640)
    except FileExistsError:
        os.unlink(path)                       # a leftover of a killed run (or a planted link)
        fd = os.open(path, flags, 0o640)
    return os.fdopen(fd, "w", newline="", encoding=encoding)


# -- the watermark: stored as text with its type, bound as a literal of that type ------------------
def _stored_watermark(ctx: JobContext) -> Any:
    text = state.get(ctx.connection, ctx.mapref, WATERMARK_KEY)
    if text is None:
        return None
    kind = state.get(ctx.connection, ctx.mapref, WATERMARK_TYPE_KEY) or "text"
    try:
        if kind == "datetime":
            return datetime.fromisoformat(text)
        if kind == "date":
            return date.fromisoformat(text)
        if kind == "integer":
            return int(text)
        if kind == "number":
            return Decimal(text)
    except ValueError:
        pass                                  # edited by hand: compare it as text
    return text


def _store_watermark(ctx: JobContext, value: Any) -> None:
    if isinstance(value, datetime):
        kind = "datetime"
    elif isinstance(value, date):
        kind = "date"
    elif isinstance(value, int) and not isinstance(value, bool):
        kind = "integer"
    elif isinstance(value, (float, Decimal)):
        kind = "number"
    else:
        kind = "text"
    state.put(ctx.connection, ctx.mapref, WATERMARK_KEY, _watermark_text(value))
    state.put(ctx.connection, ctx.mapref, WATERMARK_TYPE_KEY, kind)


def _watermark_text(value: Any) -> str | None:
    if value is None:
        return None
    return value.isoformat() if isinstance(value, _TEMPORAL) else str(value)


def _with_watermark(stmt: sa.TextClause, watermark: Any) -> sa.TextClause:
    """Bind ``:watermark`` as an SQL literal of its type (NULL when there is none).

    Not a server-side parameter: PostgreSQL types a parameter at its first use, and in the usual
    ``:watermark IS NULL OR updated_at > :watermark`` that use gives it no type ("type of
    parameter 1 does not match that when preparing the plan"). A literal is typed by the
    dialect: a timestamp becomes ``TO_TIMESTAMP('...', 'YYYY-MM-DD HH24:MI:SS.FF')`` on Oracle
    (a plain string would be converted with the session's NLS format) and an untyped string
    elsewhere, which takes the type of the column it is compared with.
    """
    if isinstance(watermark, datetime):
        type_: sa.types.TypeEngine = sa.DateTime()
    elif isinstance(watermark, date):
        type_ = sa.Date()
    elif isinstance(watermark, int):
        type_ = sa.Integer()
    elif isinstance(watermark, Decimal):
        type_ = sa.Numeric()
    else:
        type_ = sa.String()
    try:
        return stmt.bindparams(sa.bindparam("watermark", watermark, type_=type_, literal_execute=True))
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

    - ``path`` (required; below a ``DMS_FILE_ROOTS`` directory; ``{as_of}``/``{run}``
      replaced), ``table`` (required; ``name`` or ``schema.name``).
    - ``columns``: mapping CSV header -> target column; only the mapped CSV columns are loaded,
      others are ignored. Default: every header name is a target column.
    - ``key``: target column(s) (list, or a comma-separated string) identifying a row; a
      reject's key value is these fields joined by ``|`` (without ``key``: the line number).
      Required for ``mode`` upsert.
    - ``mode``: ``insert`` (default) or ``upsert`` (update the row with the same key, insert it
      if there is none; the key needs no unique constraint).
    - ``batch_size`` (1000), ``max_rejects`` (0), ``connection`` (URL or ``env:DMS_CONN_NAME``;
      default the worker's database), ``delimiter`` (``,``), ``encoding`` (utf-8-sig: a BOM is
      skipped).

    The file is read as a stream. Header names are stripped of spaces and matched to the
    table's columns ignoring case. A missing or empty file, or a header that lacks a mapped
    column or names a column the table does not have, raises ValueError before anything is
    loaded; such a message quotes header names only where they are identifiers (a header line
    is file content). Blank lines are skipped. Empty fields become NULL; other values are
    passed as text and converted by the database -- except DATE and TIMESTAMP columns on
    Oracle, whose text would be converted with the session's NLS format: there a value is read
    as ISO 8601 here (``2026-01-31``, ``2026-01-31T10:00:00``; an offset is converted to UTC),
    and one that is not becomes a reject.

    Each batch is inserted with one executemany inside a SAVEPOINT; if the database refuses it
    (a constraint or a bad value), its rows are redone one by one, each in its own savepoint,
    and each refused row becomes a reject (``line N: <the database's message>``, also as
    dberrmsg: its first line, with quoted values replaced by "…" so that no cell's content is
    recorded). A row with the wrong number of fields is a reject too
    (``line N: expected X fields, got Y``). N is the line the record starts on (the header is
    line 1). Everything loads in one transaction: once the rejects exceed ``max_rejects`` the
    handler raises at once and the load is rolled back (the rejects still reach DMS_JOBERR).

    Reports ``src`` = data lines read, ``trg`` = rows inserted or updated (on success), ``err``
    = rejects; returns ``{"rows", "rejected"}``.
    """
    p = ctx.payload
    roots = _file_roots()
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
    source = _confined(path, roots, f"load of {path}")
    if not os.path.isfile(source):
        raise ValueError(f"load of {path}: file not found")

    with _database(ctx, url, roots) as conn, open(source, newline="", encoding=encoding) as f:
        reader = csv.reader(f, delimiter=delimiter)
        try:
            header = next(reader, None)
        except (csv.Error, UnicodeDecodeError) as exc:
            raise ValueError(f"load of {path}: line 1: cannot read the header: {_read_error(exc, encoding)}") from None
        if header is None:
            raise ValueError(f"load of {path}: the file is empty (no header line)")
        if not header:
            raise ValueError(f"load of {path}: line 1 is blank (expected the header line)")
        with _reported(f"load of {path}: cannot read the columns of {table}"):
            reflected = _reflect(conn, schema or None, name, path, table)
        table_columns = list(reflected)
        plan = _plan([h.strip() for h in header], mapping, table_columns, path, table)
        targets = [c for _, c in plan]
        converters = _converters(conn, {c: reflected[c] for c in targets})
        key_cols = [_resolve(k, targets, f"load of {path}: key column {k!r} is not among the loaded columns "
                                             f"({', '.join(targets)})") for k in key]
        loader = _Loader(ctx, conn, sa.table(name, *[sa.column(c) for c in targets], schema=schema or None),
                         key_cols, mode, max_rejects, f"{path} into {table}")
        key_fields = [next(i for i, c in plan if c == k) for k in key_cols]
        nfields, batch, line = len(header), [], reader.line_num + 1
        # A statement error that is not about one row (no privilege, a missing table) must not
        # reach result_payload as SQLAlchemy words it: with the bound rows, i.e. the file.
        with _reported(f"load of {path} into {table}: the database refused the load"):
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
                    row = {col: fields[i] or None for i, col in plan}
                    try:
                        for col, convert in converters.items():
                            if row[col] is not None:
                                row[col] = convert(row[col])
                    except _BadValue as exc:
                        loader.reject(keyvalue, start, str(exc))
                        continue
                    batch.append((start, keyvalue, row))
                    if len(batch) >= batch_size:
                        loader.flush(batch)
                        batch = []
            except (csv.Error, UnicodeDecodeError) as exc:
                raise ValueError(f"load of {path}: line {line}: {_read_error(exc, encoding)}") from None
            loader.flush(batch)
            if url:
                conn.commit()
    ctx.report(trg=loader.loaded)
    ctx.logger.info("loaded %d rows from %s into %s (%d rejected)", loader.loaded, path, table, loader.rejected)
    return {"rows": loader.loaded, "rejected": loader.rejected}


def _reflect(conn: sa.Connection, schema: str | None, name: str, path: str, table: str) -> dict[str, Any]:
    """The table's columns and their types (in the dialect's default schema unless given)."""
    try:
        columns = {c["name"]: c["type"] for c in sa.inspect(conn).get_columns(name, schema=schema)}
    except sa.exc.NoSuchTableError:
        columns = {}
    if not columns:
        raise ValueError(f"load of {path}: table {table} does not exist")
    return columns


class _BadValue(ValueError):
    """A cell that cannot be converted here: its row is rejected (the value is not echoed)."""


def _converters(conn: sa.Connection, types: dict[str, Any]) -> dict[str, Any]:
    """Per target column, a conversion of its text, where the database cannot be trusted with
    the text itself: Oracle converts text bound into DATE/TIMESTAMP with the session's
    NLS_DATE_FORMAT (DD-MON-RR by default, which no ISO date matches); python-oracledb thin
    mode ignores the client's NLS settings. Elsewhere the database parses ISO text itself."""
    if conn.dialect.name != "oracle":
        return {}
    return {col: _iso_temporal(col, isinstance(t, sa.DateTime)) for col, t in types.items()
            if isinstance(t, (sa.Date, sa.DateTime))}


def _iso_temporal(column: str, with_time: bool):
    def convert(text: str) -> date | datetime:
        try:
            value = datetime.fromisoformat(text.strip())
        except ValueError:
            raise _BadValue(f"column {column}: not an ISO 8601 date or timestamp") from None
        if value.tzinfo is not None:
            value = value.astimezone(timezone.utc).replace(tzinfo=None)
        return value if with_time else value.date()
    return convert


def _read_error(exc: BaseException, encoding: str) -> str:
    """What is wrong with the file's bytes, without quoting them."""
    if isinstance(exc, UnicodeDecodeError):
        return f"not valid {encoding} text at byte {exc.start} of the line"
    return str(exc)


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
        unknown = [i for i, h in enumerate(header) if not any(c.lower() == h.lower() for c in table_columns)]
        if unknown:
            raise ValueError(f"{where}: header column(s) {_header_names(header, unknown)} not in table {table} "
                             f"(its columns: {', '.join(table_columns)})")
        pairs = list(enumerate(header))
    else:
        missing = [src for src in mapping if src not in header]
        if missing:
            raise ValueError(f"{where}: the header lacks mapped column(s) {', '.join(missing)} "
                             f"(header: {_header_names(header, range(len(header)))})")
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


def _header_names(header: list[str], indexes) -> str:
    """Header names for a message: a name that is an identifier as is, anything else (a header
    line is the file's first line, whatever the file is) as its position only."""
    return ", ".join(header[i] if _IDENTIFIER.match(header[i]) and len(header[i]) <= 128
                     else f"#{i + 1} (not an identifier)" for i in indexes)


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
        except sa.exc.DatabaseError as exc:
            if not _row_error(exc):
                raise
        for line, keyvalue, row in batch:             # isolate the bad rows
            try:
                with self.conn.begin_nested():
                    n = self._write([row])
                self.loaded += n
            except sa.exc.DatabaseError as exc:
                if not _row_error(exc):
                    raise
                message = safe_db_message(exc)
                self.reject(keyvalue, line, message[:300], message)

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
        done = 0
        pending: list[dict[str, Any]] = []
        pending_keys: set[tuple[Any, ...]] = set()
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
@overload
def _text_option(p: dict[str, Any], name: str, required: Literal[True]) -> str: ...
@overload
def _text_option(p: dict[str, Any], name: str, required: bool = False) -> str | None: ...
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


# ---------------------------------------------------------------------------------------------
# the trust boundary: files, connections, messages
# ---------------------------------------------------------------------------------------------
def _file_roots() -> tuple[str, ...]:
    """DMS_FILE_ROOTS, resolved. In an execution process the replica has set it (and
    DMS_CONN_*) to what it resolved from its environment and --env-file."""
    try:
        roots = Config.from_env().file_roots
    except ConfigError as exc:
        raise ValueError(f"configuration: {exc}") from None
    if not roots:
        raise ValueError(f"file jobs are refused until {FILE_ROOTS_VAR} names the directories they may read and "
                         "write (docs/jobs.md)")
    return tuple(os.path.realpath(r) for r in roots)


def _confined(path: str, roots: tuple[str, ...], what: str, follow_last: bool = True) -> str:
    """``path`` fully resolved (``..``, symlinks, relative to the working directory), if it lies
    below one of ``roots``; else ValueError. The resolved path is what the caller opens.
    ``follow_last=False`` resolves the directory only: for a file that is created anew (and a
    symlink at its name replaced, never followed)."""
    if "\x00" in path:
        raise ValueError(f"{what}: the path contains a NUL character")
    if follow_last:
        real = os.path.realpath(path)
    else:
        real = os.path.join(os.path.realpath(os.path.dirname(path) or "."), os.path.basename(path))
    for root in roots:
        if real != root and os.path.commonpath([real, root]) == root:
            return real
    raise ValueError(f"{what}: the path is outside {FILE_ROOTS_VAR} (after resolving '..' and symlinks)")


def _row_error(exc: sa.exc.DatabaseError) -> bool:
    """The database refused this row (a constraint, a value), not the load as a whole."""
    if isinstance(exc, _ROW_ERRORS):
        return True
    orig = getattr(exc, "orig", None)
    error = orig.args[0] if orig is not None and getattr(orig, "args", None) else None
    return getattr(error, "full_code", None) in _ORACLE_ROW_ERRORS


# A quoted word right after one of these names a database object: kept. Any other quoted text
# (after ': ', 'value', 'containing', ...) is data -- PostgreSQL's `invalid input syntax for type
# integer: "<cell>"`, Oracle 23ai's `ORA-01722: unable to convert string value containing '<cell>'`.
_OBJECT_WORDS = re.compile(r"(\b(column|relation|constraint|table|index|type|schema|function|domain|sequence|view|"
                           r"trigger)\s*|[.(]\s*)$", re.IGNORECASE)
_QUOTED = re.compile(r'"(?:[^"]|"")*"|\'(?:[^\']|\'\')*\'')


def safe_db_message(exc: BaseException) -> str:
    """The database's message about ``exc`` for DMS_JOBERR/result_payload: its first line
    (details such as PostgreSQL's `Failing row contains (...)` quote whole rows), with quoted
    data replaced by "…" and quoted object names kept."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    first = text.splitlines()[0].strip() if text else type(exc).__name__
    out, pos = [], 0
    for m in _QUOTED.finditer(first):
        quote = m.group(0)[0]
        keep = quote == '"' and _OBJECT_WORDS.search(first[:m.start()])
        out.append(first[pos:m.start()] + (m.group(0) if keep else f"{quote}…{quote}"))
        pos = m.end()
    return "".join(out) + first[pos:]


class _DatabaseText:
    """Stands in for a database exception as ``.orig``: the executor writes ``str(.orig)`` to
    DMS_JOBERR.dberrmsg."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return self.text


class JobDatabaseError(RuntimeError):
    """A database error of a file job, with a message that quotes no data."""

    def __init__(self, message: str, db_message: str) -> None:
        super().__init__(f"{message}: {db_message}")
        self.orig = _DatabaseText(db_message)


@contextlib.contextmanager
def _reported(message: str) -> Iterator[None]:
    """Database errors in the block become JobDatabaseError: the query of an export can fail on
    a value (a cast, a function), and the database's message would quote it."""
    try:
        yield
    except sa.exc.DBAPIError as exc:
        raise JobDatabaseError(message, safe_db_message(exc)) from None


def _engine(url: str, roots: tuple[str, ...]) -> sa.Engine:
    """An engine for ``connection``: a URL, or ``env:DMS_CONN_NAME``. Errors never quote the URL
    (it may hold a password) nor read any other variable of the replica's environment."""
    if url.startswith("env:"):
        var = url[4:]
        if not var.startswith(CONNECTION_PREFIX) or var == CONNECTION_PREFIX:
            raise ValueError(f"option 'connection': env: may only name a {CONNECTION_PREFIX}* variable, "
                             f"not {var[:60]!r}")
        url = Config.from_env().connections.get(var, "")
        if not url:
            raise ValueError(f"option 'connection': environment variable {var} is not set")
    try:
        parsed = sa.engine.make_url(url)
    except Exception:  # noqa: BLE001 - ArgumentError quotes the URL, password included
        raise ValueError("option 'connection': not a valid SQLAlchemy URL") from None
    if parsed.get_backend_name() == "sqlite" and parsed.database not in (None, "", ":memory:"):
        # A SQLite URL names a file, which SQLite creates if it is missing: confine it too.
        parsed = parsed.set(database=_confined(parsed.database, roots, "option 'connection'"))
    try:
        engine = sa.create_engine(parsed, poolclass=NullPool, hide_parameters=True)
    except Exception as exc:  # noqa: BLE001 - e.g. an unknown driver; keep the URL out of it
        raise ValueError(f"option 'connection': cannot use this URL ({type(exc).__name__})") from None
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
def _database(ctx: JobContext, url: str | None, roots: tuple[str, ...]) -> Iterator[sa.Connection]:
    """The worker's connection (in the execution's transaction), or one to ``url`` that is
    closed (and so rolled back unless committed) on the way out."""
    if not url:
        yield ctx.connection
        return
    engine = _engine(url, roots)
    try:
        with _reported("option 'connection': cannot connect"):
            conn = engine.connect()
        with conn:
            yield conn
    finally:
        engine.dispose()
