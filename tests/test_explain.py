"""Heatmaps from LKA attention: shapes, ranges, flags, absolute scale, alignment with the original image, class maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image, ImageDraw
from sklearn.datasets import load_sample_images

from van_app import fuse, load_model, predict, preprocess
from van_app.attention import capture_gated, reference
from van_app.explain import (
    weighted,
    FULL_SCALE,
    ClassMapCache,
    Heatmap,
    MapKind,
    analyse,
    class_maps,
    find_map,
    input_geometry,
    normalise,
    overlay,
    render,
    stage_maps,
)
from van_app.localization import border_share
from van_app.model import lka_modules
from van_app.synthetic import SHAPES, generate

BUNDLED = Path(__file__).resolve().parents[1] / "checkpoints" / "van-b0-shapes"


def _tiny(size: int = 64) -> torch.nn.Module:
    """A seeded van_micro with 4 classes that expects ``size`` px inputs."""
    torch.manual_seed(0)
    model = load_model("van_micro", num_classes=4)
    model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(3, size, size))
    return model


def _off_centre(size: tuple[int, int] = (96, 48)) -> Image.Image:
    """A dark non-square image with a bright disc right of centre."""
    image = Image.new("RGB", size, (20, 20, 30))
    ImageDraw.Draw(image).ellipse((size[0] * 0.55, size[1] * 0.2, size[0] * 0.85, size[1] * 0.8), fill=(250, 220, 40))
    return image


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return _tiny()


@pytest.fixture(scope="module")
def bundled() -> torch.nn.Module:
    return load_model(BUNDLED)


def test_analyse_returns_one_map_per_stage_plus_combined(model):
    analysis = analyse(model, _off_centre(), k=3)
    assert sorted((m.kind, m.stage if m.stage is not None else -1) for m in analysis.maps) == sorted(
        [(MapKind.STAGE, s) for s in range(4)] + [(MapKind.COMBINED, -1)])
    assert [find_map(analysis.maps, MapKind.STAGE, s).raw.shape for s in range(4)] == [(16, 16), (8, 8), (4, 4), (2, 2)]
    assert find_map(analysis.maps, MapKind.COMBINED).raw.shape == (16, 16)
    assert all(m.target is None for m in analysis.maps) and len(analysis.top) == 3


def test_block_maps_cover_every_block(model):
    analysis = analyse(model, _off_centre(), blocks=True)
    blocks = [(m.stage, m.block) for m in analysis.maps if m.kind is MapKind.BLOCK]
    assert blocks == [key for key, _ in lka_modules(model)]


def test_analyse_works_on_a_plain_timm_model():
    torch.manual_seed(0)
    plain = timm.create_model("van_micro", num_classes=3).eval()
    image = _off_centre()
    assert analyse(plain, image, k=2).top == pytest.approx(predict(plain, image, k=2))


def test_titles_say_what_each_map_is(model):
    image = _off_centre()
    titles = [m.title for m in analyse(model, image, blocks=True).maps if m.stage in (None, 1)]
    assert titles == ["Stage 2", "Combined", "Stage 2 block 1"]
    evidence = class_maps(model, image, 3)
    assert [find_map(evidence, kind, stage).title for kind, stage in ((MapKind.STAGE, 0), (MapKind.COMBINED, None))
            ] == ["Stage 1: evidence for class 3", "Evidence for class 3"]


def test_a_missing_map_is_a_key_error(model):
    with pytest.raises(KeyError, match="no block map for stage 0"):
        find_map(analyse(model, _off_centre()).maps, MapKind.BLOCK, stage=0)


def test_display_maps_are_in_unit_range_and_stage_maps_non_negative(model):
    analysis = analyse(model, _off_centre())
    for heatmap in analysis.maps:
        assert heatmap.display.shape == heatmap.raw.shape
        assert np.isfinite(heatmap.display).all()
        assert heatmap.display.min() >= 0.0 and heatmap.display.max() <= 1.0
    assert all(m.raw.min() >= 0 for m in analysis.maps)


def test_stage_map_is_the_gated_signals_departure_from_its_references_over_the_images_power(model):
    image = _off_centre()
    x = preprocess(model, image)
    with torch.inference_mode(), capture_gated(model) as gated:
        model(x)
        ours = dict(gated)
        model(x.mean((2, 3), keepdim=True).expand_as(x))
    maps = analyse(model, image).maps
    for stage in range(4):
        keys = [key for key in sorted(ours) if key[0] == stage]
        d = [(ours[k][0] - gated[k][0]).double() for k in keys]
        power = np.mean([float(ours[k][0].double().square().mean()) for k in keys])
        want = np.mean([((t - t.mean((1, 2), keepdim=True)) ** 2).mean(0).numpy() for t in d], 0) / power
        np.testing.assert_allclose(find_map(maps, MapKind.STAGE, stage).raw, want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("colour", [(0, 0, 0), (255, 255, 255), (128, 128, 128), (200, 30, 40)])
def test_a_blank_image_of_any_colour_gets_only_flagged_maps(model, colour):
    blank = Image.new("RGB", (80, 60), colour)
    analysis = analyse(model, blank, blocks=True)
    maps = analysis.maps + analysis.evidence + class_maps(model, blank, 1)
    assert all(m.constant and not m.display.any() for m in maps)


@pytest.mark.parametrize("photo", [0, 1], ids=["china", "flower"])
def test_shown_maps_of_a_natural_photo_hold_no_more_than_their_area_in_the_border_band(bundled, photo):
    image = Image.fromarray(load_sample_images().images[photo])
    analysis = analyse(bundled, image)
    for heatmap in [*analysis.maps, *analysis.evidence]:
        share, area = border_share(render(heatmap, analysis.geometry)[0])
        assert not heatmap.constant and share <= area, heatmap.title


@pytest.mark.parametrize("colour", [(128, 128, 128), (250, 250, 250), (20, 20, 20)])
def test_a_near_blank_photo_has_no_more_structure_than_a_blank_one(bundled, colour):
    grain = np.random.default_rng(0).uniform(-3, 3, (90, 120, 3))
    image = Image.fromarray(np.clip(np.array(colour) + grain, 0, 255).astype(np.uint8))
    analysis = analyse(bundled, image, blocks=True)
    maps = analysis.maps + analysis.evidence + class_maps(bundled, image, 0)
    assert all(m.constant for m in maps)


def _logit_with_stage_one_cells_ablated(model: torch.nn.Module, image: Image.Image, cells: torch.Tensor,
                                         index: int) -> float:
    """The logit of ``index`` with stage 1's gated LKA signal replaced by the reference's at ``cells``."""
    x = preprocess(model, image)
    with torch.inference_mode(), capture_gated(model) as blank:
        model(reference(x))
    handles = [model.stages[0].blocks[b].attn.lka.register_forward_hook(
        lambda _m, _a, out, b=b: torch.where(cells, blank[(0, b)], out)) for b in range(len(model.stages[0].blocks))]
    try:
        with torch.inference_mode():
            return float(model(x)[0, index])
    finally:
        for handle in handles:
            handle.remove()


def test_ablating_the_attention_at_the_class_maps_top_cells_hurts_more_than_at_its_bottom_cells(bundled):
    drops = []
    for shape in SHAPES:
        image = Image.fromarray(generate(shape, 0, 96, seed=211).image)
        index = bundled.labels.index(shape)
        raw = torch.from_numpy(find_map(class_maps(bundled, image, index), MapKind.STAGE, 0).raw)
        order = raw.flatten().argsort(descending=True)
        k = order.numel() // 4
        top, bottom = (torch.zeros(raw.numel(), dtype=torch.bool).index_fill(0, part, True).view(1, 1, *raw.shape)
                       for part in (order[:k], order[-k:]))
        drops.append(_logit_with_stage_one_cells_ablated(bundled, image, bottom, index)
                     - _logit_with_stage_one_cells_ablated(bundled, image, top, index))
    assert all(d > 0 for d in drops)


def test_display_keeps_the_zero_of_the_blank_image_instead_of_stretching_min_to_max():
    raw = np.array([[1.0, 1.5], [2.0, 4.0]])
    display, constant = normalise(raw)
    assert not constant and display.min() == pytest.approx(0.25)  # min-max would have made it 0


def test_a_faint_class_agnostic_map_is_drawn_faint():
    weak = np.array([[0.0, 0.5], [1.0, 0.2]]) * FULL_SCALE / 2
    stage = find_map(stage_maps({(0, 0): torch.zeros(1, 1, 2, 2)}, [4]), MapKind.STAGE, 0)  # flat: flagged
    display, constant = normalise(weak, 0.1, FULL_SCALE)
    assert stage.constant and not constant and display.max() == pytest.approx(0.5)


def test_a_map_below_the_structure_floor_is_flagged():
    assert normalise(np.array([[0.0, 0.05], [0.01, 0.02]]), 0.1, FULL_SCALE)[1]


def test_channel_offsets_do_not_move_the_stage_map():
    uniform = torch.zeros(1, 3, 4, 4)
    uniform[0, 1, 2, 3] = 1.0
    shifted = uniform + torch.tensor([5.0, -7.0, 2.0]).view(1, 3, 1, 1)
    plain, moved = (find_map(stage_maps({(0, 0): a}, [4]), MapKind.STAGE, 0) for a in (uniform, shifted))
    np.testing.assert_allclose(plain.raw, moved.raw, atol=1e-5)
    assert np.unravel_index(plain.display.argmax(), (4, 4)) == (2, 3)


def test_spatially_uniform_attention_gives_a_constant_map():
    flat = torch.arange(3.0).view(1, 3, 1, 1).expand(1, 3, 4, 4)
    assert find_map(stage_maps({(0, 0): flat}, [4]), MapKind.STAGE, 0).constant


def test_stage_maps_match_the_unfused_model(model):
    plain = analyse(model, _off_centre())
    fused = analyse(fuse(model), _off_centre())
    for a in plain.maps:
        b = find_map(fused.maps, a.kind, a.stage, a.block)
        np.testing.assert_allclose(a.raw, b.raw, rtol=1e-3, atol=1e-4)


def test_one_cell_map_is_flagged_constant():
    analysis = analyse(_tiny(32), _off_centre())
    last = find_map(analysis.maps, MapKind.STAGE, 3)
    assert last.raw.shape == (1, 1) and last.constant
    assert not last.display.any()


def test_constant_and_non_finite_maps_display_as_zeros():
    for raw in (np.full((4, 4), 3.0), np.zeros((4, 4)), np.array([[1.0, np.nan], [0.0, 2.0]]),
                np.full((4, 4), 1.0) + np.eye(4) * 1e-9):
        display, constant = normalise(raw)
        assert constant and np.array_equal(display, np.zeros_like(display))


def test_class_map_without_positive_evidence_is_flagged():
    display, constant = normalise(-np.arange(16.0).reshape(4, 4))
    assert constant and not display.any()


def test_overlay_of_constant_map_leaves_image_uncoloured(model):
    image = _off_centre()
    flat = Heatmap(MapKind.STAGE, np.ones((2, 2), np.float32), np.zeros((2, 2), np.float32), 32, True, stage=3)
    out = overlay(image, flat, input_geometry(model, image.size), opacity=1.0)
    assert np.array_equal(np.asarray(out), np.asarray(image))


def test_geometry_matches_timm_resize_and_centre_crop(model):
    geometry = input_geometry(model, (96, 48))
    # 64 / 0.9 -> shorter side 71, longer int(71 * 2) = 142, crop 64 centred: left round(39) = 39.
    assert geometry.input_size == (64, 64)
    assert geometry.scale == pytest.approx((142 / 96, 71 / 48))
    assert geometry.offset == pytest.approx((39, 4))


def test_render_undoes_the_crop_on_a_non_square_image(model):
    image = _off_centre()
    batch = preprocess(model, image)[0, 0].numpy()
    # the model input itself as a stride-1 map must come back onto the original where it was taken
    stride_one = Heatmap(MapKind.STAGE, batch, normalise(batch)[0], 1, False, stage=0)
    values, (left, top, right, bottom) = render(stride_one, input_geometry(model, image.size))
    original = np.asarray(image.convert("L"), np.float32)
    disc = original[top:bottom, left:right] > 128
    assert values.shape == original.shape[:2]
    assert (left, top, right, bottom) == (26, 3, 70, 46)
    assert values[top:bottom, left:right][disc].mean() > 0.8
    assert values[top:bottom, left:right][~disc].mean() < 0.2
    assert not values[:, :left].any() and not values[:, right:].any()


def test_render_centres_cells_on_their_receptive_fields(model):
    image = Image.new("RGB", (64, 64))
    geometry = input_geometry(model, image.size)
    grid = np.zeros((4, 4), np.float32)
    grid[2, 1] = 1.0  # cell (2, 1) of a stride-16 grid is centred on input pixel (y=32, x=16)
    values, _ = render(Heatmap(MapKind.STAGE, grid, grid, 16, False, stage=2), geometry, size=geometry.input_size)
    # with input = scale * original - offset and a same-size output, the peak lands where that pixel came from
    peak_y, peak_x = np.unravel_index(values.argmax(), values.shape)
    expected_x = (16 + 0.5 + geometry.offset[0]) / geometry.scale[0]
    expected_y = (32 + 0.5 + geometry.offset[1]) / geometry.scale[1]
    assert abs(peak_x + 0.5 - expected_x) <= 1.0 and abs(peak_y + 0.5 - expected_y) <= 1.0


def test_overlay_colours_only_inside_the_crop(model):
    image = _off_centre()
    analysis = analyse(model, image)
    combined = find_map(analysis.maps, MapKind.COMBINED)
    out = np.asarray(overlay(image, combined, analysis.geometry, "jet", 0.6)).astype(int)
    changed = np.abs(out - np.asarray(image).astype(int)).sum(-1) > 0
    columns = np.flatnonzero(changed.any(0))
    rows = np.flatnonzero(changed.any(1))
    assert out.shape == (48, 96, 3)
    assert columns.min() >= 26 and columns.max() <= 69 and rows.min() >= 3 and rows.max() <= 45


def test_overlay_leaves_pixels_where_the_map_is_zero_as_they_are(model):
    image = _off_centre((64, 64))
    raw = np.zeros((16, 16), np.float32)
    raw[4:8, 4:8] = 1.0
    spot = Heatmap(MapKind.STAGE, raw, raw, 4, False, stage=0)
    out = np.asarray(overlay(image, spot, input_geometry(model, image.size), opacity=1.0)).astype(int)
    changed = np.abs(out - np.asarray(image).astype(int)).sum(-1) > 0
    assert changed[20:28, 20:28].all() and not changed[:, 40:].any() and not changed[40:].any()


def test_overlay_opacity_and_colormap_change_the_result(model):
    image = _off_centre()
    analysis = analyse(model, image)
    combined = find_map(analysis.maps, MapKind.COMBINED)
    a = np.asarray(overlay(image, combined, analysis.geometry, "jet", 0.3))
    b = np.asarray(overlay(image, combined, analysis.geometry, "jet", 0.9))
    c = np.asarray(overlay(image, combined, analysis.geometry, "viridis", 0.9))
    assert not np.array_equal(a, b) and not np.array_equal(b, c)


def test_overlay_keeps_size_and_aspect_up_to_max_side(model):
    image = _off_centre((300, 120))
    analysis = analyse(model, image)
    stage_1 = find_map(analysis.maps, MapKind.STAGE, 0)
    assert overlay(image, stage_1, analysis.geometry).size == (300, 120)
    assert overlay(image, stage_1, analysis.geometry, max_side=150).size == (150, 60)


def test_analyse_gives_the_evidence_for_the_predicted_class_that_class_maps_gives(bundled):
    image = Image.fromarray(generate("star", 0, 96, seed=5).image)
    analysis = analyse(bundled, image)
    predicted = bundled.labels.index(next(iter(analysis.top)))
    assert {m.target for m in analysis.evidence} == {predicted}
    for got, want in zip(analysis.evidence, class_maps(bundled, image, predicted)):
        assert (got.kind, got.stage, got.title) == (want.kind, want.stage, want.title)
        np.testing.assert_allclose(got.raw, want.raw, rtol=1e-4, atol=1e-6 * float(np.abs(want.raw).max()))


def test_evidence_counts_only_where_the_gated_signal_departs_from_the_blank():
    evidence = np.array([[2.0, -1.0], [0.5, 3.0]])
    agnostic = np.array([[1.0, 4.0], [0.0, 0.5]])
    assert np.array_equal(weighted(evidence, agnostic), np.array([[2.0, 0.0], [0.0, 1.5]], np.float32))


def test_class_maps_differ_per_class(model):
    image = _off_centre()
    first, second = class_maps(model, image, 0), class_maps(model, image, 1)
    assert {m.target for m in first} == {0} and {m.target for m in second} == {1}
    assert any(not np.allclose(a.raw, b.raw) for a, b in zip(first, second))
    assert all(0.0 <= m.display.min() and m.display.max() <= 1.0 for m in first)


def test_class_maps_leave_no_hooks_and_no_gradients(model):
    class_maps(model, _off_centre(), 2)
    assert all(not lka._forward_hooks and not lka.conv1._forward_hooks for _, lka in lka_modules(model))
    assert all(p.grad is None for p in model.parameters())


def test_class_maps_on_the_folded_model_match_the_unfused_model(model):
    cache = ClassMapCache(model)
    unfused, folded = class_maps(model, _off_centre(), 2), cache(_off_centre(), 2)
    for a, b in zip(unfused, folded):
        np.testing.assert_allclose(a.raw, b.raw, rtol=1e-3, atol=1e-4 * float(np.abs(a.raw).max()))


def test_class_maps_work_inside_inference_mode(model):
    with torch.inference_mode():
        maps = class_maps(model, _off_centre(), 1)
    assert np.isfinite(find_map(maps, MapKind.COMBINED).raw).all()


def test_class_map_of_an_image_and_its_reference_mean_colour_differ_only_by_the_picture(model):
    image = _off_centre()
    x = preprocess(model, image)
    flat = Image.fromarray(np.uint8(np.clip(np.asarray(image).reshape(-1, 3).mean(0), 0, 255)).reshape(1, 1, 3))
    assert torch.allclose(reference(x)[0, :, 0, 0], x[0].mean((1, 2)))
    assert all(m.constant for m in class_maps(model, flat.resize(image.size), 1))


def test_class_map_cache_returns_the_stored_maps(model):
    cache = ClassMapCache(model, maxsize=2)
    image = _off_centre()
    assert cache(image, 1) is cache(image, 1)
    assert cache(image, 1) is not cache(image, 2)


@pytest.mark.parametrize("size", [(33, 77), (640, 20), (5, 5)])
def test_any_image_size_gives_aligned_overlays(model, size):
    image = _off_centre(size)
    analysis = analyse(model, image)
    for heatmap in analysis.maps:
        assert overlay(image, heatmap, analysis.geometry).size == size


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_maps_on_gpu_match_cpu(model):
    image = _off_centre()
    cpu = analyse(model, image)
    gpu = analyse(_tiny().cuda(), image)
    np.testing.assert_allclose(find_map(cpu.maps, MapKind.COMBINED).display,
                               find_map(gpu.maps, MapKind.COMBINED).display, atol=1e-3)
    assert np.isfinite(find_map(class_maps(_tiny().cuda(), image, 1), MapKind.COMBINED).display).all()
