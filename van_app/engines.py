"""A VAN served by an ONNX engine (ONNX Runtime or OpenVINO) on the graph ``onnx_export`` writes.

``EngineModel`` behaves like the model it was made from where serving needs it:
called on a batch tensor it returns the logits, and it carries the model's
``labels``, ``pretrained_cfg``, ``feature_info``..., so ``predict``, ``analyse`` and
``van-predict`` take it. ``forward_with_maps`` returns the logits, every block's
attention map and the evidence for any class (by default the predicted one) from one
pass of a graph that has them as extra outputs (one image per call of that graph).

Each graph (logits only, or with maps; one per input size) is exported once per
weights and kept in the disk cache (``cache``), keyed by the weights and by the code
that defines the graph (``graph_code``). An export records in its metadata
its cache key and the folded PyTorch model's outputs on a fixed random input (the probe);
every load, fresh or cached, checks the key and runs the engine on the probe before
the graph serves, and a cached file that fails either check is written again. The
model keeps a private folded copy of the weights it was made from, so later changes
to the original never mix with graphs already built.

Neither engine wins everywhere (on a 2-core AMD EPYC, OpenVINO was a few per cent
faster at batch 1, ONNX Runtime up to 9% faster at batch 8): with both installed, each
input shape goes to the one measured fastest for it on this machine, once (``fastest``;
the choice is kept in the cache beside the graphs).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import platform
import queue
import signal
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from . import attention as attention_module
from . import fold as fold_module
from . import model as model_module
from . import onnx_export as onnx_export_module
from .attention import CLASS_STAGES, Pass, Target, attention_pass, block_keys, targets
from .cache import entry_path, load_or_build, model_digest
from .errors import first_line
from .files import write_json
from .fold import fold
from .onnx_export import FORMAT, OPSET, export_onnx
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
    """One engine running one ONNX file: called on its input arrays (the image batch first) it returns every output;
    and the file's metadata."""

    engine: str
    run: Callable[..., list[np.ndarray]]
    metadata: dict[str, str]

    def __call__(self, *inputs: np.ndarray) -> list[np.ndarray]:
        return self.run(*inputs)


def import_openvino() -> Any:
    """The ``openvino`` package, imported without its telemetry.

    Importing ``openvino`` sends a usage event to Google Analytics unless the user opted
    out (``openvino_telemetry``, from a process it forks). A server of images should not
    phone home, and offline that forked process can hang, holding its parent's output
    pipes. Hidden from the import, the package falls back to its own no-op stub.
    """
    if "openvino" not in sys.modules:
        sys.modules.setdefault("openvino_telemetry", None)  # None in sys.modules: the import raises ImportError
    import openvino

    return openvino


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
    names = [i.name for i in session.get_inputs()]
    # one session serves concurrent calls
    return Runner("onnxruntime", lambda *inputs: session.run(None, dict(zip(names, inputs))),
                  dict(session.get_modelmeta().custom_metadata_map))


