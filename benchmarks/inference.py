"""Inference speed of VAN, every engine side by side: the official model in eager PyTorch, ONNX Runtime and OpenVINO
on its ONNX export, and ours (``van_app.fuse``), with the folded eager model and (``--compile``) inductor.

What a user would pick instead of ours is ONNX Runtime or OpenVINO on an ONNX export of
the official model: it is exported as the export docs say
(``torch.onnx.export(model, (x,), path, opset_version=18, dynamo=False)``, a static
graph for each batch size), ONNX Runtime gets ``--threads`` intra-op threads and one
inter-op thread, OpenVINO ``INFERENCE_NUM_THREADS`` with the LATENCY hint and f32
precision, and torch the same thread count. "ours" is what ``fuse(model)`` returns,
called as ``predict`` calls it; "ours + maps + evidence" is the pass the app makes
(``forward_with_maps``: logits, every block's map and the evidence for the predicted
class, one image per graph call). Every output is checked
against the official model's (1e-4) before timing.

Every figure of one (variant, batch, threads) comes from the same run: each
candidate gets a burn-in, then ``--rounds`` timed loops of about ``--round-seconds``,
interleaved across candidates so that load from other processes hits all of them
alike; the best round counts. FLOPs are counted once with ``FlopCounterMode``
(convolutions and matmuls) and set against an estimated peak.

    python benchmarks/inference.py --variants van_b0 van_b2 --batch 1 8 --threads 1 2
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import van_app
from van_app.engines import installed_engines
from van_app.fuse import compile_for_inference, native_bf16


# An independent re-implementation of the official forward pass (VAN-Classification,
# models/van.py) over our weights: the clones, unsqueezed layer scales, token-layout
# LayerNorm and module nesting are kept, since they are what its speed is made of.
class _OfficialLKA(nn.Module):
    def __init__(self, lka: nn.Module) -> None:
        super().__init__()
        self.conv0, self.conv_spatial, self.conv1 = lka.conv0, lka.conv_spatial, lka.conv1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x.clone()
        attn = self.conv0(x)
        attn = self.conv_spatial(attn)
        attn = self.conv1(attn)
        return u * attn


class _OfficialAttention(nn.Module):
    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.proj_1 = attn.proj_1
        self.activation = nn.GELU()
        self.spatial_gating_unit = _OfficialLKA(attn.lka)
        self.proj_2 = attn.proj_2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x.clone()
        x = self.proj_1(x)
        x = self.activation(x)
        x = self.spatial_gating_unit(x)
        x = self.proj_2(x)
        return x + shortcut


class _OfficialDWConv(nn.Module):
    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.dwconv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dwconv(x)


class _OfficialMlp(nn.Module):
    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.fc1 = mlp.fc1
        self.dwconv = _OfficialDWConv(mlp.dwconv)
        self.act = nn.GELU()
        self.fc2 = mlp.fc2
        self.drop = nn.Dropout(0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        x = self.dwconv(x)
        x = self.act(x)
        x = self.drop(x)
        x = self.fc2(x)
        return self.drop(x)


class _OfficialBlock(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.norm1 = block.norm1
        self.attn = _OfficialAttention(block.attn)
        self.drop_path = nn.Identity()
        self.norm2 = block.norm2
        self.mlp = _OfficialMlp(block.mlp)
        self.layer_scale_1 = block.layer_scale_1
        self.layer_scale_2 = block.layer_scale_2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.layer_scale_1.unsqueeze(-1).unsqueeze(-1) * self.attn(self.norm1(x)))
        return x + self.drop_path(self.layer_scale_2.unsqueeze(-1).unsqueeze(-1) * self.mlp(self.norm2(x)))


class _OfficialPatchEmbed(nn.Module):
    def __init__(self, patch_embed: nn.Module) -> None:
        super().__init__()
        self.proj, self.norm = patch_embed.proj, patch_embed.norm

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int, int]:
        x = self.proj(x)
        _, _, h, w = x.shape
        return self.norm(x), h, w


class OfficialStyleVAN(nn.Module):
    """The official VAN forward pass over the weights of one of our (unfused) VANs."""

    def __init__(self, van: nn.Module) -> None:
        super().__init__()
        self.num_stages = len(van.stages)
        for i, stage in enumerate(van.stages):
            norm = nn.LayerNorm(stage.norm.normalized_shape, eps=stage.norm.eps)
            norm.weight, norm.bias = stage.norm.weight, stage.norm.bias
            setattr(self, f"patch_embed{i + 1}", _OfficialPatchEmbed(stage.patch_embed))
            setattr(self, f"block{i + 1}", nn.ModuleList(_OfficialBlock(b) for b in stage.blocks))
            setattr(self, f"norm{i + 1}", norm)
        self.head = van.head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        for i in range(self.num_stages):
            x, h, w = getattr(self, f"patch_embed{i + 1}")(x)
            for blk in getattr(self, f"block{i + 1}"):
                x = blk(x)
            x = x.flatten(2).transpose(1, 2)
            x = getattr(self, f"norm{i + 1}")(x)
            if i != self.num_stages - 1:
                x = x.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
        return self.head(x.mean(dim=1))


def cpu_model() -> str:
    """The CPU's model name as the kernel reports it."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def cpu_peak_gflops(threads: int, fma_units: int) -> tuple[float, str]:
    """Estimated fp32 peak of ``threads`` cores, with the formula used."""
    mhz = 0.0
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        mhz = max((float(line.split(":")[1]) for line in cpuinfo.read_text().splitlines()
                   if line.startswith("cpu MHz")), default=0.0)
    capabilities = getattr(torch.cpu, "get_capabilities", dict)()
    lanes = 16 if capabilities.get("avx512_f") else 8 if capabilities.get("avx2") else 4
    per_cycle = lanes * 2 * fma_units
    peak = threads * mhz / 1000 * per_cycle
    how = (f"{threads} cores x {mhz / 1000:.2f} GHz x {lanes} fp32 lanes x 2 (FMA) x {fma_units} FMA units "
           f"= {peak:.0f} GFLOP/s (nominal clock, turbo ignored)")
    return peak, how


