"""Train/eval presets: shapes, normalisation, determinism, JPEG draft decoding."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from models.transforms import CenterSquareCrop, EvalPreset, TrainPreset

MEAN = (0.5, 0.4, 0.3)
STD = (0.2, 0.25, 0.3)


def _photo(width: int = 128, height: int = 96, *, seed: int = 0) -> Image.Image:
    """A smooth random colour image (JPEG-friendly), like a downscaled photo."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC)


def test_eval_preset_shape_dtype_and_normalisation() -> None:
    preset = EvalPreset(image_size=32, mean=MEAN, std=STD)
    image = Image.new("RGB", (64, 48), (255, 102, 0))
    out = preset(image)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    expected = [(1.0 - 0.5) / 0.2, (0.4 - 0.4) / 0.25, (0.0 - 0.3) / 0.3]
    assert torch.allclose(out.mean(dim=(1, 2)), torch.tensor(expected), atol=1e-4)


def test_eval_preset_is_deterministic_and_crops_the_centre() -> None:
    preset = EvalPreset(image_size=16, mean=MEAN, std=STD)
    image = _photo(120, 80)
    assert torch.equal(preset(image), preset(image))
    # Changing pixels outside the centred square must not change the output.
    edited = image.copy()
    edited.paste((0, 0, 0), (0, 0, 20, 80))
    edited.paste((0, 0, 0), (100, 0, 120, 80))
    assert torch.equal(preset(image), preset(edited))


def test_center_square_crop_uses_shorter_side() -> None:
    assert CenterSquareCrop()(Image.new("RGB", (1284, 960))).size == (960, 960)
    assert CenterSquareCrop()(Image.new("RGB", (50, 70))).size == (50, 50)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK"])
def test_any_mode_becomes_three_channels(mode: str) -> None:
    preset = EvalPreset(image_size=8, mean=MEAN, std=STD)
    assert preset(_photo(20, 10).convert(mode)).shape == (3, 8, 8)


def test_train_preset_shape_and_randomness_follows_torch_seed() -> None:
    preset = TrainPreset(image_size=24, mean=MEAN, std=STD)
    image = _photo(64, 48)
    torch.manual_seed(3)
    first = [preset(image) for _ in range(4)]
    torch.manual_seed(3)
    second = [preset(image) for _ in range(4)]
    assert all(a.shape == (3, 24, 24) for a in first)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    assert not all(torch.equal(first[0], other) for other in first[1:])


def test_train_preset_rotations_are_right_angles() -> None:
    # With scale (1, 1) the crop is the full square, so outputs differ only by the rotation.
    preset = TrainPreset(image_size=16, mean=MEAN, std=STD, scale=(1.0, 1.0))
    reference = EvalPreset(image_size=16, mean=MEAN, std=STD)(_photo(40, 30))
    rotations = [torch.rot90(reference, k, dims=(1, 2)) for k in range(4)]
    torch.manual_seed(0)
    seen = set()
    for _ in range(24):
        out = preset(_photo(40, 30))
        matches = [k for k, r in enumerate(rotations) if torch.allclose(out, r, atol=1e-5)]
        assert len(matches) >= 1
        seen.add(matches[0])
    assert seen == {0, 1, 2, 3}


def test_invalid_arguments_are_rejected() -> None:
    with pytest.raises(ValueError):
        EvalPreset(image_size=0, mean=MEAN, std=STD)
    with pytest.raises(ValueError):
        EvalPreset(image_size=8, mean=MEAN, std=(0.1, 0.0, 0.1))
    with pytest.raises(ValueError):
        TrainPreset(image_size=8, mean=MEAN, std=STD, scale=(0.0, 1.0))
    with pytest.raises(ValueError):
        EvalPreset(image_size=8, mean=MEAN, std=STD[:2])


def test_from_metadata_is_duck_typed() -> None:
    @dataclass
    class Meta:
        image_size: int = 20
        mean: tuple[float, ...] = MEAN
        std: tuple[float, ...] = STD

    preset = EvalPreset.from_metadata(Meta())
    assert (preset.image_size, preset.mean, preset.std) == (20, MEAN, STD)


def test_draft_request_keeps_enough_resolution() -> None:
    preset = EvalPreset(image_size=224, mean=MEAN, std=STD)
    width, height = preset.draft_request(1284, 960)
    assert min(width, height) >= 224
    # Smaller than needed: no reduction is requested.
    assert preset.draft_request(200, 150) == (200, 150)
    train = TrainPreset(image_size=224, mean=MEAN, std=STD)
    assert min(train.draft_request(1284, 960)) >= 224 / 0.8**0.5


def test_draft_decoding_gives_same_output_shape_and_close_values() -> None:
    preset = EvalPreset(image_size=32, mean=MEAN, std=STD)
    buffer = io.BytesIO()
    _photo(640, 480, seed=1).save(buffer, format="JPEG", quality=95)
    buffer.seek(0)
    drafted = preset.decode(buffer)
    buffer.seek(0)
    full = Image.open(buffer).convert("RGB")
    assert drafted.mode == "RGB"
    assert drafted.size[1] < full.size[1]  # libjpeg really decoded at reduced scale
    assert min(drafted.size) >= 32
    a, b = preset(drafted), preset(full)
    assert a.shape == b.shape == (3, 32, 32)
    # Values in normalised units (std ~0.25): reduced-scale DCT decoding is close to full decoding.
    assert (a - b).abs().mean() < 0.05


def test_decode_of_png_is_rgb_shrunk_by_an_integer_factor() -> None:
    """PNG has no draft: it is shrunk after decoding by the largest integer factor that keeps the shorter
    side at or above the preset's need (8 here: 1/2), and never below it."""
    buffer = io.BytesIO()
    _photo(30, 20).convert("L").save(buffer, format="PNG")
    buffer.seek(0)
    image = EvalPreset(image_size=8, mean=MEAN, std=STD).decode(buffer)
    assert image.mode == "RGB" and image.size == (15, 10)
    buffer.seek(0)
    assert EvalPreset(image_size=20, mean=MEAN, std=STD).decode(buffer).size == (30, 20)  # no room to shrink


def test_decode_applies_exif_orientation() -> None:
    preset = EvalPreset(image_size=8, mean=MEAN, std=STD)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": a portrait photo stored landscape
    buffer = io.BytesIO()
    _photo(40, 30).save(buffer, format="JPEG", exif=exif.tobytes())
    buffer.seek(0)
    width, height = preset.decode(buffer).size
    assert width < height  # upright (portrait); the draft may also have halved it
