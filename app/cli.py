"""The `rxverify` command: one argparse tree; each area registers its own subcommands."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

# Command groups that several areas add subcommands to (e.g. `data synth` from models/,
# `data import-pmi` from app/).
GROUPS = ("catalog", "apikey", "data", "bench")

Registrar = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]", dict[str, "argparse._SubParsersAction[argparse.ArgumentParser]"]], None]


def _registrars() -> list[Registrar]:
    from app.commands import register as register_app
    from models.cli import register as register_models

    return [register_app, register_models]


def build_parser() -> argparse.ArgumentParser:
    """Build the full `rxverify` parser."""
    parser = argparse.ArgumentParser(prog="rxverify", description="Pharmacy dispensing verification")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups = {
        name: sub.add_parser(name, help=f"{name} commands").add_subparsers(
            dest=f"{name}_command", required=True, metavar="COMMAND")
        for name in GROUPS
    }
    for register in _registrars():
        register(sub, groups)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `rxverify` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "func", None)
    if handler is None:
        parser.print_help()
        return 2
    result = handler(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
