"""Image presets for training and evaluation (paper, section 5.3.3), in the style of torchvision's references.

Both presets take a PIL image (any mode; it is converted to RGB) of any aspect ratio and return a
normalised float tensor of shape (3, image_size, image_size):

- `TrainPreset`: centre crop to the square of the shorter side (960x960 for PMI's 1284x960 photos),
  random resized crop at ratio 1 with area scale in `scale`, resize to `image_size`, a random
  right-angle rotation (0/90/180/270 degrees), then normalise.
- `EvalPreset`: centre square crop, resize, normalise. The serving path and training-time evaluation
  both use it, so a model sees exactly the same pixels in validation and in production.

Randomness comes from torch's global generator, so `torch.manual_seed` and DataLoader worker seeding
make training augmentation reproducible.

JPEG decoding at reduced scale: `preset.decode(source)` opens an image with `Image.draft`, which lets
libjpeg decode at 1/2, 1/4 or 1/8 scale (several times faster for large photos). `draft_request` picks
the request so that the decoded shorter side never drops below what the preset needs, so the output
tensor has the same shape and nearly the same values as a full-resolution decode.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

logger = logging.getLogger(__name__)

ImageSource = str | Path | IO[bytes]


class _PresetMetadata(Protocol):
    @property
    def image_size(self) -> int: ...
    @property
    def mean(self) -> Sequence[float]: ...
    @property
    def std(self) -> Sequence[float]: ...


# 16-bit (and 32-bit integer) greyscale: Pillow's convert() clips these at 255 instead of scaling them.
_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# Modes `reduce_to` converts before shrinking: palettes and 1-bit (averaged indices mean nothing), and the
# wide greyscale modes, scaled to 8 bits first (to_rgb) as they would be afterwards.
_NOT_REDUCIBLE = ("1", "P", "PA", *_WIDE_GREY)


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` in RGB. 16-bit greyscale is scaled to 8 bits first (the top byte, as the PNG specification
    defines the samples over the full 16-bit range); a plain `convert("RGB")` would clip every value above
    255, turning a normal 16-bit photo white."""
    if image.mode == "RGB":
        return image
    if image.mode in _WIDE_GREY:
        values = np.asarray(image)
        if values.dtype.itemsize > 2:  # mode I (int32): 16-bit samples read into a wider type
            values = np.clip(values, 0, 65535)
        image = Image.fromarray((values >> 8).astype(np.uint8), "L")
    return image.convert("RGB")


