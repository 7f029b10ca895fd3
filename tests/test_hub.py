"""Reading timm model folders as the Hugging Face hub writes them: flat, the hub cache's
repository folder (refs/main, links into blobs/) and one snapshot; and every bad folder with
one error line."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import onnx
import pytest
import torch
from safetensors.torch import save_file

from coatnet_export.console import Progress
from coatnet_export.export.pipeline import ExportOptions, run_export
from coatnet_export.metadata import ExportMetadata
from coatnet_export.sources.checkpoint import read_checkpoint
from coatnet_export.sources.hub import read_hub_folder
from models import init_weights

from conftest import TINY, assert_clean_failure, listing

REPOSITORY = "models--timm--coatnet_0_rw_224.sw_in1k"
LABEL_NAMES = [f"n{i:08d}" for i in range(10)]
DESCRIPTIONS = {name: f"thing number {i}" for i, name in enumerate(LABEL_NAMES)}


def config(**pretrained) -> dict:
    """A timm config.json for a 10-class model at 64 x 64 (values as timm writes them)."""
    cfg = {
        "tag": "sw_in1k",
        "custom_load": False,
        "input_size": [3, 64, 64],
        "fixed_input_size": True,
        "interpolation": "bilinear",
        "crop_pct": 0.9,
        "crop_mode": "squash",
        "mean": [0.5, 0.4, 0.3],
        "std": [0.2, 0.25, 0.3],
        "num_classes": 10,
        "pool_size": [2, 2],
        "first_conv": "stem.conv1",
        "classifier": "head.fc",
        **pretrained,
    }
    return {
        "architecture": "coatnet_0_rw_224",
        "num_classes": 10,
        "num_features": 32,
        "global_pool": "avg",
        "pretrained_cfg": cfg,
        "label_names": LABEL_NAMES,
        "label_descriptions": DESCRIPTIONS,
    }


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    """TINY's weights at 64 x 64 (the export reads its architecture from the keys)."""
    model = init_weights(TINY.build((64, 64), num_classes=10), 3)
    return {k: v.clone().contiguous() for k, v in model.state_dict().items()}


def safetensors_bytes(tensors: dict, folder: Path) -> bytes:
    path = folder / ".tmp.safetensors"
    save_file(tensors, path)
    data = path.read_bytes()
    path.unlink()
    return data


def flat_folder(folder: Path, files: dict[str, bytes | dict]) -> Path:
    folder.mkdir(parents=True)
    for name, content in files.items():
        data = json.dumps(content).encode() if isinstance(content, dict) else content
        (folder / name).write_bytes(data)
    return folder


def hub_cache(root: Path, snapshots: dict[str, dict[str, bytes | dict]], main: str | None) -> Path:
    """A hub cache repository: each file a link from snapshots/<commit>/ into blobs/."""
    repository = root / REPOSITORY
    for commit, files in snapshots.items():
        snapshot = repository / "snapshots" / commit
        snapshot.mkdir(parents=True)
        for name, content in files.items():
            data = json.dumps(content).encode() if isinstance(content, dict) else content
            blob = repository / "blobs" / hashlib.sha256(data).hexdigest()
            blob.parent.mkdir(exist_ok=True)
            blob.write_bytes(data)
            (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    if main is not None:
        (repository / "refs").mkdir()
        (repository / "refs" / "main").write_text(main)
    return repository


# --- what is read ---


def test_flat_folder(tmp_path: Path, weights: dict) -> None:
    folder = flat_folder(
        tmp_path / "m",
        {"config.json": config(), "model.safetensors": safetensors_bytes(weights, tmp_path)},
    )
    hub = read_hub_folder(folder)
    assert hub.path == folder and hub.weights == folder / "model.safetensors"
    cfg = hub.config
    assert (cfg.architecture, cfg.tag, cfg.num_classes, cfg.num_features, cfg.global_pool) == (
        "coatnet_0_rw_224", "sw_in1k", 10, 32, "avg"
    )  # fmt: skip
    assert cfg.labels == tuple(DESCRIPTIONS[n] for n in LABEL_NAMES)
    pre = cfg.pretrained_cfg
    assert pre.input_size == (3, 64, 64) and pre.fixed_input_size is True
    assert pre.preprocessing() == {
        "mean": (0.5, 0.4, 0.3),
        "std": (0.2, 0.25, 0.3),
        "crop_pct": 0.9,
        "interpolation": "bilinear",
        "crop_mode": "squash",
    }
    loaded = read_checkpoint(hub.weights).state_dict
    assert loaded.keys() == weights.keys()
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)


