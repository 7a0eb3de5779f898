"""Configuration: the SPEC's environment variables (also read from ``.env``), validated once.

``Config.from_env()`` is the only place that reads the environment. Every invalid value raises
``ConfigError`` whose message is one line naming the variable; passwords never appear in it,
nor in ``Config``'s repr or ``safe_url``.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import quote
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import sqlalchemy as sa
from dotenv import dotenv_values

DEFAULT_SQLITE_FILE = "dms-worker.db"
SQLITE_POLL_INTERVAL = 1.0
# Built-in file jobs (worker.jobs.csv) read and write only below these directories.
FILE_ROOTS_VAR = "DMS_FILE_ROOTS"
# `connection: env:NAME` in a file job's params may name only variables with this prefix.
CONNECTION_PREFIX = "DMS_CONN_"
# Each slot is an operating-system process: beyond this, run more replicas instead.
MAX_WORKERS_LIMIT = 256
# A century; more is a typo (1e9 days overflows every date type).
MAX_RETENTION_DAYS = 36500


class ConfigError(ValueError):
    """An invalid setting; ``str()`` is one line that names the variable."""


@dataclass(frozen=True)
class Config:
    database_url: str = f"sqlite:///{DEFAULT_SQLITE_FILE}"
    schema: str | None = None
    poll_interval: float = 15.0
    refresh_interval: float = 60.0
    max_workers: int = 4
    timezone: str = "UTC"
    metrics_addr: str = "127.0.0.1"
    metrics_port: int = 9410
    heartbeat_interval: float = 1.0
    rescue_after: float = 8.0
    shutdown_grace: float = 30.0
    stop_grace: float = 0.5
    wakeup: str = "auto"
    leader_mode: str = "auto"
    leader_ttl: float = 10.0
    retention_days: float = 30.0
    log_retention_days: float | None = None     # DMS_PRCLOG/JOBLOG/JOBERR: kept for ever by default
    retry_max_delay: float = 3600.0
    log_level: str = "INFO"
    log_file: str | None = None
    log_json: bool = False
    worker_name: str | None = None
    # DMS_FILE_ROOTS: directories the built-in file jobs may use (empty: file jobs refused).
    file_roots: tuple[str, ...] = ()
    # DMS_CONN_* variables: database URLs file jobs may name as `connection: env:DMS_CONN_X`.
    connections: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)
    extra: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)
    # DMS_*/SCHEDULER_* names that were set but mean nothing here (a typo, an old name): the
    # command warns about them at start-up rather than silently running on defaults.
    unknown_variables: tuple[str, ...] = field(default=(), repr=False, compare=False)

    def __post_init__(self) -> None:
        _validate(self)

    @property
    def fence_s(self) -> float:
        """How long an execution runs on without a confirmed heartbeat before it stops itself:
        two heartbeats inside the rescue window, so it has stopped before anyone may rescue."""
        return self.rescue_after - 2 * self.heartbeat_interval

    @property
    def statement_timeout_s(self) -> float:
        """The bound on each of the replica's own database statements and lock waits."""
        return min(10.0, max(0.5, self.fence_s / 2))

    @property
    def safe_url(self) -> str:
        """The database URL with any password masked, for logs and status output."""
        return mask_url(self.database_url)

    def __repr__(self) -> str:  # never leak the password through a repr in a traceback
        fields = ", ".join(
            f"{f.name}={self.safe_url if f.name == 'database_url' else getattr(self, f.name)!r}"
            for f in dataclasses.fields(self) if f.repr
        )
        return f"Config({fields})"

    def replace(self, **changes) -> Config:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, dotenv_path: str | Path | None = ".env",
                 **overrides) -> Config:
        """Build from ``environ`` (default ``os.environ``) over ``.env``; ``overrides`` win (CLI flags)."""
        env: dict[str, str] = {}
        if dotenv_path and Path(dotenv_path).is_file():
            env.update({k: v for k, v in dotenv_values(dotenv_path).items() if v is not None})
        env.update(os.environ if environ is None else environ)
        # Field name -> value, each of its own field's type (by _VARIABLES' parsers); __post_init__ checks them.
        values: dict[str, Any] = {"database_url": _database_url(env)}
        for var, (name, parse) in _VARIABLES.items():
            raw = env.get(var)
            if raw is not None and raw.strip() != "":
                values[name] = _parse(var, raw.strip(), parse)
        values["connections"] = {k: v.strip() for k, v in env.items() if k.startswith(CONNECTION_PREFIX) and v.strip()}
        values.update({k: v for k, v in overrides.items() if v is not None})
        if "poll_interval" not in values and str(values["database_url"]).startswith("sqlite"):
            # SQLite has no wake-up channel (a web app's INSERT can tell no one): poll often.
            # A claim there is a local file read, so a 1 s poll costs next to nothing.
            values["poll_interval"] = SQLITE_POLL_INTERVAL
        values["unknown_variables"] = unknown_variables(env)
        return cls(**values)

    def job_environment(self) -> dict[str, str]:
        """The variables the built-in jobs read in an execution process (DMS_FILE_ROOTS and
        DMS_CONN_*), as this configuration resolved them; empty DMS_FILE_ROOTS means none."""
        return {FILE_ROOTS_VAR: os.pathsep.join(self.file_roots), **self.connections}

    def unknown_variable_warnings(self) -> list[str]:
        """One line per unknown DMS_*/SCHEDULER_* variable, with the likely intended name."""
        return [unknown_variable_warning(name) for name in self.unknown_variables]


