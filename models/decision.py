"""Verdict policy: match / mismatch / review from calibrated probabilities, costs and Mondrian conformal sets.

Inputs are the temperature-calibrated probabilities `p` over the model's classes, the prescribed class `r`
and the active cost matrix `c` (rows = what is really in the bottle, columns = what was prescribed).
Accepting a fill hands the patient `y` in place of `r`, so the expected cost of accepting is
`sum_{y != r} p(y) c(y, r)` (column `r`, not row `r`: c(y, r) and c(r, y) differ and the column counts).

The rule, checked in this order (`decide` / `decide_batch`; `reason` is a machine-readable slug):

0. `review / photo-unfamiliar`: the photo's features are unlike the training photos' (`models.ood`:
   its `unfamiliarity` exceeds 1), so none of its probabilities can be trusted, a mismatch included.
1. `mismatch / prescribed-implausible`: another class is top, p(r) < `mismatch_probability` and r is
   outside the conformal set. The decision names the likely content (`predicted`).
2. `review / prescribed-not-top`: r is not the unique top class (ties are not top).
3. `review / accept-risk-too-high`: the expected accept cost exceeds `accept_risk`.
4. `review / conformal-set-excludes-prescribed`: r is top but not in its conformal set.
5. `review / conformal-set-ambiguous`: some other y in the set is a critical substitute for r,
   i.e. c(y, r) >= `critical_cost`. Non-critical neighbours (a cost-1 lookalike) may stay in the set:
   requiring the set to be exactly {r} would send most fills to review, and this weaker rule is the one
   that carries the conformal guarantee over to dangerous fills (see CONFORMAL_GUARANTEE).
6. `match / accepted`.

Fitting (`fit_policy`) uses the trained model's validation outputs only, so CSADA's boundary shift is
not counted twice: the costs enter through the risk, the critical constraint and alpha_y, never through
a re-weighting of p. The validation split is cut per class, with a seed, into a threshold half and a
conformal-calibration half (`split_validation`): quantiles come from the calibration half, thresholds
from the threshold half. For the conformal guarantee to be exact the temperature should be fitted on the
threshold half too (`split_validation` returns the indices to do so); a temperature fitted on the whole
split leaks one scalar into the calibration scores and makes the guarantee approximate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np

from models.costs import CostMatrix

POLICY_FORMAT_VERSION = 1
VERDICTS = ("match", "mismatch", "review")
REASONS = ("accepted", "prescribed-implausible", "prescribed-not-top", "accept-risk-too-high",
           "conformal-set-excludes-prescribed", "conformal-set-ambiguous", "no-fitted-policy", "photo-unfamiliar")
_ACCEPTED, _IMPLAUSIBLE, _NOT_TOP, _RISK, _EXCLUDED, _AMBIGUOUS, _UNFITTED, _UNFAMILIAR = range(len(REASONS))
_VERDICT_OF_REASON = ("match", "mismatch", "review", "review", "review", "review", "review", "review")

CONFORMAL_GUARANTEE = (
    "For bottles that truly contain product y, the prediction set contains y at least 1 - alpha_y of the "
    "time, where alpha_y is the miss rate listed for that product (smaller for products whose confusions "
    "are costly). Because a fill is only accepted automatically when no product that would be a critical "
    "substitute for the prescription is in the set, a bottle holding such a dangerous substitute y is "
    "auto-accepted at most alpha_y of the time. What this does NOT say: it is an average over many bottles "
    "of product y, not a promise about any single photo, and it does not bound errors between products "
    "whose confusion is not critical. It holds only while new photos resemble the calibration photos "
    "(same cameras, lighting, bottles, pill lots and product mix: statistically 'exchangeable'). It fails "
    "under drift, such as a new camera, a new manufacturer's look for the same NDC, or a changed lighting "
    "setup, until the model is recalibrated on photos from the new conditions."
)


def _probabilities(probs: Any, k: int) -> np.ndarray:
    array = np.asarray(probs, dtype=np.float64)
    if array.ndim != 2 or array.shape[1] != k:
        raise ValueError(f"probabilities must have shape (N, {k}) (got {array.shape})")
    if not np.isfinite(array).all() or (array < 0).any():
        raise ValueError("probabilities must be finite and non-negative")
    if array.size and np.abs(array.sum(axis=1) - 1).max() > 1e-3:
        raise ValueError("each probability vector must sum to 1 (apply softmax after the temperature)")
    return array


def _check_costs(cost_matrix: CostMatrix, classes: Sequence[str]) -> np.ndarray:
    if tuple(cost_matrix.classes) != tuple(classes):
        raise ValueError("the cost matrix is not in the model's class order: pass cost_matrix.reindexed(classes)")
    return np.asarray(cost_matrix.matrix, dtype=np.float64)


@dataclass(frozen=True)
class VerdictPolicy:
    """Fitted thresholds and conformal quantiles for one model version (stored in metadata `decision`)."""

    classes: tuple[str, ...]
    accept_risk: float
    mismatch_probability: float
    qhat: tuple[float, ...]
    alpha: tuple[float, ...]
    critical_cost: float
    report: dict[str, Any] = field(default_factory=dict, compare=False)
    # False for a model without fitted thresholds: nothing it sees may be auto-accepted, whatever the risk
    # (a confident float32 softmax can round to an exact 0 risk, which `risk > accept_risk` lets through).
    accepts: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "qhat", tuple(float(q) for q in self.qhat))
        object.__setattr__(self, "alpha", tuple(float(a) for a in self.alpha))
        k = len(self.classes)
        if k == 0 or len(self.qhat) != k or len(self.alpha) != k:
            raise ValueError(f"qhat and alpha need one value per class ({k} classes)")
        if not all(0.0 <= q <= 1.0 for q in self.qhat) or not all(0.0 < a < 1.0 for a in self.alpha):
            raise ValueError("qhat must lie in [0, 1] and alpha in (0, 1)")
        if not (math.isfinite(self.accept_risk) and self.accept_risk >= 0):
            raise ValueError(f"accept_risk must be finite and >= 0 (got {self.accept_risk})")
        if not 0.0 <= self.mismatch_probability <= 1.0:
            raise ValueError(f"mismatch_probability must lie in [0, 1] (got {self.mismatch_probability})")
        if not (math.isfinite(self.critical_cost) and self.critical_cost > 0):
            raise ValueError(f"critical_cost must be finite and positive (got {self.critical_cost})")

    @classmethod
    def review_only(cls, classes: Sequence[str], *, critical_cost: float) -> VerdictPolicy:
        """A policy for a model with no fitted thresholds: never accepts nor rejects, everything goes to review."""
        k = len(classes)
        return cls(tuple(classes), accept_risk=0.0, mismatch_probability=0.0, qhat=(1.0,) * k,
                   alpha=(0.5,) * k, critical_cost=critical_cost, report={"fitted": False}, accepts=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict for `CheckpointMetadata.decision`."""
        body = asdict(self)
        body["classes"], body["qhat"], body["alpha"] = list(self.classes), list(self.qhat), list(self.alpha)
        return {"format_version": POLICY_FORMAT_VERSION, **body}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VerdictPolicy:
        """Parse a dict written by to_dict; raise ValueError on anything else."""
        if data.get("format_version") != POLICY_FORMAT_VERSION:
            raise ValueError(f"unsupported verdict policy format {data.get('format_version')!r}")
        try:
            return cls(classes=tuple(data["classes"]), accept_risk=float(data["accept_risk"]),
                       mismatch_probability=float(data["mismatch_probability"]), qhat=tuple(data["qhat"]),
                       alpha=tuple(data["alpha"]), critical_cost=float(data["critical_cost"]),
                       report=dict(data.get("report") or {}), accepts=bool(data.get("accepts", True)))
        except (KeyError, TypeError) as error:
            raise ValueError(f"invalid verdict policy: {error!r}") from None

    def conformal_mask(self, probs: Any) -> np.ndarray:
        """Boolean (N, K): y is in the set of image i when 1 - p_i(y) <= qhat_y."""
        array = _probabilities(probs, len(self.classes))
        return (1.0 - array) <= np.asarray(self.qhat)[None, :]


