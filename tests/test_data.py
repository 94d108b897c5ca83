"""VanDataModule: layouts, the bad-file scan, RGB conversion, splits, errors, sampling and loaders."""

from __future__ import annotations

import json
import logging
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import WeightedRandomSampler

from van_app.config import DataConfig
from van_app.data import DataError, ImageDataset, VanDataModule, find_layout, scan_folder
from van_app.errors import UsageError

SIZE = 32


def noise(path: Path, size: int = SIZE) -> Path:
    """A random image at ``path`` (format from the suffix), its content seeded by the path so files differ."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(str(path).encode()))
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def make_classes(root: Path, counts: dict[str, int], suffix: str = ".png") -> Path:
    """``root/<class>/<i><suffix>`` with ``counts[class]`` distinct images each."""
    for name, n in counts.items():
        for i in range(n):
            noise(root / name / f"{i}{suffix}")
    return root


def make_split(root: Path, train: dict[str, int], val: dict[str, int], test: dict[str, int] | None = None) -> Path:
    """The train/val[/test] layout."""
    make_classes(root / "train", train)
    make_classes(root / "val", val)
    if test is not None:
        make_classes(root / "test", test)
    return root


PREPROCESSING = {"input_size": (3, SIZE, SIZE), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3,
                 "crop_pct": 0.9, "crop_mode": "center"}


def datamodule(root: Path, *, run_dir: Path | None = None, progress: bool = False, preprocessing: dict | None = None,
               **options) -> VanDataModule:
    """A data module sized for tests (small images, no worker processes), scanned and split as fit does it."""
    config = DataConfig(data_dir=root, **({"batch_size": 4, "workers": 0} | options))
    dm = VanDataModule(config, PREPROCESSING | (preprocessing or {}), run_dir=run_dir, progress=progress)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def names(samples) -> set[str]:
    return {path.name for path, _ in samples}


def rgb_of(path: Path) -> Image.Image:
    """The image as the training data pipeline decodes it (before transforms)."""
    image, _ = ImageDataset([(path, 0)])[0]
    assert image.mode == "RGB"
    return image


# --- layouts ----------------------------------------------------------------------------------------------


def test_folders_layout_sorts_classes_and_splits_every_image(tmp_path):
    dm = datamodule(make_classes(tmp_path, {"zebra": 5, "ant": 5, "moth": 5}))
    assert dm.layout.kind == "folders"
    assert dm.classes == ["ant", "moth", "zebra"]
    assert dm.class_to_idx == {"ant": 0, "moth": 1, "zebra": 2}
    assert len(dm.train_samples) + len(dm.val_samples) == 15
    assert dm.test_samples == []


def test_split_layout_reads_train_val_and_test_folders(tmp_path):
    dm = datamodule(make_split(tmp_path, {"a": 3, "b": 4}, {"a": 2, "b": 1}, {"a": 1, "b": 2}))
    assert dm.layout.kind == "split"
    assert dm.class_counts() == {"a": {"train": 3, "val": 2, "test": 1}, "b": {"train": 4, "val": 1, "test": 2}}
    assert all(path.parts[-3] == "train" for path, _ in dm.train_samples)
    assert all(path.parts[-3] == "test" for path, _ in dm.test_samples)


def test_labels_follow_the_class_folders(tmp_path):
    dm = datamodule(make_split(tmp_path, {"a": 2, "b": 2}, {"a": 1, "b": 1}, {"a": 1, "b": 1}))
    for samples in (dm.train_samples, dm.val_samples, dm.test_samples):
        assert all(dm.classes[label] == path.parent.name for path, label in samples)


def test_split_layout_without_test_folder_has_no_test_loader(tmp_path):
    dm = datamodule(make_split(tmp_path, {"a": 2, "b": 2}, {"a": 1, "b": 1}))
    assert dm.test_samples == []
    with pytest.raises(DataError, match="no test images"):
        dm.test_dataloader()


def test_extensions_are_matched_in_any_case(tmp_path):
    suffixes = [".jpg", ".JPG", ".jpeg", ".Png", ".bmp", ".GIF", ".webp", ".tif", ".TIFF"]
    for i, suffix in enumerate(suffixes):
        noise(tmp_path / "a" / f"{i}{suffix}")
    make_classes(tmp_path, {"b": 2})
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    dm = datamodule(tmp_path)
    found = names(dm.train_samples + dm.val_samples)
    assert found >= {f"{i}{s}" for i, s in enumerate(suffixes)}
    assert "notes.txt" not in found
    assert dm.bad_files == []


def test_hidden_files_and_folders_are_ignored(tmp_path):
    make_classes(tmp_path, {"a": 2, "b": 2})
    (tmp_path / "a" / "._0.png").write_bytes(b"AppleDouble junk")
    (tmp_path / "a" / ".DS_Store").write_bytes(b"junk")
    noise(tmp_path / "a" / ".thumbnails" / "t.png")
    noise(tmp_path / ".cache" / "x.png")
    dm = datamodule(tmp_path)
    assert dm.classes == ["a", "b"]
    assert len(dm.train_samples) + len(dm.val_samples) == 4
    assert dm.bad_files == []


def test_nested_subfolders_belong_to_their_class(tmp_path):
    make_classes(tmp_path, {"a": 1, "b": 2})
    noise(tmp_path / "a" / "2024" / "june" / "deep.png")
    dm = datamodule(tmp_path)
    labels = {path.name: label for path, label in dm.train_samples + dm.val_samples}
    assert labels["deep.png"] == dm.class_to_idx["a"]
    assert dm.classes == ["a", "b"]


# --- the split --------------------------------------------------------------------------------------------


def test_split_is_the_same_for_the_same_seed(tmp_path):
    make_classes(tmp_path, {"a": 10, "b": 10})
    first, second = datamodule(tmp_path, seed=7), datamodule(tmp_path, seed=7)
    assert first.val_samples == second.val_samples
    assert first.train_samples == second.train_samples


def test_split_changes_with_the_seed(tmp_path):
    make_classes(tmp_path, {"a": 10, "b": 10})
    assert datamodule(tmp_path, seed=1).val_samples != datamodule(tmp_path, seed=2).val_samples


def test_split_is_stratified_by_val_split(tmp_path):
    dm = datamodule(make_classes(tmp_path, {"a": 10, "b": 5, "c": 20}), val_split=0.2)
    counts = dm.class_counts()
    assert {name: c["val"] for name, c in counts.items()} == {"a": 2, "b": 1, "c": 4}
    assert {name: c["train"] for name, c in counts.items()} == {"a": 8, "b": 4, "c": 16}
    assert not {path for path, _ in dm.train_samples} & {path for path, _ in dm.val_samples}


def test_split_keeps_one_image_on_each_side_of_a_tiny_class(tmp_path):
    dm = datamodule(make_classes(tmp_path, {"a": 2, "b": 10}), val_split=0.9)
    assert dm.class_counts()["a"] == {"train": 1, "val": 1, "test": 0}


# --- bad files --------------------------------------------------------------------------------------------


def truncated_png(path: Path) -> None:
    noise(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def truncated_jpeg(path: Path) -> None:
    noise(path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


BAD_FILES = {
    "truncated.png": truncated_png,
    "truncated.jpg": truncated_jpeg,
    "empty.png": lambda p: p.write_bytes(b""),
    "text.jpg": lambda p: p.write_text("this is not a JPEG\n"),
    "over_limit.png": lambda p: noise(p, size=40),
    "far_over_limit.png": lambda p: noise(p, size=48),
}


@pytest.fixture
def small_pixel_limit(monkeypatch):
    """Pillow's decompression-bomb limit lowered so 40 px images exceed it and 48 px ones exceed it twice."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1100)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_is_listed_and_skipped(tmp_path, small_pixel_limit, name):
    make_classes(tmp_path, {"a": 3, "b": 3})
    BAD_FILES[name](tmp_path / "a" / name)
    dm = datamodule(tmp_path)
    assert [path.name for path, _ in dm.bad_files] == [name]
    assert name not in names(dm.train_samples + dm.val_samples)
    assert len(dm.train_samples) + len(dm.val_samples) == 6


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_bad_files_list_names_each_path_with_its_reason(tmp_path, small_pixel_limit):
    data = make_classes(tmp_path / "data", {"a": 2, "b": 2})
    for name, make in BAD_FILES.items():
        make(data / "b" / name)
    header, *lines = datamodule(data).bad_files_text().splitlines()
    assert header.startswith("# 6 bad image files")
    rows = dict(line.split("\t") for line in lines)
    assert set(rows) == {f"b/{name}" for name in BAD_FILES}
    assert rows["b/empty.png"] == "empty file"
    assert "decompression-bomb" in rows["b/over_limit.png"] and "decompression-bomb" in rows["b/far_over_limit.png"]
    assert all(reason and str(data) not in reason for reason in rows.values())


