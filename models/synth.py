"""Synthetic look-alike of the PMI dataset: top-down photos of open pill bottles, one product per bottle.

Each image shows an open vial seen from above (floor, wall annulus and rim on a textured counter) holding
dozens of overlapping, randomly placed and rotated pills of one NDC, drawn from the product's Table 8
shape, colour, imprint and size. Photos get a lighting gradient, vignette, white-balance cast, blur,
Gaussian noise and JPEG compression.

What makes it hard, on purpose: most products are white round tablets. Their only differences are the
imprint (small, debossed at low contrast, often occluded by other pills or cut by the wall, a few
pixels high at 64 px) and the size in mm, and the size is blurred by the per-image scale (vial diameter
`bottle_mm` varies, so apparent size varies by about +/-9% at the defaults, about the 10 vs 11 mm gap).
At the defaults a small 5-layer CNN trained 30 epochs at 64 px reached 71% test accuracy, its errors
concentrated in the same-size white groups (127/128, 831/832, MP;71 vs ZC;80, amiodarone -> allopurinol).

Determinism: every image has its own `numpy.random.Generator` seeded from (seed, NDC, index), so
images can be rendered in any order, in parallel, or resumed, and a given seed gives byte-identical
files (with the same Pillow/libjpeg build).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from models.pmi import PMI_PRODUCTS, PmiProduct

logger = logging.getLogger(__name__)

SPLIT_NAMES: tuple[str, ...] = ("train", "valid", "test")
GENERATOR_VERSION = "rxverify-synth-v1"

# Short/long axis ratio of each Table 8 shape; Table 8's size is read as the long axis in mm.
SHAPE_ASPECT: dict[str, float] = {"round": 1.0, "oval": 0.62, "capsule": 0.42}
PILL_COLOURS: dict[str, tuple[int, int, int]] = {
    "white": (236, 236, 230), "brown": (150, 98, 62), "orange": (228, 142, 72), "yellow": (236, 208, 106),
    "pink": (236, 170, 180), "blue": (120, 160, 220), "green": (140, 190, 130), "red": (200, 72, 60),
    "grey": (170, 170, 170), "gray": (170, 170, 170),
}
_AMBER_FLOORS = ((150, 82, 30), (120, 62, 22), (175, 110, 50))
_PLAIN_FLOORS = ((215, 215, 210), (60, 60, 66))
_TEXT_RENDER_PX = 48


@dataclass(frozen=True)
class SynthConfig:
    """Difficulty knobs; (low, high) pairs are drawn uniformly per image. Pixel values assume 256 px height.

    - aspect: photo width / height (4:3, so the square centre crop matters).
    - bottle_fill: inner vial diameter as a fraction of the image height.
    - bottle_mm: inner vial diameter in mm; sets the mm->px scale, so its spread is the per-image size
      uncertainty (30-36 mm: +/-9%, so 10 and 11 mm tablets cannot be told apart by size alone).
    - pill_coverage: total pill area / vial floor area (above 1 the pills pile up and occlude).
    - min_pills / max_pills: bounds on the pill count.
    - size_jitter: per-pill relative size std (manufacturing tolerance, height in the pile).
    - tilt: maximal foreshortening of a tilted pill (0.25: the short axis shrinks by up to 25%).
    - imprint_contrast: how much a debossed imprint stroke darkens the pill (fraction of brightness).
    - imprint_height: imprint text height as a fraction of the pill's short axis.
    - imprint_blur: Gaussian radius of the imprint strokes, as a fraction of the pill's long axis.
    - imprint_visible: probability that a pill shows its imprinted face (the rest show a blank face).
    - imprint_fade_mm: when positive, tablets smaller than this many mm get shallower imprints: the
      contrast is scaled by (size / imprint_fade_mm)^2 (0: every size at full contrast).
    - blur: Gaussian blur radius of the whole photo in px.
    - noise: Gaussian pixel noise std on the 0-1 scale.
    - lighting: strength of the linear lighting gradient and vignette.
    - colour_cast: per-channel white-balance jitter (std, relative).
    - tint: per-image pill colour variation (std, relative, per channel).
    - jpeg_quality: JPEG quality range.
    - counter: range of each RGB channel of the counter around the vial.
    - plain_floor_share: probability of a white or black vial floor instead of an amber one.
    - min_per_split: fewest images of a class in any split.
    """

    aspect: float = 4 / 3
    bottle_fill: tuple[float, float] = (0.80, 0.92)
    bottle_mm: tuple[float, float] = (30.0, 36.0)
    pill_coverage: tuple[float, float] = (1.0, 2.2)
    min_pills: int = 8
    max_pills: int = 120
    size_jitter: float = 0.03
    tilt: float = 0.25
    imprint_contrast: tuple[float, float] = (0.2, 0.45)
    imprint_height: float = 0.3
    imprint_blur: float = 0.02
    imprint_visible: float = 1.0
    imprint_fade_mm: float = 0.0
    blur: tuple[float, float] = (0.2, 0.9)
    noise: tuple[float, float] = (0.01, 0.035)
    lighting: float = 0.35
    colour_cast: float = 0.025
    tint: float = 0.015
    jpeg_quality: tuple[int, int] = (75, 92)
    counter: tuple[float, float] = (40.0, 225.0)
    plain_floor_share: float = 0.3
    min_per_split: int = 2


@dataclass(frozen=True)
class SynthResult:
    """What a generation run produced: images per split and class, and timing."""

    out: Path
    counts: dict[str, dict[str, int]]
    generated: int
    skipped: int
    elapsed_s: float
    manifest: dict[str, Any] = field(repr=False)

    @property
    def total(self) -> int:
        """Number of images in the dataset."""
        return sum(sum(per_class.values()) for per_class in self.counts.values())


def class_counts(
    products: Sequence[PmiProduct], *, per_class: int, splits: tuple[float, float, float], imbalance: bool,
    min_per_split: int = 2,
) -> dict[str, tuple[int, int, int]]:
    """Images per (train, valid, test) for each NDC; with `imbalance`, proportional to Table 8 totals."""
    if per_class < 3 * min_per_split:
        raise ValueError(f"per_class must be at least {3 * min_per_split}, got {per_class}")
    if len(splits) != 3 or min(splits) < 0 or sum(splits) <= 0:
        raise ValueError(f"splits must be three non-negative fractions, got {splits}")
    totals = {p.ndc: p.train_size + p.valid_size + p.test_size for p in products}
    largest = max(totals.values())
    weight = sum(splits)
    counts: dict[str, tuple[int, int, int]] = {}
    for ndc, total in totals.items():
        n = round(per_class * total / largest) if imbalance else per_class
        n = max(n, 3 * min_per_split)
        n_valid = max(min_per_split, round(n * splits[1] / weight))
        n_test = max(min_per_split, round(n * splits[2] / weight))
        counts[ndc] = (n - n_valid - n_test, n_valid, n_test)
    return counts


@lru_cache(maxsize=256)
def _text_mask(text: str) -> Image.Image:
    """The imprint text in white on black (mode L), rendered once at a large size and cropped."""
    font = ImageFont.load_default(size=_TEXT_RENDER_PX)
    probe = ImageDraw.Draw(Image.new("L", (1, 1)))
    left, top, right, bottom = probe.multiline_textbbox((0, 0), text, font=font, align="center", spacing=2)
    mask = Image.new("L", (max(1, math.ceil(right - left)), max(1, math.ceil(bottom - top))), 0)
    ImageDraw.Draw(mask).multiline_text((-left, -top), text, fill=255, font=font, align="center", spacing=2)
    return mask


def _imprint_sides(imprint: tuple[str, ...]) -> tuple[str, ...]:
    """Faces of a tablet: one imprint is paired with a blank back; with 3+ parts all but the last stack."""
    if len(imprint) <= 1:
        return (imprint[0] if imprint else "", "")
    if len(imprint) == 2:
        return imprint
    return ("\n".join(imprint[:-1]), imprint[-1])


def _pill_sprite(
    *, text: str, long_px: float, aspect: float, colour: np.ndarray, contrast: float, cfg: SynthConfig,
    light: tuple[float, float],
) -> Image.Image:
    """One face of the pill as an RGBA sprite: shaded body, darker bevel, debossed imprint."""
    k = 4  # supersampling factor: edges and imprint strokes are drawn large, then box-reduced
    long_hr, short_hr = max(long_px, 2.0) * k, max(long_px * aspect, 2.0) * k
    w, h = math.ceil(long_hr) + 2 * k, math.ceil(short_hr) + 2 * k
    w, h = w + (-w) % k, h + (-h) % k
    box = ((w - long_hr) / 2, (h - short_hr) / 2, (w + long_hr) / 2, (h + short_hr) / 2)
    alpha = Image.new("L", (w, h), 0)
    ImageDraw.Draw(alpha).rounded_rectangle(box, radius=short_hr / 2, fill=255)

    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    u = (xs - w / 2) / (long_hr / 2)
    v = (ys - h / 2) / (short_hr / 2)
    r = np.clip(np.sqrt(u * u + v * v), 0.0, 1.0)
    # A domed top lit from `light`, with a darker bevel ring near the edge.
    shade = 1.0 + 0.12 * (light[0] * u + light[1] * v) - 0.28 * r**8 - 0.04 * r**2
    if text:
        mask = _text_mask(text)
        lines = text.count("\n") + 1
        scale = min(0.78 * long_hr / mask.width, min(0.62, cfg.imprint_height * lines) * short_hr / mask.height)
        tw, th = max(1, round(mask.width * scale)), max(1, round(mask.height * scale))
        text_layer = Image.new("L", (w, h), 0)
        text_layer.paste(mask.resize((tw, th), Image.Resampling.BILINEAR), ((w - tw) // 2, (h - th) // 2))
        radius = cfg.imprint_blur * long_hr
        if radius > 0:
            text_layer = text_layer.filter(ImageFilter.GaussianBlur(radius))
        shade = shade * (1.0 - contrast * np.asarray(text_layer, dtype=np.float32) / 255.0)
    rgb = np.clip(colour[None, None, :] * shade[:, :, None], 0, 255).astype(np.uint8)
    sprite = Image.fromarray(rgb, "RGB")
    sprite.putalpha(alpha)
    return sprite.reduce(k)


@lru_cache(maxsize=8)
def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    return ys, xs


@lru_cache(maxsize=4)
def _noise_bank(size: int) -> np.ndarray:
    """Fixed standard-normal samples (2x `size`); each photo takes a random window, which is far cheaper
    than drawing fresh normals and still deterministic in every process."""
    return np.random.default_rng(0x5EED).standard_normal(2 * size, dtype=np.float32)


def _smooth_noise(rng: np.random.Generator, *, height: int, width: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid upsampled bicubically."""
    coarse = rng.uniform(0, 255, size=(cells, max(2, round(cells * width / height)))).astype(np.uint8)
    big = Image.fromarray(coarse, "L").resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(big, dtype=np.float32) / 127.5 - 1.0


