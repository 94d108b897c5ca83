"""Images per second of ``van-predict``'s batched path against a plain loop over ``van_app.predict``.

Both classify the same photo-sized JPEGs with the same weights, in one run: the
loop opens each file and calls ``predict`` on the eager model, as a user's script
would; ``predict_files`` decodes in worker processes and runs the fused model on
batches. Each candidate gets a warm-up pass, then ``--rounds`` timed passes
taken in turns; the best round counts. The top-1 labels of both are compared.

    python benchmarks/predict.py --model checkpoints/van-b0-shapes --images 96
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import van_app
from van_app.batch import predict_files
from van_app.config import default_threads, default_workers
from van_app.synthetic import SHAPES, generate


def photos(folder: Path, count: int, size: tuple[int, int]) -> list[Path]:
    """``count`` JPEGs of generated shapes scaled up to ``size``, as a phone would give them."""
    paths = []
    for i in range(count):
        sample = generate(SHAPES[i % len(SHAPES)], i, 96, seed=99)
        path = folder / f"{i:04d}.jpg"
        Image.fromarray(sample.image).resize(size, Image.BICUBIC).save(path, quality=90)
        paths.append(path)
    return paths


def timed(run: Callable[[], list[str]], rounds: int) -> tuple[float, list[str]]:
    """The best wall time of ``rounds`` calls of ``run`` (after one untimed call) and its answers."""
    answers = run()
    best = float("inf")
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - started)
    return best, answers


def main() -> None:
    """Measure both paths and print images/s and the ratio."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="checkpoints/van-b0-shapes", help="anything load_model accepts")
    parser.add_argument("--images", type=int, default=96)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = van_app.load_model(args.model)
    fused = van_app.fuse(model)
    with tempfile.TemporaryDirectory() as tmp:
        paths = photos(Path(tmp), args.images, (args.width, args.height))

        def loop() -> list[str]:
            return [next(iter(van_app.predict(model, Image.open(p), k=1))) for p in paths]

        def batched() -> list[str]:
            return [p.label for p in predict_files(fused, paths, k=1, batch_size=args.batch_size,
                                                   workers=args.workers, progress=False)]

        loop_s, loop_labels = timed(loop, args.rounds)
        batch_s, batch_labels = timed(batched, args.rounds)
    agree = np.mean([a == b for a, b in zip(loop_labels, batch_labels)])
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
          f"{args.workers} workers; {args.images} JPEGs of {args.width}x{args.height}, model input "
          f"{model.pretrained_cfg['input_size'][-1]} px")
    print(f"plain loop over van_app.predict: {args.images / loop_s:7.1f} img/s")
    print(f"van-predict (predict_files):     {args.images / batch_s:7.1f} img/s  ({loop_s / batch_s:.2f}x)")
    print(f"top-1 agreement: {agree:.3f}")


if __name__ == "__main__":
    main()
