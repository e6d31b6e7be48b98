"""Loaders: PMI image-folder layout, digits, toy Gaussians."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset, TensorDataset

from models.data import (
    TOY_CLASSES,
    TOY_COVARIANCE,
    TOY_MEAN_SCALE,
    TOY_MEANS,
    compute_mean_std,
    dataset_fingerprint,
    load_digits_splits,
    load_image_folder,
    load_toy_gaussians,
    split_targets,
)
from models.transforms import EvalPreset, TrainPreset

CLASSES = ("00378-0208", "50111-0434", "53489-0156")


def make_image_folder(
    root: Path, *, classes: dict[str, tuple[str, ...]] | None = None, train_value: int = 200,
    other_value: int = 40, per_class: int = 2,
) -> Path:
    """Write a tiny PMI-layout folder: train images are all `train_value` grey, valid/test `other_value`."""
    classes = classes or dict.fromkeys(("train", "valid", "test"), CLASSES)
    for split, names in classes.items():
        value = train_value if split == "train" else other_value
        for name in names:
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.new("RGB", (24, 18), (value, value, value)).save(folder / f"img{i}.png")
    return root


def test_load_image_folder_layout_labels_and_train_only_stats(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "ds")
    (root / "train" / CLASSES[0] / "notes.txt").write_text("not an image")
    splits = load_image_folder(root, image_size=8)
    assert splits.classes == CLASSES and splits.num_classes == 3
    assert (splits.image_size, splits.in_channels) == (8, 3)
    assert len(splits.train) == len(splits.valid) == len(splits.test) == 6
    # Mean/std come from the train split (all 200/255) and ignore valid/test (40/255).
    assert splits.mean == pytest.approx((200 / 255,) * 3, abs=1e-6)
    assert all(s == pytest.approx(1e-6) for s in splits.std)
    image, label = splits.valid[0]
    assert image.shape == (3, 8, 8) and isinstance(label, int)
    assert split_targets(splits.train) == [0, 0, 1, 1, 2, 2]
    assert isinstance(splits.train.transform, TrainPreset)  # type: ignore[attr-defined]
    assert isinstance(splits.test.transform, EvalPreset)  # type: ignore[attr-defined]
    cache = json.loads((root / ".rxverify-stats-8.json").read_text())
    assert cache["fingerprint"] == splits.fingerprint and cache["n_images"] == 6


def test_stats_cache_is_reused_and_invalidated_by_content(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "ds")
    first = load_image_folder(root, image_size=8, augment=False)
    cache_path = root / ".rxverify-stats-8.json"
    cache = json.loads(cache_path.read_text())
    cache["mean"] = [0.1, 0.2, 0.3]  # a planted value proves the cache is read back
    cache_path.write_text(json.dumps(cache))
    assert load_image_folder(root, image_size=8).mean == (0.1, 0.2, 0.3)
    Image.new("RGB", (24, 18), (0, 0, 0)).save(root / "train" / CLASSES[0] / "img0.png")
    changed = load_image_folder(root, image_size=8)
    assert changed.fingerprint != first.fingerprint
    assert changed.mean[0] < first.mean[0]


def test_fingerprint_depends_on_content_not_mtime(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "ds")
    before = dataset_fingerprint(root)
    target = root / "valid" / CLASSES[1] / "img1.png"
    os.utime(target, ns=(1_000_000_000, 1_000_000_000))
    assert dataset_fingerprint(root) == before
    (root / "manifest.json").write_text("{}")
    assert dataset_fingerprint(root) == before
    target.rename(target.with_name("renamed.png"))
    assert dataset_fingerprint(root) != before


def test_class_mismatch_between_splits_is_a_clear_error(tmp_path: Path) -> None:
    layout = {"train": CLASSES, "valid": CLASSES, "test": CLASSES[:2]}
    root = make_image_folder(tmp_path / "ds", classes=layout)
    with pytest.raises(ValueError, match=r"test lacks \['53489-0156'\]"):
        load_image_folder(root, image_size=8)


def test_missing_split_and_given_class_order(tmp_path: Path) -> None:
    root = make_image_folder(tmp_path / "ds")
    order = (CLASSES[2], CLASSES[0], CLASSES[1])
    splits = load_image_folder(root, image_size=8, classes=order)
    assert splits.classes == order
    labels = {path.parent.name: label for path, label in splits.test.samples}  # type: ignore[attr-defined]
    assert labels == {CLASSES[2]: 0, CLASSES[0]: 1, CLASSES[1]: 2}
    with pytest.raises(ValueError, match="missing"):
        load_image_folder(root, image_size=8, classes=(*CLASSES, "99999-9999"))
    (root / "valid").rename(root / "validation")
    with pytest.raises(FileNotFoundError, match="valid"):
        load_image_folder(root, image_size=8)


def test_split_targets_and_compute_mean_std() -> None:
    tensors = TensorDataset(torch.zeros(4, 2), torch.tensor([3, 1, 2, 1]))
    assert split_targets(tensors) == [3, 1, 2, 1]
    assert split_targets(Subset(tensors, [2, 0])) == [2, 3]

    class Unlabelled(Dataset[int]):
        def __getitem__(self, index: int) -> int:
            return index

    with pytest.raises(TypeError):
        split_targets(Subset(Unlabelled(), [0]))
    images = [torch.tensor([[[0.0, 1.0]], [[0.5, 0.5]]]), torch.tensor([[[0.0, 1.0]], [[0.5, 0.5]]])]
    mean, std = compute_mean_std(images)
    assert mean == pytest.approx((0.5, 0.5)) and std == pytest.approx((0.5, 1e-6))
    with pytest.raises(ValueError):
        compute_mean_std([])


def test_digits_splits_stratified_disjoint_and_deterministic() -> None:
    splits = load_digits_splits(seed=0)
    assert splits.classes == tuple(str(d) for d in range(10))
    assert (splits.image_size, splits.in_channels) == (8, 1)
    idx = {name: set(getattr(splits, name).indices) for name in ("train", "valid", "test")}
    assert not (idx["train"] & idx["valid"]) and not (idx["train"] & idx["test"]) and not (idx["valid"] & idx["test"])
    assert len(idx["train"] | idx["valid"] | idx["test"]) == 1797
    assert len(idx["test"]) == pytest.approx(0.2 * 1797, abs=2)
    assert len(idx["valid"]) == pytest.approx(0.2 * 1797, abs=2)
    for name in ("train", "valid", "test"):
        counts = Counter(split_targets(getattr(splits, name)))
        share = np.array([counts[k] for k in range(10)]) / sum(counts.values())
        assert np.all(np.abs(share - 0.1) < 0.012)  # stratified: every digit ~10%
    x, y = splits.train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and 0 <= y < 10
    train_x = splits.train.inputs  # type: ignore[attr-defined]
    assert float(train_x.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(train_x.std()) == pytest.approx(1.0, abs=1e-3)
    again = load_digits_splits(seed=0)
    assert torch.equal(again.test.inputs, splits.test.inputs)  # type: ignore[attr-defined]
    assert again.fingerprint == splits.fingerprint
    other = load_digits_splits(seed=1)
    assert other.fingerprint != splits.fingerprint
    assert set(other.test.indices) != idx["test"]  # type: ignore[attr-defined]


def test_toy_gaussians_match_paper_setup_and_overlap() -> None:
    splits = load_toy_gaussians(seed=0)
    assert splits.classes == TOY_CLASSES == ("red", "green", "blue")
    assert (len(splits.train), len(splits.valid), len(splits.test)) == (150, 150, 1500)
    assert splits.in_channels * splits.image_size**2 == 2
    x, _ = splits.test[0]
    assert x.shape == (2,) and x.dtype == torch.float32
    test_x = splits.test.inputs.numpy()  # type: ignore[attr-defined]
    test_y = np.array(split_targets(splits.test))
    means = np.array(TOY_MEANS) * TOY_MEAN_SCALE
    for k in range(3):
        assert np.allclose(test_x[test_y == k].mean(0), means[k], atol=0.25)
    # The Bayes rule (shared covariance: linear) still confuses green with blue: the classes overlap.
    inv = np.linalg.inv(np.array(TOY_COVARIANCE))
    scores = test_x @ inv @ means.T - 0.5 * np.einsum("kd,de,ke->k", means, inv, means)
    bayes = scores.argmax(1)
    green, blue = TOY_CLASSES.index("green"), TOY_CLASSES.index("blue")
    green_to_blue = np.mean(bayes[test_y == green] == blue)
    assert 0.02 < green_to_blue < 0.15
    assert torch.equal(load_toy_gaussians(seed=0).train.inputs, splits.train.inputs)  # type: ignore[attr-defined]
    assert load_toy_gaussians(seed=1).fingerprint != splits.fingerprint
