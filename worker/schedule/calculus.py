"""Schedule calculus: when a DMS_JOBSCH row fires, and what a tick must enqueue.

This module owns the meaning of the schedule columns (frqcd, frqdd, frqhh, frqmi,
strtdt, enddt, cronexp, misfire): validating a row into a `Schedule`, computing
its occurrences, and the misfire policy (`plan_due`).  Everything here is pure:
no database and no clock -- `now` is always a parameter.

Time model
----------
Every code except elapsed-ID describes *nominal wall times* in the schedule's
zone: a set of matching days crossed with a fixed set of times of day.  A
nominal wall time becomes an instant by the contract's DST rule (see
`resolve_local`): inside a spring-forward gap it fires at the first instant
after the gap, inside a fall-back overlap at its first occurrence (fold=0).
That mapping never goes backwards, so the occurrences are the de-duplicated
images of the nominal times, in order.  Elapsed-ID ("every N minutes") is plain
arithmetic on absolute time from strtdt.

Nothing iterates minute by minute: the day structure of each code (periodic
days, clamped month days, cron day fields) lets us jump straight to the
nominal time next to any instant, and count nominal times arithmetically.

Returned datetimes are aware and expressed in the schedule zone.  Compare them
only after converting to UTC (or via timestamps): Python compares two
datetimes sharing a tzinfo by wall time, ignoring fold, which is wrong inside a
fall-back hour (elapsed-ID can legitimately fire at fold=1 times).
"""

from __future__ import annotations

import bisect
import calendar
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from enum import Enum
from functools import lru_cache
from numbers import Integral
from typing import Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, CroniterError, croniter

__all__ = [
    "CODES",
    "DuePlan",
    "InvalidSchedule",
    "Misfire",
    "Schedule",
    "count_between",
    "last_at_or_before",
    "next_after",
    "occurrences",
    "flag_problem",
    "parse_misfire",
    "parse_schedule",
    "plan_due",
    "resolve_local",
]

CODES = ("DL", "WK", "FN", "MN", "HY", "YR", "ID", "CRON")
WEEKDAYS = ("MON", "TUE", "WED", "THU", "FRI", "SAT", "SUN")

_UTC = timezone.utc
_TICK = timedelta(microseconds=1)  # datetime resolution: "strictly after t" == ">= t + _TICK"
_DAY = timedelta(days=1)
_MONDAY = date(2000, 1, 3)  # any Monday; anchors the unbounded periodic codes


