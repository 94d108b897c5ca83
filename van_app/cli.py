"""Console scripts: ``van-finetune`` (image folders -> trained, exported, optionally pushed VAN) and ``van-push``.

Options come from the dataclasses in ``config.py`` and are checked by argparse
before anything slow happens. User mistakes (a bad option, data folder,
checkpoint or output folder, no Hub token, a full disk) end with one
``error: ...`` line on stderr and exit code 2, never a traceback. SIGTERM (what
``kill``, schedulers and containers send) stops a run after the current batch,
saves a checkpoint that ``--resume`` continues from, and exits with 143.

A run writes two folders side by side: the run folder (checkpoints, logs, the
list of bad files) while it trains, and the export folder, written whole when it
ends and swapped in for the previous export, so the export is never a mix of runs.
"""

from __future__ import annotations

import argparse
import copy
import errno
import json
import logging
import os
import shlex
import shutil
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import (ArgumentParser, FinetuneConfig, PredictConfig, TrainConfig, add_options, default_of,
                     default_threads, flag_of, from_namespace, from_scratch)
from .errors import CheckpointError, DataError, HubError, UsageError, first_line
from .files import EXPORT_CONFIG, EXPORT_WEIGHTS, write_json
from .variants import VARIANTS

if TYPE_CHECKING:
    from .budget import Plan

USER_ERRORS = (DataError, CheckpointError, HubError, UsageError)
EXIT_USAGE, EXIT_SIGTERM = 2, 143
CHECKPOINTS, LOGS, PLAN_FILE = "checkpoints", "logs", "plan.json"
INTERRUPTED = "interrupted"  # the checkpoint written when a run is stopped by SIGTERM, Ctrl-C or an error
# Options that only say where files go or whether to publish them: not part of how a model is made.
_NOT_RECIPE = {"output", "run_dir", "resume", "overwrite", "push_to_hub", "private", "workers"}


def build_parser() -> ArgumentParser:
    """The ``van-finetune`` argument parser: one group per config dataclass, every default shown."""
    parser = ArgumentParser(
        prog="van-finetune",
        usage="%(prog)s --data DATA [options]",
        description="Fine-tune a Visual Attention Network on a folder of images, export it, optionally push it.",
    )
    for name, cls in FinetuneConfig.GROUPS.items():
        group = parser.add_argument_group(FinetuneConfig.TITLES[name])
        add_options(group, cls, choices={"model": list(VARIANTS)})
    return parser


def parse_config(argv: list[str] | None = None) -> FinetuneConfig:
    """``van-finetune``'s command line as a checked ``FinetuneConfig`` (argparse exits with 2 on a bad value)."""
    parser = build_parser()
    namespace = parser.parse_args(argv)
    for action in parser._actions:  # parsed again without defaults: what is left is what the user set
        action.default = argparse.SUPPRESS
    explicit = frozenset(vars(parser.parse_args(argv)))
    groups = {name: from_namespace(cls, namespace) for name, cls in FinetuneConfig.GROUPS.items()}
    return FinetuneConfig(**groups, explicit=explicit)


def main(argv: list[str] | None = None) -> int:
    """``van-finetune``: train, export, print the metrics; one-line errors exit with 2, SIGTERM with 143."""
    config = parse_config(argv)
    try:
        return finetune(config)
    except USER_ERRORS as e:
        return _fail(first_line(e))
    except OSError as e:  # a full disk, a read-only or vanished folder: the user's to fix, not a bug
        return _fail(os_error_line(e))


def _fail(message: str, code: int = EXIT_USAGE) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def os_error_line(error: OSError) -> str:
    """One line for an OS error on the user's files, with what to do about a full disk."""
    where = f"{error.filename}: " if error.filename else ""
    text = f"{where}{error.strerror or first_line(error)}"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        text += " (free some space; --resume continues from the last checkpoint)"
    return text


