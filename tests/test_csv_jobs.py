"""The built-in CSV handlers (worker.jobs.csv): export and load, on SQLite and PostgreSQL.

Most tests call the handlers in-process with a JobContext built here and commit or roll back its
connection the way the execution process does; the last one runs a load through a real replica.
"""
from __future__ import annotations

import json
import logging
import os
from datetime import date
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.support import Replica, wait_until
from worker import client
from worker import schema as s
from worker.drivers import make_driver
from worker.jobs import csv as csvjobs
from worker.jobs import state
from worker.jobs.context import JobCancelled, JobContext

AS_OF = date(2026, 11, 1)


@pytest.fixture(autouse=True)
def file_roots(tmp_path, monkeypatch):
    """File jobs are refused until DMS_FILE_ROOTS is set: these tests may use tmp_path."""
    monkeypatch.setenv("DMS_FILE_ROOTS", str(tmp_path))
    return tmp_path


@pytest.fixture
def db(db_url):
    """The test database through the worker's own driver engine; tables made here are dropped."""
    driver = make_driver(db_url)
    created: list[str] = []

    class Db:
        engine = driver.engine
        dialect = driver.engine.dialect.name
        url = db_url

        def create(self, name: str, pg_ddl: str, sqlite_ddl: str | None = None) -> None:
            created.append(name)
            with self.engine.begin() as conn:
                conn.exec_driver_sql(f"CREATE TABLE {name} {sqlite_ddl if self.dialect == 'sqlite' and sqlite_ddl else pg_ddl}")

        def execute(self, sql: str, params=None):
            with self.engine.begin() as conn:
                result = conn.execute(sa.text(sql), params or {})
                return result.all() if result.returns_rows else None

    yield Db()
    with driver.engine.begin() as conn:
        for name in created:
            conn.exec_driver_sql(f"DROP TABLE IF EXISTS {name}")
    driver.dispose()


def make_ctx(db, prcid: int = 1, mapref: str = "CSV", as_of: date | None = AS_OF, **payload) -> JobContext:
    return JobContext(request_id=f"req-{prcid}", mapref=mapref, request_type="IMMEDIATE", prcid=prcid, attempt=1,
                      params={}, payload=payload, as_of=as_of, logger=logging.getLogger("test.csv"),
                      _connect=lambda: db.engine.connect())


def run(handler, ctx: JobContext):
    """What the execution process does: commit if the handler returns, roll back if it raises."""
    try:
        result = handler(ctx)
        if ctx._connection is not None and ctx._connection.in_transaction():
            ctx._connection.commit()
        return result
    except BaseException:
        if ctx._connection is not None:
            ctx._connection.rollback()
        raise
    finally:
        if ctx._connection is not None:
            ctx._connection.close()


def count_batches(ctx: JobContext, on_call=None) -> list[int]:
    """Wrap ctx.check_cancelled (called once per batch) to count calls and act on the n-th."""
    calls, original = [0], ctx.check_cancelled

    def check() -> None:
        calls[0] += 1
        if on_call:
            on_call(calls[0])
        original()

    ctx.check_cancelled = check
    return calls


# ---------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------
SRC_DDL = "(id INTEGER PRIMARY KEY, name VARCHAR(40), qty INTEGER, created TIMESTAMP, note VARCHAR(40))"


def _name(i: int) -> str:
    return {7: 'a,b "q"', 8: "line\nbreak"}.get(i % 1000, f"n{i}")


def fill_source(db, n: int) -> None:
    db.create("csv_src", SRC_DDL)
    # ISO text with a T: PostgreSQL parses it, SQLite keeps it; both export the same text.
    rows = [dict(id=i, name=_name(i), qty=i * 3, created=f"2026-01-01T{i // 3600 % 24:02d}:{i // 60 % 60:02d}:{i % 60:02d}",
                 note=None if i % 3 == 0 else f"note {i}") for i in range(1, n + 1)]
    db.execute("INSERT INTO csv_src (id, name, qty, created, note) VALUES (:id, :name, :qty, :created, :note)", rows)


def expected_csv(ids, header=True) -> str:
    def quote(v: str) -> str:
        return '"' + v.replace('"', '""') + '"' if any(c in v for c in ',"\n\r') else v
    lines = ["id,name,qty,created,note"] if header else []
    for i in ids:
        lines.append(",".join([str(i), quote(_name(i)), str(i * 3),
                               f"2026-01-01T{i // 3600 % 24:02d}:{i // 60 % 60:02d}:{i % 60:02d}",
                               "" if i % 3 == 0 else f"note {i}"]))
    return "".join(line + "\r\n" for line in lines)


