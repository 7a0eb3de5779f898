"""Configuration: the SPEC's variables, .env, flags, defaults, and one-line errors that never leak passwords.

Every test passes ``environ`` and ``dotenv_path`` explicitly, so the developer's own environment and
any ``.env`` in the working directory cannot change the outcome.
"""
from __future__ import annotations

import os
import subprocess
import sys
from urllib.parse import quote

import pytest
import sqlalchemy as sa

from worker.config import Config, ConfigError

PASSWORD = "s3cr:t@p/w%d"          # characters that need URL escaping
NO_DOTENV = "/nonexistent/dms-worker-test/.env"


def cfg(environ: dict[str, str] | None = None, dotenv_path=NO_DOTENV, **overrides) -> Config:
    return Config.from_env(environ=environ or {}, dotenv_path=dotenv_path, **overrides)


def assert_no_password(text: str, password: str = PASSWORD) -> None:
    assert password not in text
    assert quote(password, safe="") not in text
    assert quote(password) not in text


# -- defaults ---------------------------------------------------------------------------------------
def test_defaults_match_the_spec():
    c = cfg()
    # SQLite (the default) polls every second: nothing can wake it (issue 14, item 12).
    assert c.poll_interval == 1
    assert cfg({"DMS_DATABASE_URL": "postgresql://u@h/db"}).poll_interval == 15
    assert cfg({"SCHEDULER_POLL_INTERVAL": "7"}).poll_interval == 7
    assert c.refresh_interval == 60
    assert c.max_workers == 4
    assert c.timezone == "UTC"
    assert c.metrics_addr == "127.0.0.1"
    assert c.metrics_port == 9410
    assert c.schema is None
    url = sa.engine.make_url(c.database_url)
    # Nothing set: the SQLite file, in the working directory (a relative path).
    assert url.get_backend_name() == "sqlite"
    assert url.database and not os.path.isabs(url.database) and "/" not in url.database


def test_default_dotenv_path_is_dot_env_in_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("SCHEDULER_MAX_WORKERS=5\n")
    monkeypatch.chdir(tmp_path)
    assert Config.from_env(environ={}).max_workers == 5


# -- each variable is read ------------------------------------------------------------------------
@pytest.mark.parametrize("var, raw, attr, expected", [
    ("SCHEDULER_POLL_INTERVAL", "2.5", "poll_interval", 2.5),
    ("SCHEDULER_REFRESH_INTERVAL", "30", "refresh_interval", 30.0),
    ("SCHEDULER_MAX_WORKERS", "7", "max_workers", 7),
    ("SCHEDULER_TIMEZONE", "Europe/Berlin", "timezone", "Europe/Berlin"),
    ("SCHEMA", "DMSOWNER", "schema", "DMSOWNER"),
    ("DMS_METRICS_ADDR", "0.0.0.0", "metrics_addr", "0.0.0.0"),
    ("DMS_METRICS_PORT", "9500", "metrics_port", 9500),
    ("DMS_METRICS_PORT", "0", "metrics_port", 0),     # 0 turns the endpoint off: valid
    ("DMS_DATABASE_URL", "postgresql+psycopg://u@db.example/dms", "database_url",
     "postgresql+psycopg://u@db.example/dms"),
])
def test_each_spec_variable_is_read(var, raw, attr, expected):
    value = getattr(cfg({var: raw}), attr)
    assert value == expected and type(value) is type(expected)


def test_dms_database_url_takes_precedence_over_db_variables():
    c = cfg({"DMS_DATABASE_URL": "sqlite:///elsewhere.db", "DB_HOST": "orahost", "DB_SID": "ORCL",
             "DB_USER": "dms", "DB_PASSWORD": PASSWORD})
    assert c.database_url == "sqlite:///elsewhere.db"


def test_db_variables_build_an_oracle_url_with_service_name():
    c = cfg({"DB_HOST": "orahost", "DB_PORT": "1522", "DB_SID": "ORCLPDB1", "DB_USER": "dms",
             "DB_PASSWORD": PASSWORD})
    url = sa.engine.make_url(c.database_url)
    assert url.drivername == "oracle+oracledb"
    assert (url.host, url.port, url.username) == ("orahost", 1522, "dms")
    assert url.password == PASSWORD              # escaped on the way in, intact on the way out
    assert dict(url.query) == {"service_name": "ORCLPDB1"}
    assert url.database is None                  # a service name, not a SID in the path


def test_db_port_defaults_to_1521():
    url = sa.engine.make_url(cfg({"DB_HOST": "h", "DB_SID": "S", "DB_USER": "u"}).database_url)
    assert url.port == 1521 and url.password is None


