"""The Celery app: configured from settings, JSON only, named queues; real round trips on both brokers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from app.config import Settings
from worker.celery_app import PING_TASK, create_celery_app

ROOT = Path(__file__).resolve().parents[2]


def test_configuration_comes_from_settings(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, training_queue="gpu-training", task_soft_time_limit_s=100,
                        task_time_limit_s=200, broker_visibility_timeout_s=300)
    conf = create_celery_app(settings).conf
    assert conf.broker_url == f"sqla+sqlite:///{tmp_path}/broker.sqlite"
    assert conf.result_backend == f"db+sqlite:///{tmp_path}/results.sqlite"
    assert conf.accept_content == ["json"] and conf.task_serializer == "json" and conf.result_serializer == "json"
    assert [q.name for q in conf.task_queues] == ["default", "gpu-training"]
    assert conf.task_routes == {"rxverify.training.*": {"queue": "gpu-training"}}
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
    assert (conf.task_soft_time_limit, conf.task_time_limit) == (100, 200)
    assert conf.broker_transport_options == {}  # kombu's SQLAlchemy transport would pass them to create_engine
    redis_conf = create_celery_app(settings.model_copy(update={"broker_url": "redis://h:6379/0",
                                                               "redis_key_prefix": "p:"})).conf
    assert redis_conf.broker_transport_options == {"visibility_timeout": 300, "global_keyprefix": "p:"}
    assert redis_conf.broker_transport_options["visibility_timeout"] > redis_conf.task_time_limit


@pytest.mark.redis
def test_tasks_are_routed_to_named_queues_in_redis(tmp_path: Path, redis_url: str, redis_prefix: str) -> None:
    settings = Settings(data_dir=tmp_path, broker_url=redis_url, result_backend=redis_url,
                        redis_key_prefix=redis_prefix)
    app = create_celery_app(settings)
    app.send_task("rxverify.training.fine_tune", args=[42])
    app.send_task(PING_TASK)
    client = redis.Redis.from_url(redis_url)
    try:
        assert client.llen(f"{redis_prefix}training") == 1
        assert client.llen(f"{redis_prefix}default") == 1
        message = client.lindex(f"{redis_prefix}training", 0)
        assert isinstance(message, bytes) and b'"content-type": "application/json"' in message
    finally:
        client.close()


@pytest.fixture
def start_worker() -> Iterator[object]:
    """Start `celery -A worker.celery_app worker` for given env settings; stopped with SIGTERM afterwards."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool", "solo",
                   "--queues", "default,training", "--without-mingle", "--without-gossip", "--loglevel", "INFO"]
        process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, **env}, stdout=log.open("wb"),
                                   stderr=subprocess.STDOUT)
        processes.append(process)
        return process

    yield start
    for process in processes:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_embedded_broker_round_trip(tmp_path: Path, start_worker: object) -> None:
    """A real worker process on the SQLite broker and result backend: no server involved."""
    settings = Settings(data_dir=tmp_path)
    settings.ensure_dirs()
    start_worker({"RXVERIFY_DATA_DIR": str(tmp_path)}, tmp_path / "worker.log")  # type: ignore[operator]
    result = create_celery_app(settings).send_task(PING_TASK)
    assert result.get(timeout=45) == "pong", (tmp_path / "worker.log").read_text()[-2000:]


@pytest.mark.slow
@pytest.mark.redis
def test_redis_broker_round_trip(tmp_path: Path, redis_url: str, redis_prefix: str, start_worker: object) -> None:
    """A real worker process on the real Redis (keys under a private prefix)."""
    env = {"RXVERIFY_DATA_DIR": str(tmp_path), "RXVERIFY_BROKER_URL": redis_url,
           "RXVERIFY_RESULT_BACKEND": redis_url, "RXVERIFY_REDIS_KEY_PREFIX": redis_prefix}
    settings = Settings(data_dir=tmp_path, broker_url=redis_url, result_backend=redis_url,
                        redis_key_prefix=redis_prefix)
    start_worker(env, tmp_path / "worker.log")  # type: ignore[operator]
    result = create_celery_app(settings).send_task(PING_TASK)
    assert result.get(timeout=45) == "pong", (tmp_path / "worker.log").read_text()[-2000:]
