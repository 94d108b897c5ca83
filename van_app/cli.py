"""Console scripts: ``van-finetune`` (image folders -> trained, exported, optionally pushed VAN) and ``van-push``.

User mistakes (a bad data folder, an unusable checkpoint, no Hub token) end
with one ``error: ...`` line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import shutil
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from .data import default_workers
from .errors import CheckpointError, DataError, HubError, UsageError
from .model import VARIANTS

USER_ERRORS = (DataError, CheckpointError, HubError)


def _lr(text: str) -> float | str:
    """``--lr``: a positive float or ``auto``."""
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``van-finetune`` argument parser, options grouped, defaults shown."""
    parser = argparse.ArgumentParser(
        prog="van-finetune",
        description="Fine-tune a Visual Attention Network on a folder of images, export it, optionally push it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    data = parser.add_argument_group("data")
    data.add_argument("--data", type=Path, required=True,
                      help="DATA/<class>/<images> or DATA/train/<class> + DATA/val/<class> (+ DATA/test/<class>)")
    data.add_argument("--img-size", type=int, default=224, help="training and inference image size")
    data.add_argument("--val-split", type=float, default=0.2, help="validation fraction (DATA/<class> layout)")
    data.add_argument("--balance", action=argparse.BooleanOptionalAction, default=False,
                      help="sample classes equally often (weighted sampling)")
    data.add_argument("--crop-scale", type=float, default=0.08,
                      help="smallest area fraction of the training random-resized crop")
    data.add_argument("--crop-pct", type=float, default=None,
                      help="evaluation centre-crop fraction (default: the model's, 0.9 for VAN)")
    data.add_argument("--auto-augment", default="rand-m9-mstd0.5-inc1", help="timm RandAugment policy, or 'none'")
    data.add_argument("--workers", type=int, default=default_workers(), help="data-loading worker processes")

    model = parser.add_argument_group("model")
    model.add_argument("--model", default="van_b0", choices=list(VARIANTS), help="VAN variant")
    model.add_argument("--pretrained", default="auto",
                       help="auto (official ImageNet weights when available), none, a checkpoint/export path or a "
                            "Hub repo id (its architecture replaces --model)")
    model.add_argument("--drop-path", type=float, default=0.1, help="stochastic depth rate")
    model.add_argument("--layer-scale-init", type=float, default=1e-2,
                       help="initial layer scales of a randomly initialised model (official: 1e-2; "
                            "0.1 trains much faster from scratch); pretrained weights bring their own")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=int, default=10)
    optim.add_argument("--batch-size", type=int, default=32, help="per device")
    optim.add_argument("--lr", type=_lr, default=5e-4, help="peak learning rate, or 'auto' (learning-rate finder)")
    optim.add_argument("--weight-decay", type=float, default=0.05, help="AdamW decay (weights only, not norms/biases)")
    optim.add_argument("--warmup-epochs", type=float, default=1.0, help="linear warm-up before the cosine decay")
    optim.add_argument("--label-smoothing", type=float, default=0.1)
    optim.add_argument("--freeze-epochs", type=int, default=0, help="train only the head for the first K epochs")
    optim.add_argument("--layer-decay", type=float, default=None, help="layer-wise LR decay, e.g. 0.75")
    optim.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0: off)")
    optim.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0: off)")
    optim.add_argument("--ema", action=argparse.BooleanOptionalAction, default=False,
                       help="keep an exponential moving average of the weights; validate and export it")
    optim.add_argument("--ema-decay", type=float, default=0.999)
    optim.add_argument("--patience", type=int, default=None, help="stop after N epochs without val_acc improving")
    optim.add_argument("--accumulate", type=int, default=1, help="gradient accumulation steps")
    optim.add_argument("--seed", type=int, default=42)

    hardware = parser.add_argument_group("hardware (Lightning Trainer)")
    hardware.add_argument("--precision", default="32", choices=["32", "16-mixed", "bf16-mixed"])
    hardware.add_argument("--accelerator", default="auto", help="auto, cpu, gpu, mps, ...")
    hardware.add_argument("--devices", default="auto", help="number of devices or auto")
    hardware.add_argument("--strategy", default="auto", help="auto, ddp, ...")
    hardware.add_argument("--num-nodes", type=int, default=1)

    output = parser.add_argument_group("output")
    output.add_argument("--output", type=Path, default=None, help="export folder (default: runs/<data name>-<model>)")
    output.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                        help="continue the interrupted run in --output from checkpoints/last.ckpt")
    output.add_argument("--overwrite", action=argparse.BooleanOptionalAction, default=False,
                        help="discard the checkpoints of an earlier run in --output")
    output.add_argument("--save-every-steps", type=int, default=100,
                        help="also write checkpoints/last.ckpt every N optimizer steps (for --resume)")
    output.add_argument("--license", default="apache-2.0", help="license in the model card")
    output.add_argument("--push-to-hub", metavar="USER/REPO", default=None, help="upload the export to this Hub repo")
    output.add_argument("--private", action=argparse.BooleanOptionalAction, default=False,
                        help="create the Hub repo as private")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``van-finetune``: train, export, print the metrics; one-line errors exit with 2."""
    args = build_parser().parse_args(argv)
    try:
        return finetune(args, sys.argv[1:] if argv is None else argv)
    except (*USER_ERRORS, UsageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _configure_output() -> None:
    """Warnings as ``warning: ...`` lines; silence Lightning's hints that do not apply to small data sets."""
    logging.basicConfig(format="warning: %(message)s", level=logging.WARNING)  # no-op when logging is configured
    for hint in (".*does not have many workers.*", ".*smaller than the logging interval.*",
                 ".*Checkpoint directory .* exists and is not empty.*", ".*exists and is not empty.*",
                 ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*", ".*your dataloader is not resumable.*"):
        warnings.filterwarnings("ignore", hint)


def finetune(args: argparse.Namespace, argv: list[str]) -> int:
    """The whole run: data, model, Trainer, export, push."""
    import lightning as L
    import torch
    from lightning.pytorch.utilities import rank_zero_only

    from .data import VanDataModule
    from .hub import require_token
    from .module import TrainConfig, VanClassifier, create_classifier

    started = time.perf_counter()
    _configure_output()
    # Denormal floats (tiny activations and gradients) slow CPU training several-fold; flush them to zero.
    torch.set_flush_denormal(True)
    main_process = rank_zero_only.rank == 0
    out = args.output or Path("runs") / f"{args.data.expanduser().resolve().name}-{args.model}"
    checkpoints = out / "checkpoints"
    last = checkpoints / "last.ckpt"
    if args.push_to_hub:
        require_token()
    if args.resume and not last.is_file():
        raise UsageError(f"--resume: no {last} to continue from")
    if not args.resume and last.is_file() and not args.overwrite:
        raise UsageError(f"{out} already holds a run: pass --resume to continue it, --overwrite to start over, "
                         f"or another --output")
    if args.overwrite and not args.resume and main_process and checkpoints.exists():
        shutil.rmtree(checkpoints)
    L.seed_everything(args.seed, workers=True, verbose=False)

    dm = VanDataModule(
        args.data, img_size=args.img_size, batch_size=args.batch_size, workers=args.workers, val_split=args.val_split,
        seed=args.seed, balance=args.balance, auto_augment=None if args.auto_augment == "none" else args.auto_augment,
        crop_scale=(args.crop_scale, 1.0),
        progress=main_process, bad_files_path=out / "bad_files.txt" if main_process else None,
    )
    if main_process:
        print(dm.summary_table())
    base = create_classifier(args.model, args.pretrained, dm.num_classes, args.drop_path, args.layer_scale_init)
    if base.note and main_process:
        print(f"warning: {base.note}", file=sys.stderr)
    for key in ("mean", "std", "interpolation", "crop_pct"):
        setattr(dm, key, base.model.pretrained_cfg[key])
    if args.crop_pct is not None:
        if not 0.0 < args.crop_pct <= 1.0:
            raise UsageError(f"--crop-pct must be in (0, 1], got {args.crop_pct}")
        dm.crop_pct = args.crop_pct
    config = TrainConfig(lr=5e-4 if args.lr == "auto" else args.lr, weight_decay=args.weight_decay,
                         warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing,
                         layer_decay=args.layer_decay, mixup=args.mixup, cutmix=args.cutmix)
    module = VanClassifier(base.model, dm.classes, vars(config))
    trainer, best = _trainer(args, out, len(dm.train_samples))

    if args.lr == "auto" and not args.resume:
        _find_lr(trainer, module, dm)
    trainer.fit(module, datamodule=dm, ckpt_path=last if args.resume else None)
    if not trainer.is_global_zero:
        return 0
    return _export_and_report(args, argv, out, module, dm, best.best_model_path or str(last), base,
                              time.perf_counter() - started)


def _trainer(args: argparse.Namespace, out: Path, train_images: int) -> tuple[Any, Any]:
    """The Lightning Trainer with our callbacks and loggers, and its best-checkpoint callback."""
    import lightning as L
    from lightning.pytorch.callbacks import EarlyStopping, EMAWeightAveraging, ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    from .module import FreezeBackbone, ThroughputBar

    checkpoints = out / "checkpoints"
    # Both write last.ckpt: one after each validation, the other every N steps so a killed run can resume mid-epoch.
    best = ModelCheckpoint(dirpath=checkpoints, filename="best", monitor="val_acc", mode="max", save_top_k=1,
                           save_last=True, enable_version_counter=False)
    last = ModelCheckpoint(dirpath=checkpoints, save_top_k=0, save_last=True, every_n_train_steps=args.save_every_steps,
                           enable_version_counter=False)
    callbacks = [best, last, ThroughputBar()]
    if args.freeze_epochs:
        callbacks.append(FreezeBackbone(args.freeze_epochs))
    if args.patience:
        callbacks.append(EarlyStopping(monitor="val_acc", mode="max", patience=args.patience))
    if args.ema:
        callbacks.append(EMAWeightAveraging(decay=args.ema_decay))
    loggers = [CSVLogger(out, name="logs", version="")]
    if _tensorboard_installed():
        loggers.append(TensorBoardLogger(out, name="logs", version="", default_hp_metric=False))
    steps_per_epoch = max(1, train_images // args.batch_size)
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=args.strategy,
        num_nodes=args.num_nodes,
        precision=args.precision,
        accumulate_grad_batches=args.accumulate,
        callbacks=callbacks,
        logger=loggers,
        default_root_dir=out,
        log_every_n_steps=min(50, steps_per_epoch),
        num_sanity_val_steps=0,
        enable_model_summary=False,
    )
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


def _export_and_report(args: argparse.Namespace, argv: list[str], out: Path, module: Any, dm: Any, best_path: str,
                       base: Any, wall_time: float) -> int:
    """Export the best checkpoint's weights and metrics, print them, push when asked."""
    import torch

    from .export import RunInfo, summary_table, write_export
    from .files import BAD_FILES
    from .hub import push_export
    from .module import model_state
    from .weights import build_model, infer_spec

    checkpoint = torch.load(best_path, map_location="cpu", weights_only=True)
    state = model_state(checkpoint)
    model = build_model(infer_spec(state)[0], dm.num_classes)
    model.load_state_dict(state)
    report = checkpoint.get("van_app", {}).get("val_report") or module.val_report
    extra = {"best_epoch": report.get("epoch"), "best_step": report.get("step"), "epochs": module.current_epoch,
             "images_seen": module.images_seen, "wall_time_s": round(module.wall_time_s(), 2)}
    training_args = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    run = RunInfo(data_name=dm.data_dir.name, data_summary=dm.summary(), command=shlex.join(["van-finetune", *argv]),
                  training_args=dict(training_args, lr=module.lr), license=args.license, base_model=base.base_model,
                  local_start=base.local_start)
    data_config = dict(dm.data_config(), input_size=(3, args.img_size, args.img_size))
    metrics = write_export(out, model, dm.classes, data_config, report, extra, run, model_name=args.push_to_hub)
    dm.write_bad_files(out / BAD_FILES)
    print(summary_table(metrics, dm.classes))
    print(f"exported to {out} ({wall_time:.0f} s)")
    if args.push_to_hub:
        try:
            url = push_export(out, args.push_to_hub, private=args.private)
        except HubError as e:
            raise HubError(f"{e}; the export in {out} is intact: retry with `van-push {out} {args.push_to_hub}`") from e
        print(f"pushed to {url}")
    return 0


def build_push_parser() -> argparse.ArgumentParser:
    """The ``van-push`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="van-push",
        description="Upload a van-finetune export folder to a Hugging Face Hub model repo (one commit, no .ckpt).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("folder", type=Path, help="export folder written by van-finetune")
    parser.add_argument("repo_id", metavar="USER/REPO", help="Hub model repo (created if missing)")
    parser.add_argument("--private", action=argparse.BooleanOptionalAction, default=False,
                        help="create the repo as private")
    return parser


def push_main(argv: list[str] | None = None) -> int:
    """``van-push DIR USER/REPO``: one-line errors exit with 2."""
    from .hub import push_export

    args = build_push_parser().parse_args(argv)
    try:
        url = push_export(args.folder, args.repo_id, private=args.private)
    except HubError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"pushed {args.folder} to {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
