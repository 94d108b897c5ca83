"""A VAN as an ONNX file: folded weights, dynamic batch, labels and preprocessing in its metadata.

``export_onnx(model, path)`` writes the file ONNX Runtime (or OpenVINO, or any
ONNX engine) loads: input ``image`` (batch, 3, height, width), prepared as the
metadata's ``preprocessing`` says, and output ``logits`` (batch, classes). The
batch is dynamic; height and width are fixed (by default to the preprocessing's
input size), which lets ONNX Runtime plan every layer ahead (2-5% faster than
dynamic sides). The graph is the folded model (``fold.fold`` without the eager-only
layout tricks).
With ``maps=True`` the graph takes one image (batch 1) and a second input, ``target``
(int64, (1,)): the class to explain, -1 for the predicted one. It also returns what the
page draws, from the same pass as the prediction (``attention.WithAttentionMaps``): per
block, its class-agnostic map ((1, h, w) on its stage's grid), then per stage of
``attention.CLASS_STAGES`` the evidence for that class, then the class itself
(``evidence_class``, int64 (1,)). That evidence needs
a backward pass, which ONNX has no operator for: the graph is traced with its backward
pass written out as forward operators (``make_fx``; a convolution's input gradient
becomes a convolution with the kernel flipped, or a transposed convolution where it
strides), at a fixed shape. The ``attention_maps`` and ``evidence`` metadata name those
outputs with their stage, block and stride.

Metadata (ONNX ``metadata_props``, each value a string, JSON where structured):
``labels``, ``preprocessing`` (input_size, interpolation, mean, std, crop_pct,
crop_mode), ``pretrained_cfg``, ``variant``, ``model_args``, ``attention_maps``, ``evidence``,
``format`` (``FORMAT``, raised whenever the graph or the metadata change) and
whatever the caller adds (the disk cache adds its key). ``read_metadata`` reads them back.
"""

from __future__ import annotations

import copy
import json
import threading
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from . import __version__
from .attention import CLASS_RULE, CLASS_STAGES, WithAttentionMaps, block_keys, stage_strides
from .files import atomic_path
from .fold import fold
from .predict import data_config
from .variants import default_labels

FORMAT = 3
OPSET = 18
INPUT = "image"
TARGET = "target"  # the second input of a graph with maps
TARGET_OUTPUT = "evidence_class"  # its last output
LOGITS = "logits"
# Metadata values stored as JSON (the rest are plain strings).
JSON_KEYS = ("labels", "preprocessing", "pretrained_cfg", "model_args", "attention_maps", "evidence", "format")
# torch.onnx.export keeps its state in process globals and refuses to run twice at once (two models loading in
# the app's background threads): exports take turns.
_EXPORTING = threading.Lock()


@dataclass(frozen=True)
class MapOutput:
    """One attention-map output of an exported graph: its name, where it comes from, and its stage's stride."""

    name: str
    stage: int
    block: int
    stride: int


def map_outputs(model: nn.Module) -> list[MapOutput]:
    """The attention-map outputs a ``maps=True`` export of ``model`` has, in graph order."""
    strides = stage_strides(model)
    return [MapOutput(f"attention.{s}.{b}", s, b, strides[s]) for s, b in block_keys(model)]


def evidence_outputs(model: nn.Module) -> list[dict[str, Any]]:
    """The evidence outputs a ``maps=True`` export of ``model`` has after its attention maps, in graph order."""
    strides = stage_strides(model)
    return [{"name": f"evidence.{s}", "stage": s, "stride": strides[s], "rule": CLASS_RULE, "target": TARGET_OUTPUT}
            for s in CLASS_STAGES]


def export_metadata(model: nn.Module, maps: bool) -> dict[str, str]:
    """The metadata ``export_onnx`` writes for ``model``, as strings."""
    cfg = data_config(model)
    preprocessing = {"input_size": list(cfg["input_size"]), "interpolation": cfg["interpolation"],
                     "mean": list(cfg["mean"]), "std": list(cfg["std"]), "crop_pct": cfg["crop_pct"],
                     "crop_mode": cfg.get("crop_mode", "center")}
    labels = getattr(model, "labels", None) or default_labels(model.num_classes)
    values = {
        "labels": list(labels),
        "preprocessing": preprocessing,
        "pretrained_cfg": dict(getattr(model, "pretrained_cfg", None) or {}),
        "model_args": dict(getattr(model, "model_args", None) or {}),
        "attention_maps": [asdict(m) for m in map_outputs(model)] if maps else [],
        "evidence": evidence_outputs(model) if maps else [],
        "format": FORMAT,
    }
    text = {key: json.dumps(value, default=list) for key, value in values.items()}
    return text | {"variant": str(getattr(model, "variant", "") or ""), "producer": f"van_app {__version__}"}


