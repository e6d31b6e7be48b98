"""Datasets: the PMI image-folder layout, scikit-learn's digits, and the paper's toy Gaussians.

Every loader returns a `DataSplits` whose train/valid/test datasets yield `(float tensor, int label)`
and expose `.targets` (a list of int labels), so samplers can index samples per class without
decoding images (`split_targets`).
"""

from __future__ import annotations

import hashlib
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from models.files import atomic_write
from models.transforms import EvalPreset, TrainPreset

logger = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "valid", "test")
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".webp"})
_DIGEST_CACHE = ".rxverify-digests.json"

# Paper, section 4 / Table 1: three 2-D Gaussians sharing one covariance. The paper's means are ~14
# units apart (about 10 standard deviations), so its classes never overlap and a baseline makes no
# critical errors on fresh data. We shrink the means by TOY_MEAN_SCALE=0.3: green and blue are then
# 4.2 apart along x, where the standard deviation is sqrt(2), giving a Bayes error of about 7% each
# way between them (about 3% for red against either), enough for an interpolating MLP to make
# green->blue errors on test.
TOY_CLASSES: tuple[str, ...] = ("red", "green", "blue")
TOY_MEANS: tuple[tuple[float, float], ...] = ((0.0, 8.0), (7.0, -6.0), (-7.0, -6.0))
TOY_COVARIANCE: tuple[tuple[float, float], tuple[float, float]] = ((2.0, 0.5), (0.5, 2.0))
TOY_MEAN_SCALE = 0.3
# Table 2: only green predicted as blue costs anything.
TOY_CRITICAL_PAIR: tuple[str, str] = ("green", "blue")


class LabelledDataset(Dataset[tuple[torch.Tensor, int]], ABC):
    """A sized dataset of `(input tensor, int label)` with `targets` (labels in index order) and `classes`."""

    targets: list[int]
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.targets)

    @abstractmethod
    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        """The input tensor and label of sample `index`."""


@dataclass(frozen=True)
class DataSplits:
    """Train/valid/test datasets plus what a model and its checkpoint need to know about the inputs.

    `image_size` and `in_channels` describe one input: image tensors are (in_channels, image_size,
    image_size); flat toy vectors use image_size=1, so `in_channels * image_size**2` is always the
    number of input features. `mean`/`std` are per channel, computed on the train split.
    """

    classes: tuple[str, ...]
    train: LabelledDataset
    valid: LabelledDataset
    test: LabelledDataset
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    in_channels: int
    fingerprint: str

    @property
    def num_classes(self) -> int:
        """Number of classes K."""
        return len(self.classes)


class ImageFileDataset(LabelledDataset):
    """Image files with integer labels, decoded through a preset (`TrainPreset` or `EvalPreset`)."""

    def __init__(
        self,
        samples: Sequence[tuple[Path, int]],
        *,
        classes: Sequence[str],
        transform: TrainPreset | EvalPreset,
    ) -> None:
        self.samples = list(samples)
        self.classes = tuple(classes)
        self.targets = [label for _, label in self.samples]
        self.transform = transform

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        return self.transform(self.transform.decode(path)), label

    def with_transform(self, transform: TrainPreset | EvalPreset) -> ImageFileDataset:
        """The same files with another preset (e.g. the train split without augmentation)."""
        return ImageFileDataset(self.samples, classes=self.classes, transform=transform)


class TensorClassificationDataset(LabelledDataset):
    """In-memory inputs with integer labels; `targets` is a list of ints.

    `indices` optionally records each sample's position in the source data (e.g. sklearn's digits).
    """

    def __init__(
        self, inputs: torch.Tensor, targets: Sequence[int], *, classes: Sequence[str],
        indices: Sequence[int] | None = None,
    ) -> None:
        if len(inputs) != len(targets):
            raise ValueError(f"{len(inputs)} inputs but {len(targets)} targets")
        self.inputs = inputs
        self.targets = [int(t) for t in targets]
        self.classes = tuple(classes)
        self.indices = None if indices is None else [int(i) for i in indices]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.inputs[index], self.targets[index]


