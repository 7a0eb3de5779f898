"""One replica: the loop that composes its services, and the object a program embeds.

``SchedulerService`` builds the services (``worker.services``) from the configuration and is
the only place that knows all of them. Liveness heartbeats on a thread of its own; everything
else runs in one control loop that ticks each service and then waits, on the execution
processes' pipes, the database's wake-up channel and a self-pipe (signals, ``stop()``), until
the earliest time any service said it next needs to run. A service whose tick fails backs off
on its own (the one retry policy, ``worker.retry``) while the others carry on, so one slow or
failing statement never stops the heartbeat, the completer or the executions.
"""
from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import wait as wait_any
from typing import Any

from . import __version__, logs, retry
from .config import Config, ConfigError
from .drivers import make_driver
from .drivers.base import Listener, SQLDriver, WorkerInfo
from .executor import ChildConfig, Executor
from .metrics import Metrics, MetricsServer, serve
from .scheduler import LeadershipLost, Scheduler
from .services import NEVER
from .services.completer import Completer
from .services.leadership import Leadership
from .services.liveness import Liveness
from .services.maintenance import Maintenance
from .services.producer import Producer, ProducerSettings

log = logging.getLogger("worker.service")

COMPLETER_WINDOW_S = 0.002


@dataclass
class _Backoff:
    failures: int = 0
    next_try: float = 0.0


