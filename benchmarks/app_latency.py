"""Latency of the app's prediction path, in one run: in-process, end-to-end over HTTP, and under 8 concurrent clients.

Prints p50/p95 of (1) the prediction alone (``predict`` on the fused model), (2) the
prediction with every heatmap and overlay the page shows (``analyse`` + one overlay per
stage and the combined map), (3) the class map, (4) ``/predict`` end to end through
gradio_client against the app served on a local port (in this process, as ``app.py``
builds it), and requests per second with N concurrent clients (none may fail).
Usage: ``python benchmarks/app_latency.py``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    """Command line: model, image size, repetitions and concurrency."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="van_b0", help="anything load_model accepts")
    parser.add_argument("--width", type=int, default=640, help="test image width (the model sees 224 px)")
    parser.add_argument("--height", type=int, default=480, help="test image height")
    parser.add_argument("--runs", type=int, default=30, help="timed repetitions per in-process measurement")
    parser.add_argument("--warmup", type=int, default=5, help="untimed repetitions first")
    parser.add_argument("--http-runs", type=int, default=20, help="timed end-to-end requests")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients for the throughput test")
    parser.add_argument("--requests", type=int, default=4, help="requests per concurrent client")
    parser.add_argument("--http", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure through the served app")
    return parser.parse_args()


def cpu_name() -> str:
    """The CPU model as lscpu reports it."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


def test_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-sized picture: noisy gradient background and an off-centre disc."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(40, 160, width)[None, :, None] * np.ones((height, 1, 3))
    image = Image.fromarray(np.clip(ramp + rng.normal(0, 10, ramp.shape), 0, 255).astype(np.uint8))
    ImageDraw.Draw(image).ellipse((width * 0.1, height * 0.2, width * 0.45, height * 0.7), fill=(230, 190, 40))
    return image


def timed(*fns: Callable[[], object], runs: int, warmup: int) -> list[list[float]]:
    """Seconds per call of each of ``fns``, called in turn (so load changes hit all alike), after a warm-up."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return times


def summary(name: str, times: list[float]) -> str:
    """``name: p50 .. ms, p95 .. ms``."""
    p95 = float(np.percentile(times, 95))
    return f"{name:<42} p50 {1000 * statistics.median(times):7.1f} ms   p95 {1000 * p95:7.1f} ms   (n={len(times)})"


def realistic(model: torch.nn.Module, batches: int = 4) -> torch.nn.Module:
    """``model`` with BatchNorm statistics measured on random images (random init alone drives
    activations into denormal floats, which makes CPU timings meaningless)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None
    model.train()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(4, 3, 224, 224, generator=generator))
    return model.eval()


def export_for_app(model: torch.nn.Module, folder: Path) -> Path:
    """``model`` as a van_app export directory (config.json + model.safetensors) the app can load."""
    from safetensors.torch import save_file

    from van_app.export import RunInfo, export_config
    from van_app.files import EXPORT_CONFIG, EXPORT_WEIGHTS, write_json
    from van_app.predict import data_config

    run = RunInfo("random images", {}, {}, "benchmarks/app_latency.py")
    write_json(folder / EXPORT_CONFIG, export_config(model, model.labels, data_config(model), run))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / EXPORT_WEIGHTS))
    return folder


def in_process(args: argparse.Namespace, source: str, image: Image.Image) -> None:
    """Print the in-process timings: prediction alone, prediction with all heatmaps, class map."""
    from van_app import fuse, load_model, predict
    from van_app.explain import ClassMapCache, analyse, class_maps, overlay

    model = load_model(source)
    fused = fuse(model)

    def with_heatmaps() -> None:
        analysis = analyse(fused, image)
        for heatmap in analysis.maps:
            overlay(image, heatmap, analysis.geometry)

    plain, full = timed(lambda: predict(fused, image), with_heatmaps, runs=args.runs, warmup=args.warmup)
    print(summary("prediction alone (fused, inference_mode)", plain))
    print(summary("prediction + 5 heatmaps + overlays", full))
    print(f"{'heatmap overhead (p50)':<42} {100 * (statistics.median(full) / statistics.median(plain) - 1):+.0f} %")
    (fresh,) = timed(lambda: class_maps(model, image, 0), runs=max(3, args.runs // 3), warmup=1)
    print(summary("class map (own pass with gradients)", fresh))
    cache = ClassMapCache(model)
    cache(image, 0)
    (cached,) = timed(lambda: cache(image, 0), runs=args.runs, warmup=1)
    print(summary("class map, cached", cached))


def over_http(args: argparse.Namespace, source: str, image: Image.Image) -> None:
    """Serve the app and print end-to-end latency and concurrent throughput through gradio_client."""
    from gradio_client import Client, handle_file

    from van_app.ui import build_demo, launch_options

    demo = build_demo(source, root=ROOT)
    demo.launch(**dict(launch_options(), server_name="127.0.0.1", server_port=None), prevent_thread_lock=True,
                quiet=True)
    url = demo.local_url
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "bench.jpg"
            image.save(path, quality=90)
            client = Client(url, verbose=False)
            send = lambda c=client: c.predict(handle_file(str(path)), api_name="/predict")  # noqa: E731
            (end_to_end,) = timed(send, runs=args.http_runs, warmup=2)
            print(summary("end to end via gradio_client (/predict)", end_to_end))
            # each client uploads its own image, as different users do: gradio rewrites content-addressed
            # cache files non-atomically, so byte-identical concurrent outputs can race each other
            clients = [Client(url, verbose=False) for _ in range(args.clients)]
            failures: list[str] = []
            for i in range(args.clients):
                test_image(args.width, args.height, seed=i + 1).save(Path(tmp) / f"client{i}.jpg", quality=90)

            def worker(i: int) -> None:
                for _ in range(args.requests):
                    try:
                        labels, gallery = clients[i].predict(handle_file(str(Path(tmp) / f"client{i}.jpg")),
                                                             api_name="/predict")
                        if len(gallery) != 5 or not labels["confidences"]:
                            failures.append("incomplete answer")
                    except Exception as e:  # any failed request counts, whatever its kind
                        failures.append(f"{type(e).__name__}: {e}")

            threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.clients)]
            start = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            elapsed = time.perf_counter() - start
            total = args.clients * args.requests
            print(f"{f'{args.clients} concurrent clients':<42} {total / elapsed:7.2f} requests/s   "
                  f"{len(failures)} of {total} failed" + (f" (first: {failures[0]})" if failures else ""))
    finally:
        demo.close()


def main() -> None:
    """Run every measurement and print them with the machine they ran on."""
    from van_app import load_model
    from van_app.variants import VARIANTS

    args = parse_args()
    image = test_image(args.width, args.height)
    print(f"{args.model} at 224 px on CPU: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), load average {os.getloadavg()[0]:.1f}; "
          f"test image {args.width}x{args.height}")
    with tempfile.TemporaryDirectory() as tmp:
        source = args.model
        if source in VARIANTS:
            source = str(export_for_app(realistic(load_model(source)), Path(tmp)))
            print(f"random {args.model} weights with BatchNorm statistics measured on random images")
        # gradio runs handlers in worker threads; torch's CPU thread pool behaves differently there than in the
        # main thread (much slower on a busy machine), so the in-process figures are measured the same way
        worker = threading.Thread(target=in_process, args=(args, source, image))
        worker.start()
        worker.join()
        if args.http:
            over_http(args, source, image)


if __name__ == "__main__":
    main()