def render_bottle(
    product: PmiProduct, *, rng: np.random.Generator, image_size: int, config: SynthConfig = SynthConfig()
) -> Image.Image:
    """Render one top-down photo (RGB, `image_size` high, `config.aspect` wide) of a vial of `product`."""
    shape = product.shape.lower()
    colour_name = product.colour.lower()
    if shape not in SHAPE_ASPECT:
        raise ValueError(f"{product.ndc}: unsupported shape {product.shape!r} (known: {sorted(SHAPE_ASPECT)})")
    if colour_name not in PILL_COLOURS:
        raise ValueError(f"{product.ndc}: unsupported colour {product.colour!r} (known: {sorted(PILL_COLOURS)})")
    cfg = config
    height, width = image_size, round(image_size * cfg.aspect)
    px = image_size / 256.0  # knobs in pixels are given for a 256 px high photo
    ys, xs = _grid(height, width)
    f32 = np.float32

    # Scene layout.
    r_in = rng.uniform(*cfg.bottle_fill) * height / 2
    wall = r_in * rng.uniform(0.06, 0.10)
    cx = width / 2 + rng.uniform(-0.06, 0.06) * height
    cy = height / 2 + rng.uniform(-0.04, 0.04) * height
    px_per_mm = 2 * r_in / rng.uniform(*cfg.bottle_mm)
    light_angle = rng.uniform(0, 2 * math.pi)
    light = (-math.cos(light_angle), -math.sin(light_angle))
    dist = np.sqrt((xs - f32(cx)) ** 2 + (ys - f32(cy)) ** 2)[:, :, None]

    # Counter (outside the vial), floor and wall, with texture; all float32 (H, W, 3).
    counter = rng.uniform(*cfg.counter, size=3).astype(f32)
    texture = _smooth_noise(rng, height=height, width=width, cells=6)[:, :, None]
    base = counter * (f32(1) + f32(0.12) * texture)
    floors = _AMBER_FLOORS if rng.random() < 1 - cfg.plain_floor_share else _PLAIN_FLOORS
    floor = (np.asarray(floors[rng.integers(len(floors))]) * rng.uniform(0.85, 1.1, size=3)).astype(f32)
    rel = np.minimum(dist / f32(r_in), f32(1))
    floor_img = floor * (f32(1) - f32(0.3) * rel * rel)
    wall_pos = np.clip((dist - f32(r_in)) / f32(wall), 0, 1)
    rim = np.exp(-(((dist - f32(r_in + wall)) / f32(0.8 * px)) ** 2))
    wall_img = floor * (f32(1.15) + f32(0.25) * wall_pos) + f32(40) * rim
    inside = np.clip(f32(r_in + 0.5) - dist, 0, 1)
    in_vial = np.clip(f32(r_in + wall + 0.5) - dist, 0, 1)
    surround = base + in_vial * (wall_img - base)
    canvas = Image.fromarray(np.clip(surround + inside * (floor_img - surround), 0, 255).astype(np.uint8))

    # Pills: one sprite per face for this photo, then each pill tilted, rotated and pasted with a shadow.
    aspect = SHAPE_ASPECT[shape]
    long_px = product.size_mm * px_per_mm
    colour = (np.asarray(PILL_COLOURS[colour_name]) * (1 + rng.normal(0, cfg.tint, 3))).astype(f32)
    contrast = rng.uniform(*cfg.imprint_contrast)
    if cfg.imprint_fade_mm > 0:
        contrast *= min(1.0, product.size_mm / cfg.imprint_fade_mm) ** 2
    sides = [
        _pill_sprite(text=t, long_px=long_px, aspect=aspect, colour=colour, contrast=contrast, cfg=cfg, light=light)
        for t in _imprint_sides(product.imprint)
    ]
    blank = sides[1] if not _imprint_sides(product.imprint)[1] else _pill_sprite(
        text="", long_px=long_px, aspect=aspect, colour=colour, contrast=contrast, cfg=cfg, light=light)
    pill_area = math.pi / 4 * long_px * long_px * aspect
    n_pills = round(rng.uniform(*cfg.pill_coverage) * math.pi * r_in * r_in / pill_area)
    n_pills = int(np.clip(n_pills, cfg.min_pills, cfg.max_pills))
    reach = max(r_in - 0.3 * long_px, 0.3 * r_in)
    shadow_dx, shadow_dy = round(-light[0] * 0.08 * long_px), round(-light[1] * 0.08 * long_px)
    for _ in range(n_pills):
        face = sides[int(rng.integers(len(sides)))]
        if cfg.imprint_visible < 1 and rng.random() >= cfg.imprint_visible:
            face = blank
        size = max(0.5, 1 + rng.normal(0, cfg.size_jitter))
        squash = 1 - rng.uniform(0, cfg.tilt)
        sprite = face.resize((max(1, round(face.width * size)), max(1, round(face.height * size * squash))),
                             Image.Resampling.BILINEAR)
        sprite = sprite.rotate(rng.uniform(0, 360), resample=Image.Resampling.BILINEAR, expand=True)
        rho, theta = reach * math.sqrt(rng.random()), rng.uniform(0, 2 * math.pi)
        x = round(cx + rho * math.cos(theta) - sprite.width / 2)
        y = round(cy + rho * math.sin(theta) - sprite.height / 2)
        # 45% opaque shadow: alpha * 115 / 256, in numpy (Image.point re-rounds its table on every call).
        shadow = Image.fromarray(((np.asarray(sprite.getchannel("A"), dtype=np.uint16) * 115) >> 8).astype(np.uint8))
        canvas.paste((20, 14, 8), (x + shadow_dx, y + shadow_dy, x + shadow_dx + sprite.width,
                                   y + shadow_dy + sprite.height), shadow)
        canvas.paste(sprite, (x, y), sprite)

    # The wall occludes pills that reach beyond the floor.
    pixels = np.asarray(canvas, dtype=f32)
    pixels = surround + inside * (pixels - surround)

    # Photo effects: lighting gradient + vignette, white balance, blur, noise.
    grad = ((xs - f32(cx)) * f32(-math.cos(light_angle)) + (ys - f32(cy)) * f32(-math.sin(light_angle)))[:, :, None]
    strength = cfg.lighting * rng.uniform(0.3, 1.0)
    cast = (1 + rng.normal(0, cfg.colour_cast, 3)).astype(f32)
    gain = f32(1) + f32(strength / height) * grad - f32(0.5 * strength / height**2) * dist * dist
    pixels *= gain * cast
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    radius = rng.uniform(*cfg.blur) * px
    if radius > 0.05:
        image = image.filter(ImageFilter.GaussianBlur(radius))
    sigma = f32(rng.uniform(*cfg.noise) * 255)
    bank = _noise_bank(height * width * 3)
    offset = int(rng.integers(0, bank.size // 2))
    noisy = np.asarray(image, dtype=f32) + bank[offset:offset + height * width * 3].reshape(height, width, 3) * sigma
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))