def test_export_10000_rows_in_batches_of_1000(db, tmp_path):
    fill_source(db, 10_000)
    target = tmp_path / "out" / "src.csv"            # the directory does not exist yet
    ctx = make_ctx(db, query="SELECT id, name, qty, created, note FROM csv_src ORDER BY id",
                   path=str(target), batch_size=1000)
    batches = count_batches(ctx)
    result = run(csvjobs.export, ctx)
    assert result == {"path": str(target), "rows": 10_000, "watermark": None}
    assert target.read_bytes() == expected_csv(range(1, 10_001)).encode()
    assert batches[0] == 10, "one cancellation check per batch of 1,000"
    assert (ctx.srcrows, ctx.trgrows, ctx.errrows) == (10_000, 10_000, None)
    assert sorted(p.name for p in target.parent.iterdir()) == ["src.csv"]


def test_export_options_placeholders_and_as_of(db, tmp_path):
    fill_source(db, 5)
    ctx = make_ctx(db, prcid=42, query="SELECT id, :as_of AS as_of, note FROM csv_src WHERE id <= 2 ORDER BY id",
                   path=str(tmp_path / "x_{as_of}_{run}.csv"), delimiter=";", header=False)
    result = run(csvjobs.export, ctx)
    assert result["path"] == str(tmp_path / "x_2026-11-01_42.csv")
    assert Path(result["path"]).read_bytes() == b"1;2026-11-01;note 1\r\n2;2026-11-01;note 2\r\n"
    with pytest.raises(ValueError, match="'query' must be a SELECT"):
        run(csvjobs.export, make_ctx(db, query="DELETE FROM csv_src", path=str(tmp_path / "y.csv")))
    with pytest.raises(ValueError, match="option 'path' is required"):
        run(csvjobs.export, make_ctx(db, query="SELECT 1"))
    assert db.execute("SELECT count(*) FROM csv_src")[0][0] == 5


def test_export_stopped_midway_leaves_no_file_and_the_old_one_untouched(db, tmp_path):
    fill_source(db, 10_000)
    tmp_path = tmp_path / "out"             # the SQLite database lives in tmp_path itself
    tmp_path.mkdir()
    target = tmp_path / "src.csv"
    target.write_text("old contents\n")
    tmp = tmp_path / ".src.csv.7.tmp"
    ctx = make_ctx(db, prcid=7, query="SELECT id, name, qty, created, note FROM csv_src ORDER BY id",
                   path=str(target), batch_size=1000)
    seen = {}

    def on_batch(n: int) -> None:
        if n == 2:   # mid-way: the rows so far are in the temporary file only
            seen.update(tmp=tmp.exists() and tmp.stat().st_size > 0, target=target.read_text())
        if n == 3:
            ctx._cancel.set()

    batches = count_batches(ctx, on_batch)
    with pytest.raises(JobCancelled):
        run(csvjobs.export, ctx)
    assert seen == {"tmp": True, "target": "old contents\n"}
    assert batches[0] == 3
    assert target.read_text() == "old contents\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.csv"], "no temporary file left"
    assert ctx.trgrows is None


def test_export_query_failing_midway_leaves_no_file(db, tmp_path):
    fill_source(db, 10_000)
    tmp_path = tmp_path / "out"
    tmp_path.mkdir()
    target = tmp_path / "src.csv"
    target.write_text("old contents\n")
    # Row 5000 raises in the database while the rows are being fetched.
    boom = "100 / (id - 5000)" if db.dialect == "postgresql" else "CASE WHEN id = 5000 THEN json('not json') ELSE id END"
    ctx = make_ctx(db, query=f"SELECT id, {boom} AS x FROM csv_src ORDER BY id", path=str(target), batch_size=1000)
    batches = count_batches(ctx)
    with pytest.raises(csvjobs.JobDatabaseError, match=r"^export to .*: the query failed: "):
        run(csvjobs.export, ctx)
    assert batches[0] >= 1, "the error came after some batches had been written"
    assert target.read_text() == "old contents\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.csv"]


