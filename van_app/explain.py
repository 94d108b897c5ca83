"""Heatmaps from Large Kernel Attention: where a VAN looks, and the evidence for one class.

LKA passes on ``u * attn``, its input gated by its attention, so every map scores that
gated signal ``g`` (not ``attn`` alone), and only the part of it the image puts there:
each image is compared with its *reference*, the blank image of its own mean colour,
whose gated signal ``g0`` carries the network's position-dependent response (zero
padding at the frame's edges, stride patterns) and nothing of the picture. A stage
with reduction ``r`` (4, 8, 16, 32) has its cell (i, j) centred on model-input pixel
(r*i, r*j): every patch embedding is an odd kernel padded by half its width.

- Block map (class-agnostic, *where the network looks*): ``mean_c (d_c - mean_hw d_c)^2 / P``
  with ``d = g - g0`` and ``P`` the image's mean gated power over the stage's blocks
  (``attention.stage_block_maps``). Dimensionless: 1.0 is a cell departing from the blank
  by as much power as the image's average cell carries. ``analyse`` gets these maps with
  the logits from one pass of the image and its reference (``attention.attention_pass``):
  a model served by ``fuse`` computes them inside its graph.
- Stage map: the mean of the stage's block maps, same units.
- Class map (*evidence for class k*, the page's default map for the predicted class):
  on each stage of ``CLASS_STAGES`` (stages 1 and 2), the gradient times the gated
  signal's difference to the reference, ``E = sum_c (d logit_k / d g_c) * (g_c - g0_c)``
  per block, summed over the stage's blocks (``attention.CLASS_RULES`` also has LayerCAM
  and Grad-CAM's channel weights), then ``weighted``: ``relu(E)`` times the stage's
  class-agnostic map, so a cell counts as evidence where its gated signal departs from
  the blank's. Rule, stages and weighting were chosen on the benchmark's validation seed
  (docs/heatmaps.md). A blank image gets none. ``analyse`` gets these maps for the
  predicted class from the same pass (``Analysis.evidence``); ``class_maps`` computes
  them for any class: with the engine's graph where ``fuse`` built one (its ``target``
  input), else on the folded model, with autograd from the first of those stages on,
  without hooks or an input gradient.
- Combined map: the stage maps of ``COMBINED_STAGES`` resampled (bicubic, clamped at 0)
  onto the finest stage grid and averaged: the class-agnostic maps as they are (their
  units agree), the class maps each divided by its own peak (the per-stage totals of
  a gradient-weighted map are not on one scale: deeper stages' are far larger).

Display maps are drawn on an absolute scale, not min-max: zero is what the blank image
gives. A class-agnostic map is divided by ``FULL_SCALE`` or by its peak, whichever is
larger, so a faint map looks faint; a class map by its peak (negative evidence was
dropped by ``weighted``). A map is flagged ``constant`` and drawn uncoloured when it
has no more structure than a blank image (a class-agnostic map peaking below
``STRUCTURE_FLOOR``; a class map whose stage's class-agnostic map does, or without
positive evidence), no spatial variation (range at most 1e-5 of its
largest magnitude, e.g. a 1x1 grid) or non-finite values.

Display maps go back onto the original image through the model's own eval transform
(resize, centre crop), sampled bicubically at the original pixels, so overlays line
up with the image at its own size and aspect ratio; outside the crop nothing is drawn.

Each ``Heatmap`` says what it is (``kind``, ``stage``, ``block``, ``target`` class);
callers pick maps with ``find_map`` by those fields, never by title or position.
Besides the page's ``analyse``, ``class_maps`` and ``overlay``, the measuring API is
public too: ``render`` (a map on the original image, as values), ``normalise``,
``input_geometry`` and ``stage_maps`` (any per-block reduction of captured tensors,
``benchmarks/heatmaps.py``).
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from functools import lru_cache

import matplotlib
import numpy as np
import torch
from PIL import Image
from timm.data.transforms import CenterCropOrPad, MaybePILToTensor, MaybeToTensor, ResizeKeepRatio
from torch import nn
from torchvision import transforms

from .attention import (CLASS_RULE, CLASS_RULES, CLASS_STAGES, Maps, Pass, attention_pass, departure, evidence,
                        gated_stages, is_folded, reference, stage_block_maps, stage_strides)
from .fold import fold
from .images import display_size, to_rgb
from .predict import eval_transform, placement, preprocess, top_k

CONSTANT_TOLERANCE = 1e-5
STRUCTURE_FLOOR = 0.1  # a class-agnostic map peaking lower is no more structured than a blank image (+-3 grey levels)
FULL_SCALE = 2.0  # a class-agnostic map is drawn at full colour at this value (or at its peak, when higher)
# Stages averaged into the class-agnostic combined map, chosen on the benchmark's validation seed
# (benchmarks/heatmaps.py; docs/heatmaps.md): stage 1 alone won.
COMBINED_STAGES = (0,)
# Eval-transform steps that change pixel values but not where they are.
_PIXEL_ONLY = (transforms.ToTensor, transforms.PILToTensor, transforms.Normalize, MaybeToTensor, MaybePILToTensor)


@dataclass(frozen=True)
class Geometry:
    """How the eval transform places the original image on the model input: ``input = scale * original - offset``.

    Coordinates are continuous pixel coordinates (pixel i spans [i, i + 1)), per axis (x, y).
    """

    image_size: tuple[int, int]
    input_size: tuple[int, int]
    scale: tuple[float, float]
    offset: tuple[float, float]


class MapKind(StrEnum):
    """What a heatmap averages: one block's attention, a stage's blocks, or every stage combined."""

    BLOCK = "block"
    STAGE = "stage"
    COMBINED = "combined"


@dataclass(frozen=True)
class Heatmap:
    """One map on a stage grid: what it is, ``raw`` (native resolution, non-negative), ``display`` ([0, 1]).

    ``stage`` and ``block`` count from 0 (None where the kind has none); ``target`` is the
    class index whose evidence the map shows, None for the class-agnostic maps.
    """

    kind: MapKind
    raw: np.ndarray
    display: np.ndarray
    stride: int
    constant: bool
    stage: int | None = None
    block: int | None = None
    target: int | None = None

    @property
    def title(self) -> str:
        """What the map shows, in words ("Stage 2 block 1", "Combined", "Stage 1: evidence for class 3")."""
        where = {MapKind.BLOCK: f"Stage {(self.stage or 0) + 1} block {(self.block or 0) + 1}",
                 MapKind.STAGE: f"Stage {(self.stage or 0) + 1}", MapKind.COMBINED: "Combined"}[self.kind]
        if self.target is None:
            return where
        return f"Evidence for class {self.target}" if self.kind is MapKind.COMBINED else (
            f"{where}: evidence for class {self.target}")


def find_map(maps: Iterable[Heatmap], kind: MapKind, stage: int | None = None, block: int | None = None) -> Heatmap:
    """The map of ``kind`` (and ``stage``, ``block`` where given) in ``maps``; ``KeyError`` when there is none."""
    for heatmap in maps:
        if heatmap.kind is kind and stage in (None, heatmap.stage) and block in (None, heatmap.block):
            return heatmap
    raise KeyError(f"no {kind} map" + (f" for stage {stage}" if stage is not None else "")
                   + (f" block {block}" if block is not None else ""))


@dataclass(frozen=True)
class Analysis:
    """A prediction, the class-agnostic maps and the evidence for the predicted class, from the same pass."""

    top: dict[str, float]
    maps: list[Heatmap]
    geometry: Geometry
    evidence: list[Heatmap]


def input_geometry(model: nn.Module, image_size: tuple[int, int]) -> Geometry:
    """The resize and crop that ``preprocess(model, image)`` applies to an image of ``image_size`` (w, h)."""
    transform = eval_transform(model)
    (w, h), scale, offset = image_size, [1.0, 1.0], [0.0, 0.0]
    for step in transform.transforms:
        if isinstance(step, (transforms.Resize, ResizeKeepRatio)):
            new_w, new_h = _resized(step, w, h)
            for axis, factor in enumerate((new_w / w, new_h / h)):
                scale[axis] *= factor
                offset[axis] *= factor
            w, h = new_w, new_h
        elif isinstance(step, (transforms.CenterCrop, CenterCropOrPad)):
            crop_h, crop_w = step.size
            for axis, (size, crop) in enumerate(((w, crop_w), (h, crop_h))):
                pad = (crop - size) // 2 if crop > size else 0
                padded = max(size, crop)
                offset[axis] += int(round((padded - crop) / 2.0)) - pad
            w, h = crop_w, crop_h
        elif not isinstance(step, _PIXEL_ONLY):
            raise ValueError(f"cannot map heatmaps through {step!r}")
    return Geometry(tuple(image_size), (w, h), tuple(scale), tuple(offset))


def _resized(step: transforms.Resize | ResizeKeepRatio, w: int, h: int) -> tuple[int, int]:
    """Output (w, h) of a torchvision ``Resize`` or timm ``ResizeKeepRatio`` (no randomness) on a w x h image."""
    if isinstance(step, ResizeKeepRatio):
        target_h, target_w = step.size
        ratio_h, ratio_w = h / target_h, w / target_w
        ratio = max(ratio_h, ratio_w) * step.longest + min(ratio_h, ratio_w) * (1.0 - step.longest)
        return round(w / ratio), round(h / ratio)
    size = [step.size] if isinstance(step.size, int) else list(step.size)
    if len(size) == 2:
        return size[1], size[0]
    short, long = sorted((w, h))
    new_short, new_long = size[0], int(size[0] * long / short)
    if step.max_size is not None and new_long > step.max_size:
        new_short, new_long = int(step.max_size * new_short / new_long), step.max_size
    return (new_short, new_long) if w <= h else (new_long, new_short)


def _is_flat(raw: np.ndarray) -> bool:
    """True when ``raw`` is non-finite or varies by at most ``CONSTANT_TOLERANCE`` of its largest magnitude."""
    if raw.size == 0 or not np.isfinite(raw).all():
        return True
    spread, peak = float(raw.max() - raw.min()), float(np.abs(raw).max())
    return spread == 0.0 or spread <= CONSTANT_TOLERANCE * peak


def normalise(raw: np.ndarray, floor: float = 0.0, full_scale: float = 0.0) -> tuple[np.ndarray, bool]:
    """``relu(raw) / max(peak, full_scale)`` in [0, 1], and whether the map is constant (then zeros): flat, non-finite,
    or peaking at ``floor`` or below (no positive values at all with the default)."""
    raw = np.asarray(raw, np.float32)
    zeros = np.zeros_like(raw)
    if _is_flat(raw):
        return zeros, True
    peak = float(raw.max())
    if peak <= max(floor, CONSTANT_TOLERANCE * float(np.abs(raw).max())):
        return zeros, True
    return np.clip(raw / max(peak, full_scale), 0.0, 1.0), False


def _heatmap(kind: MapKind, raw: np.ndarray, stride: int, absolute: bool = False, structured: bool = True,
             **where: int | None) -> Heatmap:
    """A ``Heatmap`` of ``raw``, drawn relative to its peak, or with ``absolute`` on the class-agnostic maps' scale
    (``STRUCTURE_FLOOR``, ``FULL_SCALE``); flagged when not ``structured``; ``where``: its stage, block, target."""
    display, constant = normalise(raw, STRUCTURE_FLOOR, FULL_SCALE) if absolute else normalise(raw)
    if not structured:
        display, constant = np.zeros_like(display), True
    return Heatmap(kind, raw.astype(np.float32), display, stride, constant, **where)


def _sample(grid: np.ndarray, out_w: int, out_h: int, x0: float, y0: float, dx: float, dy: float) -> np.ndarray:
    """Bicubic samples of ``grid`` at cell coordinates (y0 + i*dy, x0 + j*dx), edges clamped, as (out_h, out_w)."""
    if out_w <= 0 or out_h <= 0:
        return np.zeros((max(out_h, 0), max(out_w, 0)), np.float32)
    # PIL's cell k spans [k, k + 1): output pixel j's centre must land on x0 + j*dx + 0.5.
    left, top = x0 + 0.5 - 0.5 * dx, y0 + 0.5 - 0.5 * dy
    right, bottom = left + dx * out_w, top + dy * out_h
    h, w = grid.shape
    pad_l, pad_t = math.ceil(max(0.0, -left)) + 2, math.ceil(max(0.0, -top)) + 2
    pad_r, pad_b = math.ceil(max(0.0, right - w)) + 2, math.ceil(max(0.0, bottom - h)) + 2
    padded = np.pad(grid.astype(np.float32), ((pad_t, pad_b), (pad_l, pad_r)), mode="edge")
    box = (left + pad_l, top + pad_t, right + pad_l, bottom + pad_t)
    return np.asarray(Image.fromarray(padded, "F").resize((out_w, out_h), Image.BICUBIC, box=box))


def combine(maps: list[Heatmap], stages: Sequence[int] = COMBINED_STAGES, absolute: bool = False) -> Heatmap:
    """The mean of the ``stages``' non-flat maps (class maps: not flagged) resampled onto the finest of their grids,
    drawn as ``_heatmap`` draws with ``absolute``: class-agnostic maps as they are (one scale), class maps each
    relative to its own peak."""
    chosen = [m for m in maps if m.stage in stages] or maps
    finest = min(chosen, key=lambda m: m.stride)
    h, w = finest.raw.shape
    layers = []
    for m in chosen:
        if _is_flat(m.raw) or (m.target is not None and m.constant):
            continue
        values = m.raw if m.target is None else np.clip(m.raw, 0.0, None) / max(float(m.raw.max()), 1e-30)
        step = finest.stride / m.stride
        layers.append(np.clip(_sample(values, w, h, 0.0, 0.0, step, step), 0.0, None))
    raw = np.mean(layers, axis=0) if layers else np.zeros((h, w), np.float32)
    return _heatmap(MapKind.COMBINED, raw, finest.stride, absolute, target=finest.target)


def stage_maps(captured: dict[tuple[int, int], torch.Tensor], strides: list[int],
               reduce: Callable[[torch.Tensor], torch.Tensor] = departure) -> list[Heatmap]:
    """Per stage: the captured blocks' ``reduce`` maps (default ``departure``) averaged, drawn relative to their peak,
    then combined: any per-block reduction of captured tensors, for measuring.

    ``captured`` holds one image's tensor per block, (1, C, h, w), as ``capture_attention`` records it.
    """
    return maps_of_stages({key: reduce(t[0].float()) for key, t in captured.items()}, strides, absolute=False)


def maps_of_stages(block_maps: Maps, strides: list[int], absolute: bool = True) -> list[Heatmap]:
    """Per stage: the mean of its blocks' (h, w) maps in ``block_maps`` (keyed by (stage, block)), then combined;
    ``absolute``: on the class-agnostic maps' scale (``attention_pass``'s maps), else relative to each peak."""
    maps = []
    for stage, stride in enumerate(strides):
        raw = torch.stack([m.float() for (s, _), m in sorted(block_maps.items()) if s == stage]).mean(0)
        maps.append(_heatmap(MapKind.STAGE, raw.cpu().numpy(), stride, absolute, stage=stage))
    return maps + [combine(maps, absolute=absolute)]


def maps_of_blocks(block_maps: Maps, strides: list[int]) -> list[Heatmap]:
    """Per block: its (h, w) map from ``block_maps`` (keyed by (stage, block)), class-agnostic."""
    return [_heatmap(MapKind.BLOCK, m.float().cpu().numpy(), strides[s], True, stage=s, block=b)
            for (s, b), m in sorted(block_maps.items())]


def evidence_maps(raws: dict[int, np.ndarray], block_maps: dict[int, list[np.ndarray]], strides: list[int],
                  index: int) -> list[Heatmap]:
    """The class maps for class ``index`` per stage, then combined: ``weighted`` evidence of ``raws`` ((h, w) per
    stage) by the stage's class-agnostic ``block_maps``, flagged where those show no more structure than a blank."""
    maps = [_heatmap(MapKind.STAGE, weighted(raw, np.mean(block_maps[s], axis=0)), strides[s],
                     structured=float(np.max(block_maps[s])) > STRUCTURE_FLOOR, stage=s, target=index)
            for s, raw in sorted(raws.items())]
    return maps + [combine(maps, sorted(raws))]


