"""API key schemas; the token itself appears once, in the creation response."""

from __future__ import annotations

from datetime import datetime

from pydantic import Field, field_validator

from app.orm import Role
from app.schemas.common import ReadModel, RequestModel


class ApiKeyCreate(RequestModel):
    """A new key for a person or a system."""

    name: str = Field(min_length=1, max_length=200)
    role: Role

    @field_validator("name")
    @classmethod
    def _not_an_operator_name(cls, name: str) -> str:
        # Audit entries and key listings name the server's operator `cli:<command>` (app.services.audit.
        # Actor.cli); a key named so would pass for the operator wherever only the name is shown.
        if name.lower().startswith("cli:"):
            raise ValueError("names starting with 'cli:' are reserved for the server's command line")
        return name


class ApiKeyRevoke(RequestModel):
    """Optional reason recorded in the audit log."""

    reason: str | None = Field(default=None, max_length=2000)


class ApiKeyRead(ReadModel):
    """A key's public facts (never its hash)."""

    id: int
    name: str
    role: Role
    prefix: str
    created_by: str
    created_at: datetime
    revoked_at: datetime | None


class ApiKeyCreated(ApiKeyRead):
    """The new key; `key` is shown only here."""

    key: str
