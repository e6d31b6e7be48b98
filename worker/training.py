"""Running one training job: its inputs from the database, data (plus feedback), hooks, checkpoints, resume.

The job's files live under `data_dir/jobs/<id>/`: `state.pt` (the epoch checkpoint: model, optimiser,
scheduler, grad scaler, every RNG and the sampler position, written to a temp file and renamed),
`costs.csv` (the job's cost matrix), `data/` (the dataset plus feedback images, as links) and `out/`
(the checkpoint `run_training` writes). A later attempt (after SIGKILL, a lost lease or the soft time
limit) loads `state.pt` and continues with the next epoch, through the same `run_training` as
`rxverify train`.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from app.config import Settings
from app.db import Database
from app.orm import Dataset, ModelVersion, Resolution, TrainingJob, Verification, json_time, utcnow
from app.services.cost_matrices import cost_matrix_of
from app.services.datasets import link_or_copy
from app.services.model_registry import checkpoint_path
from models.commands.progress import Eta
from models.commands.train import TrainOutcome, TrainRequest
from models.engine import ProgressEvent, TrainConfig, TrainingState
from models.files import atomic_write, temp_prefix
from worker import leases
from worker import metrics as worker_metrics
from worker.leases import Heartbeat, Lease

logger = logging.getLogger(__name__)

PROGRESS_EVERY_S = 1.0
CANCEL_POLL_S = 0.5
_TRAIN_KEYS = ("epochs", "batch_size", "lr", "optimizer", "weight_decay", "scheduler", "freeze_bn")
_METHOD_KEYS = {"csada": ("lam", "eps", "steps", "step_size", "tau", "norm", "sign"), "ap": ("alpha",)}


@dataclass(frozen=True)
class FeedbackImage:
    """A retained verification photo labelled by a pharmacist's resolution."""

    path: Path
    ndc: str
    verification_id: str


@dataclass(frozen=True)
class JobSpec:
    """Everything a job needs, read from the database once (plain values: no session outlives the read)."""

    job_id: int
    method: str
    seed: int
    hyperparameters: dict[str, Any]
    base_model_id: int
    base_path: Path
    base_sha256: str
    classes: tuple[str, ...]
    dataset_id: int
    dataset_name: str
    dataset_path: Path
    dataset_fingerprint: str | None
    cost_matrix_version_id: int
    cost_csv: str
    auto_promote: bool
    resume_path: Path | None
    feedback: tuple[FeedbackImage, ...] = ()
    # What of the stored progress must outlive an attempt (leases.OUTLIVES_AN_ATTEMPT), read with the rest.
    carried_progress: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Workdir:
    """The job's folder under data_dir/jobs."""

    root: Path

    @staticmethod
    def jobs_dir(settings: Settings) -> Path:
        """`data_dir/jobs`, where every job's folder is."""
        return settings.data_dir / "jobs"

    @classmethod
    def of(cls, settings: Settings, job_id: int) -> Workdir:
        """`data_dir/jobs/<job_id>`, created."""
        root = cls.jobs_dir(settings) / str(job_id)
        root.mkdir(parents=True, exist_ok=True)
        return cls(root)

    state = property(lambda self: self.root / "state.pt", doc="The epoch checkpoint.")
    out = property(lambda self: self.root / "out", doc="run_training's checkpoint.")
    final = property(lambda self: self.root / "final", doc="The checkpoint with its verdict policy.")
    data = property(lambda self: self.root / "data", doc="Dataset plus feedback images (links).")
    costs = property(lambda self: self.root / "costs.csv", doc="The job's cost matrix.")

    @property
    def disposable(self) -> tuple[Path, ...]:
        """What is dead weight once the job has ended (none is resumed after that); costs.csv stays. That
        includes the temp files of epoch checkpoints whose writer was killed mid-write (`save_state`)."""
        return (self.state, *sorted(self.root.glob(temp_prefix(self.state) + "*")), self.out, self.final, self.data)


def _feedback(session: Any, *, through_id: int, classes: tuple[str, ...]) -> tuple[FeedbackImage, ...]:
    """Retained images whose newest resolution up to `through_id` names one of the model's classes."""
    newest = (select(Resolution.verification_id, func.max(Resolution.id).label("rid"))
              .where(Resolution.id <= through_id).group_by(Resolution.verification_id).subquery())
    rows = session.execute(select(Verification.id, Verification.image_path, Resolution.actual_ndc)
                           .join(newest, newest.c.verification_id == Verification.id)
                           .join(Resolution, Resolution.id == newest.c.rid)
                           .where(Verification.image_path.is_not(None), Resolution.actual_ndc.in_(classes))
                           .order_by(Resolution.id))
    return tuple(FeedbackImage(Path(path), ndc, vid) for vid, path, ndc in rows)


