"""Latency of the app's prediction in one run: in-process, end to end through gradio_client, under concurrent clients.

For this checkout and, with ``--before DIR``, another one (a worktree of the previous
main: ``git worktree add /tmp/serve-before <commit>``), side by side on the same image
and the same weights, each figure measured in the same run:

- in-process: the ``/predict`` handler itself (the function gradio calls: read the
  upload, one model pass with the attention maps and, before 2026-11-26, the gallery's
  overlays, which the page now draws in the event that follows), called in a process of
  that checkout's own, after its start-up model is warm;
- end to end: ``/predict`` through gradio_client against that checkout's app served on
  127.0.0.1 (``build_demo`` + ``launch`` as ``app.py`` does, launched once the start-up
  model is warm), requests to the two apps interleaved; the ratio to in-process;
- throughput: ``--clients`` concurrent gradio_client clients, each sending its own
  image ``--requests`` times (none may fail), in requests/s with per-request p50/p95;
- floors: the same round trip, alone and under the same concurrent clients, against an
  app whose handler does nothing and answers with labels alone (what ``/predict``
  answers now), and with labels and five small JPEGs (what it answered before): what
  gradio and its client cost by themselves on this machine, and what the files cost.

gradio_client opens a new HTTP connection, with a new TLS context, for every upload,
request, event stream and downloaded file, even over plain HTTP; creating each context
loads the CA bundle (about 20 ms of CPU here). ``--ssl-verify false`` measures clients
that skip it (``Client(ssl_verify=False)``, harmless on http://127.0.0.1).

    python benchmarks/app_latency.py --before /tmp/serve-before
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
REQUEST_TIMEOUT = 120  # seconds before a request under load counts as failed

# Run in a checkout's own process (PYTHONPATH=checkout): its /predict handler timed in-process, as JSON on stdout.
IN_PROCESS = """
import inspect, json, statistics, sys, threading, time, uuid
from pathlib import Path
from van_app.ui import Style, build_demo

model, image, runs, warmup = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
demo = build_demo(model, root=Path.cwd())
handler = next(f.fn for f in demo.fns.values() if f.api_name == "predict")
page = handler.args[0]
style = [Style()] if "style" in inspect.signature(handler.func).parameters else []  # checkouts before 2026-11-26
loaded = page.models.get(page.start)
if hasattr(loaded, "ready"):
    loaded.ready.wait()
upload = Path(page.uploads) / uuid.uuid4().hex / image.name
upload.parent.mkdir(parents=True)
upload.write_bytes(image.read_bytes())
payload = {"path": str(upload), "orig_name": image.name, "meta": {"_type": "gradio.FileData"}}
times = []

def measure():  # in a worker thread, as gradio runs handlers
    for i in range(warmup + runs):
        start = time.perf_counter()
        handler(payload, page.start, *style)
        if i >= warmup:
            times.append(time.perf_counter() - start)

worker = threading.Thread(target=measure)
worker.start()
worker.join()
print(json.dumps(times))
"""

# Run in a checkout's own process: its app, launched on GRADIO_SERVER_PORT once the start-up model is warm.
SERVE = """
import sys
from pathlib import Path

import matplotlib

from van_app.ui import build_demo, launch_options

matplotlib.use("agg")  # as app.py does
demo = build_demo(sys.argv[1], root=Path.cwd())
handler = next(f.fn for f in demo.fns.values() if f.api_name == "predict")
loaded = handler.args[0].models.get(handler.args[0].start)
if hasattr(loaded, "ready"):
    loaded.ready.wait()
demo.launch(**launch_options())
"""

# A floor: an app whose handler does nothing but answer with labels and, with argv[1] > 0, that many small JPEGs in
# a gallery (each request's differ: gradio's cache is content-addressed, and identical concurrent outputs race
# each other there).
FLOOR = """
import itertools
import sys

import gradio as gr
from PIL import Image

from van_app.ui import launch_options

files = int(sys.argv[1])
count = itertools.count()

