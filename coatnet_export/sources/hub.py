"""Reading the folders the Hugging Face hub writes for timm models.

A timm model on the hub is ``config.json`` (architecture, classes, ``pretrained_cfg`` with the
preprocessing) beside ``model.safetensors`` or ``pytorch_model.bin``. Three layouts are read:

- a flat folder (``hf download timm/<arch>.<tag> --local-dir DIR``, or a copy);
- the hub cache's repository folder ``models--timm--<arch>.<tag>/``: the snapshot named by
  ``refs/main`` (or the only one) is read;
- one of its ``snapshots/<hash>/`` folders, given directly.

The cache's files are links into its ``blobs/`` folder; every link must stay inside the
repository folder (a flat folder: inside itself), so a crafted folder cannot make the export
read files elsewhere.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coatnet_export.errors import InputError

CONFIG_FILE = "config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
"""The weights a timm hub repository holds, preferred first (repositories often hold both)."""
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
SHARD_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TIMM_CROP_MODES = ("center", "squash", "border")
TIMM_INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos")
MAX_CONFIG_BYTES = 64 << 20
"""A config.json larger than this is not a timm model's (the largest label lists are ~1 MB)."""
FIX_CONFIG = "fix config.json, or download the model again"


@dataclass(frozen=True)
class PretrainedCfg:
    """The preprocessing timm recorded for the weights; None where config.json does not say."""

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    crop_pct: float | None = None
    interpolation: str | None = None
    crop_mode: str | None = None
    """timm's crop mode: center (keep the aspect, crop), squash (stretch to the size), border."""
    input_size: tuple[int, int, int] | None = None
    """(channels, height, width) the weights were trained at."""
    fixed_input_size: bool | None = None

    def preprocessing(self) -> dict[str, Any]:
        """The recorded Preprocessing fields (mean, std, crop_pct, interpolation, crop_mode),
        only those config.json gives: keyword arguments for Preprocessing."""
        fields = ("mean", "std", "crop_pct", "interpolation", "crop_mode")
        return {name: getattr(self, name) for name in fields if getattr(self, name) is not None}


@dataclass(frozen=True)
class TimmConfig:
    """What a timm model's config.json says."""

    architecture: str
    """timm's model name, e.g. ``coatnet_0_rw_224`` (no pretrained tag)."""
    num_classes: int | None
    num_features: int | None
    global_pool: str | None
    pretrained_cfg: PretrainedCfg
    labels: tuple[str, ...] | None
    """A name per class: ``label_descriptions`` of ``label_names`` where given, else the names;
    None when config.json has none (or they do not cover ``num_classes``)."""
    tag: str | None = None
    """The pretrained tag (``sw_in1k``), when pretrained_cfg names it."""


@dataclass(frozen=True)
class HubFolder:
    """A timm model folder, read and checked: where its files are and what its config says."""

    path: Path
    """The folder holding the files (for the hub cache: the snapshot chosen)."""
    weights: Path
    """The weights file inside ``path`` (its links checked): .safetensors or .bin."""
    config: TimmConfig | None
    """None when the folder has no config.json (the architecture must then come from the keys
    or --variant)."""


def read_hub_folder(path: Path) -> HubFolder:
    """Find and check a timm model folder's files and parse its config.json.

    Reads no weights (see :func:`coatnet_export.sources.checkpoint.read_checkpoint` with
    ``HubFolder.weights``). Every problem is an :class:`InputError` naming its fix.
    """
    snapshot, root = locate_snapshot(path)
    weights = find_weights(snapshot, root)
    config_path = snapshot / CONFIG_FILE
    has_config = config_path.exists() or config_path.is_symlink()
    config = parse_config(read_config(config_path, root), config_path) if has_config else None
    return HubFolder(snapshot, weights, config)


def weights_file(path: Path) -> Path:
    """The weights file a ``--checkpoint`` names: the file itself, or a timm folder's."""
    return read_hub_folder(path).weights if path.is_dir() else path


# --- finding the files ---


def locate_snapshot(path: Path) -> tuple[Path, Path]:
    """(the folder holding the model's files, the folder its links must stay inside)."""
    if not path.is_dir():
        raise InputError(f"checkpoint folder {path} does not exist")
    if (path / "snapshots").is_dir():
        return _cache_snapshot(path), path
    if path.parent.name == "snapshots" and (path.parent.parent / "blobs").is_dir():
        return path, path.parent.parent
    repositories = sorted(p.name for p in path.glob("models--*") if p.is_dir())
    if repositories and not _model_files(path):
        raise InputError(
            f"{path} is a hub cache holding {len(repositories)} model(s): "
            f"{_listed(repositories)} (give one of them as --checkpoint)"
        )
    return path, path


