"""Tests for worker.schedule.calculus: table tests per code, DST edges, invalid rows,
misfire planning, and hypothesis properties checked against brute-force enumeration."""

from __future__ import annotations

import time as clock
from datetime import date, datetime, time, timedelta, timezone
from zoneinfo import ZoneInfo

import pytest
from croniter import croniter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.schedule.calculus import (
    InvalidSchedule,
    Misfire,
    Schedule,
    count_between,
    last_at_or_before,
    next_after,
    occurrences,
    parse_misfire,
    parse_schedule,
    plan_due,
    resolve_local,
)

UTC = timezone.utc
BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
TICK = timedelta(microseconds=1)


def local(tz: ZoneInfo, *args: int, fold: int = 0) -> datetime:
    return datetime(*args, tzinfo=tz, fold=fold)


def just_before(t: datetime) -> datetime:
    # Aware arithmetic in a DST zone is wall-clock arithmetic; step back in UTC.
    return t.astimezone(UTC) - TICK


def iso(values: list[datetime]) -> list[str]:
    return [v.isoformat() for v in values]


def first(s: Schedule, after: datetime, n: int) -> list[str]:
    return iso(occurrences(s, after, limit=n))


# ---------------------------------------------------------------------------
# One table per code
# ---------------------------------------------------------------------------


def test_daily_fires_every_day_at_time():
    s = parse_schedule(frqcd=" dl ", frqhh="07", frqmi=5, tz="UTC")
    assert first(s, local(UTC, 2026, 1, 1, 7, 5), 3) == [
        "2026-01-02T07:05:00+00:00",
        "2026-01-03T07:05:00+00:00",
        "2026-01-04T07:05:00+00:00",
    ]


def test_null_hour_and_minute_mean_midnight():
    s = parse_schedule(frqcd="DL", tz="UTC")
    assert first(s, local(UTC, 2026, 1, 1, 0, 0), 1) == ["2026-01-02T00:00:00+00:00"]


@pytest.mark.parametrize("index,name", list(enumerate(["MON", "tue", "Wed", "THU", "fri", "SAT", "sun"])))
def test_weekly_each_weekday(index, name):
    s = parse_schedule(frqcd="WK", frqdd=name, frqhh=9, frqmi=30, tz="Europe/Berlin")
    # 2026-01-05 is a Monday
    got = occurrences(s, local(BERLIN, 2026, 1, 5, 0, 0), limit=3)
    assert [g.weekday() for g in got] == [index] * 3
    assert got[0].date() == date(2026, 1, 5) + timedelta(days=index)
    assert all(g.time() == time(9, 30) for g in got)
    assert [(b.date() - a.date()).days for a, b in zip(got, got[1:])] == [7, 7]


def test_weekly_same_day_before_and_after_the_time():
    s = parse_schedule(frqcd="WK", frqdd="MON", frqhh=9, tz="UTC")
    assert first(s, local(UTC, 2026, 1, 5, 8, 59), 1) == ["2026-01-05T09:00:00+00:00"]
    assert first(s, local(UTC, 2026, 1, 5, 9, 0), 1) == ["2026-01-12T09:00:00+00:00"]


@pytest.mark.parametrize(
    "strtdt,expected",
    [
        # Wednesday start: anchor is the following Monday
        ("2026-01-07 00:00", ["2026-01-12", "2026-01-26", "2026-02-09"]),
        # Monday start exactly at the time: anchor is that day (>=)
        ("2026-01-12 09:00", ["2026-01-12", "2026-01-26", "2026-02-09"]),
        # Monday start after the time: anchor is a week later, then every 14 days
        ("2026-01-12 09:01", ["2026-01-19", "2026-02-02", "2026-02-16"]),
    ],
)
def test_fortnightly_anchor_on_or_after_strtdt(strtdt, expected):
    s = parse_schedule(frqcd="FN", frqdd="MON", frqhh=9, strtdt=strtdt, tz="UTC")
    got = occurrences(s, local(UTC, 2025, 1, 1), limit=3)
    assert [g.date().isoformat() for g in got] == expected
    assert all(g.time() == time(9, 0) for g in got)


def test_fortnightly_keeps_phase_far_from_anchor_and_across_dst():
    s = parse_schedule(frqcd="FN", frqdd="FRI", frqhh=6, strtdt="2026-01-02", tz="Europe/Berlin")
    got = occurrences(s, local(BERLIN, 2027, 6, 1), limit=4)
    for g in got:
        assert (g.date() - date(2026, 1, 2)).days % 14 == 0
        assert g.weekday() == 4 and g.time() == time(6, 0)