def _configure_output() -> None:
    """Our warnings as ``warning: ...`` lines; silence Lightning's hints that miss small data sets, and its ads."""
    handler = logging.StreamHandler()
    handler.setLevel(logging.WARNING)  # Lightning's INFO lines keep their own handler and prefix
    logging.basicConfig(format="warning: %(message)s", handlers=[handler])  # no-op when logging is configured
    for hint in (".*does not have many workers.*", ".*smaller than the logging interval.*",
                 ".*exists and is not empty.*", ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*",
                 ".*your dataloader is not resumable.*"):
        warnings.filterwarnings("ignore", hint)
    # Lightning's advertisements for its cloud services ("💡 Tip: ... try installing litlogger")
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda r: "💡 Tip" not in r.getMessage())


def prepare_folders(config: FinetuneConfig) -> Path | None:
    """Check the export and run folders against --resume/--overwrite, make the run folder, return the resume point.

    Everything here is cheap and happens before the folder scan, so a run that
    cannot finish (no token, an occupied or unwritable folder) fails at once.
    """
    from .hub import require_token

    export, run = config.export_dir, config.run_dir
    checkpoints = run / CHECKPOINTS
    if config.output.push_to_hub:
        require_token()
    if export.is_file() or (export.is_dir() and any(export.iterdir()) and not (export / EXPORT_CONFIG).is_file()):
        raise UsageError(f"{export} exists and is not a van_app export; choose another --output")
    earlier = checkpoints.is_dir() and any(checkpoints.glob("*.ckpt"))
    if config.output.resume:
        if not earlier:
            raise UsageError(f"--resume: no checkpoint in {checkpoints} to continue from")
    elif (earlier or (export / EXPORT_WEIGHTS).is_file()) and not config.output.overwrite:
        raise UsageError(f"{export} already holds a run: pass --resume to continue it, --overwrite to start over, "
                         f"or another --output")
    elif config.output.overwrite:
        for path in (checkpoints, run / LOGS):
            shutil.rmtree(path, ignore_errors=True)
    for folder in (run, export.parent):
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".van-write-test-{os.getpid()}"
        try:
            probe.write_bytes(b"")  # a read-only or full file system fails here, before the scan
        except OSError as e:
            raise OSError(e.errno, e.strerror, str(folder)) from e
        probe.unlink()
    return newest_checkpoint(checkpoints) if config.output.resume else None


def newest_checkpoint(folder: Path) -> Path:
    """The readable checkpoint in ``folder`` with the most optimizer steps; unreadable ones are named and skipped."""
    import torch

    readable, broken = [], []
    for path in sorted(folder.glob("*.ckpt")):
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            readable.append((int(checkpoint.get("global_step", 0)), path.stat().st_mtime, path))
        except Exception as e:  # truncated zips, foreign pickles, I/O errors: any of them makes it unusable
            broken.append(f"{path.name} ({first_line(e, 80)})")
    if not readable:
        raise UsageError(f"--resume: no readable checkpoint in {folder} ({'; '.join(broken)}); "
                         f"start over with --overwrite")
    step, _, path = max(readable)
    if broken:
        logging.getLogger("van_app").warning("skipped unreadable checkpoints: %s; resuming from %s (step %d)",
                                             ", ".join(broken), path.name, step)
    return path


