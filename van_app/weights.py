"""Every way a VAN's weights arrive: timm registry, official checkpoints, transformers, our exports.

All foreign layouts pass through one ``checkpoint_filter_fn`` that maps keys
onto ``model.VAN``'s names by an ordered rule table; loading after mapping is
strict and names every leftover. Nothing untrusted is unpickled: safetensors
first, ``torch.load(weights_only=True)`` otherwise.

A file is never trusted to size the model: its tensors must be finite
floating-point data it really holds, its block indices must count up without
gaps, and the whole state dict is checked against the model it describes on
the meta device before a real one is built. Every malformed input is a
``CheckpointError`` of one line and a few hundred characters at most.
"""

from __future__ import annotations

import argparse
import json
import math
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


# Limits on what a file may ask of us. Official VAN weights use 224 px; van-finetune trains at up to 1024 px;
# inference time grows with the square of the side, so a config asking for more than this is refused.
MIN_INPUT_SIZE = 32
MAX_INPUT_SIZE = 1024
MAX_CONFIG_BYTES = 8 * 2**20  # config.json: room for ImageNet-22k's labels three times over
_NAME_LIMIT = 60  # characters of one key or label quoted in an error message
_SOURCE_LIMIT = 120  # characters of a path or repo id quoted in an error message
_CROP_MODES = ("center", "squash", "border")  # timm's evaluation crop modes


def pretrained_variants() -> list[str]:
    """The registered variants with official ImageNet weights on the Hub."""
    return [name for name in VARIANTS if (cfg := default_cfgs.get(name)) and cfg.default.hf_hub_id]


def _show(text: object, limit: int = _NAME_LIMIT) -> str:
    """``text`` fit for a one-line message: printable characters only, at most ``limit`` of them."""
    text = "".join(c if c.isprintable() else "?" for c in str(text))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _source(source: Path | str) -> str:
    """A path or repo id for a message, keeping its end (the file name) when it is long."""
    text = _show(source, limit=10**9)
    return text if len(text) <= _SOURCE_LIMIT else "…" + text[-(_SOURCE_LIMIT - 1):]


def _count(what: str, names: list[str], noun: str = "key", shown: int = 3, limit: int = _NAME_LIMIT) -> str:
    """``"missing 1,234 keys, e.g. a, b, c"``: how many, and the first few by name."""
    noun = noun if len(names) == 1 else f"{noun}s"
    listed = ", ".join(_show(name, limit) for name in names[:shown])
    return f"{what} {len(names):,} {noun}{', e.g. ' if len(names) > shown else ': '}{listed}"


def _refuse(source: Path | str, problem: str) -> CheckpointError:
    """A one-line error of bounded length: where, then what is wrong."""
    return CheckpointError(first_line(f"{_source(source)}: {problem}"))


def checkpoint_filter_fn(state_dict: dict[str, Any], model: VAN | None = None) -> dict[str, Any]:
    """Any VAN state dict (official, transformers, ours; wrapped or DDP-prefixed) in our key layout."""
    for wrapper in ("state_dict", "model", "state_dict_ema"):
        if wrapper in state_dict and isinstance(state_dict[wrapper], dict):
            state_dict = state_dict[wrapper]
            break
    if not all(isinstance(k, str) for k in state_dict):
        return {}  # not a state dict at all; the caller names what it expected
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


def check_tensors(state_dict: dict[str, Any], source: Path | str) -> None:
    """Refuse anything but non-empty, finite floating-point tensors (BatchNorm's step counter aside)."""
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise _refuse(source, f"{_show(key)} is a {type(value).__name__}, not a tensor")
        if key.endswith("num_batches_tracked"):
            continue
        if not value.is_floating_point():
            raise _refuse(source, f"{_show(key)} holds {value.dtype}, not floating-point weights")
        if value.numel() == 0:
            raise _refuse(source, f"{_show(key)} is empty (shape {tuple(value.shape)})")
        if not torch.isfinite(value).all():
            raise _refuse(source, f"{_show(key)} holds NaN or infinite values")
    claimed = sum(v.numel() * v.element_size() for v in state_dict.values())
    held = sum({v.untyped_storage().data_ptr(): v.untyped_storage().nbytes() for v in state_dict.values()}.values())
    if claimed > held:  # views sharing or broadcasting one storage would inflate the model beyond the file
        raise _refuse(source, f"its tensors claim {claimed:,} bytes but the file holds {held:,} (shared storage)")