def test_monthly_31_clamps_to_month_end():
    s = parse_schedule(frqcd="MN", frqdd="31", frqhh=23, frqmi=59, tz="UTC")
    got = occurrences(s, local(UTC, 2026, 1, 1), limit=5)
    assert [g.date().isoformat() for g in got] == ["2026-01-31", "2026-02-28", "2026-03-31", "2026-04-30", "2026-05-31"]
    leap = occurrences(s, local(UTC, 2028, 2, 1), limit=1)
    assert leap[0].date() == date(2028, 2, 29)


def test_monthly_accepts_zero_padded_and_int_day():
    a = parse_schedule(frqcd="MN", frqdd="05", tz="UTC")
    b = parse_schedule(frqcd="MN", frqdd=5, tz="UTC")
    assert a == b and a.frqdd == "5"
    assert first(a, local(UTC, 2026, 1, 5), 2) == ["2026-02-05T00:00:00+00:00", "2026-03-05T00:00:00+00:00"]


def test_half_yearly_counts_from_strtdt_month_with_clamping():
    s = parse_schedule(frqcd="HY", frqdd=31, frqhh=1, strtdt="2025-08-15", tz="UTC")
    got = occurrences(s, local(UTC, 2020, 1, 1), limit=4)
    assert [g.date().isoformat() for g in got] == ["2025-08-31", "2026-02-28", "2026-08-31", "2027-02-28"]


def test_half_yearly_from_november():
    s = parse_schedule(frqcd="HY", frqdd=1, strtdt="2025-11-20", tz="UTC")
    got = occurrences(s, local(UTC, 2025, 1, 1), limit=3)
    # Nov 1 2025 is before strtdt, so the first is May
    assert [g.date().isoformat() for g in got] == ["2026-05-01", "2026-11-01", "2027-05-01"]


def test_yearly_29_february_falls_back_to_28th():
    s = parse_schedule(frqcd="YR", frqdd=29, frqhh=12, strtdt="2024-02-01", tz="UTC")
    got = occurrences(s, local(UTC, 2024, 1, 1), limit=5)
    assert [g.date().isoformat() for g in got] == [
        "2024-02-29",
        "2025-02-28",
        "2026-02-28",
        "2027-02-28",
        "2028-02-29",
    ]


def test_yearly_uses_strtdt_month():
    s = parse_schedule(frqcd="YR", frqdd=15, strtdt="2026-07-20", tz="UTC")
    got = occurrences(s, local(UTC, 2026, 1, 1), limit=2)
    assert [g.date().isoformat() for g in got] == ["2027-07-15", "2028-07-15"]


def test_id_hourly_wall_clock_minute():
    s = parse_schedule(frqcd="ID", frqhh=0, frqmi=15, tz="UTC")
    assert first(s, local(UTC, 2026, 1, 1, 10, 15), 3) == [
        "2026-01-01T11:15:00+00:00",
        "2026-01-01T12:15:00+00:00",
        "2026-01-01T13:15:00+00:00",
    ]


def test_id_elapsed_from_strtdt():
    s = parse_schedule(frqcd="ID", frqmi=90, strtdt="2026-01-01 00:10", tz="UTC")
    assert first(s, local(UTC, 2025, 1, 1), 3) == [
        "2026-01-01T00:10:00+00:00",
        "2026-01-01T01:40:00+00:00",
        "2026-01-01T03:10:00+00:00",
    ]
    # phase is kept far from the anchor: 1000 days = 16000 periods exactly
    assert first(s, local(UTC, 2028, 9, 27, 0, 9), 1) == ["2028-09-27T00:10:00+00:00"]


@pytest.mark.parametrize(
    "strtdt,after",
    [
        ("2026-03-28 22:05", local(BERLIN, 2026, 3, 28, 22, 0)),  # spring forward
        ("2026-10-24 22:05", local(BERLIN, 2026, 10, 24, 22, 0)),  # fall back
    ],
)
def test_id_elapsed_keeps_absolute_spacing_across_dst(strtdt, after):
    s = parse_schedule(frqcd="ID", frqmi=45, strtdt=strtdt, tz="Europe/Berlin")
    got = occurrences(s, after, limit=12)
    gaps = {(b.astimezone(UTC) - a.astimezone(UTC)) for a, b in zip(got, got[1:])}
    assert gaps == {timedelta(minutes=45)}
    assert len({g.utcoffset() for g in got}) == 2  # really crossed the transition


