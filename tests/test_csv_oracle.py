"""The built-in CSV handlers on Oracle (issue 12, item 4), without an Oracle server.

The handlers run against the real SQLAlchemy Oracle dialect over a simulated python-oracledb
session (tests/drivers/oracle_session.py) that refuses rows the way the server does: text in a
NUMBER column (ORA-01722, a plain DatabaseError in python-oracledb), a value too long
(ORA-12899), and any text bound into a date, which the server would convert with the session's
NLS_DATE_FORMAT (ORA-01861). The live suite (tests/oracle_live) runs the same on a server.
"""
from __future__ import annotations

import logging
import re
from datetime import date, datetime

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import oracle

from tests.drivers.oracle_session import Session, simulated_driver
from worker.jobs import csv as csvjobs
from worker.jobs.context import JobContext

ISO_TEXT = re.compile(r"^\d{4}-\d{2}-\d{2}")


@pytest.fixture(autouse=True)
def file_roots(tmp_path, monkeypatch):
    monkeypatch.setenv("DMS_FILE_ROOTS", str(tmp_path))


def refuse_like_oracle(value):
    if value == "x":
        return "ORA-01722: invalid number"
    if value == "TOOLONG":
        return 'ORA-12899: value too large for column "DMS"."CSV_TGT"."CODE" (actual: 7, maximum: 5)'
    if isinstance(value, str) and ISO_TEXT.match(value):
        return "ORA-01861: literal does not match format string"
    return None


def make_ctx(driver, **payload) -> JobContext:
    return JobContext(request_id="r1", mapref="CSV", request_type="IMMEDIATE", prcid=5, attempt=1, params={},
                      payload=payload, as_of=date(2026, 11, 1), logger=logging.getLogger("test.csv.oracle"),
                      _connect=driver.engine.connect)


def run(handler, ctx):
    try:
        result = handler(ctx)
        if ctx._connection is not None and ctx._connection.in_transaction():
            ctx._connection.commit()
        return result
    finally:
        if ctx._connection is not None:
            ctx._connection.close()


def test_a_load_rejects_the_rows_oracle_refuses_and_binds_iso_dates_as_dates(tmp_path, monkeypatch):
    monkeypatch.setattr(csvjobs, "_reflect", lambda *_a: {
        "id": oracle.NUMBER(), "code": oracle.VARCHAR2(5), "qty": oracle.NUMBER(), "day": oracle.DATE(),
        "stamp": oracle.TIMESTAMP()})
    path = tmp_path / "in.csv"
    path.write_text("id,code,qty,day,stamp\n"
                    "1,A,1,2026-01-01,2026-01-01T10:00:00\n"          # 2
                    "2,B,x,2026-01-02,\n"                               # 3 ORA-01722
                    "3,TOOLONG,3,2026-01-03,\n"                         # 4 ORA-12899
                    "4,D,4,2026-13-45,\n"                               # 5 not a date
                    "5,E,5,2026-01-05,2026-01-05 08:00:00+02:00\n")     # 6 offset -> UTC
    session = Session(refuse=refuse_like_oracle)
    driver = simulated_driver(session)
    ctx = make_ctx(driver, path=str(path), table="csv_tgt", key=["id"], max_rejects=10, batch_size=10)
    result = run(csvjobs.load, ctx)
    assert result == {"rows": 2, "rejected": 3}
    assert sorted((k, m) for k, m, _ in ctx.rejects) == [
        ("2", "line 3: ORA-01722: invalid number"),
        ("3", 'line 4: ORA-12899: value too large for column "DMS"."CSV_TGT"."CODE" (actual: 7, maximum: 5)'),
        ("4", "line 5: column day: not an ISO 8601 date or timestamp")]
    inserted = [binds for sql, binds in session.executed if sql.startswith("INSERT INTO csv_tgt") and "many" not in binds]
    good = [b for b in inserted if b["id"] in ("1", "5")]
    assert [b["day"] for b in good] == [datetime(2026, 1, 1), datetime(2026, 1, 5)], "dates bound as dates, not text"
    assert [b["stamp"] for b in good] == [datetime(2026, 1, 1, 10), datetime(2026, 1, 5, 6)]
    assert len(session.committed) == 1 and len(session.committed[0]) == 2
    driver.dispose()


def test_an_incremental_export_compares_a_timestamp_watermark_as_a_timestamp(tmp_path):
    def answer(sql, binds):
        if "FROM dms_job_state" in sql:
            key = next(v for k, v in binds.items() if k.startswith("state_key"))
            return ["state_value"], [({"watermark": "2026-01-01T10:00:05", "watermark_type": "datetime"}[key],)]
        if "FROM attendance" in sql:
            return ["ID", "PUNCHED_AT"], [(7, datetime(2026, 1, 2, 8, 30))]
        return None

    session = Session(answer=answer)
    driver = simulated_driver(session)
    ctx = make_ctx(driver, mapref="ATT", incremental="punched_at", path=str(tmp_path / "att.csv"),
                   query="SELECT id, punched_at FROM attendance WHERE :watermark IS NULL OR punched_at > :watermark")
    result = run(csvjobs.export, ctx)
    query = next(sql for sql, _ in session.executed if "FROM attendance" in sql)
    # A typed literal with its format (SQLAlchemy writes TO_DATE when there are no fractions),
    # never the ISO text the session's NLS format would have to convert.
    typed = re.findall(r"TO_(?:DATE|TIMESTAMP)\('2026-01-01 10:00:05(?:\.0+)?', 'YYYY-MM-DD HH24:MI:SS(?:\.FF)?'\)", query)
    assert len(typed) == 2 and "'2026-01-01T10:00:05'" not in query, query
    assert result["rows"] == 1
    driver.dispose()


def test_the_oracle_row_errors_are_the_ones_python_oracledb_raises_as_plain_database_errors():
    from tests.drivers.oracle_session import ora_error
    for code in ("ORA-01722", "ORA-12899", "ORA-01843", "ORA-01861"):
        exc = ora_error(f"{code}: x")
        assert type(exc).__name__ == "DatabaseError", "python-oracledb: not IntegrityError/DataError"
        assert csvjobs._row_error(sa.exc.DatabaseError("INSERT", {}, exc))
    assert not csvjobs._row_error(sa.exc.DatabaseError("INSERT", {}, ora_error("ORA-00942: table or view does not exist")))
