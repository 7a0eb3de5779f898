"""Turning a claimed DMS_PRCREQ row into what to run: payload, params, HISTORY days.

Pure functions over values. Anything malformed raises ``BadRequest`` with a reason a DBA can
read in ``result_payload``; the request then ends FAILED and the worker carries on.

This is also where the trust boundary is drawn. Whoever may insert requests (a web
application) is less trusted than whoever registers jobs (an operator): a request's payload,
and a schedule's params copied into it, may set only ``param1``..``param10``,
``truncate_flag``, ``as_of``, a HISTORY request's dates, and the keys the job lists in
``DMS_JOB.params.overridable``. Other keys are passed on as *unvetted*: the execution process
accepts them only if the handler itself declares them (``handler.request_keys``), and
otherwise fails the request. A request can therefore never change where a job reads or writes,
what SQL it runs or which code it loads.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any

from . import schema as s

MAX_HISTORY_DAYS = 3660
OVERRIDABLE = "overridable"            # DMS_JOB.params: payload keys a request may also set
STANDARD_KEYS = frozenset(s.PARAM_COLUMNS) | {"truncate_flag", "as_of"}
HISTORY_KEYS = frozenset({"start_date", "end_date"})


class BadRequest(ValueError):
    pass


@dataclass(frozen=True)
class Work:
    """What a job request asks for: one run, or one run per day (HISTORY)."""
    payload: dict[str, Any]
    params: dict[str, str | None]          # param1..param10
    truncate: bool
    days: tuple[date, ...] = ()             # HISTORY only, in order
    unvetted: tuple[str, ...] = ()          # payload keys only the handler itself may accept

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
    except RecursionError:
        raise BadRequest("payload is nested too deeply to be read (JSON arrays/objects within each other)") from None
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
        params[name] = None if value is None else storable_text(name, str(value))
    return params


def storable_text(name: str, value: str) -> str:
    """``value`` if a database can store it as text (it goes to DMS_PRCLOG); else BadRequest.

    JSON can spell a NUL character or half of a surrogate pair (``\\u0000``, ``\\ud800``);
    neither is text any database here accepts, and writing one would fail the whole batch.
    """
    if "\x00" in value:
        raise BadRequest(f"{name} contains a NUL character (\\u0000), which the database cannot store")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{name} contains a lone surrogate (\\ud800-\\udfff), which is not valid Unicode text") from None
    return value


def _overridable(defaults: dict[str, Any]) -> frozenset[str]:
    keys = defaults.get(OVERRIDABLE) or []
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise BadRequest(f"DMS_JOB.params.{OVERRIDABLE} must be a list of key names")
    return frozenset(keys)


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
    schedule occurrence carries the schedule's params, within the trust boundary (module doc).
    """
    defaults = defaults or {}
    requested = parse_payload(payload_text)
    allowed = STANDARD_KEYS | (HISTORY_KEYS if request_type == s.HISTORY else frozenset()) | _overridable(defaults)
    unvetted = tuple(sorted(k for k in requested if k not in allowed))
    payload = {**defaults, **requested}
    if request_type == s.IMMEDIATE:
        return Work(payload, _params(payload), _flag(payload.get("truncate_flag")), unvetted=unvetted)
    if request_type == s.HISTORY:
        start, end = _iso_date(payload, "start_date"), _iso_date(payload, "end_date")
        if end < start:
            raise BadRequest(f"end_date {end} is before start_date {start}")
        span = (end - start).days + 1
        if span > MAX_HISTORY_DAYS:
            raise BadRequest(f"HISTORY spans {span} days; at most {MAX_HISTORY_DAYS} allowed")
        days = tuple(start + timedelta(days=i) for i in range(span))
        return Work(payload, _params(payload), _flag(payload.get("truncate_flag")), days, unvetted)
    raise BadRequest(f"unknown request_type {request_type!r} (expected one of {', '.join(s.REQUEST_TYPES)})")


def stop_target(payload_text: str | None, own_id: str | None = None) -> str | None:
    payload = parse_payload(payload_text)
    target = payload.get("request_id")
    if target is not None and not isinstance(target, str):
        raise BadRequest("STOP payload request_id must be a string")
    if target is not None and target == own_id:
        raise BadRequest("a STOP request cannot target itself (payload request_id is its own id)")
    return target or None


def refused_keys(unvetted: tuple[str, ...], accepted_by_handler: tuple[str, ...] | list[str]) -> BadRequest | None:
    """The error for payload keys neither the job nor the handler lets a request set, or None."""
    refused = [k for k in unvetted if k not in set(accepted_by_handler)]
    if not refused:
        return None
    names = ", ".join(repr(k) for k in refused)
    return BadRequest(f"payload key{'s' if len(refused) > 1 else ''} {names} may not be set by a request: a request "
                      f"sets only param1..param10, truncate_flag, as_of, HISTORY's start_date/end_date and the keys "
                      f"listed in DMS_JOB.params.{OVERRIDABLE}")


def success_payload(result: Any, days_total: int, day_results: tuple[Any, ...] | list[Any],
                    params: dict[str, Any] | None) -> str | None:
    """``result_payload`` of a request that ended DONE: the handler's return value once, as a
    JSON value under ``result`` (so that SQL reads ``result_payload::json->'result'->>'rows'``);
    for HISTORY the number of days and each day's result in order. A HISTORY request resumed
    (after a rescue or a shutdown's hand-back) holds only the days this attempt ran: ``days_before_resume`` says how many
    ran earlier (their executions are in DMS_PRCLOG and DMS_JOBLOG; their return values were
    never stored)."""
    from .drivers.base import dumps
    if not days_total:
        return None if result is None else dumps({"result": result})
    day = (params or {}).get("param1")
    results = [*day_results, {"day": day, "result": result}]
    out: dict[str, Any] = {"days": days_total, "results": results}
    if len(results) < days_total:
        out["days_before_resume"] = days_total - len(results)
    return dumps(out)


def as_of_date(payload: dict[str, Any], scheduled_for: datetime | None, requested_at: datetime | None) -> date | None:
    raw = payload.get("as_of")
    if raw:
        try:
            return date.fromisoformat(str(raw)[:10])
        except ValueError:
            raise BadRequest(f"as_of {raw!r} is not an ISO date") from None
    moment = scheduled_for or requested_at
    return moment.date() if moment else None
