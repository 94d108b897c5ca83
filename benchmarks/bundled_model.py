"""Held-out accuracy of the bundled model on each image set it promises, generated from seeds never used in training.

The sets (``van_app.synthetic.HELD_OUT``): ``held-out``, the training
distribution (cluttered and plain backgrounds, objects from a quarter of the
frame to filling it, frames from 3:4 to 4:3); ``clean``, one solid shape of
usual size on a plain background; ``filling``, the shape filling most of a
square frame on a plain background; ``filling 4:3``, the same in a 4:3 picture.
Images go through the model's own evaluation preprocessing (what
``van_app.predict`` does), generated and preprocessed by DataLoader workers.
Set ``i`` is drawn from seed ``--seed + i``; the bundled model trained on seed 0.

Run: ``python benchmarks/bundled_model.py --model checkpoints/van-b0-shapes --per-class 500``
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from van_app import load_model
from van_app.predict import data_config, eval_transform
from van_app.synthetic import HELD_OUT, SHAPES, Scene, generate


class HeldOutSet(Dataset):
    """``per_class`` images of each shape for one scene, size and seed, preprocessed as the model expects."""

    def __init__(self, scene: Scene, size: int, seed: int, per_class: int, transform: Callable) -> None:
        self.scene, self.size, self.seed, self.per_class, self.transform = scene, size, seed, per_class, transform

    def __len__(self) -> int:
        return self.per_class * len(SHAPES)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        label, index = i % len(SHAPES), i // len(SHAPES)
        sample = generate(SHAPES[label], index, self.size, self.seed, self.scene)
        return self.transform(Image.fromarray(sample.image)), label


def evaluate(model: torch.nn.Module, data: HeldOutSet, batch_size: int, workers: int) -> torch.Tensor:
    """The (true, predicted) confusion counts of ``model`` over ``data``, rows indexed by ``SHAPES``."""
    param = next(model.parameters())
    order = [model.labels.index(shape) for shape in SHAPES]  # model output index of each SHAPES entry
    confusion = torch.zeros(len(SHAPES), len(SHAPES), dtype=torch.long)
    with torch.inference_mode():
        for x, y in DataLoader(data, batch_size=batch_size, num_workers=workers):
            predicted = model(x.to(param.device, param.dtype))[:, order].argmax(1).cpu()
            confusion += torch.bincount(y * len(SHAPES) + predicted, minlength=len(SHAPES) ** 2).view_as(confusion)
    return confusion


def main() -> None:
    """Measure every set and print one line per set; ``--json`` also writes the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="checkpoints/van-b0-shapes", help="anything load_model accepts")
    parser.add_argument("--per-class", type=int, default=100, help="images per class and set")
    parser.add_argument("--seed", type=int, default=101, help="seed of the first set; set i uses seed + i")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="generating processes")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.model).to(device)
    cfg = data_config(model)
    print(f"# {args.model}: input {cfg['input_size'][-1]} px, crop_mode {cfg.get('crop_mode', 'center')}, "
          f"{args.per_class} images per class and set, on {device}")
    results = {}
    for i, (name, (scene, size)) in enumerate(HELD_OUT.items()):
        started = time.perf_counter()
        data = HeldOutSet(scene, size, args.seed + i, args.per_class, eval_transform(model))
        confusion = evaluate(model, data, args.batch_size, args.workers)
        per_class = (confusion.diag() / confusion.sum(1)).tolist()
        accuracy = confusion.diag().sum().item() / len(data)
        results[name] = dict(accuracy=accuracy, images=len(data), seed=args.seed + i, size=size,
                             per_class=dict(zip(SHAPES, per_class)), confusion=confusion.tolist())
        worst = min(range(len(SHAPES)), key=per_class.__getitem__)
        print(f"{name:<12} top-1 {accuracy:.4f} on {len(data):>5} images (seed {args.seed + i}, {size} px)  "
              f"worst class {SHAPES[worst]} {per_class[worst]:.3f}  [{time.perf_counter() - started:.1f} s]")
    if args.json:
        args.json.write_text(json.dumps(dict(model=str(args.model), sets=results), indent=2) + "\n")


if __name__ == "__main__":
    main()
