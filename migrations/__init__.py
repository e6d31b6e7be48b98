"""Alembic migrations (shipped as a package so `rxverify migrate` finds them from any directory)."""

from pathlib import Path

MIGRATIONS_DIR = Path(__file__).resolve().parent
