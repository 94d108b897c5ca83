"""Heatmap metrics on hand-made maps whose answers are known."""

import numpy as np
import pytest
import torch

from van_app.localization import (
    area_share,
    blurred,
    bootstrap_ci,
    border_share,
    deletion_insertion,
    dilated,
    impute,
    lift,
    mass_in_mask,
    paired_comparison,
    pointing_game,
    rank_correlation,
    removal_order,
    road,
)


@pytest.fixture
def mask() -> np.ndarray:
    m = np.zeros((8, 8), bool)
    m[2:4, 2:6] = True  # 8 of 64 pixels: area share 1/8
    return m


def test_map_equal_to_mask_scores_one(mask):
    assert pointing_game(mask.astype(float), mask) == 1.0
    assert mass_in_mask(mask.astype(float), mask) == 1.0


def test_uniform_map_scores_area_share(mask):
    uniform = np.full(mask.shape, 0.3)
    assert pointing_game(uniform, mask) == pytest.approx(1 / 8)
    assert mass_in_mask(uniform, mask) == pytest.approx(1 / 8)
    assert lift(uniform, mask) == pytest.approx(1.0)


def test_pointing_game_counts_tied_maxima(mask):
    saliency = np.zeros(mask.shape)
    saliency[2, 2] = saliency[7, 7] = saliency[0, 0] = saliency[3, 5] = 1.0  # 2 of 4 maxima inside
    assert pointing_game(saliency, mask) == pytest.approx(0.5)


def test_pointing_game_single_peak_outside_scores_zero(mask):
    saliency = mask.astype(float)
    saliency[7, 7] = 2.0
    assert pointing_game(saliency, mask) == 0.0


def test_pointing_game_tolerance_counts_a_peak_near_the_mask(mask):
    saliency = np.zeros(mask.shape)
    saliency[6, 4] = 1.0  # three rows below the mask's last row
    assert pointing_game(saliency, mask) == 0.0
    assert pointing_game(saliency, mask, tolerance=2.9) == 0.0
    assert pointing_game(saliency, mask, tolerance=3.0) == 1.0


def test_dilation_grows_the_mask_by_a_disk():
    point = np.zeros((7, 7), bool)
    point[3, 3] = True
    grown = dilated(point, 1.5)
    assert grown.sum() == 9 and grown[2, 2] and not grown[1, 3]
    assert np.array_equal(dilated(point, 0.5), point)


def test_border_share_of_a_uniform_map_is_the_bands_area():
    share, area = border_share(np.ones((50, 40)), fraction=0.1)
    assert share == pytest.approx(area) and area == pytest.approx(1 - 42 * 32 / 2000)  # a band 4 px wide


def test_a_map_lighting_the_frame_holds_more_than_its_area():
    framed = np.ones((50, 50))
    framed[4:-4, 4:-4] = 0.2
    share, area = border_share(framed, fraction=0.08)
    assert share > area


def test_mass_in_mask_ignores_negative_values(mask):
    saliency = np.where(mask, 1.0, -5.0)
    assert mass_in_mask(saliency, mask) == 1.0


def test_all_zero_map_counts_as_uniform(mask):
    assert mass_in_mask(np.zeros(mask.shape), mask) == pytest.approx(area_share(mask))


def test_lift_of_perfect_map_is_inverse_area_share(mask):
    assert lift(mask.astype(float), mask) == pytest.approx(8.0)


def test_metrics_reject_mismatched_shapes(mask):
    with pytest.raises(ValueError, match="one shape"):
        pointing_game(np.ones((4, 4)), mask)


