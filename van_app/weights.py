"""Where a VAN comes from: a variant name, a checkpoint file, a model folder or a Hub repo.

``load_model`` is the one way in, and every branch builds its model once,
through ``variants.create_van``, with the caller's model arguments:

- a variant name: a fresh model, or its official weights from the Hub;
- a checkpoint file (official VAN-Classification, or any layout ``convert``
  knows): the architecture is read from its tensors' shapes;
- a folder or Hub repo holding a transformers VAN (``model_type: van``): the same;
- a folder or Hub repo holding our export (timm's Hub layout): timm's own
  ``local-dir:`` / ``hf-hub:`` loading, the architecture from config.json.

Each file is checked before anything is built (``reading``, ``convert``); a Hub
repo's files are sized from the Hub's metadata before they are downloaded, all
at one commit. Every malformed input is a one-line ``CheckpointError``.
"""

from __future__ import annotations

import pickle
import re
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .convert import (block_depths, check_fits, expected_shapes, head_classes, infer_model_args, shapes,
                      van_state_dict)
from .errors import CheckpointError
from .files import EXPORT_CONFIG, EXPORT_FILES, EXPORT_WEIGHTS, TRANSFORMERS_BIN
from .model import VAN
from .reading import (MAX_CONFIG_BYTES, check_size, export_config, is_safetensors, read_config, read_safetensors_shapes,
                      read_state_dict, transformers_labels)
from .refusal import refuse, show
from .variants import (ARCHITECTURE_ARGS, CUSTOM_BASE, VAN_LAYOUT, VARIANTS, create_van, default_labels,
                       imagenet_labels, pretrained_variants, register_variants, variant_of)


def load_model(
    source: str | Path,
    *,
    num_classes: int | None = None,
    pretrained: bool = False,
    max_bytes: int | None = None,
    **model_kwargs: Any,
) -> VAN:
    """An eval-mode VAN with ``.labels``, ``.variant``, ``.pretrained_cfg`` and ``.model_args`` from any known source.

    ``source``: a variant name (``van_b0``; ``pretrained=True`` fetches the official
    ImageNet weights), an official checkpoint file, a transformers VAN directory,
    a van_app export directory, or a Hub repo id (optionally ``hf-hub:``-prefixed)
    holding either. A ``num_classes`` other than the checkpoint's gets a new head.
    ``max_bytes`` refuses a weights file larger than that before reading it (for a
    Hub repo, before downloading it). ``model_kwargs`` (``drop_path_rate``,
    ``drop_rate``, ``layer_scale_init``, ...) go to the one build; widths, depths
    and MLP ratios come from the weights when there are any.
    """
    text = str(source)
    if text in VARIANTS and not pretrained:
        model = create_van(text, num_classes=1000 if num_classes is None else num_classes, **model_kwargs)
        return _finish(model, default_labels(model.num_classes))
    fixed = [k for k in model_kwargs if k in (*ARCHITECTURE_ARGS, "in_chans")]
    if fixed:
        raise TypeError(f"load_model({text!r}): {', '.join(fixed)} come from the checkpoint, not from arguments")
    if text in VARIANTS:
        return _official(text, num_classes, max_bytes, model_kwargs)
    path = Path(text).expanduser()
    if path.is_dir():
        return _folder(path, num_classes, max_bytes, model_kwargs)
    if path.is_file():
        return _checkpoint(read_state_dict(path, max_bytes), path, num_classes, model_kwargs)
    repo_id = text.removeprefix("hf-hub:")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        folder, commit = _hub_snapshot(repo_id, max_bytes)
        return _folder(folder, num_classes, max_bytes, model_kwargs, hub=f"{repo_id}@{commit}")
    raise refuse(text, f"not a variant ({', '.join(VARIANTS)}), a checkpoint file, a model directory or a Hub repo id")


def _official(variant: str, num_classes: int | None, max_bytes: int | None, model_kwargs: dict[str, Any]) -> VAN:
    """A variant with its official ImageNet weights, downloaded from the Hub (or found in its cache)."""
    weights = VARIANTS[variant].weights
    if not weights:
        raise refuse(variant, f"no official pretrained weights (they exist for {', '.join(pretrained_variants())})")
    path, _ = _hub_download(*weights, max_bytes)
    where = dict(source="hf-hub", hf_hub_id=weights[0], hf_hub_filename=weights[1])
    return _checkpoint(read_state_dict(path, max_bytes), path, num_classes, model_kwargs, imagenet_labels(), where)


