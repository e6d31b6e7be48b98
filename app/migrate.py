"""Alembic, driven from code: `rxverify migrate` and the tests use these instead of alembic.ini."""

from __future__ import annotations

import logging

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from app.config import Settings
from app.db import create_db_engine
from migrations import MIGRATIONS_DIR

logger = logging.getLogger(__name__)


def alembic_config(settings: Settings) -> Config:
    """An Alembic Config pointing at the installed migrations package and at these settings."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["settings"] = settings
    return config


def upgrade(settings: Settings, revision: str = "head") -> None:
    """Upgrade the database of `settings` to `revision`."""
    logger.info("migrating database up", extra={"revision": revision})
    command.upgrade(alembic_config(settings), revision)


def downgrade(settings: Settings, revision: str = "base") -> None:
    """Downgrade the database of `settings` to `revision`."""
    logger.info("migrating database down", extra={"revision": revision})
    command.downgrade(alembic_config(settings), revision)


def head_revision() -> str | None:
    """The newest revision in the migrations package."""
    return ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()


def current_revision(settings: Settings) -> str | None:
    """The revision the database is at (None for an empty database)."""
    engine = create_db_engine(settings)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()
