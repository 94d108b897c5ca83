"""A generated shape data set with exact object masks (console script ``van-synth``).

Each image holds one labelled shape (the class) in a random colour, rotation and
position. A ``Scene`` sets the variety: the object's size (from small to filling
the frame), the frame's aspect ratio, the background (cluttered: a texture with
soft blobs and thin scribbles, so that only the outline tells the class; plain:
one colour) and the placement (uniform over the frame, near an edge, partly cut
off by the frame, or beside smaller distractor shapes of other classes). The
mask is the labelled shape's own rasterised geometry, the same array that
composites it, so it covers exactly that object's visible pixels and nothing
else. Every image draws from its own random generator seeded by
``(seed, class index, index, size)``: the output does not depend on worker
count or order.

Layout: ``DIR/images/<class>/<id>.png`` (an image folder for ``van-finetune``)
and ``DIR/masks/<class>/<id>.png`` (8-bit, 255 on the object), same names.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from .config import (
    ArgumentParser,
    Check,
    Options,
    add_options,
    from_namespace,
    integer,
    number,
    option,
)
from .errors import UsageError
from .files import atomic_path, write_json

SHAPES: tuple[str, ...] = ("circle", "cross", "ring", "square", "star", "triangle")
BACKGROUNDS: tuple[str, ...] = ("cluttered", "plain")
PLACEMENTS: tuple[str, ...] = ("uniform", "border", "cut", "several")
SUPERSAMPLE = 4
GRAIN = 6.0  # largest amplitude of the per-pixel noise added over the whole image
MIN_CONTRAST = 110.0  # least RGB distance between the object colour and the background under it
BORDER_GAP = 0.04  # "border": the object's box ends at most this share of the shorter side from an edge
CUT_SHARE = (0.15, 0.5)  # "cut": share of the object's box (along one axis) that lies outside the frame
DISTRACTORS = (1, 3)  # "several": how many smaller shapes of other classes are drawn beside the labelled one
DISTRACTOR_SCALE = (0.35, 0.7)  # their size as a share of the labelled object's (before shrinking to fit)
MIN_DISTRACTOR = 6.0  # pixels: the smallest distractor drawn


@dataclass(frozen=True)
class Scene:
    """How an image is composed: object size, frame aspect, background and placement (each drawn per image)."""

    scale: tuple[float, float] = (0.3, 0.6)  # the object's box: longer side / the frame's shorter side
    aspect: tuple[float, float] = (1.0, 1.0)  # frame width / height, log-uniform
    backgrounds: tuple[str, ...] = ("cluttered",)  # one of these per image, equally likely
    placements: tuple[str, ...] = ("uniform",)  # one of these per image, equally likely

    def __post_init__(self) -> None:
        (low, high), (narrow, wide) = self.scale, self.aspect
        if not 0 < low <= high <= 1:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {low} {high}")
        if not 0 < narrow <= wide:
            raise ValueError(f"aspect must satisfy 0 < low <= high, got {narrow} {wide}")
        for name, given, known in (("background", self.backgrounds, BACKGROUNDS),
                                   ("placement", self.placements, PLACEMENTS)):
            if not given or not set(given) <= set(known):
                raise ValueError(f"{name} must be one or more of {', '.join(known)}, got {' '.join(given)}")


# The bundled model (checkpoints/van-b0-shapes): the scene and image size (shorter side) it trains on, and the
# held-out sets it is measured on, each a scene and an image size. Seeds are the caller's, never the training data's.
TRAINING_SCENE = Scene(scale=(0.25, 1.0), aspect=(0.75, 1.334), backgrounds=("cluttered", "plain"),
                       placements=("uniform", "border"))
TRAINING_SIZE = 112
HELD_OUT: dict[str, tuple[Scene, int]] = {
    "held-out": (TRAINING_SCENE, TRAINING_SIZE),  # the training distribution
    "clean": (Scene(backgrounds=("plain",)), 160),  # one solid shape of usual size on one colour
    "filling": (Scene(scale=(0.8, 1.0), backgrounds=("plain",)), 160),  # the shape fills most of the frame
    "filling 4:3": (Scene(scale=(0.8, 1.0), aspect=(4 / 3, 4 / 3), backgrounds=("plain",)), 160),  # in a 4:3 picture
}

@dataclass(frozen=True)
class Sample:
    """One generated image, its object mask and the drawing parameters."""

    image: np.ndarray  # (H, W, 3) uint8
    mask: np.ndarray  # (H, W) bool, True on the labelled object only
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


@dataclass(frozen=True)
class _Placed:
    """A shape's polygons in pixel coordinates and its box (x0, y0, x1, y1)."""

    polygons: list[np.ndarray]
    box: tuple[float, float, float, float]