# Variables of the dms-worker family that are read outside ``Config`` (or by tools around it),
# so that they are not reported as unknown. Prefixes cover the test, benchmark and chaos suites.
KNOWN_ELSEWHERE = {"DMS_DATABASE_URL", "DMS_MIGRATIONS_DIR", "DMS_VENV",
                   # the web console's (worker.console.auth, docs/console.md)
                   "DMS_CONSOLE_TOKEN", "DMS_CONSOLE_USERS_FILE", "DMS_CONSOLE_SECRET_KEY", "DMS_CONSOLE_SECURE_COOKIE"}
KNOWN_PREFIXES = ("DMS_TEST_", "DMS_BENCH_", "DMS_CHAOS_")
_FAMILY = re.compile(r"^(DMS|SCHEDULER)_[A-Z0-9_]+$")


def unknown_variables(env: Mapping[str, str]) -> tuple[str, ...]:
    known = set(_VARIABLES) | KNOWN_ELSEWHERE
    return tuple(sorted(name for name in env if _FAMILY.match(name) and name not in known
                        and not name.startswith(KNOWN_PREFIXES)))


def unknown_variable_warning(name: str) -> str:
    known = sorted(k for k in set(_VARIABLES) | KNOWN_ELSEWHERE if _FAMILY.match(k))
    # Compare without the prefix too: DMS_MAX_WORKERS is SCHEDULER_MAX_WORKERS misremembered.
    bare = {k.split("_", 1)[1]: k for k in known}
    guess = (difflib.get_close_matches(name, known, n=1, cutoff=0.75)
             or [bare[m] for m in difflib.get_close_matches(name.split("_", 1)[1], list(bare), n=1, cutoff=0.75)])
    hint = f"; did you mean {guess[0]}?" if guess else ""
    return f"unknown variable {name} is ignored{hint} (the variables are listed in README.md)"


# Names of values that carry secrets (URL query parameters: psycopg and oracledb take
# `password=` there; keys of a job's params, as the console shows them).
SECRET_NAME = re.compile(r"pass|pwd|secret|token", re.I)
_MASK = "***"


def mask_url(url: str) -> str:
    """``url`` for display: the password, and query parameters that hold secrets, as ``***``.

    A password with an unencoded ``@`` makes SQLAlchemy read its tail as part of the host
    (``user:p@ss@host`` -> host ``ss@host``): everything up to the last ``@`` is masked then.
    """
    try:
        parsed = sa.engine.make_url(url)
    except Exception:
        return "<unparseable database URL>"
    if parsed.host and "@" in parsed.host:
        parsed = parsed.set(username=_MASK, password=None, host=parsed.host.rsplit("@", 1)[1])
    query = {k: (_MASK if SECRET_NAME.search(k) else v) for k, v in parsed.query.items()}
    # render_as_string percent-encodes what it did not mask itself: show *** as ***.
    return parsed.set(query=query).render_as_string(hide_password=True).replace(quote(_MASK, safe=""), "***")


