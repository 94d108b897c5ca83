"""Every VAN checkpoint layout onto ours, and whether a state dict fits the model it should fill.

One ``checkpoint_filter_fn`` turns the official layout (VAN-Classification),
transformers' and ours (wrapped in ``state_dict``/``model``, DDP-prefixed or not)
into ``model.VAN``'s names by ordered rule tables. Only a foreign checkpoint's
architecture is read back from its tensors' shapes (``infer_model_args``):
there is nowhere else to read it from. A file never sizes a model by itself:
its tensors must be finite floating-point data it really holds, each stage's
block indices must count up without gaps, and it is checked against the
expected names and shapes (``expected_shapes``, on the meta device) before a
real model is built.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .model import VAN
from .refusal import NAME_LIMIT, count, refuse, show

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


def checkpoint_filter_fn(state_dict: dict[str, Any], model: VAN | None = None) -> dict[str, Any]:
    """Any VAN state dict in our key layout; given the ``model`` to fill (timm's hook), also checked against it.

    A head whose shape differs from ``model``'s is left out: timm gives the model
    a new one for its own class count.
    """
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
    state_dict = rename_keys(state_dict, rules)
    if model is not None:
        source = model.pretrained_cfg.get("file") or model.pretrained_cfg.get("hf_hub_id") or "checkpoint"
        check_tensors(state_dict, source)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if tuple(getattr(state_dict.get("head.weight"), "shape", ())) != expected.get("head.weight", ()):
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
            expected = {k: v for k, v in expected.items() if not k.startswith("head.")}
        check_fits(shapes(state_dict), expected, source)
    return state_dict


def rename_keys(state_dict: dict[str, Any], rules: list[tuple[str, Any]]) -> dict[str, Any]:
    """``state_dict`` with each key rewritten by the ordered ``(pattern, replacement)`` rules."""
    out = {}
    for key, value in state_dict.items():
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    return out


def van_state_dict(raw: dict[str, Any], source: Path | str) -> dict[str, torch.Tensor]:
    """``raw`` (as read from a file) in our layout with checked tensors, or what a VAN checkpoint looks like."""
    state_dict = checkpoint_filter_fn(raw)
    if "stages.0.patch_embed.proj.weight" not in state_dict:
        ours = [k for k in state_dict if k.startswith("stages.") or k.startswith("head.")]
        example = next((k for k in raw if k not in ours), "nothing")
        raise refuse(
            source,
            "not a VAN checkpoint: expected official keys (patch_embed1.proj.weight, block1.0.*), "
            f"transformers keys (van.encoder.stages.*) or van_app keys (stages.*); found {show(example)!r}",
        )
    check_tensors(state_dict, source)
    return state_dict


def check_tensors(state_dict: dict[str, Any], source: Path | str) -> None:
    """Refuse anything but non-empty, finite floating-point tensors (BatchNorm's step counter aside)."""
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise refuse(source, f"{show(key)} is a {type(value).__name__}, not a tensor")
        if key.endswith("num_batches_tracked"):
            continue
        if not value.is_floating_point():
            raise refuse(source, f"{show(key)} holds {value.dtype}, not floating-point weights")
        if value.numel() == 0:
            raise refuse(source, f"{show(key)} is empty (shape {tuple(value.shape)})")
        if not torch.isfinite(value).all():
            raise refuse(source, f"{show(key)} holds NaN or infinite values")
    claimed = sum(v.numel() * v.element_size() for v in state_dict.values())
    held = sum({v.untyped_storage().data_ptr(): v.untyped_storage().nbytes() for v in state_dict.values()}.values())
    if claimed > held:  # views sharing or broadcasting one storage would inflate the model beyond the file
        raise refuse(source, f"its tensors claim {claimed:,} bytes but the file holds {held:,} (shared storage)")


def shapes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape, by name."""
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def block_depths(names: list[str], source: Path | str) -> tuple[int, ...]:
    """How many blocks each stage has, from the tensor names: block indices must run 0, 1, ... without gaps."""
    depths = []
    for stage in range(4):
        indices = {int(m[1]) for k in names if (m := re.match(rf"stages\.{stage}\.blocks\.(\d{{1,9}})\.", k))}
        gap = next(i for i in range(len(indices) + 1) if i not in indices)
        if gap < len(indices):
            raise refuse(source, f"missing block stages.{stage}.blocks.{gap} of a stage with blocks up to "
                                 f"{max(indices)}")
        depths.append(len(indices))
    return tuple(depths)


def head_classes(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """The class count of a state dict's head (0 when it has none)."""
    return shapes["head.weight"][0] if len(shapes.get("head.weight", ())) == 2 else 0


def infer_model_args(state_dict: Mapping[str, torch.Tensor], source: Path | str) -> dict[str, tuple]:
    """A foreign checkpoint's widths, depths and MLP ratios, read from its checked tensors' shapes."""
    dims, ratios = [], []
    for i in range(4):
        proj = state_dict.get(f"stages.{i}.patch_embed.proj.weight")
        if proj is None or proj.dim() != 4:
            raise refuse(source, f"incomplete VAN checkpoint: no 4-d tensor stages.{i}.patch_embed.proj.weight")
        dims.append(proj.shape[0])
        fc1 = state_dict.get(f"stages.{i}.blocks.0.mlp.fc1.weight")
        ratio = fc1.shape[0] / proj.shape[0] if fc1 is not None and fc1.dim() == 4 else 4.0
        ratios.append(int(ratio) if ratio.is_integer() else ratio)
    depths = block_depths(list(state_dict), source)
    return dict(embed_dims=tuple(dims), depths=depths, mlp_ratios=tuple(ratios))


def expected_shapes(**model_args: Any) -> dict[str, tuple[int, ...]]:
    """Every tensor a VAN built with ``model_args`` holds, by name and shape, allocating nothing.

    A skeleton with at most one block per stage is built on the meta device; the
    blocks of a stage all have its first block's shapes, so the cost does not
    grow with the depths a file claims.
    """
    depths = model_args["depths"]
    with torch.device("meta"):
        skeleton = VAN(**dict(model_args, depths=[min(d, 1) for d in depths]))
    expected = {}
    for key, value in skeleton.state_dict().items():
        m = re.fullmatch(r"stages\.(\d)\.blocks\.0\.(.+)", key)
        names = [f"stages.{m[1]}.blocks.{j}.{m[2]}" for j in range(depths[int(m[1])])] if m else [key]
        expected.update(dict.fromkeys(names, tuple(value.shape)))
    return expected


def check_fits(found: Mapping[str, tuple[int, ...]], expected: Mapping[str, tuple[int, ...]],
               source: Path | str) -> None:
    """Refuse tensors (by name and shape) that lack, add or mis-shape any of the expected ones, naming a few."""
    missing = [k for k in expected if k not in found and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in found if k not in expected]
    wrong = [f"{show(k)} {found[k]} vs {expected[k]}" for k in found if k in expected and found[k] != expected[k]]
    problems = [count(what, names, limit=limit) for what, names, limit in
                (("missing", missing, NAME_LIMIT), ("unexpected", unexpected, NAME_LIMIT),
                 ("wrong shape for", wrong, 2 * NAME_LIMIT)) if names]
    if problems:
        raise refuse(source, f"does not fit the model: {'; '.join(problems)}")
