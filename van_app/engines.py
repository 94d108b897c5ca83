"""A VAN served by an ONNX engine (ONNX Runtime or OpenVINO) on the graph ``onnx_export`` writes.

``EngineModel`` behaves like the model it was made from where serving needs it:
called on a batch tensor it returns the logits, and it carries the model's
``labels``, ``pretrained_cfg``, ``feature_info``..., so ``predict``, ``analyse`` and
``van-predict`` take it. ``forward_with_maps`` returns the logits and every block's
attention map from one pass of a graph that has them as extra outputs.

Each graph (logits only, or with maps; one per input size) is exported once per
weights and kept in the disk cache (``cache``). An export records in its metadata
its cache key and the folded PyTorch model's outputs on a fixed random input (the probe);
every load, fresh or cached, checks the key and runs the engine on the probe before
the graph serves, and a cached file that fails either check is written again. The
model keeps a private folded copy of the weights it was made from, so later changes
to the original never mix with graphs already built.
"""

from __future__ import annotations

import importlib.util
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from .attention import Maps, attention_pass, block_keys
from .cache import entry_path, load_or_build, model_digest
from .fold import fold
from .onnx_export import FORMAT, INPUT, OPSET, export_onnx
from .predict import data_config

ENGINES = ("onnxruntime", "openvino")
# What serving reads from a model, copied from the VAN an EngineModel is made from.
ATTRIBUTES = ("labels", "variant", "pretrained_cfg", "default_cfg", "num_classes", "feature_info", "model_args")
# How far a graph's outputs on the probe may be from the PyTorch model's before the graph is refused: logits
# absolutely (times their magnitude when above 1), each attention map's sum and largest value relatively.
LOGITS_TOLERANCE = 1e-4
MAPS_TOLERANCE = 1e-3
PROBE_SEED = 0  # the random input every graph is checked on


@dataclass(frozen=True)
class Runner:
    """An engine running one ONNX file: called on an input array it returns every output; and the file's metadata."""

    run: Callable[[np.ndarray], list[np.ndarray]]
    metadata: dict[str, str]

    def __call__(self, x: np.ndarray) -> list[np.ndarray]:
        return self.run(x)


def installed_engines() -> list[str]:
    """The engines of ``ENGINES`` whose package is installed here, in that order."""
    return [name for name in ENGINES if importlib.util.find_spec(name) is not None]


