"""The generated shape data set: deterministic, balanced, masks on the objects, scenes as asked, usable from the CLI."""

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from van_app.errors import UsageError
from van_app.synthetic import (
    BORDER_GAP,
    SHAPES,
    Scene,
    SynthConfig,
    generate,
    main,
    write_dataset,
)

SCENES = {
    "default": Scene(),
    "plain": Scene(backgrounds=("plain",)),
    "filling 4:3": Scene(scale=(0.8, 1.0), aspect=(4 / 3, 4 / 3), backgrounds=("plain",)),
    "portrait": Scene(aspect=(0.5, 0.75)),
    "border": Scene(placements=("border",)),
    "cut": Scene(placements=("cut",)),
    "several": Scene(placements=("several",)),
}


def box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(top, left, bottom, right) of the mask's pixels, inclusive."""
    rows, cols = np.nonzero(mask.any(1))[0], np.nonzero(mask.any(0))[0]
    return rows[0], cols[0], rows[-1], cols[-1]


def test_at_least_six_shape_classes():
    assert len(set(SHAPES)) >= 6


@pytest.mark.parametrize("scene", SCENES.values(), ids=SCENES)
def test_same_seed_gives_same_pixels(scene):
    a, b = generate("star", 3, 48, seed=7, scene=scene), generate("star", 3, 48, seed=7, scene=scene)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)


def test_other_seed_gives_other_pixels():
    assert not np.array_equal(generate("star", 3, 48, seed=7).image, generate("star", 3, 48, seed=8).image)


@pytest.mark.parametrize("scene", SCENES.values(), ids=SCENES)
@pytest.mark.parametrize("shape", SHAPES)
def test_mask_covers_exactly_the_object(shape, scene):
    sample = generate(shape, 0, 64, seed=1, scene=scene)
    image = sample.image.astype(float)
    inside = np.linalg.norm(image[sample.mask] - sample.colour, axis=1)
    assert inside.max() <= 12  # the object's colour plus the grain, everywhere under the mask
    grown = sample.mask.copy()
    for axis, step in ((0, 1), (0, -1), (1, 1), (1, -1)):
        grown |= np.roll(sample.mask, step, axis)
    border = grown & ~sample.mask
    assert (np.linalg.norm(image[border] - sample.colour, axis=1) > 12).mean() > 0.9


def test_object_position_and_colour_vary_within_a_class():
    samples = [generate("square", i, 64, seed=0) for i in range(20)]
    centres = np.array([np.argwhere(s.mask).mean(0) for s in samples])
    colours = np.array([s.colour for s in samples])
    assert centres.std(0).min() > 3 and colours.std(0).min() > 30


@pytest.mark.parametrize("scale", [(0.3, 0.3), (0.5, 0.6), (0.9, 1.0)])
def test_scale_sets_the_longer_side_of_the_objects_box(scale):
    for index in range(6):
        sample = generate(SHAPES[index], index, 64, seed=2, scene=Scene(scale=scale, aspect=(4 / 3, 4 / 3)))
        top, left, bottom, right = box(sample.mask)
        assert scale[0] * 64 - 2 <= max(bottom - top, right - left) + 1 <= scale[1] * 64 + 1


@pytest.mark.parametrize("aspect, shape", [((4 / 3, 4 / 3), (48, 64)), ((0.75, 0.75), (64, 48))])
def test_aspect_sets_the_frame_with_size_on_the_shorter_side(aspect, shape):
    sample = generate("ring", 0, 48, seed=0, scene=Scene(aspect=aspect))
    assert sample.image.shape == (*shape, 3) and sample.mask.shape == shape


def test_aspect_ratios_spread_over_the_range():
    ratios = [generate("cross", i, 48, seed=0, scene=Scene(aspect=(0.75, 4 / 3))).image.shape for i in range(20)]
    widths_over_heights = [w / h for h, w, _ in ratios]
    assert min(widths_over_heights) < 0.85 and max(widths_over_heights) > 1.2


def test_plain_background_is_one_colour():
    for index in range(6):
        sample = generate(SHAPES[index], index, 64, seed=3, scene=Scene(backgrounds=("plain",)))
        outside = sample.image[~sample.mask].astype(float)
        assert np.abs(outside - np.median(outside, 0)).max() <= 2 * 6 + 1  # the grain only


def test_cluttered_background_varies():
    sample = generate("circle", 0, 64, seed=3)
    assert sample.image[~sample.mask].astype(float).std(0).min() > 15


def test_mixed_backgrounds_give_both_kinds():
    scene = Scene(backgrounds=("cluttered", "plain"))
    spreads = [generate("square", i, 48, seed=4, scene=scene) for i in range(20)]
    plain = [np.ptp(s.image[~s.mask].astype(float), 0).max() <= 13 for s in spreads]
    assert 3 <= sum(plain) <= 17


