"""The bundled demo model: a van_app export that loads offline and recognises freshly generated shapes."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

from van_app import load_model, predict
from van_app.explain import MapKind, analyse, find_map, render
from van_app.localization import area_share, mass_in_mask
from van_app.synthetic import SHAPES, generate

BUNDLED = Path(__file__).resolve().parents[1] / "checkpoints" / "van-b0-shapes"


def test_bundled_model_is_small_enough_to_commit():
    assert sum(p.stat().st_size for p in BUNDLED.rglob("*") if p.is_file()) <= 20 * 2**20


def test_bundled_config_records_the_image_size():
    config = json.loads((BUNDLED / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"][-1] == config["image_size"] == 64


def test_bundled_model_loads_as_van_b0_with_the_shape_labels():
    model = load_model(BUNDLED)
    assert model.labels == sorted(SHAPES) and model.variant == "van_b0"


def test_bundled_model_classifies_fresh_generated_images():
    model = load_model(BUNDLED)
    images = [(shape, generate(shape, index, 64, seed=12345).image) for shape in SHAPES for index in range(10)]
    correct = sum(next(iter(predict(model, Image.fromarray(pixels), k=1))) == shape for shape, pixels in images)
    assert correct >= 0.9 * len(images)


def test_bundled_models_stage_one_map_puts_its_mass_on_the_object():
    model = load_model(BUNDLED)
    lifts = []
    for shape in SHAPES:
        for index in range(4):
            sample = generate(shape, index, 64, seed=12345)
            image = Image.fromarray(sample.image)
            analysis = analyse(model, image)
            shown, _ = render(find_map(analysis.maps, MapKind.STAGE, 0), analysis.geometry)
            lifts.append(mass_in_mask(shown, sample.mask) / area_share(sample.mask))
    assert np.mean(lifts) > 1.3  # a map blind to the object scores 1.0 (the benchmark measures 1.61)
