"""Plain factories for training-job, registry and hot-swap tests: a tiny synthetic dataset, tiny models,
a seeded database, worker processes, and waiting helpers.

The dataset holds four PMI products forming two expert-cost pairs (50111-0434 -> 00591-0461 costs 10,
53489-0156 <-> 68382-0227 cost 10 and 8), as 32 px JPEGs: 9 train, 3 valid and 3 test images each.
Models are tiny_cnn at 32 px trained with the same `run_training` as `rxverify train` (about a second).
"""

from __future__ import annotations

import functools
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import create_engine, text

from app.config import Settings
from app.db import Database
from app.orm import Role
from app.services.audit import Actor
from app.services.datasets import import_pmi
from app.services.model_registry import register_and_activate, register_checkpoint
from app.services.products import catalog_keys
from tests.app.factories import create_key, seed_catalog

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ("00591-0461", "50111-0434", "53489-0156", "68382-0227")
DATASET = "tiny"
T = TypeVar("T")


@dataclass(frozen=True)
class TinyAssets:
    """Files made once per session: the dataset folder and two base checkpoints."""

    dataset: Path
    model_a: Path
    model_b: Path


def _train(data: Path, out: Path, *, seed: int, epochs: int) -> Path:
    from models.commands.train import TrainRequest, run_training
    from models.engine import TrainConfig

    config = TrainConfig(epochs=epochs, batch_size=8, lr=3e-3, seed=seed)
    run_training(TrainRequest(data=data, out=out, config=config, arch="tiny_cnn", image_size=32, threads=1))
    return out


@functools.cache
def tiny_assets(root: Path) -> TinyAssets:
    """The session's dataset and models A/B under `root` (made on first use, then reused)."""
    from models.pmi import PMI_PRODUCTS
    from models.synth import generate_synthetic_pills

    products = [p for p in PMI_PRODUCTS if p.ndc in CLASSES]
    dataset = root / "tiny-dataset"
    generate_synthetic_pills(dataset, per_class=15, image_size=32, seed=0, products=products, imbalance=False)
    return TinyAssets(dataset=dataset, model_a=_train(dataset, root / "model-a", seed=0, epochs=4),
                      model_b=_train(dataset, root / "model-b", seed=1, epochs=2))


@dataclass(frozen=True)
class Seeded:
    """What `seed_training` put in a database."""

    dataset: str
    base_model: int
    cost_matrix_version: int
    keys: dict[Role, str]


def seed_training(settings: Settings, assets: TinyAssets, *, other_model: bool = False) -> Seeded:
    """Catalog + expert costs (active), one key per role, the tiny dataset, model A registered and active."""
    from app.services.cost_matrices import active_version_id

    settings.ensure_dirs()
    seed_catalog(settings)
    keys = {role: create_key(settings, role) for role in Role}
    database = Database(settings)
    actor = Actor.cli("tests")
    try:
        with database.session() as session:
            import_pmi(session, source=assets.dataset, name=DATASET, datasets_dir=settings.datasets_dir,
                       catalog=catalog_keys(session), actor=actor)
            base = register_and_activate(session, source=assets.model_a, settings=settings, actor=actor)
            if other_model:
                register_checkpoint(session, source=assets.model_b, settings=settings, actor=actor)
            cost_matrix = active_version_id(session)
            assert cost_matrix is not None
            return Seeded(dataset=DATASET, base_model=base.id, cost_matrix_version=cost_matrix, keys=keys)
    finally:
        database.dispose()


@functools.cache
def _seeded_sqlite(root: Path, assets: TinyAssets) -> tuple[Path, Seeded]:
    from app import migrate

    settings = Settings(data_dir=root / "seeded-sqlite")
    migrate.upgrade(settings)
    seeded = seed_training(settings, assets, other_model=True)
    engine = create_engine(settings.database_url)
    with engine.connect() as connection:  # fold the WAL into the file before it is copied
        connection.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
    engine.dispose()
    return settings.data_dir / "rxverify.db", seeded


