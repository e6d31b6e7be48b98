"""Synthetic pill-bottle generator: determinism, layout, imbalance, resume, CLI."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from models.commands import synth as synth_command
from models.pmi import PMI_PRODUCTS, pmi_product
from models.synth import SynthConfig, class_counts, generate_synthetic_pills, render_bottle

SMALL = dict(per_class=6, image_size=32)
FEW = tuple(pmi_product(n) for n in ("50111-0434", "00591-0461", "53746-0544", "57664-0377"))


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


def test_same_seed_gives_byte_identical_files_and_other_seed_differs(tmp_path: Path) -> None:
    a = generate_synthetic_pills(tmp_path / "a", seed=5, products=FEW, **SMALL)  # type: ignore[arg-type]
    b = generate_synthetic_pills(tmp_path / "b", seed=5, products=FEW, workers=2, **SMALL)  # type: ignore[arg-type]
    c = generate_synthetic_pills(tmp_path / "c", seed=6, products=FEW, **SMALL)  # type: ignore[arg-type]
    files_a, files_b, files_c = _files(a.out), _files(b.out), _files(c.out)
    assert files_a and files_a == files_b  # parallel rendering gives the same bytes
    assert files_a.keys() == files_c.keys()
    assert all(files_a[k] != files_c[k] for k in files_a)


def test_layout_split_ratios_imbalance_and_manifest(tmp_path: Path) -> None:
    result = generate_synthetic_pills(tmp_path / "ds", seed=0, per_class=10, image_size=32)
    ndcs = sorted(p.ndc for p in PMI_PRODUCTS)
    for split in ("train", "valid", "test"):
        assert sorted(d.name for d in (tmp_path / "ds" / split).iterdir()) == ndcs
        for ndc in ndcs:
            assert len(list((tmp_path / "ds" / split / ndc).glob("*.jpg"))) == result.counts[split][ndc]
            assert result.counts[split][ndc] >= 2
    # The largest Table 8 class gets per_class images, split 6:2:2.
    assert [result.counts[s]["00378-0208"] for s in ("train", "valid", "test")] == [6, 2, 2]
    assert result.total == result.generated == sum(len(v) for v in [list((tmp_path / "ds").rglob("*.jpg"))])
    manifest = json.loads((tmp_path / "ds" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["counts"] == result.counts
    assert manifest["params"]["seed"] == 0 and manifest["params"]["width"] == 43
    with Image.open(next((tmp_path / "ds" / "test").rglob("*.jpg"))) as image:
        assert image.format == "JPEG" and image.size == (43, 32) and image.mode == "RGB"


def test_class_counts_follow_table8_proportions() -> None:
    counts = class_counts(PMI_PRODUCTS, per_class=1001, splits=(0.6, 0.2, 0.2), imbalance=True)
    for product in PMI_PRODUCTS:
        total = product.train_size + product.valid_size + product.test_size
        train, valid, test = counts[product.ndc]
        assert train + valid + test == pytest.approx(total, abs=1)
        assert valid == pytest.approx(0.2 * total, abs=1) and test == pytest.approx(0.2 * total, abs=1)
    balanced = class_counts(PMI_PRODUCTS, per_class=50, splits=(0.6, 0.2, 0.2), imbalance=False)
    assert set(balanced.values()) == {(30, 10, 10)}
    tiny = class_counts(PMI_PRODUCTS, per_class=6, splits=(0.6, 0.2, 0.2), imbalance=True)
    assert min(min(c) for c in tiny.values()) >= 2
    with pytest.raises(ValueError):
        class_counts(PMI_PRODUCTS, per_class=5, splits=(0.6, 0.2, 0.2), imbalance=True)


def test_resume_regenerates_missing_files_and_refuses_other_params(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    generate_synthetic_pills(out, seed=1, products=FEW, **SMALL)  # type: ignore[arg-type]
    before = _files(out)
    victim = next(iter(before))
    (out / victim).unlink()
    again = generate_synthetic_pills(out, seed=1, products=FEW, **SMALL)  # type: ignore[arg-type]
    assert (again.generated, again.skipped) == (1, len(before) - 1)
    assert _files(out) == before
    with pytest.raises(ValueError, match="other parameters"):
        generate_synthetic_pills(out, seed=2, products=FEW, **SMALL)  # type: ignore[arg-type]
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        generate_synthetic_pills(tmp_path / "busy", seed=1, products=FEW, **SMALL)  # type: ignore[arg-type]


def test_render_bottle_size_aspect_and_config_knobs() -> None:
    product = pmi_product("50111-0434")
    image = render_bottle(product, rng=np.random.default_rng(0), image_size=64)
    assert image.size == (85, 64) and image.mode == "RGB"
    square = render_bottle(product, rng=np.random.default_rng(0), image_size=64, config=SynthConfig(aspect=1.0))
    assert square.size == (64, 64)
    clean = SynthConfig(blur=(0.0, 0.0), noise=(0.0, 0.0))
    a = np.asarray(render_bottle(product, rng=np.random.default_rng(1), image_size=64, config=clean), dtype=float)
    b = np.asarray(render_bottle(product, rng=np.random.default_rng(1), image_size=64), dtype=float)
    assert np.abs(a - b).mean() > 1.0  # blur and noise knobs really change the photo
    with pytest.raises(ValueError, match="shape"):
        render_bottle(dataclasses.replace(product, shape="Triangle"), rng=np.random.default_rng(0), image_size=32)
    with pytest.raises(ValueError, match="colour"):
        render_bottle(dataclasses.replace(product, colour="Plaid"), rng=np.random.default_rng(0), image_size=32)


def test_pill_size_follows_table8_millimetres() -> None:
    """With the same scene draws, an 11 mm tablet covers ~(11/6)^2 more pixels per pill than a 6 mm one."""
    config = SynthConfig(min_pills=1, max_pills=1, blur=(0.0, 0.0), noise=(0.0, 0.0), lighting=0.0)
    big, small = pmi_product("50111-0434"), pmi_product("00378-0208")
    clean = {}
    for product in (big, small):
        with_pill = render_bottle(product, rng=np.random.default_rng(3), image_size=256, config=config)
        clean[product.ndc] = np.asarray(with_pill.convert("L"), dtype=float)
    # White pills are the brightest pixels on an amber floor; count them.
    ratio = (clean[big.ndc] > 200).sum() / max(1, (clean[small.ndc] > 200).sum())
    assert ratio == pytest.approx((11 / 6) ** 2, rel=0.35)


def test_cli_writes_dataset_and_prints_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    synth_command.register(parser.add_subparsers())
    out = tmp_path / "cli"
    args = parser.parse_args(["synth", "--out", str(out), "--per-class", "6", "--image-size", "24",
                              "--seed", "3", "--workers", "1"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "50111-0434" in printed and "train" in printed and "images rendered" in printed
    assert (out / "manifest.json").exists() and len(list(out.rglob("*.jpg"))) >= 20 * 6
    bad = parser.parse_args(["synth", "--out", str(out), "--per-class", "6", "--seed", "4"])
    assert bad.func(bad) == 2
    assert "other parameters" in capsys.readouterr().err
    knobs = parser.parse_args(["synth", "--out", str(tmp_path / "knobs"), "--per-class", "6", "--image-size", "24",
                               "--workers", "1", "--set", "blur=0,0", "--set", "tilt=0.1"])
    assert knobs.func(knobs) == 0
    params = json.loads((tmp_path / "knobs" / "manifest.json").read_text())["params"]["config"]
    assert params["blur"] == [0.0, 0.0] and params["tilt"] == 0.1
    unknown = parser.parse_args(["synth", "--out", str(tmp_path / "x"), "--set", "sharpness=2"])
    assert unknown.func(unknown) == 2
    assert "KNOB=VALUE" in capsys.readouterr().err


def test_imprint_fade_makes_small_tablets_imprints_shallower() -> None:
    small = pmi_product("00378-0208")  # 6 mm
    base = SynthConfig(blur=(0.0, 0.0), noise=(0.0, 0.0))

    def render(**knobs: object) -> np.ndarray:
        config = dataclasses.replace(base, **knobs)  # type: ignore[arg-type]
        return np.asarray(render_bottle(small, rng=np.random.default_rng(5), image_size=128, config=config), dtype=float)

    blank = render(imprint_contrast=(0.0, 0.0))
    full, faded = render(), render(imprint_fade_mm=60.0)  # contrast x (6/60)^2 = 0.01
    assert np.abs(full - blank).mean() > 5 * np.abs(faded - blank).mean()
    assert np.array_equal(render(imprint_fade_mm=6.0), full)  # at or above the fade size: unchanged