def load_spec(database: Database, settings: Settings, job_id: int) -> JobSpec:
    """Read the job, its base model, dataset, cost matrix and feedback into a JobSpec."""
    with database.session() as session:
        job = session.get(TrainingJob, job_id)
        if job is None:
            raise LookupError(f"training job {job_id} does not exist")
        base = session.get(ModelVersion, job.base_model_version_id)
        dataset = session.get(Dataset, job.dataset_id)
        if base is None or dataset is None or job.cost_matrix_version_id is None:
            raise LookupError(f"training job {job_id} lacks its base model, dataset or cost matrix")
        classes = tuple(base.classes)
        costs = cost_matrix_of(session, job.cost_matrix_version_id, classes=classes)
        feedback = (_feedback(session, through_id=job.feedback_through_id or 0, classes=classes)
                    if job.include_feedback else ())
        return JobSpec(job_id=job.id, method=job.method, seed=job.seed, hyperparameters=dict(job.hyperparameters),
                       base_model_id=base.id, base_path=checkpoint_path(settings, base), base_sha256=base.sha256,
                       classes=classes, dataset_id=dataset.id, dataset_name=dataset.name,
                       dataset_path=Path(dataset.path), dataset_fingerprint=dataset.fingerprint,
                       cost_matrix_version_id=job.cost_matrix_version_id,
                       cost_csv=costs.to_csv(header=("true_ndc", "predicted_ndc", "cost")),
                       auto_promote=job.auto_promote,
                       resume_path=Path(job.resume_path) if job.resume_path else None, feedback=feedback,
                       carried_progress={key: value for key, value in (job.progress or {}).items()
                                         if key in leases.OUTLIVES_AN_ATTEMPT})


def prepare_data(spec: JobSpec, workdir: Workdir) -> Path:
    """The folder to train on: the registered dataset, or a linked copy with feedback added to train."""
    if not spec.feedback:
        return spec.dataset_path
    root = workdir.data
    if root.exists():
        shutil.rmtree(root)
    for split in ("valid", "test"):
        (root / split).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(spec.dataset_path / split, root / split, target_is_directory=True)
    for folder in sorted((spec.dataset_path / "train").iterdir()):
        if folder.is_dir():
            (root / "train" / folder.name).mkdir(parents=True, exist_ok=True)
            for image in sorted(folder.iterdir()):
                os.symlink(image, root / "train" / folder.name / image.name)
    added = 0
    for item in spec.feedback:
        if item.path.is_file():
            link_or_copy(item.path, root / "train" / item.ndc / f"feedback-{item.verification_id}{item.path.suffix}")
            added += 1
    logger.info("training job %s: %d feedback images added to the train split", spec.job_id, added)
    return root


def train_request(spec: JobSpec, *, data_root: Path, workdir: Workdir, settings: Settings) -> TrainRequest:
    """The TrainRequest a job runs (the same as `rxverify train --base ... --method ...`)."""
    hp = spec.hyperparameters
    config = TrainConfig(seed=spec.seed, **{key: hp[key] for key in _TRAIN_KEYS if key in hp})
    options = {key: hp[key] for key in _METHOD_KEYS.get(spec.method, ()) if key in hp}
    workdir.costs.write_text(spec.cost_csv)
    return TrainRequest(data=data_root, out=workdir.out, config=config, method=spec.method, method_options=options,
                        base=spec.base_path, cost_matrix=workdir.costs, device=settings.device,
                        threads=settings.torch_threads, overwrite=True)


def save_state(path: Path, state: TrainingState) -> None:
    """Write the epoch checkpoint atomically (`models.files.atomic_write`: its temp name is unique per write,
    as two attempts of one job can overlap for a moment, one fenced off by a lost lease while still writing)."""
    import torch

    with atomic_write(path) as handle:
        torch.save(state, handle)


def load_state(path: Path | None) -> TrainingState | None:
    """The saved epoch checkpoint, or None (no file, or one that cannot be read)."""
    import torch

    if path is None or not path.is_file():
        return None
    try:
        state: TrainingState = torch.load(path, map_location="cpu", weights_only=True)
        return state
    except Exception:
        logger.exception("checkpoint %s is unreadable; starting the job from its base model", path)
        return None


