"""VAN Studio: fine-tune, share and explain Visual Attention Network image classifiers.

Importing the package registers ``van_b0`` ... ``van_b6`` (and ``van_micro``) with timm.
"""

from .fuse import fuse
from .model import VAN, VARIANTS, capture_attention
from .predict import predict, preprocess
from .weights import CheckpointError, load_model

__version__ = "0.1.0"
__all__ = ["VAN", "VARIANTS", "CheckpointError", "capture_attention", "fuse", "load_model", "predict", "preprocess"]
