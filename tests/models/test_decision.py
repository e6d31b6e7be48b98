"""Verdict policy: hand-made probability vectors, asymmetric costs, fitting and conformal coverage."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.costs import CostMatrix
from models.decision import (
    CONFORMAL_GUARANTEE,
    REASONS,
    Decision,
    VerdictPolicy,
    conformal_alphas,
    conformal_quantiles,
    decide,
    decide_batch,
    fit_policy,
    refit_policy,
    split_validation,
    with_accept_ceiling,
)

CLASSES = ("A", "B", "C")


def make_policy(*, accept_risk: float = 0.5, mismatch_probability: float = 0.05,
                qhat: tuple[float, ...] = (0.3, 0.3, 0.3), critical_cost: float = 5.0) -> VerdictPolicy:
    return VerdictPolicy(CLASSES, accept_risk=accept_risk, mismatch_probability=mismatch_probability,
                         qhat=qhat, alpha=(0.1, 0.1, 0.1), critical_cost=critical_cost)


def costs(pairs: dict[tuple[str, str], float] | None = None) -> CostMatrix:
    return CostMatrix.from_pairs(CLASSES, pairs or {})


def verdict(probs: list[float], r: int, *, cost_matrix: CostMatrix | None = None, **policy_args: object) -> Decision:
    return decide(np.array(probs), prescribed_index=r, cost_matrix=cost_matrix or costs(),
                  policy=make_policy(**policy_args), classes=CLASSES)  # type: ignore[arg-type]


def synthetic_probs(rng: np.random.Generator, n_per_class: int, k: int, *, strength: float = 2.5
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Softmax of Gaussian logits with a class-dependent margin: some classes are harder than others."""
    labels = np.repeat(np.arange(k), n_per_class)
    logits = rng.normal(size=(labels.size, k))
    logits[np.arange(labels.size), labels] += strength * (0.5 + np.arange(k) / k)[labels]
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True), labels


def test_expected_accept_cost_reads_the_prescribed_column() -> None:
    # Truth B handed out for prescription A is dangerous (10); A for B is cheap (1).
    matrix = costs({("B", "A"): 10.0})
    on_a = verdict([0.8, 0.15, 0.05], 0, cost_matrix=matrix, accept_risk=100)
    assert on_a.expected_accept_cost == pytest.approx(0.15 * 10 + 0.05 * 1)
    on_b = verdict([0.15, 0.8, 0.05], 1, cost_matrix=matrix, accept_risk=100)
    assert on_b.expected_accept_cost == pytest.approx(0.15 * 1 + 0.05 * 1)


def test_asymmetric_costs_decide_in_the_right_direction() -> None:
    matrix = costs({("B", "A"): 10.0})
    # Prescribed A with 10% chance the bottle holds B: 1.0 + 0.1 expected cost, too high.
    risky = verdict([0.8, 0.1, 0.1], 0, cost_matrix=matrix, accept_risk=0.5)
    assert (risky.verdict, risky.reason) == ("review", "accept-risk-too-high")
    # The mirror case (prescribed B, 10% chance of A) is cheap: c(A, B) = 1.
    safe = verdict([0.1, 0.8, 0.1], 1, cost_matrix=matrix, accept_risk=0.5)
    assert (safe.verdict, safe.reason) == ("match", "accepted")


def test_accepted_path_fills_every_field() -> None:
    decision = verdict([0.9, 0.06, 0.04], 0)
    assert decision == Decision(verdict="match", reason="accepted", prescribed="A", predicted="A",
                                probability_prescribed=0.9, expected_accept_cost=decision.expected_accept_cost,
                                top=(("A", 0.9), ("B", 0.06), ("C", 0.04)), conformal_set=("A",), accept_risk_threshold=0.5)
    assert decision.expected_accept_cost == pytest.approx(0.1)
    body = decision.to_dict()
    assert body["top"][0] == {"class": "A", "probability": 0.9}
    json.dumps(body)


def test_implausible_prescription_is_a_mismatch_naming_the_content() -> None:
    decision = verdict([0.02, 0.9, 0.08], 0)
    assert (decision.verdict, decision.reason, decision.predicted) == ("mismatch", "prescribed-implausible", "B")


def test_low_probability_inside_the_conformal_set_is_review_not_mismatch() -> None:
    decision = verdict([0.02, 0.9, 0.08], 0, qhat=(0.99, 0.3, 0.3))
    assert "A" in decision.conformal_set
    assert (decision.verdict, decision.reason) == ("review", "prescribed-not-top")


