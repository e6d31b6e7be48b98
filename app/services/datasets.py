"""Datasets: PMI-layout image folders checked against the catalog and registered for training jobs.

`import_pmi` scans `PATH/{train,valid,test}/<NDC>/*`, refuses class folders that are not catalog products,
skips (and reports) files that are not usable images (each is decoded whole, so a cut-off JPEG is found
here, not by a training job), and copies the usable ones under `data_dir/datasets/<name>`. Training
reads that copy, so the registered dataset cannot change under a job and its fingerprint stays true.
Copies, not hard links: a link shares the source's file, and a source photo rewritten in place (an
editor's "save") changed the registered dataset under its fingerprint.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import Conflict, FieldError, InvalidInput, NotFound
from app.orm import Dataset
from app.services.audit import Actor, record_change

SPLITS = ("train", "valid", "test")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


@dataclass(frozen=True, slots=True)
class SkippedFile:
    """A file left out of the dataset, and why."""

    path: str
    reason: str


@dataclass
class DatasetScan:
    """What a PMI-layout folder holds: usable images per split and class, skipped files, and blocking problems."""

    root: Path
    files: dict[str, dict[str, list[Path]]] = field(default_factory=dict)
    skipped: list[SkippedFile] = field(default_factory=list)
    errors: list[FieldError] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, dict[str, int]]:
        """Images per split and class."""
        return {split: {ndc: len(paths) for ndc, paths in sorted(classes.items())}
                for split, classes in self.files.items()}

    @property
    def classes(self) -> list[str]:
        """The class folders (product NDCs) found in the train split."""
        return sorted(self.files.get("train", {}))

    def total(self, split: str | None = None) -> int:
        """Usable images in one split, or in all of them."""
        splits = [split] if split else list(self.files)
        return sum(len(paths) for s in splits for paths in self.files.get(s, {}).values())


def _check_image(path: Path) -> str | None:
    """None when the file is a whole, readable JPEG/PNG/WebP image; otherwise the reason to skip it.

    Decoded to the end (a JPEG at 1/8 scale, which still reads every byte of it): a file cut off in
    transfer has a valid header, and failed the training job that read it instead of being skipped here.
    """
    try:
        with Image.open(path) as image:
            if image.format not in ACCEPTED_FORMATS:
                return f"image format {image.format} is not one of {', '.join(ACCEPTED_FORMATS)}"
            if image.width < 1 or image.height < 1:
                return "image has no pixels"
            image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.load()
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        return f"not a readable image ({type(error).__name__}: {error})"
    return None


def scan_pmi_folder(root: str | Path, *, catalog: Iterable[str]) -> DatasetScan:
    """Scan `root/{train,valid,test}/<NDC>/*` against the catalog's product keys (reads image headers only)."""
    root = Path(root).expanduser().resolve()
    known = set(catalog)
    scan = DatasetScan(root=root)
    if not root.is_dir():
        scan.errors.append(FieldError("path", f"{root} is not a directory", "not_found"))
        return scan
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            scan.errors.append(FieldError(f"{split}/", f"the {split} folder is missing "
                                          "(expected PATH/{train,valid,test}/<NDC>/*.jpg)", "missing_split"))
            continue
        classes: dict[str, list[Path]] = {}
        for entry in sorted(split_dir.iterdir()):
            rel = entry.relative_to(root).as_posix()
            if entry.name.startswith("."):
                scan.skipped.append(SkippedFile(rel, "hidden file or folder"))
            elif not entry.is_dir():
                scan.skipped.append(SkippedFile(rel, "file outside a class folder"))
            elif entry.name not in known:
                scan.errors.append(FieldError(rel, f"class folder {entry.name!r} is not a product NDC in the "
                                              "catalog (folders are named by product key, e.g. 00378-0208)",
                                              "unknown_ndc"))
            else:
                classes[entry.name] = _scan_class(entry, root=root, skipped=scan.skipped)
        scan.files[split] = classes
    _check_consistency(scan)
    return scan


