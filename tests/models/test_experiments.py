"""rxverify experiment: selection rule, tiny end-to-end runs, JSON schema, and no peeking at test labels."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from models.commands import experiment as experiment_command
from models.costs import CostMatrix
from models.data import DataSplits, ImageFileDataset, TensorClassificationDataset, load_digits_splits
from models.engine import TrainConfig
from models.experiment_report import format_report, highlighted_pairs, to_json
from models.experiment_setups import GridPoint, Recipe, load_splits, recipe_for
from models.experiments import CandidateScore, ExperimentConfig, run_experiment, select_candidate


def _score(index: int, cost: float, accuracy: float) -> CandidateScore:
    return CandidateScore(index=index, valid_cost=cost, valid_accuracy=accuracy)


def test_selection_picks_lowest_cost_within_tolerance() -> None:
    scores = [_score(0, 10.0, 0.95), _score(1, 5.0, 0.94), _score(2, 1.0, 0.90)]
    assert select_candidate(scores, reference_accuracy=0.95, tolerance=0.01) == 1


def test_selection_ties_go_to_the_earlier_point() -> None:
    scores = [_score(0, 3.0, 0.95), _score(1, 3.0, 0.96)]
    assert select_candidate(scores, reference_accuracy=0.95, tolerance=0.01) == 0


def test_selection_falls_back_to_the_most_accurate() -> None:
    scores = [_score(0, 1.0, 0.50), _score(1, 9.0, 0.80), _score(2, 2.0, 0.80)]
    assert select_candidate(scores, reference_accuracy=0.95, tolerance=0.01) == 2


def _tiny(dataset: str, *, epochs: int = 4) -> Recipe:
    recipe = recipe_for(dataset)
    csada = {"lam": 10.0, "eps": 1.0, "steps": 3, "step_size": 0.25, "norm": "l2", "tau": 1.0}
    return dataclasses.replace(
        recipe,
        baseline=dataclasses.replace(recipe.baseline, epochs=epochs),
        finetune=dataclasses.replace(recipe.finetune, epochs=1),
        grids={**recipe.grids, "csada": (GridPoint(options=csada, train={"lr": 1e-5}),
                                         GridPoint(options={**csada, "eps": 2.0}, train={"lr": 1e-4}))},
    )


def test_tiny_digits_run_and_json_schema(tmp_path: object) -> None:
    config = ExperimentConfig(dataset="digits", seeds=1, device="cpu",
                              methods=("baseline", "bayes", "csada", "ap", "sosr"))
    result = run_experiment(config, recipe=_tiny("digits"))
    payload = json.loads(json.dumps(to_json(result)))
    assert set(payload["results"]) == {"baseline", "bayes", "csada", "ap", "sosr"}
    for runs in payload["results"].values():
        (run,) = runs
        assert {"seed", "total_cost", "wer", "accuracy", "n_test", "pair_errors", "hyperparameters"} <= set(run)
        assert run["n_test"] == 360
        assert run["wer"] == pytest.approx(run["total_cost"] / run["n_test"])
        for pair in run["pair_errors"]:
            assert set(pair) == {"true", "predicted", "cost", "errors", "rate"}
            assert pair["errors"] > 0 or pair["cost"] > 1
    assert len(payload["results"]["csada"][0]["candidates"]) == 2
    assert payload["selection_rule"].startswith("validation split only")
    assert payload["seeds"][0]["cost_source"] == "pareto(1,1.5) seed 0"
    text = format_report(result)
    assert "Top 1 cost pair error (%)" in text and "Selection rule" in text


def test_tiny_toy_run_names_the_critical_pair() -> None:
    config = ExperimentConfig(dataset="toy", seeds=1, device="cpu", methods=("baseline", "penalty", "csada"))
    recipe = dataclasses.replace(_tiny("toy", epochs=20), grids={
        "csada": (GridPoint(options={"lam": 10.0, "eps": 1.5, "steps": 5, "step_size": 0.3, "sign": True,
                                     "tau": 1.0}, train={"lr": 1e-3}),)})
    result = run_experiment(config, recipe=recipe)
    assert result.seeds[0].cost_matrix == CostMatrix.single_pair(("red", "green", "blue"), "green", "blue")
    assert "green->blue (c=1) errors" in format_report(result)


def _shuffled_test(splits: DataSplits) -> DataSplits:
    test = splits.test
    assert isinstance(test, TensorClassificationDataset)
    permuted = torch.tensor(test.targets)[torch.randperm(len(test), generator=torch.Generator().manual_seed(1))]
    return dataclasses.replace(splits, test=TensorClassificationDataset(test.inputs, permuted.tolist(),
                                                                        classes=splits.classes))


def test_selection_never_reads_test_labels() -> None:
    config = ExperimentConfig(dataset="digits", seeds=1, device="cpu", methods=("csada", "bayes"))
    recipe = _tiny("digits")
    plain = run_experiment(config, recipe=recipe, splits_for_seed=lambda seed: load_digits_splits(seed=seed))
    shuffled = run_experiment(config, recipe=recipe,
                              splits_for_seed=lambda seed: _shuffled_test(load_digits_splits(seed=seed)))
    for method in config.methods:
        a, b = plain.seeds[0].runs[method], shuffled.seeds[0].runs[method]
        assert a.chosen == b.chosen
        assert [c["valid_total_cost"] for c in a.candidates] == [c["valid_total_cost"] for c in b.candidates]
    assert plain.seeds[0].runs["csada"].test["accuracy"] != shuffled.seeds[0].runs["csada"].test["accuracy"]


def test_csada_plus_bayes_decides_on_the_chosen_csada_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """The opt-in row is the post-hoc Bayes decision (its own grid, chosen on validation) on CSADA's model."""
    from models.evaluate import bayes_decision, collect_outputs

    with pytest.raises(ValueError, match="csada before"):
        ExperimentConfig(dataset="digits", methods=("baseline", "csada+bayes", "csada"))
    with pytest.raises(ValueError, match="csada before"):
        ExperimentConfig(dataset="digits", methods=("baseline", "csada+bayes"))
    config = ExperimentConfig(dataset="digits", seeds=1, device="cpu", methods=("baseline", "csada", "csada+bayes"))
    captured: dict[str, torch.nn.Module] = {}
    import models.experiments as experiments_module

    real = experiments_module._run_method

    def spy(method: str, **kwargs: object) -> experiments_module.MethodRun:
        run = real(method, **kwargs)  # type: ignore[arg-type]
        if method == "csada":
            assert run.model is not None
            captured["csada"] = run.model
        return run

    monkeypatch.setattr(experiments_module, "_run_method", spy)
    result = run_experiment(config, recipe=_tiny("digits"))
    runs = result.seeds[0].runs
    both = runs["csada+bayes"]
    assert both.method == "csada+bayes" and len(both.candidates) == 2 and both.model is None
    assert all(run.model is None for run in runs.values())  # released once the seed is done
    # Recompute the chosen decision on test from the CSADA model itself.
    splits = load_digits_splits(seed=0)
    outputs, labels = collect_outputs(captured["csada"], torch.utils.data.DataLoader(splits.test, batch_size=512),
                                      device="cpu")
    temperature = both.fit["temperature"]
    predictions = torch.as_tensor(bayes_decision(torch.softmax(outputs / temperature, dim=1), result.seeds[0].cost_matrix))
    assert both.test["accuracy"] == pytest.approx(float((predictions == labels).double().mean()))
    assert "csada+bayes" in format_report(result) and "csada+bayes" in to_json(result)["results"]
    parser = argparse.ArgumentParser()
    experiment_command.register(parser.add_subparsers())
    assert parser.parse_args(["experiment", "digits", "--methods", "csada,csada+bayes"]).methods == ("csada", "csada+bayes")
    assert "csada+bayes" not in parser.parse_args(["experiment", "digits"]).methods  # opt-in


