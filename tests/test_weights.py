"""Loading VAN weights from every supported source, checked against the peer implementations' own outputs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file, save_file

from van_app import CheckpointError, load_model
from van_app.weights import checkpoint_filter_fn, imagenet_labels, rename_keys

FIXTURES = Path(__file__).parent / "fixtures"
OFFICIAL = FIXTURES / "official_tiny.pth.tar"
TRANSFORMERS = FIXTURES / "transformers_tiny"
COMMIT = "0123456789abcdef0123456789abcdef01234567"

# Our key layout back to the official one (the inverse of weights._OFFICIAL_RULES), to write official-style files.
_TO_OFFICIAL = [
    (r"^stages\.(\d)\.patch_embed\.", lambda m: f"patch_embed{int(m[1]) + 1}."),
    (r"^stages\.(\d)\.blocks\.(\d+)\.", lambda m: f"block{int(m[1]) + 1}.{m[2]}."),
    (r"^stages\.(\d)\.norm\.", lambda m: f"norm{int(m[1]) + 1}."),
    (r"\.attn\.lka\.", ".attn.spatial_gating_unit."),
    (r"\.mlp\.dwconv\.", ".mlp.dwconv.dwconv."),
]


def to_official(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A van_app state dict renamed to VAN-Classification's keys."""
    return rename_keys(state_dict, _TO_OFFICIAL)


@pytest.fixture(scope="module")
def reference() -> dict[str, torch.Tensor]:
    """The fixed 224 px input and each peer's logits and pooled features for it."""
    tensors = load_file(FIXTURES / "reference.safetensors")
    tensors["input"] = tensors["input"].float()
    return tensors


