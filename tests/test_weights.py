"""Loading VAN weights from every supported source, checked against the peer implementations' own outputs."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from safetensors.torch import load_file, save_file
from timm.layers import DropPath

import van_app
from van_app import CheckpointError, load_model
from van_app.errors import MESSAGE_LIMIT
from van_app.convert import checkpoint_filter_fn, rename_keys
from van_app.variants import imagenet_labels

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
        "architecture": model.pretrained_cfg["architecture"],
        "model_args": model.model_args,
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
    assert model.model_args["embed_dims"] == (8, 16, 32, 64) and model.model_args["depths"] == (1, 2, 1, 1)


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


def assert_one_line_error_naming(path: Path, match: str, **kwargs) -> CheckpointError:
    """``load_model(path)`` fails with one short line that names ``path`` and matches ``match``."""
    with pytest.raises(CheckpointError, match=match) as error:
        load_model(path, **kwargs)
    message = str(error.value)
    assert "\n" not in message and str(path) in message and len(message) <= MESSAGE_LIMIT
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
    assert_one_line_error_naming(path, r"missing block stages\.1\.blocks\.0 of a stage with blocks up to 1")


def test_wrong_shapes_are_named_with_both_shapes(tmp_path: Path, official_raw) -> None:
    path = tmp_path / "shapes.pth"
    bad = dict(official_raw, **{"block1.0.mlp.fc2.weight": torch.zeros(8, 32, 1, 1)})
    torch.save({"state_dict": bad}, path)
    assert_one_line_error_naming(
        path, r"wrong shape for 1 key: stages\.0\.blocks\.0\.mlp\.fc2\.weight \(8, 32, 1, 1\) vs \(8, 64, 1, 1\)")


def test_unexpected_keys_are_named(tmp_path: Path, official_raw) -> None:
    path = tmp_path / "extra.pth"
    torch.save({"state_dict": dict(official_raw, **{"block1.0.extra.weight": torch.zeros(3)})}, path)
    assert_one_line_error_naming(path, r"unexpected 1 key: stages\.0\.blocks\.0\.extra\.weight")


def test_directory_without_config_is_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes((TRANSFORMERS / "model.safetensors").read_bytes())
    assert_one_line_error_naming(tmp_path, "no config.json")


def test_unknown_source_is_one_line_error() -> None:
    with pytest.raises(CheckpointError, match="not a variant .* a checkpoint file"):
        load_model("no such thing")


# --- malformed inputs: each is one short CheckpointError, refused before a model is built ---------------------------


def b0_patch_embeds() -> dict[str, torch.Tensor]:
    """The four patch-embedding kernels of van_b0, in our layout: enough for widths to be inferred."""
    dims, previous, tensors = (32, 64, 160, 256), 3, {}
    for i, dim in enumerate(dims):
        kernel = 7 if i == 0 else 3
        tensors[f"stages.{i}.patch_embed.proj.weight"] = torch.zeros(dim, previous, kernel, kernel)
        previous = dim
    return tensors


@pytest.fixture
def van_inits(monkeypatch: pytest.MonkeyPatch) -> list[torch.device]:
    """The default device of every ``VAN`` built from now on in this test (meta for shape checks)."""
    from van_app.model import VAN

    devices, init = [], VAN.__init__

    def recording_init(self, *args, **kwargs) -> None:
        devices.append(torch.get_default_device())
        init(self, *args, **kwargs)

    monkeypatch.setattr(VAN, "__init__", recording_init)
    return devices


@pytest.mark.parametrize("blocks", [[300], list(range(300))], ids=["block 300 alone", "300 blocks of one tensor"])
def test_crafted_block_count_is_refused_quickly_without_building_a_model(tmp_path: Path, van_inits, blocks) -> None:
    tensors = dict(b0_patch_embeds(), **{f"stages.3.blocks.{j}.layer_scale_1": torch.zeros(256) for j in blocks})
    path = tmp_path / "crafted.safetensors"
    save_file(tensors, path)
    start = time.perf_counter()
    error = assert_one_line_error_naming(path, "missing")
    assert time.perf_counter() - start < 1.0
    assert all(device.type == "meta" for device in van_inits)
    assert ("missing block stages.3.blocks.0" in str(error)) == (blocks == [300])


def test_many_missing_keys_are_counted_and_a_few_named(tmp_path: Path) -> None:
    path = tmp_path / "embeds.safetensors"
    save_file(b0_patch_embeds(), path)
    assert_one_line_error_naming(path, r"missing [\d,]+ keys, e\.g\. stages\.0\.patch_embed\.proj\.bias, ")


def test_huge_unprintable_key_is_named_in_a_short_printable_line(tmp_path: Path, official_raw) -> None:
    path = tmp_path / "huge_key.pth"
    torch.save({"state_dict": dict(official_raw, **{"block1.0.\n" + "x" * 100_000: torch.zeros(3)})}, path)
    error = assert_one_line_error_naming(path, r"unexpected 1 key: stages\.0\.blocks\.0\.\?xxx+…")
    assert str(error).isprintable()


def _expanded(t: torch.Tensor) -> torch.Tensor:
    """``t``'s shape over a one-element storage: a file claiming far more data than it holds."""
    return torch.zeros(1).expand(t.shape)