def answer(_):
    n = next(count)
    labels = {"a": 0.9, "b": 0.1}
    return (labels, [(Image.new("RGB", (384, 288), (n % 256, n // 256 % 256, i)), f"map {i}")
                     for i in range(files)]) if files else labels

with gr.Blocks() as demo:
    image = gr.Image(type="filepath")
    outputs = [gr.Label()] + ([gr.Gallery(format="jpeg")] if files else [])
    gr.Button().click(answer, image, outputs, api_name="predict", preprocess=False)
demo.queue(default_concurrency_limit=2).launch(**launch_options())
"""
FLOOR_FILES = {"labels alone": 0, "labels + 5 JPEGs": 5}


def parse_args() -> argparse.Namespace:
    """Command line: model, checkouts, image size, repetitions, concurrency, client TLS."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="van_b0",
                        help="anything load_model accepts; a variant gets random weights with measured BatchNorm "
                             "statistics")
    parser.add_argument("--before", type=Path, help="another checkout to measure beside this one")
    parser.add_argument("--width", type=int, default=640, help="test image width (the model sees 224 px)")
    parser.add_argument("--height", type=int, default=480, help="test image height")
    parser.add_argument("--runs", type=int, default=30, help="timed in-process calls")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls and requests first")
    parser.add_argument("--http-runs", type=int, default=20, help="timed end-to-end requests per app")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients for the throughput test")
    parser.add_argument("--requests", type=int, default=4, help="requests per concurrent client")
    parser.add_argument("--ssl-verify", action=argparse.BooleanOptionalAction, default=True,
                        help="gradio_client's ssl_verify (its default: on, a TLS context per connection)")
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


def realistic(model, batches: int = 4):
    """``model`` with BatchNorm statistics measured on random images (random init alone drives
    activations into denormal floats, which makes CPU timings meaningless)."""
    import torch

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


def export_for_app(model, folder: Path) -> Path:
    """``model`` as a van_app export directory (config.json + model.safetensors) the app can load."""
    from safetensors.torch import save_file

    from van_app.export import RunInfo, export_config
    from van_app.files import EXPORT_CONFIG, EXPORT_WEIGHTS, write_json
    from van_app.predict import data_config

    run = RunInfo("random images", {}, {}, "benchmarks/app_latency.py")
    write_json(folder / EXPORT_CONFIG, export_config(model, model.labels, data_config(model), run))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / EXPORT_WEIGHTS))
    return folder


def summary(times: list[float]) -> str:
    """``p50 .. ms  p95 .. ms``."""
    return (f"p50 {1000 * statistics.median(times):7.1f} ms  p95 {1000 * float(np.percentile(times, 95)):7.1f} ms "
            f"(n={len(times)})")


def environment(tree: Path) -> dict[str, str]:
    """The environment of a process of checkout ``tree``: its package first on the path, no telemetry."""
    return dict(os.environ, PYTHONPATH=str(tree), GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1",
                PYTHONUNBUFFERED="1")


