"""RXVERIFY_MAX_ACCEPT_RISK as the serving path applies it to a model's stored verdict policy."""

from __future__ import annotations

import numpy as np

from app.inference.served import policy_for_costs
from models.costs import CostMatrix
from models.decision import fit_policy

CLASSES = tuple(f"P{i}" for i in range(5))
MATRIX = CostMatrix.from_pairs(CLASSES, {("P1", "P0"): 10.0})


def weak_validation() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(len(CLASSES)), 40)
    logits = rng.normal(size=(labels.size, len(CLASSES)))
    logits[np.arange(labels.size), labels] += 1.0
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return probs, labels


def test_the_ceiling_is_applied_to_stored_policies_whichever_way_it_moved() -> None:
    validation = weak_validation()
    uncapped = fit_policy(*validation, cost_matrix=MATRIX, critical_cost=5.0, classes=CLASSES, seed=0)
    assert uncapped.accept_risk > 0.3  # a weak model: the fitted threshold alone lets risky fills through
    stored = fit_policy(*validation, cost_matrix=MATRIX, critical_cost=5.0, classes=CLASSES, seed=0,
                        max_accept_risk=0.05)  # what the worker stores under the default ceiling

    def serve(policy: object, ceiling: float, *, with_validation: bool = True) -> tuple[float, bool, object]:
        found, fitted = policy_for_costs(policy, validation if with_validation else None, MATRIX,  # type: ignore[arg-type]
                                         classes=CLASSES, critical_cost=5.0, max_accept_risk=ceiling, label="m")
        return found.accept_risk, fitted, found

    assert serve(stored, 0.05)[2] is stored  # fitted under this very ceiling: served as stored
    assert serve(stored, 0.3)[:2] == (0.3, True)  # an operator raised it: refitted on the validation outputs
    assert serve(uncapped, 0.05)[:2] == (0.05, True)  # a model fitted before the ceiling existed
    assert serve(uncapped, 10.0)[2] is uncapped  # a ceiling that does not bind changes nothing
    # Without validation outputs the threshold can only be lowered; it is still the one for these costs.
    assert serve(uncapped, 0.05, with_validation=False)[:2] == (0.05, True)
    assert serve(stored, 0.3, with_validation=False)[:2] == (stored.accept_risk, True)