def test_partial_config_and_index_labels(tmp_path: Path) -> None:
    raw = {
        "architecture": "coatnet_rmlp_2_rw_384",
        "num_classes": 4,
        "pretrained_cfg": {"crop_mode": "center"},
        "label_names": {"0": "cat", "2": "dog"},
    }
    folder = flat_folder(tmp_path / "m", {"config.json": raw, "weights.pth": b"x"})
    hub = read_hub_folder(folder)
    assert hub.weights == folder / "weights.pth"  # the only candidate
    assert hub.config.labels == ("cat", "1", "dog", "3")
    assert hub.config.pretrained_cfg.preprocessing() == {"crop_mode": "center"}
    assert hub.config.num_features is None and hub.config.tag is None


def test_no_config_json(tmp_path: Path) -> None:
    folder = flat_folder(tmp_path / "m", {"model.safetensors": b"x"})
    assert read_hub_folder(folder).config is None


def test_pytorch_model_bin(tmp_path: Path, weights: dict) -> None:
    folder = flat_folder(tmp_path / "m", {"config.json": config()})
    torch.save(weights, folder / "pytorch_model.bin")
    hub = read_hub_folder(folder)
    assert hub.weights == folder / "pytorch_model.bin"
    loaded = read_checkpoint(hub.weights).state_dict
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)


def test_safetensors_preferred_over_bin(tmp_path: Path) -> None:
    folder = flat_folder(
        tmp_path / "m",
        {"config.json": config(), "pytorch_model.bin": b"old", "model.safetensors": b"new"},
    )
    assert read_hub_folder(folder).weights.name == "model.safetensors"


def test_hub_cache_follows_refs_main(tmp_path: Path, weights: dict) -> None:
    new, old = "a" * 40, "b" * 40
    files = {"config.json": config(), "model.safetensors": safetensors_bytes(weights, tmp_path)}
    stale = {"config.json": config(crop_mode="center"), "pytorch_model.bin": b"x"}
    repository = hub_cache(tmp_path / "hub", {new: files, old: stale}, main=new)
    hub = read_hub_folder(repository)
    assert hub.path == repository / "snapshots" / new
    assert hub.weights.is_symlink() and hub.config.pretrained_cfg.crop_mode == "squash"
    loaded = read_checkpoint(hub.weights).state_dict
    assert all(torch.equal(loaded[k], weights[k]) for k in weights)
    # a snapshot given directly: its links into blobs/ stay inside the repository
    direct = read_hub_folder(repository / "snapshots" / old)
    assert direct.weights.name == "pytorch_model.bin"
    assert direct.config.pretrained_cfg.crop_mode == "center"


def test_hub_cache_only_snapshot(tmp_path: Path) -> None:
    repository = hub_cache(tmp_path / "hub", {"c" * 40: {"model.safetensors": b"x"}}, main=None)
    assert read_hub_folder(repository).path.name == "c" * 40


# --- the export reads it ---


def exported_metadata(folder: Path, **options) -> ExportMetadata:
    """Export TINY from a hub folder (TINY named: the folder's config names a timm model);
    the metadata the model records."""
    out = folder.parent / f"export-{len(list(folder.parent.glob('export-*')))}"
    run_export(
        ExportOptions(architecture=TINY, checkpoint=folder, output=out, samples=1, **options),
        Progress(enabled=False),
    )
    props = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    return ExportMetadata.from_props(props)