def openvino_runner(path: Path, threads: int) -> Runner:
    """OpenVINO on the CPU (``threads`` threads, latency hint, f32) running the graph at ``path``.

    The graph is compiled for each shape of its first input on its first call: OpenVINO
    runs a static batch size faster than a dynamic one (about 6% for van_b0). An infer request serves
    one call at a time, so concurrent calls each take one from a pool. Compiling and
    freeing happen on a thread of the runner's own (``_openvino_thread``); inference runs
    on the caller's thread.
    """
    jobs: queue.SimpleQueue = queue.SimpleQueue()
    loaded: Future = Future()
    pools: dict[tuple[int, ...], list[Any]] = {}  # idle infer requests per input shape; the thread empties it
    thread = threading.Thread(target=_openvino_thread, args=(path, threads, jobs, loaded, pools),
                              name="openvino", daemon=True)
    thread.start()
    metadata = loaded.result()

    def run(x: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
        idle = pools.get(x.shape)
        request = idle.pop() if idle else None
        if request is None:
            made: Future = Future()
            jobs.put((x.shape, made))
            request = made.result()
        try:
            results = request.infer(dict(enumerate((x, *others))))
            # the request reuses its output buffers on the next call
            return [np.array(results[i]) for i in range(len(results))]
        finally:
            pools.setdefault(x.shape, []).append(request)

    # with the last reference, or at exit before the interpreter stops threads mid-call, the thread frees the graphs
    weakref.finalize(run, _end_thread, jobs, thread)
    return Runner("openvino", run, metadata)


def _end_thread(jobs: queue.SimpleQueue, thread: threading.Thread) -> None:
    """Ask an ``_openvino_thread`` to free its graphs and end, and wait until it has."""
    jobs.put(None)
    thread.join()


def _openvino_thread(path: Path, threads: int, jobs: queue.SimpleQueue, loaded: Future,
                     pools: dict[tuple[int, ...], list[Any]]) -> None:
    """Load and compile the graph at ``path`` for ``openvino_runner``, hand out infer requests, and free them all at
    the end, with every signal blocked.

    OpenVINO's CPU plugin gives the thread that compiles a graph a signal stack of its own
    (``sigaltstack``) and puts back the one it found when that graph is freed. Graphs freed
    out of order, or on another thread, leave a thread's signal stack pointing at freed
    memory, and Python's signal handlers run on it: the next SIGCHLD or SIGTERM crashed
    the process. Here the only thread that compiles and frees is this one, which takes no signals.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        core = import_openvino().Core()
        graph = core.read_model(str(path))
        framework = graph.get_rt_info()["framework"] if "framework" in graph.get_rt_info() else {}
        loaded.set_result({key: framework[key].astype(str) for key in framework.keys()} if framework else {})
    except BaseException as error:  # the caller raises it
        loaded.set_exception(error.with_traceback(None))
        return
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    compiled: dict[tuple[int, ...], Any] = {}
    while (job := jobs.get()) is not None:
        shape, made = job
        try:
            if shape not in compiled:
                shaped = graph.clone()
                shaped.reshape({shaped.input(0).get_any_name(): list(shape)})
                compiled[shape] = core.compile_model(shaped, "CPU", config)
            made.set_result(compiled[shape].create_infer_request())
        except BaseException as error:  # the caller raises it; no frame of this thread goes with it
            made.set_exception(error.with_traceback(None))
    pools.clear()
    compiled.clear()


RUNNERS = {"onnxruntime": onnxruntime_runner, "openvino": openvino_runner}


def fastest(runners: list[Runner], inputs: Sequence[np.ndarray], rounds: int = 5, round_seconds: float = 0.05
            ) -> Runner:
    """The runner of ``runners`` quickest on ``inputs`` in its median round: rounds interleaved, each of enough calls
    to last about ``round_seconds``, after a first untimed call each (which compiles where an engine compiles).

    The median, not the best round: on a machine where other work takes a core, an engine
    whose threads wait for each other (ONNX Runtime) has good best rounds and slow typical ones.
    """
    calls = []
    for runner in runners:
        runner(*inputs)
        start = time.perf_counter()
        runner(*inputs)
        calls.append(max(1, round(round_seconds / max(time.perf_counter() - start, 1e-6))))
    seconds: list[list[float]] = [[] for _ in runners]
    for _ in range(rounds):
        for runner, n, times in zip(runners, calls, seconds):
            start = time.perf_counter()
            for _ in range(n):
                runner(*inputs)
            times.append((time.perf_counter() - start) / n)
    medians = [float(np.median(times)) for times in seconds]
    return runners[medians.index(min(medians))]


def graph_code() -> str:
    """A hash of the source of the modules that define an exported graph (its layers, its maps, its export): a cached
    graph made by other code is never loaded, whatever version numbers say."""
    digest = hashlib.blake2b(digest_size=16)
    for module in (model_module, fold_module, attention_module, onnx_export_module):
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()


def _machine() -> str:
    """This machine's processor and core count, for keying what was measured on it."""
    cpuinfo = Path("/proc/cpuinfo")
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
             if line.startswith("model name")] if cpuinfo.is_file() else []
    return f"{platform.machine()} {names[0] if names else platform.processor()} x{os.cpu_count()}"


