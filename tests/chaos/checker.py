"""The invariant checker: proves the SPEC's invariants from the tables alone.

``load(engine)`` reads DMS_PRCREQ, DMS_PRCLOG, DMS_JOBLOG, DMS_JOB, DMS_JOBSCH and the test
handlers' probe table into plain dicts; ``check(state)`` is a pure function over those rows, so
it can be proved to fail on hand-made states (tests/chaos/test_chaos.py). Nothing here trusts
the replicas' memory, logs or the chaos driver's bookkeeping, except for two optional inputs
the caller may give: the request ids whose INSERT committed (to prove no row was lost) and the
time until which every-second schedules must have fired.

The rules, one function each (the invariant name is what a violation is reported under):

``running``        no request is CLAIMED or PROCESSING (the checker runs after the replicas were
                   stopped and more than the rescue delay after any kill). NEW is allowed: queued.
``log_in_progress`` no DMS_PRCLOG row is left 'IP'.
``concurrent``     no request ran twice at once: for each request_id, its DMS_PRCLOG intervals
                   [strtdt, enddt] (database clock; an open enddt counts as +infinity) are pairwise
                   disjoint, and so are its probe intervals [started, ended] (the handler's own
                   clock, written by the handler itself; only executions that committed leave one).
``finished_twice`` executions of one request are keyed by (request_id, param1): for HISTORY that
                   is one key per day, for IMMEDIATE param1 is the same for every execution, so it
                   is the request. Several rows per key are legitimate (a failed attempt 'FL'
                   before a retry, an execution abandoned by a killed replica and closed 'FL' by
                   the rescue, one handed back 'ST' on SIGTERM or after a lost connection). The
                   rule: at most one 'PC' row per key, and no execution of that key started after
                   its 'PC' row. Also: an IMMEDIATE request has exactly one 'PC' row if DONE and
                   none otherwise; a HISTORY request has 'PC' rows only for days in its range, one
                   for every day if DONE, not for all days otherwise. At most one DMS_JOBLOG row
                   per execution and exactly one per 'PC' execution; at most one probe row per
                   execution, and exactly one per 'PC' execution of a ``tests.handlers:record`` job
                   (the bookkeeping matches what the handler really did).
``history``        a HISTORY request's 'PC' days are the first days of its range, completed in
                   order (each day's 'PC' starts after the previous day's ended: it stops at the
                   first failed day and resumes from the first day not done); its handler saw
                   truncate_flag only on the range's first day (probe rows).
``occurrence_duplicate`` no two DMS_PRCREQ rows share (jobschid, scheduled_for).
``occurrence_missing``   a CRON schedule with misfire ALL (the chaos run's are every second and
                   every other second) has an occurrence for every instant of its expression from
                   its first to its last (and up to ``ticks_until`` if given): at least once,
                   through leader kills and the restart.
``overlap``        for each job with allow_overlap = 'N', no two of its executions overlap: its
                   DMS_PRCLOG intervals are pairwise disjoint across all its requests, and so are
                   its probe intervals.
``malformed``      every request whose id starts with ``bad-<kind>-`` is FAILED with a JSON
                   result_payload whose "error" names the fault of its kind (``MALFORMED``), or,
                   if the replica that held it was killed and it had no attempt left, the rescue.
``attempts``       attempts <= the job's max_attempts (1 without a DMS_JOB row), and no request
                   has more 'FL' executions than max_attempts.
``lost_row``       every id in ``committed_ids`` exists in DMS_PRCREQ; every probe row's request
                   exists.
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from croniter import croniter

from worker import schema as s

RECORD_HANDLER = "tests.handlers:record"
EVERY_SECOND = "* * * * * *"

# Malformed rows a plain INSERT can produce: kind -> (mapref, request_type, payload, what the
# FAILED row's result_payload error must say). The maprefs are the chaos driver's jobs:
# CH_REC exists, CH_NOPE does not, CH_BADHANDLER names a module that does not exist,
# CH_DISABLED is disabled. The schema has no CHECK on request_type, so an unknown type inserts.
MALFORMED: dict[str, tuple[str, str, str | None, str]] = {
    "json": ("CH_REC", "IMMEDIATE", "{not json", "not valid JSON"),
    "notobject": ("CH_REC", "IMMEDIATE", "[1, 2]", "must be a JSON object"),
    "mapref": ("CH_NOPE", "IMMEDIATE", None, "unknown mapref 'CH_NOPE'"),
    "histmapref": ("CH_NOPE", "HISTORY", '{"start_date": "2026-01-01", "end_date": "2026-01-02"}',
                   "unknown mapref 'CH_NOPE'"),
    "type": ("CH_REC", "SOMETHING", None, "unknown request_type 'SOMETHING'"),
    "dates": ("CH_REC", "HISTORY", '{"start_date": "2026-13-01", "end_date": "2026-12-01"}', "not an ISO date"),
    "order": ("CH_REC", "HISTORY", '{"start_date": "2026-03-02", "end_date": "2026-03-01"}', "before start_date"),
    "nodates": ("CH_REC", "HISTORY", "{}", "needs start_date"),
    "span": ("CH_REC", "HISTORY", '{"start_date": "2000-01-01", "end_date": "2026-01-01"}', "at most"),
    "param": ("CH_REC", "IMMEDIATE", '{"param1": [1, 2]}', "must be a scalar"),
    "asof": ("CH_REC", "IMMEDIATE", '{"as_of": "yesterday"}', "not an ISO date"),
    "stoptarget": ("CH_REC", "STOP", '{"request_id": "does-not-exist"}', "no request 'does-not-exist'"),
    "handler": ("CH_BADHANDLER", "IMMEDIATE", None, "No module named 'no_such_module'"),
    "disabled": ("CH_DISABLED", "IMMEDIATE", None, "is disabled"),
}
RESCUE_REASON = "rescued: worker"


@dataclass
class State:
    requests: list[dict[str, Any]]
    logs: list[dict[str, Any]]
    joblogs: list[dict[str, Any]] = field(default_factory=list)
    jobs: list[dict[str, Any]] = field(default_factory=list)
    schedules: list[dict[str, Any]] = field(default_factory=list)
    probes: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Violation:
    invariant: str
    detail: str

    def __str__(self) -> str:
        return f"[{self.invariant}] {self.detail}"


@dataclass
class Result:
    violations: list[Violation]
    counts: dict[str, Any]

    @property
    def ok(self) -> bool:
        return not self.violations

    def by_invariant(self) -> Counter:
        return Counter(v.invariant for v in self.violations)


def load(engine: sa.engine.Engine) -> State:
    """Read every table the checker needs (the probe table only if it exists)."""
    with engine.connect() as conn:
        def rows(table: sa.Table, *cols: str) -> list[dict[str, Any]]:
            q = sa.select(*(table.c[c] for c in cols)) if cols else sa.select(table)
            return [dict(r) for r in conn.execute(q).mappings()]

        state = State(
            requests=rows(s.prcreq),
            logs=rows(s.prclog, "prcid", "request_id", "mapref", "strtdt", "enddt", "status", "msg", "param1",
                      "attempt", "worker_id"),
            joblogs=rows(s.joblog, "joblogid", "prcid", "mapref"),
            jobs=rows(s.job),
            schedules=rows(s.jobsch),
        )
        if sa.inspect(conn).has_table("dms_test_probe"):
            from tests.support import probe
            state.probes = rows(probe)
    return state


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def _end_key(end: Any) -> tuple:
    return (1, 0) if end is None else (0, end)          # an open interval ends after everything


def _overlaps(intervals: Iterable[tuple[Any, Any, Any]]) -> list[tuple[Any, Any]]:
    """Pairs of ids whose [start, end) intervals overlap; ``end`` None means still open.

    Touching intervals (one ends exactly when the next starts) do not overlap. Each interval
    is compared with the one reaching furthest among those that started before it."""
    items = sorted((iv for iv in intervals if iv[0] is not None), key=lambda iv: iv[0])
    found = []
    reach: tuple[Any, Any, Any] | None = None
    for start, end, ident in items:
        if reach is not None and (reach[1] is None or start < reach[1]):
            found.append((reach[2], ident))
        if reach is None or _end_key(end) > _end_key(reach[1]):
            reach = (start, end, ident)
    return found


def _json(text: str | None) -> Any:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return None


def _history_days(payload: str | None) -> list[str] | None:
    body = _json(payload)
    if not isinstance(body, dict):
        return None
    try:
        start, end = date.fromisoformat(str(body["start_date"])), date.fromisoformat(str(body["end_date"]))
    except (KeyError, ValueError):
        return None
    if end < start or (end - start).days > 3660:
        return None
    return [(start + timedelta(days=i)).isoformat() for i in range((end - start).days + 1)]


def _fmt(value: Any) -> str:
    return value.isoformat(sep=" ") if isinstance(value, datetime) else str(value)


# ---------------------------------------------------------------------------------------------
# the rules
# ---------------------------------------------------------------------------------------------
def check_running(st: State) -> list[Violation]:
    return [Violation("running", f"request {r['request_id']} ({r['mapref']}) left {r['status']} "
                                 f"by {r['claimed_by']} since {_fmt(r['claimed_at'])}")
            for r in st.requests if r["status"] in s.RUNNING_STATUSES]


def check_log_in_progress(st: State) -> list[Violation]:
    return [Violation("log_in_progress", f"DMS_PRCLOG {l['prcid']} of request {l['request_id']} ({l['mapref']}) "
                                         f"left IP by {l['worker_id']} since {_fmt(l['strtdt'])}")
            for l in st.logs if l["status"] == s.IN_PROGRESS]


def check_concurrent(st: State) -> list[Violation]:
    out = []
    by_request: dict[str, list] = defaultdict(list)
    for l in st.logs:
        by_request[l["request_id"]].append((l["strtdt"], l["enddt"], l["prcid"]))
    for rid, intervals in by_request.items():
        for a, b in _overlaps(intervals):
            out.append(Violation("concurrent", f"request {rid}: executions (DMS_PRCLOG) {a} and {b} overlap"))
    probes: dict[str, list] = defaultdict(list)
    for p in st.probes:
        probes[p["request_id"]].append((p["started"], p["ended"], p["id"]))
    for rid, intervals in probes.items():
        for a, b in _overlaps(intervals):
            out.append(Violation("concurrent", f"request {rid}: handler runs (probe rows) {a} and {b} overlap"))
    return out


def check_finished_twice(st: State) -> list[Violation]:
    out = []
    logs_by_request: dict[str, list] = defaultdict(list)
    for l in st.logs:
        logs_by_request[l["request_id"]].append(l)
    for r in st.requests:
        rid, rtype, logs = r["request_id"], r["request_type"], logs_by_request.get(r["request_id"], [])
        keyed: dict[Any, list] = defaultdict(list)
        for l in logs:
            keyed[l["param1"] if rtype == s.HISTORY else None].append(l)
        pc_keys = set()
        for key, rows in keyed.items():
            pcs = [l for l in rows if l["status"] == s.COMPLETED]
            label = f"request {rid}" + (f" day {key}" if rtype == s.HISTORY else "")
            if len(pcs) > 1:
                out.append(Violation("finished_twice", f"{label}: {len(pcs)} PC executions "
                                                       f"{sorted(l['prcid'] for l in pcs)}"))
            if pcs:
                pc_keys.add(key)
                first = min(pcs, key=lambda l: l["strtdt"])
                later = [l["prcid"] for l in rows if l is not first and l["strtdt"] > first["strtdt"]
                         and l["status"] != s.COMPLETED]
                if later:
                    out.append(Violation("finished_twice", f"{label}: executions {later} started after the "
                                                           f"completed one {first['prcid']}"))
        n_pc = sum(l["status"] == s.COMPLETED for l in logs)
        if rtype == s.IMMEDIATE:
            if r["status"] == s.DONE and n_pc != 1:
                out.append(Violation("finished_twice", f"request {rid} is DONE with {n_pc} PC executions"))
            elif r["status"] != s.DONE and n_pc:
                out.append(Violation("finished_twice",
                                     f"request {rid} is {r['status']} but has {n_pc} PC execution(s)"))
        elif rtype == s.HISTORY:
            days = _history_days(r["payload"])
            if days is not None:
                extra = pc_keys - set(days)
                if extra:
                    out.append(Violation("finished_twice",
                                         f"request {rid}: PC for days outside its range {sorted(extra)}"))
                if r["status"] == s.DONE and pc_keys != set(days):
                    out.append(Violation("finished_twice", f"request {rid} is DONE but days "
                                                           f"{sorted(set(days) - pc_keys)} have no PC execution"))
                if r["status"] != s.DONE and pc_keys >= set(days):
                    out.append(Violation("finished_twice", f"request {rid} is {r['status']} but every day has a PC"))
    # Bookkeeping rows per execution.
    joblogs = Counter(j["prcid"] for j in st.joblogs)
    probes = Counter(p["prcid"] for p in st.probes)
    handler = {j["mapref"]: j["handler"] for j in st.jobs}
    for prcid, n in joblogs.items():
        if n > 1:
            out.append(Violation("finished_twice", f"execution {prcid} has {n} DMS_JOBLOG rows"))
    for prcid, n in probes.items():
        if n > 1:
            out.append(Violation("finished_twice", f"execution {prcid} has {n} probe rows (handler ran {n} times)"))
    for l in st.logs:
        if l["status"] != s.COMPLETED:
            continue
        if joblogs.get(l["prcid"], 0) != 1:
            out.append(Violation("finished_twice", f"PC execution {l['prcid']} of {l['request_id']} has "
                                                   f"{joblogs.get(l['prcid'], 0)} DMS_JOBLOG rows"))
        if handler.get(l["mapref"]) == RECORD_HANDLER and probes.get(l["prcid"], 0) != 1:
            out.append(Violation("finished_twice", f"PC execution {l['prcid']} of {l['request_id']} has "
                                                   f"{probes.get(l['prcid'], 0)} probe rows: the handler did not "
                                                   f"run exactly once for it"))
    return out


def check_history(st: State) -> list[Violation]:
    out = []
    pcs: dict[str, dict[str, Any]] = defaultdict(dict)
    for l in st.logs:
        if l["status"] == s.COMPLETED and l["param1"] is not None:
            pcs[l["request_id"]].setdefault(l["param1"], l)
    first_day: dict[str, str] = {}
    for r in st.requests:
        if r["request_type"] != s.HISTORY:
            continue
        days = _history_days(r["payload"])
        if not days:
            continue
        first_day[r["request_id"]] = days[0]
        done = pcs.get(r["request_id"], {})
        prefix = days[:len(done)]
        if set(done) != set(prefix):
            out.append(Violation("history", f"request {r['request_id']}: completed days {sorted(done)} are not the "
                                            f"first {len(done)} day(s) of its range"))
            continue
        order = [done[d] for d in prefix]
        for a, b in zip(order, order[1:]):
            if a["enddt"] is None or b["strtdt"] < a["enddt"]:
                out.append(Violation("history", f"request {r['request_id']}: day {b['param1']} started before day "
                                                f"{a['param1']} completed"))
    for p in st.probes:
        first = first_day.get(p["request_id"])
        if p.get("truncate_flag") == "Y" and first is not None and p.get("day") != first:
            out.append(Violation("history", f"request {p['request_id']}: truncate_flag on day {p.get('day')}, "
                                            f"not only on the first day {first_day[p['request_id']]}"))
    return out


def check_occurrences(st: State, ticks_until: datetime | None = None) -> list[Violation]:
    out = []
    seen = Counter((r["jobschid"], r["scheduled_for"]) for r in st.requests
                   if r["jobschid"] is not None and r["scheduled_for"] is not None)
    for (jid, when), n in sorted(seen.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        if n > 1:
            out.append(Violation("occurrence_duplicate", f"schedule {jid} occurrence {_fmt(when)} enqueued {n} times"))
    for sch in st.schedules:
        if (sch["frqcd"] or "").upper() != "CRON" or not sch["cronexp"] \
                or (sch["misfire"] or "").upper() != "ALL" or sch["dpnd_jobschid"] is not None:
            continue
        times = sorted({when for jid, when in seen if jid == sch["jobschid"]})
        if not times:
            out.append(Violation("occurrence_missing", f"schedule {sch['jobschid']} ({sch['mapref']}) never fired"))
            continue
        last = times[-1]
        if ticks_until is not None and ticks_until > last:
            last = ticks_until
        have, missing = set(times), []
        # Every occurrence of the expression between the first and the last (UTC; croniter
        # reads a sixth field as seconds, as the SPEC says the worker does).
        it = croniter(sch["cronexp"], times[0] - timedelta(microseconds=1))
        while (t := it.get_next(datetime)) <= last:
            if t not in have:
                missing.append(t)
        if missing:
            out.append(Violation("occurrence_missing", f"schedule {sch['jobschid']} ({sch['mapref']}): "
                                                       f"{len(missing)} occurrence(s) never enqueued, first "
                                                       f"{[_fmt(m) for m in missing[:5]]}"))
    return out


def check_overlap(st: State) -> list[Violation]:
    out = []
    exclusive = {j["mapref"] for j in st.jobs if (j["allow_overlap"] or "N").upper() != "Y"}
    for mapref in sorted(exclusive):
        logs = [(l["strtdt"], l["enddt"], l["prcid"]) for l in st.logs if l["mapref"] == mapref]
        for a, b in _overlaps(logs):
            out.append(Violation("overlap",
                                 f"{mapref} (allow_overlap='N'): executions {a} and {b} overlap (DMS_PRCLOG)"))
        probes = [(p["started"], p["ended"], p["id"]) for p in st.probes if p["mapref"] == mapref]
        for a, b in _overlaps(probes):
            out.append(Violation("overlap",
                                 f"{mapref} (allow_overlap='N'): handler runs (probe rows) {a} and {b} overlap"))
    return out


def malformed_kind(request_id: str) -> str | None:
    if not request_id.startswith("bad-"):
        return None
    return request_id.split("-")[1] if request_id.count("-") >= 2 else ""


def check_malformed(st: State) -> list[Violation]:
    out = []
    for r in st.requests:
        kind = malformed_kind(r["request_id"])
        if kind is None:
            continue
        rid = r["request_id"]
        if r["status"] != s.FAILED:
            out.append(Violation("malformed", f"{rid} is {r['status']}, not FAILED"))
            continue
        body = _json(r["result_payload"])
        error = body.get("error") if isinstance(body, dict) else None
        if not isinstance(error, str) or not error.strip():
            out.append(Violation("malformed", f"{rid} FAILED without a reason: result_payload {r['result_payload']!r}"))
            continue
        expected = MALFORMED.get(kind, (None, None, None, None))[3]
        if expected is not None and expected not in error and RESCUE_REASON not in error:
            out.append(Violation("malformed", f"{rid}: reason {error!r} does not say {expected!r}"))
    return out


def check_attempts(st: State) -> list[Violation]:
    out = []
    max_attempts = {j["mapref"]: max(1, j["max_attempts"] or 1) for j in st.jobs}
    failed_runs = Counter(l["request_id"] for l in st.logs if l["status"] == s.LOG_FAILED)
    for r in st.requests:
        limit = max_attempts.get(r["mapref"], 1)
        if r["attempts"] > limit:
            out.append(Violation("attempts",
                                 f"request {r['request_id']}: attempts {r['attempts']} > max_attempts {limit}"))
        if failed_runs.get(r["request_id"], 0) > limit:
            out.append(Violation("attempts", f"request {r['request_id']}: {failed_runs[r['request_id']]} FL executions "
                                             f"> max_attempts {limit}"))
    return out


def check_lost_rows(st: State, committed_ids: Iterable[str] | None = None) -> list[Violation]:
    present = {r["request_id"] for r in st.requests}
    out = []
    if committed_ids is not None:
        lost = sorted(set(committed_ids) - present)
        if lost:
            out.append(Violation("lost_row", f"{len(lost)} committed request(s) missing from DMS_PRCREQ: {lost[:5]}"))
    orphan = sorted({p["request_id"] for p in st.probes if p["request_id"] not in present})
    if orphan:
        out.append(Violation("lost_row", f"probe rows for requests missing from DMS_PRCREQ: {orphan[:5]}"))
    return out


def counts(st: State) -> dict[str, Any]:
    malformed = [r for r in st.requests if malformed_kind(r["request_id"]) is not None]
    rescued_malformed = sum(RESCUE_REASON in (r["result_payload"] or "") for r in malformed)
    jobsch = {sch["jobschid"]: sch["mapref"] for sch in st.schedules}
    per_request = Counter(l["request_id"] for l in st.logs)
    return {
        "requests": len(st.requests),
        "requests_by_status": dict(sorted(Counter(r["status"] for r in st.requests).items())),
        "requests_by_type": dict(sorted(Counter(r["request_type"] for r in st.requests).items())),
        "executions": len(st.logs),
        "executions_by_status": dict(sorted(Counter(l["status"] for l in st.logs).items())),
        "executions_rescued": sum("heartbeat stale" in (l["msg"] or "") for l in st.logs),
        "executions_handed_back": sum(l["status"] == s.STOPPED and "STOP" not in (l["msg"] or "") for l in st.logs),
        "executions_stopped_by_stop": sum(l["status"] == s.STOPPED and "STOP" in (l["msg"] or "") for l in st.logs),
        "requests_run_more_than_once": sum(1 for n in per_request.values() if n > 1),
        "probe_rows": len(st.probes),
        "joblog_rows": len(st.joblogs),
        "malformed": len(malformed),
        "malformed_by_kind": dict(sorted(Counter(malformed_kind(r["request_id"]) for r in malformed).items())),
        "malformed_failed_by_rescue": rescued_malformed,
        "occurrences": sum(1 for r in st.requests if r["jobschid"] is not None),
        "occurrences_by_schedule": dict(sorted(Counter(
            f"{r['jobschid']}:{jobsch.get(r['jobschid'], '?')}"
            for r in st.requests if r["jobschid"] is not None).items())),
    }


def check(st: State, *, ticks_until: datetime | None = None, committed_ids: Iterable[str] | None = None) -> Result:
    violations = (check_running(st) + check_log_in_progress(st) + check_concurrent(st) + check_finished_twice(st)
                  + check_history(st) + check_occurrences(st, ticks_until) + check_overlap(st) + check_malformed(st)
                  + check_attempts(st) + check_lost_rows(st, committed_ids))
    return Result(violations, counts(st))


def format_result(result: Result, limit: int = 40) -> str:
    lines = ["invariants: " + ("all hold" if result.ok else f"{len(result.violations)} VIOLATION(S) "
                                                          f"{dict(result.by_invariant())}")]
    lines += [f"  {v}" for v in result.violations[:limit]]
    if len(result.violations) > limit:
        lines.append(f"  ... and {len(result.violations) - limit} more")
    for key, value in result.counts.items():
        lines.append(f"{key}: {value}")
    return "\n".join(lines)
