"""Promotion and rollback: a cost-based gate, forced overrides, automatic promotion and an append-only history.

The gate compares a candidate with the ACTIVE model on the validation split of the candidate's dataset,
scored under the ACTIVE cost matrix (both from stored confusion matrices; the active model is evaluated
on that split only when no stored evaluation fits). It passes when the candidate does not raise the total
cost, loses at most `promotion_max_accuracy_drop` accuracy points, and raises no critical pair's error
count. Every change of the active model appends a `model_promotions` row (who, when, why, from, to, the
gate, forced or not); a refused automatic promotion is appended too, with outcome `refused`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import Database
from app.errors import Conflict, FieldError, InvalidInput, NotFound
from app.orm import ACTIVE_STATE_ID, ActiveState, Dataset, ModelPromotion, ModelVersion
from app.services import evaluation
from app.services.active_state import Pointer, move_active, require_active
from app.services.audit import Actor, record_change
from app.services.cost_matrices import active_version_id, cost_matrix_of
from app.services.model_registry import active_model_version, check_classes_in_catalog, checkpoint_path
from models.costs import CostMatrix

logger = logging.getLogger(__name__)

APPLYING_ACTIONS = ("promote", "auto_promote", "activate")


@dataclass(frozen=True)
class GateResult:
    """The gate's verdict: each check with its numbers, and what it was measured on."""

    passed: bool
    checks: list[dict[str, Any]]
    context: dict[str, Any] = field(default_factory=dict)

    @property
    def failed(self) -> list[dict[str, Any]]:
        """The checks that did not pass."""
        return [check for check in self.checks if not check["passed"]]

    def to_dict(self) -> dict[str, Any]:
        """The JSON stored with the promotion and returned in a 409."""
        return {"passed": self.passed, "checks": self.checks, **self.context}

    def describe(self) -> str:
        """One line naming each failed check and its numbers."""
        return "; ".join(check["detail"] for check in self.failed) or "all checks passed"


def gate_checks(*, candidate: dict[str, Any], active: dict[str, Any], cost_matrix: CostMatrix,
                critical_cost: float, max_accuracy_drop_points: float) -> GateResult:
    """Compare two validation reports (confusion matrices over the same classes) under one cost matrix."""
    cand, act = evaluation.rescore(candidate, cost_matrix), evaluation.rescore(active, cost_matrix)
    checks: list[dict[str, Any]] = []
    cost_ok = cand["total_cost"] <= act["total_cost"] + 1e-9
    checks.append({"name": "total_cost", "passed": cost_ok, "candidate": cand["total_cost"],
                   "active": act["total_cost"],
                   "detail": f"total cost {cand['total_cost']:g} vs active {act['total_cost']:g} "
                             f"({'not raised' if cost_ok else 'raised'})"})
    drop = 100.0 * (act["accuracy"] - cand["accuracy"])
    accuracy_ok = drop <= max_accuracy_drop_points + 1e-9
    checks.append({"name": "accuracy_drop", "passed": accuracy_ok, "candidate": cand["accuracy"],
                   "active": act["accuracy"], "drop_points": drop, "max_drop_points": max_accuracy_drop_points,
                   "detail": f"accuracy {100 * cand['accuracy']:.2f}% vs active {100 * act['accuracy']:.2f}% "
                             f"(drop {drop:.2f} points, limit {max_accuracy_drop_points:g})"})
    classes = set(cand["classes"])
    pairs = []
    for true, predicted, cost in cost_matrix.critical_pairs(critical_cost):
        if true in classes and predicted in classes:
            c, a = evaluation.pair_errors(cand, true, predicted), evaluation.pair_errors(act, true, predicted)
            pairs.append({"true": true, "predicted": predicted, "cost": cost, "candidate": c, "active": a,
                          "passed": c <= a})
    risen = [p for p in pairs if not p["passed"]]
    checks.append({"name": "critical_pair_errors", "passed": not risen, "critical_cost": critical_cost,
                   "pairs": pairs,
                   "detail": ("no critical pair's errors rose" if not risen else "critical pair errors rose: " +
                              ", ".join(f"{p['true']} -> {p['predicted']} {p['active']} -> {p['candidate']}"
                                        for p in risen))})
    return GateResult(passed=all(check["passed"] for check in checks), checks=checks,
                      context={"split": "valid", "n": cand["n"]})


