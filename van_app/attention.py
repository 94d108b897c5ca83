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

The *evidence* for a class k (what the page's default map is made of) is the gradient
times the gated signal's difference to the reference,
``sum_c (d logit_k / d g_c) * (g_c - g0_c)`` per block, summed over a stage's blocks: each
cell's first-order share of the logit against the blank (``CLASS_RULES`` also has
LayerCAM's positive gradients and Grad-CAM's channel weights; ``CLASS_RULE`` and
``CLASS_STAGES`` were chosen on the heatmap benchmark's validation seed). A blank image
gets none. Unlike the block maps it depends on every weight from the stage to the
logits, so it passes the model-randomisation check that a stage-1 block map cannot.

``attention_pass(model, batch, target)`` returns a ``Pass``: the logits, every block's
map, (B, h, w) on the stage's grid, and the evidence for each image's ``target`` class
(by default its predicted class) on each stage of ``CLASS_STAGES``, from one pass of
the images and their references (one forward pass each, one backward pass from the
target logits to the gated signals):

- a model served by an engine (``fuse``) returns them from its graph's extra outputs
  (``forward_with_maps``): the backward pass is part of the exported graph;
- any VAN runs as ``WithAttentionMaps`` on its folded form, which hands each block's
  gated signal on explicitly: no hooks, so one model can serve several threads at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from .fold import FusedBlock, _gelu, fold
from .model import lka_modules

Maps = dict[tuple[int, int], torch.Tensor]
# The class(es) to explain: one for the whole batch, one per image, or None for each image's predicted class.
Target = int | Sequence[int] | torch.Tensor | None
# Per block, from its gated signal's difference to the reference ``d`` (B, C, h, w) and ``grad`` = d logit / d g.
CLASS_RULES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "gradcam": lambda d, grad: (grad.mean((-2, -1), keepdim=True) * d).sum(-3),
    "layercam": lambda d, grad: (grad.clamp_min(0) * d).sum(-3),
    "gradient": lambda d, grad: (grad * d).sum(-3),
}
# The evidence's rule and stages, chosen on the heatmap benchmark's validation seed (benchmarks/heatmaps.py).
CLASS_RULE = "gradient"
CLASS_STAGES = (0, 1)