@pytest.fixture(scope="module")
def official_raw() -> dict[str, torch.Tensor]:
    return torch.load(OFFICIAL, map_location="cpu", weights_only=True)["state_dict"]


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty, offline Hugging Face cache (constants are read at import, so patch them as well as the env)."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def cached_snapshot(cache: Path, repo_id: str) -> Path:
    """The snapshot folder of ``repo_id`` at ``main`` in the hub cache layout (refs/main -> snapshots/<sha>)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    return snapshot


def logits_and_features(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        unpooled = model.forward_features(x)
        return model.forward_head(unpooled), model.forward_head(unpooled, pre_logits=True)


def assert_matches_peer(ours: torch.Tensor, peer: torch.Tensor) -> None:
    """Within 1e-4 everywhere, and finite (a NaN on either side fails)."""
    assert torch.isfinite(ours).all() and torch.isfinite(peer).all()
    torch.testing.assert_close(ours, peer, rtol=0, atol=1e-4)


def assert_same_weights(model: torch.nn.Module, expected: torch.nn.Module) -> None:
    """Every tensor of ``expected`` is in ``model``, bit for bit."""
    ours = model.state_dict()
    assert ours.keys() == expected.state_dict().keys()
    assert all(torch.equal(ours[k], v) for k, v in expected.state_dict().items())


def write_export(directory: Path, model: torch.nn.Module, labels: list[str], **pretrained_cfg) -> Path:
    """A van_app export as ``export.py`` writes it: timm-style config.json and model.safetensors."""
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, directory / "model.safetensors")
    config = {
        "architecture": "van_micro",
        "model_args": {"embed_dims": [8, 16, 32, 64], "depths": [1, 1, 2, 1], "mlp_ratios": [8, 8, 4, 4]},
        "num_classes": len(labels),
        "label_names": labels,
        "pretrained_cfg": {"num_classes": len(labels), **pretrained_cfg},
    }
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def micro_with_head(num_classes: int) -> torch.nn.Module:
    torch.manual_seed(0)
    model = load_model("van_micro", num_classes=num_classes)
    with torch.no_grad():  # non-trivial norms and scales, so a mix-up of tensors would show
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.uniform_(0.05, 0.5)
    return model


def test_official_checkpoint_matches_official_logits(reference: dict[str, torch.Tensor]) -> None:
    logits, features = logits_and_features(load_model(OFFICIAL), reference["input"])
    assert_matches_peer(features, reference["official_features"])
    assert_matches_peer(logits, reference["official_logits"])


def test_transformers_directory_matches_transformers_logits(reference: dict[str, torch.Tensor]) -> None:
    logits, features = logits_and_features(load_model(TRANSFORMERS), reference["input"])
    assert_matches_peer(features, reference["transformers_features"])
    assert_matches_peer(logits, reference["transformers_logits"])


def test_transformers_labels_come_from_id2label() -> None:
    assert load_model(TRANSFORMERS).labels == ["apple", "bear", "car", "dog", "eel", "fox", "goat", "hat", "ink", "jar"]


def test_transformers_pytorch_model_bin_is_read_too(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text((TRANSFORMERS / "config.json").read_text())
    torch.save(load_file(TRANSFORMERS / "model.safetensors"), tmp_path / "pytorch_model.bin")
    assert_same_weights(load_model(tmp_path), load_model(TRANSFORMERS))


def test_official_checkpoint_loads_through_ddp_prefix(tmp_path: Path, official_raw) -> None:
    path = tmp_path / "ddp.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in official_raw.items()}, "epoch": 3}, path)
    assert_same_weights(load_model(path), load_model(OFFICIAL))


def test_to_official_helper_reproduces_official_keys(official_raw) -> None:
    assert set(to_official(load_model(OFFICIAL).state_dict())) == set(official_raw)


def test_checkpoint_filter_fn_is_identity_on_our_layout() -> None:
    state = load_model("van_micro").state_dict()
    assert checkpoint_filter_fn(state).keys() == state.keys()


def test_norm_epsilons_match_both_peers() -> None:
    # Logits barely move with LayerNorm eps (1e-6 vs 1e-5 shifts them by ~2e-6), so pin the constants themselves:
    # official norm_layer=partial(nn.LayerNorm, eps=1e-6), transformers layer_norm_eps=1e-6, BatchNorm defaults.
    model = load_model(OFFICIAL)
    assert {stage.norm.eps for stage in model.stages} == {1e-6}
    batch_norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert {m.eps for m in batch_norms} == {1e-5}
    assert json.loads((TRANSFORMERS / "config.json").read_text())["layer_norm_eps"] == 1e-6


def test_official_van_b0_layout_is_inferred_as_van_b0(tmp_path: Path) -> None:
    torch.manual_seed(0)
    path = tmp_path / "van_b0.pth.tar"
    torch.save({"state_dict": to_official(load_model("van_b0").state_dict())}, path)
    model = load_model(path)
    assert model.variant == "van_b0"
    assert model.pretrained_cfg["architecture"] == "van_b0"
    assert len(model.labels) == 1000 and model.labels[0] == imagenet_labels()[0]


def test_tiny_official_layout_is_custom() -> None:
    model = load_model(OFFICIAL)
    assert model.variant == "custom"
    assert model.embed_dims == (8, 16, 32, 64) and model.depths == (1, 2, 1, 1)


def test_num_classes_differing_replaces_only_the_head(official_raw) -> None:
    original, replaced = load_model(OFFICIAL), load_model(OFFICIAL, num_classes=3)
    assert replaced.head.weight.shape == (3, 64)
    assert replaced.labels == ["class_0", "class_1", "class_2"]
    ours, theirs = original.state_dict(), replaced.state_dict()
    for key, value in ours.items():
        if not key.startswith("head."):
            assert torch.equal(theirs[key], value), key


def test_num_classes_differing_drops_transformers_labels() -> None:
    assert load_model(TRANSFORMERS, num_classes=4).labels == [f"class_{i}" for i in range(4)]


def test_models_load_in_eval_mode() -> None:
    assert not load_model(OFFICIAL).training


def test_export_round_trips_labels_preprocessing_and_logits(tmp_path: Path) -> None:
    source = micro_with_head(3)
    export = write_export(tmp_path / "export", source, ["circle", "square", "star"], input_size=[3, 64, 64],
                          interpolation="bilinear", mean=[0.4, 0.3, 0.2], std=[0.2, 0.25, 0.3], crop_pct=1.0)
    model = load_model(export)
    from timm.data import resolve_data_config

    cfg = resolve_data_config(model=model)
    assert model.labels == ["circle", "square", "star"]
    assert model.variant == "van_micro"
    assert (cfg["input_size"], cfg["interpolation"], cfg["crop_pct"]) == ((3, 64, 64), "bilinear", 1.0)
    assert cfg["mean"] == (0.4, 0.3, 0.2) and cfg["std"] == (0.2, 0.25, 0.3)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x), rtol=0, atol=0)


def test_export_without_preprocessing_gets_official_defaults(tmp_path: Path) -> None:
    model = load_model(write_export(tmp_path / "export", micro_with_head(2), ["a", "b"]))
    assert model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5) and model.pretrained_cfg["crop_pct"] == 0.9


def test_export_with_wrong_label_count_is_refused(tmp_path: Path) -> None:
    export = write_export(tmp_path / "export", micro_with_head(3), ["a", "b"])
    with pytest.raises(CheckpointError, match="2 labels for a head of 3 classes"):
        load_model(export)


def test_pretrained_van_b0_comes_from_the_hub_cache(hub_cache: Path) -> None:
    torch.manual_seed(1)
    expected = load_model("van_b0")
    snapshot = cached_snapshot(hub_cache, "Visual-Attention-Network/VAN-Tiny-original")
    torch.save({"state_dict": to_official(expected.state_dict()), "epoch": 299}, snapshot / "van_tiny_754.pth.tar")
    model = load_model("van_b0", pretrained=True)
    assert model.variant == "van_b0"
    assert model.labels == imagenet_labels() and len(model.labels) == 1000
    assert model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5)
    assert_same_weights(model, expected)


def test_timm_create_model_pretrained_reads_the_same_official_file(hub_cache: Path) -> None:
    import timm

    torch.manual_seed(2)
    expected = load_model("van_b0")
    snapshot = cached_snapshot(hub_cache, "Visual-Attention-Network/VAN-Tiny-original")
    torch.save({"state_dict": to_official(expected.state_dict())}, snapshot / "van_tiny_754.pth.tar")
    assert_same_weights(timm.create_model("van_b0", pretrained=True), expected)
    assert timm.create_model("van_b0", pretrained=True, num_classes=5).head.out_features == 5


def test_pretrained_van_b0_not_cached_offline_is_one_line_error(hub_cache: Path) -> None:
    with pytest.raises(CheckpointError, match="van_tiny_754.pth.tar: not in the local Hugging Face cache") as error:
        load_model("van_b0", pretrained=True)
    assert "\n" not in str(error.value)


def test_pretrained_variant_without_official_weights_is_refused() -> None:
    with pytest.raises(CheckpointError, match="no official pretrained weights"):
        load_model("van_micro", pretrained=True)


@pytest.mark.parametrize("prefix", ["", "hf-hub:"])
def test_hub_repo_id_loads_an_export_from_the_cache(hub_cache: Path, prefix: str) -> None:
    source = micro_with_head(2)
    write_export(cached_snapshot(hub_cache, "someone/shapes"), source, ["cat", "dog"])
    model = load_model(f"{prefix}someone/shapes")
    assert model.labels == ["cat", "dog"]
    assert_same_weights(model, source)


def test_hub_repo_id_loads_transformers_from_the_cache(hub_cache: Path) -> None:
    snapshot = cached_snapshot(hub_cache, "someone/van-tiny")
    for name in ("config.json", "model.safetensors"):
        (snapshot / name).write_bytes((TRANSFORMERS / name).read_bytes())
    model = load_model("someone/van-tiny")
    assert model.labels[0] == "apple"
    assert_same_weights(model, load_model(TRANSFORMERS))


def test_hub_repo_without_weights_in_cache_names_the_missing_file(hub_cache: Path) -> None:
    snapshot = cached_snapshot(hub_cache, "someone/half")
    (snapshot / "config.json").write_text(json.dumps({"architecture": "van_micro"}))
    with pytest.raises(CheckpointError, match="someone/half/model.safetensors: not in the local Hugging Face cache"):
        load_model("someone/half")


def assert_one_line_error_naming(path: Path, match: str) -> CheckpointError:
    with pytest.raises(CheckpointError, match=match) as error:
        load_model(path)
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    return error.value


def test_truncated_checkpoint_is_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "truncated.pth.tar"
    path.write_bytes(OFFICIAL.read_bytes()[: OFFICIAL.stat().st_size // 2])
    assert_one_line_error_naming(path, "truncated or corrupt")


def test_truncated_safetensors_is_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    data = (TRANSFORMERS / "model.safetensors").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    assert_one_line_error_naming(path, "not a readable safetensors file")


def test_empty_file_is_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "empty.pth"
    path.touch()
    assert_one_line_error_naming(path, "empty file")


def test_random_bytes_are_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "noise.bin"
    path.write_bytes(os.urandom(1000).replace(b"\x80", b"\x00").replace(b"PK", b"pk"))
    assert_one_line_error_naming(path, "neither safetensors nor a PyTorch file")


def test_safetensors_is_recognised_by_content_not_name(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text((TRANSFORMERS / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes((TRANSFORMERS / "model.safetensors").read_bytes())
    assert_same_weights(load_model(tmp_path), load_model(TRANSFORMERS))


def test_non_van_state_dict_is_one_line_error(tmp_path: Path) -> None:
    path = tmp_path / "resnet.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "bn1.weight": torch.ones(64),
                "fc.weight": torch.zeros(1000, 512), "fc.bias": torch.zeros(1000)}, path)
    assert_one_line_error_naming(path, "not a VAN checkpoint.*'conv1.weight'")


class WritesMarker:
    """Unpickling this would run ``open(marker, 'w')``: a stand-in for arbitrary code."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_pickled_code_is_refused_and_never_run(tmp_path: Path, official_raw) -> None:
    path, marker = tmp_path / "evil.pth.tar", tmp_path / "marker"
    torch.save({"state_dict": official_raw, "hook": WritesMarker(marker)}, path)
    assert_one_line_error_naming(path, "refused to unpickle")
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_plain_pickle_with_code_is_refused_and_never_run(tmp_path: Path) -> None:
    import pickle

    path, marker = tmp_path / "evil.pkl", tmp_path / "marker"
    path.write_bytes(pickle.dumps({"weights": WritesMarker(marker)}))
    assert_one_line_error_naming(path, "refused to unpickle")
    assert not marker.exists()


