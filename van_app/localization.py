"""How well a heatmap finds the object: localisation and faithfulness metrics with confidence intervals.

All maps and masks are 2-D arrays of the same shape (resize a coarse map to
the mask's size first). Higher map values mean "more important".

- ``pointing_game``: tie-aware. An image scores the share of the map's maximal
  pixels that lie inside the mask, so a constant map scores the mask's area
  share instead of a free hit.
- ``mass_in_mask``: the share of the map's (non-negative) mass inside the mask;
  ``lift`` divides it by the mask's area share (1.0 = no better than uniform).
- ``deletion_insertion``: RISE (Petsiuk et al., 2018). Pixels are removed from
  (deletion) or revealed onto (insertion) a baseline image in order of map
  score, ties broken by a seeded random order, and the softmax probability of
  the target class is tracked; the area under each curve over the removed /
  revealed fraction is the score (deletion: lower is better; insertion: higher).
  The baseline is the image blurred with a wide Gaussian (sigma = ``BLUR_FRACTION``
  of the image side): it keeps the colours and low frequencies, removes shape,
  and is closer to natural images than black or mean-grey pixels.
- ``bootstrap_ci`` and ``paired_comparison`` summarise per-image scores; ``rank_correlation``
  (Spearman) compares two maps, e.g. before and after randomising the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

BLUR_FRACTION = 0.15


def _check(saliency: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float map and bool mask of equal 2-D shape, or ValueError."""
    saliency = np.asarray(saliency, dtype=np.float64)
    mask = np.asarray(mask).astype(bool)
    if saliency.ndim != 2 or saliency.shape != mask.shape:
        raise ValueError(f"map {saliency.shape} and mask {mask.shape} must be 2-D arrays of one shape")
    if not np.isfinite(saliency).all():
        raise ValueError("map has NaN or infinite values")
    if not mask.any():
        raise ValueError("mask is empty")
    return saliency, mask


def area_share(mask: np.ndarray) -> float:
    """The fraction of pixels inside ``mask``."""
    return float(np.asarray(mask).astype(bool).mean())


def pointing_game(saliency: np.ndarray, mask: np.ndarray, rtol: float = 1e-6) -> float:
    """Share of the map's maximal pixels (within ``rtol`` of its range) that fall inside ``mask``."""
    saliency, mask = _check(saliency, mask)
    top = saliency.max()
    peak = saliency >= top - rtol * (top - saliency.min())
    return float(mask[peak].mean())


def mass_in_mask(saliency: np.ndarray, mask: np.ndarray) -> float:
    """Share of the map's mass inside ``mask``; negative values count as zero, an all-zero map as uniform."""
    saliency, mask = _check(saliency, mask)
    positive = np.clip(saliency, 0, None)
    total = positive.sum()
    if total == 0:
        return area_share(mask)
    return float(positive[mask].sum() / total)


def lift(saliency: np.ndarray, mask: np.ndarray) -> float:
    """``mass_in_mask`` over the mask's area share: 1.0 is chance, 1 / area share is perfect."""
    return mass_in_mask(saliency, mask) / area_share(mask)


def removal_order(saliency: np.ndarray, seed: int = 0) -> np.ndarray:
    """Flat pixel indices from highest to lowest score, equal scores in a seeded random order."""
    flat = np.asarray(saliency, dtype=np.float64).ravel()
    tiebreak = np.random.default_rng(seed).permutation(flat.size)
    return np.lexsort((tiebreak, -flat))