def export_onnx(model: nn.Module, path: str | Path, *, maps: bool = False, size: tuple[int, int] | None = None,
                opset: int = OPSET, metadata: dict[str, str] | None = None) -> Path:
    """Write ``model`` (a VAN, folded or not) to ``path`` as ONNX, atomically; the path.

    The input's (height, width) is ``size`` (default: the preprocessing's); the batch is
    dynamic, or 1 with ``maps``, when the graph also takes the class to explain (``TARGET``,
    -1 for the predicted one) and returns after the logits each block's attention map, the
    evidence for that class and the class (``TARGET_OUTPUT``). The file's metadata
    holds the labels and preprocessing (see the module docstring), plus ``metadata``.
    """
    path = Path(path)
    folded = fold(model, channels_last=False, prepad=False).to("cpu", torch.float32)
    size = tuple(size or data_config(model)["input_size"][-2:])
    if maps:
        examples = (torch.zeros(1, 3, *size), torch.full((1,), -1, dtype=torch.int64))
        graph = with_backward_written_out(WithAttentionMaps(folded), examples)
        inputs = [INPUT, TARGET]
        names = [m.name for m in map_outputs(model)] + [e["name"] for e in evidence_outputs(model)] + [TARGET_OUTPUT]
        dynamic = None
    else:
        examples, graph, inputs, names = (torch.zeros(2, 3, *size),), folded, [INPUT], []
        dynamic = {name: {0: "batch"} for name in (INPUT, LOGITS)}
    with atomic_path(path) as tmp:
        with _EXPORTING, warnings.catch_warnings():
            # The TorchScript exporter announces its own deprecation and the shape inference it runs; neither
            # concerns the file written.
            warnings.simplefilter("ignore")
            torch.onnx.export(graph, examples, str(tmp), input_names=inputs, output_names=[LOGITS, *names],
                              dynamic_axes=dynamic, opset_version=opset, dynamo=False)
        _set_metadata(tmp, export_metadata(model, maps) | (metadata or {}))
    return path


def with_backward_written_out(module: nn.Module, examples: tuple[torch.Tensor, ...]) -> nn.Module:
    """``module`` traced on ``examples`` (its inputs) into operators an ONNX export takes, its backward passes
    included: a graph for those inputs' shapes only."""
    from torch._decomp import get_decompositions
    from torch.fx.experimental.proxy_tensor import make_fx

    aten = torch.ops.aten
    table = get_decompositions([aten.gelu_backward, aten.native_layer_norm_backward])
    table[aten.convolution_backward.default] = _convolution_input_gradient
    with _EXPORTING:
        return make_fx(module, decomposition_table=table)(*examples)


def _convolution_input_gradient(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, bias_sizes: Any,
                                stride: list[int], padding: list[int], dilation: list[int], transposed: bool,
                                output_padding: list[int], groups: int, mask: list[bool]
                                ) -> tuple[torch.Tensor, None, None]:
    """``aten.convolution_backward`` for the input's gradient alone, as a forward convolution: with the kernel
    flipped and its in and out channels swapped per group at stride 1, transposed otherwise."""
    if transposed or mask[1] or mask[2]:
        raise NotImplementedError("only the input gradient of a forward convolution is written out")
    kernel = weight.shape[-2:]
    if tuple(stride) == (1, 1):
        out_channels, in_per_group = weight.shape[:2]
        swapped = (weight.reshape(groups, out_channels // groups, in_per_group, *kernel).transpose(1, 2)
                   .reshape(groups * in_per_group, out_channels // groups, *kernel).flip(-2, -1))
        pad = [d * (k - 1) - p for d, k, p in zip(dilation, kernel, padding)]
        return F.conv2d(grad, swapped, None, 1, pad, dilation, groups), None, None
    # the rows and columns a strided convolution never reached come back as zeros
    extra = [size - ((out - 1) * s - 2 * p + d * (k - 1) + 1)
             for size, out, s, p, d, k in zip(x.shape[-2:], grad.shape[-2:], stride, padding, dilation, kernel)]
    return F.conv_transpose2d(grad, weight, None, stride, padding, extra, groups, dilation), None, None


def _set_metadata(path: Path, metadata: dict[str, str]) -> None:
    """Replace the ONNX file's metadata_props with ``metadata`` and name its producer."""
    import onnx

    proto = onnx.load(str(path))
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, metadata)
    proto.producer_name, proto.producer_version = "van_app", __version__
    proto.doc_string = "Visual Attention Network classifier; labels and preprocessing in the metadata."
    onnx.save(proto, str(path))


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of an ONNX file written by ``export_onnx``, JSON values decoded (others as strings)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return {p.key: json.loads(p.value) if p.key in JSON_KEYS else p.value for p in proto.metadata_props}


def verify_export(model: nn.Module, path: str | Path, batch: int = 2, seed: int = 0) -> float:
    """The largest difference between ``model``'s logits and those ONNX Runtime computes from the file at ``path``,
    on a random batch of ``batch`` images, or of the graph's fixed batch (infinite when either is not finite)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    fixed, _, height, width = session.get_inputs()[0].shape
    batch = fixed if isinstance(fixed, int) else batch
    x = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        want = copy.deepcopy(model).to("cpu", torch.float32).eval()(x)
    feed = {INPUT: x.numpy()} | ({TARGET: np.full((batch,), -1, np.int64)} if len(session.get_inputs()) > 1 else {})
    got = torch.from_numpy(session.run([LOGITS], feed)[0])
    if not (torch.isfinite(got).all() and torch.isfinite(want).all()):
        return float("inf")
    return float((got - want).abs().max())
