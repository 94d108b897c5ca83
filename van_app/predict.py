"""Classify one image with a VAN, using the preprocessing the model's weights were trained with."""

from __future__ import annotations

from functools import lru_cache

import torch
from PIL import Image
from timm.data import create_transform, resolve_data_config
from torch import nn

from .images import to_rgb


@lru_cache(maxsize=16)
def _eval_transform(input_size: tuple, interpolation: str, mean: tuple, std: tuple, crop_pct: float, crop_mode: str):
    """timm's evaluation transform (resize, center crop, normalize) for one data config."""
    return create_transform(input_size=input_size, interpolation=interpolation, mean=mean, std=std,
                            crop_pct=crop_pct, crop_mode=crop_mode, is_training=False)


def data_config(model: nn.Module) -> dict:
    """The model's preprocessing (input size, interpolation, mean, std, crop) as timm resolves it."""
    return resolve_data_config(model=model)


def preprocess(model: nn.Module, image: Image.Image) -> torch.Tensor:
    """A (1, 3, H, W) tensor of ``image`` (any PIL mode or size) prepared as ``model`` expects."""
    cfg = data_config(model)
    transform = _eval_transform(tuple(cfg["input_size"]), cfg["interpolation"], tuple(cfg["mean"]),
                                tuple(cfg["std"]), cfg["crop_pct"], cfg.get("crop_mode", "center"))
    return transform(to_rgb(image)).unsqueeze(0)


def predict(model: nn.Module, image: Image.Image, k: int = 5) -> dict[str, float]:
    """Top-``k`` labels of ``image`` with their probabilities, highest first."""
    param = next(model.parameters())
    batch = preprocess(model, image).to(param.device, param.dtype)
    with torch.inference_mode():
        probs = model(batch).float().softmax(-1)[0]
    top = probs.topk(min(k, probs.numel()))
    return {model.labels[i]: float(p) for p, i in zip(top.values.tolist(), top.indices.tolist())}
