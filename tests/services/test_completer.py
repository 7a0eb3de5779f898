"""The completer in-process: batching, one outcome per request per statement, and isolation
of an outcome the database refuses."""
from __future__ import annotations

import pytest
import sqlalchemy as sa

from worker.drivers.base import ExecutionFinish, RequestResolve
from worker.services.completer import Completer


class Recording:
    """A driver that records batches; refuses any batch containing ``poison``."""

    def __init__(self, poison: str | None = None, transient: bool = False) -> None:
        self.batches: list[list[str]] = []
        self.poison, self.transient = poison, transient

    def execution_finish_many(self, batch):
        ids = [f.request_id for f in batch]
        if self.poison in ids and not (len(batch) == 1 and batch[0].log_status == "FL" and
                                       batch[0].request_status == "FAILED"):
            raise (sa.exc.OperationalError if self.transient else sa.exc.DataError)("x", {}, Exception("refused"))
        self.batches.append(ids)
        return [True] * len(batch)

    def request_resolve_many(self, batch):
        self.batches.append([r.request_id for r in batch])
        return [True] * len(batch)

    def execution_annotate_many(self, notes):
        pass

    def is_transient(self, exc):
        return isinstance(exc, sa.exc.OperationalError)


def fin(rid, status="DONE"):
    return ExecutionFinish(rid, "w", 1, "M", "PC", request_status=status)


def test_outcomes_within_the_window_go_out_together():
    d = Recording()
    c = Completer(d, window_s=0.01)
    c.finish(fin("a"), 0.0)
    c.finish(fin("b"), 0.005)
    c.tick(0.005)
    assert d.batches == [] and c.next_wake() == pytest.approx(0.01)
    c.tick(0.01)
    assert d.batches == [["a", "b"]] and not c.pending()


def test_a_full_batch_goes_out_before_the_window_ends():
    d = Recording()
    c = Completer(d, window_s=1.0, batch_max=3)
    for i in range(3):
        c.finish(fin(str(i)), 0.0)
    c.tick(0.0)
    assert d.batches == [["0", "1", "2"]]


def test_two_outcomes_of_one_request_never_share_a_statement():
    d = Recording()
    c = Completer(d, window_s=0.0)
    c.finish(fin("h", status=None), 0.0)          # a HISTORY day...
    c.finish(fin("x"), 0.0)
    c.finish(fin("h"), 0.0)                       # ... and the next, ended in the same window
    c.tick(0.0)
    assert d.batches == [["h", "x"], ["h"]]


def test_an_outcome_the_database_refuses_fails_alone_and_the_rest_are_written():
    d = Recording(poison="bad")
    c = Completer(d, window_s=0.0)
    for rid in ("a", "b", "bad", "c"):
        c.finish(fin(rid), 0.0)
    c.tick(0.0)
    written = [rid for batch in d.batches for rid in batch]
    assert sorted(written) == ["a", "b", "bad", "c"] and not c.pending()


def test_a_transient_error_keeps_everything_for_the_next_attempt():
    d = Recording(poison="a", transient=True)
    c = Completer(d, window_s=0.0)
    c.finish(fin("a"), 0.0)
    c.resolve(RequestResolve("r", "w", "FAILED"), 0.0)
    with pytest.raises(sa.exc.OperationalError):
        c.tick(0.0)
    assert c.pending() and c.pending_ids() == {"a", "r"}
    d.poison = None
    c.tick(1.0)
    assert not c.pending()


def test_on_sqlite_a_batch_writes_what_is_still_ours_and_reports_what_was_taken(lite):
    """The same service on a real database: one batch finishes the requests, their DMS_PRCLOG
    and DMS_JOBLOG rows, and leaves alone a request taken from this replica meanwhile."""
    from worker import client
    from worker import schema as s
    from worker.drivers.base import ClaimParams, WorkerInfo

    lite.worker_register(WorkerInfo("w", "h", 1, "t", 4))
    client.register_job(lite.engine, "M", "worker.jobs.builtin:noop", allow_overlap=True)
    for _ in range(3):
        client.enqueue(lite.engine, "M")
    claimed = lite.request_claim(ClaimParams("w", job_limit=3))
    assert len(claimed) == 3
    taken = claimed[0].request_id
    with lite.begin() as conn:              # a rescuer's doing, while the outcomes wait in the buffer
        conn.execute(sa.update(s.prcreq).where(s.prcreq.c.request_id == taken).values(status=s.NEW, claimed_by=None))
    lost: list[str] = []
    written: list[bool] = []
    c = Completer(lite, window_s=0.01, on_lost=lost.append, on_written=lambda: written.append(True))
    for r in claimed:
        c.finish(ExecutionFinish(r.request_id, "w", r.prcid, "M", s.COMPLETED, msg="done", srcrows=2, trgrows=2,
                                 request_status=s.DONE), 0.0)
    c.tick(0.005)
    assert not written, "nothing goes out before the window ends"
    c.tick(0.01)
    assert lost == [taken] and written and not c.pending()
    with lite.engine.connect() as conn:
        status = dict(conn.execute(sa.select(s.prcreq.c.request_id, s.prcreq.c.status)).all())
        logs = dict(conn.execute(sa.select(s.prclog.c.request_id, s.prclog.c.status)).all())
        counts = conn.execute(sa.select(s.joblog.c.srcrows, s.joblog.c.trgrows)).all()
    assert status[taken] == s.NEW and logs[taken] == s.IN_PROGRESS, "the taken request is not touched"
    assert all(status[r.request_id] == s.DONE and logs[r.request_id] == s.COMPLETED for r in claimed[1:])
    assert [tuple(c) for c in counts] == [(2, 2), (2, 2)]