def test_incremental_export_keeps_a_watermark_across_runs(db, tmp_path):
    db.create("csv_inc", "(id INTEGER PRIMARY KEY, updated_at TIMESTAMP)")
    db.execute("INSERT INTO csv_inc VALUES (:id, :ts)", [dict(id=i, ts=f"2026-01-01T10:00:0{i}") for i in range(1, 6)])
    opts = dict(mapref="INC", query="SELECT id, updated_at FROM csv_inc "
                                    "WHERE :watermark IS NULL OR updated_at > :watermark ORDER BY id",
                path=str(tmp_path / "inc_{run}.csv"), incremental="updated_at", batch_size=2)

    def stored():
        with db.engine.connect() as conn:
            return state.get(conn, "INC", "watermark")

    first = run(csvjobs.export, make_ctx(db, prcid=1, **opts))
    assert first["rows"] == 5 and first["watermark"] == "2026-01-01T10:00:05" == stored()
    assert (tmp_path / "inc_1.csv").read_text().splitlines()[1:] == [f"{i},2026-01-01T10:00:0{i}" for i in range(1, 6)]

    db.execute("INSERT INTO csv_inc VALUES (:id, :ts)", [dict(id=i, ts=f"2026-01-01T11:00:0{i}") for i in (6, 7)])
    db.execute("UPDATE csv_inc SET updated_at = '2026-01-01T10:30:00' WHERE id = 2")
    second = run(csvjobs.export, make_ctx(db, prcid=2, **opts))
    assert second == {"path": str(tmp_path / "inc_2.csv"), "rows": 3, "watermark": "2026-01-01T11:00:07"}
    assert (tmp_path / "inc_2.csv").read_text().splitlines() == [
        "id,updated_at", "2,2026-01-01T10:30:00", "6,2026-01-01T11:00:06", "7,2026-01-01T11:00:07"]
    assert stored() == "2026-01-01T11:00:07"

    third_ctx = make_ctx(db, prcid=3, **opts)                          # nothing new: no file, 0 rows
    third = run(csvjobs.export, third_ctx)
    assert third == {"path": None, "rows": 0, "watermark": "2026-01-01T11:00:07"} and stored() == third["watermark"]
    assert not (tmp_path / "inc_3.csv").exists()
    assert (third_ctx.srcrows, third_ctx.trgrows) == (0, 0), "DMS_JOBLOG records 0 rows, not NULL"
    kept = run(csvjobs.export, make_ctx(db, prcid=33, **dict(opts, empty_file=True)))   # the old behaviour, asked for
    assert kept["rows"] == 0 and (tmp_path / "inc_33.csv").read_bytes() == b"id,updated_at\r\n"

    with pytest.raises(ValueError, match="incremental column 'nope' is not in the query's result"):
        run(csvjobs.export, make_ctx(db, prcid=4, **dict(opts, incremental="nope")))
    assert stored() == "2026-01-01T11:00:07"


# ---------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------
TGT_PG = "(id INTEGER PRIMARY KEY, code VARCHAR(5), qty INTEGER NOT NULL, day DATE)"
TGT_SQLITE = "(id INTEGER PRIMARY KEY, code TEXT, qty INTEGER NOT NULL, day TEXT) STRICT"   # STRICT: types enforced

MALFORMED = (
    "id,code,qty,day\n"              # 1
    "1,AAA,10,2026-01-01\n"          # 2
    "2,BBB,x,2026-01-02\n"           # 3  not an integer
    "3,CCC,30\n"                     # 4  3 fields
    "4,DDD,40,2026-01-04\n"          # 5
    "1,DUP,50,2026-01-05\n"          # 6  duplicate of line 2 (an earlier batch)
    '5,"E,E",60,2026-01-06\n'        # 7
    "6,,70,\n"                       # 8  empty -> NULL
    "7,GGG,,2026-01-07\n"            # 9  NULL qty: NOT NULL
    "\n"                             # 10 blank: skipped
    "8,TOOLONG,80,2026-01-08\n"      # 11 over VARCHAR(5): PostgreSQL only
    '9,"a\nb",90,2026-01-09\n'       # 12-13 one record over two lines
    "10,JJJ,100,2026-01-10,extra\n"  # 14 5 fields
    "9,DUP2,1,2026-01-11\n"          # 15 duplicate of line 12
    "11,KKK,110,2026-01-12\n"        # 16
    "11,LLL,111,2026-01-13\n"        # 17 duplicate of line 16, in the same batch
)


def load_rows(db, table="csv_tgt"):
    return db.execute(f"SELECT id, code, qty, day FROM {table} ORDER BY id")


