"""VAN Studio: fine-tune, share and explain Visual Attention Network image classifiers.

``import van_app`` is cheap: it imports neither torch nor timm, so the console
scripts answer ``--help`` at once. The public names below are loaded on first
use (PEP 562). Importing the package registers ``van_b0`` ... ``van_b6`` (and
``van_micro``) with timm: at once if timm is already imported, otherwise as soon
as timm's import finishes (``variants.register_when_timm_imports``).
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType
from typing import Any

from .errors import CheckpointError
from .variants import VARIANTS, pretrained_variants, register_when_timm_imports

__version__ = "0.1.0"
__all__ = ["VAN", "VARIANTS", "CheckpointError", "capture_attention", "export_onnx", "fuse", "load_model", "predict",
           "preprocess", "pretrained_variants"]

# The module each lazily loaded public name lives in.
_HOMES = {"VAN": "model", "capture_attention": "model", "export_onnx": "onnx_export", "fuse": "fuse",
          "load_model": "weights", "predict": "predict", "preprocess": "predict"}


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


class _Package(ModuleType):
    """This package: importing submodule ``fuse`` or ``predict`` leaves the function of that name in place."""

    def __setattr__(self, name: str, value: Any) -> None:
        if not (name in _HOMES and isinstance(value, ModuleType)):  # the import system sets each submodule here
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
register_when_timm_imports()
