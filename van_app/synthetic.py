"""A generated shape data set with exact object masks (console script ``van-synth``).

Each image holds one shape (the class) in a random colour, size, rotation and
position over a textured, cluttered background with soft distractor blobs and
thin scribbles, so that only the outline tells the class. The mask is the
shape's own rasterised geometry, the same array that composites the object, so
it covers exactly the object's pixels. Every image draws from its own random
generator seeded by ``(seed, class index, index, size)``: the output does not
depend on worker count or order.

Layout: ``DIR/images/<class>/<id>.png`` (an image folder for ``van-finetune``)
and ``DIR/masks/<class>/<id>.png`` (8-bit, 255 on the object), same names.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .config import (
    ArgumentParser,
    Options,
    add_options,
    from_namespace,
    integer,
    option,
)
from .files import atomic_path, write_json

SHAPES: tuple[str, ...] = ("circle", "cross", "ring", "square", "star", "triangle")
SUPERSAMPLE = 4
GRAIN = 6.0  # amplitude of the per-pixel noise added over the whole image
MIN_CONTRAST = 110.0  # least RGB distance between the object colour and the background under it


@dataclass(frozen=True)
class Sample:
    """One generated image, its object mask and the drawing parameters."""

    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) bool, True on the object
    shape: str
    colour: tuple[int, int, int]


def _outline(shape: str, rng: np.random.Generator) -> list[np.ndarray]:
    """Polygons of ``shape`` around the origin with unit outer radius; later polygons cut holes."""
    def polygon(radii: np.ndarray, start: float = 0.0) -> np.ndarray:
        angles = start + np.linspace(0, 2 * np.pi, len(radii), endpoint=False)
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], 1)

    if shape == "circle":
        return [polygon(np.ones(96))]
    if shape == "ring":
        return [polygon(np.ones(96)), polygon(np.full(96, rng.uniform(0.5, 0.65)))]
    if shape == "square":
        return [polygon(np.ones(4), np.pi / 4)]
    if shape == "triangle":
        return [polygon(np.ones(3), -np.pi / 2)]
    if shape == "star":
        return [polygon(np.tile([1.0, rng.uniform(0.38, 0.5)], 5), -np.pi / 2)]
    if shape == "cross":
        w = rng.uniform(0.28, 0.38)
        return [np.array([(w, 1), (w, w), (1, w), (1, -w), (w, -w), (w, -1),
                          (-w, -1), (-w, -w), (-1, -w), (-1, w), (-w, w), (-w, 1)], dtype=float)]
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def _shape_mask(shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """The object's mask: ``shape`` scaled, rotated and placed at random, fully inside the frame."""
    radius = rng.uniform(0.17, 0.30) * size
    angle = rng.uniform(0, 2 * np.pi)
    margin = radius + 1
    centre = rng.uniform(margin, size - margin, 2)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    big = size * SUPERSAMPLE
    canvas = Image.new("L", (big, big), 0)
    draw = ImageDraw.Draw(canvas)
    for i, points in enumerate(_outline(shape, rng)):
        xy = (points @ rotation.T * radius + centre) * SUPERSAMPLE
        draw.polygon([tuple(p) for p in xy], fill=0 if i else 255)
    return np.asarray(canvas.resize((size, size), Image.Resampling.BOX)) >= 128


def _smooth_field(size: int, rng: np.random.Generator, channels: int) -> np.ndarray:
    """Low-frequency random values in [0, 1], (size, size, channels), from a coarse grid upsampled bicubically."""
    grid = int(rng.integers(2, 6))
    coarse = (rng.random((grid, grid, channels)) * 255).astype(np.uint8)
    image = Image.fromarray(coarse.squeeze(-1) if channels == 1 else coarse)
    field = np.asarray(image.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    return field.reshape(size, size, channels)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """A float (H, W, 3) textured, cluttered background in [0, 255]."""
    image = _smooth_field(size, rng, 3) * rng.uniform(120, 255) + rng.uniform(0, 80, 3)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for _ in range(int(rng.integers(1, 3))):  # stripes of random frequency and direction
        theta, freq = rng.uniform(0, np.pi), rng.uniform(3, 12)
        wave = np.sin(2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)) + rng.uniform(0, 2 * np.pi))
        image += wave[..., None] * rng.uniform(-40, 40, 3)
    for _ in range(int(rng.integers(2, 6))):  # soft distractor blobs: the colour of an object, none of its edges
        cy, cx = rng.uniform(0, 1, 2)
        sy, sx = rng.uniform(0.05, 0.16, 2)
        alpha = rng.uniform(0.5, 0.95) * np.exp(-((yy - cy) ** 2 / (2 * sy**2) + (xx - cx) ** 2 / (2 * sx**2)))
        image = image * (1 - alpha[..., None]) + alpha[..., None] * rng.uniform(0, 255, 3)
    scribbles = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(scribbles)
    colours = []
    for i in range(int(rng.integers(2, 6))):
        points = [tuple(p) for p in rng.uniform(0, size, (int(rng.integers(2, 5)), 2))]
        draw.line(points, fill=i + 1, width=1)
        colours.append(rng.uniform(0, 255, 3))
    lines = np.asarray(scribbles)
    for i, colour in enumerate(colours):
        image[lines == i + 1] = colour
    return image


