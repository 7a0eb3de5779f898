"""The migrations (what DBAs apply) agree with ``worker.schema.metadata`` (what the code's statements
are built from), on every dialect; and ``migrate()`` is idempotent and safe to run concurrently.

SQLite and PostgreSQL are checked by reflecting a migrated database. Oracle has no server here: its
migration is parsed with sqlglot, and the metadata's DDL is compiled with SQLAlchemy's Oracle dialect.
"""
from __future__ import annotations

import hashlib
import os
import secrets
import subprocess
import threading

import pytest
import sqlalchemy as sa
import sqlglot
from sqlalchemy.dialects import oracle
from sqlalchemy.schema import CreateTable
from sqlglot import exp

from tests.support import REPO
from worker import schema as s
from worker.drivers import make_driver
from worker.migrate import migrate, migrations_for

MIGRATIONS = REPO / "sql" / "migrations"
CHECK_SCHEMA = (REPO / ".." / "shared" / "tools" / "check-schema").resolve()
TEST_ONLY_TABLES = {"dms_test_probe"}
# Created by migrate() itself from the metadata (it must exist before V001 can be recorded).
BOOKKEEPING_TABLES = {s.schema_version.name}

# SQLite: a column declared INTEGER PRIMARY KEY is the rowid; it can never hold NULL (an inserted NULL
# becomes the next id) although PRAGMA table_info, and so reflection, reports it nullable.
# Any other PRIMARY KEY column in SQLite accepts NULL unless declared NOT NULL: see
# test_sqlite_text_primary_keys_reject_null below.
SQLITE_NULLABLE_TEXT_PKS = {("dms_prcreq", "request_id"), ("dms_job", "mapref"),
                            ("dms_worker", "worker_id"), ("dms_leader", "name")}


# -- type families ----------------------------------------------------------------------------------
def family(type_: sa.types.TypeEngine) -> str:
    if isinstance(type_, sa.DateTime):
        return "timestamp"
    if isinstance(type_, sa.Integer):
        return "integer"
    if isinstance(type_, sa.String):        # Text is a String
        return "string"
    if isinstance(type_, sa.Numeric) and not type_.scale:
        return "integer"
    return f"other:{type_!r}"


def length(type_: sa.types.TypeEngine) -> int | None:
    """A String's declared length; None for TEXT/CLOB (and non-strings)."""
    return None if isinstance(type_, sa.Text) else getattr(type_, "length", None)


def metadata_columns(table: sa.Table) -> dict[str, tuple[str, int | None, bool]]:
    return {c.name: (family(c.type), length(c.type), bool(c.nullable)) for c in table.columns}


# -- SQLite and PostgreSQL: reflect the migrated database ---------------------------------------------
@pytest.fixture
def inspector(db_url):
    engine = sa.create_engine(db_url)
    yield sa.inspect(engine)
    engine.dispose()


def test_migrated_tables_match_the_metadata(inspector):
    dialect = inspector.dialect.name
    tables = set(inspector.get_table_names()) - TEST_ONLY_TABLES
    assert tables == set(s.metadata.tables), "tables in the database and in worker.schema differ"
    problems = []
    for table in s.metadata.sorted_tables:
        reflected = {c["name"]: c for c in inspector.get_columns(table.name)}
        want = metadata_columns(table)
        if set(reflected) != set(want):
            problems.append(f"{table.name}: only in database {sorted(set(reflected) - set(want))}, "
                            f"only in metadata {sorted(set(want) - set(reflected))}")
            continue
        pk = set(inspector.get_pk_constraint(table.name)["constrained_columns"])
        if pk != {c.name for c in table.primary_key}:
            problems.append(f"{table.name}: primary key {sorted(pk)} in the database")
        for name, (fam, size, nullable) in want.items():
            col = reflected[name]
            got_nullable = col["nullable"]
            if dialect == "sqlite" and name in pk and (
                    family(col["type"]) == "integer" or (table.name, name) in SQLITE_NULLABLE_TEXT_PKS):
                got_nullable = False   # rowid alias (never NULL), or the known bug tested separately
            if family(col["type"]) != fam:
                problems.append(f"{table.name}.{name}: {col['type']} in the database, {fam} in metadata")
            elif fam == "string" and length(col["type"]) != size:
                problems.append(f"{table.name}.{name}: length {length(col['type'])} in the database, {size} in metadata")
            if got_nullable != nullable:
                problems.append(f"{table.name}.{name}: nullable={got_nullable} in the database, {nullable} in metadata")
            if dialect == "postgresql" and fam == "timestamp" and col["type"].timezone:
                problems.append(f"{table.name}.{name}: timestamp WITH time zone; the design stores naive UTC")
    assert not problems, "\n".join(problems)


