"""Checkpoints: `model.safetensors` + `metadata.json` in one directory, written atomically.

A third, optional file, `validation.safetensors`, holds the calibrated validation probabilities and labels
the verdict policy was fitted on, so that the policy can be refitted when a pharmacist changes the cost
matrix (`models.decision.refit_policy`) without the dataset. Its SHA-256 is recorded in the metadata's
`decision.validation_sha256`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import glob
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.networks import ARCHITECTURES, create_model
from models.ood import Familiarity

WEIGHTS_FILE = "model.safetensors"
METADATA_FILE = "metadata.json"
VALIDATION_FILE = "validation.safetensors"
FAMILIARITY_FILE = "familiarity.safetensors"  # models.ood: which photos are unlike the training photos
OPTIONAL_FILES = (VALIDATION_FILE, FAMILIARITY_FILE)
CHECKPOINT_FILES = (WEIGHTS_FILE, METADATA_FILE, *OPTIONAL_FILES)
METADATA_VERSION = 1
OUTPUT_KINDS = ("logits", "costs")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class CheckpointError(ValueError):
    """A checkpoint directory is missing, incomplete, or its metadata is invalid."""


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape a checkpoint's numbers."""
    import numpy
    import safetensors
    import torchvision

    try:
        rxverify = importlib.metadata.version("rxverify")
    except importlib.metadata.PackageNotFoundError:
        rxverify = "unknown"
    return {"python": platform.python_version(), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "numpy": numpy.__version__,
            "safetensors": safetensors.__version__, "rxverify": rxverify}


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class CheckpointMetadata:
    """Everything needed to rebuild, preprocess for, calibrate and audit a model (validated on creation)."""

    classes: tuple[str, ...]
    arch: str
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    temperature: float = 1.0
    output_kind: str = "logits"
    method: str = "baseline"
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    cost_matrix_sha256: str | None = None
    dataset_fingerprint: str | None = None
    parent_sha256: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    decision: dict[str, Any] = field(default_factory=dict)
    library_versions: dict[str, str] = field(default_factory=library_versions)
    created_at: str = field(default_factory=_now)

    def __post_init__(self) -> None:
        # Normalise JSON lists to tuples and ints to floats so equal metadata compares equal.
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))
        object.__setattr__(self, "temperature", float(self.temperature))
        self.validate()

    def validate(self) -> None:
        """Raise CheckpointError naming the first invalid field."""
        if not self.classes:
            raise CheckpointError("metadata.classes must not be empty")
        if not all(isinstance(c, str) and c.strip() == c and c for c in self.classes):
            raise CheckpointError("metadata.classes must be non-empty strings without surrounding spaces")
        if len(set(self.classes)) != len(self.classes):
            duplicates = sorted({c for c in self.classes if self.classes.count(c) > 1})
            raise CheckpointError(f"metadata.classes has duplicates: {duplicates}")
        if self.arch not in ARCHITECTURES:
            raise CheckpointError(f"metadata.arch {self.arch!r} is not one of {', '.join(ARCHITECTURES)}")
        for name in ("in_channels", "image_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CheckpointError(f"metadata.{name} must be a positive integer (got {value!r})")
        if len(self.mean) != len(self.std):
            raise CheckpointError(f"metadata.mean has {len(self.mean)} values but std has {len(self.std)}")
        if not all(math.isfinite(v) for v in self.mean) or not all(math.isfinite(v) and v > 0 for v in self.std):
            raise CheckpointError("metadata.mean must be finite and metadata.std finite and positive")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise CheckpointError(f"metadata.temperature must be finite and positive (got {self.temperature})")
        if self.output_kind not in OUTPUT_KINDS:
            raise CheckpointError(f"metadata.output_kind must be one of {OUTPUT_KINDS} (got {self.output_kind!r})")
        if not isinstance(self.method, str) or not self.method:
            raise CheckpointError("metadata.method must be a non-empty string")
        for name in ("cost_matrix_sha256", "parent_sha256"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and _SHA256.match(value)):
                raise CheckpointError(f"metadata.{name} must be a lowercase hex SHA-256 or null")
        if self.dataset_fingerprint is not None and not isinstance(self.dataset_fingerprint, str):
            raise CheckpointError("metadata.dataset_fingerprint must be a string or null")
        for name in ("hyperparameters", "metrics", "decision", "library_versions"):
            value = getattr(self, name)
            if not isinstance(value, dict):
                raise CheckpointError(f"metadata.{name} must be an object")
            try:
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError) as error:
                raise CheckpointError(f"metadata.{name} is not plain JSON: {error}") from None
        try:
            dt.datetime.fromisoformat(self.created_at)
        except (TypeError, ValueError):
            raise CheckpointError(f"metadata.created_at {self.created_at!r} is not an ISO 8601 time") from None

    @property
    def num_classes(self) -> int:
        """Number of output classes."""
        return len(self.classes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict, with the format version first."""
        body = dataclasses.asdict(self)
        body["classes"], body["mean"], body["std"] = list(self.classes), list(self.mean), list(self.std)
        return {"format_version": METADATA_VERSION, **body}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CheckpointMetadata:
        """Parse and validate; refuse unknown format versions and unknown fields."""
        if not isinstance(data, Mapping):
            raise CheckpointError("metadata must be a JSON object")
        version = data.get("format_version")
        if version != METADATA_VERSION:
            raise CheckpointError(f"unsupported checkpoint metadata format_version {version!r}; this rxverify "
                                  f"reads version {METADATA_VERSION} (upgrade rxverify or re-export the model)")
        known = {f.name for f in dataclasses.fields(cls)}
        body = {k: v for k, v in data.items() if k != "format_version"}
        unknown = sorted(set(body) - known)
        if unknown:
            raise CheckpointError(f"metadata has unknown fields {unknown}")
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(body))
        if missing:
            raise CheckpointError(f"metadata is missing required fields {missing}")
        for name in ("classes", "mean", "std"):
            if not isinstance(body[name], list | tuple):
                raise CheckpointError(f"metadata.{name} must be a list")
        try:
            return cls(**body)
        except (TypeError, ValueError) as error:
            if isinstance(error, CheckpointError):
                raise
            raise CheckpointError(f"invalid metadata: {error}") from None

    def to_json(self) -> str:
        """Pretty, key-stable JSON."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n"


@dataclass(frozen=True)
class LoadedCheckpoint:
    """A model ready for inference (eval mode) with its metadata and the SHA-256 of its weights file."""

    model: nn.Module
    metadata: CheckpointMetadata
    weights_sha256: str


def _state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in model.parameters()):
        raise CheckpointError("the model has lazy layers with no shape yet: run one forward pass first")
    # Cloning breaks any storage sharing, which safetensors refuses to serialise.
    return {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}


