"""`rxverify data import-pmi PATH --name NAME` and `rxverify data list`: datasets for training jobs."""

from __future__ import annotations

import argparse
import getpass
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from app.config import Settings, get_settings, redacted_url
from app.db import Database
from app.log import configure_logging


def register(sub: Any, groups: dict[str, Any]) -> None:
    """Add `data import-pmi` and `data list` to the `data` group."""
    data = groups["data"]
    importer = data.add_parser(
        "import-pmi", help="register a PMI-layout image folder as a training dataset",
        description="Check PATH/{train,valid,test}/<NDC>/* against the product catalog, count the images per "
                    "split, report skipped files and why, and register the usable images (hard-linked or "
                    "copied under DATA_DIR/datasets/NAME) for training jobs.")
    importer.add_argument("path", type=Path, help="dataset root holding train/, valid/ and test/")
    importer.add_argument("--name", required=True, help="dataset name used by training jobs")
    importer.add_argument("--show-skipped", type=int, default=20, metavar="N",
                          help="list at most N skipped files (default 20; the reasons are always summarised)")
    importer.set_defaults(func=import_pmi_command)
    listing = data.add_parser("list", help="list registered datasets with images per split")
    listing.set_defaults(func=list_command)


def _actor() -> Any:
    from app.services.audit import Actor

    try:
        user = getpass.getuser()
    except Exception:
        user = "unknown"
    return Actor.cli(f"data import-pmi ({user})")


def _schema_not_current(settings: Settings) -> str | None:
    """Why this data dir's database cannot take a dataset yet (no schema, or an old one), or None."""
    from app import migrate

    current, head = migrate.current_revision(settings), migrate.head_revision()
    if current != head:
        return (f"the database {redacted_url(settings.database_url)} is at revision {current or 'none (empty)'}, "
                f"not {head}: run `rxverify migrate` and `rxverify catalog seed-pmi` first (or `make run` once)")
    return None


def import_pmi_command(args: argparse.Namespace) -> int:
    """Scan, report and register; exit 2 (nothing registered) when the folder cannot be used."""
    from app.errors import DomainError, InvalidInput
    from app.services.datasets import import_pmi
    from app.services.products import catalog_keys

    settings = get_settings()
    configure_logging(settings)
    settings.ensure_dirs()
    if (unready := _schema_not_current(settings)) is not None:
        print(f"error: {unready}", file=sys.stderr)
        return 2
    database = Database(settings)
    try:
        with database.session() as session:
            catalog = catalog_keys(session)
            if not catalog:
                raise InvalidInput("the catalog is empty, so no class folder can be checked against it: run "
                                   "`rxverify catalog seed-pmi` first (or `make run` once), or add your products")
            dataset, scan = import_pmi(session, source=args.path, name=args.name, datasets_dir=settings.datasets_dir,
                                       catalog=catalog, actor=_actor())
            summary = (dataset.id, dataset.path, dataset.fingerprint)
    except DomainError as error:
        print(f"error: {error.detail}", file=sys.stderr)
        for item in error.errors:
            print(f"  {item.field}: {item.message}", file=sys.stderr)
        return 2
    finally:
        database.dispose()
    dataset_id, path, fingerprint = summary
    print(f"dataset {args.name!r} (id {dataset_id}) registered at {path}")
    print(f"fingerprint {fingerprint}")
    _print_counts(scan.counts)
    _print_skipped(scan.skipped, limit=args.show_skipped)
    return 0


def _print_counts(counts: dict[str, dict[str, int]]) -> None:
    classes = sorted({ndc for per_class in counts.values() for ndc in per_class})
    splits = list(counts)
    print(f"{len(classes)} classes; images per split:")
    print("  " + "ndc".ljust(12) + "".join(s.rjust(8) for s in splits))
    for ndc in classes:
        print("  " + ndc.ljust(12) + "".join(str(counts[s].get(ndc, 0)).rjust(8) for s in splits))
    print("  " + "total".ljust(12) + "".join(str(sum(counts[s].values())).rjust(8) for s in splits))


def _print_skipped(skipped: list[Any], *, limit: int) -> None:
    if not skipped:
        print("skipped files: none")
        return
    reasons = Counter(item.reason.split(" (")[0] for item in skipped)
    print(f"skipped files: {len(skipped)}")
    for reason, count in reasons.most_common():
        print(f"  {count:6d}  {reason}")
    for item in skipped[:max(limit, 0)]:
        print(f"  {item.path}: {item.reason}")
    if len(skipped) > limit:
        print(f"  ... and {len(skipped) - limit} more (--show-skipped N lists more)")


def list_command(_args: argparse.Namespace) -> int:
    """One line per dataset: id, name, classes, images per split, fingerprint, path."""
    from app.services.datasets import SPLITS, list_datasets, split_size

    settings = get_settings()
    configure_logging(settings)
    database = Database(settings)
    try:
        with database.session() as session:
            datasets = list_datasets(session)
            if not datasets:
                print("no datasets registered (rxverify data import-pmi PATH --name NAME)")
            for dataset in datasets:
                classes = len((dataset.counts or {}).get("train", {}))
                sizes = " ".join(f"{s}={split_size(dataset, s)}" for s in SPLITS)
                print(f"{dataset.id}\t{dataset.name}\t{dataset.source}\t{classes} classes\t{sizes}\t"
                      f"{(dataset.fingerprint or '')[:12]}\t{dataset.path}")
    finally:
        database.dispose()
    return 0
