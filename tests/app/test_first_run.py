"""`rxverify up`'s parts in-process: the key file, the port check, and a first run that is safe to interrupt."""

from __future__ import annotations

import json
import os
import socket
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from app.commands import first_run
from app.commands.up import KEY_VARIABLES, ensure_keys, key_file, port_problem, read_keys
from app.config import Settings
from app.db import Database
from app.orm import ApiKey, Dataset, ModelVersion, Role
from app.services.api_keys import authenticate, hash_token, revoke_api_key
from app.services.audit import Actor
from tests.app.factories import seed_catalog
from tests.conftest import settings_for

SHRUNK = {"demo_arch": "tiny_cnn", "demo_per_class": 6, "demo_photo_size": 32, "demo_image_size": 16, "demo_epochs": 1,
          "torch_threads": 1}


@pytest.fixture
def database(sqlite_settings: Settings) -> Iterator[Database]:
    """A seeded embedded database with shrunk first-run settings."""
    settings = settings_for(sqlite_settings.data_dir, **SHRUNK)
    settings.ensure_dirs()
    seed_catalog(settings)
    database = Database(settings)
    yield database
    database.dispose()


def _count(database: Database, table: Any) -> int:
    with database.session() as session:
        return session.scalar(select(func.count()).select_from(table)) or 0


def test_the_key_file_is_created_owner_only_read_back_and_repaired(database: Database,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    settings = database.settings
    previous = os.umask(0)  # even a permissive umask must not make the secrets readable by others
    try:
        keys = ensure_keys(settings, database)
    finally:
        os.umask(previous)
    path = key_file(settings)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and read_keys(path) == keys
    assert "API keys created (admin, pharmacist, client)" in capsys.readouterr().out
    with database.session() as session:
        for role, token in keys.items():
            assert authenticate(session, token).role == role
        stored = {key.key_sha256 for key in session.scalars(select(ApiKey))}
    assert stored == {hash_token(token) for token in keys.values()}  # only hashes in the database
    assert not any(token in path.read_text().replace(f"{KEY_VARIABLES[role]}={token}", "")
                   for role, token in keys.items())  # each secret once, on its own line

    assert ensure_keys(settings, database) == keys  # a second run: the same keys, nothing new
    assert f"API keys read from {path}" in capsys.readouterr().out and _count(database, ApiKey) == 3

    with database.session() as session:  # the client key is revoked behind the file's back
        revoke_api_key(session, key_id=authenticate(session, keys[Role.CLIENT]).key_id or 0, actor=Actor.cli("test"))
    repaired = ensure_keys(settings, database)
    assert repaired[Role.CLIENT] != keys[Role.CLIENT]
    assert {r: t for r, t in repaired.items() if r != Role.CLIENT} == {r: t for r, t in keys.items() if r != Role.CLIENT}
    assert "the client key" in capsys.readouterr().out and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_keys(path) == repaired and not list(path.parent.glob(".*tmp*"))


def test_port_problem_names_a_port_in_use() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        problem = port_problem("127.0.0.1", port)
        assert problem is not None and "in use" in problem
    assert port_problem("127.0.0.1", port) is None


@pytest.mark.slow
def test_a_half_rendered_dataset_is_resumed_and_a_foreign_one_rendered_again(database: Database,
                                                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = database.settings.data_dir / "first-run" / "synth"
    first_run.render_dataset(database.settings, out)
    images = sorted(out.rglob("*.jpg"))
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "complete": False}))  # as if killed midway
    for image in images[::3]:
        image.unlink()
    capsys.readouterr()
    first_run.render_dataset(database.settings, out)
    said = capsys.readouterr().out
    assert "resuming the synthetic dataset" in said
    assert f"{len(images[::3])} photos rendered ({len(images) - len(images[::3])} kept" in said
    assert sorted(out.rglob("*.jpg")) == images and json.loads((out / "manifest.json").read_text())["complete"]

    bigger = Settings(**{**database.settings.model_dump(), "demo_per_class": 7})  # settings changed in between
    first_run.render_dataset(bigger, out)
    assert "discarding" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["params"]["per_class"] == 7


@pytest.mark.slow
def test_a_crashed_training_registers_nothing_and_the_next_run_reuses_the_dataset(
        database: Database, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import models.commands.train as train

    real = train.run_training

    def crash(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("killed mid-training")

    monkeypatch.setattr(train, "run_training", crash)
    with pytest.raises(RuntimeError, match="killed mid-training"):
        first_run.ensure_model(database.settings, database)
    assert _count(database, ModelVersion) == 0 and _count(database, Dataset) == 1

    monkeypatch.setattr(train, "run_training", real)
    version_id = first_run.ensure_model(database.settings, database)
    said = capsys.readouterr().out
    assert "dataset 'demo' is registered" in said and "reusing it" in said
    assert f"model version {version_id} registered and active: test accuracy" in said
    assert _count(database, ModelVersion) == 1 and _count(database, Dataset) == 1
    with database.session() as session:  # the demo model is served with its unfamiliar-photo check
        version = session.get(ModelVersion, version_id)
        assert version is not None and version.metrics["familiarity"]["fitted"]
        assert (Path(version.path) / "familiarity.safetensors").is_file()
    assert not (database.settings.data_dir / "first-run").exists()
    assert first_run.ensure_model(database.settings, database) == version_id  # nothing more to do
    assert f"model version {version_id} (tiny_cnn, baseline) is active; reusing it" in capsys.readouterr().out
