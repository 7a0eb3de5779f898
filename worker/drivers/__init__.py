"""Database drivers: one per backend behind the interface in ``base``; ``make_driver`` picks one."""
from __future__ import annotations

import sqlalchemy as sa

from .base import SQLDriver


def make_driver(url: str, *, schema: str | None = None, pre_ping: bool = False) -> SQLDriver:
    backend = sa.engine.make_url(url).get_backend_name()
    if backend == "postgresql":
        from .postgresql import PostgresDriver
        return PostgresDriver(url, schema=schema, pre_ping=pre_ping)
    if backend == "sqlite":
        from .sqlite import SQLiteDriver
        return SQLiteDriver(url, schema=schema, pre_ping=pre_ping)
    if backend == "oracle":
        from .oracle import OracleDriver
        return OracleDriver(url, schema=schema, pre_ping=pre_ping)
    raise ValueError(f"no driver for {backend!r} (supported: oracle, postgresql, sqlite)")


__all__ = ["SQLDriver", "make_driver"]
