"""`rxverify train`: train or fine-tune on a PMI-layout folder, calibrate, evaluate and save a checkpoint.

`run_training(request)` is the library entry point that the worker calls; the command only parses
arguments into a `TrainRequest` and prints progress to stderr and a summary to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from models.checkpoint import CheckpointMetadata, LoadedCheckpoint
    from models.engine import FitResult, ProgressEvent, TrainConfig, TrainingState

logger = logging.getLogger(__name__)

METHODS = ("baseline", "csada", "penalty", "ap", "sosr", "reweight")
DEFAULT_ARCH = "resnet18"
DEFAULT_IMAGE_SIZE = 224
# Method hyperparameters the command exposes, by method (None means "the method's default").
_METHOD_OPTIONS = {
    "csada": ("lam", "eps", "steps", "step_size", "tau", "norm", "sign", "stochastic", "pairs_per_step",
              "attack_batch_size", "clamp_pixels"),
    "ap": ("alpha",),
}


class TrainError(ValueError):
    """The request cannot be run as given (conflicting options, data that does not fit the base)."""


@dataclass(frozen=True)
class TrainRequest:
    """Everything a training run needs; `arch`/`image_size` default to the base checkpoint's."""

    data: Path
    out: Path
    config: TrainConfig
    method: str = "baseline"
    method_options: dict[str, Any] = field(default_factory=dict)
    base: Path | None = None
    pretrained: Path | None = None
    cost_matrix: Path | None = None
    arch: str | None = None
    image_size: int | None = None
    device: str = "auto"
    num_workers: int = 0
    threads: int | None = None
    overwrite: bool = False


@dataclass(frozen=True)
class TrainOutcome:
    """The saved checkpoint (None when the run was stopped) and what training did."""

    checkpoint: Path | None
    weights_sha256: str | None
    metadata: CheckpointMetadata | None
    fit: FitResult

    @property
    def stopped(self) -> bool:
        """True when `should_stop` ended training early (no checkpoint is written then)."""
        return self.fit.stopped