def _summary(outputs: list[torch.Tensor]) -> dict[str, list[float]]:
    """What a graph's check compares: every logit of the probe, and each later output's (attention map, evidence,
    the evidence's class) sum and largest value, in magnitude."""
    return {"logits": outputs[0].reshape(-1).tolist(),
            "maps": [[float(m.double().abs().sum()), float(m.abs().max())] for m in outputs[1:]]}


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
    """A VAN run by ONNX engines: called on a (B, 3, H, W) batch it returns the (B, classes) logits.

    With several ``engines``, each input shape goes to the one that ran it fastest here
    (``fastest``, measured on the first call of that shape and remembered in the cache).
    """

    def __init__(self, model: nn.Module, engines: Sequence[str], threads: int) -> None:
        unknown = [name for name in engines if name not in RUNNERS]
        if unknown or not engines:
            raise ValueError(f"engines must be some of {', '.join(RUNNERS)}, got {list(engines)}")
        self.engines = tuple(engines)
        self.threads = threads
        # A private folded copy: what the graphs are exported from and checked against.
        self._source = fold(model, channels_last=False, prepad=False).to("cpu", torch.float32)
        for name in ATTRIBUTES:
            setattr(self, name, getattr(self._source, name, None))
        self._digest = model_digest(self._source)
        self._keys = block_keys(self._source)
        self._graphs: dict[tuple[bool, int, int], list[Runner]] = {}
        self._chosen: dict[tuple[bool, tuple[int, ...]], Runner] = {}
        self._building = threading.Lock()

    def __repr__(self) -> str:
        return f"EngineModel({self.variant or 'VAN'} on {self.engine}, {self.threads} thread(s))"

    @property
    def engine(self) -> str:
        """The engines that may run this model ("onnxruntime", or "onnxruntime/openvino")."""
        return "/".join(self.engines)

    def engine_for(self, shape: Sequence[int], maps: bool = False) -> str:
        """The engine that runs input ``shape`` (chosen, and its graph built, if it was not yet)."""
        return self.runner(maps, tuple(shape)).engine

    @property
    def input_size(self) -> tuple[int, int]:
        """The (height, width) the model's preprocessing makes."""
        return tuple(data_config(self._source)["input_size"][-2:])

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        """The logits of ``batch`` (B, 3, H, W), preprocessed as the model expects."""
        return self._run(batch, maps=False)[0]

    def forward_with_maps(self, batch: torch.Tensor, target: Target = None) -> Pass:
        """The logits of ``batch``, each block's attention map ((B, h, w), keyed by (stage, block)) and the evidence
        for each image's ``target`` class (default: its predicted class): one pass of the graph per image."""
        logits, *outputs, chosen = self._run(batch, maps=True, target=target)
        maps = outputs[:len(self._keys)]
        return Pass(logits, dict(zip(self._keys, maps)), dict(zip(CLASS_STAGES, outputs[len(self._keys):])), chosen)

    def warm_up(self, maps: bool = True, shape: Sequence[int] | None = None) -> None:
        """Build (or load), check and choose the engine for input ``shape`` (default: one image of the
        preprocessing's size; with maps, one image of ``shape``'s size), with or without maps."""
        shape = tuple(shape or (1, 3, *self.input_size))
        self.runner(maps, (1, *shape[1:]) if maps else shape)

    def _run(self, batch: torch.Tensor, maps: bool, target: Target = None) -> list[torch.Tensor]:
        """Every output of the graph for ``batch``'s shape, as tensors; the graph with maps takes one image and its
        target class (``attention.targets``) per call."""
        if batch.dim() != 4:
            raise ValueError(f"expected a (batch, 3, height, width) tensor, got shape {tuple(batch.shape)}")
        x = batch.detach().to("cpu", torch.float32).contiguous().numpy()
        if not maps:
            return [torch.from_numpy(out) for out in self.runner(False, x.shape)(x)]
        chosen = targets(target, len(x), self.num_classes).numpy()
        run = self.runner(True, (1, *x.shape[1:]))
        outputs = zip(*(run(x[i:i + 1], chosen[i:i + 1]) for i in range(len(x))))
        return [torch.from_numpy(np.concatenate(out)) for out in outputs]

    def runner(self, maps: bool, shape: tuple[int, ...]) -> Runner:
        """The engine that runs input ``shape`` (with maps or not): graph built or loaded, checked and the engine
        chosen on first use."""
        key = (maps, tuple(shape))
        if key not in self._chosen:
            with self._building:
                if key not in self._chosen:
                    self._chosen[key] = self._choose(self._graph(maps, tuple(shape[-2:])), maps, key[1])
        return self._chosen[key]

    def _graph(self, maps: bool, size: tuple[int, int]) -> list[Runner]:
        """Every engine that runs the checked graph for input ``size``; an engine that fails is left out, with a
        warning, unless it is the only one."""
        if (maps, *size) not in self._graphs:
            path = entry_path("onnx", self._digest, graph_code(), FORMAT, OPSET, torch.__version__, onnx.__version__,
                              maps, *size, suffix=".onnx")
            runners = []
            for engine in self.engines:
                try:
                    runners.append(load_or_build(path, partial(self._export, key=path.stem, maps=maps, size=size),
                                                 partial(self._load, engine=engine, maps=maps, size=size)))
                except Exception as failure:  # noqa: BLE001 - whatever one engine raises, the others still serve
                    if len(self.engines) == 1:
                        raise
                    warnings.warn(f"{engine} failed, not used: {first_line(failure)}", RuntimeWarning, stacklevel=2)
            if not runners:
                raise RuntimeError(f"none of {self.engine} could run the graph")
            self._graphs[(maps, *size)] = runners
        return self._graphs[(maps, *size)]

    def _choose(self, runners: list[Runner], maps: bool, shape: tuple[int, ...]) -> Runner:
        """The runner for ``shape`` (with maps or not): the only one, the one measured fastest here before, or the
        fastest now."""
        if len(runners) == 1:
            return runners[0]
        versions = [f"{r.engine} {importlib.import_module(r.engine).__version__}" for r in runners]
        record = entry_path("choice", runners[0].metadata.get("cache_key"), shape, self.threads, versions, _machine(),
                            suffix=".json")
        by_engine = {runner.engine: runner for runner in runners}
        try:
            return by_engine[json.loads(record.read_text())["engine"]]
        except (OSError, ValueError, KeyError, TypeError):  # none recorded yet, or not readable: measure
            pass
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(PROBE_SEED))
        chosen = fastest(runners, self._inputs(x, maps))
        write_json(record, {"engine": chosen.engine, "shape": list(shape), "threads": self.threads})
        return chosen

    def _probe(self, size: tuple[int, int]) -> torch.Tensor:
        """The fixed random batch of one that every graph for ``size`` is checked on."""
        return torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(PROBE_SEED))

    def _inputs(self, x: torch.Tensor, maps: bool) -> list[np.ndarray]:
        """A graph's inputs for batch ``x``: with maps, also the target class of each image, the predicted one."""
        return [x.numpy()] + ([targets(None, len(x), self.num_classes).numpy()] if maps else [])

    def _export(self, path: Path, key: str, maps: bool, size: tuple[int, int]) -> None:
        """Write the graph to ``path``, with its cache ``key`` and the PyTorch model's outputs on the probe as
        metadata."""
        with torch.inference_mode():
            if maps:
                found = attention_pass(self._source, self._probe(size))
                outputs = [found.logits, *(found.maps[block] for block in self._keys),
                           *(found.evidence[s] for s in CLASS_STAGES), found.target]
            else:
                outputs = [self._source(self._probe(size))]
        export_onnx(self._source, path, maps=maps, size=size,
                    metadata={"cache_key": key, "expected": json.dumps(_summary(outputs))})

    def _load(self, path: Path, engine: str, maps: bool, size: tuple[int, int]) -> Runner:
        """``engine`` on the file at ``path`` once the file is the one its name says and reproduces the outputs
        recorded in it; ``ValueError`` otherwise."""
        run = RUNNERS[engine](path, self.threads)
        if run.metadata.get("cache_key") != path.stem:
            raise ValueError("it was written for another model")
        got = _summary([torch.from_numpy(out) for out in run(*self._inputs(self._probe(size), maps))])
        if not _matches(got, json.loads(run.metadata.get("expected", "null")) or {"logits": [], "maps": []}):
            raise ValueError("its outputs differ from the model's")
        return run
