"""Every way a VAN's weights arrive: timm registry, official checkpoints, transformers, our exports.

All foreign layouts pass through one ``checkpoint_filter_fn`` that maps keys
onto ``model.VAN``'s names by an ordered rule table; loading after mapping is
strict and names every leftover. Nothing untrusted is unpickled: safetensors
first, ``torch.load(weights_only=True)`` otherwise.
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from timm.data import ImageNetInfo
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .errors import CheckpointError, first_line
from .files import EXPORT_CONFIG, EXPORT_WEIGHTS, TRANSFORMERS_BIN
from .model import VAN, VARIANTS, VanSpec


# The official weights were trained and validated with timm 0.4.12's ViT `_cfg()`:
# mean = std = 0.5, bicubic, crop pct 0.9 -- not ImageNet's mean/std.
VAN_MEAN = (0.5, 0.5, 0.5)
VAN_STD = (0.5, 0.5, 0.5)


def _cfg(hub: str = "", filename: str = "", **kwargs: Any) -> dict[str, Any]:
    """Pretrained config of an official VAN checkpoint on the Hugging Face Hub."""
    return {
        "hf_hub_id": f"Visual-Attention-Network/{hub}" if hub else None,
        "hf_hub_filename": filename or None,
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 0.9,
        "crop_mode": "center",
        "interpolation": "bicubic",
        "mean": VAN_MEAN,
        "std": VAN_STD,
        "first_conv": "stages.0.patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        "paper_ids": "arXiv:2202.09741",
        "paper_name": "Visual Attention Network",
        "origin_url": "https://github.com/Visual-Attention-Network/VAN-Classification",
        **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "van_b0.in1k": _cfg("VAN-Tiny-original", "van_tiny_754.pth.tar"),
    "van_b1.in1k": _cfg("VAN-Small-original", "van_small_811.pth.tar"),
    "van_b2.in1k": _cfg("VAN-Base-original", "van_base_828.pth.tar"),
    "van_b3.in1k": _cfg("VAN-Large-original", "van_large_839.pth.tar"),
    "van_b4": _cfg(),
    "van_b5": _cfg(),
    "van_b6": _cfg(),
    "van_micro": _cfg(),
})


# Ordered (pattern, replacement) rules from each foreign layout onto ours.
_OFFICIAL_RULES = [
    (r"^patch_embed(\d)\.", lambda m: f"stages.{int(m[1]) - 1}.patch_embed."),
    (r"^block(\d)\.(\d+)\.", lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}."),
    (r"^norm(\d)\.", lambda m: f"stages.{int(m[1]) - 1}.norm."),
    (r"\.attn\.spatial_gating_unit\.", ".attn.lka."),
    (r"\.mlp\.dwconv\.dwconv\.", ".mlp.dwconv."),
]
_TRANSFORMERS_RULES = [
    (r"^van\.encoder\.stages\.(\d+)\.embeddings\.convolution\.", r"stages.\1.patch_embed.proj."),
    (r"^van\.encoder\.stages\.(\d+)\.embeddings\.normalization\.", r"stages.\1.patch_embed.norm."),
    (r"^van\.encoder\.stages\.(\d+)\.layers\.(\d+)\.", r"stages.\1.blocks.\2."),
    (r"^van\.encoder\.stages\.(\d+)\.normalization\.", r"stages.\1.norm."),
    (r"\.pre_normomalization\.", ".norm1."),
    (r"\.post_normalization\.", ".norm2."),
    (r"\.attention\.pre_projection\.conv\.", ".attn.proj_1."),
    (r"\.attention\.attention_layer\.attention\.depth_wise\.", ".attn.lka.conv0."),
    (r"\.attention\.attention_layer\.attention\.depth_wise_dilated\.", ".attn.lka.conv_spatial."),
    (r"\.attention\.attention_layer\.attention\.point_wise\.", ".attn.lka.conv1."),
    (r"\.attention\.post_projection\.", ".attn.proj_2."),
    (r"\.attention_scaling\.weight$", ".layer_scale_1"),
    (r"\.mlp_scaling\.weight$", ".layer_scale_2"),
    (r"\.mlp\.in_dense\.", ".mlp.fc1."),
    (r"\.mlp\.depth_wise\.", ".mlp.dwconv."),
    (r"\.mlp\.out_dense\.", ".mlp.fc2."),
    (r"^classifier\.", "head."),
]
_TRANSFORMERS_UNUSED = re.compile(r"^van\.layernorm\.")


def checkpoint_filter_fn(state_dict: dict[str, Any], model: VAN | None = None) -> dict[str, torch.Tensor]:
    """Any VAN state dict (official, transformers, ours; wrapped or DDP-prefixed) in our key layout."""
    for wrapper in ("state_dict", "model", "state_dict_ema"):
        if wrapper in state_dict and isinstance(state_dict[wrapper], dict):
            state_dict = state_dict[wrapper]
            break
    state_dict = {k.removeprefix("module."): v for k, v in state_dict.items()}
    if any(k.startswith("van.encoder.") or k.startswith("classifier.") for k in state_dict):
        rules = _TRANSFORMERS_RULES
        state_dict = {k: v for k, v in state_dict.items() if not _TRANSFORMERS_UNUSED.match(k)}
    elif any(re.match(r"^(patch_embed|block)\d", k) for k in state_dict):
        rules = _OFFICIAL_RULES
    else:
        rules = []
    return rename_keys(state_dict, rules)


def rename_keys(state_dict: dict[str, Any], rules: list[tuple[str, Any]]) -> dict[str, Any]:
    """``state_dict`` with each key rewritten by the ordered ``(pattern, replacement)`` rules."""
    out = {}
    for key, value in state_dict.items():
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    return out


def infer_spec(state_dict: dict[str, torch.Tensor]) -> tuple[VanSpec, int]:
    """Widths, depths, MLP ratios and class count of a state dict in our layout."""
    dims, depths, ratios = [], [], []
    for i in range(4):
        proj = state_dict.get(f"stages.{i}.patch_embed.proj.weight")
        if proj is None:
            raise KeyError(f"stages.{i}.patch_embed.proj.weight")
        dims.append(proj.shape[0])
        blocks = {int(m[1]) for k in state_dict if (m := re.match(rf"^stages\.{i}\.blocks\.(\d+)\.", k))}
        depths.append(max(blocks, default=-1) + 1)  # a gap is then reported as missing keys, not hidden
        fc1 = state_dict.get(f"stages.{i}.blocks.0.mlp.fc1.weight")
        ratios.append(fc1.shape[0] / proj.shape[0] if fc1 is not None else 4)
    head = state_dict.get("head.weight")
    num_classes = head.shape[0] if head is not None else 0
    ratios = tuple(int(r) if float(r).is_integer() else r for r in ratios)
    return VanSpec(tuple(dims), tuple(depths), ratios), num_classes


def variant_of(spec: VanSpec) -> str | None:
    """The registered variant name with exactly this spec, if any."""
    return next((name for name, s in VARIANTS.items() if s == spec), None)


def _create_van(variant: str, pretrained: bool = False, **kwargs: Any) -> VAN:
    """Build a registered variant through timm (pretrained cfg, checkpoint filter, features_only)."""
    spec = VARIANTS[variant]
    model_args = dict(embed_dims=spec.embed_dims, depths=spec.depths, mlp_ratios=spec.mlp_ratios)
    return build_model_with_cfg(
        VAN,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
        **dict(model_args, **kwargs),
    )


def _register(variant: str) -> None:
    """Register ``variant`` as a timm model entrypoint."""

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> VAN:
        return _create_van(variant, pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = variant
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"VAN {variant} ({VARIANTS[variant]})."
    register_model(entrypoint)


for _variant in VARIANTS:
    _register(_variant)


def model_args(spec: VanSpec) -> dict[str, tuple]:
    """Constructor arguments of ``VAN`` for a spec (as stored in exported configs)."""
    return dict(embed_dims=tuple(spec.embed_dims), depths=tuple(spec.depths), mlp_ratios=tuple(spec.mlp_ratios))


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names in index order (from timm), shortest unambiguous form."""
    descriptions = ImageNetInfo().label_descriptions()
    short = [d.split(",")[0].strip() for d in descriptions]
    names = [s if short.count(s) == 1 else d for s, d in zip(short, descriptions)]
    return [n if names.count(n) == 1 else f"{n} ({i})" for i, n in enumerate(names)]


