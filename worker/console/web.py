"""The console's Flask side: the blueprint (pages, actions, login), the standalone app, serving.

Pages read through ``data``; actions call ``worker.client``, the same functions as the CLI and
the Python client, so a retry from the browser leaves the rows a retry from the shell does.
Pages render server-side with Jinja's autoescaping and a strict Content-Security-Policy
(scripts and styles only from our own static files), so no payload, mapref or error message
can run as script; ``console.js`` only refreshes a page's live part and asks before
destructive actions, and every page works without it.
"""
from __future__ import annotations

import functools
import json
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from flask import (
    Blueprint,
    Flask,
    abort,
    current_app,
    flash,
    g,
    jsonify,
    redirect,
    render_template,
    request,
    session,
    url_for,
)
from sqlalchemy.engine import Engine
from werkzeug.exceptions import HTTPException

from .. import client
from .. import schema as s
from . import data
from .auth import OPERATOR, ROLES, ConsoleAuth, LoginThrottle, csrf_ok, host_header_is_loopback, new_csrf_token

log = logging.getLogger("worker.console")
SESSION_KEY = "dms_console"
REFRESH_HEADER = "X-DMS-Console-Refresh"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


def safe_path(target: str | None, default: str) -> str:
    """Only a path on this site: never an open redirect ('//host' and '/\\host' are other sites)."""
    if target and target.startswith("/") and not target.startswith("//") and "\\" not in target:
        return target
    return default


@dataclass
class Identity:
    who: str
    role: str
    bearer: bool = False       # authenticated by header, not by cookie: no CSRF token needed

    @property
    def can_act(self) -> bool:
        return self.role == OPERATOR


class _Engines:
    """Reads and writes. On SQLite the worker's own engine opens every transaction with
    BEGIN IMMEDIATE (the writer lock): page reads go through a plain engine instead, so that
    refreshing a page never queues behind, or holds up, the replicas."""

    def __init__(self, database: str | Engine, schema: str | None) -> None:
        if isinstance(database, Engine):
            self.write = self.read = database
            return
        from ..drivers import make_driver
        # Pre-ping: a console is idle for long stretches; after a database restart its first
        # page should still answer rather than show the dead pooled connection's error.
        self.write = make_driver(database, schema=schema, pre_ping=True).engine
        self.read = self.write
        if self.write.dialect.name == "sqlite":
            self.read = sa.create_engine(database, connect_args={"timeout": 10, "check_same_thread": False})


