"""Real workers against the real PostgreSQL and Redis: settings per module, a client, job helpers.

Each test module gets its own data folder and Redis key prefix (its own queues), so a worker started by
one module never takes jobs of another. Tables are emptied after each test.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from app.config import Settings
from app.orm import Role
from tests.conftest import delete_redis_prefix
from tests.worker.factories import Seeded, Workers, job_row, seed_training, tiny_assets, wait_for

JOBS = "/v1/admin/training-jobs"
FAST = {"epochs": 2, "batch_size": 8, "steps": 3}


@pytest.fixture(scope="module")
def fleet_settings(postgres_url: str, redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """PostgreSQL + Redis settings with a short job lease (4 s) and CPU-deterministic training."""
    prefix = f"rxv_test_{os.getpid()}_{secrets.token_hex(4)}:"
    settings = Settings(data_dir=tmp_path_factory.mktemp("fleet"), database_url=postgres_url, broker_url=redis_url,
                        result_backend=redis_url, redis_url=redis_url, redis_key_prefix=prefix, training_lease_s=4,
                        task_soft_time_limit_s=600, task_time_limit_s=660, broker_visibility_timeout_s=900,
                        torch_threads=1, model_poll_seconds=1.0)
    settings.ensure_dirs()
    yield settings
    delete_redis_prefix(redis_url, prefix)


@pytest.fixture(scope="module")
def workers() -> Iterator[Workers]:
    """Worker processes of this module, stopped at its end."""
    started = Workers()
    yield started
    started.stop_all()


def wait_ready(log: Path, *, timeout: float = 90.0) -> None:
    """Until the worker's log says it is ready to consume."""
    wait_for(lambda: log.exists() and " ready." in log.read_text(errors="replace"), timeout=timeout, interval=0.2,
             what=f"the worker to start (log {log})")


@dataclass
class Fleet:
    """An API client on the module's settings, with the tiny dataset and model A active."""

    settings: Settings
    client: Any
    seeded: Seeded

    def headers(self, role: str = "pharmacist") -> dict[str, str]:
        """Auth headers for a role."""
        return {"X-API-Key": self.seeded.keys[Role(role)]}

    def start_job(self, **body: Any) -> int:
        """POST a job (dataset `tiny` unless given) as a pharmacist, or as an admin when it auto-promotes; its id."""
        role = "admin" if body.get("auto_promote") else "pharmacist"
        response = self.client.post(JOBS, json={"dataset": "tiny", **body}, headers=self.headers(role))
        assert response.status_code == 202, response.text
        return int(response.json()["id"])

    def job(self, job_id: int) -> dict[str, Any]:
        """GET the job."""
        response = self.client.get(f"{JOBS}/{job_id}", headers=self.headers())
        assert response.status_code == 200
        return dict(response.json())

    def wait_status(self, job_id: int, *statuses: str, timeout: float = 120.0) -> dict[str, Any]:
        """Until the job reaches one of `statuses` (AssertionError with the job on timeout or another end)."""
        def reached() -> dict[str, Any] | None:
            job = self.job(job_id)
            if job["status"] in statuses:
                return job
            assert job["status"] not in ("succeeded", "failed", "cancelled"), job
            return None

        return wait_for(reached, timeout=timeout, interval=0.2, what=f"job {job_id} to be {statuses}")

    def row(self, job_id: int) -> dict[str, Any]:
        """The job's row straight from the database."""
        return job_row(self.settings, job_id)


@pytest.fixture
def fleet(fleet_settings: Settings, postgres_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """A seeded database and a started API client; tables and job folders are emptied afterwards."""
    from fastapi.testclient import TestClient

    from app.main import create_app
    from tests.conftest import _truncate_all

    seeded = seed_training(fleet_settings, tiny_assets(tmp_path_factory.getbasetemp() / "tiny-assets"))
    client = TestClient(create_app(fleet_settings))
    client.__enter__()
    try:
        yield Fleet(fleet_settings, client, seeded)
    finally:
        client.__exit__(None, None, None)
        _truncate_all(postgres_url)
        shutil.rmtree(fleet_settings.data_dir / "jobs", ignore_errors=True)