def _contrasting_colour(under: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random RGB colour at least ``MIN_CONTRAST`` away from the mean of ``under`` (N, 3)."""
    mean = under.mean(0)
    for _ in range(64):
        colour = rng.uniform(0, 255, 3)
        if np.linalg.norm(colour - mean) >= MIN_CONTRAST:
            return colour
    return np.where(mean < 128, 255.0, 0.0)


def render(shape: str, size: int, rng: np.random.Generator) -> Sample:
    """One image of ``shape`` (``size`` pixels square) with its exact object mask, drawn from ``rng``."""
    background = _background(size, rng)
    mask = _shape_mask(shape, size, rng)
    colour = _contrasting_colour(background[mask], rng)
    image = np.where(mask[..., None], colour, background)
    image += rng.uniform(-GRAIN, GRAIN, image.shape)
    rgb = tuple(int(c) for c in np.clip(colour, 0, 255).round())
    return Sample(np.clip(image, 0, 255).round().astype(np.uint8), mask, shape, rgb)


def sample_rng(seed: int, class_index: int, index: int, size: int) -> np.random.Generator:
    """The random generator of one image, independent of every other image's."""
    return np.random.default_rng([seed, class_index, index, size])


def generate(shape: str, index: int, size: int, seed: int) -> Sample:
    """Image ``index`` of class ``shape`` for ``seed``: the same arguments always give the same pixels."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return render(shape, size, sample_rng(seed, SHAPES.index(shape), index, size))


def _save_png(array: np.ndarray, path: Path) -> None:
    """Write ``array`` as PNG atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")


def image_name(index: int) -> str:
    """The file name of image ``index`` (same in ``images/`` and ``masks/``)."""
    return f"{index:06d}.png"


def _write_one(job: tuple[Path, str, int, int, int]) -> None:
    """Generate one image and its mask and write both."""
    out, shape, index, size, seed = job
    sample = generate(shape, index, size, seed)
    _save_png(sample.image, out / "images" / shape / image_name(index))
    _save_png(sample.mask.astype(np.uint8) * 255, out / "masks" / shape / image_name(index))


@dataclass
class SynthConfig(Options):
    """What ``van-synth`` writes (the command line is derived from these fields)."""

    out: Path = option(metavar="DIR", help="output folder (gets images/ and masks/)")
    per_class: int = option(200, "images per class", check=integer(1))
    size: int = option(64, "image side in pixels", check=integer(16, 4096))
    seed: int = option(0, "data set seed (use another one for held-out data)", check=integer(0))
    shapes: tuple[str, ...] = option(SHAPES, "classes to draw", choices=SHAPES, nargs="+")
    workers: int = option(0, "processes (0: one per CPU core)", check=integer(0, 256))
    start: int = option(0, "index of the first image of each class (disjoint ranges give disjoint images)",
                        check=integer(0))


def write_dataset(config: SynthConfig, progress: bool = False) -> int:
    """Write the data set described by ``config``; returns the number of images written."""
    for kind in ("images", "masks"):
        for shape in config.shapes:
            (config.out / kind / shape).mkdir(parents=True, exist_ok=True)
    jobs = [(config.out, shape, i, config.size, config.seed)
            for i in range(config.start, config.start + config.per_class) for shape in config.shapes]
    workers = config.workers or os.cpu_count() or 1
    report_every = max(1, len(jobs) // 20)
    with ProcessPoolExecutor(workers) as pool:
        for done, _ in enumerate(pool.map(_write_one, jobs, chunksize=32), 1):
            if progress and (done % report_every == 0 or done == len(jobs)):
                print(f"\rvan-synth: {done}/{len(jobs)} images", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    meta = dict(generator="van_app.synthetic", classes=list(config.shapes), per_class=config.per_class,
                size=config.size, seed=config.seed, start=config.start)
    write_json(config.out / "dataset.json", meta)
    return len(jobs)


def parse_args(argv: Sequence[str] | None = None) -> SynthConfig:
    """``van-synth``'s command line as a ``SynthConfig``."""
    parser = ArgumentParser(prog="van-synth", description=__doc__.split("\n\n")[0])
    add_options(parser, SynthConfig)
    return from_namespace(SynthConfig, parser.parse_args(argv))


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of ``van-synth``."""
    config = parse_args(argv)
    try:
        n = write_dataset(config, progress=True)
    except OSError as e:
        sys.exit(f"error: {e}")
    print(f"van-synth: wrote {n} images and masks to {config.out}")


if __name__ == "__main__":
    main()