@dataclass(frozen=True)
class Decision:
    """The verdict for one photo and its evidence."""

    verdict: str
    reason: str
    prescribed: str
    predicted: str
    probability_prescribed: float
    expected_accept_cost: float
    top: tuple[tuple[str, float], ...]
    conformal_set: tuple[str, ...]
    accept_risk_threshold: float  # the policy's accept_risk that expected_accept_cost was held to
    # models.ood: the photo's largest score / threshold over the feature stages (above 1: unfamiliar);
    # None when the model has no familiarity check or it is turned off.
    unfamiliarity: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (top as [{class, probability}])."""
        body = asdict(self)
        body["top"] = [{"class": name, "probability": p} for name, p in self.top]
        body["conformal_set"] = list(self.conformal_set)
        return body


def _pair_reasons(probs: np.ndarray, costs: np.ndarray, policy: VerdictPolicy) -> tuple[np.ndarray, np.ndarray]:
    """Reason codes and accept risks for every (image, prescribed class) pair: two (N, K) arrays."""
    n, k = probs.shape
    order = np.argsort(-probs, axis=1, kind="stable")
    rows = np.arange(n)
    best = order[:, 0]
    runner_up = probs[rows, order[:, 1]] if k > 1 else np.full(n, -1.0)
    is_top = np.zeros((n, k), dtype=bool)
    is_top[rows, best] = probs[rows, best] > runner_up  # a tie has no top class
    # risk[i, r] = sum_y p_i(y) c(y, r) (the diagonal of c is 0). Not `probs @ costs`: BLAS picks its
    # summation order by batch shape and thread count; einsum's loop is fixed, so this step adds no batch
    # dependence. The probabilities themselves may still differ in their last bits between a photo served
    # alone and in a batch (the convolutions' kernels also depend on the batch shape: up to 1.56e-7 measured
    # for ResNet-18), so a fill that close to the accept threshold can get either verdict.
    risk = np.einsum("ny,yr->nr", probs, costs)
    in_set = (1.0 - probs) <= np.asarray(policy.qhat)[None, :]
    critical = (costs >= policy.critical_cost).astype(np.float64)
    ambiguous = (in_set.astype(np.float64) @ critical) > 0  # some y != r in the set with c(y, r) critical
    reasons = np.full((n, k), _ACCEPTED, dtype=np.int8)
    # Assign from the lowest precedence up so that earlier rules overwrite later ones.
    reasons[ambiguous] = _AMBIGUOUS
    reasons[~in_set] = _EXCLUDED
    reasons[risk > policy.accept_risk] = _RISK
    reasons[~is_top] = _NOT_TOP
    reasons[~is_top & (probs < policy.mismatch_probability) & ~in_set] = _IMPLAUSIBLE
    if not policy.accepts:
        reasons[reasons == _ACCEPTED] = _UNFITTED
    return reasons, risk


def decide_batch(probs: Any, *, prescribed_indices: Sequence[int] | np.ndarray, cost_matrix: CostMatrix,
                 policy: VerdictPolicy, classes: Sequence[str], top_k: int = 3,
                 unfamiliarity: Sequence[float | None] | None = None) -> list[Decision]:
    """Verdicts for N photos: probs (N, K) calibrated probabilities, one prescribed class index per photo,
    and optionally each photo's unfamiliarity (`models.ood`; None: not checked)."""
    classes = tuple(classes)
    if policy.classes != classes:
        raise ValueError("the verdict policy was fitted for another class list")
    costs = _check_costs(cost_matrix, classes)
    array = _probabilities(probs, len(classes))
    prescribed = np.asarray(prescribed_indices, dtype=np.int64).reshape(-1)
    if prescribed.shape[0] != array.shape[0]:
        raise ValueError(f"{array.shape[0]} probability vectors but {prescribed.shape[0]} prescriptions")
    if prescribed.size and (prescribed.min() < 0 or prescribed.max() >= len(classes)):
        raise ValueError("a prescribed index is outside the model's classes")
    checked = [None] * array.shape[0] if unfamiliarity is None else list(unfamiliarity)
    if len(checked) != array.shape[0]:
        raise ValueError(f"{array.shape[0]} probability vectors but {len(checked)} unfamiliarity values")
    reasons, risk = _pair_reasons(array, costs, policy)
    in_set = policy.conformal_mask(array)
    decisions = []
    for i, r in enumerate(prescribed.tolist()):
        order = np.argsort(-array[i], kind="stable")
        value = checked[i]
        score = None if value is None else float(value)
        reason = _UNFAMILIAR if score is not None and not score <= 1.0 else int(reasons[i, r])
        decisions.append(Decision(
            verdict=_VERDICT_OF_REASON[reason], reason=REASONS[reason], prescribed=classes[r],
            predicted=classes[int(order[0])], probability_prescribed=float(array[i, r]),
            expected_accept_cost=float(risk[i, r]),
            top=tuple((classes[int(j)], float(array[i, j])) for j in order[:max(top_k, 0)]),
            conformal_set=tuple(classes[int(j)] for j in order if in_set[i, j]),
            accept_risk_threshold=policy.accept_risk, unfamiliarity=score,
        ))
    return decisions


