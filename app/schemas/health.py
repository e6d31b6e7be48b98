"""Health and readiness schemas."""

from __future__ import annotations

from pydantic import BaseModel


class Liveness(BaseModel):
    """The process is up."""

    status: str = "ok"


class DependencyStatus(BaseModel):
    """One dependency's state."""

    ok: bool
    latency_ms: float
    error: str | None = None


class Readiness(BaseModel):
    """Ready when the database answers at this code's schema revision and a model is loaded (the broker is
    reported, not required)."""

    ready: bool
    database: DependencyStatus
    broker: DependencyStatus
    model_loaded: bool
