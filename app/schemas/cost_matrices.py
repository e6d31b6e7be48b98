"""Cost-matrix schemas: c(true_ndc, predicted_ndc) is the cost of accepting true_ndc as predicted_ndc."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from app.schemas.common import MAX_ID, RequestModel

NdcText = Field(min_length=1, max_length=32, examples=["50111-0434"])


class CostChange(RequestModel):
    """Set one cell: the bottle holds `true_ndc`, the prescription says `predicted_ndc`."""

    true_ndc: str = NdcText
    predicted_ndc: str = NdcText
    cost: float = Field(strict=True, description="Finite, >= 0, <= the configured maximum; 0 on the diagonal; 1 = default.")


class CostMatrixCreate(RequestModel):
    """A new version: the parent's costs with `changes` applied. `parent_version` must be the newest version."""

    parent_version: int | None = Field(ge=1, le=MAX_ID, strict=True, description="The version these changes were made on (null only for the first).")
    reason: str = Field(min_length=1, max_length=2000)
    changes: list[CostChange] = Field(min_length=1, max_length=10_000)


class ActivateRequest(RequestModel):
    """Optional reason recorded in the audit log, and the version the caller saw active."""

    reason: str | None = Field(default=None, max_length=2000)
    expected_active: int | None = Field(
        default=None, ge=1, le=MAX_ID, strict=True,
        description="The version you saw active when you decided; 409 `active-changed` if another is active now "
                    "(someone else activated one since). Left out: no check.")


class RestoreRequest(RequestModel):
    """Make an older version's costs the newest version (not activated)."""

    parent_version: int = Field(ge=1, le=MAX_ID, strict=True,
                                description="The newest version, which the restored copy follows (409 if stale).")
    reason: str = Field(min_length=1, max_length=2000)


class CostEntry(BaseModel):
    """One non-default cell."""

    true_ndc: str
    predicted_ndc: str
    cost: float


class CostMatrixSummary(BaseModel):
    """A version without its entries."""

    version: int
    parent_version: int | None
    author: str
    reason: str
    created_at: datetime
    active: bool
    default_cost: float
    entry_count: int
    entries_sha256: str


class CostMatrixRead(CostMatrixSummary):
    """A version with every non-default cell (unlisted off-diagonal pairs cost `default_cost`)."""

    entries: list[CostEntry]


class CostDifferenceRead(BaseModel):
    """One pair whose cost differs."""

    true_ndc: str
    predicted_ndc: str
    from_cost: float
    to_cost: float


class CostMatrixActivated(CostMatrixRead):
    """The version now active, the one it replaced, and every pair whose effective cost changed."""

    previous_active: int | None
    changes: list[CostDifferenceRead]


class CostMatrixDiff(BaseModel):
    """The pairs whose effective cost differs between two versions."""

    from_version: int
    to_version: int
    changes: list[CostDifferenceRead]
