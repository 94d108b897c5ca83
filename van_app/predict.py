"""Classify one image with a VAN, using the preprocessing the model's weights were trained with."""

from __future__ import annotations

from functools import lru_cache

import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torch import nn

from .images import to_rgb
from .weights import VAN_MEAN, VAN_STD, default_labels

# For a VAN built without timm (no ``pretrained_cfg``): the official weights' preprocessing, not ImageNet's.
_VAN_PREPROCESSING = {"mean": VAN_MEAN, "std": VAN_STD, "interpolation": "bicubic", "crop_pct": 0.9}


@lru_cache(maxsize=16)
def _eval_transform(input_size: tuple, interpolation: str, mean: tuple, std: tuple, crop_pct: float, crop_mode: str):
    """timm's evaluation transform (resize, center crop, normalize) for one data config."""
    return create_transform(input_size=input_size, interpolation=interpolation, mean=mean, std=std,
                            crop_pct=crop_pct, crop_mode=crop_mode, is_training=False)


def data_config(model: nn.Module) -> dict:
    """The model's preprocessing (input size, interpolation, mean, std, crop) as timm resolves it."""
    pretrained_cfg = getattr(model, "pretrained_cfg", None) or _VAN_PREPROCESSING
    return resolve_data_config(pretrained_cfg=dict(pretrained_cfg), model=model)


def preprocess(model: nn.Module, image: Image.Image) -> torch.Tensor:
    """A (1, 3, H, W) tensor of ``image`` (any PIL mode or size) prepared as ``model`` expects."""
    cfg = data_config(model)
    transform = _eval_transform(tuple(cfg["input_size"]), cfg["interpolation"], tuple(cfg["mean"]),
                                tuple(cfg["std"]), cfg["crop_pct"], cfg.get("crop_mode", "center"))
    return transform(to_rgb(image)).unsqueeze(0)


def predict(model: nn.Module, image: Image.Image, k: int = 5) -> dict[str, float]:
    """Top-``k`` labels of ``image`` with their probabilities, highest first."""
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    param = next(model.parameters())
    batch = preprocess(model, image).to(param.device, param.dtype)
    with torch.inference_mode():
        probs = model(batch).float().softmax(-1)[0]
    top = probs.topk(min(k, probs.numel()))
    labels = getattr(model, "labels", None) or default_labels(probs.numel())
    return {labels[i]: float(p) for p, i in zip(top.values.tolist(), top.indices.tolist())}
