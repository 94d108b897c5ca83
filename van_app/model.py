"""Visual Attention Network (Guo et al., arXiv 2202.09741): the architecture only.

The model reads top to bottom as the paper draws it: an overlapping patch
embedding opens each of four stages, a stack of blocks follows (BatchNorm ->
Attention with Large Kernel Attention, BatchNorm -> convolutional MLP, each
branch layer-scaled), and a LayerNorm closes the stage. A model keeps the
arguments it was built with (``model_args``), so nothing reads its architecture
back from its weights. Variants are rows of ``variants.VARIANTS``; building and
registering live there, loading weights in ``weights.py``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from timm.layers import DropPath, LayerNorm2d, trunc_normal_
from torch import nn

from .variants import VARIANTS


class LKA(nn.Module):
    """Large Kernel Attention: a 21x21 kernel as 5x5 dw -> 7x7 dw dilation 3 -> 1x1, gating its input."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(dim, dim, 5, padding=2, groups=dim)
        self.conv_spatial = nn.Conv2d(dim, dim, 7, padding=9, groups=dim, dilation=3)
        self.conv1 = nn.Conv2d(dim, dim, 1)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        attn = self.conv1(self.conv_spatial(self.conv0(u)))
        return u * attn


class Attention(nn.Module):
    """1x1 projection -> GELU -> LKA -> 1x1 projection, plus the (normalized) input as shortcut."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj_1 = nn.Conv2d(dim, dim, 1)
        self.act = nn.GELU()
        self.lka = LKA(dim)
        self.proj_2 = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_2(self.lka(self.act(self.proj_1(x)))) + x


class Mlp(nn.Module):
    """Convolutional MLP: 1x1 expand -> 3x3 depth-wise -> GELU -> 1x1 project."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(dim, hidden, 1)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Conv2d(hidden, dim, 1)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.act(self.dwconv(self.fc1(x))))
        return self.drop(self.fc2(x))


class Block(nn.Module):
    """BatchNorm -> Attention and BatchNorm -> Mlp, each branch layer-scaled and drop-pathed."""

    def __init__(
        self,
        dim: int,
        mlp_ratio: float,
        drop: float = 0.0,
        drop_path: float = 0.0,
        layer_scale_init: float = 1e-2,
    ) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(dim)
        self.attn = Attention(dim)
        self.norm2 = nn.BatchNorm2d(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.layer_scale_1 = nn.Parameter(torch.full((dim,), layer_scale_init))
        self.layer_scale_2 = nn.Parameter(torch.full((dim,), layer_scale_init))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.layer_scale_1[:, None, None] * self.attn(self.norm1(x)))
        return x + self.drop_path(self.layer_scale_2[:, None, None] * self.mlp(self.norm2(x)))


class OverlapPatchEmbed(nn.Module):
    """Overlapping patch embedding: a strided convolution (kernel > stride) and BatchNorm."""

    def __init__(self, in_chans: int, dim: int, patch_size: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, dim, patch_size, stride=stride, padding=patch_size // 2)
        self.norm = nn.BatchNorm2d(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x))


class Stage(nn.Module):
    """One resolution level: patch embedding (downsampling), blocks, channel LayerNorm."""

    def __init__(
        self,
        in_chans: int,
        dim: int,
        depth: int,
        mlp_ratio: float,
        first: bool,
        drop: float = 0.0,
        drop_paths: list[float] | None = None,
        layer_scale_init: float = 1e-2,
    ) -> None:
        super().__init__()
        drop_paths = drop_paths or [0.0] * depth
        self.patch_embed = OverlapPatchEmbed(in_chans, dim, 7 if first else 3, 4 if first else 2)
        self.blocks = nn.Sequential(*[Block(dim, mlp_ratio, drop, dp, layer_scale_init) for dp in drop_paths])
        self.norm = LayerNorm2d(dim, eps=1e-6)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        if self.grad_checkpointing and torch.is_grad_enabled():
            for block in self.blocks:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        else:
            x = self.blocks(x)
        return self.norm(x)