def _depth(keys: list[str], stage: int, source: Path | str) -> int:
    """How many blocks stage ``stage`` has: its block indices must run 0, 1, ... without gaps."""
    indices = {int(m[1]) for k in keys if (m := re.match(rf"stages\.{stage}\.blocks\.(\d{{1,9}})\.", k))}
    gap = next(i for i in range(len(indices) + 1) if i not in indices)
    if gap < len(indices):
        raise _refuse(source, f"missing block stages.{stage}.blocks.{gap} of a stage with blocks up to {max(indices)}")
    return len(indices)


def infer_model_args(state_dict: dict[str, torch.Tensor], source: Path | str) -> dict[str, tuple]:
    """Widths, depths and MLP ratios of a checked state dict in our layout, read from its tensors' shapes."""
    keys = list(state_dict)
    dims, depths, ratios = [], [], []
    for i in range(4):
        proj = state_dict.get(f"stages.{i}.patch_embed.proj.weight")
        if proj is None or proj.dim() != 4:
            raise _refuse(source, f"incomplete VAN checkpoint: no 4-d tensor stages.{i}.patch_embed.proj.weight")
        dims.append(proj.shape[0])
        depths.append(_depth(keys, i, source))
        fc1 = state_dict.get(f"stages.{i}.blocks.0.mlp.fc1.weight")
        ratio = fc1.shape[0] / proj.shape[0] if fc1 is not None and fc1.dim() == 4 else 4.0
        ratios.append(int(ratio) if ratio.is_integer() else ratio)
    return dict(embed_dims=tuple(dims), depths=tuple(depths), mlp_ratios=tuple(ratios))


def expected_shapes(num_classes: int, **model_args: Any) -> dict[str, tuple[int, ...]]:
    """Every tensor a VAN built with these arguments holds, by name and shape, allocating nothing.

    A skeleton with at most one block per stage is built on the meta device; the
    blocks of a stage all have its first block's shapes.
    """
    depths = model_args["depths"]
    with torch.device("meta"):
        skeleton = VAN(**dict(model_args, depths=[min(d, 1) for d in depths]), num_classes=num_classes)
    shapes = {}
    for key, value in skeleton.state_dict().items():
        m = re.fullmatch(r"stages\.(\d)\.blocks\.0\.(.+)", key)
        names = [f"stages.{m[1]}.blocks.{j}.{m[2]}" for j in range(depths[int(m[1])])] if m else [key]
        shapes.update(dict.fromkeys(names, tuple(value.shape)))
    return shapes


