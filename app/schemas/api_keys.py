"""API key schemas; the token itself appears once, in the creation response."""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from app.orm import Role
from app.schemas.common import ReadModel, RequestModel


class ApiKeyCreate(RequestModel):
    """A new key for a person or a system."""

    name: str = Field(min_length=1, max_length=200)
    role: Role


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