class InvalidSchedule(ValueError):
    """A schedule row that cannot be interpreted.  `field` names the culprit column."""

    def __init__(self, reason: str, field: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field


def flag_problem(schflg: object, curflg: object) -> InvalidSchedule | None:
    """A ``schflg`` or ``curflg`` that is neither 'Y' nor 'N' (rows written before the V003
    CHECKs): without a word, 'X' would silently mean "disabled" or "old version"."""
    for column, value in (("schflg", schflg), ("curflg", curflg)):
        if value not in ("Y", "N"):
            return InvalidSchedule(f"{column} = {value!r} is neither 'Y' nor 'N': the row is not run until it is"
                                   f" set to one of them", column)
    return None


@dataclass(frozen=True)
class Schedule:
    """A validated, normalised DMS_JOBSCH row.

    frqcd is upper case; frqdd is a weekday name (WK, FN), a day-of-month number
    as a string (MN, HY, YR) or None; frqhh/frqmi are ints (None only where the
    code does not use them, and frqhh None marks elapsed-ID); strtdt/enddt are
    naive local wall times in `tz` (an enddt at 00:00:00 covers that whole day);
    cronexp is whitespace-normalised and set only for CRON.
    """

    frqcd: str
    frqdd: str | None
    frqhh: int | None
    frqmi: int | None
    strtdt: datetime | None
    enddt: datetime | None
    cronexp: str | None
    tz: ZoneInfo


# --------------------------------------------------------------------------
# Parsing and validation
# --------------------------------------------------------------------------


def parse_schedule(
    *,
    frqcd: object,
    frqdd: object = None,
    frqhh: object = None,
    frqmi: object = None,
    strtdt: object = None,
    enddt: object = None,
    cronexp: object = None,
    tz: object = "UTC",
) -> Schedule:
    """Validate one row into a `Schedule`; raises `InvalidSchedule` naming the field.

    Columns the code does not use (frqdd for DL, frqhh/frqmi for CRON, cronexp
    for calendar codes, ...) are ignored and normalised to None.
    """
    code = _parse_code(frqcd)
    zone = _parse_zone(tz)
    start = _parse_local(strtdt, "strtdt", zone)
    end = _parse_local(enddt, "enddt", zone)
    hh = _parse_int(frqhh, "frqhh")
    mi = _parse_int(frqmi, "frqmi")
    dd: str | None = None
    cron: str | None = None

    if code == "CRON":
        cron = _parse_cron(cronexp)
        hh = mi = None
    elif code == "ID":
        if hh is None:
            if mi is None:
                raise InvalidSchedule("frqmi is required for ID without frqhh (every N minutes, 1..1439)", "frqmi")
            _check_range(mi, 1, 1439, "frqmi", "ID (every N minutes)")
            if start is None:
                raise InvalidSchedule("strtdt is required for ID every-N-minutes (elapsed time counts from it)", "strtdt")
        else:
            _check_range(hh, 0, 23, "frqhh", code)
            mi = _check_range(0 if mi is None else mi, 0, 59, "frqmi", code)
    else:
        hh = _check_range(0 if hh is None else hh, 0, 23, "frqhh", code)
        mi = _check_range(0 if mi is None else mi, 0, 59, "frqmi", code)
        if code in ("WK", "FN"):
            dd = _parse_weekday(frqdd, code)
        elif code in ("MN", "HY", "YR"):
            dd = str(_parse_month_day(frqdd, code))
        if code in ("FN", "HY", "YR") and start is None:
            raise InvalidSchedule(f"strtdt is required for {code}", "strtdt")

    if start is not None and end is not None:
        # A date-form enddt covers its whole day, so only a later *day* is a contradiction.
        whole_day = end.time() == time(0)
        if (start.date() > end.date()) if whole_day else (end < start):
            raise InvalidSchedule(f"enddt {end.isoformat(sep=' ')} is before strtdt {start.isoformat(sep=' ')}", "enddt")

    return Schedule(code, dd, hh, mi, start, end, cron, zone)


def _blank(value: object) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _parse_code(value: object) -> str:
    if _blank(value):
        raise InvalidSchedule("frqcd is required", "frqcd")
    code = str(value).strip().upper()
    if code not in CODES:
        raise InvalidSchedule(f"frqcd {value!r} is not one of {', '.join(CODES)}", "frqcd")
    return code


def _parse_zone(value: object) -> ZoneInfo:
    if isinstance(value, ZoneInfo):
        return value
    if isinstance(value, str) and value.strip():
        try:
            return ZoneInfo(value.strip())
        except (ZoneInfoNotFoundError, ValueError, OSError):
            pass
    raise InvalidSchedule(f"tz {value!r} is not a known IANA time zone", "tz")


def _parse_int(value: object, field: str) -> int | None:
    if _blank(value):
        return None
    if isinstance(value, bool):  # bool is an Integral, but True is not an hour
        raise InvalidSchedule(f"{field} {value!r} is not an integer", field)
    if isinstance(value, Integral):
        return int(value)
    if isinstance(value, (float, Decimal)) and value == value and value == int(value):
        return int(value)  # database drivers may hand NUMBER columns over as float/Decimal
    if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
        return int(value.strip())
    raise InvalidSchedule(f"{field} {value!r} is not an integer", field)


def _check_range(value: int, low: int, high: int, field: str, code: str) -> int:
    if not low <= value <= high:
        raise InvalidSchedule(f"{field} {value} out of range {low}..{high} for {code}", field)
    return value


def _parse_weekday(value: object, code: str) -> str:
    if _blank(value):
        raise InvalidSchedule(f"frqdd is required for {code} (MON..SUN)", "frqdd")
    name = str(value).strip().upper()
    if name not in WEEKDAYS:
        raise InvalidSchedule(f"frqdd {value!r} is not a weekday MON..SUN for {code}", "frqdd")
    return name


def _parse_month_day(value: object, code: str) -> int:
    if _blank(value):
        raise InvalidSchedule(f"frqdd is required for {code} (day of month 1..31)", "frqdd")
    try:
        day = _parse_int(value, "frqdd")
    except InvalidSchedule:
        raise InvalidSchedule(f"frqdd {value!r} is not a day of month 1..31 for {code}", "frqdd") from None
    assert day is not None
    return _check_range(day, 1, 31, "frqdd", code)


def _parse_local(value: object, field: str, zone: ZoneInfo) -> datetime | None:
    if _blank(value):
        return None
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value.strip())
        except ValueError:
            raise InvalidSchedule(f"{field} {value!r} is not an ISO date or timestamp", field) from None
    if isinstance(value, datetime):
        if value.tzinfo is not None and value.utcoffset() is not None:
            # The column means local wall time; an aware value is read as that instant's wall time.
            return value.astimezone(zone).replace(tzinfo=None, fold=0)
        return value.replace(tzinfo=None)
    if isinstance(value, date):
        return datetime.combine(value, time(0))
    raise InvalidSchedule(f"{field} {value!r} is not a date or timestamp", field)


