"""The folded eager model (``fuse(model, engine="eager")``): same outputs, no BatchNorm, original untouched, attention,
gradients and predict intact; the inductor path and its fallbacks."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torch import nn

import van_app
from van_app import capture_attention, fuse, load_model, predict
from van_app.fold import FusedBlock, fold
from van_app.fuse import compile_for_inference, native_bf16

CUSTOM = dict(embed_dims=(8, 12, 16, 24), depths=(2, 1, 3, 1), mlp_ratios=(4, 2, 3, 2))


def _realistic(model: nn.Module, size: int = 48) -> nn.Module:
    """``model`` with random norm affines and layer scales in [0.01, 0.1], BatchNorm statistics from real batches."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_scale" in name:
                param.uniform_(0.01, 0.1)
            elif "norm" in name:
                param.uniform_(0.5, 1.5) if name.endswith("weight") else param.normal_(0, 0.2)
        model.train()
        for _ in range(3):
            model(torch.randn(4, 3, size, size) * 1.5 + 0.3)
    return model.eval()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest absolute difference; NaN anywhere makes it infinite, so comparisons fail."""
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return float("inf")
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def micro() -> nn.Module:
    torch.manual_seed(0)
    return _realistic(load_model("van_micro", num_classes=5))


@pytest.fixture(scope="module")
def fused(micro: nn.Module) -> nn.Module:
    return fuse(micro, engine="eager")


@pytest.mark.parametrize("size", [(33, 33), (47, 61), (64, 64)])
def test_fused_matches_unfused_at_odd_sizes(micro, fused, size):
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        assert _max_diff(fused(x), micro(x)) <= 1e-4


def test_fused_matches_unfused_for_a_custom_spec():
    torch.manual_seed(1)
    model = _realistic(load_model("van_micro", num_classes=7, **CUSTOM))
    x = torch.randn(3, 3, 45, 45)
    with torch.no_grad():
        assert _max_diff(fuse(model, engine="eager")(x), model(x)) <= 1e-4


def test_fused_features_match_unfused(micro, fused):
    x = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        assert _max_diff(fused.forward_features(x), micro.forward_features(x)) <= 1e-4


def test_fused_nchw_layout_matches_unfused(micro):
    x = torch.randn(2, 3, 35, 35)
    with torch.no_grad():
        assert _max_diff(fuse(micro, engine="eager", channels_last=False)(x), micro(x)) <= 1e-4


def test_fused_model_has_no_batchnorm_and_no_layer_scale(fused):
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in fused.modules())
    assert not any("layer_scale" in name or "norm1" in name or "norm2" in name for name, _ in fused.named_parameters())
    assert all(isinstance(block, FusedBlock) for stage in fused.stages for block in stage.blocks)


def test_fuse_leaves_the_original_untouched(micro):
    before = {k: v.clone() for k, v in micro.state_dict().items()}
    types = [type(m) for m in micro.modules()]
    micro.train()
    fused = fuse(micro, engine="eager")
    assert micro.training and not fused.training
    micro.eval()
    assert [type(m) for m in micro.modules()] == types
    after = micro.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.data_ptr() == q.data_ptr() for p in micro.parameters() for q in fused.parameters())


def test_fusing_a_fused_model_changes_nothing(fused):
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fuse(fused, engine="eager")(x), fused(x))


def test_fuse_refuses_a_model_that_is_not_a_van():
    with pytest.raises(TypeError, match="expects a VAN"):
        fuse(nn.Linear(2, 2))


def test_fused_model_keeps_the_attributes_predict_needs(micro, fused):
    for name in ("labels", "variant", "pretrained_cfg", "default_cfg", "num_classes"):
        assert getattr(fused, name) == getattr(micro, name), name


def test_capture_attention_on_fused_matches_unfused(micro, fused):
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad(), capture_attention(micro, detach=True) as plain, capture_attention(fused, detach=True) as ours:
        micro(x)
        fused(x)
    assert plain.keys() == ours.keys() and len(ours) == sum(van_app.VARIANTS["van_micro"].depths)
    for key in plain:
        assert _max_diff(ours[key], plain[key]) <= 1e-4, key


def test_attention_gradients_flow_through_the_fused_model(micro, fused):
    x = torch.randn(1, 3, 48, 48)
    grads = []
    for model in (micro, fused):
        with capture_attention(model) as captured:
            logit = model(x)[0, 2]
        grads.append(torch.autograd.grad(logit, captured[(3, 0)])[0])
    assert _max_diff(grads[1], grads[0]) <= 1e-4


def test_predict_on_fused_matches_unfused(micro, fused):
    image = Image.new("RGB", (50, 40), (200, 30, 90))
    plain, ours = predict(micro, image, k=3), predict(fused, image, k=3)
    assert list(ours) == list(plain)
    assert all(abs(ours[label] - plain[label]) <= 1e-4 for label in plain)


def test_compiler_failure_falls_back_to_the_eager_model(fused, monkeypatch):
    def broken_compiler(*args, **kwargs):
        def run(x):
            raise RuntimeError("no C++ compiler found\ndetails")
        return run

    monkeypatch.setattr(torch, "compile", broken_compiler)
    with pytest.warns(RuntimeWarning, match="compilation failed, using the eager fused model: no C\\+\\+ compiler found$"):
        assert compile_for_inference(fused, (1, 3, 32, 32)) is fused


def test_compiled_model_with_wrong_outputs_is_not_used(fused, monkeypatch):
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: (lambda x: model(x) + 1))
    with pytest.warns(RuntimeWarning, match="differ from eager ones by 1"):
        assert compile_for_inference(fused, (1, 3, 32, 32)) is fused


def test_native_bf16_follows_the_cpu_capabilities(monkeypatch):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": False, "amx_bf16": True})
    assert native_bf16("cpu")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": False, "amx_bf16": False})
    assert not native_bf16("cpu")


def test_compiler_gets_a_private_copy_of_the_fused_model(fused, monkeypatch):
    received = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: received.append(fn) or fn)
    served = compile_for_inference(fused, (1, 3, 32, 32))
    assert received[0].__self__ is served and served is not fused
    assert type(served) is type(fused) and served.labels == fused.labels


def test_fold_without_prepadding_matches_unfused(micro):
    x = torch.randn(2, 3, 37, 41)
    with torch.no_grad():
        assert _max_diff(fold(micro, channels_last=False, prepad=False)(x), micro(x)) <= 1e-4


def test_folded_blocks_hand_back_the_attention_capture_attention_sees(micro, fused):
    x = torch.randn(1, 3, 48, 48)
    block = fused.stages[1].blocks[0]
    features = fused.stages[1].patch_embed(fused.stages[0](x))
    with torch.no_grad(), capture_attention(fused, detach=True) as captured:
        out, attn = block.forward_with_attention(features)
        assert torch.equal(out, block(features))
    assert torch.equal(attn, captured[(1, 0)])


def test_fuse_refuses_an_unknown_engine(micro):
    with pytest.raises(ValueError, match="engine must be one of"):
        fuse(micro, engine="tensorrt")