def test_id_elapsed_emits_both_passes_of_the_fall_back_hour():
    s = parse_schedule(frqcd="ID", frqmi=30, strtdt="2026-10-25 01:00", tz="Europe/Berlin")
    assert first(s, local(BERLIN, 2026, 10, 25, 1, 0), 5) == [
        "2026-10-25T01:30:00+02:00",
        "2026-10-25T02:00:00+02:00",
        "2026-10-25T02:30:00+02:00",
        "2026-10-25T02:00:00+01:00",
        "2026-10-25T02:30:00+01:00",
    ]


def test_cron_five_fields():
    s = parse_schedule(frqcd="CRON", cronexp="*/20  9-10 * *   MON-FRI", tz="UTC")
    assert s.cronexp == "*/20 9-10 * * MON-FRI"
    # 2026-01-09 is a Friday
    assert first(s, local(UTC, 2026, 1, 9, 10, 30), 3) == [
        "2026-01-09T10:40:00+00:00",
        "2026-01-12T09:00:00+00:00",
        "2026-01-12T09:20:00+00:00",
    ]


def test_cron_six_fields_trailing_seconds():
    s = parse_schedule(frqcd="CRON", cronexp="30 2 * * * 10,40", tz="UTC")
    assert first(s, local(UTC, 2026, 1, 1), 3) == [
        "2026-01-01T02:30:10+00:00",
        "2026-01-01T02:30:40+00:00",
        "2026-01-02T02:30:10+00:00",
    ]


CRON_SAMPLES = [
    "*/7 * * * *",
    "0 2 * * *",
    "30 2 * * 0",
    "0,30 2 * * *",
    "*/20 1-3 * * *",
    "0 0 L * *",
    "0 12 * * 1#2",
    "15 10 15W * *",
    "0 0 29 2 *",
    "0 0 1,15 * 1",
    "5 4 * 2-3,10-11 sat",
    "30 2 * * * 10,40",
    "*/15 */6 10-20 * *",
]


@pytest.mark.parametrize("expr", CRON_SAMPLES)
def test_cron_matches_croniter_in_utc(expr):
    s = parse_schedule(frqcd="CRON", cronexp=expr, tz="UTC")
    start = datetime(2027, 12, 30, 13, 7)
    it = croniter(expr, start)
    expected = [it.get_next(datetime).replace(tzinfo=UTC) for _ in range(40)]
    got = occurrences(s, start.replace(tzinfo=UTC), limit=40)
    assert got == expected
    # and backwards from the last one
    back, t = [], got[-1]
    for _ in range(39):
        t = last_at_or_before(s, just_before(t))
        back.append(t)
    assert back == got[-2::-1]


# ---------------------------------------------------------------------------
# Window
# ---------------------------------------------------------------------------


def test_window_start_is_inclusive_and_nothing_before():
    s = parse_schedule(frqcd="DL", frqhh=8, strtdt="2026-02-10 08:00", tz="Europe/Berlin")
    assert first(s, local(UTC, 2020, 1, 1), 1) == ["2026-02-10T08:00:00+01:00"]
    assert last_at_or_before(s, local(BERLIN, 2026, 2, 10, 7, 59)) is None


def test_enddt_as_date_covers_the_whole_day():
    for end in (date(2026, 1, 10), datetime(2026, 1, 10), "2026-01-10"):
        s = parse_schedule(frqcd="DL", frqhh=23, frqmi=59, enddt=end, tz="America/New_York")
        got = occurrences(s, local(NEW_YORK, 2026, 1, 8), limit=10)
        assert iso(got) == ["2026-01-08T23:59:00-05:00", "2026-01-09T23:59:00-05:00", "2026-01-10T23:59:00-05:00"]
        assert next_after(s, got[-1]) is None


def test_enddt_timestamp_is_inclusive():
    s = parse_schedule(frqcd="DL", frqhh=12, enddt="2026-01-10 12:00", tz="UTC")
    assert occurrences(s, local(UTC, 2026, 1, 9), limit=5)[-1] == local(UTC, 2026, 1, 10, 12)
    s = parse_schedule(frqcd="DL", frqhh=12, frqmi=1, enddt="2026-01-10 12:00", tz="UTC")
    assert occurrences(s, local(UTC, 2026, 1, 9), limit=5)[-1] == local(UTC, 2026, 1, 9, 12, 1)