def test_metrics_reject_nan(mask):
    saliency = np.ones(mask.shape)
    saliency[0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        mass_in_mask(saliency, mask)


def test_removal_order_puts_high_scores_first_and_shuffles_ties():
    saliency = np.array([[0.0, 2.0], [1.0, 2.0]])
    orders = {tuple(removal_order(saliency, seed)) for seed in range(20)}
    assert all(set(o[:2]) == {1, 3} and o[2:] == (2, 0) for o in orders)
    assert len(orders) == 2


def _object_share(mask: torch.Tensor):
    """A toy classifier: class 0's probability is the share of object pixels still equal to 1."""
    def probs(batch: torch.Tensor) -> torch.Tensor:
        p = (batch[:, 0] * mask).sum((1, 2)) / mask.sum()
        return torch.stack([p, 1 - p], 1)
    return probs


def test_deletion_and_insertion_auc_of_a_perfect_map(mask):
    image = torch.from_numpy(mask).float().expand(3, -1, -1)
    curves = deletion_insertion(_object_share(torch.from_numpy(mask).float()), image, mask.astype(float),
                                target=0, steps=8, baseline=torch.zeros_like(image))
    # the object (1/8 of the pixels) goes first: the curve falls linearly to 0 at fraction 1/8
    assert curves.deletion_auc == pytest.approx(1 / 16)
    assert curves.insertion_auc == pytest.approx(1 - 1 / 16)


def test_deletion_of_an_inverted_map_keeps_the_object_longest(mask):
    image = torch.from_numpy(mask).float().expand(3, -1, -1)
    curves = deletion_insertion(_object_share(torch.from_numpy(mask).float()), image, (~mask).astype(float),
                                target=0, steps=8, baseline=torch.zeros_like(image))
    assert curves.deletion_auc == pytest.approx(1 - 1 / 16)


def test_blur_keeps_a_constant_image():
    image = torch.full((3, 16, 16), 0.25)
    assert torch.allclose(blurred(image), image)


def test_bootstrap_interval_contains_the_mean():
    values = np.random.default_rng(0).normal(1.0, 1.0, 400)
    estimate = bootstrap_ci(values)
    assert estimate.low < estimate.mean < estimate.high
    assert estimate.low < 1.0 < estimate.high


def test_paired_comparison_finds_a_consistent_improvement():
    rng = np.random.default_rng(0)
    b = rng.random(200)
    result = paired_comparison(b + 0.1 + rng.normal(0, 0.01, 200), b)
    assert result.difference.low > 0.05 and result.p_value < 0.01 and result.wins == 200


def test_paired_comparison_of_identical_scores_is_all_ties():
    scores = np.linspace(0, 1, 50)
    result = paired_comparison(scores, scores.copy())
    assert (result.ties, result.wins, result.losses) == (50, 0, 0)
    assert result.p_value == 1.0


def test_rank_correlation_ignores_monotone_rescaling():
    a = np.arange(16.0).reshape(4, 4)
    assert rank_correlation(a, np.exp(a)) == pytest.approx(1.0)
    assert rank_correlation(a, -a) == pytest.approx(-1.0)


def test_rank_correlation_averages_ties():
    assert rank_correlation(np.array([1.0, 1.0, 2.0]), np.array([1.0, 2.0, 3.0])) == pytest.approx(np.sqrt(3) / 2)


def test_rank_correlation_of_a_constant_map_is_nan():
    assert np.isnan(rank_correlation(np.ones(4), np.arange(4.0)))


def test_imputation_fills_a_hole_in_a_linear_ramp_exactly_and_keeps_known_pixels():
    yy, xx = torch.meshgrid(torch.arange(20.0), torch.arange(24.0), indexing="ij")
    image = torch.stack([xx / 24, yy / 20, (xx + yy) / 44])[None]
    removed = torch.zeros(1, 20, 24, dtype=torch.bool)
    removed[0, 5:15, 6:18] = True
    filled = impute(image, removed, noise=0.0, tol=1e-6)
    assert torch.allclose(filled, image, atol=1e-4)
    assert torch.equal(impute(image, removed, noise=0.5)[0][:, ~removed[0]], image[0][:, ~removed[0]])


def test_imputation_adds_noise_of_the_given_spread_to_removed_pixels_only():
    image = torch.full((1, 3, 32, 32), 0.5)
    removed = torch.zeros(1, 32, 32, dtype=torch.bool)
    removed[0, 8:24, 8:24] = True
    filled = impute(image, removed, noise=0.1)
    assert float((filled[0][:, removed[0]] - 0.5).std()) == pytest.approx(0.1, rel=0.1)


def test_road_ranks_a_perfect_map_above_its_inverse(mask):
    image = torch.from_numpy(mask).float().expand(3, -1, -1)
    probs = _object_share(torch.from_numpy(mask).float())
    good = road(probs, image, mask.astype(float), target=0, noise=0.0)
    bad = road(probs, image, (~mask).astype(float), target=0, noise=0.0)
    assert good.score > 0 > bad.score
    assert good.morf[0] < good.lerf[0]
