"""van-finetune end to end (console script), its clear errors, resume, DDP, and the training recipe's parts."""

from __future__ import annotations

import errno
import json
import logging
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub.constants
import pytest
import torch

import van_app
from conftest import TINY_RUN, commits, committed_files, fake_hub, hub_env, make_image_folders, run_cli
from van_app.cli import build_parser, main, newest_checkpoint, parse_config
from van_app.config import TrainConfig, from_scratch
from van_app.errors import CheckpointError, UsageError
from van_app.files import EXPORT_FILES
from van_app.module import (AtomicCheckpointIO, FreezeBackbone, VanClassifier, WarmupCosine, create_classifier,
                            parameter_groups)
from van_app.weights import load_model

OPTIONS = ["--ema", "--ema-decay", "0.9", "--freeze-epochs", "1", "--mixup", "0.2", "--cutmix", "0.2",
           "--layer-decay", "0.75", "--balance", "--label-smoothing", "0.05", "--patience", "3",
           "--crop-scale", "0.5", "--crop-pct", "0.95", "--layer-scale-init", "0.1"]


@pytest.fixture(scope="module")
def split_run(tmp_path_factory):
    """A DATA/train + DATA/val run with every optional technique on, pushed to a fake Hub."""
    root = tmp_path_factory.mktemp("split")
    data = root / "birds"
    make_image_folders(data / "train", classes=("crow", "gull"), per_class=6)
    make_image_folders(data / "val", classes=("crow", "gull"), per_class=2)
    make_image_folders(data / "test", classes=("crow", "gull"), per_class=3)
    out = root / "export"
    with fake_hub() as hub:
        result = run_cli("van-finetune", "--data", str(data), *TINY_RUN, "--epochs", "2", *OPTIONS,
                         "--output", str(out), "--push-to-hub", "bob/birds", env=hub_env(hub, root))
    assert result.returncode == 0, result.stderr[-3000:]
    return data, out, result, hub


def test_help_groups_options_and_shows_defaults():
    text = build_parser().format_help()
    for group in ("data:", "model:", "optimisation:", "hardware (Lightning Trainer):", "output:"):
        assert group in text
    assert "(default: van_b0)" in text and "(default: auto)" in text


def test_help_shows_every_default_once():
    for action in build_parser()._actions:
        if action.dest not in ("help", "data_dir"):
            assert action.help.count("(default:") == 1, action.dest


def test_only_data_is_required():
    config = parse_config(["--data", "photos"])
    assert (config.model.model, config.model.pretrained, config.train.epochs, config.model.img_size) == (
        "van_b0", "auto", 10, 224)


def test_each_default_comes_from_the_config_dataclasses():
    assert parse_config(["--data", "photos"]).train == TrainConfig()


def test_config_built_in_python_is_checked_like_the_command_line():
    with pytest.raises(UsageError, match=r"^--epochs: expected an integer from 1 to 100000, got 0$"):
        TrainConfig(epochs=0)


@pytest.mark.parametrize("option", [
    ["--epochs", "0"], ["--epochs", "-1"], ["--accumulate", "0"], ["--accelerator", "quantum"],
    ["--strategy", "nonsense"], ["--devices", "0"], ["--devices", "many"], ["--num-nodes", "0"],
    ["--auto-augment", "garbage"], ["--drop-path", "5"], ["--ema-decay", "2"], ["--label-smoothing", "5"],
    ["--img-size", "7"], ["--mixup", "-1"], ["--cutmix", "-0.5"], ["--freeze-epochs", "-1"],
    ["--warmup-epochs", "-1"], ["--layer-decay", "0"], ["--workers", "-1"], ["--patience", "0"],
    ["--crop-pct", "2"], ["--crop-scale", "0"], ["--lr", "0"], ["--lr", "nan"], ["--batch-size", "0"],
    ["--val-split", "1"], ["--save-every-steps", "0"], ["--push-to-hub", "no repo"], ["--precision", "8"],
])
def test_bad_option_is_one_line_before_the_data_folder_is_read(tmp_path, capsys, option):
    with pytest.raises(SystemExit) as exit_:
        main(["--data", str(tmp_path / "missing"), *option])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: argument {option[0]}: ") and "van-finetune --help" in err


