"""`rxverify bench attack`: time the fused Algorithm 1 against the paper-literal reference.

Both run on the same model, inputs, labels and targets. The default model is torchvision's
ResNet-18 (`models.networks.create_model("resnet18", 10)`, random weights from `--seed`) on a batch of
32 random 3x32x32 inputs (CIFAR size). Each sample's label is the model's own prediction (so every
sample is attacked) and its target the runner-up class. The default step size gives a mix of early
successes and exhausted samples. One warm-up call of each, then `--repeats` timed calls of each,
alternating which goes first so that both see the same machine load; times are medians.

`identical` is true when every timed call of the two gave bitwise-equal perturbations and equal
outcomes (and equal rejected-step and active-step counts).

`--step-cost` also times one CSADA fine-tuning step (stochastic, one pair, M = batch size, BN frozen)
against one clean cross-entropy step on the same batch, and prints the ratio next to 1 + the attack's
mean active steps, the cost that the paper's construction predicts.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

logger = logging.getLogger(__name__)


def register(group: Any) -> None:
    """Add `attack` to the `bench` command group."""
    parser = group.add_parser("attack", help="time the fused attack (Algorithm 1) against the reference")
    add_arguments(parser)
    parser.set_defaults(func=handle)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The command's options."""
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON to this file ('-' = stdout)")
    parser.add_argument("--steps", type=int, default=10, help="K, ascent steps (default 10)")
    parser.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--arch", default="resnet18", help="architecture from models.networks (default resnet18)")
    parser.add_argument("--image-size", type=int, default=32, help="input side in pixels (default 32)")
    parser.add_argument("--classes", type=int, default=10, help="number of classes (default 10)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each implementation (default 5)")
    parser.add_argument("--eps", type=float, default=1.0, help="L-inf radius (default 1.0)")
    parser.add_argument("--step-size", type=float, default=0.1, help="eta_2 (default 0.1)")
    parser.add_argument("--norm", choices=("linf", "l2"), default="linf")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default auto)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--step-cost", action="store_true",
                        help="also measure one CSADA step's time over one clean step's")


