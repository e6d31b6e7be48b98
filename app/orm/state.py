"""The singleton row that says what is active: the cost-matrix version and the model version."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import CheckConstraint, ForeignKey, Integer
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base
from app.orm.types import UTCDateTime, utcnow

ACTIVE_STATE_ID = 1


class ActiveState(Base):
    """Pointers to the active versions; exactly one row (id = 1), created by the first migration."""

    __tablename__ = "active_state"
    __table_args__ = (CheckConstraint("id = 1", name="singleton"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, default=ACTIVE_STATE_ID)
    cost_matrix_version_id: Mapped[int | None] = mapped_column(ForeignKey("cost_matrix_versions.id"))
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
