"""Plain test-data factories (no fixtures): seed a database, create keys, build requests."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from app.config import Settings
from app.db import Database
from app.orm import Role
from app.services.api_keys import create_api_key
from app.services.audit import Actor
from app.services.catalog_seed import SeedResult, seed_pmi

FURO, GLIP, TRAZ = "00378-0208", "00591-0461", "50111-0434"


def seed_catalog(settings: Settings) -> SeedResult:
    """Seed the PMI catalog and expert costs into the settings' database."""
    database = Database(settings)
    try:
        with database.session() as session:
            return seed_pmi(session, actor=Actor.cli("test seed"), max_cost=settings.max_cost)
    finally:
        database.dispose()


def create_key(settings: Settings, role: Role | str, name: str | None = None) -> str:
    """A new API key token with this role."""
    role = Role(role)
    database = Database(settings)
    try:
        with database.session() as session:
            _key, token = create_api_key(session, role=role, name=name or f"test {role.value}",
                                         actor=Actor.cli("test"))
    finally:
        database.dispose()
    return token


def headers(token: str) -> dict[str, str]:
    """The auth header for a token."""
    return {"X-API-Key": token}


def count_rows(settings: Settings, model: Any) -> int:
    """How many rows a table has."""
    database = Database(settings)
    try:
        with database.session() as session:
            return int(session.scalar(select(func.count()).select_from(model)) or 0)
    finally:
        database.dispose()


def change(true_ndc: str, predicted_ndc: str, cost: Any) -> dict[str, Any]:
    """One entry of a cost-matrix edit."""
    return {"true_ndc": true_ndc, "predicted_ndc": predicted_ndc, "cost": cost}


def edit(parent: int | None, *changes: dict[str, Any], reason: str = "test edit") -> dict[str, Any]:
    """A POST /v1/admin/cost-matrices body."""
    return {"parent_version": parent, "reason": reason, "changes": list(changes)}