class EpochValidator:
    """Scores the epoch's weights on the validation split (the per-epoch 'latest validation metrics')."""

    def __init__(self, spec: JobSpec, *, data_root: Path, settings: Settings, cost_csv: Path) -> None:
        self.spec, self.data_root, self.settings, self.cost_csv = spec, data_root, settings, cost_csv
        self._ready: tuple[Any, Any, Any, Any] | None = None

    def _prepare(self) -> tuple[Any, Any, Any, Any]:
        from torch.utils.data import DataLoader

        from models.checkpoint import load_checkpoint
        from models.costs import CostMatrix
        from models.data import ImageFileDataset, load_image_folder
        from models.runtime import select_device
        from models.transforms import EvalPreset

        device = select_device(self.settings.device)
        base = load_checkpoint(self.spec.base_path, device=device)
        data = load_image_folder(self.data_root, image_size=base.metadata.image_size, augment=False,
                                 classes=base.metadata.classes)
        assert isinstance(data.valid, ImageFileDataset)
        loader = DataLoader(data.valid.with_transform(EvalPreset.from_metadata(base.metadata)), batch_size=64)
        costs = CostMatrix.read_csv(self.cost_csv, base.metadata.classes)
        return base.model, loader, costs, device

    def __call__(self, state: TrainingState) -> dict[str, Any] | None:
        """accuracy / wer / total_cost of the state's weights on valid (None when valid is empty)."""
        import random

        import numpy as np
        import torch

        # Building the model draws from torch's RNG: fork it, or training would no longer match
        # `rxverify train` (nor its own resumed run) bit for bit.
        python_state, numpy_state = random.getstate(), np.random.get_state()
        devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        try:
            with torch.random.fork_rng(devices=devices):
                return self._score(state)
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)

    def _score(self, state: TrainingState) -> dict[str, Any] | None:
        from models.evaluate import evaluate

        if self._ready is None:
            self._ready = self._prepare()
        model, loader, costs, device = self._ready
        if len(loader.dataset) == 0:
            return None
        model.load_state_dict(state["model"])
        kind = "costs" if self.spec.method == "sosr" else "logits"
        report = evaluate(model, loader, cost_matrix=costs, device=device, output_kind=kind).report
        return {"epoch": int(state["epoch"]), "n": report["n"], "accuracy": report["accuracy"],
                "wer": report["wer"], "total_cost": report["total_cost"]}


# Set when this worker process begins to shut down (Celery's worker_shutting_down: SIGTERM from a supervisor
# or `docker stop`, Ctrl-C): every attempt in the process stops at its next step and hands its job back.
WORKER_SHUTTING_DOWN = threading.Event()


