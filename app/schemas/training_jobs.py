"""Training-job requests and responses (POST/GET /v1/admin/training-jobs)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field

from app.schemas.common import MAX_ID, RequestModel

Method = Literal["csada", "baseline", "penalty", "ap", "sosr", "reweight"]
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]

HYPERPARAMETER_DOC = """
Every field is optional; a missing one takes the default for the method and the size of the dataset's
train split (`GET /v1/admin/training-jobs/defaults?dataset=NAME&method=csada` shows the resolved values).

| train images | method | epochs | batch | lr | scheduler | CSADA eps / steps / step_size / lam / tau |
| --- | --- | --- | --- | --- | --- | --- |
| >= 2000 (PMI) | csada | 10 | 32 | 1e-7 (Adam) | none | 1 / 50 / 1e-4 / 2 / 3 (the paper's PMI run) |
| >= 2000 (PMI) | others | 50 | 32 | 1e-5 (Adam) | step: x0.33 every 10 epochs | — |
| < 2000 | csada | 5 | 16 | 1e-4 (Adam) | none | 1 / 10 / 1e-3 / 2 / 3 |
| < 2000 | others | 10 | 16 | 1e-4 (Adam) | none | — |

Batch-norm statistics stay frozen (`freeze_bn`) by default, as in the authors' fine-tuning. AP takes
`alpha` (default 5). CSADA options are refused for other methods, and `alpha` for methods other than AP.
"""


class Hyperparameters(RequestModel):
    """Optimisation and method settings; unset fields take the documented defaults (see the table)."""

    epochs: int | None = Field(default=None, ge=1, le=1000, strict=True)
    batch_size: int | None = Field(default=None, ge=1, le=4096, strict=True)
    lr: float | None = Field(default=None, gt=0, le=1, strict=True)
    optimizer: Literal["adam", "sgd"] | None = None
    weight_decay: float | None = Field(default=None, ge=0, le=1, strict=True)
    scheduler: Literal["none", "cosine", "step"] | None = None
    freeze_bn: bool | None = Field(default=None, strict=True)
    lam: float | None = Field(default=None, ge=0, le=1000, strict=True, description="CSADA: weight of the adversarial term.")
    eps: float | None = Field(default=None, ge=0, le=1000, strict=True, description="CSADA: radius of the perturbation ball.")
    steps: int | None = Field(default=None, ge=0, le=1000, strict=True, description="CSADA: K ascent steps.")
    step_size: float | None = Field(default=None, ge=0, le=100, strict=True, description="CSADA: ascent step size eta_2.")
    tau: float | None = Field(default=None, ge=0, le=100, strict=True, description="CSADA: pair temperature c^tau.")
    norm: Literal["linf", "l2"] | None = Field(default=None, description="CSADA: perturbation ball.")
    sign: bool | None = Field(default=None, strict=True, description="CSADA: sign-gradient ascent.")
    alpha: float | None = Field(default=None, ge=0, le=1000, strict=True, description="AP: penalty weight.")


class TrainingJobCreate(RequestModel):
    """Fine-tune a registered model on a registered dataset against a cost-matrix version."""

    method: Method = Field(default="csada", description="Training method.")
    base_model: int | None = Field(default=None, ge=1, le=MAX_ID, strict=True,
                                   description="Model version to fine-tune (default: the active model).")
    cost_matrix_version: int | None = Field(default=None, ge=1, le=MAX_ID, strict=True,
                                            description="Cost-matrix version (default: the active version).")
    dataset: str = Field(min_length=1, max_length=100,
                         description="Name of a dataset registered with `rxverify data import-pmi`.")
    include_feedback: bool = Field(default=False, strict=True,
                                   description="Add resolved verification images (retained ones) to the train "
                                               "split; only resolutions recorded before the request are used.")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters, description=HYPERPARAMETER_DOC)
    seed: int = Field(default=0, ge=0, le=2**31 - 1, strict=True)
    auto_promote: bool | None = Field(default=None, strict=True,
                                      description="Promote the result when it passes the gate (default: the "
                                                  "RXVERIFY_AUTO_PROMOTE setting).")


class TrainingProgress(BaseModel):
    """Where a job is: epoch and step of the total, loss, attack success rate, ETA, latest validation metrics."""

    epoch: int | None = Field(default=None, description="Current epoch, counted from 1.")
    epochs: int | None = None
    step: int | None = None
    steps_per_epoch: int | None = None
    fraction: float | None = Field(default=None, description="Share of all training steps done (0-1).")
    loss: float | None = None
    attack_success_rate: float | None = None
    elapsed_s: float | None = None
    eta_s: float | None = None
    phase: str | None = Field(default=None, description="preparing | training | evaluating | registering | done")
    resumed_from_epoch: int | None = Field(default=None, description="Epochs restored from a checkpoint.")
    checkpoint_epoch: int | None = Field(default=None, description="Epochs held by the latest epoch checkpoint.")
    validation: dict[str, Any] | None = Field(default=None, description="Latest per-epoch validation metrics.")
    updated_at: str | None = None


class TrainingJobRead(BaseModel):
    """A training job with its inputs, state, progress and result."""

    id: int
    status: JobStatus
    method: str
    dataset: str
    dataset_id: int | None
    include_feedback: bool
    feedback_through_id: int | None
    base_model: int | None
    cost_matrix_version: int | None
    hyperparameters: dict[str, Any]
    seed: int
    auto_promote: bool
    request_sha256: str
    cancel_requested: bool
    attempts: int
    progress: TrainingProgress
    result: dict[str, Any]
    error: str | None
    result_model_version: int | None
    created_by: str
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    deduplicated: bool = Field(default=False, description="True when an identical existing job was returned.")


class HyperparameterDefaults(BaseModel):
    """The resolved defaults for one dataset and method."""

    dataset: str
    method: str
    train_images: int
    hyperparameters: dict[str, Any]
