"""After training: evaluate candidate and parent, fit the verdict policy, register, maybe promote, finish.

Candidate and parent are scored on the valid and test splits of the job's dataset under the job's cost
matrix; the verdict thresholds are fitted on the candidate's validation outputs (its temperature was
fitted there by run_training). The model version, the job's final status and an automatic promotion
are written in ONE transaction that also checks the job's lease, so a worker that lost its lease writes
nothing. The "model promoted" notification goes out after that commit.
"""

from __future__ import annotations

import functools
import logging
import shutil
import subprocess
import time
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import Database
from app.orm import ModelVersion, Role, TrainingJob
from app.services import evaluation, promotion
from app.services.audit import Actor
from app.services.model_registry import find_by_sha256, register_checkpoint
from app.services.training_jobs import FINISHED_STATUSES
from models.commands.train import TrainOutcome
from models.costs import CostMatrix
from worker import leases
from worker.leases import Lease
from worker.training import Hooks, JobSpec, Workdir

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """`<package version>` plus `+g<commit>` when running from a git checkout."""
    try:
        version = importlib_metadata.version("rxverify")
    except importlib_metadata.PackageNotFoundError:
        version = "0+unknown"
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    return f"{version}+g{commit}" if commit else version


def worker_actor(job_id: int) -> Actor:
    """The identity a job's registrations and promotions are recorded under."""
    return Actor(name=f"worker:training-job {job_id}", role=Role.ADMIN)


def fit_verdict_policy(valid: evaluation.SplitEvaluation, *, classes: tuple[str, ...], cost_matrix: CostMatrix,
                       critical_cost: float, max_accept_risk: float | None, seed: int) -> dict[str, Any]:
    """Thresholds and conformal quantiles fitted on validation; review-only when valid is too small."""
    from models.decision import VerdictPolicy, fit_policy

    try:
        policy = fit_policy(valid.probs, valid.labels, cost_matrix=cost_matrix.reindexed(classes),
                            critical_cost=critical_cost, max_accept_risk=max_accept_risk, classes=classes,
                            seed=seed)
    except ValueError as error:
        logger.warning("verdict policy not fitted (%s); the model will send every fill to review", error)
        policy = VerdictPolicy.review_only(classes, critical_cost=critical_cost)
        return {**policy.to_dict(), "report": {"fitted": False, "why": str(error)}}
    return policy.to_dict()


def _decision_summary(decision: dict[str, Any]) -> dict[str, Any]:
    report = decision.get("report", {})
    keys = ("fitted", "n", "review_rate", "review_rate_correct_fills", "wrong_accepts", "critical_accepts",
            "max_accept_risk", "mean_set_size")
    return {"accept_risk": decision.get("accept_risk"), "mismatch_probability": decision.get("mismatch_probability"),
            **{k: report[k] for k in keys if k in report}}


def fit_familiarity_file(checkpoint: Path, *, data_root: Path, settings: Settings) -> tuple[bytes | None, dict[str, Any]]:
    """The checkpoint's unfamiliar-photo model (`models.ood`) as file bytes, and a report for its metrics.

    A model it cannot be fitted for (too few photos, an architecture without known feature stages) is
    registered without it: the API then serves it without the check, and says so in every verdict
    (`unfamiliarity` null) and in the log.
    """
    started = time.monotonic()
    try:
        familiarity = evaluation.fit_checkpoint_familiarity(checkpoint, data_root=data_root, device=settings.device)
    except ValueError as error:
        logger.warning("unfamiliar-photo check not fitted (%s); the model will be served without it", error)
        return None, {"fitted": False, "why": str(error)}
    report = {"fitted": True, **familiarity.report, "fit_s": round(time.monotonic() - started, 3)}
    logger.info("unfamiliar-photo check fitted on %d training and %d validation photos in %.1fs",
                report["n_train"], report["n_valid"], report["fit_s"])
    return familiarity.to_bytes(), report


