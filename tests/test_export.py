"""The export folder of a finished run: files, config layouts, metrics, model card, exact reload."""

from __future__ import annotations

import json
import shutil

import pytest
import timm
import torch
from huggingface_hub import ModelCard
from PIL import Image

import van_app
from van_app.config import DataConfig
from van_app.data import VanDataModule
from van_app.export import RunInfo, export_config, model_card, write_export
from van_app.files import EXPORT_FILES, atomic_dir, atomic_path, write_text
from van_app.module import model_state


CUSTOM = dict(embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1), mlp_ratios=(4, 4, 4, 4))  # matches no variant


def read_json(path):
    return json.loads(path.read_text())


def val_datamodule(data):
    """The data module the run used (same seed and split), to read its validation images."""
    preprocessing = {"input_size": (3, 32, 32), "interpolation": "bicubic", "mean": (0.5,) * 3, "std": (0.5,) * 3,
                     "crop_pct": 0.9}
    dm = VanDataModule(DataConfig(data_dir=data, batch_size=4, workers=0), preprocessing, progress=False)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def test_export_holds_every_file(trained):
    _, out, _ = trained
    assert sorted(p.name for p in out.iterdir() if p.is_file()) == sorted(EXPORT_FILES)


def test_no_temporary_files_are_left_behind(trained):
    _, out, _ = trained
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_config_has_timm_hub_layout(trained):
    _, out, _ = trained
    config = read_json(out / "config.json")
    assert config["architecture"] == "van_micro"
    assert config["model_args"] == {"embed_dims": [8, 16, 32, 64], "depths": [1, 1, 2, 1], "mlp_ratios": [8, 8, 4, 4]}
    assert config["num_classes"] == 3 and config["num_features"] == 64
    assert config["label_names"] == ["cat", "dog", "owl"]
    assert config["pretrained_cfg"]["input_size"] == [3, 32, 32]
    assert config["pretrained_cfg"]["classifier"] == "head"


def test_config_has_van_app_keys(trained):
    _, out, _ = trained
    config = read_json(out / "config.json")
    assert config["id2label"] == {"0": "cat", "1": "dog", "2": "owl"}
    assert config["label2id"] == {"cat": 0, "dog": 1, "owl": 2}
    assert (config["image_size"], config["mean"], config["std"]) == (32, [0.5] * 3, [0.5] * 3)
    assert (config["interpolation"], config["crop_pct"]) == ("bicubic", 0.9)
    assert config["version"] == van_app.__version__
    assert config["training_args"]["epochs"] == 2 and config["training_args"]["model"] == "van_micro"


