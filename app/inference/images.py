"""Safe image decoding for uploads: size, format, pixel-count and integrity checks, EXIF orientation, JPEG draft.

Order of checks (cheapest first, nothing large is allocated before the pixel check):
empty -> byte size -> real format sniffed from the magic bytes (never the filename or content type)
-> header-only open with only that format's plugin -> width x height from the header -> no animation
-> optional JPEG draft (decode at 1/2, 1/4 or 1/8 scale) -> full decode -> other formats shrunk to the
same size by an integer factor -> EXIF orientation -> RGB (16-bit greyscale scaled, not clipped).
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageFile, ImageStat

from app.errors import DomainError
from models.transforms import upright_rgb

logger = logging.getLogger(__name__)

DEFAULT_FORMATS = ("JPEG", "PNG", "WEBP")
# A draft request is either a fixed (width, height) for `Image.draft`, or a function of the stored image
# size returning one (pass `EvalPreset.draft_request` so the decoded image never drops below what the
# model's preset needs).
DraftSize = tuple[int, int] | Callable[[int, int], tuple[int, int]]


class ImageError(DomainError):
    """An upload that cannot be used as a photo; `slug` is the problem type, `status` the HTTP status."""

    status = 422
    default_slug = "invalid-image"
    default_title = "The image cannot be used"


class ImageEmpty(ImageError):
    """The upload has no bytes."""

    status = 422
    default_slug = "image-empty"
    default_title = "The image file is empty"


class ImageTooLarge(ImageError):
    """The upload has more bytes than allowed."""

    status = 413
    default_slug = "image-too-large"
    default_title = "The image file is too large"


class UnsupportedImageFormat(ImageError):
    """The bytes are not an image in one of the accepted formats."""

    status = 415
    default_slug = "unsupported-image-format"
    default_title = "The image format is not accepted"


class ImageTooManyPixels(ImageError):
    """The header declares more pixels than allowed (decompression-bomb guard)."""

    status = 422
    default_slug = "image-too-many-pixels"
    default_title = "The image has too many pixels"


class ImageTooSmall(ImageError):
    """Too few pixels on a side to show a bottle's contents (a thumbnail, a 1-pixel strip)."""

    status = 422
    default_slug = "image-too-small"
    default_title = "The image is too small"


class ImageBlank(ImageError):
    """A photo with next to no contrast (a covered lens, a white or black frame): no bottle to verify."""

    status = 422
    default_slug = "image-blank"
    default_title = "The photo is blank"


class AnimatedImage(ImageError):
    """An animation (animated WebP, APNG): which frame shows the bottle is anyone's guess."""

    status = 422
    default_slug = "animated-image"
    default_title = "The image is an animation"


class CorruptImage(ImageError):
    """The file is truncated or corrupt and cannot be fully decoded."""

    status = 422
    default_slug = "corrupt-image"
    default_title = "The image file is truncated or corrupt"


@dataclass(frozen=True)
class ImageLimits:
    """Upload limits (from settings: max_upload_bytes, max_image_pixels, min_image_side, allowed_image_formats,
    min_image_contrast)."""

    max_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 40_000_000
    allowed_formats: tuple[str, ...] = DEFAULT_FORMATS
    min_side: int = 32
    min_contrast: float = 0.0  # grey-level standard deviation (0-255) below which a photo is blank; 0: off

    @classmethod
    def from_settings(cls, settings: Any) -> ImageLimits:
        """Read the limits from an `app.config.Settings`-like object."""
        return cls(max_bytes=int(settings.max_upload_bytes), max_pixels=int(settings.max_image_pixels),
                   allowed_formats=tuple(settings.allowed_image_formats), min_side=int(settings.min_image_side),
                   min_contrast=float(settings.min_image_contrast))


def sha256_hex(data: bytes) -> str:
    """Lowercase hex SHA-256 of the raw upload (what the audit log stores)."""
    return hashlib.sha256(data).hexdigest()


def sniff_format(data: bytes) -> str | None:
    """The real format from the magic bytes (Pillow's format names), or None if it is not a known image."""
    head = data[:32]
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:2] == b"BM":
        return "BMP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    if head[4:8] == b"ftyp":
        return "AVIF" if head[8:12] in (b"avif", b"avis") else "HEIF"
    if head[:4] == b"\x00\x00\x01\x00":
        return "ICO"
    return None