def check_fits(state_dict: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], source: Path | str) -> None:
    """Refuse a state dict that lacks, adds or mis-shapes any tensor of the expected model, naming a few."""
    missing = [k for k in expected if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in expected]
    shapes = [f"{_show(k)} {tuple(v.shape)} vs {expected[k]}" for k, v in state_dict.items()
              if k in expected and tuple(v.shape) != expected[k]]
    problems = [_count(what, names, limit=2 * _NAME_LIMIT) for what, names in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape for", shapes)) if names]
    if problems:
        raise _refuse(source, f"does not fit the model: {'; '.join(problems)}")


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


def infer_spec(state_dict: dict[str, torch.Tensor]) -> tuple[VanSpec, int]:
    """Widths, depths, MLP ratios and class count of a checked state dict in our layout."""
    args = infer_model_args(state_dict, "state dict")
    head = state_dict.get("head.weight")
    return VanSpec(**args), head.shape[0] if head is not None else 0


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names in index order (from timm), shortest unambiguous form."""
    descriptions = ImageNetInfo().label_descriptions()
    short = [d.split(",")[0].strip() for d in descriptions]
    names = [s if short.count(s) == 1 else d for s, d in zip(short, descriptions)]
    return [n if names.count(n) == 1 else f"{n} ({i})" for i, n in enumerate(names)]


def default_labels(num_classes: int) -> list[str]:
    """Labels for a head with no names: ImageNet's for 1000 classes, else ``class_<i>``."""
    return imagenet_labels() if num_classes == 1000 else [f"class_{i}" for i in range(num_classes)]


def _check_size(path: Path, max_bytes: int | None) -> None:
    """Refuse a missing, empty or over-large file before reading any of it."""
    if not path.is_file():
        raise _refuse(path, "no such file")
    size = path.stat().st_size
    if size == 0:
        raise _refuse(path, "empty file, expected a VAN checkpoint")
    if max_bytes is not None and size > max_bytes:
        raise _refuse(path, f"{size:,} bytes, more than the {max_bytes:,} allowed")


def read_state_dict(path: Path, max_bytes: int | None = None) -> dict[str, Any]:
    """The raw dict in a checkpoint file: safetensors directly, pickles only with ``weights_only``."""
    _check_size(path, max_bytes)
    with path.open("rb") as f:
        head = f.read(9)
    if path.suffix == ".safetensors" or _looks_like_safetensors(head, path.stat().st_size):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise _refuse(path, f"not a readable safetensors file ({first_line(e)})") from e
    if not head.startswith((b"PK", b"\x80")):  # torch's zip format or a legacy pickle
        raise _refuse(path, "not a checkpoint: neither safetensors nor a PyTorch file")
    try:
        # The official training script stores its argparse.Namespace beside the weights; it only holds values.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        culprit = re.search(r"GLOBAL ([\w.]+)", str(e))
        if culprit:
            raise _refuse(
                path, f"refused to unpickle {_show(culprit[1])}: a checkpoint may hold only tensors and plain values"
            ) from e
        reason = re.search(r"Unsupported [^\n]+", str(e))
        raise _refuse(
            path, f"refused to unpickle: not a tensor-only PyTorch checkpoint ({reason[0] if reason else 'corrupt'})"
        ) from e
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise _refuse(path, f"truncated or corrupt checkpoint ({first_line(e)})") from e
    if not isinstance(obj, dict):
        raise _refuse(path, f"expected a dict of tensors, found {type(obj).__name__}")
    return obj


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    """Whether a file starts like safetensors: a little-endian header length, then a JSON object."""
    return len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < size


def _van_state_dict(raw: dict[str, Any], source: Path | str) -> dict[str, torch.Tensor]:
    """``raw`` in our layout with checked tensors, or a one-line error saying what a VAN checkpoint looks like."""
    state_dict = checkpoint_filter_fn(raw)
    if "stages.0.patch_embed.proj.weight" not in state_dict:
        ours = [k for k in state_dict if k.startswith("stages.") or k.startswith("head.")]
        example = next((k for k in raw if k not in ours), "nothing")
        raise _refuse(
            source,
            "not a VAN checkpoint: expected official keys (patch_embed1.proj.weight, block1.0.*), "
            f"transformers keys (van.encoder.stages.*) or van_app keys (stages.*); found {_show(example)!r}",
        )
    check_tensors(state_dict, source)
    return state_dict


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
    """An eval-mode VAN holding a checked ``state_dict`` (our layout); another ``num_classes`` gets a fresh head.

    Widths and depths come from the tensors themselves and the whole state dict
    is checked against the model they describe before anything is allocated.
    """
    args = infer_model_args(state_dict, source)
    head = state_dict.get("head.weight")
    ckpt_classes = head.shape[0] if head is not None else 0
    if labels is not None and len(labels) != ckpt_classes:
        raise _refuse(source, f"{len(labels)} labels for a head of {ckpt_classes} classes")
    new_head = num_classes is not None and num_classes != ckpt_classes
    check_fits(state_dict, expected_shapes(ckpt_classes, **args), source)
    classes = num_classes if new_head else ckpt_classes
    model = build_model(VanSpec(**args), classes)
    if new_head:
        state_dict = dict(state_dict, **{k: v for k, v in model.state_dict().items() if k.startswith("head.")})
        labels = None
    model.load_state_dict(state_dict, strict=False)  # strict in effect: check_fits allows only BatchNorm counters
    return _finish(model, labels or default_labels(classes), pretrained_cfg)


def _finish(model: VAN, labels: list[str], pretrained_cfg: dict[str, Any] | None = None) -> VAN:
    """Attach labels and preprocessing, switch to eval mode."""
    model.labels = list(labels)
    model.pretrained_cfg = dict(model.pretrained_cfg, **(pretrained_cfg or {}), label_names=model.labels)
    model.default_cfg = model.pretrained_cfg
    return model.eval()


def _load_variant(variant: str, num_classes: int | None, pretrained: bool, max_bytes: int | None) -> VAN:
    """A registered variant: random init, or the official ImageNet weights from the Hub."""
    if not pretrained:
        model = build_model(VARIANTS[variant], 1000 if num_classes is None else num_classes)
        return _finish(model, default_labels(model.num_classes))
    if variant not in pretrained_variants():
        raise _refuse(variant, f"no official pretrained weights (they exist for {', '.join(pretrained_variants())})")
    cfg = default_cfgs[variant].default
    path = _hub_download(cfg.hf_hub_id, cfg.hf_hub_filename, max_bytes)
    state_dict = _van_state_dict(read_state_dict(path, max_bytes), path)
    return from_state_dict(state_dict, path, num_classes=num_classes, labels=imagenet_labels())


def _hub_download(repo_id: str, filename: str, max_bytes: int | None = None) -> Path:
    """One file of a Hub repo (from the local cache when offline), or a one-line error.

    With ``max_bytes`` the file's size is asked of the Hub (or the cache) first,
    and the download is pinned to the commit that size belongs to.
    """
    revision = None
    if max_bytes is not None:
        info = _hub_call(repo_id, filename, dry_run=True)
        if info.file_size is not None and info.file_size > max_bytes:
            raise _refuse(f"{repo_id}/{filename}", f"{info.file_size:,} bytes, more than the {max_bytes:,} allowed")
        revision = info.commit_hash
    return Path(_hub_call(repo_id, filename, revision=revision))


def _hub_call(repo_id: str, filename: str, **kwargs: Any) -> Any:
    """``hf_hub_download`` with its failures as one-line errors."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    where = f"{repo_id}/{filename}"
    try:
        return hf_hub_download(repo_id, filename, **kwargs)
    except LocalEntryNotFoundError as e:  # a subclass of EntryNotFoundError: test it first
        raise _refuse(where, "not in the local Hugging Face cache and the Hub cannot be reached (offline?)") from e
    except EntryNotFoundError as e:
        raise _refuse(repo_id, f"the Hub repo has no file {_show(filename)}") from e
    except HfHubHTTPError as e:
        raise _refuse(where, f"download failed ({first_line(e)})") from e
    except ValueError as e:
        raise _refuse(repo_id, f"not a valid Hub repo id ({first_line(e)})") from e


def _read_config(path: Path, source: Path | str) -> dict[str, Any]:
    """config.json as a dict, refusing anything too large, unreadable or not a JSON object."""
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise _refuse(source, f"config.json has {size:,} bytes, more than the {MAX_CONFIG_BYTES:,} allowed")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise _refuse(path, f"not valid JSON ({first_line(e)})") from e
    if not isinstance(config, dict):
        raise _refuse(path, f"config.json must hold a JSON object, found {type(config).__name__}")
    return config


def _is_number(value: Any) -> bool:
    """A finite int or float (a JSON bool is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _labels(value: Any, source: Path | str, field: str) -> list[str]:
    """Class names: a list of distinct strings."""
    if not isinstance(value, list) or not all(isinstance(label, str) for label in value):
        raise _refuse(source, f"config.json {field} must be a list of strings")
    seen: set[str] = set()
    duplicates = list(dict.fromkeys(label for label in value if label in seen or seen.add(label)))
    if duplicates:
        raise _refuse(source, f"config.json {field}: {_count('repeated', duplicates, 'label')}")
    return value


def _id2label(value: Any, source: Path | str) -> list[str]:
    """transformers' ``id2label`` (``{"0": name, ...}``) as a list of names in index order."""
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and k.isdecimal() and len(k) < 10 and isinstance(v, str) for k, v in value.items()):
        raise _refuse(source, "config.json id2label must map class indices (\"0\", \"1\", ...) to names (strings)")
    if sorted(int(k) for k in value) != list(range(len(value))):
        raise _refuse(source, f"config.json id2label must number its {len(value):,} classes 0, 1, ... without gaps")
    return _labels([value[k] for k in sorted(value, key=int)], source, "id2label")


def _preprocessing(cfg: Any, source: Path | str) -> dict[str, Any]:
    """The preprocessing fields of an export's ``pretrained_cfg``, each checked, as timm expects them."""
    if not isinstance(cfg, dict):
        raise _refuse(source, "config.json pretrained_cfg must be a JSON object")
    out: dict[str, Any] = {}
    if "input_size" in cfg:
        size = cfg["input_size"]
        if (not isinstance(size, list) or len(size) != 3 or not all(type(s) is int for s in size) or size[0] != 3
                or not all(MIN_INPUT_SIZE <= s <= MAX_INPUT_SIZE for s in size[1:])):
            raise _refuse(source, f"config.json input_size must be [3, height, width] with sides from "
                                  f"{MIN_INPUT_SIZE} to {MAX_INPUT_SIZE} px, found {_show(size)}")
        out["input_size"] = tuple(size)
    if "interpolation" in cfg:
        from timm.data.transforms import str_to_interp_mode

        try:
            str_to_interp_mode(cfg["interpolation"])
        except (KeyError, TypeError) as e:
            raise _refuse(source, f"config.json interpolation {_show(cfg['interpolation'])!r} is not one of timm's "
                                  "(nearest, bilinear, bicubic, box, hamming, lanczos)") from e
        out["interpolation"] = cfg["interpolation"]
    if "crop_pct" in cfg:
        if not _is_number(cfg["crop_pct"]) or not 0 < cfg["crop_pct"] <= 1:
            raise _refuse(source, f"config.json crop_pct must be a number in (0, 1], found {_show(cfg['crop_pct'])}")
        out["crop_pct"] = float(cfg["crop_pct"])
    if "crop_mode" in cfg:
        if cfg["crop_mode"] not in _CROP_MODES:
            raise _refuse(source, f"config.json crop_mode must be one of {', '.join(_CROP_MODES)}")
        out["crop_mode"] = cfg["crop_mode"]
    for key in ("mean", "std"):
        if key in cfg:
            value = cfg[key]
            if not isinstance(value, list) or len(value) != 3 or not all(_is_number(v) for v in value) or (
                    key == "std" and not all(v > 0 for v in value)):
                raise _refuse(source, f"config.json {key} must be three finite numbers"
                                      f"{' above 0' if key == 'std' else ''}, found {_show(value)}")
            out[key] = tuple(float(v) for v in value)
    return out


def _load_dir(directory: Path, num_classes: int | None, max_bytes: int | None, source: str | None = None) -> VAN:
    """A transformers-format VAN directory or a van_app export (config.json + weights)."""
    source = source or str(directory)
    config_path = directory / EXPORT_CONFIG
    if not config_path.is_file():
        raise _refuse(source, "no config.json; expected a van_app export or a transformers VAN")
    config = _read_config(config_path, source)
    weights = directory / EXPORT_WEIGHTS
    if not weights.is_file() and (directory / TRANSFORMERS_BIN).is_file():
        weights = directory / TRANSFORMERS_BIN
    if not weights.is_file():
        raise _refuse(source, f"no {EXPORT_WEIGHTS} (or {TRANSFORMERS_BIN}) beside config.json")
    if config.get("model_type") == "van":
        labels = _id2label(config["id2label"], config_path) if "id2label" in config else None
        pretrained_cfg = None
    elif "architecture" in config:
        if "label_names" in config:
            labels = _labels(config["label_names"], config_path, "label_names")
        elif "id2label" in config:
            labels = _id2label(config["id2label"], config_path)
        else:
            labels = None
        pretrained_cfg = _preprocessing(config.get("pretrained_cfg", {}), config_path)
    else:
        raise _refuse(config_path, "neither a van_app export (architecture) nor a transformers VAN (model_type)")
    state_dict = _van_state_dict(read_state_dict(weights, max_bytes), weights)
    return from_state_dict(state_dict, weights, num_classes=num_classes, labels=labels, pretrained_cfg=pretrained_cfg)


def _download_repo(repo_id: str, max_bytes: int | None) -> Path:
    """The config and weights of a Hub model repo, as a local directory."""
    config = _hub_download(repo_id, EXPORT_CONFIG, MAX_CONFIG_BYTES)
    try:
        _hub_download(repo_id, EXPORT_WEIGHTS, max_bytes)
    except CheckpointError as no_safetensors:
        try:
            _hub_download(repo_id, TRANSFORMERS_BIN, max_bytes)
        except CheckpointError:
            raise no_safetensors from None
    return config.parent


def load_model(
    source: str | Path, *, num_classes: int | None = None, pretrained: bool = False, max_bytes: int | None = None
) -> VAN:
    """An eval-mode VAN with ``.labels``, ``.variant`` and ``.pretrained_cfg`` from any known source.

    ``source``: a variant name (``van_b0``; ``pretrained=True`` fetches the official
    ImageNet weights), an official checkpoint file, a transformers VAN directory,
    a van_app export directory, or a Hub repo id (optionally ``hf-hub:``-prefixed)
    holding either. A ``num_classes`` other than the checkpoint's gets a new head.
    ``max_bytes`` refuses a weights file larger than that before reading it (for a
    Hub repo, before downloading it). Every malformed input raises a one-line
    ``CheckpointError`` of a few hundred characters at most.
    """
    text = str(source)
    if text in VARIANTS:
        return _load_variant(text, num_classes, pretrained, max_bytes)
    path = Path(text).expanduser()
    if path.is_dir():
        return _load_dir(path, num_classes, max_bytes)
    if path.is_file():
        state_dict = _van_state_dict(read_state_dict(path, max_bytes), path)
        return from_state_dict(state_dict, path, num_classes=num_classes)
    repo_id = text.removeprefix("hf-hub:")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        return _load_dir(_download_repo(repo_id, max_bytes), num_classes, max_bytes, source=repo_id)
    raise _refuse(text, f"not a variant ({', '.join(VARIANTS)}), a checkpoint file, a model directory or a Hub repo id")
