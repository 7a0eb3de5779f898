"""The Procrastinate app of bench/peers/procrastinate_bench.py, kept out of ``__main__`` as
Procrastinate's docs ask ("top-level app"), so that task names resolve the same in every process."""
from __future__ import annotations

import time

from procrastinate import App, PsycopgConnector


def make_app(url: str, stamp: bool = False) -> App:
    app = App(connector=PsycopgConnector(conninfo=url))

    @app.task(name="noop")
    async def noop(n: int | None = None) -> None:
        if stamp:
            started = time.time()
            print(f"STARTED {n} {started:.6f}", flush=True)

    return app