def test_load_rejects_each_bad_row_with_its_line_and_key(db, tmp_path):
    db.create("csv_tgt", TGT_PG, TGT_SQLITE)
    path = tmp_path / "in.csv"
    path.write_text(MALFORMED)
    ctx = make_ctx(db, path=str(path), table="csv_tgt", key=["id"], batch_size=3, max_rejects=100)
    batches = count_batches(ctx)
    pg = db.dialect == "postgresql"
    result = run(csvjobs.load, ctx)

    loaded = [1, 4, 5, 6, 9, 11] if pg else [1, 4, 5, 6, 8, 9, 11]
    assert result == {"rows": len(loaded), "rejected": 14 - len(loaded)}
    assert (ctx.srcrows, ctx.trgrows, ctx.errrows) == (14, len(loaded), 14 - len(loaded))
    assert batches[0] == 5, "4 batches of 3 rows, then the empty tail"
    rows = {r[0]: tuple(r[1:3]) for r in load_rows(db)}
    assert sorted(rows) == loaded
    assert rows[5] == ("E,E", 60) and rows[6] == (None, 70) and rows[9] == ("a\nb", 90) and rows[11] == ("KKK", 110)
    assert db.execute("SELECT day FROM csv_tgt WHERE id = 6")[0][0] is None

    rejects = {kv: (msg, dbmsg) for kv, msg, dbmsg in ctx.rejects}
    expected = {"2": ("line 3: ", "invalid input syntax for type integer" if pg else "cannot store TEXT value in INTEGER column"),
                "3": ("line 4: expected 4 fields, got 3", None),
                "1": ("line 6: ", "duplicate key value" if pg else "UNIQUE constraint failed"),
                "7": ("line 9: ", "null value in column" if pg else "NOT NULL constraint failed"),
                "10": ("line 14: expected 4 fields, got 5", None),
                "9": ("line 15: ", "duplicate key value" if pg else "UNIQUE constraint failed"),
                "11": ("line 17: ", "duplicate key value" if pg else "UNIQUE constraint failed")}
    if pg:
        expected["8"] = ("line 11: ", "value too long for type character varying(5)")
    assert set(rejects) == set(expected)
    for kv, (msg, dbmsg) in expected.items():
        got_msg, got_db = rejects[kv]
        assert got_msg.startswith(msg), (kv, got_msg)
        if dbmsg is None:
            assert got_msg == msg and got_db is None
        else:
            assert dbmsg in got_db, (kv, got_db)
            assert got_msg == f"{msg}{got_db.splitlines()[0]}", "errmsg: the line and the first line of the database message"


def test_load_without_key_uses_the_line_number_and_empty_is_null(db, tmp_path):
    db.create("csv_tgt", TGT_PG, TGT_SQLITE)
    path = tmp_path / "in.csv"
    path.write_text("\ufeffID , Qty,CODE\r\n1,5,\r\n2,6\r\n")     # BOM, spaces and case in the header
    ctx = make_ctx(db, path=str(path), table="csv_tgt", max_rejects=1)
    assert run(csvjobs.load, ctx) == {"rows": 1, "rejected": 1}
    assert ctx.rejects == [("3", "line 3: expected 3 fields, got 2", None)]
    assert load_rows(db) == [(1, None, 5, None)]


def test_load_over_max_rejects_raises_and_rolls_everything_back(db, tmp_path):
    db.create("csv_tgt", TGT_PG, TGT_SQLITE)
    path = tmp_path / "in.csv"
    path.write_text(MALFORMED)
    ctx = make_ctx(db, path=str(path), table="csv_tgt", key=["id"], batch_size=3, max_rejects=2)
    with pytest.raises(csvjobs.RejectLimitExceeded, match=r"^3 rejected rows exceed max_rejects=2 "):
        run(csvjobs.load, ctx)
    assert load_rows(db) == []
    # Line 4 (field count) is rejected as read, lines 3 and 6 when their batch is written.
    assert [r[0] for r in ctx.rejects] == ["3", "2", "1"] and ctx.errrows == 3 and ctx.trgrows is None


def test_load_upsert_updates_existing_keys(db, tmp_path):
    db.create("csv_tgt", TGT_PG, TGT_SQLITE)
    db.execute("INSERT INTO csv_tgt (id, code, qty) VALUES (1, 'OLD', 1), (2, 'OLD', 2)")
    path = tmp_path / "in.csv"
    path.write_text("Code,ID,Qty,comment\nNEW,2,20,x\nNEW,3,30,y\nNEWER,3,31,z\nNEW,4,40,\n")
    schema = "public" if db.dialect == "postgresql" else "main"
    ctx = make_ctx(db, path=str(path), table=f"{schema}.csv_tgt", mode="upsert", key="id",
                   columns={"ID": "id", "Code": "code", "Qty": "qty"})       # "comment" is not loaded
    assert run(csvjobs.load, ctx) == {"rows": 4, "rejected": 0}
    assert load_rows(db) == [(1, "OLD", 1, None), (2, "NEW", 20, None), (3, "NEWER", 31, None), (4, "NEW", 40, None)]
    # Row by row after a failed batch (the NULL qty) keeps the same meaning.
    path.write_text("ID,Code,Qty\n2,AGAIN,21\n5,BAD,\n5,FIVE,50\n")
    ctx = make_ctx(db, path=str(path), table="csv_tgt", mode="upsert", key=["ID"], max_rejects=1,
                   columns={"ID": "id", "Code": "code", "Qty": "qty"})
    assert run(csvjobs.load, ctx) == {"rows": 2, "rejected": 1}
    assert ctx.rejects[0][0] == "5" and ctx.rejects[0][1].startswith("line 3: ")
    assert load_rows(db)[1:] == [(2, "AGAIN", 21, None), (3, "NEWER", 31, None), (4, "NEW", 40, None), (5, "FIVE", 50, None)]


