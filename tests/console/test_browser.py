"""The console in a real browser, against real replicas on PostgreSQL.

Debian's Chromium (/usr/bin/chromium) driven by Playwright through ``executable_path``: no
browser is ever downloaded. Under CI a missing browser fails these tests; elsewhere they skip.
The console runs as ``python -m worker console --port 0`` with users and a token configured,
the replicas as ``python -m worker run``. Every wait is Playwright's auto-waiting ``expect``
or ``wait_until``, each with a deadline.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from urllib.parse import urlsplit

import pytest
import sqlalchemy as sa

from tests.support import REPO, wait_until
from worker import client
from worker import schema as s
from worker.console import hash_password

CHROMIUM = os.environ.get("DMS_TEST_CHROMIUM", "/usr/bin/chromium")
# As root, in a sandbox without a network: no sandbox, no GPU, nothing phoning home.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
OPERATOR, VIEWER, PASSWORD = "olga", "vera", "correct-horse-battery"
SCRIPT = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2">'
EXPECT_S = 45_000        # ms: replicas poll every second; a PostgreSQL wake-up is faster


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"the browser tests must run under CI: {reason} (.ci/run installs chromium)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[test]')")
    if not os.access(CHROMIUM, os.X_OK):
        _unavailable(f"no Chromium at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def db_url(pg_url):
    return pg_url


@pytest.fixture
def engine(pg_url):
    engine = sa.create_engine(pg_url)
    yield engine
    engine.dispose()


@pytest.fixture
def console_url(pg_url, tmp_path):
    """A console process with an operator and a read-only user (and a token) configured."""
    users = tmp_path / "console-users"
    users.write_text(f"{OPERATOR} operator {hash_password(PASSWORD)}\n{VIEWER} read-only {hash_password(PASSWORD)}\n")
    env = dict(os.environ, DMS_DATABASE_URL=pg_url, DMS_CONSOLE_USERS_FILE=str(users), PYTHONPATH=str(REPO),
               DMS_CONSOLE_TOKEN="browser-test-token-0123456789")
    log = open(tmp_path / "console.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "worker", "console", "--port", "0"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=log, text=True)
    line = proc.stdout.readline()
    match = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
    assert match, f"console did not start: {line!r} {(tmp_path / 'console.log').read_text()[-2000:]}"
    yield match.group(1)
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)
    log.close()


@pytest.fixture
def page(browser, console_url):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.on("dialog", lambda dialog: dialog.accept())          # the "are you sure?" of destructive actions
    page.base_url = console_url
    yield page
    context.close()


def log_in(page, user=OPERATOR):
    page.goto(page.base_url + "/requests")
    assert "/login" in page.url                                  # not logged in: sent to the login page
    page.fill("input[name=username]", user)
    page.fill("input[name=password]", PASSWORD)
    page.click("form.login button >> nth=0")
    page.wait_for_url(lambda url: urlsplit(url).path == "/requests")


def set_broken(engine, mapref, flag):
    with engine.begin() as conn:
        conn.execute(sa.delete(s.job_state).where(s.job_state.c.mapref == mapref))
        conn.execute(sa.insert(s.job_state).values(mapref=mapref, state_key="broken", state_value=flag))


def status_of(engine, rid):
    return client.request_status(engine, rid)["status"]


@pytest.fixture
def replica(replicas, engine):
    (r,) = replicas(1)
    r.wait_registered(engine)
    return r


def test_log_in_find_a_failed_request_retry_it_and_see_it_run(page, engine, replica):
    from playwright.sync_api import expect
    client.register_job(engine, "FLAKY", "tests.console.handlers:fails_while_broken")
    set_broken(engine, "FLAKY", "Y")
    rid = client.enqueue(engine, "FLAKY", param1="2026-11-01")
    wait_until(lambda: status_of(engine, rid) == s.FAILED, 30, "the request to fail")
    set_broken(engine, "FLAKY", "N")              # the operator fixed what it depends on

    log_in(page)
    page.select_option("select[name=status]", "FAILED")
    page.click("button:has-text('Filter')")
    page.click(f"a:has-text('{rid}')")
    expect(page.locator("#live .actions .badge").first).to_have_text("FAILED")
    expect(page.locator("#result")).to_contain_text("the upstream file is missing")
    page.click("button:has-text('Retry')")
    expect(page.locator(".flash.ok")).to_contain_text("retried")
    # The page refreshes itself: the new execution appears and the request ends DONE.
    expect(page.locator("#live .actions .badge").first).to_have_text("DONE", timeout=EXPECT_S)
    expect(page.locator(".execution .badge")).to_have_text(["FL", "PC"])
    assert status_of(engine, rid) == s.DONE


def test_stop_a_running_job(page, engine, replica):
    from playwright.sync_api import expect
    client.register_job(engine, "SLEEPY", "worker.jobs.builtin:sleep")
    rid = client.enqueue(engine, "SLEEPY", payload={"seconds": 300})
    wait_until(lambda: status_of(engine, rid) == s.PROCESSING, 30, "the sleep to run")

    log_in(page)
    page.goto(f"{page.base_url}/requests/{rid}")
    expect(page.locator(".execution .badge")).to_have_text("IP")
    page.click("button:has-text('Stop')")
    expect(page.locator(".flash.ok")).to_contain_text("stop of")
    expect(page.locator("#live .actions .badge").first).to_have_text("CANCELLED", timeout=EXPECT_S)
    expect(page.locator(".execution .badge")).to_have_text("ST")
    with engine.connect() as conn:
        assert conn.execute(sa.select(s.prclog.c.status).where(s.prclog.c.request_id == rid)).scalar_one() == "ST"


def test_pause_a_job_and_see_its_requests_wait(page, engine, replica):
    from playwright.sync_api import expect
    client.register_job(engine, "PAUSY", "worker.jobs.builtin:noop")
    client.register_job(engine, "OTHER", "worker.jobs.builtin:noop")

    log_in(page)
    page.goto(f"{page.base_url}/jobs/PAUSY")
    page.click("button:has-text('Pause')")
    expect(page.locator("#paused")).to_have_text("paused")
    page.fill("input[name=param1]", "from the console")
    page.click("button:has-text('Enqueue')")
    expect(page.locator(".flash.ok")).to_contain_text("IMMEDIATE request")
    waiting = [client.enqueue(engine, "PAUSY") for _ in range(2)]
    # The replica is working: another job's request runs meanwhile; PAUSY's do not.
    other = client.enqueue(engine, "OTHER")
    wait_until(lambda: status_of(engine, other) == s.DONE, 30, "another job's request to run")
    with engine.connect() as conn:
        statuses = conn.execute(sa.select(s.prcreq.c.status).where(s.prcreq.c.mapref == "PAUSY")).scalars().all()
    assert statuses == [s.NEW] * 3

    page.goto(f"{page.base_url}/requests?mapref=PAUSY")
    expect(page.locator("#request-list .badge.paused")).to_have_count(3)
    page.click(f"a:has-text('{waiting[0]}')")
    expect(page.locator("#waiting")).to_contain_text("job PAUSY is paused")

    page.goto(f"{page.base_url}/jobs/PAUSY")
    page.click("button:has-text('Resume')")
    expect(page.locator(".flash.ok")).to_contain_text("resumed")
    page.goto(f"{page.base_url}/requests?mapref=PAUSY")
    expect(page.locator("#request-list .badge.st-done")).to_have_count(3, timeout=EXPECT_S)
    expect(page.locator("#request-list .badge.paused")).to_have_count(0)


def test_a_payload_containing_script_is_shown_as_text(page, engine, replica):
    from playwright.sync_api import expect
    client.register_job(engine, "ECHO", "worker.jobs.builtin:noop")
    rid = client.enqueue(engine, "ECHO", param1=SCRIPT)
    # A mapref that is markup: the replica fails it, and its error message carries the markup too.
    bad = client.enqueue(engine, "<b>x</b><script>window.__xss = 3</script>")
    wait_until(lambda: status_of(engine, bad) == s.FAILED and status_of(engine, rid) == s.DONE, 30,
               "both requests to end")

    log_in(page)
    for path in (f"/requests/{rid}", f"/requests/{bad}", "/requests", "/jobs", "/"):
        page.goto(page.base_url + path)
        assert page.evaluate("() => window.__xss") is None, path
        assert page.locator("main script, main img").count() == 0, path
    page.goto(f"{page.base_url}/requests/{rid}")
    # Shown literally, as text (inside its JSON string, where the quotes are escaped).
    expect(page.locator("#payload")).to_contain_text(json.dumps(SCRIPT)[1:-1])
    page.goto(f"{page.base_url}/requests/{bad}")
    expect(page.locator("#result")).to_contain_text("<script>window.__xss = 3</script>")
    expect(page.locator("h1")).to_contain_text(bad)
    assert page.evaluate("() => window.__xss") is None


def test_a_read_only_user_sees_the_request_but_its_buttons_are_disabled(page, engine):
    from playwright.sync_api import expect
    rid = client.enqueue(engine, "VIEWED")
    log_in(page, VIEWER)
    page.goto(f"{page.base_url}/requests/{rid}")
    expect(page.locator("button:has-text('Cancel')")).to_be_disabled()
    expect(page.locator(".who .role")).to_have_text("read-only")
    assert status_of(engine, rid) == s.NEW