def _checkpoint(
    raw: dict[str, Any],
    source: Path,
    num_classes: int | None,
    model_kwargs: dict[str, Any],
    labels: list[str] | None = None,
    where: dict[str, Any] | None = None,
) -> VAN:
    """A checkpoint in a foreign layout (or ours without a config), its architecture read from its tensors.

    Shapes are the only record of a foreign checkpoint's architecture; the whole
    state dict is checked against them on the meta device before the real build.
    """
    state_dict = van_state_dict(raw, source)
    args = infer_model_args(state_dict, source)
    found = shapes(state_dict)
    classes = head_classes(found)
    if labels is not None and len(labels) != classes:
        raise refuse(source, f"{len(labels)} labels for a head of {classes} classes")
    check_fits(found, expected_shapes(**args, num_classes=classes), source)
    new_head = num_classes is not None and num_classes != classes
    where = where or dict(source="file", file=str(source), hf_hub_id=None, hf_hub_filename=None)
    model = create_van(variant_of(args) or CUSTOM_BASE, **args, num_classes=num_classes if new_head else classes,
                       pretrained_cfg_overlay=where, **model_kwargs)
    if new_head:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith("head.")}
    model.load_state_dict(state_dict, strict=False)  # check_fits let through only BatchNorm counters and the head
    return _finish(model, labels if labels and not new_head else default_labels(model.num_classes))


def _folder(folder: Path, num_classes: int | None, max_bytes: int | None, model_kwargs: dict[str, Any],
            hub: str | None = None) -> VAN:
    """A transformers VAN or a van_app export: config.json beside safetensors (or pytorch_model.bin) weights."""
    config_path = folder / EXPORT_CONFIG
    if not config_path.is_file():
        raise refuse(folder, "no config.json; expected a van_app export or a transformers VAN")
    config = read_config(config_path)
    weights = next((folder / name for name in (EXPORT_WEIGHTS, TRANSFORMERS_BIN) if (folder / name).is_file()), None)
    if weights is None:
        raise refuse(folder, f"no {EXPORT_WEIGHTS} (or {TRANSFORMERS_BIN}) beside config.json")
    if config.get("model_type") == "van":
        where = dict(source="hf-hub", hf_hub_id=hub, hf_hub_filename=weights.name) if hub else None
        labels = transformers_labels(config, config_path)
        return _checkpoint(read_state_dict(weights, max_bytes), weights, num_classes, model_kwargs, labels, where)
    if "architecture" not in config:
        raise refuse(config_path, "neither a van_app export (architecture) nor a transformers VAN (model_type van)")
    listed = config.get("files")  # the files a van_app export lists in its config; a Hub snapshot holds only two
    missing = [name for name in listed if name in EXPORT_FILES and not (folder / name).is_file()] if (
        hub is None and isinstance(listed, list)) else []
    if missing:
        raise refuse(folder, f"incomplete van_app export, missing {', '.join(missing)}; "
                             "export it again with van-finetune")
    return _export(folder, config, weights, num_classes, max_bytes, model_kwargs, hub)


def _export(folder: Path, config: dict[str, Any], weights: Path, num_classes: int | None, max_bytes: int | None,
            model_kwargs: dict[str, Any], hub: str | None) -> VAN:
    """Our export, loaded by timm (``local-dir:`` or ``hf-hub:``) once config and weights are known to agree."""
    import timm

    config_path = folder / EXPORT_CONFIG
    export = export_config(config, config_path)
    if is_safetensors(weights):
        found = read_safetensors_shapes(weights, max_bytes)
    else:
        found = shapes(van_state_dict(read_state_dict(weights, max_bytes), weights))
    classes = head_classes(found)
    if export.labels is not None and len(export.labels) != classes:
        raise refuse(config_path, f"{len(export.labels)} labels for a head of {classes} classes")
    for where, declared in export.declared_classes.items():
        if declared != classes:
            raise refuse(config_path, f"{where} is {declared}, but the weights' head has {classes} classes")
    depths, declared_depths = block_depths(list(found), weights), export.model_args["depths"]
    if depths != declared_depths:
        raise refuse(weights, f"holds {list(depths)} blocks per stage but config.json says {list(declared_depths)}")
    check_fits(found, expected_shapes(**export.model_args, num_classes=classes), weights)
    register_variants()
    overlay = dict(export.preprocessing, **VAN_LAYOUT, num_classes=classes)  # what timm adapts a new head by
    try:
        model = timm.create_model(f"hf-hub:{hub}" if hub else f"local-dir:{folder}", pretrained=True,
                                  num_classes=num_classes, pretrained_cfg_overlay=overlay, **model_kwargs)
    except CheckpointError:
        raise
    except (RuntimeError, OSError, ValueError, pickle.UnpicklingError) as e:
        raise refuse(weights, f"timm could not load it ({show(e, 120)})") from e
    same_head = model.num_classes == classes
    return _finish(model, export.labels if export.labels and same_head else default_labels(model.num_classes))


