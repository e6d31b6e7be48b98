"""`rxverify data synth`: write the synthetic pill-bottle dataset in the PMI folder layout."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from typing import Any


def register(group: Any) -> None:
    """Add the `synth` subcommand to the `data` command group."""
    parser: argparse.ArgumentParser = group.add_parser(
        "synth",
        help="generate synthetic pill-bottle photos for the 20 PMI products",
        description="Render top-down photos of open pill bottles (paper Table 8 products) into "
                    "OUT/{train,valid,test}/<NDC>/*.jpg with a ~6:2:2 split and Table 8 class imbalance.",
    )
    parser.add_argument("--out", required=True, help="output folder (new or empty, or an interrupted run to resume)")
    parser.add_argument("--per-class", type=int, default=200,
                        help="images of the largest class, all splits together; others scale by Table 8 (default 200)")
    parser.add_argument("--image-size", type=int, default=256, help="photo height in px; width is 4/3 of it (default 256)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives identical files (default 0)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="rendering processes (default: CPU count)")
    parser.add_argument("--balanced", action="store_true", help="every class gets --per-class images (no imbalance)")
    parser.add_argument("--set", action="append", default=[], metavar="KNOB=VALUE",
                        help="override a SynthConfig knob, e.g. --set blur=0.5,1.5 --set tilt=0.3 (repeatable)")
    parser.set_defaults(func=handle)


def parse_overrides(items: list[str]) -> Any:
    """Build a SynthConfig from KNOB=VALUE strings ("a,b" gives a (low, high) pair)."""
    from models.synth import SynthConfig

    known = {f.name: f for f in dataclasses.fields(SynthConfig)}
    changes: dict[str, Any] = {}
    for item in items:
        name, _, raw = item.partition("=")
        if name not in known or not raw:
            raise ValueError(f"--set {item!r}: expected KNOB=VALUE with KNOB one of {', '.join(known)}")
        default = getattr(SynthConfig(), name)
        cast = int if isinstance(default, int) or (isinstance(default, tuple) and isinstance(default[0], int)) else float
        parts = tuple(cast(v) for v in raw.split(","))
        if isinstance(default, tuple) != (len(parts) == 2) or len(parts) > 2:
            raise ValueError(f"--set {item!r}: {name} takes {'LOW,HIGH' if isinstance(default, tuple) else 'one value'}")
        changes[name] = parts if isinstance(default, tuple) else parts[0]
    return SynthConfig(**changes)


def progress_printer() -> Any:
    """`progress(done, total)` for generate_synthetic_pills: a bar with the ETA on stderr."""
    from models.commands.progress import Eta, ProgressLine, bar, eta_text

    start = time.perf_counter()
    line = ProgressLine()
    estimate = Eta()

    def progress(done: int, total: int) -> None:
        elapsed = time.perf_counter() - start
        eta = estimate(elapsed_s=elapsed, done=done, total=total)
        text = (f"rendering {bar(done / total if total else 1.0)} {done}/{total} images, "
                f"{elapsed:.0f}s elapsed, {eta_text(eta)}")
        if done >= total:
            line.done(text)
        else:
            line.update(text, force=done == 1)

    return progress


def handle(args: argparse.Namespace) -> int:
    """Generate the dataset and print a per-split, per-class summary."""
    from models.synth import SPLIT_NAMES, generate_synthetic_pills

    try:
        config = parse_overrides(args.set)
        result = generate_synthetic_pills(
            args.out, per_class=args.per_class, image_size=args.image_size, seed=args.seed,
            imbalance=not args.balanced, config=config, workers=max(1, args.workers),
            progress=progress_printer(),
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ndcs = list(result.counts[SPLIT_NAMES[0]])
    print(f"{'NDC':<12}" + "".join(f"{s:>7}" for s in SPLIT_NAMES) + f"{'total':>7}")
    for ndc in ndcs:
        row = [result.counts[s][ndc] for s in SPLIT_NAMES]
        print(f"{ndc:<12}" + "".join(f"{n:>7}" for n in row) + f"{sum(row):>7}")
    totals = [sum(result.counts[s].values()) for s in SPLIT_NAMES]
    print(f"{'all':<12}" + "".join(f"{n:>7}" for n in totals) + f"{sum(totals):>7}")
    rate = result.generated / result.elapsed_s if result.elapsed_s > 0 else 0.0
    print(f"{result.generated} images rendered ({result.skipped} already present) in {result.elapsed_s:.1f}s "
          f"({rate:.1f} images/s) -> {result.out}")
    return 0