def finalise_checkpoint(checkpoint: Path, final: Path, *, data_root: Path, cost_matrix: CostMatrix,
                        settings: Settings, seed: int
                        ) -> tuple[dict[str, evaluation.SplitEvaluation], dict[str, Any], dict[str, Any]]:
    """Score a trained checkpoint on valid and test, fit its verdict policy on valid and its unfamiliar-photo
    check on train and valid, write it to `final`; returns the scores, the policy and the check's report.

    The validation outputs the policy was fitted on are stored with it (`validation.safetensors`, hash in
    `decision.validation_sha256`), so the API can refit the policy when the cost matrix changes.
    """
    from models.checkpoint import encode_validation_outputs, read_metadata, with_updated_metadata

    candidate = evaluation.evaluate_checkpoint(checkpoint, data_root=data_root, cost_matrix=cost_matrix,
                                               device=settings.device)
    decision = fit_verdict_policy(candidate["valid"], classes=read_metadata(checkpoint).classes,
                                  cost_matrix=cost_matrix, critical_cost=settings.critical_cost_threshold,
                                  max_accept_risk=settings.max_accept_risk, seed=seed)
    validation = encode_validation_outputs(candidate["valid"].probs, candidate["valid"].labels)
    familiarity, familiarity_report = fit_familiarity_file(checkpoint, data_root=data_root, settings=settings)
    # An earlier attempt may have died after writing `final` and before the commit: it is derived from this
    # attempt's checkpoint, so rebuild it rather than fail on a non-empty directory.
    shutil.rmtree(final, ignore_errors=True)
    with_updated_metadata(checkpoint, final, decision=decision, validation=validation,  # records its hash
                          familiarity=familiarity)
    return candidate, read_metadata(final).decision, familiarity_report


def register_and_finish(*, database: Database, settings: Settings, spec: JobSpec, lease: Lease, hooks: Hooks,
                        outcome: TrainOutcome, data_root: Path, workdir: Workdir, started: float) -> dict[str, Any]:
    """Evaluate, fit, register, auto-promote and mark the job succeeded; returns the job's result."""
    from models.checkpoint import read_metadata

    assert outcome.checkpoint is not None and outcome.metadata is not None

    def stopped() -> bool:
        """Between the stages: the lease lost (LeaseLost) or a cancel asked for (the job ends cancelled)."""
        if hooks.heartbeat.lost.is_set():
            raise leases.LeaseLost(f"training job {spec.job_id} lost its lease while it was being evaluated")
        if not leases.cancel_requested(database, spec.job_id):
            return False
        end_cancelled(database, lease, hooks=hooks, workdir=workdir, epochs=outcome.fit.epochs_completed)
        return True

    if stopped():  # asked after the last step: skip the evaluation
        return {"cancelled": True}
    hooks.progress.update(phase="evaluating", eta_s=0.0)
    hooks.write()
    costs = CostMatrix.read_csv(workdir.costs, spec.classes)
    candidate, decision, familiarity = finalise_checkpoint(outcome.checkpoint, workdir.final, data_root=data_root,
                                              cost_matrix=costs, settings=settings, seed=spec.seed)
    if stopped():
        return {"cancelled": True}
    parent = evaluation.evaluate_checkpoint(spec.base_path, data_root=data_root, cost_matrix=costs,
                                            device=settings.device)
    if stopped():
        return {"cancelled": True}
    reports = {split: result.report for split, result in candidate.items()}
    # The gate's evaluation of the active model (if another one was promoted meanwhile) runs here, before
    # the registration transaction, so that it never holds the database's write lock (see auto_promote).
    ahead = (promotion.evaluate_active_ahead(database, settings, parent_id=spec.base_model_id,
                                             dataset_id=spec.dataset_id, classes=reports["valid"]["classes"])
             if spec.auto_promote else None)
    hooks.progress.update(phase="registering")
    hooks.write()
    parent_reports = {split: result.report for split, result in parent.items()}
    metrics = {**reports, "parent": {"model_version_id": spec.base_model_id, **parent_reports},
               "comparison": evaluation.comparison(candidate=reports, parent=parent_reports, cost_matrix=costs),
               "evaluation": {"dataset_id": spec.dataset_id, "dataset": spec.dataset_name,
                              "dataset_fingerprint": spec.dataset_fingerprint,
                              "cost_matrix_version_id": spec.cost_matrix_version_id, "splits": ["valid", "test"]},
               "train": outcome.metadata.metrics.get("train", {}), "temperature": outcome.metadata.temperature,
               "feedback_images": len(spec.feedback), "familiarity": familiarity}
    actor = worker_actor(spec.job_id)
    promoted: int | None = None
    with database.session() as session:
        # Asked while this job was evaluating? A cancel answered 202 must not end in a registered (let
        # alone promoted) model; the check holds the job row's lock until this transaction commits.
        cancelled = leases.cancelled_under_lock(session, lease)
        if cancelled:
            finish_cancelled(session, lease, hooks=hooks, epochs=outcome.fit.epochs_completed)
        else:
            existed = find_by_sha256(session, outcome.weights_sha256 or "") is not None
            version = register_checkpoint(session, source=workdir.final, settings=settings, actor=actor)
            if not existed:
                _set_lineage(version, spec=spec, metrics=metrics, dataset_fingerprint=read_metadata(workdir.final)
                             .dataset_fingerprint)
                session.flush()
            result: dict[str, Any] = {
                "model_version_id": version.id, "weights_sha256": version.sha256, "new_version": not existed,
                "valid": evaluation.summary(reports["valid"]), "test": evaluation.summary(reports["test"]),
                "parent_valid": evaluation.summary(parent_reports["valid"]),
                "parent_test": evaluation.summary(parent_reports["test"]),
                "decision": _decision_summary(decision), "epochs_completed": outcome.fit.epochs_completed,
                "attempt_wall_s": round(time.monotonic() - started, 3)}
            if spec.auto_promote:
                result["promotion"] = promotion.auto_promote(session, settings, candidate=version, actor=actor,
                                                             job_id=spec.job_id, ahead=ahead)
                promoted = version.id if result["promotion"].get("promoted") else None
            else:
                result["promotion"] = {"attempted": False}
            hooks.progress.update(phase="done", fraction=1.0, eta_s=0.0)
            leases.finish(session, lease, status="succeeded", result=result, error=None,
                          result_model_version_id=version.id, progress=dict(hooks.progress))
    if cancelled:
        discard_work_files(workdir)
        return {"cancelled": True}
    if promoted is not None:
        promotion.publish_active_change(settings, model_version_id=promoted, action="auto_promote")
    discard_work_files(workdir)
    logger.info("training job %s succeeded: model version %s%s", spec.job_id, result["model_version_id"],
                " (promoted)" if promoted else "")
    return result