def finetune(config: FinetuneConfig) -> int:
    """The whole run: folders, Trainer, model, data, plan, fit, export, push."""
    started = time.monotonic()
    _configure_output()
    import lightning as L
    import torch
    from lightning.pytorch.utilities import rank_zero_only
    from lightning.pytorch.utilities.exceptions import SIGTERMException
    from timm.data import resolve_data_config

    from .budget import Plan, TimeBudget
    from .data import VanDataModule, find_layout, typical_short_side
    from .module import VanClassifier, create_classifier

    main_process = rank_zero_only.rank == 0
    run = config.run_dir
    layout = find_layout(config.data.data_dir)  # a missing or malformed data folder is reported first
    resume_from = prepare_folders(config) if main_process else None
    if not main_process and config.output.resume:
        resume_from = newest_checkpoint(run / CHECKPOINTS)
    torch.set_num_threads(config.hardware.threads or default_threads(config.data.workers))
    # Denormal floats (tiny activations and gradients) slow CPU training several-fold; flush them to zero.
    torch.set_flush_denormal(True)
    L.seed_everything(config.data.seed, workers=True, verbose=False)
    trainer, best = _trainer(config, run)

    scratch, _ = from_scratch(config, config.model.img_size, on_gpu=False)  # the model arguments only
    base = create_classifier(config.model.model, config.model.pretrained, len(layout.classes),
                             config.model.drop_path, config.model.layer_scale_init,
                             scratch={"drop_path_rate": scratch.model.drop_path,
                                      "layer_scale_init": scratch.model.layer_scale_init})
    recipe_line = ""
    if base.random:
        on_gpu = trainer.strategy.root_device.type == "cuda"
        config, recipe_line = from_scratch(config, typical_short_side(layout), on_gpu)
    if main_process:
        for line in (base.note, recipe_line):
            if line:
                print(f"warning: {line}", file=sys.stderr)
    size = config.model.img_size
    start_cfg = base.model.pretrained_cfg
    base.model.pretrained_cfg = dict(start_cfg, input_size=(3, size, size),
                                     crop_pct=config.model.crop_pct or start_cfg["crop_pct"],
                                     crop_mode=config.model.crop_mode or start_cfg.get("crop_mode", "center"))
    dm = VanDataModule(config.data, resolve_data_config(model=base.model), run_dir=run, progress=main_process)
    train = config.train
    optim = replace(train, lr=TrainConfig().lr) if train.lr == "auto" else train  # the finder replaces lr
    module = VanClassifier(base.model, dm.classes, asdict(optim))
    if main_process:  # scan, split and plan now, so the table, the bad files and the plan come before training
        dm.prepare_data()
        dm.setup("fit")
        print(dm.summary_table())
        plan = _plan(config, trainer, module, dm, resume_from, started)
        print(plan.describe(size))
        write_json(run / PLAN_FILE, asdict(plan))
    else:
        plan = Plan.from_json(json.loads((run / PLAN_FILE).read_text(encoding="utf-8")))
    trainer.log_every_n_steps = min(50, plan.steps_per_epoch)
    trainer.fit_loop.max_epochs = plan.epochs
    trainer.limit_train_batches = plan.fraction if plan.fraction < 1 else 1.0
    if train.time is not None:
        trainer.callbacks.append(TimeBudget(started + train.time, plan))

    if train.lr == "auto" and resume_from is None:
        _find_lr(trainer, module, dm)
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=resume_from, weights_only=True)
    except SIGTERMException:
        if main_process:
            _fail(f"stopped by SIGTERM at epoch {trainer.current_epoch + 1}, step {trainer.global_step}; the "
                  f"checkpoint is in {run / CHECKPOINTS}: continue with the same command and --resume", EXIT_SIGTERM)
        return EXIT_SIGTERM
    best_path = best.best_model_path or best.last_model_path
    if dm.test_samples:  # DATA/test: scored once, with the weights that will be exported
        trainer.test(module, datamodule=dm, ckpt_path=best_path, weights_only=True, verbose=False)
    if not trainer.is_global_zero:
        return 0
    (run / CHECKPOINTS / f"{INTERRUPTED}.ckpt").unlink(missing_ok=True)  # the run went on past it
    return _export_and_report(config, module, dm, best_path, base, recipe_line, time.monotonic() - started)


def _plan(config: FinetuneConfig, trainer: Any, module: Any, dm: Any, resume_from: Path | None,
          started: float) -> Plan:
    """Measure this machine's training and validation speed, then size the run (to the budget, with --time)."""
    import torch

    from .budget import Rates, measure, plan_run

    world = trainer.world_size
    rates = measure(module.model, dm.train_dataloader(), dm.val_dataloader(), trainer.strategy.root_device,
                    forward_context=trainer.precision_plugin.forward_context)
    rates = Rates(rates.train * world, rates.val * world)
    done = 0
    if resume_from is not None:
        done = int(torch.load(resume_from, map_location="cpu", weights_only=True, mmap=True).get("epoch", 0))
    budget = None if config.train.time is None else config.train.time - (time.monotonic() - started)
    per_step = config.data.batch_size * world * config.train.accumulate
    plan = plan_run(rates, len(dm.train_samples), len(dm.val_samples), per_step,
                    config.train.epochs - done, budget)
    return replace(plan, epochs=plan.epochs + done)