# -- .env, environment, flags ------------------------------------------------------------------------
def test_values_from_dotenv_are_read_and_the_environment_wins(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("SCHEDULER_MAX_WORKERS=6\nSCHEDULER_TIMEZONE=Asia/Tokyo\n"
                      "DMS_DATABASE_URL=sqlite:///from-dotenv.db\n")
    only_file = cfg({}, dotenv_path=dotenv)
    assert (only_file.max_workers, only_file.timezone, only_file.database_url) == (
        6, "Asia/Tokyo", "sqlite:///from-dotenv.db")
    both = cfg({"SCHEDULER_MAX_WORKERS": "9", "DMS_DATABASE_URL": "sqlite:///from-env.db"}, dotenv_path=dotenv)
    assert both.max_workers == 9
    assert both.database_url == "sqlite:///from-env.db"
    assert both.timezone == "Asia/Tokyo"         # not set in the environment: the file's value stays


def test_flags_win_over_environment_and_dotenv(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("SCHEDULER_MAX_WORKERS=6\nSCHEDULER_POLL_INTERVAL=7\n")
    environ = {"SCHEDULER_MAX_WORKERS": "9", "DMS_DATABASE_URL": "sqlite:///from-env.db"}
    c = cfg(environ, dotenv_path=dotenv, max_workers=3, poll_interval=0.5, database_url="sqlite:///flag.db")
    assert (c.max_workers, c.poll_interval, c.database_url) == (3, 0.5, "sqlite:///flag.db")
    # A flag left unset (None, as argparse gives it) does not hide the environment's value.
    c = cfg(environ, dotenv_path=dotenv, max_workers=None, database_url=None)
    assert (c.max_workers, c.poll_interval, c.database_url) == (9, 7.0, "sqlite:///from-env.db")


def test_an_invalid_flag_is_rejected_like_an_invalid_variable():
    with pytest.raises(ConfigError, match="SCHEDULER_MAX_WORKERS"):
        cfg({}, max_workers=0)
    with pytest.raises(ConfigError, match="SCHEDULER_MAX_WORKERS"):
        cfg({}, max_workers=100000)       # `run --max-workers 100000`


def test_the_largest_accepted_values():
    c = cfg({"SCHEDULER_MAX_WORKERS": "256", "DMS_RETENTION_DAYS": "36500"})
    assert (c.max_workers, c.retention_days) == (256, 36500)


# -- invalid values: one line naming the variable ------------------------------------------------------
@pytest.mark.parametrize("environ, var", [
    ({"SCHEDULER_MAX_WORKERS": "abc"}, "SCHEDULER_MAX_WORKERS"),
    ({"SCHEDULER_MAX_WORKERS": "0"}, "SCHEDULER_MAX_WORKERS"),
    ({"SCHEDULER_MAX_WORKERS": "2.5"}, "SCHEDULER_MAX_WORKERS"),
    ({"SCHEDULER_TIMEZONE": "Mars/Base"}, "SCHEDULER_TIMEZONE"),
    ({"DMS_METRICS_PORT": "70000"}, "DMS_METRICS_PORT"),
    ({"DMS_METRICS_PORT": "-1"}, "DMS_METRICS_PORT"),
    ({"SCHEDULER_POLL_INTERVAL": "-1"}, "SCHEDULER_POLL_INTERVAL"),
    ({"SCHEDULER_POLL_INTERVAL": "0"}, "SCHEDULER_POLL_INTERVAL"),
    ({"SCHEDULER_REFRESH_INTERVAL": "soon"}, "SCHEDULER_REFRESH_INTERVAL"),
    ({"DMS_DATABASE_URL": "mysql://x"}, "DMS_DATABASE_URL"),
    ({"DMS_DATABASE_URL": f"mysql://dms:{PASSWORD}@h/db"}, "DMS_DATABASE_URL"),
    ({"DMS_DATABASE_URL": "not a url at all"}, "DMS_DATABASE_URL"),
    ({"DB_HOST": "orahost", "DB_USER": "dms", "DB_PASSWORD": PASSWORD}, "DB_SID"),
    ({"DB_HOST": "orahost", "DB_SID": "ORCL", "DB_PASSWORD": PASSWORD}, "DB_USER"),
    ({"DB_HOST": "orahost", "DB_SID": "ORCL", "DB_USER": "u", "DB_PORT": "abc", "DB_PASSWORD": PASSWORD},
     "DB_PORT"),
    # Upper bounds: 100,000 execution processes, or a retention that overflows every date type.
    ({"SCHEDULER_MAX_WORKERS": "100000"}, "SCHEDULER_MAX_WORKERS"),
    ({"SCHEDULER_MAX_WORKERS": "257"}, "SCHEDULER_MAX_WORKERS"),
    ({"DMS_RETENTION_DAYS": "1e9"}, "DMS_RETENTION_DAYS"),
    ({"DMS_RETENTION_DAYS": "36501"}, "DMS_RETENTION_DAYS"),
    ({"DMS_RETENTION_DAYS": "inf"}, "DMS_RETENTION_DAYS"),
    ({"SCHEDULER_POLL_INTERVAL": "inf"}, "SCHEDULER_POLL_INTERVAL"),
    ({"DMS_SHUTDOWN_GRACE": "nan"}, "DMS_SHUTDOWN_GRACE"),
    # A password with an unencoded '@': SQLAlchemy would read its tail as the host.
    ({"DMS_DATABASE_URL": "postgresql+psycopg://dms:s3cr@t@pghost:5432/dms"}, "DMS_DATABASE_URL"),
], ids=lambda v: ",".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else v)
def test_invalid_values_raise_one_line_naming_the_variable(environ, var):
    with pytest.raises(ConfigError) as info:
        cfg(environ)
    message = str(info.value)
    assert var in message
    assert "\n" not in message and message.strip() == message and message
    assert_no_password(message)


def test_an_invalid_value_in_dotenv_is_reported_too(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("SCHEDULER_TIMEZONE=Mars/Base\n")
    with pytest.raises(ConfigError, match="SCHEDULER_TIMEZONE"):
        cfg({}, dotenv_path=dotenv)


# -- passwords ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("environ", [
    {"DB_HOST": "orahost", "DB_SID": "ORCL", "DB_USER": "dms", "DB_PASSWORD": PASSWORD},
    {"DMS_DATABASE_URL": f"postgresql+psycopg://dms:{quote(PASSWORD, safe='')}@pghost:5432/dms"},
], ids=["DB_vars", "DMS_DATABASE_URL"])
def test_password_never_appears_in_str_repr_or_safe_url(environ):
    c = cfg(environ)
    assert sa.engine.make_url(c.database_url).password == PASSWORD    # it is there, for connecting
    for text in (str(c), repr(c), c.safe_url, repr(c.replace(max_workers=2))):
        assert_no_password(text)
    assert "***" in c.safe_url
    assert sa.engine.make_url(c.safe_url).host in ("orahost", "pghost")   # still useful to read


def test_an_unencoded_at_in_the_password_never_shows_its_tail():
    # SQLAlchemy reads user "dms", password "s3cr", host "t-tail@pghost": the tail of the
    # password would appear wherever the host is printed.
    url = "postgresql+psycopg://dms:s3cr@t-tail@pghost:5432/dms"
    with pytest.raises(ConfigError) as info:
        cfg({"DMS_DATABASE_URL": url})
    message = str(info.value)
    assert "DMS_DATABASE_URL" in message and "%40" in message
    for secret in ("s3cr", "t-tail", "pghost"):
        assert secret not in message
    from worker.config import mask_url
    assert "t-tail" not in mask_url(url) and "s3cr" not in mask_url(url) and "pghost" in mask_url(url)


@pytest.mark.parametrize("key", ["password", "PASSWORD", "sslpassword", "wallet_password"])
def test_a_password_in_the_query_string_is_masked(key):
    c = cfg({"DMS_DATABASE_URL": f"postgresql+psycopg://dms@pghost:5432/dms?{key}=hunter2&sslmode=require"})
    assert sa.engine.make_url(c.database_url).query[key] == "hunter2"      # still there, for connecting
    for text in (str(c), repr(c), c.safe_url):
        assert "hunter2" not in text
    assert f"{key}=***" in c.safe_url and "sslmode=require" in c.safe_url


# -- unknown variables --------------------------------------------------------------------------
def test_unknown_dms_and_scheduler_variables_are_collected_with_a_suggestion(tmp_path):
    dotenv = tmp_path / ".env"
    dotenv.write_text("SCHEDULER_POLL_INTERVALL=2\n")
    c = cfg({"DMS_MAX_WORKERS": "8", "DMS_LOG_LEVELS": "DEBUG", "DMS_FROBNICATE": "1",
             # known: read elsewhere, or by the test/bench/chaos suites; and not ours at all
             "DMS_TEST_PG_URL": "x", "DMS_VENV": "/opt/v", "DMS_MIGRATIONS_DIR": "/x", "DMS_CHAOS_SEED": "1",
             "SCHEDULER_MAX_WORKERS": "3", "DB_HOSTNAME": "x", "PATH": "/bin"}, dotenv_path=dotenv)
    assert c.max_workers == 3, "the misspelled DMS_MAX_WORKERS changed nothing"
    assert c.unknown_variables == ("DMS_FROBNICATE", "DMS_LOG_LEVELS", "DMS_MAX_WORKERS", "SCHEDULER_POLL_INTERVALL")
    warnings = c.unknown_variable_warnings()
    assert warnings[0] == "unknown variable DMS_FROBNICATE is ignored (the variables are listed in README.md)"
    assert "did you mean DMS_LOG_LEVEL?" in warnings[1]
    assert "did you mean SCHEDULER_MAX_WORKERS?" in warnings[2]
    assert "did you mean SCHEDULER_POLL_INTERVAL?" in warnings[3]
    assert cfg({"SCHEDULER_TIMEZONE": "UTC", "DMS_DATABASE_URL": "sqlite:///x.db"}).unknown_variables == ()


# -- the real command --------------------------------------------------------------------------------
def test_command_with_an_invalid_variable_exits_2_with_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DMS_", "DB_", "SCHEDULER_")) and k != "SCHEMA"}
    env["SCHEDULER_MAX_WORKERS"] = "abc"
    proc = subprocess.run([sys.executable, "-m", "worker", "status"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "SCHEDULER_MAX_WORKERS" in lines[0]
    assert "Traceback" not in proc.stderr
    # Start-up stopped before touching any database (no SQLite file was created).
    assert not list(tmp_path.iterdir())