@pytest.mark.parametrize("content, options, message", [
    (None, {}, r"load of .*in\.csv: file not found$"),
    ("", {}, r"load of .*in\.csv: the file is empty \(no header line\)$"),
    ("id,code,colour\n1,a,red\n", {}, r"load of .*in\.csv: header column\(s\) colour not in table csv_tgt"),
    ("id,code\n1,a\n", {"columns": {"ID": "id", "code": "code"}}, r"header lacks mapped column\(s\) ID"),
    ("id,code\n1,a\n", {"columns": {"id": "id", "code": "colour"}}, r"column 'colour' is not in table csv_tgt"),
    ("id,code\n1,a\n", {"mode": "upsert"}, r"mode upsert needs 'key'"),
    ("id,code\n1,a\n", {"table": "csv_tgt; DROP TABLE x"}, r"is not a valid \[schema\.\]name identifier"),
    ("id,code\n1,a\n", {"table": "no_such_table"}, r"table no_such_table does not exist"),
])
def test_load_bad_file_or_header_raises_a_clear_value_error(db, tmp_path, content, options, message):
    db.create("csv_tgt", TGT_PG, TGT_SQLITE)
    path = tmp_path / "in.csv"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        run(csvjobs.load, make_ctx(db, **{"path": str(path), "table": "csv_tgt", **options}))
    assert "\n" not in str(info.value)
    assert load_rows(db) == []


def test_other_database_through_a_url_or_an_environment_variable(db, tmp_path, monkeypatch):
    fill_source(db, 3)
    db.create("csv_tgt2", "(id INTEGER PRIMARY KEY, name VARCHAR(40), qty INTEGER, created TIMESTAMP, note VARCHAR(40))")
    monkeypatch.setenv("DMS_CONN_CSV_TEST_SOURCE", db.url)
    out = tmp_path / "src.csv"
    run(csvjobs.export, make_ctx(db, connection="env:DMS_CONN_CSV_TEST_SOURCE", path=str(out),
                                 query="SELECT id, name, qty, created, note FROM csv_src ORDER BY id"))
    assert out.read_bytes() == expected_csv([1, 2, 3]).encode()
    ctx = make_ctx(db, connection=db.url, path=str(out), table="csv_tgt2")
    assert run(csvjobs.load, ctx) == {"rows": 3, "rejected": 0}
    assert ctx._connection is None, "the worker's connection was not used"
    assert db.execute("SELECT id, name, note FROM csv_tgt2 ORDER BY id") == [(1, "n1", "note 1"), (2, "n2", "note 2"),
                                                                           (3, "n3", None)]


# ---------------------------------------------------------------------------------------------
# through a real replica
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("where", ["payload", "job_params"])
def test_import_through_a_replica_records_rejects_and_counts(db, tmp_path, replicas, where):
    """Options in DMS_JOB.params, the request overriding one the job declares overridable; and
    the same options in a request's payload, which a request may not set (the trust boundary)."""
    db.create("csv_e2e", "(id INTEGER PRIMARY KEY, code VARCHAR(5), qty INTEGER NOT NULL)")
    path = tmp_path / "e2e.csv"
    path.write_text("id,code,qty\n1,A,1\n2,B\n3,C,3\n1,DUP,4\n4,D,\n5,E,5\n")
    options = dict(path=str(path), table="csv_e2e", key=["id"], max_rejects=5, batch_size=2)
    engine = sa.create_engine(db.url)
    try:
        client.register_job(engine, "CSV_IMPORT", "worker.jobs.csv:load")
        if where == "job_params":
            with engine.begin() as conn:
                conn.execute(sa.text("UPDATE dms_job SET params = :json WHERE mapref = :m"),
                             {"json": json.dumps(dict(options, max_rejects=0, overridable=["max_rejects"])),
                              "m": "CSV_IMPORT"})
        (r,) = replicas(1, DMS_HEARTBEAT_INTERVAL="0.5", SCHEDULER_POLL_INTERVAL="0.5", DMS_FILE_ROOTS=str(tmp_path))
        rid = client.enqueue(engine, "CSV_IMPORT", payload=options if where == "payload" else {"max_rejects": 5})
        final = wait_until(lambda: (client.request_status(engine, rid)["status"] in s.TERMINAL_STATUSES
                                    and client.request_status(engine, rid)), 60, "the import to end")
        if where == "payload":
            assert final["status"] == s.FAILED
            assert "may not be set by a request" in json.loads(final["result_payload"])["error"]
            with engine.connect() as conn:
                assert conn.execute(sa.text("SELECT count(*) FROM csv_e2e")).scalar() == 0
            return
        assert final["status"] == s.DONE, final["result_payload"]
        assert json.loads(final["result_payload"])["result"] == {"rows": 3, "rejected": 3}
        # What a DBA types (the README's example): the result is stored once, as JSON, not as a string.
        rows_sql = {"postgresql": "SELECT result_payload::json->'result'->>'rows' FROM dms_prcreq WHERE request_id = :r",
                    "sqlite": "SELECT json_extract(result_payload, '$.result.rows') FROM dms_prcreq WHERE request_id = :r",
                    "oracle": "SELECT JSON_VALUE(result_payload, '$.result.rows') FROM dms_prcreq WHERE request_id = :r"}
        with engine.connect() as conn:
            assert str(conn.execute(sa.text(rows_sql[db.dialect]), {"r": rid}).scalar()) == "3"
        with engine.connect() as conn:
            prcid = conn.execute(sa.select(s.prclog.c.prcid).where(s.prclog.c.request_id == rid)).scalar_one()
            errs = conn.execute(sa.select(s.joberr.c.errtyp, s.joberr.c.keyvalue, s.joberr.c.errmsg)
                                .where(s.joberr.c.prcid == prcid).order_by(s.joberr.c.errid)).all()
            log = conn.execute(sa.select(s.joblog.c.srcrows, s.joblog.c.trgrows, s.joblog.c.errrows)
                               .where(s.joblog.c.prcid == prcid)).one()
            ids = conn.execute(sa.text("SELECT id FROM csv_e2e ORDER BY id")).scalars().all()
    finally:
        engine.dispose()
    assert [(e.errtyp, e.keyvalue) for e in errs] == [("RECORD", "2"), ("RECORD", "1"), ("RECORD", "4")]
    assert [e.errmsg.split(":")[0] for e in errs] == ["line 3", "line 5", "line 6"]
    assert errs[0].errmsg == "line 3: expected 3 fields, got 2"
    assert tuple(log) == (6, 3, 3)
    assert ids == [1, 3, 5]
    r.alive_or_fail()