class VAN(nn.Module):
    """Visual Attention Network with timm's model contract (features, head, classifier reset)."""

    def __init__(
        self,
        embed_dims: Sequence[int] = VARIANTS["van_b0"].embed_dims,
        depths: Sequence[int] = VARIANTS["van_b0"].depths,
        mlp_ratios: Sequence[float] = VARIANTS["van_b0"].mlp_ratios,
        num_classes: int = 1000,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        layer_scale_init: float = 1e-2,
        global_pool: str = "avg",
    ) -> None:
        super().__init__()
        if global_pool not in ("avg", ""):
            raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
        embed_dims, depths, mlp_ratios = tuple(embed_dims), tuple(depths), tuple(mlp_ratios)
        # Everything VAN(**model.model_args) needs to rebuild this architecture; reset_classifier keeps it current.
        self.model_args: dict[str, Any] = dict(
            embed_dims=embed_dims, depths=depths, mlp_ratios=mlp_ratios, num_classes=num_classes, in_chans=in_chans,
            drop_rate=drop_rate, drop_path_rate=drop_path_rate, layer_scale_init=layer_scale_init,
            global_pool=global_pool,
        )
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = embed_dims[-1]
        self.drop_rate = drop_rate
        dpr = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").tolist()  # also on meta
        stages, prev, stride = [], in_chans, 1
        self.feature_info = []
        for i, (dim, depth, ratio) in enumerate(zip(embed_dims, depths, mlp_ratios)):
            start = sum(depths[:i])
            stages.append(Stage(prev, dim, depth, ratio, i == 0, drop_rate, dpr[start : start + depth], layer_scale_init))
            stride *= 4 if i == 0 else 2
            self.feature_info.append(dict(num_chs=dim, reduction=stride, module=f"stages.{i}"))
            prev = dim
        self.stages = nn.Sequential(*stages)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        """Layer scales are gains, not weights: keep them out of weight decay."""
        return {name for name, _ in self.named_parameters() if "layer_scale" in name}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """Parameter groups for timm's layer-wise learning-rate decay."""
        return dict(
            stem=r"^stages\.0\.patch_embed",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.patch_embed", None),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^stages\.(\d+)\.norm", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute blocks in the backward pass to save memory."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        """The classification head."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a freshly initialized one for ``num_classes`` (0: no head)."""
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.model_args.update(num_classes=num_classes, global_pool=self.global_pool)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.head.apply(_init_weights)
        device = self.stages[0].patch_embed.proj.weight.device
        self.head.to(device)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Unpooled features of the last stage, (B, C, H/32, W/32)."""
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global mean pooling, dropout and the linear head."""
        if self.global_pool == "avg":
            x = x.mean((2, 3))
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _init_weights(m: nn.Module) -> None:
    """The official initialisation: truncated normal for linear layers, He (fan-out) for convolutions."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            nn.init.zeros_(m.bias)


def lka_modules(model: nn.Module) -> Iterator[tuple[tuple[int, int], LKA]]:
    """Every LKA of a VAN (plain or fused) keyed by (stage index, block index)."""
    for s, stage in enumerate(model.stages):
        for b, block in enumerate(stage.blocks):
            yield (s, b), block.attn.lka


@contextmanager
def capture_attention(model: nn.Module, detach: bool = False) -> Iterator[dict[tuple[int, int], torch.Tensor]]:
    """Record each LKA's ``attn`` (the tensor gating ``u``) during forward passes inside the block.

    The dict maps (stage, block) to ``attn`` of the latest pass. Hooks only read
    the tensor, so outputs are unchanged; with ``detach=False`` the captured
    tensors stay on the autograd graph (for gradient-weighted maps). Hooks are
    removed on exit, so a model outside the block pays nothing.
    """
    captured: dict[tuple[int, int], torch.Tensor] = {}
    handles = []
    for key, lka in lka_modules(model):

        def hook(_module: nn.Module, _args: tuple, attn: torch.Tensor, key=key) -> None:
            captured[key] = attn.detach() if detach else attn

        handles.append(lka.conv1.register_forward_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()
