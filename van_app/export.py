"""A trained classifier as a Hub-ready folder: safetensors weights, timm-style config, metrics, plots, model card.

Every file is written atomically (a temporary file in the same folder, then
``os.replace``), so an interrupted export never leaves a half-written file
behind. ``van_app.load_model(folder)`` and, after ``import van_app``,
``timm.create_model("local-dir:FOLDER", pretrained=True)`` both rebuild the
model with its labels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from safetensors.torch import save_file

from . import __version__
from .model import VAN
from .files import (CARD, CONFUSION_JSON, CONFUSION_PNG, EXPORT_CONFIG, EXPORT_WEIGHTS, METRICS, atomic_path,
                    write_json)
from .weights import infer_spec, model_args


@dataclass
class RunInfo:
    """What the model card and config say about how the model was made."""

    data_name: str
    data_summary: dict[str, Any]
    training_args: dict[str, Any]
    command: str
    license: str = "apache-2.0"
    base_model: str | None = None
    local_start: str | None = None  # a local file or folder the training started from


def export_config(model: VAN, labels: list[str], data_config: dict[str, Any], run: RunInfo) -> dict[str, Any]:
    """config.json: timm's Hub layout (architecture, model_args, pretrained_cfg, label_names) plus our keys."""
    spec = infer_spec(model.state_dict())[0]
    size = int(data_config["input_size"][-1])
    mean, std = list(data_config["mean"]), list(data_config["std"])
    return {
        "architecture": model.variant if model.variant != "custom" else "van_micro",
        "model_args": {k: list(v) for k, v in model_args(spec).items()},
        "num_classes": len(labels),
        "num_features": model.num_features,
        "label_names": list(labels),
        "pretrained_cfg": {
            "input_size": [3, size, size],
            "interpolation": data_config["interpolation"],
            "mean": mean,
            "std": std,
            "crop_pct": data_config["crop_pct"],
            "crop_mode": "center",
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


def model_card(config: dict[str, Any], metrics: dict[str, Any], run: RunInfo, model_name: str) -> ModelCard:
    """The README.md model card: Hub metadata (with model-index) and a human-readable body."""
    labels = config["label_names"]
    dataset = run.data_name
    results = [EvalResult(task_type="image-classification", dataset_type="imagefolder", dataset_name=dataset,
                          dataset_split="validation", metric_type="accuracy", metric_name="Validation accuracy",
                          metric_value=round(metrics["val_acc"], 4))]
    if "val_f1" in metrics:
        results.append(EvalResult(task_type="image-classification", dataset_type="imagefolder", dataset_name=dataset,
                                  dataset_split="validation", metric_type="f1", metric_name="Validation macro F1",
                                  metric_value=round(metrics["val_f1"], 4)))
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
    rows = "\n".join(f"| {i} | {label} | {counts.get(label, {}).get('train', '')} | "
                     f"{counts.get(label, {}).get('val', '')} | {metrics.get(f'val_precision_{label}', 0):.3f} | "
                     f"{metrics.get(f'val_recall_{label}', 0):.3f} | {metrics.get(f'val_f1_{label}', 0):.3f} |"
                     for i, label in enumerate(labels))
    if run.base_model:
        start = f"fine-tuned from [{run.base_model}](https://huggingface.co/{run.base_model})"
    elif run.local_start:
        start = f"fine-tuned from the local weights `{run.local_start}`"
    else:
        start = "trained from random initialisation"
    body = f"""
# {model_name}

A Visual Attention Network ({config['variant']}) image classifier for {len(labels)} classes, {start}
with [VAN Studio](https://arxiv.org/abs/2202.09741) (`van_app` {config['version']}) on the image folder
`{dataset}`. Input: {config['image_size']}x{config['image_size']} RGB, {config['interpolation']} resize,
centre crop {config['crop_pct']}, mean {config['mean']}, std {config['std']}.

## Results (validation split)

| metric | value |
|---|---|
| accuracy | {metrics['val_acc']:.4f} |
| macro F1 | {metrics.get('val_f1', float('nan')):.4f} |
| loss | {metrics['val_loss']:.4f} |
| epochs | {metrics.get('epochs', '')} |
| images seen | {metrics.get('images_seen', '')} |

## Labels

| id | label | train images | val images | precision | recall | F1 |
|---|---|---|---|---|---|---|
{rows}

## Data

Layout `{run.data_summary.get('layout', '')}`; images per split: {json.dumps(run.data_summary.get('counts', {}))};
{run.data_summary.get('bad_files', 0)} unreadable files skipped (listed in `bad_files.txt`),
{run.data_summary.get('duplicates', 0)} validation images identical to training images.

## How to use

```python
import van_app
from PIL import Image

model = van_app.load_model("{model_name}")  # this folder, or its Hub repo id
print(van_app.predict(model, Image.open("photo.jpg")))
```

With timm (after `import van_app`, which registers the VAN architectures):
`timm.create_model("hf-hub:{model_name}", pretrained=True)` or `"local-dir:PATH"` for a local copy.

Open it in the VAN Studio app: `python app.py --model {model_name}`

## Reproduce

```bash
{run.command}
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
    model_name: str | None = None,
) -> dict[str, Any]:
    """Write the export files (all but bad_files.txt, the data module's) into ``out``; returns metrics.json's dict."""
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_path(out / EXPORT_WEIGHTS) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    config = export_config(model, labels, data_config, run)
    write_json(out / EXPORT_CONFIG, config)
    metrics = flat_metrics(report, extra_metrics)
    write_json(out / METRICS, metrics)
    confusion = report.get("confusion_matrix") or [[0] * len(labels) for _ in labels]
    write_json(out / CONFUSION_JSON, {"labels": list(labels), "rows": "true", "columns": "predicted",
                                      "matrix": confusion})
    plot_confusion(out / CONFUSION_PNG, confusion, labels)
    card = model_card(config, metrics, run, model_name or out.name)
    with atomic_path(out / CARD) as tmp:
        card.save(tmp)
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

