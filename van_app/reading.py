"""Reading checkpoint files and config.json without trusting them.

Sizes are checked before a byte is read; safetensors is read directly and a
pickle only through ``torch.load(weights_only=True)``, so nothing untrusted runs.
config.json must be a JSON object whose every field we use is valid: labels a
list of distinct strings, the interpolation one of timm's, the input size
within ``MIN_INPUT_SIZE``..``MAX_INPUT_SIZE``, crop pct in (0, 1], mean and std
three finite numbers (std above 0), ``model_args`` arguments ``VAN`` takes, and
no ``pretrained_cfg`` key that would make timm fetch weights from elsewhere.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .refusal import count, refuse, show
from .variants import VAN_LAYOUT, VAN_PREPROCESSING, VARIANTS

# Official VAN weights use 224 px and van-finetune trains at up to 1024 px; inference time
# grows with the square of the side, so a config asking for more is refused.
MIN_INPUT_SIZE = 32
MAX_INPUT_SIZE = 1024
MAX_CONFIG_BYTES = 8 * 2**20  # room for ImageNet-22k's labels three times over
CROP_MODES = ("center", "squash", "border")  # timm's evaluation crop modes
# pretrained_cfg keys that name where weights come from or how to cut them: ours to set, never a file's.
_SOURCE_KEYS = frozenset({"url", "file", "state_dict", "hf_hub_id", "hf_hub_filename", "source", "custom_load",
                          "label_offset", "label_names", "label_descriptions"})


def check_size(path: Path, max_bytes: int | None) -> None:
    """Refuse a missing, empty or over-large file before reading any of it."""
    if not path.is_file():
        raise refuse(path, "no such file")
    size = path.stat().st_size
    if size == 0:
        raise refuse(path, "empty file, expected a VAN checkpoint")
    if max_bytes is not None and size > max_bytes:
        raise refuse(path, f"{size:,} bytes, more than the {max_bytes:,} allowed")


def is_safetensors(path: Path) -> bool:
    """Whether a file is safetensors, by name or by its first bytes (a header length, then a JSON object)."""
    with path.open("rb") as f:
        head = f.read(9)
    return path.suffix == ".safetensors" or (
        len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size)


def read_state_dict(path: Path, max_bytes: int | None = None) -> dict[str, Any]:
    """The raw dict in a checkpoint file: safetensors directly, pickles only with ``weights_only``."""
    check_size(path, max_bytes)
    if is_safetensors(path):
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise refuse(path, f"not a readable safetensors file ({show(e, 120)})") from e
    with path.open("rb") as f:
        if not f.read(2).startswith((b"PK", b"\x80")):  # torch's zip format or a legacy pickle
            raise refuse(path, "not a checkpoint: neither safetensors nor a PyTorch file")
    try:
        # The official training script stores its argparse.Namespace beside the weights; it only holds values.
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        culprit = re.search(r"GLOBAL ([\w.]+)", str(e))
        if culprit:
            raise refuse(
                path, f"refused to unpickle {show(culprit[1])}: a checkpoint may hold only tensors and plain values"
            ) from e
        reason = re.search(r"Unsupported [^\n]+", str(e))
        raise refuse(
            path, f"refused to unpickle: not a tensor-only PyTorch checkpoint ({reason[0] if reason else 'corrupt'})"
        ) from e
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as e:
        raise refuse(path, f"truncated or corrupt checkpoint ({show(e, 120)})") from e
    if not isinstance(obj, dict):
        raise refuse(path, f"expected a dict of tensors, found {type(obj).__name__}")
    return obj


def read_safetensors_shapes(path: Path, max_bytes: int | None = None) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape in a safetensors file, from its header alone (no tensor data is read)."""
    from safetensors import safe_open

    check_size(path, max_bytes)
    try:
        with safe_open(path, framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise refuse(path, f"not a readable safetensors file ({show(e, 120)})") from e


def read_config(path: Path) -> dict[str, Any]:
    """as a dict, refusing anything too large, unreadable or not a JSON object."""
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise refuse(path, f"{size:,} bytes, more than the {MAX_CONFIG_BYTES:,} allowed for config.json")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise refuse(path, f"not valid JSON ({show(e, 120)})") from e
    if not isinstance(config, dict):
        raise refuse(path, f"must hold a JSON object, found {type(config).__name__}")
    return config


def _is_number(value: Any) -> bool:
    """A finite int or float (a JSON bool is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any, minimum: int) -> bool:
    """An int (not a bool) of at least ``minimum``."""
    return type(value) is int and value >= minimum


def labels(value: Any, source: Path | str, field: str) -> list[str]:
    """Class names: a list of distinct strings."""
    if not isinstance(value, list) or not all(isinstance(label, str) for label in value):
        raise refuse(source, f"{field} must be a list of strings")
    seen: set[str] = set()
    repeated = list(dict.fromkeys(label for label in value if label in seen or seen.add(label)))
    if repeated:
        raise refuse(source, f"{field}: {count('repeated', repeated, 'label')}")
    return value


def id2label(value: Any, source: Path | str) -> list[str]:
    """transformers' ``id2label`` (``{"0": name, ...}``) as a list of names in index order."""
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and k.isdecimal() and len(k) < 10 and isinstance(v, str) for k, v in value.items()):
        raise refuse(source, 'id2label must map class indices ("0", "1", ...) to names (strings)')
    if sorted(int(k) for k in value) != list(range(len(value))):
        raise refuse(source, f"id2label must number its {len(value):,} classes 0, 1, ... without gaps")
    return labels([value[k] for k in sorted(value, key=int)], source, "id2label")