def _number(convert: Callable[[str], float], raw: str, expected: str) -> float:
    try:
        return convert(raw)
    except ValueError:
        raise ValueError(f"must be {expected}") from None


def _positive_float(raw: str) -> float:
    value = _number(float, raw, "a number > 0")
    if not (value > 0 and math.isfinite(value)):      # "inf" and "nan" parse as floats
        raise ValueError("must be a number > 0")
    return value


def _positive_int(raw: str) -> int:
    value = int(_number(int, raw, "an integer >= 1"))
    if value < 1:
        raise ValueError("must be an integer >= 1")
    return value


def _max_workers(raw: str) -> int:
    value = int(_number(int, raw, f"an integer 1..{MAX_WORKERS_LIMIT}"))
    if not 1 <= value <= MAX_WORKERS_LIMIT:
        raise ValueError(f"must be an integer 1..{MAX_WORKERS_LIMIT} (each is a process; run more replicas for more)")
    return value


def _retention_days(raw: str) -> float:
    value = _number(float, raw, f"a number of days > 0 and <= {MAX_RETENTION_DAYS}")
    if not (0 < value <= MAX_RETENTION_DAYS):
        raise ValueError(f"must be a number of days > 0 and <= {MAX_RETENTION_DAYS}")
    return value


def _port(raw: str) -> int:
    value = int(_number(int, raw, "a port number 0..65535 (0 turns the endpoint off)"))
    if not 0 <= value <= 65535:
        raise ValueError("must be a port number 0..65535 (0 turns the endpoint off)")
    return value


def _bool(raw: str) -> bool:
    lowered = raw.lower()
    if lowered in ("1", "true", "yes", "on", "y"):
        return True
    if lowered in ("0", "false", "no", "off", "n"):
        return False
    raise ValueError("must be true or false")


def _choice(*choices: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw.lower() not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}")
        return raw.lower()
    return parse


def _directories(raw: str) -> tuple[str, ...]:
    roots = tuple(part.strip() for part in raw.split(os.pathsep) if part.strip())
    if not roots or not all(os.path.isabs(r) for r in roots):
        raise ValueError(f"must be absolute directory paths separated by {os.pathsep!r}")
    return roots


