"""The console's authorisation rules: who may see, who may act, CSRF, the loopback rule.

Flask's test client against a real migrated database (SQLite here; the rules do not depend on
the backend). Each refusal also checks that the row it protects did not change.
"""
from __future__ import annotations

import re
import subprocess
import sys

import pytest
import sqlalchemy as sa
from flask import Flask

from tests.console.conftest import OPERATOR_PW, TOKEN, VIEWER_PW, csrf, login, make_auth
from worker import client
from worker import schema as s
from worker.console import AuthConfigError, ConsoleAuth, check_bind, create_blueprint, hash_password, is_loopback
from worker.console.auth import load_users


@pytest.fixture
def db_url(sqlite_url):
    return sqlite_url


@pytest.fixture
def failed(driver):
    """A FAILED request, the thing an operator would retry."""
    rid = client.enqueue(driver.engine, "AUTH_JOB", param1="x")
    with driver.engine.begin() as conn:
        conn.execute(sa.update(s.prcreq).values(status=s.FAILED, result_payload='{"error": "boom"}'))
    return rid


def status_of(driver, rid):
    return client.request_status(driver.engine, rid)["status"]


# -- the bind rule ------------------------------------------------------------------------------------
@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost"])
def test_loopback_addresses_need_no_auth(host):
    assert is_loopback(host)
    check_bind(host, ConsoleAuth())


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.0.2.10", "10.1.2.3", "db.example.com"])
def test_a_non_loopback_bind_without_auth_refuses_to_start(host):
    assert not is_loopback(host)
    with pytest.raises(AuthConfigError, match="DMS_CONSOLE_TOKEN"):
        check_bind(host, ConsoleAuth())
    check_bind(host, ConsoleAuth(token=TOKEN))            # with auth it may
    check_bind(host, make_auth(token=None))


