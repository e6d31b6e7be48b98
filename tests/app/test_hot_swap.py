"""Hot-swap: every API process follows the active version without failing a request.

- under concurrent verifications, a promotion and a rollback swap the served model with zero failures
  and within 5 s (the promoting process pokes its own follower);
- a second process learns of a promotion through Redis pub/sub (its poll is set to a minute);
- in embedded mode the database poll alone picks up a change made by another process;
- a checkpoint that fails to load leaves the old model serving and raises the alert metric.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from app.config import Settings
from app.db import Database
from app.orm import ModelVersion, Role
from app.services.audit import Actor
from app.services.model_registry import activate_model
from tests.worker.factories import (
    CLASSES,
    Seeded,
    jpeg_of,
    seed_training,
    seeded_sqlite_settings,
    tiny_assets,
    wait_for,
)

MODELS = "/v1/admin/models"


class Load:
    """Client threads posting verifications until stopped; every answer is recorded."""

    def __init__(self, client: Any, key: str, images: list[bytes], *, threads: int) -> None:
        self.client, self.key, self.images = client, key, images
        self.answers: list[tuple[float, int, int | None]] = []  # (time, status, model_version)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(threads)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _run(self, index: int) -> None:
        n = index
        while not self._stop.is_set():
            image = self.images[n % len(self.images)]
            n += 1
            response = self.client.post("/v1/verifications", files={"image": ("b.jpg", image, "image/jpeg")},
                                        data={"prescribed_ndc": CLASSES[n % len(CLASSES)]},
                                        headers={"X-API-Key": self.key})
            version = response.json().get("model_version") if response.status_code == 200 else None
            self.answers.append((time.monotonic(), response.status_code, version))

    def serving(self, version: int, *, after: float) -> bool:
        """True once an answer started after `after` came from `version`."""
        return any(t > after and v == version for t, _status, v in list(self.answers))

    def failures(self) -> list[tuple[float, int, int | None]]:
        """Answers that were not 200."""
        return [a for a in self.answers if a[1] != 200]


def _images(assets_root: Path) -> list[bytes]:
    return [jpeg_of(path) for path in sorted((assets_root / "tiny-dataset" / "test").rglob("*.jpg"))[:6]]


def _promote(client: Any, seeded: Seeded, model_id: int) -> float:
    started = time.monotonic()
    response = client.post(f"{MODELS}/{model_id}/promote", json={"force": True, "reason": "swap test"},
                           headers={"X-API-Key": seeded.keys[Role.ADMIN]})
    assert response.status_code == 200, response.text
    return started


def test_swaps_under_concurrent_requests_fail_nothing_and_finish_within_5_s(
        tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, make_client: Callable[..., Any]) -> None:
    root = tmp_path_factory.getbasetemp()
    assets = tiny_assets(root / "tiny-assets")
    settings, seeded = seeded_sqlite_settings(root, assets, tmp_path / "data", model_poll_seconds=30.0)
    client = make_client(settings)
    admin = {"X-API-Key": seeded.keys[Role.ADMIN]}
    with Load(client, seeded.keys[Role.CLIENT], _images(root / "tiny-assets"), threads=6) as load:
        wait_for(lambda: len(load.answers) >= 12, timeout=30, what="steady load")
        promoted_at = _promote(client, seeded, 2)
        wait_for(lambda: load.serving(2, after=promoted_at), timeout=5, interval=0.02, what="model 2 served")
        rollback_at = time.monotonic()
        assert client.post(f"{MODELS}/rollback", json={"reason": "back"}, headers=admin).status_code == 200
        wait_for(lambda: load.serving(1, after=rollback_at), timeout=5, interval=0.02, what="model 1 served")
        count = len(load.answers)
        wait_for(lambda: len(load.answers) >= count + 6, timeout=30, what="answers after the swaps")
    assert load.failures() == []
    assert {v for _t, _s, v in load.answers} == {1, 2}
    follower = client.app.state.model_follower
    assert follower.swaps == 2 and follower.last_swap_s < 5


@pytest.mark.postgres
@pytest.mark.redis
def test_a_second_process_follows_through_redis_pubsub(
        pg_settings: Settings, redis_url: str, redis_prefix: str, tmp_path_factory: pytest.TempPathFactory,
        make_client: Callable[..., Any]) -> None:
    root = tmp_path_factory.getbasetemp()
    settings = pg_settings.model_copy(update={"redis_url": redis_url, "redis_key_prefix": redis_prefix,
                                              "model_poll_seconds": 60.0})
    seeded = seed_training(settings, tiny_assets(root / "tiny-assets"), other_model=True)
    first, second = make_client(settings), make_client(settings)  # two API processes on one database
    key = seeded.keys[Role.CLIENT]
    image = _images(root / "tiny-assets")[0]

    def version_of(client: Any) -> int:
        response = client.post("/v1/verifications", files={"image": ("b.jpg", image, "image/jpeg")},
                               data={"prescribed_ndc": CLASSES[0]}, headers={"X-API-Key": key})
        assert response.status_code == 200, response.text
        return int(response.json()["model_version"])

    assert version_of(first) == version_of(second) == 1
    time.sleep(0.5)  # both subscribers are connected
    promoted_at = _promote(first, seeded, 2)
    wait_for(lambda: version_of(second) == 2, timeout=5, interval=0.05, what="the second process to swap")
    assert time.monotonic() - promoted_at < 5
    assert version_of(first) == 2


def test_embedded_mode_polls_the_database(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory,
                                          make_client: Callable[..., Any]) -> None:
    root = tmp_path_factory.getbasetemp()
    settings, _seeded = seeded_sqlite_settings(root, tiny_assets(root / "tiny-assets"), tmp_path / "data",
                                              model_poll_seconds=0.3)
    client = make_client(settings)
    engine = client.app.state.engine
    assert engine.current.version == "1" and settings.redis_url is None
    database = Database(settings)  # another process (a worker's auto-promotion) changes the active version
    try:
        with database.session() as session:
            activate_model(session, model_version_id=2, actor=Actor.cli("elsewhere"), action="auto_promote")
    finally:
        database.dispose()
    wait_for(lambda: engine.current.version == "2", timeout=5, interval=0.05, what="the poll to swap")


def test_a_checkpoint_that_fails_to_load_leaves_the_old_model_serving(
        tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, make_client: Callable[..., Any]) -> None:
    root = tmp_path_factory.getbasetemp()
    settings, seeded = seeded_sqlite_settings(root, tiny_assets(root / "tiny-assets"), tmp_path / "data",
                                              model_poll_seconds=30.0)
    broken = tmp_path / "broken"
    broken.mkdir()
    database = Database(settings)
    try:
        with database.session() as session:
            good = session.scalars(select(ModelVersion).where(ModelVersion.id == 2)).one()
            (broken / "metadata.json").write_text(Path(good.path, "metadata.json").read_text())
            (broken / "model.safetensors").write_bytes(b"not safetensors")
            session.add(ModelVersion(sha256="f" * 64, path=str(broken), arch=good.arch, method=good.method,
                                     classes=good.classes, image_size=good.image_size, temperature=good.temperature,
                                     status="candidate", metrics={}, decision=good.decision,
                                     checkpoint_metadata=good.checkpoint_metadata, created_by="tests"))
            session.flush()
            broken_id = session.scalars(select(ModelVersion.id).where(ModelVersion.sha256 == "f" * 64)).one()
    finally:
        database.dispose()
    client = make_client(settings)
    engine = client.app.state.engine
    _promote(client, seeded, broken_id)
    wait_for(lambda: engine.metrics.swap_failed._value.get() == 1, timeout=10, interval=0.05, what="the alert")
    assert engine.current.version == "1"
    response = client.post("/v1/verifications", files={"image": ("b.jpg", _images(root / "tiny-assets")[0],
                                                                 "image/jpeg")},
                           data={"prescribed_ndc": CLASSES[0]}, headers={"X-API-Key": seeded.keys[Role.CLIENT]})
    assert response.status_code == 200 and response.json()["model_version"] == 1
    assert "rxverify_model_swap_failed 1.0" in client.get("/metrics").text


def test_a_database_outage_logs_one_traceback_not_one_every_poll(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The follower polls every RXVERIFY_MODEL_POLL_SECONDS (2 s): while the database is down it logged an
    ERROR with a traceback at each poll. Now: one, a line a minute after it, and one when it is back."""
    import asyncio
    import logging

    from app.services.model_follower import ModelFollower

    settings = Settings(data_dir=tmp_path, model_poll_seconds=0.01)
    follower = ModelFollower(engine=None, database=None, settings=settings)  # type: ignore[arg-type]
    outcomes = iter([ConnectionError("database down")] * 20 + [None] * 3)

    async def sync() -> None:
        outcome = next(outcomes, None)
        if outcome is not None:
            raise outcome

    follower.sync = sync  # type: ignore[method-assign]

    async def run() -> None:
        task = asyncio.create_task(follower._poll_loop())
        await asyncio.sleep(0.6)
        task.cancel()

    with caplog.at_level(logging.INFO, logger="app.services.model_follower"):
        asyncio.run(run())
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("could not follow the active model version") == 1
    assert [r.exc_info is not None for r in caplog.records if "could not follow" in r.getMessage()] == [True]
    assert not [m for m in messages if m.startswith("still cannot follow")]  # within the first minute
    assert any(m.startswith("following the active model version again") for m in messages)