@pytest.mark.slow
def test_file_roots_and_connections_from_an_env_file_reach_the_execution_processes(db, tmp_path, db_url,
                                                                                   monkeypatch):
    """DMS_FILE_ROOTS and DMS_CONN_* only in the file given to --env-file (none in the
    environment, none in the working directory): the jobs see what the replica resolved."""
    fill_source(db, 2)
    monkeypatch.delenv("DMS_FILE_ROOTS")
    env_file = tmp_path / "prod.env"
    env_file.write_text(f"DMS_FILE_ROOTS={tmp_path}\nDMS_CONN_CSV_SOURCE={db.url}\n")
    out = tmp_path / "exported.csv"
    engine = sa.create_engine(db.url)
    replica = Replica(db_url, "envfile", tmp_path, run_args=("--env-file", str(env_file)),
                      DMS_HEARTBEAT_INTERVAL="0.5", SCHEDULER_POLL_INTERVAL="0.5", DMS_CONN_FROM_PROCESS="sqlite://")
    try:
        client.register_job(engine, "CSV_EXPORT_ENV", "worker.jobs.csv:export", params={
            "path": str(out), "connection": "env:DMS_CONN_CSV_SOURCE",
            "query": "SELECT id, name, qty, created, note FROM csv_src ORDER BY id"})
        client.register_job(engine, "CSV_EXPORT_PROCESS", "worker.jobs.csv:export", params={
            "path": str(tmp_path / "process.csv"), "connection": "env:DMS_CONN_FROM_PROCESS", "query": "SELECT 1"})
        replica.start()
        rid = client.enqueue(engine, "CSV_EXPORT_ENV")
        other = client.enqueue(engine, "CSV_EXPORT_PROCESS")
        final = wait_until(lambda: all(client.request_status(engine, r)["status"] in s.TERMINAL_STATUSES
                                       for r in (rid, other)), 60, "the exports to end")
        assert final
        done = client.request_status(engine, rid)
        assert done["status"] == s.DONE, done["result_payload"]
        assert out.read_bytes() == expected_csv([1, 2]).encode()
        # A DMS_CONN_* of the replica's own environment is still honoured beside the file's.
        assert client.request_status(engine, other)["status"] == s.DONE
    finally:
        replica.stop()
        engine.dispose()


# ---------------------------------------------------------------------------------------------
# the trust boundary (issue 10, item 1): files only below DMS_FILE_ROOTS, no secrets echoed
# ---------------------------------------------------------------------------------------------
SECRET = "hunter2-s3cret"


@pytest.fixture
def outside(tmp_path_factory):
    """A directory outside DMS_FILE_ROOTS holding what an attacker would want: a .env file."""
    d = tmp_path_factory.mktemp("outside")
    (d / ".env").write_text(f"DB_PASSWORD={SECRET}\nDMS_DATABASE_URL=postgresql://u:{SECRET}@h/db\n")
    return d


