"""Applies ``sql/migrations/<dialect>/V<n>__<name>.sql`` in order and records each version.

Flyway-style: a version is applied once, inside a transaction where the database allows it,
and recorded in ``dms_schema_version`` with a checksum; an applied file that was edited
afterwards is reported rather than silently re-run. Concurrent runs are serialised by the
driver's migration lock.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from . import schema as s
from .drivers.base import SQLDriver

log = logging.getLogger(__name__)
_NAME = re.compile(r"^V(\d+)__(\w+)\.sql$")


class MigrationError(RuntimeError):
    pass


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    path: Path

    @property
    def sql(self) -> str:
        return self.path.read_text(encoding="utf-8")

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.path.read_bytes()).hexdigest()


def migrations_root() -> Path:
    return Path(os.environ.get("DMS_MIGRATIONS_DIR") or Path(__file__).resolve().parents[1] / "sql" / "migrations")


def migrations_for(dialect: str) -> list[Migration]:
    folder = migrations_root() / dialect
    if not folder.is_dir():
        raise MigrationError(f"no migrations for {dialect} in {folder}")
    found = []
    for path in sorted(folder.glob("*.sql")):
        m = _NAME.match(path.name)
        if m:
            found.append(Migration(int(m.group(1)), m.group(2).replace("_", " "), path))
    return sorted(found, key=lambda m: m.version)


def applied_versions(driver: SQLDriver) -> dict[int, str]:
    with driver.engine.connect() as conn:
        if not sa.inspect(conn).has_table(s.schema_version.name):
            return {}
        return dict(conn.execute(sa.select(s.schema_version.c.version, s.schema_version.c.checksum)).all())


def pending(driver: SQLDriver) -> list[Migration]:
    done = applied_versions(driver)
    return [m for m in migrations_for(driver.name) if m.version not in done]


def migrate(driver: SQLDriver) -> list[Migration]:
    """Apply what is missing; return what was applied. Safe to run from several processes."""
    applied: list[Migration] = []
    # The lock lives on a connection of its own for the whole run, so that it is released
    # only after the last version was committed (on Oracle, DDL commits as it goes).
    with driver.engine.connect() as lock_conn, driver.migration_lock(lock_conn):
        with driver.begin() as conn:
            s.schema_version.create(conn, checkfirst=True)
        for m in migrations_for(driver.name):
            with driver.begin() as conn:
                row = conn.execute(sa.select(s.schema_version.c.checksum).where(
                    s.schema_version.c.version == m.version)).first()
                if row is not None:
                    if row.checksum != m.checksum:
                        log.warning("migration V%03d was edited after it was applied (checksum differs)", m.version)
                    continue
                log.info("applying migration V%03d %s", m.version, m.description)
                driver.run_script(conn, m.sql)
                conn.execute(sa.insert(s.schema_version).values(
                    version=m.version, description=m.description, checksum=m.checksum, applied_at=driver.clock()))
                applied.append(m)
    return applied
