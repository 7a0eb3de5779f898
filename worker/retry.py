"""The one retry policy, built from tenacity's wait strategies.

- The database: after a transient error (a lost connection, a lock or statement timeout) the
  control loop's services, the heartbeat thread and the CLI wait ``db_delay(n)`` before trying
  again: exponential from 0.2 s, capped at 10 s, with jitter so that replicas cut off together
  do not come back in step.
- Jobs: a failed attempt ``n`` of a job waits ``retry_delay_s * 2**(n-1)``, capped at
  ``DMS_RETRY_MAX_DELAY``, plus up to 10 % jitter.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import tenacity

DB_WAIT = tenacity.wait_exponential(multiplier=0.2, max=10.0) + tenacity.wait_random(0, 0.2)


def _state(attempt: int) -> tenacity.RetryCallState:
    state = tenacity.RetryCallState(None, None, (), {})      # type: ignore[arg-type]
    state.attempt_number = max(1, attempt)
    return state


def db_delay(attempt: int) -> float:
    """Seconds to wait before database attempt ``attempt + 1`` after ``attempt`` failures."""
    return float(DB_WAIT(_state(attempt)))


def job_retry_delay(retry_delay_s: float, attempt: int, cap_s: float) -> float:
    """Seconds before the next attempt of a job whose attempt ``attempt`` failed."""
    if retry_delay_s <= 0:
        return 0.0
    base = tenacity.wait_exponential(multiplier=retry_delay_s, max=cap_s)(_state(attempt))
    return float(base + tenacity.wait_random(0, 0.1 * base)(_state(attempt)))


def db_retrying(is_transient: Callable[[BaseException], bool],
                before_sleep: Callable[[tenacity.RetryCallState], Any] | None = None,
                stop: Callable[[], bool] = lambda: False,
                sleep: Callable[[float], Any] = tenacity.nap.sleep) -> tenacity.Retrying:
    """A tenacity ``Retrying`` with the database policy, for code that may block while it
    waits (the CLI, start-up): retries transient errors until ``stop()`` says otherwise."""
    return tenacity.Retrying(retry=tenacity.retry_if_exception(is_transient), wait=DB_WAIT,
                             # stop_any only calls each stop: any StopBaseT works, though it annotates stop_base
                             stop=tenacity.stop_any(lambda _s: stop()),  # type: ignore[arg-type]
                             sleep=sleep,
                             before_sleep=before_sleep, reraise=True)
