"""What the console shows, on each backend: keyset paging and filters, one request with its
executions, schedules in words with their next runs, jobs with their statistics, the cluster;
and that nothing it renders can run as script.
"""
from __future__ import annotations

import json
import re
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa

from tests.console.conftest import TOKEN, login
from worker import client
from worker import schema as s
from worker.console import data

AUTH = {"Authorization": f"Bearer {TOKEN}"}
XSS = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2">'


def html(c, path: str) -> str:
    """A page as a browser gets it: logged in with the token through the login form."""
    if not getattr(c, "_logged_in", False):
        login(c, token=TOKEN)
        c._logged_in = True
    response = c.get(path)
    assert response.status_code == 200, (path, response.status_code)
    return response.get_data(as_text=True)


def insert_requests(engine, n, base, **values):
    """``n`` requests a second apart from ``base`` (two share each second: ties on requested_at)."""
    ids = []
    with engine.begin() as conn:
        for i in range(n):
            rid = f"r{i:04d}"
            conn.execute(sa.insert(s.prcreq).values(
                request_id=rid, mapref=values.get("mapref", "M_A" if i % 3 else "M_B"),
                request_type=s.HISTORY if i % 5 == 0 else s.IMMEDIATE,
                status=[s.NEW, s.DONE, s.FAILED][i % 3], requested_at=base + timedelta(seconds=i // 2)))
            ids.append(rid)
    return ids


def newest_first(ids, base):
    return sorted(ids, key=lambda rid: (base + timedelta(seconds=int(rid[1:]) // 2), rid), reverse=True)


def test_request_list_pages_by_keyset_through_every_row_once_in_order(console, driver):
    base = datetime(2026, 11, 1, 8, 0, 0)
    ids = insert_requests(driver.engine, 25, base)
    c = console()
    seen, cursor = [], None
    while True:
        query = {"format": "json", "limit": 10, **({"cursor": cursor} if cursor else {})}
        page = c.get("/requests", query_string=query, headers=AUTH).json
        seen += [r["request_id"] for r in page["requests"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
        # Rows arriving meanwhile (newer) do not shift the pages after the first.
        client.enqueue(driver.engine, "M_LATE")
    assert seen == newest_first(ids, base)


@pytest.mark.parametrize("query, expected", [
    ({"status": "FAILED"}, lambda i: i % 3 == 2),
    ({"mapref": "M_B"}, lambda i: i % 3 == 0),
    ({"type": "HISTORY", "status": "NEW"}, lambda i: i % 5 == 0 and i % 3 == 0),
    ({"since": "2026-11-01T08:00:05Z", "until": "2026-11-01T09:00:07+01:00"}, lambda i: 5 <= i // 2 <= 7),
    ({"request_id": "r0007"}, lambda i: i == 7),
])
def test_request_list_filters(console, driver, query, expected):
    base = datetime(2026, 11, 1, 8, 0, 0)
    ids = insert_requests(driver.engine, 20, base)
    page = console().get("/requests", query_string={"format": "json", **query}, headers=AUTH).json
    assert [r["request_id"] for r in page["requests"]] == newest_first(
        [rid for i, rid in enumerate(ids) if expected(i)], base)


@pytest.mark.parametrize("query, words", [
    ({"status": "LOST"}, "status 'LOST' is not one of"),
    ({"type": "WHENEVER"}, "type 'WHENEVER' is not one of"),
    ({"since": "yesterday"}, "since 'yesterday' is not an ISO date"),
    ({"cursor": "garbage"}, "cursor 'garbage' is not one this console gave out"),
    ({"limit": "100000"}, "limit must be between 1 and 500"),
])
def test_a_bad_filter_is_a_400_that_says_what_is_wrong(console, query, words):
    c = console()
    response = c.get("/requests", query_string=query, headers=AUTH)
    assert response.status_code == 400 and words in response.json["error"]


def test_a_paused_jobs_waiting_requests_are_marked_paused(console, driver):
    client.register_job(driver.engine, "M_P", "worker.jobs.builtin:noop")
    rid = client.enqueue(driver.engine, "M_P")
    other = client.enqueue(driver.engine, "M_OTHER")
    client.pause_job(driver.engine, "M_P")
    page = console().get("/requests", query_string={"format": "json"}, headers=AUTH).json
    assert {r["request_id"]: r["paused"] for r in page["requests"]} == {rid: True, other: False}
    overview = console().get("/", query_string={"format": "json"}, headers=AUTH).json
    assert overview["queue"]["paused"] == [{"mapref": "M_P", "waiting": 1}]
    detail = console().get(f"/requests/{rid}", query_string={"format": "json"}, headers=AUTH).json
    assert "paused" in detail["waiting"]


def test_one_request_shows_payload_result_executions_counts_and_errors(console, driver):
    engine = driver.engine
    client.register_job(engine, "M_DETAIL", "worker.jobs.builtin:noop")
    rid = client.enqueue(engine, "M_DETAIL", param1="2026-11-01")
    now = driver.now()
    with engine.begin() as conn:
        conn.execute(sa.update(s.prcreq).values(status=s.DONE, result_payload='{"result": {"rows": 3}}',
                                                completed_at=now))
        prcid = conn.execute(sa.insert(s.prclog).values(
            mapref="M_DETAIL", strtdt=now - timedelta(seconds=4), enddt=now, status="PC", request_id=rid,
            worker_id="w1", attempt=1, param1="2026-11-01").returning(s.prclog.c.prcid)).scalar_one()
        conn.execute(sa.insert(s.joblog).values(mapref="M_DETAIL", prcid=prcid, srcrows=5, trgrows=3, errrows=2))
        conn.execute(sa.insert(s.joberr), [
            dict(errtyp="RECORD", errmsg="bad date", keyvalue="line 4", prcid=prcid, mapref="M_DETAIL"),
            dict(errtyp="RECORD", errmsg="duplicate", keyvalue="line 9", prcid=prcid, mapref="M_DETAIL")])
    c = console()
    detail = c.get(f"/requests/{rid}", query_string={"format": "json"}, headers=AUTH).json
    (e,) = detail["executions"]
    assert (e["prcid"], e["status"], e["counts"], e["errors_total"]) == (
        prcid, "PC", {"srcrows": 5, "trgrows": 3, "errrows": 2}, 2)
    assert [x["keyvalue"] for x in e["errors"]] == ["line 4", "line 9"]
    assert 3.9 <= e["duration_s"] <= 4.1
    page = html(c, f"/requests/{rid}")
    for text in ("2026-11-01", "source 5, target 3, rejected 2", "line 9", "duplicate", "&#34;rows&#34;: 3"):
        assert text in page, text
    assert c.get("/requests/no-such-id", headers=AUTH).status_code == 404


def test_payloads_maprefs_and_messages_are_rendered_as_text(console, driver):
    engine = driver.engine
    rid = client.enqueue(engine, XSS, param1=XSS)
    now = driver.now()
    with engine.begin() as conn:
        conn.execute(sa.update(s.prcreq).values(status=s.FAILED, result_payload=json.dumps({"error": XSS})))
        conn.execute(sa.insert(s.prclog).values(mapref=XSS, strtdt=now, enddt=now, status="FL",
                                                msg=XSS, request_id=rid, worker_id=XSS[:64], attempt=1))
    c = console()
    for path in (f"/requests/{rid}", "/requests", "/"):
        page = html(c, path)
        assert "<script>window" not in page and "<img src=x" not in page, path
    page = html(c, f"/requests/{rid}")
    assert "&lt;script&gt;window.__xss = 1&lt;/script&gt;" in page


def test_schedules_in_words_with_the_next_five_in_the_scheduler_timezone(console, driver):
    with driver.engine.begin() as conn:
        ids = [conn.execute(sa.insert(s.jobsch).values(**{"schflg": "Y", "curflg": "Y", "misfire": "LATEST", **v})
                            .returning(s.jobsch.c.jobschid)).scalar_one() for v in (
            dict(mapref="DAILY", frqcd="DL", frqhh=2, frqmi=30),
            dict(mapref="BAD_DAY", frqcd="WK", frqdd="XYZ", frqhh=1, frqmi=0),
            dict(mapref="MONTHLY", frqcd="MN", frqdd="31", frqhh=0, frqmi=0, schflg="N"),
            dict(mapref="SKIPPED", frqcd="DL", frqhh=3, frqmi=0, invalid_reason="job SKIPPED has no DMS_JOB row"),
        )]
    rows = {r["mapref"]: r for r in console().get("/schedules", query_string={"format": "json"},
                                                  headers=AUTH).json["schedules"]}
    daily = rows["DAILY"]
    assert daily["words"] == "every day at 02:30"
    assert len(daily["next"]) == 5
    stamps = [datetime.fromisoformat(t) for t in daily["next"]]
    assert all((t.hour, t.minute) == (2, 30) and t.utcoffset() in (timedelta(hours=1), timedelta(hours=2))
               for t in stamps), daily["next"]                      # Europe/Berlin wall time, with its offset
    assert [(b - a) for a, b in zip(stamps, stamps[1:])] in ([timedelta(days=1)] * 4,) or all(
        timedelta(hours=23) <= b - a <= timedelta(hours=25) for a, b in zip(stamps, stamps[1:]))
    assert "frqdd 'XYZ' is not a weekday" in rows["BAD_DAY"]["invalid"] and rows["BAD_DAY"]["next"] == []
    assert rows["MONTHLY"]["words"] == "monthly on day 31 (the last day in shorter months) at 00:00"
    assert rows["MONTHLY"]["enabled"] is False and rows["MONTHLY"]["next"] == []
    assert rows["SKIPPED"]["invalid"] == "job SKIPPED has no DMS_JOB row"
    page = html(console(), "/schedules")
    assert "skipped: job SKIPPED has no DMS_JOB row" in page and f'id="s{ids[0]}"' in page


def test_one_schedule_has_an_address_of_its_own_current_or_not(console, driver):
    with driver.engine.begin() as conn:
        old, new = [conn.execute(sa.insert(s.jobsch).values(mapref="NIGHTLY", frqcd="DL", frqhh=h, frqmi=0, schflg="Y",
                                                            curflg=cur, misfire="LATEST")
                                 .returning(s.jobsch.c.jobschid)).scalar_one() for h, cur in ((1, "N"), (2, "Y"))]
    c = console()
    one = c.get(f"/schedules/{new}", query_string={"format": "json"}, headers=AUTH).json["schedule"]
    assert (one["jobschid"], one["words"], one["enabled"], len(one["next"])) == (new, "every day at 02:00", True, 5)
    page = html(c, f"/schedules/{old}")
    assert f"Schedule {old}" in page and "an old version" in page and "every day at 01:00" in page
    assert "schedule_enable" not in page and "/enable" not in page, "an old version is not offered to enable"
    assert f'href="/schedules/{new}"' in html(c, "/schedules")
    assert c.get("/schedules/999999", headers=AUTH).status_code == 404


def test_jobs_show_success_rate_percentiles_and_a_chart_of_recent_runs(console, driver):
    engine = driver.engine
    client.register_job(engine, "M_STATS", "worker.jobs.builtin:noop")
    start = driver.now() - timedelta(hours=1)
    with engine.begin() as conn:
        conn.execute(sa.insert(s.prclog), [
            dict(mapref="M_STATS", strtdt=start + timedelta(minutes=i), enddt=start + timedelta(minutes=i, seconds=i + 1),
                 status="FL" if i in (3, 7) else "PC", request_id=f"q{i}", worker_id="w", attempt=1)
            for i in range(10)])
    c = console()
    (job,) = c.get("/jobs", query_string={"format": "json"}, headers=AUTH).json["jobs"]
    st = job["stats"]
    assert (st["ended"], st["completed"], st["failed"]) == (10, 8, 2)
    assert st["success_rate"] == pytest.approx(0.8)
    assert st["p50_s"] == pytest.approx(5.0) and st["p95_s"] == pytest.approx(10.0)
    page = html(c, "/jobs/M_STATS")
    assert len(re.findall(r'<rect class="bar ok"', page)) == 8
    assert len(re.findall(r'<rect class="bar failed"', page)) == 2
    assert c.get("/jobs/NO_SUCH_JOB", headers=AUTH).status_code == 404


def test_a_password_in_a_jobs_params_is_never_shown(console, driver):
    """docs/jobs.md lets a job's params hold a connection URL: its password, and any key named
    like a secret, must not reach the job pages, the request page or --json."""
    engine = driver.engine
    client.register_job(engine, "M_SECRET", "worker.jobs.builtin:noop",
                        params={"connection": "postgresql://etl:Sup3rS3cret@db.example/sales",
                                "api_token": "tok-4242-XYZ", "table": "sales"})
    rid = client.enqueue(engine, "M_SECRET")
    c = console()
    pages = "".join(c.get(path, headers=AUTH).get_data(as_text=True)
                    for path in ("/jobs", "/jobs/M_SECRET", f"/requests/{rid}", "/jobs?format=json",
                                 "/jobs/M_SECRET?format=json", f"/requests/{rid}?format=json"))
    assert "Sup3rS3cret" not in pages and "tok-4242-XYZ" not in pages
    assert "etl:***@db.example/sales" in pages and "sales" in pages


def test_a_hostile_jobs_params_cannot_break_the_job_pages(console, driver):
    """Params nested 100,000 levels deep (issue 10.3) or holding NUL: the pages still render."""
    client.register_job(driver.engine, "M_DEEP", "worker.jobs.builtin:noop")
    client.register_job(driver.engine, "M_NUL", "worker.jobs.builtin:noop")
    with driver.engine.begin() as conn:
        conn.execute(sa.update(s.job).where(s.job.c.mapref == "M_DEEP").values(params="[" * 100_000 + "]" * 100_000))
        conn.execute(sa.update(s.job).where(s.job.c.mapref == "M_NUL").values(params='{"path": "a\\u0000b"}'))
    c = console()
    for path in ("/jobs", "/jobs/M_DEEP", "/jobs/M_NUL", "/jobs?format=json", "/jobs/M_DEEP?format=json"):
        assert c.get(path, headers=AUTH).status_code == 200, path


def test_the_cluster_marks_dead_replicas_and_an_expired_leader(console, driver):
    now = driver.now()
    with driver.engine.begin() as conn:
        conn.execute(sa.insert(s.worker), [
            dict(worker_id="alive:1", host="h", pid=1, started_at=now, heartbeat_at=now, is_leader="Y", slots=4,
                 running=1, expires_at=now + timedelta(seconds=8)),
            dict(worker_id="gone:2", host="h", pid=2, started_at=now, heartbeat_at=now - timedelta(seconds=60),
                 is_leader="N", slots=4, running=3, expires_at=now - timedelta(seconds=52))])
        conn.execute(sa.insert(s.leader).values(name="scheduler", holder="gone:2", epoch=7, mode="lock",
                                                acquired_at=now, expires_at=now - timedelta(seconds=40)))
    overview = console().get("/", query_string={"format": "json"}, headers=AUTH).json["cluster"]
    assert {w["worker_id"]: w["live"] for w in overview["workers"]} == {"alive:1": True, "gone:2": False}
    assert (overview["slots"], overview["running"], overview["live"], overview["dead"]) == (4, 1, 1, 1)
    assert overview["leader"]["valid"] is False and overview["leader"]["mode"] == "lock"
    page = html(console(), "/")
    assert "no leader" in page and "lease expired" in page


def test_the_live_part_alone_for_a_refresh(console, driver):
    client.enqueue(driver.engine, "M_LIVE")
    c = console()
    full = html(c, "/requests")
    part = c.get("/requests", headers={"X-DMS-Console-Refresh": "1"}).get_data(as_text=True)
    assert "<html" in full and "<html" not in part
    assert 'id="request-list"' in part and "M_LIVE" in part


def test_enqueue_from_the_console_writes_what_the_client_writes(console, driver):
    client.register_job(driver.engine, "M_ENQ", "worker.jobs.builtin:noop")
    c = console()
    ok = c.post("/jobs/M_ENQ/enqueue", data={"request_type": "HISTORY", "start_date": "2026-10-01",
                                             "end_date": "2026-10-03", "truncate_flag": "Y", "priority": "5"},
                headers=AUTH)
    assert ok.status_code == 200, ok.json
    with driver.engine.connect() as conn:
        (row,) = data.request_page(conn, data.RequestFilter())["requests"]
    full = client.request_status(driver.engine, row["request_id"])
    assert (full["request_type"], full["priority"]) == (s.HISTORY, 5)
    assert json.loads(full["payload"]) == {"start_date": "2026-10-01", "end_date": "2026-10-03", "truncate_flag": "Y"}
    bad = c.post("/jobs/M_ENQ/enqueue", data={"request_type": "HISTORY", "start_date": "10/01/2026"}, headers=AUTH)
    assert bad.status_code == 409 and "YYYY-MM-DD" in bad.json["error"]
    assert c.post("/jobs/NOPE/enqueue", data={}, headers=AUTH).status_code == 404
