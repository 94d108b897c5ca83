"""Fine-tuning a VAN with Lightning: the LightningModule, its optimizer and schedule, and its callbacks.

The module holds the model, the loss, torchmetrics objects and the optimizer
recipe (AdamW, weight decay only on matrices and kernels, optional layer-wise
learning-rate decay, linear warm-up then cosine decay per step). Each
validation leaves a plain-typed report (overall and per-class metrics, the
confusion matrix) that is saved inside every checkpoint, so the best
checkpoint carries the exact metrics of the weights it holds.
"""

from __future__ import annotations

import io
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.plugins import TorchCheckpointIO
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn
from torchmetrics import MeanMetric, MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassPrecision,
    MulticlassRecall,
)

from .config import TrainConfig
from .data import PREPROCESSING_KEYS
from .errors import CheckpointError, first_line
from .files import atomic_path
from .model import VAN
from .variants import CUSTOM_BASE, VARIANTS, variant_of
from .weights import load_model

log = logging.getLogger(__name__)


@dataclass
class BaseModel:
    """A freshly built classifier and where its starting weights really came from."""

    model: VAN
    base_model: str | None  # Hub id of the starting weights, for the model card
    note: str | None  # what happened to the starting weights, e.g. official weights that could not be had
    local_start: str | None = None  # the name (never the path) of the local file or folder the weights came from

    @property
    def random(self) -> bool:
        """Whether training starts from random weights."""
        return self.base_model is None and self.local_start is None


def create_classifier(variant: str, pretrained: str, num_classes: int, drop_path_rate: float = 0.0,
                      layer_scale_init: float = 1e-2, scratch: dict[str, Any] | None = None) -> BaseModel:
    """A VAN with a new head for ``num_classes``, started from ``pretrained``.

    ``pretrained``: ``auto`` (the official weights of ``variant`` when they can be had,
    else random initialisation with a note saying why), ``none``, a variant name (its
    official weights, or a ``CheckpointError``), a local checkpoint or export, or a Hub repo id.
    ``scratch`` holds model arguments that replace the others when the weights start random.
    """
    base_model, note, local_start = None, None, None
    build = dict(num_classes=num_classes, drop_path_rate=drop_path_rate)
    fresh = dict(build, layer_scale_init=layer_scale_init) | (scratch or {})
    if pretrained == "none":
        model = load_model(variant, **fresh)
    elif pretrained == "auto" or pretrained in VARIANTS:
        name = variant if pretrained == "auto" else pretrained
        weights = VARIANTS[name].weights
        if weights is None:
            if pretrained != "auto":
                raise CheckpointError(f"--pretrained {name}: {name} has no official pretrained weights")
            model, note = load_model(variant, **fresh), (f"{name} has no official pretrained weights; "
                                                        "training from random initialisation")
        else:
            try:
                model, base_model = load_model(name, pretrained=True, **build), weights[0]
            except CheckpointError as e:
                if pretrained != "auto":
                    raise CheckpointError(f"--pretrained {name}: {e}") from e
                why = str(e).split(": ", 1)[-1]  # the reason, without the repo and file it was about
                model, note = load_model(variant, **fresh), (f"official {name} weights not available ({why}); "
                                                            "training from random initialisation")
    else:
        model = load_model(pretrained, **build)
        if Path(pretrained).expanduser().exists():
            local_start = Path(pretrained).expanduser().resolve().name
        else:
            base_model = pretrained.removeprefix("hf-hub:")
    return BaseModel(model.train(), base_model, note, local_start)


def parameter_groups(model: VAN, lr: float, weight_decay: float, layer_decay: float | None = None) -> list[dict]:
    """AdamW groups: decay only on matrices/kernels (not norms, biases, layer scales); optional layer-wise LR decay."""
    skip = model.no_weight_decay()
    if layer_decay:
        groups = param_groups_layer_decay(model, weight_decay=weight_decay, no_weight_decay_list=skip,
                                          layer_decay=layer_decay)
    else:
        groups = param_groups_weight_decay(model, weight_decay=weight_decay, no_weight_decay_list=skip)
    for group in groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return groups