# Croniter's hashed (H) and random (R) fields need a hash id or are
# nondeterministic; a schedule must mean the same thing on every evaluation.
_HASH_OR_RANDOM = re.compile(r"(?:^|,)[hr](?:$|[(/,])", re.IGNORECASE)


def _parse_cron(value: object) -> str:
    if _blank(value):
        raise InvalidSchedule("cronexp is required for CRON", "cronexp")
    if not isinstance(value, str):
        raise InvalidSchedule(f"cronexp {value!r} is not a string", "cronexp")
    fields = value.split()
    if len(fields) not in (5, 6):
        raise InvalidSchedule(
            f"cronexp {value.strip()!r} must have 5 fields (or 6 with trailing seconds), not {len(fields)}",
            "cronexp",
        )
    if any(_HASH_OR_RANDOM.search(f) for f in fields):
        raise InvalidSchedule(f"cronexp {value.strip()!r} uses hashed/random fields (H, R), not supported", "cronexp")
    expr = " ".join(fields)
    _cron_spec(expr)  # validates
    return expr


# --------------------------------------------------------------------------
# Local wall time <-> instants
# --------------------------------------------------------------------------


def _offset(tz: ZoneInfo, instant: datetime) -> timedelta:
    off = instant.astimezone(tz).utcoffset()
    assert off is not None
    return off


def _transition(tz: ZoneInfo, before: datetime, after: datetime) -> datetime:
    """The UTC-offset change between two instants, as the first instant with `after`'s offset.

    zoneinfo does not expose its transition table, so bisect on whole seconds
    (tzdata transitions fall on whole seconds); ~12 steps for a one-hour window.
    """
    target = _offset(tz, after)
    lo = math.floor(before.timestamp())
    hi = math.ceil(after.timestamp())
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _offset(tz, datetime.fromtimestamp(mid, _UTC)) == target:
            hi = mid
        else:
            lo = mid
    return datetime.fromtimestamp(hi, _UTC)


def _resolve(tz: ZoneInfo, wall: datetime) -> datetime:
    """Instant (aware UTC) at which the nominal local wall time `wall` fires."""
    off0 = wall.replace(tzinfo=tz, fold=0).utcoffset()
    off1 = wall.replace(tzinfo=tz, fold=1).utcoffset()
    assert off0 is not None and off1 is not None
    if off0 >= off1:  # exists once, or twice (fall back): the first one
        return (wall - off0).replace(tzinfo=_UTC)
    # Spring-forward gap: per PEP 495 off0 is the offset before the jump, off1 after;
    # wall-off1 lies before the jump, wall-off0 after it.
    return _transition(tz, (wall - off1).replace(tzinfo=_UTC), (wall - off0).replace(tzinfo=_UTC))


def resolve_local(wall: datetime, tz: ZoneInfo) -> datetime:
    """Aware datetime in `tz` for a naive local wall time, using the schedule DST rule.

    A nonexistent time maps to the first instant after the gap, an ambiguous
    one to its first occurrence (fold=0).
    """
    return _resolve(tz, wall.replace(tzinfo=None)).astimezone(tz)


