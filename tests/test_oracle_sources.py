"""Static checks of the Oracle SQL and PL/SQL sources (no Oracle server can run here).

Every script is split the way the driver and SQL*Plus split it (``split_script``). Plain SQL
statements must parse with sqlglot's ``oracle`` dialect (error_level RAISE, and not merely as an
opaque ``Command``); the few kinds sqlglot has no grammar for (CREATE USER/ROLE, system-privilege
and role GRANTs, ALTER SESSION) and every PL/SQL unit must parse with sqlfluff's ``oracle``
dialect with no unparsable section, with the expected top-level structure, and with the
structural checks sqlfluff's lenient PL/SQL grammar leaves out (every statement ends with ';',
...). Negative tests, on snippets and on broken copies of the real sources, prove the checks
reject broken input, so they cannot pass vacuously.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

import pytest
import sqlglot
from sqlfluff.core import FluffConfig, Linter
from sqlglot import ErrorLevel, exp

from worker.drivers.oracle_script import client_commands, split_script

REPO = Path(__file__).resolve().parents[1]

MIGRATIONS = sorted((REPO / "sql" / "migrations" / "oracle").glob("V*.sql"))
PKS = REPO / "plsql" / "dms_api.pks"
PKB = REPO / "plsql" / "dms_api.pkb"
VIEWS = REPO / "plsql" / "dms_views.sql"
GRANTS_APP = REPO / "plsql" / "grants_app.sql"
ROLES = REPO / "sql" / "roles" / "oracle.sql"
AQ = REPO / "sql" / "oracle" / "aq_wakeup.sql"
AQ_DROP = REPO / "sql" / "oracle" / "aq_wakeup_drop.sql"
CONTAINER_INIT = REPO / "sql" / "oracle" / "container-init" / "01_dms.sql"
DOC = REPO / "docs" / "oracle.md"

OUR_FILES = [PKS, PKB, VIEWS, GRANTS_APP, ROLES, AQ, AQ_DROP, CONTAINER_INIT]
ALL_FILES = MIGRATIONS + OUR_FILES

VIEW_NAMES = ["DMS_V_QUEUE_DEPTH", "DMS_V_RUNNING", "DMS_V_FAILURES_1D", "DMS_V_INVALID_SCHEDULES"]
API_SUBPROGRAMS = ["ENQUEUE_IMMEDIATE", "ENQUEUE_HISTORY", "REQUEST_STOP", "REQUEST_STOP_MAPREF",
                   "REFRESH_SCHEDULES"]
WAKEUP_WHEN = "WHEN (new.status = 'NEW' AND old.status <> 'NEW')"

# What each file splits into, in order.
EXPECTED_KINDS = {
    PKS: ["PACKAGE", "BLOCK"],
    PKB: ["PACKAGE BODY", "BLOCK"],
    VIEWS: ["CREATE VIEW"] * 4,
    GRANTS_APP: ["CREATE ROLE"] + ["GRANT"] * 4 + ["CREATE ROLE", "GRANT", "GRANT", "GRANT", "GRANT"],
    ROLES: ["CREATE USER"] + ["GRANT"] * 12,
    AQ: ["BLOCK", "BLOCK", "BLOCK", "PACKAGE", "PACKAGE BODY", "TRIGGER", "TRIGGER", "BLOCK", "BLOCK", "BLOCK"],
    AQ_DROP: ["BLOCK"] * 5,
    CONTAINER_INIT: ["ALTER SESSION"] + ["GRANT"] * 4,
}
EXPECTED_MIGRATION_KINDS = {
    "V001__init.sql": ["CREATE TABLE"] * 8 + ["CREATE INDEX"] * 12,
    "V002__job_params.sql": ["ALTER TABLE", "ALTER TABLE", "CREATE TABLE"],
    "V003__cluster_timing_and_queue_controls.sql": ["ALTER TABLE"] * 11
    + ["CREATE INDEX", "DROP INDEX", "CREATE INDEX"],
}

PLSQL_KINDS = {"PACKAGE", "PACKAGE BODY", "TRIGGER", "BLOCK", "PROCEDURE", "FUNCTION", "TYPE"}
# sqlglot parses these only as an opaque Command: sqlfluff checks them instead.
SQLGLOT_OPAQUE_KINDS = {"CREATE USER", "CREATE ROLE", "GRANT SYSTEM/ROLE", "ALTER SESSION",
                        "ALTER TABLE ... NOVALIDATE"}
# The top-level sqlfluff segment each PL/SQL kind must parse to.
SQLFLUFF_TOP = {
    "PACKAGE": "create_package_statement",
    "PACKAGE BODY": "create_package_body_statement",
    "TRIGGER": "create_trigger_statement",
    "BLOCK": "begin_end_block",
}

_KIND_PATTERNS = [
    ("PACKAGE BODY", r"CREATE\s+(OR\s+REPLACE\s+)?PACKAGE\s+BODY\b"),
    ("PACKAGE", r"CREATE\s+(OR\s+REPLACE\s+)?PACKAGE\b"),
    ("TRIGGER", r"CREATE\s+(OR\s+REPLACE\s+)?TRIGGER\b"),
    ("PROCEDURE", r"CREATE\s+(OR\s+REPLACE\s+)?PROCEDURE\b"),
    ("FUNCTION", r"CREATE\s+(OR\s+REPLACE\s+)?FUNCTION\b"),
    ("TYPE", r"CREATE\s+(OR\s+REPLACE\s+)?TYPE\b"),
    ("BLOCK", r"(DECLARE|BEGIN)\b"),
    ("CREATE TABLE", r"CREATE\s+TABLE\b"),
    ("CREATE INDEX", r"CREATE\s+(UNIQUE\s+)?INDEX\b"),
    ("CREATE VIEW", r"CREATE\s+(OR\s+REPLACE\s+)?VIEW\b"),
    ("CREATE USER", r"CREATE\s+USER\b"),
    ("CREATE ROLE", r"CREATE\s+ROLE\b"),
    ("ALTER TABLE", r"ALTER\s+TABLE\b"),
    ("ALTER SESSION", r"ALTER\s+SESSION\b"),
    ("DROP INDEX", r"DROP\s+INDEX\b"),
    ("GRANT", r"GRANT\b"),
]


def kind(statement: str) -> str:
    for name, pattern in _KIND_PATTERNS:
        if re.match(pattern, statement, re.IGNORECASE):
            return name
    raise AssertionError(f"statement of an unexpected kind: {statement[:80]!r}")


def statements(path: Path) -> list[str]:
    return split_script(path.read_text())


def strip_comments(text: str) -> str:
    return "\n".join(line.split("--", 1)[0] for line in text.splitlines())


# -- the two parsers ------------------------------------------------------------------------

class OpaqueCommand(Exception):
    """sqlglot fell back to an unparsed Command: it did not check the statement."""


def sqlglot_check(statement: str) -> exp.Expression:
    """Parse with sqlglot (oracle, RAISE); an opaque Command fallback counts as a failure."""
    tree = sqlglot.parse_one(statement, read="oracle", error_level=ErrorLevel.RAISE)
    if isinstance(tree, exp.Command):
        raise OpaqueCommand(f"sqlglot only parsed this as an opaque command: {statement[:80]!r}")
    return tree


@functools.lru_cache(maxsize=1)
def _linter() -> Linter:
    return Linter(config=FluffConfig(overrides={"dialect": "oracle"}))


def sqlfluff_problems(source: str, top: str | None = None) -> list[str]:
    """What sqlfluff (oracle) cannot parse in ``source``; [] when it parses cleanly.

    ``top``: the segment type the one statement must parse to (e.g. a trigger must be a
    create_trigger_statement): sqlfluff's grammar is lenient enough to read a misspelled BEGIN
    as a procedure call, which this structural check catches."""
    parsed = _linter().parse_string(source)
    problems = [str(v) for v in parsed.violations]
    if parsed.tree is None:
        return problems or ["no parse tree"]
    problems += [f"unparsable: {seg.raw[:120]!r}" for seg in parsed.tree.recursive_crawl("unparsable")]
    if problems:
        return problems
    tops = [child for batch in parsed.tree.recursive_crawl("batch")
            for child in batch.segments if child.is_type("statement")]
    if len(tops) != 1:
        return [f"expected one statement, sqlfluff found {len(tops)}"]
    first = next(s for s in tops[0].segments if not s.is_meta and not s.is_whitespace)
    if top is not None and not first.is_type(top):
        return [f"parsed as {first.get_type()}, expected {top}"]
    if top == "create_trigger_statement" and not any(
            child.is_type("begin_end_block") for s in first.segments if s.is_type("statement")
            for child in s.segments):
        return ["trigger body is not a BEGIN ... END block"]
    return _structure_problems(first)


_SUBPROGRAMS = ("create_procedure_statement", "create_function_statement")


def _structure_problems(unit) -> list[str]:
    """Checks sqlfluff's lenient PL/SQL grammar leaves out.

    - Every statement inside a block ends with ';' (sqlfluff accepts a missing one), and an
      assignment has one target (a lost ';' or a misspelled ELSE turns into a second one).
    - Every subprogram ends with ';', and none is nested in another (these sources never nest
      subprograms; a spec entry missing its ';' shows up as the next entry nested in it)."""
    problems = []
    for seg in unit.recursive_crawl_all():
        code = [c for c in seg.segments if c.is_code]
        for i, child in enumerate(code):
            if child.is_type("statement") and (i + 1 == len(code) or not code[i + 1].is_type("statement_terminator")):
                problems.append(f"statement without ';': {child.raw[:60]!r}")
        if seg.is_type("assignment_segment_statement"):
            targets = next((i for i, c in enumerate(code) if c.is_type("assignment_operator")), 0)
            if targets != 1:   # sqlfluff reads 'f(x)  y := 1' (a lost ';') or 'ELSX y := 1' as one assignment
                problems.append(f"assignment to more than one target: {seg.raw[:60]!r}")
        if seg.is_type(*_SUBPROGRAMS):
            if next(seg.recursive_crawl(*_SUBPROGRAMS, allow_self=False), None):
                problems.append(f"subprogram nested in another: {seg.raw[:60]!r}")
            if not code[-1].is_type("statement_terminator"):
                problems.append(f"subprogram without a final ';': {seg.raw[:60]!r}")
    return problems


def check_statement(statement: str) -> None:
    k = kind(statement)
    if k in PLSQL_KINDS:
        assert statement.rstrip().endswith(";"), f"PL/SQL unit without its final ';': {statement[-40:]!r}"
        problems = sqlfluff_problems(statement, SQLFLUFF_TOP.get(k))
        assert not problems, f"sqlfluff cannot parse {statement[:60]!r}: {problems}"
        return
    try:
        tree = sqlglot_check(statement)
    except OpaqueCommand:
        if _opaque_kind(statement) not in SQLGLOT_OPAQUE_KINDS:
            raise
        problems = sqlfluff_problems(statement)
        assert not problems, f"sqlfluff cannot parse {statement[:60]!r}: {problems}"
        return
    expected = {"CREATE TABLE": "TABLE", "CREATE INDEX": "INDEX", "CREATE VIEW": "VIEW"}.get(k)
    if expected:
        assert isinstance(tree, exp.Create) and tree.kind == expected, (statement[:60], tree)
    elif k == "ALTER TABLE":
        assert isinstance(tree, exp.Alter), (statement[:60], tree)
    elif k == "GRANT":
        assert isinstance(tree, exp.Grant), (statement[:60], tree)
    elif k == "DROP INDEX":
        assert isinstance(tree, exp.Drop) and tree.kind == "INDEX", (statement[:60], tree)


def _opaque_kind(statement: str) -> str:
    k = kind(statement)
    if k == "GRANT" and not re.search(r"\bON\b", statement, re.IGNORECASE):
        return "GRANT SYSTEM/ROLE"  # GRANT CREATE SESSION TO x / GRANT some_role TO x
    if k == "ALTER TABLE" and re.search(r"\bENABLE\s+NOVALIDATE\s*;?\s*$", statement, re.IGNORECASE):
        return "ALTER TABLE ... NOVALIDATE"   # sqlglot does not model a constraint's state clause
    return k


# -- every statement of every file parses ------------------------------------------------------

@pytest.mark.parametrize("path", ALL_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_statement_parses(path):
    found = statements(path)
    assert found, f"{path} has no statements"
    for statement in found:
        check_statement(statement)


@pytest.mark.parametrize("path", OUR_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_split_gives_the_expected_statements(path):
    assert [kind(s) for s in statements(path)] == EXPECTED_KINDS[path]


def test_migrations_split_as_expected():
    names = {p.name for p in MIGRATIONS}
    assert set(EXPECTED_MIGRATION_KINDS) <= names
    for path in MIGRATIONS:
        if path.name in EXPECTED_MIGRATION_KINDS:
            assert sorted(kind(s) for s in statements(path)) == sorted(EXPECTED_MIGRATION_KINDS[path.name])


def test_plsql_units_keep_their_end_and_sql_statements_lose_their_semicolon():
    for path in OUR_FILES:
        for statement in statements(path):
            if kind(statement) in PLSQL_KINDS:
                assert re.search(r"\bEND(\s+\w+)?;\Z", statement.rstrip(), re.IGNORECASE), statement[-40:]
            else:
                assert not statement.rstrip().endswith(";"), statement[-40:]


# -- the checks reject broken input ---------------------------------------------------------

BROKEN_PLSQL = [
    # missing END IF
    ("CREATE OR REPLACE PACKAGE BODY x AS\n  PROCEDURE p IS\n  BEGIN\n    IF 1 = 1 THEN\n      NULL;\n"
     "  END p;\nEND x;"),
    # misspelled END
    "CREATE OR REPLACE PACKAGE BODY x AS\n  PROCEDURE p IS\n  BEGIN\n    NULL;\n  EDN p;\nEND x;",
    # misspelled BEGIN in a trigger (sqlfluff alone reads BEGN as a procedure call)
    "CREATE OR REPLACE TRIGGER t\nAFTER INSERT ON dms_prcreq\nBEGN\n  dms_wakeup.notify;\nEND;",
    # missing END of an anonymous block
    "BEGIN\n  IF 1 = 1 THEN\n    NULL;\n  END IF;",
]


@pytest.mark.parametrize("source", BROKEN_PLSQL)
def test_broken_plsql_is_reported(source):
    with pytest.raises(AssertionError):
        check_statement(source)


BROKEN_SQL = [
    "CREATE TABLE t (a NUMBER(10) NOT NULL",                     # missing ')'
    "CREATE OR REPLACE VIEW v AS SELECT a b c FROM t",          # sqlglot falls back to Command
    "CREATE OR REPLACE VIEW v AS SELECT a, FROM t WHERE",
    "GRANT SELECT ON dms_owner.dms_prcreq TO",
    "CRATE TABLE t (a NUMBER)",
]


@pytest.mark.parametrize("source", BROKEN_SQL)
def test_broken_sql_is_reported(source):
    with pytest.raises((AssertionError, OpaqueCommand, sqlglot.errors.ParseError)):
        check_statement(source)


def _mutations():
    body = PKB.read_text()
    trigger = next(s for s in statements(AQ) if "AFTER INSERT" in s)
    views = statements(VIEWS)[0]
    spec = PKS.read_text()
    return {
        "pkb without its first END IF": split_script(body.replace("END IF;", "", 1))[0],
        "pkb with ELSIF misspelled": split_script(body.replace("ELSIF", "ELSEIF", 1))[0],
        "pkb missing a THEN": split_script(body.replace(" THEN\n", "\n", 1))[0],
        "pkb missing the final END": split_script(body.replace("END dms_api;", "", 1))[0],
        "pkb missing a ';' after a call": split_script(body.replace(
            "check_mapref(p_mapref);\n    l_checked", "check_mapref(p_mapref)\n    l_checked", 1))[0],
        "pkb with ELSE misspelled": split_script(body.replace("    ELSE\n", "    ELSX\n", 1))[0],
        "aq package body missing the ';' after END enqueue": next(
            s for s in statements(AQ) if "PACKAGE BODY" in s).replace("END enqueue;", "END enqueue", 1),
        "pks with RETURN misspelled": split_script(spec.replace(") RETURN VARCHAR2;", ") RETRUN VARCHAR2;", 1))[0],
        "trigger with BEGIN misspelled": trigger.replace("BEGIN", "BEGN", 1),
        "trigger WHEN without parentheses": next(
            s for s in statements(AQ) if "FOR EACH ROW" in s).replace(WAKEUP_WHEN, "WHEN " + WAKEUP_WHEN[6:-1]),
        "view missing a comma": views.replace("r.request_type,", "r.request_type", 1),
        "view missing a closing parenthesis": views.replace("'PROCESSING')", "'PROCESSING'", 1),
    }


@pytest.mark.parametrize("name", list(_mutations()))
def test_a_syntax_error_in_a_copy_of_the_sources_is_reported(name):
    mutated = _mutations()[name]
    with pytest.raises((AssertionError, OpaqueCommand, sqlglot.errors.ParseError)):
        check_statement(mutated)


# -- the package spec and body agree ----------------------------------------------------------

_HEADER = re.compile(r"\b(FUNCTION|PROCEDURE)\s+(\w+)\s*(\(.*?\))?\s*(RETURN\s+\w+)?\s*(;|\bIS\b|\bAS\b)",
                     re.IGNORECASE | re.DOTALL)


def _headers(text: str) -> dict[str, str]:
    """name -> normalised header (parameters and return type) of each subprogram declared."""
    out: dict[str, str] = {}
    for m in _HEADER.finditer(strip_comments(text)):
        normalised = " ".join(f"{m.group(1)} {m.group(2)} {m.group(3) or ''} {m.group(4) or ''}".upper().split())
        assert m.group(2).upper() not in out, f"overloaded {m.group(2)}: keep one header per name here"
        out[m.group(2).upper()] = normalised.replace("( ", "(").replace(" )", ")")
    return out


def test_package_spec_and_body_declare_the_same_public_subprograms():
    spec, body = _headers(PKS.read_text()), _headers(PKB.read_text())
    assert sorted(spec) == sorted(API_SUBPROGRAMS)
    for name, header in spec.items():
        assert name in body, f"{name} is in the spec but not in the body"
        assert body[name] == header, f"{name}: the body's header differs from the spec's"
    # The spec documents that nothing commits; the body keeps that promise.
    code = strip_comments(PKB.read_text()).upper()
    assert not re.search(r"\b(COMMIT|ROLLBACK)\b", code)
    assert "COMMIT" in PKS.read_text().upper()


def test_api_inserts_only_what_a_plain_client_inserts():
    code = strip_comments(PKB.read_text())
    inserts = re.findall(r"INSERT\s+INTO\s+(\w+)\s*\(([^)]*)\)", code, re.IGNORECASE)
    assert [(t.lower(), " ".join(c.split())) for t, c in inserts] == [
        ("dms_prcreq", "request_id, mapref, request_type, payload, priority, unique_key")]
    for rtype in ("'IMMEDIATE'", "'HISTORY'", "'STOP'", "'REFRESH_SCHEDULE'"):
        assert rtype in code
    for field in ("'start_date'", "'end_date'", "'request_id'", "'YYYY-MM-DD'"):
        assert field in code
    errors = {int(n) for n in re.findall(r"CONSTANT\s+PLS_INTEGER\s*:=\s*(-\d+)", PKS.read_text())}
    assert errors and all(-20999 <= n <= -20001 for n in errors)
    assert len(errors) == 7


def test_aq_wakeup_package_spec_and_body_agree():
    units = {kind(s): s for s in statements(AQ) if kind(s) in ("PACKAGE", "PACKAGE BODY")}
    spec, body = _headers(units["PACKAGE"]), _headers(units["PACKAGE BODY"])
    for name, header in spec.items():
        assert body.get(name) == header, name


def test_aq_wakeup_stops_and_drops_its_triggers_when_its_package_does_not_compile():
    """An invalid package behind the triggers would fail every INSERT into DMS_PRCREQ."""
    units = statements(AQ)
    last_trigger = max(i for i, st in enumerate(units) if kind(st) == "TRIGGER")
    guards = [i for i, st in enumerate(units) if "FROM user_errors" in st]
    assert guards and guards[0] > last_trigger, "checked after the last unit it covers"
    guard = units[guards[0]]
    assert kind(guard) == "BLOCK"
    assert "name = 'DMS_WAKEUP' AND type IN ('PACKAGE', 'PACKAGE BODY')" in guard
    assert "'DROP TRIGGER ' || t.trigger_name" in guard and "raise_application_error(" in guard
    assert "WHENEVER SQLERROR EXIT FAILURE" in AQ.read_text()


# -- the AQ script, the views and the grants match what is documented ----------------------------

def _trigger(name: str) -> str:
    found = [s for s in statements(AQ) if re.match(rf"CREATE\s+OR\s+REPLACE\s+TRIGGER\s+{name}\b", s, re.IGNORECASE)]
    assert len(found) == 1, name
    return found[0]


def test_aq_triggers_are_as_documented():
    insert = _trigger("dms_prcreq_wakeup_ins")
    assert re.search(r"AFTER\s+INSERT\s+ON\s+dms_prcreq\b", insert, re.IGNORECASE)
    assert not re.search(r"FOR\s+EACH\s+ROW", insert, re.IGNORECASE), "one message per statement, not per row"
    requeue = _trigger("dms_prcreq_wakeup_req")
    assert re.search(r"AFTER\s+UPDATE\s+OF\s+status\s+ON\s+dms_prcreq\s+FOR\s+EACH\s+ROW\s*\n" + re.escape(WAKEUP_WHEN),
                     requeue, re.IGNORECASE)
    doc = DOC.read_text()
    for name in ("DMS_PRCREQ_WAKEUP_INS", "DMS_PRCREQ_WAKEUP_REQ", "DMS_WAKEUP_Q", "DMS_WAKEUP_QT"):
        assert name in doc
    assert WAKEUP_WHEN in doc


def test_aq_script_creates_a_raw_single_consumer_queue_with_expiring_messages():
    text = strip_comments(AQ.read_text())
    assert re.search(r"queue_payload_type\s*=>\s*'RAW'", text)
    assert re.search(r"multiple_consumers\s*=>\s*FALSE", text)
    assert re.search(r"queue_name\s*=>\s*'DMS_WAKEUP_Q'", text)
    assert "DBMS_AQADM.START_QUEUE" in text
    assert "UTL_RAW.CAST_TO_RAW('dms_prcreq')" in text
    assert re.search(r"c_expiration\s+CONSTANT\s+PLS_INTEGER\s*:=\s*60;", text)
    assert "l_message_properties.expiration := c_expiration" in text
    assert "DBMS_AQ.ON_COMMIT" in text
    assert re.search(r"GRANT_QUEUE_PRIVILEGE\(\s*privilege\s*=>\s*'DEQUEUE'", text)
    assert "DMS_WORKER" in AQ.read_text().split("\n\n", 1)[0], "the grantee placeholder is documented at the top"
    assert not re.search(r"\b(COMMIT|ROLLBACK)\b", text)


def test_aq_drop_script_removes_everything_triggers_first():
    text = strip_comments(AQ_DROP.read_text()).upper()
    order = [text.index(s) for s in ("DROP TRIGGER DMS_PRCREQ_WAKEUP_INS", "DROP TRIGGER DMS_PRCREQ_WAKEUP_REQ",
                                     "DROP_JOB('DMS_WAKEUP_PURGE'", "DROP PACKAGE DMS_WAKEUP",
                                     "DROP_QUEUE_TABLE('DMS_WAKEUP_QT'")]
    assert order == sorted(order)
    created = {m.upper() for m in re.findall(r"'(DMS_WAKEUP_\w+)'", AQ.read_text())}
    assert created == {"DMS_WAKEUP_QT", "DMS_WAKEUP_Q", "DMS_WAKEUP_PURGE"}


def test_views_are_the_documented_ones_and_granted():
    created = [re.match(r"CREATE\s+OR\s+REPLACE\s+VIEW\s+(\w+)", s, re.IGNORECASE).group(1).upper() for s in statements(VIEWS)]
    assert created == VIEW_NAMES
    granted = re.findall(r"GRANT\s+SELECT\s+ON\s+dms_owner\.(\w+)\s+TO", GRANTS_APP.read_text(), re.IGNORECASE)
    assert sorted(g.upper() for g in granted) == sorted(VIEW_NAMES)
    assert re.search(r"GRANT\s+EXECUTE\s+ON\s+dms_owner\.dms_api\s+TO", GRANTS_APP.read_text(), re.IGNORECASE)
    doc = DOC.read_text()
    for name in VIEW_NAMES:
        assert name in doc
    depth = statements(VIEWS)[0]
    assert "WHERE r.status IN ('NEW', 'CLAIMED', 'PROCESSING')" in depth


def test_runtime_role_covers_every_table_of_the_migrations():
    tables = {t.upper() for path in MIGRATIONS
              for t in re.findall(r"CREATE\s+TABLE\s+(\w+)", path.read_text(), re.IGNORECASE)}
    roles = ROLES.read_text()
    granted = {t.upper() for t in re.findall(r"\bON\s+dms_owner\.(\w+)\s+TO\s+dms_worker", roles, re.IGNORECASE)}
    assert tables <= granted, f"tables the runtime user cannot reach: {sorted(tables - granted)}"
    assert re.search(r"GRANT\s+SELECT,\s*INSERT,\s*UPDATE,\s*DELETE\s+ON\s+dms_owner\.dms_job_state\s+TO", roles, re.IGNORECASE)
    assert re.search(r"GRANT\s+EXECUTE\s+ON\s+SYS\.DBMS_LOCK\s+TO\s+dms_worker", roles, re.IGNORECASE)
    assert "aq_wakeup.sql" in roles


def test_container_init_grants_the_owner_what_it_needs_and_no_alter_system():
    stmts = statements(CONTAINER_INIT)
    assert re.fullmatch(r"ALTER\s+SESSION\s+SET\s+CONTAINER\s*=\s*FREEPDB1", stmts[0], re.IGNORECASE)
    text = " ".join(stmts).upper()
    for grant in ("CREATE SESSION", "CREATE TABLE", "CREATE VIEW", "CREATE PROCEDURE", "CREATE TRIGGER",
                  "CREATE SEQUENCE", "CREATE JOB", "EXECUTE ON SYS.DBMS_LOCK TO DMS",
                  "EXECUTE ON SYS.DBMS_AQ TO DMS", "EXECUTE ON SYS.DBMS_AQADM TO DMS"):
        assert grant in text
    assert "ALTER SYSTEM" not in text


# -- SQL*Plus stops on the first error; byte limits; strict JSON ----------------------------------

SQLPLUS_SCRIPTS = OUR_FILES   # every script a person runs with SQL*Plus/SQLcl


@pytest.mark.parametrize("path", SQLPLUS_SCRIPTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_script_stops_on_its_first_error_under_sqlplus(path):
    """SQL*Plus carries on past a failed statement unless told otherwise."""
    commands = client_commands(path.read_text())
    assert commands and commands[0].upper() == "WHENEVER SQLERROR EXIT FAILURE", commands
    first_statement = statements(path)[0]
    text = path.read_text()
    assert text.index("WHENEVER SQLERROR EXIT FAILURE") < text.index(first_statement.splitlines()[0])


def test_migrations_hold_no_sqlplus_commands():
    """`dms-worker migrate` skips them, but Flyway Community refuses SQL*Plus commands."""
    for path in MIGRATIONS:
        assert client_commands(path.read_text()) == [], path.name


@pytest.mark.parametrize("path, name, kind_", [(PKS, "DMS_API", "PACKAGE"), (PKB, "DMS_API", "PACKAGE BODY")],
                         ids=["pks", "pkb"])
def test_package_compilation_errors_stop_the_script(path, name, kind_):
    """A unit that compiles with errors is only a warning in SQL*Plus: the block after it raises."""
    unit, check = statements(path)
    assert kind(check) == "BLOCK"
    assert f"FROM user_errors WHERE name = '{name}' AND type = '{kind_}'" in check
    assert "raise_application_error(" in check


def test_the_api_checks_lengths_in_bytes_and_json_in_strict_syntax():
    body = strip_comments(PKB.read_text())
    assert not re.search(r"(?<![A-Z_])LENGTH\(", body, re.IGNORECASE), "VARCHAR2 limits are bytes: LENGTHB"
    assert body.count("LENGTHB(") >= 3
    dynamic = re.findall(r"EXECUTE IMMEDIATE '([^']*)'", body)
    assert dynamic == ["SELECT COUNT(*) FROM dual WHERE :p IS JSON STRICT"]
    # Neither parser knows the STRICT keyword: the rest of the query must parse.
    sqlglot_check(dynamic[0].replace(" STRICT", ""))


def test_the_aq_script_grants_dequeue_only_to_a_user_that_exists():
    block = next(s for s in statements(AQ) if "GRANT_QUEUE_PRIVILEGE" in s)
    assert "FROM all_users WHERE username = c_grantee" in block
    assert re.search(r"IF l_users = 0 THEN\s+DBMS_OUTPUT\.PUT_LINE", block)
    assert "SET SERVEROUTPUT ON" in client_commands(AQ.read_text())


def test_the_runtime_role_script_is_run_as_sys_and_names_the_v003_column():
    header = ROLES.read_text().split("WHENEVER", 1)[0]
    assert "Run as SYS in the pluggable database" in header and "SYSTEM" in header
    assert re.search(r"GRANT SELECT, UPDATE \(lst_run_dt, nxt_run_dt, invalid_reason\) ON dms_owner\.dms_jobsch",
                     ROLES.read_text())


def test_split_leaves_out_sqlplus_commands_but_not_sql_that_starts_with_set():
    script = ("WHENEVER SQLERROR EXIT FAILURE\nSET SERVEROUTPUT ON\nPROMPT creating\n"
              "SET TRANSACTION READ ONLY;\nBEGIN\n  LOOP\n    EXIT;\n  END LOOP;\nEND;\n/\nSHOW ERRORS\n")
    assert split_script(script) == ["SET TRANSACTION READ ONLY", "BEGIN\n  LOOP\n    EXIT;\n  END LOOP;\nEND;"]
    assert client_commands(script) == ["WHENEVER SQLERROR EXIT FAILURE", "SET SERVEROUTPUT ON", "PROMPT creating",
                                       "SHOW ERRORS"]


def test_the_live_suites_own_plsql_parses():
    """The live suite creates procedures on the server: a typo there would show only on a laptop."""
    from tests.oracle_live.test_sql_handlers import PROCEDURES
    units = split_script(PROCEDURES)
    assert [kind(u) for u in units] == ["PROCEDURE", "PROCEDURE"]
    for unit in units:
        problems = sqlfluff_problems(unit, "create_procedure_statement")
        assert problems == [], (unit[:60], problems)
