"""A trained classifier as a Hub-ready folder: safetensors weights, timm-style config, metrics, plots, model card.

The export is written whole into a temporary folder beside its destination and
swapped into place (``files.atomic_dir``): a reader, ``van-push`` or the app sees
the previous export or the new one, never a mix, and a failed or killed export
leaves the previous one as it was. config.json records how the model was made
(data folder name, class counts, options, starting weights; never an absolute
path) and lists the export's files, so the model card can be written again for
another name (``van-push``) and an incomplete folder is recognised.
``van_app.load_model(folder)`` and, after ``import van_app``,
``timm.create_model("local-dir:FOLDER", pretrained=True)`` both rebuild the model
with its labels.
"""

from __future__ import annotations

import html
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from safetensors.torch import save

from . import __version__
from .files import (BAD_FILES, CARD, CONFUSION_JSON, CONFUSION_PNG, EXPORT_CONFIG, EXPORT_FILES, EXPORT_WEIGHTS,
                    METRICS, atomic_dir, atomic_path, write_json, write_text)
from .model import VAN
from .variants import ARCHITECTURE_ARGS


@dataclass
class RunInfo:
    """How the model was made, as config.json records it and the model card tells it (no absolute paths)."""

    data_name: str
    data_summary: dict[str, Any]
    training_args: dict[str, Any]
    command: str
    license: str = "apache-2.0"
    base_model: str | None = None  # the Hub repo whose weights training started from (linked in the card)
    local_start: str | None = None  # the name of the local file or folder training started from
    note: str | None = None  # what happened to the starting weights, e.g. official weights not available offline
    recipe: str | None = None  # the from-scratch recipe the run switched to, when it started from random weights

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> RunInfo | None:
        """The run recorded in an export's config.json (``None`` for exports written before it was recorded)."""
        record = config.get("training")
        if not isinstance(record, dict):
            return None
        names = {f.name for f in fields(cls)}
        kept = {k: v for k, v in record.items() if k in names and k != "training_args"}
        return cls(**kept, training_args=config.get("training_args", {}))


def export_config(model: VAN, labels: list[str], data_config: dict[str, Any], run: RunInfo) -> dict[str, Any]:
    """config.json: timm's Hub layout (architecture, model_args, pretrained_cfg, label_names) plus our keys."""
    size = int(data_config["input_size"][-1])
    mean, std = list(data_config["mean"]), list(data_config["std"])
    return {
        "architecture": model.pretrained_cfg["architecture"],
        "model_args": {k: list(model.model_args[k]) for k in ARCHITECTURE_ARGS},
        "num_classes": len(labels),
        "num_features": model.num_features,
        "label_names": list(labels),
        "pretrained_cfg": {
            "input_size": [3, size, size],
            "interpolation": data_config["interpolation"],
            "mean": mean,
            "std": std,
            "crop_pct": data_config["crop_pct"],
            "crop_mode": data_config.get("crop_mode", "center"),
            "num_classes": len(labels),
            "classifier": "head",
            "first_conv": "stages.0.patch_embed.proj",
            "license": run.license,
        },
        "variant": model.variant,
        "image_size": size,
        "mean": mean,
        "std": std,
        "interpolation": data_config["interpolation"],
        "crop_pct": data_config["crop_pct"],
        "id2label": {str(i): label for i, label in enumerate(labels)},
        "label2id": {label: i for i, label in enumerate(labels)},
        "version": __version__,
        "training_args": run.training_args,
        "training": {k: v for k, v in asdict(run).items() if k != "training_args"},
    }