def count_flops(model: nn.Module, x: torch.Tensor) -> int:
    """FLOPs of one forward pass (convolutions and matmuls, 2 per multiply-add)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model(x)
    return counter.get_total_flops()


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so wall-clock times are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_candidates(candidates: dict[str, Callable[[], object]], device: torch.device, burn_in: int,
                    round_seconds: float, rounds: int) -> dict[str, list[float]]:
    """Seconds per call of each candidate, one entry per round, rounds interleaved; each round lasts about
    ``round_seconds`` (its number of calls comes from the burn-in)."""
    calls = {}
    with torch.inference_mode():
        for name, fn in candidates.items():
            fn()
            sync(device)
            start = time.perf_counter()
            for _ in range(burn_in):
                fn()
            sync(device)
            calls[name] = max(1, math.ceil(round_seconds * burn_in / max(time.perf_counter() - start, 1e-9)))
        times: dict[str, list[float]] = {name: [] for name in candidates}
        for _ in range(rounds):
            for name, fn in candidates.items():
                sync(device)
                start = time.perf_counter()
                for _ in range(calls[name]):
                    fn()
                sync(device)
                times[name].append((time.perf_counter() - start) / calls[name])
    return times


def onnx_of_official(official: nn.Module, x: torch.Tensor, folder: Path) -> Path:
    """The official model exported as its users would: a static graph for ``x``'s shape."""
    path = folder / f"official-{x.shape[0]}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(official, (x,), str(path), opset_version=18, dynamo=False)
    return path


