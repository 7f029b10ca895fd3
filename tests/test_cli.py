"""The command line: bad input gives one line, exit 2, no traceback and nothing written."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from models import build_variant

from conftest import assert_clean_failure, listing

VARIANT = "coatnet_0"


@pytest.fixture
def coatnet_0_state_dict() -> dict[str, torch.Tensor]:
    model = build_variant(VARIANT, num_classes=10, device="meta")
    return {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in model.state_dict().items()}


class CodeRunningPickle:
    """Unpickling this would create a marker file (a stand-in for arbitrary code)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def bad_checkpoints(
    tmp_path: Path, state_dict: dict[str, torch.Tensor]
) -> dict[str, tuple[Path, str]]:
    """name -> (file, expected fragment of the error)."""
    made = {}
    made["missing"] = (tmp_path / "nope.pt", "does not exist")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"this is not a checkpoint at all")
    made["unreadable"] = (garbage, "not a readable PyTorch file")
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"\x00\x01junk")
    made["bad safetensors"] = (bad_st, "not a readable safetensors file")
    not_dict = tmp_path / "list.pt"
    torch.save([torch.zeros(3)], not_dict)
    made["not a state dict"] = (not_dict, "not a state dict")
    missing = dict(state_dict)
    del missing["fc.weight"], missing["s4.1.ff.1.norm.bias"]
    torch.save(missing, tmp_path / "missing.pt")
    made["missing keys"] = (
        tmp_path / "missing.pt",
        "missing 2 key(s): s4.1.ff.1.norm.bias, fc.weight",
    )
    extra = dict(state_dict, **{"head.extra.weight": torch.zeros(2)})
    torch.save(extra, tmp_path / "extra.pt")
    made["unexpected keys"] = (tmp_path / "extra.pt", "unexpected 1 key(s): head.extra.weight")
    wrong = dict(state_dict)
    wrong["s1.0.proj.weight"] = torch.zeros(5, 5, 1, 1)
    torch.save(wrong, tmp_path / "wrong.pt")
    made["wrong shape"] = (tmp_path / "wrong.pt", "s1.0.proj.weight (5, 5, 1, 1) != (96, 64, 1, 1)")
    evil = tmp_path / "evil.pt"
    torch.save({"fc.weight": CodeRunningPickle(tmp_path / "pwned")}, evil)
    made["code-running pickle"] = (evil, "refused to load")
    raw = tmp_path / "raw.pkl"
    with raw.open("wb") as f:
        pickle.dump({"fc.weight": CodeRunningPickle(tmp_path / "pwned")}, f)
    made["raw pickle"] = (raw, "refused to load")
    return made


def test_bad_checkpoints(tmp_path: Path, run_cli, coatnet_0_state_dict) -> None:
    for name, (path, fragment) in bad_checkpoints(tmp_path, coatnet_0_state_dict).items():
        before = listing(tmp_path)
        result = run_cli("--variant", VARIANT, "--checkpoint", path, "--output", tmp_path / "out")
        assert_clean_failure(result, tmp_path, before, fragment)
        assert not (tmp_path / "pwned").exists(), name


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--variant", "coatnet_9"], "valid variants: coatnet_0, coatnet_1"),
        (["--variant", VARIANT, "--img-size", "224", "200"], "multiples of 32"),
        (["--variant", VARIANT, "--img-size", "dynamic", "224"], "cannot be dynamic"),
        (["--variant", VARIANT, "--mean", "0.5,0.5"], "mean has 2 values but std has 3"),
        (["--variant", VARIANT, "--batch", "zero"], "neither 'dynamic' nor a positive integer"),
    ],
)
def test_bad_arguments(tmp_path: Path, run_cli, args: list[str], fragment: str) -> None:
    before = listing(tmp_path)
    result = run_cli(*args, "--output", tmp_path / "out")
    assert result.code == 2
    assert fragment in result.err
    assert "Traceback" not in result.err
    assert listing(tmp_path) == before


def test_output_exists_without_force(tmp_path: Path, run_cli) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    before = listing(tmp_path)
    result = run_cli("--variant", VARIANT, "--output", tmp_path / "out")
    assert_clean_failure(result, tmp_path, before, "already exists; pass --force")


def test_output_not_writable(tmp_path: Path, run_cli) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    before = listing(tmp_path)
    result = run_cli("--variant", VARIANT, "--output", blocker / "out")
    assert_clean_failure(result, tmp_path, before, "not writable")


