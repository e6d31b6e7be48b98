"""`rxverify data import-pmi` and `data list`: catalog checks, per-split counts, skipped files and why."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from sqlalchemy import select

from app.cli import main as cli_main
from app.config import Settings
from app.db import Database
from app.orm import AdminAuditEntry, Dataset
from app.services.datasets import scan_pmi_folder
from models.data import dataset_fingerprint
from tests.worker.factories import CLASSES, tiny_assets


@pytest.fixture
def dataset_copy(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> Path:
    """A private copy of the session's tiny synthetic dataset, plus files that must be skipped."""
    assets = tiny_assets(tmp_path_factory.getbasetemp() / "tiny-assets")
    root = tmp_path / "pmi"
    shutil.copytree(assets.dataset, root)
    (root / "train" / CLASSES[0] / "notes.txt").write_text("not an image")
    (root / "train" / CLASSES[0] / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    whole = next((root / "train" / CLASSES[1]).glob("*.jpg")).read_bytes()  # a valid header, the end cut off
    (root / "train" / CLASSES[1] / "cut-off.jpg").write_bytes(whole[: len(whole) - 200])
    (root / "train" / CLASSES[0] / ".DS_Store").write_bytes(b"\0")
    (root / "valid" / CLASSES[1] / "nested").mkdir()
    (root / "test" / "README.md").write_text("stray file")
    return root


@pytest.fixture
def cli_env(sqlite_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The CLI pointed at a migrated, PMI-seeded SQLite database."""
    from tests.app.factories import seed_catalog

    seed_catalog(sqlite_settings)
    monkeypatch.setenv("RXVERIFY_DATA_DIR", str(sqlite_settings.data_dir))
    from app.config import get_settings

    get_settings.cache_clear()
    return sqlite_settings


def test_import_reports_counts_and_skipped_files_and_registers_only_usable_images(
        cli_env: Settings, dataset_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["data", "import-pmi", str(dataset_copy), "--name", "pmi-small"]) == 0
    out = capsys.readouterr().out
    assert "dataset 'pmi-small' (id 1) registered" in out and "4 classes; images per split:" in out
    assert "total" in out and "36" in out and "12" in out  # 9/3/3 images x 4 classes
    assert "skipped files: 6" in out and "cut-off.jpg" in out and "truncated" in out
    for reason in ("extension '.txt'", "not a readable image", "hidden file", "folder nested inside a class folder",
                   "file outside a class folder"):
        assert reason in out, reason
    database = Database(cli_env)
    try:
        with database.session() as session:
            dataset = session.scalars(select(Dataset)).one()
            assert dataset.counts["train"] == {ndc: 9 for ndc in CLASSES}
            assert dataset.counts["valid"] == dataset.counts["test"] == {ndc: 3 for ndc in CLASSES}
            target = Path(dataset.path)
            assert target == (cli_env.datasets_dir / "pmi-small").resolve()
            assert dataset.fingerprint == dataset_fingerprint(target)
            audit = session.scalars(select(AdminAuditEntry).where(AdminAuditEntry.action == "dataset.import")).one()
            assert audit.details["skipped"] == 6
    finally:
        database.dispose()
    assert not list(target.rglob("*.txt")) and not list(target.rglob("broken.jpg"))
    assert len(list(target.rglob("*.jpg"))) == 60
    # Copies, not links: rewriting a source photo in place leaves the registered dataset as it was.
    source = next((dataset_copy / "train" / CLASSES[2]).glob("*.jpg"))
    registered = target / "train" / CLASSES[2] / source.name
    assert registered.stat().st_ino != source.stat().st_ino
    source.write_bytes(b"edited")
    assert registered.read_bytes() != b"edited" and dataset_fingerprint(target) == dataset.fingerprint

    assert cli_main(["data", "list"]) == 0
    listing = capsys.readouterr().out
    assert "pmi-small" in listing and "train=36 valid=12 test=12" in listing and "4 classes" in listing


def test_import_refuses_unknown_ndc_folders_missing_splits_and_taken_names(
        cli_env: Settings, dataset_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for split in ("train", "valid", "test"):
        (dataset_copy / split / "99999-0001").mkdir()
        shutil.copy(next((dataset_copy / split / CLASSES[0]).glob("*.jpg")), dataset_copy / split / "99999-0001")
    assert cli_main(["data", "import-pmi", str(dataset_copy), "--name", "bad"]) == 2
    err = capsys.readouterr().err
    assert "'99999-0001' is not a product NDC in the catalog" in err and "train/99999-0001" in err

    for split in ("train", "valid", "test"):
        shutil.rmtree(dataset_copy / split / "99999-0001")
    shutil.rmtree(dataset_copy / "test")
    assert cli_main(["data", "import-pmi", str(dataset_copy), "--name", "bad"]) == 2
    assert "the test folder is missing" in capsys.readouterr().err

    (dataset_copy / "test").mkdir()
    assert cli_main(["data", "import-pmi", str(dataset_copy), "--name", "bad"]) == 2
    assert "no usable images for" in capsys.readouterr().err  # every class needs test images

    assert cli_main(["data", "import-pmi", str(dataset_copy), "--name", "../escape"]) == 2
    assert "must be 1-100 letters" in capsys.readouterr().err
    assert cli_main(["data", "list"]) == 0
    assert "no datasets registered" in capsys.readouterr().out


def test_a_taken_name_is_refused(cli_env: Settings, dataset_copy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["data", "import-pmi", str(dataset_copy), "--name", "twice"]) == 0
    assert cli_main(["data", "import-pmi", str(dataset_copy), "--name", "twice"]) == 2
    assert "already registered" in capsys.readouterr().err


def test_scan_counts_classes_per_split(dataset_copy: Path) -> None:
    scan = scan_pmi_folder(dataset_copy, catalog=CLASSES)
    assert not scan.errors and scan.classes == sorted(CLASSES)
    assert scan.total("train") == 36 and scan.total() == 60
    assert {item.path for item in scan.skipped} >= {f"train/{CLASSES[0]}/notes.txt", "test/README.md"}


def test_import_before_the_database_is_set_up_says_what_to_run(sqlite_settings: Settings, dataset_copy: Path,
                                                               monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    """On a fresh data dir it ended in a traceback (no such table); migrated but unseeded, it blamed every
    class folder for not being in the (empty) catalog."""
    from app import migrate
    from app.config import get_settings

    fresh = sqlite_settings.model_copy(update={"data_dir": sqlite_settings.data_dir / "fresh",
                                               "database_url": f"sqlite:///{sqlite_settings.data_dir / 'fresh.db'}"})
    monkeypatch.setenv("RXVERIFY_DATA_DIR", str(fresh.data_dir))
    monkeypatch.setenv("RXVERIFY_DATABASE_URL", fresh.database_url)
    get_settings.cache_clear()
    assert cli_main(["data", "import-pmi", str(dataset_copy), "--name", "early"]) == 2
    assert "run `rxverify migrate` and `rxverify catalog seed-pmi` first" in capsys.readouterr().err
    migrate.upgrade(fresh)
    assert cli_main(["data", "import-pmi", str(dataset_copy), "--name", "early"]) == 2
    assert "the catalog is empty" in capsys.readouterr().err
    get_settings.cache_clear()


def test_a_database_from_a_newer_rxverify_is_refused_with_a_message(sqlite_settings: Settings,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from sqlalchemy import create_engine, text

    from app import migrate
    from app.config import get_settings

    migrate.upgrade(sqlite_settings)
    engine = create_engine(sqlite_settings.database_url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    engine.dispose()
    monkeypatch.setenv("RXVERIFY_DATA_DIR", str(sqlite_settings.data_dir))
    get_settings.cache_clear()
    assert cli_main(["migrate"]) == 2
    err = capsys.readouterr().err
    assert "at revision 9999, which this code's migrations do not have" in err and "newer rxverify" in err
    get_settings.cache_clear()
