"""Model registry responses and promotion requests (/v1/admin/models)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, Field

from app.schemas.common import MAX_ID, RequestModel

ExpectedActive = Field(default=None, ge=1, le=MAX_ID, strict=True,
                       description="The model version you saw active when you decided; 409 `active-changed` if "
                                   "another is active now (someone else promoted or rolled back since). Left out: "
                                   "no check.")


class PromoteRequest(RequestModel):
    """Promote a model version; `force` overrides a failed gate and then needs a `reason` (audited)."""

    reason: str | None = Field(default=None, max_length=2000)
    force: bool = Field(default=False, strict=True)
    expected_active: int | None = ExpectedActive


class RollbackRequest(RequestModel):
    """Return to the previously active model version."""

    reason: str | None = Field(default=None, max_length=2000)
    expected_active: int | None = ExpectedActive


class Lineage(BaseModel):
    """Where a version came from."""

    parent: int | None
    parent_sha256: str | None = None
    training_job: int | None
    cost_matrix_version: int | None
    dataset: str | None
    dataset_id: int | None
    dataset_fingerprint: str | None
    code_version: str | None


class ModelVersionSummary(BaseModel):
    """A registered model version with headline metrics and the comparison with its parent."""

    id: int
    sha256: str
    status: str = Field(json_schema_extra={"enum": ["candidate", "promoted", "retired"]},
                        description="candidate | promoted (served at some point) | retired (rolled back)")
    active: bool
    arch: str
    method: str
    classes: int
    image_size: int | None
    temperature: float | None
    lineage: Lineage
    valid: dict[str, Any] | None = Field(default=None, description="Total cost, WER, accuracy, top-cost pairs.")
    test: dict[str, Any] | None = None
    comparison: dict[str, Any] | None = Field(
        default=None, description="Per split: `table5` (total cost, expert-pair error rates %, accuracy %) and "
                                  "`table6` (errors per expert-cost pair, other pairs), parent beside candidate, "
                                  "as in the paper's Tables 5-6; scored under the training job's cost matrix.")
    created_by: str
    created_at: datetime


class PromotionRead(BaseModel):
    """One entry of the append-only promotion history."""

    id: int
    action: str
    outcome: str = Field(description="applied, or refused (an automatic promotion that failed the gate)")
    from_model_version: int | None
    to_model_version: int
    actor: str
    reason: str | None
    forced: bool
    gate: dict[str, Any]
    created_at: datetime


class ModelVersionDetail(ModelVersionSummary):
    """Everything about one version: full metrics with confusion matrices, verdict policy, promotions."""

    metrics: dict[str, Any]
    decision: dict[str, Any] = Field(description="Verdict thresholds and conformal quantiles fitted on validation.")
    checkpoint_path: str | None = Field(description="Where the weights lie on the server; admins only (null "
                                                    "for other roles).")
    promotions: list[PromotionRead]


class ActiveModel(BaseModel):
    """The result of a promotion or rollback: the entry appended and the version now active."""

    active_model_version: int
    promotion: PromotionRead


class VerdictPolicyRead(BaseModel):
    """A model version's verdict policy under one cost-matrix version (refitted when it was fitted for another)."""

    model_version: int
    cost_matrix_version: int
    fitted_for_cost_matrix: bool = Field(description="False when the model has no fitted policy, or its policy "
                                                     "was fitted for other costs and cannot be refitted.")
    refitted: bool = Field(description="True when these thresholds were refitted for this cost matrix on the "
                                       "model's validation outputs (not the ones stored at registration).")
    accept_risk: float = Field(description="A `match` needs an expected accept cost at most this.")
    mismatch_probability: float
    critical_cost: float
    miss_rates: dict[str, float] = Field(description="Conformal miss rate alpha per product NDC.")
    report: dict[str, Any] = Field(description="The fit on validation: review rates, critical accepts, coverage.")
