"""Shared fixtures: real PostgreSQL and Redis, embedded SQLite, an app/client factory and API keys per role.

- `sqlite_settings`: a fresh, migrated SQLite database (a copy of a session template) in tmp_path.
- `pg_settings`: the session's own throwaway PostgreSQL database (`rxv_test_<pid>_<hex>`, migrated once,
  dropped at the end); every table is truncated after each test, so nothing leaks between tests.
- `pg_session`: a Session on that database inside a transaction that is rolled back after the test.
- `db_settings`: parametrised over both databases.
- `redis_url` / `redis_prefix`: the real Redis and a random key prefix that is deleted afterwards.
- `make_client(settings)`: a TestClient on `create_app(settings)`; `api_key(settings, role)`: a token.
- `make_env(settings)` / `env` / `any_env`: a seeded app with a key per role (`env.as_role("admin")`).

When PostgreSQL or Redis is unreachable the tests that need them skip locally and FAIL when `CI` is set.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest

from app.config import Settings, get_settings
from app.db import get_database
from app.orm import Role

POSTGRES_ADMIN_URL = os.environ.get("TEST_POSTGRES_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def pytest_configure(config: pytest.Config) -> None:
    """Silence two third-party deprecation warnings that say nothing about rxverify's code."""
    config.addinivalue_line("filterwarnings", "ignore:Using `httpx` with `starlette.testclient`")
    # kombu's SQLAlchemy transport (the embedded broker) still uses a loader SQLAlchemy 2.1 deprecates.
    config.addinivalue_line("filterwarnings", "ignore:The ``noload`` loader strategy is deprecated")


def in_ci() -> bool:
    """True when the CI variable is set to something truthy (then missing services are failures)."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def service_unavailable(what: str, error: BaseException) -> NoReturn:
    """Skip locally, fail in CI: tests that need a real service must really run there."""
    message = f"{what} is not reachable: {type(error).__name__}: {error}"
    if in_ci():
        pytest.fail(f"{message} (CI is set, so this is a failure, not a skip)", pytrace=False)
    pytest.skip(message)


def settings_for(data_dir: Path, **overrides: Any) -> Settings:
    """Settings rooted at data_dir (embedded URLs unless overridden)."""
    return Settings(data_dir=data_dir, **overrides)


@pytest.fixture(autouse=True)
def _hermetic_settings(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No test sees the developer's RXVERIFY_* variables or writes to ./var."""
    for name in list(os.environ):
        if name.startswith("RXVERIFY_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("RXVERIFY_DATA_DIR", str(tmp_path_factory.mktemp("default-data")))
    get_settings.cache_clear()
    get_database.cache_clear()
    yield
    get_settings.cache_clear()
    get_database.cache_clear()


# --- SQLite ---------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite database file, made once per session and copied for each test."""
    from app import migrate

    data_dir = tmp_path_factory.mktemp("sqlite-template")
    migrate.upgrade(settings_for(data_dir))
    return data_dir / "rxverify.db"


@pytest.fixture
def sqlite_settings(sqlite_template: Path, tmp_path: Path) -> Settings:
    """Embedded mode on a fresh copy of the migrated database (SQLite broker and results too)."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    shutil.copyfile(sqlite_template, data_dir / "rxverify.db")
    return settings_for(data_dir)


# --- PostgreSQL -----------------------------------------------------------------------------------
def _pg_admin_engine() -> Any:
    from sqlalchemy import create_engine

    return create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 3})


@pytest.fixture(scope="session")
def pg_database_factory() -> Iterator[Callable[[], str]]:
    """Make empty throwaway databases (`rxv_test_<pid>_<hex>`), all dropped at the end of the session."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    engine = _pg_admin_engine()
    created: list[str] = []

    def make() -> str:
        try:
            with engine.connect() as connection:
                name = f"rxv_test_{os.getpid()}_{secrets.token_hex(4)}"
                connection.execute(text(f'CREATE DATABASE "{name}"'))
        except Exception as exc:  # a missing server: skip (or fail in CI)
            service_unavailable(f"PostgreSQL at {POSTGRES_ADMIN_URL}", exc)
        created.append(name)
        return make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)

    yield make
    if created:
        with engine.connect() as connection:
            for name in created:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    engine.dispose()


@pytest.fixture(scope="session")
def postgres_url(pg_database_factory: Callable[[], str], tmp_path_factory: pytest.TempPathFactory) -> str:
    """The session's own PostgreSQL database, migrated to head."""
    from app import migrate

    url = pg_database_factory()
    migrate.upgrade(settings_for(tmp_path_factory.mktemp("pg-migrate"), database_url=url))
    return url


def _truncate_all(url: str) -> None:
    from sqlalchemy import create_engine, text

    from app.db import Base
    from app.orm import ACTIVE_STATE_ID

    engine = create_engine(url)
    try:
        with engine.begin() as connection:
            names = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)
            connection.execute(text(f"TRUNCATE {names} RESTART IDENTITY CASCADE"))
            connection.execute(text("INSERT INTO active_state (id, updated_at) VALUES (:id, now())"),
                               {"id": ACTIVE_STATE_ID})
    finally:
        engine.dispose()


