"""Every option of ``van-finetune`` once: typed dataclasses whose fields carry their help and their check.

The command line is derived from these classes (``add_options``), so a default
exists in one place, and each value is checked by its argparse type before any
slow work (the folder scan, imports of torch or Lightning). The same checks run
when the classes are built in Python (``__post_init__``). Importing this module
costs nothing heavy: it is what ``van-finetune --help`` loads.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .errors import UsageError

ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu", "hpu")
PRECISIONS = ("32", "16-mixed", "bf16-mixed")
MIN_IMAGE_SIZE = 32  # four stride-2+ stages: smaller inputs leave the last stage without pixels
MAX_IMAGE_SIZE = 1024


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad command line is one ``error: ...`` line (exit 2), not the whole usage text."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


class Check:
    """Parse a command-line string into a value and check a value: one rule for argparse and for Python callers."""

    def __init__(self, parse: Callable[[str], Any], test: Callable[[Any], bool], rule: str) -> None:
        self.parse, self.test, self.rule = parse, test, rule
        self.__name__ = rule  # argparse names the type in its messages

    def __call__(self, text: str) -> Any:
        try:
            value = self.parse(text)
        except (ValueError, TypeError):
            raise argparse.ArgumentTypeError(f"expected {self.rule}, got {text!r}") from None
        self.check(value)
        return value

    def check(self, value: Any) -> None:
        """Raise ``argparse.ArgumentTypeError`` unless ``value`` satisfies the rule."""
        if not self.test(value):
            raise argparse.ArgumentTypeError(f"expected {self.rule}, got {value!r}")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def integer(low: int | None = None, high: int | None = None) -> Check:
    """An integer in [low, high] (either bound optional)."""
    rule = ("an integer" + (f" >= {low}" if low is not None and high is None else "")
            + (f" from {low} to {high}" if low is not None and high is not None else ""))
    return Check(int, lambda v: isinstance(v, int) and (low is None or v >= low) and (high is None or v <= high),
                 rule)


def number(low: float, high: float | None = None, *, open_low: bool = False, open_high: bool = False) -> Check:
    """A finite number between ``low`` and ``high``, each end open or closed."""
    left, right = "(" if open_low else "[", ")" if open_high else "]"
    rule = f"a number in {left}{low}, {'inf' if high is None else high}{right}"

    def test(v: Any) -> bool:
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            return False
        above = v > low if open_low else v >= low
        below = high is None or (v < high if open_high else v <= high)
        return above and below

    return Check(_finite, test, rule)


def optional(check: Check, none: str = "none") -> Check:
    """``check``, or the word ``none`` for ``None``."""
    return Check(lambda t: None if t.lower() == none else check.parse(t), lambda v: v is None or check.test(v),
                 f"{check.rule} or '{none}'")


def _learning_rate(text: str) -> float | str:
    return text if text == "auto" else _finite(text)


LEARNING_RATE = Check(_learning_rate, lambda v: v == "auto" or (isinstance(v, (int, float)) and 0 < v < 10),
                      "a learning rate in (0, 10) or 'auto'")


def _devices(text: str) -> str | int | list[int]:
    if text == "auto":
        return text
    if "," in text:
        return [int(part) for part in text.split(",") if part.strip()]
    return int(text)


DEVICES = Check(_devices, lambda v: v == "auto" or (isinstance(v, int) and (v >= 1 or v == -1)) or (
    isinstance(v, list) and bool(v) and all(i >= 0 for i in v) and len(set(v)) == len(v)),
    "'auto', a device count >= 1, -1 (all) or a list of device indices such as 0,1")
REPO_ID = Check(str, lambda v: bool(re.fullmatch(r"[\w.-]{1,96}/[\w.-]{1,96}", v)) and ".." not in v,
                "a Hub repo id such as user/name")
NON_EMPTY = Check(str, lambda v: bool(v.strip()) and "\n" not in v, "a non-empty one-line text")


def _strategy(text: str) -> str:
    """A Lightning strategy name (checked against Lightning's registry only when it is not 'auto')."""
    if text == "auto":
        return text
    from lightning.pytorch.strategies import StrategyRegistry

    known = {"ddp", "ddp_spawn", "ddp_fork", "ddp_notebook", "fsdp", "deepspeed", "single_device",
             *StrategyRegistry.available_strategies()}
    if text not in known:
        raise ValueError(f"unknown strategy {text!r}")
    return text


STRATEGY = Check(_strategy, lambda v: isinstance(v, str), "'auto' or a Lightning strategy such as ddp or fsdp")


def _auto_augment(text: str) -> str | None:
    """A timm auto-augment policy (built once to check it) or ``none``."""
    if text.lower() == "none":
        return None
    from timm.data.auto_augment import (
        augment_and_mix_transform,
        auto_augment_transform,
        rand_augment_transform,
    )

    builders = {"rand": rand_augment_transform, "augmix": augment_and_mix_transform}
    builder = builders.get(text.split("-")[0], auto_augment_transform)
    try:
        builder(text, {"translate_const": 100, "img_mean": (128, 128, 128)})
    except Exception as e:  # timm raises AssertionError, KeyError, IndexError or ValueError for a bad policy string
        raise ValueError(text) from e
    return text


AUTO_AUGMENT = Check(_auto_augment, lambda v: v is None or isinstance(v, str),
                     "a timm policy such as rand-m9-mstd0.5-inc1, augmix-m5-w4-d2, v0, original, or 'none'")


def option(default: Any = MISSING, help: str = "", *, check: Check | None = None, choices: Sequence[str] = (),
           flag: str | None = None, metavar: str | None = None, shown: str | None = None, nargs: str | None = None,
           default_factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field that is also a command-line option (``shown``: how --help states a computed default)."""
    metadata = dict(help=help, check=check, choices=tuple(choices), flag=flag, metavar=metavar, shown=shown,
                    nargs=nargs)
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_workers() -> int:
    """Data-loader worker processes: half the CPUs, at most 4 (none on one CPU), so they leave cores to the model."""
    return min(4, _cpus() // 2)


def default_threads(workers: int | None = None) -> int:
    """Threads for the model: the CPUs ``workers`` loader processes leave free (``$OMP_NUM_THREADS`` when set).

    Torch's default of one thread per core plus worker processes on the same cores
    made training steps 3-8x slower on a busy 2-core machine than one thread each.
    """
    from_env = os.environ.get("OMP_NUM_THREADS", "")
    if from_env.isdigit() and int(from_env) > 0:
        return int(from_env)
    return max(1, _cpus() - (default_workers() if workers is None else workers))


_DURATION = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?")


def parse_duration(text: str) -> float:
    """Seconds in ``90s``, ``20m``, ``1h``, ``1h30m`` or a plain number of seconds."""
    text = text.strip().lower()
    if re.fullmatch(r"\d+(?:\.\d+)?", text):
        return float(text)
    match = _DURATION.fullmatch(text)
    if not text or not match:
        raise ValueError(text)
    hours, minutes, seconds = (float(group or 0) for group in match.groups())
    return hours * 3600 + minutes * 60 + seconds


def format_duration(seconds: float) -> str:
    """``seconds`` as ``1h05m``, ``12m30s`` or ``45s``."""
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


DURATION = Check(parse_duration, lambda v: isinstance(v, (int, float)) and 10 <= v <= 30 * 86400,
                 "a duration from 10s to 30 days, such as 90s, 20m, 1h or 1h30m")


class Options:
    """Checks every field that has a ``check`` when the dataclass is built in Python."""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, str) and "Path" in str(f.type):
                setattr(self, f.name, value := Path(value))
            check: Check | None = f.metadata.get("check")
            if value is None and default_of(f) is None:
                continue
            if f.metadata.get("nargs") and isinstance(value, list):
                setattr(self, f.name, value := tuple(value))
            try:
                if check is not None:
                    check.check(value)
                elif f.metadata.get("choices"):
                    choices = f.metadata["choices"]
                    if not all(v in choices for v in (value if f.metadata.get("nargs") else [value])):
                        raise argparse.ArgumentTypeError(f"expected one of {', '.join(choices)}, got {value!r}")
            except argparse.ArgumentTypeError as e:
                raise UsageError(f"{flag_of(f)}: {e}") from None


@dataclass
class DataConfig(Options):
    """Where the images are, how they are split, augmented and batched."""

    data_dir: Path = option(flag="--data", metavar="DATA",
                            help="DATA/<class>/<images> or DATA/train/<class> + DATA/val/<class> (+ DATA/test/<class>)")
    val_split: float = option(0.2, "validation fraction of each class (DATA/<class> layout)",
                              check=number(0, 1, open_low=True, open_high=True))
    balance: bool = option(False, "sample classes equally often (weighted sampling)")
    crop_scale: float = option(0.08, "smallest area fraction of the training random-resized crop",
                               check=number(0, 1, open_low=True))
    auto_augment: str | None = option("rand-m9-mstd0.5-inc1", "timm augmentation policy, or 'none'",
                                      check=AUTO_AUGMENT)
    batch_size: int = option(32, "images per batch and device", check=integer(1))
    workers: int = option(default_factory=default_workers, help="data-loading worker processes",
                          check=integer(0, 64), shown="half the CPUs, at most 4")
    seed: int = option(42, "seed of the split, the augmentation and the initialisation", check=integer(0))


@dataclass
class ModelConfig(Options):
    """Which VAN, its starting weights and the input it is trained and served at."""

    model: str = option("van_b0", "VAN variant", choices=())  # choices filled from the variant table by the CLI
    pretrained: str = option("auto", "auto (official ImageNet weights when available, else random), none, a variant "
                             "name (its official weights), a checkpoint/export path or a Hub repo id (their "
                             "architecture replaces --model)", check=NON_EMPTY)
    img_size: int = option(224, "training and inference image size in pixels",
                           check=integer(MIN_IMAGE_SIZE, MAX_IMAGE_SIZE))
    crop_mode: str | None = option(None, "how evaluation fits an image to the square input: center (resize the short "
                                   "side, crop the middle), squash (resize both sides, aspect not kept) or border "
                                   "(pad); with --crop-pct 1.0, squash and border cut nothing off",
                                   choices=("center", "squash", "border"), shown="the model's, center for VAN")
    crop_pct: float | None = option(None, "evaluation centre-crop fraction",
                                    check=optional(number(0, 1, open_low=True)), shown="the model's, 0.9 for VAN")
    drop_path: float = option(0.1, "stochastic depth rate", check=number(0, 1, open_high=True))
    layer_scale_init: float = option(1e-2, "initial layer scales of a randomly initialised model (official 1e-2; 0.1 "
                                     "trains much faster from scratch); pretrained weights bring their own",
                                     check=number(0, 10, open_low=True))


@dataclass
class TrainConfig(Options):
    """The optimisation recipe; plain types only, so checkpoints that hold it load with ``weights_only=True``."""

    epochs: int = option(10, "training epochs", check=integer(1, 100_000))
    lr: float | str = option(5e-4, "peak learning rate, or 'auto' (Lightning's learning-rate finder)",
                             check=LEARNING_RATE)
    weight_decay: float = option(0.05, "AdamW decay (weights only, not norms, biases or layer scales)",
                                 check=number(0, 10))
    warmup_epochs: float = option(1.0, "linear warm-up before the cosine decay", check=number(0, 100_000))
    min_lr_ratio: float = option(0.01, "final learning rate as a fraction of the peak", check=number(0, 1))
    label_smoothing: float = option(0.1, "label smoothing of the loss", check=number(0, 1, open_high=True))
    layer_decay: float | None = option(None, "layer-wise learning-rate decay, e.g. 0.75 (none: off)",
                                       check=optional(number(0, 1, open_low=True)))
    mixup: float = option(0.0, "mixup alpha (0: off)", check=number(0, 100))
    cutmix: float = option(0.0, "cutmix alpha (0: off)", check=number(0, 100))
    freeze_epochs: int = option(0, "train only the head for the first K epochs", check=integer(0))
    ema: bool = option(False, "keep an exponential moving average of the weights; validate and export it")
    ema_decay: float = option(0.999, "EMA decay per step", check=number(0, 1, open_low=True, open_high=True))
    patience: int | None = option(None, "stop after N validations without val_acc improving (none: never)",
                                  check=optional(integer(1)))
    accumulate: int = option(1, "gradient accumulation steps", check=integer(1, 10_000))
    time: float | None = option(None, "fit the whole run into this time: the number of epochs and the learning-rate "
                                "schedule follow the budget (e.g. 90s, 20m, 1h)", check=DURATION,
                                shown="no limit, --epochs decides")


@dataclass
class HardwareConfig(Options):
    """Where the Lightning Trainer runs."""

    precision: str = option("32", "numeric precision", choices=PRECISIONS)
    accelerator: str = option("auto", "auto, cpu, gpu, mps, ...", choices=ACCELERATORS)
    devices: str | int | list[int] = option("auto", "devices per node: auto, a count, -1 (all) or indices like 0,1",
                                            check=DEVICES)
    strategy: str = option("auto", "auto, ddp, fsdp, ... (Lightning strategies)", check=STRATEGY)
    num_nodes: int = option(1, "machines to train on", check=integer(1, 100_000))
    threads: int | None = option(None, "threads for the model on the CPU", check=integer(1, 1024),
                                 shown="the CPUs the --workers leave free, or $OMP_NUM_THREADS")


@dataclass
class OutputConfig(Options):
    """Where the export and the run's checkpoints go, and where the export is published."""

    output: Path | None = option(None, "export folder (replaced whole when the run ends)", metavar="DIR",
                                 shown="runs/<data name>-<model>")
    run_dir: Path | None = option(None, "run folder: checkpoints, logs, the split (kept apart from the export)",
                                  metavar="DIR", shown="<output>.run")
    resume: bool = option(False, "continue the interrupted run in the run folder from its newest readable checkpoint")
    overwrite: bool = option(False, "start over: discard the checkpoints of an earlier run and replace its export")
    save_every_steps: int = option(100, "also checkpoint every N optimizer steps (for --resume)", check=integer(1))
    license: str = option("apache-2.0", "license in the model card", check=NON_EMPTY)
    push_to_hub: str | None = option(None, "upload the export to this Hub repo", check=REPO_ID, metavar="USER/REPO",
                                     shown="no upload")
    private: bool = option(False, "create the Hub repo as private")


@dataclass
class PredictConfig(Options):
    """What ``van-predict`` writes and how it batches."""

    output: Path = option(Path("predictions.csv"), "CSV file: one row per image, top-k labels and probabilities",
                          metavar="CSV")
    k: int = option(5, "labels per image", check=integer(1, 1000))
    batch_size: int = option(16, "images per forward pass", check=integer(1, 4096))
    heatmaps: Path | None = option(None, "also write each image's evidence map for its predicted class (PNG) into "
                                   "this folder", metavar="DIR", shown="none")
    workers: int = option(default_factory=default_workers, help="decoding worker processes", check=integer(0, 64),
                          shown="half the CPUs, at most 4")
    threads: int | None = option(None, "threads for the model on the CPU", check=integer(1, 1024),
                                 shown="the CPUs the --workers leave free, or $OMP_NUM_THREADS")


@dataclass
class FinetuneConfig:
    """All of ``van-finetune``: one group of options per part of the run."""

    data: DataConfig
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    explicit: frozenset[str] = frozenset()  # the options the user set on the command line

    GROUPS = {"data": DataConfig, "model": ModelConfig, "train": TrainConfig, "hardware": HardwareConfig,
              "output": OutputConfig}
    TITLES = {"data": "data", "model": "model", "train": "optimisation", "hardware": "hardware (Lightning Trainer)",
              "output": "output"}

    @property
    def export_dir(self) -> Path:
        """The export folder: ``--output``, else ``runs/<data folder name>-<model>``."""
        name = self.data.data_dir.expanduser().resolve().name
        return self.output.output or Path("runs") / f"{name}-{self.model.model}"

    @property
    def run_dir(self) -> Path:
        """The run folder: ``--run-dir``, else the export folder's name with ``.run`` beside it."""
        export = self.export_dir
        return self.output.run_dir or export.with_name(f"{export.name}.run")

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """Plain values, grouped, paths as strings."""
        return {name: {k: str(v) if isinstance(v, Path) else v for k, v in asdict(getattr(self, name)).items()}
                for name in self.GROUPS}


def flag_of(f: Any) -> str:
    """The command-line flag of dataclass field ``f``."""
    return f.metadata.get("flag") or f"--{f.name.replace('_', '-')}"


def default_of(f: Any) -> Any:
    """The default value of dataclass field ``f`` (calling its factory)."""
    return f.default_factory() if f.default is MISSING and f.default_factory is not MISSING else f.default


def add_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
                choices: dict[str, Sequence[str]] | None = None) -> None:
    """One option per field of the dataclass ``cls`` (booleans as --x/--no-x), help ending with its default."""
    for f in fields(cls):
        meta, default = f.metadata, default_of(f)
        kwargs: dict[str, Any] = dict(dest=f.name, help=meta.get("help", ""))
        if meta.get("metavar"):
            kwargs["metavar"] = meta["metavar"]
        if f.default is MISSING and f.default_factory is MISSING:
            kwargs["required"] = True
            kwargs["type"] = Path if "Path" in str(f.type) else str
        else:
            shown = meta.get("shown") or ("none" if default is None else (
                " ".join(map(str, default)) if isinstance(default, (tuple, list)) else default))
            kwargs["help"] += f" (default: {shown})"
            kwargs["default"] = default
            if f.type in ("bool", bool):
                kwargs["action"] = argparse.BooleanOptionalAction
            elif meta.get("check") is not None:
                kwargs["type"] = meta["check"]
            elif "Path" in str(f.type):
                kwargs["type"] = Path
        options = (choices or {}).get(f.name) or meta.get("choices")
        if options:
            kwargs["choices"] = list(options)
        if meta.get("nargs"):
            kwargs["nargs"] = meta["nargs"]
        parser.add_argument(flag_of(f), **kwargs)


def from_namespace(cls: type, namespace: argparse.Namespace) -> Any:
    """An instance of dataclass ``cls`` from the parsed options named after its fields."""
    return cls(**{f.name: getattr(namespace, f.name) for f in fields(cls)})


# What trains a VAN from random weights in minutes on a CPU (found training the bundled model and on photos of
# hands): layer scales that let the blocks speak from the first step, a higher learning rate, no stochastic depth
# and milder augmentation. The official 1e-2 layer scales kept a random VAN at chance for over a thousand steps.
FROM_SCRATCH = {"model": {"layer_scale_init": 0.1, "drop_path": 0.0},
                "train": {"lr": 1e-3, "warmup_epochs": 0.5},
                "data": {"auto_augment": None, "crop_scale": 0.35}}
MAX_SCRATCH_SIZE = {"cpu": 128, "gpu": 224}  # a larger input multiplies a from-scratch run's time, rarely its accuracy


def from_scratch(config: FinetuneConfig, image_side: int, on_gpu: bool) -> tuple[FinetuneConfig, str]:
    """``config`` with the from-scratch recipe in every option the user did not set, and the line that says so.

    The image size follows the data: the typical short side, a multiple of 32,
    at most 128 px on a CPU (224 on a GPU).
    """
    cap = MAX_SCRATCH_SIZE["gpu" if on_gpu else "cpu"]
    recipe = {group: dict(values) for group, values in FROM_SCRATCH.items()}
    recipe["model"]["img_size"] = max(MIN_IMAGE_SIZE, min(cap, image_side // 32 * 32))
    changed, groups = [], {}
    for group, values in recipe.items():
        section = getattr(config, group)
        updates = {name: value for name, value in values.items() if name not in config.explicit}
        groups[group] = replace(section, **updates)
        for name, value in updates.items():
            f = next(f for f in fields(section) if f.name == name)
            changed.append(f"{flag_of(f)} {'none' if value is None else value}")
    line = ("no pretrained weights: from-scratch recipe " + " ".join(changed)) if changed else ""
    return replace(config, **groups), line
