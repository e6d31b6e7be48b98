"""Upload decoding: every bad input gets its own error; good photos come out upright, RGB and drafted."""

from __future__ import annotations

import io
import struct
import time
import zlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from app.inference.images import (
    AnimatedImage,
    CorruptImage,
    ImageBlank,
    ImageEmpty,
    ImageError,
    ImageTooLarge,
    ImageTooManyPixels,
    ImageTooSmall,
    UnsupportedImageFormat,
    decode_image,
    sha256_hex,
    sniff_format,
)
from models.transforms import EvalPreset

LIMITS: dict[str, Any] = {"max_bytes": 5 * 1024 * 1024, "max_pixels": 40_000_000}


def encode(image: Image.Image, fmt: str, **params: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **params)
    return out.getvalue()


def photo(width: int = 1284, height: int = 960) -> Image.Image:
    """A smooth gradient photo (cheap to make, realistic for JPEG)."""
    gradient = Image.linear_gradient("L").resize((width, height))
    return Image.merge("RGB", (gradient, gradient.transpose(Image.Transpose.FLIP_LEFT_RIGHT), gradient))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR (with a valid CRC) claims width x height, followed by an empty IDAT and IEND."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_error_types_are_distinct_problems() -> None:
    kinds = [ImageEmpty, ImageTooLarge, UnsupportedImageFormat, ImageTooManyPixels, CorruptImage]
    assert len({k.default_slug for k in kinds}) == len(kinds)
    assert ImageTooLarge("x").slug == "image-too-large"
    assert [k.status for k in kinds] == [422, 413, 415, 422, 422]
    assert all(issubclass(k, ImageError) for k in kinds)


def test_a_blank_frame_is_refused_and_real_photos_pass_by_far() -> None:
    """RXVERIFY_MIN_IMAGE_CONTRAST (2.0 by default): grey-level standard deviation on a 64 px reduction."""
    from app.inference.bench import pmi_like_jpegs

    white = encode(Image.new("RGB", (400, 300), "white"), "PNG")
    faint = encode(Image.new("RGB", (400, 300), (30, 30, 30)), "JPEG", quality=70)
    for data in (white, faint):
        with pytest.raises(ImageBlank, match="blank or nearly uniform") as caught:
            decode_image(data, **LIMITS, min_contrast=2.0)
        assert caught.value.status == 422 and caught.value.slug == "image-blank"
        assert decode_image(data, **LIMITS).size == (400, 300)  # 0, the default of decode_image: no check
    # Rendered pill-bottle photos vary far more: 13.8 to 80.12 over the 2790 photos of the demo dataset.
    for data in pmi_like_jpegs(count=4):
        decode_image(data, **LIMITS, min_contrast=20.0)
    decode_image(encode(photo(), "JPEG"), **LIMITS, min_contrast=20.0)


def test_empty_and_oversized_uploads() -> None:
    with pytest.raises(ImageEmpty):
        decode_image(b"", **LIMITS)
    data = encode(photo(64, 48), "PNG")
    with pytest.raises(ImageTooLarge, match=str(len(data))):
        decode_image(data, max_bytes=len(data) - 1, max_pixels=10**6)


@pytest.mark.parametrize("data", [b"this is a text file named photo.jpg\n", b"%PDF-1.7\n...", b"\x00" * 100])
def test_non_images_are_unsupported(data: bytes) -> None:
    with pytest.raises(UnsupportedImageFormat, match="not a recognised image"):
        decode_image(data, **LIMITS)


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_real_images_in_other_formats_are_unsupported(fmt: str) -> None:
    with pytest.raises(UnsupportedImageFormat, match=f"is a {fmt} image") as caught:
        decode_image(encode(photo(32, 32), fmt), **LIMITS)
    assert caught.value.status == 415


def test_the_format_list_is_honoured() -> None:
    with pytest.raises(UnsupportedImageFormat, match="PNG"):
        decode_image(encode(photo(32, 32), "PNG"), allowed_formats=("jpeg",), **LIMITS)


