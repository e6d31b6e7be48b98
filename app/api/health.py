"""Liveness, readiness and Prometheus metrics (no authentication, for probes and scrapers)."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from app.metrics import render_metrics
from app.schemas.health import DependencyStatus, Liveness, Readiness
from app.services.readiness import check_broker

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Liveness)
def healthz() -> Liveness:
    """Liveness: the process answers. It checks nothing else, so a slow database never restarts it."""
    return Liveness()


def model_loaded(request: Request) -> bool:
    """Ask the hook `app.state.model_ready` (a bool or a zero-argument callable) whether a model serves."""
    hook: bool | Callable[[], bool] = getattr(request.app.state, "model_ready", False)
    try:
        return bool(hook()) if callable(hook) else bool(hook)
    except Exception:
        return False


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
def readyz(request: Request) -> JSONResponse:
    """Readiness: database and broker reachable and a model loaded; 503 with the same body otherwise."""
    settings = request.app.state.settings
    database = request.app.state.db_probe.check(timeout_s=settings.readiness_timeout_s)
    broker = check_broker(settings.broker_url, timeout_s=settings.readiness_timeout_s)
    loaded = model_loaded(request)
    body = Readiness(ready=database.ok and broker.ok and loaded,
                     database=DependencyStatus(ok=database.ok, latency_ms=database.latency_ms, error=database.error),
                     broker=DependencyStatus(ok=broker.ok, latency_ms=broker.latency_ms, error=broker.error),
                     model_loaded=loaded)
    return JSONResponse(body.model_dump(), status_code=200 if body.ready else 503)


@router.get("/metrics", include_in_schema=False)
def metrics() -> Response:
    """Prometheus exposition format."""
    payload, content_type = render_metrics()
    return Response(payload, media_type=content_type)