def _posed(shape: str, extent: float, rng: np.random.Generator) -> list[np.ndarray]:
    """``shape`` at a random rotation, scaled so that its box's longer side is ``extent`` pixels, box centred at 0."""
    angle = rng.uniform(0, 2 * np.pi)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    polygons = [points @ rotation.T for points in _outline(shape, rng)]
    low, high = polygons[0].min(0), polygons[0].max(0)
    return [(points - (low + high) / 2) * (extent / (high - low).max()) for points in polygons]


def _place(polygons: list[np.ndarray], frame: tuple[int, int], placement: str, rng: np.random.Generator) -> _Placed:
    """Move the posed ``polygons`` into the ``frame`` (w, h) as ``placement`` says."""
    half = np.abs(polygons[0]).max(0)  # half the box, (x, y)
    size = np.array(frame, dtype=float)
    low, high = half + 1, size - half - 1  # box inside the frame with a pixel to spare
    centre = np.where(low <= high, rng.uniform(np.minimum(low, high), np.maximum(low, high)), size / 2)
    if placement in ("border", "cut"):
        axis, far = int(rng.integers(2)), bool(rng.integers(2))  # which edge: left/right (x) or top/bottom (y)
        if placement == "border":
            distance = half[axis] + 1 + rng.uniform(0, BORDER_GAP) * size.min()  # box edge near the frame edge
        else:
            distance = half[axis] - 2 * half[axis] * rng.uniform(*CUT_SHARE)  # box edge beyond the frame edge
        centre[axis] = size[axis] - distance if far else distance
    x0, y0 = centre - half
    x1, y1 = centre + half
    return _Placed([points + centre for points in polygons], (x0, y0, x1, y1))