@dataclass
class WarmupCosine:
    """LR multiplier per optimizer step: linear warm-up to 1, then cosine decay to ``min_ratio`` at ``total_steps``.

    A callable object rather than a closure, so ``LambdaLR`` saves its fields in
    checkpoints and a time budget can move ``total_steps`` while the run goes on.
    """

    warmup_steps: int
    total_steps: int
    min_ratio: float

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class VanClassifier(L.LightningModule):
    """A VAN classifier trained with AdamW + cosine schedule, validated with torchmetrics.

    Its hyperparameters (labels, the recipe, the model's ``model_args`` and
    preprocessing) rebuild it, so ``VanClassifier.load_from_checkpoint(path)`` works
    on any checkpoint a run saved.
    """

    def __init__(self, model: VAN | None = None, labels: Sequence[str] = (), config: dict[str, Any] | None = None, *,
                 model_args: dict[str, Any] | None = None, preprocessing: dict[str, Any] | None = None) -> None:
        super().__init__()
        if model is None:
            if model_args is None:
                raise TypeError("VanClassifier needs a model or the model_args to build one")
            model = load_model(variant_of(model_args) or CUSTOM_BASE, **model_args)
            model.pretrained_cfg = dict(model.pretrained_cfg, **(preprocessing or {}))
        model.labels = list(labels)
        self.save_hyperparameters({"labels": list(labels), "config": dict(config or {}),
                                   "model_args": dict(model.model_args),
                                   "preprocessing": {k: model.pretrained_cfg[k] for k in PREPROCESSING_KEYS
                                                     if k in model.pretrained_cfg}})
        self.model = model
        self.labels = list(labels)
        self.config = TrainConfig(**(config or {}))
        self.lr = self.config.lr  # Tuner.lr_find reads and writes this attribute
        n = len(labels)
        self.mixup = (Mixup(mixup_alpha=self.config.mixup, cutmix_alpha=self.config.cutmix,
                            label_smoothing=self.config.label_smoothing, num_classes=n)
                      if self.config.mixup > 0 or self.config.cutmix > 0 else None)
        self.train_acc = MulticlassAccuracy(n, average="micro")
        overall = {"acc": MulticlassAccuracy(n, average="micro"), "f1": MulticlassF1Score(n, average="macro")}
        if n >= 5:
            overall["top5"] = MulticlassAccuracy(n, top_k=5, average="micro")
        # compute_groups would merge top-1 and top-5 whenever their states match after the first batch.
        self.val_overall = MetricCollection(overall, prefix="val_", compute_groups=False)
        self.val_per_class = MetricCollection({"precision": MulticlassPrecision(n, average=None),
                                               "recall": MulticlassRecall(n, average=None),
                                               "f1": MulticlassF1Score(n, average=None)})
        self.val_confusion = MulticlassConfusionMatrix(n)
        self.val_loss = MeanMetric()
        self.test_overall = self.val_overall.clone(prefix="test_")
        self.test_loss = MeanMetric()
        self.test_report: dict[str, float] = {}
        self.images_seen = 0
        self.val_report: dict[str, Any] = {}
        self.best = (0.0, -1)  # the best validation accuracy so far and its epoch (-1: none yet)
        self._seconds_before = 0.0  # wall time of the runs this one resumes
        self._fit_started = time.perf_counter()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.mixup is not None and len(x) % 2 == 0:  # timm's Mixup pairs samples, so needs an even batch
            mixed, soft = self.mixup(x, y)
            logits = self(mixed)
            loss = SoftTargetCrossEntropy()(logits, soft)
        else:
            logits = self(x)
            loss = F.cross_entropy(logits, y, label_smoothing=self.config.label_smoothing)
        self.train_acc(logits, y)
        self.images_seen += len(x) * self.trainer.world_size
        self.log("loss", loss, prog_bar=True)
        self.log("acc", self.train_acc, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_loss.update(F.cross_entropy(logits, y), weight=len(x))
        self.val_overall.update(logits, y)
        self.val_per_class.update(logits, y)
        self.val_confusion.update(logits, y)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.test_loss.update(F.cross_entropy(logits, y), weight=len(x))
        self.test_overall.update(logits, y)

    def on_test_epoch_end(self) -> None:
        scores = dict(self.test_overall.compute(), test_loss=self.test_loss.compute())
        self.log_dict(scores)
        self.test_report = {k: float(v) for k, v in scores.items()}
        self.test_overall.reset()
        self.test_loss.reset()

    def on_fit_start(self) -> None:
        self._fit_started = time.perf_counter()

    def wall_time_s(self) -> float:
        """Seconds spent fitting, over this run and the interrupted runs it continues."""
        return self._seconds_before + time.perf_counter() - self._fit_started

    def on_validation_epoch_end(self) -> None:
        overall = dict(self.val_overall.compute(), val_loss=self.val_loss.compute())
        self.log("val_acc", overall["val_acc"], prog_bar=True)
        self.log_dict({k: v for k, v in overall.items() if k != "val_acc"})
        if float(overall["val_acc"]) > self.best[0] or self.best[1] < 0:
            self.best = (float(overall["val_acc"]), self.current_epoch)
        per_class = {name: values.tolist() for name, values in self.val_per_class.compute().items()}
        confusion = self.val_confusion.compute().tolist()
        for metric in (self.val_overall, self.val_per_class, self.val_confusion, self.val_loss):
            metric.reset()
        self.val_report = {
            **{k: float(v) for k, v in overall.items()},
            **{f"val_{metric}_{label}": values[i] for metric, values in per_class.items()
               for i, label in enumerate(self.labels)},
            "confusion_matrix": confusion,
            "epoch": self.current_epoch,
            "step": self.global_step,
        }

    def configure_optimizers(self) -> dict[str, Any]:
        cfg = self.config
        optimizer = torch.optim.AdamW(parameter_groups(self.model, self.lr, cfg.weight_decay, cfg.layer_decay))
        total = max(1, int(self.trainer.estimated_stepping_batches))
        per_epoch = max(1, total // max(1, self.trainer.max_epochs or 1))
        warmup = min(int(cfg.warmup_epochs * per_epoch), total // 2)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(warmup, total, cfg.min_lr_ratio))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["van_app"] = {"images_seen": self.images_seen, "wall_time_s": self.wall_time_s(),
                                 "val_report": self.val_report, "best": list(self.best)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("van_app", {})
        self.images_seen = state.get("images_seen", 0)
        self._seconds_before = state.get("wall_time_s", 0.0)
        self.val_report = state.get("val_report", {})
        self.best = tuple(state.get("best", (0.0, -1)))


def model_state(checkpoint: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The VAN weights in a ``VanClassifier`` checkpoint (the averaged ones under EMA), in our key layout."""
    return {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}


class FreezeBackbone(Callback):
    """Train only the head for the first ``epochs`` epochs.

    Freezing drops the backbone's gradients before each optimizer step (AdamW
    skips parameters without a gradient) and keeps its BatchNorm statistics
    fixed, instead of toggling ``requires_grad``: DDP registers the parameters
    that need gradients once, so parameters unfrozen later would never be
    all-reduced across processes.
    """

    def __init__(self, epochs: int) -> None:
        self.epochs = epochs

    def _frozen(self, trainer: L.Trainer) -> bool:
        return trainer.current_epoch < self.epochs

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: VanClassifier, batch: Any, batch_idx: int) -> None:
        if self._frozen(trainer):
            for module in pl_module.model.stages.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: VanClassifier, optimizer: Any) -> None:
        if self._frozen(trainer):
            for param in pl_module.model.stages.parameters():
                param.grad = None


class ThroughputBar(TQDMProgressBar):
    """Lightning's progress bar for an 80-column terminal: best epoch, val accuracy, loss, accuracy, images/s.

    The best epoch comes first so that a narrow terminal cuts the least useful
    figures; the other validation metrics go to the logs and the export.
    """

    BAR_FORMAT = "{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"  # img/s replaces it/s
    SHOWN = {"val_acc": ("val", "{:.3f}"), "loss": ("loss", "{:.3f}"), "acc": ("acc", "{:.2f}")}

    def __init__(self) -> None:
        super().__init__()
        self._images = 0
        self._started = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._images, self._started = 0, time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._images += len(batch[0]) * trainer.world_size
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, int | str | float]:
        logged = super().get_metrics(trainer, pl_module)
        best, epoch = getattr(pl_module, "best", (0.0, -1))
        items: dict[str, int | str | float] = {"best": f"{best:.3f}@{epoch + 1}"} if epoch >= 0 else {}
        items.update({name: form.format(float(logged[key])) for key, (name, form) in self.SHOWN.items()
                      if key in logged})
        elapsed = time.perf_counter() - self._started
        if self._images and elapsed > 0:
            items["img/s"] = f"{self._images / elapsed:.0f}"
        return items


class CheckpointOnInterrupt(Callback):
    """Save a checkpoint that ``--resume`` continues from when a run stops early (SIGTERM, Ctrl-C, an error).

    Lightning stops a run that receives SIGTERM after the current batch and calls
    ``on_exception``; Lightning's own ``OnExceptionCheckpoint`` would also make every
    later ``fit`` resume from "last" on its own, so this callback only saves.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        try:
            trainer.save_checkpoint(self.path)
        except OSError as e:  # e.g. the disk that stopped the run is still full: report the first failure only
            log.warning("could not save %s: %s", self.path.name, e.strerror or first_line(e))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, but each file is written beside its name and renamed into place.

    A full disk or a kill while saving leaves the previous checkpoint whole instead
    of a truncated one that ``--resume`` cannot read.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        buffer = io.BytesIO()  # serialised first: torch's zip writer would report a full disk as a RuntimeError
        torch.save(checkpoint, buffer)
        try:
            with atomic_path(Path(path)) as tmp, tmp.open("wb") as f:
                f.write(buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(path)) from e  # name the checkpoint, not the temporary file