BAD_TENSORS = {
    "zero-size kernel": ("patch_embed1.proj.weight", lambda t: t[:0], r"is empty \(shape \(0, 3, 7, 7\)\)"),
    "zero-size head": ("head.weight", lambda t: t[:0], "is empty"),
    "integer weights": ("block1.0.mlp.fc1.weight", lambda t: t.to(torch.int32), "holds torch.int32, not floating"),
    "NaN": ("norm2.weight", lambda t: t.clone().fill_(float("nan")), "NaN or infinite"),
    "infinity": ("block2.1.layer_scale_1", lambda t: t.clone().fill_(float("inf")), "NaN or infinite"),
    "not a tensor": ("norm1.bias", lambda t: t.tolist(), "is a list, not a tensor"),
    "broadcast storage": ("block1.0.mlp.fc1.weight", _expanded, "claim [\\d,]+ bytes but the file holds"),
}


@pytest.mark.parametrize("key, change, match", BAD_TENSORS.values(), ids=BAD_TENSORS.keys())
def test_malformed_tensor_is_refused(tmp_path: Path, official_raw, van_inits, key, change, match) -> None:
    path = tmp_path / "bad.pth"
    torch.save({"state_dict": dict(official_raw, **{key: change(official_raw[key])})}, path)
    assert_one_line_error_naming(path, match)
    assert not van_inits


def test_one_storage_under_two_names_is_refused(tmp_path: Path, official_raw) -> None:
    path = tmp_path / "shared.pth"
    big = official_raw["block1.0.mlp.fc1.weight"]
    torch.save({"state_dict": dict(official_raw, **{"block1.0.mlp.fc2.weight": big.view(8, 64, 1, 1)})}, path)
    assert_one_line_error_naming(path, "claim [\\d,]+ bytes but the file holds")


def test_non_string_keys_are_not_a_van_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "int_keys.pth"
    torch.save({0: torch.zeros(3), 1: torch.ones(3)}, path)
    assert_one_line_error_naming(path, "not a VAN checkpoint")


def export_with_config(directory: Path, **changes) -> Path:
    """A valid three-class micro export whose config.json has ``changes`` applied (None removes a key)."""
    write_export(directory, micro_with_head(3), ["a", "b", "c"], input_size=[3, 64, 64])
    config = json.loads((directory / "config.json").read_text())
    for key, value in changes.items():
        target = config["pretrained_cfg"] if key in PREPROCESSING else config
        target[key] = value
    (directory / "config.json").write_text(json.dumps(config))
    return directory