@pytest.fixture
def pg_settings(postgres_url: str, tmp_path: Path) -> Iterator[Settings]:
    """Full mode on the session's PostgreSQL database; every table is emptied after the test."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    yield settings_for(data_dir, database_url=postgres_url)
    _truncate_all(postgres_url)


@pytest.fixture
def pg_session(pg_settings: Settings) -> Iterator[Any]:
    """A Session inside an outer transaction that is rolled back (service code may commit savepoints)."""
    from sqlalchemy.orm import Session

    from app.db import create_db_engine

    engine = create_db_engine(pg_settings)
    connection = engine.connect()
    transaction = connection.begin()
    session = Session(bind=connection, join_transaction_mode="create_savepoint", expire_on_commit=False)
    try:
        yield session
    finally:
        session.close()
        transaction.rollback()
        connection.close()
        engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_settings(request: pytest.FixtureRequest) -> Settings:
    """The same test on embedded SQLite and on PostgreSQL."""
    fixture = "sqlite_settings" if request.param == "sqlite" else "pg_settings"
    settings: Settings = request.getfixturevalue(fixture)
    return settings


# --- Redis ----------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def redis_url() -> str:
    """The real Redis (pinged once per session)."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
    try:
        client.ping()
    except Exception as exc:
        service_unavailable(f"Redis at {REDIS_URL}", exc)
    finally:
        client.close()
    return REDIS_URL


@pytest.fixture
def redis_prefix(redis_url: str) -> Iterator[str]:
    """A random key prefix on the shared Redis; every key under it is deleted after the test."""
    prefix = f"rxv_test_{os.getpid()}_{secrets.token_hex(4)}:"
    yield prefix
    delete_redis_prefix(redis_url, prefix)


def delete_redis_prefix(redis_url: str, prefix: str) -> None:
    """Delete every key under `prefix` on the shared Redis."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=500))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


# --- app, client and keys -------------------------------------------------------------------------
@pytest.fixture
def make_client() -> Iterator[Callable[..., Any]]:
    """`make_client(settings, raise_server_exceptions=True)`: a started TestClient, closed afterwards."""
    from fastapi.testclient import TestClient

    from app.main import create_app

    clients: list[Any] = []

    def make(settings: Settings, *, raise_server_exceptions: bool = True, app: Any = None) -> TestClient:
        client = TestClient(app or create_app(settings), raise_server_exceptions=raise_server_exceptions)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def api_key() -> Callable[..., str]:
    """`api_key(settings, role, name=None)`: create a key in that database and return its token."""
    from tests.app.factories import create_key

    return create_key


@dataclass
class ApiEnv:
    """A running app on a seeded database, with one API key per role."""

    settings: Settings
    client: Any
    keys: dict[Role, str]

    def as_role(self, role: Role | str) -> dict[str, str]:
        """Headers authenticating as `role`."""
        return {"X-API-Key": self.keys[Role(role)]}


@pytest.fixture
def make_env(make_client: Callable[..., Any]) -> Callable[..., ApiEnv]:
    """`make_env(settings)`: seed the PMI catalog, create a key per role, start a client."""
    from tests.app.factories import create_key, seed_catalog

    def make(settings: Settings, *, raise_server_exceptions: bool = True) -> ApiEnv:
        seed_catalog(settings)
        keys = {role: create_key(settings, role) for role in Role}
        return ApiEnv(settings, make_client(settings, raise_server_exceptions=raise_server_exceptions), keys)

    return make


@pytest.fixture(scope="session")
def seeded_sqlite_template(sqlite_template: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[Role, str]]:
    """A migrated, PMI-seeded SQLite file with one key per role (made once; `env` copies it)."""
    from sqlalchemy import create_engine, text

    from tests.app.factories import create_key, seed_catalog

    data_dir = tmp_path_factory.mktemp("sqlite-seeded")
    shutil.copyfile(sqlite_template, data_dir / "rxverify.db")
    settings = settings_for(data_dir)
    seed_catalog(settings)
    keys = {role: create_key(settings, role) for role in Role}
    engine = create_engine(settings.database_url)
    with engine.connect() as connection:  # fold the WAL into the file before it is copied
        connection.execute(text("PRAGMA wal_checkpoint(TRUNCATE)"))
    engine.dispose()
    return data_dir / "rxverify.db", keys


@pytest.fixture
def env(seeded_sqlite_template: tuple[Path, dict[Role, str]], tmp_path: Path,
        make_client: Callable[..., Any]) -> ApiEnv:
    """An ApiEnv on a fresh copy of the seeded embedded database."""
    template, keys = seeded_sqlite_template
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    shutil.copyfile(template, data_dir / "rxverify.db")
    settings = settings_for(data_dir)
    return ApiEnv(settings, make_client(settings), dict(keys))


@pytest.fixture
def any_env(db_settings: Settings, make_env: Callable[..., ApiEnv]) -> ApiEnv:
    """An ApiEnv on SQLite and on PostgreSQL (parametrised)."""
    return make_env(db_settings)
