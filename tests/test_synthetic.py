"""The generated shape data set: deterministic, balanced, masks on the objects, usable from the CLI."""

import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from van_app.synthetic import SHAPES, SynthConfig, generate, main, write_dataset


def test_at_least_six_shape_classes():
    assert len(set(SHAPES)) >= 6


def test_same_seed_gives_same_pixels():
    a, b = generate("star", 3, 48, seed=7), generate("star", 3, 48, seed=7)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)


def test_other_seed_gives_other_pixels():
    assert not np.array_equal(generate("star", 3, 48, seed=7).image, generate("star", 3, 48, seed=8).image)


@pytest.mark.parametrize("shape", SHAPES)
def test_mask_covers_exactly_the_object(shape):
    sample = generate(shape, 0, 64, seed=1)
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


def test_parallel_writes_match_direct_generation(tmp_path):
    write_dataset(SynthConfig(tmp_path, per_class=2, size=32, seed=5, workers=2))
    written = np.asarray(Image.open(tmp_path / "images" / "ring" / "000001.png"))
    assert np.array_equal(written, generate("ring", 1, 32, seed=5).image)


def test_classes_are_balanced_and_masks_pair_with_images(tmp_path):
    write_dataset(SynthConfig(tmp_path, per_class=3, size=32, seed=0, workers=1))
    images = sorted(p.relative_to(tmp_path / "images") for p in (tmp_path / "images").rglob("*.png"))
    masks = sorted(p.relative_to(tmp_path / "masks") for p in (tmp_path / "masks").rglob("*.png"))
    assert images == masks
    assert Counter(p.parent.name for p in images) == {shape: 3 for shape in SHAPES}


@pytest.mark.slow
def test_cli_writes_the_data_set(tmp_path):
    cmd = [sys.executable, "-m", "van_app.synthetic", "--out", str(tmp_path), "--per-class", "1",
           "--size", "32", "--seed", "3", "--shapes", "circle", "cross", "--workers", "1"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    mask = np.asarray(Image.open(tmp_path / "masks" / "cross" / "000000.png"))
    assert mask.shape == (32, 32) and set(np.unique(mask)) == {0, 255}
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["circle", "cross"]


def test_cli_rejects_a_tiny_size_in_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path), "--size", "4"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: argument --size: expected an integer from 16 to 4096, got 4")