def _trainer(config: FinetuneConfig, run: Path) -> tuple[Any, Any]:
    """The Lightning Trainer with our callbacks and loggers, and its best-checkpoint callback.

    Built before the folder scan, so an accelerator, device count or strategy
    this machine cannot run is reported at once.
    """
    import lightning as L
    from lightning.fabric.utilities.exceptions import MisconfigurationException
    from lightning.pytorch.callbacks import EarlyStopping, EMAWeightAveraging, LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from .module import AtomicCheckpointIO, CheckpointOnInterrupt, FreezeBackbone, ThroughputBar

    train, hardware, checkpoints = config.train, config.hardware, run / CHECKPOINTS
    # Both write last.ckpt: one after each validation, the other every N steps so a killed run can resume mid-epoch.
    best = ModelCheckpoint(dirpath=checkpoints, filename="best", monitor="val_acc", mode="max", save_top_k=1,
                           save_last=True, enable_version_counter=False)
    last = ModelCheckpoint(dirpath=checkpoints, save_top_k=0, save_last=True,
                           every_n_train_steps=config.output.save_every_steps, enable_version_counter=False)
    callbacks = [best, last, CheckpointOnInterrupt(checkpoints / f"{INTERRUPTED}.ckpt"), ThroughputBar(),
                 LearningRateMonitor(logging_interval="step")]
    if train.freeze_epochs:
        callbacks.append(FreezeBackbone(train.freeze_epochs))
    if train.patience:
        callbacks.append(EarlyStopping(monitor="val_acc", mode="max", patience=train.patience))
    if train.ema:
        callbacks.append(EMAWeightAveraging(decay=train.ema_decay))
    loggers = [CSVLogger(run, name=LOGS, version="")]
    if _tensorboard_installed():
        loggers.append(TensorBoardLogger(run, name=LOGS, version="", default_hp_metric=False))
    try:
        trainer = L.Trainer(
            max_epochs=train.epochs,
            accelerator=hardware.accelerator,
            devices=hardware.devices,
            strategy=hardware.strategy,
            num_nodes=hardware.num_nodes,
            precision=hardware.precision,
            accumulate_grad_batches=train.accumulate,
            callbacks=callbacks,
            logger=loggers,
            plugins=[AtomicCheckpointIO()],
            default_root_dir=run,
            num_sanity_val_steps=0,
            enable_model_summary=False,
        )
    except (MisconfigurationException, ValueError, RuntimeError, TypeError) as e:
        raise UsageError(f"the Trainer cannot run with these hardware options: {first_line(e)}") from e
    return trainer, best


def _tensorboard_installed() -> bool:
    """Whether TensorBoard logging is possible."""
    import importlib.util

    return any(importlib.util.find_spec(name) for name in ("tensorboard", "tensorboardX"))


def _find_lr(trainer: Any, module: Any, dm: Any) -> None:
    """Set ``module.lr`` with Lightning's learning-rate finder (single process only)."""
    from lightning.pytorch.tuner import Tuner

    if trainer.world_size > 1:
        raise UsageError("--lr auto runs on one device; pick a number for multi-device runs")
    finder = Tuner(trainer).lr_find(module, datamodule=dm, attr_name="lr", num_training=100)
    if finder is None or finder.suggestion() is None:
        logging.getLogger("van_app").warning("the learning-rate finder found no suggestion; using %g", module.lr)
    else:
        print(f"learning rate (finder): {module.lr:.3g}")


