"""What the console and the CLI's ``requests``/``schedule list`` commands read: the read model.

Every function takes a SQLAlchemy ``Connection`` and returns plain dicts and lists (the pages
render them, ``?format=json`` and ``--json`` print them). Each query is shaped to stay cheap
at a million rows: unfinished rows are counted through the status index, the request list is
keyset-paged on ``(requested_at, request_id)`` with an index per filter (V004), an execution
history is read through ``(mapref, strtdt)`` newest first with a limit, and nothing reads the
finished history as a whole. Times come from and are compared with the database clock.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .. import schema as s
from ..client import ACTIVE_STATUSES, clock
from ..config import SECRET_NAME, mask_url
from ..drivers.base import LEADER_NAME
from ..schedule.calculus import InvalidSchedule, occurrences, parse_schedule
from .words import describe

STATUSES = (s.NEW, s.CLAIMED, s.PROCESSING, s.DONE, s.FAILED, s.CANCELLED)
PAGE_DEFAULT, PAGE_MAX = 50, 500
RUNS_FOR_STATS = 100       # executions per job behind its success rate and percentiles
ERRORS_PER_REQUEST = 200   # DMS_JOBERR rows shown on a request's page


class BadFilter(ValueError):
    """A filter or cursor its author must correct; the message names the parameter."""


def db_now(conn: Connection) -> datetime:
    return conn.execute(sa.select(clock(conn))).scalar_one()


def _age(now: datetime, then: datetime | None) -> float | None:
    return None if then is None else (now - then).total_seconds()


# -- the cluster ---------------------------------------------------------------------------------
def cluster(conn: Connection, now: datetime | None = None) -> dict[str, Any]:
    """Replicas (live or dead, heartbeat age), the leader and how it leads, slots in use."""
    now = now or db_now(conn)
    w = s.worker.c
    workers = []
    for r in conn.execute(sa.select(s.worker).order_by(w.started_at, w.worker_id)).mappings():
        # Dead once past the expiry it wrote itself (heartbeat + its own rescue window): the
        # same rule rescuers follow. A row without one (an older replica) goes by 8 s silence.
        expires = r["expires_at"] or (r["heartbeat_at"] + timedelta(seconds=8))
        workers.append(dict(r, heartbeat_age_s=_age(now, r["heartbeat_at"]), live=expires >= now))
    lease = conn.execute(sa.select(s.leader).where(s.leader.c.name == LEADER_NAME)).mappings().first()
    leader = None
    if lease is not None and lease["holder"] is not None:
        holder = next((x for x in workers if x["worker_id"] == lease["holder"]), None)
        expires_in = _age(lease["expires_at"], now) if lease["expires_at"] else None
        leader = dict(lease, expires_in_s=expires_in,
                      valid=expires_in is not None and expires_in > 0 and holder is not None and holder["live"])
    live = [x for x in workers if x["live"]]
    return {
        "now": now, "workers": workers, "leader": leader,
        "slots": sum(x["slots"] or 0 for x in live), "running": sum(x["running"] or 0 for x in live),
        "live": len(live), "dead": len(workers) - len(live),
    }


def paused_jobs(conn: Connection) -> set[str]:
    return set(conn.execute(sa.select(s.job.c.mapref).where(s.job.c.paused == "Y")).scalars())


def queue(conn: Connection, now: datetime | None = None) -> dict[str, Any]:
    """Unfinished requests by status and type (one query through the status index), failures
    of the last 24 hours (a partial index of failed rows) and what waits on paused jobs."""
    now = now or db_now(conn)
    c, j = s.prcreq.c, s.job.c
    depth = conn.execute(sa.select(c.status, c.request_type, sa.func.count().label("requests"),
                                   sa.func.min(c.requested_at).label("oldest"))
                         .where(c.status.in_(ACTIVE_STATUSES)).group_by(c.status, c.request_type)).all()
    failed = conn.execute(sa.select(sa.func.count()).where(
        c.status == s.FAILED, c.completed_at >= now - timedelta(days=1))).scalar_one()
    paused = conn.execute(sa.select(j.mapref, sa.func.count(c.request_id))
                          .select_from(s.job.outerjoin(s.prcreq, sa.and_(c.mapref == j.mapref, c.status == s.NEW)))
                          .where(j.paused == "Y").group_by(j.mapref).order_by(j.mapref)).all()
    by_status = {st: 0 for st in ACTIVE_STATUSES}
    for r in depth:
        by_status[r.status] += r.requests
    oldest_new = min((r.oldest for r in depth if r.status == s.NEW and r.oldest is not None), default=None)
    return {
        "depth": [{"status": r.status, "request_type": r.request_type, "requests": r.requests,
                   "oldest_age_s": _age(now, r.oldest)} for r in sorted(depth)],
        "by_status": by_status, "failed_24h": failed, "oldest_new_age_s": _age(now, oldest_new),
        "paused": [{"mapref": m, "waiting": n} for m, n in paused],
    }


# -- requests ------------------------------------------------------------------------------------
@dataclass
class RequestFilter:
    status: str | None = None
    mapref: str | None = None
    request_type: str | None = None
    since: datetime | None = None       # naive UTC
    until: datetime | None = None
    request_id: str | None = None

    @classmethod
    def parse(cls, args: Any) -> RequestFilter:
        """From query parameters or CLI options (a mapping); raises BadFilter naming the field."""
        def text(name: str) -> str | None:
            value = args.get(name)
            return value.strip() if isinstance(value, str) and value.strip() else None

        status, rtype = text("status"), text("type")
        if status and status.upper() not in STATUSES:
            raise BadFilter(f"status {status!r} is not one of {', '.join(STATUSES)}")
        if rtype and rtype.upper() not in s.REQUEST_TYPES:
            raise BadFilter(f"type {rtype!r} is not one of {', '.join(s.REQUEST_TYPES)}")
        return cls(status=status.upper() if status else None, mapref=text("mapref"),
                   request_type=rtype.upper() if rtype else None, since=_parse_time(text("since"), "since"),
                   until=_parse_time(text("until"), "until"), request_id=text("request_id"))

    def as_params(self) -> dict[str, str]:
        out = {"status": self.status, "mapref": self.mapref, "type": self.request_type,
               "since": _iso(self.since), "until": _iso(self.until), "request_id": self.request_id}
        return {k: v for k, v in out.items() if v}


def _parse_time(raw: str | None, name: str) -> datetime | None:
    """ISO date or timestamp; with an offset it is converted, without one it is UTC."""
    if raw is None:
        return None
    try:
        value = datetime.fromisoformat(raw.replace("Z", "+00:00") if raw.endswith("Z") else raw)
    except ValueError:
        raise BadFilter(f"{name} {raw!r} is not an ISO date or timestamp (e.g. 2026-11-01T08:00Z)") from None
    if value.tzinfo is not None:
        value = value.astimezone(timezone.utc).replace(tzinfo=None)
    return value


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat(timespec="microseconds") + "Z"


def encode_cursor(requested_at: datetime, request_id: str) -> str:
    return f"{requested_at.isoformat(timespec='microseconds')}|{request_id}"


def decode_cursor(raw: str) -> tuple[datetime, str]:
    stamp, sep, rid = raw.partition("|")
    try:
        if not sep or not rid:
            raise ValueError
        return datetime.fromisoformat(stamp), rid
    except ValueError:
        raise BadFilter(f"cursor {raw!r} is not one this console gave out") from None


_LIST_COLUMNS = ("request_id", "mapref", "request_type", "status", "requested_at", "claimed_by", "claimed_at",
                 "completed_at", "attempts", "priority", "unique_key", "not_before", "jobschid", "scheduled_for")


def request_query(f: RequestFilter, *, limit: int = PAGE_DEFAULT, cursor: str | None = None) -> sa.Select:
    """The statement behind one page of the request list (``docs/console.md`` shows its plans).

    Keyset paging: the next page starts strictly after the last row's (requested_at,
    request_id), so a page costs the same at row 10 and at row 1,000,000, and rows arriving
    meanwhile do not shift it. ``requested_at <= t AND (requested_at < t OR request_id < id)``
    is a range on the index's first column that every database uses."""
    if not 1 <= limit <= PAGE_MAX:
        raise BadFilter(f"limit must be between 1 and {PAGE_MAX}")
    c = s.prcreq.c
    where = []
    if f.request_id:
        where.append(c.request_id == f.request_id)
    if f.status:
        where.append(c.status == f.status)
    if f.mapref:
        where.append(c.mapref == f.mapref)
    if f.request_type:
        where.append(c.request_type == f.request_type)
    if f.since:
        where.append(c.requested_at >= f.since)
    if f.until:
        where.append(c.requested_at <= f.until)
    if cursor:
        t, rid = decode_cursor(cursor)
        where.append(c.requested_at <= t)
        where.append(sa.or_(c.requested_at < t, c.request_id < rid))
    return (sa.select(*(c[n] for n in _LIST_COLUMNS)).where(*where)
            .order_by(c.requested_at.desc(), c.request_id.desc()).limit(limit + 1))


