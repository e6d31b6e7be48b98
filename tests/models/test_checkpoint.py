"""Checkpoints: exact round trip, atomic writes, metadata validation and versioning."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from models import checkpoint as checkpoint_module
from models.checkpoint import (
    FAMILIARITY_FILE,
    METADATA_FILE,
    VALIDATION_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    CheckpointMetadata,
    encode_validation_outputs,
    load_checkpoint,
    read_familiarity,
    read_metadata,
    read_validation_outputs,
    save_checkpoint,
    weights_sha256,
    with_updated_metadata,
)
from models.networks import create_model

CLASSES = ("00378-0208", "00591-0461", "50111-0434")
SHA = "ab" * 32


def make_metadata(**changes: Any) -> CheckpointMetadata:
    """A valid metadata record for a 3-class tiny CNN, with overrides."""
    fields: dict[str, Any] = {
        "classes": CLASSES, "arch": "tiny_cnn", "in_channels": 3, "image_size": 16,
        "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.2, 0.2), "method": "csada",
        "hyperparameters": {"lam": 2.0, "eps": 1.0}, "cost_matrix_sha256": SHA,
        "dataset_fingerprint": "fp-1", "parent_sha256": None, "metrics": {"valid": {"wer": 0.1}},
    }
    fields.update(changes)
    return CheckpointMetadata(**fields)


def trained_model(arch: str = "tiny_cnn", *, in_channels: int = 3) -> nn.Module:
    """A model whose BN statistics and weights differ from a fresh init."""
    torch.manual_seed(0)
    model = create_model(arch, len(CLASSES), in_channels=in_channels, input_shape=(in_channels, 16, 16))
    with torch.no_grad():
        model.train()
        model(torch.randn(8, in_channels, 16, 16) * 3 + 1)  # moves the BN running statistics
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    return model.eval()


@pytest.mark.parametrize(("arch", "in_channels"), [("tiny_cnn", 3), ("mlp", 1), ("resnet9", 1)])
def test_round_trip_is_bitwise_exact(tmp_path: Path, arch: str, in_channels: int) -> None:
    model = trained_model(arch, in_channels=in_channels)
    metadata = make_metadata(arch=arch, in_channels=in_channels, mean=(0.5,) * in_channels,
                             std=(0.25,) * in_channels)
    sha = save_checkpoint(tmp_path / "ckpt", model=model, metadata=metadata)
    loaded = load_checkpoint(tmp_path / "ckpt")
    x = torch.randn(4, in_channels, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), model(x))
    assert not loaded.model.training
    assert loaded.metadata == metadata
    assert loaded.weights_sha256 == sha == weights_sha256(tmp_path / "ckpt")
    assert sha == hashlib.sha256((tmp_path / "ckpt" / WEIGHTS_FILE).read_bytes()).hexdigest()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[key], value), key


def test_metadata_json_holds_every_field(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "c", model=trained_model(), metadata=make_metadata())
    data = json.loads((tmp_path / "c" / METADATA_FILE).read_text())
    assert data["format_version"] == 1
    for name in ("classes", "arch", "in_channels", "image_size", "mean", "std", "temperature", "output_kind",
                 "method", "hyperparameters", "cost_matrix_sha256", "dataset_fingerprint", "parent_sha256",
                 "metrics", "decision", "library_versions", "created_at"):
        assert name in data, name
    assert {"torch", "torchvision", "python", "rxverify"} <= set(data["library_versions"])
    assert data["classes"] == list(CLASSES)
    assert sorted(os.listdir(tmp_path)) == ["c"]  # no temp directory left behind


def test_failed_write_leaves_no_half_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = checkpoint_module._write_file

    def write_then_fail(path: Path, data: bytes) -> None:
        real_write(path, data)
        if path.name == METADATA_FILE:
            raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module, "_write_file", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "ckpt", model=trained_model(), metadata=make_metadata())
    assert os.listdir(tmp_path) == []


def test_failed_overwrite_keeps_the_old_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = save_checkpoint(tmp_path / "ckpt", model=trained_model(), metadata=make_metadata())
    monkeypatch.setattr(checkpoint_module, "_fsync_dir", lambda path: (_ for _ in ()).throw(OSError("io error")))
    with pytest.raises(OSError):
        save_checkpoint(tmp_path / "ckpt", model=create_model("tiny_cnn", 3), metadata=make_metadata(),
                        overwrite=True)
    assert weights_sha256(tmp_path / "ckpt") == first
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_failed_swap_restores_the_old_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = save_checkpoint(tmp_path / "ckpt", model=trained_model(), metadata=make_metadata())
    real_replace = os.replace
    calls: list[str] = []

    def replace_then_fail(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        calls.append(str(src))
        if len(calls) == 2:  # the old one has been moved aside; the new one fails to move in
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_then_fail)
    with pytest.raises(OSError, match="rename failed"):
        save_checkpoint(tmp_path / "ckpt", model=create_model("tiny_cnn", 3), metadata=make_metadata(),
                        overwrite=True)
    monkeypatch.undo()
    assert weights_sha256(tmp_path / "ckpt") == first
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_an_overwrite_killed_between_its_two_renames_is_recovered(tmp_path: Path) -> None:
    """The state a kill -9 leaves after the old checkpoint moved aside and before the new one moved in."""
    first = save_checkpoint(tmp_path / "ckpt", model=trained_model(), metadata=make_metadata())
    (tmp_path / ".ckpt.old-x1").mkdir()
    os.replace(tmp_path / "ckpt", tmp_path / ".ckpt.old-x1" / "checkpoint")
    with pytest.raises(CheckpointError, match=r"interrupted.*\.ckpt\.old-x1"):
        load_checkpoint(tmp_path / "ckpt")
    # The next write puts the old one back first: without overwrite it refuses, as for any checkpoint.
    with pytest.raises(CheckpointError, match="already holds files"):
        save_checkpoint(tmp_path / "ckpt", model=create_model("tiny_cnn", 3), metadata=make_metadata())
    assert weights_sha256(tmp_path / "ckpt") == first and sorted(os.listdir(tmp_path)) == ["ckpt"]
    (tmp_path / ".ckpt.old-x2").mkdir()
    os.replace(tmp_path / "ckpt", tmp_path / ".ckpt.old-x2" / "checkpoint")
    second = save_checkpoint(tmp_path / "ckpt", model=create_model("tiny_cnn", 3), metadata=make_metadata(),
                             overwrite=True)
    assert second != first and load_checkpoint(tmp_path / "ckpt").weights_sha256 == second
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]


def test_recovery_never_deletes_the_copy_aside_while_nothing_better_is_in_place(tmp_path: Path) -> None:
    first = save_checkpoint(tmp_path / "ckpt", model=trained_model(), metadata=make_metadata())
    (tmp_path / ".ckpt.old-x1").mkdir()
    os.replace(tmp_path / "ckpt", tmp_path / ".ckpt.old-x1" / "checkpoint")
    (tmp_path / "ckpt").mkdir()  # an empty folder where the checkpoint was
    with pytest.raises(CheckpointError, match="already holds files"):
        save_checkpoint(tmp_path / "ckpt", model=create_model("tiny_cnn", 3), metadata=make_metadata())
    assert weights_sha256(tmp_path / "ckpt") == first and sorted(os.listdir(tmp_path)) == ["ckpt"]
    (tmp_path / ".ckpt.old-x2").mkdir()
    os.replace(tmp_path / "ckpt", tmp_path / ".ckpt.old-x2" / "checkpoint")
    (tmp_path / "ckpt").write_text("not a checkpoint")  # a file in the way: refused, and the copy kept
    with pytest.raises(CheckpointError, match="not a directory"):
        save_checkpoint(tmp_path / "ckpt", model=create_model("tiny_cnn", 3), metadata=make_metadata(),
                        overwrite=True)
    assert weights_sha256(tmp_path / ".ckpt.old-x2" / "checkpoint") == first


def test_existing_directory_is_not_clobbered(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "ckpt", model=trained_model(), metadata=make_metadata())
    with pytest.raises(CheckpointError, match="already holds files"):
        save_checkpoint(tmp_path / "ckpt", model=trained_model(), metadata=make_metadata())
    (tmp_path / "empty").mkdir()
    save_checkpoint(tmp_path / "empty", model=trained_model(), metadata=make_metadata())
    other = create_model("tiny_cnn", 3)
    sha = save_checkpoint(tmp_path / "ckpt", model=other, metadata=make_metadata(), overwrite=True)
    assert load_checkpoint(tmp_path / "ckpt").weights_sha256 == sha


def test_model_must_match_metadata_arch(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not match arch"):
        save_checkpoint(tmp_path / "c", model=trained_model(), metadata=make_metadata(arch="resnet9"))
    with pytest.raises(CheckpointError, match="shape"):
        save_checkpoint(tmp_path / "c", model=trained_model(), metadata=make_metadata(classes=("a", "b")))
    with pytest.raises(CheckpointError, match="lazy"):
        save_checkpoint(tmp_path / "c", model=create_model("mlp", 3), metadata=make_metadata(arch="mlp"))
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize(("changes", "message"), [
    ({"classes": ()}, "must not be empty"),
    ({"classes": ("a", "a", "b")}, "duplicates"),
    ({"classes": ("a", "", "b")}, "non-empty strings"),
    ({"arch": "vgg"}, "arch"),
    ({"in_channels": 0}, "in_channels"),
    ({"image_size": 1.5}, "image_size"),
    ({"std": (0.2, 0.0, 0.2)}, "std"),
    ({"mean": (0.1,)}, "mean has 1"),
    ({"temperature": 0.0}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"output_kind": "probs"}, "output_kind"),
    ({"cost_matrix_sha256": "xyz"}, "SHA-256"),
    ({"metrics": {"wer": float("inf")}}, "plain JSON"),
    ({"hyperparameters": {"device": torch.device("cpu")}}, "plain JSON"),
    ({"created_at": "yesterday"}, "ISO 8601"),
])
def test_invalid_metadata_is_refused(changes: dict[str, Any], message: str) -> None:
    with pytest.raises(CheckpointError, match=message):
        make_metadata(**changes)


def test_load_validates_metadata_and_version(tmp_path: Path) -> None:
    directory = tmp_path / "c"
    save_checkpoint(directory, model=trained_model(), metadata=make_metadata())
    path = directory / METADATA_FILE
    original = json.loads(path.read_text())

    def rewrite(**changes: Any) -> None:
        path.write_text(json.dumps({**original, **changes}))

    rewrite(format_version=2)
    with pytest.raises(CheckpointError, match="unsupported checkpoint metadata format_version 2"):
        load_checkpoint(directory)
    rewrite(classes=["a", "a", "b"])
    with pytest.raises(CheckpointError, match="duplicates"):
        load_checkpoint(directory)
    rewrite(colour="blue")
    with pytest.raises(CheckpointError, match="unknown fields"):
        read_metadata(directory)
    path.write_text(json.dumps({k: v for k, v in original.items() if k != "arch"}))
    with pytest.raises(CheckpointError, match="missing required fields"):
        read_metadata(directory)
    path.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_metadata(directory)


def test_missing_or_corrupt_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"metadata\.json is missing"):
        load_checkpoint(tmp_path)
    directory = tmp_path / "c"
    save_checkpoint(directory, model=trained_model(), metadata=make_metadata())
    (directory / WEIGHTS_FILE).write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(directory)
    (directory / WEIGHTS_FILE).unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors is missing"):
        load_checkpoint(directory)


def test_with_updated_metadata_keeps_weights(tmp_path: Path) -> None:
    sha = save_checkpoint(tmp_path / "a", model=trained_model(), metadata=make_metadata())
    copy_sha = with_updated_metadata(tmp_path / "a", tmp_path / "b", temperature=1.7,
                                     decision={"accept_threshold": 0.2})
    assert copy_sha == sha == weights_sha256(tmp_path / "b")
    updated = read_metadata(tmp_path / "b")
    assert updated.temperature == 1.7 and updated.decision == {"accept_threshold": 0.2}
    assert dataclasses.replace(updated, temperature=1.0, decision={}) == read_metadata(tmp_path / "a")
    with pytest.raises(CheckpointError, match="temperature"):
        with_updated_metadata(tmp_path / "a", tmp_path / "bad", temperature=-1.0)
    assert not (tmp_path / "bad").exists()
    with_updated_metadata(tmp_path / "b", tmp_path / "b", temperature=2.0)  # in place is allowed
    assert read_metadata(tmp_path / "b").temperature == 2.0


def test_validation_outputs_travel_with_the_checkpoint_and_are_checked(tmp_path: Path) -> None:
    import numpy as np

    save_checkpoint(tmp_path / "a", model=trained_model(), metadata=make_metadata())
    assert read_validation_outputs(tmp_path / "a") is None  # optional
    probs = np.random.default_rng(0).dirichlet(np.ones(3), size=5)
    labels = np.array([0, 1, 2, 2, 1])
    data = encode_validation_outputs(probs.astype(np.float32), labels)
    digest = hashlib.sha256(data).hexdigest()
    with_updated_metadata(tmp_path / "a", tmp_path / "b", validation=data, decision={"validation_sha256": digest})
    read_probs, read_labels = read_validation_outputs(tmp_path / "b", expected_sha256=digest)  # type: ignore[misc]
    assert read_probs.dtype == np.float64 and np.array_equal(read_probs, probs.astype(np.float32).astype(np.float64))
    assert read_labels.tolist() == labels.tolist()
    # Carried over by a metadata update that leaves them valid, in place or to a new directory...
    with_updated_metadata(tmp_path / "b", tmp_path / "c", metrics={"note": 1})
    assert (tmp_path / "c" / VALIDATION_FILE).read_bytes() == data
    with_updated_metadata(tmp_path / "c", tmp_path / "c", method="baseline")
    assert (tmp_path / "c" / VALIDATION_FILE).read_bytes() == data
    # ...and dropped by one that makes them stale: other calibrated probabilities, another policy.
    with_updated_metadata(tmp_path / "b", tmp_path / "t", temperature=1.5)
    with_updated_metadata(tmp_path / "b", tmp_path / "d", decision={})
    assert not (tmp_path / "t" / VALIDATION_FILE).exists() and not (tmp_path / "d" / VALIDATION_FILE).exists()
    # Writing the file records its hash, whether or not the decision changes too.
    with_updated_metadata(tmp_path / "a", tmp_path / "e", validation=data)
    assert read_metadata(tmp_path / "e").decision == {"validation_sha256": digest}
    with pytest.raises(CheckpointError, match="SHA-256"):
        read_validation_outputs(tmp_path / "b", expected_sha256="00" * 32)
    assert read_validation_outputs(tmp_path / "b", num_classes=3) is not None
    for wrong in (2, 4):  # a column per class, and labels among them
        with pytest.raises(CheckpointError, match=f"{wrong} classes"):
            read_validation_outputs(tmp_path / "b", num_classes=wrong)
    (tmp_path / "c" / VALIDATION_FILE).write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="corrupt"):
        read_validation_outputs(tmp_path / "c")
    with pytest.raises(ValueError, match="N labels"):
        encode_validation_outputs(probs, labels[:4])


def test_the_familiarity_file_travels_with_its_weights_and_names_them(tmp_path: Path) -> None:
    from models.ood import collect_features, fit_familiarity

    model = trained_model()
    sha = save_checkpoint(tmp_path / "a", model=model, metadata=make_metadata())
    assert read_familiarity(tmp_path / "a", weights_sha256=sha) is None  # optional
    loader = [(torch.rand(12, 3, 16, 16), torch.arange(12) % 3)]
    train = collect_features(model, loader, device="cpu")
    data = fit_familiarity(train, train[0], num_classes=3, weights_sha256=sha).to_bytes()
    with_updated_metadata(tmp_path / "a", tmp_path / "b", familiarity=data)
    # Carried over by every metadata change, a new temperature and policy included: it reads the weights only.
    with_updated_metadata(tmp_path / "b", tmp_path / "c", temperature=1.5, decision={})
    assert (tmp_path / "c" / FAMILIARITY_FILE).read_bytes() == data
    assert read_familiarity(tmp_path / "c", weights_sha256=sha) is not None
    with pytest.raises(CheckpointError, match="other weights"):
        read_familiarity(tmp_path / "c", weights_sha256="0" * 64)
    (tmp_path / "c" / FAMILIARITY_FILE).write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="corrupt"):
        read_familiarity(tmp_path / "c", weights_sha256=sha)


def test_load_to_device_argument(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "c", model=trained_model(), metadata=make_metadata())
    loaded = load_checkpoint(tmp_path / "c", device=torch.device("cpu"))
    assert next(loaded.model.parameters()).device.type == "cpu"
