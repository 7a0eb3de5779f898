"""Turning a claimed DMS_PRCREQ row into what to run: payload, params, HISTORY days.

Pure functions over values. Anything malformed raises ``BadRequest`` with a reason a DBA can
read in ``result_payload``; the request then ends FAILED and the worker carries on.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from . import schema as s

MAX_HISTORY_DAYS = 3660


class BadRequest(ValueError):
    pass


@dataclass(frozen=True)
class Work:
    """What a job request asks for: one run, or one run per day (HISTORY)."""
    payload: dict[str, Any]
    params: dict[str, str | None]          # param1..param10
    truncate: bool
    days: tuple[date, ...] = ()             # HISTORY only, in order

    def params_for(self, day: date | None, first: bool) -> dict[str, Any]:
        params: dict[str, Any] = dict(self.params)
        if day is not None:
            params["param1"] = day.isoformat()
        params["truncate_flag"] = self.truncate and first
        return params


def parse_payload(text: str | None) -> dict[str, Any]:
    if text is None or not str(text).strip():
        return {}
    try:
        value = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"payload is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise BadRequest(f"payload must be a JSON object, got {type(value).__name__}")
    return value


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().upper() in ("Y", "YES", "TRUE", "1")
    return bool(value)


def _params(payload: dict[str, Any]) -> dict[str, str | None]:
    params = {}
    for name in s.PARAM_COLUMNS:
        value = payload.get(name)
        if isinstance(value, (dict, list)):
            raise BadRequest(f"{name} must be a scalar, got {type(value).__name__}")
        params[name] = None if value is None else str(value)
    return params


def _iso_date(payload: dict[str, Any], key: str) -> date:
    raw = payload.get(key)
    if raw in (None, ""):
        raise BadRequest(f"HISTORY needs {key} (ISO date, e.g. 2026-01-31)")
    try:
        return date.fromisoformat(str(raw))
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(str(raw)).date()
    except ValueError:
        raise BadRequest(f"{key} {raw!r} is not an ISO date (YYYY-MM-DD)") from None


def job_params(text: str | None, mapref: str) -> dict[str, Any]:
    """DMS_JOB.params: a JSON object of handler defaults (or nothing)."""
    try:
        return parse_payload(text)
    except BadRequest as exc:
        raise BadRequest(f"DMS_JOB.params of {mapref!r}: {exc}") from None


def plan(request_type: str, payload_text: str | None, defaults: dict[str, Any] | None = None) -> Work:
    """Validate a job request (IMMEDIATE or HISTORY) and say what to run.

    ``defaults`` (the job's params) are overridden by the request's payload, which for a
    schedule occurrence carries the schedule's params.
    """
    payload = {**(defaults or {}), **parse_payload(payload_text)}
    if request_type == s.IMMEDIATE:
        return Work(payload, _params(payload), _flag(payload.get("truncate_flag")))
    if request_type == s.HISTORY:
        start, end = _iso_date(payload, "start_date"), _iso_date(payload, "end_date")
        if end < start:
            raise BadRequest(f"end_date {end} is before start_date {start}")
        span = (end - start).days + 1
        if span > MAX_HISTORY_DAYS:
            raise BadRequest(f"HISTORY spans {span} days; at most {MAX_HISTORY_DAYS} allowed")
        days = tuple(start + timedelta(days=i) for i in range(span))
        return Work(payload, _params(payload), _flag(payload.get("truncate_flag")), days)
    raise BadRequest(f"unknown request_type {request_type!r} (expected one of {', '.join(s.REQUEST_TYPES)})")


def stop_target(payload_text: str | None) -> str | None:
    payload = parse_payload(payload_text)
    target = payload.get("request_id")
    if target is not None and not isinstance(target, str):
        raise BadRequest("STOP payload request_id must be a string")
    return target or None


def as_of_date(payload: dict[str, Any], scheduled_for: datetime | None, requested_at: datetime | None) -> date | None:
    raw = payload.get("as_of")
    if raw:
        try:
            return date.fromisoformat(str(raw)[:10])
        except ValueError:
            raise BadRequest(f"as_of {raw!r} is not an ISO date") from None
    moment = scheduled_for or requested_at
    return moment.date() if moment else None
