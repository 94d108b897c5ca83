"""van-predict: a folder of images classified in batches into a CSV, with a summary, accuracy and overlays."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
from PIL import Image

from conftest import run_cli
from van_app import load_model, predict
from van_app.cli import predict_main
from van_app.synthetic import SHAPES, generate

BUNDLED = Path(__file__).resolve().parents[1] / "checkpoints" / "van-b0-shapes"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """``shapes/<class>/<i>.png``: two fresh generated images per class of the bundled model, and one broken file."""
    root = tmp_path_factory.mktemp("photos") / "shapes"
    for shape in SHAPES:
        (root / shape).mkdir(parents=True)
        for index in range(2):
            Image.fromarray(generate(shape, index, 64, seed=777).image).save(root / shape / f"{index}.png")
    (root / "ring" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return root


def rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_console_script_writes_a_row_per_file_and_a_summary(shapes, tmp_path):
    result = run_cli("van-predict", str(BUNDLED), str(shapes), "--output", str(tmp_path / "p.csv"), "--k", "3")
    assert result.returncode == 0, result.stderr[-2000:]
    table = rows(tmp_path / "p.csv")
    assert len(table) == 13 and list(table[0]) == ["file", "label_1", "prob_1", "label_2", "prob_2", "label_3",
                                                  "prob_3", "error"]
    assert result.stdout.startswith("12 images classified, 1 unreadable")


def test_an_unreadable_file_is_a_row_with_its_reason(shapes, tmp_path):
    assert predict_main([str(BUNDLED), str(shapes), "--output", str(tmp_path / "p.csv"), "--workers", "0"]) == 0
    broken = next(row for row in rows(tmp_path / "p.csv") if row["file"].endswith("broken.jpg"))
    assert broken["label_1"] == "" and "not a readable image" in broken["error"]


def test_probabilities_are_those_of_predict(shapes, tmp_path):
    assert predict_main([str(BUNDLED), str(shapes / "star"), "--output", str(tmp_path / "p.csv"), "--workers", "0"]) == 0
    model = load_model(BUNDLED)
    for row in rows(tmp_path / "p.csv"):
        expected = predict(model, Image.open(row["file"]), k=5)
        assert list(expected) == [row[f"label_{i}"] for i in range(1, 6)]
        assert [float(row[f"prob_{i}"]) for i in range(1, 6)] == pytest.approx(list(expected.values()), abs=1e-4)


def test_folders_named_after_classes_give_accuracy_and_a_confusion_matrix(shapes, tmp_path, capsys):
    assert predict_main([str(BUNDLED), str(shapes), "--output", str(tmp_path / "p.csv"), "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "accuracy 1.0000 (12/12; the folder names are the classes)" in out
    matrix = out[out.index("true \\ predicted"):].splitlines()[: 1 + len(SHAPES)]
    assert matrix[0].split()[3:] == sorted(SHAPES)
    assert [row.split()[0] for row in matrix[1:]] == sorted(SHAPES)


def test_other_folders_give_no_accuracy(shapes, tmp_path, capsys):
    mixed = tmp_path / "holiday"
    mixed.mkdir()
    for path in list(shapes.glob("*/0.png"))[:3]:
        (mixed / f"{path.parent.name}.png").write_bytes(path.read_bytes())
    assert predict_main([str(BUNDLED), str(mixed), "--output", str(tmp_path / "p.csv"), "--workers", "0"]) == 0
    assert "accuracy" not in capsys.readouterr().out


def test_heatmaps_are_written_for_every_readable_image(shapes, tmp_path):
    maps = tmp_path / "maps"
    assert predict_main([str(BUNDLED), str(shapes), "--heatmaps", str(maps), "--output", str(tmp_path / "p.csv"),
                         "--workers", "1"]) == 0
    written = sorted(p.relative_to(maps).as_posix() for p in maps.rglob("*.png"))
    assert written == sorted(f"{shape}/{i}.png" for shape in SHAPES for i in range(2))
    with Image.open(maps / "star" / "0.png") as overlay:
        assert overlay.size == (64, 64)


def test_glob_patterns_choose_the_files(shapes, tmp_path):
    assert predict_main([str(BUNDLED), str(shapes / "*" / "1.png"), "--output", str(tmp_path / "p.csv"),
                         "--workers", "0"]) == 0
    assert sorted(Path(row["file"]).parent.name for row in rows(tmp_path / "p.csv")) == sorted(SHAPES)


def test_a_path_that_names_nothing_is_one_line(tmp_path, capsys):
    assert predict_main([str(BUNDLED), str(tmp_path / "nothing"), "--output", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no such file, folder or matching file" in err and err.count("\n") == 1


def test_a_model_that_cannot_load_is_one_line(shapes, tmp_path, capsys):
    assert predict_main([str(tmp_path), str(shapes), "--output", str(tmp_path / "p.csv")]) == 2
    assert capsys.readouterr().err.startswith(f"error: {tmp_path}: no config.json")
