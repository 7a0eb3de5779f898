"""A replica's Prometheus metrics and its small HTTP endpoint (/metrics, /healthz, /readyz).

This module owns the metric names, labels and buckets (``metrics/alerts.yml`` and
``metrics/grafana-dashboard.json`` are written against them), and the HTTP server that exposes
them. It owns no database access: the service reports what happened through ``Metrics``'s
methods, and supplies the readiness check to ``serve``.

Every ``Metrics`` has its own ``CollectorRegistry`` (never the process-global one), so several
replicas embedded in one process, or tests, do not share or collide on series.

The methods run in the replica's control loop: each is a few dictionary look-ups and lock-free
or briefly locked arithmetic. Anything that costs more (heartbeat age, the queue snapshot) is
computed when Prometheus scrapes, not when the service reports.
"""
from __future__ import annotations

import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import cast

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from . import __version__
from . import schema as s

log = logging.getLogger("worker.metrics")

# The `*_created` companion series the client adds to every counter and histogram double the
# number of series and carry nothing a dashboard uses (process_start_time_seconds says the same).
# This switch is process-wide; the replica has no other registry that could want them.
disable_created_metrics()

OUTCOMES = ("completed", "failed", "stopped", "timeout", "handed_back")
SCHEDULE_INVALID_REASONS = ("bad_code", "bad_field", "bad_cron", "bad_window", "no_job", "job_disabled",
                            "bad_dependency", "other")
# Label values outside these fixed sets are folded into "other": a row with a garbage
# request_type or status must not mint a new time series per distinct value.
QUEUE_STATUSES = (s.NEW, s.CLAIMED, s.PROCESSING, s.DONE, s.FAILED, s.CANCELLED)
QUEUE_REQUEST_TYPES = s.REQUEST_TYPES
OTHER = "other"

# Seconds. Pickup latency and lateness: 1 ms .. 60 s (LISTEN/NOTIFY pickups are milliseconds,
# polling ones up to the poll interval, a backlog minutes: the last bucket catches those).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0,
                   30.0, 60.0)
# Execution durations: 10 ms .. 1 h.
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
                    1200.0, 1800.0, 3600.0)

QUEUE_PREFIX = "dms_queue_"


@dataclass(frozen=True)
class _QueueSnapshot:
    depth: tuple[tuple[str, str, int], ...]
    oldest_new_age_s: float | None
    running: int
    paused: int
    taken_mono: float
    taken_wall: float


# Label sets the leader always exports, at 0 when empty: a series that disappears when its
# count drops to 0 reads as "unknown" in Prometheus, and `status="NEW"` must read 0 when
# nothing waits. (Finished statuses are not counted by the leader's query at all.)
ALWAYS_EXPORTED = tuple((st, rt) for st in (s.NEW, *s.RUNNING_STATUSES) for rt in QUEUE_REQUEST_TYPES)