def image_seed(*, seed: int, ndc: str, index: int) -> np.random.SeedSequence:
    """Seed of one image: depends only on (seed, NDC, index), never on order or worker."""
    return np.random.SeedSequence([seed, int(ndc.replace("-", "")), index])


@dataclass(frozen=True)
class _Job:
    path: str
    product: PmiProduct
    seed: int
    index: int
    image_size: int
    config: SynthConfig


def _render_job(job: _Job) -> str:
    """Render one image to its final path atomically (temp file + rename), so resuming never sees halves."""
    rng = np.random.default_rng(image_seed(seed=job.seed, ndc=job.product.ndc, index=job.index))
    image = render_bottle(job.product, rng=rng, image_size=job.image_size, config=job.config)
    quality = int(rng.integers(job.config.jpeg_quality[0], job.config.jpeg_quality[1] + 1))
    tmp = f"{job.path}.{os.getpid()}.tmp"
    image.save(tmp, format="JPEG", quality=quality)
    os.replace(tmp, job.path)
    return job.path


def _params(
    *, per_class: int, image_size: int, seed: int, products: Sequence[PmiProduct],
    splits: tuple[float, float, float], imbalance: bool, config: SynthConfig,
) -> dict[str, Any]:
    return {
        "generator": GENERATOR_VERSION, "seed": seed, "per_class": per_class, "image_size": image_size,
        "width": round(image_size * config.aspect), "splits": list(splits), "imbalance": imbalance,
        "config": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()},
        "products": [p.ndc for p in products],
    }