PREPROCESSING = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")
BAD_CONFIGS = {
    "labels not strings": ({"label_names": [1, 2, 3]}, "label_names must be a list of strings"),
    "labels not a list": ({"label_names": "a b c"}, "label_names must be a list of strings"),
    "repeated labels": ({"label_names": ["a", "b", "a"]}, "label_names: repeated 1 label: a"),
    "too few labels": ({"label_names": ["a", "b"]}, "2 labels for a head of 3 classes"),
    "unknown interpolation": ({"interpolation": "fancy"}, "interpolation 'fancy' is not one of timm's"),
    "interpolation not a string": ({"interpolation": ["bicubic"]}, "is not one of timm's"),
    "input size 0": ({"input_size": [3, 0, 0]}, r"input_size must be \[3, height, width\] with sides from 32"),
    "input size 1536": ({"input_size": [3, 1536, 1536]}, "input_size must be"),
    "input size two numbers": ({"input_size": [64, 64]}, "input_size must be"),
    "input size one channel": ({"input_size": [1, 64, 64]}, "input_size must be"),
    "input size fractional": ({"input_size": [3, 64.5, 64]}, "input_size must be"),
    "crop pct 0": ({"crop_pct": 0}, r"crop_pct must be a number in \(0, 1\]"),
    "crop pct above 1": ({"crop_pct": 1.5}, "crop_pct must be"),
    "crop pct NaN": ({"crop_pct": float("nan")}, "crop_pct must be"),
    "crop pct a string": ({"crop_pct": "0.9"}, "crop_pct must be"),
    "unknown crop mode": ({"crop_mode": "zoom"}, "crop_mode must be one of center, squash, border"),
    "two means": ({"mean": [0.5, 0.5]}, "mean must be three finite numbers"),
    "mean not numbers": ({"mean": ["a", 0, 0]}, "mean must be three finite numbers"),
    "mean infinite": ({"mean": [0.5, float("inf"), 0.5]}, "mean must be three finite numbers"),
    "std zero": ({"std": [0.5, 0, 0.5]}, "std must be three finite numbers above 0"),
    "std negative": ({"std": [-0.5, 0.5, 0.5]}, "std must be three finite numbers above 0"),
    "pretrained_cfg not an object": ({"pretrained_cfg": [1]}, "pretrained_cfg must be a JSON object"),
}


@pytest.mark.parametrize("changes, match", BAD_CONFIGS.values(), ids=BAD_CONFIGS.keys())
def test_malformed_export_config_is_refused(tmp_path: Path, van_inits, changes, match) -> None:
    export = export_with_config(tmp_path / "export", **changes)
    van_inits.clear()
    assert_one_line_error_naming(export, match)
    assert all(device.type == "meta" for device in van_inits)


@pytest.mark.parametrize("text, match", [
    ('["architecture", "van_micro"]', "must hold a JSON object, found list"),
    ('"van_micro"', "must hold a JSON object, found str"),
    ('{"architecture": ', "not valid JSON"),
    ("[" * 100_000, "not valid JSON"),
], ids=["list", "string", "truncated", "deeply nested"])
def test_config_that_is_not_a_json_object_is_refused(tmp_path: Path, text: str, match: str) -> None:
    export = export_with_config(tmp_path / "export")
    (export / "config.json").write_text(text)
    assert_one_line_error_naming(export, match)


def test_oversized_config_is_refused_before_reading(tmp_path: Path) -> None:
    export = export_with_config(tmp_path / "export")
    (export / "config.json").write_text(" " * (9 * 2**20) + "{}")
    assert_one_line_error_naming(export, r"[\d,]+ bytes, more than the [\d,]+ allowed for config.json")


@pytest.mark.parametrize("id2label, match", [
    ({"0": "apple", "2": "bear"}, "number its 2 classes 0, 1, ... without gaps"),
    ({"first": "apple"}, "id2label must map class indices"),
    ({str(i): 5 for i in range(10)}, r"id2label must map class indices .* to names \(strings\)"),
    ({str(i): "same" if i % 2 else f"odd {i}" for i in range(10)}, "id2label: repeated 1 label: same$"),
], ids=["gap", "not an index", "not strings", "repeated"])
def test_malformed_transformers_id2label_is_refused(tmp_path: Path, id2label: dict, match: str) -> None:
    config = json.loads((TRANSFORMERS / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, id2label=id2label)))
    (tmp_path / "model.safetensors").write_bytes((TRANSFORMERS / "model.safetensors").read_bytes())
    assert_one_line_error_naming(tmp_path, match)