def split_targets(dataset: Dataset[Any]) -> list[int]:
    """Labels of a dataset in index order, without loading inputs (supports Subset and TensorDataset)."""
    if isinstance(dataset, Subset):
        parent = split_targets(dataset.dataset)
        return [parent[int(i)] for i in dataset.indices]
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return [int(t) for t in targets]
    if isinstance(dataset, TensorDataset):
        return [int(t) for t in dataset.tensors[1].tolist()]
    raise TypeError(f"{type(dataset).__name__} exposes no targets")


def compute_mean_std(images: Iterable[torch.Tensor]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std over all pixels of (C, H, W) tensors, accumulated in float64."""
    total = sq_total = None
    count = 0
    for image in images:
        flat = image.detach().to(torch.float64).flatten(1)
        total = flat.sum(1) if total is None else total + flat.sum(1)
        sq_total = (flat**2).sum(1) if sq_total is None else sq_total + (flat**2).sum(1)
        count += flat.shape[1]
    if total is None or sq_total is None or count == 0:
        raise ValueError("cannot compute mean/std of an empty image set")
    mean = total / count
    std = (sq_total / count - mean**2).clamp_min(0).sqrt()
    # A constant channel would give std 0 and infinite normalised values.
    std = std.clamp_min(1e-6)
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def _image_files(directory: Path) -> list[Path]:
    return sorted(
        p for p in directory.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _scan(root: Path) -> dict[str, dict[str, list[Path]]]:
    """split -> class folder name -> sorted image files; checks the layout."""
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root {root} is not a directory")
    layout: dict[str, dict[str, list[Path]]] = {}
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            raise FileNotFoundError(f"{split_dir} is missing: expected {root}/{{train,valid,test}}/<NDC>/*.jpg")
        layout[split] = {
            d.name: _image_files(d) for d in sorted(split_dir.iterdir())
            if d.is_dir() and not d.name.startswith(".")
        }
    return layout


def _file_digests(root: Path, files: list[Path]) -> dict[str, str]:
    """relative path -> sha256 of content, reusing digests cached under (size, mtime_ns)."""
    cache_path = root / _DIGEST_CACHE
    try:
        cache: dict[str, list[Any]] = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    digests: dict[str, str] = {}
    fresh: dict[str, list[Any]] = {}
    for path in files:
        rel = path.relative_to(root).as_posix()
        st = path.stat()
        entry = cache.get(rel)
        if entry is not None and entry[0] == st.st_size and entry[1] == st.st_mtime_ns:
            digest = str(entry[2])
        else:
            with path.open("rb") as fh:
                digest = hashlib.file_digest(fh, "sha256").hexdigest()
        digests[rel] = digest
        fresh[rel] = [st.st_size, st.st_mtime_ns, digest]
    if fresh != cache:
        _write_json_atomic(cache_path, fresh)
    return digests


def _write_json_atomic(path: Path, payload: Any) -> None:
    """Best-effort atomic JSON write; a read-only dataset directory only costs the cache."""
    try:
        # Readable by all: the API and the worker may run as other users.
        with atomic_write(path, mode=0o644) as handle:
            handle.write(json.dumps(payload).encode())
    except OSError as exc:
        logger.warning("could not write cache %s: %s", path, exc)


def dataset_fingerprint(root: str | Path) -> str:
    """SHA-256 identifying a PMI-layout dataset by its split/class/file names and file contents.

    It hashes, in sorted order, each image's path relative to `root` with the SHA-256 of its bytes, so
    copying, touching or moving the whole folder keeps the fingerprint, while any renamed, added,
    removed or edited image changes it. Per-file digests are cached in `root/.rxverify-digests.json`
    keyed by (size, mtime), so only new or modified files are read again; non-image files (manifest,
    caches) are ignored.
    """
    root = Path(root)
    layout = _scan(root)
    files = [f for split in SPLITS for cls in sorted(layout[split]) for f in layout[split][cls]]
    digests = _file_digests(root, files)
    hasher = hashlib.sha256(b"rxverify-image-folder-v1\n")
    for rel in sorted(digests):
        hasher.update(f"{rel}\0{digests[rel]}\n".encode())
    return hasher.hexdigest()


def _train_stats(
    root: Path, *, files: list[Path], image_size: int, fingerprint: str
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std of the train split through the eval transform at `image_size`, cached by fingerprint."""
    cache_path = root / f".rxverify-stats-{image_size}.json"
    try:
        cached = json.loads(cache_path.read_text())
        if cached.get("fingerprint") == fingerprint and cached.get("image_size") == image_size:
            return tuple(cached["mean"]), tuple(cached["std"])
    except (OSError, ValueError, KeyError):
        pass
    logger.info("computing mean/std of %d training images at %d px", len(files), image_size)
    # mean 0 / std 1 makes Normalize the identity: these are the [0, 1] pixels the model will see.
    identity = EvalPreset(image_size=image_size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    mean, std = compute_mean_std(identity(identity.decode(f)) for f in files)
    _write_json_atomic(cache_path, {"fingerprint": fingerprint, "image_size": image_size,
                                    "n_images": len(files), "mean": list(mean), "std": list(std)})
    return mean, std


def _resolve_classes(layout: dict[str, dict[str, list[Path]]], classes: Sequence[str] | None) -> tuple[str, ...]:
    found = {split: set(layout[split]) for split in SPLITS}
    if not (found["train"] == found["valid"] == found["test"]):
        all_classes = set().union(*found.values())
        detail = "; ".join(
            f"{split} lacks {sorted(all_classes - found[split])}" for split in SPLITS if all_classes - found[split]
        )
        raise ValueError(f"train/valid/test must hold the same class folders: {detail}")
    if classes is None:
        resolved = tuple(sorted(found["train"]))
    else:
        resolved = tuple(classes)
        if len(set(resolved)) != len(resolved):
            raise ValueError("classes contains duplicates")
        if set(resolved) != found["train"]:
            raise ValueError(
                f"class folders do not match the given classes: missing {sorted(set(resolved) - found['train'])}, "
                f"unexpected {sorted(found['train'] - set(resolved))}"
            )
    if not resolved:
        raise ValueError("no class folders found")
    empty = [c for c in resolved if not layout["train"][c]]
    if empty:
        raise ValueError(f"classes with no training images: {empty}")
    for split in ("valid", "test"):
        missing = [c for c in resolved if not layout[split][c]]
        if missing:
            logger.warning("%s split has no images for %s", split, missing)
    return resolved


def load_image_folder(
    root: str | Path,
    *,
    image_size: int,
    augment: bool = True,
    classes: Sequence[str] | None = None,
) -> DataSplits:
    """Load `root/{train,valid,test}/<NDC>/*.{jpg,jpeg,png,webp}` (class order sorted unless `classes`)."""
    root = Path(root)
    layout = _scan(root)
    resolved = _resolve_classes(layout, classes)
    fingerprint = dataset_fingerprint(root)
    train_files = [f for c in resolved for f in layout["train"][c]]
    mean, std = _train_stats(root, files=train_files, image_size=image_size, fingerprint=fingerprint)
    eval_preset = EvalPreset(image_size=image_size, mean=mean, std=std)
    train_preset = TrainPreset(image_size=image_size, mean=mean, std=std) if augment else eval_preset

    def dataset(split: str, preset: TrainPreset | EvalPreset) -> ImageFileDataset:
        samples = [(f, label) for label, c in enumerate(resolved) for f in layout[split][c]]
        return ImageFileDataset(samples, classes=resolved, transform=preset)

    return DataSplits(
        classes=resolved, train=dataset("train", train_preset), valid=dataset("valid", eval_preset),
        test=dataset("test", eval_preset), mean=mean, std=std, image_size=image_size, in_channels=3,
        fingerprint=fingerprint,
    )


def _fingerprint_arrays(tag: str, *arrays: np.ndarray) -> str:
    hasher = hashlib.sha256(tag.encode())
    for array in arrays:
        hasher.update(np.ascontiguousarray(array).tobytes())
    return hasher.hexdigest()


def _tensor_splits(
    *, classes: tuple[str, ...], parts: dict[str, tuple[torch.Tensor, np.ndarray]],
    indices: dict[str, np.ndarray] | None = None,
    normalise: Callable[[torch.Tensor], torch.Tensor], mean: tuple[float, ...], std: tuple[float, ...],
    image_size: int, in_channels: int, fingerprint: str,
) -> DataSplits:
    made = {
        split: TensorClassificationDataset(
            normalise(x), y.tolist(), classes=classes, indices=None if indices is None else indices[split].tolist()
        )
        for split, (x, y) in parts.items()
    }
    return DataSplits(classes=classes, train=made["train"], valid=made["valid"], test=made["test"],
                      mean=mean, std=std, image_size=image_size, in_channels=in_channels,
                      fingerprint=fingerprint)


def load_digits_splits(*, seed: int, valid_fraction: float = 0.2, test_fraction: float = 0.2) -> DataSplits:
    """scikit-learn's bundled 8x8 digits, stratified train/valid/test, as normalised 1x8x8 tensors."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if not (0 < valid_fraction < 1 and 0 < test_fraction < 1 and valid_fraction + test_fraction < 1):
        raise ValueError("valid_fraction and test_fraction must be in (0, 1) and sum below 1")
    bunch = load_digits()
    pixels = np.asarray(bunch.data, dtype=np.float32) / 16.0  # raw values are 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    index = np.arange(len(labels))
    rest, test_idx = train_test_split(index, test_size=test_fraction, stratify=labels, random_state=seed)
    train_idx, valid_idx = train_test_split(
        rest, test_size=valid_fraction / (1 - test_fraction), stratify=labels[rest], random_state=seed
    )
    images = torch.from_numpy(pixels).reshape(-1, 1, 8, 8)
    mean_v = float(images[train_idx].mean())
    std_v = float(images[train_idx].std())
    chosen = {"train": train_idx, "valid": valid_idx, "test": test_idx}
    parts = {split: (images[idx], labels[idx]) for split, idx in chosen.items()}
    return _tensor_splits(
        classes=tuple(str(d) for d in range(10)), parts=parts, indices=chosen,
        normalise=lambda x: (x - mean_v) / std_v, mean=(mean_v,), std=(std_v,), image_size=8, in_channels=1,
        fingerprint=_fingerprint_arrays("sklearn-digits-v1", pixels, labels, train_idx, valid_idx, test_idx),
    )


def load_toy_gaussians(
    *,
    seed: int,
    n_per_class: int = 50,
    n_valid_per_class: int = 50,
    n_test_per_class: int = 500,
    mean_scale: float = TOY_MEAN_SCALE,
) -> DataSplits:
    """The paper's section-4 toy problem: 2-D Gaussians red/green/blue (Table 1 means x `mean_scale`).

    Inputs are raw (un-normalised) float32 vectors of shape (2,), so attack budgets such as the
    paper's eps=1.5 keep their meaning; `mean`/`std` are therefore (0, 0)/(1, 1). Defaults follow the
    paper: 50 training and 500 test points per class.
    """
    rng = np.random.default_rng(seed)
    means = np.asarray(TOY_MEANS, dtype=np.float64) * mean_scale
    cov = np.asarray(TOY_COVARIANCE, dtype=np.float64)
    parts: dict[str, tuple[torch.Tensor, np.ndarray]] = {}
    for split, n in (("train", n_per_class), ("valid", n_valid_per_class), ("test", n_test_per_class)):
        xs = [rng.multivariate_normal(means[k], cov, size=n) for k in range(len(TOY_CLASSES))]
        ys = np.repeat(np.arange(len(TOY_CLASSES)), n)
        parts[split] = (torch.from_numpy(np.concatenate(xs).astype(np.float32)), ys)
    tag = f"toy-gaussians-v1:{seed}:{n_per_class}:{n_valid_per_class}:{n_test_per_class}:{mean_scale}"
    return _tensor_splits(
        classes=TOY_CLASSES, parts=parts, normalise=lambda x: x, mean=(0.0, 0.0), std=(1.0, 1.0),
        image_size=1, in_channels=2,
        fingerprint=_fingerprint_arrays(tag, *(p[0].numpy() for p in parts.values())),
    )