def create_blueprint(database: str | Engine, *, auth: ConsoleAuth | None = None,
                     role_of: Callable[[], str | None] | None = None, timezone_name: str = "UTC",
                     schema: str | None = None, name: str = "dms_console", refresh_s: int = 5) -> Blueprint:
    """The console as a blueprint; mount it with ``app.register_blueprint(bp, url_prefix="/dms")``.

    ``database``: a SQLAlchemy URL or the application's own Engine. Who may see and act:
    ``auth`` (token and users, default: from the environment) and/or ``role_of``, a function
    returning ``"operator"``, ``"read-only"`` or None for the current request (the host
    application's own login). One of them must be configured: a mounted console never runs
    open. The host application must have a ``secret_key`` (sessions carry the CSRF token)."""
    auth = auth or ConsoleAuth.from_env()
    if role_of is not None:
        auth.role_of = role_of
    if not auth.configured and auth.anonymous_role is None:
        raise ValueError("the console needs authentication: DMS_CONSOLE_TOKEN, DMS_CONSOLE_USERS_FILE, "
                         "or role_of=<function returning 'operator', 'read-only' or None>")
    ZoneInfo(timezone_name)   # a bad zone fails here, not on the first page
    engines = _Engines(database, schema)
    throttle = LoginThrottle()
    bp = Blueprint(name, __name__, template_folder="templates", static_folder="static",
                   static_url_path="/static")

    # -- identity, CSRF, headers ---------------------------------------------------------------
    def secret() -> bytes:
        key = current_app.secret_key
        if not key:
            raise RuntimeError("the application mounting the dms-worker console needs a secret_key")
        return key if isinstance(key, bytes) else str(key).encode()

    def state() -> dict[str, Any]:
        st = dict(session.get(SESSION_KEY) or {})
        if not st.get("csrf"):
            st["csrf"] = new_csrf_token()
            session[SESSION_KEY] = st
        return st

    def identify() -> Identity | None:
        header = request.headers.get("Authorization", "")
        if header.lower().startswith("bearer "):
            if auth.check_token(header[7:].strip()):
                return Identity("token", OPERATOR, bearer=True)
            abort(401, "wrong bearer token")
        if auth.role_of is not None:
            role = auth.role_of()
            if role in ROLES:
                return Identity("application user", role)
        st = state()
        who = st.get("who")
        if who:
            fp = auth.fingerprint(secret(), who)
            if fp and st.get("fp") and csrf_ok(fp, st["fp"]):
                return Identity(who, OPERATOR if who == "token" else auth.users[who].role)
            session[SESSION_KEY] = {"csrf": st["csrf"]}        # credential changed: log out
        if auth.anonymous_role:
            return Identity("anonymous (loopback)", auth.anonymous_role)
        return None

    @bp.before_request
    def _guard():
        if auth.anonymous_role and not host_header_is_loopback(request.host):
            # No credentials means loopback only; a foreign Host header is DNS rebinding.
            abort(403, "this console answers loopback host names only (it has no authentication configured)")
        if request.endpoint == f"{name}.static":
            return None
        g.identity = identify()
        if request.method == "POST":
            if not (g.identity and g.identity.bearer):
                given = request.form.get("csrf_token") or request.headers.get("X-CSRF-Token")
                if not csrf_ok(state().get("csrf"), given):
                    abort(400, "missing or wrong CSRF token: reload the page and try again")
            if request.endpoint in (f"{name}.login", f"{name}.logout"):
                return None
            if g.identity is None:
                abort(401, "log in first")
            if not g.identity.can_act:
                abort(403, f"{g.identity.who} has the read-only role: operators only")
            return None
        if g.identity is None and request.endpoint != f"{name}.login":
            if wants_json():
                abort(401, "log in first, or send Authorization: Bearer <DMS_CONSOLE_TOKEN>")
            if not auth.has_login:      # only the host application's login: ours has nothing to offer
                abort(401, "log in to the application first")
            return redirect(url_for(f"{name}.login", next=request.full_path.rstrip("?")))
        return None

    @bp.after_request
    def _headers(response):
        response.headers["Content-Security-Policy"] = CSP
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "same-origin"
        if request.endpoint != f"{name}.static":
            response.headers["Cache-Control"] = "no-store"
        return response

    @bp.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        if wants_json():
            return jsonify(ok=False, error=exc.description), exc.code
        return render_template("dms_console/error.html", code=exc.code, message=exc.description), exc.code

    @bp.errorhandler(sa.exc.OperationalError)
    def _db_error(exc: sa.exc.OperationalError):
        message = "database unavailable: " + " ".join(str(exc.orig or exc).split())[:300]
        log.warning("%s", message)
        if wants_json():
            return jsonify(ok=False, error=message), 503
        return render_template("dms_console/error.html", code=503, message=message), 503

    @bp.app_template_filter("dms_time")
    def _time(value: datetime | None) -> str:
        if value is None:
            return "—"
        aware = value if value.tzinfo else value.replace(tzinfo=timezone.utc)
        return aware.astimezone(ZoneInfo(timezone_name)).strftime("%Y-%m-%d %H:%M:%S %z")

    @bp.app_template_filter("dms_pretty")
    def _pretty(value: Any) -> str:
        # A plain string: Jinja escapes it, so '<script>' in a payload is shown, never run.
        return value if isinstance(value, str) else json.dumps(value, indent=2, ensure_ascii=False, default=str)

    @bp.app_template_filter("dms_seconds")
    def _seconds(value: float | None) -> str:
        if value is None:
            return "—"
        if abs(value) < 10:
            return f"{value:.2f} s"
        if abs(value) < 120:
            return f"{value:.0f} s"
        if abs(value) < 7200:
            return f"{value / 60:.1f} min"
        return f"{value / 3600:.1f} h"

    @bp.context_processor
    def _globals():
        ident = getattr(g, "identity", None)
        return {"console": name, "identity": ident, "csrf_token": lambda: state()["csrf"],
                "timezone_name": timezone_name, "refresh_s": refresh_s, "has_login": auth.has_login,
                "statuses": data.STATUSES, "request_types": s.REQUEST_TYPES}

    # -- helpers -------------------------------------------------------------------------------
    def wants_json() -> bool:
        accept = request.headers.get("Accept", "")
        return (request.args.get("format") == "json"
                or ("application/json" in accept and "text/html" not in accept)
                or request.headers.get("Authorization", "").lower().startswith("bearer "))

    def page(template: str, live: str, **context):
        """A full page, or only its live part when console.js refreshes it."""
        if request.headers.get(REFRESH_HEADER):
            return render_template(f"dms_console/{live}", **context)
        return render_template(f"dms_console/{template}", live=f"dms_console/{live}", **context)

    def read() -> Any:
        return engines.read.connect()

    def back(default: str) -> str:
        return safe_path(request.form.get("next"), default)

    def act(message: Callable[..., str], default_next: Callable[..., str]):
        """Run an action; answer with JSON (scripts) or a flash message and a redirect (browsers)."""
        def decorator(func):
            @functools.wraps(func)
            def view(**kw):
                try:
                    result = func(**kw)
                except LookupError as exc:
                    abort(404, exc.args[0] if exc.args else str(exc))
                except (client.ActionRefused, ValueError, sa.exc.IntegrityError) as exc:
                    # A race the conditional UPDATE lost (e.g. a unique key taken meanwhile) is
                    # refused like any other: one line, the database's own words.
                    text = " ".join(str(getattr(exc, "orig", None) or exc).split())[:300]
                    if wants_json():
                        return jsonify(ok=False, error=text), 409
                    flash(text, "error")
                    return redirect(back(default_next(**kw)))
                text = message(**kw) if result is None else result
                log.info("console: %s by %s", text, g.identity.who)
                if wants_json():
                    return jsonify(ok=True, message=text)
                flash(text, "ok")
                return redirect(back(default_next(**kw)))
            return view
        return decorator

    def by() -> str:
        return f"console user {g.identity.who}"

    # -- login ---------------------------------------------------------------------------------
    @bp.route("/login", methods=["GET", "POST"])
    def login():
        target = safe_path(request.values.get("next"), url_for(f"{name}.overview"))
        if not auth.has_login:
            return redirect(target)
        error = None
        if request.method == "POST":
            addr = request.remote_addr or "?"
            if throttle.blocked(addr):
                abort(429, "too many failed logins: wait a minute")
            who = None
            if request.form.get("token"):
                who = "token" if auth.check_token(request.form["token"]) else None
            elif request.form.get("username"):
                user = auth.check_user(request.form["username"], request.form.get("password", ""))
                who = user.name if user else None
            if who:
                # A fresh CSRF token at login: one planted before it is worth nothing.
                session[SESSION_KEY] = {"csrf": new_csrf_token(), "who": who, "fp": auth.fingerprint(secret(), who)}
                return redirect(target)
            throttle.failed(addr)
            error = "wrong token, user name or password"
        return render_template("dms_console/login.html", error=error, next=target,
                               token_login=bool(auth.token), user_login=bool(auth.users)), (401 if error else 200)

    @bp.route("/logout", methods=["POST"])
    def logout():
        session[SESSION_KEY] = {"csrf": new_csrf_token()}
        return redirect(url_for(f"{name}.login"))

    # -- pages ---------------------------------------------------------------------------------
    @bp.route("/")
    def overview():
        with read() as conn:
            now = data.db_now(conn)
            ctx = {"cluster": data.cluster(conn, now), "queue": data.queue(conn, now)}
        if wants_json():
            return jsonify(data.jsonable(ctx))
        return page("overview.html", "_overview.html", **ctx)

    @bp.route("/requests")
    def requests_list():
        try:
            f = data.RequestFilter.parse(request.args)
            limit = int(request.args.get("limit") or data.PAGE_DEFAULT)
        except ValueError as exc:
            abort(400, str(exc) if isinstance(exc, data.BadFilter) else "limit must be an integer")
        with read() as conn:
            try:
                result = data.request_page(conn, f, limit=limit, cursor=request.args.get("cursor"))
            except data.BadFilter as exc:
                abort(400, str(exc))
        if wants_json():
            return jsonify(data.jsonable(result))
        return page("requests.html", "_requests.html", cursor=request.args.get("cursor"), **result)

    @bp.route("/requests/<request_id>")
    def request_page(request_id: str):
        with read() as conn:
            detail = data.request_detail(conn, request_id)
        if detail is None:
            abort(404, f"no request {request_id!r}")
        if wants_json():
            out = dict(detail)
            out["request"] = {k: v for k, v in detail["request"].items() if k not in ("payload_value", "result_value")}
            return jsonify(data.jsonable(out))
        # "req", not "request": that name is Flask's in templates.
        return page("request.html", "_request.html", req=detail["request"],
                    **{k: v for k, v in detail.items() if k != "request"})

    @bp.route("/schedules")
    def schedules():
        with read() as conn:
            rows = data.schedules(conn, timezone_name)
        if wants_json():
            return jsonify(data.jsonable({"timezone": timezone_name, "schedules": rows}))
        return page("schedules.html", "_schedules.html", schedules=rows)

    @bp.route("/schedules/<int:jobschid>")
    def schedule(jobschid: int):
        with read() as conn:
            rows = data.schedules(conn, timezone_name, jobschid=jobschid)
        if not rows:
            abort(404, f"no schedule {jobschid}")
        if wants_json():
            return jsonify(data.jsonable({"timezone": timezone_name, "schedule": rows[0]}))
        return page("schedules.html", "_schedules.html", schedules=rows, one=rows[0])

    @bp.route("/jobs")
    def jobs():
        with read() as conn:
            rows = data.jobs(conn, runs=50)
        if wants_json():
            return jsonify(data.jsonable({"jobs": [{k: v for k, v in j.items() if k != "recent"} for j in rows]}))
        for j in rows:
            j["chart"] = data.chart(j["recent"], width=240, height=36)
        return page("jobs.html", "_jobs.html", jobs=rows)

    @bp.route("/jobs/<mapref>")
    def job(mapref: str):
        with read() as conn:
            detail = data.job_detail(conn, mapref, timezone_name)
        if detail is None:
            abort(404, f"no job {mapref!r}")
        if wants_json():
            return jsonify(data.jsonable(detail))
        return page("job.html", "_job.html", job=detail, chart=data.chart(detail["recent"], width=900, height=160))

    # -- actions: the client's functions, nothing else -----------------------------------------
    def request_next(request_id: str) -> str:
        return url_for(f"{name}.request_page", request_id=request_id)

    @bp.route("/requests/<request_id>/retry", methods=["POST"])
    @act(lambda request_id: f"request {request_id} retried: back to NEW", request_next)
    def retry(request_id: str):
        with engines.write.begin() as conn:
            client.retry(conn, request_id, by=by())

    @bp.route("/requests/<request_id>/cancel", methods=["POST"])
    @act(lambda request_id: f"request {request_id} cancelled", request_next)
    def cancel(request_id: str):
        with engines.write.begin() as conn:
            client.cancel(conn, request_id, by=by())

    @bp.route("/requests/<request_id>/stop", methods=["POST"])
    @act(lambda request_id: f"stop of {request_id} requested", request_next)
    def stop(request_id: str):
        with engines.write.begin() as conn:
            stop_id = client.stop(conn, request_id)
        return f"stop of {request_id} requested (STOP request {stop_id}): its replica terminates it"

    def schedule_next(jobschid: int) -> str:
        return url_for(f"{name}.schedule", jobschid=jobschid)

    @bp.route("/schedules/<int:jobschid>/enable", methods=["POST"])
    @act(lambda jobschid: f"schedule {jobschid} enabled", schedule_next)
    def schedule_enable(jobschid: int):
        with engines.write.begin() as conn:
            client.enable_schedule(conn, jobschid)

    @bp.route("/schedules/<int:jobschid>/disable", methods=["POST"])
    @act(lambda jobschid: f"schedule {jobschid} disabled", schedule_next)
    def schedule_disable(jobschid: int):
        with engines.write.begin() as conn:
            client.disable_schedule(conn, jobschid)

    def job_next(mapref: str) -> str:
        return url_for(f"{name}.job", mapref=mapref)

    @bp.route("/jobs/<mapref>/pause", methods=["POST"])
    @act(lambda mapref: f"job {mapref} paused: its requests wait", job_next)
    def job_pause(mapref: str):
        with engines.write.begin() as conn:
            client.pause_job(conn, mapref)

    @bp.route("/jobs/<mapref>/resume", methods=["POST"])
    @act(lambda mapref: f"job {mapref} resumed", job_next)
    def job_resume(mapref: str):
        with engines.write.begin() as conn:
            client.resume_job(conn, mapref)

    @bp.route("/jobs/<mapref>/enqueue", methods=["POST"])
    @act(lambda mapref: f"{mapref} enqueued", job_next)
    def job_enqueue(mapref: str):
        form = request.form
        kind = (form.get("request_type") or s.IMMEDIATE).upper()
        # Keyword arguments of client.enqueue: payload params, then its priority and unique_key.
        params: dict[str, Any] = {k: form[k] for k in (*s.PARAM_COLUMNS, "truncate_flag") if form.get(k, "").strip()}
        extra: dict[str, Any] = {}
        if form.get("priority", "").strip():
            try:
                extra["priority"] = int(form["priority"])
            except ValueError:
                raise ValueError(f"priority {form['priority']!r} is not an integer") from None
        if form.get("unique_key", "").strip():
            extra["unique_key"] = form["unique_key"].strip()
        with engines.write.begin() as conn:
            if conn.execute(sa.select(s.job.c.mapref).where(s.job.c.mapref == mapref)).first() is None:
                raise LookupError(f"no job {mapref!r}")
            if kind == s.HISTORY:
                start, end = form.get("start_date", "").strip(), form.get("end_date", "").strip()
                for label, value in (("start date", start), ("end date", end)):
                    try:
                        datetime.strptime(value, "%Y-%m-%d")
                    except ValueError:
                        raise ValueError(f"HISTORY needs a {label} as YYYY-MM-DD, not {value!r}") from None
                if start > end:
                    raise ValueError(f"the start date {start} is after the end date {end}")
                rid = client.enqueue_history(conn, mapref, start, end, **extra, **params)
            elif kind == s.IMMEDIATE:
                rid = client.enqueue(conn, mapref, **extra, **params)
            else:
                raise ValueError(f"the console enqueues IMMEDIATE or HISTORY requests, not {kind!r}")
        return f"{mapref}: {kind} request {rid} enqueued"

    return bp


