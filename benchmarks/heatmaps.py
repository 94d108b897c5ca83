"""Do the heatmaps find the object? VAN Studio's LKA maps against Grad-CAM and naive baselines.

On ``van-synth`` images (seeds never used in training) with exact object masks,
every heatmap the app offers -- the class-agnostic stage maps (squared departure
of ``attn`` from each channel's spatial mean) and their combination, the
class-conditioned (true class) stage maps and their combination -- plus other
reductions of ``attn`` over channels per stage and combined (``VARIANTS``: the
plain channel mean, its negation, mean |attn|, mean absolute departure),
Grad-CAM (``grad-cam`` package, unfused model, last stage-4 block, true
class), a centre Gaussian, a uniform and a random map are scored with
``van_app.localization``: tie-aware pointing game, mass in mask and its lift,
RISE deletion / insertion AUC (blurred-image baseline; for the app's maps, the
selected variant and the baselines). All maps are scored as
the app draws them: ``explain.render`` puts them on the original image through
the model's eval transform (outside the centre crop they are 0).

1. Held-out top-1 accuracy of the model (app preprocessing) on ``--acc-n`` images.
2. Validation seed: pick the best LKA variant by mean(pointing game, mass in mask).
3. Test seed: every method, mean with 95% bootstrap interval, paired comparison
   of each LKA map with Grad-CAM, per-image CSV.
4. Sanity check (Adebayo et al., 2018): re-initialise the head, then stage 4, 3,
   2, 1 (cascading from the top); Spearman rank correlation of each map with the
   trained model's map (1.0 = unchanged).

    python benchmarks/heatmaps.py --model checkpoints/van-b0-shapes --out runs/heatmaps
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from van_app import VAN, load_model, preprocess
from van_app.explain import Geometry, Heatmap, MapKind, class_maps, input_geometry, normalise, render, stage_maps
from van_app.localization import (
    area_share,
    bootstrap_ci,
    deletion_insertion,
    mass_in_mask,
    paired_comparison,
    pointing_game,
    rank_correlation,
)
from van_app.model import capture_attention
from van_app.predict import data_config
from van_app.synthetic import SHAPES, Sample, generate

BASELINES = ("Grad-CAM", "centre Gaussian", "uniform", "random")
APP_KINDS = tuple(f"stage {s}" for s in range(1, 5)) + ("combined",) + tuple(
    f"class stage {s}" for s in range(1, 5)) + ("class combined",)
# Other class-agnostic reductions of one block's attn (C, h, w) over its channels, candidates for selection.
VARIANTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "mean": lambda attn: attn.mean(0),
    "-mean": lambda attn: -attn.mean(0),
    "|attn|": lambda attn: attn.abs().mean(0),
    "|departure|": lambda attn: (attn - attn.mean((1, 2), keepdim=True)).abs().mean(0),
}


@dataclass
class Config:
    """What the benchmark measures and where it writes."""

    model: str
    out: Path
    test_seed: int = 3
    val_seed: int = 2
    acc_seed: int = 1
    n: int = 600
    val_n: int = 150
    acc_n: int = 3000
    di_n: int = 150
    steps: int = 8
    sanity_n: int = 48
    boot: int = 2000
    batch: int = 64
    seed: int = 0


@dataclass
class Scores:
    """Per-image metric values of one method."""

    pointing: list[float] = field(default_factory=list)
    mass: list[float] = field(default_factory=list)
    lift: list[float] = field(default_factory=list)
    deletion: list[float] = field(default_factory=list)
    insertion: list[float] = field(default_factory=list)


def samples(seed: int, n: int, size: int) -> list[Sample]:
    """``n`` generated images, classes in turn (balanced), from ``seed``."""
    return [generate(SHAPES[i % len(SHAPES)], i // len(SHAPES), size, seed) for i in range(n)]


def chunks(items: list, size: int) -> Iterator[tuple[int, list]]:
    """``(start, items[start:start + size])`` over ``items``."""
    for start in range(0, len(items), size):
        yield start, items[start : start + size]


def label_of(model: torch.nn.Module, sample: Sample) -> int:
    """The model's class index of the sample's shape."""
    return model.labels.index(sample.shape)


def accuracy(model: torch.nn.Module, data: list[Sample], batch: int) -> float:
    """Top-1 accuracy through the app's preprocessing."""
    correct = 0
    for _, part in chunks(data, batch):
        x = torch.cat([preprocess(model, Image.fromarray(s.image)) for s in part])
        with torch.inference_mode():
            pred = model(x).argmax(-1).tolist()
        correct += sum(p == label_of(model, s) for p, s in zip(pred, part))
    return correct / len(data)