def training_record(config: FinetuneConfig, lr: float) -> tuple[dict[str, Any], str]:
    """The options that made the model (paths reduced to their names) and the command that repeats them."""
    args: dict[str, Any] = {}
    command = ["van-finetune", "--data", config.data.data_dir.expanduser().resolve().name]
    for group in FinetuneConfig.GROUPS:
        section = getattr(config, group)
        for f in fields(section):
            value = getattr(section, f.name)
            if f.name == "lr":
                value = lr
            elif isinstance(value, Path) or (f.name == "pretrained" and Path(value).expanduser().exists()):
                value = Path(value).expanduser().resolve().name  # never an absolute path of the user's machine
            if f.name in _NOT_RECIPE or f.name == "data_dir":
                continue
            args[f.name] = value
            if value != default_of(f):
                flag = flag_of(f)
                if isinstance(value, bool):
                    command.append(flag if value else f"--no-{flag[2:]}")
                else:
                    text = ",".join(map(str, value)) if isinstance(value, list) else str(value)
                    command += [flag, "none" if value is None else text]
    return args, shlex.join(command)


def _export_and_report(config: FinetuneConfig, module: Any, dm: Any, best_path: str, base: Any, recipe_line: str,
                       wall_time: float) -> int:
    """Export the best checkpoint's weights and metrics, print them, push when asked."""
    import torch

    from .export import RunInfo, summary_table, write_export
    from .hub import push_export
    from .module import model_state
    checkpoint = torch.load(best_path, map_location="cpu", weights_only=True)
    model = copy.deepcopy(module.model).cpu().eval()  # the trained model keeps its architecture and preprocessing
    model.load_state_dict(model_state(checkpoint))
    report = checkpoint.get("van_app", {}).get("val_report") or module.val_report
    extra = {"best_epoch": report.get("epoch"), "best_step": report.get("step"), "epochs": module.current_epoch,
             "images_seen": module.images_seen, "wall_time_s": round(module.wall_time_s(), 2),
             "final_lr": max((g["lr"] for o in module.trainer.optimizers for g in o.param_groups), default=None),
             **module.test_report}
    training_args, command = training_record(config, module.lr)
    run = RunInfo(data_name=dm.data_dir.name, data_summary=dm.summary(), command=command,
                  training_args=training_args, license=config.output.license, base_model=base.base_model,
                  local_start=base.local_start, note=base.note, recipe=recipe_line or None)
    export = config.export_dir
    metrics = write_export(export, model, dm.classes, dm.data_config, report, extra, run,
                           bad_files=dm.bad_files_text(), model_name=config.output.push_to_hub)
    print(summary_table(metrics, dm.classes))
    print(f"exported to {export} ({wall_time:.0f} s)")
    repo = config.output.push_to_hub
    if repo:
        try:
            url = push_export(export, repo, private=config.output.private)
        except HubError as e:
            raise HubError(f"{e}; the export in {export} is intact: retry with `van-push {export} {repo}`") from e
        print(f"pushed to {url}")
    return 0


def _one_line_errors(work: Callable[[], int]) -> int:
    """``work()``'s exit code; a user error, a missing file or another OS error as one line and exit code 2."""
    try:
        return work()
    except (*USER_ERRORS, FileNotFoundError) as e:
        return _fail(first_line(e))
    except OSError as e:
        return _fail(os_error_line(e))


def build_push_parser() -> ArgumentParser:
    """The ``van-push`` argument parser."""
    from .config import REPO_ID

    parser = ArgumentParser(
        prog="van-push",
        description="Upload a van-finetune export folder to a Hugging Face Hub model repo (one commit, no .ckpt).",
    )
    parser.add_argument("folder", type=Path, help="export folder written by van-finetune")
    parser.add_argument("repo_id", metavar="USER/REPO", type=REPO_ID, help="Hub model repo (created if missing)")
    parser.add_argument("--private", action=argparse.BooleanOptionalAction, default=False,
                        help="create the repo as private (default: public)")
    return parser


def push_main(argv: list[str] | None = None) -> int:
    """``van-push DIR USER/REPO``: one-line errors exit with 2."""
    args = build_push_parser().parse_args(argv)
    from .hub import push_export

    try:
        url = push_export(args.folder, args.repo_id, private=args.private)
    except HubError as e:
        return _fail(first_line(e))
    print(f"pushed {args.folder} to {url}")
    return 0


