"""Classify one image with a VAN, using the preprocessing the model's weights were trained with.

``eval_transform(model)`` is that preprocessing and ``top_k`` turns logits into the
labelled answer; ``predict`` and ``explain.analyse`` both use them, so a model built
by ``timm.create_model`` (no ``.labels``) works in both.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torch import nn
from torchvision import transforms

from .images import to_rgb
from .variants import VAN_MEAN, VAN_STD, default_labels

# For a VAN built without timm (no ``pretrained_cfg``): the official weights' preprocessing, not ImageNet's.
_VAN_PREPROCESSING = {"mean": VAN_MEAN, "std": VAN_STD, "interpolation": "bicubic", "crop_pct": 0.9}


def data_config(model: nn.Module) -> dict:
    """The model's preprocessing (input size, interpolation, mean, std, crop) as timm resolves it."""
    pretrained_cfg = getattr(model, "pretrained_cfg", None) or _VAN_PREPROCESSING
    return resolve_data_config(pretrained_cfg=dict(pretrained_cfg), model=model)


def eval_transform(model: nn.Module) -> transforms.Compose:
    """timm's evaluation transform (resize, centre crop, to tensor, normalise) for ``model``'s data config."""
    cfg = data_config(model)
    return _transform(tuple(cfg["input_size"]), cfg["interpolation"], tuple(cfg["mean"]), tuple(cfg["std"]),
                      cfg["crop_pct"], cfg.get("crop_mode", "center"))


@lru_cache(maxsize=16)
def _transform(input_size: tuple, interpolation: str, mean: tuple, std: tuple, crop_pct: float,
               crop_mode: str) -> transforms.Compose:
    """One evaluation transform per data config, built once."""
    return create_transform(input_size=input_size, interpolation=interpolation, mean=mean, std=std,
                            crop_pct=crop_pct, crop_mode=crop_mode, is_training=False)


def preprocess(model: nn.Module, image: Image.Image) -> torch.Tensor:
    """A (1, 3, H, W) tensor of ``image`` (any PIL mode or size) prepared as ``model`` expects."""
    return eval_transform(model)(to_rgb(image)).unsqueeze(0)


def top_k(model: nn.Module, logits: torch.Tensor, k: int = 5) -> dict[str, float]:
    """The ``k`` most probable labels of one image's ``logits`` (num_classes,) with their probabilities, highest first.

    Labels are ``model.labels``, or ``class_<i>`` for a model without them.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    probs = logits.float().softmax(-1)
    top = probs.topk(min(k, probs.numel()))
    labels = getattr(model, "labels", None) or default_labels(probs.numel())
    return {labels[i]: float(p) for p, i in zip(top.values.tolist(), top.indices.tolist())}


def placement(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where ``model`` wants its input: the device and dtype of its parameters (CPU float32 for an engine's model)."""
    param = next(model.parameters(), None) if isinstance(model, nn.Module) else None
    return (param.device, param.dtype) if param is not None else (torch.device("cpu"), torch.float32)


def predict(model: nn.Module, image: Image.Image, k: int = 5) -> dict[str, float]:
    """Top-``k`` labels of ``image`` with their probabilities, highest first (``model``: a VAN or what ``fuse`` returns)."""
    device, dtype = placement(model)
    batch = preprocess(model, image).to(device, dtype)
    with torch.inference_mode():
        logits = model(batch)[0]
    return top_k(model, logits, k)
