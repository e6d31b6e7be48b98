"""API keys: only a SHA-256 of the token is stored; the prefix finds the row."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import CheckConstraint, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base
from app.orm.types import UTCDateTime, utcnow


class Role(StrEnum):
    """Roles, least to most privileged: client < pharmacist < admin."""

    CLIENT = "client"
    PHARMACIST = "pharmacist"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        """Position in the hierarchy (higher includes the lower ones)."""
        return _RANKS[self]

    def includes(self, required: Role) -> bool:
        """True when this role may do what `required` may do."""
        return self.rank >= required.rank


_RANKS = {Role.CLIENT: 0, Role.PHARMACIST: 1, Role.ADMIN: 2}


class ApiKey(Base):
    """A caller's key; revoked keys stay for the audit trail."""

    __tablename__ = "api_keys"
    __table_args__ = (CheckConstraint("role IN ('client', 'pharmacist', 'admin')", name="role"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    key_sha256: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(200))
    role: Mapped[str] = mapped_column(String(20))
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    @property
    def role_enum(self) -> Role:
        """The role as a Role."""
        return Role(self.role)