def weighted(evidence: np.ndarray, agnostic: np.ndarray) -> np.ndarray:
    """A cell's positive ``evidence`` for a class times its class-agnostic map (how far its gated signal departs from
    the blank's): evidence where LKA passes on something the blank does not, not in the background around it."""
    return (np.clip(evidence, 0.0, None) * np.clip(agnostic, 0.0, None)).astype(np.float32)


def analyse(model: nn.Module, image: Image.Image, k: int = 5, blocks: bool = False) -> Analysis:
    """Top-``k`` prediction, the stage maps (and block maps if asked) and the evidence for the predicted class, from
    one pass.

    ``model`` is anything ``attention.attention_pass`` runs: a VAN, folded or not, or what ``fuse`` returns.
    """
    result = _image_pass(model, image)
    maps, shown = maps_of_pass(result, 0, stage_strides(model), blocks)
    return Analysis(top_k(model, result.logits[0], k), maps, input_geometry(model, image.size), shown)


def _image_pass(model: nn.Module, image: Image.Image, target: int | None = None) -> Pass:
    """``attention.attention_pass`` of one image, preprocessed as ``model`` expects, for class ``target`` (default:
    the predicted one)."""
    device, dtype = placement(model)
    with torch.inference_mode():
        return attention_pass(model, preprocess(model, to_rgb(image)).to(device, dtype), target)


