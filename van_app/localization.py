"""How well a heatmap finds the object: localisation and faithfulness metrics with confidence intervals.

All maps and masks are 2-D arrays of the same shape (resize a coarse map to
the mask's size first). Higher map values mean "more important".

- ``pointing_game``: tie-aware. An image scores the share of the map's maximal
  pixels that lie inside the mask, so a constant map scores the mask's area
  share instead of a free hit. With a ``tolerance`` (Zhang et al., 2018: 15 px at
  about 224 px, ``TOLERANCE_FRACTION`` of the shorter side) a maximal pixel also
  scores within that distance of the mask.
- ``mass_in_mask``: the share of the map's (non-negative) mass inside the mask;
  ``lift`` divides it by the mask's area share (1.0 = no better than uniform).
- ``border_share``: the share of the map's mass in the band along the frame's edges
  (``BORDER_FRACTION`` of the shorter side wide), beside the band's area share: a map
  that lights up padding or corners holds more than its area.
- ``deletion_insertion``: RISE (Petsiuk et al., 2018). Pixels are removed from
  (deletion) or revealed onto (insertion) a baseline image in order of map
  score, ties broken by a seeded random order, and the softmax probability of
  the target class is tracked; the area under each curve over the removed /
  revealed fraction is the score (deletion: lower is better; insertion: higher).
  The baseline is the image blurred with a wide Gaussian (sigma = ``BLUR_FRACTION``
  of the image side): it keeps the colours and low frequencies, removes shape,
  and is closer to natural images than black or mean-grey pixels.
- ``road``: ROAD (Rong et al., 2022). The same ordering removes a share of the pixels
  (most relevant first, MoRF, and least relevant first, LeRF) and fills them by noisy
  linear imputation: each removed pixel is the weighted mean of its 8 neighbours (1/6
  across, 1/12 diagonal), a sparse linear system solved jointly (conjugate gradients,
  started from a normalised-convolution fill) plus Gaussian noise, so the filled
  region carries no trace of the removal mask's shape for the model to read. Scores
  per share: the target's probability; the summary ``LeRF - MoRF`` (higher is better).
- ``centre_gaussian`` is the centre prior, a baseline map that knows nothing of the image;
  ``centroid_offset`` says how far an object sits from the frame's centre.
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
TOLERANCE_FRACTION = 15 / 224
BORDER_FRACTION = 0.08
ROAD_NOISE = 0.01  # standard deviation of the noise added to imputed pixels (images in [0, 1])
ROAD_SHARES = (0.1, 0.3, 0.5, 0.7, 0.9)
# ROAD's neighbour weights: 1/6 for the 4 pixels across, 1/12 for the 4 diagonal ones.
_NEIGHBOURS = torch.tensor([[1 / 12, 1 / 6, 1 / 12], [1 / 6, 0.0, 1 / 6], [1 / 12, 1 / 6, 1 / 12]])


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


def pointing_game(saliency: np.ndarray, mask: np.ndarray, rtol: float = 1e-6, tolerance: float = 0.0) -> float:
    """Share of the map's maximal pixels (within ``rtol`` of its range) that fall inside ``mask`` or within
    ``tolerance`` pixels of it (centre to centre)."""
    saliency, mask = _check(saliency, mask)
    top = saliency.max()
    peak = saliency >= top - rtol * (top - saliency.min())
    return float(dilated(mask, tolerance)[peak].mean())


def dilated(mask: np.ndarray, radius: float) -> np.ndarray:
    """``mask`` grown by every pixel whose centre lies within ``radius`` of a mask pixel's centre."""
    mask = np.asarray(mask, bool)
    r = int(np.floor(radius))
    if r < 1:
        return mask
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    disk = torch.from_numpy((yy**2 + xx**2 <= radius**2).astype(np.float32))[None, None]
    grown = F.conv2d(torch.from_numpy(mask.astype(np.float32))[None, None], disk, padding=r)
    return grown[0, 0].numpy() > 0.5


def border_share(saliency: np.ndarray, fraction: float = BORDER_FRACTION) -> tuple[float, float]:
    """The share of the map's non-negative mass in the band ``fraction`` of the shorter side wide along the edges,
    and the band's area share (an all-zero map counts as uniform)."""
    saliency = np.clip(np.asarray(saliency, dtype=np.float64), 0, None)
    h, w = saliency.shape
    width = max(1, round(fraction * min(h, w)))
    band = np.ones((h, w), bool)
    band[width : h - width, width : w - width] = False
    total = saliency.sum()
    area = float(band.mean())
    return (float(saliency[band].sum() / total) if total > 0 else area), area