def test_border_placement_puts_the_object_near_an_edge_and_inside_the_frame():
    for index in range(12):
        sample = generate(SHAPES[index % 6], index, 64, seed=5, scene=Scene(placements=("border",)))
        top, left, bottom, right = box(sample.mask)
        assert min(top, left, 63 - bottom, 63 - right) <= BORDER_GAP * 64 + 2


def test_uniform_placement_keeps_most_objects_off_the_edges():
    gaps = [min(box(generate(SHAPES[i % 6], i, 64, seed=5).mask)) for i in range(12)]
    assert np.median(gaps) > BORDER_GAP * 64 + 2


def test_cut_placement_leaves_part_of_the_object_outside_the_frame():
    for index in range(12):
        shape = SHAPES[index % 6]
        cut = generate(shape, index, 64, seed=6, scene=Scene(placements=("cut",)))
        top, left, bottom, right = box(cut.mask)
        assert cut.mask.any() and min(top, left, 63 - bottom, 63 - right) == 0


def test_distractors_lie_outside_the_labelled_objects_mask():
    for index in range(6):
        shape = SHAPES[index]
        alone = generate(shape, index, 64, seed=7, scene=Scene(backgrounds=("plain",)))
        several = generate(shape, index, 64, seed=7, scene=Scene(backgrounds=("plain",), placements=("several",)))
        assert np.array_equal(several.mask, alone.mask)  # same object, and its mask only
        outside = several.image[~several.mask].astype(float)
        assert (np.abs(outside - np.median(outside, 0)).max(1) > 40).sum() >= 4  # a distractor's pixels


def test_a_scene_refuses_reversed_or_unknown_settings():
    for bad in (dict(scale=(0.6, 0.3)), dict(scale=(0.5, 1.5)), dict(aspect=(2.0, 1.0)),
                dict(backgrounds=("foggy",)), dict(placements=())):
        with pytest.raises(ValueError):
            Scene(**bad)


def test_parallel_writes_match_direct_generation(tmp_path):
    scene = Scene(scale=(0.3, 1.0), aspect=(0.75, 4 / 3), backgrounds=("plain", "cluttered"),
                  placements=("uniform", "several"))
    write_dataset(SynthConfig(tmp_path, per_class=2, size=32, seed=5, workers=2, scale=scene.scale,
                              aspect=scene.aspect, backgrounds=scene.backgrounds, placements=scene.placements))
    written = np.asarray(Image.open(tmp_path / "images" / "ring" / "000001.png"))
    assert np.array_equal(written, generate("ring", 1, 32, seed=5, scene=scene).image)


def test_data_set_records_its_scene(tmp_path):
    write_dataset(SynthConfig(tmp_path, per_class=1, size=32, shapes=("star",), workers=1, scale=(0.5, 0.9)))
    meta = json.loads((tmp_path / "dataset.json").read_text())
    assert meta["scene"] == {"scale": [0.5, 0.9], "aspect": [1.0, 1.0], "backgrounds": ["cluttered"],
                             "placements": ["uniform"]}


def test_classes_are_balanced_and_masks_pair_with_images(tmp_path):
    write_dataset(SynthConfig(tmp_path, per_class=3, size=32, seed=0, workers=1))
    images = sorted(p.relative_to(tmp_path / "images") for p in (tmp_path / "images").rglob("*.png"))
    masks = sorted(p.relative_to(tmp_path / "masks") for p in (tmp_path / "masks").rglob("*.png"))
    assert images == masks
    assert Counter(p.parent.name for p in images) == {shape: 3 for shape in SHAPES}


@pytest.mark.slow
def test_cli_writes_the_data_set(tmp_path):
    cmd = [sys.executable, "-m", "van_app.synthetic", "--out", str(tmp_path), "--per-class", "1",
           "--size", "32", "--seed", "3", "--shapes", "circle", "cross", "--workers", "1",
           "--aspect", "1.5", "1.5", "--scale", "0.8", "1", "--background", "plain", "--placement", "several"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    mask = np.asarray(Image.open(tmp_path / "masks" / "cross" / "000000.png"))
    assert mask.shape == (32, 48) and set(np.unique(mask)) == {0, 255}
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["circle", "cross"]


def test_config_refuses_a_reversed_scale():
    with pytest.raises(UsageError, match="scale"):
        SynthConfig(Path("out"), scale=(0.9, 0.1))


def test_cli_rejects_a_reversed_range_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path), "--aspect", "1.5", "0.5"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1 and err.startswith("error: aspect")


def test_cli_rejects_a_tiny_size_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path), "--size", "4"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: argument --size: expected an integer from 16 to 4096, got 4")
