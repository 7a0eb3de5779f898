"""V004: the monitoring views on PostgreSQL and SQLite answer what their Oracle counterparts
answer, PostgreSQL documents every table and column, and the request list and the views stay
index-driven when the finished history is large (plans checked at 50,000 rows; docs/console.md
shows them at a million).
"""
from __future__ import annotations

import json
from datetime import timedelta

import pytest
import sqlalchemy as sa

from worker import schema as s
from worker.console import data


def view(engine, name, order_by="1"):
    with engine.connect() as conn:
        return [dict(r) for r in conn.execute(sa.text(f"SELECT * FROM {name} ORDER BY {order_by}")).mappings()]


def test_views_answer_queue_depth_running_failures_and_upcoming(driver):
    engine = driver.engine
    now = driver.now()
    old, recent = now - timedelta(days=2), now - timedelta(hours=2)
    with engine.begin() as conn:
        conn.execute(sa.insert(s.job).values(mapref="M_V", handler="worker.jobs.builtin:noop", paused="Y"))
        for row in (
            dict(request_id="n1", mapref="M_V", request_type="IMMEDIATE", status="NEW", requested_at=now - timedelta(seconds=30)),
            dict(request_id="n2", mapref="M_V", request_type="IMMEDIATE", status="NEW", requested_at=now - timedelta(seconds=10)),
            dict(request_id="h1", mapref="M_V", request_type="HISTORY", status="NEW", requested_at=now),
            dict(request_id="p1", mapref="M_V", request_type="IMMEDIATE", status="PROCESSING", requested_at=now,
                 claimed_by="w1"),
            dict(request_id="d1", mapref="M_V", request_type="IMMEDIATE", status="DONE", requested_at=old,
                 completed_at=old),
            dict(request_id="f_recent", mapref="M_V", request_type="IMMEDIATE", status="FAILED", requested_at=recent,
                 completed_at=recent, attempts=2, result_payload='{"error": "boom"}'),
            dict(request_id="f_old", mapref="M_V", request_type="IMMEDIATE", status="FAILED", requested_at=old,
                 completed_at=old),
        ):      # one by one: an executemany takes its columns from the first row only
            conn.execute(sa.insert(s.prcreq).values(**row))
        conn.execute(sa.insert(s.worker).values(worker_id="w1", host="hostA", pid=1, started_at=now, heartbeat_at=now,
                                                is_leader="Y"))
        for row in (
            dict(mapref="M_V", strtdt=now - timedelta(seconds=5), status="IP", request_id="p1", worker_id="w1", attempt=1),
            dict(mapref="M_V", strtdt=recent, enddt=recent, status="FL", msg="exploded", request_id="f_recent",
                 worker_id="w1", attempt=2),
            dict(mapref="M_V", strtdt=old, enddt=old, status="FL", msg="long ago", request_id="f_old", worker_id="w1",
                 attempt=1),
        ):
            conn.execute(sa.insert(s.prclog).values(**row))
        for row in (dict(frqcd="DL", frqhh=3, frqmi=0, schflg="Y", nxt_run_dt=now + timedelta(hours=1),
                         lst_run_dt=now - timedelta(hours=23)),
                    dict(frqcd="DL", frqhh=4, frqmi=0, schflg="N"),
                    dict(frqcd="WK", frqdd="XYZ", schflg="Y",
                         invalid_reason="frqdd 'XYZ' is not a weekday MON..SUN for WK")):
            conn.execute(sa.insert(s.jobsch).values(mapref="M_V", curflg="Y", misfire="LATEST", **row))

    depth = {(r["status"], r["request_type"]): r for r in view(engine, "dms_v_queue_depth")}
    assert {k: r["requests"] for k, r in depth.items()} == {
        ("NEW", "IMMEDIATE"): 2, ("NEW", "HISTORY"): 1, ("PROCESSING", "IMMEDIATE"): 1}
    assert 29 <= float(depth[("NEW", "IMMEDIATE")]["oldest_age_s"]) <= 60

    (running,) = view(engine, "dms_v_running")
    assert (running["prcid"] is not None, running["request_id"], running["request_status"], running["worker_host"]) == (
        True, "p1", "PROCESSING", "hostA")
    assert 4 <= float(running["age_s"]) <= 60

    failures = view(engine, "dms_v_failures_1d", "source")
    assert [(f["source"], f["request_id"]) for f in failures] == [("DMS_PRCLOG", "f_recent"), ("DMS_PRCREQ", "f_recent")]
    assert json.loads(failures[1]["detail"]) == {"error": "boom"} and failures[0]["detail"] == "exploded"

    upcoming = view(engine, "dms_v_upcoming", "jobschid")
    assert [(u["frqcd"], u["job_paused"]) for u in upcoming] == [("DL", "Y"), ("WK", "Y")]
    assert 3500 <= float(upcoming[0]["due_in_s"]) <= 3600
    assert upcoming[1]["next_run_at"] is None and "XYZ" in upcoming[1]["invalid_reason"]


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_postgresql_documents_every_table_column_and_view(driver):
    with driver.engine.connect() as conn:
        missing = []
        for table in s.metadata.sorted_tables:
            if table.name == s.schema_version.name:
                continue          # created by `migrate` itself, not by a migration
            if not conn.execute(sa.text("SELECT obj_description(CAST(:t AS regclass), 'pg_class')"),
                                {"t": table.name}).scalar():
                missing.append(table.name)
            for column in table.columns:
                if not conn.execute(sa.text(
                        "SELECT col_description(CAST(:t AS regclass), a.attnum) FROM pg_attribute a "
                        "WHERE a.attrelid = CAST(:t AS regclass) AND a.attname = :c"),
                        {"t": table.name, "c": column.name}).scalar():
                    missing.append(f"{table.name}.{column.name}")
        for name in ("dms_v_queue_depth", "dms_v_running", "dms_v_failures_1d", "dms_v_upcoming"):
            if not conn.execute(sa.text("SELECT obj_description(CAST(:t AS regclass), 'pg_class')"), {"t": name}).scalar():
                missing.append(name)
    assert not missing, f"no COMMENT ON: {missing}"