def _level(raw: str) -> str:
    if raw.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        raise ValueError("must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
    return raw.upper()


_VARIABLES: dict[str, tuple[str, Callable[[str], object]]] = {
    "SCHEMA": ("schema", str),
    "SCHEDULER_POLL_INTERVAL": ("poll_interval", _positive_float),
    "SCHEDULER_REFRESH_INTERVAL": ("refresh_interval", _positive_float),
    "SCHEDULER_MAX_WORKERS": ("max_workers", _max_workers),
    "SCHEDULER_TIMEZONE": ("timezone", str),
    "DMS_METRICS_ADDR": ("metrics_addr", str),
    "DMS_METRICS_PORT": ("metrics_port", _port),
    "DMS_HEARTBEAT_INTERVAL": ("heartbeat_interval", _positive_float),
    "DMS_RESCUE_AFTER": ("rescue_after", _positive_float),
    "DMS_SHUTDOWN_GRACE": ("shutdown_grace", _positive_float),
    "DMS_STOP_GRACE": ("stop_grace", _positive_float),
    "DMS_WAKEUP": ("wakeup", _choice("auto", "poll")),
    "DMS_LEADER_MODE": ("leader_mode", _choice("auto", "lock", "lease")),
    "DMS_LEADER_TTL": ("leader_ttl", _positive_float),
    "DMS_RETENTION_DAYS": ("retention_days", _retention_days),
    "DMS_LOG_RETENTION_DAYS": ("log_retention_days", _retention_days),
    "DMS_RETRY_MAX_DELAY": ("retry_max_delay", _positive_float),
    "DMS_LOG_LEVEL": ("log_level", _level),
    "DMS_LOG_FILE": ("log_file", str),
    "DMS_LOG_JSON": ("log_json", _bool),
    "DMS_WORKER_NAME": ("worker_name", str),
    FILE_ROOTS_VAR: ("file_roots", _directories),
}

# Config field -> the variable users set, so errors raised by validation name the variable.
_FIELD_TO_VAR = {name: var for var, (name, _) in _VARIABLES.items()} | {"database_url": "DMS_DATABASE_URL"}


def _parse(var: str, raw: str, parse: Callable[[str], object]) -> object:
    try:
        return parse(raw)
    except ValueError as exc:   # every parser says what it expects ("must be ...")
        raise ConfigError(f"{var}={raw!r}: {exc}") from None


def _database_url(env: Mapping[str, str]) -> str:
    url = env.get("DMS_DATABASE_URL", "").strip()
    if url:
        return url
    if env.get("DB_HOST", "").strip():
        missing = [v for v in ("DB_SID", "DB_USER") if not env.get(v, "").strip()]
        if missing:
            raise ConfigError(f"{missing[0]}: required when DB_HOST is set (Oracle connection)")
        port = env.get("DB_PORT", "1521").strip() or "1521"
        if not port.isdigit():
            raise ConfigError(f"DB_PORT={port!r}: must be a port number")
        return sa.engine.URL.create(
            "oracle+oracledb", username=env["DB_USER"].strip(), password=env.get("DB_PASSWORD") or None,
            host=env["DB_HOST"].strip(), port=int(port), query={"service_name": env["DB_SID"].strip()},
        ).render_as_string(hide_password=False)
    return f"sqlite:///{DEFAULT_SQLITE_FILE}"


def _validate(cfg: Config) -> None:
    def fail(name: str, reason: str) -> NoReturn:
        raise ConfigError(f"{_FIELD_TO_VAR.get(name, name)}: {reason}")

    try:
        url = sa.engine.make_url(cfg.database_url)
    except Exception:
        fail("database_url", "not a valid SQLAlchemy URL (e.g. postgresql+psycopg://user@host/db)")
    if url.get_backend_name() not in ("sqlite", "postgresql", "oracle"):
        fail("database_url", f"unsupported backend {url.get_backend_name()!r} (sqlite, postgresql, oracle)")
    if url.host and "@" in url.host:
        # Never echo the URL here: what SQLAlchemy took for the host holds part of the password.
        fail("database_url", "the user name or password contains an unencoded '@': percent-encode"
                             " it, '@' as %40 (python3 -c \"import urllib.parse, getpass;"
                             " print(urllib.parse.quote(getpass.getpass(), safe=''))\" prints it encoded)")
    try:
        ZoneInfo(cfg.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        fail("timezone", f"{cfg.timezone!r} is not an IANA time zone (e.g. Europe/Berlin)")
    if not 1 <= cfg.max_workers <= MAX_WORKERS_LIMIT:
        fail("max_workers", f"must be an integer 1..{MAX_WORKERS_LIMIT} (each is a process; run more replicas for more)")
    for name in ("poll_interval", "refresh_interval", "heartbeat_interval", "rescue_after",
                 "shutdown_grace", "stop_grace", "leader_ttl", "retention_days", "retry_max_delay"):
        value = getattr(cfg, name)
        if not (value > 0 and math.isfinite(value)):
            fail(name, "must be a number > 0")
    if cfg.retention_days > MAX_RETENTION_DAYS:
        fail("retention_days", f"must be a number of days > 0 and <= {MAX_RETENTION_DAYS}")
    if cfg.leader_ttl < 3 * cfg.heartbeat_interval:
        fail("leader_ttl", f"must be at least 3 x DMS_HEARTBEAT_INTERVAL ({3 * cfg.heartbeat_interval:g} s)")
    if cfg.rescue_after < 3 * cfg.heartbeat_interval:
        fail("rescue_after", f"must be at least 3 x DMS_HEARTBEAT_INTERVAL ({3 * cfg.heartbeat_interval:g} s)")
    if cfg.log_retention_days is not None and not cfg.log_retention_days > 0:
        fail("log_retention_days", "must be a number > 0 (leave unset to keep the logs for ever)")
    if not 0 <= cfg.metrics_port <= 65535:
        fail("metrics_port", "must be a port number 0..65535")