def _finish(model: VAN, labels: list[str]) -> VAN:
    """Attach labels (also as timm's ``label_names``), switch to eval mode."""
    model.labels = list(labels)
    model.pretrained_cfg = dict(model.pretrained_cfg, label_names=tuple(model.labels))
    model.default_cfg = model.pretrained_cfg
    return model.eval()


class _MissingFile(CheckpointError):
    """A file the Hub repo (or, offline, the local cache) does not have."""


def _hub_snapshot(repo_id: str, max_bytes: int | None) -> tuple[Path, str]:
    """A Hub repo's config.json and weights at one commit, as the cache folder holding them, and that commit."""
    config, commit = _hub_download(repo_id, EXPORT_CONFIG, MAX_CONFIG_BYTES)
    missing = None
    for name in (EXPORT_WEIGHTS, TRANSFORMERS_BIN):
        try:
            _hub_download(repo_id, name, max_bytes, revision=commit)
            return config.parent, commit
        except _MissingFile as e:
            missing = missing or e
    raise missing


def _hub_download(repo_id: str, filename: str, max_bytes: int | None,
                  revision: str | None = None) -> tuple[Path, str]:
    """One file of a Hub repo (from the local cache when offline) and its commit, its size checked first.

    The size comes from the Hub's metadata (or the cache), and the download is
    pinned to the commit that size belongs to.
    """
    from huggingface_hub import constants, try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id, filename, revision=revision)
    if isinstance(cached, str):  # no request at all: Hub files at a commit never change
        check_size(Path(cached), max_bytes)
        return Path(cached), Path(cached).parent.name  # .../snapshots/<commit>/<file>
    if not constants.HF_HUB_OFFLINE:
        _require_reachable(constants.ENDPOINT, f"{repo_id}/{filename}")
    info = _hub_call(repo_id, filename, revision=revision, dry_run=True)
    if max_bytes is not None and info.file_size is not None and info.file_size > max_bytes:
        raise refuse(f"{repo_id}/{filename}", f"{info.file_size:,} bytes, more than the {max_bytes:,} allowed")
    return Path(_hub_call(repo_id, filename, revision=info.commit_hash)), info.commit_hash


def _require_reachable(endpoint: str, where: str, timeout: float = 3.0) -> None:
    """Refuse at once, in one line, when the Hub's host cannot be reached (huggingface_hub would retry for ~24 s)."""
    url = urlsplit(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError as e:
        raise refuse(where, f"not in the local Hugging Face cache and the Hub ({url.hostname}) cannot be reached "
                            f"({show(e, 80)}); set HF_HUB_OFFLINE=1 to use only the cache") from e


def _hub_call(repo_id: str, filename: str, **kwargs: Any) -> Any:
    """``hf_hub_download`` with its failures as one-line errors."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    where = f"{repo_id}/{filename}"
    try:
        return hf_hub_download(repo_id, filename, **kwargs)
    except LocalEntryNotFoundError as e:  # a subclass of EntryNotFoundError: test it first
        raise _MissingFile(
            refuse(where, "not in the local Hugging Face cache and the Hub cannot be reached (offline?)")) from e
    except EntryNotFoundError as e:
        raise _MissingFile(refuse(repo_id, f"the Hub repo has no file {show(filename)}")) from e
    except HfHubHTTPError as e:
        raise refuse(where, f"download failed ({show(e, 120)})") from e
    except ValueError as e:
        raise refuse(repo_id, f"not a valid Hub repo id ({show(e, 120)})") from e
