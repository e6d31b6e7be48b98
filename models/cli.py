"""Command-line entry points of the ML core; `rxverify` mounts them, and `python -m models` runs them alone."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any


def register(sub: Any, groups: dict[str, Any]) -> None:
    """Add models/ commands: train, experiment, `bench attack`, `data synth`."""
    from models.commands import bench_attack, experiment, synth, train

    train.register(sub)
    experiment.register(sub)
    bench_attack.register(groups["bench"])
    synth.register(groups["data"])


def main(argv: Sequence[str] | None = None) -> int:
    """Standalone entry point: `python -m models ...` (no web or database code involved)."""
    parser = argparse.ArgumentParser(prog="python -m models")
    sub = parser.add_subparsers(dest="command", required=True)
    groups = {name: sub.add_parser(name).add_subparsers(dest=f"{name}_command", required=True)
              for name in ("bench", "data")}
    register(sub, groups)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