def transformers_labels(config: dict[str, Any], source: Path | str) -> list[str] | None:
    """The class names of a transformers VAN config, if it names them."""
    return id2label(config["id2label"], source) if "id2label" in config else None


def _ints(value: Any, minimum: int) -> bool:
    """Four ints of at least ``minimum``."""
    return isinstance(value, list) and len(value) == 4 and all(_is_int(v, minimum) for v in value)


def _rate(value: Any) -> bool:
    """A dropout probability."""
    return _is_number(value) and 0 <= value < 1


# Every argument of VAN.__init__, with the check its value in config.json must pass.
MODEL_ARG_CHECKS = {
    "embed_dims": (lambda v: _ints(v, 1), "four positive integers"),
    "depths": (lambda v: _ints(v, 0), "four integers of at least 0"),
    "mlp_ratios": (lambda v: isinstance(v, list) and len(v) == 4 and all(_is_number(r) and r > 0 for r in v),
                   "four positive numbers"),
    "num_classes": (lambda v: _is_int(v, 0), "an integer of at least 0"),
    "in_chans": (lambda v: v == 3 and type(v) is int, "3 (RGB images)"),
    "drop_rate": (_rate, "a number in [0, 1)"),
    "drop_path_rate": (_rate, "a number in [0, 1)"),
    "layer_scale_init": (_is_number, "a finite number"),
    "global_pool": (lambda v: v in ("avg", ""), "'avg' or ''"),
}


