"""Decoding user images into the RGB the models expect, whatever mode or orientation they come in."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps


class BadImageError(ValueError):
    """A file that cannot be used as an image; the message is one line."""


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """``image`` as 8-bit RGB: EXIF orientation applied, first frame, alpha over ``background``, 16-bit scaled."""
    if getattr(image, "n_frames", 1) > 1:
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


def open_image(path: str | Path) -> Image.Image:
    """Fully decode the image at ``path`` to RGB, or raise ``BadImageError`` saying why in one line."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise BadImageError(f"{path}: empty file")
        with Image.open(path) as image:
            limit = Image.MAX_IMAGE_PIXELS
            if limit and image.width * image.height > limit:
                raise BadImageError(
                    f"{path}: refused, {image.width}x{image.height} is larger than Pillow's decompression-bomb limit "
                    f"of {limit} pixels"
                )
            image.load()
            return to_rgb(image)
    except BadImageError:
        raise
    except Image.DecompressionBombError as e:
        raise BadImageError(f"{path}: refused, larger than Pillow's decompression-bomb limit ({e})") from e
    except Exception as e:  # decoders of corrupt files raise OSError, SyntaxError, struct.error, IndexError, ...
        raise BadImageError(f"{path}: not a readable image ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from e