def build_predict_parser() -> ArgumentParser:
    """The ``van-predict`` argument parser."""
    parser = ArgumentParser(prog="van-predict", usage="%(prog)s MODEL PATH... [options]",
                            description="Classify image files with a VAN: a CSV of the top labels, a summary, "
                                        "accuracy when the folders are named after the classes.")
    parser.add_argument("model", help="an export folder, a Hub repo id or a variant name (what load_model accepts)")
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="image files, folders (searched recursively) or glob patterns such as 'photos/*.jpg'")
    add_options(parser, PredictConfig)
    return parser


def predict_main(argv: list[str] | None = None) -> int:
    """``van-predict MODEL PATH...``: classify in batches, write the CSV, print a summary; one-line errors exit 2."""
    args = build_predict_parser().parse_args(argv)
    config = from_namespace(PredictConfig, args)
    return _one_line_errors(lambda: _predict(args.model, args.paths, config))


def build_export_onnx_parser() -> ArgumentParser:
    """The ``van-export-onnx`` argument parser."""
    parser = ArgumentParser(prog="van-export-onnx",
                            description="Write a VAN as an ONNX file for ONNX Runtime, OpenVINO or any ONNX engine: "
                                        "dynamic batch, labels and preprocessing in its metadata.")
    parser.add_argument("model", help="an export folder, a Hub repo id, a checkpoint or a variant name "
                                      "(what load_model accepts)")
    parser.add_argument("output", type=Path, help="the .onnx file to write")
    parser.add_argument("--pretrained", action=argparse.BooleanOptionalAction, default=False,
                        help="a variant name gets its official ImageNet weights (default: random weights)")
    parser.add_argument("--maps", action=argparse.BooleanOptionalAction, default=False,
                        help="also output each block's LKA attention map and the evidence for a class, the "
                             "heatmaps the app draws (the graph then takes one image at a time and, as its "
                             "second input 'target', the class to explain: -1 for the predicted one)")
    return parser


def export_onnx_main(argv: list[str] | None = None) -> int:
    """``van-export-onnx MODEL OUTPUT``: write the file, check it in ONNX Runtime; one-line errors exit 2."""
    args = build_export_onnx_parser().parse_args(argv)
    return _one_line_errors(lambda: _export_onnx(args))


def _export_onnx(args: argparse.Namespace) -> int:
    """The van-export-onnx run."""
    from .onnx_export import export_onnx, verify_export
    from .weights import load_model

    model = load_model(args.model, pretrained=args.pretrained)
    export_onnx(model, args.output, maps=args.maps)
    difference = verify_export(model, args.output)
    if not difference <= 1e-4:
        return _fail(f"{args.output}: ONNX Runtime's logits differ from PyTorch's by {difference:.3g}", code=1)
    print(f"wrote {args.output} ({args.output.stat().st_size / 2**20:.1f} MB): {model.variant}, "
          f"{len(model.labels)} labels, input ({1 if args.maps else 'batch'}, 3, "
          f"{model.pretrained_cfg['input_size'][-2]}, {model.pretrained_cfg['input_size'][-1]})"
          f"{' and target (1,), the class to explain (-1: the predicted one)' if args.maps else ''}; "
          f"ONNX Runtime matches PyTorch within {difference:.1e}")
    return 0


def _predict(source: str, sources: list[str], config: PredictConfig) -> int:
    """The van-predict run."""
    import torch

    from .batch import find_files, predict_files, summary, write_csv
    from .fuse import fuse
    from .weights import load_model

    torch.set_num_threads(config.threads or default_threads(config.workers))
    paths = find_files(sources)
    if not paths:
        raise UsageError(f"no image files in {', '.join(sources)}")
    model = fuse(load_model(source))
    root = Path(os.path.commonpath([p.resolve().parent for p in paths]))
    predictions = predict_files(model, [p.resolve() for p in paths], k=config.k, batch_size=config.batch_size,
                                workers=config.workers, heatmaps=config.heatmaps, root=root)
    rows = write_csv(predictions, config.output, config.k)
    print(summary(rows, model.labels))
    print(f"wrote {config.output}" + (f" and overlays in {config.heatmaps}" if config.heatmaps else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
