"""The promotion gate, forced overrides, rollback and the append-only history (no worker needed).

Candidates are model versions with hand-made validation confusion matrices, so every number the gate
reports is known in advance. Classes, sorted: 00591-0461, 50111-0434, 53489-0156, 68382-0227; the PMI
expert costs make 50111-0434 -> 00591-0461 (10), 53489-0156 -> 68382-0227 (10) and back (8) critical.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select

from app.config import Settings
from app.db import Database
from app.orm import AdminAuditEntry, Dataset, ModelPromotion, ModelVersion, Role
from app.services import evaluation
from app.services.promotion import gate_checks
from models.costs import CostMatrix
from tests.worker.factories import CLASSES, Seeded, seed_training, seeded_sqlite_settings, tiny_assets

MODELS = "/v1/admin/models"
K = sorted(CLASSES)
COSTS = CostMatrix.from_pairs(K, {("50111-0434", "00591-0461"): 10.0, ("53489-0156", "68382-0227"): 10.0,
                                  ("68382-0227", "53489-0156"): 8.0})


def report(errors: dict[tuple[str, str], int], *, per_class: int = 10) -> dict[str, Any]:
    """A validation report whose confusion has `per_class` images per class and the given errors."""
    confusion = np.diag([per_class] * len(K))
    for (true, predicted), count in errors.items():
        confusion[K.index(true), K.index(true)] -= count
        confusion[K.index(true), K.index(predicted)] += count
    return evaluation.rescore({"classes": K, "confusion": confusion.tolist()}, COSTS)


ACTIVE = report({("50111-0434", "00591-0461"): 1, ("00591-0461", "50111-0434"): 1})  # cost 11, acc 38/40
WORSE = report({("50111-0434", "00591-0461"): 2, ("00591-0461", "50111-0434"): 1})  # cost 21, acc 37/40
BETTER = report({("00591-0461", "50111-0434"): 2})  # cost 2, acc 38/40


def test_gate_reports_each_failed_check_with_its_numbers() -> None:
    gate = gate_checks(candidate=WORSE, active=ACTIVE, cost_matrix=COSTS, critical_cost=5.0,
                       max_accuracy_drop_points=0.5)
    assert not gate.passed
    checks = {c["name"]: c for c in gate.checks}
    assert checks["total_cost"] == {**checks["total_cost"], "passed": False, "candidate": 21.0, "active": 11.0}
    assert checks["accuracy_drop"]["passed"] is False and checks["accuracy_drop"]["drop_points"] == pytest.approx(2.5)
    risen = [p for p in checks["critical_pair_errors"]["pairs"] if not p["passed"]]
    assert risen == [{"true": "50111-0434", "predicted": "00591-0461", "cost": 10.0, "candidate": 2, "active": 1,
                      "passed": False}]
    assert "total cost 21 vs active 11" in gate.describe() and "50111-0434 -> 00591-0461 1 -> 2" in gate.describe()
    assert gate_checks(candidate=BETTER, active=ACTIVE, cost_matrix=COSTS, critical_cost=5.0,
                       max_accuracy_drop_points=0.5).passed
    assert gate_checks(candidate=ACTIVE, active=ACTIVE, cost_matrix=COSTS, critical_cost=5.0,
                       max_accuracy_drop_points=0.0).passed  # equal is not worse


def test_accuracy_limit_is_in_points() -> None:
    cheap_errors = report({("00591-0461", "50111-0434"): 3})  # cost 3 < 11, but accuracy 37/40: -2.5 points
    assert not gate_checks(candidate=cheap_errors, active=ACTIVE, cost_matrix=COSTS, critical_cost=5.0,
                           max_accuracy_drop_points=0.5).passed
    assert gate_checks(candidate=cheap_errors, active=ACTIVE, cost_matrix=COSTS, critical_cost=5.0,
                       max_accuracy_drop_points=2.5).passed


class Registry:
    """A client on a database with the tiny dataset and model A active, plus hand-made candidates."""

    def __init__(self, settings: Settings, client: Any, seeded: Seeded) -> None:
        self.settings, self.client, self.seeded = settings, client, seeded

    def headers(self, role: str = "admin") -> dict[str, str]:
        """Auth headers for a role."""
        return {"X-API-Key": self.seeded.keys[Role(role)]}

    def candidate(self, valid: dict[str, Any], *, parent_report: dict[str, Any] | None = ACTIVE,
                  parent: int | None = -1, tag: str = "") -> int:
        """A version sharing model A's checkpoint, with `valid` as its validation report (and its parent's)."""
        database = Database(self.settings)
        try:
            with database.session() as session:
                base = session.get(ModelVersion, self.seeded.base_model)
                dataset = session.scalars(select(Dataset)).one()
                assert base is not None
                metrics: dict[str, Any] = {
                    "valid": valid, "test": valid,
                    "evaluation": {"dataset_id": dataset.id, "dataset_fingerprint": dataset.fingerprint},
                    "comparison": evaluation.comparison(candidate={"valid": valid}, parent={"valid": ACTIVE},
                                                        cost_matrix=COSTS)}
                if parent_report is not None:
                    metrics["parent"] = {"valid": parent_report}
                version = ModelVersion(
                    sha256=hashlib.sha256(f"{tag}{valid}".encode()).hexdigest(), path=base.path, arch=base.arch,
                    method="csada", classes=list(base.classes), image_size=base.image_size,
                    temperature=base.temperature, status="candidate",
                    parent_id=base.id if parent == -1 else parent, dataset_id=dataset.id, metrics=metrics,
                    decision=base.decision, checkpoint_metadata=base.checkpoint_metadata, created_by="tests")
                session.add(version)
                session.flush()
                return version.id
        finally:
            database.dispose()

    def promote(self, model_id: int, body: dict[str, Any] | None = None, role: str = "admin") -> Any:
        """POST promote."""
        return self.client.post(f"{MODELS}/{model_id}/promote", json=body or {}, headers=self.headers(role))

    def rollback(self, reason: str = "test") -> Any:
        """POST rollback."""
        return self.client.post(f"{MODELS}/rollback", json={"reason": reason}, headers=self.headers())

    def active(self) -> int | None:
        """The active model version id, per the API."""
        return next((m["id"] for m in self.client.get(MODELS, headers=self.headers()).json() if m["active"]), None)


@pytest.fixture
def registry(db_settings: Settings, make_client: Callable[..., Any],
             tmp_path_factory: pytest.TempPathFactory) -> Registry:
    """A Registry on SQLite and on PostgreSQL."""
    assets = tiny_assets(tmp_path_factory.getbasetemp() / "tiny-assets")
    if db_settings.is_sqlite:  # a copy of a database seeded once per session (faster)
        settings, seeded = seeded_sqlite_settings(tmp_path_factory.getbasetemp(), assets, db_settings.data_dir / "s")
        return Registry(settings, make_client(settings), seeded)
    seeded = seed_training(db_settings, assets, other_model=True)
    return Registry(db_settings, make_client(db_settings), seeded)


def test_gate_refuses_a_worse_model_with_409_and_accepts_a_better_one(registry: Registry) -> None:
    worse, better = registry.candidate(WORSE), registry.candidate(BETTER)
    refused = registry.promote(worse, {"reason": "try"})
    assert refused.status_code == 409, refused.text
    problem = refused.json()
    assert problem["type"].endswith("/promotion-gate-failed")
    assert problem["failed_checks"] == ["total_cost", "accuracy_drop", "critical_pair_errors"]
    assert "total cost 21 vs active 11" in problem["detail"]
    assert problem["gate"]["cost_matrix_version"] == registry.seeded.cost_matrix_version
    assert registry.active() == registry.seeded.base_model

    accepted = registry.promote(better, {"reason": "cheaper"})
    assert accepted.status_code == 200, accepted.text
    entry = accepted.json()["promotion"]
    assert accepted.json()["active_model_version"] == better
    assert (entry["action"], entry["from_model_version"], entry["forced"], entry["gate"]["passed"]) == \
        ("promote", registry.seeded.base_model, False, True)
    assert registry.active() == better
    again = registry.promote(better)
    assert again.status_code == 409 and again.json()["type"].endswith("/model-already-active")


def test_force_needs_a_reason_and_is_audited(registry: Registry) -> None:
    worse = registry.candidate(WORSE)
    assert registry.promote(worse, {"force": True}).status_code == 422
    forced = registry.promote(worse, {"force": True, "reason": "pharmacist override"})
    assert forced.status_code == 200
    entry = forced.json()["promotion"]
    assert entry["forced"] is True and entry["reason"] == "pharmacist override" and entry["gate"]["passed"] is False
    database = Database(registry.settings)
    try:
        with database.session() as session:
            audit = session.scalars(select(AdminAuditEntry).where(AdminAuditEntry.action == "model.promote")).one()
            assert audit.details["forced"] is True and audit.reason == "pharmacist override"
    finally:
        database.dispose()


def test_a_version_whose_checkpoint_is_gone_is_not_activated_even_by_force(registry: Registry) -> None:
    """It used to be made active (200) while every replica kept serving the old model and alerted."""
    from sqlalchemy import update

    better = registry.candidate(BETTER)
    database = Database(registry.settings)
    try:
        with database.session() as session:
            session.execute(update(ModelVersion).where(ModelVersion.id == better)
                            .values(path=str(registry.settings.data_dir / "unmounted" / "gone")))
    finally:
        database.dispose()
    for body in ({"reason": "cheaper"}, {"force": True, "reason": "override"}):
        refused = registry.promote(better, body)
        assert refused.status_code == 409 and refused.json()["type"].endswith("/checkpoint-missing"), refused.text
    assert registry.active() == registry.seeded.base_model


def test_roles_and_missing_versions(registry: Registry) -> None:
    better = registry.candidate(BETTER)
    assert registry.promote(better, role="pharmacist").status_code == 403
    assert registry.client.post(f"{MODELS}/rollback", json={}, headers=registry.headers("pharmacist")).status_code == 403
    assert registry.promote(999).status_code == 404
    assert registry.client.get(MODELS, headers=registry.headers("client")).status_code == 403
    assert registry.client.get(f"{MODELS}/{better}", headers=registry.headers("pharmacist")).status_code == 200


def test_rollback_undoes_promotions_like_a_stack_and_history_is_append_only(registry: Registry) -> None:
    base = registry.seeded.base_model
    assert registry.rollback().status_code == 409  # only the first activation so far
    first, second = registry.candidate(BETTER, tag="1"), registry.candidate(BETTER, tag="2")
    assert registry.promote(first).status_code == 200
    assert registry.promote(second, {"force": True, "reason": "same numbers"}).status_code in (200,)
    back = registry.rollback("second was bad")
    assert back.status_code == 200 and back.json()["active_model_version"] == first
    assert back.json()["promotion"]["action"] == "rollback" and back.json()["promotion"]["reason"] == "second was bad"
    assert registry.rollback().json()["active_model_version"] == base
    assert registry.rollback().status_code == 409
    history = registry.client.get(f"{MODELS}/promotions", headers=registry.headers()).json()
    assert [(h["action"], h["from_model_version"], h["to_model_version"]) for h in history] == [
        ("rollback", first, base), ("rollback", second, first), ("promote", first, second),
        ("promote", base, first), ("activate", None, base)]
    detail = registry.client.get(f"{MODELS}/{second}", headers=registry.headers()).json()
    assert detail["status"] == "retired" and len(detail["promotions"]) == 2
    database = Database(registry.settings)
    try:
        with database.session() as session:
            entry = session.scalars(select(ModelPromotion)).first()
            assert entry is not None
            entry.reason = "rewritten"
            with pytest.raises(Exception, match="immutable"):
                session.flush()
            session.rollback()
    finally:
        database.dispose()


def test_promote_and_rollback_can_require_the_version_the_admin_saw(registry: Registry) -> None:
    """An admin decides against what they saw active; another admin's change since then makes it a 409."""
    base = registry.seeded.base_model
    first, second = registry.candidate(BETTER, tag="1"), registry.candidate(BETTER, tag="2")
    assert registry.promote(first, {"expected_active": base}).status_code == 200
    late = registry.promote(second, {"expected_active": base, "force": True, "reason": "seen on the old page"})
    assert late.status_code == 409 and late.json()["type"].endswith("/active-changed"), late.text
    assert (late.json()["expected_active"], late.json()["active"]) == (base, first)
    stale_rollback = registry.client.post(f"{MODELS}/rollback", json={"expected_active": second},
                                          headers=registry.headers())
    assert stale_rollback.status_code == 409 and stale_rollback.json()["active"] == first
    assert registry.active() == first
    rolled = registry.client.post(f"{MODELS}/rollback", json={"expected_active": first}, headers=registry.headers())
    assert rolled.status_code == 200 and rolled.json()["active_model_version"] == base
    assert registry.promote(first, {"expected_active": "x"}).status_code == 422