def seeded_sqlite_settings(root: Path, assets: TinyAssets, data_dir: Path, **overrides: Any) -> tuple[Settings, Seeded]:
    """Embedded settings on a copy of a database seeded once per session (dataset and checkpoints are shared,
    read-only, from the template's folder; model A active, model B registered as version 2)."""
    import shutil

    template, seeded = _seeded_sqlite(root, assets)
    data_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, data_dir / "rxverify.db")
    return Settings(data_dir=data_dir, **overrides), seeded


def jpeg_of(path: Path) -> bytes:
    """The bytes of an image file re-encoded as JPEG (the synthetic images already are)."""
    from PIL import Image

    with Image.open(path) as image:
        out = io.BytesIO()
        image.convert("RGB").save(out, format="JPEG", quality=90)
        return out.getvalue()


def wait_for(predicate: Callable[[], T | None], *, timeout: float, interval: float = 0.1, what: str = "condition") -> T:
    """Poll until `predicate()` is truthy; its value, or AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def job_row(settings: Settings, job_id: int) -> dict[str, Any]:
    """The training job's columns, read with a fresh connection (no session caching)."""
    engine = create_engine(settings.database_url)
    try:
        with engine.connect() as connection:
            row = dict(connection.execute(text("SELECT * FROM training_jobs WHERE id = :id"),
                                          {"id": job_id}).mappings().one())
    finally:
        engine.dispose()
    for key in ("progress", "result", "hyperparameters"):  # SQLite hands raw SQL's JSON back as text
        if isinstance(row[key], str):
            row[key] = json.loads(row[key])
    return row


def worker_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment a worker process needs to see the same database, broker, data dir and settings."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("RXVERIFY_")}
    env.update({"RXVERIFY_DATA_DIR": str(settings.data_dir), "RXVERIFY_DATABASE_URL": settings.database_url,
                "RXVERIFY_BROKER_URL": settings.broker_url, "RXVERIFY_RESULT_BACKEND": settings.result_backend,
                "RXVERIFY_REDIS_KEY_PREFIX": settings.redis_key_prefix,
                "RXVERIFY_TRAINING_LEASE_S": str(settings.training_lease_s), "RXVERIFY_TORCH_THREADS": "1",
                "RXVERIFY_LOG_FORMAT": "text", "RXVERIFY_LOG_LEVEL": "INFO",
                "RXVERIFY_TASK_SOFT_TIME_LIMIT_S": str(settings.task_soft_time_limit_s),
                "RXVERIFY_TASK_TIME_LIMIT_S": str(settings.task_time_limit_s),
                "RXVERIFY_BROKER_VISIBILITY_TIMEOUT_S": str(settings.broker_visibility_timeout_s)})
    if settings.redis_url:
        env["RXVERIFY_REDIS_URL"] = settings.redis_url
    env.update(extra)
    return env


class Workers:
    """Worker processes started by a test; each is stopped (SIGTERM, then SIGKILL) at the end."""

    def __init__(self) -> None:
        self.processes: list[subprocess.Popen[bytes]] = []

    def start(self, env: dict[str, str], log: Path, *, pool: str = "solo", concurrency: int = 1,
              celery_cli: bool = False) -> subprocess.Popen[bytes]:
        """`rxverify worker` (default) or `celery -A worker.celery_app worker`, logging to `log`."""
        if celery_cli:
            command = [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "--pool", pool,
                       "--concurrency", str(concurrency), "--queues", "default,training", "--without-mingle",
                       "--without-gossip", "--loglevel", "INFO"]
        else:
            command = [sys.executable, "-m", "app.cli", "worker", "--pool", pool, "--concurrency", str(concurrency)]
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)
        self.processes.append(process)
        return process

    def stop_all(self) -> None:
        """Stop every process this object started."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
