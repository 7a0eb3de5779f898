"""Schedule calculus for DMS_JOBSCH rows (pure functions) and the `schedule preview` command."""

from worker.schedule import calculus
from worker.schedule.calculus import *  # noqa: F401,F403 - the public API is calculus.__all__

__all__ = calculus.__all__