def maps_of_pass(result: Pass, index: int, strides: list[int], blocks: bool = False
                 ) -> tuple[list[Heatmap], list[Heatmap]]:
    """Image ``index`` of an ``attention_pass`` result: its class-agnostic maps (stages, combined, and each block's
    with ``blocks``) and its evidence maps for the pass's target class (by default the predicted one)."""
    mine = {key: m[index] for key, m in result.maps.items()}
    maps = maps_of_stages(mine, strides) + (maps_of_blocks(mine, strides) if blocks else [])
    by_stage = {s: [m.float().cpu().numpy() for (stage, _), m in sorted(mine.items()) if stage == s]
                for s in result.evidence}
    raws = {s: m[index].float().cpu().numpy() for s, m in result.evidence.items()}
    return maps, evidence_maps(raws, by_stage, strides, int(result.target[index]))


def class_maps(model: nn.Module, image: Image.Image, index: int, rule: str = CLASS_RULE,
               stages: Sequence[int] = CLASS_STAGES) -> list[Heatmap]:
    """Evidence for class ``index`` per stage of ``stages`` (``CLASS_RULES[rule]`` on each block's gated signal
    against the reference's), then combined: what ``analyse`` gives for the predicted class, for any class.

    A model with ``forward_with_maps`` (what ``fuse`` returns) runs its graph's pass with
    ``index`` as its target: the page's rule and stages only. Any VAN runs folded
    (``model`` is folded first unless it is; ``ClassMapCache`` folds once): the
    reference through the last of ``stages`` only, without autograd; the image with
    autograd from the first of ``stages``; one backward pass from the logit to their
    gated signals; no hooks, no input gradient, and no parameter gradient is accumulated.
    """
    if rule not in CLASS_RULES:
        raise ValueError(f"rule must be one of {', '.join(CLASS_RULES)}, got {rule!r}")
    if hasattr(model, "forward_with_maps"):
        if (rule, tuple(stages)) != (CLASS_RULE, CLASS_STAGES):
            raise ValueError(f"a served model's graph computes rule {CLASS_RULE!r} on stages {CLASS_STAGES} only")
        return maps_of_pass(_image_pass(model, image, index), 0, stage_strides(model))[1]
    with torch.inference_mode(False):
        folded = model if is_folded(model) else fold(model)
        device, dtype = placement(folded)
        batch = preprocess(folded, to_rgb(image)).to(device, dtype)
        with torch.no_grad():
            _, gated_reference = gated_stages(folded, reference(batch), until=max(stages) + 1)
        with torch.enable_grad():
            logits, gated = gated_stages(folded, batch, grad_from=min(stages))
            raws = evidence(logits, gated, gated_reference, torch.tensor([index], device=device), rule, stages)
        with torch.no_grad():
            by_stage = {s: [m[0].cpu().numpy() for m in stage_block_maps(gated[s], gated_reference[s])]
                        for s in stages}
    return evidence_maps({s: m[0].cpu().numpy() for s, m in raws.items()}, by_stage, stage_strides(folded), index)


