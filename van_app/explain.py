"""Heatmaps from Large Kernel Attention: where a VAN looks, and the evidence for one class.

Every map starts from the tensors ``capture_attention`` records: ``attn``, the output
of ``lka.conv1`` in each block, shape (C, h, w) on the stage's grid, which gates the
LKA input ``u`` (``lka(u) = u * attn``). A stage with reduction ``r`` (4, 8, 16, 32)
has its cell (i, j) centred on model-input pixel (r*i, r*j): every patch embedding
is an odd kernel padded by half its width, so receptive fields are centred there.

- Block map (class-agnostic): where the attention departs from its usual gate, the
  squared difference between ``attn_c`` and its spatial mean, averaged over channels:
  ``mean_c (attn_c - mean_hw attn_c)^2`` (``attention.departure``). Each channel's
  constant offset (which dominates a plain channel mean and has no meaningful sign)
  drops out; what is left is where the block gates its input unlike everywhere else.
  ``analyse`` gets these maps with the logits from one pass (``attention.attention_pass``):
  a model served by ``fuse`` computes them inside its graph.
- Stage map (class-agnostic): the block maps of the stage averaged. Non-negative raw
  values; displayed min-max normalised to [0, 1]. It shows where the attention singles
  out a region, for no class in particular (``benchmarks/heatmaps.py`` measures how
  well it finds the object).
- Class map (evidence for class k, Grad-CAM on the LKA attention): for each block,
  channel weights ``alpha_c`` = the spatial mean of d logit_k / d attn_c; the block map
  is ``sum_c alpha_c * attn_c``; a stage sums its blocks. Signed raw values; displayed
  as ``relu(raw) / max(relu(raw))``, so only positive evidence is coloured. It needs
  its own forward and backward pass on the unfused model with gradients on.
- Combined map: the per-stage display maps resampled (bicubic, clamped to [0, 1])
  onto the finest stage grid, averaged over the non-constant ones, normalised again
  (min-max for stage maps, divided by the maximum for class maps).

A map without spatial variation (range at most 1e-5 of its largest magnitude, e.g. a
1x1 grid), with no positive evidence (class maps), or with non-finite values is flagged
``constant`` and displayed as zeros; its overlay leaves the image uncoloured.

Display maps go back onto the original image through the model's own eval transform
(resize, centre crop), sampled bicubically at the original pixels, so overlays line
up with the image at its own size and aspect ratio; outside the crop nothing is drawn.

Each ``Heatmap`` says what it is (``kind``, ``stage``, ``block``, ``target`` class);
callers pick maps with ``find_map`` by those fields, never by title or position.
Besides the page's ``analyse``, ``class_maps`` and ``overlay``, the measuring API is
public too: ``render`` (a map on the original image, as values), ``normalise``,
``input_geometry`` and ``stage_maps`` with its channel ``reduce`` (``benchmarks/heatmaps.py``).
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
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

from .images import display_size, to_rgb
from .attention import Maps, attention_pass, departure
from .model import capture_attention
from .predict import eval_transform, placement, preprocess, top_k

CONSTANT_TOLERANCE = 1e-5
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
    """One map on a stage grid: what it is, ``raw`` (native resolution; class maps are signed), ``display`` ([0, 1]).

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
    """A prediction and the class-agnostic maps from the same forward pass."""

    top: dict[str, float]
    maps: list[Heatmap]
    geometry: Geometry


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


def _strides(model: nn.Module) -> list[int]:
    """Input pixels per cell of each stage (4, 8, 16, 32 for VAN)."""
    return [info["reduction"] for info in model.feature_info]


def _is_flat(raw: np.ndarray) -> bool:
    """True when ``raw`` is non-finite or varies by at most ``CONSTANT_TOLERANCE`` of its largest magnitude."""
    if raw.size == 0 or not np.isfinite(raw).all():
        return True
    spread, peak = float(raw.max() - raw.min()), float(np.abs(raw).max())
    return spread == 0.0 or spread <= CONSTANT_TOLERANCE * peak


def normalise(raw: np.ndarray, positive: bool = False) -> tuple[np.ndarray, bool]:
    """``raw`` in [0, 1] (min-max, or ``relu / max`` when ``positive``) and whether it was constant (then zeros)."""
    raw = raw.astype(np.float32)
    zeros = np.zeros_like(raw)
    if _is_flat(raw):
        return zeros, True
    if positive:
        peak = float(raw.max())
        if peak <= CONSTANT_TOLERANCE * float(np.abs(raw).max()):
            return zeros, True
        return np.clip(raw / peak, 0.0, 1.0), False
    low, high = float(raw.min()), float(raw.max())
    return np.clip((raw - low) / (high - low), 0.0, 1.0), False


def _heatmap(kind: MapKind, raw: np.ndarray, stride: int, positive: bool = False, **where: int | None) -> Heatmap:
    """A ``Heatmap`` whose display map is ``normalise(raw, positive)``; ``where``: its stage, block, target."""
    display, constant = normalise(raw, positive)
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