def test_an_unfamiliar_photo_goes_to_review_whatever_its_probabilities_say() -> None:
    policy, matrix = make_policy(), costs()
    for probs, r, usual in (([0.9, 0.06, 0.04], 0, "match"), ([0.02, 0.9, 0.08], 0, "mismatch")):
        assert verdict(probs, r).verdict == usual
        for score in (1.0001, float("inf"), float("nan")):  # a NaN score is never taken as familiar
            flagged = decide(np.array(probs), prescribed_index=r, cost_matrix=matrix, policy=policy, classes=CLASSES,
                             unfamiliarity=score)
            assert (flagged.verdict, flagged.reason) == ("review", "photo-unfamiliar")
        familiar = decide(np.array(probs), prescribed_index=r, cost_matrix=matrix, policy=policy, classes=CLASSES,
                          unfamiliarity=1.0)
        assert familiar.verdict == usual and familiar.unfamiliarity == 1.0
    batch = decide_batch(np.array([[0.9, 0.06, 0.04]] * 3), prescribed_indices=[0, 0, 0], cost_matrix=matrix,
                         policy=policy, classes=CLASSES, unfamiliarity=[None, 0.5, 3.0])
    assert [(d.reason, d.unfamiliarity) for d in batch] == [("accepted", None), ("accepted", 0.5),
                                                             ("photo-unfamiliar", 3.0)]
    with pytest.raises(ValueError, match="unfamiliarity"):
        decide_batch(np.array([[0.9, 0.06, 0.04]]), prescribed_indices=[0], cost_matrix=matrix, policy=policy,
                     classes=CLASSES, unfamiliarity=[1.0, 2.0])


def test_plausible_but_not_top_is_review() -> None:
    decision = verdict([0.3, 0.6, 0.1], 0)
    assert (decision.verdict, decision.reason) == ("review", "prescribed-not-top")


def test_a_tie_has_no_top_class() -> None:
    decision = verdict([0.45, 0.45, 0.1], 0, accept_risk=10, qhat=(1.0, 1.0, 1.0))
    assert decision.reason == "prescribed-not-top"


def test_prescribed_outside_its_conformal_set_is_review() -> None:
    decision = verdict([0.9, 0.05, 0.05], 0, qhat=(0.05, 0.3, 0.3))
    assert (decision.verdict, decision.reason) == ("review", "conformal-set-excludes-prescribed")
    assert decision.conformal_set == ()


def test_critical_neighbour_in_the_set_is_ambiguous_but_a_harmless_one_is_not() -> None:
    probs, qhat = [0.6, 0.35, 0.05], (0.5, 0.7, 0.3)
    dangerous = verdict(probs, 0, cost_matrix=costs({("B", "A"): 10.0}), accept_risk=5, qhat=qhat)
    assert (dangerous.verdict, dangerous.reason) == ("review", "conformal-set-ambiguous")
    assert dangerous.conformal_set == ("A", "B")
    # Only the reverse confusion is costly: handing out A for B. B in the set is harmless for prescription A.
    harmless = verdict(probs, 0, cost_matrix=costs({("A", "B"): 10.0}), accept_risk=5, qhat=qhat)
    assert (harmless.verdict, harmless.reason) == ("match", "accepted")


def test_batch_matches_single_decisions() -> None:
    rng = np.random.default_rng(0)
    probs, _ = synthetic_probs(rng, 20, 3)
    prescribed = rng.integers(0, 3, size=len(probs))
    matrix, policy = costs({("B", "A"): 10.0, ("C", "B"): 3.0}), make_policy(qhat=(0.6, 0.5, 0.4))
    batch = decide_batch(probs, prescribed_indices=prescribed, cost_matrix=matrix, policy=policy, classes=CLASSES)
    singles = [decide(p, prescribed_index=int(r), cost_matrix=matrix, policy=policy, classes=CLASSES)
               for p, r in zip(probs, prescribed, strict=True)]
    assert batch == singles
    assert {d.reason for d in batch} <= set(REASONS)


def test_expected_cost_is_bit_identical_in_any_batch() -> None:
    """A verdict must not depend on which other requests shared its batch (BLAS sums by shape/threads)."""
    k = 20
    classes = tuple(f"P{i}" for i in range(k))
    rng = np.random.default_rng(1)
    probs = rng.dirichlet(np.ones(k), size=257)
    matrix = CostMatrix.pareto(classes, seed=3)
    policy = VerdictPolicy(classes, accept_risk=0.5, mismatch_probability=0.05, qhat=(0.5,) * k, alpha=(0.1,) * k,
                           critical_cost=5.0)
    prescribed = rng.integers(0, k, size=len(probs))
    batch = decide_batch(probs, prescribed_indices=prescribed, cost_matrix=matrix, policy=policy, classes=classes)
    for i in range(0, len(probs), 16):
        single = decide(probs[i], prescribed_index=int(prescribed[i]), cost_matrix=matrix, policy=policy,
                        classes=classes)
        assert single.expected_accept_cost == batch[i].expected_accept_cost  # exact, not approx