def request_page(conn: Connection, f: RequestFilter, *, limit: int = PAGE_DEFAULT,
                 cursor: str | None = None) -> dict[str, Any]:
    """One page of requests, newest first, and the cursor of the next page (None at the end)."""
    found = conn.execute(request_query(f, limit=limit, cursor=cursor)).mappings().all()
    more = len(found) > limit
    rows = [dict(r) for r in found[:limit]]
    paused = paused_jobs(conn) if any(r["status"] == s.NEW for r in rows) else set()
    for r in rows:
        r["paused"] = r["status"] == s.NEW and r["mapref"] in paused
    last = rows[-1] if rows else None
    return {"requests": rows, "filter": f.as_params(), "limit": limit,
            "next_cursor": encode_cursor(last["requested_at"], last["request_id"]) if more and last else None}


def _json_or_text(raw: str | None) -> Any:
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def request_detail(conn: Connection, request_id: str) -> dict[str, Any] | None:
    """The request, every execution (DMS_PRCLOG) with its DMS_JOBLOG counts and DMS_JOBERR rows,
    its job, and why it waits if it is waiting."""
    c, p, jl, je = s.prcreq.c, s.prclog.c, s.joblog.c, s.joberr.c
    row = conn.execute(sa.select(s.prcreq).where(c.request_id == request_id)).mappings().first()
    if row is None:
        return None
    now = db_now(conn)
    req = dict(row)
    req["payload_value"] = _json_or_text(req["payload"])
    req["result_value"] = _json_or_text(req["result_payload"])
    execs = [dict(e) for e in conn.execute(sa.select(s.prclog).where(p.request_id == request_id)
                                           .order_by(p.strtdt, p.prcid)).mappings()]
    ids = [e["prcid"] for e in execs]
    # By prcid: DMS_JOBLOG's counts, the first DMS_JOBERR rows, how many DMS_JOBERR rows in all.
    counts: dict[int, dict[str, Any]] = {}
    errors: dict[int, list[dict[str, Any]]] = {}
    error_total: dict[int, int] = {}
    if ids:
        for r in conn.execute(sa.select(jl.prcid, jl.srcrows, jl.trgrows, jl.errrows).where(jl.prcid.in_(ids))):
            counts[r.prcid] = dict(srcrows=r.srcrows, trgrows=r.trgrows, errrows=r.errrows)
        for r in conn.execute(sa.select(je.prcid, sa.func.count()).where(je.prcid.in_(ids)).group_by(je.prcid)):
            error_total[r[0]] = r[1]
        for err in conn.execute(sa.select(je.prcid, je.errid, je.errtyp, je.errmsg, je.dberrmsg, je.keyvalue)
                                .where(je.prcid.in_(ids)).order_by(je.prcid, je.errid).limit(ERRORS_PER_REQUEST)).mappings():
            errors.setdefault(err["prcid"], []).append(dict(err))
    for e in execs:
        e["duration_s"] = _age(e["enddt"] or now, e["strtdt"])
        e["counts"] = counts.get(e["prcid"])
        e["errors"] = errors.get(e["prcid"], [])
        e["errors_total"] = error_total.get(e["prcid"], 0)
    job = conn.execute(sa.select(s.job).where(s.job.c.mapref == req["mapref"])).mappings().first()
    return {"request": req, "executions": execs, "now": now,
            "job": dict(job, params=shown_params(job["params"])) if job else None,
            "waiting": _why_waiting(conn, req, job, now) if req["status"] == s.NEW else None}