def test_enddt_same_day_as_strtdt_is_valid_in_date_form():
    s = parse_schedule(frqcd="DL", frqhh=18, strtdt="2026-01-10 09:00", enddt="2026-01-10", tz="UTC")
    assert iso(occurrences(s, local(UTC, 2026, 1, 1), limit=5)) == ["2026-01-10T18:00:00+00:00"]


def test_occurrences_until_is_inclusive_and_needs_a_bound():
    s = parse_schedule(frqcd="DL", tz="UTC")
    got = occurrences(s, local(UTC, 2026, 1, 1), until=local(UTC, 2026, 1, 3))
    assert iso(got) == ["2026-01-02T00:00:00+00:00", "2026-01-03T00:00:00+00:00"]
    with pytest.raises(ValueError):
        occurrences(s, local(UTC, 2026, 1, 1))


def test_naive_after_is_rejected():
    s = parse_schedule(frqcd="DL", tz="UTC")
    with pytest.raises(ValueError):
        next_after(s, datetime(2026, 1, 1))


# ---------------------------------------------------------------------------
# DST edges
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tz,day,hh,mi,expected",
    [
        # spring forward: the nonexistent time fires once at the first instant after the gap
        ("Europe/Berlin", date(2026, 3, 29), 2, 30, "2026-03-29T03:00:00+02:00"),
        ("Europe/Berlin", date(2026, 3, 29), 2, 0, "2026-03-29T03:00:00+02:00"),
        ("America/New_York", date(2026, 3, 8), 2, 30, "2026-03-08T03:00:00-04:00"),
        # fall back: the repeated time fires once, at its first occurrence
        ("Europe/Berlin", date(2026, 10, 25), 2, 30, "2026-10-25T02:30:00+02:00"),
        ("America/New_York", date(2026, 11, 1), 1, 30, "2026-11-01T01:30:00-04:00"),
    ],
)
def test_daily_on_transition_days(tz, day, hh, mi, expected):
    s = parse_schedule(frqcd="DL", frqhh=hh, frqmi=mi, tz=tz)
    zone = ZoneInfo(tz)
    got = occurrences(s, datetime.combine(day - timedelta(days=2), time(12), tzinfo=zone), limit=3)
    assert got[1].isoformat() == expected
    assert got[0].date() == day - timedelta(days=1) and got[2].date() == day + timedelta(days=1)
    assert got[0].time() == got[2].time() == time(hh, mi)


def test_resolve_local_rule():
    assert resolve_local(datetime(2026, 3, 29, 2, 30), BERLIN).isoformat() == "2026-03-29T03:00:00+02:00"
    assert resolve_local(datetime(2026, 10, 25, 2, 30), BERLIN).isoformat() == "2026-10-25T02:30:00+02:00"
    assert resolve_local(datetime(2026, 7, 1, 12, 0), BERLIN).isoformat() == "2026-07-01T12:00:00+02:00"


def test_cron_times_inside_the_gap_collapse_to_one_firing():
    s = parse_schedule(frqcd="CRON", cronexp="*/15 * * * *", tz="Europe/Berlin")
    assert first(s, local(BERLIN, 2026, 3, 29, 1, 30), 4) == [
        "2026-03-29T01:45:00+01:00",
        "2026-03-29T03:00:00+02:00",  # 02:00..02:45 and 03:00 itself: one firing
        "2026-03-29T03:15:00+02:00",
        "2026-03-29T03:30:00+02:00",
    ]
    assert count_between(s, local(BERLIN, 2026, 3, 29, 1, 30), local(BERLIN, 2026, 3, 29, 3, 30)) == 4


def test_cron_fall_back_hour_fires_once_per_wall_time():
    s = parse_schedule(frqcd="CRON", cronexp="*/30 * * * *", tz="America/New_York")
    assert first(s, local(NEW_YORK, 2026, 11, 1, 0, 30), 4) == [
        "2026-11-01T01:00:00-04:00",
        "2026-11-01T01:30:00-04:00",
        "2026-11-01T02:00:00-05:00",  # the second pass of 01:xx does not fire again
        "2026-11-01T02:30:00-05:00",
    ]


def test_query_inside_second_pass_of_fall_back():
    s = parse_schedule(frqcd="CRON", cronexp="*/30 * * * *", tz="Europe/Berlin")
    q = local(BERLIN, 2026, 10, 25, 2, 15, fold=1)  # 01:15 UTC, after 02:30+02:00 (00:30 UTC)
    assert next_after(s, q).isoformat() == "2026-10-25T03:00:00+01:00"
    assert last_at_or_before(s, q).isoformat() == "2026-10-25T02:30:00+02:00"


