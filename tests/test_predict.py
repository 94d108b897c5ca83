"""Top-k prediction on images of every PIL mode, through the preprocessing the model's weights expect."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from van_app import load_model, predict, preprocess
from van_app.images import to_rgb
from van_app.model import VAN
from van_app.predict import data_config, eval_transform, top_k

LABELS = ["circle", "square", "star", "triangle", "hexagon"]


@pytest.fixture(scope="module")
def model() -> VAN:
    """van_micro with five named classes, preprocessing at 64 px to stay fast."""
    torch.manual_seed(0)
    van = load_model("van_micro", num_classes=len(LABELS))
    van.labels = list(LABELS)
    van.pretrained_cfg = dict(van.pretrained_cfg, input_size=(3, 64, 64))
    return van


def gradient(size: tuple[int, int] = (48, 40)) -> np.ndarray:
    """An RGB test pattern (uint8, H x W x 3) whose left and right halves differ."""
    w, h = size
    x = np.linspace(0, 255, w, dtype=np.float32)[None, :].repeat(h, 0)
    y = np.linspace(255, 0, h, dtype=np.float32)[:, None].repeat(w, 1)
    return np.stack([x, y, np.full_like(x, 90)], -1).astype(np.uint8)


def exif_rotated() -> tuple[Image.Image, Image.Image]:
    """(a PNG stored sideways with EXIF orientation 6, the same picture as it should be displayed)."""
    upright = Image.fromarray(gradient((30, 50)))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what a camera writes; orientation 6 undoes it
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    stored.save(buffer, "PNG", exif=exif)
    return Image.open(io.BytesIO(buffer.getvalue())), upright


def palette() -> Image.Image:
    return Image.fromarray(gradient()).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)


IMAGES = {
    "RGB": lambda: Image.fromarray(gradient()),
    "L": lambda: Image.fromarray(gradient()).convert("L"),
    "LA": lambda: Image.fromarray(gradient()).convert("LA"),
    "RGBA": lambda: Image.fromarray(gradient()).convert("RGBA"),
    "P": palette,
    "CMYK": lambda: Image.fromarray(gradient()).convert("CMYK"),
    "I;16": lambda: Image.fromarray((gradient()[..., 0].astype(np.uint16) * 257)),
    "F": lambda: Image.fromarray(gradient()[..., 0].astype(np.float32) / 255),
    "1": lambda: Image.fromarray(gradient()).convert("1"),
    "EXIF-rotated": lambda: exif_rotated()[0],
    "odd 1x97": lambda: Image.fromarray(gradient((1, 97))),
    "odd 333x7": lambda: Image.fromarray(gradient((333, 7))),
}


@pytest.mark.parametrize("name", list(IMAGES))
def test_predict_gives_sorted_probabilities_for_every_mode(model: VAN, name: str) -> None:
    top = predict(model, IMAGES[name](), k=3)
    probs = list(top.values())
    assert len(top) == 3 and set(top) <= set(LABELS)
    assert probs == sorted(probs, reverse=True)
    assert all(0 < p <= 1 and np.isfinite(p) for p in probs)
    assert sum(probs) <= 1 + 1e-6


@pytest.mark.parametrize("name", list(IMAGES))
def test_preprocess_gives_a_normalized_batch_of_one(model: VAN, name: str) -> None:
    batch = preprocess(model, IMAGES[name]())
    assert batch.shape == (1, 3, 64, 64) and batch.dtype == torch.float32
    assert batch.min() >= -1 - 1e-6 and batch.max() <= 1 + 1e-6  # mean = std = 0.5 maps [0, 1] onto [-1, 1]


def test_k_larger_than_classes_gives_every_class_summing_to_one(model: VAN) -> None:
    top = predict(model, IMAGES["RGB"](), k=50)
    assert set(top) == set(LABELS)
    assert sum(top.values()) == pytest.approx(1.0, abs=1e-5)


def test_k_one_gives_the_argmax(model: VAN) -> None:
    image = IMAGES["RGB"]()
    with torch.no_grad():
        best = model(preprocess(model, image)).argmax().item()
    assert list(predict(model, image, k=1)) == [LABELS[best]]


def test_k_below_one_is_refused(model: VAN) -> None:
    with pytest.raises(ValueError, match="k must be at least 1"):
        predict(model, IMAGES["RGB"](), k=0)


def test_preprocessing_uses_the_official_half_mean_and_std(model: VAN) -> None:
    white = preprocess(model, Image.new("RGB", (50, 50), "white"))
    black = preprocess(model, Image.new("RGB", (50, 50), "black"))
    torch.testing.assert_close(white, torch.ones_like(white))
    torch.testing.assert_close(black, -torch.ones_like(black))
    cfg = data_config(model)
    assert cfg["interpolation"] == "bicubic" and cfg["crop_pct"] == 0.9


def test_preprocessing_follows_the_model_config(model: VAN) -> None:
    other = load_model("van_micro", num_classes=len(LABELS))
    other.pretrained_cfg = dict(other.pretrained_cfg, input_size=(3, 40, 40), mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    batch = preprocess(other, Image.new("RGB", (50, 50), "white"))
    torch.testing.assert_close(batch, torch.ones(1, 3, 40, 40))


def test_eval_transform_is_the_preprocessing_of_the_model_config(model: VAN) -> None:
    image = IMAGES["RGB"]()
    torch.testing.assert_close(eval_transform(model)(image).unsqueeze(0), preprocess(model, image))
    other = load_model("van_micro", num_classes=2)
    other.pretrained_cfg = dict(other.pretrained_cfg, input_size=(3, 40, 40))
    assert eval_transform(other)(image).shape == (3, 40, 40)


def test_top_k_names_the_classes_of_a_model_without_labels() -> None:
    bare = VAN(embed_dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), num_classes=3)
    assert top_k(bare, torch.tensor([0.0, 2.0, 1.0]), k=2) == pytest.approx(
        {"class_1": 0.6652, "class_2": 0.2447}, abs=1e-4)


def test_model_without_pretrained_cfg_still_gets_van_preprocessing() -> None:
    bare = VAN(embed_dims=(8, 16, 32, 64), depths=(1, 1, 1, 1), num_classes=2).eval()
    assert data_config(bare)["mean"] == (0.5, 0.5, 0.5)
    assert list(predict(bare, IMAGES["RGB"](), k=2)) in (["class_0", "class_1"], ["class_1", "class_0"])


def test_exif_orientation_is_applied(model: VAN) -> None:
    rotated, upright = exif_rotated()
    assert to_rgb(rotated).size == upright.size
    torch.testing.assert_close(preprocess(model, rotated), preprocess(model, upright))


def test_alpha_is_composited_on_white() -> None:
    clear = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert to_rgb(clear).getpixel((0, 0)) == (255, 255, 255)


def test_palette_transparency_is_composited_on_white() -> None:
    image = Image.new("P", (4, 4), 0)
    image.putpalette([255, 0, 0, 0, 255, 0])
    image.info["transparency"] = 0
    assert to_rgb(image).getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_is_scaled_not_clipped() -> None:
    image = Image.fromarray(np.full((4, 4), 32768, np.uint16))
    assert image.mode == "I;16"
    assert to_rgb(image).getpixel((0, 0)) == (128, 128, 128)


def test_float_image_in_unit_range_is_scaled() -> None:
    image = Image.fromarray(np.full((4, 4), 0.5, np.float32))
    assert to_rgb(image).getpixel((0, 0)) == (128, 128, 128)


def test_cmyk_is_converted_to_rgb() -> None:
    assert to_rgb(Image.new("CMYK", (4, 4), (0, 255, 255, 0))).getpixel((0, 0)) == (255, 0, 0)


def test_predict_runs_in_the_model_dtype() -> None:
    half = load_model("van_micro", num_classes=2).to(torch.bfloat16)
    half.pretrained_cfg = dict(half.pretrained_cfg, input_size=(3, 32, 32))
    top = predict(half, IMAGES["RGB"](), k=2)
    assert sum(top.values()) == pytest.approx(1.0, abs=1e-2)