def flat_metrics(report: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """metrics.json: the validation report's scalars (no confusion matrix) and the run's counters."""
    scalars = {k: v for k, v in report.items() if k.startswith("val_")}
    return {**scalars, **extra}


def plot_confusion(path: Path, confusion: list[list[int]], labels: list[str]) -> None:
    """Atomically save the confusion matrix (rows: true class, columns: predicted) as a PNG."""
    from matplotlib.figure import Figure

    n = len(labels)
    side = min(4 + 0.45 * n, 24)
    fig = Figure(figsize=(side, side * 0.9), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(confusion, cmap="Blues")
    fig.colorbar(image, ax=ax, shrink=0.8)
    ax.set(xticks=range(n), yticks=range(n), xlabel="predicted", ylabel="true", title="Validation confusion matrix")
    ax.set_xticklabels(labels, rotation=45, ha="right")
    ax.set_yticklabels(labels)
    if n <= 30:
        top = max((max(row) for row in confusion), default=0) or 1
        for i, row in enumerate(confusion):
            for j, count in enumerate(row):
                ax.text(j, i, str(count), ha="center", va="center", color="white" if count > top / 2 else "black")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def _cell(text: Any) -> str:
    """``text`` safe inside a Markdown table cell: one line, pipes and HTML escaped."""
    return html.escape(" ".join(str(text).split())).replace("|", "\\|")


def _code(text: Any) -> str:
    """``text`` as inline code that no backtick, newline or HTML in it can break out of."""
    return f"<code>{html.escape(' '.join(str(text).split()))}</code>"


def _start_text(run: RunInfo) -> str:
    """Where the weights started, as the card says it: linked only for a Hub repo they really came from."""
    if run.base_model:
        return f"fine-tuned from [{_cell(run.base_model)}](https://huggingface.co/{run.base_model})"
    if run.local_start:
        return f"fine-tuned from the local weights {_code(run.local_start)}"
    return "trained from random initialisation" + (f" ({_cell(run.note)})" if run.note else "")


def model_card(config: dict[str, Any], metrics: dict[str, Any], model_name: str) -> ModelCard:
    """The README.md model card from an export's config.json and metrics.json: Hub metadata and a readable body."""
    run = RunInfo.from_config(config) or RunInfo(data_name="unknown", data_summary={}, training_args={}, command="")
    labels = config["label_names"]
    dataset = run.data_name
    results = [EvalResult(task_type="image-classification", dataset_type="imagefolder", dataset_name=dataset,
                          dataset_split="validation", metric_type="accuracy", metric_name="Validation accuracy",
                          metric_value=round(metrics["val_acc"], 4))]
    if "val_f1" in metrics:
        results.append(EvalResult(task_type="image-classification", dataset_type="imagefolder", dataset_name=dataset,
                                  dataset_split="validation", metric_type="f1", metric_name="Validation macro F1",
                                  metric_value=round(metrics["val_f1"], 4)))
    if "test_acc" in metrics:
        results.append(EvalResult(task_type="image-classification", dataset_type="imagefolder", dataset_name=dataset,
                                  dataset_split="test", metric_type="accuracy", metric_name="Test accuracy",
                                  metric_value=round(metrics["test_acc"], 4)))
    data = ModelCardData(
        model_name=model_name,
        library_name="timm",
        pipeline_tag="image-classification",
        license=run.license,
        tags=["image-classification", "timm", "van", "visual-attention-network", "van_app"],
        base_model=run.base_model,
        eval_results=results,
    )
    counts = run.data_summary.get("per_class", {})
    rows = "\n".join(f"| {i} | {_cell(label)} | {counts.get(label, {}).get('train', '')} | "
                     f"{counts.get(label, {}).get('val', '')} | {metrics.get(f'val_precision_{label}', 0):.3f} | "
                     f"{metrics.get(f'val_recall_{label}', 0):.3f} | {metrics.get(f'val_f1_{label}', 0):.3f} |"
                     for i, label in enumerate(labels))
    best, epochs = metrics.get("best_epoch"), metrics.get("epochs", "")
    weights_from = f"epoch {best + 1} of {epochs} (best validation accuracy)" if isinstance(best, int) else ""
    name = json.dumps(model_name)  # a Python/JSON string literal, safe inside the code blocks below
    test_row = (f"| test accuracy (held-out DATA/test) | {metrics['test_acc']:.4f} |\n"
                if "test_acc" in metrics else "")
    body = f"""
# {_cell(model_name)}

A Visual Attention Network ({_cell(config['variant'])}) image classifier for {len(labels)} classes,
{_start_text(run)}, with VAN Studio (`van_app` {config['version']}; VAN: [arXiv 2202.09741](https://arxiv.org/abs/2202.09741))
on the image folder {_code(dataset)}. Input: {config['image_size']}x{config['image_size']} RGB,
{_cell(config['interpolation'])} resize, {_cell(config['pretrained_cfg'].get('crop_mode', 'center'))} crop
{config['crop_pct']}, mean {config['mean']}, std {config['std']}.

## Results (validation split)

| metric | value |
|---|---|
| accuracy | {metrics['val_acc']:.4f} |
| macro F1 | {metrics.get('val_f1', float('nan')):.4f} |
| loss | {metrics['val_loss']:.4f} |
{test_row}| exported weights | {weights_from} |
| epochs trained | {epochs} |
| images seen | {metrics.get('images_seen', '')} |

## Labels

| id | label | train images | val images | precision | recall | F1 |
|---|---|---|---|---|---|---|
{rows}

## Data

Layout `{_cell(run.data_summary.get('layout', ''))}`; images per split:
{_cell(json.dumps(run.data_summary.get('counts', {})))}; {run.data_summary.get('bad_files', 0)} unreadable files
skipped (listed in `bad_files.txt`), {run.data_summary.get('duplicates', 0)} validation images identical to
training images.

## How to use

```python
import van_app
from PIL import Image

model = van_app.load_model({name})  # this folder, or its Hub repo id
print(van_app.predict(model, Image.open("photo.jpg")))
```

With timm (after `import van_app`, which registers the VAN architectures):
`timm.create_model({json.dumps("hf-hub:" + model_name)}, pretrained=True)` or `"local-dir:PATH"` for a local copy.

Open it in the VAN Studio app: `python app.py --model {_cell(model_name)}`

## Training
{_cell(run.recipe) if run.recipe else "The options below; unset options kept their defaults."}

## Reproduce

```bash
{run.command.replace("`", "'")}
```
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def write_export(
    out: Path,
    model: VAN,
    labels: list[str],
    data_config: dict[str, Any],
    report: dict[str, Any],
    extra_metrics: dict[str, Any],
    run: RunInfo,
    *,
    bad_files: str = "",
    model_name: str | None = None,
) -> dict[str, Any]:
    """Write the whole export into a new folder and swap it in for ``out``; returns metrics.json's dict."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    config = dict(export_config(model, labels, data_config, run), files=list(EXPORT_FILES))  # what load_model expects
    metrics = flat_metrics(report, extra_metrics)
    confusion = report.get("confusion_matrix") or [[0] * len(labels) for _ in labels]
    weights = save(state, metadata={"format": "pt"})  # bytes: a full disk then fails as an OSError, not inside Rust
    try:
        with atomic_dir(out) as folder:
            (folder / EXPORT_WEIGHTS).write_bytes(weights)
            write_json(folder / EXPORT_CONFIG, config)
            write_json(folder / METRICS, metrics)
            write_json(folder / CONFUSION_JSON, {"labels": list(labels), "rows": "true", "columns": "predicted",
                                                 "matrix": confusion})
            plot_confusion(folder / CONFUSION_PNG, confusion, labels)
            write_text(folder / BAD_FILES, bad_files or "# no bad image files\n")
            model_card(config, metrics, model_name or out.name).save(folder / CARD)
    except OSError as e:  # name the export, not the temporary folder; the previous export is untouched
        raise OSError(e.errno, e.strerror, str(out)) from e
    return metrics


def summary_table(metrics: dict[str, Any], labels: list[str]) -> str:
    """A printable table of the final validation metrics, overall and per class."""
    width = max(len("class"), *(len(label) for label in labels))
    lines = [f"{'class':<{width}}  precision  recall      f1"]
    for label in labels:
        p, r, f = (metrics.get(f"val_{m}_{label}", float("nan")) for m in ("precision", "recall", "f1"))
        lines.append(f"{label:<{width}}  {p:9.3f}  {r:6.3f}  {f:6.3f}")
    overall = ", ".join(f"{k} {metrics[k]:.4f}" for k in ("val_acc", "val_top5", "val_f1", "val_loss") if k in metrics)
    lines.append(overall)
    return "\n".join(lines)

