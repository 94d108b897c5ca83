"""Inference-time re-parameterisation of VAN (placeholder until the fused model lands)."""

from __future__ import annotations

import copy

from torch import nn


def fuse(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` for inference with the same outputs."""
    return copy.deepcopy(model).eval()