# --- max_bytes: a weights file larger than allowed is never read (nor downloaded) -----------------------------------


def test_max_bytes_refuses_a_larger_file_before_reading_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: pytest.fail("read despite max_bytes"))
    size = OFFICIAL.stat().st_size
    assert_one_line_error_naming(OFFICIAL, f"{size:,} bytes, more than the {size - 1:,} allowed", max_bytes=size - 1)


def test_max_bytes_refuses_a_larger_export(tmp_path: Path) -> None:
    export = export_with_config(tmp_path / "export")
    assert_one_line_error_naming(export, r"model\.safetensors: [\d,]+ bytes, more than the 1,000 allowed",
                                 max_bytes=1000)


def test_max_bytes_admits_a_file_of_exactly_that_size() -> None:
    assert_same_weights(load_model(OFFICIAL, max_bytes=OFFICIAL.stat().st_size), load_model(OFFICIAL))


@pytest.fixture
def online_hub(hub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The fake Hub as huggingface_hub's endpoint (HF_ENDPOINT), online, with an empty cache."""
    endpoint = f"http://127.0.0.1:{hub.server_port}"
    cache = tmp_path / "hub-cache"
    for name, value in {"HF_ENDPOINT": endpoint, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "0"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return hub


def serve_export(hub, repo_id: str, export: Path) -> int:
    """Put an export's config and weights on the fake Hub; the weights' size."""
    for name in ("config.json", "model.safetensors"):
        hub.files[f"{repo_id}/{name}"] = (export / name).read_bytes()
    return len(hub.files[f"{repo_id}/model.safetensors"])


def test_max_bytes_refuses_a_hub_file_from_its_metadata_without_downloading_it(tmp_path: Path, online_hub) -> None:
    size = serve_export(online_hub, "alice/shapes", export_with_config(tmp_path / "export"))
    with pytest.raises(CheckpointError, match=f"alice/shapes/model.safetensors: {size:,} bytes, more than the 1,000"):
        load_model("alice/shapes", max_bytes=1000)
    assert [r["method"] for r in online_hub.requests if r["path"].endswith("/model.safetensors")] == ["HEAD"]


def test_max_bytes_admits_a_hub_file_within_it(tmp_path: Path, online_hub) -> None:
    export = export_with_config(tmp_path / "export")
    size = serve_export(online_hub, "alice/shapes", export)
    assert_same_weights(load_model("alice/shapes", max_bytes=size), load_model(export))


def test_max_bytes_refuses_official_weights_before_downloading_them(online_hub) -> None:
    online_hub.files["Visual-Attention-Network/VAN-Tiny-original/van_tiny_754.pth.tar"] = b"\x80" * 5000
    with pytest.raises(CheckpointError, match="van_tiny_754.pth.tar: 5,000 bytes, more than the 4,999 allowed"):
        load_model("van_b0", pretrained=True, max_bytes=4999)
    assert "GET" not in [r["method"] for r in online_hub.requests]


def test_pretrained_variants_are_those_with_official_weights() -> None:
    assert van_app.pretrained_variants() == ["van_b0", "van_b1", "van_b2", "van_b3"]


# --- one build path: model arguments reach the one build; our exports load through timm --------------------------


def test_model_kwargs_reach_the_build_of_a_checkpoint(official_raw) -> None:
    model = load_model(OFFICIAL, drop_path_rate=0.2, drop_rate=0.1)
    assert (model.model_args["drop_path_rate"], model.model_args["drop_rate"]) == (0.2, 0.1)
    assert max(m.drop_prob for m in model.modules() if isinstance(m, DropPath)) == pytest.approx(0.2)
    assert_same_weights(model, load_model(OFFICIAL))


def test_model_kwargs_reach_the_build_of_an_export(tmp_path: Path) -> None:
    export = write_export(tmp_path / "export", micro_with_head(3), ["a", "b", "c"])
    model = load_model(export, num_classes=5, drop_path_rate=0.3)
    assert (model.num_classes, model.model_args["drop_path_rate"]) == (5, 0.3)
    assert model.labels == [f"class_{i}" for i in range(5)]
    body = {k: v for k, v in load_model(export).state_dict().items() if not k.startswith("head.")}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in body.items())


def test_a_fresh_variant_takes_its_layer_scale_init() -> None:
    model = load_model("van_micro", num_classes=2, layer_scale_init=0.5)
    assert model.model_args["layer_scale_init"] == 0.5 and model.stages[1].blocks[0].layer_scale_2[0].item() == 0.5


@pytest.mark.parametrize("kwarg", [{"depths": (1, 1, 1, 1)}, {"embed_dims": (8, 8, 8, 8)}, {"in_chans": 1}])
def test_architecture_kwargs_are_refused_for_weights(kwarg: dict) -> None:
    with pytest.raises(TypeError, match="come from the checkpoint"):
        load_model(OFFICIAL, **kwarg)


def test_export_loads_through_timm_local_dir(tmp_path: Path) -> None:
    import timm

    export = write_export(tmp_path / "export", micro_with_head(3), ["a", "b", "c"])
    model = load_model(export)
    assert model.pretrained_cfg["source"] == "local-dir" and model.pretrained_cfg["file"] == str(export)
    assert_same_weights(timm.create_model(f"local-dir:{export}", pretrained=True), model)


def test_bundled_export_loads_the_same_through_timm_and_load_model() -> None:
    import timm

    bundled = Path(__file__).parents[1] / "checkpoints" / "van-b0-shapes"
    model, plain = load_model(bundled), timm.create_model(f"local-dir:{bundled}", pretrained=True).eval()
    assert model.variant == "van_b0" and model.labels == ["circle", "cross", "ring", "square", "star", "triangle"]
    assert model.model_args["embed_dims"] == (32, 64, 160, 256)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)


