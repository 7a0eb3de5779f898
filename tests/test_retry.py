"""The one retry policy (worker/retry.py): job back-off doubles, stops at the cap, jitters by at
most 10 %; database waits grow, stop at 10 s and are spread; db_retrying retries only what is
transient and gives up when told."""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from worker.retry import db_delay, db_retrying, job_retry_delay


@given(delay=st.floats(0.5, 3600), attempt=st.integers(1, 40), cap=st.floats(1, 86_400))
def test_a_job_waits_its_delay_doubled_per_attempt_up_to_the_cap_plus_a_tenth(delay, attempt, cap):
    base = min(delay * 2 ** (attempt - 1), cap)
    waited = job_retry_delay(delay, attempt, cap)
    assert base <= waited <= base * 1.1 + 1e-9


def test_job_back_off_doubles_then_flattens_at_the_cap():
    firsts = [job_retry_delay(1, n, 10) for n in range(1, 7)]
    assert [round(w) for w in firsts[:3]] == [1, 2, 4]         # jitter is at most 10 %
    assert all(10 <= w <= 11 for w in firsts[4:])              # 16 and 32 capped at 10


def test_no_retry_delay_means_at_once():
    assert job_retry_delay(0, 5, 100) == 0.0


def test_replicas_cut_off_together_do_not_retry_in_step():
    waits = {db_delay(3) for _ in range(50)}
    assert len(waits) > 1
    assert all(0.8 <= w <= 1.0 + 1e-9 for w in waits)          # 0.2 * 2**2, plus up to 0.2 s
    assert all(db_delay(50) <= 10.2 for _ in range(20))


def test_db_retrying_retries_only_transient_errors_and_stops_when_told():
    calls: list[str] = []
    slept: list[float] = []

    def flaky() -> str:
        calls.append("x")
        if len(calls) < 3:
            raise ConnectionError("gone")
        return "ok"

    retrying = db_retrying(lambda e: isinstance(e, ConnectionError), sleep=slept.append)
    assert retrying(flaky) == "ok"
    assert len(calls) == 3 and len(slept) == 2 and slept[0] < slept[1] + 0.2

    with pytest.raises(ValueError):
        db_retrying(lambda e: isinstance(e, ConnectionError), sleep=slept.append)(
            lambda: (_ for _ in ()).throw(ValueError("bad input")))

    stopped = db_retrying(lambda e: True, stop=lambda: True, sleep=slept.append)
    with pytest.raises(ConnectionError):
        stopped(lambda: (_ for _ in ()).throw(ConnectionError("still gone")))
