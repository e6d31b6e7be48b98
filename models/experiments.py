"""`rxverify experiment`: the paper's comparison (section 5.2, Tables 3-4; single-pair study, Fig. 1/3).

For every seed: load the splits, train an over-parameterised baseline until it interpolates its
training split, then fine-tune each method from that same baseline with the same budget, over a small
grid. The grid point is chosen on the validation split only (`select_candidate`, SELECTION_RULE);
the test split is evaluated once, for the chosen point, after the choice. `bayes` is the post-hoc Bayes
decision argmin_z sum_y p(y|x) c(y, z) on the baseline model's probabilities.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from models.calibrate import fit_temperature
from models.costs import CostMatrix
from models.data import DataSplits, ImageFileDataset
from models.engine import TrainConfig, create_train_loader, fit
from models.evaluate import (
    bayes_decision,
    collect_outputs,
    confusion_matrix,
    cost_report,
    predictions_from_outputs,
)
from models.experiment_setups import (
    ALL_METHODS,
    DEFAULT_METHODS,
    GridPoint,
    Recipe,
    default_cost_matrix,
    load_splits,
    recipe_for,
)
from models.methods import create_method
from models.networks import create_model
from models.runtime import seed_everything, select_device, set_cpu_threads

logger = logging.getLogger(__name__)

ACCURACY_TOLERANCE = 0.01
SELECTION_RULE = (
    "validation split only: among a method's grid points whose validation accuracy is at least the "
    "baseline model's minus {tolerance:g} points, the lowest validation total cost; ties go to the "
    "earlier (gentler) grid point; when none qualifies, the most accurate one on validation"
)
AUTO_PAIR = "auto"
CSADA_BAYES = "csada+bayes"


@dataclass(frozen=True)
class ExperimentConfig:
    """What to run; `critical_pair` is (true, predicted), or "auto" for the most confused validation pair."""

    dataset: str
    methods: tuple[str, ...] = DEFAULT_METHODS
    seeds: int = 3
    seed_offset: int = 0
    cost_seed_offset: int = 0
    cost_matrix: Path | None = None
    critical_pair: tuple[str, str] | str | None = None
    data_dir: Path | None = None
    cache_dir: Path = Path("var/datasets")
    pretrained: Path | None = None
    device: str = "auto"
    threads: int | None = 1  # see the CLI's --threads: one intra-op thread is fastest for these sizes
    accuracy_tolerance: float = ACCURACY_TOLERANCE

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - set(ALL_METHODS))
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose from {', '.join(ALL_METHODS)}")
        if CSADA_BAYES in self.methods and ("csada" not in self.methods
                                            or self.methods.index("csada") > self.methods.index(CSADA_BAYES)):
            raise ValueError(f"{CSADA_BAYES} decides on the chosen CSADA model: list csada before it")
        if self.seeds < 1:
            raise ValueError("seeds must be >= 1")
        if self.cost_matrix is not None and self.critical_pair is not None:
            raise ValueError("--cost-matrix and --critical-pair are exclusive")

    def selection_rule(self) -> str:
        """The rule in words, as printed and stored."""
        return SELECTION_RULE.format(tolerance=100 * self.accuracy_tolerance)


@dataclass(frozen=True)
class CandidateScore:
    """One grid point's validation result (the only input of the selection)."""

    index: int
    valid_cost: float
    valid_accuracy: float


@dataclass
class MethodRun:
    """One method on one seed: the chosen point, its test report, and every candidate's validation scores."""

    method: str
    seed: int
    chosen: GridPoint
    test: dict[str, Any]
    valid: dict[str, Any]
    candidates: list[dict[str, Any]]
    time_s: float
    fit: dict[str, Any] = field(default_factory=dict)
    model: nn.Module | None = field(default=None, repr=False)  # the chosen fine-tuned model (not serialised)


@dataclass
class SeedRun:
    """Everything measured for one seed."""

    seed: int
    cost_matrix: CostMatrix
    cost_source: str
    baseline_model: dict[str, Any]
    runs: dict[str, MethodRun]
    time_s: float


@dataclass
class ExperimentResult:
    """The whole experiment: its config, recipe, selection rule and per-seed runs."""

    config: ExperimentConfig
    recipe: Recipe
    seeds: list[SeedRun]
    elapsed_s: float
    device: str