def test_timm_refuses_an_export_with_nan_through_the_checkpoint_filter(tmp_path: Path) -> None:
    import timm

    source = micro_with_head(3)
    with torch.no_grad():
        source.stages[2].norm.weight[0] = float("nan")
    export = write_export(tmp_path / "export", source, ["a", "b", "c"])
    with pytest.raises(CheckpointError, match=r"stages\.2\.norm\.weight holds NaN"):
        timm.create_model(f"local-dir:{export}", pretrained=True)


BAD_EXPORT_CONFIGS = {
    "depths beyond the weights": ({"model_args": {"depths": [1, 1, 300, 1]}},
                                  r"holds \[1, 1, 2, 1\] blocks per stage but config.json says \[1, 1, 300, 1\]"),
    "widths beyond the weights": ({"model_args": {"embed_dims": [8, 16, 32, 4096]}}, "wrong shape for"),
    "unknown model argument": ({"model_args": {"img_size": 64}}, "model_args: unknown 1 argument: img_size"),
    "negative depth": ({"model_args": {"depths": [1, 1, -2, 1]}}, "model_args depths must be four integers"),
    "grey input": ({"model_args": {"in_chans": 1}}, r"model_args in_chans must be 3 \(RGB images\)"),
    "model_args not an object": ({"model_args": [8, 16]}, "model_args must be a JSON object"),
    "unknown architecture": ({"architecture": "resnet50"}, "architecture 'resnet50' is not a VAN variant"),
    "weights from a url": ({"url": "http://example.com/w.pth"}, r"pretrained_cfg: unknown or refused 1 key: url"),
    "another hub file": ({"hf_hub_filename": "other.bin"}, "unknown or refused 1 key: hf_hub_filename"),
    "unknown pretrained_cfg key": ({"colour": "red"}, "unknown or refused 1 key: colour"),
    "another classifier": ({"classifier": "fc"}, "pretrained_cfg classifier must be 'head'"),
    "class count disagreeing": ({"num_classes": 4}, "num_classes is 4, but the weights' head has 3 classes"),
}


