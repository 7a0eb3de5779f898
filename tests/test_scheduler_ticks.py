"""The leader's scheduler asks the database only when something can be due."""
from __future__ import annotations

from worker.drivers import make_driver
from worker.scheduler import Scheduler


class CountingClock:
    """The real driver, counting how often the scheduler reads the database clock."""

    def __init__(self, driver):
        self.driver, self.reads = driver, 0

    def __getattr__(self, name):
        return getattr(self.driver, name)

    def now(self):
        self.reads += 1
        return self.driver.now()


def test_with_nothing_scheduled_the_tick_reads_no_clock_until_the_next_reload(sqlite_url):
    clock = CountingClock(make_driver(sqlite_url))
    sched = Scheduler(clock, "UTC", refresh_interval=60)
    try:
        sched.tick("w", 1, mono_now=0.0)            # reload: reads the clock once
        reads = clock.reads
        for t in range(1, 50):
            assert sched.tick("w", 1, mono_now=t * 0.5) == 0
        assert clock.reads == reads, "control-loop ticks between reloads cost no query"
        sched.tick("w", 1, mono_now=61.0)               # the periodic reread looks again
        assert clock.reads == reads + 1
    finally:
        clock.driver.dispose()
