"""export_onnx and van-export-onnx: the file ONNX Runtime loads matches the official implementation within 1e-4, at any
batch size, carries labels and preprocessing, and returns the page's attention maps and evidence when asked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from van_app import export_onnx, load_model
from van_app.cli import export_onnx_main
from van_app.onnx_export import (
    INPUT,
    LOGITS,
    TARGET,
    TARGET_OUTPUT,
    evidence_outputs,
    map_outputs,
    read_metadata,
    verify_export,
    with_backward_written_out,
)

from conftest import hooked_pass

FIXTURES = Path(__file__).parent / "fixtures"
OFFICIAL = FIXTURES / "official_tiny.pth.tar"


@pytest.fixture(scope="module")
def official() -> torch.nn.Module:
    """The tiny VAN the official implementation made, loaded from its checkpoint."""
    return load_model(str(OFFICIAL))


@pytest.fixture(scope="module")
def exported(official, tmp_path_factory) -> Path:
    return export_onnx(official, tmp_path_factory.mktemp("onnx") / "official.onnx")


@pytest.fixture(scope="module")
def with_maps(official, tmp_path_factory) -> Path:
    return export_onnx(official, tmp_path_factory.mktemp("onnx") / "maps.onnx", maps=True)


def run(path: Path, x: torch.Tensor, outputs: list[str] | None = None, target: int | None = None
        ) -> list[np.ndarray]:
    """The outputs ONNX Runtime computes from the file at ``path`` for ``x`` (and, for a graph with maps, class
    ``target``, -1 for the predicted one)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {INPUT: x.numpy()}
    if len(session.get_inputs()) > 1:
        feed[TARGET] = np.array([-1 if target is None else target], np.int64)
    return session.run(outputs, feed)


def test_exported_logits_match_the_official_implementation_within_1e4(exported, reference):
    (logits,) = run(exported, reference["input"], [LOGITS])
    assert np.isfinite(logits).all()
    assert np.abs(logits - reference["official_logits"].numpy()).max() <= 1e-4


@pytest.mark.parametrize("batch", [1, 3])
def test_batch_size_is_dynamic(official, exported, batch):
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
    (logits,) = run(exported, x, [LOGITS])
    with torch.inference_mode():
        assert np.abs(logits - official(x).numpy()).max() <= 1e-4


def test_metadata_holds_labels_and_preprocessing(official, exported):
    metadata = read_metadata(exported)
    assert metadata["labels"] == official.labels
    assert metadata["preprocessing"] == {"input_size": [3, 224, 224], "interpolation": "bicubic",
                                         "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "crop_pct": 0.9,
                                         "crop_mode": "center"}
    assert metadata["model_args"]["depths"] == [1, 2, 1, 1] and metadata["attention_maps"] == []
    seen_by_onnxruntime = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"]).get_modelmeta()
    assert set(seen_by_onnxruntime.custom_metadata_map) >= {"labels", "preprocessing", "variant", "format"}


def test_attention_maps_and_evidence_match_the_hooked_eager_model(official, with_maps, reference):
    x = reference["input"][:1]
    names = [m.name for m in map_outputs(official)] + [e["name"] for e in evidence_outputs(official)]
    logits, *outputs = run(with_maps, x, [LOGITS, *names])
    want, expected, evidence = hooked_pass(official, x)
    assert np.abs(logits - want.numpy()).max() <= 1e-4
    assert [(m.stage, m.block) for m in map_outputs(official)] == list(expected)
    for got, map_ in zip(outputs, expected.values()):
        assert got.shape == map_.shape == (1, *map_.shape[-2:])
        np.testing.assert_allclose(got, map_.numpy(), rtol=1e-4, atol=1e-6 * float(map_.abs().max()))
    for got, expected in zip(outputs[len(expected):], evidence.values()):
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-3, atol=1e-4 * float(expected.abs().max()))
    metadata = read_metadata(with_maps)
    assert metadata["attention_maps"][1] == {"name": "attention.1.0", "stage": 1, "block": 0, "stride": 8}
    assert metadata["evidence"] == [{"name": f"evidence.{s}", "stage": s, "stride": 4 * 2**s, "rule": "gradient",
                                     "target": TARGET_OUTPUT} for s in (0, 1)]


def test_a_graph_with_maps_gives_the_evidence_for_the_class_asked_for(official, with_maps, reference):
    x = reference["input"][:1]
    names = [e["name"] for e in evidence_outputs(official)]
    predicted = int(run(with_maps, x, [TARGET_OUTPUT])[0][0])
    other = (predicted + 3) % official.num_classes
    *outputs, chosen = run(with_maps, x, [*names, TARGET_OUTPUT], target=other)
    _, _, evidence = hooked_pass(official, x, torch.tensor([other]))
    assert chosen.tolist() == [other]
    for got, expected in zip(outputs, evidence.values()):
        np.testing.assert_allclose(got, expected.numpy(), rtol=1e-3, atol=1e-4 * float(expected.abs().max()))
    assert not np.allclose(outputs[0], run(with_maps, x, [names[0]])[0])


def test_a_graph_with_maps_takes_one_image_and_its_target_class(with_maps):
    session = ort.InferenceSession(str(with_maps), providers=["CPUExecutionProvider"])
    image, target = session.get_inputs()
    assert (image.shape, target.name, target.shape, target.type) == ([1, 3, 224, 224], TARGET, [1], "tensor(int64)")


@pytest.mark.parametrize(("stride", "padding", "dilation", "groups"),
                         [(1, 0, 1, 1), (1, 2, 1, 4), (1, 9, 3, 4), (2, 1, 1, 1), (4, 3, 1, 1), (2, 1, 1, 2)])
def test_a_convolutions_input_gradient_is_written_out_as_forward_operators(stride, padding, dilation, groups):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 8, 3 if dilation == 1 else 7, stride, padding, dilation, groups)

    class InputGradient(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            with torch.enable_grad():
                x = x.clone().requires_grad_()
                return torch.autograd.grad(conv(x).square().sum(), x)[0]

    x = torch.randn(1, 4, 23, 23)
    traced = with_backward_written_out(InputGradient(), (x,))
    ops = {str(node.target) for node in traced.graph.nodes if node.op == "call_function"}
    assert not any("backward" in op for op in ops)
    torch.testing.assert_close(traced(x), InputGradient()(x), rtol=1e-5, atol=1e-5)


def test_a_failed_export_leaves_no_file(official, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        Path(args[2]).write_bytes(b"half a graph")
        raise RuntimeError("exporter crashed")

    monkeypatch.setattr(torch.onnx, "export", broken)
    with pytest.raises(RuntimeError, match="exporter crashed"):
        export_onnx(official, tmp_path / "model.onnx")
    assert list(tmp_path.iterdir()) == []


def test_verify_export_reports_the_largest_logit_difference(official, exported):
    assert verify_export(official, exported) <= 1e-4


def test_command_writes_a_checked_file(tmp_path, capsys):
    out = tmp_path / "model.onnx"
    assert export_onnx_main([str(OFFICIAL), str(out), "--maps"]) == 0
    assert ("input (1, 3, 224, 224) and target (1,), the class to explain (-1: the predicted one); ONNX Runtime "
            "matches PyTorch within") in capsys.readouterr().out
    assert len(read_metadata(out)["attention_maps"]) == 5 and len(read_metadata(out)["evidence"]) == 2


def test_command_refuses_what_is_not_a_model_in_one_line(tmp_path, capsys):
    assert export_onnx_main([str(tmp_path / "missing"), str(tmp_path / "model.onnx")]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "model.onnx").exists()