def test_highlighted_pairs() -> None:
    classes = ("a", "b", "c")
    assert highlighted_pairs(CostMatrix.single_pair(classes, "a", "c")) == [("a", "c", 1.0)]
    assert highlighted_pairs(CostMatrix.uniform(classes)) is None


def test_cli_arguments() -> None:
    parser = argparse.ArgumentParser()
    experiment_command.register(parser.add_subparsers())
    args = parser.parse_args(["experiment", "digits", "--methods", "baseline,csada", "--critical-pair", "3,8",
                              "--seeds", "2", "--cost-seed-offset", "7"])
    assert args.methods == ("baseline", "csada") and args.critical_pair == ("3", "8")
    assert args.cost_seed_offset == 7
    with pytest.raises(SystemExit):
        parser.parse_args(["experiment", "digits", "--methods", "nope"])
    assert TrainConfig  # the recipes build on the engine's TrainConfig


def test_critical_errors_row_sums_the_named_pairs(tmp_path: object) -> None:
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    csv = tmp_path / "costs.csv"
    csv.write_text("true,predicted,cost\ngreen,blue,10\nred,blue,8\n")
    config = ExperimentConfig(dataset="toy", seeds=2, device="cpu", methods=("baseline", "csada"), cost_matrix=csv)
    recipe = dataclasses.replace(_tiny("toy", epochs=20), grids={
        "csada": (GridPoint(options={"lam": 10.0, "eps": 1.5, "steps": 5, "step_size": 0.3, "sign": True,
                                     "tau": 1.0}, train={"lr": 1e-3}),)})
    result = run_experiment(config, recipe=recipe)
    payload = json.loads(json.dumps(to_json(result)))
    assert sorted(payload["critical_pairs"]) == [["green", "blue"], ["red", "blue"]]
    named = {("green", "blue"), ("red", "blue")}
    for method, runs in payload["results"].items():
        expected = [sum(p["errors"] for p in run["pair_errors"] if (p["true"], p["predicted"]) in named)
                    for run in runs]
        assert [run["critical_errors"] for run in runs] == expected
        assert payload["summary"][method]["critical_errors"]["mean"] == pytest.approx(sum(expected) / 2)
    base = payload["summary"]["baseline"]["critical_errors"]["mean"]
    text = format_report(result)
    (row,) = [line for line in text.splitlines() if line.startswith("Critical pairs errors (sum)")]
    assert row.split()[4] == f"{base:.1f}({payload['summary']['baseline']['critical_errors']['std']:.1f})"
    if base > 0:
        assert "Critical errors / baseline (means)" in text


def test_synthetic_pills_recipe_trains_on_plain_photos(tmp_path: Path) -> None:
    from models.pmi import PMI_PRODUCTS
    from models.synth import generate_synthetic_pills
    from models.transforms import EvalPreset, TrainPreset

    recipe = recipe_for("synthetic-pills")
    assert recipe.arch == "small_cnn" and recipe.augment is False and recipe.to_dict()["augment"] is False
    data = tmp_path / "pills"
    generate_synthetic_pills(data, per_class=8, image_size=24, seed=0, products=PMI_PRODUCTS[:2], imbalance=False)
    plain = load_splits(recipe, seed=0, data_dir=data, cache_dir=tmp_path)
    augmented = load_splits(dataclasses.replace(recipe, augment=True), seed=0, data_dir=data, cache_dir=tmp_path)
    assert isinstance(plain.train, ImageFileDataset) and isinstance(augmented.train, ImageFileDataset)
    assert isinstance(plain.train.transform, EvalPreset) and isinstance(augmented.train.transform, TrainPreset)
    # Without augmentation a training photo reads the same every time (what the model can memorise).
    assert torch.equal(plain.train[0][0], plain.train[0][0])