def _candidate_report(candidate: ModelVersion) -> dict[str, Any] | None:
    report = (candidate.metrics or {}).get("valid")
    return report if isinstance(report, dict) and "confusion" in report else None


def _dataset_of(session: Session, candidate: ModelVersion) -> Dataset | None:
    dataset_id = (candidate.metrics or {}).get("evaluation", {}).get("dataset_id") or candidate.dataset_id
    return session.get(Dataset, dataset_id) if dataset_id is not None else None


@dataclass(frozen=True)
class AheadReport:
    """The active model's validation report, computed before the write transaction (`evaluate_active_ahead`)."""

    model_version_id: int
    dataset_id: int
    cost_matrix_version_id: int
    report: dict[str, Any]


def _own_report(active: ModelVersion, dataset: Dataset) -> dict[str, Any] | None:
    """The active model's stored validation report when it was evaluated on this very dataset."""
    own = (active.metrics or {}).get("evaluation", {})
    if (own.get("dataset_id") == dataset.id and own.get("dataset_fingerprint") == dataset.fingerprint
            and _candidate_report(active) is not None):
        return dict((active.metrics or {})["valid"])
    return None


def active_validation_report(session: Session, settings: Settings, *, candidate: ModelVersion,
                             active: ModelVersion, dataset: Dataset, cost_matrix: CostMatrix,
                             cost_matrix_version_id: int, ahead: AheadReport | None = None) -> dict[str, Any]:
    """The active model's validation report on the candidate's dataset: stored, computed ahead, else computed."""
    stored = (candidate.metrics or {}).get("parent", {})
    if active.id == candidate.parent_id and isinstance(stored.get("valid"), dict):
        return dict(stored["valid"])
    own = _own_report(active, dataset)
    if own is not None:
        return own
    if ahead is not None and (ahead.model_version_id, ahead.dataset_id, ahead.cost_matrix_version_id) == (
            active.id, dataset.id, cost_matrix_version_id):
        return dict(ahead.report)
    logger.info("evaluating active model %s on dataset %s for the gate", active.id, dataset.name)
    return _valid_report(settings, checkpoint_path(settings, active), data_root=Path(dataset.path),
                         cost_matrix=cost_matrix)


def _valid_report(settings: Settings, checkpoint: Path, *, data_root: Path, cost_matrix: CostMatrix) -> dict[str, Any]:
    """A checkpoint's report on the validation split of an image folder (the gate's one slow step)."""
    results = evaluation.evaluate_checkpoint(checkpoint, data_root=data_root, cost_matrix=cost_matrix,
                                             device=settings.device, splits=("valid",))
    return results["valid"].report


def evaluate_active_ahead(database: Database, settings: Settings, *, parent_id: int | None, dataset_id: int,
                          classes: Sequence[str]) -> AheadReport | None:
    """Evaluate the active model for a coming `auto_promote`, outside any write transaction.

    The gate's one slow step is evaluating the active model on the candidate's validation split, needed
    only when the active model is neither the candidate's parent (whose report the candidate carries) nor
    already evaluated on that dataset, i.e. when another model was promoted while the job trained. Inside
    the worker's registration transaction it would hold SQLite's write lock for the whole evaluation and
    make every verification's audit insert wait, then fail after `db_busy_timeout_ms`. None when not needed;
    the report is used only if the active model and cost matrix are still the same when the gate runs.
    """
    with database.session() as session:
        active, cm_version = active_model_version(session), active_version_id(session)
        dataset = session.get(Dataset, dataset_id)
        if (active is None or cm_version is None or dataset is None or active.id == parent_id
                or sorted(active.classes) != sorted(classes) or _own_report(active, dataset) is not None):
            return None
        cost_matrix = cost_matrix_of(session, cm_version, classes=list(classes))
        path, data_root, active_id = checkpoint_path(settings, active), Path(dataset.path), active.id
    logger.info("evaluating active model %s on dataset %s ahead of the promotion gate", active_id, data_root)
    return AheadReport(active_id, dataset_id, cm_version,
                       _valid_report(settings, path, data_root=data_root, cost_matrix=cost_matrix))