def test_truncated_and_garbled_files_are_corrupt() -> None:
    data = encode(photo(256, 192), "JPEG", quality=90)
    with pytest.raises(CorruptImage, match="truncated"):
        decode_image(data[: len(data) // 2], **LIMITS)
    with pytest.raises(CorruptImage):
        decode_image(b"\xff\xd8\xff" + b"\x13" * 200, **LIMITS)
    png = encode(photo(64, 64), "PNG")
    with pytest.raises(CorruptImage):
        decode_image(png[:-40], **LIMITS)


def test_png_claiming_50000_squared_is_refused_from_its_header() -> None:
    data = png_header_only(50_000, 50_000)
    assert len(data) < 100
    start = time.perf_counter()
    with pytest.raises(ImageTooManyPixels) as caught:
        decode_image(data, **LIMITS)
    # 7.5 GB of RGB would take seconds even to allocate; the header check answers at once.
    assert time.perf_counter() - start < 0.5
    assert caught.value.status == 422


def test_pixel_limit_below_pillows_own_guard_is_ours() -> None:
    with pytest.raises(ImageTooManyPixels, match="8000x8000"):
        decode_image(png_header_only(8000, 8000), **LIMITS)
    with pytest.raises(ImageTooManyPixels, match="limit is 1000"):
        decode_image(encode(photo(40, 30), "PNG"), max_bytes=10**6, max_pixels=1000)


def test_truncated_loading_must_stay_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RuntimeError, match="LOAD_TRUNCATED_IMAGES"):
        decode_image(encode(photo(32, 32), "PNG"), **LIMITS)


def test_exif_orientation_is_applied() -> None:
    stored = Image.new("RGB", (60, 40), "blue")
    stored.paste(Image.new("RGB", (30, 40), "red"), (0, 0))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    image = decode_image(encode(stored, "JPEG", quality=95, exif=exif.tobytes()), **LIMITS)
    assert image.size == (40, 60)
    top, bottom = image.getpixel((20, 10)), image.getpixel((20, 50))
    assert isinstance(top, tuple) and isinstance(bottom, tuple)
    assert top[0] > 200 and top[2] < 60  # the left half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "JPEG"])
def test_accepted_formats_decode_to_rgb(fmt: str) -> None:
    source = Image.new("RGBA" if fmt != "JPEG" else "L", (48, 32), 128)
    image = decode_image(encode(source, fmt), **LIMITS)
    assert image.mode == "RGB" and image.size == (48, 32)
    assert sniff_format(encode(source, fmt)) == fmt


def test_jpeg_draft_decodes_a_pmi_sized_photo_at_reduced_scale() -> None:
    data = encode(photo(), "JPEG", quality=90)
    assert decode_image(data, **LIMITS).size == (1284, 960)
    preset = EvalPreset(image_size=224, mean=(0.5,) * 3, std=(0.25,) * 3)
    drafted = decode_image(data, draft_size=preset.draft_request, **LIMITS)
    assert drafted.size == (321, 240)  # libjpeg's 1/4 scale: the shorter side stays >= 224
    assert decode_image(data, draft_size=(224, 224), **LIMITS).size == (321, 240)
    assert preset(drafted).shape == (3, 224, 224)
    # Formats without a draft are shrunk after decoding by an integer factor to the same size (1/4 here).
    png = encode(photo(), "PNG")
    assert decode_image(png, draft_size=(224, 224), **LIMITS).size == (321, 240)
    assert decode_image(png, **LIMITS).size == (1284, 960)  # no request, no shrinking


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "JPEG"])
def test_training_and_serving_decode_a_photo_to_the_same_pixels(fmt: str, tmp_path: Any) -> None:
    """Training's `preset.decode` and the serving decoder shrink, turn and convert a photo alike."""
    stored = photo(1600, 1200).convert("RGBA") if fmt != "JPEG" else photo(1600, 1200)
    exif = Image.Exif()
    exif[0x0112] = 8  # "rotate 90 degrees counter-clockwise to display"
    path = tmp_path / f"photo.{fmt.lower()}"
    path.write_bytes(encode(stored, fmt, exif=exif.tobytes(), **({"lossless": True} if fmt == "WEBP" else {})))
    preset = EvalPreset(image_size=224, mean=(0.5,) * 3, std=(0.25,) * 3)
    served = decode_image(path.read_bytes(), draft_size=preset.draft_request, **LIMITS)
    trained = preset.decode(path)
    # Upright (portrait); JPEG's draft takes 1/4, the others the largest integer factor, 1/5: the shorter
    # side never drops below the model's 224.
    assert served.mode == trained.mode == "RGB" and served.size == trained.size == (
        (300, 400) if fmt == "JPEG" else (240, 320))
    assert served.tobytes() == trained.tobytes()


