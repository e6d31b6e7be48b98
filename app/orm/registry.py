"""Model registry: datasets, model versions (immutable checkpoints) and the promotion history."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, CheckConstraint, Float, ForeignKey, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base
from app.orm.types import UTCDateTime, utcnow


class Dataset(Base):
    """A registered image folder in the PMI layout (`train|valid|test/<NDC>/*`)."""

    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    path: Mapped[str] = mapped_column(String(1000))
    source: Mapped[str] = mapped_column(String(20), default="pmi")  # pmi | synthetic | feedback
    fingerprint: Mapped[str | None] = mapped_column(String(64))
    counts: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # {split: {ndc: n}}
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ModelVersion(Base):
    """A trained checkpoint, addressed by the SHA-256 of its weights, with lineage and metrics."""

    __tablename__ = "model_versions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), unique=True)
    path: Mapped[str] = mapped_column(String(1000))
    arch: Mapped[str] = mapped_column(String(50))
    method: Mapped[str] = mapped_column(String(30))
    output_kind: Mapped[str] = mapped_column(String(10), default="logits")
    classes: Mapped[list[str]] = mapped_column(JSON)
    image_size: Mapped[int | None] = mapped_column(Integer)
    temperature: Mapped[float | None] = mapped_column(Float)
    # candidate (registered) | promoted (served at some point) | rejected (failed the gate) | retired
    status: Mapped[str] = mapped_column(String(20), default="candidate")
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    cost_matrix_version_id: Mapped[int | None] = mapped_column(ForeignKey("cost_matrix_versions.id"))
    dataset_id: Mapped[int | None] = mapped_column(ForeignKey("datasets.id"))
    dataset_fingerprint: Mapped[str | None] = mapped_column(String(64))
    code_version: Mapped[str | None] = mapped_column(String(64))
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    decision: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    checkpoint_metadata: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ModelPromotion(Base):
    """Append-only history of promotions and rollbacks: who, when, why, from which version to which."""

    __tablename__ = "model_promotions"
    __table_args__ = (CheckConstraint("action IN ('promote', 'auto_promote', 'rollback', 'activate')",
                                      name="action"),
                      CheckConstraint("outcome IN ('applied', 'refused')", name="outcome"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    action: Mapped[str] = mapped_column(String(20))
    from_model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    to_model_version_id: Mapped[int] = mapped_column(ForeignKey("model_versions.id"))
    actor: Mapped[str] = mapped_column(String(200))
    actor_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"))
    reason: Mapped[str | None] = mapped_column(Text)
    forced: Mapped[bool] = mapped_column(Boolean, default=False)
    gate: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    # refused: an automatic promotion that failed the gate (recorded; the active model did not change).
    outcome: Mapped[str] = mapped_column(String(20), default="applied", server_default="applied")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
