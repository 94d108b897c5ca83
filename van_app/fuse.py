"""The fastest inference model this machine can run: ``fuse(model)``.

``fuse`` returns something that, called on a batch tensor, returns the same logits as
``model`` (within 1e-4) and carries its ``labels`` and ``pretrained_cfg``, so
``predict``, ``explain.analyse`` and ``van-predict`` work on it. Behind it is one of:

- ``"onnxruntime"`` / ``"openvino"``: an ``engines.EngineModel``, the folded graph
  exported to ONNX once per weights (kept in the disk cache) and run by that engine;
  it also returns the page's attention maps from the same pass;
- ``"eager"``: ``fold.fold``, the folded VAN in eager PyTorch (channels-last), where
  hooks (``capture_attention``) and gradients still work.

``engine="auto"`` (the default) measures rather than assumes: a CPU float32 model gets
an ``EngineModel`` over every installed engine, which sends each input shape to the
engine measured fastest for it on this machine; a model on another device or dtype, or
a machine without an engine (or whose engines all fail, with a warning), gets the eager
model. ``benchmarks/inference.py`` sets them all side by side with the official model.

``compile_for_inference`` is the inductor path for the eager model (kept for GPUs and
for measuring): it compiles with weight freezing and warms up, falling back to the
eager model with a warning when no compiler works.
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from .engines import EngineModel, installed_engines
from .errors import first_line
from .fold import fold

ENGINE_CHOICES = ("auto", "onnxruntime", "openvino", "eager")


def fuse(model: nn.Module, *, engine: str = "auto", threads: int | None = None,
         channels_last: bool = True) -> nn.Module | EngineModel:
    """The fastest inference model for ``model`` (a VAN, left untouched) that this machine runs; see the module doc.

    ``engine`` forces one of ``ENGINE_CHOICES`` (a forced engine that cannot be built
    raises); ``threads`` (default: torch's) is what an ONNX engine may use per call;
    ``channels_last`` is the eager model's weight layout.
    """
    if engine not in ENGINE_CHOICES:
        raise ValueError(f"engine must be one of {', '.join(ENGINE_CHOICES)}, got {engine!r}")
    if not isinstance(getattr(model, "stages", None), nn.Sequential):
        raise TypeError(f"fuse expects a VAN (with .stages), got {type(model).__name__}")
    if engine == "eager":
        return fold(model, channels_last=channels_last)
    threads = threads or torch.get_num_threads()
    if engine != "auto":
        forced = EngineModel(model, [engine], threads)
        forced.warm_up(maps=False)
        return forced
    param = next(model.parameters())
    engines = installed_engines()
    if param.device.type != "cpu" or param.dtype != torch.float32 or not engines:
        return fold(model, channels_last=channels_last)
    try:
        served = EngineModel(model, engines, threads)
        served.warm_up(maps=False)
        return served
    except Exception as failure:  # noqa: BLE001 - whatever the engines raise, the eager model still works
        warnings.warn(f"{'/'.join(engines)} failed, using the eager model: {first_line(failure)}", RuntimeWarning,
                      stacklevel=2)
        return fold(model, channels_last=channels_last)


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` computes bfloat16 natively (CPU: AVX512-BF16 or AMX; CUDA: Ampere or newer)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        capabilities = getattr(torch.cpu, "get_capabilities", dict)()
        return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))
    return False


def compile_for_inference(
    fused: nn.Module,
    input_size: Sequence[int] = (1, 3, 224, 224),
    *,
    max_autotune: bool = False,
    atol: float = 1e-3,
) -> nn.Module:
    """``fused`` compiled by inductor with weight freezing and warmed up on ``input_size``; the eager model on failure.

    Call it once at start-up: the first call compiles (tens of seconds on a small
    CPU); later calls with the same input shape (NCHW, as ``preprocess`` makes it)
    under ``torch.inference_mode`` run the compiled code; other shapes recompile
    on first use, without freezing, so warm up every shape you will serve.
    Freezing bakes the weights in as constants, so do not change them afterwards.
    The compiled outputs are checked against the eager model (``atol``) before it
    is returned. The compiled model is a copy of ``fused`` (same class and attributes,
    so ``predict`` works on it); hook-based tools such as ``capture_attention``
    belong on the eager ``fused``.
    """
    from torch._inductor import config as inductor_config  # seconds to import: only when compiling

    param = next(fused.parameters())
    example = torch.randn(*input_size, device=param.device, dtype=param.dtype)
    try:
        # A private copy, so hooks that capture_attention puts on ``fused`` never reach compiled
        # code; compiled in place, so it stays a VAN (timm's data config and ``predict`` need that).
        compiled = copy.deepcopy(fused)
        compiled.compile(dynamic=False)
        # Inductor reads these while compiling, i.e. during this first call; torch.compile's
        # ``options={"freezing": True}`` is not honoured (torch 2.14), so patch them meanwhile.
        with torch.inference_mode(), inductor_config.patch(freezing=True, max_autotune=max_autotune):
            expected = fused(example)
            got = compiled(example)
        error = (got.float() - expected.float()).abs().max().item()
        if not error <= atol:
            raise RuntimeError(f"compiled outputs differ from eager ones by {error:.3g}")
    except Exception as failure:  # noqa: BLE001 - whatever the compiler raises, the eager model still works
        warnings.warn(f"compilation failed, using the eager fused model: {first_line(failure)}", RuntimeWarning,
                      stacklevel=2)
        return fused
    return compiled