def _check_matches_arch(tensors: Mapping[str, torch.Tensor], metadata: CheckpointMetadata) -> None:
    # A meta-device build costs no memory or init time and tells us the shapes the loader will need.
    with torch.device("meta"):
        reference = create_model(metadata.arch, metadata.num_classes, in_channels=metadata.in_channels)
    expected = reference.state_dict()
    if set(expected) != set(tensors):
        diff = sorted(set(expected) ^ set(tensors))[:8]
        raise CheckpointError(f"model state does not match arch {metadata.arch!r} (differing keys: {diff})")
    for key, tensor in expected.items():
        if not isinstance(tensor, nn.parameter.UninitializedParameter) and tensor.shape != tensors[key].shape:
            raise CheckpointError(f"{key} has shape {tuple(tensors[key].shape)}; arch {metadata.arch!r} with "
                                  f"{metadata.num_classes} classes needs {tuple(tensor.shape)}")


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse fsync on directories
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


def _retired_copies(directory: Path) -> list[Path]:
    """Checkpoints an overwrite moved aside, newest first (left behind only by a process killed mid-swap)."""
    if not directory.parent.is_dir():
        return []

    def age_key(path: Path) -> float:
        try:
            return path.stat().st_mtime
        except FileNotFoundError:  # another process removed it meanwhile
            return -math.inf

    found = [old / "checkpoint" for old in directory.parent.glob(f".{glob.escape(directory.name)}.old-*")
             if (old / "checkpoint" / WEIGHTS_FILE).is_file()]
    return sorted(found, key=age_key, reverse=True)