def test_bad_files_list_is_only_the_header_when_all_files_are_good(tmp_path):
    dm = datamodule(make_classes(tmp_path / "data", {"a": 2, "b": 2}))
    assert dm.bad_files_text().splitlines() == [
        "# 0 bad image files skipped: path (relative to the data folder), tab, reason"
    ]


def test_bad_files_give_one_summary_line_naming_the_list_in_the_run_folder(tmp_path, caplog):
    data = make_classes(tmp_path / "data", {"a": 2, "b": 2})
    (data / "a" / "x.jpg").write_text("nope")
    (data / "b" / "y.jpg").write_bytes(b"")
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="van_app.data"):
        datamodule(data, run_dir=run)
    assert [r.getMessage() for r in caplog.records] == [f"skipped 2 bad files, listed in {run / 'bad_files.txt'}"]
    assert len((run / "bad_files.txt").read_text().splitlines()) == 3


def test_progress_bar_is_shown_on_stderr_and_can_be_disabled(tmp_path, capsys):
    make_classes(tmp_path, {"a": 2, "b": 2})
    datamodule(tmp_path, progress=True)
    assert "Checking images" in capsys.readouterr().err
    datamodule(tmp_path, progress=False)
    assert "Checking images" not in capsys.readouterr().err


def test_dataset_replaces_a_file_that_went_bad_with_one_of_the_same_class(tmp_path, caplog):
    dm = datamodule(make_classes(tmp_path, {"a": 4, "b": 4}))
    dataset = dm.train_dataloader().dataset
    index = max(i for i, (_, label) in enumerate(dataset.samples) if label == 1)  # the next sample is class 0
    dataset.samples[index][0].write_text("corrupted after the scan")
    with caplog.at_level(logging.WARNING, logger="van_app.data"):
        image, label = dataset[index]
    assert label == 1
    assert image.shape == (3, SIZE, SIZE)
    assert "not a readable image" in caplog.text


