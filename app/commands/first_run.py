"""The first run of `rxverify up`: the synthetic demo dataset and a baseline model, built once, then reused.

On a database without any model version: render the synthetic pill dataset (models.synth, default
SynthConfig, the code behind `rxverify data synth`) under `data_dir/first-run/synth`, register it as the
dataset `demo` (the `rxverify data import-pmi` service), train a baseline on it (`run_training`, the code
behind `rxverify train`), score it, fit its verdict policy on validation (as a training job does), and
register and activate it. Each step is safe to interrupt: an interrupted rendering resumes (same
parameters) or starts over (other parameters), the dataset is registered in one transaction, and a
model is registered only after its training, evaluation and policy have all finished.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select

from app.config import Settings
from app.db import Database
from app.orm import Dataset, ModelVersion
from app.services.audit import Actor

DEMO_DATASET = "demo"
DEMO_SEED = 0
# Adam with a cosine schedule; the sizes (photos, model, epochs) are settings (see README, "The two commands").
DEMO_BATCH_SIZE = 64
DEMO_LR = 1e-3

ACTOR = Actor.cli("up (first run)")


class FirstRunError(RuntimeError):
    """The first-run build cannot go on; the message says what to do."""


@dataclass(frozen=True, slots=True)
class DemoDataset:
    """The registered demo dataset: where its images are and its row."""

    id: int
    path: Path
    fingerprint: str | None


def say(message: str) -> None:
    """A line for the person at the terminal (progress bars go to stderr; this goes to stdout)."""
    print(message, flush=True)


@contextmanager
def quiet_models_log() -> Iterator[None]:
    """Keep models/'s per-epoch INFO lines off the terminal while the progress bar reports the same."""
    logger = logging.getLogger("models")
    previous = logger.level
    logger.setLevel(max(previous, logging.WARNING))
    try:
        yield
    finally:
        logger.setLevel(previous)


def ensure_model(settings: Settings, database: Database) -> int | None:
    """The active model version's id; on a database with no model at all, build the demo model first."""
    from app.services.model_registry import active_model_version

    with database.session() as session:
        active = active_model_version(session)
        if active is not None:
            say(f"model version {active.id} ({active.arch}, {active.method}) is active; reusing it")
            return active.id
        registered = session.scalar(select(func.count()).select_from(ModelVersion))
    if registered:
        say(f"warning: {registered} model version(s) are registered but none is active; verifications answer "
            "503 until one is promoted (POST /v1/admin/models/{id}/promote)")
        return None
    say("first run: no model is registered yet, so a demo dataset and a baseline model are made now")
    work = settings.data_dir / "first-run"
    with quiet_models_log():
        dataset = ensure_dataset(settings, database, work=work)
        version_id = build_model(settings, database, dataset=dataset, work=work)
    shutil.rmtree(work, ignore_errors=True)
    return version_id


def ensure_dataset(settings: Settings, database: Database, *, work: Path) -> DemoDataset:
    """The registered `demo` dataset, rendered and registered first when it does not exist."""
    from app.errors import DomainError
    from app.services.datasets import import_pmi
    from app.services.products import catalog_keys

    with database.session() as session:
        row = session.scalar(select(Dataset).where(Dataset.name == DEMO_DATASET))
        if row is not None:
            if not Path(row.path).is_dir():
                raise FirstRunError(f"dataset {DEMO_DATASET!r} is registered but its folder {row.path} is gone; "
                                    f"remove {settings.data_dir} to start over")
            say(f"dataset {DEMO_DATASET!r} is registered at {row.path}; reusing it")
            return DemoDataset(row.id, Path(row.path), row.fingerprint)
    source = render_dataset(settings, work / "synth")
    try:
        with database.session() as session:
            dataset, scan = import_pmi(session, source=source, name=DEMO_DATASET, datasets_dir=settings.datasets_dir,
                                       catalog=catalog_keys(session), actor=ACTOR)
            registered = DemoDataset(dataset.id, Path(dataset.path), dataset.fingerprint)
    except DomainError as error:
        raise FirstRunError(f"the synthetic dataset could not be registered: {error.detail}") from error
    say(f"dataset {DEMO_DATASET!r} registered at {registered.path}: "
        + ", ".join(f"{split} {sum(per_class.values())}" for split, per_class in scan.counts.items()) + " images")
    shutil.rmtree(source, ignore_errors=True)  # the registered copy holds the images (hard links)
    return registered


