"""Who may see and who may act in the console: roles, credentials, CSRF, the loopback rule.

Two roles: ``read-only`` sees every page; ``operator`` also acts (retry, cancel, stop,
enqueue, pause, enable). Credentials, from the environment (or ``.env``):

- ``DMS_CONSOLE_TOKEN``: a shared secret. It logs in on the login page as an operator, and
  scripts send it as ``Authorization: Bearer <token>`` (no cookie, so no CSRF token needed).
- ``DMS_CONSOLE_USERS_FILE``: a file of ``name role password-hash`` lines (hashes from
  ``dms-worker console --hash-password``); only hashes are stored, no password is ever shown.

With neither, the console runs only on a loopback address, where whoever can reach it could
also run ``dms-worker`` on the host: everyone is an operator, and requests must name a loopback
host (``Host:`` header) so that a web page cannot reach it through DNS rebinding. A Flask
application that mounts the blueprint may instead hand over its own login (``role_of``).

Every state-changing request is a POST; a POST from a browser session must carry the
session's CSRF token, compared in constant time.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from werkzeug.security import check_password_hash, generate_password_hash

READ_ONLY, OPERATOR = "read-only", "operator"
ROLES = (READ_ONLY, OPERATOR)


class AuthConfigError(ValueError):
    """Bad console credentials configuration; the message names the variable or file line."""


@dataclass(frozen=True)
class User:
    name: str
    role: str
    password_hash: str = field(repr=False)


@dataclass
class ConsoleAuth:
    token: str | None = field(default=None, repr=False)
    users: dict[str, User] = field(default_factory=dict, repr=False)
    # A host application's own login: returns the role of the current request's user, or None.
    role_of: Callable[[], str | None] | None = None
    # No credentials at all (loopback only): the role everyone gets.
    anonymous_role: str | None = None

    @property
    def configured(self) -> bool:
        return bool(self.token or self.users or self.role_of)

    @property
    def has_login(self) -> bool:
        return bool(self.token or self.users)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ConsoleAuth:
        env = os.environ if env is None else env
        token = (env.get("DMS_CONSOLE_TOKEN") or "").strip() or None
        if token is not None and len(token) < 16:
            raise AuthConfigError("DMS_CONSOLE_TOKEN: must be at least 16 characters "
                                  "(e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(32))')")
        path = (env.get("DMS_CONSOLE_USERS_FILE") or "").strip()
        return cls(token=token, users=load_users(Path(path)) if path else {})

    def check_token(self, given: str | None) -> bool:
        if not (self.token and given):
            return False
        return hmac.compare_digest(self.token.encode(), given.encode())

    def check_user(self, name: str, password: str) -> User | None:
        user = self.users.get(name)
        # Hash even for an unknown name, so that timing does not tell which names exist.
        ok = check_password_hash(user.password_hash if user else _DUMMY_HASH, password)
        return user if user and ok else None

    def fingerprint(self, secret: bytes, who: str) -> str | None:
        """Binds a session to the credential it logged in with: a changed token or password (or
        a removed user) ends the sessions made with the old one."""
        material: str | None
        if who == "token":
            material = self.token
        else:
            user = self.users.get(who)
            material = f"{user.role}:{user.password_hash}" if user else None
        if not material:
            return None
        return hmac.new(secret, f"{who}\0{material}".encode(), hashlib.sha256).hexdigest()


_DUMMY_HASH = generate_password_hash("not a password, only for timing")


def hash_password(password: str) -> str:
    if len(password) < 8:
        raise AuthConfigError("a console password must be at least 8 characters")
    return generate_password_hash(password)


def load_users(path: Path) -> dict[str, User]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise AuthConfigError(f"DMS_CONSOLE_USERS_FILE: cannot read {path}: {exc.strerror}") from None
    users: dict[str, User] = {}
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        where = f"DMS_CONSOLE_USERS_FILE {path} line {number}"
        if len(parts) != 3:
            raise AuthConfigError(f"{where}: expected 'name role password-hash'")
        name, role, hashed = parts
        if role not in ROLES:
            raise AuthConfigError(f"{where}: role {role!r} is not one of {', '.join(ROLES)}")
        if "$" not in hashed or ":" not in hashed.split("$", 1)[0]:
            # A plain password in the file would work nowhere and is a leak: say so.
            raise AuthConfigError(f"{where}: the third field must be a hash from "
                                  "`dms-worker console --hash-password`, not a password")
        if name in users:
            raise AuthConfigError(f"{where}: user {name!r} appears twice")
        users[name] = User(name, role, hashed)
    return users


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost; False for 0.0.0.0, :: and every other address."""
    host = host.strip().strip("[]")
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_header_is_loopback(host_header: str) -> bool:
    """The Host header's name part (``127.0.0.1:8080``, ``[::1]:8080``, ``localhost``)."""
    host = host_header.strip()
    if host.startswith("["):
        host = host[1:host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return is_loopback(host)


def check_bind(host: str, auth: ConsoleAuth) -> None:
    """Refuse to serve on a non-loopback address without credentials."""
    if not is_loopback(host) and not auth.configured:
        raise AuthConfigError(
            f"refusing to serve the console on {host}, which is not a loopback address, without "
            "authentication: set DMS_CONSOLE_TOKEN or DMS_CONSOLE_USERS_FILE (see docs/console.md)")


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def csrf_ok(expected: str | None, given: str | None) -> bool:
    if not (expected and given):
        return False
    return hmac.compare_digest(expected.encode(), given.encode())


class LoginThrottle:
    """At most ``attempts`` failed logins per client address per ``window_s``: slows guessing."""

    def __init__(self, attempts: int = 10, window_s: float = 60.0) -> None:
        self.attempts, self.window_s = attempts, window_s
        self._failures: dict[str, list[float]] = {}

    def blocked(self, addr: str) -> bool:
        now = time.monotonic()
        recent = [t for t in self._failures.get(addr, []) if now - t < self.window_s]
        self._failures[addr] = recent
        return len(recent) >= self.attempts

    def failed(self, addr: str) -> None:
        self._failures.setdefault(addr, []).append(time.monotonic())
        if len(self._failures) > 10_000:          # bounded memory under a spray of addresses
            self._failures.clear()
