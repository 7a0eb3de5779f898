"""Console fixtures: the Flask app on a test database, logins, CSRF tokens."""
from __future__ import annotations

import re

import pytest
from werkzeug.security import generate_password_hash

from worker.console import ConsoleAuth, create_app
from worker.console.auth import User

OPERATOR_PW = "op-password-1"
VIEWER_PW = "viewer-password-1"
TOKEN = "t0ken-for-the-console-tests"


def make_auth(**kw) -> ConsoleAuth:
    """Token and two users, one per role (fast hashes: these are tests)."""
    users = {
        "olga": User("olga", "operator", generate_password_hash(OPERATOR_PW, method="pbkdf2:sha256:1000")),
        "vera": User("vera", "read-only", generate_password_hash(VIEWER_PW, method="pbkdf2:sha256:1000")),
    }
    return ConsoleAuth(**{"token": TOKEN, "users": users, **kw})


@pytest.fixture
def console(db_url):
    """``console(auth=..., **create_app kwargs)`` -> a Flask test client on the test database."""
    apps = []

    def build(auth: ConsoleAuth | None = None, **kw):
        app = create_app(db_url, auth=auth or make_auth(), timezone_name=kw.pop("timezone_name", "Europe/Berlin"),
                         secret_key="test-secret", **kw)
        app.testing = True
        apps.append(app)
        return app.test_client()

    return build


def csrf(client, path: str = "/") -> str:
    page = client.get(path).get_data(as_text=True)
    match = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert match, page[:500]
    return match.group(1)


def login(client, username: str | None = None, password: str | None = None, token: str | None = None):
    form = {"csrf_token": csrf(client, "/login")}
    form.update({"token": token} if token else {"username": username, "password": password})
    return client.post("/login", data=form)
