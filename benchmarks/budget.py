"""Accuracy reached in a fixed time: ``van-finetune --time T`` against the default epoch-based run cut at T.

Both arms train VAN-b0 from random weights (so both get the from-scratch
recipe) on the same generated folder, and run side by side, so load from other
processes hits them alike: the ``--time`` run sizes its epochs and learning-rate
schedule to T; the default run plans its 10 epochs and is stopped by SIGTERM at
T (what a scheduler's time limit does), keeping its best checkpoint so far. Each
model is then scored on held-out images generated from another seed.

    python benchmarks/budget.py --budgets 5m 10m 20m
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import van_app
from van_app.batch import find_files, predict_files
from van_app.config import format_duration, parse_duration
from van_app.module import VanClassifier
from van_app.synthetic import SynthConfig, write_dataset


def run(command: list[str], log: Path, stop_after: float | None = None) -> tuple[subprocess.Popen, float, Path]:
    """Start ``command`` writing to ``log``; with ``stop_after`` it is sent SIGTERM that many seconds later."""
    out = log.open("w")
    return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1")
                            ), time.monotonic() + (stop_after or 1e9), log


def accuracy(model: torch.nn.Module, test: Path) -> float:
    """Top-1 accuracy on ``test/<class>/*`` (folder names are the classes)."""
    paths = find_files([str(test)])
    answers = list(predict_files(van_app.fuse(model), paths, k=1, batch_size=64, workers=1, progress=False))
    return sum(p.label == p.path.parent.name for p in answers) / len(answers)


def cut_run_model(run_dir: Path) -> tuple[torch.nn.Module, int]:
    """The best weights a stopped run kept (best.ckpt, else the checkpoint written when it stopped) and its epochs."""
    checkpoints = run_dir / "checkpoints"
    path = next(p for p in (checkpoints / "best.ckpt", checkpoints / "interrupted.ckpt", checkpoints / "last.ckpt")
                if p.is_file())
    module = VanClassifier.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    stopped = torch.load(checkpoints / "interrupted.ckpt" if (checkpoints / "interrupted.ckpt").is_file() else path,
                         map_location="cpu", weights_only=True)
    return module.model.eval(), int(stopped["epoch"])


def main() -> None:
    """Generate the data, run both arms per budget, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", nargs="+", default=["5m", "10m", "20m"], type=parse_duration)
    parser.add_argument("--per-class", type=int, default=1500, help="training images per class")
    parser.add_argument("--test-per-class", type=int, default=200, help="held-out images per class")
    parser.add_argument("--size", type=int, default=64, help="generated image side")
    parser.add_argument("--model", default="van_b0")
    parser.add_argument("--work", type=Path, default=None, help="folder for data and runs (default: a temporary one)")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="van-budget-"))
    data, test = work / "train", work / "test"
    if not (data / "dataset.json").is_file():
        write_dataset(SynthConfig(data, per_class=args.per_class, size=args.size, seed=0))
        write_dataset(SynthConfig(test, per_class=args.test_per_class, size=args.size, seed=1))
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}; "
          f"{args.model} from random weights on {6 * args.per_class} generated {args.size} px images, "
          f"scored on {6 * args.test_per_class} held-out ones")
    rows = []
    for budget in args.budgets:
        name = format_duration(budget)
        base = ["van-finetune", "--data", str(data / "images"), "--model", args.model, "--pretrained", "none",
                "--overwrite"]
        timed = run([*base, "--time", name, "--output", str(work / f"time-{name}")], work / f"time-{name}.log")
        cut = run([*base, "--output", str(work / f"epochs-{name}")], work / f"epochs-{name}.log", stop_after=budget)
        for process, deadline, log in (timed, cut):
            while process.poll() is None:
                if time.monotonic() > deadline:
                    process.send_signal(signal.SIGTERM)
                    deadline = 1e9
                time.sleep(1)
        timed_model = van_app.load_model(work / f"time-{name}")
        timed_epochs = json.loads((work / f"time-{name}" / "metrics.json").read_text())["epochs"]
        cut_model, cut_epochs = cut_run_model(work / f"epochs-{name}.run")
        rows.append((name, accuracy(timed_model, test / "images"), timed_epochs, accuracy(cut_model, test / "images"),
                     cut_epochs))
        print(f"{name}: --time {rows[-1][1]:.3f} ({timed_epochs} epochs), cut default run {rows[-1][3]:.3f} "
              f"({cut_epochs} epochs)", flush=True)
    print("\n| budget | `--time` accuracy (epochs) | default run cut at the budget (epochs done) | difference |")
    print("|---|---|---|---|")
    for name, timed_acc, timed_epochs, cut_acc, cut_epochs in rows:
        print(f"| {name} | {timed_acc:.3f} ({timed_epochs}) | {cut_acc:.3f} ({cut_epochs}) | "
              f"{timed_acc - cut_acc:+.3f} |")
    print(f"\nlogs and runs in {work}", file=sys.stderr)


if __name__ == "__main__":
    main()
