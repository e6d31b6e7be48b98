"""Readiness checks: can this process reach its database and its Celery broker right now?"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from kombu import Connection
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine
from sqlalchemy.pool import NullPool, QueuePool

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class CheckResult:
    """One dependency's state; `error` says why when it is not ok."""

    ok: bool
    latency_ms: float
    error: str | None = None


def check_database(engine: Engine, *, expected_revision: str | None = None) -> CheckResult:
    """Run `SELECT 1` on a pooled connection; with `expected_revision`, also check the schema's migration.

    A database left at an older revision (a deploy whose `rxverify migrate` did not run) answers some
    routes and fails others with 500s; it is reported not ready, with the command that fixes it.
    """
    started = time.perf_counter()
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
            revision = (connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
                        if expected_revision is not None else None)
    except Exception as exc:
        logger.warning("database check failed", exc_info=exc)
        return CheckResult(False, _ms(started), _public_reason(exc))
    if revision != expected_revision:
        reason = (f"the database schema is at migration {revision}, this code needs {expected_revision}: "
                  "run `rxverify migrate`")
        logger.error("database check: %s", reason)
        return CheckResult(False, _ms(started), reason)
    return CheckResult(True, _ms(started))


class DatabaseProbe:
    """`check_database` on a background thread, so that a probe waits at most `timeout_s` for it.

    A database that accepts connections but never answers would otherwise hold each probe (and a threadpool
    thread of the API) for the connect timeout, or without end on a pooled connection; so would a pool
    whose connections are all checked out, for the pool's timeout (30 s). A busy pool fails the probe
    only if no connection comes free within `timeout_s`, so a momentary spike does not take a replica
    out of its load balancer. A check still running from an earlier probe is not started again: later
    probes wait for that one, so a hung server ties up one thread, not one per probe. A check older than
    `abandon_after_s` is given up and a new one started (at most `max_abandoned` of them may still hang),
    so that one stuck on a dead connection does not keep the replica unready after the database is back.
    The threads are daemons: a hung check never holds up shutdown.
    """

    def __init__(self, engine: Engine, *, pool_capacity: int | None, abandon_after_s: float = 30.0,
                 max_abandoned: int = 3, expected_revision: str | None = None) -> None:
        self.engine, self.pool_capacity, self.expected_revision = engine, pool_capacity, expected_revision
        self.abandon_after_s, self.max_abandoned = abandon_after_s, max_abandoned
        self._lock = threading.Lock()
        self._running: Future[CheckResult] | None = None
        self._running_since = 0.0
        self._abandoned: list[Future[CheckResult]] = []

    def check(self, *, timeout_s: float) -> CheckResult:
        """The current check's result, or not ok once `timeout_s` has passed without one."""
        started = time.perf_counter()
        with self._lock:
            self._abandoned = [future for future in self._abandoned if not future.done()]
            stale = (self._running is not None and not self._running.done()
                     and started - self._running_since > self.abandon_after_s
                     and len(self._abandoned) < self.max_abandoned)
            if stale:
                assert self._running is not None
                logger.warning("database check: one has hung for over %g s; starting another", self.abandon_after_s)
                self._abandoned.append(self._running)
            if self._running is None or self._running.done() or stale:
                self._running, self._running_since = self._start(), started
            running = self._running
        try:
            return running.result(timeout=timeout_s)
        except FutureTimeout:
            pool = self.engine.pool
            if (self.pool_capacity is not None and isinstance(pool, QueuePool)
                    and pool.checkedout() >= self.pool_capacity):
                reason = f"all {self.pool_capacity} pooled database connections stayed in use for {timeout_s:g} s"
            else:
                reason = f"no answer from the database within {timeout_s:g} s"
            logger.warning("database check: %s", reason)
            return CheckResult(False, _ms(started), reason)

    def _start(self) -> Future[CheckResult]:
        future: Future[CheckResult] = Future()

        def run() -> None:
            try:
                future.set_result(check_database(self.engine, expected_revision=self.expected_revision))
            except BaseException as error:  # check_database catches errors itself; this is for the unforeseen
                future.set_exception(error)

        threading.Thread(target=run, name="readiness-db", daemon=True).start()
        return future


def check_broker(url: str, *, timeout_s: float) -> CheckResult:
    """Open (and close) a kombu connection to the Celery broker, failing fast."""
    started = time.perf_counter()
    if url.startswith("sqla+"):
        # kombu's SQLAlchemy transport connects lazily, so ask the database itself.
        engine = create_engine(url.removeprefix("sqla+"), poolclass=NullPool)
        try:
            return check_database(engine)
        finally:
            engine.dispose()
    try:
        with Connection(url, connect_timeout=timeout_s,
                        transport_options={"socket_timeout": timeout_s, "max_retries": 0}) as connection:
            connection.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=timeout_s)
    except Exception as exc:
        logger.warning("broker check failed", exc_info=exc)
        return CheckResult(False, _ms(started), _public_reason(exc))
    return CheckResult(True, _ms(started))


def _public_reason(exc: Exception) -> str:
    # /readyz needs no key: the message (hosts, ports, role names) goes to the log only.
    return f"{type(exc).__name__}; the service log has the details"


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 2)
