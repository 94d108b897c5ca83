"""LKA attention maps from the same pass as the prediction, whatever runs the model.

A block's map is ``departure`` of its LKA attention (the output of ``lka.conv1``,
which gates the LKA input): ``mean_c (attn_c - mean_hw attn_c)^2``, (h, w) on the
stage's grid. ``attention_pass(model, batch)`` returns the logits and every block's
map from one forward pass:

- a model served by an engine (``fuse``) returns them from its graph's extra outputs
  (``forward_with_maps``);
- a folded VAN runs as ``WithAttentionMaps``, which hands each block's attention on
  explicitly: no hooks, so one model can serve several threads at once;
- any other VAN (unfolded, or built by timm) is read with ``capture_attention`` hooks,
  which a shared model must not run from two threads at once.
"""

from __future__ import annotations

import torch
from torch import nn

from .fold import FusedBlock
from .model import capture_attention

Maps = dict[tuple[int, int], torch.Tensor]


def departure(attn: torch.Tensor) -> torch.Tensor:
    """``mean_c (attn_c - mean_hw attn_c)^2`` of a block's ``attn`` (..., C, h, w) -> (..., h, w): where it gates
    unlike elsewhere."""
    attn = attn.float()
    return (attn - attn.mean((-2, -1), keepdim=True)).square().mean(-3)


def is_folded(model: nn.Module) -> bool:
    """Whether ``model`` is a VAN whose every block is folded (``fold.fold``)."""
    stages = getattr(model, "stages", None)
    return isinstance(stages, nn.Sequential) and all(isinstance(b, FusedBlock) for s in stages for b in s.blocks)


class WithAttentionMaps(nn.Module):
    """A folded VAN whose forward returns its logits, then each block's ``departure`` map in (stage, block) order."""

    def __init__(self, folded: nn.Module) -> None:
        super().__init__()
        if not is_folded(folded):
            raise TypeError("WithAttentionMaps needs a folded VAN (fold.fold)")
        self.van = folded

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        maps = []
        for stage in self.van.stages:
            x = stage.patch_embed(x)
            for block in stage.blocks:
                x, attn = block.forward_with_attention(x)
                maps.append(departure(attn))
            x = stage.norm(x)
        return self.van.forward_head(x), *maps


def block_keys(model: nn.Module) -> list[tuple[int, int]]:
    """(stage, block) of every block of a VAN, in forward order."""
    return [(s, b) for s, stage in enumerate(model.stages) for b in range(len(stage.blocks))]


def attention_pass(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, Maps]:
    """The logits of ``batch`` and each block's ``departure`` map, (B, h, w) keyed by (stage, block), from one pass."""
    if hasattr(model, "forward_with_maps"):
        return model.forward_with_maps(batch)
    if is_folded(model):
        logits, *maps = WithAttentionMaps(model)(batch)
        return logits, dict(zip(block_keys(model), maps))
    with capture_attention(model, detach=True) as captured:
        logits = model(batch)
    return logits, {key: departure(attn) for key, attn in sorted(captured.items())}
