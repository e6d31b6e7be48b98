"""Process commands: `serve` (the API on uvicorn) and `worker` (a Celery worker)."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from app.commands.supervisor import (
    WorkerSupervisor,
    embedded_worker_command,
    wants_embedded_worker,
    watch_parent,
)
from app.config import Settings, get_settings
from app.log import configure_logging

logger = logging.getLogger(__name__)


def register(sub: Any, groups: dict[str, Any]) -> None:
    """Add `serve` and `worker` to the `rxverify` parser."""
    # Defaults are resolved from Settings when the command runs, so building the parser reads no environment.
    serve = sub.add_parser("serve", help="run the HTTP API")
    serve.add_argument("--host", default=None, help="bind address (default RXVERIFY_HOST, 127.0.0.1)")
    serve.add_argument("--port", type=int, default=None, help="port (default RXVERIFY_PORT, 8000)")
    serve.add_argument("--model", default=None, metavar="CKPT_DIR",
                       help="register this checkpoint (if new; classes checked against the catalog) and activate it")
    serve.add_argument("--worker", dest="worker", action="store_true", default=None,
                       help="also run and supervise one local training worker (default with the embedded broker)")
    serve.add_argument("--no-worker", dest="worker", action="store_false",
                       help="do not start a local worker (use separate `rxverify worker` processes)")
    serve.set_defaults(func=serve_command)

    worker = sub.add_parser("worker", help="run a Celery worker (default and training queues)")
    worker.add_argument("--queues", default=None,
                        help="comma-separated queues to consume (default: the default and training queues)")
    worker.add_argument("--pool", default="solo", choices=["solo", "prefork", "threads"],
                        help="solo (default) is required on GPU workers: CUDA cannot be used after fork")
    worker.add_argument("--concurrency", type=int, default=1)
    worker.add_argument("--hostname", default=None, help="worker node name (default rxverify@HOST)")
    worker.add_argument("--exit-with-parent", type=int, default=None, metavar="PID", help=argparse.SUPPRESS)
    worker.set_defaults(func=worker_command)


def serve_command(args: argparse.Namespace) -> int:
    """Run uvicorn on app.main:create_app; our middleware writes the access log."""
    settings = get_settings()
    configure_logging(settings)
    settings.ensure_dirs()
    if getattr(args, "model", None):
        from app.errors import DomainError
        from app.services.serving import install_checkpoint

        try:
            version_id = install_checkpoint(settings, args.model)
        except DomainError as error:
            print(f"error: {error.detail}")
            return 2
        print(f"model version {version_id} from {args.model} is active")
    return run_api(settings, host=args.host or settings.host, port=args.port or settings.port,
                   worker=getattr(args, "worker", None))


def run_api(settings: Settings, *, host: str, port: int, worker: bool | None) -> int:
    """Serve the API until Ctrl-C / SIGTERM (and, in embedded mode, supervise one local worker); stop both."""
    import uvicorn

    supervisor = None
    if wants_embedded_worker(settings, worker):
        # Embedded mode: one local worker process on the SQLite broker, restarted if it dies.
        supervisor = WorkerSupervisor(embedded_worker_command(parent_pid=os.getpid()))
        supervisor.start()
    try:
        # h11 rather than httptools: httptools puts no bound on a header's size (a 200 MB header was held
        # in memory and answered), h11 refuses more than `max_request_header_bytes` of request line and
        # headers with a 400.
        uvicorn.run("app.main:create_app", factory=True, host=host, port=port, log_config=None, access_log=False,
                    proxy_headers=True, http="h11", h11_max_incomplete_event_size=settings.max_request_header_bytes)
    finally:
        if supervisor is not None:
            supervisor.stop()
    return 0


def worker_command(args: argparse.Namespace) -> int:
    """Start a Celery worker on worker.celery_app's app (the one tasks register on), built from Settings."""
    from worker import celery_app as celery_module

    settings = get_settings()
    configure_logging(settings)
    settings.ensure_dirs()
    app = celery_module.celery_app
    queues = args.queues or f"{settings.default_queue},{settings.training_queue}"
    argv = ["worker", "--queues", queues, "--pool", args.pool, "--concurrency", str(args.concurrency),
            "--loglevel", settings.log_level]
    if args.hostname:
        argv += ["--hostname", args.hostname]
    if getattr(args, "exit_with_parent", None):
        watch_parent(args.exit_with_parent)
    if args.pool == "prefork" and settings.worker_metrics_port is not None:
        logger.warning(
            "RXVERIFY_WORKER_METRICS_PORT with --pool prefork: jobs run in child processes, whose figures the "
            "metrics served by this process do not include; use --pool solo or threads")
    app.worker_main(argv)
    return 0
