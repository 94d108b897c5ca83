"""Inference speed of VAN: official-style eager vs our model, fused, channels-last, compiled, bf16.

Every figure of one (variant, device, batch) comes from the same run: each
candidate gets a burn-in, then ``--rounds`` timed loops of ``--iters`` forward
passes, interleaved across candidates so that load from other processes hits all
of them alike; the best round counts. FLOPs are counted once with
``FlopCounterMode`` (convolutions and matmuls) and set against an estimated peak.

    python benchmarks/inference.py --variants van_b0 van_b2 --batch 1 8
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import van_app
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


def time_candidates(
    candidates: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]],
    device: torch.device,
    burn_in: int,
    iters: int,
    rounds: int,
) -> dict[str, list[float]]:
    """Seconds per forward pass of each candidate, one entry per round, rounds interleaved."""
    with torch.inference_mode():
        for fn, x in candidates.values():
            for _ in range(burn_in):
                fn(x)
        sync(device)
        times: dict[str, list[float]] = {name: [] for name in candidates}
        for _ in range(rounds):
            for name, (fn, x) in candidates.items():
                sync(device)
                start = time.perf_counter()
                for _ in range(iters):
                    fn(x)
                sync(device)
                times[name].append((time.perf_counter() - start) / iters)
    return times


def top1_agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of rows whose argmax agrees."""
    return (a.argmax(-1) == b.argmax(-1)).float().mean().item()


def bench(source: str, device: torch.device, batch: int, args: argparse.Namespace, peak: float | None) -> None:
    """Build every candidate for one variant and batch size, check them, time them and print a table."""
    torch.manual_seed(0)
    plain = van_app.load_model(source).to(device)
    x = torch.randn(batch, 3, args.size, args.size, device=device)
    candidates = {
        "official-style eager": OfficialStyleVAN(plain).eval(),
        "ours eager": plain,
        "fused eager NCHW": van_app.fuse(plain, channels_last=False),
        "fused eager channels-last": van_app.fuse(plain),
    }
    compile_seconds = {}
    if args.compile:
        for name, channels_last in (("fused compiled NCHW", False), ("fused compiled channels-last", True)):
            eager = van_app.fuse(plain, channels_last=channels_last)
            start = time.perf_counter()
            compiled = compile_for_inference(eager, tuple(x.shape), max_autotune=args.max_autotune)
            compile_seconds[name] = time.perf_counter() - start
            if compiled is not eager:
                candidates[name] = compiled
    use_bf16 = args.bf16 if args.bf16 is not None else native_bf16(device)
    if use_bf16:
        for name, channels_last in (("fused bf16 NCHW", False), ("fused bf16 channels-last", True)):
            candidates[name] = van_app.fuse(plain, channels_last=channels_last).to(torch.bfloat16)
        if args.compile:
            eager = van_app.fuse(plain).to(torch.bfloat16)
            compiled = compile_for_inference(eager, tuple(x.shape), max_autotune=args.max_autotune)
            if compiled is not eager:
                candidates["fused compiled bf16 channels-last"] = compiled
    inputs = {name: x.bfloat16() if "bf16" in name else x for name in candidates}

    with torch.inference_mode():
        reference = plain(x)
        outputs = {name: model(inputs[name]).float() for name, model in candidates.items()}
        for name, out in outputs.items():
            if not torch.isfinite(out).all():
                raise SystemExit(f"{source}: {name} produced non-finite outputs")
            tol = 5e-2 if "bf16" in name else 1e-3
            err = (out - reference).abs().max().item()
            if err > tol:
                raise SystemExit(f"{source}: {name} differs from ours eager by {err:.3g}")

    flops = count_flops(plain, x)
    times = time_candidates({name: (model, inputs[name]) for name, model in candidates.items()},
                            device, args.burn_in, args.iters, args.rounds)
    base = min(times["official-style eager"])
    print(f"\n{source} on {device.type}, batch {batch}, {args.size} px: {flops / 1e9 / batch:.2f} GFLOP per image")
    for name, seconds in compile_seconds.items():
        status = "" if name in candidates else " (failed, eager fallback not timed)"
        print(f"  compile + warm-up of {name}: {seconds:.1f} s{status}")
    print(f"  {'candidate':34} {'best ms':>9} {'median ms':>10} {'img/s':>8} {'GFLOP/s':>8} {'% peak':>7} {'speed-up':>9}")
    for name, seconds in times.items():
        best = min(seconds)
        gflops = flops / best / 1e9
        share = f"{100 * gflops / peak:6.1f}%" if peak else "    n/a"
        print(f"  {name:34} {best * 1e3:9.2f} {statistics.median(seconds) * 1e3:10.2f} {batch / best:8.1f} "
              f"{gflops:8.1f} {share:>7} {base / best:8.2f}x")
    for name, out in outputs.items():
        if "bf16" in name:
            print(f"  {name}: top-1 agreement with fp32 {100 * top1_agreement(out, reference):.1f}% "
                  f"on this batch, max |logit difference| {(out - reference).abs().max().item():.3g}")


def parse_args() -> argparse.Namespace:
    """Command-line options; every one has a working default."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["van_b0", "van_b2"],
                        help="variant names or anything van_app.load_model accepts")
    parser.add_argument("--batch", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--iters", type=int, default=20, help="forward passes per timed round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds; the best counts")
    parser.add_argument("--burn-in", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                        help="also time the inductor-compiled fused model (weight freezing)")
    parser.add_argument("--max-autotune", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="time bf16 (default: only where the device has native bf16)")
    parser.add_argument("--fma-units", type=int, default=2, help="FMA units per core, for the CPU peak estimate")
    return parser.parse_args()


def main() -> None:
    """Run every (variant, device, batch) benchmark and print the figures."""
    args = parse_args()
    torch.set_num_threads(args.threads)
    peak, how = cpu_peak_gflops(args.threads, args.fma_units)
    print(f"torch {torch.__version__}, {cpu_model()}, {args.threads} threads")
    print(f"CPU peak estimate: {how}")
    print(f"native bf16: cpu {native_bf16('cpu')}" + (f", cuda {native_bf16('cuda')}" if torch.cuda.is_available() else ""))
    for device in map(torch.device, args.devices):
        if device.type == "cuda":
            print(f"GPU: {torch.cuda.get_device_name(device)}")
        for source in args.variants:
            for batch in args.batch:
                bench(source, device, batch, args, peak if device.type == "cpu" else None)


if __name__ == "__main__":
    main()
