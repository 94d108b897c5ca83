"""File names of an export and atomic writes: the one place that decides both.

Every artifact is written to a temporary file beside its destination and renamed
into place (``os.replace`` is atomic on POSIX and Windows), so a reader sees the
old file or the new one, never half of one. A whole folder (an export) is written
the same way: filled beside its destination, then swapped in with one rename.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

EXPORT_WEIGHTS = "model.safetensors"
EXPORT_CONFIG = "config.json"
METRICS = "metrics.json"
CONFUSION_PNG = "confusion_matrix.png"
CONFUSION_JSON = "confusion_matrix.json"
BAD_FILES = "bad_files.txt"
CARD = "README.md"
EXPORT_FILES = (EXPORT_WEIGHTS, EXPORT_CONFIG, METRICS, CONFUSION_PNG, CONFUSION_JSON, BAD_FILES, CARD)
TRANSFORMERS_BIN = "pytorch_model.bin"

IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def is_image_file(path: str | Path) -> bool:
    """Whether ``path`` has an image suffix we read (any letter case)."""
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; it replaces ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates files private to the user; artifacts are meant to be shared
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: Path, text: str) -> None:
    """Atomically write ``text`` (UTF-8) to ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """A new folder beside ``path`` to fill; it replaces ``path`` whole only if the block succeeds.

    Readers of ``path`` see the old folder or the new one, never a mix. A folder
    left behind by a killed writer is removed by the next writer once it is an hour old.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.tmp-"))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes folders private to the user; exports are meant to be shared
        _swap_into_place(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_into_place(new: Path, path: Path) -> None:
    """Move folder ``new`` to ``path``; an existing ``path`` ends up at ``new`` (removed by the caller)."""
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        os.replace(new, path)  # an empty folder is replaced in one rename
        return
    if _exchange(new, path):
        return
    old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.old-"))
    os.replace(path, old / path.name)  # without an atomic exchange, readers see no folder for an instant
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0