def combine(maps: list[Heatmap], positive: bool = False, target: int | None = None) -> Heatmap:
    """The mean of the non-constant display maps resampled onto the finest grid, normalised again."""
    finest = min(maps, key=lambda m: m.stride)
    h, w = finest.raw.shape
    layers = [
        np.clip(_sample(m.display, w, h, 0.0, 0.0, finest.stride / m.stride, finest.stride / m.stride), 0.0, 1.0)
        for m in maps if not m.constant
    ]
    raw = np.mean(layers, axis=0) if layers else np.zeros((h, w), np.float32)
    return _heatmap(MapKind.COMBINED, raw, finest.stride, positive, target=target)


def stage_maps(captured: dict[tuple[int, int], torch.Tensor], strides: list[int],
               reduce: Callable[[torch.Tensor], torch.Tensor] = departure) -> list[Heatmap]:
    """Per stage: the captured blocks' ``reduce`` maps (default ``departure``) averaged (class-agnostic), then combined.

    ``captured`` holds one image's attention per block, (1, C, h, w), as ``capture_attention`` records it.
    """
    return maps_of_stages({key: reduce(attn[0].float()) for key, attn in captured.items()}, strides)


def maps_of_stages(block_maps: Maps, strides: list[int]) -> list[Heatmap]:
    """Per stage: the mean of its blocks' (h, w) maps in ``block_maps`` (keyed by (stage, block)), then combined."""
    maps = []
    for stage, stride in enumerate(strides):
        raw = torch.stack([m.float() for (s, _), m in sorted(block_maps.items()) if s == stage]).mean(0)
        maps.append(_heatmap(MapKind.STAGE, raw.cpu().numpy(), stride, stage=stage))
    return maps + [combine(maps)]


def maps_of_blocks(block_maps: Maps, strides: list[int]) -> list[Heatmap]:
    """Per block: its (h, w) map from ``block_maps`` (keyed by (stage, block)), class-agnostic."""
    return [_heatmap(MapKind.BLOCK, m.float().cpu().numpy(), strides[s], stage=s, block=b)
            for (s, b), m in sorted(block_maps.items())]


def analyse(model: nn.Module, image: Image.Image, k: int = 5, blocks: bool = False) -> Analysis:
    """Top-``k`` prediction and the stage maps (and block maps if asked) from one inference pass.

    ``model`` is anything ``attention.attention_pass`` runs: a VAN, folded or not, or what ``fuse`` returns.
    """
    image = to_rgb(image)
    device, dtype = placement(model)
    batch = preprocess(model, image).to(device, dtype)
    with torch.inference_mode():
        logits, maps = attention_pass(model, batch)
    strides = _strides(model)
    first = {key: m[0] for key, m in maps.items()}
    heatmaps = maps_of_stages(first, strides) + (maps_of_blocks(first, strides) if blocks else [])
    return Analysis(top_k(model, logits[0], k), heatmaps, input_geometry(model, image.size))


def class_maps(model: nn.Module, image: Image.Image, index: int) -> list[Heatmap]:
    """Evidence for class ``index`` per stage (Grad-CAM on each block's ``attn``), then combined.

    Runs its own pass with gradients on ``model`` (use the unfused model); hooks are
    removed afterwards and no parameter gradient is accumulated.
    """
    param = next(model.parameters())
    with torch.inference_mode(False), torch.enable_grad():
        batch = preprocess(model, to_rgb(image)).to(param.device, param.dtype).requires_grad_(True)
        with capture_attention(model) as captured:
            logits = model(batch)
        keys = sorted(captured)
        grads = torch.autograd.grad(logits[0, index], [captured[key] for key in keys])
    strides = _strides(model)
    per_stage: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for key, grad in zip(keys, grads):
            alpha = grad[0].float().mean((1, 2))
            cam = (alpha[:, None, None] * captured[key][0].float()).sum(0)
            per_stage[key[0]] = per_stage.get(key[0], 0) + cam
    maps = [_heatmap(MapKind.STAGE, per_stage[s].cpu().numpy(), strides[s], positive=True, stage=s, target=index)
            for s in sorted(per_stage)]
    return maps + [combine(maps, positive=True, target=index)]


def image_digest(image: Image.Image) -> str:
    """A hash of the pixels, size and mode of ``image``."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{image.mode}{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


class ClassMapCache:
    """``class_maps`` of one unfused model, computed when asked and kept per (image hash, class) in a small LRU."""

    def __init__(self, model: nn.Module, maxsize: int = 32) -> None:
        self.model = model
        self.maxsize = maxsize
        self._entries: OrderedDict[tuple[str, int], list[Heatmap]] = OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, image: Image.Image, index: int) -> list[Heatmap]:
        """The class maps of ``image`` for class ``index``, from the cache when present."""
        key = (image_digest(image), index)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
            maps = class_maps(self.model, image, index)
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
    """``image`` (RGB, at most ``max_side``) with ``heatmap`` blended in where the model saw it; constant: uncoloured."""
    size = display_size(image.size, max_side)
    base = image if image.mode == "RGB" else to_rgb(image)
    base = base.resize(size, Image.BILINEAR) if base.size != size else base.copy()
    if heatmap.constant or opacity <= 0:
        return base
    patch, box = _render_crop(heatmap, geometry, size)
    if patch.size == 0:
        return base
    region = base.crop(box)
    colours = colorize(patch, colormap)
    base.paste(Image.blend(region, colours, min(1.0, float(opacity))), box)
    return base