def test_inputs_are_checked() -> None:
    with pytest.raises(ValueError, match="class order"):
        decide([0.9, 0.05, 0.05], prescribed_index=0, cost_matrix=CostMatrix.uniform(("B", "A", "C")),
               policy=make_policy(), classes=CLASSES)
    with pytest.raises(ValueError, match="sum to 1"):
        verdict([0.9, 0.9, 0.05], 0)
    with pytest.raises(ValueError, match="outside"):
        verdict([0.9, 0.05, 0.05], 3)
    with pytest.raises(ValueError, match="another class list"):
        decide([0.9, 0.05, 0.05], prescribed_index=0, cost_matrix=costs(), classes=CLASSES,
               policy=VerdictPolicy.review_only(("X", "Y", "Z"), critical_cost=5))


def test_policy_json_round_trip_and_review_only() -> None:
    policy = VerdictPolicy(CLASSES, accept_risk=0.25, mismatch_probability=0.01, qhat=(0.2, 0.4, 1.0),
                           alpha=(0.01, 0.1, 0.05), critical_cost=5.0, report={"review_rate": 0.1})
    restored = VerdictPolicy.from_dict(json.loads(json.dumps(policy.to_dict(), allow_nan=False)))
    assert restored == policy and restored.report == {"review_rate": 0.1}
    with pytest.raises(ValueError, match="format"):
        VerdictPolicy.from_dict({"format_version": 99})
    fallback = VerdictPolicy.review_only(CLASSES, critical_cost=5)
    for probs in ([0.98, 0.01, 0.01], [0.01, 0.98, 0.01]):
        assert decide(probs, prescribed_index=0, cost_matrix=costs(), policy=fallback,
                      classes=CLASSES).verdict == "review"


def test_alphas_follow_the_costs_and_respect_the_sample_floor() -> None:
    matrix = costs({("B", "A"): 10.0}).matrix  # confusing truth B is dangerous
    alphas = conformal_alphas(matrix, [1000, 1000, 1000], base_alpha=0.1)
    assert alphas[1] == pytest.approx(0.01) and alphas[0] == alphas[2] == pytest.approx(0.1)
    assert conformal_alphas(matrix, [20, 20, 20], base_alpha=0.1)[1] == pytest.approx(1 / 21)