def default_labels(num_classes: int) -> list[str]:
    """Labels for a head with no names: ImageNet's for 1000 classes, else ``class_<i>``."""
    return imagenet_labels() if num_classes == 1000 else [f"class_{i}" for i in range(num_classes)]


def read_state_dict(path: Path) -> dict[str, Any]:
    """The raw dict in a checkpoint file: safetensors directly, pickles only with ``weights_only``."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file, expected a VAN checkpoint")
    with path.open("rb") as f:
        head = f.read(9)
    if path.suffix == ".safetensors" or _looks_like_safetensors(head, path.stat().st_size):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{path}: not a readable safetensors file ({first_line(e)})") from e
    if not head.startswith((b"PK", b"\x80")):  # torch's zip format or a legacy pickle
        raise CheckpointError(f"{path}: not a checkpoint: neither safetensors nor a PyTorch file")
    try:
        # The official training script stores its argparse.Namespace beside the weights; it only holds values.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        culprit = re.search(r"GLOBAL ([\w.]+)", str(e))
        if culprit:
            raise CheckpointError(
                f"{path}: refused to unpickle {culprit[1]}: a checkpoint may hold only tensors and plain values"
            ) from e
        reason = re.search(r"Unsupported [^\n]+", str(e))
        raise CheckpointError(
            f"{path}: refused to unpickle: not a tensor-only PyTorch checkpoint ({reason[0] if reason else 'corrupt'})"
        ) from e
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise CheckpointError(f"{path}: truncated or corrupt checkpoint ({first_line(e)})") from e
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return obj


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    """Whether a file starts like safetensors: a little-endian header length, then a JSON object."""
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size


def _van_state_dict(raw: dict[str, Any], source: Path | str) -> dict[str, torch.Tensor]:
    """``raw`` in our layout, or a one-line error saying what a VAN checkpoint looks like."""
    state_dict = checkpoint_filter_fn(raw)
    bad = [k for k, v in state_dict.items() if not isinstance(v, torch.Tensor)]
    ours = [k for k in state_dict if k.startswith("stages.") or k.startswith("head.")]
    if bad or "stages.0.patch_embed.proj.weight" not in state_dict:
        example = next(iter(k for k in raw if k not in ours), "nothing") if raw else "nothing"
        raise CheckpointError(
            f"{source}: not a VAN checkpoint: expected official keys (patch_embed1.proj.weight, block1.0.*), "
            f"transformers keys (van.encoder.stages.*) or van_app keys (stages.*); found {example!r}"
        )
    return state_dict


def _load_strict(model: VAN, state_dict: dict[str, torch.Tensor], source: Path | str) -> None:
    """Load exactly: any missing, unexpected or mis-shaped tensor is named in a one-line error."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [
        f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
        for k, v in state_dict.items()
        if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or shapes:
        parts = [f"{name}: {', '.join(keys)}" for name, keys in
                 (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)) if keys]
        raise CheckpointError(f"{source}: does not fit the model: {'; '.join(parts)}")
    model.load_state_dict(state_dict, strict=False)