def test_models_list_and_detail_show_the_comparison_with_the_parent(registry: Registry) -> None:
    better = registry.candidate(BETTER)
    listed = registry.client.get(MODELS, headers=registry.headers("pharmacist")).json()
    assert [m["id"] for m in listed] == [better, 2, registry.seeded.base_model]  # 2: model B
    summary = listed[0]
    assert summary["lineage"]["parent"] == registry.seeded.base_model and summary["valid"]["total_cost"] == 2.0
    table5 = {row["metric"]: row for row in summary["comparison"]["valid"]["table5"]}
    assert table5["Total cost"]["parent"] == 11.0 and table5["Total cost"]["candidate"] == 2.0
    assert table5["50111-0434 to 00591-0461 error rate (%)"] == {
        "metric": "50111-0434 to 00591-0461 error rate (%)", "parent": 10.0, "candidate": 0.0}
    table6 = {row["error_type"]: row for row in summary["comparison"]["valid"]["table6"]}
    assert table6["50111-0434 to 00591-0461"]["expert_cost"] == 10.0
    assert (table6["Other pairs"]["parent"], table6["Other pairs"]["candidate"]) == (1, 2)
    detail = registry.client.get(f"{MODELS}/{better}", headers=registry.headers("pharmacist")).json()
    assert detail["metrics"]["valid"]["confusion"][0] == [8, 2, 0, 0]
    assert detail["lineage"]["parent_sha256"]
    assert detail["checkpoint_path"] is None  # the server's file layout is for admins
    as_admin = registry.client.get(f"{MODELS}/{better}", headers=registry.headers("admin")).json()
    assert as_admin["checkpoint_path"]