def _why_waiting(conn: Connection, req: dict, job: Any, now: datetime) -> str:
    c = s.prcreq.c
    if req["not_before"] is not None and req["not_before"] > now:
        return f"due at its retry time, in {(req['not_before'] - now).total_seconds():.0f} s"
    if req["request_type"] in s.CONTROL_TYPES:
        return "waiting for a replica to apply it"
    if job is None:
        return f"no DMS_JOB row for {req['mapref']!r}: it will fail when a replica claims it"
    if job["paused"] == "Y":
        return f"job {req['mapref']} is paused: it waits until the job is resumed"
    if job["allow_overlap"] != "Y" and conn.execute(sa.select(c.request_id).where(
            c.excl_key == req["mapref"])).first() is not None:
        return f"another execution of {req['mapref']} is running and the job does not allow overlap"
    if not any(w["live"] for w in cluster(conn, now)["workers"]):
        return "no live replica"
    return "queued: replicas take higher priority first, then the oldest"


# -- schedules -----------------------------------------------------------------------------------
def schedules(conn: Connection, tz: str, now: datetime | None = None, upcoming: int = 5,
              jobschid: int | None = None) -> list[dict[str, Any]]:
    """Every current DMS_JOBSCH row (or the one row ``jobschid``, current or an old version):
    its code in words, its next ``upcoming`` occurrences in ``tz`` (the calculus of ``schedule
    preview``), its last run, and why it is skipped if it is."""
    now = now or db_now(conn)
    j = s.jobsch.c
    zone = ZoneInfo(tz)
    out = []
    which = j.curflg == "Y" if jobschid is None else j.jobschid == jobschid
    for r in conn.execute(sa.select(s.jobsch).where(which).order_by(j.mapref, j.jobschid)).mappings():
        row = dict(r)
        row.update(enabled=row["schflg"] == "Y" and row["curflg"] == "Y", current=row["curflg"] == "Y",
                   words=None, next=[], problem=None)
        if row["dpnd_jobschid"] is not None:
            row["words"] = f"after each successful occurrence of schedule {row['dpnd_jobschid']}"
        else:
            try:
                sched = parse_schedule(frqcd=row["frqcd"], frqdd=row["frqdd"], frqhh=row["frqhh"], frqmi=row["frqmi"],
                                       strtdt=row["strtdt"], enddt=row["enddt"], cronexp=row["cronexp"], tz=zone)
            except InvalidSchedule as exc:
                row["problem"] = str(exc)
            else:
                row["words"] = describe(sched)
                if row["enabled"]:
                    row["next"] = occurrences(sched, now.replace(tzinfo=timezone.utc), limit=upcoming)
        row["invalid"] = row["invalid_reason"] or row["problem"]
        row["lst_run_local"] = _local(row["lst_run_dt"], zone)
        row["nxt_run_local"] = _local(row["nxt_run_dt"], zone)
        out.append(row)
    return out