def method_name(heatmap: Heatmap, reduction: str = "") -> str:
    """A map's row in the tables ("stage 2", "class combined"; "mean stage 2" for the ``reduction`` variant)."""
    where = "combined" if heatmap.kind is MapKind.COMBINED else f"stage {heatmap.stage + 1}"
    prefix = reduction or ("class" if heatmap.target is not None else "")
    return f"{prefix} {where}".strip()


def shown(heatmap: Heatmap, geometry: Geometry) -> np.ndarray:
    """The map as the app draws it on the original image, (H, W) in [0, 1]."""
    return render(heatmap, geometry)[0]


def lka_maps(model: torch.nn.Module, data: list[Sample], batch: int) -> dict[str, list[np.ndarray]]:
    """Every LKA map variant of every image, drawn on the original image."""
    strides = [info["reduction"] for info in model.feature_info]
    maps: dict[str, list[np.ndarray]] = {}
    for _, part in chunks(data, batch):
        images = [Image.fromarray(s.image) for s in part]
        x = torch.cat([preprocess(model, im) for im in images])
        with torch.inference_mode(), capture_attention(model, detach=True) as captured:
            model(x)
        for i, (image, sample) in enumerate(zip(images, part)):
            geometry = input_geometry(model, image.size)
            own = {key: attn[i : i + 1] for key, attn in captured.items()}
            app_maps = stage_maps(own, strides) + class_maps(model, image, label_of(model, sample))
            found = {method_name(m): m for m in app_maps}
            for name, reduce in VARIANTS.items():
                found.update({method_name(m, name): m for m in stage_maps(own, strides, reduce)})
            for name, heatmap in found.items():
                maps.setdefault(name, []).append(shown(heatmap, geometry))
    return maps


def gradcam_maps(model: torch.nn.Module, data: list[Sample], batch: int) -> list[np.ndarray]:
    """Grad-CAM (pytorch_grad_cam) on the last stage-4 block for the true class, drawn on the original image."""
    maps = []
    stage, block = len(model.stages) - 1, len(model.stages[-1].blocks) - 1
    with GradCAM(model=model, target_layers=[model.stages[stage].blocks[block]]) as cam:
        for _, part in chunks(data, batch):
            images = [Image.fromarray(s.image) for s in part]
            x = torch.cat([preprocess(model, im) for im in images])
            out = cam(input_tensor=x, targets=[ClassifierOutputTarget(label_of(model, s)) for s in part])
            for image, sample, m in zip(images, part, out):
                display, constant = normalise(m)
                # pytorch_grad_cam upsamples its map to the model input: stride 1
                heatmap = Heatmap(MapKind.BLOCK, m, display, 1, constant, stage, block, label_of(model, sample))
                maps.append(shown(heatmap, input_geometry(model, image.size)))
    return maps


def baseline_maps(data: list[Sample], seed: int) -> dict[str, list[np.ndarray]]:
    """Centre Gaussian (sigma a quarter of the side), uniform and seeded random maps."""
    size = data[0].mask.shape[0]
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    sigma = size / 4
    centre = np.exp(-((yy - size / 2) ** 2 + (xx - size / 2) ** 2) / (2 * sigma**2))
    rng = np.random.default_rng(seed)
    return {"centre Gaussian": [centre] * len(data), "uniform": [np.ones((size, size))] * len(data),
            "random": [rng.random((size, size)) for _ in data]}