def _cache_snapshot(repository: Path) -> Path:
    """The snapshot of a hub cache repository that ``refs/main`` names, or its only one."""
    snapshots = sorted(p for p in (repository / "snapshots").iterdir() if p.is_dir())
    ref = repository / "refs" / "main"
    if ref.is_file():
        commit = ref.read_text(encoding="utf-8", errors="replace").strip()
        chosen = repository / "snapshots" / commit
        if commit and "/" not in commit and chosen.is_dir():
            return chosen
        raise InputError(
            f"{ref} names snapshot {commit[:64]!r}, which {repository / 'snapshots'} does not "
            "hold (download the model again, or give a snapshots/<hash> folder as --checkpoint)"
        )
    if len(snapshots) == 1:
        return snapshots[0]
    if not snapshots:
        raise InputError(
            f"{repository} holds no snapshot (the download did not finish: download it again)"
        )
    names = [p.name for p in snapshots]
    raise InputError(
        f"{repository} holds {len(snapshots)} snapshots ({_listed(names)}) and no refs/main "
        "to choose one (give one snapshots/<hash> folder as --checkpoint)"
    )


def _model_files(folder: Path) -> list[Path]:
    """config.json and weight-like files directly in ``folder`` (links included)."""
    return [
        p
        for p in sorted(folder.iterdir())
        if p.name == CONFIG_FILE or p.name in SHARD_INDEXES or p.suffix in WEIGHT_SUFFIXES
    ]


def find_weights(folder: Path, root: Path) -> Path:
    """The one weights file of ``folder``: a standard name first, else the only candidate."""
    sharded = [name for name in SHARD_INDEXES if (folder / name).exists()]
    if sharded:
        raise InputError(
            f"{folder} holds sharded weights ({sharded[0]}); a CoAtNet fits one file (save "
            "the model as one model.safetensors)"
        )
    for name in WEIGHT_FILES:
        candidate = folder / name
        if candidate.exists() or candidate.is_symlink():
            return checked_link(candidate, root)
    candidates = [p for p in _model_files(folder) if p.suffix in WEIGHT_SUFFIXES]
    if len(candidates) == 1:
        return checked_link(candidates[0], root)
    if not candidates:
        config = "" if (folder / CONFIG_FILE).exists() else " and no config.json"
        raise InputError(
            f"{folder} holds no weights ({' or '.join(WEIGHT_FILES)}){config} (download the "
            "model's files into it, or give a weights file as --checkpoint)"
        )
    names = [p.name for p in candidates]
    raise InputError(
        f"{folder} holds {len(names)} weight files ({_listed(names)}) and no "
        f"{WEIGHT_FILES[0]} (keep one, or give its path as --checkpoint)"
    )


def checked_link(path: Path, root: Path) -> Path:
    """``path`` if it is a regular file whose links all stay inside ``root``."""
    try:
        target = path.resolve(strict=True)
    except (OSError, RuntimeError):  # missing target or a loop
        raise InputError(
            f"{path} is a broken link (the download did not finish: download the model again)"
        ) from None
    if not target.is_relative_to(root.resolve()):
        raise InputError(
            f"{path} links to {target}, outside {root} (a hub folder's links stay in its "
            "blobs/ folder: download the model again, or copy the file into the folder)"
        )
    if not target.is_file():
        raise InputError(f"{path} is not a file (give a folder holding the model's files)")
    return path


# --- config.json ---


def read_config(path: Path, root: Path) -> dict[str, Any]:
    """config.json as a JSON object."""
    checked_link(path, root)
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise InputError(f"{path} is over {MAX_CONFIG_BYTES >> 20} MiB: not a timm config")
    try:
        loaded = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        reason = getattr(exc, "msg", None) or getattr(exc, "reason", "not UTF-8")
        raise InputError(f"{path} is not JSON ({reason}; {FIX_CONFIG})") from None
    if not isinstance(loaded, dict):
        raise InputError(f"{path} is not a JSON object ({FIX_CONFIG})")
    return loaded


class _ConfigProblem(Exception):
    """A wrong value in config.json; :func:`parse_config` names the file."""


def parse_config(raw: dict[str, Any], path: Path) -> TimmConfig:
    """The parsed config.json (read from ``path``); InputError names the first wrong field."""
    try:
        return _parse(raw)
    except _ConfigProblem as problem:
        raise InputError(f"{path}: {problem} ({FIX_CONFIG})") from None


def _parse(raw: dict[str, Any]) -> TimmConfig:
    architecture = raw.get("architecture")
    if not isinstance(architecture, str) or not architecture:
        raise _ConfigProblem(
            '"architecture" must name a timm model (e.g. "coatnet_0_rw_224"), got '
            + _shown(architecture)
        )
    cfg = raw.get("pretrained_cfg", {})
    if not isinstance(cfg, dict):
        raise _ConfigProblem(f'"pretrained_cfg" must be an object, got {_shown(cfg)}')
    num_classes = _count(raw, "num_classes")
    if num_classes is None:
        num_classes = _count(cfg, "num_classes", "pretrained_cfg.")
    pretrained = _pretrained(cfg)
    tag = cfg.get("tag")
    return TimmConfig(
        architecture=architecture.removeprefix("timm/").split(".", 1)[0],
        num_classes=num_classes,
        num_features=_count(raw, "num_features"),
        global_pool=_text(raw, "global_pool"),
        pretrained_cfg=pretrained,
        labels=_labels(raw, num_classes),
        tag=tag if isinstance(tag, str) and tag else None,
    )