def test_invariant_unique_indexes_exist(inspector):
    """Invariants 2 and 3 rest on unique indexes the metadata does not declare: check the database."""
    unique = {tuple(ix["column_names"]) for ix in inspector.get_indexes("dms_prcreq") if ix["unique"]}
    assert ("jobschid", "scheduled_for") in unique
    assert ("excl_key",) in unique


# One valid row per table with a text primary key, the key left to be filled in.
TEXT_PK_ROWS = {
    "dms_prcreq": ("request_id", {"mapref": "M", "request_type": "IMMEDIATE"}),
    "dms_job": ("mapref", {"handler": "worker.jobs.builtin:noop"}),
    "dms_worker": ("worker_id", {"host": "h", "pid": 1, "started_at": "2026-01-01 00:00:00.000000",
                                 "heartbeat_at": "2026-01-01 00:00:00.000000"}),
    "dms_leader": ("name", {"holder": "w"}),
}


def _insert_with_key(conn, table: str, key) -> None:
    column, values = TEXT_PK_ROWS[table]
    values = {column: key, **values}
    conn.execute(sa.text(f"INSERT INTO {table} ({', '.join(values)}) VALUES ({', '.join(':' + c for c in values)})"),
                 values)


def _null_keys_accepted(url: str) -> list[str]:
    engine = sa.create_engine(url)
    accepted = []
    try:
        for table in sorted(TEXT_PK_ROWS):
            with engine.begin() as conn:     # the row itself is valid: with a key it goes in
                _insert_with_key(conn, table, "k")
            try:
                with engine.begin() as conn:
                    _insert_with_key(conn, table, None)
                accepted.append(f"{table}.{TEXT_PK_ROWS[table][0]}")
            except sa.exc.IntegrityError:
                pass
    finally:
        engine.dispose()
    return accepted


def test_postgresql_primary_keys_reject_null(pg_url):
    assert _null_keys_accepted(pg_url) == []


def test_sqlite_text_primary_keys_reject_null(sqlite_url):
    assert _null_keys_accepted(sqlite_url) == []


# -- Oracle: parse the migration, compile the metadata -----------------------------------------------
def _sqlglot_family(kind: exp.DataType) -> tuple[str, int | None]:
    t = exp.DataType.Type
    args = [int(e.this.this) if isinstance(e, exp.DataTypeParam) and isinstance(e.this, exp.Literal)
            else None for e in kind.expressions]
    if kind.this == t.TIMESTAMP:
        return "timestamp", None
    if kind.this in (t.VARCHAR, t.NVARCHAR, t.CHAR, t.NCHAR):
        return "string", args[0] if args else None
    if kind.this in (t.TEXT, t.LONGTEXT):                # CLOB parses as TEXT
        return "string", None
    if kind.this in (t.INT, t.BIGINT, t.SMALLINT, t.TINYINT):
        return "integer", None
    if kind.this == t.DECIMAL and (len(args) < 2 or args[1] == 0):   # NUMBER(p) / NUMBER(p, 0)
        return "integer", None
    return f"other:{kind.sql('oracle')}", None


def _oracle_tables(sql: str) -> dict[str, dict[str, tuple[str, int | None, bool]]]:
    """Tables and columns after applying every CREATE TABLE and ALTER TABLE ... ADD in order."""
    tables: dict[str, dict[str, tuple[str, int | None, bool]]] = {}

    def column(cd: exp.ColumnDef) -> tuple[str, int | None, bool]:
        kinds = [c.kind for c in cd.constraints]
        not_null = any(isinstance(k, exp.PrimaryKeyColumnConstraint) for k in kinds) or any(
            isinstance(k, exp.NotNullColumnConstraint) and not k.args.get("allow_null") for k in kinds)
        fam, size = _sqlglot_family(cd.args["kind"])
        return fam, size, not not_null

    for stmt in sqlglot.parse(sql, read="oracle"):
        if isinstance(stmt, exp.Create) and stmt.kind == "TABLE":
            tables[stmt.this.this.name.lower()] = {
                cd.name.lower(): column(cd) for cd in stmt.this.expressions if isinstance(cd, exp.ColumnDef)}
        elif isinstance(stmt, exp.Alter):
            added = tables.setdefault(stmt.this.name.lower(), {})
            for action in stmt.args.get("actions") or []:
                for cd in action.find_all(exp.ColumnDef):
                    added[cd.name.lower()] = column(cd)
    return tables