@dataclass(frozen=True)
class Pass:
    """One pass of a batch: ``logits`` (B, classes), each block's map (B, h, w) keyed by (stage, block), and per
    stage of ``CLASS_STAGES`` the evidence (B, h, w) for each image's ``target`` class."""

    logits: torch.Tensor
    maps: Maps
    evidence: dict[int, torch.Tensor]
    target: torch.Tensor  # (B,) the class each image's evidence is for


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
    logits stops at the gated signals of stage ``grad_from`` (which are tracked when
    autograd is on, whether or not the weights need gradients). With ``until`` only
    the stages before it run, and the first value is their output instead of the logits.
    """
    gated: list[list[torch.Tensor]] = []
    for s, stage in enumerate(folded.stages[:until]):
        if s == grad_from and torch.is_grad_enabled():
            x = x.detach().requires_grad_()
        with torch.no_grad() if s < grad_from else nullcontext():
            x = stage.patch_embed(x)
            gated.append([])
            for block in stage.blocks:
                x, g = gated_block(block, x)
                gated[-1].append(g)
            x = stage.norm(x)
    return (x if until is not None else folded.forward_head(x)), gated


def evidence(logits: torch.Tensor, gated: list[list[torch.Tensor]], gated_reference: list[list[torch.Tensor]],
             target: torch.Tensor, rule: str = CLASS_RULE, stages: Sequence[int] = CLASS_STAGES
             ) -> dict[int, torch.Tensor]:
    """Per stage of ``stages``, the evidence (B, h, w) for class ``target`` (B,) of each image by ``CLASS_RULES[rule]``,
    summed over the stage's blocks: one backward pass from the target logits to the gated signals, which
    ``gated_stages`` must have tracked."""
    seed = torch.where(torch.arange(logits.shape[-1], device=logits.device) == target[:, None], 1.0, 0.0)
    signals = [g for s in stages for g in gated[s]]
    grads = iter(torch.autograd.grad(logits, signals, grad_outputs=seed.to(logits.dtype)))
    score = CLASS_RULES[rule]
    with torch.no_grad():
        return {s: sum(score(g.float() - g0.float(), next(grads).float())
                       for g, g0 in zip(gated[s], gated_reference[s])) for s in stages}


class WithAttentionMaps(nn.Module):
    """A folded VAN whose forward returns its logits, each block's map in (stage, block) order, the evidence for each
    image's target class on each stage of ``CLASS_STAGES``, then those classes (B,).

    ``target`` (B,) names each image's class; a negative entry, or no ``target``, means
    the predicted class. Autograd runs inside, even under ``torch.inference_mode``, for
    the evidence's backward pass.
    """

    def __init__(self, folded: nn.Module) -> None:
        super().__init__()
        if not is_folded(folded):
            raise TypeError("WithAttentionMaps needs a folded VAN (fold.fold)")
        self.van = folded

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        with torch.inference_mode(False), torch.enable_grad():
            x = x.clone()  # a tensor made in inference mode cannot be recorded for a backward pass
            with torch.no_grad():
                _, gated_reference = gated_stages(self.van, reference(x))
            logits, gated = gated_stages(self.van, x, grad_from=min(CLASS_STAGES))
            predicted = logits.argmax(-1)
            chosen = predicted if target is None else torch.where(target < 0, predicted, target)
            shown = evidence(logits, gated, gated_reference, chosen)
        with torch.no_grad():
            maps = [m for g, g0 in zip(gated, gated_reference) for m in stage_block_maps(g, g0)]
        return logits.detach(), *maps, *(shown[s].detach() for s in CLASS_STAGES), chosen


def stage_strides(model: nn.Module) -> list[int]:
    """Input pixels per cell of each stage's grid (4, 8, 16, 32 for VAN), from the model's ``feature_info``."""
    return [info["reduction"] for info in model.feature_info]


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


def targets(target: Target, batch: int, classes: int) -> torch.Tensor:
    """``target`` as the (``batch``,) int64 tensor ``WithAttentionMaps`` takes (-1: the predicted class); a
    ``ValueError`` for a class out of range or a count that is not ``batch``."""
    if target is None:
        return torch.full((batch,), -1, dtype=torch.int64)
    chosen = torch.as_tensor(target, dtype=torch.int64).reshape(-1).cpu()
    chosen = chosen.expand(batch) if chosen.numel() == 1 else chosen
    if chosen.numel() != batch:
        raise ValueError(f"expected one target class per image ({batch}), got {chosen.numel()}")
    if ((chosen < -1) | (chosen >= classes)).any():
        raise ValueError(f"target classes must be in 0..{classes - 1} (or -1 for the predicted class), got "
                         f"{chosen.tolist()}")
    return chosen.contiguous()


def attention_pass(model: nn.Module, batch: torch.Tensor, target: Target = None) -> Pass:
    """The logits of ``batch``, each block's map and the evidence for each image's ``target`` class (one class for
    all, one per image, or by default each image's predicted class), from one pass.

    ``model`` is a VAN (folded here unless it is; ``fold`` copies it, so callers that
    pass the same model often fold it once) or a model with ``forward_with_maps``.
    """
    if hasattr(model, "forward_with_maps"):
        return model.forward_with_maps(batch, target)
    folded = model if is_folded(model) else fold(model)
    chosen = targets(target, len(batch), folded.num_classes).to(batch.device)
    logits, *outputs, chosen = WithAttentionMaps(folded)(batch, chosen)
    keys = block_keys(folded)
    return Pass(logits, dict(zip(keys, outputs)), dict(zip(CLASS_STAGES, outputs[len(keys):])), chosen)