@pytest.mark.parametrize(
    "tz,after,expected",
    [
        (
            "Europe/Berlin",
            local(BERLIN, 2026, 3, 29, 0, 30),
            ["01:30:00+01:00", "03:00:00+02:00", "03:30:00+02:00", "04:30:00+02:00"],
        ),
        (
            "Europe/Berlin",
            local(BERLIN, 2026, 10, 25, 0, 45),
            ["01:30:00+02:00", "02:30:00+02:00", "03:30:00+01:00", "04:30:00+01:00"],
        ),
        (
            "America/New_York",
            local(NEW_YORK, 2026, 3, 8, 0, 45),
            ["01:30:00-05:00", "03:00:00-04:00", "03:30:00-04:00", "04:30:00-04:00"],
        ),
        (
            "America/New_York",
            local(NEW_YORK, 2026, 11, 1, 0, 45),
            ["01:30:00-04:00", "02:30:00-05:00", "03:30:00-05:00", "04:30:00-05:00"],
        ),
    ],
)
def test_id_hourly_across_both_transitions(tz, after, expected):
    s = parse_schedule(frqcd="ID", frqhh=0, frqmi=30, tz=tz)
    got = occurrences(s, after, limit=4)
    assert [g.isoformat()[11:] for g in got] == expected


def test_id_hourly_at_minute_zero_does_not_double_fire_after_gap():
    s = parse_schedule(frqcd="ID", frqhh=5, frqmi=0, tz="Europe/Berlin")
    got = occurrences(s, local(BERLIN, 2026, 3, 29, 0, 30), limit=3)
    assert iso(got) == ["2026-03-29T01:00:00+01:00", "2026-03-29T03:00:00+02:00", "2026-03-29T04:00:00+02:00"]


# ---------------------------------------------------------------------------
# Invalid rows
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row,field,fragment",
    [
        (dict(frqcd="XX"), "frqcd", "'XX'"),
        (dict(frqcd=None), "frqcd", "required"),
        (dict(frqcd="MN", frqdd=32), "frqdd", "frqdd 32 out of range 1..31 for MN"),
        (dict(frqcd="MN", frqdd="0"), "frqdd", "out of range"),
        (dict(frqcd="MN", frqdd="MON"), "frqdd", "'MON'"),
        (dict(frqcd="MN"), "frqdd", "required"),
        (dict(frqcd="WK", frqdd="5"), "frqdd", "MON..SUN"),
        (dict(frqcd="WK", frqdd="MONDAY"), "frqdd", "MON..SUN"),
        (dict(frqcd="FN", frqdd="MON"), "strtdt", "required"),
        (dict(frqcd="HY", frqdd=1), "strtdt", "required"),
        (dict(frqcd="YR", frqdd=1), "strtdt", "required"),
        (dict(frqcd="ID", frqmi=10), "strtdt", "required"),
        (dict(frqcd="DL", frqhh=24), "frqhh", "frqhh 24 out of range 0..23"),
        (dict(frqcd="DL", frqhh=-1), "frqhh", "out of range"),
        (dict(frqcd="DL", frqhh="7x"), "frqhh", "not an integer"),
        (dict(frqcd="DL", frqhh=True), "frqhh", "not an integer"),
        (dict(frqcd="DL", frqmi=60), "frqmi", "frqmi 60 out of range 0..59"),
        (dict(frqcd="ID", frqhh=3, frqmi=60), "frqmi", "0..59"),
        (dict(frqcd="ID", frqmi=0, strtdt="2026-01-01"), "frqmi", "1..1439"),
        (dict(frqcd="ID", frqmi=1440, strtdt="2026-01-01"), "frqmi", "1..1439"),
        (dict(frqcd="ID", strtdt="2026-01-01"), "frqmi", "required"),
        (dict(frqcd="CRON"), "cronexp", "required"),
        (dict(frqcd="CRON", cronexp="* * * *"), "cronexp", "5 fields"),
        (dict(frqcd="CRON", cronexp="0 0 * * * * 2030"), "cronexp", "5 fields"),
        (dict(frqcd="CRON", cronexp="61 * * * *"), "cronexp", "not a valid cron"),
        (dict(frqcd="CRON", cronexp="0 0 * * 8"), "cronexp", "not a valid cron"),
        (dict(frqcd="CRON", cronexp="0 0 31 2 *"), "cronexp", "never fires"),
        (dict(frqcd="CRON", cronexp="H 3 * * *"), "cronexp", "H, R"),
        (dict(frqcd="CRON", cronexp="R 3 * * *"), "cronexp", "H, R"),
        (dict(frqcd="DL", strtdt="2026-02-01", enddt="2026-01-31 10:00"), "enddt", "before strtdt"),
        (dict(frqcd="DL", strtdt="2026-02-01 10:00", enddt="2026-01-31"), "enddt", "before strtdt"),
        (dict(frqcd="DL", strtdt="yesterday"), "strtdt", "not an ISO"),
        (dict(frqcd="DL", tz="Mars/Olympus"), "tz", "'Mars/Olympus'"),
        (dict(frqcd="DL", tz=""), "tz", "IANA"),
    ],
)
def test_invalid_rows_name_the_field(row, field, fragment):
    with pytest.raises(InvalidSchedule) as info:
        parse_schedule(**row)
    assert isinstance(info.value, ValueError)
    assert info.value.field == field
    assert str(info.value).startswith(field)
    assert fragment in str(info.value)


