"""Tests for the `schedule preview` command body (worker.schedule.preview)."""

from __future__ import annotations

import argparse
import io
import json
from datetime import datetime, timezone

import pytest

from worker.schedule.preview import add_arguments, run

UTC = timezone.utc
NOW = datetime(2026, 1, 15, 10, 7, 30, tzinfo=UTC)


def call(*argv: str, now: datetime = NOW) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="dms-worker schedule preview")
    add_arguments(parser)
    out, err = io.StringIO(), io.StringIO()
    rc = run(parser.parse_args(list(argv)), now=now, out=out, err=err)
    return rc, out.getvalue(), err.getvalue()


def test_json_lists_count_iso_strings_after_after():
    after = "2026-11-01T01:05:00-04:00"
    rc, out, err = call(
        "--frqcd", "CRON", "--cronexp", "*/10 * * * *", "--tz", "America/New_York",
        "--after", after, "--count", "9", "--json",
    )  # fmt: skip
    assert rc == 0 and err == ""
    values = json.loads(out)
    assert isinstance(values, list) and len(values) == 9
    parsed = [datetime.fromisoformat(v) for v in values]
    assert all(p.utcoffset() is not None for p in parsed)
    instants = [p.astimezone(UTC) for p in parsed]
    assert instants[0] > datetime.fromisoformat(after)
    assert all(a < b for a, b in zip(instants, instants[1:]))
    # the fall-back hour's second pass does not repeat 01:10..01:50
    assert values[:6] == [f"2026-11-01T01:{m}0:00-04:00" for m in range(1, 6)] + ["2026-11-01T02:00:00-05:00"]


def test_default_after_is_now_and_count_defaults_to_ten():
    rc, out, _ = call("--frqcd", "ID", "--frqmi", "15", "--strtdt", "2026-01-01", "--json")
    values = [datetime.fromisoformat(v) for v in json.loads(out)]
    assert rc == 0 and len(values) == 10
    assert values[0] == datetime(2026, 1, 15, 10, 15, tzinfo=UTC)


def test_text_output_across_spring_forward():
    rc, out, err = call(
        "--frqcd", "DL", "--frqhh", "2", "--frqmi", "30", "--tz", "Europe/Berlin",
        "--after", "2026-03-28T12:00", "--count", "2",
    )  # fmt: skip
    assert rc == 0 and err == ""
    assert out.splitlines() == ["2026-03-29T03:00:00+02:00  Sun", "2026-03-30T02:30:00+02:00  Mon"]


def test_naive_after_is_local_to_tz_with_the_gap_rule():
    # 02:30 does not exist on 29 March in Berlin: it means 03:00+02:00, which is
    # exactly that day's firing, so the first one strictly after is the next day
    rc, out, _ = call(
        "--frqcd", "DL", "--frqhh", "2", "--frqmi", "30", "--tz", "Europe/Berlin",
        "--after", "2026-03-29T02:30", "--count", "1", "--json",
    )  # fmt: skip
    assert rc == 0 and json.loads(out) == ["2026-03-30T02:30:00+02:00"]


def test_window_end_prints_what_there_is_and_notes_it():
    argv = ("--frqcd", "WK", "--frqdd", "mon", "--enddt", "2026-02-02", "--after", "2026-01-10T00:00:00Z")
    rc, out, err = call(*argv)
    assert rc == 0
    assert out.splitlines() == [
        "2026-01-12T00:00:00+00:00  Mon",
        "2026-01-19T00:00:00+00:00  Mon",
        "2026-01-26T00:00:00+00:00  Mon",
        "2026-02-02T00:00:00+00:00  Mon",
    ]
    assert err.startswith("note:") and len(err.splitlines()) == 1
    rc, out, err = call(*argv, "--json")
    assert rc == 0 and err == "" and len(json.loads(out)) == 4


@pytest.mark.parametrize(
    "argv,message",
    [
        (("--frqcd", "MN", "--frqdd", "32"), "error: --frqdd 32 out of range 1..31 for MN"),
        (("--frqcd", "DL", "--frqhh", "24"), "error: --frqhh 24 out of range 0..23 for DL"),
        (("--frqcd", "ZZ"), "error: --frqcd 'ZZ'"),
        (("--frqcd", "CRON", "--cronexp", "61 * * * *"), "error: --cronexp '61 * * * *' is not a valid"),
        (("--frqcd", "DL", "--tz", "Mars/Base"), "error: --tz 'Mars/Base' is not a known IANA time zone"),
        (("--frqcd", "DL", "--count", "ten"), "error: --count 'ten' is not an integer"),
        (("--frqcd", "DL", "--count", "0"), "error: --count 0 out of range"),
        (("--frqcd", "DL", "--after", "soon"), "error: --after 'soon' is not an ISO timestamp"),
        (("--frqcd", "FN", "--frqdd", "MON", "--strtdt", "2026-13-01"), "error: --strtdt '2026-13-01' is not"),
        (("--frqcd", "FN", "--frqdd", "MON"), "error: --strtdt is required for FN"),
    ],
)
def test_bad_values_print_one_error_line_and_return_2(argv, message):
    rc, out, err = call(*argv)
    assert rc == 2
    assert out == ""
    assert len(err.splitlines()) == 1
    assert err.startswith(message)
