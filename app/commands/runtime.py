"""Process commands: `serve` (the API on uvicorn) and `worker` (a Celery worker)."""

from __future__ import annotations

import argparse
from typing import Any

from app.config import get_settings
from app.log import configure_logging


def register(sub: Any, groups: dict[str, Any]) -> None:
    """Add `serve` and `worker` to the `rxverify` parser."""
    settings = get_settings()
    serve = sub.add_parser("serve", help="run the HTTP API")
    serve.add_argument("--host", default=settings.host, help=f"bind address (default {settings.host})")
    serve.add_argument("--port", type=int, default=settings.port, help=f"port (default {settings.port})")
    serve.set_defaults(func=serve_command)

    worker = sub.add_parser("worker", help="run a Celery worker (default and training queues)")
    worker.add_argument("--queues", default=f"{settings.default_queue},{settings.training_queue}",
                        help="comma-separated queues to consume")
    worker.add_argument("--pool", default="solo", choices=["solo", "prefork", "threads"],
                        help="solo (default) is required on GPU workers: CUDA cannot be used after fork")
    worker.add_argument("--concurrency", type=int, default=1)
    worker.add_argument("--hostname", default=None, help="worker node name (default rxverify@HOST)")
    worker.set_defaults(func=worker_command)


def serve_command(args: argparse.Namespace) -> int:
    """Run uvicorn on app.main:create_app; our middleware writes the access log."""
    import uvicorn

    settings = get_settings()
    configure_logging(settings)
    settings.ensure_dirs()
    uvicorn.run("app.main:create_app", factory=True, host=args.host, port=args.port, log_config=None,
                access_log=False, proxy_headers=True)
    return 0


def worker_command(args: argparse.Namespace) -> int:
    """Start a Celery worker from worker.celery_app with these settings."""
    from worker.celery_app import create_celery_app

    settings = get_settings()
    configure_logging(settings)
    settings.ensure_dirs()
    app = create_celery_app(settings)
    argv = ["worker", "--queues", args.queues, "--pool", args.pool, "--concurrency", str(args.concurrency),
            "--loglevel", settings.log_level]
    if args.hostname:
        argv += ["--hostname", args.hostname]
    app.worker_main(argv)
    return 0