def test_metrics_are_flat_with_per_class_values(trained):
    _, out, _ = trained
    metrics = read_json(out / "metrics.json")
    for key in ("val_acc", "val_loss", "val_f1", "images_seen", "epochs", "wall_time_s"):
        assert isinstance(metrics[key], (int, float)), key
    for label in ("cat", "dog", "owl"):
        for metric in ("precision", "recall", "f1"):
            assert 0.0 <= metrics[f"val_{metric}_{label}"] <= 1.0
    assert metrics["epochs"] == 2
    assert metrics["images_seen"] == 2 * (6 * 3 // 4) * 4  # 18 training images, full batches of 4, 2 epochs


def test_confusion_matrix_counts_every_validation_image(trained):
    data, out, _ = trained
    confusion = read_json(out / "confusion_matrix.json")
    assert confusion["labels"] == ["cat", "dog", "owl"]
    assert sum(map(sum, confusion["matrix"])) == len(val_datamodule(data).val_samples)


def test_confusion_matrix_plot_is_a_png(trained):
    _, out, _ = trained
    with Image.open(out / "confusion_matrix.png") as image:
        assert image.format == "PNG" and image.width > 100


def test_bad_files_lists_the_corrupt_image(trained):
    _, out, _ = trained
    lines = (out / "bad_files.txt").read_text().splitlines()
    assert lines[0].startswith("# 1 bad image")
    assert lines[1].startswith("owl/broken.jpg\t")


def test_model_card_has_hub_metadata(trained):
    _, out, _ = trained
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "timm" and data["pipeline_tag"] == "image-classification"
    assert data["license"] == "apache-2.0"
    assert "van" in data["tags"] and "image-classification" in data["tags"]
    assert "base_model" not in data  # trained from scratch
    accuracy = data["model-index"][0]["results"][0]["metrics"][0]
    assert accuracy["type"] == "accuracy"
    assert accuracy["value"] == round(read_json(out / "metrics.json")["val_acc"], 4)


def test_model_card_explains_labels_loading_and_reproduction(trained):
    _, out, _ = trained
    text = ModelCard.load(out / "README.md").text
    assert "| 2 | owl |" in text
    assert "van_app.load_model(" in text and "python app.py --model" in text
    assert "van-finetune --data pets --crop-scale 0.35 --auto-augment none --batch-size 4" in text


def test_reload_reproduces_the_validation_accuracy(trained):
    data, out, _ = trained
    model = van_app.load_model(out)
    dm = val_datamodule(data)
    hits = [max(p := van_app.predict(model, Image.open(path), k=1), key=p.get) == dm.classes[label]
            for path, label in dm.val_samples]
    assert sum(hits) / len(hits) == pytest.approx(read_json(out / "metrics.json")["val_acc"], abs=1e-6)


def test_reload_gives_exactly_the_best_checkpoints_logits(trained):
    data, out, _ = trained
    best = out.with_name(f"{out.name}.run") / "checkpoints" / "best.ckpt"
    state = model_state(torch.load(best, map_location="cpu", weights_only=True))
    trained_model = van_app.load_model("van_micro", num_classes=3)
    trained_model.load_state_dict(state)
    batch, _ = next(iter(val_datamodule(data).val_dataloader()))
    with torch.no_grad():
        assert torch.equal(van_app.load_model(out)(batch), trained_model.eval()(batch))


def test_reload_keeps_labels_and_preprocessing(trained):
    _, out, _ = trained
    model = van_app.load_model(out)
    assert model.labels == ["cat", "dog", "owl"] and model.variant == "van_micro"
    assert tuple(model.pretrained_cfg["input_size"]) == (3, 32, 32)


def test_timm_local_dir_rebuilds_the_model_with_labels(trained):
    _, out, _ = trained
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), van_app.load_model(out)(x))
    assert model.pretrained_cfg["label_names"] == ["cat", "dog", "owl"]


