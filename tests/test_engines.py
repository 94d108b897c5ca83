"""fuse() behind an ONNX engine: same outputs as the model, attention maps from the same pass, predict and analyse on
it, the graph cached on disk by the weights and rebuilt when the file there is wrong, and the fallbacks."""

from __future__ import annotations

import copy
import ctypes
import gc
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torch import nn

from van_app import fuse, load_model, predict
from van_app.attention import Pass, attention_pass, block_keys
from van_app.cache import MAX_AGE_DAYS, cache_dir, model_digest
from van_app import engines
from van_app.engines import EngineModel, Runner, fastest, installed_engines
from van_app.explain import analyse, class_maps, find_map
from van_app.fold import fold
from van_app.onnx_export import export_onnx, read_metadata

from conftest import hooked_pass

SIZE = 64


def _realistic(seed: int = 0, classes: int = 5) -> nn.Module:
    """A seeded van_micro for ``SIZE`` px inputs with layer scales in [0.01, 0.1] and measured BatchNorm statistics."""
    torch.manual_seed(seed)
    model = load_model("van_micro", num_classes=classes)
    model.pretrained_cfg = dict(model.pretrained_cfg, input_size=(3, SIZE, SIZE))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_scale" in name:
                param.uniform_(0.01, 0.1)
        model.train()
        for _ in range(3):
            model(torch.randn(4, 3, SIZE, SIZE))
    return model.eval()


def _picture() -> Image.Image:
    """A non-square picture with a bright disc right of centre."""
    image = Image.new("RGB", (96, 64), (20, 20, 30))
    ImageDraw.Draw(image).ellipse((55, 12, 85, 52), fill=(250, 220, 40))
    return image


def _graphs(folder: Path) -> list[Path]:
    """The exported graphs in the cache folder."""
    return sorted((folder / "onnx").glob("*.onnx"))


@pytest.fixture(scope="module")
def micro() -> nn.Module:
    return _realistic()


@pytest.fixture(scope="module")
def served(micro) -> EngineModel:
    return fuse(micro, engine="onnxruntime", threads=1)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty cache folder for one test."""
    monkeypatch.setenv("VAN_APP_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_fuse_serves_on_every_installed_onnx_engine(micro):
    fast = fuse(micro, threads=1)
    assert isinstance(fast, EngineModel) and fast.engines == tuple(installed_engines())


@pytest.mark.parametrize("batch", [1, 3])
def test_served_logits_match_the_model_within_1e4(micro, served, batch):
    x = torch.randn(batch, 3, SIZE, SIZE)
    with torch.inference_mode():
        want = micro(x)
        got = served(x)
    assert got.shape == want.shape and (got - want).abs().max() <= 1e-4


def test_another_input_size_gets_its_own_graph(micro, served):
    x = torch.randn(2, 3, 40, 56)
    with torch.inference_mode():
        assert (served(x) - micro(x)).abs().max() <= 1e-4


def _assert_same_pass(result: Pass, x: torch.Tensor, micro: torch.nn.Module, target: torch.Tensor | None = None
                      ) -> None:
    """``result`` holds the logits, maps and evidence (for class ``target``, default the predicted one) the hooked
    unfolded model gives for ``x``."""
    want, expected, evidence = hooked_pass(micro, x, target)
    assert torch.equal(result.target, want.argmax(1) if target is None else target)
    assert (result.logits - want).abs().max() <= 1e-4
    assert list(result.maps) == sorted(expected) == block_keys(micro)
    for key, map_ in expected.items():
        assert result.maps[key].shape == map_.shape == (len(x), *map_.shape[-2:])
        assert (result.maps[key] - map_).abs().max() <= 1e-4 * map_.abs().max()
    assert list(result.evidence) == list(evidence)
    for stage, expected in evidence.items():
        assert result.evidence[stage].shape == expected.shape
        assert (result.evidence[stage] - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_maps_and_evidence_from_the_same_pass_match_the_hooked_eager_model(micro, served):
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.inference_mode():
        result = served.forward_with_maps(x)
    _assert_same_pass(result, x, micro)


def test_the_served_pass_gives_the_evidence_for_each_images_class_asked_for(micro, served):
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.inference_mode():
        asked = (served(x).argmax(1) + torch.tensor([1, 3])) % micro.num_classes
        result = served.forward_with_maps(x, asked)
    _assert_same_pass(result, x, micro, asked)


def test_class_maps_on_the_served_model_match_the_folded_models(micro, served):
    for index in range(micro.num_classes):
        want, got = class_maps(fold(micro), _picture(), index), class_maps(served, _picture(), index)
        assert [m.title for m in got] == [m.title for m in want]
        for found, expected in zip(got, want):
            np.testing.assert_allclose(found.raw, expected.raw, rtol=1e-3,
                                       atol=1e-4 * float(np.abs(expected.raw).max()))


def test_a_served_model_refuses_class_maps_its_graph_does_not_compute(served):
    with pytest.raises(ValueError, match="rule 'gradient' on stages"):
        class_maps(served, _picture(), 0, rule="gradcam")


def test_folded_eager_model_gives_the_same_maps_without_hooks(micro):
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.inference_mode():
        result = attention_pass(fold(micro), x)
    _assert_same_pass(result, x, micro)


def test_served_model_keeps_the_attributes_predict_needs(micro, served):
    for name in ("labels", "variant", "pretrained_cfg", "num_classes", "feature_info", "model_args"):
        assert getattr(served, name) == getattr(micro, name), name


def test_predict_and_analyse_work_on_the_served_model(micro, served):
    image = _picture()
    plain, fast = predict(micro, image, k=3), predict(served, image, k=3)
    assert list(fast) == list(plain) and all(abs(fast[label] - plain[label]) <= 1e-4 for label in plain)
    want, got = analyse(micro, image, blocks=True), analyse(served, image, blocks=True)
    assert [(m.kind, m.stage, m.block) for m in got.maps] == [(m.kind, m.stage, m.block) for m in want.maps]
    for expected in want.maps:
        found = find_map(got.maps, expected.kind, expected.stage, expected.block)
        np.testing.assert_allclose(found.raw, expected.raw, rtol=1e-3, atol=1e-6 * float(np.abs(expected.raw).max()))
    assert [m.title for m in got.evidence] == [m.title for m in want.evidence]
    for found, expected in zip(got.evidence, want.evidence):
        np.testing.assert_allclose(found.raw, expected.raw, rtol=1e-3, atol=1e-4 * float(np.abs(expected.raw).max()))


def test_openvino_serves_the_same_logits_and_maps(micro):
    pytest.importorskip("openvino")
    fast = fuse(micro, engine="openvino", threads=1)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.inference_mode():
        result = fast.forward_with_maps(x)
        assert (fast(x) - micro(x)).abs().max() <= 1e-4
    _assert_same_pass(result, x, micro)


def test_serving_on_openvino_sends_no_telemetry(tmp_path):
    pytest.importorskip("openvino")
    script = ("import sys, torch\n"
              "from van_app import fuse, load_model\n"
              "fast = fuse(load_model('van_micro', num_classes=3), engine='openvino', threads=1)\n"
              "fast(torch.zeros(1, 3, 64, 64))\n"
              "assert 'openvino' in sys.modules and sys.modules.get('openvino_telemetry') is None\n")
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "TF_BUILD", "JENKINS_URL")}  # telemetry skips CI
    env.update(HOME=str(tmp_path), VAN_APP_CACHE=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not (tmp_path / "intel" / "openvino_ga_cid").exists()


def _signal_stack() -> tuple[int, int, int]:
    """This thread's alternate signal stack (address, flags, size), as ``sigaltstack`` reports it."""
    class Stack(ctypes.Structure):
        _fields_ = [("sp", ctypes.c_void_p), ("flags", ctypes.c_int), ("size", ctypes.c_size_t)]

    stack = Stack()
    assert ctypes.CDLL(None).sigaltstack(None, ctypes.byref(stack)) == 0
    return stack.sp or 0, stack.flags, stack.size