def configure_pillow(*, max_pixels: int) -> None:
    """Process-wide Pillow settings for serving: call once at startup.

    Pillow's own bomb guard warns above `Image.MAX_IMAGE_PIXELS` and refuses above twice that. It is
    raised to our limit when lower, so that our own check (which runs on every decode) is the one that
    decides, and truncated files are never silently padded.
    """
    current = Image.MAX_IMAGE_PIXELS
    if current is None or current < max_pixels:
        Image.MAX_IMAGE_PIXELS = max_pixels
    ImageFile.LOAD_TRUNCATED_IMAGES = False


def decode_image(data: bytes, *, max_bytes: int, max_pixels: int,
                 allowed_formats: Sequence[str] = DEFAULT_FORMATS, draft_size: DraftSize | None = None,
                 min_side: int = 1, min_contrast: float = 0.0) -> Image.Image:
    """Decode an upload into an upright RGB image, or raise an `ImageError` subclass saying why not.

    `min_contrast`: refuse (ImageBlank) a photo whose grey levels vary less than this (standard deviation
    on a 0-255 scale, measured on a 64 px reduction): the model names a product for any input, a white
    frame included, so a frame with nothing in it is refused rather than verified.
    """
    if not data:
        raise ImageEmpty("the image file is empty")
    if len(data) > max_bytes:
        raise ImageTooLarge(f"the image file has {len(data)} bytes; the limit is {max_bytes}")
    allowed = tuple(fmt.upper() for fmt in allowed_formats)
    real = sniff_format(data)
    if real is None:
        raise UnsupportedImageFormat(f"the file is not a recognised image; accepted formats: {', '.join(allowed)}")
    if real not in allowed:
        raise UnsupportedImageFormat(f"the file is a {real} image; accepted formats: {', '.join(allowed)}")
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Someone enabled padding of truncated files process-wide; a half photo must never be verified.
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is enabled; call configure_pillow() at startup")
    try:
        # Only the sniffed format's plugin parses the header; no pixel data is read yet.
        image = Image.open(io.BytesIO(data), formats=[real])
    except Image.DecompressionBombError as error:
        raise ImageTooManyPixels(f"the image declares too many pixels ({error})") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        raise CorruptImage(f"the {real} header cannot be read: {error}") from None
    # Decoded from memory (BytesIO): nothing to close, and every path below returns or raises.
    width, height = image.size
    if width < 1 or height < 1:
        raise CorruptImage(f"the {real} header declares an empty {width}x{height} image")
    if width * height > max_pixels:
        raise ImageTooManyPixels(f"the image is {width}x{height} = {width * height} pixels; "
                                 f"the limit is {max_pixels}")
    if min(width, height) < min_side:
        # The model would still name a product for it (it always does): refuse instead of guessing.
        raise ImageTooSmall(f"the image is {width}x{height}; each side needs at least {min_side} pixels")
    if getattr(image, "is_animated", False):
        # Only the first frame would be verified, while the audit hash and the retained file cover them all.
        raise AnimatedImage(f"the {real} image has {getattr(image, 'n_frames', 'several')} frames; send one still "
                            "photo")
    request = None
    if draft_size is not None:
        request = draft_size(width, height) if callable(draft_size) else draft_size
        if real == "JPEG":
            image.draft("RGB", request)
    try:
        image.load()
    except Image.DecompressionBombError as error:
        raise ImageTooManyPixels(f"the image declares too many pixels ({error})") from None
    except (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError) as error:
        raise CorruptImage(f"the {real} data is truncated or corrupt: {error}") from None
    # Other formats than JPEG are shrunk to the same request right after decoding, before the copies that the
    # orientation, the RGB conversion and the contrast check make (models.transforms.upright_rgb).
    upright = upright_rgb(image, request=request)
    if min_contrast > 0:
        grey = upright.convert("L")
        grey.thumbnail((64, 64), Image.Resampling.BOX)
        contrast = ImageStat.Stat(grey).stddev[0]
        if contrast < min_contrast:
            raise ImageBlank(f"the photo is blank or nearly uniform (grey-level standard deviation {contrast:.2f} "
                             f"of 255, below {min_contrast:g}): check the camera and take it again")
    return upright