def test_export_takes_preprocessing_and_labels_from_config(tmp_path: Path, weights: dict) -> None:
    files = {"config.json": config(), "model.safetensors": safetensors_bytes(weights, tmp_path)}
    repository = hub_cache(tmp_path / "hub", {"d" * 40: files}, "d" * 40)
    meta = exported_metadata(repository)
    assert (meta.mean, meta.std, meta.crop_pct) == ([0.5, 0.4, 0.3], [0.2, 0.25, 0.3], 0.9)
    assert (meta.interpolation, meta.crop_mode) == ("bilinear", "squash")
    assert meta.resize.startswith("scale each axis")
    assert meta.labels == [DESCRIPTIONS[n] for n in LABEL_NAMES]
    # options still win over config.json
    meta = exported_metadata(
        repository,
        mean=(0.1, 0.2, 0.3),
        crop_pct=1.0,
        crop_mode="center",
        interpolation="bicubic",
        labels=[str(i) for i in range(10)],
    )
    assert (meta.mean, meta.std, meta.crop_pct) == ([0.1, 0.2, 0.3], [0.2, 0.25, 0.3], 1.0)
    assert (meta.interpolation, meta.crop_mode) == ("bicubic", "center")
    assert meta.labels == [str(i) for i in range(10)]


def test_config_without_pretrained_cfg_keeps_the_defaults(tmp_path: Path, weights: dict) -> None:
    raw = {"architecture": "coatnet_0_rw_224", "num_classes": 10}
    folder = flat_folder(
        tmp_path / "m",
        {"config.json": raw, "model.safetensors": safetensors_bytes(weights, tmp_path)},
    )
    meta = exported_metadata(folder)
    assert (meta.mean, meta.crop_pct, meta.crop_mode) == ([0.485, 0.456, 0.406], 0.875, "center")
    assert meta.labels is None


def test_labels_that_do_not_name_the_weights_classes_are_left_out(
    tmp_path: Path, weights: dict
) -> None:
    raw = {**config(), "num_classes": 7, "label_names": LABEL_NAMES[:7]}  # the weights have 10
    folder = flat_folder(
        tmp_path / "m",
        {"config.json": raw, "model.safetensors": safetensors_bytes(weights, tmp_path)},
    )
    assert len(read_hub_folder(folder).config.labels) == 7
    meta = exported_metadata(folder)
    assert meta.num_classes == 10 and meta.labels is None and meta.crop_mode == "squash"


# --- bad folders: one error line, exit 2, nothing written ---


def _bad_config(**changes) -> dict:
    raw = config()
    for key, value in changes.items():
        if key.startswith("cfg_"):
            raw["pretrained_cfg"][key[4:]] = value
        else:
            raw[key] = value
    return raw


FLAT_CASES: dict[str, tuple[dict, str]] = {
    "empty": ({}, "holds no weights (model.safetensors or pytorch_model.bin) and no config.json"),
    "config only": ({"config.json": config()}, "holds no weights"),
    "config not json": ({"config.json": b"{not json", "model.safetensors": b"x"}, "is not JSON"),
    "config not utf-8": ({"config.json": b"\xff\xfe{}", "model.safetensors": b"x"}, "is not JSON"),
    "config a list": ({"config.json": b"[1, 2]", "model.safetensors": b"x"}, "not a JSON object"),
    "no architecture": (
        {"config.json": {"num_classes": 3}, "model.safetensors": b"x"},
        '"architecture" must name a timm model',
    ),
    "classes a string": (
        {"config.json": _bad_config(num_classes="1000"), "model.safetensors": b"x"},
        '"num_classes" must be a whole number, got "1000"',
    ),
    "pretrained_cfg a list": (
        {"config.json": _bad_config(pretrained_cfg=[1]), "model.safetensors": b"x"},
        '"pretrained_cfg" must be an object',
    ),
    "mean a string": (
        {"config.json": _bad_config(cfg_mean="0.5"), "model.safetensors": b"x"},
        '"pretrained_cfg.mean" must be a list of numbers',
    ),
    "mean per channel": (
        {"config.json": _bad_config(cfg_mean=[0.5, 0.5]), "model.safetensors": b"x"},
        '"pretrained_cfg.mean" must give 3 value(s)',
    ),
    "std zero": (
        {"config.json": _bad_config(cfg_std=[0.5, 0, 0.5]), "model.safetensors": b"x"},
        '"pretrained_cfg.std" must be positive',
    ),
    "crop_pct above one": (
        {"config.json": _bad_config(cfg_crop_pct=2), "model.safetensors": b"x"},
        '"pretrained_cfg.crop_pct" must be in (0, 1]',
    ),
    "input_size short": (
        {"config.json": _bad_config(cfg_input_size=[224, 224]), "model.safetensors": b"x"},
        '"pretrained_cfg.input_size" must be [channels, height, width]',
    ),
    "unknown crop_mode": (
        {"config.json": _bad_config(cfg_crop_mode="zoom"), "model.safetensors": b"x"},
        '"pretrained_cfg.crop_mode" is "zoom", which timm does not define',
    ),
    "unknown interpolation": (
        {"config.json": _bad_config(cfg_interpolation="box"), "model.safetensors": b"x"},
        '"pretrained_cfg.interpolation" is "box"',
    ),
    "labels not strings": (
        {"config.json": _bad_config(label_names=[1, 2]), "model.safetensors": b"x"},
        '"label_names" must be a list of strings',
    ),
    "two weight files": (
        {"config.json": config(), "a.safetensors": b"x", "b.pth": b"y"},
        "holds 2 weight files (a.safetensors, b.pth) and no model.safetensors",
    ),
    "sharded": (
        {"config.json": config(), "model.safetensors.index.json": b"{}"},
        "holds sharded weights",
    ),
}