def _write_manifest(out: Path, manifest: dict[str, Any]) -> None:
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, out / "manifest.json")


def generate_synthetic_pills(
    out: str | Path,
    *,
    per_class: int,
    image_size: int = 256,
    seed: int = 0,
    products: Sequence[PmiProduct] = PMI_PRODUCTS,
    splits: tuple[float, float, float] = (0.6, 0.2, 0.2),
    imbalance: bool = True,
    config: SynthConfig = SynthConfig(),
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> SynthResult:
    """Write `out/{train,valid,test}/<NDC>/*.jpg` plus `out/manifest.json`; returns the counts.

    `per_class` is the total image count of the largest Table 8 class; with `imbalance` the others are
    scaled by their Table 8 totals (at least `config.min_per_split` per split). Existing images of an
    interrupted run with the same parameters are kept (resume); a folder made with other parameters is
    refused. `workers` > 1 renders in that many "spawn" processes (same bytes as `workers=1`); a script
    calling it so needs the usual `if __name__ == "__main__":` guard. `progress(done, total)` is called
    from this process as images complete.
    """
    out = Path(out)
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16, got {image_size}")
    if not products:
        raise ValueError("no products to render")
    counts = class_counts(products, per_class=per_class, splits=splits, imbalance=imbalance,
                          min_per_split=config.min_per_split)
    params = _params(per_class=per_class, image_size=image_size, seed=seed, products=products, splits=splits,
                     imbalance=imbalance, config=config)
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        previous = json.loads(manifest_path.read_text())
        if previous.get("params") != params:
            raise ValueError(f"{out} holds a synthetic dataset made with other parameters; use an empty folder")
    elif out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} is not empty and holds no synthetic-dataset manifest")
    out.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {"params": params, "complete": False, "pillow": Image.__version__}
    _write_manifest(out, manifest)

    jobs: list[_Job] = []
    skipped = 0
    for product in products:
        index = 0
        for split, n in zip(SPLIT_NAMES, counts[product.ndc], strict=True):
            folder = out / split / product.ndc
            folder.mkdir(parents=True, exist_ok=True)
            for _ in range(n):
                path = folder / f"{product.ndc}_{index:05d}.jpg"
                if path.exists():
                    skipped += 1
                else:
                    jobs.append(_Job(str(path), product, seed, index, image_size, config))
                index += 1
    total = len(jobs)
    start = time.perf_counter()
    if workers > 1 and total > 1:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            for done, _ in enumerate(pool.map(_render_job, jobs, chunksize=8), start=1):
                if progress is not None:
                    progress(done, total)
    else:
        for done, job in enumerate(jobs, start=1):
            _render_job(job)
            if progress is not None:
                progress(done, total)
    elapsed = time.perf_counter() - start
    by_split = {split: {p.ndc: counts[p.ndc][i] for p in products} for i, split in enumerate(SPLIT_NAMES)}
    manifest.update(complete=True, counts=by_split, images=sum(sum(c) for c in counts.values()))
    _write_manifest(out, manifest)
    logger.info("synthetic pills: %d rendered, %d kept, %.1f s", total, skipped, elapsed)
    return SynthResult(out=out, counts=by_split, generated=total, skipped=skipped, elapsed_s=elapsed,
                       manifest=manifest)