@pytest.fixture(scope="module")
def oracle_sql() -> str:
    # Every version, in order. sqlglot does not model a constraint's state clause; the rest of
    # the statement must still parse as real DDL.
    return "\n".join(m.sql for m in migrations_for("oracle")).replace(" ENABLE NOVALIDATE;", ";")


def test_oracle_migration_parses(oracle_sql):
    statements = sqlglot.parse(oracle_sql, read="oracle", error_level=sqlglot.ErrorLevel.RAISE)
    assert statements and all(st is not None for st in statements)
    # sqlglot falls back to exp.Command for text it does not understand: every statement must be real DDL.
    assert all(isinstance(st, (exp.Create, exp.Alter, exp.Drop)) for st in statements), [
        st.sql()[:80] for st in statements if not isinstance(st, (exp.Create, exp.Alter, exp.Drop))]
    created = sum(isinstance(st, exp.Create) and st.kind == "TABLE" for st in statements)
    assert created == len(set(s.metadata.tables) - BOOKKEEPING_TABLES)


def test_oracle_migration_matches_the_metadata(oracle_sql):
    parsed = _oracle_tables(oracle_sql)
    assert set(parsed) == set(s.metadata.tables) - BOOKKEEPING_TABLES
    problems = []
    for name, columns in parsed.items():
        want = metadata_columns(s.metadata.tables[name])
        if set(columns) != set(want):
            problems.append(f"{name}: only in migration {sorted(set(columns) - set(want))}, "
                            f"only in metadata {sorted(set(want) - set(columns))}")
            continue
        for col, got in columns.items():
            if got != want[col]:
                problems.append(f"{name}.{col}: (family, length, nullable) {got} in migration, {want[col]} in metadata")
    assert not problems, "\n".join(problems)


def test_oracle_migration_has_the_invariant_unique_indexes(oracle_sql):
    unique = set()
    for stmt in sqlglot.parse(oracle_sql, read="oracle"):
        if isinstance(stmt, exp.Create) and stmt.kind == "INDEX" and stmt.args.get("unique"):
            index = stmt.this
            unique.add((index.args["table"].name.lower(),
                        tuple(c.name.lower() for c in index.find_all(exp.Column))))
    assert ("dms_prcreq", ("jobschid", "scheduled_for")) in unique
    assert ("dms_prcreq", ("excl_key",)) in unique


@pytest.mark.parametrize("table", sorted(s.metadata.tables))
def test_metadata_compiles_for_oracle_with_timestamp_and_clob(table):
    t = s.metadata.tables[table]
    ddl = str(CreateTable(t).compile(dialect=oracle.dialect()))
    compiled = {cd.name.lower(): cd.args["kind"] for cd in sqlglot.parse_one(ddl, read="oracle").this.expressions
                if isinstance(cd, exp.ColumnDef)}
    assert set(compiled) == set(t.columns.keys())
    for col in t.columns:
        kind = compiled[col.name]
        if isinstance(col.type, sa.DateTime):
            # DateTime compiles to DATE on Oracle (no fractions, easily mistaken for local time).
            assert kind.this == exp.DataType.Type.TIMESTAMP and not kind.expressions, f"{table}.{col.name}: {ddl}"
        elif isinstance(col.type, sa.Text):
            assert kind.sql("oracle") == "CLOB", f"{table}.{col.name}: {ddl}"
        assert _sqlglot_family(kind)[0] == family(col.type), f"{table}.{col.name}: {kind.sql('oracle')}"
    assert " DATE" not in ddl


# -- the SPEC's tables and columns ----------------------------------------------------------------------
# What SPEC.md fixes (DBAs, web applications and monitoring rely on these names), carried here so
# that a fresh clone checks them without the project workspace beside it.
SPEC_COLUMNS = {
    "dms_prcreq": "request_id mapref request_type payload status requested_at claimed_at claimed_by completed_at"
                  " result_payload jobschid scheduled_for",
    "dms_jobsch": "jobschid mapref frqcd frqdd frqhh frqmi strtdt enddt schflg curflg dpnd_jobschid lst_run_dt"
                  " nxt_run_dt misfire cronexp invalid_reason",
    "dms_prclog": "prcid mapref strtdt enddt status msg sessionid param1 param2 param3 param4 param5 param6 param7"
                  " param8 param9 param10",
    "dms_joblog": "joblogid prcdt mapref srcrows trgrows errrows prcid sessionid reccrdt",
    "dms_joberr": "joblogid errid prcdt errtyp errmsg dberrmsg keyvalue prcid mapref",
    "dms_job": "mapref handler timeout_s max_attempts retry_delay_s allow_overlap enabled description",
    "dms_worker": "",
    "dms_leader": "",
}