def _missing(directory: str | Path, name: str) -> CheckpointError:
    """The error for a checkpoint file that is not there, naming a copy an interrupted overwrite left."""
    retired = _retired_copies(Path(directory))
    hint = (f"; an overwrite of it was interrupted and the previous checkpoint is at {retired[0]} (writing "
            "to this path again puts it back first)") if retired and not Path(directory).exists() else ""
    return CheckpointError(f"{directory} is not a checkpoint: {name} is missing{hint}")


def _restore_interrupted_overwrite(directory: Path) -> None:
    """Put back the checkpoint an overwrite had moved aside when its process died before the new one
    moved in (the one window in which `directory` holds nothing), and drop older leftovers once a
    checkpoint is in place. Two processes writing one path at once are not supported."""
    retired = _retired_copies(directory)
    if not retired:
        return
    if directory.is_dir() and not any(directory.iterdir()):
        directory.rmdir()  # an empty folder where the checkpoint was: the copy aside is the real one
    if not directory.exists():
        os.replace(retired[0], directory)
        _fsync_dir(directory.parent)
        shutil.rmtree(retired[0].parent, ignore_errors=True)
        retired = retired[1:]
    if (directory / WEIGHTS_FILE).is_file():  # never delete the copies while nothing better is in place
        for path in retired:
            shutil.rmtree(path.parent, ignore_errors=True)


def _publish(directory: Path, files: Mapping[str, bytes], *, overwrite: bool) -> None:
    """Write files into a temp dir beside `directory`, fsync, then rename it into place.

    Replacing a checkpoint takes two renames (rename(2) cannot replace a non-empty directory): the old
    one moves aside, then the new one moves in. A process killed between them leaves `directory` empty
    and the old checkpoint beside it; the next write to `directory` puts it back before going on.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    _restore_interrupted_overwrite(directory)
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"{directory} exists and is not a directory")
    if directory.exists() and any(directory.iterdir()) and not overwrite:
        raise CheckpointError(f"{directory} already holds files; choose a new directory or pass overwrite")
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    retired: Path | None = None
    try:
        for name, data in files.items():
            _write_file(staging / name, data)
        _fsync_dir(staging)
        if directory.exists() and any(directory.iterdir()):
            # rename(2) cannot replace a non-empty directory: move the old one aside first.
            retired = Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
            os.replace(directory, retired / "checkpoint")
        os.replace(staging, directory)
        _fsync_dir(directory.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if retired is not None and not directory.exists():
            os.replace(retired / "checkpoint", directory)
        raise
    finally:
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)


def save_checkpoint(directory: str | Path, *, model: nn.Module, metadata: CheckpointMetadata,
                    overwrite: bool = False) -> str:
    """Write weights and metadata atomically (temp dir + rename); return the weights' SHA-256."""
    from safetensors.torch import save

    tensors = _state_tensors(model)
    _check_matches_arch(tensors, metadata)
    weights = save(tensors, metadata={"format": "pt"})
    _publish(Path(directory), {WEIGHTS_FILE: weights, METADATA_FILE: metadata.to_json().encode()},
             overwrite=overwrite)
    return hashlib.sha256(weights).hexdigest()