def reduce_to(image: Image.Image, request: tuple[int, int]) -> Image.Image:
    """Shrink by the largest integer factor that keeps both sides at or above `request` (box filter).

    What a JPEG draft does while decoding, for the formats that have none (PNG, WebP): the later steps then
    work on a small image, not a copy of a 40-megapixel one. Palette and 1-bit images are converted first
    (averaging palette indices would mean nothing).
    """
    factor = min(image.width // max(1, request[0]), image.height // max(1, request[1]))
    if factor < 2:
        return image
    if image.mode in _NOT_REDUCIBLE:
        image = to_rgb(image)
    return image.reduce(factor)


def upright_rgb(image: Image.Image, *, request: tuple[int, int] | None = None) -> Image.Image:
    """A loaded image as the model reads it: shrunk towards `request` if given (`reduce_to`), turned upright by
    its EXIF orientation (a malformed EXIF block is ignored, with a warning), in RGB (`to_rgb`). Training's
    `decode` and the serving decoder (app.inference.images) both go through it."""
    if request is not None:
        image = reduce_to(image, request)
    try:
        ImageOps.exif_transpose(image, in_place=True)
    except (OSError, SyntaxError, ValueError, TypeError, KeyError) as error:
        # The pixels are fine; the model is trained with right-angle rotations, so a lost orientation
        # only costs robustness, not correctness.
        logger.warning("ignoring malformed EXIF orientation: %s", error)
    return to_rgb(image)


class ConvertRGB(torch.nn.Module):
    """Convert a PIL image of any mode (L, P, RGBA, CMYK, 16-bit grey, ...) to RGB (`to_rgb`); tensors pass."""

    def forward(self, image: Any) -> Any:
        if isinstance(image, Image.Image):
            return to_rgb(image)
        return image


class CenterSquareCrop(torch.nn.Module):
    """Crop the centred square whose side is the image's shorter side."""

    def forward(self, image: Any) -> Any:
        height, width = F.get_size(image)
        side = min(height, width)
        if height == width:
            return image
        return F.center_crop(image, [side, side])


class RandomRightAngleRotation(torch.nn.Module):
    """Rotate a CHW tensor by 0, 90, 180 or 270 degrees, chosen uniformly (exact, no interpolation)."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        quarter_turns = int(torch.randint(0, 4, ()).item())
        if quarter_turns == 0:
            return image
        return torch.rot90(image, quarter_turns, dims=(-2, -1))


def _check_stats(mean: Sequence[float], std: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean_t = tuple(float(m) for m in mean)
    std_t = tuple(float(s) for s in std)
    if len(mean_t) != len(std_t) or not mean_t:
        raise ValueError(f"mean and std must have the same, non-zero length (got {len(mean_t)} and {len(std_t)})")
    if any(not math.isfinite(s) or s <= 0 for s in std_t):
        raise ValueError(f"std must be finite and positive, got {std_t}")
    return mean_t, std_t


def pixel_range(mean: Sequence[float], std: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel range of normalised inputs whose pixels lie in [0, 1]: ((0 - m) / s, (1 - m) / s).

    What Algorithm 1's optional clamp needs for images normalised with `mean`/`std` (`CsadaConfig.clamp`).
    """
    mean_t, std_t = _check_stats(mean, std)
    return (tuple(-m / s for m, s in zip(mean_t, std_t, strict=True)),
            tuple((1.0 - m) / s for m, s in zip(mean_t, std_t, strict=True)))


class _Preset:
    """Shared parts: RGB conversion, decoding with JPEG draft, call."""

    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    transforms: v2.Compose

    def _min_decoded_side(self) -> int:
        """Shorter side the decoded image must keep so that no later step upsamples."""
        return self.image_size

    def draft_request(self, width: int, height: int) -> tuple[int, int]:
        """Size to pass to `Image.draft("RGB", size)` for a `width` x `height` image.

        Pillow picks the largest JPEG scale 1/s (s in 8, 4, 2, 1) that keeps both sides at or above the
        request, so the decoded shorter side stays >= `_min_decoded_side()` and the preset's output
        size is unchanged. For images already that small this returns the original size (no draft).
        """
        need = self._min_decoded_side()
        short = min(width, height)
        if short <= need:
            return width, height
        return math.ceil(width * need / short), math.ceil(height * need / short)

    def decode(self, source: ImageSource) -> Image.Image:
        """Open an image file or stream, decoding JPEGs at reduced scale where safe (other formats are shrunk
        the same way after decoding); returns upright RGB, as the serving decoder (app.inference.images) does."""
        with Image.open(source) as image:
            request = self.draft_request(*image.size)
            image.draft("RGB", request)
            image.load()
            upright = upright_rgb(image, request=request)
            if upright is image:  # upright_rgb returns the opened image itself when nothing changed
                upright = image.copy()
            return upright

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        """Transform one image into a normalised (3, image_size, image_size) float tensor."""
        out = self.transforms(image)
        return out.as_subclass(torch.Tensor)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(image_size={self.image_size}, mean={self.mean}, std={self.std})"


class TrainPreset(_Preset):
    """Training augmentation of the paper (section 5.3.3): square crop, RandomResizedCrop, right-angle rotation."""

    def __init__(
        self,
        *,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        scale: tuple[float, float] = (0.8, 1.0),
    ) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {scale}")
        self.image_size = int(image_size)
        self.mean, self.std = _check_stats(mean, std)
        self.scale = (float(scale[0]), float(scale[1]))
        self.transforms = v2.Compose([
            ConvertRGB(),
            CenterSquareCrop(),
            v2.RandomResizedCrop(self.image_size, scale=self.scale, ratio=(1.0, 1.0), antialias=True),
            v2.ToImage(),
            RandomRightAngleRotation(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(self.mean), std=list(self.std)),
        ])

    def _min_decoded_side(self) -> int:
        # The smallest crop covers scale[0] of the square's area; its side must still reach image_size.
        return math.ceil(self.image_size / math.sqrt(self.scale[0]))


class EvalPreset(_Preset):
    """Evaluation and serving transform: centre square crop, resize, normalise (deterministic)."""

    def __init__(self, *, image_size: int, mean: Sequence[float], std: Sequence[float]) -> None:
        if image_size < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.image_size = int(image_size)
        self.mean, self.std = _check_stats(mean, std)
        self.transforms = v2.Compose([
            ConvertRGB(),
            CenterSquareCrop(),
            v2.Resize((self.image_size, self.image_size), antialias=True),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(self.mean), std=list(self.std)),
        ])

    @classmethod
    def from_metadata(cls, metadata: _PresetMetadata) -> EvalPreset:
        """Build the preset a checkpoint was trained with (any object with image_size, mean, std)."""
        return cls(image_size=int(metadata.image_size), mean=metadata.mean, std=metadata.std)