def evaluate_ahead_of_promote(database: Database, settings: Settings, *, model_version_id: int) -> AheadReport | None:
    """`evaluate_active_ahead` for the API's promote: the evaluation runs before `promote` locks the
    active state, so a slow one never holds that lock (or a connection) while other writers wait. None when
    not needed, or when the candidate or its dataset is unknown (`promote` then says why)."""
    with database.session() as session:
        candidate = session.get(ModelVersion, model_version_id)
        dataset = _dataset_of(session, candidate) if candidate is not None else None
        if candidate is None or dataset is None:
            return None
        parent_id, dataset_id, classes = candidate.parent_id, dataset.id, tuple(candidate.classes)
    return evaluate_active_ahead(database, settings, parent_id=parent_id, dataset_id=dataset_id, classes=classes)


def evaluate_gate(session: Session, settings: Settings, *, candidate: ModelVersion,
                  active: ModelVersion | None, ahead: AheadReport | None = None) -> GateResult:
    """The gate for `candidate` against `active` (passes trivially when nothing is active)."""
    cm_version = active_version_id(session)
    context: dict[str, Any] = {"active_model": active.id if active else None, "candidate_model": candidate.id,
                               "cost_matrix_version": cm_version,
                               "max_accuracy_drop_points": settings.promotion_max_accuracy_drop}
    if active is None:
        return GateResult(True, [], {**context, "note": "no model was active"})

    def refused(name: str, detail: str) -> GateResult:
        return GateResult(False, [{"name": name, "passed": False, "detail": detail}], context)

    if sorted(candidate.classes) != sorted(active.classes):
        return refused("classes", f"the candidate's classes differ from the active model's "
                                  f"({len(candidate.classes)} vs {len(active.classes)}); they cannot be compared")
    report, dataset = _candidate_report(candidate), _dataset_of(session, candidate)
    if report is None or dataset is None:
        return refused("validation", "the candidate has no validation evaluation on a registered dataset")
    if cm_version is None:
        return refused("cost_matrix", "no cost-matrix version is active")
    cost_matrix = cost_matrix_of(session, cm_version, classes=report["classes"])
    active_report = active_validation_report(session, settings, candidate=candidate, active=active,
                                             dataset=dataset, cost_matrix=cost_matrix,
                                             cost_matrix_version_id=cm_version, ahead=ahead)
    result = gate_checks(candidate=report, active=active_report, cost_matrix=cost_matrix,
                         critical_cost=settings.critical_cost_threshold,
                         max_accuracy_drop_points=settings.promotion_max_accuracy_drop)
    context.update(result.context, dataset=dataset.name, dataset_id=dataset.id)
    return GateResult(result.passed, result.checks, context)