def test_normalisation():
    s = parse_schedule(frqcd=" wk ", frqdd=" fri ", frqhh="08", frqmi=None, cronexp="ignored", tz="Europe/Berlin")
    assert (s.frqcd, s.frqdd, s.frqhh, s.frqmi, s.cronexp) == ("WK", "FRI", 8, 0, None)
    c = parse_schedule(frqcd="cron", cronexp="0 1 * * *", frqhh=99, frqdd="junk")
    assert (c.frqdd, c.frqhh, c.frqmi, c.tz) == (None, None, None, ZoneInfo("UTC"))
    e = parse_schedule(frqcd="ID", frqmi="15", strtdt=date(2026, 1, 1))
    assert (e.frqhh, e.frqmi, e.strtdt) == (None, 15, datetime(2026, 1, 1))


def test_parse_misfire():
    assert parse_misfire(None) is Misfire.LATEST
    assert parse_misfire("") is Misfire.LATEST
    assert parse_misfire(" all ") is Misfire.ALL
    assert parse_misfire("SKIP") is Misfire.SKIP
    with pytest.raises(InvalidSchedule) as info:
        parse_misfire("SOMETIMES")
    assert info.value.field == "misfire"


# ---------------------------------------------------------------------------
# plan_due examples
# ---------------------------------------------------------------------------

HOURLY = parse_schedule(frqcd="ID", frqhh=0, frqmi=0, tz="UTC")
NOW = local(UTC, 2026, 1, 1, 12, 0, 30)


@pytest.mark.parametrize(
    "policy,enqueued,skipped",
    [
        (Misfire.LATEST, ["11:00", "12:00"], 5),
        (Misfire.SKIP, ["12:00"], 6),
        (Misfire.ALL, ["09:00", "10:00", "11:00", "12:00"], 3),
    ],
)
def test_plan_due_policies(policy, enqueued, skipped):
    # due: 06:00 .. 12:00 (05:00 already ran); 12:00 is on time, the six before it misfired
    plan = plan_due(HOURLY, last_done=local(UTC, 2026, 1, 1, 5), now=NOW, misfire=policy, max_catch_up=3)
    assert [t.strftime("%H:%M") for t in plan.to_enqueue] == enqueued
    assert plan.skipped == skipped
    assert plan.next_due == local(UTC, 2026, 1, 1, 13)


def test_plan_due_new_schedule_does_not_replay_history():
    plan = plan_due(HOURLY, last_done=None, now=NOW, misfire=Misfire.ALL)
    assert plan == plan_due(HOURLY, last_done=NOW - timedelta(seconds=60), now=NOW, misfire=Misfire.ALL)
    assert [t.strftime("%H:%M") for t in plan.to_enqueue] == ["12:00"] and plan.skipped == 0
    quiet = plan_due(HOURLY, last_done=None, now=NOW + timedelta(minutes=5), misfire="LATEST")
    assert quiet.to_enqueue == () and quiet.skipped == 0


def test_plan_due_grace_boundary():
    # exactly `grace` old counts as misfired; younger is on time
    at = local(UTC, 2026, 1, 1, 12)
    late = plan_due(HOURLY, last_done=at - TICK, now=at + timedelta(seconds=60), misfire=Misfire.SKIP)
    assert late.to_enqueue == () and late.skipped == 1
    ok = plan_due(HOURLY, last_done=at - TICK, now=at + timedelta(seconds=59), misfire=Misfire.SKIP)
    assert ok.to_enqueue == (at,) and ok.skipped == 0


