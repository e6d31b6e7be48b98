"""Alembic environment: the URL comes from Settings (or from a Settings passed in config.attributes)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text
from sqlalchemy.engine import Connection

import app.orm  # noqa: F401  (registers every table on Base.metadata)
from app.config import Settings, get_settings
from app.db import Base, create_db_engine

config = context.config
target_metadata = Base.metadata


def _settings() -> Settings:
    settings = config.attributes.get("settings")
    return settings if isinstance(settings, Settings) else get_settings()


def _configure(connection: Connection, *, transactional_ddl: bool | None = None) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        transactional_ddl=transactional_ddl,
    )


def run_migrations_offline() -> None:
    """Emit SQL to stdout (`alembic upgrade --sql`)."""
    settings = _settings()
    context.configure(url=settings.database_url, target_metadata=target_metadata, literal_binds=True,
                      compare_type=True, render_as_batch=settings.is_sqlite)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Run against a live database (a connection handed in by the caller, or one opened here)."""
    connection = config.attributes.get("connection")
    if isinstance(connection, Connection):
        _configure(connection)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_db_engine(_settings(), for_migrations=True)
    try:
        with engine.connect() as conn:
            # Our SQLite migration engine emits BEGIN itself (app.db), so its DDL is transactional too.
            _configure(conn, transactional_ddl=True)
            with context.begin_transaction():
                context.run_migrations()
            if conn.dialect.name == "sqlite":
                # Foreign keys are off while tables are rebuilt; prove nothing was left dangling.
                problems = conn.execute(text("PRAGMA foreign_key_check")).fetchall()
                if problems:
                    raise RuntimeError(f"foreign key violations after migration: {problems[:5]}")
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
