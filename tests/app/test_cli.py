"""`rxverify` operator commands: migrate (both ways, from any directory), catalog seed-pmi, apikey, serve, worker."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import inspect

from app import migrate
from app.cli import main
from app.config import Settings, get_settings
from app.db import create_db_engine
from app.orm import ApiKey, Product
from app.services.api_keys import hash_token
from tests.app.factories import count_rows
from tests.app.up_process import free_port

ROOT = Path(__file__).resolve().parents[2]


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> list[str]:
    """Run `rxverify ARGV` in-process and return its stdout lines."""
    get_settings.cache_clear()
    assert main(argv) == 0
    return capsys.readouterr().out.strip().splitlines()


@pytest.fixture
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """RXVERIFY_DATA_DIR for the commands, and a working directory far from the repository."""
    path = tmp_path / "data"
    monkeypatch.setenv("RXVERIFY_DATA_DIR", str(path))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # no alembic.ini here: migrate must find the package itself
    return path


def test_migrate_seed_and_key_then_use_the_key(data_dir: Path, capsys: pytest.CaptureFixture[str],
                                               make_client: Any) -> None:
    settings = Settings(data_dir=data_dir)
    assert run(["migrate"], capsys)[-1].endswith(f"is at revision {migrate.head_revision()}")
    assert run(["catalog", "seed-pmi"], capsys) == ["products added: 20",
                                                     "cost-matrix version: 1 (created, activated)"]
    assert run(["catalog", "seed-pmi"], capsys) == ["products added: 0", "cost-matrix version: 1 (unchanged)"]
    assert count_rows(settings, Product) == 20
    lines = run(["apikey", "create", "--role", "pharmacist", "--name", "alice"], capsys)
    token = lines[-1]
    assert token.startswith("rxv_") and len(lines) == 2
    client = make_client(settings)
    active = client.get("/v1/admin/cost-matrices/active", headers={"X-API-Key": token})
    assert active.status_code == 200 and active.json()["version"] == 1
    assert client.get("/v1/admin/api-keys", headers={"X-API-Key": token}).status_code == 403
    listed = run(["apikey", "list"], capsys)
    assert listed[0].split("\t")[2:] == ["pharmacist", "alice", "active"] and token not in listed[0]
    from app.db import Database

    database = Database(settings)
    with database.session() as session:
        assert session.get_one(ApiKey, 1).key_sha256 == hash_token(token)
    database.dispose()
    assert run(["apikey", "revoke", "1", "--reason", "left"], capsys) == ["revoked API key 1"]
    assert client.get("/v1/products", headers={"X-API-Key": token}).status_code == 401


def test_migrate_down_and_up_again(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = Settings(data_dir=data_dir)
    run(["migrate"], capsys)
    assert run(["migrate", "--downgrade", "base"], capsys)[-1].endswith("is at revision None")
    engine = create_db_engine(settings)
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    engine.dispose()
    run(["migrate"], capsys)
    assert migrate.current_revision(settings) == migrate.head_revision()


def test_each_data_dir_is_its_own_world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    for path in (first, second):
        monkeypatch.setenv("RXVERIFY_DATA_DIR", str(path))
        run(["migrate"], capsys)
    monkeypatch.setenv("RXVERIFY_DATA_DIR", str(first))
    run(["catalog", "seed-pmi"], capsys)
    assert count_rows(Settings(data_dir=first), Product) == 20
    assert count_rows(Settings(data_dir=second), Product) == 0
    assert sorted(p.name for p in second.iterdir() if p.suffix == ".db") == ["rxverify.db"]


def test_apikey_create_refuses_an_unknown_role(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["apikey", "create", "--role", "root", "--name", "x"])
    assert "invalid choice" in capsys.readouterr().err


def test_worker_command_starts_celery_with_the_queues(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from celery import Celery

    seen: dict[str, Any] = {}

    def fake_worker_main(self: Celery, argv: list[str]) -> None:
        seen["argv"], seen["broker"] = argv, self.conf.broker_url

    import worker.celery_app as celery_module

    monkeypatch.setattr(Celery, "worker_main", fake_worker_main)
    get_settings.cache_clear()
    # The module-level app was built when first imported; rebuild it for this test's data dir.
    monkeypatch.setattr(celery_module, "celery_app", celery_module.create_celery_app(get_settings()))
    assert main(["worker"]) == 0
    argv = seen["argv"]
    assert argv[:2] == ["worker", "--queues"] and argv[2] == "default,training"
    assert argv[argv.index("--pool") + 1] == "solo"
    assert seen["broker"] == f"sqla+sqlite:///{data_dir}/broker.sqlite"


@pytest.mark.slow
def test_serve_answers_healthz_and_docs(data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run(["migrate"], capsys)
    run(["catalog", "seed-pmi"], capsys)
    port = free_port()
    log = data_dir / "serve.log"
    process = subprocess.Popen([sys.executable, "-m", "app.cli", "serve", "--port", str(port)], cwd=ROOT,
                               env={**os.environ, "RXVERIFY_DATA_DIR": str(data_dir)}, stdout=log.open("wb"),
                               stderr=subprocess.STDOUT)
    try:
        deadline, health = time.monotonic() + 40, None
        while time.monotonic() < deadline and process.poll() is None:
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except httpx.TransportError:
                time.sleep(0.3)
        assert health is not None and health.status_code == 200, log.read_text()[-2000:]
        assert health.headers["x-request-id"]
        assert httpx.get(f"http://127.0.0.1:{port}/docs", timeout=5).status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).json()["database"]["ok"] is True
    finally:
        process.terminate()
        process.wait(timeout=20)
    assert '"logger": "rxverify.access"' in log.read_text()  # JSON access log lines