def test_custom_spec_config_rebuilds_through_timm(tmp_path):
    model = van_app.load_model("van_micro", num_classes=2, **CUSTOM)
    run = RunInfo(data_name="d", data_summary={}, training_args={}, command="van-finetune --data d")
    config = export_config(model, ["a", "b"], {"input_size": (3, 32, 32), "interpolation": "bicubic",
                                               "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 0.9}, run)
    write_text(tmp_path / "config.json", json.dumps(config))
    rebuilt = timm.create_model(f"local-dir:{tmp_path}", pretrained=False)
    assert config["architecture"] == "van_micro" and rebuilt.model_args["embed_dims"] == (8, 16, 24, 32)


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "metrics.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


@pytest.mark.parametrize(("base_model", "local_start", "says"), [
    (None, None, "trained from random initialisation"),
    ("Visual-Attention-Network/VAN-Tiny-original",
     None, "fine-tuned from [Visual-Attention-Network/VAN-Tiny-original](https://huggingface.co/"),
    (None, "first", "fine-tuned from the local weights <code>first</code>"),
])
def test_model_card_says_where_training_started(base_model, local_start, says):
    model = van_app.load_model("van_micro", num_classes=2, **CUSTOM)
    run = RunInfo(data_name="d", data_summary={}, training_args={}, command="van-finetune --data d",
                  base_model=base_model, local_start=local_start)
    config = export_config(model, ["a", "b"], {"input_size": (3, 32, 32), "interpolation": "bicubic",
                                               "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 0.9}, run)
    metrics = {"val_acc": 0.5, "val_f1": 0.5, "val_loss": 1.0, "epochs": 1, "images_seen": 8}
    assert says in model_card(config, metrics, "m").text


def tiny_model_config(labels, run):
    """config.json of a small random model with ``labels``, as the export writes it."""
    model = van_app.load_model("van_micro", num_classes=len(labels), **CUSTOM)
    return model, export_config(model, labels, {"input_size": (3, 32, 32), "interpolation": "bicubic",
                                                "mean": (0.5,) * 3, "std": (0.5,) * 3, "crop_pct": 0.9}, run)


RUN = RunInfo(data_name="d", data_summary={}, training_args={}, command="van-finetune --data d")
METRICS = {"val_acc": 0.5, "val_f1": 0.5, "val_loss": 1.0, "epochs": 8, "best_epoch": 5, "images_seen": 8}


def test_config_lists_the_export_files(trained):
    _, out, _ = trained
    assert read_json(out / "config.json")["files"] == list(EXPORT_FILES)


def test_export_holds_no_absolute_path(trained):
    data, out, _ = trained
    for path in out.iterdir():
        if path.suffix in (".json", ".md", ".txt"):
            text = path.read_text()
            assert str(data.parent) not in text and str(out.parent) not in text, path.name


def test_export_records_the_data_folder_name_and_class_counts(trained):
    _, out, _ = trained
    training = read_json(out / "config.json")["training"]
    assert training["data_name"] == "pets"
    assert training["data_summary"]["per_class"]["owl"] == {"train": 6, "val": 2, "test": 0}


def test_card_names_the_epoch_of_the_exported_weights(trained):
    _, out, _ = trained
    best = read_json(out / "metrics.json")["best_epoch"]
    assert f"| exported weights | epoch {best + 1} of 2 (best validation accuracy) |" in (out / "README.md").read_text()


def test_card_tables_escape_label_text():
    labels = ["a|b", "two\nlines", "<b>bold</b>", "<img src=x onerror=alert(1)>"]
    _, config = tiny_model_config(labels, RUN)
    text = model_card(config, METRICS, "m").text
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 4 and all(row.replace("\\|", "").count("|") == 8 for row in rows)
    assert "<b>" not in text and "<img" not in text and "&lt;b&gt;bold&lt;/b&gt;" in text


def test_card_of_a_random_start_says_why_and_links_nothing():
    run = RunInfo(data_name="d", data_summary={}, training_args={}, command="van-finetune --data d",
                  note="official van_b2 weights not available (offline)")
    _, config = tiny_model_config(["a", "b"], run)
    card = model_card(config, METRICS, "m")
    assert "trained from random initialisation (official van_b2 weights not available (offline))" in card.text
    assert "huggingface.co/" not in card.text and "base_model" not in card.data.to_dict()


def test_failed_export_leaves_the_previous_export_as_it_was(trained, tmp_path, monkeypatch):
    _, out, _ = trained
    export = shutil.copytree(out, tmp_path / "export")
    before = {p.name: p.read_bytes() for p in export.iterdir()}
    model, _ = tiny_model_config(["cat", "dog", "owl"], RUN)

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr("van_app.export.plot_confusion", killed)
    with pytest.raises(KeyboardInterrupt):
        write_export(export, model, ["cat", "dog", "owl"], model.pretrained_cfg, {"val_acc": 1.0, "val_loss": 0.0},
                     {}, RUN)
    assert {p.name: p.read_bytes() for p in export.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_a_reader_sees_the_old_export_until_the_new_one_is_whole(tmp_path):
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "config.json").write_text("old")
    with atomic_dir(tmp_path / "export") as new:
        (new / "config.json").write_text("new")
        (new / "model.safetensors").write_text("new weights")
        assert [p.name for p in (tmp_path / "export").iterdir()] == ["config.json"]
        assert (tmp_path / "export" / "config.json").read_text() == "old"
    assert {p.name: p.read_text() for p in (tmp_path / "export").iterdir()} == {
        "config.json": "new", "model.safetensors": "new weights"}
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_load_model_refuses_an_incomplete_export_naming_what_is_missing(trained, tmp_path):
    _, out, _ = trained
    export = shutil.copytree(out, tmp_path / "export")
    (export / "README.md").unlink()
    with pytest.raises(van_app.CheckpointError, match=r"incomplete van_app export, missing README.md"):
        van_app.load_model(export)