def onnxruntime_candidate(path: Path, x: torch.Tensor, threads: int) -> Callable[[], list[np.ndarray]]:
    """ONNX Runtime on the file at ``path`` with ``threads`` intra-op threads, one inter-op thread."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x.numpy()}
    return lambda: session.run(None, feed)


def openvino_candidate(path: Path, x: torch.Tensor, threads: int) -> Callable[[], list[np.ndarray]]:
    """OpenVINO on the file at ``path``: ``threads`` threads, LATENCY hint, f32."""
    from van_app.engines import import_openvino

    compiled = import_openvino().Core().compile_model(str(path), "CPU", {"INFERENCE_NUM_THREADS": threads,
                                                          "PERFORMANCE_HINT": "LATENCY",
                                                          "INFERENCE_PRECISION_HINT": "f32"})
    request, feed = compiled.create_infer_request(), {0: x.numpy()}
    return lambda: [request.infer(feed)[compiled.output(0)]]


def logits_of(output: object) -> torch.Tensor:
    """The logits in whatever a candidate returns (a tensor, a list of arrays, or an ``attention.Pass``)."""
    output = getattr(output, "logits", output)
    if isinstance(output, list):
        output = output[0]
    return torch.as_tensor(np.asarray(output)).float()


def bench(source: str, device: torch.device, batch: int, threads: int, args: argparse.Namespace,
          peak: float | None, folder: Path) -> None:
    """Build every candidate for one variant, batch size and thread count, check them, time them, print a table."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    plain = realistic(van_app.load_model(source)).to(device)
    official = OfficialStyleVAN(plain).eval()
    x = torch.randn(batch, 3, args.size, args.size, device=device)
    candidates: dict[str, Callable[[], object]] = {
        "official eager (PyTorch)": lambda: official(x),
        "ours before: fold, eager": (lambda m: lambda: m(x))(van_app.fuse(plain, engine="eager")),
    }
    notes = []
    if args.compile:
        eager = van_app.fuse(plain, engine="eager")
        start = time.perf_counter()
        compiled = compile_for_inference(eager, tuple(x.shape), max_autotune=args.max_autotune)
        notes.append(f"compile + warm-up of inductor: {time.perf_counter() - start:.1f} s")
        if compiled is not eager:
            candidates["ours before: fold, inductor"] = lambda: compiled(x)
    if args.bf16:
        half = van_app.fuse(plain, engine="eager").to(torch.bfloat16)
        candidates["fold, eager bf16 (not within 1e-4)"] = lambda: half(x.bfloat16())
    if device.type == "cpu":
        exported = onnx_of_official(official, x.cpu(), folder)
        engines = {"onnxruntime": onnxruntime_candidate, "openvino": openvino_candidate}
        for name in installed_engines():
            candidates[f"{name} (official export)"] = engines[name](exported, x, threads)
        start = time.perf_counter()
        ours = van_app.fuse(plain, threads=threads)
        chosen = "eager PyTorch"
        if hasattr(ours, "warm_up"):
            ours.warm_up(maps=False, shape=tuple(x.shape))
            ours.warm_up(maps=True, shape=tuple(x.shape))
            chosen = f"{ours.runner(False, tuple(x.shape)).engine} (of {ours.engine})"
        notes.append(f"fuse(model) runs this shape on {chosen}; {time.perf_counter() - start:.1f} s to export and "
                     "check its graphs and measure the engines (once per weights and shape: then kept on disk)")
        candidates["ours: fuse(model)"] = lambda: ours(x)
        if hasattr(ours, "forward_with_maps"):
            candidates["ours + maps + evidence (app's pass)"] = lambda: ours.forward_with_maps(x)

    with torch.inference_mode():
        reference = official(x).float()
        for name, fn in candidates.items():
            out = logits_of(fn()).to(reference.device)
            err = (out - reference).abs().max().item() if torch.isfinite(out).all() else float("inf")
            if err > (5e-2 if "bf16" in name else 1e-4):
                raise SystemExit(f"{source}: {name} differs from the official model by {err:.3g}")

    flops = count_flops(plain, x)
    times = time_candidates(candidates, device, args.burn_in, args.round_seconds, args.rounds)
    base = min(times["official eager (PyTorch)"])
    engines_best = min((min(t) for n, t in times.items() if "official export" in n), default=None)
    print(f"\n{source} on {device.type}, batch {batch}, {threads} thread(s), {args.size} px: "
          f"{flops / 1e9 / batch:.2f} GFLOP per image")
    for note in notes:
        print(f"  {note}")
    print(f"  {'candidate':40} {'best ms':>9} {'median ms':>10} {'img/s':>8} {'GFLOP/s':>8} {'% peak':>7} "
          f"{'vs official':>12} {'vs best engine':>15}")
    for name, seconds in times.items():
        best = min(seconds)
        gflops = flops / best / 1e9
        share = f"{100 * gflops / peak:6.1f}%" if peak else "    n/a"
        against = f"{engines_best / best:14.2f}x" if engines_best else f"{'n/a':>15}"
        print(f"  {name:40} {best * 1e3:9.2f} {statistics.median(seconds) * 1e3:10.2f} {batch / best:8.1f} "
              f"{gflops:8.1f} {share:>7} {base / best:11.2f}x {against}")