def build_model(spec: VanSpec, num_classes: int, **kwargs: Any) -> VAN:
    """A VAN for ``spec`` through the timm builder, named after its variant (``custom`` when none)."""
    variant = variant_of(spec)
    model = _create_van(variant or "van_micro", **model_args(spec), num_classes=num_classes, **kwargs)
    model.variant = variant or "custom"
    model.pretrained_cfg = dict(model.pretrained_cfg, architecture=model.variant, num_classes=num_classes)
    return model


def from_state_dict(
    state_dict: dict[str, torch.Tensor],
    source: Path | str,
    *,
    num_classes: int | None = None,
    labels: list[str] | None = None,
    pretrained_cfg: dict[str, Any] | None = None,
) -> VAN:
    """An eval-mode VAN holding ``state_dict`` (our layout); a different ``num_classes`` gets a fresh head."""
    try:
        spec, ckpt_classes = infer_spec(state_dict)
    except KeyError as e:
        raise CheckpointError(f"{source}: incomplete VAN checkpoint: no tensor {e.args[0]}") from e
    if num_classes is not None and num_classes != ckpt_classes:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
        labels = None
    classes = ckpt_classes if num_classes is None else num_classes
    model = build_model(spec, classes)
    if num_classes is not None and num_classes != ckpt_classes:
        expected = {k for k in model.state_dict() if k.startswith("head.")}
        state_dict = dict(state_dict, **{k: model.state_dict()[k] for k in expected})
    _load_strict(model, state_dict, source)
    if labels is not None and len(labels) != classes:
        raise CheckpointError(f"{source}: {len(labels)} labels for a head of {classes} classes")
    return _finish(model, labels or default_labels(classes), pretrained_cfg)


def _finish(model: VAN, labels: list[str], pretrained_cfg: dict[str, Any] | None = None) -> VAN:
    """Attach labels and preprocessing, switch to eval mode."""
    model.labels = list(labels)
    model.pretrained_cfg = dict(model.pretrained_cfg, **(pretrained_cfg or {}), label_names=model.labels)
    model.default_cfg = model.pretrained_cfg
    return model.eval()