def test_16_bit_greyscale_is_scaled_to_8_bits_not_clipped() -> None:
    """Pillow's convert() clips 16-bit samples at 255: a normal 16-bit photo would come out white (and be
    refused as blank), so the top byte is taken instead, as PNG defines the samples over the full range."""
    import numpy as np

    values = np.full((96, 128), 30000, dtype=np.uint16)
    values[24:72, 32:96] = 8000  # a darker pill on a light background
    data = encode(Image.fromarray(values), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    image = decode_image(data, min_contrast=2.0, **LIMITS)
    assert image.mode == "RGB" and image.getpixel((0, 0)) == (117, 117, 117)  # 30000 >> 8
    assert image.getpixel((64, 48)) == (31, 31, 31)  # 8000 >> 8
    preset = EvalPreset(image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)
    served = decode_image(data, draft_size=preset.draft_request, **LIMITS)  # shrunk 1/2 for a 32 px model
    assert served.size == (64, 48) and preset.decode(io.BytesIO(data)).tobytes() == served.tobytes()


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_animations_are_refused(fmt: str) -> None:
    """Only the first frame would be verified, while the hash and the retained file cover every frame."""
    frames = [Image.new("RGB", (64, 64), colour) for colour in ("black", "white")]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100)
    with pytest.raises(AnimatedImage, match="2 frames") as raised:
        decode_image(data, **LIMITS)
    assert raised.value.status == 422 and raised.value.slug == "animated-image"
    assert decode_image(encode(frames[0], fmt), **LIMITS).size == (64, 64)  # a still image of it passes


def test_sha256_hex() -> None:
    assert sha256_hex(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


_SEEDS = {fmt: encode(photo(120, 90), fmt) for fmt in ("JPEG", "PNG", "WEBP")}


@settings(max_examples=150, deadline=None)
@given(st.sampled_from(sorted(_SEEDS)), st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)),
                                                 max_size=12),
       st.floats(0.05, 1.0), st.booleans())
def test_mutated_uploads_fail_only_with_image_errors(fmt: str, flips: list[tuple[float, int]], keep: float,
                                                     draft: bool) -> None:
    data = bytearray(_SEEDS[fmt])
    for where, value in flips:
        data[int(where * len(data))] = value
    data = data[: max(1, int(len(data) * keep))]
    try:
        image = decode_image(bytes(data), draft_size=(32, 32) if draft else None, **LIMITS)
    except ImageError:
        return
    assert image.mode == "RGB"


def test_the_shorter_side_must_reach_the_minimum() -> None:
    def png(width: int, height: int) -> bytes:
        out = io.BytesIO()
        Image.new("RGB", (width, height), "white").save(out, format="PNG")
        return out.getvalue()

    assert decode_image(png(32, 500), min_side=32, **LIMITS).size == (32, 500)
    for width, height in ((31, 500), (500, 31), (1, 1)):
        with pytest.raises(ImageTooSmall, match=f"{width}x{height}"):
            decode_image(png(width, height), min_side=32, **LIMITS)
    assert decode_image(png(1, 1), **LIMITS).size == (1, 1)  # the library's default checks nothing
