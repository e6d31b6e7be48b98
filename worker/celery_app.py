"""The Celery application, configured from Settings: JSON only, named queues, settings for long GPU jobs.

Queues: `settings.default_queue` for short tasks and `settings.training_queue` for fine-tuning. Tasks
named `rxverify.training.*` are routed to the training queue. Run a worker with `rxverify worker`
(or `celery -A worker.celery_app worker -Q default,training --pool solo`).
"""

from __future__ import annotations

import importlib.util
import logging

from celery import Celery
from kombu import Exchange, Queue

from app.config import Settings, get_settings

logger = logging.getLogger(__name__)

TRAINING_TASK_PATTERN = "rxverify.training.*"
PING_TASK = "rxverify.ping"
# Task modules are added by later work; only the ones that exist are imported by the worker.
TASK_MODULES = ("worker.tasks",)


def _existing_task_modules() -> list[str]:
    found = []
    for name in TASK_MODULES:
        try:
            if importlib.util.find_spec(name) is not None:
                found.append(name)
        except ModuleNotFoundError:
            continue
    return found


def _is_redis(url: str) -> bool:
    return url.startswith(("redis://", "rediss://", "redis+socket://"))


def create_celery_app(settings: Settings | None = None) -> Celery:
    """A Celery app for `settings` (default: the environment's)."""
    settings = settings or get_settings()
    app = Celery("rxverify", broker=settings.broker_url, backend=settings.result_backend,
                 include=_existing_task_modules())
    redis_options: dict[str, object] = {"visibility_timeout": settings.broker_visibility_timeout_s}
    if settings.redis_key_prefix:
        # Lets several deployments (or test sessions) share one Redis without seeing each other's queues.
        redis_options["global_keyprefix"] = settings.redis_key_prefix
    app.conf.update(
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        event_serializer="json",
        task_default_queue=settings.default_queue,
        task_queues=tuple(Queue(name, Exchange(name, type="direct"), routing_key=name)
                          for name in (settings.default_queue, settings.training_queue)),
        task_routes={TRAINING_TASK_PATTERN: {"queue": settings.training_queue}},
        # A job whose worker dies is redelivered, not lost; one task at a time per worker process.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=settings.task_soft_time_limit_s,
        task_time_limit=settings.task_time_limit_s,
        # Redis redelivers unacknowledged messages after the visibility timeout, so it must outlast the
        # hard time limit. The SQLAlchemy transport and result backend pass these options to
        # create_engine(), so they get none.
        broker_transport_options=dict(redis_options) if _is_redis(settings.broker_url) else {},
        result_backend_transport_options=dict(redis_options) if _is_redis(settings.result_backend) else {},
        broker_connection_retry_on_startup=True,
        worker_max_tasks_per_child=settings.worker_max_tasks_per_child,
        worker_hijack_root_logger=False,
        task_track_started=True,
        result_extended=True,
        result_expires=7 * 24 * 3600,
        enable_utc=True,
        timezone="UTC",
    )
    app.conf.rxverify_settings = settings

    @app.task(name=PING_TASK)
    def ping() -> str:
        """A no-op round trip through the broker and the result backend."""
        return "pong"

    return app


celery_app = create_celery_app()
app = celery_app  # `celery -A worker.celery_app` looks for `app` or `celery`
