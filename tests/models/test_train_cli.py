"""`rxverify train` end to end on a tiny generated PMI-layout folder with the tiny CNN."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.checkpoint import load_checkpoint, weights_sha256
from models.commands import train
from models.costs import CostMatrix
from models.data import load_image_folder

CLASSES = ("00378-0208", "00591-0461", "50111-0434")
COLOURS = ((220, 40, 40), (40, 200, 60), (50, 70, 230))
SPLIT_SIZES = {"train": 6, "valid": 3, "test": 3}


def make_folder(root: Path, *, classes: tuple[str, ...] = CLASSES, seed: int = 0) -> Path:
    """Write 16x16 PNGs in the PMI layout: one colour per class plus noise."""
    rng = np.random.default_rng(seed)
    for split, count in SPLIT_SIZES.items():
        for index, ndc in enumerate(classes):
            folder = root / split / ndc
            folder.mkdir(parents=True)
            for n in range(count):
                pixels = np.clip(np.array(COLOURS[index % 3]) + rng.normal(0, 25, (16, 16, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{n}.png")
    return root


def run_cli(argv: list[str]) -> int:
    """Parse with the real `train` parser and run its handler."""
    parser = argparse.ArgumentParser(prog="rxverify")
    train.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["train", *argv])
    return int(args.func(args))


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_folder(tmp_path / "pills")


TINY = ["--arch", "tiny_cnn", "--image-size", "16", "--epochs", "1", "--batch-size", "8", "--device", "cpu"]


def test_train_writes_loadable_checkpoint(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    costs = tmp_path / "costs.csv"
    costs.write_text("true,predicted,cost\n50111-0434,00591-0461,10\n")
    out = tmp_path / "ckpt"
    # --threads is global to the process: pass the current count so other tests are unaffected.
    threads = str(torch.get_num_threads())
    assert run_cli(["--data", str(data), "--out", str(out), "--cost-matrix", str(costs), "--threads", threads,
                    *TINY]) == 0
    captured = capsys.readouterr()
    assert "epoch 1/1 step 3/3 loss" in captured.err and "ETA" in captured.err
    assert f"checkpoint {out}" in captured.out and '"test"' in captured.out

    loaded = load_checkpoint(out)
    meta = loaded.metadata
    assert meta.classes == CLASSES and meta.arch == "tiny_cnn" and meta.image_size == 16
    assert meta.method == "baseline" and meta.output_kind == "logits" and meta.parent_sha256 is None
    assert meta.cost_matrix_sha256 == CostMatrix.read_csv(costs, CLASSES).fingerprint()
    assert meta.dataset_fingerprint and len(meta.mean) == 3
    assert 0.05 <= meta.temperature <= 20
    assert meta.hyperparameters["train"]["epochs"] == 1 and meta.hyperparameters["train"]["lr"] == 1e-3
    for split, n in (("valid", 9), ("test", 9)):
        report = meta.metrics[split]
        assert report["n"] == n and 0 <= report["accuracy"] <= 1 and "ece" in report
        # The 10-cost pair is always listed, with or without errors.
        assert report["pair_errors"][0]["cost"] == 10.0
    assert meta.metrics["train"]["epochs_completed"] == 1
    assert loaded.model(torch.zeros(1, 3, 16, 16)).shape == (1, 3)


def test_fine_tune_csada_from_base_records_parent(data: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    assert run_cli(["--data", str(data), "--out", str(base), *TINY]) == 0
    tuned = tmp_path / "tuned"
    argv = ["--data", str(data), "--out", str(tuned), "--base", str(base), "--method", "csada", "--epochs", "1",
            "--batch-size", "8", "--device", "cpu", "--lr", "1e-4", "--lam", "2", "--eps", "0.5", "--steps", "2",
            "--step-size", "0.1", "--tau", "1", "--clamp-pixels"]
    assert run_cli(argv) == 0
    meta = load_checkpoint(tuned).metadata
    assert meta.parent_sha256 == weights_sha256(base)
    assert meta.method == "csada"
    assert meta.hyperparameters["method"]["steps"] == 2 and meta.hyperparameters["method"]["eps"] == 0.5
    # --clamp-pixels: the attack's clamp is each channel's [0, 1] pixels in the normalised space.
    low, high = meta.hyperparameters["method"]["clamp"]
    assert low == pytest.approx([-m / s for m, s in zip(meta.mean, meta.std, strict=True)])
    assert high == pytest.approx([(1 - m) / s for m, s in zip(meta.mean, meta.std, strict=True)])
    assert meta.hyperparameters["train"]["freeze_bn"] is True  # the default when fine-tuning a --base
    assert meta.arch == "tiny_cnn" and meta.image_size == 16  # inherited from the base
    assert load_checkpoint(base).metadata.hyperparameters["train"]["freeze_bn"] is False  # a new model


def test_freeze_bn_default_follows_base_and_can_be_overridden(data: Path, tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    train.register(parser.add_subparsers(dest="command"))
    common = ["train", "--data", str(data), "--out", str(tmp_path / "c")]
    base = ["--base", str(tmp_path / "b")]
    for extra, frozen in (([], False), (base, True), ([*base, "--no-freeze-bn"], False), (["--freeze-bn"], True)):
        args = parser.parse_args([*common, *extra])
        assert train.request_from_args(args).config.freeze_bn is frozen, extra


def test_fine_tune_keeps_the_base_normalisation(data: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    assert run_cli(["--data", str(data), "--out", str(base), *TINY]) == 0
    fresh = make_folder(tmp_path / "fresh", seed=1)  # same classes, other pixels: other mean/std
    assert load_image_folder(fresh, image_size=16).mean != load_image_folder(data, image_size=16).mean
    assert run_cli(["--data", str(fresh), "--out", str(tmp_path / "t"), "--base", str(base), "--epochs", "1",
                    "--device", "cpu"]) == 0
    tuned, parent = load_checkpoint(tmp_path / "t").metadata, load_checkpoint(base).metadata
    assert (tuned.mean, tuned.std) == (parent.mean, parent.std)
    assert tuned.dataset_fingerprint != parent.dataset_fingerprint


def test_sosr_from_base_outputs_costs(data: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    assert run_cli(["--data", str(data), "--out", str(base), *TINY]) == 0
    assert run_cli(["--data", str(data), "--out", str(tmp_path / "sosr"), "--base", str(base), "--method", "sosr",
                    "--epochs", "1", "--device", "cpu"]) == 0
    sosr = load_checkpoint(tmp_path / "sosr").metadata
    assert sosr.output_kind == "costs" and sosr.hyperparameters["method"]["init_from_logits"] is True
    # A costs model cannot be fine-tuned with a logits method.
    assert run_cli(["--data", str(data), "--out", str(tmp_path / "x"), "--base", str(tmp_path / "sosr"),
                    "--method", "baseline", "--device", "cpu"]) == 2


def test_base_with_other_classes_is_refused(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = tmp_path / "base"
    assert run_cli(["--data", str(data), "--out", str(base), *TINY]) == 0
    other = make_folder(tmp_path / "other", classes=("00378-0208", "00591-0461", "99999-0001"))
    capsys.readouterr()
    assert run_cli(["--data", str(other), "--out", str(tmp_path / "t"), "--base", str(base), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "base checkpoint's" in err and "99999-0001" in err
    assert not (tmp_path / "t").exists()


def test_conflicting_and_misplaced_options(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = tmp_path / "base"
    assert run_cli(["--data", str(data), "--out", str(base), *TINY]) == 0
    capsys.readouterr()
    assert run_cli(["--data", str(data), "--out", str(tmp_path / "a"), "--base", str(base), "--arch", "resnet9"]) == 2
    assert "conflicts" in capsys.readouterr().err
    assert run_cli(["--data", str(data), "--out", str(tmp_path / "b"), "--lam", "2", *TINY]) == 2
    assert "--lam" in capsys.readouterr().err
    assert run_cli(["--data", str(data), "--out", str(base), *TINY]) == 2  # never clobbers
    assert "already holds files" in capsys.readouterr().err
    assert run_cli(["--data", str(tmp_path / "missing"), "--out", str(tmp_path / "c"), *TINY]) == 2


def test_run_training_stops_cooperatively(data: Path, tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    train.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--data", str(data), "--out", str(tmp_path / "c"), *TINY])
    outcome = train.run_training(train.request_from_args(args), should_stop=lambda: True)
    assert outcome.stopped and outcome.checkpoint is None and not (tmp_path / "c").exists()


def test_metrics_are_plain_json(data: Path, tmp_path: Path) -> None:
    assert run_cli(["--data", str(data), "--out", str(tmp_path / "c"), "--arch", "mlp", "--image-size", "8",
                    "--epochs", "1", "--device", "cpu"]) == 0
    raw = json.loads((tmp_path / "c" / "metadata.json").read_text())
    assert raw["arch"] == "mlp" and raw["metrics"]["test"]["n"] == 9


def test_the_same_seed_trains_the_same_weights(data: Path, tmp_path: Path) -> None:
    """A new model's initial weights come from the seed too, not from whatever the global RNG held."""
    def train_once(out: str, seed: int, noise: int) -> str:
        torch.manual_seed(noise)  # the caller's RNG state must not matter
        assert run_cli(["--data", str(data), "--out", str(tmp_path / out), "--seed", str(seed), *TINY]) == 0
        return weights_sha256(tmp_path / out)

    first = train_once("a", 3, noise=1)
    assert train_once("b", 3, noise=2) == first
    assert train_once("c", 4, noise=1) != first
