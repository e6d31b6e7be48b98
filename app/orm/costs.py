"""Cost-matrix versions: immutable, linear history (each version has at most one successor)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import CheckConstraint, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.db import Base
from app.orm.catalog import NDC_KEY_LENGTH
from app.orm.types import UTCDateTime, utcnow


class CostMatrixVersion(Base):
    """One immutable version; only pairs whose cost differs from the default (1) have entries."""

    __tablename__ = "cost_matrix_versions"
    # The unique parent is what makes concurrent edits safe: two edits of one parent cannot both commit.
    # On PostgreSQL NULLs are not distinct here either, so there is exactly one root version.
    __table_args__ = (UniqueConstraint("parent_id", postgresql_nulls_not_distinct=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("cost_matrix_versions.id"))
    author: Mapped[str] = mapped_column(String(200))
    author_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"))
    reason: Mapped[str] = mapped_column(Text)
    default_cost: Mapped[float] = mapped_column(Float, default=1.0)
    entries_sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)

    entries: Mapped[list[CostMatrixEntry]] = relationship(
        back_populates="version", order_by="(CostMatrixEntry.true_ndc, CostMatrixEntry.predicted_ndc)",
        cascade="all, delete-orphan")


class CostMatrixEntry(Base):
    """c(true_ndc, predicted_ndc) in one version: the bottle holds true_ndc, the prescription says predicted_ndc."""

    __tablename__ = "cost_matrix_entries"
    __table_args__ = (
        UniqueConstraint("version_id", "true_ndc", "predicted_ndc"),
        CheckConstraint("cost >= 0", name="cost_non_negative"),
        CheckConstraint("true_ndc <> predicted_ndc", name="off_diagonal"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("cost_matrix_versions.id", ondelete="CASCADE"), index=True)
    true_ndc: Mapped[str] = mapped_column(ForeignKey("products.ndc"))
    predicted_ndc: Mapped[str] = mapped_column(ForeignKey("products.ndc"))
    cost: Mapped[float] = mapped_column(Float)

    version: Mapped[CostMatrixVersion] = relationship(back_populates="entries")


__all__ = ["NDC_KEY_LENGTH", "CostMatrixEntry", "CostMatrixVersion"]