@pytest.mark.parametrize("changes, match", BAD_EXPORT_CONFIGS.values(), ids=BAD_EXPORT_CONFIGS.keys())
def test_export_config_disagreeing_with_its_weights_is_refused_before_building(
        tmp_path: Path, van_inits, changes, match) -> None:
    export = export_with_config(tmp_path / "export")
    config = json.loads((export / "config.json").read_text())
    for key, value in changes.items():
        target = config if key in ("model_args", "architecture", "num_classes") else config["pretrained_cfg"]
        target[key] = dict(config["model_args"], **value) if key == "model_args" and isinstance(value, dict) else value
    (export / "config.json").write_text(json.dumps(config))
    van_inits.clear()
    assert_one_line_error_naming(export, match)
    assert all(device.type == "meta" for device in van_inits)


# --- adding a variant is one row ----------------------------------------------------------------------------------


@pytest.fixture
def new_row(monkeypatch: pytest.MonkeyPatch) -> str:
    """A variant added as one row of the table, with official weights on a Hub repo of its own."""
    from van_app.variants import VARIANTS, VanSpec

    monkeypatch.setitem(VARIANTS, "van_row_test", VanSpec((8, 8, 16, 16), (1, 2, 1, 1), (2, 2, 3, 3),
                                                          weights=("someone/van-row", "row.pth.tar")))
    return "van_row_test"


def test_a_new_row_builds_and_names_fresh_and_foreign_models(tmp_path: Path, new_row: str) -> None:
    fresh = load_model(new_row, num_classes=4)
    assert fresh.variant == new_row and fresh.model_args["embed_dims"] == (8, 8, 16, 16)
    torch.save({"state_dict": to_official(fresh.state_dict())}, tmp_path / "row.pth")
    assert load_model(tmp_path / "row.pth").variant == new_row
    assert new_row in van_app.pretrained_variants()


def test_a_new_row_loads_its_official_weights(hub_cache: Path, new_row: str) -> None:
    expected = load_model(new_row)
    snapshot = cached_snapshot(hub_cache, "someone/van-row")
    torch.save({"state_dict": to_official(expected.state_dict())}, snapshot / "row.pth.tar")
    model = load_model(new_row, pretrained=True)
    assert model.variant == new_row and model.pretrained_cfg["hf_hub_id"] == "someone/van-row"
    assert_same_weights(model, expected)


def test_a_new_row_round_trips_an_export_through_timm(tmp_path: Path, new_row: str) -> None:
    import timm

    source = load_model(new_row, num_classes=2)
    model = load_model(write_export(tmp_path / "export", source, ["yes", "no"]))
    assert model.variant == new_row and timm.create_model(new_row).model_args["depths"] == (1, 2, 1, 1)
    assert_same_weights(model, source)


@pytest.fixture
def unreachable_hub(hub_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Online mode, an empty cache, and a Hub endpoint whose host does not resolve."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "https://hub.invalid")
    return hub_cache


def test_unreachable_hub_fails_at_once_without_retries(unreachable_hub: Path) -> None:
    started = time.monotonic()
    with pytest.raises(CheckpointError, match=r"not in the local Hugging Face cache and the Hub \(hub.invalid\) "
                                              r"cannot be reached .*HF_HUB_OFFLINE=1"):
        load_model("van_b0", pretrained=True)
    assert time.monotonic() - started < 10  # huggingface_hub alone retries for ~24 s


def test_cached_official_weights_load_without_asking_the_hub(unreachable_hub: Path) -> None:
    expected = load_model("van_b0")
    snapshot = cached_snapshot(unreachable_hub, "Visual-Attention-Network/VAN-Tiny-original")
    torch.save({"state_dict": to_official(expected.state_dict())}, snapshot / "van_tiny_754.pth.tar")
    assert_same_weights(load_model("van_b0", pretrained=True), expected)
