"""The built-in CSV handlers on a real Oracle (issue 12, item 4): ISO dates, numbers, rejected
rows with Oracle's row errors, and an incremental export by a TIMESTAMP watermark."""
from __future__ import annotations

import logging
from datetime import date, datetime

import pytest
import sqlalchemy as sa

from tests.oracle_live.conftest import drop
from worker.jobs import csv as csvjobs
from worker.jobs.context import JobContext


@pytest.fixture
def table(owner_engine, tmp_path, monkeypatch):
    monkeypatch.setenv("DMS_FILE_ROOTS", str(tmp_path))
    drop(owner_engine, "TABLE", "csv_live")
    with owner_engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE csv_live (id NUMBER(10) PRIMARY KEY, code VARCHAR2(5), "
                             "qty NUMBER(10) NOT NULL, day DATE, stamp TIMESTAMP)")
    yield owner_engine
    drop(owner_engine, "TABLE", "csv_live")


def ctx(engine, prcid: int, **payload) -> JobContext:
    return JobContext(request_id=f"r{prcid}", mapref="CSV_LIVE", request_type="IMMEDIATE", prcid=prcid, attempt=1,
                      params={}, payload=payload, as_of=date(2026, 1, 1), logger=logging.getLogger("live"),
                      _connect=engine.connect)


def run(handler, c: JobContext):
    try:
        result = handler(c)
        if c._connection is not None and c._connection.in_transaction():
            c._connection.commit()
        return result
    finally:
        if c._connection is not None:
            c._connection.close()


def test_load_dates_numbers_and_rejects_then_export_incrementally(table, tmp_path):
    path = tmp_path / "in.csv"
    path.write_text("id,code,qty,day,stamp\n"
                    "1,A,10,2026-01-01,2026-01-01T10:00:00\n"       # 2
                    "2,B,x,2026-01-02,\n"                             # 3 ORA-01722
                    "3,TOOLONG,30,2026-01-03,\n"                      # 4 ORA-12899
                    "4,D,40,2026-13-45,\n"                            # 5 not a date
                    "1,DUP,50,2026-01-05,\n"                          # 6 ORA-00001
                    "6,F,,2026-01-06,\n"                              # 7 ORA-01400
                    "7,G,70,2026-01-07,2026-01-07 08:30:00.250\n")   # 8
    load = ctx(table, 1, path=str(path), table="csv_live", key=["id"], max_rejects=10, batch_size=3)
    assert run(csvjobs.load, load) == {"rows": 2, "rejected": 5}
    codes = {k: m.split(": ", 2)[1][:9] for k, m, _ in load.rejects}
    assert codes == {"2": "ORA-01722", "3": "ORA-12899", "4": "column da", "1": "ORA-00001", "6": "ORA-01400"}
    with table.connect() as conn:
        rows = conn.execute(sa.text("SELECT id, day, stamp FROM csv_live ORDER BY id")).all()
    assert [tuple(r) for r in rows] == [(1, datetime(2026, 1, 1), datetime(2026, 1, 1, 10)),
                                        (7, datetime(2026, 1, 7), datetime(2026, 1, 7, 8, 30, 0, 250000))]

    query = "SELECT id, code, stamp FROM csv_live WHERE :watermark IS NULL OR stamp > :watermark ORDER BY stamp"
    opts = dict(query=query, incremental="stamp", path=str(tmp_path / "out_{run}.csv"))
    first = run(csvjobs.export, ctx(table, 2, **opts))
    assert first["rows"] == 2 and first["watermark"] == "2026-01-07T08:30:00.250000"
    with table.begin() as conn:
        conn.exec_driver_sql("INSERT INTO csv_live VALUES (8, 'H', 80, DATE '2026-01-08', TIMESTAMP '2026-01-08 00:00:00')")
    second = run(csvjobs.export, ctx(table, 3, **opts))
    assert second["rows"] == 1 and (tmp_path / "out_3.csv").read_text().splitlines()[1].startswith("8,H,2026-01-08")
    third = run(csvjobs.export, ctx(table, 4, **opts))
    assert third == {"path": None, "rows": 0, "watermark": "2026-01-08T00:00:00"}
    assert not (tmp_path / "out_4.csv").exists()