@pytest.mark.slow
def test_console_script_bad_option_exits_2_with_one_line(tmp_path):
    result = run_cli("van-finetune", "--data", str(tmp_path), "--epochs", "0")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: argument --epochs: expected an integer") and result.stderr.count("\n") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_accelerator_this_machine_lacks_is_one_line_before_the_scan(tmp_path, capsys):
    data = make_two_classes(tmp_path / "d")
    assert main(["--data", str(data), *TINY_RUN, "--accelerator", "gpu", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("error: the Trainer cannot run with these hardware options")
    assert "Checking images" not in err


def test_output_inside_a_file_is_one_line(tmp_path, capsys):
    data = make_two_classes(tmp_path / "d")
    (tmp_path / "file").write_text("not a folder")
    assert main(["--data", str(data), *TINY_RUN, "--output", str(tmp_path / "file" / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "Not a directory" in err


def test_output_that_is_not_an_export_is_never_replaced(tmp_path, capsys):
    data = make_two_classes(tmp_path / "d")
    (tmp_path / "documents").mkdir()
    (tmp_path / "documents" / "thesis.txt").write_text("years of work")
    args = ["--data", str(data), *TINY_RUN, "--output", str(tmp_path / "documents"), "--overwrite"]
    assert main(args) == 2
    assert "exists and is not a van_app export" in capsys.readouterr().err
    assert (tmp_path / "documents" / "thesis.txt").read_text() == "years of work"


def test_full_disk_during_export_is_one_line_and_keeps_the_previous_export(trained, tmp_path, capsys, monkeypatch):
    data, out, _ = trained
    export = shutil.copytree(out, tmp_path / "export")
    before = {p.name: p.read_bytes() for p in export.iterdir()}

    def full_disk(path, *args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("van_app.export.plot_confusion", full_disk)
    assert main(["--data", str(data), *TINY_RUN, "--output", str(export), "--overwrite"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith(f"error: {export}: No space left on device (free some space")
    assert {p.name: p.read_bytes() for p in export.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "export.run"]


def test_resume_skips_a_truncated_checkpoint_for_the_newest_readable_one(trained, tmp_path, caplog):
    _, out, _ = trained
    folder = shutil.copytree(run_folder(out) / "checkpoints", tmp_path / "checkpoints")
    last = folder / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with caplog.at_level(logging.WARNING):
        assert newest_checkpoint(folder) == folder / "best.ckpt"
    assert "last.ckpt" in caplog.text and "resuming from best.ckpt" in caplog.text


def test_resume_with_no_readable_checkpoint_says_to_start_over(tmp_path):
    (tmp_path / "last.ckpt").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UsageError, match=r"no readable checkpoint .*last.ckpt.*start over with --overwrite"):
        newest_checkpoint(tmp_path)


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1}, target)

    real_open = Path.open

    def full_disk(self, mode="r", *args, **kwargs):
        file = real_open(self, mode, *args, **kwargs)
        if "w" in mode:
            file.write(b"half a checkpoint")
            file.close()
            raise OSError(errno.ENOSPC, "No space left on device")
        return file

    monkeypatch.setattr(Path, "open", full_disk)
    with pytest.raises(OSError):
        AtomicCheckpointIO().save_checkpoint({"global_step": 2}, target)
    monkeypatch.setattr(Path, "open", real_open)
    assert torch.load(target, weights_only=True)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


@pytest.mark.slow
def test_sigterm_saves_a_resumable_checkpoint_and_exits_143_within_seconds(tmp_path):
    data = make_image_folders(tmp_path / "d", classes=("a", "b"), per_class=100, size=32)
    out = tmp_path / "out"
    args = ["--data", str(data), *TINY_RUN, "--batch-size", "2", "--save-every-steps", "2", "--output", str(out)]
    checkpoints = run_folder(out) / "checkpoints"
    process = subprocess.Popen(["van-finetune", *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while not (checkpoints / "last.ckpt").exists() and process.poll() is None:
        time.sleep(0.05)
    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143 and time.monotonic() - sent < 20
    assert err.splitlines()[-1].startswith("error: stopped by SIGTERM at epoch 1")
    stopped = torch.load(checkpoints / "interrupted.ckpt", map_location="cpu", weights_only=True)
    assert 0 < stopped["global_step"] < 80  # 160 training images in batches of 2: 80 steps in the epoch
    assert main([*args, "--resume"]) == 0
    assert torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 80
    assert not (checkpoints / "interrupted.ckpt").exists()


def test_run_prints_class_table_metrics_and_export_folder(trained):
    _, out, result = trained
    assert "total" in result.stdout and "val_acc" in result.stdout
    assert f"exported to {out}" in result.stdout


def test_run_prints_no_advertisements(trained):
    _, _, result = trained
    assert "Tip:" not in result.stdout + result.stderr and "litlogger" not in result.stdout + result.stderr


def run_folder(export):
    """The run folder van-finetune keeps beside the export ``export``."""
    return export.with_name(f"{export.name}.run")


def test_run_reports_skipped_bad_files_in_one_line(trained):
    _, out, result = trained
    assert f"skipped 1 bad files, listed in {run_folder(out) / 'bad_files.txt'}" in result.stderr


def test_run_keeps_best_and_last_checkpoints_and_logs_beside_the_export(trained):
    _, out, _ = trained
    assert sorted(p.name for p in (run_folder(out) / "checkpoints").iterdir()) == ["best.ckpt", "last.ckpt"]
    assert (run_folder(out) / "logs" / "metrics.csv").is_file()
    assert not (out / "checkpoints").exists() and not (out / "logs").exists()


def test_split_layout_run_exports_a_loadable_model(split_run):
    _, out, _, _ = split_run
    model = van_app.load_model(out)
    assert model.labels == ["crow", "gull"]
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 2


def test_split_layout_run_records_its_options(split_run):
    _, out, _, _ = split_run
    args = json.loads((out / "config.json").read_text())["training_args"]
    assert (args["ema"], args["freeze_epochs"], args["layer_decay"], args["balance"]) == (True, 1, 0.75, True)


def test_crop_pct_option_becomes_the_exported_preprocessing(split_run):
    _, out, _, _ = split_run
    assert json.loads((out / "config.json").read_text())["pretrained_cfg"]["crop_pct"] == 0.95
    assert van_app.load_model(out).pretrained_cfg["crop_pct"] == 0.95


def test_push_to_hub_uploads_the_export_in_one_commit(split_run):
    _, out, result, hub = split_run
    assert len(commits(hub)) == 1
    files = committed_files(commits(hub)[0])
    assert sorted(files) == sorted(EXPORT_FILES) and files["model.safetensors"] == (out / "model.safetensors").read_bytes()
    assert "pushed to" in result.stdout


def test_card_names_the_hub_repo_when_pushed(split_run):
    _, out, _, _ = split_run
    assert 'van_app.load_model("bob/birds")' in (out / "README.md").read_text()


def make_two_classes(root, per_class=3):
    return make_image_folders(root, classes=("a", "b"), per_class=per_class, size=16)


def one_class(tmp_path):
    return make_image_folders(tmp_path / "d", classes=("a",), per_class=3)


def class_without_valid_images(tmp_path):
    data = make_two_classes(tmp_path / "d")
    for image in (data / "b").iterdir():
        image.write_bytes(b"")
    return data


def class_too_small_to_split(tmp_path):
    data = make_two_classes(tmp_path / "d")
    for image in sorted((data / "b").iterdir())[1:]:
        image.unlink()
    return data


def train_val_classes_differ(tmp_path):
    make_image_folders(tmp_path / "d" / "train", classes=("a", "b"), per_class=2, size=16)
    make_image_folders(tmp_path / "d" / "val", classes=("a", "c"), per_class=2, size=16)
    return tmp_path / "d"


def empty_folder(tmp_path):
    (tmp_path / "d").mkdir()
    return tmp_path / "d"


@pytest.mark.parametrize("make_data, message", [
    (lambda tmp: tmp / "missing", "data folder not found"),
    (empty_folder, "no class folders"),
    (one_class, "need at least 2 class folders"),
    (class_without_valid_images, "has no valid images"),
    (class_too_small_to_split, "at least 2 are needed to split"),
    (train_val_classes_differ, "train and val have different classes"),
])
def test_bad_data_folder_is_one_clear_error(tmp_path, capsys, make_data, message):
    data = make_data(tmp_path)
    assert main(["--data", str(data), *TINY_RUN, "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if line.startswith("error:")] == err[-1:] and message in err[-1]


def test_unusable_pretrained_checkpoint_is_one_clear_error(tmp_path, capsys):
    data = make_two_classes(tmp_path / "d")
    (tmp_path / "weights.pth").write_bytes(b"not a checkpoint")
    assert main(["--data", str(data), *TINY_RUN, "--pretrained", str(tmp_path / "weights.pth")]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith(f"error: {tmp_path / 'weights.pth'}")


def test_resume_without_a_checkpoint_is_one_clear_error(tmp_path, capsys):
    data = make_two_classes(tmp_path / "d")
    assert main(["--data", str(data), *TINY_RUN, "--output", str(tmp_path / "out"), "--resume"]) == 2
    assert capsys.readouterr().err == f"error: --resume: no checkpoint in {tmp_path / 'out.run' / 'checkpoints'} to continue from\n"


def test_earlier_run_in_output_needs_resume_or_overwrite(trained, tmp_path, capsys):
    data, out, _ = trained
    assert main(["--data", str(data), *TINY_RUN, "--output", str(out)]) == 2
    assert "already holds a run: pass --resume" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_error_exits_2_without_traceback(tmp_path):
    result = run_cli("van-finetune", "--data", str(tmp_path / "missing"))
    assert result.returncode == 2
    assert result.stderr == f"error: data folder not found: {tmp_path / 'missing'}\n"


@pytest.mark.slow
def test_resume_continues_a_killed_run_to_its_planned_step(tmp_path):
    data = make_image_folders(tmp_path / "d", classes=("a", "b"), per_class=8, size=32)
    out = tmp_path / "out"
    args = ["--data", str(data), *TINY_RUN, "--batch-size", "2", "--epochs", "2", "--save-every-steps", "2",
            "--output", str(out)]
    last = run_folder(out) / "checkpoints" / "last.ckpt"
    process = subprocess.Popen(["van-finetune", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not last.exists() and process.poll() is None:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed = torch.load(last, map_location="cpu", weights_only=True)
    assert killed["epoch"] == 0 and killed["global_step"] < 6  # 12 training images in batches of 2: 6 per epoch
    assert main([*args, "--resume"]) == 0
    final = torch.load(last, map_location="cpu", weights_only=True)
    assert final["global_step"] == 12 and final["lr_schedulers"][0]["last_epoch"] == 12
    assert json.loads((out / "metrics.json").read_text())["epochs"] == 2


@pytest.mark.slow
def test_ddp_with_two_cpu_processes_trains_and_exports(tmp_path):
    data = make_image_folders(tmp_path / "d", classes=("a", "b"), per_class=8, size=32)
    out = tmp_path / "out"
    result = run_cli("van-finetune", "--data", str(data), *TINY_RUN, "--accelerator", "cpu", "--devices", "2",
                     "--strategy", "ddp", "--output", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "distributed_backend=gloo" in result.stderr + result.stdout
    assert "All distributed processes registered. Starting with 2 processes" in result.stderr + result.stdout
    assert van_app.load_model(out).labels == ["a", "b"]


def test_pretrained_auto_without_official_weights_warns_and_starts_random():
    base = create_classifier("van_micro", "auto", 3)
    assert "training from random initialisation" in base.note and base.base_model is None
    assert base.model.num_classes == 3


@pytest.fixture
def offline_empty_cache(tmp_path, monkeypatch):
    """No network and an empty Hugging Face cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def test_pretrained_variant_offline_is_an_error_not_random_weights(offline_empty_cache):
    with pytest.raises(CheckpointError, match="van_b0.*offline"):
        create_classifier("van_micro", "van_b0", 2)


def test_pretrained_auto_offline_says_why_it_starts_random(offline_empty_cache):
    base = create_classifier("van_b0", "auto", 2)
    assert base.base_model is None and "official van_b0 weights not available" in base.note
    assert "offline" in base.note


def test_pretrained_variant_without_official_weights_is_an_error():
    with pytest.raises(CheckpointError, match="van_b5 has no official pretrained weights"):
        create_classifier("van_micro", "van_b5", 2)


def test_pretrained_export_gives_its_weights_and_a_new_head(trained):
    _, out, _ = trained
    base = create_classifier("van_b0", str(out), 2)
    source = van_app.load_model(out).state_dict()
    state = base.model.state_dict()
    assert base.model.variant == "van_micro" and base.model.num_classes == 2
    assert all(torch.equal(state[k], v) for k, v in source.items() if not k.startswith("head."))
    assert base.base_model is None and base.local_start == out.name  # a name: the card never shows a local path


def test_drop_path_reaches_the_blocks():
    model = create_classifier("van_micro", "none", 2, drop_path_rate=0.2).model
    assert model.stages[3].blocks[0].drop_path.drop_prob == pytest.approx(0.2)


def test_layer_scale_init_reaches_the_blocks_of_a_random_model():
    model = create_classifier("van_micro", "none", 2, layer_scale_init=0.1).model
    assert torch.allclose(model.stages[0].blocks[0].layer_scale_1, torch.full((8,), 0.1))


def test_weight_decay_only_on_matrices_and_kernels():
    model = load_model("van_micro", num_classes=3)
    groups = parameter_groups(model, 1e-3, 0.05)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, param in model.named_parameters():
        assert (id(param) in decayed) == (param.ndim >= 2 and "layer_scale" not in name), name


def test_layer_decay_gives_early_layers_smaller_learning_rates():
    model = load_model("van_micro", num_classes=3)
    lr_of = {id(p): g["lr"] for g in parameter_groups(model, 1e-3, 0.05, layer_decay=0.5) for p in g["params"]}
    assert lr_of[id(model.head.weight)] == pytest.approx(1e-3)
    assert lr_of[id(model.stages[0].patch_embed.proj.weight)] < lr_of[id(model.stages[3].blocks[0].mlp.fc1.weight)]


def test_schedule_warms_up_then_decays_to_its_floor():
    factor = WarmupCosine(warmup_steps=4, total_steps=20, min_ratio=0.01)
    assert [factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert factor(4) == pytest.approx(1.0) and factor(12) < factor(8) and factor(20) == pytest.approx(0.01)


def test_freeze_drops_backbone_gradients_and_keeps_the_heads():
    module = SimpleNamespace(model=load_model("van_micro", num_classes=3))
    module.model(torch.randn(2, 3, 32, 32)).sum().backward()
    FreezeBackbone(1).on_before_optimizer_step(SimpleNamespace(current_epoch=0), module, None)
    assert all(p.grad is None for p in module.model.stages.parameters())
    assert module.model.head.weight.grad is not None


def test_freeze_ends_after_its_epochs():
    module = SimpleNamespace(model=load_model("van_micro", num_classes=3))
    module.model(torch.randn(2, 3, 32, 32)).sum().backward()
    FreezeBackbone(1).on_before_optimizer_step(SimpleNamespace(current_epoch=1), module, None)
    assert all(p.grad is not None for p in module.model.stages.parameters())


def test_top5_counts_the_true_class_anywhere_in_the_top_five_after_a_perfect_first_batch():
    labels = [f"c{i}" for i in range(6)]
    module = VanClassifier(load_model("van_micro", num_classes=6), labels)
    target = torch.arange(6)
    module.val_overall.update(torch.eye(6), target)  # every class right: top-1 and top-5 states agree
    second_best = torch.eye(6)[(target + 1) % 6] + 0.5 * torch.eye(6)
    module.val_overall.update(second_best, target)  # every class second: top-1 wrong, top-5 right
    scores = module.val_overall.compute()
    assert scores["val_acc"] == pytest.approx(0.5) and scores["val_top5"] == pytest.approx(1.0)


def test_a_run_checkpoint_rebuilds_its_classifier(trained):
    _, out, _ = trained
    path = run_folder(out) / "checkpoints" / "best.ckpt"
    module = VanClassifier.load_from_checkpoint(path, weights_only=True).eval()
    exported = van_app.load_model(out)
    assert module.labels == exported.labels and module.model.variant == exported.variant == "van_micro"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(module(x), exported(x))


def test_from_scratch_recipe_fills_only_the_options_not_set():
    config = parse_config(["--data", "photos", "--pretrained", "none", "--lr", "3e-4"])
    scratch, line = from_scratch(config, image_side=100, on_gpu=False)
    assert (scratch.model.layer_scale_init, scratch.model.drop_path, scratch.data.auto_augment) == (0.1, 0.0, None)
    assert scratch.train.lr == 3e-4 and "--lr" not in line
    assert line.startswith("no pretrained weights: from-scratch recipe --layer-scale-init 0.1")


@pytest.mark.parametrize("side, on_gpu, size", [(100, False, 96), (28, False, 32), (3000, False, 128),
                                                (3000, True, 224)])
def test_from_scratch_image_size_follows_the_data(side, on_gpu, size):
    scratch, _ = from_scratch(parse_config(["--data", "photos"]), image_side=side, on_gpu=on_gpu)
    assert scratch.model.img_size == size


def test_a_random_start_says_its_recipe_in_one_line_and_in_the_card(trained):
    _, out, result = trained
    line = next(line for line in result.stderr.splitlines() if "from-scratch recipe" in line)
    assert line.startswith("warning: no pretrained weights: from-scratch recipe --layer-scale-init 0.1")
    assert "--img-size" not in line  # set on the command line, so kept
    assert "from-scratch recipe --layer-scale-init 0.1" in (out / "README.md").read_text()


def test_progress_bar_fits_a_terminal_and_shows_the_best_epoch(trained):
    _, _, result = trained
    last = [line for line in re.split(r"[\r\n]", result.stdout) if line.startswith("Epoch 1:")][-1]
    assert len(last) <= 110 and "best=" in last and "val=" in last and "img/s=" in last
    assert last.index("best=") < last.index("loss=")


def test_crop_mode_option_becomes_the_exported_preprocessing(trained, tmp_path):
    data, _, _ = trained
    out = tmp_path / "squash"
    assert main(["--data", str(data), *TINY_RUN, "--crop-mode", "squash", "--output", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["pretrained_cfg"]["crop_mode"] == "squash"
    assert van_app.load_model(out).pretrained_cfg["crop_mode"] == "squash"


def test_a_test_folder_is_scored_once_with_the_exported_weights(split_run):
    _, out, _, _ = split_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics["test_acc"] <= 1.0 and "test_loss" in metrics
    assert f"| test accuracy (held-out DATA/test) | {metrics['test_acc']:.4f} |" in (out / "README.md").read_text()