class SchedulerService:
    """A replica. ``run()`` in the foreground (signals handled), or ``start()``/``stop()`` embedded."""

    def __init__(self, config: Config | None = None, driver: SQLDriver | None = None) -> None:
        cfg = self.config = config or Config.from_env()
        self.driver = driver or make_driver(cfg.database_url, schema=cfg.schema,
                                            statement_timeout_s=cfg.statement_timeout_s)
        self.worker_id = (cfg.worker_name or f"{socket.gethostname()}:{os.getpid()}")[:55] + ":" + secrets.token_hex(4)
        self.metrics = Metrics(self.worker_id)
        self.metrics.set_slots(0, cfg.max_workers)
        self.fence = logs.CONTEXT.Value("d", time.monotonic(), lock=False)
        self.executor = Executor(cfg.max_workers, ChildConfig(
            database_url=cfg.database_url, schema=cfg.schema, log_level=cfg.log_level, fence_s=cfg.fence_s,
            stop_grace=cfg.stop_grace, job_environment=cfg.job_environment()),
            self.fence, preload=(f"worker.drivers.{self.driver.name}",))
        self.completer = Completer(self.driver, window_s=COMPLETER_WINDOW_S)
        try:
            self.leadership = Leadership(self.driver, self.worker_id, cfg.leader_mode, cfg.leader_ttl,
                                         cfg.heartbeat_interval, on_change=self._leadership_changed)
        except ValueError as exc:
            raise ConfigError(f"DMS_LEADER_MODE: {exc}") from None
        self.scheduler = Scheduler(self.driver, cfg.timezone, cfg.refresh_interval,
                                   on_invalid=self.metrics.schedule_invalid,
                                   on_enqueued=self.metrics.occurrences_enqueued)
        self.liveness = Liveness(
            self.driver, WorkerInfo(worker_id=self.worker_id, host=socket.gethostname(), pid=os.getpid(),
                                    version=__version__, slots=cfg.max_workers, metrics_port=cfg.metrics_port or None,
                                    rescue_after_s=cfg.rescue_after),
            cfg.heartbeat_interval, self.fence, running=lambda: len(self.producer.flights),
            on_ok=self.metrics.heartbeat_ok, loop_stalled=self._loop_stalled)
        self.maintenance = Maintenance(self.driver, self.metrics, rescue_after_s=cfg.rescue_after,
                                       interval_s=cfg.heartbeat_interval, prune_interval_s=cfg.refresh_interval,
                                       retention_days=cfg.retention_days, log_retention_days=cfg.log_retention_days,
                                       fresh_for=self.liveness.fresh_for)
        self.producer = Producer(
            self.driver, self.worker_id, self.executor, self.completer, self.metrics,
            ProducerSettings(poll_interval_s=cfg.poll_interval, stop_check_s=cfg.heartbeat_interval,
                             stop_grace_s=cfg.stop_grace, retry_max_delay_s=cfg.retry_max_delay),
            leading=lambda: self.leadership.leading(time.monotonic()), on_refresh=self.scheduler.refresh_now)
        self.completer.on_lost = lambda rid: self.producer.flights.pop(rid, None)
        self.completer.on_written = self.producer.wake

        self._backoff: dict[str, _Backoff] = {}
        self._draining = self._forced = False
        self._drain_deadline: float | None = None
        self._progress = time.monotonic()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._listener: Listener | None = None
        self._next_listener = 0.0
        self._thread: threading.Thread | None = None
        self._liveness_stop = threading.Event()
        self._liveness_thread: threading.Thread | None = None
        self._stopped = threading.Event()
        self._metrics_server: MetricsServer | None = None
        self._db_down = False

    # -- lifecycle -------------------------------------------------------------------------
    def run(self) -> int:
        """Run in the foreground until SIGTERM/SIGINT (a second one forces). Returns 0."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.request_shutdown())
        self._start_http()
        self._serve()
        return 0

    def start(self) -> SchedulerService:
        """Run in a background thread (for embedding); returns at once."""
        self._start_http()
        self._thread = threading.Thread(target=self._serve, name="dms-worker", daemon=True)
        self._thread.start()
        return self

    def _start_http(self) -> None:
        try:
            self._metrics_server = serve(self.metrics, self.config.metrics_addr, self.config.metrics_port, self.ready)
        except OSError as exc:
            raise ConfigError(f"DMS_METRICS_PORT: cannot listen on {self.config.metrics_addr}:"
                              f"{self.config.metrics_port} ({exc.strerror}); give each replica its own port") from None

    def ready(self) -> tuple[bool, str]:
        """For /readyz: the database answered a recent heartbeat."""
        return self.liveness.ready(time.monotonic(), self.config.rescue_after / 2)

    def stop(self, timeout: float | None = None) -> None:
        """Graceful stop: as SIGTERM. Waits for the replica to finish, up to ``timeout``."""
        self.request_shutdown()
        self._stopped.wait(timeout)

    def request_shutdown(self, force: bool | None = None) -> None:
        """First call drains, a second call (or ``force=True``) stops executions at once."""
        if force or (force is None and self._draining):
            self._forced = True
        if not self._draining:
            self._draining = True
            self._drain_deadline = time.monotonic() + self.config.shutdown_grace
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    # -- the loop ------------------------------------------------------------------------------
    def _serve(self) -> None:
        try:
            self.executor.start()
            self._liveness_thread = self.liveness.run_in_thread(time.monotonic, self._liveness_stop,
                                                                self._liveness_error)
            announced = False
            while not self._finished():
                now = time.monotonic()
                self._progress = now
                if self.liveness.registered and not announced:
                    announced = True
                    log.info("replica %s started: %d slots, database %s", self.worker_id, self.config.max_workers,
                             self.config.safe_url)
                self._iteration(now)
                self._wait()
            self._shutdown()
        finally:
            self._stopped.set()

    def _iteration(self, now: float) -> None:
        if self.liveness.dead:
            self._abandon(now)
        self.executor.tick(now)
        if self._draining:
            self.producer.draining = True
            self._guarded("leadership", self.leadership.resign)
            if self._drain_deadline is not None and now >= self._drain_deadline:
                self._forced = True
        elif self.liveness.registered:          # a leader is a registered replica (DMS_WORKER.is_leader)
            self._run("leadership", self.leadership.tick, now)
        if self.leadership.leading(now):
            self._run("scheduler", self._schedule, now)
            self._run("maintenance", self.maintenance.tick, now)
        self._run("completer", self.completer.tick, now)     # first: what it frees, a claim can take
        if self.liveness.registered:
            self._run("producer", self.producer.tick, now)
        self._listener_upkeep(now)
        if self._listener is not None:
            self._listener.demand(0 if self._draining else self.producer.ready_slots())

    def _schedule(self, now: float) -> None:
        epoch = self.leadership.epoch
        assert epoch is not None        # _iteration schedules only while leading, i.e. holding an epoch
        try:
            self.scheduler.tick(self.worker_id, epoch, now)
        except LeadershipLost as exc:
            log.warning("%s; stepping down", exc)
            self.leadership.step_down()

    def _run(self, name: str, tick: Callable[[float], None], now: float) -> None:
        """Tick one service; on a failure that service alone backs off."""
        state = self._backoff.setdefault(name, _Backoff())
        if now < state.next_try:
            return
        try:
            tick(now)
        except Exception as exc:  # noqa: BLE001 - a replica never dies of one bad tick
            self._failed(name, state, exc, now)
            return
        if state.failures:
            state.failures = 0
            if self._db_down and not any(b.failures for b in self._backoff.values()):
                self._db_down = False
                self.metrics.reconnected()
                log.warning("database reachable again")

    def _guarded(self, name: str, step: Callable[[], None]) -> None:
        self._run(name, lambda _now: step(), time.monotonic())

    def _failed(self, name: str, state: _Backoff, exc: BaseException, now: float) -> None:
        state.failures += 1
        delay = retry.db_delay(state.failures)
        state.next_try = now + delay
        self.metrics.db_error()
        if self.driver.is_transient(exc):
            self._db_down = True
            if state.failures == 1 or state.failures % 10 == 0:
                log.warning("database unavailable (%s: %s); retrying in %.1fs", name, _one_line(exc), delay)
            self._close_listener()
        elif state.failures == 1 or state.failures % 10 == 0:
            log.error("%s failed (%s); retrying in %.1fs", name, _one_line(exc), delay, exc_info=exc)

    def _liveness_error(self, exc: BaseException) -> None:
        self.metrics.db_error()
        if self.driver.is_transient(exc):
            self._db_down = True
            log.warning("heartbeat failed (%s)", _one_line(exc))
        else:
            log.error("heartbeat failed (%s)", _one_line(exc), exc_info=exc)

    def _loop_stalled(self, now: float) -> bool:
        return now - self._progress > self.config.fence_s / 2

    def _leadership_changed(self, leading: bool) -> None:
        self.metrics.set_leader(leading)
        if leading:
            self.scheduler.reset()
            self.maintenance.reset()

    def _abandon(self, now: float) -> None:
        """The cluster rescued our rows while we could not heartbeat: none of them is ours."""
        log.error("replica %s: abandoning %d execution(s) after being declared dead", self.worker_id,
                  len(self.producer.flights))
        self.producer.abandon(now)
        self.completer.drop_all()
        self.leadership.step_down()
        self.liveness.revive()

    def _finished(self) -> bool:
        if self._forced:
            return True
        return self._draining and self.producer.idle() and not self.completer.pending()

    def _wait(self) -> None:
        now = time.monotonic()
        active: list[tuple[str, Any]] = [("completer", self.completer)]
        if self.liveness.registered:
            active.append(("producer", self.producer))
            if not self._draining:
                active.append(("leadership", self.leadership))
        if self.leadership.leading(now):
            active += [("scheduler", self.scheduler), ("maintenance", self.maintenance)]
        wakes = []
        for name, service in active:
            wake, backoff = service.next_wake(), self._backoff.get(name)
            # A service that failed waits out its back-off, whatever it would like.
            wakes.append(max(wake, backoff.next_try) if backoff is not None and backoff.failures else wake)
        if self._listener is None and self.config.wakeup == "auto" and not self._draining:
            wakes.append(self._next_listener)
        if self._draining:
            wakes.append(self._drain_deadline or now)
        wakes += self.executor.deadlines()  # stopped executions to kill, timeouts
        if not self.liveness.registered:
            wakes.append(now + 0.2)        # the heartbeat thread is registering us
        timeout = max(0.0, min(min(wakes), now + self.config.poll_interval) - now)
        waitables: list[Any] = [self._wake_r, *self.executor.waitables()]
        if self._listener is not None:
            waitables.append(self._listener)
        for ready in wait_any(waitables, timeout if timeout < NEVER else None):
            if ready is self._wake_r:
                try:
                    while self._wake_r.recv(64):
                        pass
                except (BlockingIOError, OSError):
                    pass
            elif self._listener is not None and ready is self._listener:
                try:
                    fired = self._listener.drain()
                except Exception:  # noqa: BLE001 - reopened later
                    self._close_listener()
                    continue
                for channel, payload in fired:
                    self.producer.notify(channel, payload)
            else:
                received = time.monotonic()
                for event in self.executor.receive(ready, received):
                    try:
                        self.producer.on_event(event, received)
                    except Exception:  # noqa: BLE001 - one execution's report never stops the loop
                        log.exception("could not handle %s of request %s", event.kind, event.task.request_id)

    # -- wake-ups ------------------------------------------------------------------------------
    def _listener_upkeep(self, now: float) -> None:
        if self._listener is not None or self._draining or self.config.wakeup != "auto" or now < self._next_listener:
            return
        try:
            self._listener = self.driver.listener()
        except Exception as exc:  # noqa: BLE001 - polling still works
            log.warning("wake-up channel unavailable (%s); polling every %ss", _one_line(exc), self.config.poll_interval)
            self._listener = None
        if self._listener is None:
            self._next_listener = now + max(self.config.poll_interval, 5.0)
        else:
            self.producer.maybe_work = True     # anything that arrived before we listened

    def _close_listener(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    # -- the end -------------------------------------------------------------------------------
    def _shutdown(self) -> None:
        """Drained or forced: stop what still runs, hand rows back, leave the cluster."""
        self.producer.hand_back_all(time.monotonic())
        self._liveness_stop.set()           # no heartbeat may follow the unregister
        if self._liveness_thread is not None:
            self._liveness_thread.join(self.config.statement_timeout_s + 1)
        for _ in range(3):
            try:
                self.leadership.resign()
                self.completer.flush()
                self.driver.worker_unregister(self.worker_id)
                break
            except Exception as exc:  # noqa: BLE001 - rescue will clean up after us
                log.warning("shutdown: could not write to the database (%s)", _one_line(exc))
                time.sleep(1)
        self._close_listener()
        if self._metrics_server is not None:
            self._metrics_server.close()
        self.executor.close()
        self.driver.dispose()
        log.info("replica %s stopped", self.worker_id)


def _one_line(exc: BaseException | None) -> str:
    return " ".join(str(getattr(exc, "orig", None) or exc).split())[:300] if exc else ""