class _QueueCollector(Collector):
    """The leader's queue gauges, rebuilt from the latest snapshot at each scrape.

    Holding one immutable snapshot (replaced whole by ``set_queue``) rather than labelled Gauge
    children means a label set that vanished from the query is emitted as 0 (waiting and
    running statuses) or not at all (others), and a follower (no snapshot) emits no
    ``dms_queue_*`` family at all: not even zeros, which summed over N replicas would look
    like an empty queue.
    """

    def __init__(self) -> None:
        self.snapshot: _QueueSnapshot | None = None   # replaced atomically; read once per collect

    def describe(self) -> Iterable:
        # Empty: the families exist only while leading; an empty describe also tells the
        # registry not to call collect() at registration time.
        return []

    def collect(self) -> Iterable:
        snap = self.snapshot
        if snap is None:
            return
        depth = GaugeMetricFamily(f"{QUEUE_PREFIX}requests",
                                  "DMS_PRCREQ rows by status and request type (exported by the leader only)",
                                  labels=["status", "request_type"])
        counts = {key: 0 for key in ALWAYS_EXPORTED}
        counts.update({(st, rt): n for st, rt, n in snap.depth})
        for (status, request_type), count in sorted(counts.items()):
            depth.add_metric([status, request_type], count)
        yield depth
        age = snap.oldest_new_age_s or 0.0
        yield GaugeMetricFamily(f"{QUEUE_PREFIX}oldest_new_age_seconds",
                                "Age of the oldest NEW request, 0 when none waits (exported by the leader only)",
                                value=age)
        # The same fact as a point in time, so that it keeps meaning something when no leader
        # exports it any more: Prometheus can go on computing time() - last value during an
        # outage (see DmsOldestNewTooOld). With nothing waiting it is the snapshot's time.
        yield GaugeMetricFamily(f"{QUEUE_PREFIX}oldest_new_timestamp_seconds",
                                "Unix time since which the oldest NEW request waits, or of the snapshot when none"
                                " does (exported by the leader only)",
                                value=snap.taken_wall - age)
        yield GaugeMetricFamily(f"{QUEUE_PREFIX}running_executions",
                                "Executions in progress across the cluster (exported by the leader only)",
                                value=snap.running)
        yield GaugeMetricFamily(f"{QUEUE_PREFIX}paused_requests",
                                "NEW requests held back because their job is paused; not counted in the oldest NEW"
                                " age (exported by the leader only)",
                                value=snap.paused)
        yield GaugeMetricFamily(f"{QUEUE_PREFIX}snapshot_age_seconds",
                                "Seconds since the leader last refreshed the queue gauges",
                                value=max(0.0, time.monotonic() - snap.taken_mono))