def test_file_jobs_are_refused_until_roots_are_configured(db, tmp_path, monkeypatch):
    monkeypatch.delenv("DMS_FILE_ROOTS")
    fill_source(db, 2)
    with pytest.raises(ValueError, match="file jobs are refused until DMS_FILE_ROOTS names the directories"):
        run(csvjobs.export, make_ctx(db, query="SELECT id FROM csv_src", path=str(tmp_path / "x.csv")))
    with pytest.raises(ValueError, match="file jobs are refused until DMS_FILE_ROOTS"):
        run(csvjobs.load, make_ctx(db, path=str(tmp_path / "x.csv"), table="csv_src"))
    assert not (tmp_path / "x.csv").exists()


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlinked file", "symlinked directory"])
def test_paths_are_confined_to_the_roots_after_resolving_dotdot_and_symlinks(db, tmp_path, outside, how):
    db.create("csv_tgt", TGT_PG, TGT_SQLITE)
    fill_source(db, 2)
    root = tmp_path
    (root / "in").mkdir()
    if how == "absolute":
        read, write = outside / ".env", outside / "written.csv"
    elif how == "dotdot":
        read = root / "in" / ".." / ".." / outside.name / ".env"
        write = root / "in" / ".." / ".." / outside.name / "written.csv"
        assert os.path.realpath(read) == str(outside / ".env")
    elif how == "symlinked file":
        (root / "in" / "link.csv").symlink_to(outside / ".env")
        (root / "in" / "out.csv").symlink_to(outside / "written.csv")
        read, write = root / "in" / "link.csv", root / "in" / "out.csv"
    else:
        (root / "in" / "elsewhere").symlink_to(outside, target_is_directory=True)
        read, write = root / "in" / "elsewhere" / ".env", root / "in" / "elsewhere" / "written.csv"
    with pytest.raises(ValueError, match="the path is outside DMS_FILE_ROOTS") as info:
        run(csvjobs.load, make_ctx(db, path=str(read), table="csv_tgt"))
    assert SECRET not in str(info.value)
    with pytest.raises(ValueError, match="the path is outside DMS_FILE_ROOTS"):
        run(csvjobs.export, make_ctx(db, query="SELECT id FROM csv_src", path=str(write)))
    assert sorted(p.name for p in outside.iterdir()) == [".env"], "nothing written outside the roots"
    assert load_rows(db) == []


