"""Stand-ins for the services' in-process tests: an executor without processes."""
from __future__ import annotations

from typing import Any

from worker.executor import Event, Slot, Task


class FakeExecutor:
    """The producer's view of an executor: ready slots, tasks handed out, cancels; the test
    plays the execution processes (``started``, ``done``, ``died``)."""

    def __init__(self, size: int) -> None:
        self.slots = [Slot(i, ready=True) for i in range(size)]
        self.ran: list[Task] = []
        self.cancelled: list[Task] = []

    def idle_slots(self) -> list[Slot]:
        return [s for s in self.slots if s.idle]

    def busy(self) -> list[Slot]:
        return [s for s in self.slots if s.task is not None]

    def run(self, slot: Slot, task: Task, timeout_s: float | None) -> None:
        slot.task, slot.timeout_s, slot.started, slot.deadline = task, timeout_s, None, None
        self.ran.append(task)

    def cancel(self, slot: Slot, now: float, grace_s: float) -> str | None:
        assert slot.task is not None
        self.cancelled.append(slot.task)
        slot.task, slot.deadline, slot.kill_at = None, None, now + grace_s
        return slot.session_id

    def deadlines(self) -> list[float]:
        return [t for s in self.slots for t in (s.deadline, s.kill_at) if t is not None]

    # -- what the test does in place of the processes ---------------------------------------------
    def slot_of(self, task: Task) -> Slot:
        return next(s for s in self.slots if s.task is task)

    def started(self, task: Task, now: float) -> Event:
        slot = self.slot_of(task)
        slot.started = now
        slot.deadline = now + slot.timeout_s if slot.timeout_s else None
        return Event(slot, task, "started", {})

    def done(self, task: Task, **data: Any) -> Event:
        slot = self.slot_of(task)
        slot.task, slot.deadline = None, None
        return Event(slot, task, "done", {"ok": True, **data})

    def replaced(self) -> None:
        """Killed children are gone and their slots ready again."""
        for s in self.slots:
            s.kill_at = None