def read_metadata(directory: str | Path) -> CheckpointMetadata:
    """Read and validate a checkpoint's metadata.json."""
    path = Path(directory) / METADATA_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise _missing(directory, METADATA_FILE) from None
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path} is not valid JSON: {error}") from None
    return CheckpointMetadata.from_dict(data)


def check_files(directory: str | Path) -> CheckpointMetadata:
    """A checkpoint's metadata, once its weights file is known to be there too (CheckpointError if not):
    what a loader needs, checked without reading the weights."""
    metadata = read_metadata(directory)
    if not (Path(directory) / WEIGHTS_FILE).is_file():
        raise _missing(directory, WEIGHTS_FILE)
    return metadata


def _read_weights(directory: str | Path) -> bytes:
    path = Path(directory) / WEIGHTS_FILE
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise _missing(directory, WEIGHTS_FILE) from None


def weights_sha256(directory: str | Path) -> str:
    """SHA-256 of a checkpoint's weights file (the model's identity)."""
    digest = hashlib.sha256()
    path = Path(directory) / WEIGHTS_FILE
    if not path.is_file():
        raise _missing(directory, WEIGHTS_FILE)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_checkpoint(directory: str | Path, *, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Rebuild the model from metadata, load the weights strictly, move to `device`, eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    metadata = read_metadata(directory)
    weights = _read_weights(directory)
    try:
        tensors = load(weights)
    except (SafetensorError, ValueError) as error:
        raise CheckpointError(f"{directory}/{WEIGHTS_FILE} is corrupt: {error}") from None
    model = _model_with_weights(metadata, tensors, directory=directory)
    model.to(torch.device(device))
    model.eval()
    return LoadedCheckpoint(model=model, metadata=metadata, weights_sha256=hashlib.sha256(weights).hexdigest())


def _model_with_weights(metadata: CheckpointMetadata, tensors: Mapping[str, torch.Tensor], *,
                        directory: str | Path) -> nn.Module:
    """The architecture built on the meta device, then the loaded tensors assigned in place.

    Building it on the CPU would first fill every weight with a random initialisation that the loaded
    weights overwrite at once (about 75 ms of CPU for a ResNet-18, on the cores that serve requests
    during a hot swap). Lazily shaped modules (the MLP) cannot be built on the meta device: they take the
    ordinary path.
    """
    def failed(error: Exception) -> CheckpointError:
        return CheckpointError(f"{directory}: weights do not fit arch {metadata.arch!r}: {error}")

    if metadata.arch != "mlp":
        with torch.device("meta"):
            model = create_model(metadata.arch, metadata.num_classes, in_channels=metadata.in_channels)
        try:
            model.load_state_dict(tensors, strict=True, assign=True)
        except RuntimeError as error:
            raise failed(error) from None
        if not any(t.is_meta for t in (*model.parameters(), *model.buffers())):
            return model
    model = create_model(metadata.arch, metadata.num_classes, in_channels=metadata.in_channels)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        raise failed(error) from None
    return model


def with_updated_metadata(src_dir: str | Path, dst_dir: str | Path, *, validation: bytes | None = None,
                          familiarity: bytes | None = None, **changes: Any) -> str:
    """Copy a checkpoint with some metadata fields replaced (e.g. temperature, decision); same weights.

    `validation` (from `encode_validation_outputs`) replaces the validation outputs, and its SHA-256 is
    recorded as `decision.validation_sha256`. Without it those of `src_dir`, if any, are carried over,
    unless the change makes them stale: a new temperature (they are calibrated probabilities) or a new
    decision (they belong to the policy fitted on them). `familiarity` (`models.ood.Familiarity.to_bytes`)
    replaces the familiarity file; without it that of `src_dir` is carried over (it depends on the weights
    alone, and names them).
    """
    weights = _read_weights(src_dir)
    source = read_metadata(src_dir)
    if validation is not None:
        decision = changes.get("decision", source.decision)
        changes["decision"] = {**decision, "validation_sha256": hashlib.sha256(validation).hexdigest()}
    metadata = dataclasses.replace(source, **changes)
    overwrite = Path(src_dir).resolve() == Path(dst_dir).resolve()
    files = {WEIGHTS_FILE: weights, METADATA_FILE: metadata.to_json().encode()}
    carried = Path(src_dir) / VALIDATION_FILE
    if validation is None and carried.is_file() and not {"temperature", "decision"} & set(changes):
        validation = carried.read_bytes()
    if validation is not None:
        files[VALIDATION_FILE] = validation
    if familiarity is None and (Path(src_dir) / FAMILIARITY_FILE).is_file():
        familiarity = (Path(src_dir) / FAMILIARITY_FILE).read_bytes()
    if familiarity is not None:
        files[FAMILIARITY_FILE] = familiarity
    _publish(Path(dst_dir), files, overwrite=overwrite)
    return hashlib.sha256(weights).hexdigest()


def encode_validation_outputs(probs: Any, labels: Any) -> bytes:
    """Validation probabilities (N, K) as float64 and labels (N,) as int64, in safetensors format."""
    import numpy as np
    from safetensors.numpy import save

    p = np.ascontiguousarray(np.asarray(probs, dtype=np.float64))
    y = np.ascontiguousarray(np.asarray(labels, dtype=np.int64).reshape(-1))
    if p.ndim != 2 or p.shape[0] != y.shape[0]:
        raise ValueError(f"need (N, K) probabilities and N labels (got {p.shape} and {y.shape})")
    return save({"probs": p, "labels": y}, metadata={"format": "rxverify-validation-v1"})


def read_validation_outputs(directory: str | Path, *, expected_sha256: str | None = None,
                            num_classes: int | None = None) -> tuple[Any, Any] | None:
    """(probs, labels) from a checkpoint's validation file, or None when it has none.

    Raises CheckpointError when the file is unreadable, malformed, does not hash to `expected_sha256`,
    or (given `num_classes`) has another number of columns or labels outside 0..num_classes-1.
    """
    import numpy as np
    from safetensors import SafetensorError
    from safetensors.numpy import load

    path = Path(directory) / VALIDATION_FILE
    if not path.is_file():
        return None
    data = path.read_bytes()
    if expected_sha256 is not None and hashlib.sha256(data).hexdigest() != expected_sha256:
        raise CheckpointError(f"{path} does not match the SHA-256 recorded in the metadata")
    try:
        arrays = load(data)
        probs, labels = arrays["probs"], arrays["labels"]
    except (SafetensorError, ValueError, KeyError) as error:
        raise CheckpointError(f"{path} is corrupt: {error!r}") from None
    if probs.ndim != 2 or labels.shape != (probs.shape[0],) or probs.dtype != np.float64:
        raise CheckpointError(f"{path} holds arrays of the wrong shape or type")
    if num_classes is not None and (probs.shape[1] != num_classes
                                    or (labels.size and (labels.min() < 0 or labels.max() >= num_classes))):
        raise CheckpointError(f"{path} does not match the model's {num_classes} classes")
    return probs, labels


def read_familiarity(directory: str | Path, *, weights_sha256: str) -> Familiarity | None:
    """The checkpoint's familiarity model (`models.ood`), or None when it has none.

    Raises CheckpointError when the file is corrupt or was fitted for other weights than `weights_sha256`.
    """
    path = Path(directory) / FAMILIARITY_FILE
    if not path.is_file():
        return None
    try:
        familiarity = Familiarity.from_bytes(path.read_bytes())
    except ValueError as error:
        raise CheckpointError(f"{path}: {error}") from None
    if familiarity.weights_sha256 != weights_sha256:
        raise CheckpointError(f"{path} was fitted for other weights ({familiarity.weights_sha256[:12]}, "
                              f"not {weights_sha256[:12]})")
    return familiarity
