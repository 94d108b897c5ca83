"""Runs sized to this machine's measured speed, and to a time budget (``van-finetune --time``)."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from conftest import TINY_RUN, make_image_folders
from van_app.budget import Plan, Rates, TimeBudget, measure, plan_run
from van_app.config import TrainConfig, default_threads, default_workers, format_duration, parse_duration
from van_app.weights import load_model

RATES = Rates(train=100.0, val=400.0)  # images per second


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("20m", 1200), ("1h", 3600), ("1h30m", 5400), ("45", 45)])
def test_durations_read_like_people_write_them(text, seconds):
    assert parse_duration(text) == seconds


def test_durations_print_like_people_write_them():
    assert [format_duration(s) for s in (45, 750, 3900)] == ["45s", "12m30s", "1h05m"]


def test_without_a_budget_the_plan_keeps_the_epochs_asked_for():
    plan = plan_run(RATES, train_images=1000, val_images=200, batch_size=10, epochs=7, budget_s=None)
    assert (plan.epochs, plan.fraction, plan.total_steps) == (7, 1.0, 700)
    assert plan.epoch_s == pytest.approx(10.5)  # 1000 / 100 training + 200 / 400 validation


def test_a_budget_sets_the_number_of_whole_epochs_that_fit():
    plan = plan_run(RATES, train_images=1000, val_images=200, batch_size=10, epochs=10, budget_s=600)
    assert plan.fraction == 1.0 and plan.epochs == 53  # 590 usable seconds (10 for the export) / (10.5 per epoch + 5%)
    assert plan.total_s <= 600


def test_a_budget_between_whole_epochs_trains_more_shorter_epochs_that_fill_it():
    plan = plan_run(RATES, train_images=1000, val_images=200, batch_size=10, epochs=10, budget_s=16)
    assert plan.epochs == 2 and 0.6 < plan.fraction < 0.8  # 1.4 epochs' time: not one epoch and 30% idle
    assert plan.total_s * 1.05 == pytest.approx(16 - 0.8, rel=0.03)


def test_a_budget_shorter_than_an_epoch_trains_validated_shares_of_it():
    plan = plan_run(RATES, train_images=100_000, val_images=2000, batch_size=50, epochs=10, budget_s=300)
    assert plan.epochs == 4 and 0 < plan.fraction < 0.1
    assert plan.total_s == pytest.approx(300 - 10, rel=0.02)


def _budget(seconds_left: float, steps_per_epoch: int = 10, step_s: float = 1.0, val_s: float = 5.0) -> TimeBudget:
    """A TimeBudget with ``seconds_left`` until its deadline (no reserve) at the given pace, as of time 0."""
    plan = Plan(Rates(train=1.0, val=1.0), train_images=steps_per_epoch, val_images=5, batch_size=1, epochs=1,
                fraction=1.0, budget_s=None)
    budget = TimeBudget(seconds_left, plan)
    budget.step_s, budget.val_s = step_s, val_s
    return budget


def test_a_budget_counts_one_validation_for_each_epoch_begun():
    # 40 s at 1 s per step, 5 s per validation, 10 steps per epoch, at an epoch's last step: two more epochs and
    # their validations (30 s); a third epoch's first 5 steps would need a third validation (41 s)
    assert _budget(40.0).steps_left(now=0.0, into_epoch=10) == 20
    # with 45 s, 5 steps into a third epoch, stopped there with one more validation
    assert _budget(45.0).steps_left(now=0.0, into_epoch=10) == 25


def test_a_budget_with_no_time_for_a_validation_has_no_steps_left():
    assert _budget(4.0).steps_left(now=0.0, into_epoch=3) == 0


def test_the_plan_line_says_speed_time_per_epoch_total_and_how_to_shorten_it():
    plan = plan_run(RATES, train_images=100_000, val_images=2000, batch_size=50, epochs=10, budget_s=None)
    line = plan.describe(img_size=224)
    assert line.startswith("plan: 100 img/s training, 400 img/s validation -> 16m45s per epoch; 10 epochs")
    assert "about 2h47m" in line and "--time 41m52s" in line and "--img-size 128" in line


def test_a_plan_round_trips_through_json():
    plan = plan_run(RATES, train_images=1000, val_images=200, batch_size=10, epochs=10, budget_s=600)
    assert Plan.from_json(json.loads(json.dumps(plan.__dict__, default=lambda r: r.__dict__))) == plan


def test_measuring_leaves_the_model_untouched():
    model = load_model("van_micro", num_classes=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    data = TensorDataset(torch.randn(24, 3, 32, 32), torch.randint(0, 2, (24,)))
    rates = measure(model, DataLoader(data, batch_size=4), DataLoader(data, batch_size=4), torch.device("cpu"))
    assert rates.train > 0 and rates.val > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_loader_workers_and_model_threads_share_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    for cpus, workers, threads in ((1, 0, 1), (2, 1, 1), (8, 4, 4), (32, 4, 28)):
        monkeypatch.setattr("van_app.config._cpus", lambda cpus=cpus: cpus)
        assert (default_workers(), default_threads()) == (workers, threads)


def test_omp_num_threads_sets_the_model_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3


def test_model_threads_leave_the_workers_asked_for_their_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("van_app.config._cpus", lambda: 8)
    assert (default_threads(workers=0), default_threads(workers=6)) == (8, 2)


@pytest.mark.slow
def test_a_time_budget_run_ends_on_time_with_its_schedule_finished(tmp_path):
    data = make_image_folders(tmp_path / "d", classes=("a", "b"), per_class=60, size=32)
    out = tmp_path / "out"
    started = time.monotonic()
    result = subprocess.run(["van-finetune", "--data", str(data), *TINY_RUN, "--time", "20s", "--output", str(out)],
                            capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-2000:]
    assert 12 < elapsed < 26
    plan = next(line for line in result.stdout.splitlines() if line.startswith("plan: "))
    assert "(budget " in plan
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["final_lr"] == pytest.approx(TrainConfig().min_lr_ratio * 1e-3, rel=0.05)  # the schedule's floor
    assert metrics["epochs"] >= 2


def test_the_plan_comes_before_the_first_epoch(trained):
    _, _, result = trained
    lines = result.stdout.splitlines()
    plan = next(i for i, line in enumerate(lines) if line.startswith("plan: "))
    assert "img/s training" in lines[plan] and "per epoch" in lines[plan]
    assert plan < next(i for i, line in enumerate(lines) if line.startswith("class  precision"))