def test_a_symlink_planted_at_the_temporary_name_is_not_followed(db, tmp_path, outside):
    fill_source(db, 3)
    victim = outside / "victim.txt"
    victim.write_text("untouched\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / ".x.csv.9.tmp").symlink_to(victim)          # where export 9 writes first
    result = run(csvjobs.export, make_ctx(db, prcid=9, query="SELECT id FROM csv_src ORDER BY id",
                                          path=str(tmp_path / "out" / "x.csv")))
    assert result["rows"] == 3 and victim.read_text() == "untouched\n"
    assert (tmp_path / "out" / "x.csv").read_text().splitlines() == ["id", "1", "2", "3"]
    assert not (tmp_path / "out" / ".x.csv.9.tmp").exists()


def test_a_header_that_is_not_an_identifier_is_not_echoed(db, tmp_path):
    db.create("csv_tgt", TGT_PG, TGT_SQLITE)
    env_like = tmp_path / "settings.csv"                  # a secrets file inside the roots
    env_like.write_text(f"DB_PASSWORD={SECRET}\nDB_USER=app\n")
    with pytest.raises(ValueError) as info:
        run(csvjobs.load, make_ctx(db, path=str(env_like), table="csv_tgt"))
    assert SECRET not in str(info.value) and "#1 (not an identifier)" in str(info.value)
    with pytest.raises(ValueError) as info:
        run(csvjobs.load, make_ctx(db, path=str(env_like), table="csv_tgt", columns={"id": "id"}))
    assert SECRET not in str(info.value) and "header lacks mapped column(s) id" in str(info.value)
    ok_header = tmp_path / "named.csv"
    ok_header.write_text("id,colour\n1,red\n")
    with pytest.raises(ValueError, match=r"header column\(s\) colour not in table csv_tgt"):
        run(csvjobs.load, make_ctx(db, path=str(ok_header), table="csv_tgt"))


def test_rejected_rows_and_failed_queries_do_not_quote_cell_values(db, tmp_path):
    db.create("csv_tgt", TGT_PG, TGT_SQLITE)
    path = tmp_path / "in.csv"
    path.write_text(f"id,code,qty,day\n1,A,{SECRET},2026-01-01\n2,B,{SECRET},2026-13-45\n3,C,3,2026-01-03\n")
    ctx = make_ctx(db, path=str(path), table="csv_tgt", key=["id"], max_rejects=10)
    assert run(csvjobs.load, ctx)["rows"] == 1
    assert [r[0] for r in ctx.rejects] == ["1", "2"]
    for _key, errmsg, dberrmsg in ctx.rejects:
        assert SECRET not in errmsg and SECRET not in (dberrmsg or "")
        assert "\n" not in errmsg and "\n" not in (dberrmsg or "")
    if db.dialect == "postgresql":
        assert ctx.rejects[0][2] == 'invalid input syntax for type integer: "…"'
    # An export whose query fails on a value: the message names the failure, not the value.
    db.execute("INSERT INTO csv_tgt (id, code, qty) VALUES (9, :v, 1)", {"v": SECRET[:5]})
    cast = "CAST(code AS INTEGER)" if db.dialect == "postgresql" else "json(code)"
    with pytest.raises(csvjobs.JobDatabaseError) as info:
        run(csvjobs.export, make_ctx(db, query=f"SELECT {cast} FROM csv_tgt", path=str(tmp_path / "o.csv")))
    assert SECRET[:5] not in str(info.value) and SECRET[:5] not in str(info.value.orig)


def test_the_database_message_keeps_object_names_and_hides_data():
    class E(Exception):
        pass
    cases = {
        'null value in column "qty" of relation "csv_tgt" violates not-null constraint\nDETAIL:  Failing row contains (7, x).':
            'null value in column "qty" of relation "csv_tgt" violates not-null constraint',
        'duplicate key value violates unique constraint "csv_tgt_pkey"\nDETAIL:  Key (id)=(1) already exists.':
            'duplicate key value violates unique constraint "csv_tgt_pkey"',
        'value "99999999999" is out of range for type integer': 'value "…" is out of range for type integer',
        'ORA-12899: value too large for column "DMS"."CSV_TGT"."CODE" (actual: 7, maximum: 5)\nHelp: https://x':
            'ORA-12899: value too large for column "DMS"."CSV_TGT"."CODE" (actual: 7, maximum: 5)',
        "ORA-01722: unable to convert string value containing 'p4ss' to a number: \"DMS\".\"T\".\"QTY\"":
            "ORA-01722: unable to convert string value containing '…' to a number: \"…\".\"T\".\"QTY\"",
        'ORA-01400: cannot insert NULL into ("DMS"."CSV_TGT"."QTY")': 'ORA-01400: cannot insert NULL into ("DMS"."CSV_TGT"."QTY")',
    }
    for raw, expected in cases.items():
        assert csvjobs.safe_db_message(E(raw)) == expected


def test_connection_env_reads_only_dms_conn_variables(db, tmp_path, monkeypatch):
    fill_source(db, 1)
    monkeypatch.setenv("DMS_DATABASE_URL", db.url)
    monkeypatch.setenv("DB_PASSWORD", SECRET)
    for var in ("DMS_DATABASE_URL", "DB_PASSWORD", "HOME", "DMS_CONN_"):
        with pytest.raises(ValueError, match=r"env: may only name a DMS_CONN_\* variable") as info:
            run(csvjobs.export, make_ctx(db, connection=f"env:{var}", query="SELECT id FROM csv_src",
                                         path=str(tmp_path / "x.csv")))
        assert SECRET not in str(info.value)
    with pytest.raises(ValueError, match="environment variable DMS_CONN_MISSING is not set"):
        run(csvjobs.export, make_ctx(db, connection="env:DMS_CONN_MISSING", query="SELECT 1", path=str(tmp_path / "x.csv")))
    for bad in (f"postgresql://user:{SECRET}@", f"nosuchdb+driver://u:{SECRET}@h/d", f"::{SECRET}::"):
        with pytest.raises((ValueError, csvjobs.JobDatabaseError), match="option 'connection'") as info:
            run(csvjobs.export, make_ctx(db, connection=bad, query="SELECT 1", path=str(tmp_path / "x.csv")))
        assert SECRET not in str(info.value)
    assert not (tmp_path / "x.csv").exists()


def test_a_sqlite_connection_is_a_file_and_is_confined_too(db, tmp_path, outside):
    with pytest.raises(ValueError, match="option 'connection': the path is outside DMS_FILE_ROOTS"):
        run(csvjobs.export, make_ctx(db, connection=f"sqlite:///{outside / 'new.db'}", query="SELECT 1 AS x",
                                     path=str(tmp_path / "x.csv")))
    assert not (outside / "new.db").exists(), "SQLite would have created the file"


def test_a_load_the_database_refuses_as_a_whole_does_not_quote_the_rows(db, tmp_path, monkeypatch):
    """Not a row error (here the table vanished after its columns were read): SQLAlchemy's own
    message would list the bound rows, i.e. the file's content."""
    monkeypatch.setattr(csvjobs, "_reflect", lambda *_a: {"id": sa.Integer(), "code": sa.String()})
    path = tmp_path / "in.csv"
    path.write_text(f"id,code\n1,{SECRET}\n")
    with pytest.raises(csvjobs.JobDatabaseError, match=r"the database refused the load: ") as info:
        run(csvjobs.load, make_ctx(db, path=str(path), table="csv_gone"))
    assert SECRET not in str(info.value) and SECRET not in str(info.value.orig)