def _local(value: datetime | None, zone: ZoneInfo) -> datetime | None:
    return None if value is None else value.replace(tzinfo=timezone.utc).astimezone(zone)


# -- jobs ----------------------------------------------------------------------------------------
_URL_PASSWORD = re.compile(r"(\w[\w+.-]*://[^/@\s\"]*?:)[^/\s\"]+@")


def shown_params(raw: str | None) -> str | None:
    """``DMS_JOB.params`` as pages and ``--json`` show it: a connection URL's password and the
    value of any key named like a secret become ``***`` (docs/jobs.md allows a URL there)."""
    if raw is None:
        return None

    def hide(value: Any, key: str = "") -> Any:
        if isinstance(value, dict):
            return {k: hide(v, str(k)) for k, v in value.items()}
        if isinstance(value, list):
            return [hide(v) for v in value]
        if isinstance(value, str):
            if SECRET_NAME.search(key):
                return "***"
            if "://" in value:
                masked = mask_url(value)
                return masked if not masked.startswith("<") else _URL_PASSWORD.sub(r"\1***@", value)
        return value

    try:
        return json.dumps(hide(json.loads(raw)), ensure_ascii=False)
    except (ValueError, RecursionError):         # not JSON (the replica refuses it), or absurdly deep
        return _URL_PASSWORD.sub(r"\1***@", raw)


def _percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * q // 100))          # nearest rank
    return sorted_values[int(rank) - 1]


def job_runs(conn: Connection, mapref: str, limit: int = RUNS_FOR_STATS) -> list[dict[str, Any]]:
    """The job's latest executions, newest first, through the (mapref, strtdt) index."""
    p = s.prclog.c
    return [dict(r) for r in conn.execute(
        sa.select(p.prcid, p.request_id, p.strtdt, p.enddt, p.status, p.msg, p.attempt, p.worker_id)
        .where(p.mapref == mapref).order_by(p.strtdt.desc(), p.prcid.desc()).limit(limit)).mappings()]


