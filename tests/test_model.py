"""The VAN architecture against timm's model contract, over every registered variant where that is cheap."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from functools import cache
from pathlib import Path

import pytest
import timm
import torch
from timm.data import resolve_data_config
from timm.layers import DropPath
from timm.optim import param_groups_layer_decay
from torch import nn

import van_app  # noqa: F401  (registers the variants with timm)
from van_app.model import VAN, VARIANTS, capture_attention, lka_modules
from van_app.weights import load_model

PAPER_PARAMS_M = {"van_b0": 4.1, "van_b1": 13.9, "van_b2": 26.6, "van_b3": 44.8}


@cache
def meta_model(variant: str) -> VAN:
    """A full-size variant on the meta device: shapes and parameter counts without memory or init time."""
    with torch.device("meta"):
        return timm.create_model(variant)


def micro(**kwargs) -> VAN:
    """The few-thousand-parameter registered variant, seeded."""
    torch.manual_seed(0)
    return timm.create_model("van_micro", **kwargs)


def test_every_variant_is_registered_with_timm() -> None:
    assert set(VARIANTS) <= set(timm.list_models("van_*"))
    assert timm.list_models("van_b*", pretrained=True) == [f"van_b{i}.in1k" for i in range(4)]


@pytest.mark.parametrize("variant", sorted(PAPER_PARAMS_M))
def test_parameter_count_matches_paper(variant: str) -> None:
    count = sum(p.numel() for p in meta_model(variant).parameters()) / 1e6
    assert count == pytest.approx(PAPER_PARAMS_M[variant], rel=0.01)


# van_b4 ... van_b6 only add blocks to the same code and take seconds to build even on the meta device.
@pytest.mark.parametrize("variant", [*PAPER_PARAMS_M, "van_micro"])
def test_variant_maps_224px_to_logits_and_7x7_features(variant: str) -> None:
    model = meta_model(variant)
    features = model.forward_features(torch.empty(2, 3, 224, 224, device="meta"))
    assert features.shape == (2, VARIANTS[variant].embed_dims[-1], 7, 7)
    assert model.forward_head(features).shape == (2, 1000)
    assert model.num_features == VARIANTS[variant].embed_dims[-1]


@pytest.mark.parametrize("size", [(32, 32), (33, 47), (65, 40)])
def test_odd_and_non_square_sizes(size: tuple[int, int]) -> None:
    model = micro(num_classes=7).eval()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        features = model.forward_features(x)
        logits = model(x)
    # Each stride-2 stage (padding k//2) rounds up; the stride-4 stem too.
    expected = [-(-s // 32) for s in size]
    assert features.shape == (2, 64, *expected)
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()


def test_forward_is_forward_head_of_forward_features() -> None:
    model = micro().eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        features = model.forward_features(x)
        pooled = model.forward_head(features, pre_logits=True)
        torch.testing.assert_close(model(x), model.forward_head(features))
    assert pooled.shape == (1, model.num_features)
    torch.testing.assert_close(pooled, features.mean((2, 3)))


def test_reset_classifier_to_new_class_count() -> None:
    model = micro().eval()
    model.reset_classifier(3)
    assert model.num_classes == 3
    assert model.get_classifier().out_features == 3
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_reset_classifier_keeps_model_args_current() -> None:
    model = micro().eval()
    model.reset_classifier(0, global_pool="")
    assert (model.model_args["num_classes"], model.model_args["global_pool"]) == (0, "")
    x = torch.randn(1, 3, 32, 32)
    assert VAN(**model.model_args).eval()(x).shape == model(x).shape == (1, 64, 1, 1)


def test_model_args_rebuild_the_same_architecture() -> None:
    model = micro(num_classes=5, drop_path_rate=0.2, layer_scale_init=0.1, embed_dims=(8, 12, 16, 24),
                  depths=(2, 1, 3, 1), mlp_ratios=(4, 2, 3, 2))
    rebuilt = VAN(**model.model_args)
    assert rebuilt.model_args == model.model_args
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert [m.drop_prob for m in rebuilt.modules() if isinstance(m, DropPath)] == [
        m.drop_prob for m in model.modules() if isinstance(m, DropPath)]
    assert rebuilt.stages[0].blocks[0].layer_scale_1[0].item() == pytest.approx(0.1)


def test_model_args_are_plain_json_values() -> None:
    args = micro().model_args
    assert VAN(**json.loads(json.dumps(args))).model_args == args


def test_reset_classifier_to_zero_removes_head() -> None:
    model = micro().eval()
    model.reset_classifier(0)
    assert isinstance(model.head, nn.Identity)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, model.num_features)


def test_reset_classifier_without_pooling_returns_feature_maps() -> None:
    model = micro().eval()
    model.reset_classifier(0, global_pool="")
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 64, 1, 1)


def test_no_weight_decay_names_exist_and_cover_layer_scales() -> None:
    model = micro()
    names = dict(model.named_parameters())
    skip = model.no_weight_decay()
    assert skip and skip <= names.keys()
    assert {n for n in names if "layer_scale" in n} == skip


def test_group_matcher_drives_timm_layer_decay() -> None:
    model = micro()
    groups = param_groups_layer_decay(model, weight_decay=0.05, layer_decay=0.5,
                                      no_weight_decay_list=model.no_weight_decay())
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    params = dict(model.named_parameters())
    assert len(scale) == len(params) == sum(len(g["params"]) for g in groups)
    stem = scale[id(params["stages.0.patch_embed.proj.weight"])]
    first_block = scale[id(params["stages.0.blocks.0.attn.proj_1.weight"])]
    last_block = scale[id(params["stages.3.blocks.0.mlp.fc1.weight"])]
    assert stem < first_block < last_block < scale[id(params["head.weight"])] == 1.0
    assert decay[id(params["stages.1.blocks.0.layer_scale_1"])] == 0.0
    assert decay[id(params["stages.1.blocks.0.mlp.fc1.weight"])] == 0.05


def test_coarse_group_matcher_groups_by_stage() -> None:
    from timm.models import group_parameters

    model = micro()
    groups = group_parameters(model, model.group_matcher(coarse=True))
    assert len(groups) == 1 + 4 + 1  # stem, four stages, head
    assert sum(len(names) for names in groups.values()) == len(list(model.parameters()))


def test_drop_path_rate_creates_increasing_drop_path() -> None:
    model = micro(drop_path_rate=0.3)
    rates = [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]
    assert len(rates) == sum(VARIANTS["van_micro"].depths) - 1  # the first block's rate is 0
    assert rates == sorted(rates) and rates[-1] == pytest.approx(0.3)


def test_backward_reaches_every_parameter_without_nan() -> None:
    model = micro(num_classes=5, drop_path_rate=0.1).train()
    loss = nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([1, 4]))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_grad_checkpointing_gives_same_gradients() -> None:
    model = micro().train()
    x = torch.randn(2, 3, 32, 32)
    model(x).square().mean().backward()
    plain = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).square().mean().backward()
    for a, p in zip(plain, model.parameters()):
        torch.testing.assert_close(p.grad, a)


def test_timm_create_model_with_num_classes() -> None:
    model = timm.create_model("van_b0", num_classes=10)
    assert isinstance(model, VAN)
    assert model.head.out_features == 10
    assert model.model_args["embed_dims"] == VARIANTS["van_b0"].embed_dims


def test_features_only_gives_four_maps_at_strides_4_to_32() -> None:
    torch.manual_seed(0)
    model = timm.create_model("van_micro", features_only=True).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == list(VARIANTS["van_micro"].embed_dims)
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 64, 64))
    assert [tuple(m.shape[1:]) for m in maps] == [(8, 16, 16), (16, 8, 8), (32, 4, 4), (64, 2, 2)]


def test_features_only_out_indices() -> None:
    model = timm.create_model("van_micro", features_only=True, out_indices=(1, 3))
    assert model.feature_info.reduction() == [8, 32]


def test_data_config_is_the_official_preprocessing() -> None:
    cfg = resolve_data_config(model=meta_model("van_b0"))
    assert cfg["mean"] == cfg["std"] == (0.5, 0.5, 0.5)
    assert cfg["interpolation"] == "bicubic"
    assert cfg["crop_pct"] == 0.9
    assert cfg["input_size"] == (3, 224, 224)


def test_capture_attention_records_one_map_per_block() -> None:
    model = micro().eval()
    with torch.no_grad(), capture_attention(model) as maps:
        model(torch.randn(2, 3, 64, 64))
    depths, dims = VARIANTS["van_micro"].depths, VARIANTS["van_micro"].embed_dims
    assert sorted(maps) == [(s, b) for s in range(4) for b in range(depths[s])]
    for (s, _), attn in maps.items():
        side = 64 // (4 * 2**s)
        assert attn.shape == (2, dims[s], side, side)


def test_capture_attention_leaves_outputs_unchanged() -> None:
    model = micro().eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        plain = model(x)
        with capture_attention(model):
            hooked = model(x)
    torch.testing.assert_close(hooked, plain, rtol=0, atol=0)


def test_capture_attention_removes_hooks_on_exit() -> None:
    model = micro().eval()
    with capture_attention(model) as maps:
        pass
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert maps == {}
    assert all(not lka.conv1._forward_hooks for _, lka in lka_modules(model))


def test_capture_attention_removes_hooks_after_error() -> None:
    model = micro().eval()
    with pytest.raises(RuntimeError), capture_attention(model):
        model(torch.randn(1, 2, 32, 32))  # wrong channel count
    assert all(not lka.conv1._forward_hooks for _, lka in lka_modules(model))


def test_capture_attention_keeps_gradients() -> None:
    model = micro().eval()
    with capture_attention(model) as maps:
        logits = model(torch.randn(1, 3, 32, 32))
    grads = torch.autograd.grad(logits[0, 0], list(maps.values()))
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_capture_attention_detach_gives_graph_free_tensors() -> None:
    model = micro().eval()
    with capture_attention(model, detach=True) as maps:
        model(torch.randn(1, 3, 32, 32))
    assert all(not t.requires_grad for t in maps.values())


def test_capture_attention_under_inference_mode() -> None:
    model = micro().eval()
    with torch.inference_mode(), capture_attention(model) as maps:
        model(torch.randn(1, 3, 32, 32))
    assert len(maps) == sum(VARIANTS["van_micro"].depths)
    assert all(torch.isfinite(t).all() for t in maps.values())


# --- import van_app: cheap, lazy, and registering the variants with timm whichever is imported first -------------

HEAVY = ("torch", "timm", "lightning", "gradio")
REGISTERED = "all(timm.is_model(v) for v in van_app.VARIANTS)"
HOOKS = "[f for f in sys.meta_path if type(f).__module__ == 'van_app.variants']"


def run_python(code: str, tmp_path: Path) -> None:
    """Run ``code`` as a script in a fresh interpreter; its assertions must hold."""
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(code))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow
def test_import_van_app_first_registers_when_timm_is_imported(tmp_path: Path) -> None:
    run_python(f"""
        import sys
        import van_app
        assert not set({HEAVY}) & set(sys.modules), sorted(set({HEAVY}) & set(sys.modules))
        assert len({HOOKS}) == 1
        import timm
        assert {REGISTERED} and {HOOKS} == []
        assert timm.list_models("van_b*", pretrained=True) == [f"van_b{{i}}.in1k" for i in range(4)]
    """, tmp_path)


@pytest.mark.slow
def test_import_timm_first_registers_at_once(tmp_path: Path) -> None:
    run_python(f"""
        import sys
        import timm
        import van_app
        assert {REGISTERED} and {HOOKS} == []
    """, tmp_path)


@pytest.mark.slow
def test_spawned_worker_registers_the_variants(tmp_path: Path) -> None:
    # A spawned process (DataLoader workers, multiprocessing) re-imports the parent's main module, so its
    # `import van_app` runs there too before the worker's own `import timm`.
    run_python(f"""
        import multiprocessing
        import sys
        from concurrent.futures import ProcessPoolExecutor

        import van_app


        def registered() -> bool:
            import timm

            return {REGISTERED}


        if __name__ == "__main__":
            with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
                assert pool.submit(registered).result()
            assert "timm" not in sys.modules
    """, tmp_path)


@pytest.mark.slow
def test_public_names_load_lazily_and_submodules_do_not_shadow_them(tmp_path: Path) -> None:
    run_python("""
        import van_app.fuse
        import van_app.predict
        from van_app import *  # every name of __all__ resolves


        assert van_app.fuse is fuse and van_app.predict is predict and callable(fuse) and callable(predict)
        assert load_model("van_micro").variant == "van_micro" and VAN.__module__ == "van_app.model"
    """, tmp_path)


def test_a_fresh_model_keeps_vans_preprocessing_whatever_timms_registry_holds(monkeypatch):
    import timm.models._builder

    monkeypatch.setattr(timm.models._builder, "get_pretrained_cfg", lambda name, allow_unregistered=True: None)
    model = load_model("van_b0", num_classes=3)
    assert (model.pretrained_cfg["mean"], model.pretrained_cfg["std"]) == ((0.5,) * 3, (0.5,) * 3)
    assert model.pretrained_cfg["interpolation"] == "bicubic" and model.pretrained_cfg["crop_pct"] == 0.9
