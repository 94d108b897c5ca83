"""Inference-time VAN in PyTorch: BatchNorms and layer scales folded into convolutions.

``fold(model)`` returns a new eval-mode VAN (the input is untouched) computing
the same function with fewer operations. Per block, with BatchNorm ``bn(x) = s*x + t``:

- ``norm1`` folds into ``attn.proj_1`` and ``norm2`` into ``mlp.fc1`` (1x1 convolutions
  without padding, so the fold is exact at every pixel, borders included);
- the attention branch adds the *normalized* input back, so
  ``x + ls1*(proj_2(z) + s1*x + t1) = (1 + ls1*s1)*x + (ls1*proj_2)(z) + ls1*t1``:
  ``ls1`` and ``t1`` fold into ``proj_2`` and the shortcut becomes a per-channel scale
  (one ``addcmul``);
- ``layer_scale_2`` folds into ``mlp.fc2``; each patch embedding's BatchNorm folds into its conv.

Two layout changes keep the function and save most of the remaining time in eager
PyTorch on CPU: LKA's dilated convolution gets its zero padding beforehand (``FusedLKA``,
``prepad``), and the weights are stored channels-last so activations stay NHWC, where
oneDNN's depth-wise kernels are fastest. Neither helps a graph exported to ONNX
(``onnx_export`` folds without them). The stage LayerNorms stay (they normalize per
pixel). Module paths of LKA (``stages[i].blocks[j].attn.lka.conv1``) and the model's
attributes (``labels``, ``pretrained_cfg``, ...) are kept, so ``capture_attention`` and
``predict`` work on the folded model; each block's ``forward_with_attention`` also hands
back its LKA attention, which the exported graph turns into extra outputs.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from .model import LKA, Block, OverlapPatchEmbed


def _gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact GELU; in eager PyTorch a channels-last tensor goes through its NHWC view, which is vectorized (about 2x
    faster). An ONNX export gets the plain GELU (the view would become two transposes)."""
    if (x.dim() == 4 and not torch.onnx.is_in_onnx_export() and not x.is_contiguous()
            and x.is_contiguous(memory_format=torch.channels_last)):
        return F.gelu(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    return F.gelu(x)


class FusedLKA(nn.Module):
    """LKA computing the same function, with the dilated convolution's zero padding done beforehand if ``prepad``.

    With its padding of 9 (wider than oneDNN's optimized depth-wise kernels take) the
    convolution ran 5-20x slower in eager PyTorch on an AVX-512 CPU than on the input
    padded first; ONNX engines pad inside the convolution and need no separate step.
    """

    def __init__(self, lka: LKA, prepad: bool = True) -> None:
        super().__init__()
        if prepad and lka.conv_spatial.padding_mode != "zeros":
            raise ValueError("only zero-padded LKA convolutions can be pre-padded")
        ph, pw = lka.conv_spatial.padding
        self.spatial_padding = (pw, pw, ph, ph) if prepad else (0, 0, 0, 0)
        self.conv0 = lka.conv0
        self.conv_spatial = lka.conv_spatial
        if prepad:
            self.conv_spatial.padding = (0, 0)
        self.conv1 = lka.conv1

    def attention(self, u: torch.Tensor) -> torch.Tensor:
        """The attention that gates ``u`` (the output of ``conv1``, which ``capture_attention`` records)."""
        attn = self.conv0(u)
        if any(self.spatial_padding):
            attn = F.pad(attn, self.spatial_padding)
        return self.conv1(self.conv_spatial(attn))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return u * self.attention(u)


class FusedAttention(nn.Module):
    """1x1 projection (norm1 folded in) -> GELU -> LKA -> 1x1 projection (layer scale folded in), no shortcut."""

    def __init__(self, proj_1: nn.Conv2d, lka: FusedLKA, proj_2: nn.Conv2d) -> None:
        super().__init__()
        self.proj_1 = proj_1
        self.lka = lka
        self.proj_2 = proj_2

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The branch's output and the LKA attention inside it."""
        u = _gelu(self.proj_1(x))
        attn = self.lka.attention(u)
        return self.proj_2(u * attn), attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_attention(x)[0]


class FusedMlp(nn.Module):
    """1x1 expand (norm2 folded in) -> 3x3 depth-wise -> GELU -> 1x1 project (layer scale folded in)."""

    def __init__(self, fc1: nn.Conv2d, dwconv: nn.Conv2d, fc2: nn.Conv2d) -> None:
        super().__init__()
        self.fc1 = fc1
        self.dwconv = dwconv
        self.fc2 = fc2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(_gelu(self.dwconv(self.fc1(x))))


class FusedBlock(nn.Module):
    """A VAN block without normalization or layer scales: ``x*a + attn(x)``, then ``+ mlp(x)``."""

    def __init__(self, attn: FusedAttention, shortcut_scale: torch.Tensor, mlp: FusedMlp) -> None:
        super().__init__()
        self.attn = attn
        self.mlp = mlp
        self.register_buffer("shortcut_scale", shortcut_scale.reshape(-1, 1, 1))

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's output and its LKA attention, from one pass."""
        branch, attn = self.attn.forward_with_attention(x)
        x = torch.addcmul(branch, self.shortcut_scale, x)
        return x + self.mlp(x), attn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_attention(x)[0]


def _bn_affine(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as ``s*x + t`` per channel, in float64."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("cannot fold a BatchNorm2d without running statistics")
    s = (bn.running_var.double() + bn.eps).rsqrt()
    if bn.weight is not None:
        s = s * bn.weight.double()
    t = -bn.running_mean.double() * s
    if bn.bias is not None:
        t = t + bn.bias.double()
    return s, t


def _conv_params(conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor]:
    """A convolution's weight and bias (zeros when it has none), in float64."""
    w = conv.weight.double()
    b = conv.bias.double() if conv.bias is not None else w.new_zeros(conv.out_channels)
    return w, b


def _with_params(conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor) -> nn.Conv2d:
    """``conv`` (a private copy) given a float64 weight and bias, cast back to its dtype."""
    dtype, grad = conv.weight.dtype, conv.weight.requires_grad
    conv.weight = nn.Parameter(weight.to(dtype), requires_grad=grad)
    conv.bias = nn.Parameter(bias.to(dtype), requires_grad=grad)
    return conv


def _fold_bn_after(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """``bn(conv(x))`` as one convolution."""
    s, t = _bn_affine(bn)
    w, b = _conv_params(conv)
    return _with_params(conv, w * s.view(-1, 1, 1, 1), b * s + t)


def _fold_bn_before(bn: nn.BatchNorm2d, conv: nn.Conv2d) -> nn.Conv2d:
    """``conv(bn(x))`` as one convolution; exact for 1x1 convolutions without padding."""
    if conv.kernel_size != (1, 1) or conv.padding not in ((0, 0), "valid") or conv.groups != 1:
        raise ValueError(f"BatchNorm folds exactly only into a dense 1x1 convolution without padding, got {conv}")
    s, t = _bn_affine(bn)
    w, b = _conv_params(conv)
    return _with_params(conv, w * s.view(1, -1, 1, 1), b + w[:, :, 0, 0] @ t)


def _scale_out(conv: nn.Conv2d, scale: torch.Tensor, shift: torch.Tensor | None = None) -> nn.Conv2d:
    """``scale * (conv(x) + shift)`` per output channel as one convolution."""
    w, b = _conv_params(conv)
    scale = scale.double()
    if shift is not None:
        b = b + shift
    return _with_params(conv, w * scale.view(-1, 1, 1, 1), b * scale)


def _fuse_block(block: Block, prepad: bool) -> FusedBlock:
    """``block`` (a private copy, whose convolutions are reused) with BatchNorms and layer scales folded."""
    s1, t1 = _bn_affine(block.norm1)
    ls1, ls2 = block.layer_scale_1.detach().double(), block.layer_scale_2.detach().double()
    attn = FusedAttention(
        _fold_bn_before(block.norm1, block.attn.proj_1),
        FusedLKA(block.attn.lka, prepad),
        _scale_out(block.attn.proj_2, ls1, shift=t1),
    )
    mlp = FusedMlp(_fold_bn_before(block.norm2, block.mlp.fc1), block.mlp.dwconv, _scale_out(block.mlp.fc2, ls2))
    shortcut_scale = (1 + ls1 * s1).to(block.layer_scale_1.dtype)
    return FusedBlock(attn, shortcut_scale, mlp)


def _fuse_patch_embed(patch_embed: OverlapPatchEmbed) -> OverlapPatchEmbed:
    """``patch_embed`` (a private copy) with its BatchNorm folded into the convolution (``norm`` becomes identity)."""
    if isinstance(patch_embed.norm, nn.BatchNorm2d):
        patch_embed.proj = _fold_bn_after(patch_embed.proj, patch_embed.norm)
        patch_embed.norm = nn.Identity()
    return patch_embed


@torch.no_grad()
def fold(model: nn.Module, *, channels_last: bool = True, prepad: bool = True) -> nn.Module:
    """A new eval-mode VAN computing the same outputs with every BatchNorm and layer scale folded away.

    The input model is left untouched; folding a folded model changes nothing.
    With ``channels_last`` the weights are stored NHWC, so activations stay NHWC
    from the first convolution on (inputs may be either layout), and with ``prepad``
    LKA pads before its dilated convolution: in eager PyTorch on CPU the depth-wise
    convolutions run several times faster that way. The result is cheap to build.
    """
    if not isinstance(getattr(model, "stages", None), nn.Sequential):
        raise TypeError(f"fuse expects a VAN (with .stages), got {type(model).__name__}")
    with torch.inference_mode(False), torch.no_grad():  # weights a backward pass (the evidence) may go through
        fused = copy.deepcopy(model).eval()
        for stage in fused.stages:
            stage.patch_embed = _fuse_patch_embed(stage.patch_embed)
            stage.blocks = nn.Sequential(*[_fuse_block(b, prepad) if isinstance(b, Block) else b
                                           for b in stage.blocks])
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        return fused.to(memory_format=memory_format)
