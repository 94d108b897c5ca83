"""Image folders -> checked, split, augmented batches: the one place that decides classes and label order.

By Lightning's DataModule contract: constructing ``VanDataModule`` only lists the
class folders (cheap, so the class count exists before the model is built);
``prepare_data`` decodes every image once, on the main process (``scan_folder``),
and leaves the result in the run folder for the other processes; ``setup`` splits
(seeded, the same on every process) and records the split in ``split.csv``.
Preprocessing comes from the model's data config (``timm.data.resolve_data_config``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import random
import statistics
import sys
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import lightning
import torch
from timm.data import create_transform
from PIL import Image
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from tqdm.auto import tqdm

from .config import DataConfig
from .errors import DataError
from .files import IMAGE_SUFFIXES, is_image_file, write_json, write_text
from .images import BadImageError, open_image

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SCAN_FILE, SPLIT_FILE, BAD_FILES_LIST = "scan.json", "split.csv", "bad_files.txt"
# The keys of timm's data config that say how an image becomes the model's input.
PREPROCESSING_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
LAYOUT_HELP = "expected DATA/<class>/<images> or DATA/train/<class>/<images> + DATA/val/<class>/<images>"

Sample = tuple[Path, int]


def is_hidden(name: str) -> bool:
    """Whether a file or folder name is hidden (starts with a dot, like .DS_Store or ._IMG_1.jpg)."""
    return name.startswith(".")


def class_folders(root: Path) -> dict[str, Path]:
    """The visible sub-folders of ``root`` by name, sorted: each is one class."""
    return {p.name: p for p in sorted(root.iterdir(), key=lambda p: p.name) if p.is_dir() and not is_hidden(p.name)}


def find_images(folder: Path) -> list[Path]:
    """Image files under ``folder`` (nested folders included, hidden ones skipped), sorted by path."""
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not is_hidden(d)]
        found += [Path(parent, f) for f in files if not is_hidden(f) and is_image_file(f)]
    return sorted(found)


def typical_short_side(layout: Layout, sample: int = 200, seed: int = 0) -> int:
    """The median short side, in pixels, of up to ``sample`` images of the folder (read from their headers only)."""
    paths = [p for by_class in layout.folders.values() for folder in by_class.values() for p in find_images(folder)]
    chosen = random.Random(seed).sample(paths, min(sample, len(paths)))
    sides = []
    for path in chosen:
        try:
            with Image.open(path) as image:
                sides.append(min(image.size))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
            continue  # the scan reports it
    return int(statistics.median(sides)) if sides else 224


def check_image(path: Path) -> tuple[str | None, str | None]:
    """Fully decode ``path``: ``(sha256 of the file, None)`` when usable, else ``(None, one-line reason)``."""
    try:
        open_image(path)
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest(), None
    except BadImageError as e:
        return None, _reason(path, e)
    except OSError as e:  # vanished or unreadable between decode and hashing
        return None, _reason(path, e)


def _reason(path: Path, error: Exception) -> str:
    text = str(error).removeprefix(f"{path}: ").replace(str(path), path.name) or type(error).__name__
    return " ".join(text.split())


def check_images(
    paths: Sequence[Path], *, workers: int | None = None, progress: bool = True
) -> tuple[dict[Path, str], list[tuple[Path, str]]]:
    """Decode every file in parallel threads: ``({good path: sha256}, [(bad path, reason)])``, in input order."""
    digests, bad = {}, []
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool, tqdm(
        total=len(paths), desc="Checking images", unit="img", disable=not progress, file=sys.stderr
    ) as bar:
        for path, (digest, reason) in zip(paths, pool.map(check_image, paths)):
            if digest is None:
                bad.append((path, reason))
            else:
                digests[path] = digest
            bar.update()
    return digests, bad


def stratified_split(
    samples: Sequence[Sample], classes: Sequence[str], val_split: float, seed: int
) -> tuple[list[Sample], list[Sample]]:
    """Split each class on its own (seeded by ``seed`` and the class name) so both sides keep every class."""
    by_class: dict[int, list[Sample]] = {}
    for sample in samples:
        by_class.setdefault(sample[1], []).append(sample)
    train, val = [], []
    for label, members in sorted(by_class.items()):
        members = sorted(members)
        n_val = min(max(1, round(len(members) * val_split)), len(members) - 1)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(classes[label].encode()))
        order = torch.randperm(len(members), generator=generator).tolist()
        val_index = set(order[:n_val])
        val += [s for i, s in enumerate(members) if i in val_index]
        train += [s for i, s in enumerate(members) if i not in val_index]
    return train, val


class ImageDataset(Dataset):
    """``(transform(image), label)`` pairs; a file that has gone bad since the scan is replaced, never raised."""

    def __init__(self, samples: Sequence[Sample], transform: Callable | None = None) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.broken: set[int] = set()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        for candidate in self._candidates(index):
            path, label = self.samples[candidate]
            try:
                image = open_image(path)
            except BadImageError as e:
                if candidate not in self.broken:
                    self.broken.add(candidate)
                    log.warning("%s; using another image instead", e)
                continue
            return (self.transform(image) if self.transform else image), label
        raise DataError(f"none of the {len(self.samples)} images can be read any more (first: {self.samples[0][0]})")

    def _candidates(self, index: int) -> Iterator[int]:
        """``index``, then the other samples of its class, then any other sample; ones that failed before last."""
        n, label = len(self.samples), self.samples[index][1]
        if index not in self.broken:
            yield index
        others = [(index + k) % n for k in range(1, n)]  # built only once ``index`` has failed
        yield from (i for i in others if self.samples[i][1] == label and i not in self.broken)
        yield from (i for i in others if self.samples[i][1] != label and i not in self.broken)
        yield from (i for i in [index, *others] if i in self.broken)


@dataclass(frozen=True)
class Layout:
    """The class folders of a data folder: ``folders`` (DATA/<class>) or ``split`` (DATA/train|val|test/<class>)."""

    root: Path
    kind: str
    folders: dict[str, dict[str, Path]]  # split -> class name -> folder

    @property
    def classes(self) -> list[str]:
        """The class names, sorted: label ``i`` is ``classes[i]``."""
        return list(self.folders["train"])


def find_layout(data_dir: str | Path) -> Layout:
    """The layout and class folders of ``data_dir`` (only folder names are read), or a ``DataError`` saying why not."""
    root = Path(data_dir).expanduser().resolve()
    if not root.exists():
        raise DataError(f"data folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"data folder is not a folder: {root}")
    top = class_folders(root)
    if "train" in top or "val" in top:
        missing = [s for s in ("train", "val") if s not in top]
        if missing:
            present = "val" if missing == ["train"] else "train"
            raise DataError(f"{root} has {present}/ but no {missing[0]}/ ({LAYOUT_HELP})")
        folders = {split: class_folders(top[split]) for split in SPLITS if split in top}
        _require_same_classes(root, folders)
        return Layout(root, "split", folders)
    if not top:
        raise DataError(f"no class folders in {root} ({LAYOUT_HELP})")
    _require_two_classes(list(top), root)
    return Layout(root, "folders", {"train": top})


def _require_two_classes(names: list[str], where: Path) -> None:
    if len(names) < 2:
        found = f"only {names[0]!r}" if names else "none"
        raise DataError(f"need at least 2 class folders in {where}, found {found} ({LAYOUT_HELP})")


def _require_same_classes(root: Path, folders: dict[str, dict[str, Path]]) -> None:
    train, val = set(folders["train"]), set(folders["val"])
    _require_two_classes(sorted(train), root / "train")
    if train != val:
        parts = [f"only in train: {', '.join(sorted(train - val))}" if train - val else "",
                 f"only in val: {', '.join(sorted(val - train))}" if val - train else ""]
        raise DataError(f"train and val have different classes ({'; '.join(p for p in parts if p)})")
    extra = sorted(set(folders.get("test", {})) - train)
    if extra:
        raise DataError(f"test has classes that train lacks: {', '.join(extra)}")


@dataclass(frozen=True)
class FolderScan:
    """What decoding every image of a data folder found: usable samples per folder split, bad files, file hashes."""

    layout: Layout
    samples: dict[str, list[Sample]]  # train/val/test as the folders hold them (no train/val split made yet)
    bad_files: list[tuple[Path, str]]
    digests: dict[Path, str]  # sha256 of every usable file

    @property
    def classes(self) -> list[str]:
        """The class names, sorted."""
        return self.layout.classes

    @property
    def duplicates(self) -> list[tuple[Path, Path]]:
        """Pairs (first file, later file) with identical contents anywhere in the folder."""
        first: dict[str, Path] = {}
        pairs = []
        for path in sorted(self.digests):
            digest = self.digests[path]
            if digest in first:
                pairs.append((first[digest], path))
            else:
                first[digest] = path
        return pairs

    def to_json(self) -> dict:
        """A JSON-able copy, paths relative to the data folder."""
        rel = self.relative
        return {"root": str(self.layout.root), "kind": self.layout.kind,
                "samples": {split: [[rel(p), label] for p, label in items] for split, items in self.samples.items()},
                "bad_files": [[rel(p), reason] for p, reason in self.bad_files],
                "digests": {rel(p): d for p, d in self.digests.items()}}

    @classmethod
    def from_json(cls, data: dict, layout: Layout) -> FolderScan:
        """The scan written by ``to_json`` for the data folder of ``layout``."""
        root = layout.root
        return cls(layout, {split: [(root / p, int(label)) for p, label in items]
                            for split, items in data["samples"].items()},
                   [(root / p, reason) for p, reason in data["bad_files"]],
                   {root / p: d for p, d in data["digests"].items()})

    def relative(self, path: Path) -> str:
        """``path`` relative to the data folder, with forward slashes."""
        return path.relative_to(self.layout.root).as_posix()


def scan_folder(data_dir: str | Path, *, workers: int | None = None, progress: bool = True) -> FolderScan:
    """Decode every image under the class folders of ``data_dir`` once: samples, bad files and file hashes.

    Pure: reads the folder, writes nothing. Raises ``DataError`` for a folder that
    cannot be trained on (missing, fewer than 2 classes, a class without images).
    """
    layout = find_layout(data_dir)
    index = {name: i for i, name in enumerate(layout.classes)}
    files = {split: _list_files(layout, split) for split in layout.folders}
    every = [path for by_class in files.values() for paths in by_class.values() for path in paths]
    digests, bad_files = check_images(every, workers=workers, progress=progress)
    samples = {split: [(p, index[name]) for name, paths in by_class.items() for p in paths if p in digests]
               for split, by_class in files.items()}
    _require_valid_images(layout, samples, files)
    return FolderScan(layout, samples, bad_files, digests)


def _list_files(layout: Layout, split: str) -> dict[str, list[Path]]:
    files = {name: find_images(folder) for name, folder in layout.folders[split].items()}
    if split != "test":
        for name, paths in files.items():
            if not paths:
                where = name if layout.kind == "folders" else f"{split}/{name}"
                raise DataError(f"class folder {where} has no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def _require_valid_images(layout: Layout, samples: dict[str, list[Sample]],
                          files: dict[str, dict[str, list[Path]]]) -> None:
    for split in ("train", "val") if layout.kind == "split" else ("train",):
        counts = Counter(label for _, label in samples[split])
        for label, name in enumerate(layout.classes):
            n = counts[label]
            where = f"class {name!r}" + (f" in {split}" if layout.kind == "split" else "")
            if n == 0:
                raise DataError(f"{where} has no valid images ({len(files[split][name])} bad files)")
            if layout.kind == "folders" and n < 2:
                raise DataError(f"{where} has 1 valid image; at least 2 are needed to split it into train and val")


class VanDataModule(lightning.LightningDataModule):
    """Image-folder data for a VAN: classes when constructed, the scan in ``prepare_data``, the split in ``setup``.

    Layouts: ``DATA/<class>/...`` (stratified seeded split by ``val_split``) or ``DATA/train/<class>/...`` +
    ``DATA/val/<class>/...`` (+ optional ``DATA/test/<class>/...``). Classes are the sorted folder names.
    ``data_config`` is the model's preprocessing as ``timm.data.resolve_data_config(model=model)`` gives it
    (input size, interpolation, mean, std, crop). With ``run_dir`` the scan (for the other processes), the bad
    files and the split are written there. With ``balance=True`` training draws from a seeded
    ``WeightedRandomSampler``; under DDP Lightning's default ``use_distributed_sampler=True`` wraps it in
    ``DistributedSamplerWrapper``, and the fixed seed makes every rank draw the same sequence, so ranks take
    disjoint shares of it.
    """

    def __init__(self, config: DataConfig, data_config: dict, *, run_dir: str | Path | None = None,
                 progress: bool = True) -> None:
        super().__init__()
        self.config = config
        self.data_config = dict(data_config)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.progress = progress
        self.layout = find_layout(config.data_dir)
        self.data_dir = self.layout.root
        self.classes: list[str] = self.layout.classes
        self.class_to_idx: dict[str, int] = {name: i for i, name in enumerate(self.classes)}
        self.scan: FolderScan | None = None
        self.train_samples: list[Sample] = []
        self.val_samples: list[Sample] = []
        self.test_samples: list[Sample] = []
        self.duplicates: list[tuple[Path, Path]] = []

    # --- Lightning's hooks ----------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Scan the folder once (main process only), report bad files, leave the scan in the run folder."""
        if self.scan is not None:
            return
        self.scan = scan_folder(self.data_dir, progress=self.progress)
        if self.run_dir is not None:
            write_json(self.run_dir / SCAN_FILE, self.scan.to_json())
            write_text(self.run_dir / BAD_FILES_LIST, self.bad_files_text())
        if self.scan.bad_files:
            where = f"listed in {self.run_dir / BAD_FILES_LIST}" if self.run_dir is not None else (
                "first: {}: {}".format(*self.scan.bad_files[0]))
            log.warning("skipped %d bad files, %s", len(self.scan.bad_files), where)

    def setup(self, stage: str | None = None) -> None:
        """Split the scanned samples (seeded: the same on every process) and record the split."""
        if self.train_samples:
            return
        if self.scan is None:
            self.scan = self._read_scan()
        samples = dict(self.scan.samples)
        if self.layout.kind == "folders":
            samples["train"], samples["val"] = stratified_split(samples["train"], self.classes,
                                                                self.config.val_split, self.config.seed)
        self.train_samples, self.val_samples = samples["train"], samples["val"]
        self.test_samples = samples.get("test", [])
        digests = self.scan.digests
        in_train: dict[str, Path] = {}
        for path, _ in self.train_samples:
            in_train.setdefault(digests[path], path)
        self.duplicates = [(in_train[digests[p]], p) for p, _ in self.val_samples if digests[p] in in_train]
        if self._is_main_process():
            if self.duplicates:
                train, val = self.duplicates[0]
                log.warning("%d val images are exact copies of train images (first: %s = %s)",
                            len(self.duplicates), val, train)
            if self.run_dir is not None:
                write_text(self.run_dir / SPLIT_FILE, self.split_csv())

    def _read_scan(self) -> FolderScan:
        """The scan another process left in the run folder (``prepare_data`` runs on the main process only)."""
        path = self.run_dir / SCAN_FILE if self.run_dir is not None else None
        if path is None or not path.is_file():
            raise DataError("no scan of the data folder: call prepare_data() first (Lightning does, in fit)")
        return FolderScan.from_json(json.loads(path.read_text(encoding="utf-8")), self.layout)

    def _is_main_process(self) -> bool:
        trainer = getattr(self, "trainer", None)
        return trainer is None or trainer.is_global_zero

    # --- reports --------------------------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        """How many classes the model must predict."""
        return len(self.classes)

    @property
    def bad_files(self) -> list[tuple[Path, str]]:
        """The files the scan skipped, with the reason (empty before ``prepare_data``)."""
        return self.scan.bad_files if self.scan is not None else []

    def bad_files_text(self) -> str:
        """The skipped files as ``path<TAB>reason`` lines (paths relative to the data folder), under a header."""
        lines = [f"# {len(self.bad_files)} bad image files skipped: path (relative to the data folder), tab, reason"]
        lines += [f"{bad.relative_to(self.data_dir).as_posix()}\t{reason}" for bad, reason in self.bad_files]
        return "\n".join(lines) + "\n"

    def split_csv(self) -> str:
        """``file,class,split`` rows (files relative to the data folder), so the held-out images can be found again."""
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["file", "class", "split"])
        for split, samples in self._splits().items():
            writer.writerows((path.relative_to(self.data_dir).as_posix(), self.classes[label], split)
                             for path, label in samples)
        return out.getvalue()

    def class_counts(self) -> dict[str, dict[str, int]]:
        """Images per class and split: ``{class: {"train": n, "val": n, "test": n}}``."""
        counts = {split: Counter(label for _, label in samples) for split, samples in self._splits().items()}
        return {name: {split: counts[split][i] for split in SPLITS} for i, name in enumerate(self.classes)}

    def summary_table(self) -> str:
        """A printable table of images per class and split, with totals."""
        splits = [s for s in SPLITS if s != "test" or self.test_samples]
        counts = self.class_counts()
        width = max(len("class"), len("total"), *(len(c) for c in self.classes))
        rows = [f"{'class':<{width}}" + "".join(f"{s:>8}" for s in splits)]
        rows += [f"{name:<{width}}" + "".join(f"{counts[name][s]:>8}" for s in splits) for name in self.classes]
        rows.append(f"{'total':<{width}}" + "".join(f"{len(self._splits()[s]):>8}" for s in splits))
        return "\n".join(rows)

    def summary(self) -> dict:
        """JSON-able description of the data: layout, classes, counts per split and class, problems found."""
        return {
            "layout": self.layout.kind,
            "num_classes": self.num_classes,
            "classes": list(self.classes),
            "counts": {split: len(samples) for split, samples in self._splits().items()},
            "per_class": self.class_counts(),
            "bad_files": len(self.bad_files),
            "duplicates": len(self.duplicates),
        }

    def class_weights(self) -> torch.Tensor:
        """Inverse-frequency weights over the training set, ``n / (classes * n_class)``, for a weighted loss."""
        counts = torch.bincount(torch.tensor([label for _, label in self.train_samples]), minlength=self.num_classes)
        return (len(self.train_samples) / (self.num_classes * counts.clamp(min=1))).float()

    def _splits(self) -> dict[str, list[Sample]]:
        return {"train": self.train_samples, "val": self.val_samples, "test": self.test_samples}

    # --- loaders --------------------------------------------------------------------------------------------

    def train_transform(self) -> Callable:
        """Random-resized crop, flip and the augmentation policy (timm), then the model's normalisation."""
        cfg = self.data_config
        return create_transform(cfg["input_size"], is_training=True, scale=(self.config.crop_scale, 1.0),
                                auto_augment=self.config.auto_augment, interpolation=cfg["interpolation"],
                                mean=cfg["mean"], std=cfg["std"])

    def eval_transform(self) -> Callable:
        """The model's evaluation preprocessing (resize by ``1 / crop_pct``, centre crop, normalisation)."""
        cfg = self.data_config
        return create_transform(cfg["input_size"], is_training=False, interpolation=cfg["interpolation"],
                                mean=cfg["mean"], std=cfg["std"], crop_pct=cfg["crop_pct"],
                                crop_mode=cfg.get("crop_mode", "center"))

    def train_dataloader(self) -> DataLoader:
        """Shuffled (or class-balanced) augmented training batches."""
        sampler = None
        if self.config.balance:
            weights = self.class_weights()[[label for _, label in self.train_samples]].double()
            generator = torch.Generator().manual_seed(self.config.seed)
            sampler = WeightedRandomSampler(weights, len(self.train_samples), replacement=True, generator=generator)
        return self._loader(
            ImageDataset(self.train_samples, self.train_transform()),
            shuffle=sampler is None,
            sampler=sampler,
            drop_last=len(self.train_samples) > self.config.batch_size,
        )

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order."""
        return self._loader(ImageDataset(self.val_samples, self.eval_transform()))

    def test_dataloader(self) -> DataLoader:
        """Test batches in a fixed order; only for data with a ``test/`` folder."""
        if not self.test_samples:
            raise DataError(f"{self.data_dir} has no test images (put them in DATA/test/<class>/)")
        return self._loader(ImageDataset(self.test_samples, self.eval_transform()))

    def _loader(self, dataset: ImageDataset, **kwargs) -> DataLoader:
        workers = self.config.workers
        return DataLoader(
            dataset,
            batch_size=self.config.batch_size,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
            **kwargs,
        )
