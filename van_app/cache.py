"""Built models kept on disk, so a restart does not build them again: one file per key, never trusted blindly.

The folder is ``$VAN_APP_CACHE``, else ``$XDG_CACHE_HOME/van_app``, else
``~/.cache/van_app``. A key is a hash of everything a built file depends on: the
weights (every tensor's name, dtype, shape and bytes), the model's configuration
(architecture arguments, labels, preprocessing) and what the builder names (format
version, exporter version, input size...), so changed weights never meet an old file.
Entries are written whole (``files.atomic_path``); ``load_or_build`` hands an existing
entry to its loader, which checks it, and builds it again when the loader refuses it
(a truncated, corrupt or foreign file), instead of failing. Entries unused for
``MAX_AGE_DAYS`` are removed when a new one is built beside them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

from .errors import first_line
from .files import atomic_path

CACHE_ENV = "VAN_APP_CACHE"
MAX_AGE_DAYS = 30  # an entry unused this long is removed when another is built beside it
T = TypeVar("T")
logger = logging.getLogger(__name__)


def cache_dir() -> Path:
    """Where built models are kept: ``$VAN_APP_CACHE``, else ``$XDG_CACHE_HOME/van_app``, else ``~/.cache/van_app``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "van_app"


def model_digest(model: nn.Module) -> str:
    """A hash of ``model``'s weights and configuration (architecture arguments, labels, pretrained config)."""
    digest = hashlib.blake2b(digest_size=20)
    config = {name: getattr(model, name, None) for name in ("model_args", "labels", "pretrained_cfg")}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def entry_path(kind: str, *parts: object, suffix: str = "") -> Path:
    """The cache file for ``kind`` (a subfolder) keyed by a hash of ``parts``."""
    key = hashlib.blake2b(json.dumps([str(p) for p in parts]).encode(), digest_size=20).hexdigest()
    return cache_dir() / kind / f"{key}{suffix}"


def load_or_build(path: Path, build: Callable[[Path], None], load: Callable[[Path], T]) -> T:
    """``load(path)`` of the cached entry; built first (``build`` writes the path it is given) when there is none
    or when ``load`` refuses the one there. A fresh entry that ``load`` refuses raises.

    A used entry is touched; building one removes the entries beside it unused for ``MAX_AGE_DAYS``.
    """
    if path.is_file():
        try:
            loaded = load(path)
            os.utime(path)
            return loaded
        except Exception as refused:  # noqa: BLE001 - whatever is wrong with the file, a new one replaces it
            logger.warning("rebuilding the cached %s: %s", path.name, first_line(refused))
    with atomic_path(path) as tmp:
        build(tmp)
    _prune(path.parent, keep=path)
    return load(path)


def _prune(folder: Path, keep: Path) -> None:
    """Remove the entries of ``folder`` (but ``keep``) last used more than ``MAX_AGE_DAYS`` ago."""
    oldest = time.time() - MAX_AGE_DAYS * 86400
    for entry in folder.iterdir():
        try:
            if entry != keep and entry.is_file() and entry.stat().st_mtime < oldest:
                entry.unlink()
        except OSError:  # another process removed or replaced it meanwhile
            pass
