"""Image folders -> checked, split, augmented batches: the one place that decides classes and label order."""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import lightning
import torch
from timm.data import create_transform
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler
from tqdm.auto import tqdm

from .errors import DataError
from .files import IMAGE_SUFFIXES, is_image_file, write_text
from .images import BadImageError, open_image

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
LAYOUT_HELP = "expected DATA/<class>/<images> or DATA/train/<class>/<images> + DATA/val/<class>/<images>"

Sample = tuple[Path, int]


def default_workers() -> int:
    """Data-loader worker processes: up to 4, never more than the CPUs."""
    return min(4, os.cpu_count() or 1)


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


class VanDataModule(lightning.LightningDataModule):
    """Scans, checks and splits an image-folder dataset when constructed; serves timm-augmented loaders.

    Layouts: ``DATA/<class>/...`` (stratified seeded split by ``val_split``) or ``DATA/train/<class>/...`` +
    ``DATA/val/<class>/...`` (+ optional ``DATA/test/<class>/...``). Classes are the sorted folder names.
    With ``balance=True`` training draws from a seeded ``WeightedRandomSampler``; under DDP Lightning's default
    ``use_distributed_sampler=True`` wraps it in ``DistributedSamplerWrapper``, and the fixed seed makes every rank
    draw the same sequence, so ranks take disjoint shares of it. ``img_size``, ``mean``, ``std``, ``interpolation``
    and ``crop_pct`` are read when a loader is built, so they may be changed after the scan (to a model's config).
    With ``bad_files_path`` the skipped files are written there at once and the summary line names it.
    """

    def __init__(
        self,
        data_dir: str | Path,
        *,
        img_size: int = 224,
        batch_size: int = 32,
        workers: int | None = None,
        val_split: float = 0.2,
        seed: int = 42,
        balance: bool = False,
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.5, 0.5, 0.5),
        interpolation: str = "bicubic",
        crop_pct: float = 0.9,
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        crop_scale: tuple[float, float] = (0.08, 1.0),
        scan_workers: int | None = None,
        progress: bool = True,
        bad_files_path: str | Path | None = None,
    ) -> None:
        super().__init__()
        if img_size < 1 or batch_size < 1:
            raise DataError(f"img_size and batch_size must be positive, got {img_size} and {batch_size}")
        if not 0.0 < val_split < 1.0:
            raise DataError(f"val_split must be between 0 and 1, got {val_split}")
        if not 0.0 < crop_pct <= 1.0:
            raise DataError(f"crop_pct must be in (0, 1], got {crop_pct}")
        if not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
            raise DataError(f"crop_scale must satisfy 0 < min <= max <= 1, got {crop_scale}")
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.img_size, self.batch_size, self.seed, self.balance = img_size, batch_size, seed, balance
        self.workers = default_workers() if workers is None else max(0, workers)
        self.val_split = val_split
        self.mean, self.std = tuple(mean), tuple(std)
        self.interpolation, self.crop_pct, self.auto_augment = interpolation, crop_pct, auto_augment
        self.crop_scale = tuple(crop_scale)

        self.layout, folders = self._find_layout()
        self.classes: list[str] = list(folders["train"])
        self.class_to_idx: dict[str, int] = {name: i for i, name in enumerate(self.classes)}
        files = {split: self._list_files(split, by_class) for split, by_class in folders.items()}
        every = [path for by_class in files.values() for paths in by_class.values() for path in paths]
        digests, bad_files = check_images(every, workers=scan_workers, progress=progress)
        self.bad_files: list[tuple[Path, str]] = bad_files
        samples = {
            split: [(p, self.class_to_idx[name]) for name, paths in by_class.items() for p in paths if p in digests]
            for split, by_class in files.items()
        }
        self._require_valid_images(samples, files)
        if self.layout == "folders":
            samples["train"], samples["val"] = stratified_split(samples["train"], self.classes, val_split, seed)
        self.train_samples: list[Sample] = samples["train"]
        self.val_samples: list[Sample] = samples["val"]
        self.test_samples: list[Sample] = samples.get("test", [])
        self.duplicates = self._find_duplicates(digests)
        self._report(bad_files_path)

    # --- scanning -------------------------------------------------------------------------------------------

    def _find_layout(self) -> tuple[str, dict[str, dict[str, Path]]]:
        root = self.data_dir
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
            self._require_same_classes(folders)
            return "split", folders
        if not top:
            raise DataError(f"no class folders in {root} ({LAYOUT_HELP})")
        self._require_two_classes(list(top), root)
        return "folders", {"train": top}

    @staticmethod
    def _require_two_classes(names: list[str], where: Path) -> None:
        if len(names) < 2:
            found = f"only {names[0]!r}" if names else "none"
            raise DataError(f"need at least 2 class folders in {where}, found {found} ({LAYOUT_HELP})")

    def _require_same_classes(self, folders: dict[str, dict[str, Path]]) -> None:
        train, val = set(folders["train"]), set(folders["val"])
        self._require_two_classes(sorted(train), self.data_dir / "train")
        if train != val:
            parts = [f"only in train: {', '.join(sorted(train - val))}" if train - val else "",
                     f"only in val: {', '.join(sorted(val - train))}" if val - train else ""]
            raise DataError(f"train and val have different classes ({'; '.join(p for p in parts if p)})")
        extra = sorted(set(folders.get("test", {})) - train)
        if extra:
            raise DataError(f"test has classes that train lacks: {', '.join(extra)}")

    def _list_files(self, split: str, by_class: dict[str, Path]) -> dict[str, list[Path]]:
        files = {name: find_images(folder) for name, folder in by_class.items()}
        if split != "test":
            for name, paths in files.items():
                if not paths:
                    where = name if self.layout == "folders" else f"{split}/{name}"
                    raise DataError(f"class folder {where} has no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return files

    def _require_valid_images(self, samples: dict[str, list[Sample]], files: dict[str, dict[str, list[Path]]]) -> None:
        for split in ("train", "val") if self.layout == "split" else ("train",):
            counts = Counter(label for _, label in samples[split])
            for name, label in self.class_to_idx.items():
                n = counts[label]
                where = f"class {name!r}" + (f" in {split}" if self.layout == "split" else "")
                if n == 0:
                    raise DataError(f"{where} has no valid images ({len(files[split][name])} bad files)")
                if self.layout == "folders" and n < 2:
                    raise DataError(f"{where} has 1 valid image; at least 2 are needed to split it into train and val")

    def _find_duplicates(self, digests: dict[Path, str]) -> list[tuple[Path, Path]]:
        in_train: dict[str, Path] = {}
        for path, _ in self.train_samples:
            in_train.setdefault(digests[path], path)
        return [(in_train[digests[path]], path) for path, _ in self.val_samples if digests[path] in in_train]

    def _report(self, bad_files_path: str | Path | None) -> None:
        if self.bad_files:
            if bad_files_path is not None:
                self.write_bad_files(Path(bad_files_path))
                log.warning("skipped %d bad files, listed in %s", len(self.bad_files), bad_files_path)
            else:
                path, reason = self.bad_files[0]
                log.warning("skipped %d bad files (first: %s: %s)", len(self.bad_files), path, reason)
        if self.duplicates:
            train, val = self.duplicates[0]
            log.warning(
                "%d val images are exact copies of train images (first: %s = %s)", len(self.duplicates), val, train
            )

    # --- reports --------------------------------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        """How many classes the model must predict."""
        return len(self.classes)

    def write_bad_files(self, path: Path) -> None:
        """Atomically write the skipped files as ``path<TAB>reason`` lines (paths relative to the data folder)."""
        lines = [f"# {len(self.bad_files)} bad image files skipped: path (relative to the data folder), tab, reason"]
        for bad, reason in self.bad_files:
            lines.append(f"{bad.relative_to(self.data_dir).as_posix()}\t{reason}")
        write_text(Path(path), "\n".join(lines) + "\n")

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
            "layout": self.layout,
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

    def data_config(self) -> dict:
        """The evaluation preprocessing, in timm's ``pretrained_cfg`` terms, for exports and inference."""
        return {
            "input_size": (3, self.img_size, self.img_size),
            "interpolation": self.interpolation,
            "mean": self.mean,
            "std": self.std,
            "crop_pct": self.crop_pct,
        }

    def _splits(self) -> dict[str, list[Sample]]:
        return {"train": self.train_samples, "val": self.val_samples, "test": self.test_samples}

    # --- loaders --------------------------------------------------------------------------------------------

    def train_transform(self) -> Callable:
        """Random-resized crop, flip and RandAugment (timm), then normalisation."""
        return create_transform(
            self.img_size,
            is_training=True,
            scale=self.crop_scale,
            auto_augment=self.auto_augment,
            interpolation=self.interpolation,
            mean=self.mean,
            std=self.std,
        )

    def eval_transform(self) -> Callable:
        """Resize by ``1 / crop_pct`` and centre-crop (timm), then normalisation."""
        return create_transform(
            self.img_size,
            is_training=False,
            interpolation=self.interpolation,
            mean=self.mean,
            std=self.std,
            crop_pct=self.crop_pct,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled (or class-balanced) augmented training batches."""
        sampler = None
        if self.balance:
            weights = self.class_weights()[[label for _, label in self.train_samples]].double()
            generator = torch.Generator().manual_seed(self.seed)
            sampler = WeightedRandomSampler(weights, len(self.train_samples), replacement=True, generator=generator)
        return self._loader(
            ImageDataset(self.train_samples, self.train_transform()),
            shuffle=sampler is None,
            sampler=sampler,
            drop_last=len(self.train_samples) > self.batch_size,
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
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            num_workers=self.workers,
            persistent_workers=self.workers > 0,
            pin_memory=torch.cuda.is_available(),
            **kwargs,
        )
