"""Training jobs: requested over the API, run by a Celery worker; progress lives here, not in Celery."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, CheckConstraint, ForeignKey, Index, Integer, String, Text, text
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base
from app.orm.types import UTCDateTime, utcnow

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
# Jobs in these states absorb an identical request; a failed or cancelled job may be requested again.
_DEDUPLICATING = "status IN ('queued', 'running', 'succeeded')"


class TrainingJob(Base):
    """One fine-tuning run with its inputs, lease, progress and result."""

    __tablename__ = "training_jobs"
    __table_args__ = (
        CheckConstraint("status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')", name="status"),
        # Two identical requests racing: the database lets exactly one of them in.
        Index("uq_training_jobs_request_sha256_live", "request_sha256", unique=True,
              postgresql_where=text(_DEDUPLICATING), sqlite_where=text(_DEDUPLICATING)),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[str] = mapped_column(String(20), default="queued", index=True)
    method: Mapped[str] = mapped_column(String(30))
    dataset_id: Mapped[int | None] = mapped_column(ForeignKey("datasets.id"))
    dataset_name: Mapped[str] = mapped_column(String(100))
    include_feedback: Mapped[bool] = mapped_column(Boolean, default=False)
    # With include_feedback: resolutions up to this id are used, so the request stays reproducible.
    feedback_through_id: Mapped[int | None] = mapped_column(Integer)
    base_model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    cost_matrix_version_id: Mapped[int | None] = mapped_column(ForeignKey("cost_matrix_versions.id"))
    hyperparameters: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    seed: Mapped[int] = mapped_column(Integer, default=0)
    auto_promote: Mapped[bool] = mapped_column(Boolean, default=False)
    # SHA-256 of the canonical request: identical requests are deduplicated to the existing job.
    request_sha256: Mapped[str] = mapped_column(String(64), index=True)
    progress: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    result: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text)
    celery_task_id: Mapped[str | None] = mapped_column(String(64))
    # The lease stops a redelivered task from running a job twice at once.
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    resume_path: Mapped[str | None] = mapped_column(String(1000))
    result_model_version_id: Mapped[int | None] = mapped_column(ForeignKey("model_versions.id"))
    created_by: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
