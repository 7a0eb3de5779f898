"""A DMS_JOBSCH row in words, for people: "every Monday at 02:30", "monthly on day 31 ...".

Only wording lives here; what a row means is ``worker.schedule.calculus``'s, whose validated
``Schedule`` this reads.
"""
from __future__ import annotations

import calendar
from datetime import datetime

from ..schedule.calculus import Schedule

_DAY_NAMES = {"MON": "Monday", "TUE": "Tuesday", "WED": "Wednesday", "THU": "Thursday", "FRI": "Friday",
              "SAT": "Saturday", "SUN": "Sunday"}


def _at(s: Schedule) -> str:
    return f"at {s.frqhh or 0:02d}:{s.frqmi or 0:02d}"


def _date(value: datetime) -> str:
    return value.strftime("%Y-%m-%d") if value.time() == datetime.min.time() else value.strftime("%Y-%m-%d %H:%M")


def _month_day(day: int) -> str:
    return f"day {day}" + (" (the last day in shorter months)" if day > 28 else "")


def describe(s: Schedule) -> str:
    """The schedule's rule in one English phrase, with its window."""
    # parse_schedule guarantees the columns each code uses: frqdd for WK/FN/MN/HY/YR, strtdt for
    # FN/HY/YR, cronexp for CRON (the same invariants calculus._calendar_pattern asserts).
    code = s.frqcd
    if code == "DL":
        text = f"every day {_at(s)}"
    elif code == "WK":
        assert s.frqdd is not None
        text = f"every {_DAY_NAMES[s.frqdd]} {_at(s)}"
    elif code == "FN":
        assert s.frqdd is not None
        text = f"every other {_DAY_NAMES[s.frqdd]} (every 14 days, the first on or after the start) {_at(s)}"
    elif code == "MN":
        assert s.frqdd is not None
        text = f"monthly on {_month_day(int(s.frqdd))} {_at(s)}"
    elif code == "HY":
        assert s.frqdd is not None and s.strtdt is not None
        first = s.strtdt.month
        months = f"{calendar.month_abbr[first]} and {calendar.month_abbr[(first + 5) % 12 + 1]}"
        text = f"every 6 months ({months}) on {_month_day(int(s.frqdd))} {_at(s)}"
    elif code == "YR":
        assert s.frqdd is not None and s.strtdt is not None
        day = int(s.frqdd)
        text = f"every year on {day} {calendar.month_name[s.strtdt.month]}" + (
            " (or the month's last day)" if day > 28 else "") + f" {_at(s)}"
    elif code == "ID":
        if s.frqhh is None:
            n = s.frqmi
            text = f"every {n} minute{'s' if n != 1 else ''} of elapsed time from the start"
        else:
            text = f"every hour at minute {s.frqmi:02d}"
    elif code == "CRON":
        assert s.cronexp is not None
        six = len(s.cronexp.split()) == 6
        text = f"cron '{s.cronexp}'" + (" (the 6th field is seconds)" if six else "")
    else:  # pragma: no cover - parse_schedule admits no other code
        text = code
    if s.strtdt is not None:
        text += f", from {_date(s.strtdt)}"
    if s.enddt is not None:
        text += f" until {_date(s.enddt)}" + (" (that whole day)" if s.enddt.time() == datetime.min.time() else "")
    return text
