"""How long a run takes, measured before it starts, and a run sized to a time budget (``van-finetune --time``).

``measure`` times a few training steps (data loading included) and a few
validation batches on a throwaway copy of the model, on the device the Trainer
will use. ``plan_run`` turns those rates into the run: with a budget, the number
of epochs and the share of the images each one trains on, so that they fill the
budget, and so the total optimizer steps the learning-rate schedule decays over; without one,
the time the planned epochs will take. ``TimeBudget`` keeps the run honest while
it goes on: after every step it moves the schedule's end to the steps that still
fit at the pace measured so far, and stops the run when none do, so the learning
rate reaches its floor when the time is up, not before or after, however the
machine's speed changes.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from .config import format_duration

EXPORT_RESERVE = (0.05, 10.0)  # kept back for loading the best weights and writing the export: share, at most s
SAFETY = 1.05  # epochs are planned this much longer than measured, so noise rarely pushes the last past the budget
MAX_IDLE = 0.1  # whole epochs leaving more of the budget than this unused give way to more, shorter epochs
MAX_SUB_EPOCHS = 4  # when one epoch does not fit the budget: this many validated shares of it at most
MIN_TIMED_S = 2.0  # the shortest measurement of a rate


@dataclass(frozen=True)
class Rates:
    """Images per second measured on this machine: training (loading, forward, backward, step) and validation."""

    train: float
    val: float


@dataclass(frozen=True)
class Plan:
    """The run sized from measured rates: epochs, the share of each epoch trained, the steps the schedule spans."""

    rates: Rates
    train_images: int
    val_images: int
    batch_size: int  # images per optimizer step, all devices together
    epochs: int
    fraction: float  # share of the training images each epoch uses (1.0 unless one epoch exceeds the budget)
    budget_s: float | None

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        """The plan ``dataclasses.asdict`` wrote (the main process writes it for the others)."""
        return cls(**dict(data, rates=Rates(**data["rates"])))

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per (possibly partial) epoch."""
        return max(1, math.floor(self.train_images * self.fraction / self.batch_size))

    @property
    def total_steps(self) -> int:
        """Optimizer steps of the whole run."""
        return self.epochs * self.steps_per_epoch

    @property
    def epoch_s(self) -> float:
        """Seconds per epoch: its training steps and its validation."""
        return self.steps_per_epoch * self.batch_size / self.rates.train + self.val_images / self.rates.val

    @property
    def total_s(self) -> float:
        """Seconds the planned epochs take."""
        return self.epochs * self.epoch_s

    def describe(self, img_size: int) -> str:
        """The plan in one line: rates, time per epoch, total, and what would shorten it."""
        epoch = f"{format_duration(self.epoch_s)} per epoch"
        if self.fraction < 1.0:
            epoch += f" ({self.fraction:.0%} of the {self.train_images:,} training images each)"
        head = (f"plan: {self.rates.train:.0f} img/s training, {self.rates.val:.0f} img/s validation -> {epoch}; "
                f"{self.epochs} epochs, {self.total_steps:,} steps, about {format_duration(self.total_s)}")
        if self.budget_s is not None:
            return f"{head} (budget {format_duration(self.budget_s)})"
        smaller = max(32, (img_size // 2 + 31) // 32 * 32)
        if self.total_s < 60:
            return head
        hints = [f"--time {format_duration(self.total_s / 4)}"] if self.total_s > 240 else []
        if smaller < img_size:
            hints.append(f"--img-size {smaller} (about {(img_size / smaller) ** 2:.0f}x faster per image)")
        return head + (f"; shorter: {' or '.join(hints)}" if hints else "")


def measure(model: torch.nn.Module, train_loader: Any, val_loader: Any, device: torch.device, *,
            forward_context: Any = None, steps: int = 6, warmup: int = 2, max_seconds: float = 30.0) -> Rates:
    """Training and validation images/s of ``model`` on ``device``, timed on a copy (``model`` is left untouched)."""
    trial = copy.deepcopy(model).to(device).train()
    optimizer = torch.optim.AdamW(trial.parameters(), lr=0.0)
    context = forward_context or (lambda: torch.autocast(device.type, enabled=False))  # a fresh one per step
    train = _rate(train_loader, warmup, steps, max_seconds, device,
                  lambda x, y: _train_step(trial, optimizer, x, y, context))
    trial.eval()
    with torch.inference_mode():
        val = _rate(val_loader, 1, steps, max_seconds, device, lambda x, y: trial(x))
    return Rates(train, val)


def _train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                context: Any) -> None:
    with context():
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def _rate(loader: Any, warmup: int, steps: int, max_seconds: float, device: torch.device, step: Any) -> float:
    """Images/s of ``step`` over ``loader`` after ``warmup`` untimed batches (loading time included).

    The batches the loader's workers prepared in advance are used up before the clock
    starts, and timing goes on for ``MIN_TIMED_S`` at least, so that a fast model on a
    GPU is timed at the pace the workers keep up, not at the pace of their head start.
    """
    backlog = (getattr(loader, "num_workers", 0) or 0) * (getattr(loader, "prefetch_factor", None) or 0)
    warmup = max(warmup, backlog + 1)
    batches, images, started = iter(loader), 0, None
    for i, (x, y) in enumerate(batches):
        step(x.to(device), y.to(device))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i + 1 == warmup:
            started = time.perf_counter()
        elif started is not None:
            images += len(x)
            elapsed = time.perf_counter() - started
            if (i + 1 >= warmup + steps and elapsed > MIN_TIMED_S) or elapsed > max_seconds:
                break
    if started is None or images == 0:  # too few batches to time after the warm-up: time them all instead
        started, images = time.perf_counter(), 0
        for x, y in loader:
            step(x.to(device), y.to(device))
            images += len(x)
    return images / max(time.perf_counter() - started, 1e-6)


def reserve(budget_s: float) -> float:
    """Seconds kept back at the end of a budget for the export."""
    share, most = EXPORT_RESERVE
    return min(most, share * budget_s)


def plan_run(rates: Rates, train_images: int, val_images: int, batch_size: int, epochs: int,
             budget_s: float | None) -> Plan:
    """The run for these rates: ``epochs`` as asked, or the epochs (whole, or shares of the images) that fill the budget."""
    plan = Plan(rates, train_images, val_images, batch_size, epochs, 1.0, budget_s)
    if budget_s is None:
        return plan
    usable = max(budget_s - reserve(budget_s), 1.0)
    whole = Plan(rates, train_images, val_images, batch_size, 1, 1.0, budget_s)
    val_s = val_images / rates.val
    train_s = whole.epoch_s - val_s
    fit = usable / (whole.epoch_s * SAFETY)
    if fit >= 1:
        if fit - math.floor(fit) <= MAX_IDLE * fit:
            return Plan(rates, train_images, val_images, batch_size, math.floor(fit), 1.0, budget_s)
        # e.g. 1.4 epochs' time: two epochs of 70% of the images each, not one epoch and 30% of the budget idle
        epochs = math.ceil(fit)
        fraction = max(batch_size / train_images, min(1.0, (usable / SAFETY / epochs - val_s) / train_s))
        return Plan(rates, train_images, val_images, batch_size, epochs, fraction, budget_s)
    # One epoch is too long: train on a share of it, validating a few times, validation at most half the time.
    parts = max(1, min(MAX_SUB_EPOCHS, math.floor(usable / (2 * val_s)) if val_s > 0 else MAX_SUB_EPOCHS))
    fraction = max(batch_size / train_images, min(1.0, (usable / parts - val_s) / train_s))
    return Plan(rates, train_images, val_images, batch_size, parts, fraction, budget_s)


class TimeBudget(Callback):
    """Keeps a run inside its time budget, with the learning-rate schedule ending when the time does.

    After every optimizer step the main process counts the steps left before the
    deadline (less the export reserve and the validations still to come) at the pace
    measured so far, and moves the schedule's end there; when none are left it stops
    the run, and Lightning validates once more, so the best weights are kept. A run
    slower or faster than planned, from other load on the machine say, keeps training
    until the deadline with its schedule finishing on time. The deadline counts from
    when the command started; the other processes take the main process's decision.
    """

    def __init__(self, deadline: float, plan: Plan) -> None:
        self.deadline = deadline  # time.monotonic() at which the export must be done
        self.plan = plan
        self.reserve = reserve(plan.budget_s or 0.0)
        self.val_s = plan.val_images / plan.rates.val  # one validation's seconds, measured again at each
        self.step_s = plan.batch_size / plan.rates.train  # one optimizer step's seconds, measured as the run goes
        self._mark: tuple[float, int] | None = None  # (time, global step) where training last resumed
        self._epoch_start = 0  # global step at the start of this epoch
        self._validating = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.fit_loop.max_epochs = max(trainer.fit_loop.max_epochs or 1, 10**6)  # the deadline ends the run

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = trainer.global_step
        self._mark = (time.monotonic(), trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        now, step = time.monotonic(), trainer.global_step
        if self._mark is not None and step - self._mark[1] >= 3:  # the pace since training last resumed
            self.step_s = (now - self._mark[0]) / (step - self._mark[1])
        left = self.steps_left(now, step - self._epoch_start)
        end = trainer.strategy.broadcast(step + left if left >= 1 else None, src=0)
        if end is None:
            trainer.should_stop = True
            return
        for config in trainer.lr_scheduler_configs:
            for schedule in getattr(config.scheduler, "lr_lambdas", []):
                if hasattr(schedule, "total_steps"):
                    schedule.total_steps = max(int(end), step + 1)

    def steps_left(self, now: float, into_epoch: int) -> float:
        """Optimizer steps that fit before the deadline (less the reserve), counting one validation per epoch
        begun: each epoch ends with one, and so does a run stopped inside an epoch."""
        seconds = self.deadline - self.reserve - now
        per_epoch = self.plan.steps_per_epoch
        best = 0.0
        for k in range(1, 10_000):  # k validations to come: the steps end in the k-th epoch from here
            if seconds < k * self.val_s:
                break
            steps = min(k * per_epoch - into_epoch, (seconds - k * self.val_s) / self.step_s)
            if steps > (k - 1) * per_epoch - into_epoch:
                best = max(best, steps)
        return best

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validating = time.monotonic()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self._validating:
            return
        self.val_s = time.monotonic() - self._validating
        self._mark = (time.monotonic(), trainer.global_step)
