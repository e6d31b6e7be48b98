"""Liveness, readiness and Prometheus metrics (no authentication, for probes and scrapers)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from app.metrics import render_metrics
from app.schemas.health import DependencyStatus, Liveness, Readiness
from app.services.readiness import check_broker

router = APIRouter(tags=["health"])


# /readyz's checks wait on their own threads: the request threadpool may be full of requests blocked on a
# slow database, and the probe must still answer within RXVERIFY_READINESS_TIMEOUT_S.
_CHECKS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="readyz")


@router.get("/healthz", response_model=Liveness)
@router.head("/healthz", include_in_schema=False)  # load balancers that probe with HEAD
async def healthz() -> Liveness:
    """Liveness: the process answers. It checks nothing else and runs on the event loop, not in the request
    threadpool, so a slow database (every pool thread waiting on it) never fails it."""
    return Liveness()


def model_loaded(request: Request) -> bool:
    """Ask the hook `app.state.model_ready` (a bool or a zero-argument callable) whether a model serves."""
    hook: bool | Callable[[], bool] = getattr(request.app.state, "model_ready", False)
    try:
        return bool(hook()) if callable(hook) else bool(hook)
    except Exception:
        return False


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
@router.head("/readyz", include_in_schema=False)
async def readyz(request: Request) -> JSONResponse:
    """Readiness: the database reachable at this code's schema revision and a model loaded; 503 with the
    same body otherwise. The broker is reported but not required: verifications do not use it, and a
    training job sent while it is down waits queued until the reaper sends it."""
    settings = request.app.state.settings
    timeout_s = settings.readiness_timeout_s
    loop = asyncio.get_running_loop()
    database, broker = await asyncio.gather(
        loop.run_in_executor(_CHECKS, partial(request.app.state.db_probe.check, timeout_s=timeout_s)),
        loop.run_in_executor(_CHECKS, partial(check_broker, settings.broker_url, timeout_s=timeout_s)))
    loaded = model_loaded(request)
    body = Readiness(ready=database.ok and loaded,
                     database=DependencyStatus(ok=database.ok, latency_ms=database.latency_ms, error=database.error),
                     broker=DependencyStatus(ok=broker.ok, latency_ms=broker.latency_ms, error=broker.error),
                     model_loaded=loaded)
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)


@router.get("/metrics", include_in_schema=False)
async def metrics() -> Response:
    """Prometheus exposition format."""
    payload, content_type = render_metrics()
    return Response(payload, media_type=content_type)