def test_the_console_command_refuses_a_non_loopback_bind_without_auth(sqlite_url, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "DMS_DATABASE_URL": sqlite_url}
    proc = subprocess.run([sys.executable, "-m", "worker", "console", "--host", "0.0.0.0", "--port", "0"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "refusing" in line and "0.0.0.0" in line and "DMS_CONSOLE_TOKEN" in line
    assert "console on http" not in proc.stdout


def test_a_short_token_or_a_plain_password_in_the_users_file_is_refused(tmp_path):
    with pytest.raises(AuthConfigError, match="DMS_CONSOLE_TOKEN"):
        ConsoleAuth.from_env({"DMS_CONSOLE_TOKEN": "short"})
    users = tmp_path / "users"
    users.write_text("# name role hash\nann operator hunter2hunter2\n")
    with pytest.raises(AuthConfigError, match="line 2.*hash"):
        load_users(users)
    users.write_text(f"ann admin {hash_password('a-long-password')}\n")
    with pytest.raises(AuthConfigError, match="role 'admin'"):
        load_users(users)
    users.write_text(f"ann operator {hash_password('a-long-password')}\nbob read-only {hash_password('another-one')}\n")
    auth = ConsoleAuth.from_env({"DMS_CONSOLE_USERS_FILE": str(users)})
    assert auth.check_user("ann", "a-long-password").role == "operator"
    assert auth.check_user("ann", "wrong") is None and auth.check_user("nobody", "a-long-password") is None
    assert auth.users["bob"].role == "read-only"


# -- who may see --------------------------------------------------------------------------------------
def test_without_a_login_pages_redirect_to_the_login_and_json_gets_401(console, failed):
    c = console()
    response = c.get(f"/requests/{failed}")
    assert response.status_code == 302 and "/login?next=" in response.headers["Location"]
    assert c.get("/requests?format=json").status_code == 401
    assert c.get("/requests", headers={"Accept": "application/json"}).status_code == 401


def test_a_read_only_user_sees_every_page(console, failed):
    c = console()
    assert login(c, "vera", VIEWER_PW).status_code == 302
    for path in ("/", "/requests", f"/requests/{failed}", "/schedules", "/jobs"):
        assert c.get(path).status_code == 200, path
    page = c.get(f"/requests/{failed}").get_data(as_text=True)
    assert re.search(r'<button class="act[^"]*" disabled title="operators only">Retry', page)


# -- who may act --------------------------------------------------------------------------------------
def test_a_read_only_user_cannot_act(console, failed, driver):
    c = console()
    login(c, "vera", VIEWER_PW)
    token = csrf(c)
    for action in ("retry", "cancel", "stop"):
        response = c.post(f"/requests/{failed}/{action}", data={"csrf_token": token})
        assert response.status_code == 403, action
        assert "read-only" in response.get_data(as_text=True)
    client.register_job(driver.engine, "AUTH_JOB", "worker.jobs.builtin:noop")
    for path in ("/jobs/AUTH_JOB/pause", "/jobs/AUTH_JOB/enqueue"):
        assert c.post(path, data={"csrf_token": token}).status_code == 403, path
    assert status_of(driver, failed) == s.FAILED
    with driver.engine.connect() as conn:
        assert conn.execute(sa.select(s.job.c.paused)).scalar_one() == "N"
        assert conn.execute(sa.select(sa.func.count()).select_from(s.prcreq)).scalar_one() == 1


def test_an_operator_can_act(console, failed, driver):
    c = console()
    login(c, "olga", OPERATOR_PW)
    response = c.post(f"/requests/{failed}/retry", data={"csrf_token": csrf(c)})
    assert response.status_code == 302
    assert status_of(driver, failed) == s.NEW
    assert "olga" in client.request_status(driver.engine, failed)["result_payload"]


def test_no_action_without_the_csrf_token(console, failed, driver):
    c = console()
    login(c, "olga", OPERATOR_PW)
    assert c.post(f"/requests/{failed}/retry").status_code == 400
    assert c.post(f"/requests/{failed}/retry", data={"csrf_token": "forged"}).status_code == 400
    other = console()                     # another browser's token is not this session's
    login(other, "olga", OPERATOR_PW)
    assert c.post(f"/requests/{failed}/retry", data={"csrf_token": csrf(other)}).status_code == 400
    assert status_of(driver, failed) == s.FAILED
    # Logging in and out are CSRF-protected too (no login CSRF).
    fresh = console()
    assert fresh.post("/login", data={"username": "olga", "password": OPERATOR_PW}).status_code == 400


def test_actions_are_post_only(console, failed, driver):
    c = console()
    login(c, "olga", OPERATOR_PW)
    assert c.get(f"/requests/{failed}/retry").status_code == 405
    assert status_of(driver, failed) == s.FAILED


def test_a_bearer_token_acts_without_a_session_and_a_wrong_one_is_refused(console, failed, driver):
    c = console()
    wrong = c.post(f"/requests/{failed}/retry", headers={"Authorization": "Bearer not-the-token"})
    assert wrong.status_code == 401 and status_of(driver, failed) == s.FAILED
    right = c.post(f"/requests/{failed}/retry", headers={"Authorization": f"Bearer {TOKEN}"})
    assert right.status_code == 200 and right.json == {"ok": True, "message": f"request {failed} retried: back to NEW"}
    again = c.post(f"/requests/{failed}/retry", headers={"Authorization": f"Bearer {TOKEN}"})
    assert again.status_code == 409 and "NEW" in again.json["error"]
    assert c.get(f"/requests/{failed}", headers={"Authorization": f"Bearer {TOKEN}"}).json["request"]["status"] == "NEW"


def test_token_login_and_a_changed_token_ends_the_session(console, failed, db_url):
    auth = make_auth()
    c = console(auth)
    bad = login(c, token="wrong-token-wrong-token")
    assert bad.status_code == 401 and "wrong token" in bad.get_data(as_text=True)
    assert login(c, token=TOKEN).status_code == 302
    assert c.get("/requests").status_code == 200
    auth.token = "a-new-token-after-rotation"
    assert c.get("/requests").status_code == 302          # logged out: the session was made with the old one


def test_failed_logins_are_throttled(console):
    c = console()
    for _ in range(10):
        assert login(c, "olga", "wrong password").status_code == 401
    assert login(c, "olga", OPERATOR_PW).status_code == 429


def test_passwords_and_hashes_never_appear_in_pages(console, failed):
    auth = make_auth()
    c = console(auth)
    page = login(c, "olga", "wrong password").get_data(as_text=True)
    login(c, "olga", OPERATOR_PW)
    for path in ("/", "/requests", f"/requests/{failed}", "/jobs", "/schedules", "/login"):
        page += c.get(path, follow_redirects=True).get_data(as_text=True)
    for secret in (OPERATOR_PW, VIEWER_PW, "wrong password", TOKEN, *(u.password_hash for u in auth.users.values())):
        assert secret not in page


def test_session_cookie_and_security_headers(console):
    c = console()
    response = login(c, "olga", OPERATOR_PW)
    cookie = response.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
    page = c.get("/")
    csp = page.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert page.headers["X-Frame-Options"] == "DENY"


def test_redirects_stay_on_the_site(console, failed):
    c = console()
    login(c, "olga", OPERATOR_PW)
    for evil in ("//evil.example/x", "/\\evil.example/x", "https://evil.example/"):
        response = c.post(f"/requests/{failed}/cancel", data={"csrf_token": csrf(c), "next": evil})
        assert response.headers["Location"] == f"/requests/{failed}", evil
    for evil in ("https://evil.example/", "/\\evil.example"):
        fresh = console()
        response = fresh.post("/login", data={"csrf_token": csrf(fresh, "/login"), "username": "olga",
                                              "password": OPERATOR_PW, "next": evil})
        assert response.headers["Location"] == "/", evil


# -- no credentials: loopback only ---------------------------------------------------------------------
def test_without_credentials_everyone_on_loopback_operates_but_foreign_host_names_are_refused(console, failed, driver):
    c = console(ConsoleAuth(anonymous_role="operator"))
    assert c.get("/requests", headers={"Host": "evil.example"}).status_code == 403    # DNS rebinding
    assert c.get("/requests", headers={"Host": "localhost:9480"}).status_code == 200
    token = csrf(c, f"/requests/{failed}")
    assert c.post(f"/requests/{failed}/retry", data={"csrf_token": token},
                  headers={"Host": "evil.example"}).status_code == 403
    assert status_of(driver, failed) == s.FAILED
    assert c.post(f"/requests/{failed}/retry", data={}).status_code == 400          # CSRF still applies
    assert c.post(f"/requests/{failed}/retry", data={"csrf_token": token}).status_code == 302
    assert status_of(driver, failed) == s.NEW


# -- mounted in another application -------------------------------------------------------------------
def test_a_blueprint_without_any_auth_is_refused(db_url):
    with pytest.raises(ValueError, match="authentication"):
        create_blueprint(db_url, auth=ConsoleAuth())


def test_a_blueprint_under_a_prefix_with_the_host_applications_login(db_url, failed, driver):
    app = Flask("host")
    app.secret_key = "host-secret"
    current = {"role": None}
    app.register_blueprint(create_blueprint(db_url, auth=ConsoleAuth(), role_of=lambda: current["role"]),
                           url_prefix="/ops/dms")

    @app.route("/")
    def home():
        return "the host application"

    c = app.test_client()
    assert c.get("/").get_data(as_text=True) == "the host application"
    assert c.get("/ops/dms/requests?format=json").status_code == 401
    assert c.get("/ops/dms/requests").status_code == 401       # no login of ours to redirect to
    current["role"] = "read-only"
    page = c.get(f"/ops/dms/requests/{failed}").get_data(as_text=True)
    assert 'href="/ops/dms/static/console.css"' in page and f'action="/ops/dms/requests/{failed}/retry"' in page
    token = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    assert c.post(f"/ops/dms/requests/{failed}/retry", data={"csrf_token": token}).status_code == 403
    current["role"] = "operator"
    assert c.post(f"/ops/dms/requests/{failed}/retry", data={"csrf_token": token}).status_code == 302
    assert status_of(driver, failed) == s.NEW


def test_the_app_for_a_wsgi_server_needs_credentials_and_can_require_https_cookies(sqlite_url, monkeypatch, tmp_path):
    from worker.console import create_app_from_env
    monkeypatch.chdir(tmp_path)
    for var in ("DMS_CONSOLE_TOKEN", "DMS_CONSOLE_USERS_FILE", "DMS_CONSOLE_SECURE_COOKIE", "DMS_CONSOLE_SECRET_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("DMS_DATABASE_URL", sqlite_url)
    with pytest.raises(ValueError, match="DMS_CONSOLE_TOKEN"):
        create_app_from_env()
    monkeypatch.setenv("DMS_CONSOLE_TOKEN", TOKEN)
    monkeypatch.setenv("DMS_CONSOLE_SECURE_COOKIE", "true")
    app = create_app_from_env()
    c = app.test_client()
    response = login(c, token=TOKEN)
    assert "Secure" in response.headers["Set-Cookie"]


def test_a_prefix_moves_every_address(db_url, failed):
    from worker.console import create_app
    app = create_app(db_url, auth=make_auth(), prefix="/dms", secret_key="k")
    c = app.test_client()
    assert c.get("/requests", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 404
    assert c.get("/dms/requests", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert c.get("/dms/static/console.js").status_code == 200
    assert c.get("/dms/requests").headers["Location"].startswith("/dms/login")
