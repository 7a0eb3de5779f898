"""Splitting an Oracle SQL*Plus-style script into the statements a driver can execute one by one.

The convention (SQL*Plus, SQLcl and Flyway all accept it): a SQL statement ends with ``;`` at
the end of a line; a PL/SQL unit (``CREATE [OR REPLACE] PACKAGE|PROCEDURE|FUNCTION|TRIGGER|
TYPE ...``, or an anonymous ``DECLARE``/``BEGIN`` block) ends with a line holding only ``/``.
The ``;`` of a SQL statement is dropped (the server rejects it); a PL/SQL unit keeps its final
``END;``. Blank lines and ``--`` comment lines between statements are skipped, and so are the
SQL*Plus client commands the scripts use between statements (``WHENEVER SQLERROR EXIT
FAILURE``, ``SET SERVEROUTPUT ON``, ``PROMPT``, ...): SQL*Plus and SQLcl obey them, the server
would refuse them. ``client_commands`` lists them for the tests.
"""
from __future__ import annotations

import re

_PLSQL_START = re.compile(
    r"^\s*(CREATE\s+(OR\s+REPLACE\s+)?((NON)?EDITIONABLE\s+)?"
    r"(PACKAGE|PROCEDURE|FUNCTION|TRIGGER|TYPE)\b|DECLARE\b|BEGIN\b)",
    re.IGNORECASE)


# SQL*Plus/SQLcl commands, one line each, only where a statement may start. Not SET TRANSACTION,
# SET ROLE or SET CONSTRAINT(S), which are SQL.
_CLIENT_COMMAND = re.compile(
    r"^\s*(WHENEVER\s+(SQLERROR|OSERROR)\b|PROMPT\b|SHOW\s+ERRORS?\b|SPOOL\b|EXIT\b|QUIT\b|"
    r"SET\s+(SERVEROUTPUT|DEFINE|ECHO|FEEDBACK|VERIFY|HEADING|PAGESIZE|LINESIZE|TERMOUT|SQLBLANKLINES|TIMING)\b)",
    re.IGNORECASE)


class ScriptError(ValueError):
    pass


def _code(line: str) -> str:
    """The line without a trailing ``--`` comment (scripts keep quotes and ``--`` apart)."""
    return line.split("--", 1)[0].rstrip()


def split_script(script: str) -> list[str]:
    return _split(script)[0]


def client_commands(script: str) -> list[str]:
    """The SQL*Plus client commands ``split_script`` leaves out, in order."""
    return _split(script)[1]


def _split(script: str) -> tuple[list[str], list[str]]:
    statements: list[str] = []
    commands: list[str] = []
    buffer: list[str] = []
    plsql = False
    for line in script.splitlines():
        stripped = line.strip()
        if not buffer:
            if not stripped or stripped.startswith("--") or stripped == "/":
                continue
            if _CLIENT_COMMAND.match(line):
                commands.append(stripped)
                continue
            plsql = bool(_PLSQL_START.match(line))
        if plsql:
            if stripped == "/":
                statements.append("\n".join(buffer).strip())
                buffer = []
            else:
                buffer.append(line)
            continue
        buffer.append(line)
        code = _code(line)
        if code.endswith(";"):
            text = "\n".join(buffer).strip()
            # Drop the terminating ";" (and any comment after it).
            statements.append(text[: text.rfind(";")].rstrip() if text.rstrip().endswith(";") else
                              "\n".join(buffer[:-1] + [code[:-1]]).strip())
            buffer = []
    if buffer and any(_code(l).strip() for l in buffer):
        kind = "PL/SQL block (missing a '/' line)" if plsql else "statement (missing ';')"
        raise ScriptError(f"unterminated {kind} at end of script: {' '.join(buffer)[:80]!r}")
    return statements, commands

