"""Verification schemas: the verdict a client gets, the audit log a pharmacist reads, resolutions."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from app.schemas.common import RequestModel
from models.decision import REASONS

Verdict = Literal["match", "mismatch", "review"]


class TopClass(BaseModel):
    """One of the model's most probable products."""

    ndc: str = Field(examples=["00378-0208"])
    probability: float = Field(ge=0, le=1, description="Temperature-calibrated probability.")


class VerificationRead(BaseModel):
    """A verdict. Only `match` lets the fill go without a pharmacist's look."""

    id: str = Field(description="UUID of the audit record.")
    verdict: Verdict = Field(description="`match`: accept; `mismatch`: the bottle likely holds `predicted_ndc`; "
                                         "`review`: a pharmacist must check.")
    reason: str = Field(json_schema_extra={"enum": list(REASONS)}, examples=["accepted"],
                        description="Machine-readable reason of the verdict (models.decision.REASONS).")
    prescribed_ndc: str = Field(description="The prescription's normalised product key.", examples=["00378-0208"])
    prescribed_ndc_input: str = Field(description="The NDC exactly as sent.", examples=["0378-0208-01"])
    predicted_ndc: str = Field(description="The most probable product in the photo.")
    probability_prescribed: float = Field(ge=0, le=1, description="Calibrated probability of the prescribed product.")
    expected_accept_cost: float = Field(ge=0, description="Bayes risk of accepting: sum over y != prescribed of "
                                                          "p(y) * cost(y, prescribed).")
    accept_risk_threshold: float | None = Field(
        default=None, ge=0, description="The verdict policy's accept threshold: a `match` needs expected_accept_cost "
                                        "at most this (null in audit records written before it was recorded).")
    policy_fitted_for_cost_matrix: bool | None = Field(
        default=None,
        description="True when the thresholds and conformal set were fitted for this cost-matrix version (refitted "
                    "on the model's validation outputs after a cost change). False for a model without a fitted "
                    "policy (every fill goes to review) or an older checkpoint that cannot be refitted.")
    unfamiliarity: float | None = Field(
        default=None, ge=0,
        description="How unlike the model's training photos this photo is: the largest ratio of its feature "
                    "distance to the threshold over the model's feature stages. Above 1 the verdict is "
                    "`review` / `photo-unfamiliar` (an empty vial, a photo that is not a vial, a product the "
                    "model was not trained on, a new camera). The threshold lets at most "
                    "RXVERIFY_UNFAMILIAR_PHOTO_RATE of ordinary photos through to review. Null when the model "
                    "has no fitted check or the check is turned off.")
    top: list[TopClass]
    conformal_set: list[str] = Field(description="Products the Mondrian conformal set keeps for this photo "
                                                 "(see the guarantee in the API description).")
    model_version: int | None = Field(description="Model version id that produced the probabilities.")
    model_sha256: str = Field(description="SHA-256 of the served model's weights.")
    cost_matrix_version: int = Field(description="Cost-matrix version used for the risk.")
    client_reference: str | None = None
    image_sha256: str
    created_at: datetime


class ResolutionCreate(RequestModel):
    """What a pharmacist found in the bottle."""

    actual_ndc: str | None = Field(max_length=32, examples=["00378-0208"],
                                   description="The product really in the bottle (any NDC form); null when it "
                                               "is not a catalog product (then say what it was in `note`).")
    checked_by: str | None = Field(default=None, min_length=1, max_length=200,
                                   description="Who checked (default: the API key's name).")
    note: str | None = Field(default=None, max_length=2000)


class ResolutionRead(BaseModel):
    """A recorded resolution."""

    id: int
    verification_id: str
    actual_ndc: str | None
    checked_by: str = Field(description="Who checked the bottle, as the pharmacist wrote it.")
    recorded_by_key_id: int | None = Field(description="The API key the resolution was recorded with (see "
                                                       "GET /v1/admin/api-keys/{id}).")
    note: str | None
    created_at: datetime
    matches_prescription: bool | None = Field(description="Whether the bottle held the prescribed product "
                                                          "(null when the actual product is not in the catalog).")
    labelled_example: bool = Field(description="True when the retained image became a training example.")


class VerificationDetail(VerificationRead):
    """An audit record: the verdict as answered, plus what the audit log adds."""

    latency_ms: float | None = None
    image_retained: bool
    resolution: ResolutionRead | None = Field(default=None, description="The newest resolution, if any.")


class VerificationPage(BaseModel):
    """One page of the verification log, newest first."""

    items: list[VerificationDetail]
    next: str | None = Field(description="URL of the next page (same filters), null on the last page.")