def _json_safe(value: Any) -> Any:
    """Plain JSON: non-finite floats become null, tuples become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _resolve_shape(request: TrainRequest, base: LoadedCheckpoint | None) -> tuple[str, int]:
    if base is None:
        return request.arch or DEFAULT_ARCH, request.image_size or DEFAULT_IMAGE_SIZE
    meta = base.metadata
    if request.arch is not None and request.arch != meta.arch:
        raise TrainError(f"--arch {request.arch} conflicts with the base checkpoint's arch {meta.arch}")
    if request.image_size is not None and request.image_size != meta.image_size:
        raise TrainError(f"--image-size {request.image_size} conflicts with the base checkpoint's "
                         f"image size {meta.image_size}")
    if request.pretrained is not None:
        raise TrainError("--pretrained and --base are exclusive: the base checkpoint already has weights")
    return meta.arch, meta.image_size


def _load_data(request: TrainRequest, *, image_size: int, base: LoadedCheckpoint | None) -> Any:
    from models.data import ImageFileDataset, load_image_folder
    from models.transforms import EvalPreset, TrainPreset

    classes = base.metadata.classes if base is not None else None
    try:
        data = load_image_folder(request.data, image_size=image_size, augment=True, classes=classes)
    except ValueError as error:
        if base is None:
            raise
        raise TrainError(f"the dataset's classes must equal the base checkpoint's: {error}") from None
    if base is None or (tuple(data.mean), tuple(data.std)) == (base.metadata.mean, base.metadata.std):
        return data
    if data.in_channels != base.metadata.in_channels:
        raise TrainError(f"the dataset has {data.in_channels} channels, the base model {base.metadata.in_channels}")
    # Fine-tuning must feed the base model inputs normalised the way it was trained.
    mean, std = base.metadata.mean, base.metadata.std
    logger.info("normalising with the base checkpoint's mean/std %s/%s (dataset: %s/%s)", mean, std,
                data.mean, data.std)
    eval_preset = EvalPreset(image_size=image_size, mean=mean, std=std)
    train, valid, test = data.train, data.valid, data.test
    # load_image_folder's datasets are ImageFileDatasets by contract.
    assert isinstance(train, ImageFileDataset) and isinstance(valid, ImageFileDataset)
    assert isinstance(test, ImageFileDataset)
    return dataclasses.replace(
        data, train=train.with_transform(TrainPreset(image_size=image_size, mean=mean, std=std)),
        valid=valid.with_transform(eval_preset), test=test.with_transform(eval_preset), mean=mean, std=std)


def _method_options(request: TrainRequest, base: LoadedCheckpoint | None, *, mean: Sequence[float],
                    std: Sequence[float]) -> dict[str, Any]:
    from models.transforms import pixel_range

    options = dict(request.method_options)
    if options.pop("clamp_pixels", False):
        # Algorithm 1's clamp, in the normalised space the model reads: each channel's [0, 1] pixels.
        options["clamp"] = pixel_range(mean, std)
    base_kind = base.metadata.output_kind if base is not None else "logits"
    if base_kind == "costs" and request.method != "sosr":
        raise TrainError(f"the base checkpoint regresses costs (SOSR); method {request.method!r} needs logits")
    if request.method == "sosr":
        # The SOSR head starts as -logits from a cross-entropy model; an SOSR base already has it.
        options.setdefault("init_from_logits", base_kind == "logits")
    return options


def run_training(request: TrainRequest, *, progress: Callable[[ProgressEvent], None] | None = None,
                 should_stop: Callable[[], bool] | None = None, resume_state: TrainingState | None = None,
                 on_epoch_end: Callable[[TrainingState], None] | None = None) -> TrainOutcome:
    """Load data and model, train with the method, fit T on valid, evaluate valid/test, save the checkpoint."""
    from torch.utils.data import DataLoader

    from models.calibrate import fit_temperature
    from models.checkpoint import CheckpointMetadata, load_checkpoint, save_checkpoint
    from models.costs import CostMatrix
    from models.engine import create_train_loader, fit
    from models.evaluate import collect_outputs, evaluate
    from models.methods import create_method
    from models.networks import create_model
    from models.runtime import seed_everything, select_device, set_cpu_threads

    if request.method not in METHODS:
        raise TrainError(f"unknown method {request.method!r}; choose one of {', '.join(METHODS)}")
    set_cpu_threads(request.threads)
    device = select_device(request.device)
    base = load_checkpoint(request.base) if request.base is not None else None
    arch, image_size = _resolve_shape(request, base)
    data = _load_data(request, image_size=image_size, base=base)
    classes = tuple(data.classes)
    costs = (CostMatrix.read_csv(request.cost_matrix, classes) if request.cost_matrix is not None
             else CostMatrix.uniform(classes))
    if base is not None:
        model = base.model
    else:
        # The initial weights are part of the run: seeded, so the same seed trains the same model.
        seed_everything(request.config.seed)
        input_shape = tuple(data.train[0][0].shape) if arch == "mlp" else None
        model = create_model(arch, len(classes), in_channels=data.in_channels, pretrained_path=request.pretrained,
                             input_shape=input_shape)
    method = create_method(request.method, cost_matrix=costs,
                           **_method_options(request, base, mean=data.mean, std=data.std))
    config = request.config
    train_loader = create_train_loader(data.train, batch_size=config.batch_size, seed=config.seed,
                                       num_workers=request.num_workers, pin_memory=device.type == "cuda")

    def eval_loader(dataset: Any) -> DataLoader[Any]:
        return DataLoader(dataset, batch_size=config.batch_size, shuffle=False, num_workers=request.num_workers)

    valid_loader, test_loader = eval_loader(data.valid), eval_loader(data.test)
    logger.info("training %s (%s, %d px, %d classes) with %s on %s: %d train, %d valid, %d test images",
                arch, "from " + str(request.base) if base else "new", image_size, len(classes), method.name, device,
                len(data.train), len(data.valid), len(data.test))
    result = fit(model, train_loader=train_loader, method=method, config=config, device=device,
                 progress=progress, should_stop=should_stop, resume_state=resume_state, on_epoch_end=on_epoch_end)
    if result.stopped:
        return TrainOutcome(checkpoint=None, weights_sha256=None, metadata=None, fit=result)

    output_kind = method.output_kind
    temperature = 1.0
    if len(data.valid):
        # Float32, as the service serves and the worker fits the verdict thresholds (autocast is for training).
        outputs, labels = collect_outputs(model, valid_loader, device=device)
        # For SOSR, softmax(-costs / T) is the score the verdict layer reads; T is fitted the same way.
        temperature = fit_temperature(outputs if output_kind == "logits" else -outputs, labels)
    metrics: dict[str, Any] = {}
    for split, loader in (("valid", valid_loader), ("test", test_loader)):
        evaluation = evaluate(model, loader, cost_matrix=costs, device=device, temperature=temperature,
                              output_kind=output_kind)
        metrics[split] = evaluation.summary()
    metrics["train"] = {"history": result.history, "epochs_completed": result.epochs_completed,
                        "mean_attack_active_steps": result.mean_attack_active_steps}
    metadata = CheckpointMetadata(
        classes=classes, arch=arch, in_channels=data.in_channels, image_size=image_size, mean=data.mean,
        std=data.std, temperature=temperature, output_kind=output_kind, method=method.name,
        hyperparameters=_json_safe({"method": method.hyperparameters(), "train": dataclasses.asdict(config),
                                    "pretrained": str(request.pretrained) if request.pretrained else None}),
        cost_matrix_sha256=costs.fingerprint(), dataset_fingerprint=data.fingerprint,
        parent_sha256=base.weights_sha256 if base is not None else None, metrics=_json_safe(metrics))
    sha = save_checkpoint(request.out, model=model, metadata=metadata, overwrite=request.overwrite)
    logger.info("saved checkpoint %s (weights sha256 %s)", request.out, sha)
    return TrainOutcome(checkpoint=Path(request.out), weights_sha256=sha, metadata=metadata, fit=result)


def register(parser_group: Any) -> None:
    """Add `train` to the given subparsers."""
    from models.networks import ARCHITECTURES

    parser: argparse.ArgumentParser = parser_group.add_parser(
        "train", help="train or fine-tune a model on a PMI-layout image folder",
        description="Train (or fine-tune from --base) on DATA/{train,valid,test}/<NDC>/*, fit the temperature "
                    "on valid, report valid/test cost metrics and save a checkpoint to OUT. Costs come from "
                    "--cost-matrix (CSV true,predicted,cost; unlisted pairs cost 1); without it every error "
                    "costs 1.")
    add = parser.add_argument
    add("--data", required=True, type=Path, help="dataset root in the PMI layout")
    add("--out", required=True, type=Path, help="checkpoint directory to create (must be new or empty)")
    add("--method", choices=METHODS, default="baseline", help="training method (default baseline)")
    add("--base", type=Path, help="checkpoint to fine-tune from (its classes must equal the dataset's)")
    add("--pretrained", type=Path, help="local weights file (safetensors or torch state dict) for a new model")
    add("--cost-matrix", type=Path, help="cost CSV true,predicted,cost (default: every error costs 1)")
    add("--arch", choices=ARCHITECTURES, help=f"architecture of a new model (default {DEFAULT_ARCH})")
    add("--image-size", type=int, help=f"input size in px (default {DEFAULT_IMAGE_SIZE}, or the base's)")
    add("--epochs", type=int, default=10)
    add("--batch-size", type=int, default=32)
    add("--lr", type=float, default=1e-3)
    add("--optimizer", choices=("adam", "sgd"), default="adam")
    add("--weight-decay", type=float, default=0.0)
    add("--scheduler", choices=("none", "cosine", "step"), default="none")
    add("--head-epochs", type=int, default=0, help="train only the final layer for the first N epochs (PMI recipe)")
    add("--head-lr", type=float, help="learning rate of the head-only epochs (default --lr)")
    add("--freeze-bn", action=argparse.BooleanOptionalAction, default=None,
        help="keep batch-norm statistics frozen while training (default: frozen when fine-tuning a --base, "
             "as in the authors' fine-tuning; trained for a new model)")
    add("--no-amp", dest="amp", action="store_false", help="disable autocast on CUDA")
    add("--seed", type=int, default=0)
    add("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    add("--num-workers", type=int, default=0, help="DataLoader worker processes")
    add("--threads", type=int, help="torch CPU threads")
    add("--overwrite", action="store_true", help="replace an existing checkpoint at --out")
    group = parser.add_argument_group("CSADA (--method csada; defaults: the paper's CIFAR-10 settings)")
    group.add_argument("--lam", type=float, help="lambda, weight of the adversarial term")
    group.add_argument("--eps", type=float, help="radius of the perturbation ball")
    group.add_argument("--steps", type=int, help="K, ascent steps of the attack")
    group.add_argument("--step-size", type=float, help="eta_2, ascent step size")
    group.add_argument("--tau", type=float, help="temperature of the pair weights c^tau / sum c^tau")
    group.add_argument("--norm", choices=("linf", "l2"), help="perturbation ball")
    group.add_argument("--sign", action="store_true", default=None, help="sign-gradient ascent")
    group.add_argument("--full", dest="stochastic", action="store_false", default=None,
                       help="Algorithm 2 (every pair each step) instead of the stochastic Algorithm 3")
    group.add_argument("--pairs-per-step", type=int, help="Algorithm 3: independent pairs averaged per step")
    group.add_argument("--attack-batch-size", type=int, help="Algorithm 3: source-class samples attacked per pair")
    group.add_argument("--clamp-pixels", action="store_true", default=None,
                       help="keep attacked images valid: each channel's pixels in [0, 1] (default: unclamped, as "
                            "in the authors' code)")
    parser.add_argument_group("AP (--method ap)").add_argument("--alpha", type=float, help="penalty weight (default 5)")
    parser.set_defaults(func=handle)


def request_from_args(args: argparse.Namespace) -> TrainRequest:
    """Turn parsed arguments into a TrainRequest (method options only for the chosen method)."""
    from models.engine import TrainConfig

    config = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                         weight_decay=args.weight_decay, scheduler=args.scheduler,
                         freeze_bn=args.base is not None if args.freeze_bn is None else args.freeze_bn,
                         amp=args.amp, seed=args.seed, head_only_epochs=args.head_epochs, head_lr=args.head_lr)
    names = _METHOD_OPTIONS.get(args.method, ())
    ignored = [n for opts in _METHOD_OPTIONS.values() for n in opts
               if n not in names and getattr(args, n) is not None]
    if ignored:
        raise TrainError(f"options {', '.join('--' + n.replace('_', '-') for n in ignored)} do not apply to "
                         f"--method {args.method}")
    options = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
    return TrainRequest(data=args.data, out=args.out, config=config, method=args.method, method_options=options,
                        base=args.base, pretrained=args.pretrained, cost_matrix=args.cost_matrix, arch=args.arch,
                        image_size=args.image_size, device=args.device, num_workers=args.num_workers,
                        threads=args.threads, overwrite=args.overwrite)


def progress_printer(*, every_s: float = 2.0) -> Callable[[ProgressEvent], None]:
    """A progress callback: bar, epoch/step, loss, attack success and ETA on stderr (one redrawn line on a
    terminal; otherwise a line every `every_s` seconds and at the end of each epoch)."""
    from models.commands.progress import Eta, ProgressLine, bar, eta_text

    line = ProgressLine(plain_every_s=every_s)
    estimate = Eta()

    def report(event: ProgressEvent) -> None:
        done = event.epoch * event.steps_per_epoch + event.step
        total = event.epochs * event.steps_per_epoch
        eta = estimate(elapsed_s=event.elapsed_s, done=done, total=total)
        asr = "" if event.attack_success_rate is None else f" attack success {event.attack_success_rate:.2f}"
        text = (f"{bar(done / total if total else 1.0)} epoch {event.epoch + 1}/{event.epochs} "
                f"step {event.step}/{event.steps_per_epoch} loss {event.loss:.4f}{asr} "
                f"elapsed {event.elapsed_s:.0f}s {eta_text(eta)}")
        if done >= total:
            line.done(text)
        else:
            line.update(text, force=event.step == event.steps_per_epoch or done == 1)

    return report


def handle(args: argparse.Namespace) -> int:
    """Run `rxverify train` and print a summary; errors go to stderr with exit status 2."""
    from models.checkpoint import CheckpointError
    from models.networks import PretrainedWeightsError

    try:
        outcome = run_training(request_from_args(args), progress=progress_printer())
    except (TrainError, CheckpointError, PretrainedWeightsError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    metadata = outcome.metadata
    if metadata is None:
        print("training stopped; no checkpoint written", file=sys.stderr)
        return 1
    summary = {split: {k: metadata.metrics[split][k] for k in ("n", "accuracy", "wer", "total_cost", "ece")}
               for split in ("valid", "test")}
    print(f"checkpoint {outcome.checkpoint} (weights sha256 {outcome.weights_sha256})")
    print(f"method {metadata.method}, arch {metadata.arch}, {metadata.image_size} px, "
          f"temperature {metadata.temperature:.3f}")
    print(json.dumps(summary, indent=2))
    return 0
