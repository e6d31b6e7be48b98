"""`rxverify experiment {toy,digits,synthetic-pills,pmi}`: reproduce the paper's comparison tables."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from models.experiment_setups import ALL_METHODS as METHODS
from models.experiment_setups import DATASETS, DEFAULT_METHODS


def _methods(value: str) -> tuple[str, ...]:
    names = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"methods must be a comma list of {','.join(METHODS)} (got {value!r})")
    return names


def _pair(value: str) -> tuple[str, str] | str:
    if value == "auto":
        return value
    parts = [v.strip() for v in value.split(",")]
    if len(parts) != 2 or not all(parts) or parts[0] == parts[1]:
        raise argparse.ArgumentTypeError(f"--critical-pair takes TRUE,PRED (two different classes) or auto, got {value!r}")
    return parts[0], parts[1]


def register(sub: Any) -> None:
    """Add the top-level `experiment` command."""
    parser = sub.add_parser(
        "experiment", help="reproduce the paper's experiments (baseline vs CSADA vs the comparison methods)",
        description="Train an interpolating baseline per seed, fine-tune every method from it with the same "
                    "budget, choose each method's hyperparameters on the validation split only, and print "
                    "mean(std) over seeds of the test metrics.")
    parser.add_argument("dataset", choices=DATASETS)
    parser.add_argument("--methods", type=_methods, default=DEFAULT_METHODS, metavar="LIST",
                        help=f"comma list from {','.join(METHODS)} (default: all but csada+bayes, the "
                             "Bayes decision on the chosen CSADA model)")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (default 3)")
    parser.add_argument("--seed-offset", type=int, default=0, help="first seed (default 0)")
    parser.add_argument("--cost-seed-offset", type=int, default=0,
                        help="digits: shift the Pareto draws (seed i uses cost seed i + offset + seed offset)")
    parser.add_argument("--cost-matrix", type=Path, metavar="CSV", help="long-form true,predicted,cost CSV")
    parser.add_argument("--critical-pair", type=_pair, metavar="TRUE,PRED",
                        help="single-pair study: this pair costs 1, all others 0; 'auto' takes the first "
                             "seed's most confused validation pair")
    parser.add_argument("--data", type=Path, metavar="DIR", help="image folder (pmi; synthetic-pills: skip generation)")
    parser.add_argument("--cache-dir", type=Path, default=Path("var/datasets"),
                        help="where synthetic-pills generates its dataset (default var/datasets)")
    parser.add_argument("--pretrained", type=Path, help="local weights for the baseline (pmi: ImageNet ResNet-34)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: these small models gain nothing from more, and "
                             "on a busy CPU intra-op threads that wait on each other make training much slower)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write per-method, per-seed results as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.set_defaults(func=handle)


def handle(args: argparse.Namespace) -> int:
    """Run the experiment, print the table, optionally write JSON."""
    from models.experiment_report import format_report, to_json
    from models.experiments import ExperimentConfig, run_experiment

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.dataset == "pmi" and args.data is None:
        print("error: pmi needs --data DIR (train|valid|test/<NDC>/*.jpg)", file=sys.stderr)
        return 2
    try:
        config = ExperimentConfig(
            dataset=args.dataset, methods=args.methods, seeds=args.seeds, seed_offset=args.seed_offset,
            cost_seed_offset=args.cost_seed_offset, cost_matrix=args.cost_matrix, critical_pair=args.critical_pair,
            data_dir=args.data, cache_dir=args.cache_dir, pretrained=args.pretrained, device=args.device,
            threads=args.threads)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    def progress(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    try:
        result = run_experiment(config, progress=progress)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_report(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(to_json(result), indent=2) + "\n")
        print(f"JSON written to {args.json}")
    return 0
