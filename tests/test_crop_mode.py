"""crop_mode travels: from the export's options (or a timm config.json) into the metadata, and
from the metadata into validate, quantize and info; exports without it are centre cropped."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch

from coatnet_export.describe import load_proto, metadata_of
from coatnet_export.metadata import ExportMetadata
from coatnet_export.preprocess import Preprocessing
from coatnet_export.quantize.pipeline import check_source
from models import init_weights

from conftest import TINY, assert_clean_failure, listing

SQUASH = ("--crop-mode", "squash", "--crop-pct", "0.9", "--mean", "0.3,0.4,0.5")
RECORDED = Preprocessing((64, 64), (0.3, 0.4, 0.5), crop_pct=0.9, crop_mode="squash")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """TINY's seeded weights at 64 x 64 as a flat timm-style folder (config.json says squash)."""
    folder = tmp_path_factory.mktemp("timm") / "tiny.sw_test"
    folder.mkdir()
    model = init_weights(TINY.build((64, 64), num_classes=10), 4)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    cfg = {"crop_mode": "squash", "crop_pct": 0.9, "mean": [0.3, 0.4, 0.5]}
    config = {"architecture": "coatnet_0_rw_224", "num_classes": 10, "pretrained_cfg": cfg}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def squashed(checkpoint: Path, tmp_path_factory) -> Path:
    """Exported from the folder's weights file, with the options that config.json holds."""
    from coatnet_export.cli import main

    out = tmp_path_factory.mktemp("export") / "tiny"
    args = ["export", "--checkpoint", checkpoint / "pytorch_model.bin", *SQUASH, "--output", out]
    with pytest.raises(SystemExit) as exit_info:
        main([*map(str, args), "--samples", "1", "--quiet"])
    assert exit_info.value.code == 0
    return out


def test_options_are_recorded(squashed: Path) -> None:
    metadata = metadata_of(load_proto(squashed / "model.onnx"))
    assert metadata.preprocessing() == RECORDED
    manifest = json.loads((squashed / "manifest.json").read_text())["metadata"]
    assert manifest["crop_mode"] == "squash" and "aspect not kept" in manifest["resize"]


def test_quantize_and_validate_use_the_recorded_preprocessing(
    squashed: Path, checkpoint: Path, run_cli
) -> None:
    assert check_source(squashed, None).preprocessing == RECORDED  # calibration and eval images
    result = run_cli("validate", squashed, "--checkpoint", checkpoint, "--samples", "1")
    assert result.code == 0, result.err  # the timm folder's weights file is found and matches
    assert "differ from the ones" not in result.out + result.err


def test_exports_without_crop_mode_are_centre_cropped(squashed: Path, tmp_path: Path) -> None:
    model = onnx.load(str(squashed / "model.onnx"))
    props = {p.key: p.value for p in model.metadata_props if p.key != "crop_mode"}
    assert ExportMetadata.from_props(props).preprocessing().crop_mode == "center"


def test_unknown_crop_mode_is_refused(squashed: Path, tmp_path: Path, run_cli) -> None:
    model = onnx.load(str(squashed / "model.onnx"))
    for prop in model.metadata_props:
        if prop.key == "crop_mode":
            prop.value = "border"
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    onnx.save(model, damaged / "model.onnx")
    before = listing(tmp_path)
    result = run_cli("info", damaged / "model.onnx")
    assert_clean_failure(result, tmp_path, before, "crop_mode must be one of center, squash")
    result = run_cli("export", "--variant", "coatnet_0", "--crop-mode", "border")
    assert_clean_failure(result, tmp_path, before, "--crop-mode")
