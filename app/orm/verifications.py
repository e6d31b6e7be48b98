"""The verification audit log and the pharmacists' resolutions of what was really in a bottle."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, CheckConstraint, Float, ForeignKey, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base
from app.orm.catalog import NDC_KEY_LENGTH
from app.orm.types import UTCDateTime, utcnow


class Verification(Base):
    """One answered verification request (a row per verdict; never updated)."""

    __tablename__ = "verifications"
    __table_args__ = (
        UniqueConstraint("api_key_id", "idempotency_key"),
        CheckConstraint("verdict IN ('match', 'mismatch', 'review')", name="verdict"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)  # UUID, safe to show to clients
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, index=True)
    api_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"))
    client_reference: Mapped[str | None] = mapped_column(String(200))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    request_sha256: Mapped[str | None] = mapped_column(String(64))
    prescribed_ndc_input: Mapped[str] = mapped_column(String(64))
    prescribed_ndc: Mapped[str | None] = mapped_column(String(NDC_KEY_LENGTH), index=True)
    verdict: Mapped[str] = mapped_column(String(20), index=True)
    reason: Mapped[str] = mapped_column(String(64))
    predicted_ndc: Mapped[str | None] = mapped_column(String(NDC_KEY_LENGTH))
    probability_prescribed: Mapped[float | None] = mapped_column(Float)
    expected_accept_cost: Mapped[float | None] = mapped_column(Float)
    top: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    conformal_set: Mapped[list[str] | None] = mapped_column(JSON)
    model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"), index=True)
    cost_matrix_version_id: Mapped[int | None] = mapped_column(ForeignKey("cost_matrix_versions.id"))
    image_sha256: Mapped[str] = mapped_column(String(64))
    image_path: Mapped[str | None] = mapped_column(String(1000))
    image_format: Mapped[str | None] = mapped_column(String(10))
    image_width: Mapped[int | None] = mapped_column(Integer)
    image_height: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    response: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # replayed for idempotent retries


class Resolution(Base):
    """What a pharmacist found in the bottle; with a retained image it becomes a labelled example."""

    __tablename__ = "resolutions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    verification_id: Mapped[str] = mapped_column(ForeignKey("verifications.id"), index=True)
    actual_ndc: Mapped[str | None] = mapped_column(ForeignKey("products.ndc"))  # None: not a catalog product
    resolved_by: Mapped[str] = mapped_column(String(200))
    resolved_by_key_id: Mapped[int | None] = mapped_column(ForeignKey("api_keys.id"))
    note: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
