"""Training throughput: VanClassifier under Lightning vs a plain PyTorch loop, data loading per worker count,
and (with CUDA) bf16-mixed + channels-last vs fp32.

Both training loops run the same model, recipe (AdamW groups, warm-up + cosine per step, label smoothing) and
in-memory batches, so the difference is the framework's overhead. Each measurement burns in, then times a fixed
number of optimizer steps. Run: ``python benchmarks/train.py`` (add ``--help`` for sizes).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import resolve_data_config
from torch.utils.data import DataLoader, TensorDataset

from van_app.config import DataConfig
from van_app.data import VanDataModule
from van_app.variants import VARIANTS
from van_app.module import VanClassifier, WarmupCosine, parameter_groups
from van_app.weights import load_model


def synthetic_batches(steps: int, batch_size: int, img_size: int, classes: int) -> list[tuple[torch.Tensor, ...]]:
    """``steps`` fixed random batches of normalised images and labels."""
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch_size, 3, img_size, img_size, generator=g),
             torch.randint(0, classes, (batch_size,), generator=g)) for _ in range(steps)]


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so wall-clock time covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_loop(args: argparse.Namespace, batches: list, device: torch.device, *, bf16: bool = False,
               channels_last: bool = False) -> float:
    """Images/s of a hand-written training loop with the module's recipe."""
    torch.manual_seed(0)
    model = load_model(args.model, num_classes=args.classes).to(device).train()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    optimizer = torch.optim.AdamW(parameter_groups(model, 5e-4, 0.05))
    total = len(batches)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, WarmupCosine(total // 10, total, 0.01))
    started = 0.0
    for step, (x, y) in enumerate(batches):
        if step == args.burn_in:
            sync(device)
            started = time.perf_counter()
        x, y = x.to(device, non_blocking=True).to(memory_format=memory_format), y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        (logits.argmax(-1) == y).float().mean()
    sync(device)
    return (total - args.burn_in) * args.batch_size / (time.perf_counter() - started)


class StepTimer(L.Callback):
    """Wall time from the first timed batch to the end of training."""

    def __init__(self, burn_in: int) -> None:
        self.burn_in, self.started, self.elapsed = burn_in, 0.0, 0.0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if batch_idx == self.burn_in:
            sync(pl_module.device)
            self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sync(pl_module.device)
        self.elapsed = time.perf_counter() - self.started


def lightning_loop(args: argparse.Namespace, batches: list, device: torch.device, precision: str = "32") -> float:
    """Images/s of VanClassifier under a Lightning Trainer (no checkpoints, loggers or progress bar)."""
    torch.manual_seed(0)
    model = load_model(args.model, num_classes=args.classes)
    module = VanClassifier(model, [f"c{i}" for i in range(args.classes)], {"lr": 5e-4, "warmup_epochs": 0.1})
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size, shuffle=False)
    timer = StepTimer(args.burn_in)
    trainer = L.Trainer(max_epochs=1, accelerator=device.type, devices=1, precision=precision, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[timer], num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=loader)
    return (len(batches) - args.burn_in) * args.batch_size / timer.elapsed


def make_image_folder(root: Path, images: int, size: int) -> Path:
    """``images`` random JPEGs of ``size`` px in two class folders."""
    rng = np.random.default_rng(0)
    for i in range(images):
        folder = root / f"class_{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.jpg", quality=90)
    return root


def loading_rate(data: Path, args: argparse.Namespace, workers: int) -> float:
    """Images/s of one pass over the augmented training loader with ``workers`` worker processes."""
    model = load_model(args.model, num_classes=2)
    model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(3, args.img_size, args.img_size))
    config = DataConfig(data_dir=data, batch_size=args.batch_size, workers=workers)
    dm = VanDataModule(config, resolve_data_config(model=model), progress=False)
    dm.prepare_data()
    dm.setup("fit")
    loader = dm.train_dataloader()
    iterator = iter(loader)
    next(iterator)  # start-up of the worker processes is not throughput
    started, count = time.perf_counter(), 0
    for x, _ in iterator:
        count += len(x)
    return count / (time.perf_counter() - started)


def main() -> None:
    """Run every measurement once and print figures and ratios."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    cuda = torch.cuda.is_available()
    parser.add_argument("--model", default="van_b0", choices=list(VARIANTS))
    parser.add_argument("--img-size", type=int, default=224 if cuda else 96)
    parser.add_argument("--batch-size", type=int, default=64 if cuda else 16)
    parser.add_argument("--steps", type=int, default=60 if cuda else 25, help="optimizer steps per measurement")
    parser.add_argument("--burn-in", type=int, default=10 if cuda else 5)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--images", type=int, default=512 if cuda else 192, help="images in the loading benchmark")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2, 4])
    parser.add_argument("--source-size", type=int, default=320, help="side of the generated JPEGs")
    args = parser.parse_args()
    for hint in (".*no `val_dataloader`.*", ".*does not have many workers.*", ".*treespec.*"):
        warnings.filterwarnings("ignore", hint)
    device = torch.device("cuda" if cuda else "cpu")
    hardware = torch.cuda.get_device_name() if cuda else f"{platform.processor() or platform.machine()}"
    print(f"# {args.model}, {args.img_size}px, batch {args.batch_size}, {args.steps - args.burn_in} timed steps; "
          f"{hardware}; {os.cpu_count()} CPUs, torch {torch.__version__}, lightning {L.__version__}")

    batches = synthetic_batches(args.steps, args.batch_size, args.img_size, args.classes)
    plain = plain_loop(args, batches, device)
    lit = lightning_loop(args, batches, device)
    print(f"train fp32   plain PyTorch   {plain:8.1f} img/s")
    print(f"train fp32   Lightning       {lit:8.1f} img/s   overhead {100 * (plain / lit - 1):+.1f}%")
    if cuda:
        fast = plain_loop(args, batches, device, bf16=True, channels_last=True)
        lit_bf16 = lightning_loop(args, batches, device, precision="bf16-mixed")
        print(f"train bf16-mixed + channels-last (plain)  {fast:8.1f} img/s   x{fast / plain:.2f} vs fp32")
        print(f"train bf16-mixed Lightning                {lit_bf16:8.1f} img/s   x{lit_bf16 / lit:.2f} vs fp32")

    with tempfile.TemporaryDirectory() as tmp:
        data = make_image_folder(Path(tmp), args.images, args.source_size)
        base = None
        for workers in args.workers:
            rate = loading_rate(data, args, workers)
            base = base or rate
            print(f"data loading {workers} workers  {rate:8.1f} img/s   x{rate / base:.2f} vs {args.workers[0]} workers")


if __name__ == "__main__":
    main()