def _wall_info(tz: ZoneInfo, q: datetime) -> tuple[datetime, datetime | None]:
    """Local wall time of instant q, plus the end of the fall-back overlap if q is in its second pass.

    In the second pass every nominal time before the overlap's end already
    fired (at fold=0) before q, so searches must start from that end.
    """
    local = q.astimezone(tz)
    wall = local.replace(tzinfo=None)
    if local.fold:
        off0 = local.replace(fold=0).utcoffset()
        off1 = local.utcoffset()
        assert off0 is not None and off1 is not None
        if off0 > off1:
            start = _transition(tz, q - (off0 - off1), q)
            return wall, (start + off0).replace(tzinfo=None)
    return wall, None


def _spring_gaps(tz: ZoneInfo, a: datetime, b: datetime):
    """Yield (first nonexistent wall time, first wall time after the gap) for gaps starting in (a, b].

    Steps a day at a time: zones do not change offset twice within a day.
    """
    x, off = a, _offset(tz, a)
    while x < b:
        y = min(x + _DAY, b)
        off_y = _offset(tz, y)
        if off_y != off:
            if off_y > off:
                t = _transition(tz, x, y)
                yield (t + off).replace(tzinfo=None), (t + off_y).replace(tzinfo=None)
            off = off_y
        x = y


# --------------------------------------------------------------------------
# Day structures: which calendar days carry nominal times
# --------------------------------------------------------------------------


class _Days(Protocol):
    def contains(self, d: date) -> bool: ...
    def next_day(self, d: date) -> date | None: ...  # first matching day >= d
    def prev_day(self, d: date) -> date | None: ...  # last matching day <= d
    def count(self, d1: date, d2: date) -> int: ...  # matching days in [d1, d2]


def _add_days(d: date, n: int) -> date | None:
    try:
        return d + timedelta(days=n)
    except OverflowError:
        return None