def image_digest(image: Image.Image) -> str:
    """A hash of the pixels, size and mode of ``image``."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{image.mode}{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


class ClassMapCache:
    """``class_maps`` of one model (folded once, here, or the engine ``fuse`` made of it), computed when asked and
    kept per (image hash, class) in a small LRU."""

    def __init__(self, model: nn.Module, maxsize: int = 32) -> None:
        self.model = model if is_folded(model) else fold(model)
        self.maxsize = maxsize
        self._entries: OrderedDict[tuple[str, int], list[Heatmap]] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, image: Image.Image, index: int, served: nn.Module | None = None) -> list[Heatmap]:
        """The class maps of ``image`` for class ``index``, from the cache when present, else computed by ``served``
        (the same model as an engine) when given, by the folded model otherwise."""
        key = (image_digest(image), index)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
            maps = class_maps(self.model if served is None else served, image, index)
            self._entries[key] = maps
            while len(self._entries) > self.maxsize:
                self._entries.popitem(last=False)
            return maps


def render(heatmap: Heatmap, geometry: Geometry, size: tuple[int, int] | None = None
           ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The display map on the original image (or ``size``, same aspect): (h, w) values in [0, 1], and the crop box.

    The box (left, top, right, bottom) holds the output pixels whose centres the model
    saw; values outside it are 0.
    """
    out_w, out_h = size or geometry.image_size
    values = np.zeros((out_h, out_w), np.float32)
    patch, (left, top, right, bottom) = _render_crop(heatmap, geometry, (out_w, out_h))
    values[top:bottom, left:right] = patch
    return values, (left, top, right, bottom)