def _rasterise(placed: _Placed, frame: tuple[int, int]) -> np.ndarray:
    """The (h, w) bool mask of ``placed``: a pixel is in when at least half of it is covered."""
    w, h = frame
    canvas = Image.new("L", (w * SUPERSAMPLE, h * SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(canvas)
    for i, points in enumerate(placed.polygons):
        draw.polygon([tuple(p) for p in points * SUPERSAMPLE], fill=0 if i else 255)
    return np.asarray(canvas.resize((w, h), Image.Resampling.BOX)) >= 128


def _smooth_field(frame: tuple[int, int], rng: np.random.Generator, channels: int) -> np.ndarray:
    """Low-frequency random values in [0, 1], (h, w, channels), from a coarse grid upsampled bicubically."""
    w, h = frame
    grid = int(rng.integers(2, 6))
    coarse = (rng.random((grid, grid, channels)) * 255).astype(np.uint8)
    image = Image.fromarray(coarse.squeeze(-1) if channels == 1 else coarse)
    field = np.asarray(image.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32) / 255
    return field.reshape(h, w, channels)


def _cluttered(frame: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A float (h, w, 3) textured, cluttered background in [0, 255]."""
    w, h = frame
    image = _smooth_field(frame, rng, 3) * rng.uniform(120, 255) + rng.uniform(0, 80, 3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) / max(w, h)
    for _ in range(int(rng.integers(1, 3))):  # stripes of random frequency and direction
        theta, freq = rng.uniform(0, np.pi), rng.uniform(3, 12)
        wave = np.sin(2 * np.pi * freq * (xx * np.cos(theta) + yy * np.sin(theta)) + rng.uniform(0, 2 * np.pi))
        image += wave[..., None] * rng.uniform(-40, 40, 3)
    for _ in range(int(rng.integers(2, 6))):  # soft distractor blobs: the colour of an object, none of its edges
        cy, cx = rng.uniform(0, 1, 2) * (h, w) / max(w, h)
        sy, sx = rng.uniform(0.05, 0.16, 2)
        alpha = rng.uniform(0.5, 0.95) * np.exp(-((yy - cy) ** 2 / (2 * sy**2) + (xx - cx) ** 2 / (2 * sx**2)))
        image = image * (1 - alpha[..., None]) + alpha[..., None] * rng.uniform(0, 255, 3)
    scribbles = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(scribbles)
    colours = []
    for i in range(int(rng.integers(2, 6))):
        points = [tuple(p) for p in rng.uniform(0, 1, (int(rng.integers(2, 5)), 2)) * (w, h)]
        draw.line(points, fill=i + 1, width=1)
        colours.append(rng.uniform(0, 255, 3))
    lines = np.asarray(scribbles)
    for i, colour in enumerate(colours):
        image[lines == i + 1] = colour
    return image


def _plain(frame: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A float (h, w, 3) single-colour background: light (paper, a drawing program's canvas) half the time."""
    w, h = frame
    colour = rng.uniform(190, 255, 3) if rng.random() < 0.5 else rng.uniform(0, 255, 3)
    return np.broadcast_to(colour, (h, w, 3)).astype(np.float64)


def _contrasting_colour(under: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random RGB colour at least ``MIN_CONTRAST`` away from the mean of ``under`` (N, 3)."""
    mean = under.mean(0)
    for _ in range(64):
        colour = rng.uniform(0, 255, 3)
        if np.linalg.norm(colour - mean) >= MIN_CONTRAST:
            return colour
    return np.where(mean < 128, 255.0, 0.0)


def _frame(size: int, aspect: tuple[float, float], rng: np.random.Generator) -> tuple[int, int]:
    """The image's (w, h): ``size`` on the shorter side, width / height log-uniform in ``aspect``."""
    ratio = math.exp(rng.uniform(math.log(aspect[0]), math.log(aspect[1])))
    return (round(size * ratio), size) if ratio >= 1 else (size, round(size / ratio))


def _overlaps(a: tuple[float, ...], b: tuple[float, ...], gap: float) -> bool:
    """Whether boxes ``a`` and ``b`` (x0, y0, x1, y1) come closer than ``gap`` pixels."""
    return not (a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1])


def _draw_distractors(image: np.ndarray, shape: str, target: _Placed, extent: float, frame: tuple[int, int],
                      rng: np.random.Generator) -> None:
    """Draw smaller shapes of other classes into ``image``, clear of ``target``'s box (shrunk to fit, or left out)."""
    others = [s for s in SHAPES if s != shape]
    for _ in range(int(rng.integers(DISTRACTORS[0], DISTRACTORS[1] + 1))):
        other, size = others[int(rng.integers(len(others)))], extent * rng.uniform(*DISTRACTOR_SCALE)
        for attempt in range(20):  # a free spot, smaller at each attempt, if the frame has one
            placed = _place(_posed(other, max(MIN_DISTRACTOR, size * 0.9**attempt), rng), frame, "uniform", rng)
            if not _overlaps(placed.box, target.box, gap=2):
                mask = _rasterise(placed, frame)
                image[mask] = _contrasting_colour(image[mask], rng)
                break


def render(shape: str, size: int, rng: np.random.Generator, scene: Scene = Scene()) -> Sample:
    """One image of ``shape`` (``size`` pixels on the shorter side) with its exact object mask, drawn from ``rng``."""
    frame = _frame(size, scene.aspect, rng)
    kind = scene.backgrounds[int(rng.integers(len(scene.backgrounds)))]
    placement = scene.placements[int(rng.integers(len(scene.placements)))]
    background = _plain(frame, rng) if kind == "plain" else _cluttered(frame, rng)
    extent = rng.uniform(*scene.scale) * min(frame)
    target = _place(_posed(shape, extent, rng), frame, "uniform" if placement == "several" else placement, rng)
    if placement == "several":
        _draw_distractors(background, shape, target, extent, frame, rng)
    mask = _rasterise(target, frame)
    colour = _contrasting_colour(background[mask], rng)
    image = np.where(mask[..., None], colour, background)
    image += rng.uniform(-1, 1, image.shape) * rng.uniform(0, GRAIN)
    rgb = tuple(int(c) for c in np.clip(colour, 0, 255).round())
    return Sample(np.clip(image, 0, 255).round().astype(np.uint8), mask, shape, rgb)


def sample_rng(seed: int, class_index: int, index: int, size: int) -> np.random.Generator:
    """The random generator of one image, independent of every other image's."""
    return np.random.default_rng([seed, class_index, index, size])


def generate(shape: str, index: int, size: int, seed: int, scene: Scene = Scene()) -> Sample:
    """Image ``index`` of class ``shape`` for ``seed`` and ``scene``: the same arguments always give the same pixels."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return render(shape, size, sample_rng(seed, SHAPES.index(shape), index, size), scene)


def _save_png(array: np.ndarray, path: Path) -> None:
    """Write ``array`` as PNG atomically (fast compression: the grain does not compress anyway)."""
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG", compress_level=1)


def image_name(index: int) -> str:
    """The file name of image ``index`` (same in ``images/`` and ``masks/``)."""
    return f"{index:06d}.png"


def _write_one(job: tuple[Path, str, int, int, int, Scene]) -> None:
    """Generate one image and its mask and write both."""
    out, shape, index, size, seed, scene = job
    sample = generate(shape, index, size, seed, scene)
    _save_png(sample.image, out / "images" / shape / image_name(index))
    _save_png(sample.mask.astype(np.uint8) * 255, out / "masks" / shape / image_name(index))


def _range(low: float, high: float) -> Check:
    """A number in (low, high] on the command line; in Python, also a pair of them (the option's LOW HIGH)."""
    one = number(low, high, open_low=True)
    return Check(one.parse, lambda v: one.test(v) or (isinstance(v, tuple) and len(v) == 2 and all(map(one.test, v))),
                 one.rule)


@dataclass
class SynthConfig(Options):
    """What ``van-synth`` writes (the command line is derived from these fields)."""

    out: Path = option(metavar="DIR", help="output folder (gets images/ and masks/)")
    per_class: int = option(200, "images per class", check=integer(1))
    size: int = option(64, "image side in pixels (the shorter one when --aspect is not 1 1)", check=integer(16, 4096))
    seed: int = option(0, "data set seed (use another one for held-out data)", check=integer(0))
    shapes: tuple[str, ...] = option(SHAPES, "classes to draw", choices=SHAPES, nargs="+")
    workers: int = option(0, "processes (0: one per CPU core)", check=integer(0, 256))
    start: int = option(0, "index of the first image of each class (disjoint ranges give disjoint images)",
                        check=integer(0))
    scale: tuple[float, float] = option(Scene.scale, "object size: the longer side of its box over the frame's "
                                        "shorter side, uniform in LOW HIGH (1: touches two edges)",
                                        check=_range(0, 1), nargs=2, metavar=("LOW", "HIGH"))
    aspect: tuple[float, float] = option(Scene.aspect, "frame width / height, log-uniform in LOW HIGH "
                                         "(e.g. 0.75 1.333 for portrait to 4:3 landscape)",
                                         check=_range(0, 8), nargs=2, metavar=("LOW", "HIGH"))
    backgrounds: tuple[str, ...] = option(Scene.backgrounds, "backgrounds, one per image at random: cluttered "
                                          "(texture, blobs, scribbles) or plain (one colour)", choices=BACKGROUNDS,
                                          nargs="+", flag="--background")
    placements: tuple[str, ...] = option(Scene.placements, "placements, one per image at random: uniform (inside "
                                         "the frame), border (near an edge), cut (partly outside the frame), several "
                                         "(smaller shapes of other classes beside it; the mask is the labelled "
                                         "object's only)", choices=PLACEMENTS, nargs="+", flag="--placement")

    def __post_init__(self) -> None:
        super().__post_init__()
        try:
            _ = self.scene  # the ranges' order and the choices, checked by Scene
        except (TypeError, ValueError) as e:
            raise UsageError(str(e)) from None

    @property
    def scene(self) -> Scene:
        """How each image is composed."""
        return Scene(tuple(self.scale), tuple(self.aspect), tuple(self.backgrounds), tuple(self.placements))


def write_dataset(config: SynthConfig, progress: bool = False) -> int:
    """Write the data set described by ``config``; returns the number of images written."""
    for kind in ("images", "masks"):
        for shape in config.shapes:
            (config.out / kind / shape).mkdir(parents=True, exist_ok=True)
    scene = config.scene
    jobs = [(config.out, shape, i, config.size, config.seed, scene)
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
                size=config.size, seed=config.seed, start=config.start, scene=asdict(scene))
    write_json(config.out / "dataset.json", meta)
    return len(jobs)


def parse_args(argv: Sequence[str] | None = None) -> SynthConfig:
    """``van-synth``'s command line as a ``SynthConfig`` (a bad one exits with one ``error:`` line and code 2)."""
    parser = ArgumentParser(prog="van-synth", description=__doc__.split("\n\n")[0])
    add_options(parser, SynthConfig)
    try:
        return from_namespace(SynthConfig, parser.parse_args(argv))
    except UsageError as e:
        parser.error(str(e))


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