@dataclass(frozen=True)
class _Periodic:
    """Every `period` days from `anchor` (DL, WK, FN, hourly ID); `bounded` = nothing before anchor."""

    anchor: date
    period: int
    bounded: bool

    def contains(self, d: date) -> bool:
        return (d - self.anchor).days % self.period == 0 and not (self.bounded and d < self.anchor)

    def next_day(self, d: date) -> date | None:
        k = -(-(d - self.anchor).days // self.period)
        if self.bounded:
            k = max(k, 0)
        return _add_days(self.anchor, k * self.period)

    def prev_day(self, d: date) -> date | None:
        k = (d - self.anchor).days // self.period
        if self.bounded and k < 0:
            return None
        return _add_days(self.anchor, k * self.period)

    def count(self, d1: date, d2: date) -> int:
        first, last = self.next_day(d1), self.prev_day(d2)
        if first is None or last is None or first > last:
            return 0
        return (last - first).days // self.period + 1


@dataclass(frozen=True)
class _MonthDay:
    """Day `day` (clamped to the month's last day) of every `step`-th month (MN, HY, YR).

    Months are numbered year*12 + month-1; the matching ones are those
    congruent to `phase` modulo `step`.
    """

    step: int
    phase: int
    day: int

    def _on(self, mi: int) -> date | None:
        year, m0 = divmod(mi, 12)
        if not 1 <= year <= 9999:
            return None
        return date(year, m0 + 1, min(self.day, calendar.monthrange(year, m0 + 1)[1]))

    def contains(self, d: date) -> bool:
        mi = d.year * 12 + d.month - 1
        return (mi - self.phase) % self.step == 0 and d == self._on(mi)

    def next_day(self, d: date) -> date | None:
        mi = d.year * 12 + d.month - 1
        mi += (self.phase - mi) % self.step
        c = self._on(mi)
        return self._on(mi + self.step) if c is not None and c < d else c

    def prev_day(self, d: date) -> date | None:
        mi = d.year * 12 + d.month - 1
        mi -= (mi - self.phase) % self.step
        c = self._on(mi)
        return self._on(mi - self.step) if c is not None and c > d else c

    def count(self, d1: date, d2: date) -> int:
        first, last = self.next_day(d1), self.prev_day(d2)
        if first is None or last is None or first > last:
            return 0
        months = (last.year - first.year) * 12 + last.month - first.month
        return months // self.step + 1


@dataclass(frozen=True)
class _CronSpec:
    """A cron expression split into what varies by day and the fixed times of day.

    Cron's hour/minute/second fields never depend on the date, so a cron
    schedule is (matching days) x (times).  Day matching is done with plain
    sets when the expression allows it; L, # and W fall back to croniter.
    """

    expr: str
    times: tuple[time, ...]
    months: frozenset[int] | None  # None: any
    doms: frozenset[int] | None
    dows: frozenset[int] | None  # cron numbering, 0 = Sunday
    simple: bool


def _field_values(values: list, full: range) -> list[int]:
    return list(full) if values == ["*"] else sorted(int(v) for v in values)


@lru_cache(maxsize=512)
def _cron_spec(expr: str) -> _CronSpec:
    try:
        it = croniter(expr, datetime(2000, 1, 1))
        it.get_next(datetime)  # an expression that can never match raises here
    except CroniterBadDateError:
        raise InvalidSchedule(f"cronexp {expr!r} never fires", "cronexp") from None
    except (CroniterError, ValueError, TypeError, KeyError, IndexError) as exc:
        raise InvalidSchedule(f"cronexp {expr!r} is not a valid cron expression ({exc})", "cronexp") from None
    ex = it.expanded
    seconds = _field_values(ex[5], range(60)) if len(ex) == 6 else [0]
    minutes = _field_values(ex[0], range(60))
    hours = _field_values(ex[1], range(24))
    times = tuple(time(h, m, s) for h in hours for m in minutes for s in seconds)

    def as_set(values: list) -> frozenset[int] | None:
        return None if values == ["*"] else frozenset(v for v in values if isinstance(v, int))

    simple = not it.nth_weekday_of_month and not it.nearest_weekday and "l" not in ex[2]
    dows = as_set(ex[4])
    return _CronSpec(
        expr=expr,
        times=times,
        months=as_set(ex[3]),
        doms=as_set(ex[2]),
        dows=None if dows is None else frozenset(v % 7 for v in dows),
        simple=simple,
    )


_CRON_SCAN_DAYS = 366 * 9  # the rarest simple day pattern (29 Feb) recurs within 8 years


@dataclass(frozen=True)
class _CronDays:
    spec: _CronSpec

    def contains(self, d: date) -> bool:
        if not self.spec.simple:
            return self.next_day(d) == d
        s = self.spec
        if s.months is not None and d.month not in s.months:
            return False
        dom_ok = s.doms is None or d.day in s.doms
        dow_ok = s.dows is None or d.isoweekday() % 7 in s.dows
        if s.doms is not None and s.dows is not None:
            return dom_ok or dow_ok  # cron (and croniter's default day_or): both restricted -> either
        return dom_ok and dow_ok

    def _scan(self, d: date, step: int) -> date | None:
        for _ in range(_CRON_SCAN_DAYS):
            if self.contains(d):
                return d
            nd = _add_days(d, step)
            if nd is None:
                return None
            d = nd
        return None

    def next_day(self, d: date) -> date | None:
        if self.spec.simple:
            return self._scan(d, 1)
        try:
            it = croniter(self.spec.expr, datetime.combine(d, time(0)) - timedelta(seconds=1))
            return it.get_next(datetime).date()
        except (CroniterBadDateError, OverflowError, ValueError):
            return None

    def prev_day(self, d: date) -> date | None:
        if self.spec.simple:
            return self._scan(d, -1)
        try:
            it = croniter(self.spec.expr, datetime.combine(d, time(0)) + _DAY)
            return it.get_prev(datetime).date()
        except (CroniterBadDateError, OverflowError, ValueError):
            return None

    def count(self, d1: date, d2: date) -> int:
        s = self.spec
        if s.simple and s.months is None and s.doms is None and s.dows is None:
            return max(0, (d2 - d1).days + 1)
        # One step per matching day (simple sets: one cheap test per day); this
        # only runs for misfire accounting over long outages.
        n, d = 0, self.next_day(d1)
        while d is not None and d <= d2:
            n += 1
            nd = _add_days(d, 1)
            d = None if nd is None else self.next_day(nd)
        return n


# --------------------------------------------------------------------------
# Rules: nominal wall times -> instants
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Pattern:
    """Nominal local wall times: matching days x sorted times of day."""

    days: _Days
    times: tuple[time, ...]

    def next_wall(self, w: datetime) -> datetime | None:
        """Smallest nominal wall time > w."""
        d = w.date()
        if self.days.contains(d):
            i = bisect.bisect_right(self.times, w.time())
            if i < len(self.times):
                return datetime.combine(d, self.times[i])
        nd = _add_days(d, 1)
        nd = None if nd is None else self.days.next_day(nd)
        return None if nd is None else datetime.combine(nd, self.times[0])

    def prev_wall(self, w: datetime) -> datetime | None:
        """Largest nominal wall time <= w."""
        d = w.date()
        if self.days.contains(d):
            i = bisect.bisect_right(self.times, w.time())
            if i > 0:
                return datetime.combine(d, self.times[i - 1])
        pd = _add_days(d, -1)
        pd = None if pd is None else self.days.prev_day(pd)
        return None if pd is None else datetime.combine(pd, self.times[-1])

    def count(self, w1: datetime, w2: datetime) -> int:
        """Nominal wall times in [w1, w2]."""
        if w1 > w2:
            return 0
        d1, d2, t1, t2 = w1.date(), w2.date(), w1.time(), w2.time()
        if d1 == d2:
            if not self.days.contains(d1):
                return 0
            return bisect.bisect_right(self.times, t2) - bisect.bisect_left(self.times, t1)
        n = len(self.times) - bisect.bisect_left(self.times, t1) if self.days.contains(d1) else 0
        n += bisect.bisect_right(self.times, t2) if self.days.contains(d2) else 0
        if (d2 - d1).days > 1:
            n += self.days.count(d1 + _DAY, d2 - _DAY) * len(self.times)
        return n


class _Rule(Protocol):
    def first_after(self, q: datetime) -> datetime | None: ...
    def last_at_or_before(self, q: datetime) -> datetime | None: ...
    def count(self, lo: datetime, hi: datetime) -> int: ...  # occurrences in (lo, hi]


@dataclass(frozen=True)
class _WallRule:
    """Occurrences of a nominal-wall-time pattern in a zone (all codes but elapsed-ID)."""

    pattern: _Pattern
    tz: ZoneInfo

    def _first(self, q: datetime) -> tuple[datetime, datetime] | None:
        wall, overlap_end = _wall_info(self.tz, q)
        w = self.pattern.next_wall(overlap_end - _TICK if overlap_end else wall)
        # Starting there, resolve(w) > q already holds; the loop is a safety net.
        while w is not None:
            r = _resolve(self.tz, w)
            if r > q:
                return w, r
            w = self.pattern.next_wall(w)
        return None

    def _last(self, q: datetime) -> tuple[datetime, datetime] | None:
        wall, overlap_end = _wall_info(self.tz, q)
        w = self.pattern.prev_wall(overlap_end - _TICK if overlap_end else wall)
        while w is not None:
            r = _resolve(self.tz, w)
            if r <= q:
                return w, r
            w = self.pattern.prev_wall(w - _TICK)
        return None

    def first_after(self, q: datetime) -> datetime | None:
        hit = _guard(self._first, q)
        return None if hit is None else hit[1]

    def last_at_or_before(self, q: datetime) -> datetime | None:
        hit = _guard(self._last, q)
        return None if hit is None else hit[1]

    def count(self, lo: datetime, hi: datetime) -> int:
        first, last = _guard(self._first, lo), _guard(self._last, hi)
        if first is None or last is None or first[1] > last[1]:
            return 0
        n = self.pattern.count(first[0], last[0])
        # Nominal times inside a spring-forward gap all fire at the gap's end,
        # together with a nominal time sitting exactly there: one occurrence each group.
        for g0, g1 in _spring_gaps(self.tz, first[1] - _DAY, last[1]):
            a, b = max(g0, first[0]), min(g1, last[0])
            if a <= b:
                n -= max(0, self.pattern.count(a, b) - 1)
        return n


def _guard(
    fn: Callable[[datetime], tuple[datetime, datetime] | None], q: datetime
) -> tuple[datetime, datetime] | None:
    try:
        return fn(q)
    except OverflowError:  # the search ran off the ends of datetime's range
        return None


@dataclass(frozen=True)
class _ElapsedRule:
    """Every `period` of absolute time from `anchor` (ID with frqhh null)."""

    anchor: datetime
    period: timedelta

    def _upto(self, x: datetime) -> int:  # occurrences <= x
        return 0 if x < self.anchor else (x - self.anchor) // self.period + 1

    def first_after(self, q: datetime) -> datetime | None:
        try:
            return self.anchor + self._upto(q) * self.period
        except OverflowError:
            return None

    def last_at_or_before(self, q: datetime) -> datetime | None:
        k = self._upto(q)
        return None if k == 0 else self.anchor + (k - 1) * self.period

    def count(self, lo: datetime, hi: datetime) -> int:
        return max(0, self._upto(hi) - self._upto(lo))


@dataclass(frozen=True)
class _Compiled:
    rule: _Rule
    start: datetime | None  # aware UTC, inclusive
    end: datetime | None  # aware UTC, inclusive


@lru_cache(maxsize=1024)
def _compile(s: Schedule) -> _Compiled:
    tz = s.tz
    start = None if s.strtdt is None else _resolve(tz, s.strtdt)
    end = None
    if s.enddt is not None:
        if s.enddt.time() == time(0):  # date form: the whole day, i.e. before the next local midnight
            end = _resolve(tz, s.enddt + _DAY) - _TICK
        else:
            end = _resolve(tz, s.enddt)

    rule: _Rule
    if s.frqcd == "ID" and s.frqhh is None:
        assert start is not None and s.frqmi is not None
        rule = _ElapsedRule(start, timedelta(minutes=s.frqmi))
    elif s.frqcd == "CRON":
        assert s.cronexp is not None
        spec = _cron_spec(s.cronexp)
        rule = _WallRule(_Pattern(_CronDays(spec), spec.times), tz)
    else:
        rule = _WallRule(_calendar_pattern(s), tz)
    return _Compiled(rule, start, end)


def _calendar_pattern(s: Schedule) -> _Pattern:
    hh, mi = s.frqhh or 0, s.frqmi or 0
    at = (time(hh, mi),)
    code = s.frqcd
    if code == "DL":
        return _Pattern(_Periodic(_MONDAY, 1, bounded=False), at)
    if code == "ID":  # hourly at minute frqmi, wall clock
        return _Pattern(_Periodic(_MONDAY, 1, bounded=False), tuple(time(h, mi) for h in range(24)))
    if code == "WK":
        assert s.frqdd is not None
        return _Pattern(_Periodic(_MONDAY + timedelta(days=WEEKDAYS.index(s.frqdd)), 7, bounded=False), at)
    if code == "FN":
        assert s.frqdd is not None and s.strtdt is not None
        first = s.strtdt.date() + timedelta(days=(WEEKDAYS.index(s.frqdd) - s.strtdt.weekday()) % 7)
        if datetime.combine(first, at[0]) < s.strtdt:
            first += timedelta(days=7)
        return _Pattern(_Periodic(first, 14, bounded=True), at)
    assert s.frqdd is not None
    day = int(s.frqdd)
    if code == "MN":
        return _Pattern(_MonthDay(1, 0, day), at)
    assert s.strtdt is not None
    month_index = s.strtdt.year * 12 + s.strtdt.month - 1
    step = 6 if code == "HY" else 12
    return _Pattern(_MonthDay(step, month_index % step, day), at)


# --------------------------------------------------------------------------
# Public queries
# --------------------------------------------------------------------------


def _as_utc(value: datetime, name: str) -> datetime:
    if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be a timezone-aware datetime, got {value!r}")
    return value.astimezone(_UTC)


def _next_utc(c: _Compiled, q: datetime) -> datetime | None:
    if c.start is not None and q < c.start:
        q = c.start - _TICK
    r = c.rule.first_after(q)
    if r is None or (c.end is not None and r > c.end):
        return None
    return r


def _last_utc(c: _Compiled, q: datetime) -> datetime | None:
    if c.end is not None and q > c.end:
        q = c.end
    r = c.rule.last_at_or_before(q)
    if r is None or (c.start is not None and r < c.start):
        return None
    return r


def _count_utc(c: _Compiled, lo: datetime, hi: datetime) -> int:
    if c.start is not None and lo < c.start:
        lo = c.start - _TICK
    if c.end is not None and hi > c.end:
        hi = c.end
    return c.rule.count(lo, hi) if lo < hi else 0


def _between_utc(c: _Compiled, lo: datetime, hi: datetime, limit: int | None = None) -> list[datetime]:
    out: list[datetime] = []
    q = lo
    while limit is None or len(out) < limit:
        r = _next_utc(c, q)
        if r is None or r > hi:
            break
        out.append(r)
        q = r
    return out


def next_after(s: Schedule, after: datetime) -> datetime | None:
    """First occurrence strictly after `after` (aware, any offset), in s.tz; None once the window is over."""
    r = _next_utc(_compile(s), _as_utc(after, "after"))
    return None if r is None else r.astimezone(s.tz)


def last_at_or_before(s: Schedule, t: datetime) -> datetime | None:
    """Latest occurrence <= t (aware), in s.tz; None if there is none in the window."""
    r = _last_utc(_compile(s), _as_utc(t, "t"))
    return None if r is None else r.astimezone(s.tz)


def count_between(s: Schedule, after: datetime, until: datetime) -> int:
    """Number of occurrences in (after, until], computed without enumerating them."""
    return _count_utc(_compile(s), _as_utc(after, "after"), _as_utc(until, "until"))


def occurrences(
    s: Schedule, after: datetime, until: datetime | None = None, limit: int | None = None
) -> list[datetime]:
    """Occurrences strictly after `after` and <= `until`, at most `limit`, in s.tz.

    At least one of `until` and `limit` is required, so the result is bounded.
    """
    if until is None and limit is None:
        raise ValueError("occurrences() needs until or limit")
    if limit is not None and limit < 0:
        raise ValueError("limit must be >= 0")
    hi = datetime.max.replace(tzinfo=_UTC) if until is None else _as_utc(until, "until")
    found = _between_utc(_compile(s), _as_utc(after, "after"), hi, limit)
    return [r.astimezone(s.tz) for r in found]


# --------------------------------------------------------------------------
# Misfire policy
# --------------------------------------------------------------------------


class Misfire(str, Enum):
    LATEST = "LATEST"  # run the latest missed occurrence once
    ALL = "ALL"  # run every missed occurrence (up to max_catch_up, most recent)
    SKIP = "SKIP"  # run none of the missed occurrences


def parse_misfire(value: object) -> Misfire:
    """DMS_JOBSCH.misfire -> Misfire; None/blank means LATEST."""
    if isinstance(value, Misfire):
        return value
    if _blank(value):
        return Misfire.LATEST
    try:
        return Misfire(str(value).strip().upper())
    except ValueError:
        raise InvalidSchedule(f"misfire {value!r} is not one of LATEST, ALL, SKIP", "misfire") from None


@dataclass(frozen=True)
class DuePlan:
    """What one tick must do: enqueue `to_enqueue` (ascending, in the schedule zone),
    account `skipped` missed occurrences, and come back at `next_due`."""

    to_enqueue: tuple[datetime, ...]
    skipped: int
    next_due: datetime | None


def plan_due(
    s: Schedule,
    *,
    last_done: datetime | None,
    now: datetime,
    misfire: Misfire | str | None,
    max_catch_up: int = 100,
    grace: timedelta = timedelta(seconds=60),
) -> DuePlan:
    """Occurrences in (last_done, now] are due; apply the misfire policy to the late ones.

    An occurrence t is on time when now - grace < t <= now, and is always
    enqueued; earlier due ones are misfired.  last_done None means now - grace
    (a new schedule does not replay history).  Cost does not depend on how long
    ago last_done is: misfires are counted arithmetically and only the ones to
    enqueue are materialised.
    """
    policy = parse_misfire(misfire)
    if max_catch_up < 0:
        raise ValueError("max_catch_up must be >= 0")
    if grace < timedelta(0):
        raise ValueError("grace must be >= 0")
    c = _compile(s)
    now_u = _as_utc(now, "now")
    cut = now_u - grace
    lower = cut if last_done is None else _as_utc(last_done, "last_done")

    on_time = _between_utc(c, max(lower, cut), now_u)
    missed = _count_utc(c, lower, cut) if lower < cut else 0
    late: list[datetime] = []
    if missed and policy is not Misfire.SKIP:
        keep = 1 if policy is Misfire.LATEST else min(missed, max_catch_up)
        r = _last_utc(c, cut)
        while r is not None and r > lower and len(late) < keep:
            late.append(r)
            r = _last_utc(c, r - _TICK)
        late.reverse()

    return DuePlan(
        to_enqueue=tuple(r.astimezone(s.tz) for r in late + on_time),
        skipped=missed - len(late),
        next_due=next_after(s, now),
    )