@dataclass
class Hooks:
    """run_training's callbacks for one attempt: progress to the DB, cooperative stop, epoch checkpoints."""

    database: Database
    lease: Lease
    heartbeat: Heartbeat
    workdir: Workdir
    deadline: float
    validator: Callable[[TrainingState], dict[str, Any] | None]
    start_epoch: int = 0
    stop_reason: str | None = None
    progress: dict[str, Any] = field(default_factory=dict)
    _unwritten: dict[str, Any] = field(default_factory=dict)  # columns whose write failed, sent with the next
    _last_write: float = -math.inf
    _last_poll: float = -math.inf
    _eta: Eta = field(default_factory=Eta)  # from the attempt's first step: start-up and resume excluded

    def write(self, **values: Any) -> None:
        """Store progress (and other columns) while the lease is ours; a lost lease stops the attempt.

        A database error (busy, briefly unreachable) does not: training goes on, and the next write
        carries these columns too (the epoch checkpoint's `resume_path` must reach the row eventually).
        """
        self.progress["updated_at"] = json_time(utcnow())
        self._unwritten.update(values)
        try:
            leases.write(self.database, self.lease, progress=dict(self.progress), **self._unwritten)
        except leases.LeaseLost:
            self.heartbeat.lost.set()
        except SQLAlchemyError as error:
            logger.warning("training job %s: progress not recorded this time (%s); training goes on",
                           self.lease.job_id, type(error).__name__)
            return
        self._unwritten.clear()

    def on_progress(self, event: ProgressEvent) -> None:
        """Epoch/step of the total, loss, attack success rate and ETA; written at most every second."""
        total = event.epochs * event.steps_per_epoch
        done = event.epoch * event.steps_per_epoch + event.step
        eta = self._eta(elapsed_s=event.elapsed_s, done=done, total=total)  # None until a second step
        self.progress.update(phase="training", epoch=event.epoch + 1, epochs=event.epochs, step=event.step,
                             steps_per_epoch=event.steps_per_epoch, fraction=done / total if total else 1.0,
                             loss=event.loss if math.isfinite(event.loss) else None,
                             attack_success_rate=event.attack_success_rate, elapsed_s=round(event.elapsed_s, 3),
                             eta_s=round(eta, 1) if eta is not None else None)
        worker_metrics.record_step(self.lease.job_id, fraction=self.progress["fraction"], loss=event.loss,
                                   attack_success_rate=event.attack_success_rate, eta_s=eta)
        now = time.monotonic()
        if now - self._last_write >= PROGRESS_EVERY_S or event.step == event.steps_per_epoch:
            self._last_write = now
            self.write()

    def should_stop(self) -> bool:
        """True once the job is cancelled, its lease lost, the soft time limit reached, or the worker stopping."""
        if self.stop_reason is None:
            now = time.monotonic()
            if self.heartbeat.lost.is_set():
                self.stop_reason = "lease-lost"
            elif WORKER_SHUTTING_DOWN.is_set():
                self.stop_reason = "worker-shutdown"
            elif now >= self.deadline:
                self.stop_reason = "time-limit"
            elif now - self._last_poll >= CANCEL_POLL_S:
                self._last_poll = now
                try:
                    if leases.cancel_requested(self.database, self.lease.job_id):
                        self.stop_reason = "cancelled"
                except SQLAlchemyError as error:  # asked again at the next poll
                    logger.warning("training job %s: cancel poll failed (%s)", self.lease.job_id,
                                   type(error).__name__)
        return self.stop_reason is not None

    def on_epoch_end(self, state: TrainingState) -> None:
        """Checkpoint the epoch (atomic rename), then record it and the epoch's validation metrics."""
        if self.heartbeat.lost.is_set():
            return  # another attempt owns the job and its files now
        save_state(self.workdir.state, state)
        try:
            validation = self.validator(state)
        except Exception:  # the metrics are informative; never fail training over them
            logger.exception("per-epoch validation of job %s failed", self.lease.job_id)
            validation = None
        if validation is not None:
            self.progress["validation"] = validation
        self.progress["checkpoint_epoch"] = int(state["epoch"])
        self._last_write = time.monotonic()
        self.write(resume_path=str(self.workdir.state))


def run(*, database: Database, settings: Settings, spec: JobSpec, lease: Lease, heartbeat: Heartbeat,
        deadline: float) -> tuple[TrainOutcome, Hooks, Path, Workdir]:
    """Train one attempt (resuming from the job's epoch checkpoint if there is one)."""
    from models.commands.train import run_training

    workdir = Workdir.of(settings, spec.job_id)
    # The database says whether an epoch checkpoint exists; a stray file from elsewhere is never resumed.
    resume = load_state(spec.resume_path)
    if resume is None and workdir.state.exists():
        workdir.state.unlink()
    data_root = prepare_data(spec, workdir)
    request = train_request(spec, data_root=data_root, workdir=workdir, settings=settings)
    start_epoch = int(resume["epoch"]) if resume is not None else 0
    hooks = Hooks(database=database, lease=lease, heartbeat=heartbeat, workdir=workdir, deadline=deadline,
                  validator=EpochValidator(spec, data_root=data_root, settings=settings, cost_csv=workdir.costs),
                  start_epoch=start_epoch)
    # The stored progress is replaced by this attempt's: keep what must outlive an attempt, the epoch
    # checkpoint it resumes from and the reaper's count of lost workers (else a job that kills its worker
    # mid-epoch would count its first loss every time, and be requeued for ever).
    hooks.progress.update(spec.carried_progress)
    if resume is None:
        hooks.progress.pop("checkpoint_epoch", None)
    hooks.progress.update(phase="preparing", resumed_from_epoch=start_epoch if resume is not None else None,
                          validation=None)
    hooks.write()
    if resume is not None:
        logger.info("training job %s resumes after epoch %d from %s", spec.job_id, start_epoch, workdir.state)
    outcome = run_training(request, progress=hooks.on_progress, should_stop=hooks.should_stop,
                           resume_state=resume, on_epoch_end=hooks.on_epoch_end)
    return outcome, hooks, data_root, workdir