def probability_fn(model: torch.nn.Module, geometry: Geometry) -> Callable[[torch.Tensor], torch.Tensor]:
    """Class probabilities of original-space images in [0, 1] (B, 3, H, W) through the model's eval transform."""
    cfg = data_config(model)
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    (w, h), (sx, sy) = geometry.image_size, geometry.scale
    (ox, oy), (iw, ih) = (int(round(o)) for o in geometry.offset), geometry.input_size

    def probs(batch: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(batch, size=(round(h * sy), round(w * sx)), mode="bicubic", align_corners=False)
        x = (x.clamp(0, 1)[..., oy : oy + ih, ox : ox + iw] - mean) / std
        with torch.inference_mode():
            return model(x).float().softmax(-1)

    return probs


def score(model: torch.nn.Module, data: list[Sample], maps: dict[str, list[np.ndarray]], cfg: Config,
          faithfulness: frozenset[str] = frozenset()) -> dict[str, Scores]:
    """Every localisation metric of every method; deletion / insertion for ``faithfulness`` on ``cfg.di_n`` images."""
    results = {name: Scores() for name in maps}
    geometry = input_geometry(model, (data[0].mask.shape[1], data[0].mask.shape[0]))
    probs = probability_fn(model, geometry)
    for i, sample in enumerate(data):
        image = torch.from_numpy(sample.image).permute(2, 0, 1).float() / 255
        for name, per_image in maps.items():
            m, r = per_image[i], results[name]
            r.pointing.append(pointing_game(m, sample.mask))
            r.mass.append(mass_in_mask(m, sample.mask))
            r.lift.append(r.mass[-1] / area_share(sample.mask))
            if name in faithfulness and i < cfg.di_n:
                curves = deletion_insertion(probs, image, m, label_of(model, sample), cfg.steps, seed=cfg.seed + i)
                r.deletion.append(curves.deletion_auc)
                r.insertion.append(curves.insertion_auc)
    return results


def randomised(model: torch.nn.Module, parts: list[str], seed: int) -> torch.nn.Module:
    """A copy of ``model`` whose parameters and buffers under ``parts`` (prefixes) are freshly initialised."""
    torch.manual_seed(seed)
    fresh = VAN(**model.model_args).state_dict()
    copied = copy.deepcopy(model)
    state = copied.state_dict()
    state.update({k: v for k, v in fresh.items() if any(k.startswith(p) for p in parts)})
    copied.load_state_dict(state)
    return copied.eval()


def sanity_check(model: torch.nn.Module, data: list[Sample], kinds: list[str], cfg: Config
                 ) -> list[tuple[str, dict[str, float]]]:
    """Mean Spearman correlation with the trained model's maps as the model is randomised from the top."""
    reference = {**lka_maps(model, data, cfg.batch), "Grad-CAM": gradcam_maps(model, data, cfg.batch)}
    cascade = ["head"] + [f"stages.{s}." for s in reversed(range(len(model.stages)))]
    rows = []
    for step in range(1, len(cascade) + 1):
        broken = randomised(model, cascade[:step], cfg.seed + step)
        maps = {**lka_maps(broken, data, cfg.batch), "Grad-CAM": gradcam_maps(broken, data, cfg.batch)}
        name = "head" if step == 1 else f"head + stage {len(model.stages) - step + 2}..{len(model.stages)}"
        rows.append((name, {k: float(np.nanmean([rank_correlation(a, b) for a, b in zip(reference[k], maps[k])]))
                            for k in kinds}))
    return rows


def summarise(results: dict[str, Scores], cfg: Config) -> dict[str, dict[str, list[float]]]:
    """Mean and 95% interval of each metric of each method (empty metrics skipped)."""
    table = {}
    for name, r in results.items():
        table[name] = {}
        for metric in ("pointing", "mass", "lift", "deletion", "insertion"):
            values = getattr(r, metric)
            if values:
                e = bootstrap_ci(np.array(values), cfg.boot, seed=cfg.seed)
                table[name][metric] = [e.mean, e.low, e.high]
    return table


def print_table(table: dict[str, dict[str, list[float]]], selected: str) -> None:
    """The results table, methods as rows."""
    head = f"{'method':<22}{'pointing game':>22}{'mass in mask':>22}{'lift':>8}{'deletion (low)':>22}{'insertion':>22}"
    print(head)
    print("-" * len(head))
    for name, row in table.items():
        cells = []
        for metric in ("pointing", "mass", "lift", "deletion", "insertion"):
            if metric not in row:
                cells.append(f"{'':>22}")
            elif metric == "lift":
                cells.append(f"{row[metric][0]:>8.2f}")
            else:
                mean, low, high = row[metric]
                cells.append(f"{f'{mean:.3f} [{low:.3f}, {high:.3f}]':>22}")
        print(f"{(name + (' *' if name == selected else '')):<22}{''.join(cells)}")


def paired_rows(results: dict[str, Scores], cfg: Config) -> list[dict]:
    """Each LKA map minus Grad-CAM, per metric (lower deletion is better: its sign is flipped)."""
    rows = []
    for name, r in results.items():
        if name in BASELINES:
            continue
        for metric in ("pointing", "mass", "deletion", "insertion"):
            a, b = getattr(r, metric), getattr(results["Grad-CAM"], metric)
            if not a:
                continue
            sign = -1.0 if metric == "deletion" else 1.0
            p = paired_comparison(sign * np.array(a), sign * np.array(b), cfg.boot, cfg.seed)
            rows.append(dict(method=name, metric=metric, better_by=p.difference.mean, low=p.difference.low,
                             high=p.difference.high, p=p.p_value, wins=p.wins, losses=p.losses, ties=p.ties))
    return rows


def write_csv(path: Path, data: list[Sample], results: dict[str, Scores], seed: int) -> None:
    """One row per (image, method) with every metric (deletion / insertion empty where not measured)."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["seed", "index", "class", "area_share", "method", "pointing", "mass_in_mask", "lift",
                         "deletion_auc", "insertion_auc"])
        for name, r in results.items():
            for i, sample in enumerate(data):
                extra = [r.deletion[i], r.insertion[i]] if i < len(r.deletion) else ["", ""]
                writer.writerow([seed, i // len(SHAPES), sample.shape, area_share(sample.mask), name,
                                 r.pointing[i], r.mass[i], r.lift[i], *extra])


def plot(path: Path, table: dict[str, dict[str, list[float]]], sanity: list[tuple[str, dict[str, float]]],
         selected: str) -> None:
    """Bars with 95% intervals per metric and the sanity-check correlations."""
    metrics = [("pointing", "pointing game (higher better)"), ("mass", "mass in mask (higher better)"),
               ("deletion", "deletion AUC (lower better)"), ("insertion", "insertion AUC (higher better)")]
    fig, axes = plt.subplots(1, 5, figsize=(26, 7))
    for ax, (metric, title) in zip(axes, metrics):
        names = [n for n in table if metric in table[n]]
        mean = np.array([table[n][metric][0] for n in names])
        err = np.array([[table[n][metric][0] - table[n][metric][1], table[n][metric][2] - table[n][metric][0]]
                        for n in names]).T
        colours = ["tab:red" if n == selected else "tab:gray" if n in BASELINES else "tab:blue" for n in names]
        ax.barh(names, mean, xerr=err, color=colours)
        ax.invert_yaxis()
        ax.set_title(title)
    ax = axes[-1]
    for kind in sanity[0][1]:
        ax.plot([name for name, _ in sanity], [row[kind] for _, row in sanity], marker="o", label=kind)
    ax.set_title("sanity check: Spearman with trained maps")
    ax.tick_params(axis="x", rotation=45)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse_args() -> Config:
    """The benchmark's command line."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="checkpoints/van-b0-shapes",
                   help="van_app export folder (or any load_model source)")
    p.add_argument("--out", type=Path, default=Path("runs/heatmaps"), help="folder for the CSVs, JSON and plot")
    helps = {"test_seed": "van-synth seed of the test images",
             "val_seed": "van-synth seed of the images that pick the LKA variant",
             "acc_seed": "van-synth seed of the accuracy images", "n": "test images", "val_n": "validation images",
             "acc_n": "accuracy images", "di_n": "test images with deletion/insertion",
             "steps": "deletion/insertion steps", "sanity_n": "sanity-check images", "boot": "bootstrap resamples",
             "batch": "batch size", "seed": "seed of tie-breaking, random maps, re-initialisation, bootstrap"}
    for f in fields(Config)[2:]:
        p.add_argument(f"--{f.name.replace('_', '-')}", type=int, default=f.default, help=helps[f.name])
    return Config(**vars(p.parse_args()))