def realistic(model: nn.Module, batches: int = 3) -> nn.Module:
    """``model`` with BatchNorm statistics measured on random batches and layer scales of trained size
    (random initialisation alone drives activations into denormal floats, which makes CPU timings meaningless)."""
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_scale" in name:
                param.uniform_(0.01, 0.1, generator=generator)
        for norm in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
            norm.reset_running_stats()
            norm.momentum = None
        model.train()
        for _ in range(batches):
            model(torch.randn(4, 3, 224, 224, generator=generator))
    return model.eval()


def parse_args() -> argparse.Namespace:
    """Command-line options; every one has a working default."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["van_b0", "van_b2"],
                        help="variant names or anything van_app.load_model accepts")
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2],
                        help="thread counts, each given to every engine alike")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--round-seconds", type=float, default=1.0, help="length of one timed round per candidate")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timed rounds; the best counts")
    parser.add_argument("--burn-in", type=int, default=3)
    parser.add_argument("--devices", nargs="+", default=["cpu"])
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=False,
                        help="also time the inductor-compiled folded model (tens of seconds to compile each shape)")
    parser.add_argument("--max-autotune", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False,
                        help="also time the folded model in bf16 (outside the 1e-4 budget)")
    parser.add_argument("--fma-units", type=int, default=2, help="FMA units per core, for the CPU peak estimate")
    return parser.parse_args()


def main() -> None:
    """Run every (variant, device, batch, threads) benchmark and print the figures."""
    args = parse_args()
    print(f"torch {torch.__version__}, {cpu_model()}; engines installed: {', '.join(installed_engines()) or 'none'}"
          + "".join(f", {name} {importlib.import_module(name).__version__}" for name in installed_engines()))
    print(f"native bf16: cpu {native_bf16('cpu')}" + (f", cuda {native_bf16('cuda')}" if torch.cuda.is_available() else ""))
    with tempfile.TemporaryDirectory() as tmp:
        # ours is built in this run: graphs exported and engines measured afresh, not taken from an earlier run's cache
        os.environ["VAN_APP_CACHE"] = str(Path(tmp) / "cache")
        for threads in args.threads:
            peak, how = cpu_peak_gflops(threads, args.fma_units)
            print(f"CPU peak estimate: {how}")
            for device in map(torch.device, args.devices):
                if device.type == "cuda":
                    print(f"GPU: {torch.cuda.get_device_name(device)}")
                for source in args.variants:
                    for batch in args.batch:
                        bench(source, device, batch, threads, args, peak if device.type == "cpu" else None, Path(tmp))


if __name__ == "__main__":
    main()