def handle(args: argparse.Namespace) -> int:
    """Run the benchmark and print a summary (and JSON when asked)."""
    if args.steps < 1 or args.batch < 1 or args.repeats < 1:
        print("--steps, --batch and --repeats must be >= 1", file=sys.stderr)
        return 2
    report = run_benchmark(arch=args.arch, batch=args.batch, image_size=args.image_size, classes=args.classes,
                           steps=args.steps, eps=args.eps, step_size=args.step_size, norm=args.norm,
                           repeats=args.repeats, seed=args.seed, device_name=args.device, threads=args.threads,
                           step_cost=args.step_cost)
    print(f"device {report['device']}, torch {report['torch_version']}, {report['arch']} "
          f"{report['image_size']}px, batch {report['batch']}, K={report['steps']}, {report['repeats']} repeats")
    print(f"outcomes: {report['outcomes']}, batched steps run: {report['steps_run']}")
    print(f"reference {report['reference_s']:.4f} s  fused {report['fused_s']:.4f} s  "
          f"speed-up {report['speedup']:.2f}x  identical {str(report['identical']).lower()}  "
          f"(process CPU time: {report['speedup_cpu_time']:.2f}x)")
    if "step_cost" in report:
        cost = report["step_cost"]
        print(f"CSADA step {cost['csada_step_s']:.4f} s  clean step {cost['clean_step_s']:.4f} s  "
              f"ratio {cost['ratio']:.2f}  (1 + mean active steps = {cost['predicted_ratio']:.2f})")
    if args.json:
        text = json.dumps(report, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as handle_out:
                handle_out.write(text + "\n")
    return 0 if report["identical"] else 1


def run_benchmark(*, arch: str, batch: int, image_size: int, classes: int, steps: int, eps: float,
                  step_size: float, norm: str, repeats: int, seed: int, device_name: str = "auto",
                  threads: int | None = None, step_cost: bool = False) -> dict[str, Any]:
    """Time both attacks on identical inputs and compare their outputs; returns the JSON report.

    Both run under `deterministic_kernels`, so that "identical" compares the two algorithms and not
    cuDNN's choice of kernels from one call to the next (which made it false on a GPU without it).
    """
    from models.runtime import deterministic_kernels

    with deterministic_kernels():
        return _run_benchmark(arch=arch, batch=batch, image_size=image_size, classes=classes, steps=steps,
                              eps=eps, step_size=step_size, norm=norm, repeats=repeats, seed=seed,
                              device_name=device_name, threads=threads, step_cost=step_cost)


def _run_benchmark(*, arch: str, batch: int, image_size: int, classes: int, steps: int, eps: float,
                   step_size: float, norm: str, repeats: int, seed: int, device_name: str,
                   threads: int | None, step_cost: bool) -> dict[str, Any]:
    import torch

    from models.attacks import OUTCOME_NAMES, AttackResult, reference_attack, targeted_attack
    from models.networks import create_model
    from models.runtime import seed_everything, select_device, set_cpu_threads

    set_cpu_threads(threads)
    device = select_device(device_name)
    seed_everything(seed)
    model = create_model(arch, classes).to(device).eval()
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    with torch.no_grad():
        top2 = model(x).topk(2, dim=1).indices
    labels, targets = top2[:, 0].contiguous(), top2[:, 1].contiguous()

    def attack(function: Callable[..., AttackResult]) -> Callable[[], AttackResult]:
        return lambda: function(model, x, labels, targets, eps=eps, steps=steps, step_size=step_size,
                                norm=norm)

    fused_call, reference_call = attack(targeted_attack), attack(reference_attack)
    fused_call(), reference_call()  # warm-up: kernel selection, allocator, lazy init
    fused_times: list[float] = []
    reference_times: list[float] = []
    cpu_times: dict[str, list[float]] = {"fused": [], "reference": []}
    identical, largest_difference = True, 0.0
    fused = reference = None
    for repeat in range(repeats):
        order = [("fused", fused_call), ("reference", reference_call)]
        if repeat % 2:
            order.reverse()
        results: dict[str, AttackResult] = {}
        for name, call in order:
            cpu_started = time.process_time()
            seconds, results[name] = _timed(call, device)
            cpu_times[name].append(time.process_time() - cpu_started)
            (fused_times if name == "fused" else reference_times).append(seconds)
        fused, reference = results["fused"], results["reference"]
        identical = identical and _same(fused, reference)
        largest_difference = max(largest_difference, float((fused.delta - reference.delta).abs().max()))
    assert fused is not None and reference is not None
    fused_s, reference_s = statistics.median(fused_times), statistics.median(reference_times)
    counts = torch.bincount(fused.outcome.cpu(), minlength=len(OUTCOME_NAMES)).tolist()
    report: dict[str, Any] = {
        "speedup": reference_s / fused_s, "identical": identical, "deterministic_kernels": True,
        "max_abs_delta_difference": largest_difference,
        "fused_s": fused_s, "reference_s": reference_s,
        "fused_times_s": fused_times, "reference_times_s": reference_times,
        # Process CPU time: a cross-check on a CPU shared with other work, where wall time is noisy.
        "speedup_cpu_time": statistics.median(cpu_times["reference"]) / statistics.median(cpu_times["fused"]),
        "fused_cpu_s": statistics.median(cpu_times["fused"]),
        "reference_cpu_s": statistics.median(cpu_times["reference"]),
        "steps": steps, "batch": batch, "arch": arch, "image_size": image_size, "classes": classes,
        "eps": eps, "step_size": step_size, "norm": norm, "repeats": repeats, "seed": seed,
        "device": str(device), "torch_version": torch.__version__, "threads": torch.get_num_threads(),
        "outcomes": {OUTCOME_NAMES[code]: n for code, n in enumerate(counts)},
        "steps_run": fused.steps_run, "mean_active_steps": fused.mean_active_steps,
        "passes": {"fused": {"forward": fused.forward_passes, "backward": fused.backward_passes},
                   "reference": {"forward": reference.forward_passes, "backward": reference.backward_passes}},
    }
    if step_cost:
        report["step_cost"] = _step_cost(model=model, x=x, labels=labels, targets=targets, classes=classes,
                                         steps=steps, eps=eps, step_size=step_size, norm=norm,
                                         repeats=repeats, device=device)
    return report


def _step_cost(*, model: Any, x: Any, labels: Any, targets: Any, classes: int, steps: int, eps: float,
               step_size: float, norm: str, repeats: int, device: Any) -> dict[str, float]:
    """Median time of one CSADA step over one clean CE step, same batch; the weights stay fixed (lr 0)."""
    import torch

    from models.costs import CostMatrix
    from models.csada import AdversarialDraw, CsadaConfig, CsadaMethod
    from models.methods import BaselineMethod, Method

    cost_matrix = CostMatrix.uniform([str(k) for k in range(classes)])
    clean = BaselineMethod(cost_matrix=cost_matrix)
    csada = CsadaMethod(cost_matrix=cost_matrix, config=CsadaConfig(
        lam=1.0, eps=eps, steps=steps, step_size=step_size, norm=norm, stochastic=True))  # type: ignore[arg-type]
    # One sampled pair: the source class is the batch's most common label, the target its runner-up.
    source = int(torch.mode(labels).values)
    target = int(torch.mode(targets[labels == source]).values)
    rows = labels.shape[0]
    extra = AdversarialDraw(pairs=((source, target),), x=x, y=torch.full_like(labels, source),
                            target=torch.full_like(labels, target), weight=torch.full((rows,), 1.0 / (classes * rows)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    active_steps: list[float] = []

    def step(method: Method, extra_input: Any) -> None:
        optimizer.zero_grad(set_to_none=True)
        output = method.compute_loss(model, x, labels, extra=extra_input)
        output.loss.backward()
        optimizer.step()
        if output.attack is not None and output.attack.attacked:
            active_steps.append(output.attack.active_steps / output.attack.attacked)

    model.train()
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eval()  # frozen BN, as in the authors' fine-tuning, so repeated steps see the same model
    step(clean, None)  # warm-up
    step(csada, extra)
    clean_times, csada_times = [], []
    for _ in range(repeats):
        clean_times.append(_timed(lambda: step(clean, None), device)[0])
        csada_times.append(_timed(lambda: step(csada, extra), device)[0])
    model.eval()
    clean_s, csada_s = statistics.median(clean_times), statistics.median(csada_times)
    mean_active = statistics.mean(active_steps) if active_steps else 0.0
    return {"clean_step_s": clean_s, "csada_step_s": csada_s, "ratio": csada_s / clean_s,
            "mean_active_steps": mean_active, "predicted_ratio": 1.0 + mean_active}


def _timed(call: Callable[[], Any], device: Any) -> tuple[float, Any]:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    started = time.perf_counter()
    result = call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started, result


def _same(a: Any, b: Any) -> bool:
    import torch

    return (torch.equal(a.delta, b.delta) and torch.equal(a.outcome, b.outcome)
            and torch.equal(a.rejected_steps, b.rejected_steps) and torch.equal(a.steps_active, b.steps_active))


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: `python -m models.commands.bench_attack ...`."""
    parser = argparse.ArgumentParser(prog="python -m models.commands.bench_attack", description=__doc__)
    add_arguments(parser)
    return handle(parser.parse_args(argv))


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
