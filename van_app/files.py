"""File names of an export and atomic writes: the one place that decides both.

Every artifact is written to a temporary file beside its destination and renamed
into place (``os.replace`` is atomic on POSIX and Windows), so a reader sees the
old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import tempfile
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