def select_candidate(scores: Sequence[CandidateScore], *, reference_accuracy: float, tolerance: float) -> int:
    """Index of the chosen grid point per SELECTION_RULE (scores must be in grid order)."""
    if not scores:
        raise ValueError("no candidates to select from")
    # A tiny slack so that "exactly one point lower" is not lost to float rounding.
    floor = reference_accuracy - tolerance - 1e-9
    feasible = [s for s in scores if s.valid_accuracy >= floor]
    if feasible:
        return min(feasible, key=lambda s: (s.valid_cost, s.index)).index
    return min(scores, key=lambda s: (-s.valid_accuracy, s.valid_cost, s.index)).index


def _loader(dataset: Any, *, batch_size: int) -> DataLoader[Any]:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


def _report(predictions: torch.Tensor, labels: torch.Tensor, cost_matrix: CostMatrix) -> dict[str, Any]:
    k = len(cost_matrix.classes)
    report = cost_report(confusion_matrix(labels, predictions, k), cost_matrix, top=k * k)
    report.pop("top_pairs", None)
    return report


class _Evaluator:
    """Model outputs on the valid/test splits; the test split is read only through `test_report`."""

    def __init__(self, splits: DataSplits, *, device: torch.device, batch_size: int) -> None:
        self.splits, self.device, self.batch_size = splits, device, batch_size

    def outputs(self, model: nn.Module, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        dataset = getattr(self.splits, split)
        return collect_outputs(model, _loader(dataset, batch_size=self.batch_size), device=self.device)


def _train_baseline(recipe: Recipe, splits: DataSplits, *, seed: int, device: torch.device,
                    pretrained: Path | None) -> tuple[nn.Module, dict[str, Any]]:
    seed_everything(seed)
    input_shape = tuple(splits.train[0][0].shape) if recipe.arch == "mlp" else None
    model = create_model(recipe.arch, splits.num_classes, in_channels=splits.in_channels,
                         pretrained_path=pretrained, input_shape=input_shape)
    config = replace(recipe.baseline, seed=seed)
    loader = create_train_loader(splits.train, batch_size=config.batch_size, seed=seed)
    started = time.monotonic()
    method = create_method("baseline", cost_matrix=CostMatrix.uniform(splits.classes))
    fit(model, train_loader=loader, method=method, config=config, device=device)
    # Interpolation is checked on the un-augmented training images (what the model memorised).
    plain = splits.train
    if isinstance(plain, ImageFileDataset) and isinstance(splits.valid, ImageFileDataset):
        plain = plain.with_transform(splits.valid.transform)
    outputs, labels = collect_outputs(model, _loader(plain, batch_size=recipe.eval_batch_size), device=device)
    train_accuracy = float((outputs.argmax(1) == labels).double().mean())
    return model, {"train_accuracy": train_accuracy, "time_s": time.monotonic() - started}


def _resolve_cost_matrix(config: ExperimentConfig, *, classes: tuple[str, ...], seed_index: int,
                         valid_confusion: np.ndarray, fixed_pair: list[tuple[str, str]]) -> tuple[CostMatrix, str]:
    if config.cost_matrix is not None:
        return CostMatrix.read_csv(config.cost_matrix, classes), f"csv:{config.cost_matrix}"
    pair: tuple[str, str] | None = None
    if config.critical_pair == AUTO_PAIR:
        if not fixed_pair:
            # The most confused pair of the first seed's baseline on validation, kept for all seeds.
            off = valid_confusion.copy()
            np.fill_diagonal(off, -1)
            i, j = np.unravel_index(int(off.argmax()), off.shape)
            fixed_pair.append((classes[int(i)], classes[int(j)]))
        pair = fixed_pair[0]
    elif isinstance(config.critical_pair, tuple):
        pair = config.critical_pair
    if pair is not None:
        true, predicted = pair
        return CostMatrix.single_pair(classes, true, predicted), f"critical-pair:{true}->{predicted}"
    cost_seed = config.cost_seed_offset + config.seed_offset + seed_index
    source = {"toy": "paper Table 2 (green->blue costs 1, all else 0)",
              "digits": f"pareto(1,1.5) seed {cost_seed}"}.get(config.dataset, "PMI expert costs (Table 6)")
    return default_cost_matrix(config.dataset, classes, cost_seed=cost_seed), source


def _finetune(method: str, point: GridPoint, *, base: nn.Module, recipe: Recipe, splits: DataSplits,
              cost_matrix: CostMatrix, seed: int, device: torch.device) -> tuple[nn.Module, str, dict[str, Any]]:
    model = copy.deepcopy(base)
    options = dict(point.options)
    if method == "sosr":
        options.setdefault("init_from_logits", True)
    trainer = create_method(method, cost_matrix=cost_matrix, **options)
    config: TrainConfig = replace(recipe.finetune, seed=seed, **dict(point.train))
    loader = create_train_loader(splits.train, batch_size=config.batch_size, seed=seed)
    result = fit(model, train_loader=loader, method=trainer, config=config, device=device)
    info = {"epochs": result.epochs_completed, "mean_attack_active_steps": result.mean_attack_active_steps,
            "final_loss": result.history[-1]["loss"] if result.history else None,
            "attack_success_rate": result.history[-1].get("attack_success_rate") if result.history else None}
    return model, trainer.output_kind, info


Predictor = Callable[[str], tuple[torch.Tensor, torch.Tensor]]


def _candidate(method: str, point: GridPoint, *, base: nn.Module, valid_logits: tuple[torch.Tensor, torch.Tensor],
               recipe: Recipe, splits: DataSplits, cost_matrix: CostMatrix, seed: int,
               evaluator: _Evaluator) -> tuple[Predictor, dict[str, Any], nn.Module | None]:
    """Train (or, for bayes, calibrate) one grid point: split -> (predictions, labels), info, the new model."""
    if method == "bayes":
        logits, labels = valid_logits
        temperature = fit_temperature(logits, labels) if point.options.get("temperature") == "fitted" else 1.0

        def bayes(split: str) -> tuple[torch.Tensor, torch.Tensor]:
            outputs, targets = valid_logits if split == "valid" else evaluator.outputs(base, split)
            probs = torch.softmax(outputs / temperature, dim=1)
            return torch.as_tensor(bayes_decision(probs, cost_matrix)), targets

        return bayes, {"temperature": temperature}, None
    model, kind, info = _finetune(method, point, base=base, recipe=recipe, splits=splits,
                                  cost_matrix=cost_matrix, seed=seed, device=evaluator.device)

    def argbest(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        outputs, targets = evaluator.outputs(model, split)
        return predictions_from_outputs(outputs, kind), targets

    return argbest, info, model


def _run_method(method: str, *, base: nn.Module, valid_logits: tuple[torch.Tensor, torch.Tensor],
                reference_accuracy: float, recipe: Recipe, splits: DataSplits, cost_matrix: CostMatrix,
                seed: int, evaluator: _Evaluator, tolerance: float) -> MethodRun:
    started = time.monotonic()
    grid = recipe.grid(method)
    scores: list[CandidateScore] = []
    records: list[dict[str, Any]] = []
    predictors: list[Predictor] = []
    infos: list[dict[str, Any]] = []
    valids: list[dict[str, Any]] = []
    models: list[nn.Module | None] = []
    for index, point in enumerate(grid):
        predict, info, model = _candidate(method, point, base=base, valid_logits=valid_logits, recipe=recipe,
                                          splits=splits, cost_matrix=cost_matrix, seed=seed, evaluator=evaluator)
        models.append(model)
        valid = _report(*predict("valid"), cost_matrix)
        scores.append(CandidateScore(index=index, valid_cost=valid["total_cost"], valid_accuracy=valid["accuracy"]))
        records.append({"label": point.label(), "grid_point": point.to_dict(),
                        "valid_total_cost": valid["total_cost"], "valid_accuracy": valid["accuracy"], **info})
        predictors.append(predict)
        infos.append(info)
        valids.append(valid)
    chosen = select_candidate(scores, reference_accuracy=reference_accuracy, tolerance=tolerance)
    # The test split is read here, once, for the chosen grid point only.
    test = _report(*predictors[chosen]("test"), cost_matrix)
    return MethodRun(method=method, seed=seed, chosen=grid[chosen], test=test, valid=valids[chosen],
                     candidates=records, time_s=time.monotonic() - started, fit=infos[chosen], model=models[chosen])


def run_experiment(config: ExperimentConfig, *, recipe: Recipe | None = None,
                   splits_for_seed: Callable[[int], DataSplits] | None = None,
                   progress: Callable[[str], None] | None = None) -> ExperimentResult:
    """Run every seed and method; `recipe`/`splits_for_seed` override the dataset defaults (tests)."""
    recipe = recipe or recipe_for(config.dataset, single_pair=config.critical_pair is not None)
    say = progress or (lambda message: logger.info("%s", message))
    set_cpu_threads(config.threads)
    device = select_device(config.device)
    started = time.monotonic()
    fixed_pair: list[tuple[str, str]] = []
    seeds: list[SeedRun] = []
    for index in range(config.seeds):
        seed = config.seed_offset + index
        seed_started = time.monotonic()
        splits = (splits_for_seed(seed) if splits_for_seed is not None else
                  load_splits(recipe, seed=seed, data_dir=config.data_dir, cache_dir=config.cache_dir))
        base, base_info = _train_baseline(recipe, splits, seed=seed, device=device, pretrained=config.pretrained)
        evaluator = _Evaluator(splits, device=device, batch_size=recipe.eval_batch_size)
        valid_logits = evaluator.outputs(base, "valid")
        valid_pred = valid_logits[0].argmax(1)
        k = splits.num_classes
        valid_confusion = confusion_matrix(valid_logits[1], valid_pred, k)
        cost_matrix, source = _resolve_cost_matrix(config, classes=tuple(splits.classes), seed_index=index,
                                                   valid_confusion=valid_confusion, fixed_pair=fixed_pair)
        reference = _report(valid_pred, valid_logits[1], cost_matrix)
        base_info.update(valid_total_cost=reference["total_cost"], valid_accuracy=reference["accuracy"],
                         valid_most_confused=_most_confused(valid_confusion, splits.classes))
        say(f"seed {seed}: baseline model trained in {base_info['time_s']:.1f}s, train accuracy "
            f"{100 * base_info['train_accuracy']:.2f}%, valid accuracy {100 * reference['accuracy']:.2f}%; "
            f"costs: {source}")
        runs: dict[str, MethodRun] = {}
        for method in config.methods:
            name, model, logits = method, base, valid_logits
            if method == CSADA_BAYES:
                # The post-hoc decision (its grid and selection) on the chosen CSADA model instead of the baseline.
                chosen = runs["csada"].model
                assert chosen is not None
                name, model, logits = "bayes", chosen, evaluator.outputs(chosen, "valid")
            run = _run_method(name, base=model, valid_logits=logits, reference_accuracy=reference["accuracy"],
                              recipe=recipe, splits=splits, cost_matrix=cost_matrix, seed=seed,
                              evaluator=evaluator, tolerance=config.accuracy_tolerance)
            run.method = method
            runs[method] = run
            say(f"seed {seed}: {method:9s} [{run.chosen.label()}] valid cost {run.valid['total_cost']:.2f}, "
                f"test cost {run.test['total_cost']:.2f}, test accuracy {100 * run.test['accuracy']:.2f}% "
                f"({run.time_s:.1f}s)")
        for run in runs.values():
            run.model = None  # only csada+bayes needs one, within its seed; a PMI-size model is ~85 MB each
        seeds.append(SeedRun(seed=seed, cost_matrix=cost_matrix, cost_source=source, baseline_model=base_info,
                             runs=runs, time_s=time.monotonic() - seed_started))
    return ExperimentResult(config=config, recipe=recipe, seeds=seeds, elapsed_s=time.monotonic() - started,
                            device=str(device))


def _most_confused(confusion: np.ndarray, classes: Sequence[str], *, top: int = 5) -> list[dict[str, Any]]:
    """The baseline's most frequent validation confusions (how `--critical-pair auto` picks its pair)."""
    cells = [(int(confusion[i, j]), i, j) for i in range(len(classes)) for j in range(len(classes))
             if i != j and confusion[i, j] > 0]
    cells.sort(key=lambda c: (-c[0], c[1], c[2]))
    return [{"true": classes[i], "predicted": classes[j], "errors": n} for n, i, j in cells[:top]]

