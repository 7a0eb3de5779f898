"""Database drivers: one per backend behind the interface in ``base``; ``make_driver`` picks one."""
from __future__ import annotations

from typing import TypedDict

import sqlalchemy as sa

from .base import SQLDriver


class _Options(TypedDict):
    """The keyword arguments every driver's constructor takes alike."""
    schema: str | None
    pre_ping: bool
    statement_timeout_s: float | None


def make_driver(url: str, *, schema: str | None = None, pre_ping: bool = False,
                statement_timeout_s: float | None = None) -> SQLDriver:
    """The driver for ``url``'s database. ``statement_timeout_s`` bounds every statement and
    lock wait of the connections it makes (a replica's control loop); leave it None where
    statements take as long as a job needs (execution processes, the CLI's migrations)."""
    backend = sa.engine.make_url(url).get_backend_name()
    kw: _Options = dict(schema=schema, pre_ping=pre_ping, statement_timeout_s=statement_timeout_s)
    if backend == "postgresql":
        from .postgresql import PostgresDriver
        return PostgresDriver(url, **kw)
    if backend == "sqlite":
        from .sqlite import SQLiteDriver
        return SQLiteDriver(url, **kw)
    if backend == "oracle":
        from .oracle import OracleDriver
        return OracleDriver(url, **kw)
    raise ValueError(f"no driver for {backend!r} (supported: oracle, postgresql, sqlite)")


__all__ = ["SQLDriver", "make_driver"]