def test_openvino_graphs_freed_out_of_order_leave_the_signal_stack_as_it_was(micro, tmp_path):
    pytest.importorskip("openvino")
    before = _signal_stack()
    path = tmp_path / "micro.onnx"
    export_onnx(micro, path)
    x = np.zeros((1, 3, SIZE, SIZE), np.float32)
    existing = set(threading.enumerate())
    first, second = engines.openvino_runner(path, 1), engines.openvino_runner(path, 1)
    own = [t for t in threading.enumerate() if t not in existing and t.name == "openvino"]
    assert len(own) == 2
    first(x), second(x)
    del first
    gc.collect()
    del second
    gc.collect()
    assert _signal_stack() == before
    for thread in own:  # each runner's thread ended with it
        thread.join(timeout=5)
        assert not thread.is_alive()


def test_the_built_graph_is_cached_and_loaded_without_exporting_again(micro, cache, monkeypatch):
    fuse(micro, engine="onnxruntime", threads=1)
    assert len(_graphs(cache)) == 1

    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(engines, "export_onnx", no_export)
    again = fuse(micro, engine="onnxruntime", threads=1)
    with torch.inference_mode():
        x = torch.randn(1, 3, SIZE, SIZE)
        assert (again(x) - micro(x)).abs().max() <= 1e-4


def test_other_weights_get_another_cache_entry(micro, cache):
    fuse(micro, engine="onnxruntime", threads=1)
    other = _realistic(seed=1)
    fuse(other, engine="onnxruntime", threads=1)
    assert model_digest(other) != model_digest(micro) and len(_graphs(cache)) == 2


def test_graphs_made_by_other_code_are_not_reused(micro, cache, monkeypatch):
    fuse(micro, engine="onnxruntime", threads=1)
    monkeypatch.setattr(engines, "graph_code", lambda: "the next version of the maps")
    fuse(micro, engine="onnxruntime", threads=1)
    assert len(_graphs(cache)) == 2