def _model_args(value: Any, source: Path | str) -> dict[str, Any]:
    """An export's ``model_args``: arguments ``VAN`` takes, each valid."""
    if not isinstance(value, dict):
        raise refuse(source, "model_args must be a JSON object")
    unknown = [k for k in value if k not in MODEL_ARG_CHECKS]
    if unknown:
        raise refuse(source, f"model_args: {count('unknown', unknown, 'argument')}")
    for key, arg in value.items():
        check, wanted = MODEL_ARG_CHECKS[key]
        if not check(arg):
            raise refuse(source, f"model_args {key} must be {wanted}, found {show(arg)}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in value.items()}


def preprocessing(cfg: dict[str, Any], source: Path | str) -> dict[str, Any]:
    """An export's preprocessing, each field checked; the official VAN values for those it lacks."""
    out = dict(VAN_PREPROCESSING)
    if "input_size" in cfg:
        size = cfg["input_size"]
        if (not isinstance(size, list) or len(size) != 3 or size[0] != 3
                or not all(_is_int(s, MIN_INPUT_SIZE) and s <= MAX_INPUT_SIZE for s in size[1:])):
            raise refuse(source, f"input_size must be [3, height, width] with sides from "
                                 f"{MIN_INPUT_SIZE} to {MAX_INPUT_SIZE} px, found {show(size)}")
        out["input_size"] = tuple(size)
    if "interpolation" in cfg:
        from timm.data.transforms import str_to_interp_mode

        try:
            str_to_interp_mode(cfg["interpolation"])
        except (KeyError, TypeError) as e:
            raise refuse(source, f"interpolation {show(cfg['interpolation'])!r} is not one of timm's "
                                 "(nearest, bilinear, bicubic, box, hamming, lanczos)") from e
        out["interpolation"] = cfg["interpolation"]
    if "crop_pct" in cfg:
        if not _is_number(cfg["crop_pct"]) or not 0 < cfg["crop_pct"] <= 1:
            raise refuse(source, f"crop_pct must be a number in (0, 1], found {show(cfg['crop_pct'])}")
        out["crop_pct"] = float(cfg["crop_pct"])
    if "crop_mode" in cfg:
        if cfg["crop_mode"] not in CROP_MODES:
            raise refuse(source, f"crop_mode must be one of {', '.join(CROP_MODES)}")
        out["crop_mode"] = cfg["crop_mode"]
    for key in ("mean", "std"):
        if key in cfg:
            value = cfg[key]
            if not isinstance(value, list) or len(value) != 3 or not all(_is_number(v) for v in value) or (
                    key == "std" and not all(v > 0 for v in value)):
                raise refuse(source, f"{key} must be three finite numbers"
                                     f"{' above 0' if key == 'std' else ''}, found {show(value)}")
            out[key] = tuple(float(v) for v in value)
    return out


@dataclass(frozen=True)
class ExportConfig:
    """What a van_app export's config.json (timm's Hub layout) says, every field checked."""

    architecture: str  # the timm entrypoint, a row of VARIANTS
    model_args: dict[str, Any]  # the row's architecture with the export's arguments over it
    labels: list[str] | None
    declared_classes: dict[str, int]  # each class count the file states, by where it states it
    preprocessing: dict[str, Any]  # for timm's pretrained_cfg_overlay


def export_config(config: dict[str, Any], source: Path | str) -> ExportConfig:
    """Check a van_app export's config.json: architecture, model_args, labels, class counts, pretrained_cfg."""
    from timm.models import PretrainedCfg

    architecture = config["architecture"]
    if architecture not in VARIANTS:
        raise refuse(source, f"architecture {show(architecture)!r} is not a VAN variant "
                             f"({', '.join(VARIANTS)})")
    cfg = config.get("pretrained_cfg")
    if not isinstance(cfg, dict):
        raise refuse(source, "pretrained_cfg must be a JSON object")
    allowed = {f.name for f in PretrainedCfg.__dataclass_fields__.values()} - _SOURCE_KEYS
    refused = [k for k in cfg if k not in allowed]
    if refused:
        raise refuse(source, f"pretrained_cfg: {count('unknown or refused', refused)}")
    for key, ours in dict(VAN_LAYOUT, architecture=architecture).items():
        if cfg.get(key, ours) != ours:
            raise refuse(source, f"pretrained_cfg {key} must be {ours!r}, found {show(cfg[key])!r}")
    model_args = dict(VARIANTS[architecture].model_args, **_model_args(config.get("model_args", {}), source))
    declared = {"num_classes": config.get("num_classes"), "pretrained_cfg num_classes": cfg.get("num_classes"),
                "model_args num_classes": model_args.pop("num_classes", None)}
    for where, value in declared.items():
        if value is not None and not _is_int(value, 0):
            raise refuse(source, f"{where} must be an integer of at least 0, found {show(value)}")
    if "label_names" in config:
        names = labels(config["label_names"], source, "label_names")
    else:
        names = id2label(config["id2label"], source) if "id2label" in config else None
    return ExportConfig(architecture, model_args, names, {k: v for k, v in declared.items() if v is not None},
                        preprocessing(cfg, source))