def _apply(session: Session, *, version: ModelVersion, previous: int | None, action: str, actor: Actor,
           reason: str | None, forced: bool = False, gate: dict[str, Any] | None = None) -> ModelPromotion:
    # A gated promotion lands only under the cost matrix it was gated against (on SQLite nothing locks
    # the active state between the gate's reads and this write; PostgreSQL holds the row lock anyway).
    gated_under: dict[Pointer, int | None] | None = (
        {"cost_matrix_version_id": gate["cost_matrix_version"]} if gate and "cost_matrix_version" in gate else None)
    move_active(session, "model_version_id", previous=previous, new=version.id, unchanged=gated_under)
    version.status = "promoted"
    entry = ModelPromotion(action=action, from_model_version_id=previous, to_model_version_id=version.id,
                           actor=actor.name, actor_key_id=actor.key_id, reason=reason, forced=forced,
                           gate=gate or {}, outcome="applied")
    session.add(entry)
    session.flush()
    record_change(session, actor=actor, action=f"model.{action}", entity_type="model_version",
                  entity_id=version.id, reason=reason,
                  details={"from_version": previous, "to_version": version.id, "forced": forced,
                           "gate_passed": (gate or {}).get("passed")})
    return entry


def _lock_active(session: Session) -> None:
    """Serialise changes of the active model: concurrent promotions queue on the pointer row (PostgreSQL;
    SQLite serialises writers anyway), so each history entry's `from` is the version really replaced."""
    session.execute(select(ActiveState.id).where(ActiveState.id == ACTIVE_STATE_ID).with_for_update())


def _get(session: Session, model_version_id: int) -> ModelVersion:
    version = session.get(ModelVersion, model_version_id)
    if version is None:
        raise NotFound(f"model version {model_version_id} does not exist", slug="model-version-not-found")
    return version


def promote(session: Session, settings: Settings, *, model_version_id: int, actor: Actor,
            reason: str | None, force: bool = False, ahead: AheadReport | None = None,
            expected_active: int | None = None) -> ModelPromotion:
    """Make a candidate active if it passes the gate (409 with every failed check), or with `force` + reason.

    `ahead`: the active model's report from `evaluate_ahead_of_promote`, used if still current.
    `expected_active`: the version the caller saw active (409 `active-changed` if another is).
    """
    if force and not (reason and reason.strip()):
        raise InvalidInput("a forced promotion needs a reason (it is audited)",
                           errors=[FieldError("reason", "required when force is true", "required")])
    version = _get(session, model_version_id)
    check_classes_in_catalog(session, tuple(version.classes))
    require_checkpoint(settings, version)
    _lock_active(session)
    active = active_model_version(session)
    require_active("model_version_id", expected=expected_active, actual=active.id if active else None)
    if active is not None and active.id == version.id:
        raise Conflict(f"model version {version.id} is already active", slug="model-already-active")
    gate = evaluate_gate(session, settings, candidate=version, active=active, ahead=ahead)
    if not gate.passed and not force:
        raise Conflict(f"model version {version.id} fails the promotion gate: {gate.describe()}",
                       slug="promotion-gate-failed", title="The candidate fails the promotion gate",
                       extra={"gate": gate.to_dict(), "failed_checks": [c["name"] for c in gate.failed]})
    return _apply(session, version=version, previous=active.id if active else None, action="promote",
                  actor=actor, reason=reason, forced=force and not gate.passed, gate=gate.to_dict())


def auto_promote(session: Session, settings: Settings, *, candidate: ModelVersion, actor: Actor,
                 job_id: int, ahead: AheadReport | None = None) -> dict[str, Any]:
    """The worker's promotion: applied when the gate passes, else recorded as refused. Returns the outcome.

    `ahead`: the active model's report from `evaluate_active_ahead`, so that no evaluation runs here.
    """
    _lock_active(session)
    active = active_model_version(session)
    if active is not None and active.id == candidate.id:
        return {"attempted": True, "promoted": False, "detail": "the candidate is already active"}
    gate = evaluate_gate(session, settings, candidate=candidate, active=active, ahead=ahead)
    previous = active.id if active else None
    if gate.passed:
        _apply(session, version=candidate, previous=previous, action="auto_promote", actor=actor,
               reason=f"training job {job_id} passed the promotion gate", gate=gate.to_dict())
    else:
        session.add(ModelPromotion(action="auto_promote", from_model_version_id=previous,
                                   to_model_version_id=candidate.id, actor=actor.name, actor_key_id=actor.key_id,
                                   reason=f"training job {job_id} failed the gate: {gate.describe()}",
                                   forced=False, gate=gate.to_dict(), outcome="refused"))
        session.flush()
    return {"attempted": True, "promoted": gate.passed, "gate": gate.to_dict(),
            "failed_checks": [c["name"] for c in gate.failed], "detail": gate.describe()}


