"""Readiness checks: can this process reach its database and its Celery broker right now?"""

from __future__ import annotations

import logging
import time
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


def check_database(engine: Engine, *, pool_capacity: int | None = None) -> CheckResult:
    """Run `SELECT 1` on a pooled connection.

    With `pool_capacity` (pool size plus overflow), a pool whose connections are all checked out fails
    the check at once: the probe would otherwise wait out the pool's timeout (30 s) behind the requests
    that hold them, and a replica in that state cannot take more work anyway.
    """
    started = time.perf_counter()
    pool = engine.pool
    if pool_capacity is not None and isinstance(pool, QueuePool) and pool.checkedout() >= pool_capacity:
        return CheckResult(False, _ms(started), f"all {pool_capacity} pooled database connections are in use")
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except Exception as exc:
        logger.warning("database check failed", exc_info=exc)
        return CheckResult(False, _ms(started), _public_reason(exc))
    return CheckResult(True, _ms(started))


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
