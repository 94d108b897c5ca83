"""Classify many image files at once (``van-predict``): batches through the fused model, heatmaps from the same pass.

Files are decoded and preprocessed by DataLoader workers while the model runs;
a file that cannot be read becomes a row with its reason instead of stopping
the run. With ``heatmaps`` each image's evidence for its predicted class (the page's
default map, ``explain.maps_of_pass``) comes from the same pass as its prediction
(``attention.attention_pass``: the graph's extra outputs when ``fuse`` chose an ONNX
engine) and is drawn over the image.
When the images sit in folders named after the model's classes, the folder name
is the true class and ``summary`` reports accuracy and a confusion matrix.
"""

from __future__ import annotations

import csv
import glob
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .attention import attention_pass, stage_strides
from .explain import MapKind, find_map, input_geometry, maps_of_pass, overlay
from .files import atomic_path, is_image_file
from .images import BadImageError, display_size, open_image
from .predict import eval_transform, placement, top_k

OVERLAY_SIDE = 512  # longest side of a written heatmap overlay


@dataclass(frozen=True)
class FilePrediction:
    """One file's answer: its top labels with probabilities, or why it could not be read."""

    path: Path
    top: dict[str, float]
    error: str | None = None

    @property
    def label(self) -> str | None:
        """The most probable label (None for an unreadable file)."""
        return next(iter(self.top), None)


def find_files(sources: Iterable[str]) -> list[Path]:
    """Image files named by ``sources``: files as given, folders searched recursively, glob patterns expanded.

    A source that names nothing is reported by ``FileNotFoundError`` naming it.
    """
    found: list[Path] = []
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            found += sorted(p for p in path.rglob("*") if p.is_file() and is_image_file(p)
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
        elif path.is_file():
            found.append(path)
        else:
            matches = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not matches:
                raise FileNotFoundError(f"{source}: no such file, folder or matching file")
            found += matches
    return list(dict.fromkeys(found))


@dataclass(frozen=True)
class _Decoded:
    """A file as a worker hands it over: the model's input, the picture to draw on (small), or why it failed."""

    index: int
    tensor: torch.Tensor | None = None
    picture: np.ndarray | None = None  # RGB, at most OVERLAY_SIDE on its longer side
    size: tuple[int, int] = (0, 0)  # the image's own size, which the model's crop refers to
    error: str | None = None


class _Files(Dataset):
    """Decodes and preprocesses one file per item; an unreadable file is an item with its reason, not an error."""

    def __init__(self, paths: Sequence[Path], transform: Any, with_pictures: bool) -> None:
        self.paths, self.transform, self.with_pictures = list(paths), transform, with_pictures

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> _Decoded:
        try:
            image = open_image(self.paths[index])
        except BadImageError as e:
            return _Decoded(index, error=str(e).split(": ", 1)[-1])
        picture = None
        if self.with_pictures:  # the overlay is drawn small: hand over that, not the full image
            picture = np.asarray(image.resize(display_size(image.size, OVERLAY_SIDE), Image.BILINEAR))
        return _Decoded(index, self.transform(image), picture, image.size)


def predict_files(model: torch.nn.Module, paths: Sequence[Path], *, k: int = 5, batch_size: int = 16,
                  workers: int = 0, heatmaps: Path | None = None, root: Path | None = None,
                  progress: bool = True) -> Iterator[FilePrediction]:
    """Classify ``paths`` with ``model`` (use ``van_app.fuse(model)``) in batches, in order; unreadable files too.

    With ``heatmaps``, the evidence for each image's predicted class (the page's default
    map) is drawn over it and saved there as PNG, named after the file (its path below ``root`` when given).
    """
    loader = DataLoader(_Files(paths, eval_transform(model), heatmaps is not None), batch_size=batch_size,
                        num_workers=workers, collate_fn=list)
    device, dtype = placement(model)
    strides = stage_strides(model)
    with tqdm(total=len(paths), desc="Classifying", unit="img", disable=not progress, file=sys.stderr) as bar:
        for items in loader:
            good = [item for item in items if item.error is None]
            logits, result = torch.empty(0), None
            if good:
                batch = torch.stack([item.tensor for item in good]).to(device, dtype)
                with torch.inference_mode():
                    if heatmaps is not None:
                        result = attention_pass(model, batch)
                        logits = result.logits
                    else:
                        logits = model(batch)
            row = {item.index: i for i, item in enumerate(good)}
            for item in items:
                path = paths[item.index]
                if item.error is not None:
                    yield FilePrediction(path, {}, item.error)
                    continue
                i = row[item.index]
                if result is not None:
                    _, shown = maps_of_pass(result, i, strides)
                    picture = overlay(Image.fromarray(item.picture), find_map(shown, MapKind.COMBINED),
                                      input_geometry(model, item.size))
                    target = heatmaps / _overlay_name(path, root)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with atomic_path(target) as tmp:
                        picture.save(tmp, format="PNG")
                yield FilePrediction(path, top_k(model, logits[i], k))
            bar.update(len(items))


def _overlay_name(path: Path, root: Path | None) -> Path:
    """Where a file's overlay goes below the heatmap folder: its path below ``root`` (else its name), as PNG."""
    try:
        relative = path.relative_to(root) if root is not None else Path(path.name)
    except ValueError:
        relative = Path(path.name)
    return relative.with_suffix(".png")


def write_csv(predictions: Iterable[FilePrediction], path: Path, k: int) -> list[FilePrediction]:
    """Write ``file, label_1, prob_1, ... label_k, prob_k, error`` rows atomically; returns the predictions."""
    rows = list(predictions)
    header = ["file"] + [f"{what}_{i}" for i in range(1, k + 1) for what in ("label", "prob")] + ["error"]
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for p in rows:
            cells = [cell for label, prob in p.top.items() for cell in (label, f"{prob:.6f}")]
            writer.writerow([str(p.path), *cells, *[""] * (2 * k - len(cells)), p.error or ""])
    return rows


def summary(predictions: Sequence[FilePrediction], labels: Sequence[str]) -> str:
    """Counts per predicted label and unreadable files; accuracy and a confusion matrix when folders name classes."""
    read = [p for p in predictions if p.error is None]
    lines = [f"{len(read)} images classified, {len(predictions) - len(read)} unreadable"]
    counts = Counter(p.label for p in read)
    lines += [f"  {label}: {n}" for label, n in counts.most_common()]
    known = [p for p in read if p.path.parent.name in labels]
    if known and len(known) == len(read):
        right = sum(p.label == p.path.parent.name for p in known)
        lines.append(f"accuracy {right / len(known):.4f} ({right}/{len(known)}; the folder names are the classes)")
        lines.append(confusion_table([p.path.parent.name for p in known], [p.label for p in known], labels))
    return "\n".join(lines)


def confusion_table(true: Sequence[str], predicted: Sequence[str], labels: Sequence[str]) -> str:
    """A printable confusion matrix (rows: true class, columns: predicted) over the classes that occur."""
    shown = [label for label in labels if label in set(true) | set(predicted)]
    pairs = Counter(zip(true, predicted))
    corner = "true \\ predicted"
    width = max(len(corner), *(len(label) for label in shown))
    cell = max(5, *(len(label) for label in shown))
    rows = [f"{corner:<{width}}" + "".join(f" {label:>{cell}}" for label in shown)]
    rows += [f"{t:<{width}}" + "".join(f" {pairs[t, p]:>{cell}}" for p in shown) for t in shown]
    return "\n".join(rows)