def _render_crop(heatmap: Heatmap, geometry: Geometry, size: tuple[int, int]
                 ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """The display map inside the crop box only, at output ``size``, and that box."""
    bounds = []
    for axis, out in enumerate(size):
        # output pixel i has its centre at original coordinate (i + 0.5) * per_pixel.
        per_pixel = geometry.image_size[axis] / out
        scale, offset, limit = geometry.scale[axis], geometry.offset[axis], geometry.input_size[axis]
        first = min(out, max(0, math.ceil(offset / scale / per_pixel - 0.5)))
        stop = min(out, max(first, math.ceil((limit + offset) / scale / per_pixel - 0.5)))
        start_input = scale * (first + 0.5) * per_pixel - offset
        bounds.append((first, stop, (start_input - 0.5) / heatmap.stride, scale * per_pixel / heatmap.stride))
    (left, right, x0, dx), (top, bottom, y0, dy) = bounds
    if heatmap.constant:
        return np.zeros((bottom - top, right - left), np.float32), (left, top, right, bottom)
    patch = _sample(heatmap.display, right - left, bottom - top, x0, y0, dx, dy)
    return np.clip(patch, 0.0, 1.0), (left, top, right, bottom)


def colorize(values: np.ndarray, colormap: str = "turbo") -> Image.Image:
    """An RGB image of ``values`` in [0, 1] through a matplotlib colormap."""
    indexed = Image.fromarray(np.clip(np.rint(values * 255), 0, 255).astype(np.uint8), "L").convert("P")
    indexed.putpalette(_palette(colormap))
    return indexed.convert("RGB")


@lru_cache(maxsize=32)
def _palette(colormap: str) -> bytes:
    """256 RGB entries of a matplotlib colormap, as a PIL palette."""
    return (matplotlib.colormaps[colormap](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8).tobytes()


def overlay(image: Image.Image, heatmap: Heatmap, geometry: Geometry, colormap: str = "turbo",
            opacity: float = 0.5, max_side: int | None = None) -> Image.Image:
    """``image`` (RGB, at most ``max_side``) with ``heatmap`` blended in where the model saw it (constant: as is).

    Each pixel takes the map's colour in proportion to the map's value there times
    ``opacity``: where the map is 0 the image shows as it is, not dimmed by the
    colormap's low end, so only what the map points at is coloured.
    """
    size = display_size(image.size, max_side)
    base = image if image.mode == "RGB" else to_rgb(image)
    base = base.resize(size, Image.BILINEAR) if base.size != size else base.copy()
    if heatmap.constant or opacity <= 0:
        return base
    patch, box = _render_crop(heatmap, geometry, size)
    if patch.size == 0:
        return base
    weight = Image.fromarray(np.rint(255 * min(1.0, float(opacity)) * patch).astype(np.uint8), "L")
    base.paste(Image.composite(colorize(patch, colormap), base.crop(box), weight), box)
    return base