def _check(run_cli, tmp_path: Path, checkpoint: Path, pattern: str) -> None:
    before = listing(tmp_path)
    result = run_cli("export", "--checkpoint", checkpoint, "--output", tmp_path / "out")
    assert_clean_failure(result, tmp_path, before, pattern)
    assert "(" in result.err.splitlines()[-1]  # every message names its fix


@pytest.mark.parametrize("name", FLAT_CASES)
def test_bad_flat_folder(name: str, tmp_path: Path, run_cli) -> None:
    files, pattern = FLAT_CASES[name]
    folder = flat_folder(tmp_path / "m", files)
    _check(run_cli, tmp_path, folder, pattern)


def test_bad_hub_cache(tmp_path: Path, run_cli) -> None:
    files = {"config.json": config(), "model.safetensors": b"x"}
    repository = hub_cache(tmp_path / "hub", {"a" * 40: files, "b" * 40: files}, main=None)
    _check(run_cli, tmp_path, repository, "holds 2 snapshots")
    (repository / "refs").mkdir()
    (repository / "refs" / "main").write_text("f" * 40)
    _check(run_cli, tmp_path, repository, "names snapshot 'ffff")
    (repository / "refs" / "main").write_text("a" * 40)
    snapshot = repository / "snapshots" / ("a" * 40)
    outside = tmp_path / "elsewhere.safetensors"
    outside.write_bytes(b"x")
    (snapshot / "model.safetensors").unlink()
    (snapshot / "model.safetensors").symlink_to(outside)
    _check(run_cli, tmp_path, repository, "outside")
    _check(run_cli, tmp_path, snapshot, "outside")  # the snapshot given directly
    (snapshot / "model.safetensors").unlink()
    (snapshot / "model.safetensors").symlink_to("../../blobs/missing")
    _check(run_cli, tmp_path, repository, "is a broken link")
    (snapshot / "model.safetensors").unlink()
    (snapshot / "config.json").unlink()
    (snapshot / "config.json").symlink_to("/etc/hostname")
    (snapshot / "model.safetensors").symlink_to(next((repository / "blobs").iterdir()))
    _check(run_cli, tmp_path, repository, "config.json links to")


def test_hub_cache_root_and_empty_repository(tmp_path: Path, run_cli) -> None:
    hub_cache(tmp_path / "hub", {"a" * 40: {"model.safetensors": b"x"}}, main="a" * 40)
    other = tmp_path / "hub" / "models--timm--coatnet_1_rw_224.sw_in1k" / "snapshots"
    other.mkdir(parents=True)
    _check(run_cli, tmp_path, tmp_path / "hub", "is a hub cache holding 2 model(s)")
    empty = tmp_path / "hub" / "models--timm--coatnet_1_rw_224.sw_in1k"
    _check(run_cli, tmp_path, empty, "holds no snapshot")