def in_process(tree: Path, model: str, image: Path, args: argparse.Namespace) -> list[float]:
    """Seconds per call of ``tree``'s /predict handler, measured in a process of its own."""
    out = subprocess.run([sys.executable, "-c", IN_PROCESS, model, str(image), str(args.runs), str(args.warmup)],
                         cwd=tree, env=environment(tree), capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"in-process run of {tree} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


class Served:
    """A script (``SERVE`` or ``FLOOR``) serving on a free local port in a process of checkout ``tree``."""

    def __init__(self, script: str, tree: Path, *script_args: str, timeout: float = 600) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = dict(environment(tree), GRADIO_SERVER_NAME="127.0.0.1", GRADIO_SERVER_PORT=str(port))
        self.process = subprocess.Popen([sys.executable, "-c", script, *script_args], cwd=tree, env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.url = f"http://127.0.0.1:{port}/"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the app of {tree} exited:\n{self.process.stderr.read()[-3000:]}")
            try:
                urllib.request.urlopen(self.url, timeout=2).close()
                return
            except OSError:
                time.sleep(0.5)
        self.close()
        raise SystemExit(f"the app of {tree} did not answer within {timeout} s")

    def close(self) -> None:
        """Stop the server and reap it."""
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def end_to_end(apps: dict[str, Served], image: Path, args: argparse.Namespace) -> dict[str, list[float]]:
    """Seconds per /predict request of each app, one client each, requests interleaved across the apps."""
    from gradio_client import Client, handle_file

    clients = {name: Client(app.url, verbose=False, ssl_verify=args.ssl_verify) for name, app in apps.items()}
    times: dict[str, list[float]] = {name: [] for name in apps}
    for i in range(args.warmup + args.http_runs):
        for name, client in clients.items():
            start = time.perf_counter()
            client.predict(handle_file(str(image)), api_name="/predict")
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    return times


def throughput(app: Served, folder: Path, args: argparse.Namespace) -> tuple[float, list[float], list[str]]:
    """Requests/s of ``args.clients`` concurrent clients, each request's seconds, and the failures."""
    from gradio_client import Client, handle_file

    # each client uploads its own image, as different users do: gradio rewrites content-addressed cache
    # files non-atomically, so byte-identical concurrent outputs can race each other
    clients = [Client(app.url, verbose=False, ssl_verify=args.ssl_verify) for _ in range(args.clients)]
    latencies: list[float] = []
    failures: list[str] = []

    def worker(i: int) -> None:
        path = handle_file(str(folder / f"client{i}.jpg"))
        for _ in range(args.requests):
            start = time.perf_counter()
            try:
                answer = clients[i].submit(path, api_name="/predict").result(timeout=REQUEST_TIMEOUT)
                labels = answer[0] if isinstance(answer, (tuple, list)) else answer  # labels, or labels + overlays
                if not labels["confidences"]:
                    failures.append("incomplete answer")
            except Exception as e:  # any failed request counts, whatever its kind
                failures.append(f"{type(e).__name__}: {e}")
            latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(args.clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return args.clients * args.requests / (time.perf_counter() - start), latencies, failures


def main() -> None:
    """Measure every checkout and print the figures side by side, with the machine they ran on."""
    import torch

    from van_app import load_model
    from van_app.variants import VARIANTS

    args = parse_args()
    trees = {"before": args.before.resolve()} if args.before else {}
    trees["after"] = ROOT
    print(f"{args.model} at 224 px on CPU: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}; test image {args.width}x{args.height} JPEG; "
          f"gradio_client ssl_verify={args.ssl_verify}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        source = args.model
        if source in VARIANTS:
            torch.manual_seed(0)
            source = str(export_for_app(realistic(load_model(source)), folder))
            print(f"random {args.model} weights with BatchNorm statistics measured on random images")
        image = folder / "bench.jpg"
        test_image(args.width, args.height).save(image, quality=90)
        for i in range(args.clients):
            test_image(args.width, args.height, seed=i + 1).save(folder / f"client{i}.jpg", quality=90)

        local = {name: in_process(tree, source, image, args) for name, tree in trees.items()}
        apps = {name: Served(SERVE, tree, source) for name, tree in trees.items()}
        try:
            remote = end_to_end(apps, image, args)
            loaded = {}
            for name, app in apps.items():
                loaded[name] = throughput(app, folder, args)
        finally:
            for app in apps.values():
                app.close()
        floors = {}
        for name, files in FLOOR_FILES.items():
            floor_app = Served(FLOOR, ROOT, str(files))
            try:
                floors[name] = (end_to_end({name: floor_app}, image, args)[name], *throughput(floor_app, folder, args))
            finally:
                floor_app.close()

    print(f"\n{'':34} " + "".join(f"{name:>44}" for name in trees))
    rows: list[tuple[str, Callable[[str], str]]] = [
        ("in-process /predict handler", lambda n: summary(local[n])),
        ("end to end via gradio_client", lambda n: summary(remote[n])),
        ("end to end / in-process (p50)",
         lambda n: f"{statistics.median(remote[n]) / statistics.median(local[n]):.2f}x"),
        (f"{args.clients} clients: requests/s", lambda n: f"{loaded[n][0]:.2f} req/s, {len(loaded[n][2])} failed"),
        (f"{args.clients} clients: per request", lambda n: summary(loaded[n][1])),
    ]
    for label, cell in rows:
        print(f"{label:34} " + "".join(f"{cell(name):>44}" for name in trees))
    for name, (alone, rate, _, failures) in floors.items():
        print(f"floor, no work, answering {name}: alone {summary(alone)}; {args.clients} clients {rate:.2f} req/s, "
              f"{len(failures)} failed")
    if "before" in trees:
        print(f"after vs before: in-process {statistics.median(local['before']) / statistics.median(local['after']):.1f}x"
              f" faster, end to end {statistics.median(remote['before']) / statistics.median(remote['after']):.1f}x"
              f" faster, throughput {loaded['after'][0] / loaded['before'][0]:.1f}x")
    for name, (_, _, failures) in loaded.items():
        if failures:
            print(f"{name}: first failure: {failures[0]}")


if __name__ == "__main__":
    main()