def test_the_migrated_database_has_every_table_and_column_the_spec_fixes(db_url):
    engine = sa.create_engine(db_url)
    try:
        inspector = sa.inspect(engine)
        tables = {t.lower() for t in inspector.get_table_names()}
        missing = []
        for table, columns in SPEC_COLUMNS.items():
            if table not in tables:
                missing.append(table)
                continue
            have = {c["name"].lower() for c in inspector.get_columns(table)}
            missing += [f"{table}.{c}" for c in columns.split() if c not in have]
        assert not missing, missing
    finally:
        engine.dispose()


# -- the shared SPEC checker (beside the repository, in the project workspace) ---------------------------
def test_shared_check_schema_tool_accepts_the_migrated_postgresql_database(pg_url):
    """The workspace's own checker, which a fresh clone does not have: skipped there (the test
    above checks the same names), required under CI, where the workspace is present."""
    if not CHECK_SCHEMA.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"CI runs beside the project workspace, but {CHECK_SCHEMA} is missing")
        pytest.skip(f"{CHECK_SCHEMA} is not beside this checkout (a fresh clone): the repository's own SPEC"
                    " column check ran instead")
    libpq_url = sa.engine.make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False)
    proc = subprocess.run([str(CHECK_SCHEMA), libpq_url], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "schema matches SPEC.md" in proc.stdout


# -- migrate(): idempotent, recorded, concurrent -------------------------------------------------------
@pytest.fixture
def fresh_database(request, tmp_path):
    """A URL for an empty, never migrated database of the requested backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh.db'}"
        return
    admin_url = request.getfixturevalue("pg_database_url")      # skips when PostgreSQL is unreachable
    admin = sa.create_engine(sa.engine.make_url(admin_url).set(database="postgres"), isolation_level="AUTOCOMMIT")
    name = f"dms_fresh_{os.getpid()}_{secrets.token_hex(3)}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield sa.engine.make_url(admin_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def _versions(engine: sa.engine.Engine) -> list[tuple[int, str]]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(
            sa.select(s.schema_version.c.version, s.schema_version.c.checksum).order_by(s.schema_version.c.version))]


@pytest.mark.parametrize("fresh_database", ["sqlite", "postgresql"], indirect=True)
def test_migrate_twice_applies_once_and_records_every_version(fresh_database):
    driver = make_driver(fresh_database)
    try:
        first = migrate(driver)
        assert [m.version for m in first] == [m.version for m in migrations_for(driver.name)]
        with driver.begin() as conn:       # data written between runs must survive the second run
            conn.execute(sa.insert(s.job).values(mapref="KEEP", handler="worker.jobs.builtin:noop", max_attempts=1,
                                                 retry_delay_s=1, allow_overlap="N", enabled="Y"))
        assert migrate(driver) == []
        assert _versions(driver.engine) == [(m.version, hashlib.sha256(m.path.read_bytes()).hexdigest())
                                            for m in migrations_for(driver.name)]
        with driver.engine.connect() as conn:
            assert conn.execute(sa.select(sa.func.count()).select_from(s.job)).scalar_one() == 1
            applied_at = conn.execute(sa.select(s.schema_version.c.applied_at)).scalars().all()
        assert applied_at and all(a is not None for a in applied_at)
    finally:
        driver.dispose()


def test_migrate_on_an_already_migrated_database_applies_nothing(db_url):
    driver = make_driver(db_url)
    try:
        assert migrate(driver) == []
        assert [v for v, _ in _versions(driver.engine)] == [m.version for m in migrations_for(driver.name)]
    finally:
        driver.dispose()


@pytest.mark.parametrize("fresh_database", ["postgresql"], indirect=True)
def test_concurrent_migrate_on_a_fresh_postgresql_database_applies_v001_once(fresh_database):
    drivers = [make_driver(fresh_database) for _ in range(2)]
    for d in drivers:                      # connect first, so that both really start together
        with d.engine.connect():
            pass
    barrier = threading.Barrier(len(drivers))
    results: list = [None] * len(drivers)

    def run(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[i] = migrate(drivers[i])
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(drivers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert not any(t.is_alive() for t in threads), "migrate() hung"
        errors = [r for r in results if isinstance(r, BaseException)]
        assert not errors, errors
        every = [m.version for m in migrations_for("postgresql")]
        assert sorted(m.version for r in results for m in r) == every    # each version applied exactly once
        assert [v for v, _ in _versions(drivers[0].engine)] == every
        assert set(s.metadata.tables) <= set(sa.inspect(drivers[0].engine).get_table_names())
    finally:
        for d in drivers:
            d.dispose()
