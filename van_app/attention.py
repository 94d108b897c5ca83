"""LKA maps from the same pass as the prediction, whatever runs the model.

LKA passes on ``u * attn`` (its input gated by its attention), so a block's map scores
that gated signal, and only the part of it that the image, not the network, puts
there. Every image is run beside its *reference*: the blank image of its own mean
colour (``reference``), which shows the network's position-dependent response (zero
padding at the frame's edges, stride patterns) and nothing of the picture. With ``g``
and ``g0`` a block's gated signal for the image and for its reference, (C, h, w):

    block map = mean_c (d_c - mean_hw d_c)^2 / P,   d = g - g0

the squared departure of the difference from its channel's spatial mean (constant
offsets per channel drop out), divided by ``P``, the image's mean gated power
``mean(g^2)`` over the blocks of the stage. The map is dimensionless (1.0: the cell
departs from the blank by as much power as the image's average cell carries), a
blank image of any colour gets exactly zero, and a picture a few grey levels of
noise away from blank stays below 0.1 (``explain.STRUCTURE_FLOOR``).

``attention_pass(model, batch)`` returns the logits and every block's map, (B, h, w)
on the stage's grid, from one pass of the image and its reference (a batch of 2B):

- a model served by an engine (``fuse``) returns them from its graph's extra outputs
  (``forward_with_maps``);
- a folded VAN runs as ``WithAttentionMaps``, which hands each block's gated signal
  on explicitly: no hooks, so one model can serve several threads at once;
- any other VAN (unfolded, or built by timm) is read with hooks on each LKA, which a
  shared model must not run from two threads at once.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

import torch
from torch import nn

from .fold import FusedBlock, _gelu
from .model import lka_modules

Maps = dict[tuple[int, int], torch.Tensor]


def departure(x: torch.Tensor) -> torch.Tensor:
    """``mean_c (x_c - mean_hw x_c)^2`` of ``x`` (..., C, h, w) -> (..., h, w): where it differs from its channel's
    spatial mean."""
    x = x.float()
    return (x - x.mean((-2, -1), keepdim=True)).square().mean(-3)


def reference(batch: torch.Tensor) -> torch.Tensor:
    """Each image of ``batch`` (B, 3, H, W) replaced by a blank image of its own mean colour."""
    return batch.mean((-2, -1), keepdim=True).expand_as(batch)


def stage_block_maps(gated: list[torch.Tensor], gated_reference: list[torch.Tensor]) -> list[torch.Tensor]:
    """One stage's block maps (B, h, w) from its blocks' gated signals for the images and their references."""
    power = torch.stack([g.float().square().mean((-3, -2, -1)) for g in gated]).mean(0)
    scale = power.clamp_min(torch.finfo(torch.float32).tiny)[:, None, None]
    return [departure(g.float() - g0.float()) / scale for g, g0 in zip(gated, gated_reference)]


def gated_block(block: FusedBlock, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A folded block's output and the gated signal its LKA passes on (``u * attn``), as ``FusedBlock`` computes."""
    u = _gelu(block.attn.proj_1(x))
    gated = block.attn.lka(u)
    x = torch.addcmul(block.attn.proj_2(gated), block.shortcut_scale, x)
    return x + block.mlp(x), gated


def is_folded(model: nn.Module) -> bool:
    """Whether ``model`` is a VAN whose every block is folded (``fold.fold``)."""
    stages = getattr(model, "stages", None)
    return isinstance(stages, nn.Sequential) and all(isinstance(b, FusedBlock) for s in stages for b in s.blocks)


def gated_stages(folded: nn.Module, x: torch.Tensor, grad_from: int = 0, until: int | None = None
                 ) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
    """The logits of ``x`` and each block's gated signal, per stage, through a folded VAN without hooks.

    Stages before ``grad_from`` run without autograd, so a backward pass from the
    logits stops at the gated signals of stage ``grad_from``. With ``until`` only the
    stages before it run, and the first value is their output instead of the logits.
    """
    gated: list[list[torch.Tensor]] = []
    for s, stage in enumerate(folded.stages[:until]):
        with torch.no_grad() if s < grad_from else nullcontext():
            x = stage.patch_embed(x)
            gated.append([])
            for block in stage.blocks:
                x, g = gated_block(block, x)
                gated[-1].append(g)
            x = stage.norm(x)
    return (x if until is not None else folded.forward_head(x)), gated


class WithAttentionMaps(nn.Module):
    """A folded VAN whose forward returns its logits, then each block's map in (stage, block) order."""

    def __init__(self, folded: nn.Module) -> None:
        super().__init__()
        if not is_folded(folded):
            raise TypeError("WithAttentionMaps needs a folded VAN (fold.fold)")
        self.van = folded

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, gated = gated_stages(self.van, torch.cat([x, reference(x)]))
        maps = []
        for stage in gated:
            halves = [g.chunk(2) for g in stage]  # (image, reference) of each block
            maps += stage_block_maps([g for g, _ in halves], [g0 for _, g0 in halves])
        return logits.chunk(2)[0], *maps


def block_keys(model: nn.Module) -> list[tuple[int, int]]:
    """(stage, block) of every block of a VAN, in forward order."""
    return [(s, b) for s, stage in enumerate(model.stages) for b in range(len(stage.blocks))]


@contextmanager
def capture_gated(model: nn.Module) -> Iterator[Maps]:
    """Record each LKA's output, the gated signal ``u * attn`` (detached), keyed by (stage, block), inside the block."""
    captured: Maps = {}
    handles = [lka.register_forward_hook(lambda _m, _a, out, key=key: captured.__setitem__(key, out.detach()))
               for key, lka in lka_modules(model)]
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def attention_pass(model: nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, Maps]:
    """The logits of ``batch`` and each block's map, (B, h, w) keyed by (stage, block), from one pass."""
    if hasattr(model, "forward_with_maps"):
        return model.forward_with_maps(batch)
    if is_folded(model):
        logits, *maps = WithAttentionMaps(model)(batch)
        return logits, dict(zip(block_keys(model), maps))
    with capture_gated(model) as captured:
        logits = model(torch.cat([batch, reference(batch)]))
    maps: Maps = {}
    for stage in sorted({s for s, _ in captured}):
        keys = sorted(key for key in captured if key[0] == stage)
        halves = [captured[key].chunk(2) for key in keys]
        maps.update(zip(keys, stage_block_maps([g for g, _ in halves], [g0 for _, g0 in halves])))
    return logits.chunk(2)[0], maps