def run_stats(runs: list[dict[str, Any]], now: datetime) -> dict[str, Any]:
    ended = [r for r in runs if r["enddt"] is not None]
    ok = sum(r["status"] == s.COMPLETED for r in ended)
    durations = sorted((r["enddt"] - r["strtdt"]).total_seconds() for r in ended)
    for r in runs:
        r["duration_s"] = _age(r["enddt"] or now, r["strtdt"])
    return {
        "runs": len(runs), "ended": len(ended), "completed": ok,
        "failed": sum(r["status"] == s.LOG_FAILED for r in ended),
        "stopped": sum(r["status"] == s.STOPPED for r in ended),
        "success_rate": ok / len(ended) if ended else None,
        "p50_s": _percentile(durations, 50), "p95_s": _percentile(durations, 95),
        "max_s": durations[-1] if durations else None,
        "last": runs[0] if runs else None,
    }


def _active_by_mapref(conn: Connection) -> dict[str, dict[str, int]]:
    c = s.prcreq.c
    out: dict[str, dict[str, int]] = {}
    for mapref, status, n in conn.execute(sa.select(c.mapref, c.status, sa.func.count())
                                          .where(c.status.in_(ACTIVE_STATUSES)).group_by(c.mapref, c.status)):
        bucket = out.setdefault(mapref, {"waiting": 0, "running": 0})
        bucket["waiting" if status == s.NEW else "running"] += n
    return out


def jobs(conn: Connection, runs: int = RUNS_FOR_STATS) -> list[dict[str, Any]]:
    """Every DMS_JOB with its success rate and duration percentiles over its last ``runs``
    executions, those runs (for the chart), and its waiting and running requests."""
    now = db_now(conn)
    active = _active_by_mapref(conn)
    out = []
    for r in conn.execute(sa.select(s.job).order_by(s.job.c.mapref)).mappings():
        row = dict(r, params=shown_params(r["params"]))
        row["recent"] = job_runs(conn, row["mapref"], runs)
        row["stats"] = run_stats(row["recent"], now)
        row.update(active.get(row["mapref"], {"waiting": 0, "running": 0}))
        out.append(row)
    return out


def job_detail(conn: Connection, mapref: str, tz: str, runs: int = 200) -> dict[str, Any] | None:
    row = conn.execute(sa.select(s.job).where(s.job.c.mapref == mapref)).mappings().first()
    if row is None:
        return None
    now = db_now(conn)
    job = dict(row, params=shown_params(row["params"]))
    job["recent"] = job_runs(conn, mapref, runs)
    job["stats"] = run_stats(job["recent"], now)
    job.update(_active_by_mapref(conn).get(mapref, {"waiting": 0, "running": 0}))
    job["schedules"] = [sc for sc in schedules(conn, tz, now) if sc["mapref"] == mapref]
    return job


def chart(runs: list[dict[str, Any]], width: int = 600, height: int = 120) -> dict[str, Any]:
    """Bars for an inline SVG: one per execution, oldest left, height by duration (square-root
    scale, so one slow run does not flatten the rest), class by outcome."""
    ordered = list(reversed([r for r in runs if r.get("duration_s") is not None]))
    if not ordered:
        return {"bars": [], "width": width, "height": height, "max_s": None}
    top = max(r["duration_s"] for r in ordered) or 1.0
    step = width / max(len(ordered), 1)
    bars = []
    for i, r in enumerate(ordered):
        h = max(2.0, (height - 4) * (max(r["duration_s"], 0.0) / top) ** 0.5)
        bars.append({"x": round(i * step + 1, 1), "w": round(max(step - 2, 1), 1), "y": round(height - h, 1),
                     "h": round(h, 1), "cls": {"PC": "ok", "FL": "failed", "ST": "stopped"}.get(r["status"], "running"),
                     "label": f"{r['strtdt']:%Y-%m-%d %H:%M:%S} UTC  {r['status']}  {r['duration_s']:.2f} s",
                     "request_id": r["request_id"]})
    return {"bars": bars, "width": width, "height": height, "max_s": top}


def jsonable(value: Any) -> Any:
    """For ``?format=json`` and ``--json``: UTC times as ISO-8601 with Z, aware ones with their offset."""
    if isinstance(value, datetime):
        return value.isoformat() if value.tzinfo else value.isoformat() + "Z"
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [jsonable(v) for v in value]
    return value