@pytest.mark.parametrize("damage", ["truncated", "garbage", "other weights"])
def test_a_wrong_cache_entry_is_rebuilt_not_trusted(micro, cache, damage):
    fuse(micro, engine="onnxruntime", threads=1)
    (entry,) = _graphs(cache)
    if damage == "truncated":
        entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    elif damage == "garbage":
        entry.write_bytes(os.urandom(4096))
    else:
        other = _realistic(seed=1)
        fuse(other, engine="onnxruntime", threads=1)
        (foreign,) = [p for p in _graphs(cache) if p != entry]
        entry.write_bytes(foreign.read_bytes())
    again = fuse(micro, engine="onnxruntime", threads=1)
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.inference_mode():
        assert (again(x) - micro(x)).abs().max() <= 1e-4
    assert read_metadata(entry)["cache_key"] == entry.stem


def test_building_an_entry_removes_those_unused_for_a_month(micro, cache):
    fuse(micro, engine="onnxruntime", threads=1)
    (used,) = _graphs(cache)
    stale, recent = cache / "onnx" / "stale.onnx", cache / "onnx" / "recent.onnx"
    for path, days in ((stale, MAX_AGE_DAYS + 1), (recent, MAX_AGE_DAYS - 1), (used, MAX_AGE_DAYS - 1)):
        path.touch()
        os.utime(path, (time.time() - days * 86400,) * 2)
    fuse(micro, engine="onnxruntime", threads=1)  # loads, and so touches, the used entry
    assert time.time() - used.stat().st_mtime < 3600
    fuse(_realistic(seed=2), engine="onnxruntime", threads=1)  # builds a new entry
    assert not stale.exists() and recent.exists() and used.exists()


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("VAN_APP_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.delenv("VAN_APP_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "van_app"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "van_app"


def test_an_engine_that_fails_is_left_out_with_a_warning(micro, cache, monkeypatch):
    pytest.importorskip("openvino")

    def broken(path, threads):
        raise RuntimeError("no such instruction set\ndetails")

    monkeypatch.setitem(engines.RUNNERS, "openvino", broken)
    with pytest.warns(RuntimeWarning, match="openvino failed, not used: no such instruction set$"):
        fast = fuse(micro, threads=1)
    x = torch.randn(1, 3, SIZE, SIZE)
    assert fast.runner(False, tuple(x.shape)).engine == "onnxruntime"
    with torch.inference_mode():
        assert (fast(x) - micro(x)).abs().max() <= 1e-4


def test_when_every_engine_fails_the_eager_model_serves_with_a_warning(micro, cache, monkeypatch):
    def broken(path, threads):
        raise RuntimeError("no such instruction set")

    monkeypatch.setattr(engines, "RUNNERS", {name: broken for name in installed_engines()})
    with pytest.warns(RuntimeWarning, match="failed, using the eager model"):
        fast = fuse(micro)
    assert not isinstance(fast, EngineModel)
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.inference_mode():
        assert (fast(x) - micro(x)).abs().max() <= 1e-4


def test_each_shape_goes_to_the_engine_measured_fastest_there_and_the_choice_is_kept(micro, cache, monkeypatch):
    pytest.importorskip("openvino")
    slow_at = {"onnxruntime": 3, "openvino": 1}  # the batch size each engine is made slow at
    shipped = dict(engines.RUNNERS)

    def delayed(engine):
        def make(path, threads):
            real = shipped[engine](path, threads)

            def run(x):
                if x.shape[0] == slow_at[engine]:
                    time.sleep(0.01)
                return real(x)

            return engines.Runner(engine, run, real.metadata)

        return make

    monkeypatch.setattr(engines, "RUNNERS", {name: delayed(name) for name in ("onnxruntime", "openvino")})
    fast = EngineModel(micro, ["onnxruntime", "openvino"], threads=1)
    assert fast.runner(False, (1, 3, SIZE, SIZE)).engine == "onnxruntime"
    assert fast.runner(False, (3, 3, SIZE, SIZE)).engine == "openvino"
    monkeypatch.setattr(engines, "fastest", lambda *args, **kwargs: pytest.fail("measured again"))
    again = EngineModel(micro, ["onnxruntime", "openvino"], threads=1)
    assert again.runner(False, (3, 3, SIZE, SIZE)).engine == "openvino"


def test_a_forced_engine_that_fails_raises(micro, cache, monkeypatch):
    monkeypatch.setattr(engines, "RUNNERS", {"onnxruntime": lambda path, threads: 1 / 0})
    with pytest.raises(ZeroDivisionError):
        fuse(micro, engine="onnxruntime")


def test_a_model_that_is_not_cpu_float32_gets_the_eager_model(micro):
    fast = fuse(copy.deepcopy(micro).double())
    assert not isinstance(fast, EngineModel) and next(fast.parameters()).dtype == torch.float64


def test_fastest_keeps_the_quickest_runner():
    def taking(seconds: float, name: str) -> Runner:
        def run(x: np.ndarray) -> list[np.ndarray]:
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                pass
            return [x]

        return Runner(name, run, {})

    slow, quick = taking(0.004, "slow"), taking(0.0005, "quick")
    assert fastest([slow, quick], np.zeros(1)) is quick