# -- plans: the request list and the views never walk the finished history ----------------------------
FILTERS = {
    "newest": data.RequestFilter(),
    "status": data.RequestFilter(status="FAILED"),
    "mapref": data.RequestFilter(mapref="M7"),
    "mapref+status": data.RequestFilter(mapref="M7", status="DONE"),
    "time range": data.RequestFilter(since=None, until=None),
}


def _fill_pg(engine, n=50_000):
    with engine.begin() as conn:
        conn.execute(sa.text(f"""
            INSERT INTO dms_prcreq (request_id, mapref, request_type, status, requested_at, completed_at)
            SELECT 'bulk-' || g, 'M' || (g % 20), CASE WHEN g % 10 = 0 THEN 'HISTORY' ELSE 'IMMEDIATE' END,
                   CASE WHEN g % 97 = 0 THEN 'FAILED' WHEN g % 1000 = 0 THEN 'NEW' ELSE 'DONE' END,
                   timestamp '2026-01-01' + g * interval '1 second', timestamp '2026-01-01' + g * interval '1 second'
            FROM generate_series(1, {n}) g"""))
        conn.execute(sa.text(f"""
            INSERT INTO dms_prclog (mapref, strtdt, enddt, status, request_id)
            SELECT 'M' || (g % 20), timestamp '2026-01-01' + g * interval '1 second',
                   timestamp '2026-01-01' + g * interval '1 second', CASE WHEN g % 97 = 0 THEN 'FL' ELSE 'PC' END,
                   'bulk-' || g
            FROM generate_series(1, {n}) g"""))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("ANALYZE dms_prcreq"))
        conn.execute(sa.text("ANALYZE dms_prclog"))