def main() -> None:
    """Run the whole benchmark and write ``heatmaps.csv``, ``validation.csv``, ``summary.json``, ``heatmaps.png``."""
    cfg = parse_args()
    started = time.perf_counter()
    cfg.out.mkdir(parents=True, exist_ok=True)
    model = load_model(cfg.model)
    size = data_config(model)["input_size"][-1]
    summary: dict = {"config": {k: str(v) for k, v in vars(cfg).items()}, "image_size": size}

    held_out = samples(cfg.acc_seed, cfg.acc_n, size)
    summary["accuracy"] = accuracy(model, held_out, cfg.batch)
    print(f"held-out top-1 (seed {cfg.acc_seed}, {cfg.acc_n} images, {size} px): {summary['accuracy']:.4f}")

    val = samples(cfg.val_seed, cfg.val_n, size)
    val_maps = lka_maps(model, val, cfg.batch)
    val_results = score(model, val, val_maps, cfg)
    write_csv(cfg.out / "validation.csv", val, val_results, cfg.val_seed)
    criterion = {name: (np.mean(r.pointing) + np.mean(r.mass)) / 2 for name, r in val_results.items()}
    selected = max(criterion, key=criterion.get)
    summary["selected"] = selected
    summary["validation_criterion"] = criterion
    print(f"selected on validation (seed {cfg.val_seed}, {cfg.val_n} images), mean of pointing game and mass "
          f"in mask: {selected} ({criterion[selected]:.3f})")

    test = samples(cfg.test_seed, cfg.n, size)
    test_maps = {**lka_maps(model, test, cfg.batch), "Grad-CAM": gradcam_maps(model, test, cfg.batch),
                 **baseline_maps(test, cfg.seed)}
    results = score(model, test, test_maps, cfg, frozenset(APP_KINDS + BASELINES + (selected,)))
    write_csv(cfg.out / "heatmaps.csv", test, results, cfg.test_seed)
    table = summarise(results, cfg)
    summary["test"] = table
    print(f"\ntest (seed {cfg.test_seed}, {cfg.n} images; deletion/insertion on the first {cfg.di_n}, "
          f"{cfg.steps} steps); mean [95% bootstrap CI]; * = selected on validation")
    print_table(table, selected)

    paired = paired_rows(results, cfg)
    summary["paired_vs_gradcam"] = paired
    print("\npaired comparison with Grad-CAM (difference > 0: the LKA map is better; deletion sign flipped)")
    for row in paired:
        if row["method"] in (selected, "combined", "class combined"):
            print(f"{row['method']:<24}{row['metric']:<11}{row['better_by']:+.3f} [{row['low']:+.3f}, "
                  f"{row['high']:+.3f}]  p={row['p']:.4f}  "
                  f"wins/losses/ties {row['wins']}/{row['losses']}/{row['ties']}")

    kinds = list(dict.fromkeys([selected, "combined", "class combined", "stage 4", "class stage 4", "Grad-CAM"]))
    sanity = sanity_check(model, test[: cfg.sanity_n], kinds, cfg)
    summary["sanity"] = sanity
    print(f"\nsanity check (cascading randomisation, {cfg.sanity_n} images): mean Spearman with the trained maps")
    print(f"{'randomised':<24}" + "".join(f"{k:>16}" for k in kinds))
    for name, row in sanity:
        print(f"{name:<24}" + "".join(f"{row[k]:>16.3f}" for k in kinds))

    plot(cfg.out / "heatmaps.png", table, sanity, selected)
    (cfg.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nwrote {cfg.out}/heatmaps.csv, validation.csv, summary.json, heatmaps.png "
          f"({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
