"""Decoding user images into the RGB the models expect, whatever mode or orientation they come in.

``open_image`` checks what an image may cost before decoding any pixel: the file's
bytes, its format (only the formats in ``FORMATS``), and the width and height its
header declares. A JPEG is then decoded at the smallest scale (1/2, 1/4, 1/8) that
still covers ``max_side``, and any other large image is box-reduced in its own mode
before conversion, so one decode holds at most one full-size copy of the pixels.
"""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

# What Pillow may parse: the formats of files.IMAGE_SUFFIXES (its JPEG opener also reads cameras' multi-picture MPO).
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")


class BadImageError(ValueError):
    """A file that cannot be used as an image; the message is one line."""


class ImageTooLargeError(BadImageError):
    """An image over a limit, found before its pixels were decoded: ``what`` ("bytes" or "pixels"), amount, limit."""

    def __init__(self, message: str, what: str, amount: int, limit: int, size: tuple[int, int] | None = None) -> None:
        super().__init__(message)
        self.what, self.amount, self.limit, self.size = what, amount, limit, size


@dataclass(frozen=True)
class ImageLimits:
    """What one image may cost before it is decoded: its encoded bytes and the pixels its header declares."""

    max_bytes: int | None = None
    max_pixels: int | None = None


def display_size(image_size: tuple[int, int], max_side: int | None) -> tuple[int, int]:
    """``image_size`` scaled down (aspect kept) so its longer side is at most ``max_side``."""
    w, h = image_size
    if max_side is None or max(w, h) <= max_side:
        return w, h
    factor = max_side / max(w, h)
    return max(1, round(w * factor)), max(1, round(h * factor))


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """``image`` as 8-bit RGB: EXIF orientation applied, first frame, alpha over ``background``, 16-bit scaled."""
    if image.tell() != 0:
        image.seek(0)
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float32)
        top = float(array.max(initial=0.0))
        if image.mode == "F" and top <= 1.0:
            peak = 1.0  # floating-point intensities in [0, 1]
        else:
            peak = 65535.0 if image.mode.startswith("I;16") or top > 255 else 255.0
        image = Image.fromarray(np.clip(array * (255.0 / peak), 0, 255).round().astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, background)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return image.convert("RGB")


def data_url_bytes(url: str, max_bytes: int | None = None) -> bytes:
    """The bytes of a base64 ``data:`` URL; one too large is refused from its length, before decoding."""
    header, comma, body = url.partition(",")
    if not comma or not header.startswith("data:") or not header.endswith(";base64"):
        raise BadImageError("not a base64 data: URL")
    # 4 base64 characters carry 3 bytes; padding makes the estimate at most 2 bytes high.
    estimate = len(body) * 3 // 4
    if max_bytes is not None and estimate - 2 > max_bytes:
        raise ImageTooLargeError(f"data: URL of about {estimate:,} bytes; the limit is {max_bytes:,}",
                                 "bytes", estimate, max_bytes)
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError) as e:
        raise BadImageError(f"data: URL is not valid base64 ({e})") from e


def _check_pixels(image: Image.Image, limits: ImageLimits, name: str = "image") -> None:
    """``ImageTooLargeError`` when the header of the opened, not yet decoded, ``image`` declares too many pixels."""
    width, height = image.size
    if limits.max_pixels is not None and width * height > limits.max_pixels:
        raise ImageTooLargeError(f"{name}: refused, {width}x{height} is more than the decompression-bomb limit of "
                                 f"{limits.max_pixels:,} pixels", "pixels", width * height, limits.max_pixels,
                                 (width, height))


def _encoded_size(source: Path | bytes) -> int:
    """Bytes of an encoded image held in memory or on disk."""
    return len(source) if isinstance(source, bytes) else source.stat().st_size


def _shrink(image: Image.Image, max_side: int) -> Image.Image:
    """A decoded ``image`` box-reduced in its own mode to about twice ``max_side``, EXIF kept (as is if it cannot be)."""
    factor = max(image.size) // (2 * max_side)
    if factor < 2 or image.mode in ("1", "P", "I;16", "I;16B", "I;16L"):  # modes Image.reduce refuses
        return image
    reduced = image.reduce(factor)
    reduced.info["exif"] = image.getexif().tobytes()  # TIFF keeps orientation in its own tags, not in info
    return reduced


def open_image(source: str | Path | bytes, limits: ImageLimits | None = None, max_side: int | None = None,
               name: str | None = None) -> Image.Image:
    """The image in ``source`` (a path or the encoded bytes) as RGB, at most ``max_side`` on its longer side.

    Raises ``BadImageError`` naming ``name`` (default: the path) in one line:
    ``ImageTooLargeError`` when ``limits`` (default: Pillow's decompression-bomb
    limit) refuse it, which is decided before any pixel is decoded.
    """
    limits = limits or ImageLimits(max_pixels=Image.MAX_IMAGE_PIXELS)
    source = source if isinstance(source, bytes) else Path(source)
    name = name or (str(source) if isinstance(source, Path) else "image")
    try:
        size = _encoded_size(source)
        if size == 0:
            raise BadImageError(f"{name}: empty file")
        if limits.max_bytes is not None and size > limits.max_bytes:
            raise ImageTooLargeError(f"{name}: {size:,} bytes; the limit is {limits.max_bytes:,}",
                                     "bytes", size, limits.max_bytes)
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source, formats=FORMATS) as image:
            _check_pixels(image, limits, name)
            if max_side is not None:
                image.draft(None, display_size(image.size, max_side))  # JPEG: decode at a reduced scale
            image.load()
            rgb = to_rgb(_shrink(image, max_side) if max_side is not None else image)
    except BadImageError:
        raise
    except Image.UnidentifiedImageError as e:
        raise BadImageError(f"{name}: not a readable image (not a PNG, JPEG, WebP, GIF, BMP or TIFF file)") from e
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{name}: refused, larger than Pillow's decompression-bomb limit ({e})",
                                 "pixels", 0, Image.MAX_IMAGE_PIXELS or 0) from e
    except Exception as e:  # decoders of corrupt files raise OSError, SyntaxError, struct.error, IndexError, ...
        raise BadImageError(f"{name}: not a readable image ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
                            ) from e
    size = display_size(rgb.size, max_side)
    return rgb if size == rgb.size else rgb.resize(size, Image.LANCZOS, reducing_gap=3.0)
