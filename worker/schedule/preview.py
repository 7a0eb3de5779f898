"""`dms-worker schedule preview`: print the next occurrences of a schedule row.

This module owns the command's flags and output only; the meaning of the
schedule lives in `worker.schedule.calculus`.  The CLI wiring calls
`add_arguments` on its sub-parser and `run` with the current time.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from typing import TextIO
from zoneinfo import ZoneInfo

from worker.schedule.calculus import InvalidSchedule, next_after, parse_schedule, resolve_local

_WEEKDAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")  # locale-independent %a
_MAX_COUNT = 10_000


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the preview flags.  Values stay strings: `run` validates them so that
    every error is reported as one line with exit status 2."""
    parser.add_argument("--frqcd", required=True, help="DL, WK, FN, MN, HY, YR, ID or CRON")
    parser.add_argument("--frqdd", help="weekday MON..SUN (WK, FN) or day of month 1..31 (MN, HY, YR)")
    parser.add_argument("--frqhh", help="hour 0..23 (ID: set for hourly, omit for every --frqmi minutes)")
    parser.add_argument("--frqmi", help="minute 0..59 (ID without --frqhh: interval 1..1439)")
    parser.add_argument("--strtdt", help="window start, ISO date or timestamp, local to --tz")
    parser.add_argument("--enddt", help="window end, ISO date (whole day) or timestamp, local to --tz")
    parser.add_argument("--cronexp", help="cron expression for CRON (5 fields, or 6 with trailing seconds)")
    parser.add_argument("--tz", default="UTC", help="IANA time zone of the schedule (default UTC)")
    parser.add_argument("--after", help="list occurrences strictly after this ISO timestamp (default: now)")
    parser.add_argument("--count", default="10", help="number of occurrences to print (default 10)")
    parser.add_argument("--json", action="store_true", help="print a JSON array of ISO-8601 strings")


class _UsageError(Exception):
    pass


def _parse_count(raw: object) -> int:
    try:
        value = int(str(raw).strip())
    except ValueError:
        raise _UsageError(f"--count {raw!r} is not an integer") from None
    if not 1 <= value <= _MAX_COUNT:
        raise _UsageError(f"--count {value} out of range 1..{_MAX_COUNT}")
    return value


def _parse_after(raw: str | None, tz: ZoneInfo, now: datetime) -> datetime:
    if raw is None:
        return now
    try:
        value = datetime.fromisoformat(raw.strip())
    except ValueError:
        raise _UsageError(f"--after {raw!r} is not an ISO timestamp") from None
    if value.tzinfo is None:
        return resolve_local(value, tz)
    return value


def run(
    args: argparse.Namespace,
    *,
    now: datetime,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
) -> int:
    """Print the first --count occurrences strictly after --after; 0 on success, 2 on bad input."""
    try:
        count = _parse_count(args.count)
        schedule = parse_schedule(
            frqcd=args.frqcd,
            frqdd=args.frqdd,
            frqhh=args.frqhh,
            frqmi=args.frqmi,
            strtdt=args.strtdt,
            enddt=args.enddt,
            cronexp=args.cronexp,
            tz=args.tz,
        )
        after = _parse_after(args.after, schedule.tz, now)
    except InvalidSchedule as exc:
        # Reasons start with the column name, which is also the flag name.
        print(f"error: --{exc.reason}" if exc.field else f"error: {exc.reason}", file=err)
        return 2
    except _UsageError as exc:
        print(f"error: {exc}", file=err)
        return 2

    found: list[datetime] = []
    cursor = after
    while len(found) < count:
        nxt = next_after(schedule, cursor)
        if nxt is None:
            break
        found.append(nxt)
        cursor = nxt

    if args.json:
        print(json.dumps([t.isoformat() for t in found]), file=out)
    else:
        for t in found:
            print(f"{t.isoformat()}  {_WEEKDAY_NAMES[t.weekday()]}", file=out)
        if len(found) < count:
            print(f"note: the schedule window ends after {len(found)} of {count} occurrences", file=err)
    return 0


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(prog="dms-worker schedule preview")
    add_arguments(_parser)
    sys.exit(run(_parser.parse_args(), now=datetime.now(timezone.utc)))