def _pretrained(cfg: dict[str, Any]) -> PretrainedCfg:
    input_size = _numbers(cfg, "input_size", integer=True)
    if input_size is not None and (len(input_size) != 3 or min(input_size) < 1):
        raise _ConfigProblem(
            '"pretrained_cfg.input_size" must be [channels, height, width], got '
            + _shown(cfg["input_size"])
        )
    mean, std = _numbers(cfg, "mean"), _numbers(cfg, "std")
    for name, values in (("mean", mean), ("std", std)):
        channels = input_size[0] if input_size else len(values or ())
        if values is not None and len(values) != channels:
            raise _ConfigProblem(
                f'"pretrained_cfg.{name}" must give {channels} value(s), one per channel, got '
                + _shown(cfg[name])
            )
    if std is not None and min(std) <= 0:
        raise _ConfigProblem(f'"pretrained_cfg.std" must be positive, got {_shown(cfg["std"])}')
    crop_pct = cfg.get("crop_pct")
    if crop_pct is not None and not (_is_number(crop_pct) and 0 < crop_pct <= 1):
        raise _ConfigProblem(f'"pretrained_cfg.crop_pct" must be in (0, 1], got {_shown(crop_pct)}')
    fixed = cfg.get("fixed_input_size")
    if fixed is not None and not isinstance(fixed, bool):
        raise _ConfigProblem(
            f'"pretrained_cfg.fixed_input_size" must be true or false, got {_shown(fixed)}'
        )
    return PretrainedCfg(
        mean=mean,
        std=std,
        crop_pct=None if crop_pct is None else float(crop_pct),
        interpolation=_choice(cfg, "interpolation", TIMM_INTERPOLATIONS),
        crop_mode=_choice(cfg, "crop_mode", TIMM_CROP_MODES),
        input_size=input_size,
        fixed_input_size=fixed,
    )


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _shown(value: object) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _count(raw: dict[str, Any], key: str, prefix: str = "") -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _ConfigProblem(f'"{prefix}{key}" must be a whole number, got {_shown(value)}')
    return value


def _text(raw: dict[str, Any], key: str) -> str | None:
    value = raw.get(key)
    if value is not None and not isinstance(value, str):
        raise _ConfigProblem(f'"{key}" must be a string, got {_shown(value)}')
    return value or None


def _numbers(cfg: dict[str, Any], key: str, integer: bool = False) -> tuple | None:
    value = cfg.get(key)
    if value is None:
        return None
    valid = isinstance(value, list) and value and all(map(_is_number, value))
    if not valid or (integer and not all(float(v).is_integer() for v in value)):
        kind = "whole numbers" if integer else "numbers"
        raise _ConfigProblem(
            f'"pretrained_cfg.{key}" must be a list of {kind}, got {_shown(value)}'
        )
    return tuple(int(v) for v in value) if integer else tuple(float(v) for v in value)


def _choice(cfg: dict[str, Any], key: str, known: tuple[str, ...]) -> str | None:
    value = cfg.get(key)
    if value is None:
        return None
    if value not in known:
        raise _ConfigProblem(
            f'"pretrained_cfg.{key}" is {_shown(value)}, which timm does not define '
            f"(one of {', '.join(known)})"
        )
    return value


def _labels(raw: dict[str, Any], num_classes: int | None) -> tuple[str, ...] | None:
    """Class names from ``label_names`` (a list, or an object of index -> name), described by
    ``label_descriptions`` (name -> description) where it has them."""
    names = raw.get("label_names")
    if names is None:
        return None
    if isinstance(names, dict):
        names = _indexed(names, num_classes)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise _ConfigProblem(
            f'"label_names" must be a list of strings or an object of index -> string, got '
            f"{_shown(names)}"
        )
    descriptions = raw.get("label_descriptions") or {}
    if not isinstance(descriptions, dict) or not all(
        isinstance(d, str) for d in descriptions.values()
    ):
        raise _ConfigProblem(
            f'"label_descriptions" must be an object of name -> string, got {_shown(descriptions)}'
        )
    if num_classes is not None and len(names) != num_classes:
        return None  # names that do not cover the outputs would mislabel them
    return tuple(descriptions.get(name, name) for name in names)


def _indexed(names: dict[str, Any], num_classes: int | None) -> list[Any]:
    """An index -> name object as a list; classes it skips are named by their index."""
    try:
        by_index = {int(key): name for key, name in names.items()}
    except ValueError:
        raise _ConfigProblem(
            f'"label_names" keys must be class indices, got {_shown(list(names)[:3])}'
        ) from None
    count = num_classes if num_classes is not None else max(by_index, default=-1) + 1
    return [by_index.get(i, str(i)) for i in range(count)]


def _listed(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return f"{shown}, +{len(names) - limit} more" if len(names) > limit else shown
