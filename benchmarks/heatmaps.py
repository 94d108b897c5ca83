"""Do the heatmaps earn their place? VAN Studio's maps against baselines at matching resolution, on two splits.

Data: ``van-synth`` scenes at the model's input size (objects a quarter to 0.6 of
the frame, frames 3:4 to 4:3, cluttered and plain backgrounds), split by where the
labelled object's visible pixels are centred (``centroid_offset``: largest axis
distance from the frame's centre, over the shorter side): *centred* (placed
uniformly, offset at most 0.1) and *off-centre* (placed uniformly, near an edge,
cut off by the frame or beside distractor shapes of other classes; offset at least
0.25). Seeds never used in training; the off-centre split draws from seed + 500.

Methods, all drawn as the app draws them (``explain.render`` on the original image):

- the app's maps (``explain``): the page's default map, the evidence for the
  predicted class (LayerCAM on the gated LKA signal against the reference's, from
  the same pass as the prediction), the class map for the true class, class-agnostic
  stage maps and their combination (the gallery's), and for selection other stage
  subsets and class rules;
- before: the app's previous maps (departure of ``attn`` alone, min-max display, and
  Grad-CAM on ``attn``), reproduced here;
- baselines at matching resolution: Grad-CAM and LayerCAM (``grad-cam`` package) on
  stages 1 (stride 4, the app maps' grid) and 2, EigenCAM on stage 3, SmoothGrad
  (Smilkov et al., |gradient| of noisy copies), a dataset-mean map (the default map
  averaged over the validation images: image-independent), a no-network contrast map
  (frequency-tuned saliency, Achanta et al. 2009), a centre Gaussian, uniform, random;
- a deliberately broken map: the default map inverted.

Metrics (``van_app.localization``): tie-aware pointing game, the same with a distance
tolerance (Zhang et al.), mass in mask and its lift; on the first ``--faith-n``
images of each split, RISE deletion / insertion, ROAD (noisy linear imputation,
LeRF - MoRF) and attention ablation (the LKA gated signal of the map's top cells at
each stage replaced by the reference's, area under the target probability over the
ablated share: lower is better). Means with 95% bootstrap intervals; paired
comparisons of the default map with each baseline.

Sanity checks, each one a map can fail (the broken and naive maps show they do):
randomisation (Adebayo et al.: Spearman with the trained model's map once every
weight is re-initialised, from the head down, must fall below 0.5), learned
localisation (the trained model's map must put more mass in the mask than the fully
re-initialised model's: a map that an untrained network draws as well explains the
image, not what the model learned), image specificity
(mass in the image's own mask minus mass in another image's mask must be above 0),
blank images (on 24 blank frames of 8 colours the border band must hold no more than
its area share of the mass, or the map is flagged), ablation against the random map
(ablating the map's top cells must hurt more), class sensitivity (class maps: the
true class's map and the runner-up's must differ, Spearman below 0.9).

Selection on the validation seed (mean of pointing game and mass in mask over both
splits): the stage subset of the class-agnostic combined map and the class rule and
stages of the evidence; the app's constants are compared with the choice. Timing: the
prediction, the page's pass (maps and evidence), old class maps and class maps for any
class, interleaved, one thread.

    python benchmarks/heatmaps.py --model checkpoints/van-b0-shapes --out runs/heatmaps
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pytorch_grad_cam import EigenCAM, GradCAM, LayerCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from sklearn.datasets import load_sample_images

from van_app import VAN, fuse, load_model, preprocess
from van_app.attention import attention_pass, capture_gated, reference, stage_strides
from van_app.attention import CLASS_RULE, CLASS_RULES, CLASS_STAGES
from van_app.explain import (
    COMBINED_STAGES,
    Geometry,
    Heatmap,
    MapKind,
    class_maps,
    combine,
    find_map,
    input_geometry,
    maps_of_pass,
    normalise,
    overlay,
    render,
    stage_maps,
)
from van_app.fold import fold
from van_app.localization import (
    TOLERANCE_FRACTION,
    area_share,
    blurred,
    bootstrap_ci,
    border_share,
    centre_gaussian,
    centroid_offset,
    deletion_insertion,
    mass_in_mask,
    paired_comparison,
    pointing_game,
    rank_correlation,
    removal_order,
    road,
)
from van_app.model import capture_attention
from van_app.predict import data_config
from van_app.synthetic import PLACEMENTS, SHAPES, TRAINING_SCENE, Sample, Scene, generate

CENTRED_MAX, OFF_CENTRE_MIN = 0.1, 0.25
OFF_CENTRE_SEED = 500
SPLITS = {
    "centred": (Scene((0.25, 0.6), TRAINING_SCENE.aspect, ("cluttered", "plain"), ("uniform",)),
                lambda offset: offset <= CENTRED_MAX),
    "off-centre": (Scene((0.25, 0.6), TRAINING_SCENE.aspect, ("cluttered", "plain"), PLACEMENTS),
                   lambda offset: offset >= OFF_CENTRE_MIN),
}
DEFAULT = "default: evidence"  # the page's default map: the evidence for the predicted class
AGNOSTIC = "combined"  # the class-agnostic combined map (the gallery's)
UNWEIGHTED = "evidence, unweighted"  # the default map without weighting by the class-agnostic map
SUBSETS = {"stage 1": (0,), "combined 1-2": (0, 1), "combined 1-3": (0, 1, 2), "combined 1-4": (0, 1, 2, 3),
           "combined 1+3": (0, 2)}
BASELINES = ("Grad-CAM s1", "Grad-CAM s2", "LayerCAM s1", "LayerCAM s2", "EigenCAM s3", "SmoothGrad", "dataset mean",
             "contrast (no network)", "centre Gaussian", "uniform", "random")
BROKEN = "broken: inverted"
# Compared with every baseline in the paired tables; scored for faithfulness (with the broken map and the baselines).
HEADLINE = (DEFAULT, UNWEIGHTED, "class combined", AGNOSTIC, "old stage 1", "old combined")
FAITHFULNESS = HEADLINE + ("Grad-CAM s1", "Grad-CAM s2", "LayerCAM s1", "LayerCAM s2", "SmoothGrad", "centre Gaussian",
                           "contrast (no network)", "random", BROKEN)
ABLATION_SHARES = (0.0, 0.1, 0.2, 0.3, 0.5)
BLANK_COLOURS = ((0, 0, 0), (255, 255, 255), (128, 128, 128), (124, 116, 104), (200, 30, 40), (30, 160, 60),
                 (40, 60, 200), (230, 200, 60))
BLANK_FRAMES = ((96, 96), (128, 96), (96, 128))
SANITY_SPEARMAN, CLASS_SPEARMAN, BLANK_SLACK = 0.5, 0.9, 0.01
METRICS = ("pointing", "pointing_tol", "mass", "lift", "deletion", "insertion", "road", "ablation")
LOWER_IS_BETTER = ("deletion", "ablation")


@dataclass
class Config:
    """What the benchmark measures and where it writes."""

    model: str
    out: Path
    test_seed: int = 302
    val_seed: int = 301
    n: int = 300
    val_n: int = 120
    faith_n: int = 50
    steps: int = 8
    smooth_n: int = 10
    sanity_n: int = 40
    timing_n: int = 20
    boot: int = 2000
    batch: int = 32
    seed: int = 0


@dataclass
class Scores:
    """Per-image metric values of one method on one split."""

    pointing: list[float] = field(default_factory=list)
    pointing_tol: list[float] = field(default_factory=list)
    mass: list[float] = field(default_factory=list)
    lift: list[float] = field(default_factory=list)
    deletion: list[float] = field(default_factory=list)
    insertion: list[float] = field(default_factory=list)
    road: list[float] = field(default_factory=list)
    ablation: list[float] = field(default_factory=list)
    specificity: list[float] = field(default_factory=list)


# ---------------------------------------------------------------- data


def split_samples(split: str, seed: int, n: int, size: int) -> list[Sample]:
    """``n`` images of ``split`` (classes in turn), the first of each class's indices that the split accepts."""
    scene, accept = SPLITS[split]
    seed += OFF_CENTRE_SEED if split == "off-centre" else 0
    per_class: list[list[Sample]] = []
    for shape in SHAPES:
        kept, index = [], 0
        while len(kept) < -(-n // len(SHAPES)):
            sample = generate(shape, index, size, seed, scene)
            index += 1
            if sample.mask.any() and accept(centroid_offset(sample.mask)):
                kept.append(sample)
        per_class.append(kept)
    return [per_class[i % len(SHAPES)][i // len(SHAPES)] for i in range(n)]


def chunks(items: list, size: int) -> Iterator[list]:
    """``items`` in consecutive parts of at most ``size``."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def label_of(model: torch.nn.Module, sample: Sample) -> int:
    """The model's class index of the sample's shape."""
    return model.labels.index(sample.shape)


def pictures(samples: list[Sample]) -> list[Image.Image]:
    """The samples' images as PIL images."""
    return [Image.fromarray(s.image) for s in samples]


def batch_of(model: torch.nn.Module, images: list[Image.Image]) -> torch.Tensor:
    """The images preprocessed as the model expects, stacked."""
    return torch.cat([preprocess(model, image) for image in images])


# ---------------------------------------------------------------- maps


def shown(heatmap: Heatmap, geometry: Geometry) -> np.ndarray:
    """The map as the app draws it on the original image, (H, W) in [0, 1] (zeros when flagged)."""
    return render(heatmap, geometry)[0]


def input_map(values: np.ndarray, kind: MapKind = MapKind.BLOCK) -> Heatmap:
    """A map at model-input resolution (stride 1), drawn relative to its range (as ``grad-cam`` draws its maps)."""
    values = np.asarray(values, np.float32)
    display = (values - values.min()) / max(float(values.max() - values.min()), 1e-12)
    return Heatmap(kind, values, display.astype(np.float32), 1, bool(values.max() - values.min() <= 0))


def app_maps(model: torch.nn.Module, folded: torch.nn.Module, samples: list[Sample], batch: int,
             candidates: bool = False) -> tuple[dict[str, list[Heatmap]], list[int]]:
    """The app's maps: the default (the evidence for the predicted class), the class-agnostic ones (each stage, the
    combined map and other subsets) and class maps for the true class (with ``candidates``: every rule and stage
    subset), as heatmaps; and the predicted class of each image."""
    strides = stage_strides(model)
    maps: dict[str, list[Heatmap]] = {}
    predicted: list[int] = []
    for part in chunks(samples, batch):
        images = pictures(part)
        with torch.inference_mode():
            result = attention_pass(folded, batch_of(model, images))
        predicted += result.logits.argmax(-1).tolist()
        for i, (image, sample) in enumerate(zip(images, part)):
            stages, shown_evidence = maps_of_pass(result, i, strides)
            found = {f"stage {s + 1}": find_map(stages, MapKind.STAGE, s) for s in range(len(strides))}
            found[AGNOSTIC] = find_map(stages, MapKind.COMBINED)
            found[DEFAULT] = find_map(shown_evidence, MapKind.COMBINED)
            unweighted = []
            for s, evidence in result.evidence.items():
                raw = evidence[i].float().numpy()
                display, constant = normalise(raw)
                unweighted.append(Heatmap(MapKind.STAGE, raw, display, strides[s], constant, stage=s,
                                          target=found[DEFAULT].target))
            found[UNWEIGHTED] = combine(unweighted, CLASS_STAGES)
            found.update({name: combine(stages[:-1], subset, absolute=True) for name, subset in SUBSETS.items()
                          if name not in found})
            for rule in CLASS_RULES if candidates else (CLASS_RULE,):
                every = tuple(range(len(strides))) if candidates else CLASS_STAGES
                evidence = class_maps(folded, image, label_of(model, sample), rule, stages=every)[:-1]
                if rule == CLASS_RULE:
                    found["class combined"] = combine(evidence, CLASS_STAGES)
                if candidates:
                    found.update({f"class {rule} {name}": combine(evidence, subset)
                                  for name, subset in SUBSETS.items()})
            for name, heatmap in found.items():
                maps.setdefault(name, []).append(heatmap)
    return maps, predicted


def old_maps(model: torch.nn.Module, samples: list[Sample], batch: int) -> dict[str, list[Heatmap]]:
    """The app's previous maps: stage 1 and combined (departure of ``attn``, min-max) and class combined (Grad-CAM on
    ``attn``, the true class)."""
    strides = stage_strides(model)
    maps: dict[str, list[Heatmap]] = {}
    for part in chunks(samples, batch):
        images = pictures(part)
        x = batch_of(model, images)
        with torch.inference_mode(), capture_attention(model, detach=True) as captured:
            model(x)
        with torch.enable_grad(), capture_attention(model) as attached:
            logits = model(x)
            keys = sorted(attached)
            grads = torch.autograd.grad(logits[range(len(part)), [label_of(model, s) for s in part]].sum(),
                                        [attached[key] for key in keys])
        for i, sample in enumerate(part):
            stages = [minmax(m) for m in stage_maps({k: a[i : i + 1] for k, a in captured.items()}, strides)[:-1]]
            mixed = combine(stages, tuple(range(len(strides))))
            maps.setdefault("old stage 1", []).append(stages[0])
            maps.setdefault("old combined", []).append(minmax(mixed))
            cams: dict[int, torch.Tensor] = {}
            for key, grad in zip(keys, grads):
                cam = (grad[i].mean((1, 2))[:, None, None] * attached[key][i].detach()).sum(0)
                cams[key[0]] = cams.get(key[0], 0) + cam
            evidence = []
            for s, cam in sorted(cams.items()):
                display, constant = normalise(cam.numpy())
                evidence.append(Heatmap(MapKind.STAGE, cam.numpy(), display, strides[s], constant, stage=s,
                                        target=label_of(model, sample)))
            maps.setdefault("old class combined", []).append(combine(evidence, tuple(range(len(strides)))))
    return maps


def minmax(heatmap: Heatmap) -> Heatmap:
    """``heatmap`` with its raw values min-max normalised as its display (the app's previous display)."""
    raw = heatmap.raw
    spread = float(raw.max() - raw.min())
    if not np.isfinite(raw).all() or spread <= 1e-5 * float(np.abs(raw).max()):
        return Heatmap(heatmap.kind, raw, np.zeros_like(raw), heatmap.stride, True, heatmap.stage, heatmap.block)
    display = ((raw - raw.min()) / spread).astype(np.float32)
    return Heatmap(heatmap.kind, display, display, heatmap.stride, False, heatmap.stage, heatmap.block)


def cam_maps(model: torch.nn.Module, samples: list[Sample], batch: int) -> dict[str, list[Heatmap]]:
    """Grad-CAM and LayerCAM on stages 1 and 2 and EigenCAM on stage 3 (``grad-cam``, true class), at input size."""
    methods = {"Grad-CAM s1": (GradCAM, 0), "Grad-CAM s2": (GradCAM, 1), "LayerCAM s1": (LayerCAM, 0),
               "LayerCAM s2": (LayerCAM, 1), "EigenCAM s3": (EigenCAM, 2)}
    maps: dict[str, list[Heatmap]] = {}
    for name, (method, stage) in methods.items():
        with method(model=model, target_layers=[model.stages[stage]]) as cam:
            for part in chunks(samples, batch):
                out = cam(input_tensor=batch_of(model, pictures(part)),
                          targets=[ClassifierOutputTarget(label_of(model, s)) for s in part])
                maps.setdefault(name, []).extend(input_map(m) for m in out)
    return maps


def smoothgrad(model: torch.nn.Module, samples: list[Sample], batch: int, n: int, seed: int) -> list[Heatmap]:
    """SmoothGrad: the mean over ``n`` noisy copies (sigma 0.15 of the input's range) of |d logit / d input|, the
    largest over colour channels, at input size."""
    generator = torch.Generator().manual_seed(seed)
    maps = []
    for part in chunks(samples, batch):
        x = batch_of(model, pictures(part))
        sigma = 0.15 * (x.amax((1, 2, 3)) - x.amin((1, 2, 3))).view(-1, 1, 1, 1)
        targets = torch.tensor([label_of(model, s) for s in part])
        total = torch.zeros(x.shape[0], *x.shape[-2:])
        for _ in range(n):
            noisy = (x + torch.randn(x.shape, generator=generator) * sigma).requires_grad_(True)
            with torch.enable_grad():
                logits = model(noisy)
                (grad,) = torch.autograd.grad(logits[range(len(part)), targets].sum(), noisy)
            total += grad.abs().amax(1)
        maps += [input_map((total[i] / n).numpy()) for i in range(len(part))]
    return maps


def contrast_map(sample: Sample) -> np.ndarray:
    """Frequency-tuned saliency: the distance of each slightly blurred pixel's colour from the image's mean colour."""
    image = torch.from_numpy(sample.image).permute(2, 0, 1).float() / 255
    smooth = blurred(image, 1.0 / min(image.shape[-2:]))
    return (smooth - image.mean((1, 2), keepdim=True)).norm(dim=0).numpy()


def dataset_mean(maps: list[Heatmap]) -> Heatmap:
    """The mean of the (equal-grid) maps' raw values: an image-independent map."""
    raw = np.mean([m.raw for m in maps], axis=0)
    return Heatmap(MapKind.COMBINED, raw, (raw / raw.max()).astype(np.float32), maps[0].stride, False)


def all_maps(model: torch.nn.Module, folded: torch.nn.Module, samples: list[Sample], cfg: Config, mean_map: Heatmap
             ) -> tuple[dict[str, list[np.ndarray]], list[int]]:
    """Every method's map of every image, drawn on the original image; and the predicted classes."""
    heatmaps, predicted = app_maps(model, folded, samples, cfg.batch)
    heatmaps.update(old_maps(model, samples, cfg.batch))
    heatmaps.update(cam_maps(model, samples, cfg.batch))
    heatmaps["SmoothGrad"] = smoothgrad(model, samples, cfg.batch, cfg.smooth_n, cfg.seed)
    heatmaps["dataset mean"] = [mean_map] * len(samples)
    drawn: dict[str, list[np.ndarray]] = {}
    for name, per_image in heatmaps.items():
        drawn[name] = [shown(m, input_geometry(model, s.mask.shape[::-1])) for m, s in zip(per_image, samples)]
    rng = np.random.default_rng(cfg.seed)
    drawn["contrast (no network)"] = [contrast_map(s) for s in samples]
    drawn["centre Gaussian"] = [centre_gaussian(s.mask.shape) for s in samples]
    drawn["uniform"] = [np.ones(s.mask.shape) for s in samples]
    drawn["random"] = [rng.random(s.mask.shape) for s in samples]
    drawn[BROKEN] = [m.max() - m for m in drawn[DEFAULT]]
    return drawn, predicted


# ---------------------------------------------------------------- faithfulness


def probability_fn(model: torch.nn.Module, geometry: Geometry) -> Callable[[torch.Tensor], torch.Tensor]:
    """Class probabilities of original-space images in [0, 1] (B, 3, H, W) through the model's eval transform."""
    cfg = data_config(model)
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    (w, h), (sx, sy) = geometry.image_size, geometry.scale
    (ox, oy), (iw, ih) = (int(round(o)) for o in geometry.offset), geometry.input_size

    def probs(batch: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(batch, size=(round(h * sy), round(w * sx)), mode="bicubic", align_corners=False)
        x = (x.clamp(0, 1)[..., oy : oy + ih, ox : ox + iw] - mean) / std
        with torch.inference_mode():
            return model(x).float().softmax(-1)

    return probs


def on_input(values: np.ndarray, geometry: Geometry) -> torch.Tensor:
    """An original-space map resampled onto the model input, as the eval transform moves pixels, (H_in, W_in)."""
    (w, h), (sx, sy) = geometry.image_size, geometry.scale
    (ox, oy), (iw, ih) = (int(round(o)) for o in geometry.offset), geometry.input_size
    x = torch.from_numpy(np.asarray(values, np.float32))[None, None]
    x = F.interpolate(x, size=(round(h * sy), round(w * sx)), mode="bilinear", align_corners=False)
    return x[0, 0, oy : oy + ih, ox : ox + iw]


def cell_scores(values: torch.Tensor, stride: int, grid: tuple[int, int]) -> torch.Tensor:
    """The mean of an input-space map over each cell of a stage grid (cell (i, j) centred on pixel (r*i, r*j))."""
    half = stride // 2
    padded = F.pad(values[None, None], (half, stride, half, stride), mode="replicate")
    return F.avg_pool2d(padded, stride)[0, 0, : grid[0], : grid[1]]


class Ablation:
    """Target probabilities with each stage's LKA gated signal at a map's top cells replaced by the reference's."""

    def __init__(self, model: torch.nn.Module, sample: Sample, seed: int) -> None:
        self.model, self.seed = model, seed
        self.target = label_of(model, sample)
        self.geometry = input_geometry(model, sample.mask.shape[::-1])
        self.x = preprocess(model, Image.fromarray(sample.image))
        with torch.inference_mode(), capture_gated(model) as captured:
            model(reference(self.x))
        self.reference = dict(captured)
        self.strides = dict(enumerate(stage_strides(model)))

    def curve(self, values: np.ndarray) -> np.ndarray:
        """The target's probability with ``ABLATION_SHARES`` of each stage's cells ablated, top cells first."""
        score = on_input(values, self.geometry)
        masks = {}
        for s in self.strides:
            grid = self.reference[(s, 0)].shape[-2:]
            order = torch.from_numpy(removal_order(cell_scores(score, self.strides[s], grid).numpy(), self.seed))
            rank = torch.empty_like(order)
            rank[order] = torch.arange(order.numel())
            counts = torch.tensor([round(q * order.numel()) for q in ABLATION_SHARES])
            masks[s] = (rank[None] < counts[:, None]).view(-1, 1, *grid)
        handles = [self.model.stages[s].blocks[b].attn.lka.register_forward_hook(
            lambda _m, _a, out, key=(s, b): torch.where(masks[key[0]], self.reference[key], out))
            for s, b in self.reference]
        try:
            with torch.inference_mode():
                probs = self.model(self.x.expand(len(ABLATION_SHARES), -1, -1, -1)).float().softmax(-1)
        finally:
            for handle in handles:
                handle.remove()
        return probs[:, self.target].numpy()


def faithfulness(model: torch.nn.Module, samples: list[Sample], maps: dict[str, list[np.ndarray]], cfg: Config,
                 results: dict[str, Scores]) -> None:
    """RISE deletion / insertion, ROAD and attention ablation of ``FAITHFULNESS`` maps on the first ``faith_n``."""
    for i, sample in enumerate(samples[: cfg.faith_n]):
        geometry = input_geometry(model, sample.mask.shape[::-1])
        probs = probability_fn(model, geometry)
        image = torch.from_numpy(sample.image).permute(2, 0, 1).float() / 255
        ablation = Ablation(model, sample, cfg.seed + i)
        for name in FAITHFULNESS:
            m, r = maps[name][i], results[name]
            curves = deletion_insertion(probs, image, m, label_of(model, sample), cfg.steps, seed=cfg.seed + i)
            r.deletion.append(curves.deletion_auc)
            r.insertion.append(curves.insertion_auc)
            r.road.append(road(probs, image, m, label_of(model, sample), seed=cfg.seed + i).score)
            r.ablation.append(float(np.trapezoid(ablation.curve(m), ABLATION_SHARES) / ABLATION_SHARES[-1]))


# ---------------------------------------------------------------- scoring


def localisation(samples: list[Sample], maps: dict[str, list[np.ndarray]]) -> dict[str, Scores]:
    """Pointing game (exact and with tolerance), mass in mask, lift and image specificity of every method."""
    results = {name: Scores() for name in maps}
    n = len(samples)
    for i, sample in enumerate(samples):
        tolerance = TOLERANCE_FRACTION * min(sample.mask.shape)
        other = np.asarray(Image.fromarray(samples[(i + 1) % n].mask).resize(sample.mask.shape[::-1], Image.NEAREST))
        for name, per_image in maps.items():
            m, r = per_image[i], results[name]
            r.pointing.append(pointing_game(m, sample.mask))
            r.pointing_tol.append(pointing_game(m, sample.mask, tolerance=tolerance))
            r.mass.append(mass_in_mask(m, sample.mask))
            r.lift.append(r.mass[-1] / area_share(sample.mask))
            r.specificity.append(r.mass[-1] - (mass_in_mask(m, other) if other.any() else r.mass[-1]))
    return results


def summarise(results: dict[str, Scores], boot: int, seed: int) -> dict[str, dict[str, list[float]]]:
    """Mean and 95% interval of each metric of each method (metrics not measured left out)."""
    table: dict[str, dict[str, list[float]]] = {}
    for name, r in results.items():
        table[name] = {}
        for metric in (*METRICS, "specificity"):
            values = getattr(r, metric)
            if values:
                e = bootstrap_ci(np.array(values), boot, seed=seed)
                table[name][metric] = [e.mean, e.low, e.high]
    return table


def criterion(scores: Scores) -> float:
    """The selection criterion: the mean of pointing game and mass in mask."""
    return (float(np.mean(scores.pointing)) + float(np.mean(scores.mass))) / 2


def paired_rows(results: dict[str, dict[str, Scores]], cfg: Config) -> list[dict]:
    """The default map minus each baseline per split and metric (deletion and ablation signs flipped: > 0 is better)."""
    rows = []
    for split, per_method in results.items():
        for other in (*BASELINES, "old stage 1", "old combined", "class combined", AGNOSTIC, UNWEIGHTED):
            for metric in METRICS:
                a, b = getattr(per_method[DEFAULT], metric), getattr(per_method[other], metric)
                if not a or not b:
                    continue
                sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
                p = paired_comparison(sign * np.array(a), sign * np.array(b), cfg.boot, cfg.seed)
                rows.append(dict(split=split, versus=other, metric=metric, better_by=p.difference.mean,
                                 low=p.difference.low, high=p.difference.high, p=p.p_value, wins=p.wins,
                                 losses=p.losses, ties=p.ties))
    return rows


# ---------------------------------------------------------------- sanity checks


def randomised(model: torch.nn.Module, parts: list[str], seed: int) -> torch.nn.Module:
    """A copy of ``model`` whose parameters and buffers under ``parts`` (prefixes) are freshly initialised."""
    torch.manual_seed(seed)
    fresh = VAN(**model.model_args).state_dict()
    copied = copy.deepcopy(model)
    state = copied.state_dict()
    state.update({k: v for k, v in fresh.items() if any(k.startswith(p) for p in parts)})
    copied.load_state_dict(state)
    return copied.eval()


def cascade(model: torch.nn.Module, samples: list[Sample], cfg: Config, mean_map: Heatmap,
            reference_maps: dict[str, list[np.ndarray]]
            ) -> tuple[list[tuple[str, dict[str, float]]], dict[str, list[np.ndarray]]]:
    """Mean Spearman of each method's maps with the trained model's as the model is re-initialised from the head down;
    and the maps of the fully re-initialised model."""
    steps = ["head"] + [f"stages.{s}." for s in reversed(range(len(model.stages)))]
    rows = []
    for k in range(1, len(steps) + 1):
        broken = randomised(model, steps[:k], cfg.seed + k)
        maps, _ = all_maps(broken, fold(broken), samples, cfg, mean_map)
        name = "head" if k == 1 else f"head + stages {len(model.stages) - k + 2}-{len(model.stages)}"
        rows.append((name, {m: mean_correlation(reference_maps[m], maps[m]) for m in maps}))
    return rows, maps


def mean_correlation(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    """The mean Spearman correlation of paired maps over the pairs where it is defined (NaN when it never is)."""
    values = [v for v in (rank_correlation(x, y) for x, y in zip(a, b)) if np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def blank_check(model: torch.nn.Module, folded: torch.nn.Module, cfg: Config, mean_map: Heatmap
                ) -> dict[str, dict[str, float]]:
    """Each method's border-band share of the mass on blank frames and on scikit-learn's photos, and the band's area."""
    blanks = [Sample(np.full((h, w, 3), colour, np.uint8), np.ones((h, w), bool), SHAPES[0], colour)
              for colour in BLANK_COLOURS for w, h in BLANK_FRAMES]
    photos = [Sample(np.asarray(Image.fromarray(a).resize((160, 107), Image.BICUBIC)), np.ones((107, 160), bool),
                     SHAPES[0], (0, 0, 0)) for a in load_sample_images().images]
    result: dict[str, dict[str, float]] = {}
    for kind, samples in (("blank", blanks), ("photos", photos)):
        maps, _ = all_maps(model, folded, samples, cfg, mean_map)
        for name, per_image in maps.items():
            shares = [border_share(m) for m in per_image]
            result.setdefault(name, {})[kind] = float(np.mean([s for s, _ in shares]))
            result[name][f"{kind} area"] = float(np.mean([a for _, a in shares]))
    return result


def class_sensitivity(model: torch.nn.Module, folded: torch.nn.Module, samples: list[Sample]) -> float:
    """Mean Spearman between the app's combined class map for the true class and for the runner-up class."""
    values = []
    for image, sample in zip(pictures(samples), samples):
        with torch.inference_mode():
            logits = folded(preprocess(model, image))[0]
        true = label_of(model, sample)
        runner_up = int(logits.masked_fill(torch.arange(logits.numel()) == true, -float("inf")).argmax())
        a, b = (find_map(class_maps(folded, image, k), MapKind.COMBINED).raw for k in (true, runner_up))
        values.append(rank_correlation(a, b))
    return float(np.nanmean(values))


def sanity_table(results: dict[str, dict[str, Scores]], cascade_rows: list[tuple[str, dict[str, float]]],
                 learned: dict[str, list[float]], blanks: dict[str, dict[str, float]], sensitivity: float,
                 cfg: Config) -> dict[str, dict]:
    """Per method: each check's figure and whether it passed (None where it does not apply)."""
    table = {}
    final = cascade_rows[-1][1]
    off = results["off-centre"]
    for name in off:
        row: dict = {}
        rho = final.get(name, float("nan"))
        row["randomisation"] = [rho, bool(np.isfinite(rho) and rho < SANITY_SPEARMAN)]
        n = len(learned[name])
        drop = paired_comparison(np.array(off[name].mass[:n]), np.array(learned[name]), cfg.boot, cfg.seed)
        row["learned"] = [drop.difference.mean, drop.difference.low, drop.difference.high, drop.difference.low > 0]
        spec = bootstrap_ci(np.array(off[name].specificity), cfg.boot, seed=cfg.seed)
        row["specificity"] = [spec.mean, spec.low, spec.high, spec.low > 0]
        b = blanks.get(name)
        row["blank"] = [b["blank"], b["blank area"], b["blank"] <= b["blank area"] + BLANK_SLACK] if b else None
        row["photos"] = [b["photos"], b["photos area"], b["photos"] <= b["photos area"] + BLANK_SLACK] if b else None
        if off[name].ablation and name != "random":
            p = paired_comparison(np.array(off["random"].ablation), np.array(off[name].ablation), cfg.boot, cfg.seed)
            row["ablation"] = [p.difference.mean, p.difference.low, p.difference.high, p.difference.low > 0]
        row["class"] = [sensitivity, sensitivity < CLASS_SPEARMAN] if name in ("class combined", DEFAULT) else None
        table[name] = row
    return table


# ---------------------------------------------------------------- timing


def timings(model: torch.nn.Module, folded: torch.nn.Module, samples: list[Sample], rounds: int = 3
            ) -> dict[str, float]:
    """Milliseconds per image, one thread, interleaved rounds (median): prediction, and the page's pass (prediction,
    maps and evidence; folded eager and the ``fuse`` engine), old class maps (unfused, hooks, input gradient) and new
    ones for any class (folded, no hooks; and the engine's graph with that class as its target)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = fuse(model)
    name = getattr(engine, "engine", "engine")
    images = pictures(samples)
    x = [preprocess(model, image) for image in images]
    old = OldClassMaps(model)
    jobs = {
        "prediction (folded PyTorch)": lambda i: folded(x[i]),
        "prediction + maps + evidence (folded PyTorch)": lambda i: attention_pass(folded, x[i]),
        f"prediction ({name})": lambda i: engine(x[i]),
        f"prediction + maps + evidence ({name})": lambda i: attention_pass(engine, x[i]),
        "class maps, before (unfused, hooks)": lambda i: old(images[i], label_of(model, samples[i])),
        "class maps of any class (folded, no hooks)": lambda i: class_maps(folded, images[i], label_of(model, samples[i])),
        f"class maps of any class ({name}, the page's picker)":
            lambda i: class_maps(engine, images[i], label_of(model, samples[i])),
    }
    times: dict[str, list[float]] = {name: [] for name in jobs}
    try:
        for _ in range(rounds + 1):  # the first round warms up
            for name, job in jobs.items():
                start = time.perf_counter()
                with torch.inference_mode():
                    for i in range(len(images)):
                        job(i)
                times[name].append(1000 * (time.perf_counter() - start) / len(images))
    finally:
        torch.set_num_threads(threads)
    return {name: float(np.median(t[1:])) for name, t in times.items()}


class OldClassMaps:
    """The app's previous class maps, for timing: Grad-CAM on ``attn`` of the unfused model, hooks, input gradient."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def __call__(self, image: Image.Image, index: int) -> list[torch.Tensor]:
        with torch.inference_mode(False), torch.enable_grad():
            x = preprocess(self.model, image).requires_grad_(True)
            with capture_attention(self.model) as captured:
                logits = self.model(x)
            keys = sorted(captured)
            grads = torch.autograd.grad(logits[0, index], [captured[key] for key in keys])
        return [(g[0].mean((1, 2))[:, None, None] * captured[k][0].detach()).sum(0) for k, g in zip(keys, grads)]


# ---------------------------------------------------------------- output


def print_table(split: str, table: dict[str, dict[str, list[float]]], accuracy: float, n: int, faith_n: int) -> None:
    """One split's results, methods as rows."""
    print(f"\n{split}: {n} test images (top-1 {accuracy:.3f}); deletion, insertion, ROAD, ablation on the first "
          f"{faith_n}; mean [95% bootstrap CI]")
    head = (f"{'method':<26}{'pointing':>21}{'pointing @tol':>21}{'mass in mask':>21}{'lift':>6}{'deletion':>8}"
            f"{'insert':>8}{'ROAD':>8}{'ablation':>9}")
    print(head)
    print("-" * len(head))
    for name, row in table.items():
        cells = [f"{fmt(row[m]):>21}" for m in ("pointing", "pointing_tol", "mass")]
        cells.append(f"{row['lift'][0]:>6.2f}")
        cells += [f"{row[m][0]:>{8 if m != 'ablation' else 9}.3f}" if m in row else " " * (8 if m != "ablation" else 9)
                  for m in ("deletion", "insertion", "road", "ablation")]
        print(f"{name:<26}{''.join(cells)}")


def fmt(cell: list[float]) -> str:
    """``mean [low, high]`` to three places."""
    return f"{cell[0]:.3f} [{cell[1]:.3f}, {cell[2]:.3f}]"


def write_csv(path: Path, data: dict[str, list[Sample]], results: dict[str, dict[str, Scores]], seed: int) -> None:
    """One row per (split, image, method) with every metric (faithfulness empty where not measured)."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["split", "seed", "index", "class", "area_share", "offset", "method", *METRICS, "specificity"])
        for split, samples in data.items():
            for name, r in results[split].items():
                for i, sample in enumerate(samples):
                    values = [getattr(r, m)[i] if i < len(getattr(r, m)) else "" for m in METRICS]
                    writer.writerow([split, seed, i, sample.shape, area_share(sample.mask),
                                     round(centroid_offset(sample.mask), 4), name, *values, r.specificity[i]])


def plot(path: Path, tables: dict[str, dict[str, dict[str, list[float]]]], examples: list[tuple[str, list]]) -> None:
    """Pointing game and mass in mask per method on both splits (95% intervals), and example overlays."""
    names = [n for n in tables["off-centre"] if n in (*HEADLINE, *BASELINES, BROKEN)]
    fig = plt.figure(figsize=(22, 8 + 2.6 * len(examples)))
    grid = fig.add_gridspec(1 + len(examples), 4, height_ratios=[8] + [2.6] * len(examples))
    for col, (split, metric, title) in enumerate((("centred", "pointing", "pointing game"),
                                                  ("centred", "mass", "mass in mask"),
                                                  ("off-centre", "pointing", "pointing game"),
                                                  ("off-centre", "mass", "mass in mask"))):
        ax = fig.add_subplot(grid[0, col])
        rows = tables[split]
        mean = np.array([rows[n][metric][0] for n in names])
        err = np.array([[rows[n][metric][0] - rows[n][metric][1], rows[n][metric][2] - rows[n][metric][0]]
                        for n in names]).T
        colours = ["tab:red" if n == DEFAULT else "tab:gray" if n in BASELINES else "black" if n == BROKEN
                   else "tab:orange" if n.startswith("old") else "tab:blue" for n in names]
        ax.barh(names, mean, xerr=err, color=colours)
        ax.invert_yaxis()
        if col:
            ax.set_yticklabels([])
        ax.set_title(f"{split}: {title}")
    for row, (caption, panels) in enumerate(examples, start=1):
        for col, (title, picture) in enumerate(panels[:4]):
            ax = fig.add_subplot(grid[row, col])
            ax.imshow(picture)
            ax.set_title(f"{caption}: {title}" if col == 0 else title, fontsize=10)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def example_panels(model: torch.nn.Module, folded: torch.nn.Module, sample: Sample) -> list[tuple[str, Image.Image]]:
    """The image with the previous stage-1 map, the default map (evidence), the class-agnostic combined map and
    LayerCAM on stage 2 drawn over it."""
    image = Image.fromarray(sample.image).resize((sample.image.shape[1] * 2, sample.image.shape[0] * 2))
    geometry = input_geometry(model, image.size)
    old = old_maps(model, [sample], 1)["old stage 1"][0]
    strides = stage_strides(model)
    with torch.inference_mode():
        result = attention_pass(folded, preprocess(model, image))
    stages, evidence = maps_of_pass(result, 0, strides)
    layercam = cam_maps(model, [sample], 1)["LayerCAM s2"][0]
    return [("before: stage 1 (attn, min-max)", overlay(image, old, geometry)),
            ("now: default (evidence)", overlay(image, find_map(evidence, MapKind.COMBINED), geometry)),
            ("now: class-agnostic combined", overlay(image, find_map(stages, MapKind.COMBINED), geometry)),
            ("LayerCAM stage 2", overlay(image, layercam, geometry))]


def parse_args() -> Config:
    """The benchmark's command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="checkpoints/van-b0-shapes",
                   help="van_app export folder (or any load_model source)")
    p.add_argument("--out", type=Path, default=Path("runs/heatmaps"), help="folder for the CSVs, JSON and plot")
    helps = {"test_seed": "van-synth seed of the test images (the off-centre split adds 500)",
             "val_seed": "van-synth seed of the validation images that select the default map and class rule",
             "n": "test images per split", "val_n": "validation images per split",
             "faith_n": "test images per split with deletion/insertion, ROAD and ablation",
             "steps": "deletion/insertion steps", "smooth_n": "SmoothGrad noisy copies",
             "sanity_n": "images of the randomisation and class-sensitivity checks",
             "timing_n": "images timed per round", "boot": "bootstrap resamples", "batch": "batch size",
             "seed": "seed of tie-breaking, noise, random maps, re-initialisation, bootstrap"}
    for f in fields(Config)[2:]:
        p.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=f.default, help=helps[f.name])
    return Config(**vars(p.parse_args()))


def main() -> None:
    """Run the whole benchmark; write ``heatmaps.csv``, ``summary.json`` and ``heatmaps.png`` to ``--out``."""
    cfg = parse_args()
    started = time.perf_counter()
    cfg.out.mkdir(parents=True, exist_ok=True)
    model = load_model(cfg.model)
    folded = fold(model)
    size = data_config(model)["input_size"][-1]
    summary: dict = {"config": {k: str(v) for k, v in vars(cfg).items()}, "image_size": size}

    # validation: the default map's stages and the class rule
    val = {split: split_samples(split, cfg.val_seed, cfg.val_n, size) for split in SPLITS}
    val_scores: dict[str, dict[str, Scores]] = {}
    val_maps: dict[str, list[Heatmap]] = {}
    for split, samples in val.items():
        heatmaps, _ = app_maps(model, folded, samples, cfg.batch, candidates=True)
        val_maps.setdefault(DEFAULT, []).extend(heatmaps[DEFAULT])
        drawn = {name: [shown(m, input_geometry(model, s.mask.shape[::-1])) for m, s in zip(per, samples)]
                 for name, per in heatmaps.items()}
        val_scores[split] = localisation(samples, drawn)
    mean_map = dataset_mean(val_maps[DEFAULT])
    crit = {name: float(np.mean([criterion(val_scores[s][name]) for s in SPLITS])) for name in val_scores["centred"]}
    subsets = {name: crit[name] for name in SUBSETS}
    classes = {(rule, name): crit[f"class {rule} {name}"] for rule in CLASS_RULES for name in SUBSETS}
    best_subset, (best_rule, best_class) = max(subsets, key=subsets.get), max(classes, key=classes.get)
    summary["validation"] = {"criterion": crit, "selected_subset": best_subset, "selected_rule": best_rule,
                             "selected_class_subset": best_class, "app_subset": list(COMBINED_STAGES),
                             "app_rule": CLASS_RULE, "app_class_subset": list(CLASS_STAGES)}
    print(f"validation (seed {cfg.val_seed}, {cfg.val_n} images per split), mean of pointing game and mass in mask "
          f"over both splits:")
    print("  class-agnostic combined map: " + ", ".join(f"{k} {v:.3f}" for k, v in subsets.items())
          + f" -> {best_subset}; the app averages stages {[s + 1 for s in COMBINED_STAGES]}"
          + (" (the same)" if SUBSETS[best_subset] == tuple(COMBINED_STAGES) else " (NOT the choice)"))
    ranked = sorted(classes.items(), key=lambda item: -item[1])[:6]
    print("  class map: " + ", ".join(f"{r} {k} {v:.3f}" for (r, k), v in ranked)
          + f" ... -> {best_rule} {best_class}; the app uses {CLASS_RULE} over stages {[s + 1 for s in CLASS_STAGES]}"
          + (" (the same)" if (best_rule, SUBSETS[best_class]) == (CLASS_RULE, tuple(CLASS_STAGES)) else " (NOT)"))

    # test: both splits
    data = {split: split_samples(split, cfg.test_seed, cfg.n, size) for split in SPLITS}
    results: dict[str, dict[str, Scores]] = {}
    tables: dict[str, dict] = {}
    drawn_by_split: dict[str, dict[str, list[np.ndarray]]] = {}
    summary["accuracy"] = {}
    for split, samples in data.items():
        drawn, predicted = all_maps(model, folded, samples, cfg, mean_map)
        drawn_by_split[split] = drawn
        accuracy = float(np.mean([p == label_of(model, s) for p, s in zip(predicted, samples)]))
        summary["accuracy"][split] = accuracy
        results[split] = localisation(samples, drawn)
        faithfulness(model, samples, drawn, cfg, results[split])
        tables[split] = summarise(results[split], cfg.boot, cfg.seed)
        print_table(split, tables[split], accuracy, len(samples), min(cfg.faith_n, len(samples)))
    summary["test"] = tables
    write_csv(cfg.out / "heatmaps.csv", data, results, cfg.test_seed)

    paired = paired_rows(results, cfg)
    summary["paired"] = paired
    print("\npaired: the default map minus each method (> 0: the default map is better; deletion, ablation flipped)")
    for row in paired:
        if row["metric"] in ("pointing", "mass"):
            print(f"{row['split']:<11}{row['versus']:<24}{row['metric']:<9}{row['better_by']:+.3f} "
                  f"[{row['low']:+.3f}, {row['high']:+.3f}]  p={row['p']:.4f}  "
                  f"wins/losses/ties {row['wins']}/{row['losses']}/{row['ties']}")
    goal = {other: all(r["low"] > 0 for r in paired if r["split"] == "off-centre" and r["versus"] == other
                       and r["metric"] in ("pointing", "mass"))
            for other in ("Grad-CAM s1", "Grad-CAM s2", "LayerCAM s1", "LayerCAM s2", "centre Gaussian")}
    summary["goal"] = goal
    print("goal, off-centre, pointing game and mass in mask both better (interval above 0): "
          + ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in goal.items()))

    sanity_samples = data["off-centre"][: cfg.sanity_n]
    cascade_rows, random_maps = cascade(model, sanity_samples, cfg, mean_map,
                                        {k: v[: cfg.sanity_n] for k, v in drawn_by_split["off-centre"].items()})
    learned = {name: [mass_in_mask(m, s.mask) for m, s in zip(maps, sanity_samples)]
               for name, maps in random_maps.items()}
    blanks = blank_check(model, folded, cfg, mean_map)
    sensitivity = class_sensitivity(model, folded, sanity_samples)
    sanity = sanity_table(results, cascade_rows, learned, blanks, sensitivity, cfg)
    summary["cascade"], summary["sanity"] = cascade_rows, sanity
    print(f"\nsanity checks (off-centre; randomisation and class sensitivity on {cfg.sanity_n} images)")
    print(f"{'method':<26}{'randomised rho':>16}{'mass, trained - random':>26}{'specificity':>26}"
          f"{'blank band/area':>18}{'photos band/area':>18}{'ablation vs random':>26}{'class rho':>11}")
    for name, row in sanity.items():
        def mark(ok: bool) -> str:
            return " ok" if ok else " FAIL"
        cells = [f"{row['randomisation'][0]:>11.3f}{mark(row['randomisation'][1]):>5}",
                 f"{fmt(row['learned'][:3]):>21}{mark(row['learned'][3]):>5}",
                 f"{fmt(row['specificity'][:3]):>21}{mark(row['specificity'][3]):>5}"]
        for key in ("blank", "photos"):
            cells.append(f"{row[key][0]:>7.3f}/{row[key][1]:.3f}{mark(row[key][2]):>5}" if row[key] else " " * 18)
        cells.append(f"{fmt(row['ablation'][:3]):>21}{mark(row['ablation'][3]):>5}" if "ablation" in row else " " * 26)
        cells.append(f"{row['class'][0]:>6.3f}{mark(row['class'][1]):>5}" if row["class"] else "")
        print(f"{name:<26}{''.join(cells)}")
    print("randomisation cascade (mean Spearman with the trained maps):")
    for step, row in cascade_rows:
        print(f"  {step:<22}" + "  ".join(f"{k} {row[k]:.2f}" for k in HEADLINE + ("Grad-CAM s2", "LayerCAM s2")))

    timing = timings(model, folded, data["off-centre"][: cfg.timing_n])
    summary["timing_ms"] = timing
    print("\ntiming, ms per image (one thread, median of 3 interleaved rounds):")
    for name, ms in timing.items():
        print(f"  {name:<40}{ms:8.1f}")

    picks = [s for s in data["off-centre"] if s.shape in ("star", "cross")][:2]
    grey = Sample(np.full((96, 128, 3), 128, np.uint8), np.ones((96, 128), bool), "circle", (128, 128, 128))
    examples = [(f"off-centre {s.shape}", example_panels(model, folded, s)) for s in picks]
    examples.append(("blank grey", example_panels(model, folded, grey)))
    plot(cfg.out / "heatmaps.png", tables, examples)
    (cfg.out / "summary.json").write_text(json.dumps(summary, indent=2, default=float) + "\n")
    print(f"\nwrote {cfg.out}/heatmaps.csv, summary.json, heatmaps.png ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