def _set_lineage(version: ModelVersion, *, spec: JobSpec, metrics: dict[str, Any],
                 dataset_fingerprint: str | None) -> None:
    """Lineage and metrics of a version this job created (set once, in the transaction that creates it)."""
    version.parent_id = spec.base_model_id
    version.cost_matrix_version_id = spec.cost_matrix_version_id
    version.dataset_id = spec.dataset_id
    version.dataset_fingerprint = dataset_fingerprint
    version.code_version = code_version()
    version.metrics = metrics
    version.created_by = worker_actor(spec.job_id).name


def end_cancelled(database: Database, lease: Lease, *, hooks: Hooks, workdir: Workdir, epochs: int) -> None:
    """End the job as cancelled in a transaction of its own, then drop its files."""
    with database.session() as session:
        finish_cancelled(session, lease, hooks=hooks, epochs=epochs)
    discard_work_files(workdir)


def finish_cancelled(session: Session, lease: Lease, *, hooks: Hooks, epochs: int) -> None:
    """End the job as cancelled in the caller's transaction (nothing is registered); the caller drops the
    job's files once that transaction has committed (`discard_work_files`)."""
    hooks.progress.update(phase="cancelled", eta_s=None)
    leases.finish(session, lease, status="cancelled", progress=dict(hooks.progress),
                  result={"cancelled_after_epochs": epochs})
    logger.info("training job %s cancelled after %d epoch(s)", lease.job_id, epochs)


def sweep_ended_work_files(database: Database, settings: Settings) -> list[int]:
    """Drop the work files of ended jobs that still have them; returns their ids.

    Most paths that end a job drop its files themselves. These do not: the heartbeat's hard limit (it kills
    the process right after marking the job failed) and the reaper's verdicts on jobs whose worker died
    (failed after too many losses, or cancelled). An ended job is never resumed, so its files are dead weight
    on the shared volume (the epoch checkpoint holds the optimiser state, several times the model).
    """
    jobs_dir = Workdir.jobs_dir(settings)
    if not jobs_dir.is_dir():
        return []
    left = {int(path.name): Workdir(path) for path in jobs_dir.iterdir() if path.name.isdigit() and path.is_dir()}
    left = {job_id: workdir for job_id, workdir in left.items() if any(part.exists() for part in workdir.disposable)}
    if not left:
        return []
    with database.session() as session:
        ended = sorted(session.scalars(select(TrainingJob.id).where(TrainingJob.id.in_(list(left)),
                                                                    TrainingJob.status.in_(FINISHED_STATUSES))))
    for job_id in ended:
        logger.info("training job %s has ended; removing the work files it left", job_id)
        discard_work_files(left[job_id])
    return ended


def discard_work_files(workdir: Workdir) -> None:
    """Once a job has ended (succeeded, cancelled or failed; none is resumed after that) drop the epoch
    checkpoint (optimiser state included, several times the model) and the intermediate checkpoints;
    costs.csv stays for the record."""
    for path in workdir.disposable:
        try:
            if path.is_symlink() or path.is_file():
                path.unlink()
            elif path.is_dir():
                shutil.rmtree(path)
        except OSError:
            logger.warning("could not remove %s", path)