def test_labels_must_match_classes(tmp_path: Path, run_cli) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ndog\n")
    before = listing(tmp_path)
    result = run_cli("--variant", VARIANT, "--labels", labels, "--output", tmp_path / "out")
    assert_clean_failure(result, tmp_path, before, "2 labels but the model has 1000 classes")


def test_export_validate_info_end_to_end(tmp_path: Path, run_cli) -> None:
    """The main command on a real variant, then the other actions on its output."""
    out = tmp_path / "c0"
    report = tmp_path / "report.json"
    result = run_cli(
        "--variant",
        VARIANT,
        "--output",
        out,
        "--samples",
        "1",
        "--report",
        report,
        "--exporter",
        "torchscript",
    )
    assert result.code == 0, result.err
    assert "random #1" in result.out and "validated in" in result.out
    assert "seeded random weights" in result.err + result.out
    assert json.loads(report.read_text())["passed"] is True
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "model.onnx",
        "validation.json",
    ]

    info = run_cli("info", out, "--json", "-")
    assert info.code == 0
    described = json.loads(info.out)
    assert described["variant"] == VARIANT and described["outputs"] == {"logits": ["batch", 1000]}
    to_file = run_cli("info", out, "--json", tmp_path / "info.json")
    assert to_file.code == 0 and "field" in to_file.out  # the table, and the file beside it
    assert json.loads((tmp_path / "info.json").read_text()) == described
    refused = run_cli("info", out, "--json", out / "model.onnx")
    assert refused.code == 2 and "--json" in refused.err

    again = run_cli("validate", out, "--samples", "1")
    assert again.code == 0, again.err
    assert "matches its PyTorch reference" in again.out

    strict = run_cli("validate", out, "--samples", "1", "--max-rel-error", "1e-15")
    assert strict.code == 1
    assert strict.err.count("error:") == 1

    replaced = run_cli(
        "--variant",
        VARIANT,
        "--output",
        out,
        "--no-validate",
        "--force",
        "--exporter",
        "torchscript",
    )
    assert replaced.code == 0, replaced.err
    assert "exported without validation" in replaced.out


def test_info_on_foreign_model(tmp_path: Path, run_cli) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(graph), tmp_path / "relu.onnx")
    result = run_cli("info", tmp_path / "relu.onnx")
    assert result.code == 0
    assert "not made by coatnet-export" in result.out
    missing = run_cli("validate", tmp_path / "relu.onnx")
    assert missing.code == 2 and "no coatnet-export metadata" in missing.err


def test_version_and_help(run_cli) -> None:
    assert run_cli("--version").code == 0
    result = run_cli("--help")
    assert result.code == 0
    assert all(c in result.out for c in ("export", "validate", "info", "quantize", "bench"))


def test_variants_lists_counts(run_cli) -> None:
    result = run_cli("variants", "--json", "-")
    rows = json.loads(result.out)
    lucid = [r["variant"] for r in rows if r["family"] == "lucid"]
    assert lucid == [f"coatnet_{i}" for i in range(8)]
    assert rows[0]["parameters"] == 27_174_944 and rows[7]["parameters"] == 3_107_978_688
    timm = {r["variant"]: r for r in rows if r["family"] == "timm"}
    assert len(timm) == 22 and timm["coatnet_0_rw_224"]["parameters"] == 27_435_562


def test_variants_outcome_at_another_resolution() -> None:
    """run_variants computes every architecture at the asked resolution: more tokens cost more,
    and only the relative-bias tables (whose size follows the resolution) add parameters."""
    from coatnet_export.catalog import VariantsOptions, run_variants

    at_224 = run_variants(VariantsOptions()).as_dict()
    outcome = run_variants(VariantsOptions(img_size=(384, 384)))
    assert "GMACs@384x384" in outcome.headers() and len(outcome.as_dict()) == len(at_224) == 30
    for small, large in zip(at_224, outcome.as_dict(), strict=True):
        assert small["parameters"] <= large["parameters"] and large["gmacs"] > small["gmacs"]
    assert outcome.rows()[0]["parameters"] == f"{outcome.as_dict()[0]['parameters']:,}"


def test_console_script_no_traceback(tmp_path: Path) -> None:
    """The installed entry point itself: a bad variant gives one line and exit 2."""
    result = subprocess.run(
        [sys.executable, "-m", "coatnet_export", "--variant", "nope"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: unknown variant 'nope'")
    assert "Traceback" not in result.stderr