def onnxruntime_runner(path: Path, threads: int) -> Runner:
    """An ONNX Runtime session (CPU, ``threads`` intra-op threads, one inter-op) running the graph at ``path``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # no warnings about unused initializers and the like on stderr
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    # one session serves concurrent calls
    return Runner(lambda x: session.run(None, {INPUT: x}), dict(session.get_modelmeta().custom_metadata_map))


def openvino_runner(path: Path, threads: int) -> Runner:
    """An OpenVINO CPU model (``threads`` threads, latency hint, f32) running the graph at ``path``.

    An infer request serves one call at a time: concurrent calls take one each from a pool.
    """
    import openvino as ov

    core = ov.Core()
    graph = core.read_model(str(path))
    framework = graph.get_rt_info()["framework"] if "framework" in graph.get_rt_info() else {}
    metadata = {key: framework[key].astype(str) for key in framework.keys()} if framework else {}
    compiled = core.compile_model(graph, "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY",
                                                 "INFERENCE_PRECISION_HINT": "f32"})
    idle: list = []

    def run(x: np.ndarray) -> list[np.ndarray]:
        request = idle.pop() if idle else compiled.create_infer_request()
        try:
            results = request.infer({0: x})
            # the request reuses its output buffers on the next call
            return [np.array(results[output]) for output in compiled.outputs]
        finally:
            idle.append(request)

    return Runner(run, metadata)


RUNNERS = {"onnxruntime": onnxruntime_runner, "openvino": openvino_runner}


def _summary(outputs: list[torch.Tensor]) -> dict[str, list[float]]:
    """What a graph's check compares: every logit of the probe, and each attention map's sum and largest value."""
    return {"logits": outputs[0].reshape(-1).tolist(),
            "maps": [[float(m.double().sum()), float(m.max())] for m in outputs[1:]]}


def _matches(got: dict[str, list[float]], want: dict[str, list[float]]) -> bool:
    """Whether two ``_summary`` results agree: logits within ``LOGITS_TOLERANCE`` (times their magnitude when above
    1), map figures within ``MAPS_TOLERANCE`` of their own size; NaN never agrees."""
    if len(got["logits"]) != len(want["logits"]) or len(got["maps"]) != len(want["maps"]):
        return False
    logits, expected = np.array(got["logits"]), np.array(want["logits"])
    limit = LOGITS_TOLERANCE * max(1.0, float(np.abs(expected).max(initial=0.0)))
    maps, expected_maps = np.array(got["maps"]).reshape(-1), np.array(want["maps"]).reshape(-1)
    return bool(np.all(np.abs(logits - expected) <= limit)
                and np.all(np.abs(maps - expected_maps) <= MAPS_TOLERANCE * np.abs(expected_maps) + 1e-30))


class EngineModel:
    """A VAN run by ONNX Runtime or OpenVINO: called on a (B, 3, H, W) batch it returns the (B, classes) logits."""

    def __init__(self, model: nn.Module, engine: str, threads: int) -> None:
        if engine not in RUNNERS:
            raise ValueError(f"unknown engine {engine!r}: one of {', '.join(RUNNERS)}")
        self.engine = engine
        self.threads = threads
        # A private folded copy: what the graphs are exported from and checked against.
        self._source = fold(model, channels_last=False, prepad=False).to("cpu", torch.float32)
        for name in ATTRIBUTES:
            setattr(self, name, getattr(self._source, name, None))
        self._digest = model_digest(self._source)
        self._keys = block_keys(self._source)
        self._runners: dict[tuple[bool, int, int], Runner] = {}
        self._building = threading.Lock()

    def __repr__(self) -> str:
        return f"EngineModel({self.variant or 'VAN'} on {self.engine}, {self.threads} thread(s))"

    @property
    def input_size(self) -> tuple[int, int]:
        """The (height, width) the model's preprocessing makes."""
        return tuple(data_config(self._source)["input_size"][-2:])

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """The logits of ``batch`` (B, 3, H, W), preprocessed as the model expects."""
        return self._run(batch, maps=False)[0]

    def forward_with_maps(self, batch: torch.Tensor) -> tuple[torch.Tensor, Maps]:
        """The logits of ``batch`` and each block's attention map ((B, h, w), keyed by (stage, block)), one pass."""
        logits, *maps = self._run(batch, maps=True)
        return logits, dict(zip(self._keys, maps))

    def warm_up(self, maps: bool = True, size: tuple[int, int] | None = None) -> None:
        """Build (or load) and check the graph for ``size`` (default: the preprocessing's), with or without maps."""
        self.runner(maps, size or self.input_size)

    def _run(self, batch: torch.Tensor, maps: bool) -> list[torch.Tensor]:
        """Every output of the graph for ``batch``'s size, as tensors."""
        if batch.dim() != 4:
            raise ValueError(f"expected a (batch, 3, height, width) tensor, got shape {tuple(batch.shape)}")
        x = batch.detach().to("cpu", torch.float32).contiguous().numpy()
        return [torch.from_numpy(out) for out in self.runner(maps, tuple(batch.shape[-2:]))(x)]

    def runner(self, maps: bool, size: tuple[int, int]) -> Runner:
        """The engine running the graph for input ``size`` (with maps or not), built or loaded on first use."""
        key = (maps, *size)
        if key not in self._runners:
            with self._building:
                if key not in self._runners:
                    path = entry_path("onnx", self._digest, FORMAT, OPSET, torch.__version__, onnx.__version__,
                                      maps, *size, suffix=".onnx")
                    self._runners[key] = load_or_build(path, partial(self._export, key=path.stem, maps=maps, size=size),
                                                       partial(self._load, maps=maps, size=size))
        return self._runners[key]

    def _probe(self, size: tuple[int, int]) -> torch.Tensor:
        """The fixed random batch of one that every graph for ``size`` is checked on."""
        return torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(PROBE_SEED))

    def _export(self, path: Path, key: str, maps: bool, size: tuple[int, int]) -> None:
        """Write the graph to ``path``, with its cache ``key`` and the PyTorch model's outputs on the probe as
        metadata."""
        with torch.inference_mode():
            if maps:
                logits, found = attention_pass(self._source, self._probe(size))
                outputs = [logits, *(found[block] for block in self._keys)]
            else:
                outputs = [self._source(self._probe(size))]
        export_onnx(self._source, path, maps=maps, size=size,
                    metadata={"cache_key": key, "expected": json.dumps(_summary(outputs))})

    def _load(self, path: Path, maps: bool, size: tuple[int, int]) -> Runner:
        """The engine on the file at ``path`` once the file is the one its name says and reproduces the outputs
        recorded in it; ``ValueError`` otherwise."""
        run = RUNNERS[self.engine](path, self.threads)
        if run.metadata.get("cache_key") != path.stem:
            raise ValueError("it was written for another model")
        got = _summary([torch.from_numpy(out) for out in run(self._probe(size).numpy())])
        if not _matches(got, json.loads(run.metadata.get("expected", "null")) or {"logits": [], "maps": []}):
            raise ValueError("its outputs differ from the model's")
        return run