def test_plan_due_after_window_end():
    s = parse_schedule(frqcd="DL", frqhh=1, enddt="2026-01-03", tz="UTC")
    plan = plan_due(s, last_done=local(UTC, 2026, 1, 1, 2), now=local(UTC, 2026, 2, 1), misfire="ALL")
    assert iso(list(plan.to_enqueue)) == ["2026-01-02T01:00:00+00:00", "2026-01-03T01:00:00+00:00"]
    assert plan.skipped == 0 and plan.next_due is None


@pytest.mark.parametrize(
    "row,per_day",
    [
        (dict(frqcd="CRON", cronexp="* * * * *", tz="Europe/Berlin"), 1440),
        (dict(frqcd="ID", frqmi=1, strtdt="2000-01-01", tz="America/New_York"), 1440),
        (dict(frqcd="CRON", cronexp="* * * * * *", tz="UTC"), 86400),
    ],
)
def test_plan_due_years_behind_is_fast_and_exact(row, per_day):
    s = parse_schedule(**row)
    # Ten years behind, counted exactly without enumerating millions of firings.
    last_done = local(UTC, 2016, 1, 1)
    now = local(UTC, 2026, 1, 1)
    started = clock.perf_counter()
    plan = plan_due(s, last_done=last_done, now=now, misfire=Misfire.ALL, max_catch_up=5, grace=timedelta(0))
    elapsed = clock.perf_counter() - started
    assert elapsed < 1.0
    days = (now - last_done).days
    expected = days * per_day
    if row["tz"] == "Europe/Berlin":
        # each spring gap folds 02:00..02:59 into 03:00 (which fires anyway);
        # the repeated autumn hour adds nothing
        expected -= 10 * 60
    assert plan.skipped + len(plan.to_enqueue) == expected
    assert len(plan.to_enqueue) == 5 and plan.to_enqueue[-1] == now


# ---------------------------------------------------------------------------
# Hypothesis properties
# ---------------------------------------------------------------------------

ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "America/Santiago"]
# Instants right around DST transitions, where the bugs live.
TRANSITIONS = [
    local(BERLIN, 2026, 3, 29, 1, 0).astimezone(UTC),
    local(BERLIN, 2026, 10, 25, 1, 0, fold=1).astimezone(UTC),
    datetime(2026, 3, 8, 7, 0, tzinfo=UTC),  # New York spring
    datetime(2026, 11, 1, 6, 0, tzinfo=UTC),  # New York fall
    datetime(2026, 4, 4, 15, 0, tzinfo=UTC),  # Lord Howe fall back 30 min
    datetime(2026, 10, 3, 15, 30, tzinfo=UTC),  # Lord Howe spring 30 min
    datetime(2026, 4, 5, 3, 0, tzinfo=UTC),  # Santiago fall back at midnight
    datetime(2026, 9, 6, 4, 0, tzinfo=UTC),  # Santiago spring forward at midnight
]

walls = st.datetimes(min_value=datetime(2025, 6, 1), max_value=datetime(2027, 6, 1))
hours = st.one_of(st.none(), st.integers(0, 23))
minutes = st.one_of(st.none(), st.integers(0, 59))


@st.composite
def schedules(draw) -> Schedule:
    code = draw(st.sampled_from(["DL", "WK", "FN", "MN", "HY", "YR", "IDH", "IDE", "CRON"]))
    row: dict = {"tz": draw(st.sampled_from(ZONES))}
    start = draw(st.one_of(st.none(), walls)) if code in ("DL", "WK", "MN", "IDH", "CRON") else draw(walls)
    if start is not None:
        row["strtdt"] = start
        if draw(st.booleans()):
            end = start + timedelta(minutes=draw(st.integers(0, 600 * 1440)))
            row["enddt"] = end.date() if draw(st.booleans()) else end
    if code == "IDH":
        row.update(frqcd="ID", frqhh=draw(st.integers(0, 23)), frqmi=draw(minutes))
    elif code == "IDE":
        row.update(frqcd="ID", frqmi=draw(st.integers(1, 1439)))
    elif code == "CRON":
        row.update(frqcd="CRON", cronexp=draw(st.sampled_from(CRON_SAMPLES)))
    else:
        row.update(frqcd=code, frqhh=draw(hours), frqmi=draw(minutes))
        if code in ("WK", "FN"):
            row["frqdd"] = draw(st.sampled_from(["MON", "TUE", "WED", "THU", "FRI", "SAT", "SUN"]))
        elif code in ("MN", "HY", "YR"):
            row["frqdd"] = draw(st.integers(1, 31))
    return parse_schedule(**row)