def rollback_target(session: Session) -> tuple[int | None, int | None]:
    """(active, previous) from the applied history: rollbacks undo promotions like a stack."""
    stack: list[int | None] = []
    active: int | None = None
    query = select(ModelPromotion).where(ModelPromotion.outcome == "applied").order_by(ModelPromotion.id)
    for entry in session.scalars(query):
        if entry.action == "rollback":
            if stack:
                stack.pop()
        else:
            stack.append(entry.from_model_version_id)
        active = entry.to_model_version_id
    return active, (stack[-1] if stack else None)


def require_checkpoint(settings: Settings, version: ModelVersion) -> None:
    """409 `checkpoint-missing` unless the version's weights and metadata are where the API will load them.

    Activating a version whose files are gone (a volume not mounted, a directory deleted) would leave every
    replica serving the previous model while the database says otherwise; even a forced promotion is
    refused.
    """
    from models.checkpoint import CheckpointError, check_files

    path = checkpoint_path(settings, version)
    try:
        check_files(path)
    except (CheckpointError, OSError, ValueError) as error:
        raise Conflict(f"model version {version.id} cannot be activated: its checkpoint at {path} is missing or "
                       f"unreadable ({error})", slug="checkpoint-missing",
                       title="The model's checkpoint is missing") from None


def rollback(session: Session, settings: Settings, *, actor: Actor, reason: str | None,
             expected_active: int | None = None) -> ModelPromotion:
    """Return to the version that was active before the latest promotion still in force (409 if none).

    `expected_active`: the version the caller means to roll back (409 `active-changed` if another is active).
    """
    _lock_active(session)
    current_id = session.scalar(select(ActiveState.model_version_id).where(ActiveState.id == ACTIVE_STATE_ID))
    require_active("model_version_id", expected=expected_active, actual=current_id)
    active, previous = rollback_target(session)
    if current_id is None or previous is None or active != current_id:
        raise Conflict("there is no earlier active model version to roll back to", slug="nothing-to-roll-back",
                       extra={"active_model": current_id})
    current, target = _get(session, current_id), _get(session, previous)
    require_checkpoint(settings, target)
    current.status = "retired"
    return _apply(session, version=target, previous=current.id, action="rollback", actor=actor, reason=reason)


def history(session: Session, *, limit: int = 50, before_id: int | None = None,
            model_version_id: int | None = None) -> list[ModelPromotion]:
    """Promotion history, newest first (keyset by id), optionally for one model version."""
    query = select(ModelPromotion).order_by(ModelPromotion.id.desc()).limit(limit)
    if before_id is not None:
        query = query.where(ModelPromotion.id < before_id)
    if model_version_id is not None:
        query = query.where((ModelPromotion.to_model_version_id == model_version_id)
                            | (ModelPromotion.from_model_version_id == model_version_id))
    return list(session.scalars(query))


def notification_channel(settings: Settings) -> str:
    """The pub/sub channel, under the Redis key prefix so deployments sharing a Redis stay apart."""
    return f"{settings.redis_key_prefix}{settings.notification_channel}"


def publish_active_change(settings: Settings, *, model_version_id: int, action: str) -> bool:
    """Tell every API process that the active model changed (Redis pub/sub; call after the commit)."""
    if not settings.redis_url:
        return False
    import redis

    client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.publish(notification_channel(settings),
                       json.dumps({"model_version_id": model_version_id, "action": action}))
        return True
    except redis.RedisError:
        logger.exception("could not publish the model change; API processes will see it on their next poll")
        return False
    finally:
        client.close()