def decide(probs: Any, *, prescribed_index: int, cost_matrix: CostMatrix, policy: VerdictPolicy,
           classes: Sequence[str], top_k: int = 3, unfamiliarity: float | None = None) -> Decision:
    """The verdict for one photo (probs: K calibrated probabilities)."""
    return decide_batch(np.asarray(probs, dtype=np.float64)[None, :], prescribed_indices=[prescribed_index],
                        cost_matrix=cost_matrix, policy=policy, classes=classes, top_k=top_k,
                        unfamiliarity=[unfamiliarity])[0]


# --- fitting ----------------------------------------------------------------------------------------

def split_validation(labels: Any, *, seed: int, calibration_fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Per-class seeded split of validation indices into (threshold_indices, calibration_indices)."""
    labels = np.asarray(labels, dtype=np.int64).reshape(-1)
    if not 0.0 < calibration_fraction < 1.0:
        raise ValueError("calibration_fraction must lie in (0, 1)")
    rng = np.random.default_rng(seed)
    threshold, calibration = [], []
    for y in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == y))
        cut = round(len(members) * calibration_fraction)
        calibration.append(members[:cut])
        threshold.append(members[cut:])
    empty = np.empty(0, dtype=np.int64)
    return (np.sort(np.concatenate(threshold)) if threshold else empty,
            np.sort(np.concatenate(calibration)) if calibration else empty)


def conformal_alphas(costs: np.ndarray, counts: Sequence[int] | np.ndarray, *, base_alpha: float) -> np.ndarray:
    """alpha_y = base_alpha / max(1, max_z c(y, z)), floored at 1/(n_y + 1), the smallest rate n_y points support."""
    worst = np.maximum(1.0, np.asarray(costs, dtype=np.float64).max(axis=1))
    floor = 1.0 / (np.asarray(counts, dtype=np.float64) + 1.0)
    return np.clip(np.maximum(base_alpha / worst, floor), 1e-12, 0.5)


def conformal_quantiles(probs: np.ndarray, labels: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    """Mondrian split-conformal qhat_y: the ceil((n_y+1)(1-alpha_y))-th smallest score 1 - p(y) of class y."""
    k = probs.shape[1]
    qhat = np.ones(k)  # no calibration data (or too few for alpha_y): always include y
    for y in range(k):
        scores = np.sort(1.0 - probs[labels == y, y])
        rank = math.ceil((len(scores) + 1) * (1.0 - alphas[y]) - 1e-9)
        if 1 <= rank <= len(scores):
            qhat[y] = float(scores[rank - 1])
    return qhat


def _pair_summary(reasons: np.ndarray, labels: np.ndarray, costs: np.ndarray, critical_cost: float, *,
                  wrong_fill_rate: float) -> dict[str, Any]:
    """Rates over the simulated fills: every (image, prescribed class) pair of a labelled set."""
    n, k = reasons.shape
    correct = np.zeros((n, k), dtype=bool)
    correct[np.arange(n), labels] = True
    verdicts = np.asarray(_VERDICT_OF_REASON)[reasons]
    critical = (costs[labels, :] >= critical_cost) & ~correct

    def rate(mask: np.ndarray, within: np.ndarray) -> float | None:
        return float(mask[within].mean()) if within.any() else None

    review_correct = rate(verdicts == "review", correct)
    review_wrong = rate(verdicts == "review", ~correct)
    weighted = None if review_correct is None else (
        (1 - wrong_fill_rate) * review_correct + wrong_fill_rate * (review_wrong or 0.0))
    return {"n_images": n, "review_rate": weighted, "review_rate_correct_fills": review_correct,
            "review_rate_wrong_fills": review_wrong, "accept_rate_correct_fills": rate(verdicts == "match", correct),
            "mismatch_rate_correct_fills": rate(verdicts == "mismatch", correct),
            "mismatch_rate_wrong_fills": rate(verdicts == "mismatch", ~correct),
            "wrong_accepts": int(((verdicts == "match") & ~correct).sum()),
            "critical_fills": int(critical.sum()),
            "critical_accepts": int(((verdicts == "match") & critical).sum())}


def fit_policy(probs_valid: Any, labels_valid: Any, *, cost_matrix: CostMatrix, critical_cost: float,
               classes: Sequence[str], base_alpha: float = 0.1, wrong_fill_rate: float = 0.01,
               correct_fill_mismatch_rate: float = 0.0, max_mismatch_probability: float = 0.5,
               max_accept_risk: float | None = None, seed: int = 0,
               calibration_fraction: float = 0.5) -> VerdictPolicy:
    """Fit conformal quantiles (calibration half) and thresholds (threshold half) on validation outputs.

    Simulation: every validation image is paired with every class as the prescription. r = y is a
    correct fill; r != y a wrong fill (uniform over r). Reported review rates weight wrong fills by
    `wrong_fill_rate`. `accept_risk` is the largest risk of a correct fill that would be accepted
    while staying strictly below the smallest risk of any critical wrong fill that would be accepted
    (so the threshold half has zero critical accepts and correct fills the lowest review rate).
    `mismatch_probability` is the largest value that calls at most `correct_fill_mismatch_rate` of
    the correct fills a mismatch (0 by default), capped at `max_mismatch_probability`.
    """
    classes = tuple(classes)
    costs = _check_costs(cost_matrix, classes)
    k = len(classes)
    probs = _probabilities(probs_valid, k)
    labels = np.asarray(labels_valid, dtype=np.int64).reshape(-1)
    if labels.shape[0] != probs.shape[0] or labels.size == 0:
        raise ValueError("need one label per probability vector and at least one validation image")
    if labels.min() < 0 or labels.max() >= k:
        raise ValueError(f"labels must lie in [0, {k})")
    if not 0.0 < base_alpha < 1.0 or not 0.0 <= wrong_fill_rate < 1.0:
        raise ValueError("base_alpha must lie in (0, 1) and wrong_fill_rate in [0, 1)")
    fit_idx, cal_idx = split_validation(labels, seed=seed, calibration_fraction=calibration_fraction)
    if fit_idx.size == 0:
        raise ValueError("the validation split is too small to leave a threshold half")
    counts = np.bincount(labels[cal_idx], minlength=k)
    alphas = conformal_alphas(costs, counts, base_alpha=base_alpha)
    qhat = conformal_quantiles(probs[cal_idx], labels[cal_idx], alphas)

    fp, fl = probs[fit_idx], labels[fit_idx]
    n = fp.shape[0]
    correct = np.zeros((n, k), dtype=bool)
    correct[np.arange(n), fl] = True
    open_policy = VerdictPolicy(classes, accept_risk=float(np.finfo(np.float64).max), mismatch_probability=0.0,
                                qhat=tuple(qhat), alpha=tuple(alphas), critical_cost=critical_cost)
    reasons, risk = _pair_reasons(fp, costs, open_policy)
    would_accept = reasons == _ACCEPTED
    critical_wrong = (costs[fl, :] >= critical_cost) & ~correct
    bound = float(risk[would_accept & critical_wrong].min()) if (would_accept & critical_wrong).any() else math.inf
    feasible = risk[would_accept & correct]
    feasible = feasible[feasible < bound]
    accept_risk = float(feasible.max()) if feasible.size else 0.0
    if max_accept_risk is not None:
        accept_risk = min(accept_risk, float(max_accept_risk))

    # Correct fills that the mismatch rule could hit: r = y not top and outside its set.
    eligible = (reasons[correct] == _NOT_TOP) & ~open_policy.conformal_mask(fp)[correct]
    values = np.sort(fp[correct][eligible])
    allowed = math.floor(correct_fill_mismatch_rate * n)
    mismatch_probability = float(values[allowed]) if values.size > allowed else max_mismatch_probability
    mismatch_probability = min(mismatch_probability, max_mismatch_probability)

    policy = VerdictPolicy(classes, accept_risk=accept_risk, mismatch_probability=mismatch_probability,
                           qhat=tuple(qhat), alpha=tuple(alphas), critical_cost=critical_cost)
    fit_reasons, _ = _pair_reasons(fp, costs, policy)
    summary = _pair_summary(fit_reasons, fl, costs, critical_cost, wrong_fill_rate=wrong_fill_rate)
    held_out: dict[str, Any] = {}
    if cal_idx.size:
        cal_reasons, _ = _pair_reasons(probs[cal_idx], costs, policy)
        held_out = _pair_summary(cal_reasons, labels[cal_idx], costs, critical_cost, wrong_fill_rate=wrong_fill_rate)
    # Coverage is measured on the threshold half: held out from the quantiles, so an honest estimate.
    in_set = policy.conformal_mask(fp)
    coverage = {c: (float(in_set[fl == y, y].mean()) if (fl == y).any() else None) for y, c in enumerate(classes)}
    report = {
        "fitted": True, "n": int(labels.size), "n_threshold": int(fit_idx.size), "n_calibration": int(cal_idx.size),
        "seed": seed, "calibration_fraction": calibration_fraction, "base_alpha": base_alpha,
        "wrong_fill_rate": wrong_fill_rate, "correct_fill_mismatch_rate": correct_fill_mismatch_rate,
        "max_mismatch_probability": max_mismatch_probability, "max_accept_risk": max_accept_risk,
        "cost_matrix_sha256": cost_matrix.fingerprint(),
        "simulation": "every validation image x every class as prescription; r = y correct, r != y wrong",
        **summary,
        "calibration_half": held_out,
        "coverage": coverage,
        "calibration_counts": {c: int(counts[y]) for y, c in enumerate(classes)},
        "mean_set_size": float(in_set.sum(axis=1).mean()),
    }
    return VerdictPolicy(classes, accept_risk=accept_risk, mismatch_probability=mismatch_probability,
                         qhat=tuple(qhat), alpha=tuple(alphas), critical_cost=critical_cost, report=report)


def refit_policy(policy: VerdictPolicy, probs_valid: Any, labels_valid: Any, *,
                 cost_matrix: CostMatrix, max_accept_risk: float | None = None) -> VerdictPolicy:
    """`policy` fitted again, with the same settings and validation outputs, for another cost matrix.

    The thresholds and the conformal alphas depend on the costs (alpha_y shrinks for products whose
    confusions are costly; `accept_risk` is bounded by the cheapest critical wrong fill), so a policy
    fitted for one cost matrix is not the policy for another. Refitting with the matrix a policy was
    fitted for returns an equal policy. `max_accept_risk` replaces the ceiling the policy was fitted under
    (None keeps it), so a ceiling an operator raises or lowers applies to models fitted before. Raises
    ValueError for a policy that was never fitted.
    """
    report = policy.report
    if not policy.accepts or not report.get("fitted"):
        raise ValueError("only a fitted verdict policy can be refitted")
    if max_accept_risk is None and report.get("max_accept_risk") is not None:
        max_accept_risk = float(report["max_accept_risk"])
    return fit_policy(probs_valid, labels_valid, cost_matrix=cost_matrix, critical_cost=policy.critical_cost,
                      classes=policy.classes, base_alpha=float(report["base_alpha"]),
                      wrong_fill_rate=float(report["wrong_fill_rate"]),
                      correct_fill_mismatch_rate=float(report.get("correct_fill_mismatch_rate", 0.0)),
                      max_mismatch_probability=float(report.get("max_mismatch_probability", 0.5)),
                      max_accept_risk=max_accept_risk, seed=int(report["seed"]), calibration_fraction=float(report["calibration_fraction"]))


def with_accept_ceiling(policy: VerdictPolicy, max_accept_risk: float) -> VerdictPolicy:
    """`policy` with its accept threshold lowered to `max_accept_risk` where it was higher, without a refit.

    For a policy whose validation outputs are not at hand: the thresholds stay those fitted, except that no
    fill riskier than the ceiling is accepted. The report's rates were measured at the fitted threshold, so
    the report says so (`accept_risk_fitted`, `rates_at`).
    """
    if not policy.accepts or policy.accept_risk <= max_accept_risk:
        return policy
    report = {**policy.report, "accept_risk_fitted": policy.accept_risk, "max_accept_risk": max_accept_risk,
              "rates_at": "accept_risk_fitted (no validation outputs to measure them at the ceiling)"}
    return replace(policy, accept_risk=float(max_accept_risk), report=report)