def create_app(database: str, *, auth: ConsoleAuth, timezone_name: str = "UTC", schema: str | None = None,
               prefix: str = "", secret_key: bytes | str | None = None, secure_cookie: bool = False) -> Flask:
    """The standalone console: the blueprint in an application of its own."""
    app = Flask(__name__, static_folder=None)
    app.secret_key = secret_key or secrets.token_bytes(32)   # sessions end when the process does
    app.config.update(SESSION_COOKIE_NAME="dms_console", SESSION_COOKIE_HTTPONLY=True,
                      SESSION_COOKIE_SAMESITE="Lax", SESSION_COOKIE_SECURE=secure_cookie,
                      MAX_CONTENT_LENGTH=1 << 20)
    app.register_blueprint(create_blueprint(database, auth=auth, timezone_name=timezone_name, schema=schema),
                           url_prefix=prefix or None)
    return app


def create_app_from_env(env_file: str | None = ".env") -> Flask:
    """For a WSGI server: the standalone app configured from the environment (and ``.env``)."""
    import os

    from dotenv import dotenv_values

    from ..config import Config
    cfg = Config.from_env(dotenv_path=env_file)
    env = {**{k: v for k, v in (dotenv_values(env_file) if env_file and os.path.isfile(env_file) else {}).items()
              if v is not None}, **os.environ}
    auth = ConsoleAuth.from_env(env)
    if not auth.configured:
        raise ValueError("a console served by a WSGI server needs DMS_CONSOLE_TOKEN or DMS_CONSOLE_USERS_FILE")
    return create_app(cfg.database_url, auth=auth, timezone_name=cfg.timezone, schema=cfg.schema,
                      secret_key=env.get("DMS_CONSOLE_SECRET_KEY") or None,
                      secure_cookie=(env.get("DMS_CONSOLE_SECURE_COOKIE", "").lower() in ("1", "true", "yes", "on")))