def test_official_training_args_namespace_is_accepted(tmp_path: Path, official_raw) -> None:
    import argparse

    path = tmp_path / "with_args.pth.tar"
    torch.save({"state_dict": official_raw, "args": argparse.Namespace(lr=1e-3, model="van_b0")}, path)
    assert load_model(path).variant == "custom"


def test_missing_keys_are_all_named(tmp_path: Path, official_raw) -> None:
    dropped = ["block1.0.attn.proj_1.weight", "block2.1.mlp.fc2.bias", "norm4.weight"]
    path = tmp_path / "missing.pth"
    torch.save({"state_dict": {k: v for k, v in official_raw.items() if k not in dropped}}, path)
    error = assert_one_line_error_naming(path, "missing")
    for ours in ["stages.0.blocks.0.attn.proj_1.weight", "stages.1.blocks.1.mlp.fc2.bias", "stages.3.norm.weight"]:
        assert ours in str(error)


def test_missing_middle_block_is_named(tmp_path: Path, official_raw) -> None:
    path = tmp_path / "gap.pth"
    torch.save({"state_dict": {k: v for k, v in official_raw.items() if not k.startswith("block2.0.")}}, path)
    error = assert_one_line_error_naming(path, "missing")
    assert "stages.1.blocks.0.attn.proj_1.weight" in str(error)


def test_wrong_shapes_are_named_with_both_shapes(tmp_path: Path, official_raw) -> None:
    path = tmp_path / "shapes.pth"
    bad = dict(official_raw, **{"block1.0.mlp.fc2.weight": torch.zeros(8, 32, 1, 1)})
    torch.save({"state_dict": bad}, path)
    assert_one_line_error_naming(path, r"wrong shape: stages\.0\.blocks\.0\.mlp\.fc2\.weight \(8, 32, 1, 1\) vs \(8, 64, 1, 1\)")


def test_unexpected_keys_are_named(tmp_path: Path, official_raw) -> None:
    path = tmp_path / "extra.pth"
    torch.save({"state_dict": dict(official_raw, **{"block1.0.extra.weight": torch.zeros(3)})}, path)
    assert_one_line_error_naming(path, r"unexpected: stages\.0\.blocks\.0\.extra\.weight")


def test_directory_without_config_is_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes((TRANSFORMERS / "model.safetensors").read_bytes())
    assert_one_line_error_naming(tmp_path, "no config.json")


def test_unknown_source_is_one_line_error() -> None:
    with pytest.raises(CheckpointError, match="not a variant .* a checkpoint file"):
        load_model("no such thing")