instants = st.one_of(
    st.datetimes(min_value=datetime(2025, 1, 1), max_value=datetime(2028, 1, 1), timezones=st.just(UTC)),
    st.builds(
        lambda t, secs: t + timedelta(seconds=secs),
        st.sampled_from(TRANSITIONS),
        st.integers(-3 * 3600, 3 * 3600),
    ),
)

PROPS = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def in_window(s: Schedule, t: datetime) -> bool:
    if s.strtdt is not None and t.astimezone(UTC) < resolve_local(s.strtdt, s.tz).astimezone(UTC):
        return False
    if s.enddt is not None:
        if s.enddt.time() == time(0):
            return t.astimezone(UTC) < resolve_local(s.enddt + timedelta(days=1), s.tz).astimezone(UTC)
        return t.astimezone(UTC) <= resolve_local(s.enddt, s.tz).astimezone(UTC)
    return True


@PROPS
@given(s=schedules(), after=instants, frac=st.floats(0, 1, exclude_max=True))
def test_next_after_properties(s, after, frac):
    r = next_after(s, after)
    if r is None:
        # nothing left: the window is over (all our schedules fire at least every 8 years)
        assert s.enddt is not None
        assert next_after(s, after + timedelta(days=1)) is None
        return
    assert r.tzinfo is s.tz
    assert r.astimezone(UTC) > after
    assert in_window(s, r)
    # nothing fires in (after, r)
    before = last_at_or_before(s, just_before(r))
    assert before is None or before.astimezone(UTC) <= after
    assert last_at_or_before(s, r) == r
    # the answer is stable for any query point in [after, r)
    x = min(after + (r.astimezone(UTC) - after) * frac, just_before(r))  # float rounding may reach r
    assert next_after(s, x) == r
    assert next_after(s, just_before(r)) == r


@PROPS
@given(s=schedules(), after=instants, n=st.integers(1, 12))
def test_occurrences_strictly_increasing_and_equal_to_repeated_next_after(s, after, n):
    got = occurrences(s, after, limit=n)
    assert len(got) <= n
    utc = [g.astimezone(UTC) for g in got]
    assert all(a < b for a, b in zip(utc, utc[1:]))
    assert len(set(utc)) == len(utc)
    expected, q = [], after
    for _ in range(n):
        q = next_after(s, q)
        if q is None:
            break
        expected.append(q)
    assert got == expected
    # and walking backwards visits the same instants
    if got:
        back, t = [got[-1]], got[-1]
        while len(back) < len(got):
            t = last_at_or_before(s, just_before(t))
            back.append(t)
        assert back[::-1] == got


@PROPS
@given(s=schedules(), after=instants, span=st.integers(0, 36 * 3600))
def test_count_between_matches_enumeration(s, after, span):
    until = after + timedelta(seconds=span)
    assert count_between(s, after, until) == len(occurrences(s, after, until=until, limit=100_000))


@PROPS
@given(
    s=schedules(),
    now=instants,
    behind=st.integers(0, 48 * 3600),
    grace_s=st.integers(0, 3 * 3600),
    policy=st.sampled_from(list(Misfire)),
    max_catch_up=st.integers(0, 6),
    fresh=st.booleans(),
)
def test_plan_due_invariants(s, now, behind, grace_s, policy, max_catch_up, fresh):
    grace = timedelta(seconds=grace_s)
    last_done = None if fresh else now - timedelta(seconds=behind)
    lower = now - grace if last_done is None else last_done
    plan = plan_due(s, last_done=last_done, now=now, misfire=policy, max_catch_up=max_catch_up, grace=grace)

    due = [t.astimezone(UTC) for t in occurrences(s, lower, until=now, limit=1_000_000)]
    on_time = [t for t in due if t > now - grace]
    missed = [t for t in due if t <= now - grace]
    got = [t.astimezone(UTC) for t in plan.to_enqueue]

    assert all(lower < t <= now for t in got)
    assert all(a < b for a, b in zip(got, got[1:]))  # sorted, no duplicates
    assert set(got) <= set(due)
    assert set(on_time) <= set(got)
    late = [t for t in got if t <= now - grace]
    if policy is Misfire.SKIP:
        assert late == []
    elif policy is Misfire.LATEST:
        assert late == missed[-1:]
    else:
        assert late == (missed[-max_catch_up:] if max_catch_up else [])
    assert len(got) + plan.skipped == len(due)
    assert plan.next_due == next_after(s, now)
    if last_done is None:
        assert plan.skipped == 0