def render_dataset(settings: Settings, out: Path) -> Path:
    """Render the synthetic dataset into `out`: resume an interrupted rendering, or start over if it differs."""
    from models.commands.synth import progress_printer
    from models.synth import generate_synthetic_pills

    def render() -> Any:
        return generate_synthetic_pills(out, per_class=settings.demo_per_class, image_size=settings.demo_photo_size,
                                        seed=DEMO_SEED, workers=max(1, os.cpu_count() or 1),
                                        progress=progress_printer())

    if (out / "manifest.json").exists():
        say(f"resuming the synthetic dataset an interrupted run left in {out}")
    try:
        result = render()
    except ValueError as error:  # made with other settings, or not a synthetic dataset at all
        say(f"discarding {out} ({error}) and rendering it again")
        shutil.rmtree(out)
        result = render()
    say(f"synthetic dataset: {result.generated} photos rendered ({result.skipped} kept from an interrupted run) "
        f"in {result.elapsed_s:.0f}s")
    return out


def build_model(settings: Settings, database: Database, *, dataset: DemoDataset, work: Path) -> int:
    """Train the baseline, score it, fit its verdict policy, then register and activate it (one transaction)."""
    from app.services import evaluation
    from app.services.cost_matrices import active_version_id, cost_matrix_of
    from app.services.model_registry import register_and_activate
    from models.commands.train import TrainRequest, progress_printer, run_training
    from models.engine import TrainConfig
    from worker.registration import code_version, finalise_checkpoint

    request = TrainRequest(
        data=dataset.path, out=work / "train", arch=settings.demo_arch, image_size=settings.demo_image_size,
        config=TrainConfig(epochs=settings.demo_epochs, batch_size=DEMO_BATCH_SIZE, lr=DEMO_LR, scheduler="cosine",
                           seed=DEMO_SEED),
        device=settings.device, threads=settings.torch_threads, overwrite=True)
    say(f"training the demo baseline: {settings.demo_arch} at {settings.demo_image_size} px, "
        f"{settings.demo_epochs} epochs")
    outcome = run_training(request, progress=progress_printer())
    if outcome.checkpoint is None or outcome.metadata is None:
        raise FirstRunError("training stopped before the end; nothing was registered")
    with database.session() as session:
        cost_matrix_id = active_version_id(session)
        if cost_matrix_id is None:
            raise FirstRunError("no cost-matrix version is active (run `rxverify catalog seed-pmi`)")
        costs = cost_matrix_of(session, cost_matrix_id, classes=outcome.metadata.classes)
    say("scoring it on the validation and test splits and fitting its verdict thresholds on validation")
    candidate, _decision, familiarity = finalise_checkpoint(outcome.checkpoint, work / "model", data_root=dataset.path,
                                               cost_matrix=costs, settings=settings, seed=DEMO_SEED)
    reports = {split: result.report for split, result in candidate.items()}
    with database.session() as session:
        version = register_and_activate(session, source=work / "model", settings=settings, actor=ACTOR,
                                        reason="first run: the demo baseline on the synthetic dataset")
        version.dataset_id, version.cost_matrix_version_id = dataset.id, cost_matrix_id
        version.code_version = code_version()
        version.metrics = {
            **reports, "comparison": evaluation.comparison(candidate=reports, parent=None, cost_matrix=costs),
            "evaluation": {"dataset_id": dataset.id, "dataset": DEMO_DATASET, "dataset_fingerprint": dataset.fingerprint,
                           "cost_matrix_version_id": cost_matrix_id, "splits": list(reports)},
            "train": outcome.metadata.metrics.get("train", {}), "temperature": outcome.metadata.temperature,
            "familiarity": familiarity}
        version_id = version.id
    test = reports["test"]
    say(f"model version {version_id} registered and active: test accuracy {100 * test['accuracy']:.1f}% "
        f"({test['n']} photos), validation accuracy {100 * reports['valid']['accuracy']:.1f}%")
    return version_id