class Metrics:
    """The metrics of one replica. Thread-safe; every method is cheap enough for the claim loop."""

    def __init__(self, worker_id: str) -> None:
        self.worker_id = worker_id
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # CPU, memory, open fds, start time of this process (Linux /proc; absent elsewhere).
        ProcessCollector(registry=r)

        info = Gauge("dms_worker_info", "Always 1; labels identify the replica", ["worker_id", "version"],
                     registry=r)
        info.labels(worker_id=worker_id, version=__version__).set(1)

        self._started = Counter("dms_executions_started", "Executions started", ["mapref"], registry=r)
        self._finished = Counter("dms_executions_finished", "Executions finished, by outcome",
                                 ["mapref", "outcome"], registry=r)
        self._duration = Histogram("dms_execution_duration_seconds", "Execution wall time, start to outcome",
                                   ["mapref"], buckets=DURATION_BUCKETS, registry=r)
        self._pickup = Histogram("dms_pickup_latency_seconds",
                                 "Requested (or scheduled) time to execution start",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self._claimed = Counter("dms_requests_claimed", "DMS_PRCREQ rows claimed by this replica", registry=r)
        self._retried = Counter("dms_retries", "Failed executions sent back to NEW for another attempt",
                                registry=r)
        self._rescued = Counter("dms_rescued_requests",
                                "Requests of dead replicas rescued by this replica", registry=r)
        self._stops = Counter("dms_stops_applied", "Running executions stopped by a STOP request", registry=r)
        self._timeouts = Counter("dms_timeouts", "Executions stopped for exceeding timeout_s", registry=r)
        self._db_errors = Counter("dms_db_errors", "Database errors in the control loop", registry=r)
        self._reconnects = Counter("dms_db_reconnects",
                                   "First successful database round trip after errors", registry=r)

        # Heartbeat age is read at scrape time: a replica whose control loop is stuck cannot
        # update a gauge, but the HTTP thread still answers, and the age keeps growing. Until
        # the first heartbeat it counts from creation, so a replica that never reaches the
        # database shows a growing age instead of none.
        self._last_heartbeat = time.monotonic()
        heartbeat = Gauge("dms_heartbeat_age_seconds", "Seconds since this replica's last successful heartbeat",
                          registry=r)
        heartbeat.set_function(lambda: max(0.0, time.monotonic() - self._last_heartbeat))

        self._leading = False
        self._leader_lock = threading.Lock()
        self._leader = Gauge("dms_leader", "1 while this replica holds the scheduler lease", registry=r)
        self._leader_changes = Counter("dms_leadership_changes", "Times this replica gained or lost the lease",
                                       registry=r)

        self._schedule_invalid = Counter("dms_schedule_invalid",
                                         "Invalid schedule rows skipped, counted at every reread of DMS_JOBSCH"
                                         " (rising while any row stays invalid)", ["reason"], registry=r)
        self._enqueued = Counter("dms_occurrences_enqueued", "Scheduled occurrences enqueued as requests",
                                 registry=r)
        self._lateness = Histogram("dms_occurrence_lateness_seconds", "Occurrence due time to its enqueue",
                                   buckets=LATENCY_BUCKETS, registry=r)

        self._slots_busy = Gauge("dms_execution_slots_busy", "Execution slots in use on this replica", registry=r)
        self._slots = Gauge("dms_execution_slots", "Execution slots of this replica (SCHEDULER_MAX_WORKERS)",
                            registry=r)

        self._queue = _QueueCollector()
        r.register(self._queue)

        # Series of fixed label sets exist from the start (at 0), so rate() and absent-vs-zero
        # behave from the first scrape rather than from the first event.
        for reason in SCHEDULE_INVALID_REASONS:
            self._schedule_invalid.labels(reason=reason)

    # -- executions --------------------------------------------------------------------------
    def execution_started(self, mapref: str, pickup_latency_s: float | None) -> None:
        self._started.labels(mapref=mapref).inc()
        if pickup_latency_s is not None and not math.isnan(pickup_latency_s):
            # The database clock and this host's can disagree by a little: never observe < 0.
            self._pickup.observe(max(0.0, pickup_latency_s))

    def execution_finished(self, mapref: str, outcome: str, duration_s: float) -> None:
        if outcome not in OUTCOMES:
            log.debug("unknown execution outcome %r counted as %r", outcome, OTHER)
            outcome = OTHER
        self._finished.labels(mapref=mapref, outcome=outcome).inc()
        self._duration.labels(mapref=mapref).observe(max(0.0, duration_s))

    def claimed(self, n: int) -> None:
        if n > 0:
            self._claimed.inc(n)

    def retried(self) -> None:
        self._retried.inc()

    def rescued(self, n: int) -> None:
        if n > 0:
            self._rescued.inc(n)

    def stop_applied(self) -> None:
        self._stops.inc()

    def timed_out(self) -> None:
        self._timeouts.inc()

    # -- database health ---------------------------------------------------------------------
    def db_error(self) -> None:
        self._db_errors.inc()

    def reconnected(self) -> None:
        self._reconnects.inc()

    def heartbeat_ok(self, monotonic_ts: float) -> None:
        self._last_heartbeat = monotonic_ts   # a float store: atomic, read by the scrape thread

    # -- leadership and scheduling -----------------------------------------------------------
    def set_leader(self, leading: bool) -> None:
        """Record the lease state; the transitions counter moves only on a real change.

        Losing the lease also drops the queue gauges: a former leader must not keep exporting
        a snapshot that nobody refreshes any more.
        """
        leading = bool(leading)
        with self._leader_lock:
            if leading == self._leading:
                return
            self._leading = leading
            self._leader.set(1 if leading else 0)
            self._leader_changes.inc()
        if not leading:
            self.clear_queue()

    def schedule_invalid(self, reason_code: str) -> None:
        if reason_code not in SCHEDULE_INVALID_REASONS:
            reason_code = OTHER
        self._schedule_invalid.labels(reason=reason_code).inc()

    def occurrences_enqueued(self, n: int, lateness_s: list[float]) -> None:
        if n > 0:
            self._enqueued.inc(n)
        for late in lateness_s:
            self._lateness.observe(max(0.0, late))

    # -- queue (leader only) and slots -------------------------------------------------------
    def set_queue(self, depth: list[tuple[str, str, int]], oldest_new_age_s: float | None, running: int,
                  paused: int = 0) -> None:
        """Replace the leader's queue gauges with one query's result.

        Label sets absent from ``depth`` read 0 (NEW, CLAIMED, PROCESSING) or disappear (any
        other status) at the next scrape. Unknown statuses and request types are folded into
        ``other`` so the series stay bounded.
        """
        folded: dict[tuple[str, str], int] = {}
        for status, request_type, count in depth:
            key = (status if status in QUEUE_STATUSES else OTHER,
                   request_type if request_type in QUEUE_REQUEST_TYPES else OTHER)
            folded[key] = folded.get(key, 0) + int(count)
        self._queue.snapshot = _QueueSnapshot(
            depth=tuple((st, rt, n) for (st, rt), n in sorted(folded.items())),
            oldest_new_age_s=None if oldest_new_age_s is None else max(0.0, oldest_new_age_s),
            running=int(running), paused=int(paused), taken_mono=time.monotonic(), taken_wall=time.time())

    def clear_queue(self) -> None:
        """Export no queue gauges any more (a leader stepping down)."""
        self._queue.snapshot = None

    def set_slots(self, busy: int, total: int) -> None:
        self._slots_busy.set(busy)
        self._slots.set(total)

    def exposition(self) -> bytes:
        """The Prometheus text format of this registry (what GET /metrics returns)."""
        return generate_latest(self.registry)


# -- HTTP ----------------------------------------------------------------------------------------
class MetricsServer:
    """The running endpoint: ``port`` is the bound port, ``close()`` stops it."""

    def __init__(self, httpd: ThreadingHTTPServer, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread
        # An AF_INET/AF_INET6 server's address is (host, port, ...), host a str: typeshed's type
        # also covers AF_UNIX and bytes hosts.
        self.addr: str = cast(str, httpd.server_address[0])
        self.port: int = httpd.server_address[1]

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)


class _Server(ThreadingHTTPServer):
    daemon_threads = True          # a slow scraper never holds up the replica's exit
    allow_reuse_address = True     # a restarted replica rebinds its port at once (TIME_WAIT)


class _Server6(_Server):
    address_family = socket.AF_INET6


def serve(metrics: Metrics, addr: str, port: int, ready: Callable[[], tuple[bool, str]]) -> MetricsServer | None:
    """Serve /metrics, /healthz and /readyz on ``addr:port`` in a daemon thread.

    ``port`` 0 turns the endpoint off (returns None), as DMS_METRICS_PORT=0 does; -1 binds an
    ephemeral port (tests read it from ``.port``). A port already in use raises OSError: two
    replicas configured with one port is a configuration error worth stopping for.
    """
    if port == 0:
        return None
    bind_port = 0 if port == -1 else port

    class Handler(BaseHTTPRequestHandler):
        server_version = f"dms-worker/{__version__}"

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self._respond(send_body=True)

        def do_HEAD(self) -> None:  # noqa: N802
            self._respond(send_body=False)

        def _respond(self, send_body: bool) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, metrics.exposition(), CONTENT_TYPE_LATEST, send_body)
            elif path == "/healthz":
                # Liveness: the process answers. Deliberately no database check: restarting a
                # replica because the database is down would not bring the database back.
                self._send(200, b"ok\n", "text/plain; charset=utf-8", send_body)
            elif path == "/readyz":
                try:
                    ok, reason = ready()
                except Exception as exc:  # noqa: BLE001 - a failing check means not ready
                    ok, reason = False, f"readiness check failed: {exc}"
                body = ((reason or ("ready" if ok else "not ready")) + "\n").encode()
                self._send(200 if ok else 503, body, "text/plain; charset=utf-8", send_body)
            else:
                self._send(404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain; charset=utf-8",
                           send_body)

        def _send(self, code: int, body: bytes, content_type: str, send_body: bool) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if send_body:
                self.wfile.write(body)

        def log_message(self, format: str, *args) -> None:  # noqa: A002 - stdlib signature
            # Not to stderr: a 15 s scrape would write a line per replica every 15 s.
            log.debug("%s %s", self.address_string(), format % args)

    server_cls = _Server6 if ":" in addr else _Server
    httpd = server_cls((addr, bind_port), Handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.5},
                              name="dms-metrics-http", daemon=True)
    thread.start()
    server = MetricsServer(httpd, thread)
    log.info("metrics endpoint on http://%s:%d/metrics", addr if ":" not in addr else f"[{addr}]", server.port)
    return server
