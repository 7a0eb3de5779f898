"""The long chaos run: ``python -m tests.chaos --minutes 5`` (from the repository root, in the venv).

Creates a private PostgreSQL cluster (never touches the system server), runs 4 replicas under
kill -9 / SIGTERM / one PostgreSQL restart / malformed rows, then checks the invariants from
the tables and prints the counts. Exit status 0 when every invariant held, 1 otherwise.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tests.chaos.harness import ClusterError, run_chaos


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="length of the chaos phase (default 5)")
    parser.add_argument("--replicas", type=int, default=4, help="replica processes kept running (default 4)")
    parser.add_argument("--seed", type=int, default=None, help="random seed, to replay a run's choices")
    parser.add_argument("--log-dir", type=Path, default=None, help="where replica logs go (default: a temp dir)")
    parser.add_argument("--settle-timeout", type=float, default=120.0,
                        help="seconds to wait for the queue to drain after the chaos (default 120)")
    parser.add_argument("--action-every", default="4,10", metavar="LO,HI",
                        help="seconds between two kills/SIGTERMs, drawn uniformly from LO..HI (default 4,10)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines, only the report")
    args = parser.parse_args(argv)
    try:
        lo, hi = (float(x) for x in args.action_every.split(","))
    except ValueError:
        parser.error("--action-every takes two numbers, LO,HI")
    t0 = time.monotonic()
    try:
        outcome = run_chaos(args.minutes * 60, replicas=args.replicas, seed=args.seed, log_dir=args.log_dir,
                            settle_timeout_s=args.settle_timeout, verbose=not args.quiet, action_every_s=(lo, hi))
    except ClusterError as exc:
        print(f"cannot create the private PostgreSQL cluster: {exc}", file=sys.stderr)
        return 2
    print(outcome.report())
    print(f"total {time.monotonic() - t0:.1f} s: {'PASS' if outcome.ok else 'FAIL'}")
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
