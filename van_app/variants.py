"""VAN's variants, one row each, and their registration with timm.

A row of ``VARIANTS`` is everything a variant is: widths, depths, MLP ratios and,
when they exist, the Hub repo and file of its official ImageNet-1k weights. The
timm model, its pretrained config (``van_b0.in1k``), ``pretrained_variants()``
and the names in messages all derive from the rows, so a variant is added by
adding a row.

Importing this module is cheap (no torch, no timm): ``van-finetune --help``
lists the variants from it. timm is imported only to build or register.
``register_when_timm_imports`` keeps the promise that ``import van_app``
registers the variants whichever of ``van_app`` and ``timm`` is imported first:
it registers at once when timm is already imported, and otherwise leaves a
finder on ``sys.meta_path`` that wraps timm's loader, registers right after
timm's own import finishes, and removes itself. A process started by spawn
(DataLoader workers, multiprocessing) imports ``van_app`` again when it
unpickles anything of ours, so the same promise holds there.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from importlib.machinery import ModuleSpec

    from .model import VAN

# The official weights were trained and validated with timm 0.4.12's ViT `_cfg()`:
# mean = std = 0.5, bicubic, crop pct 0.9 -- not ImageNet's mean/std.
VAN_MEAN = (0.5, 0.5, 0.5)
VAN_STD = (0.5, 0.5, 0.5)
VAN_PREPROCESSING = {"input_size": (3, 224, 224), "interpolation": "bicubic", "crop_pct": 0.9, "crop_mode": "center",
                     "mean": VAN_MEAN, "std": VAN_STD}
VAN_LAYOUT = {"first_conv": "stages.0.patch_embed.proj", "classifier": "head"}  # module names timm adapts
ARCHITECTURE_ARGS = ("embed_dims", "depths", "mlp_ratios")


@dataclass(frozen=True)
class VanSpec:
    """One variant: widths, depths and MLP ratios, and the Hub repo and file of its official weights, if any."""

    embed_dims: tuple[int, int, int, int]
    depths: tuple[int, int, int, int]
    mlp_ratios: tuple[float, float, float, float] = (8, 8, 4, 4)
    weights: tuple[str, str] | None = None  # (Hub repo id, file name) of the official ImageNet-1k weights

    @property
    def model_args(self) -> dict[str, tuple]:
        """The ``VAN`` constructor arguments that give this variant's architecture."""
        return dict(embed_dims=self.embed_dims, depths=self.depths, mlp_ratios=self.mlp_ratios)


VARIANTS: dict[str, VanSpec] = {
    "van_b0": VanSpec((32, 64, 160, 256), (3, 3, 5, 2),
                      weights=("Visual-Attention-Network/VAN-Tiny-original", "van_tiny_754.pth.tar")),
    "van_b1": VanSpec((64, 128, 320, 512), (2, 2, 4, 2),
                      weights=("Visual-Attention-Network/VAN-Small-original", "van_small_811.pth.tar")),
    "van_b2": VanSpec((64, 128, 320, 512), (3, 3, 12, 3),
                      weights=("Visual-Attention-Network/VAN-Base-original", "van_base_828.pth.tar")),
    "van_b3": VanSpec((64, 128, 320, 512), (3, 5, 27, 3),
                      weights=("Visual-Attention-Network/VAN-Large-original", "van_large_839.pth.tar")),
    "van_b4": VanSpec((64, 128, 320, 512), (3, 6, 40, 3)),
    "van_b5": VanSpec((96, 192, 480, 768), (3, 3, 24, 3)),
    "van_b6": VanSpec((96, 192, 384, 768), (6, 6, 90, 6)),
    # Not in the paper: a few-thousand-parameter VAN for tests and demos.
    "van_micro": VanSpec((8, 16, 32, 64), (1, 1, 2, 1)),
}
# The timm entrypoint an architecture matching no row is built (and exported) under; model_args override its numbers.
CUSTOM_BASE = "van_micro"


def pretrained_variants() -> list[str]:
    """The variants with official ImageNet weights on the Hub, in table order."""
    return [name for name, spec in VARIANTS.items() if spec.weights]


def variant_of(model_args: dict[str, Any]) -> str | None:
    """The variant whose widths, depths and MLP ratios ``model_args`` gives, if any."""
    wanted = {k: tuple(model_args[k]) for k in ARCHITECTURE_ARGS}
    return next((name for name, spec in VARIANTS.items() if spec.model_args == wanted), None)