def _sqlite_plan(conn, statement) -> str:
    sql = str(statement.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True}))
    return " | ".join(str(r[-1]) for r in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql))


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_sqlite_claims_keep_their_own_indexes_beside_the_consoles(driver):
    """SQLite has no statistics to go by: an index leading with status would draw the replicas'
    claim to it and make every claim sort all NEW rows. V004's indexes must not."""
    c, other = s.prcreq.c, s.prcreq.alias("other")
    claim = sa.select(c.request_id).where(
        c.status == s.NEW, c.not_before <= driver.clock(), c.request_type.notin_(s.CONTROL_TYPES),
        ~sa.exists().where(other.c.excl_key == c.mapref),
        ~sa.exists().where(s.job.c.mapref == c.mapref, s.job.c.paused == "Y"),
    ).order_by(c.priority.desc(), c.not_before, c.requested_at).limit(4)
    with driver.engine.connect() as conn:
        plan = _sqlite_plan(conn, claim)
    assert "dms_prcreq_claim_ix" in plan and "TEMP B-TREE" not in plan, plan


def _pg_plan(conn, statement) -> str:
    sql = str(statement.compile(dialect=conn.dialect, compile_kwargs={"literal_binds": True})) \
        if not isinstance(statement, str) else statement
    return "\n".join(r[0] for r in conn.execute(sa.text("EXPLAIN " + sql)))


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_postgresql_request_list_pages_are_index_scans_without_a_sort(driver):
    _fill_pg(driver.engine)
    cursor = data.encode_cursor(__import__("datetime").datetime(2026, 1, 1, 7, 0), "bulk-25200")
    with driver.engine.connect() as conn:
        for name, f in FILTERS.items():
            for page_cursor in (None, cursor):
                plan = _pg_plan(conn, data.request_query(f, cursor=page_cursor))
                assert "Index" in plan and "Seq Scan" not in plan, f"{name}:\n{plan}"
                # Walked in page order and stopped after a page; except FAILED, where the partial
                # index of failed rows may be smaller still and the planner rightly sorts those.
                assert "Sort" not in plan or f.status == "FAILED", f"{name}:\n{plan}"


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_postgresql_views_read_only_unfinished_or_recent_rows(driver):
    _fill_pg(driver.engine)
    with driver.engine.connect() as conn:
        for name in ("dms_v_queue_depth", "dms_v_failures_1d", "dms_v_running"):
            plan = _pg_plan(conn, f"SELECT * FROM {name}")
            assert "Seq Scan on dms_prcreq" not in plan and "Seq Scan on dms_prclog" not in plan, f"{name}:\n{plan}"


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_sqlite_request_list_pages_use_an_index_for_their_order(driver):
    with driver.engine.connect() as conn:
        for name, f in FILTERS.items():
            stmt = data.request_query(f, cursor=data.encode_cursor(__import__("datetime").datetime(2026, 1, 1), "x"))
            plan = _sqlite_plan(conn, stmt)
            assert "USING INDEX" in plan and "TEMP B-TREE" not in plan, f"{name}: {plan}"


def test_the_request_list_compiles_for_oracle_without_row_value_comparisons():
    """Oracle has no (a, b) < (x, y): the keyset condition is spelled out, and the limit is
    FETCH FIRST (no FOR UPDATE here, so that is allowed). Parsed as Oracle SQL by sqlglot."""
    import sqlglot
    from sqlalchemy.dialects import oracle
    stmt = data.request_query(data.RequestFilter(status="FAILED", mapref="M"),
                              cursor=data.encode_cursor(__import__("datetime").datetime(2026, 1, 1), "rid"))
    sql = str(stmt.compile(dialect=oracle.dialect(), compile_kwargs={"literal_binds": True}))
    assert "FETCH FIRST 51 ROWS ONLY" in sql and "FOR UPDATE" not in sql
    assert "requested_at <=" in sql and "request_id <" in sql
    sqlglot.parse_one(sql, read="oracle", error_level=sqlglot.ErrorLevel.RAISE)
