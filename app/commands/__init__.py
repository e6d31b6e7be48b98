"""app/ command registrations (migrate, serve, up, worker, catalog, apikey, data, bench ...)."""

from __future__ import annotations

from typing import Any


def register(sub: Any, groups: dict[str, Any]) -> None:
    """Add every app/ command to the `rxverify` parser."""
    # Each module exposes register(sub, groups); keep imports light (no torch at parse time).
    from app.commands import admin, bench_service, bench_swap, data, runtime, up

    admin.register(sub, groups)
    runtime.register(sub, groups)
    up.register(sub, groups)
    data.register(sub, groups)
    bench_service.register(sub, groups)
    bench_swap.register(sub, groups)