def pretrained_cfg(name: str) -> dict[str, Any]:
    """timm's pretrained config of a variant: where its official weights are (if any) and their preprocessing."""
    hub_id, filename = VARIANTS[name].weights or (None, None)
    return {
        "hf_hub_id": hub_id,
        "hf_hub_filename": filename,
        "num_classes": 1000,
        "pool_size": (7, 7),
        **VAN_PREPROCESSING,
        **VAN_LAYOUT,
        "license": "apache-2.0",
        "paper_ids": "arXiv:2202.09741",
        "paper_name": "Visual Attention Network",
        "origin_url": "https://github.com/Visual-Attention-Network/VAN-Classification",
    }


def __getattr__(name: str) -> Any:
    # timm's register_model looks up an entrypoint's pretrained configs as ``default_cfgs`` of the
    # entrypoint's module; here they are derived from the rows when asked, so importing stays cheap.
    if name == "default_cfgs":
        from timm.models import generate_default_cfgs

        return generate_default_cfgs({f"{v}.in1k" if VARIANTS[v].weights else v: pretrained_cfg(v) for v in VARIANTS})
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def create_van(variant: str, pretrained: bool = False, **kwargs: Any) -> VAN:
    """A VAN with ``variant``'s architecture (``kwargs`` override it) built by timm's builder, named by its row.

    Every VAN is built here: timm's entrypoints, fresh models and loaded
    checkpoints alike. ``model.variant`` is the row the built architecture
    matches, or ``custom``.
    """
    from timm.models import build_model_with_cfg

    from .convert import checkpoint_filter_fn
    from .model import VAN

    if "pretrained_cfg" not in kwargs:  # not a config timm read from a file: ours, whatever timm's registry holds
        kwargs["pretrained_cfg_overlay"] = {**pretrained_cfg(variant), **(kwargs.get("pretrained_cfg_overlay") or {})}
    model = build_model_with_cfg(
        VAN,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=(0, 1, 2, 3), flatten_sequential=True),
        **dict(VARIANTS[variant].model_args, **kwargs),
    )
    if isinstance(model, VAN):  # not a features_only wrapper
        model.variant = variant_of(model.model_args) or "custom"
    return model


def _entrypoint(variant: str) -> Any:
    """The timm model function of one row."""

    def entrypoint(pretrained: bool = False, **kwargs: Any) -> VAN:
        return create_van(variant, pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = variant
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"VAN {variant}: {VARIANTS[variant].model_args}."
    return entrypoint


def register_variants() -> None:
    """Register every row with timm (as ``timm.create_model(name)``), skipping those already registered."""
    from timm.models import is_model, model_entrypoint, register_model

    for name in VARIANTS:
        if not (is_model(name) and model_entrypoint(name).__module__ == __name__):
            register_model(_entrypoint(name))


def register_when_timm_imports() -> None:
    """Register the variants with timm now if timm is imported, else as soon as its import finishes."""
    if "timm" in sys.modules:
        register_variants()
    elif not any(isinstance(finder, _RegisterAfterTimm) for finder in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterTimm())


class _RegisterAfterTimm(importlib.abc.MetaPathFinder):
    """Finds timm through the other finders, wrapping its loader to register the variants; then leaves."""

    def find_spec(self, fullname: str, path: Any = None, target: ModuleType | None = None) -> ModuleSpec | None:
        if fullname != "timm":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("timm")
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfterExec(spec.loader)
        return spec


class _RegisterAfterExec(importlib.abc.Loader):
    """timm's own loader, registering the variants once timm's ``__init__`` has run."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = module.__spec__.loader = self.loader  # timm sees its own loader from here on
        self.loader.exec_module(module)
        register_variants()


def imagenet_labels() -> list[str]:
    """The official weights' 1000 ImageNet-1k class names in index order (from timm), shortest unambiguous form."""
    from timm.data import ImageNetInfo

    descriptions = ImageNetInfo().label_descriptions()
    short = [d.split(",")[0].strip() for d in descriptions]
    names = [s if short.count(s) == 1 else d for s, d in zip(short, descriptions)]
    return [n if names.count(n) == 1 else f"{n} ({i})" for i, n in enumerate(names)]


def default_labels(num_classes: int) -> list[str]:
    """Labels for a head with no names: ImageNet's for 1000 classes, else ``class_<i>``."""
    return imagenet_labels() if num_classes == 1000 else [f"class_{i}" for i in range(num_classes)]
