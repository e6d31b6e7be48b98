"""Migrations: up, down and up again on SQLite and PostgreSQL; the ORM matches the migrated schema."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select, text

from app import migrate
from app.config import Settings
from app.db import Base, Database, create_db_engine
from app.orm import ACTIVE_STATE_ID, ActiveState

TABLES = {"products", "cost_matrix_versions", "cost_matrix_entries", "active_state", "api_keys", "model_versions",
          "model_promotions", "datasets", "training_jobs", "verifications", "resolutions", "admin_audit_log"}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def empty_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    """Settings on an empty database of each kind (a new PostgreSQL database for each test)."""
    if request.param == "sqlite":
        return Settings(data_dir=tmp_path)
    factory: Callable[[], str] = request.getfixturevalue("pg_database_factory")
    return Settings(data_dir=tmp_path, database_url=factory())


def _tables(settings: Settings) -> set[str]:
    engine = create_db_engine(settings)
    try:
        return set(inspect(engine).get_table_names()) - {"alembic_version"}
    finally:
        engine.dispose()


def _schema_diff(settings: Settings) -> list[object]:
    engine = create_db_engine(settings)
    try:
        with engine.connect() as connection:
            context = MigrationContext.configure(connection, opts={"compare_type": True})
            return list(compare_metadata(context, Base.metadata))
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(empty_settings: Settings) -> None:
    assert migrate.current_revision(empty_settings) is None
    migrate.upgrade(empty_settings)
    assert migrate.current_revision(empty_settings) == migrate.head_revision()
    assert _tables(empty_settings) == TABLES
    migrate.downgrade(empty_settings, "base")
    assert migrate.current_revision(empty_settings) is None
    assert _tables(empty_settings) == set()
    migrate.upgrade(empty_settings)
    assert _tables(empty_settings) == TABLES
    assert _schema_diff(empty_settings) == []  # the ORM and the migrations describe the same schema


def test_upgrade_is_idempotent_and_creates_the_pointer_row(empty_settings: Settings) -> None:
    migrate.upgrade(empty_settings)
    migrate.upgrade(empty_settings)
    database = Database(empty_settings)
    try:
        with database.session() as session:
            state = session.scalars(select(ActiveState)).one()
            assert state.id == ACTIVE_STATE_ID and state.cost_matrix_version_id is None
    finally:
        database.dispose()


def test_every_table_is_covered_by_the_metadata() -> None:
    assert set(Base.metadata.tables) == TABLES


def test_sqlite_connections_enforce_foreign_keys_and_use_wal(sqlite_settings: Settings) -> None:
    engine = create_db_engine(sqlite_settings)
    try:
        with engine.connect() as connection:
            assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
            assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert connection.execute(text("PRAGMA synchronous")).scalar() == 2  # FULL: commits survive power loss
    finally:
        engine.dispose()