def test_split_is_per_class_deterministic_and_disjoint() -> None:
    labels = np.repeat([0, 1, 2], [10, 7, 1])
    first, second = split_validation(labels, seed=3), split_validation(labels, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    threshold, calibration = first
    assert not set(threshold) & set(calibration) and len(threshold) + len(calibration) == labels.size
    assert np.bincount(labels[calibration], minlength=3).tolist() == [5, 4, 0]


def test_conformal_sets_reach_their_per_class_coverage_on_fresh_data() -> None:
    rng = np.random.default_rng(7)
    k = 5
    # Coverage is random over the calibration draw (std about sqrt(alpha (1 - alpha) / n_y)): with 3000 per
    # class it is within 0.025 of its expectation k / (n + 1) >= 1 - alpha with overwhelming probability.
    cal_probs, cal_labels = synthetic_probs(rng, 3000, k)
    matrix = CostMatrix.from_pairs([str(i) for i in range(k)], {("1", "0"): 10.0, ("3", "4"): 4.0}).matrix
    alphas = conformal_alphas(matrix, np.bincount(cal_labels), base_alpha=0.2)
    qhat = conformal_quantiles(cal_probs, cal_labels, alphas)
    test_probs, test_labels = synthetic_probs(rng, 20_000, k)
    covered = (1.0 - test_probs[np.arange(test_labels.size), test_labels]) <= qhat[test_labels]
    for y in range(k):
        coverage = covered[test_labels == y].mean()
        assert coverage >= 1 - alphas[y] - 0.025, (y, coverage, alphas[y])
    assert alphas[1] < alphas[3] < alphas[0]


def test_fit_policy_has_no_critical_accept_and_no_correct_mismatch_on_its_threshold_half() -> None:
    rng = np.random.default_rng(11)
    k = 6
    classes = tuple(f"P{i}" for i in range(k))
    matrix = CostMatrix.from_pairs(classes, {("P1", "P0"): 10.0, ("P2", "P3"): 8.0, ("P3", "P2"): 6.0})
    probs, labels = synthetic_probs(rng, 120, k, strength=3.0)
    policy = fit_policy(probs, labels, cost_matrix=matrix, critical_cost=5.0, classes=classes, seed=1)
    report = policy.report
    assert report["critical_accepts"] == 0 and report["critical_fills"] > 0
    assert report["mismatch_rate_correct_fills"] == 0.0
    assert 0.0 < report["review_rate"] < 1.0
    assert report["n_threshold"] + report["n_calibration"] == labels.size
    # Re-derive the numbers with the public decide_batch over every simulated (image, prescription) pair.
    threshold, _ = split_validation(labels, seed=1)
    fp, fl = probs[threshold], labels[threshold]
    images, prescribed = np.repeat(np.arange(fl.size), k), np.tile(np.arange(k), fl.size)
    decisions = decide_batch(fp[images], prescribed_indices=prescribed, cost_matrix=matrix, policy=policy,
                             classes=classes)
    truth = fl[images]
    critical_accepts = sum(d.verdict == "match" and matrix.matrix[t, r] >= 5.0
                           for d, t, r in zip(decisions, truth, prescribed, strict=True))
    assert critical_accepts == 0
    assert not any(d.verdict == "mismatch" for d, t, r in zip(decisions, truth, prescribed, strict=True) if t == r)
    correct_reviews = np.mean([d.verdict == "review" for d, t, r in zip(decisions, truth, prescribed, strict=True)
                               if t == r])
    assert report["review_rate_correct_fills"] == pytest.approx(correct_reviews)
    assert VerdictPolicy.from_dict(json.loads(json.dumps(policy.to_dict(), allow_nan=False))) == policy
    assert all(report["coverage"][c] >= 1 - a - 0.1 for c, a in zip(classes, policy.alpha, strict=True))


def test_fit_policy_accept_threshold_sits_below_the_first_critical_accept() -> None:
    # Two images of class B that look like A would be accepted for prescription A unless the threshold
    # stays under their risk; A's own images are confident.
    classes = ("A", "B")
    matrix = CostMatrix.from_pairs(classes, {("B", "A"): 10.0})
    probs = np.array([[0.99, 0.01]] * 10 + [[0.97, 0.03]] * 10 + [[0.6, 0.4]] * 4 + [[0.1, 0.9]] * 16)
    labels = np.array([0] * 20 + [1] * 4 + [1] * 16)
    policy = fit_policy(probs, labels, cost_matrix=matrix, critical_cost=5.0, classes=classes, base_alpha=0.5,
                        seed=0)
    assert policy.accept_risk < 0.4 * 10
    assert policy.report["critical_accepts"] == 0


def test_guarantee_text_is_plain_and_names_its_conditions() -> None:
    for phrase in ("at least 1 - alpha_y", "exchangeable", "drift", "not a promise about any single photo"):
        assert phrase in CONFORMAL_GUARANTEE


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3).filter(lambda v: sum(v) > 1e-3),
       st.integers(0, 2), st.floats(0.0, 20.0))
def test_invariants_of_the_rule(raw: list[float], r: int, extra_cost: float) -> None:
    probs = np.array(raw) / sum(raw)
    policy = make_policy(qhat=(0.6, 0.6, 0.6))
    base = decide(probs, prescribed_index=r, cost_matrix=costs(), policy=policy, classes=CLASSES)
    if base.verdict == "match":
        assert base.predicted == CLASSES[r] and base.expected_accept_cost <= policy.accept_risk
    if base.verdict == "mismatch":
        assert base.probability_prescribed < policy.mismatch_probability and CLASSES[r] not in base.conformal_set
    # Raising the cost of handing out any other product in place of r never turns a non-match into a match.
    other = CLASSES[(r + 1) % 3]
    raised = costs({(other, CLASSES[r]): 1.0 + extra_cost})
    again = decide(probs, prescribed_index=r, cost_matrix=raised, policy=policy, classes=CLASSES)
    assert not (again.verdict == "match" and base.verdict != "match")


def test_review_only_policy_never_accepts_even_at_zero_risk() -> None:
    # A confident float32 softmax rounds to exactly [1, 0, 0]: the accept risk is exactly 0.
    policy = VerdictPolicy.review_only(CLASSES, critical_cost=5)
    unit = costs()
    for prescribed in range(len(CLASSES)):
        probs = [0.0, 0.0, 0.0]
        probs[prescribed] = 1.0
        decision = decide(probs, prescribed_index=prescribed, cost_matrix=unit, classes=CLASSES, policy=policy)
        assert (decision.verdict, decision.reason) == ("review", "no-fitted-policy")
        assert decision.expected_accept_cost == 0.0
    assert VerdictPolicy.from_dict(policy.to_dict()).accepts is False