def blurred(image: torch.Tensor, fraction: float = BLUR_FRACTION) -> torch.Tensor:
    """``image`` (C, H, W) under a Gaussian blur of sigma ``fraction`` of its shorter side (reflect padding)."""
    sigma = max(fraction * min(image.shape[-2:]), 1e-3)
    radius = int(min(3 * sigma, min(image.shape[-2:]) - 1))
    x = torch.arange(-radius, radius + 1, dtype=image.dtype, device=image.device)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = image.shape[0]
    out = F.pad(image[None], (radius, radius, radius, radius), mode="reflect")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    out = F.conv2d(out, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return out[0]


@dataclass(frozen=True)
class Curves:
    """RISE deletion and insertion curves of one image and their areas."""

    fractions: np.ndarray
    deletion: np.ndarray
    insertion: np.ndarray

    @property
    def deletion_auc(self) -> float:
        """Area under the deletion curve (lower: the map found what the class depends on)."""
        return float(np.trapezoid(self.deletion, self.fractions))

    @property
    def insertion_auc(self) -> float:
        """Area under the insertion curve (higher: the map found what the class depends on)."""
        return float(np.trapezoid(self.insertion, self.fractions))


def deletion_insertion(
    probs: Callable[[torch.Tensor], torch.Tensor],
    image: torch.Tensor,
    saliency: np.ndarray,
    target: int,
    steps: int = 16,
    seed: int = 0,
    baseline: torch.Tensor | None = None,
) -> Curves:
    """RISE deletion and insertion curves of ``image`` (C, H, W) for class ``target``.

    ``probs`` maps a batch (B, C, H, W) to class probabilities (B, K); it is
    called once with all 2 * (steps + 1) images. ``baseline`` defaults to
    ``blurred(image)``.
    """
    h, w = image.shape[-2:]
    if np.shape(saliency) != (h, w):
        raise ValueError(f"map {np.shape(saliency)} must match the image's {(h, w)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    baseline = blurred(image) if baseline is None else baseline
    order = torch.from_numpy(removal_order(saliency, seed)).to(image.device)
    counts = np.round(np.linspace(0, h * w, steps + 1)).astype(int)
    # rank[p] = position of pixel p in the order; pixel p is affected at step k iff rank[p] < counts[k]
    rank = torch.empty(h * w, dtype=torch.long, device=image.device)
    rank[order] = torch.arange(h * w, device=image.device)
    affected = (rank[None] < torch.as_tensor(counts, device=image.device)[:, None]).view(-1, 1, h, w)
    deleted = torch.where(affected, baseline, image)
    inserted = torch.where(affected, image, baseline)
    with torch.no_grad():
        p = probs(torch.cat([deleted, inserted]))[:, target].float().cpu().numpy()
    return Curves(counts / (h * w), p[: steps + 1], p[steps + 1 :])


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 0, tied values sharing their average rank."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    return (np.cumsum(counts) - counts + (counts - 1) / 2)[inverse]


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman correlation of two maps' pixel values (ties averaged); NaN when either map is constant."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"maps of {a.size} and {b.size} values cannot be correlated")
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt((ra**2).sum() * (rb**2).sum())
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")


@dataclass(frozen=True)
class Estimate:
    """A mean with its percentile-bootstrap confidence interval."""

    mean: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


def bootstrap_ci(values: np.ndarray, n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Estimate:
    """Mean of ``values`` with a percentile bootstrap interval at ``level``."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0 or not np.isfinite(values).all():
        raise ValueError("values must be a non-empty 1-D array of finite numbers")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, (n_boot, values.size))].mean(1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Estimate(float(values.mean()), float(low), float(high))


@dataclass(frozen=True)
class Paired:
    """Per-image comparison of method A against method B on one metric (difference = A - B)."""

    difference: Estimate
    p_value: float  # two-sided sign-flip permutation test of a zero mean difference
    wins: int
    losses: int
    ties: int


def paired_comparison(a: np.ndarray, b: np.ndarray, n_boot: int = 2000, seed: int = 0) -> Paired:
    """Bootstrap interval of mean(a - b), a sign-flip permutation p-value, and win/loss/tie counts."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired scores need equal shapes, got {a.shape} and {b.shape}")
    d = a - b
    rng = np.random.default_rng(seed)
    flips = rng.choice([-1.0, 1.0], (n_boot, d.size))
    null = np.abs((flips * d).mean(1))
    p = float((1 + (null >= abs(d.mean()) - 1e-12).sum()) / (n_boot + 1))
    ties = np.isclose(a, b, rtol=1e-9, atol=1e-12)
    return Paired(bootstrap_ci(d, n_boot, seed=seed), p, int(((d > 0) & ~ties).sum()),
                  int(((d < 0) & ~ties).sum()), int(ties.sum()))
