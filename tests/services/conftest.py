from __future__ import annotations

import pytest

from worker.drivers import make_driver


@pytest.fixture
def lite(sqlite_url):
    """A SQLite driver on a fresh migrated database."""
    d = make_driver(sqlite_url, statement_timeout_s=5)
    yield d
    d.dispose()