def centroid_offset(mask: np.ndarray) -> float:
    """How far the mask's centroid is from the frame's centre: the larger axis distance over the shorter side."""
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    return max(abs(xs.mean() + 0.5 - w / 2), abs(ys.mean() + 0.5 - h / 2)) / min(h, w)


def centre_gaussian(shape: tuple[int, int]) -> np.ndarray:
    """A Gaussian at the frame's centre with a standard deviation of a quarter of each side."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    return np.exp(-(((yy - h / 2) / (h / 4)) ** 2 + ((xx - w / 2) / (w / 4)) ** 2) / 2)


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


def impute(image: torch.Tensor, removed: torch.Tensor, noise: float = ROAD_NOISE, seed: int = 0,
           tol: float = 1e-3, max_iter: int = 500) -> torch.Tensor:
    """ROAD's noisy linear imputation of the ``removed`` pixels (B, H, W bool) of ``image`` (B or 1, C, H, W).

    Each removed pixel becomes the weighted mean of its in-frame neighbours (``_NEIGHBOURS``),
    jointly over all removed pixels: the Laplace system is solved by conjugate gradients
    (to a relative residual of ``tol``), then noise of standard deviation ``noise`` is added.
    """
    b, c, h, w = removed.shape[0], *image.shape[-3:]
    values = image.expand(b, -1, -1, -1).reshape(b * c, 1, h, w).float()  # channels solved as separate systems
    unknown = removed[:, None].expand(-1, c, -1, -1).reshape(b * c, 1, h, w).float()
    known = 1.0 - unknown
    kernel = _NEIGHBOURS.to(values)[None, None]

    def neighbours(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, kernel, padding=1)

    def apply(x: torch.Tensor) -> torch.Tensor:  # the system's matrix on the unknowns (zero elsewhere)
        return (degree * x - neighbours(x)) * unknown

    def blur(x: torch.Tensor) -> torch.Tensor:
        return blurred(x[:, 0])[:, None]

    degree = neighbours(torch.ones_like(values))
    rhs = neighbours(values * known) * unknown
    # start from a normalised convolution: a wide blur of the known pixels over a blur of where they are
    x = blur(values * known) / blur(known).clamp_min(1e-6) * unknown
    residual = rhs - apply(x)
    direction = residual.clone()
    rr = residual.square().sum((1, 2, 3))
    limit = tol**2 * rhs.square().sum((1, 2, 3))
    for _ in range(max_iter):
        if bool((rr <= limit).all()):
            break
        step = apply(direction)
        alpha = (rr / (direction * step).sum((1, 2, 3)).clamp_min(1e-30)).view(-1, 1, 1, 1)
        x = x + alpha * direction
        residual = residual - alpha * step
        rr, previous = residual.square().sum((1, 2, 3)), rr
        direction = residual + (rr / previous.clamp_min(1e-30)).view(-1, 1, 1, 1) * direction
    jitter = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed)).to(x) * noise
    return (values * known + (x + jitter) * unknown).view(b, c, h, w)


@dataclass(frozen=True)
class Road:
    """ROAD scores of one image: the target's probability after removing each share, most and least relevant first."""

    shares: np.ndarray
    morf: np.ndarray
    lerf: np.ndarray

    @property
    def score(self) -> float:
        """Mean of ``LeRF - MoRF`` over the shares (higher: the map ranks pixels as the model needs them)."""
        return float(np.mean(self.lerf - self.morf))


def road(probs: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, saliency: np.ndarray, target: int,
         shares: tuple[float, ...] = ROAD_SHARES, seed: int = 0, noise: float = ROAD_NOISE) -> Road:
    """ROAD MoRF and LeRF of ``image`` (C, H, W) for class ``target`` at each removed share (``probs``: one call)."""
    h, w = image.shape[-2:]
    if np.shape(saliency) != (h, w):
        raise ValueError(f"map {np.shape(saliency)} must match the image's {(h, w)}")
    rank = torch.empty(h * w, dtype=torch.long)
    rank[torch.from_numpy(removal_order(saliency, seed))] = torch.arange(h * w)
    counts = torch.as_tensor([round(s * h * w) for s in shares])
    most = rank[None] < counts[:, None]
    least = rank[None] >= (h * w - counts)[:, None]
    removed = torch.cat([most, least]).view(-1, h, w).to(image.device)
    filled = impute(image[None], removed, noise, seed)
    with torch.no_grad():
        p = probs(filled)[:, target].float().cpu().numpy()
    return Road(np.asarray(shares), p[: len(shares)], p[len(shares) :])


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
