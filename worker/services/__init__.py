"""The replica's services: each owns one job, is built from what it needs, takes the time as an
argument (``tick(now)``, monotonic seconds) and says when it next needs to run
(``next_wake()``). ``worker.service.SchedulerService`` composes them into a replica:

- ``Liveness``: registration, the heartbeat and the execution fence (on a thread of its own);
- ``Leadership``: elect, renew, resign;
- ``Producer``: claim and start work, apply STOPs and timeouts, turn execution results into
  outcomes;
- ``Completer``: buffer outcomes and write them in batches;
- ``Maintenance``: the leader's rescue, pruning and queue gauges;
- ``worker.scheduler.Scheduler``: the leader's schedule occurrences.
"""
from __future__ import annotations

import math
from typing import Protocol


class Service(Protocol):
    def tick(self, now: float) -> None: ...

    def next_wake(self) -> float: ...


NEVER = math.inf