def _scan_class(folder: Path, *, root: Path, skipped: list[SkippedFile]) -> list[Path]:
    usable: list[Path] = []
    for path in sorted(folder.iterdir()):
        rel = path.relative_to(root).as_posix()
        if path.name.startswith("."):
            skipped.append(SkippedFile(rel, "hidden file or folder"))
        elif path.is_dir():
            skipped.append(SkippedFile(rel, "folder nested inside a class folder"))
        elif path.suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append(SkippedFile(rel, f"extension {path.suffix or '(none)'!r} is not one of "
                                            f"{', '.join(IMAGE_SUFFIXES)}"))
        elif (reason := _check_image(path)) is not None:
            skipped.append(SkippedFile(rel, reason))
        else:
            usable.append(path)
    return usable


def _check_consistency(scan: DatasetScan) -> None:
    present = {split: {c for c, files in classes.items() if files} for split, classes in scan.files.items()}
    if len(present) < len(SPLITS):
        return
    every = set().union(*present.values())
    if not every:
        scan.errors.append(FieldError("train/", "no usable images were found", "empty"))
        return
    for split in SPLITS:
        missing = sorted(every - present[split])
        if missing:
            scan.errors.append(FieldError(f"{split}/", f"no usable images for {', '.join(missing)} "
                                          "(every class needs images in train, valid and test)", "missing_class"))


def check_name(name: str) -> None:
    """422 unless `name` is a short slug usable as a folder name."""
    if not NAME_PATTERN.match(name):
        raise InvalidInput(f"dataset name {name!r} must be 1-100 letters, digits, '.', '_' or '-' and start "
                           "with a letter or digit", errors=[FieldError("name", "invalid dataset name", "invalid")])


def import_pmi(session: Session, *, source: str | Path, name: str, datasets_dir: Path, catalog: Iterable[str],
               actor: Actor) -> tuple[Dataset, DatasetScan]:
    """Check, materialise under datasets_dir/name and register a PMI-layout folder (409 when the name is taken)."""
    from models.data import dataset_fingerprint

    check_name(name)
    if session.scalar(select(Dataset.id).where(Dataset.name == name)) is not None:
        raise Conflict(f"a dataset named {name!r} is already registered; choose another name",
                       slug="dataset-exists", extra={"name": name})
    scan = scan_pmi_folder(source, catalog=catalog)
    if scan.errors:
        raise InvalidInput(f"{scan.root} cannot be imported: " + "; ".join(e.message for e in scan.errors[:3]),
                           slug="invalid-dataset", errors=scan.errors)
    target = (datasets_dir / name).resolve()
    _materialise(scan, target)
    dataset = Dataset(name=name, path=str(target), source="pmi", fingerprint=dataset_fingerprint(target),
                      counts=scan.counts, created_by=actor.name)
    session.add(dataset)
    session.flush()
    record_change(session, actor=actor, action="dataset.import", entity_type="dataset", entity_id=dataset.id,
                  details={"name": name, "source": str(scan.root), "path": str(target),
                           "fingerprint": dataset.fingerprint, "images": scan.total(),
                           "skipped": len(scan.skipped)})
    return dataset, scan


def _materialise(scan: DatasetScan, target: Path) -> None:
    """Hard-link (or copy) the usable images into a staging folder, then rename it to `target`."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        for split, classes in scan.files.items():
            for ndc, paths in classes.items():
                folder = staging / split / ndc
                folder.mkdir(parents=True, exist_ok=True)
                for path in paths:
                    shutil.copyfile(path, folder / path.name)
        if target.exists():
            # A folder without a registered row is debris of an import that rolled back.
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def link_or_copy(source: Path, destination: Path) -> None:
    """A hard link when source and destination share a filesystem, a copy otherwise."""
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def get_dataset(session: Session, name: str) -> Dataset:
    """A registered dataset by name (404 otherwise)."""
    dataset = session.scalar(select(Dataset).where(Dataset.name == name))
    if dataset is None:
        raise NotFound(f"no dataset named {name!r} is registered (rxverify data import-pmi PATH --name NAME)",
                       slug="dataset-not-found")
    return dataset


def list_datasets(session: Session) -> list[Dataset]:
    """Every registered dataset, oldest first."""
    return list(session.scalars(select(Dataset).order_by(Dataset.id)))


def split_size(dataset: Dataset, split: str) -> int:
    """Images in one split of a registered dataset."""
    return sum(int(n) for n in (dataset.counts or {}).get(split, {}).values())