def test_dataset_warns_once_about_a_file_that_went_bad(tmp_path, caplog):
    dm = datamodule(make_classes(tmp_path, {"a": 4, "b": 4}))
    dataset = dm.val_dataloader().dataset
    dataset.samples[0][0].unlink()
    with caplog.at_level(logging.WARNING, logger="van_app.data"):
        dataset[0], dataset[0]
    assert len(caplog.records) == 1


def test_dataset_survives_a_whole_class_going_missing(tmp_path):
    dm = datamodule(make_classes(tmp_path, {"a": 2, "b": 2}), balance=True)
    shutil.rmtree(tmp_path / "a")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape[1:] == (3, SIZE, SIZE)
    assert set(labels.tolist()) == {1}


# --- colour modes -----------------------------------------------------------------------------------------


def save(image: Image.Image, path: Path, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def test_grayscale_becomes_gray_rgb(tmp_path):
    path = save(Image.new("L", (SIZE, SIZE), 100), tmp_path / "gray.png")
    assert rgb_of(path).getpixel((5, 5)) == (100, 100, 100)


def test_palette_becomes_its_colour(tmp_path):
    image = Image.new("P", (SIZE, SIZE), 1)
    image.putpalette([0, 0, 0, 0, 200, 30] + [0] * 762)
    assert rgb_of(save(image, tmp_path / "palette.png")).getpixel((5, 5)) == (0, 200, 30)


def test_rgba_is_composited_over_white(tmp_path):
    image = Image.new("RGBA", (SIZE, SIZE), (0, 0, 255, 0))
    image.paste((255, 0, 0, 255), (0, 0, SIZE // 2, SIZE))
    rgb = rgb_of(save(image, tmp_path / "rgba.png"))
    assert rgb.getpixel((2, 5)) == (255, 0, 0)
    assert rgb.getpixel((SIZE - 2, 5)) == (255, 255, 255)


def test_cmyk_jpeg_becomes_its_rgb_colour(tmp_path):
    path = save(Image.new("RGB", (SIZE, SIZE), (200, 40, 40)).convert("CMYK"), tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(path).mode == "CMYK"
    assert np.allclose(rgb_of(path).getpixel((5, 5)), (200, 40, 40), atol=8)


def test_16_bit_grayscale_is_scaled_to_8_bit(tmp_path):
    path = save(Image.fromarray(np.full((SIZE, SIZE), 128 * 257, dtype=np.uint16)), tmp_path / "deep.png")
    assert rgb_of(path).getpixel((5, 5)) == (128, 128, 128)


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (48, SIZE), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 24, SIZE))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to display
    rgb = rgb_of(save(image, tmp_path / "rotated.jpg", exif=exif.tobytes(), quality=95))
    assert rgb.size == (SIZE, 48)
    assert np.allclose(rgb.getpixel((SIZE // 2, 4)), (255, 0, 0), atol=10)
    assert np.allclose(rgb.getpixel((SIZE // 2, 43)), (0, 0, 255), atol=10)


def test_unusual_modes_pass_the_scan(tmp_path):
    make_classes(tmp_path, {"a": 2})
    save(Image.new("L", (SIZE, SIZE), 10), tmp_path / "b" / "gray.png")
    save(Image.new("LA", (SIZE, SIZE), (10, 128)), tmp_path / "b" / "gray_alpha.png")
    save(Image.new("RGB", (SIZE, SIZE), (1, 2, 3)).convert("CMYK"), tmp_path / "b" / "cmyk.tif")
    save(Image.fromarray(np.full((SIZE, SIZE), 999, dtype=np.uint16)), tmp_path / "b" / "deep.png")
    dm = datamodule(tmp_path)
    assert dm.bad_files == []
    assert dm.class_counts()["b"]["train"] + dm.class_counts()["b"]["val"] == 4


# --- errors -----------------------------------------------------------------------------------------------


def raises_data_error(root: Path, match: str, **kwargs) -> str:
    with pytest.raises(DataError, match=match) as info:
        datamodule(root, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_missing_folder_is_a_data_error(tmp_path):
    raises_data_error(tmp_path / "nope", "data folder not found")


def test_a_file_instead_of_a_folder_is_a_data_error(tmp_path):
    (tmp_path / "data.zip").write_bytes(b"PK")
    raises_data_error(tmp_path / "data.zip", "not a folder")


def test_empty_folder_is_a_data_error(tmp_path):
    raises_data_error(tmp_path, "no class folders")


def test_one_class_is_a_data_error(tmp_path):
    raises_data_error(make_classes(tmp_path, {"cat": 3}), "at least 2 class folders.*'cat'")


def test_one_class_in_split_layout_is_a_data_error(tmp_path):
    raises_data_error(make_split(tmp_path, {"cat": 2}, {"cat": 1}), "at least 2 class folders")


def test_class_without_image_files_is_a_data_error(tmp_path):
    make_classes(tmp_path, {"a": 2})
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "readme.txt").write_text("x")
    raises_data_error(tmp_path, "class folder b has no image files")


def test_class_with_only_bad_images_is_a_data_error(tmp_path):
    make_classes(tmp_path, {"a": 2})
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "x.jpg").write_bytes(b"")
    (tmp_path / "b" / "y.png").write_text("no")
    raises_data_error(tmp_path, "class 'b' has no valid images \\(2 bad files\\)")


def test_class_with_one_valid_image_is_too_small_to_split(tmp_path):
    make_classes(tmp_path, {"a": 3, "b": 1})
    (tmp_path / "b" / "bad.jpg").write_bytes(b"")
    raises_data_error(tmp_path, "class 'b' has 1 valid image; at least 2")


def test_class_without_valid_val_images_is_a_data_error(tmp_path):
    make_split(tmp_path, {"a": 2, "b": 2}, {"a": 1})
    (tmp_path / "val" / "b").mkdir()
    (tmp_path / "val" / "b" / "x.png").write_bytes(b"\x89PNG")
    raises_data_error(tmp_path, "class 'b' in val has no valid images")


def test_differing_train_and_val_classes_are_named(tmp_path):
    make_split(tmp_path, {"a": 2, "b": 2, "c": 2}, {"a": 1, "b": 1, "d": 1})
    message = raises_data_error(tmp_path, "train and val have different classes")
    assert "only in train: c" in message and "only in val: d" in message


def test_test_classes_unknown_to_train_are_named(tmp_path):
    make_split(tmp_path, {"a": 2, "b": 2}, {"a": 1, "b": 1}, {"a": 1, "x": 1})
    raises_data_error(tmp_path, "test has classes that train lacks: x")


def test_train_without_val_is_a_data_error(tmp_path):
    make_classes(tmp_path / "train", {"a": 2, "b": 2})
    raises_data_error(tmp_path, "has train/ but no val/")


@pytest.mark.parametrize("val_split", [0.0, 1.0, -0.1])
def test_val_split_outside_zero_one_is_refused_in_one_line(tmp_path, val_split):
    with pytest.raises(UsageError, match=r"^--val-split: expected a number in \(0, 1\), got"):
        DataConfig(data_dir=tmp_path, val_split=val_split)


# --- duplicates, balance, weights -------------------------------------------------------------------------


def test_duplicates_between_train_and_val_are_reported(tmp_path, caplog):
    make_split(tmp_path, {"a": 2, "b": 2}, {"a": 1, "b": 1})
    shutil.copy(tmp_path / "train" / "a" / "1.png", tmp_path / "val" / "b" / "copy.png")
    with caplog.at_level(logging.WARNING, logger="van_app.data"):
        dm = datamodule(tmp_path)
    assert dm.duplicates == [(tmp_path / "train" / "a" / "1.png", tmp_path / "val" / "b" / "copy.png")]
    assert "1 val images are exact copies of train images" in caplog.text
    assert dm.summary()["duplicates"] == 1


def test_no_duplicates_among_distinct_images(tmp_path):
    assert datamodule(make_classes(tmp_path, {"a": 5, "b": 5})).duplicates == []


def test_class_weights_are_inverse_frequency_over_train(tmp_path):
    dm = datamodule(make_split(tmp_path, {"a": 6, "b": 2}, {"a": 1, "b": 1}))
    assert torch.allclose(dm.class_weights(), torch.tensor([8 / (2 * 6), 8 / (2 * 2)]))
    assert dm.class_weights().dtype == torch.float32


def test_balance_draws_classes_equally_often(tmp_path):
    dm = datamodule(make_split(tmp_path, {"a": 9, "b": 1}, {"a": 1, "b": 1}), balance=True)
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, WeightedRandomSampler)
    labels = [dm.train_samples[i][1] for _ in range(100) for i in loader.sampler]
    assert 0.4 < sum(labels) / len(labels) < 0.6


def test_without_balance_training_shuffles(tmp_path):
    loader = datamodule(make_classes(tmp_path, {"a": 3, "b": 3})).train_dataloader()
    assert isinstance(loader.sampler, torch.utils.data.RandomSampler)


# --- reports ----------------------------------------------------------------------------------------------


def test_summary_is_json_with_counts_per_split_and_class(tmp_path):
    dm = datamodule(make_split(tmp_path, {"a": 3, "b": 2}, {"a": 1, "b": 1}, {"a": 1, "b": 1}))
    summary = json.loads(json.dumps(dm.summary()))
    assert summary["layout"] == "split" and summary["num_classes"] == 2
    assert summary["counts"] == {"train": 5, "val": 2, "test": 2}
    assert summary["per_class"]["a"] == {"train": 3, "val": 1, "test": 1}
    assert summary["bad_files"] == 0 and summary["duplicates"] == 0


def test_summary_table_has_a_row_per_class_and_totals(tmp_path):
    dm = datamodule(make_split(tmp_path, {"ant": 3, "bee": 2}, {"ant": 1, "bee": 1}))
    rows = [row.split() for row in dm.summary_table().splitlines()]
    assert rows == [["class", "train", "val"], ["ant", "3", "1"], ["bee", "2", "1"], ["total", "5", "2"]]


# --- loaders ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["train", "val", "test"])
def test_loader_batches_are_normalised_float_images_and_int_labels(tmp_path, stage):
    dm = datamodule(make_split(tmp_path, {"a": 4, "b": 4}, {"a": 2, "b": 2}, {"a": 2, "b": 2}),
                    preprocessing={"input_size": (3, 24, 24)})
    images, labels = next(iter(getattr(dm, f"{stage}_dataloader")()))
    assert images.shape == (4, 3, 24, 24) and images.dtype == torch.float32
    assert labels.shape == (4,) and labels.dtype == torch.int64
    assert -1.0 - 1e-6 <= images.min() and images.max() <= 1.0 + 1e-6


def test_train_drops_the_last_batch_only_when_there_is_more_than_one(tmp_path):
    dm = datamodule(make_split(tmp_path, {"a": 3, "b": 3}, {"a": 1, "b": 1}), batch_size=4)
    assert dm.train_dataloader().drop_last
    assert not dm.val_dataloader().drop_last
    dm.config.batch_size = 8
    assert not dm.train_dataloader().drop_last


def test_worker_processes_persist_and_load_batches(tmp_path):
    dm = datamodule(make_classes(tmp_path, {"a": 3, "b": 3}), workers=1, auto_augment=None)
    loader = dm.val_dataloader()
    assert loader.persistent_workers and loader.num_workers == 1
    images, _ = next(iter(loader))
    assert images.shape[1:] == (3, SIZE, SIZE)


def test_eval_transform_follows_crop_pct(tmp_path):
    dm = datamodule(make_classes(tmp_path, {"a": 2, "b": 2}), preprocessing={"input_size": (3, 24, 24), "crop_pct": 0.5})
    assert dm.eval_transform().transforms[0].size == 48


def test_train_transform_crops_flips_and_rand_augments(tmp_path):
    dm = datamodule(make_classes(tmp_path, {"a": 2, "b": 2}))
    kinds = [type(t).__name__ for t in dm.train_transform().transforms]
    assert kinds[:3] == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip", "RandAugment"]


def test_train_transform_without_auto_augment_has_no_rand_augment(tmp_path):
    dm = datamodule(make_classes(tmp_path, {"a": 2, "b": 2}), auto_augment=None)
    assert "RandAugment" not in [type(t).__name__ for t in dm.train_transform().transforms]


def test_train_crop_scale_sets_the_random_resized_crop_range(tmp_path):
    dm = datamodule(make_classes(tmp_path, {"a": 2, "b": 2}), crop_scale=0.6)
    assert dm.train_transform().transforms[0].scale == (0.6, 1.0)


def test_crop_scale_outside_zero_to_one_is_refused_in_one_line(tmp_path):
    with pytest.raises(UsageError, match=r"^--crop-scale: expected a number in \(0, 1\], got 0.0$"):
        DataConfig(data_dir=tmp_path, crop_scale=0.0)


# --- Lightning's contract ---------------------------------------------------------------------------------


def test_constructing_lists_the_classes_without_decoding_any_image(tmp_path):
    make_classes(tmp_path, {"b": 2, "a": 2})
    (tmp_path / "a" / "broken.png").write_bytes(b"not decoded yet")
    dm = VanDataModule(DataConfig(data_dir=tmp_path), PREPROCESSING, progress=False)
    assert dm.classes == ["a", "b"] and dm.scan is None and dm.bad_files == []


def test_layout_is_found_from_folder_names_alone(tmp_path):
    layout = find_layout(make_split(tmp_path, {"x": 1, "y": 1}, {"x": 1, "y": 1}))
    assert (layout.kind, layout.classes, sorted(layout.folders)) == ("split", ["x", "y"], ["train", "val"])


def test_scan_folder_returns_samples_bad_files_and_duplicates_and_writes_nothing(tmp_path):
    make_classes(tmp_path, {"a": 2, "b": 2})
    shutil.copy(tmp_path / "a" / "0.png", tmp_path / "b" / "copy.png")
    (tmp_path / "b" / "bad.png").write_bytes(b"")
    before = sorted(tmp_path.rglob("*"))
    scan = scan_folder(tmp_path, progress=False)
    assert scan.classes == ["a", "b"] and len(scan.samples["train"]) == 5
    assert [path.name for path, _ in scan.bad_files] == ["bad.png"]
    assert scan.duplicates == [(tmp_path / "a" / "0.png", tmp_path / "b" / "copy.png")]
    assert sorted(tmp_path.rglob("*")) == before


def test_other_processes_set_up_from_the_scan_the_main_process_left(tmp_path):
    data = make_classes(tmp_path / "data", {"a": 4, "b": 4})
    main = datamodule(data, run_dir=tmp_path / "run")
    (data / "a" / "0.png").write_bytes(b"broken after the scan")  # a second scan would drop it
    other = VanDataModule(DataConfig(data_dir=data, batch_size=4, workers=0), PREPROCESSING,
                          run_dir=tmp_path / "run", progress=False)
    other.setup("fit")
    assert (other.train_samples, other.val_samples) == (main.train_samples, main.val_samples)


def test_setup_without_a_scan_says_what_to_do(tmp_path):
    dm = VanDataModule(DataConfig(data_dir=make_classes(tmp_path, {"a": 2, "b": 2})), PREPROCESSING)
    with pytest.raises(DataError, match="prepare_data"):
        dm.setup("fit")


def test_split_file_records_every_image_with_its_class_and_split(tmp_path):
    data = make_classes(tmp_path / "data", {"a": 3, "b": 3})
    dm = datamodule(data, run_dir=tmp_path / "run")
    rows = (tmp_path / "run" / "split.csv").read_text().splitlines()
    assert rows[0] == "file,class,split" and len(rows) == 7
    recorded = {tuple(row.split(",")) for row in rows[1:]}
    assert recorded == {(p.relative_to(data).as_posix(), dm.classes[label], split)
                        for split, samples in (("train", dm.train_samples), ("val", dm.val_samples))
                        for p, label in samples}


def test_preprocessing_comes_from_the_data_config_given(tmp_path):
    make_classes(tmp_path, {"a": 2, "b": 2})
    dm = VanDataModule(DataConfig(data_dir=tmp_path, batch_size=2, workers=0),
                       dict(PREPROCESSING, input_size=(3, 48, 48), mean=(0.0,) * 3, std=(1.0,) * 3), progress=False)
    dm.prepare_data()
    dm.setup("fit")
    batch, _ = next(iter(dm.val_dataloader()))
    assert batch.shape[-2:] == (48, 48) and batch.min() >= 0.0
