"""Alembic, driven from code: `rxverify migrate` and the tests use these instead of alembic.ini."""

from __future__ import annotations

import logging

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError

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


class UnknownRevision(RuntimeError):
    """The database is at a revision this code's migrations do not have: made by a newer rxverify."""


def upgrade(settings: Settings, revision: str = "head") -> None:
    """Upgrade the database of `settings` to `revision` (UnknownRevision if it is at one this code lacks)."""
    current = current_revision(settings)
    if current is not None and not _known(current):
        raise UnknownRevision(f"the database is at revision {current}, which this code's migrations do not have "
                              f"(its newest is {head_revision()}): it was migrated by a newer rxverify. Run that "
                              "version, or restore a backup taken before its upgrade")
    logger.info("migrating database up", extra={"revision": revision})
    command.upgrade(alembic_config(settings), revision)


def _known(revision: str) -> bool:
    try:
        return ScriptDirectory(str(MIGRATIONS_DIR)).get_revision(revision) is not None
    except CommandError:  # "Can't locate revision"
        return False


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