def test_gate_evaluates_the_active_model_when_no_stored_evaluation_fits(
        registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    """The candidate's parent is not the active model: the active one is scored on the candidate's valid split,
    before the active state is locked (a slow evaluation must not hold the lock other writers wait on)."""
    from app.services import promotion

    calls: list[str] = []
    lock, score = promotion._lock_active, promotion._valid_report
    monkeypatch.setattr(promotion, "_lock_active", lambda session: (calls.append("lock"), lock(session))[1])
    monkeypatch.setattr(promotion, "_valid_report",
                        lambda *args, **kwargs: (calls.append("evaluate"), score(*args, **kwargs))[1])
    orphan = registry.candidate(report({}, per_class=3), parent_report=None, parent=None)
    response = registry.promote(orphan)
    assert calls == ["evaluate", "lock"]
    # A perfect 12-image validation run cannot be worse than the real model A on the same 12 images.
    assert response.status_code == 200, response.text
    gate = response.json()["promotion"]["gate"]
    cost = next(c for c in gate["checks"] if c["name"] == "total_cost")
    assert cost["candidate"] == 0.0 and gate["n"] == 12 and gate["dataset"] == "tiny"


def test_auto_promote_uses_the_report_evaluated_ahead_of_its_transaction(
        registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker evaluates the active model before its write transaction; the gate then evaluates nothing."""
    from app.services import promotion
    from app.services.audit import Actor

    orphan = registry.candidate(report({}, per_class=3), parent_report=None, parent=None, tag="ahead")
    database = Database(registry.settings)
    try:
        with database.session() as session:
            dataset_id = session.scalars(select(Dataset.id)).one()
        # Not needed when the active model is the candidate's parent (the candidate carries its report).
        assert promotion.evaluate_active_ahead(database, registry.settings, parent_id=registry.seeded.base_model,
                                               dataset_id=dataset_id, classes=K) is None
        ahead = promotion.evaluate_active_ahead(database, registry.settings, parent_id=None, dataset_id=dataset_id,
                                                classes=K)
        assert ahead is not None and ahead.model_version_id == registry.seeded.base_model
        assert sum(map(sum, ahead.report["confusion"])) == 12

        def no_evaluation(*_args: object, **_kwargs: object) -> None:
            raise AssertionError("the gate evaluated a model inside the write transaction")

        monkeypatch.setattr(evaluation, "evaluate_checkpoint", no_evaluation)
        stale = promotion.AheadReport(ahead.model_version_id + 1000, ahead.dataset_id, ahead.cost_matrix_version_id,
                                      ahead.report)
        with pytest.raises(AssertionError, match="inside the write transaction"), database.session() as session:
            candidate = session.get(ModelVersion, orphan)
            assert candidate is not None
            promotion.auto_promote(session, registry.settings, candidate=candidate, actor=Actor.cli("tests"),
                                   job_id=1, ahead=stale)  # another model's report is not used
        with database.session() as session:
            candidate = session.get(ModelVersion, orphan)
            assert candidate is not None
            outcome = promotion.auto_promote(session, registry.settings, candidate=candidate,
                                             actor=Actor.cli("tests"), job_id=1, ahead=ahead)
        assert outcome["promoted"] is True and outcome["gate"]["n"] == 12
    finally:
        database.dispose()
    assert registry.active() == orphan


def test_a_promotion_gated_under_one_cost_matrix_does_not_land_after_another_is_activated(
        registry: Registry, monkeypatch: pytest.MonkeyPatch) -> None:
    """Gate under version N, then another request activates N+1 before the promotion writes: 409
    `active-changed`, nothing promoted (on SQLite nothing else would stop it)."""
    if not registry.settings.is_sqlite:
        pytest.skip("PostgreSQL holds the active state's row lock from before the gate to the write, so the "
                    "competing activation waits for the promotion to commit (here, on the same thread, forever)")
    from app.services import promotion
    from app.services.active_state import move_active
    from tests.app.factories import change, edit

    pharmacist = registry.headers("pharmacist")
    created = registry.client.post("/v1/admin/cost-matrices", headers=pharmacist,
                                   json=edit(registry.seeded.cost_matrix_version, change(K[0], K[1], 3)))
    assert created.status_code == 201, created.text
    newer = created.json()["version"]
    better = registry.candidate(BETTER)
    real_gate = promotion.evaluate_gate

    def gate_then_someone_activates(*args: Any, **kwargs: Any) -> Any:
        gate = real_gate(*args, **kwargs)
        database = Database(registry.settings)
        try:
            with database.session() as session:  # another request, committed in between
                move_active(session, "cost_matrix_version_id", previous=registry.seeded.cost_matrix_version,
                            new=newer)
        finally:
            database.dispose()
        return gate

    monkeypatch.setattr(promotion, "evaluate_gate", gate_then_someone_activates)
    response = registry.promote(better)
    assert response.status_code == 409 and response.json()["type"].endswith("active-changed"), response.text
    assert response.json()["expected_cost_matrix_version_id"] == registry.seeded.cost_matrix_version
    assert registry.active() == registry.seeded.base_model
    monkeypatch.setattr(promotion, "evaluate_gate", real_gate)
    again = registry.promote(better)  # the retry is gated under the new version
    assert again.status_code == 200, again.text
    assert again.json()["promotion"]["gate"]["cost_matrix_version"] == newer