def test_refit_for_the_same_costs_gives_the_same_policy_and_for_new_costs_follows_them() -> None:
    rng = np.random.default_rng(3)
    k = 6
    classes = tuple(f"P{i}" for i in range(k))
    probs, labels = synthetic_probs(rng, 60, k)
    before = CostMatrix.from_pairs(classes, {("P1", "P0"): 10.0})
    policy = fit_policy(probs, labels, cost_matrix=before, critical_cost=5.0, classes=classes, seed=7,
                        base_alpha=0.2, wrong_fill_rate=0.02)
    same = refit_policy(policy, probs, labels, cost_matrix=before)
    assert same == policy and same.report == policy.report
    # A pharmacist makes P3 -> P2 critical too: P3's miss rate shrinks, and the threshold half again
    # accepts no critical wrong fill, now including the new pair.
    after = CostMatrix.from_pairs(classes, {("P1", "P0"): 10.0, ("P3", "P2"): 20.0})
    refit = refit_policy(policy, probs, labels, cost_matrix=after)
    assert refit.report["cost_matrix_sha256"] == after.fingerprint() != policy.report["cost_matrix_sha256"]
    assert refit.alpha[3] < policy.alpha[3] and refit.alpha[1] == policy.alpha[1]
    assert refit.report["seed"] == 7 and refit.report["base_alpha"] == 0.2 and refit.critical_cost == 5.0
    assert refit.report["critical_accepts"] == 0
    with pytest.raises(ValueError, match="fitted"):
        refit_policy(VerdictPolicy.review_only(classes, critical_cost=5.0), probs, labels, cost_matrix=after)


def test_an_accept_ceiling_caps_the_fitted_threshold_in_a_refit_or_without_one() -> None:
    """RXVERIFY_MAX_ACCEPT_RISK: a refit takes the ceiling given (raised or lowered); without validation
    outputs the stored threshold is lowered and the report says its rates are the fitted ones."""
    rng = np.random.default_rng(5)
    k = 6
    classes = tuple(f"P{i}" for i in range(k))
    probs, labels = synthetic_probs(rng, 60, k, strength=1.0)  # a weak model: a high fitted threshold
    matrix = CostMatrix.from_pairs(classes, {("P1", "P0"): 10.0})
    policy = fit_policy(probs, labels, cost_matrix=matrix, critical_cost=5.0, classes=classes, seed=1)
    assert policy.accept_risk > 0.3 and policy.report["max_accept_risk"] is None
    capped = refit_policy(policy, probs, labels, cost_matrix=matrix, max_accept_risk=0.05)
    assert capped.accept_risk == 0.05 and capped.report["max_accept_risk"] == 0.05
    # Fewer fills accepted, all of them below the ceiling, and the report measured at the new threshold.
    assert capped.report["accept_rate_correct_fills"] < policy.report["accept_rate_correct_fills"]
    assert capped.report["wrong_accepts"] < policy.report["wrong_accepts"]
    # A ceiling an operator raises applies to a policy fitted under a lower one (None keeps the stored one).
    looser = refit_policy(capped, probs, labels, cost_matrix=matrix, max_accept_risk=0.3)
    assert looser.accept_risk == 0.3 and looser.report["max_accept_risk"] == 0.3
    assert refit_policy(capped, probs, labels, cost_matrix=matrix) == capped
    assert refit_policy(policy, probs, labels, cost_matrix=matrix, max_accept_risk=10.0) == policy
    lowered = with_accept_ceiling(policy, 0.05)
    assert lowered.accept_risk == 0.05 and lowered.report["accept_risk_fitted"] == policy.accept_risk
    assert lowered.qhat == policy.qhat and lowered.mismatch_probability == policy.mismatch_probability
    assert with_accept_ceiling(policy, 10.0) is policy
    review_only = VerdictPolicy.review_only(classes, critical_cost=5.0)
    assert with_accept_ceiling(review_only, 0.05) is review_only
    for probs_row, r in ((probs[i], int(labels[i])) for i in range(len(labels))):
        risky = decide(probs_row, prescribed_index=r, cost_matrix=matrix, policy=lowered, classes=classes)
        assert risky.verdict != "match" or risky.expected_accept_cost <= 0.05
