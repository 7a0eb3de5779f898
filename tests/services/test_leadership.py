"""Leadership in-process: a real SQLite database (lease mode), a fake clock."""
from __future__ import annotations

import pytest
import sqlalchemy as sa

from worker import schema as s
from worker.services.leadership import Leadership


def test_leads_until_two_heartbeats_before_the_lease_could_expire(lite):
    changes = []
    lead = Leadership(lite, "w1", "auto", ttl_s=10, interval_s=1, on_change=changes.append)
    assert lead.mode == "lease", "SQLite has no session lock"
    lead.tick(0.0)
    assert lead.epoch == 1 and changes == [True]
    assert lead.leading(7.9) and not lead.leading(8.0)
    lead.tick(1.0)                                   # renewed: the margin moves on
    assert lead.leading(8.5)


def test_steps_down_when_another_took_the_lease(lite):
    changes = []
    lead = Leadership(lite, "w1", "lease", ttl_s=10, interval_s=1, on_change=changes.append)
    lead.tick(0.0)
    with lite.begin() as conn:
        conn.execute(sa.update(s.leader).values(holder="w2", epoch=s.leader.c.epoch + 1))
    lead.tick(1.0)
    assert lead.epoch is None and changes == [True, False] and not lead.leading(1.0)


def test_a_follower_asks_again_when_the_lease_expires(lite):
    a = Leadership(lite, "w1", "lease", ttl_s=10, interval_s=1)
    b = Leadership(lite, "w2", "lease", ttl_s=10, interval_s=1)
    a.tick(0.0)
    with lite.begin() as conn:
        conn.execute(sa.update(s.leader).values(expires_at=lite.clock(0.3)))
    b.tick(100.0)
    assert b.epoch is None and 100.3 <= b.next_wake() <= 100.32


def test_resign_hands_over_at_once(lite):
    a = Leadership(lite, "w1", "lease", ttl_s=10, interval_s=1)
    b = Leadership(lite, "w2", "lease", ttl_s=10, interval_s=1)
    a.tick(0.0)
    a.resign()
    b.tick(0.0)
    assert a.epoch is None and b.epoch == 2


def test_lock_mode_needs_a_driver_with_a_session_lock(lite):
    with pytest.raises(ValueError, match="lock"):
        Leadership(lite, "w1", "lock", ttl_s=10, interval_s=1)