def _load_variant(variant: str, num_classes: int | None, pretrained: bool) -> VAN:
    """A registered variant: random init, or the official ImageNet weights from the Hub."""
    if not pretrained:
        model = build_model(VARIANTS[variant], 1000 if num_classes is None else num_classes)
        return _finish(model, default_labels(model.num_classes))
    cfg = default_cfgs.get(variant)
    hub_id = cfg.default.hf_hub_id if cfg else None
    if not hub_id:
        raise CheckpointError(f"{variant}: no official pretrained weights (they exist for van_b0 ... van_b3)")
    filename = cfg.default.hf_hub_filename
    path = _hub_download(hub_id, filename)
    return from_state_dict(_van_state_dict(read_state_dict(path), path), path, num_classes=num_classes,
                           labels=imagenet_labels())


def _hub_download(repo_id: str, filename: str) -> Path:
    """One file of a Hub repo (from the local cache when offline), or a one-line error."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, filename))
    except LocalEntryNotFoundError as e:  # a subclass of EntryNotFoundError: test it first
        raise CheckpointError(
            f"{repo_id}/{filename}: not in the local Hugging Face cache and the Hub cannot be reached (offline?)"
        ) from e
    except EntryNotFoundError as e:
        raise CheckpointError(f"{repo_id}: the Hub repo has no file {filename}") from e
    except HfHubHTTPError as e:
        raise CheckpointError(f"{repo_id}/{filename}: download failed ({first_line(e)})") from e
    except ValueError as e:
        raise CheckpointError(f"{repo_id}: not a valid Hub repo id ({first_line(e)})") from e


def _load_dir(directory: Path, num_classes: int | None, source: str | None = None) -> VAN:
    """A transformers-format VAN directory or a van_app export (config.json + weights)."""
    source = source or str(directory)
    config_path = directory / EXPORT_CONFIG
    if not config_path.is_file():
        raise CheckpointError(f"{source}: no config.json; expected a van_app export or a transformers VAN")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_path}: not valid JSON ({first_line(e)})") from e
    weights = directory / EXPORT_WEIGHTS
    if not weights.is_file() and (directory / TRANSFORMERS_BIN).is_file():
        weights = directory / TRANSFORMERS_BIN
    if not weights.is_file():
        raise CheckpointError(f"{source}: no {EXPORT_WEIGHTS} (or {TRANSFORMERS_BIN}) beside config.json")
    state_dict = _van_state_dict(read_state_dict(weights), weights)
    if config.get("model_type") == "van":
        id2label = config.get("id2label") or {}
        labels = [id2label[k] for k in sorted(id2label, key=int)] or None
        return from_state_dict(state_dict, weights, num_classes=num_classes, labels=labels)
    if "architecture" not in config:
        raise CheckpointError(f"{config_path}: neither a van_app export (architecture) nor a transformers VAN")
    labels = config.get("label_names")
    if labels is None and "id2label" in config:
        labels = [config["id2label"][k] for k in sorted(config["id2label"], key=int)]
    keep = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    pretrained_cfg = {k: v for k, v in (config.get("pretrained_cfg") or {}).items() if k in keep}
    for key in ("mean", "std", "input_size"):
        if key in pretrained_cfg:
            pretrained_cfg[key] = tuple(pretrained_cfg[key])
    return from_state_dict(state_dict, weights, num_classes=num_classes, labels=labels, pretrained_cfg=pretrained_cfg)


def _download_repo(repo_id: str) -> Path:
    """The config and weights of a Hub model repo, as a local directory."""
    config = _hub_download(repo_id, EXPORT_CONFIG)
    try:
        _hub_download(repo_id, EXPORT_WEIGHTS)
    except CheckpointError as no_safetensors:
        try:
            _hub_download(repo_id, TRANSFORMERS_BIN)
        except CheckpointError:
            raise no_safetensors from None
    return config.parent


def load_model(source: str | Path, *, num_classes: int | None = None, pretrained: bool = False) -> VAN:
    """An eval-mode VAN with ``.labels``, ``.variant`` and ``.pretrained_cfg`` from any known source.

    ``source``: a variant name (``van_b0``; ``pretrained=True`` fetches the official
    ImageNet weights), an official checkpoint file, a transformers VAN directory,
    a van_app export directory, or a Hub repo id (optionally ``hf-hub:``-prefixed)
    holding either. A ``num_classes`` other than the checkpoint's gets a new head.
    """
    text = str(source)
    if text in VARIANTS:
        return _load_variant(text, num_classes, pretrained)
    path = Path(text).expanduser()
    if path.is_dir():
        return _load_dir(path, num_classes)
    if path.is_file():
        raw = read_state_dict(path)
        return from_state_dict(_van_state_dict(raw, path), path, num_classes=num_classes)
    repo_id = text.removeprefix("hf-hub:")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        return _load_dir(_download_repo(repo_id), num_classes, source=repo_id)
    raise CheckpointError(
        f"{text}: not a variant ({', '.join(VARIANTS)}), a checkpoint file, a model directory or a Hub repo id"
    )
